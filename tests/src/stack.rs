//! One test's services: the control API, the bridge with its embedded broker, devices and
//! their agents, all on free ports with their own database and directories. Optionally
//! several API instances behind a round-robin balancer and several bridges sharing
//! Mosquitto ([`instances`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use uplink_protocol::sign::{self, PrivateKey};

use crate::balancer::Balancer;
use crate::db::TestDatabase;
use crate::device::{DeviceHttp, Reply};
use crate::env::TestEnv;
use crate::files::{s3_download, sha256_file, SourceFile};
use crate::process::{log_tail, run_output, Process};
use crate::proxy::CountingProxy;

mod instances;

/// How to configure the control API.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub presign_ttl_secs: u64,
    pub replay_window_secs: u64,
    /// Extra TOML lines appended at the end of the API config (inside its `[s3]` table).
    pub api_extra_toml: String,
    /// Run Mosquitto (anonymous clients allowed) and the bridge in `external` mode instead
    /// of the bridge's embedded broker.
    pub external_broker: bool,
    /// Like `external_broker`, but Mosquitto runs the set-up of docs/security.md
    /// ([`MOSQUITTO_CONF`], [`MOSQUITTO_ACL`]): no anonymous clients, a password file made
    /// with `mosquitto_passwd`, per-device topic ACLs. The bridge logs in as
    /// [`MOSQUITTO_BRIDGE_USER`]; each registered device gets a random password
    /// ([`Device::mqtt_password`]) that its agent reads from `[mqtt] password_file`.
    pub mosquitto_acl: bool,
    /// Mosquitto with its dynamic-security plugin ([`MOSQUITTO_DYNSEC_CONF`]): the bridge is
    /// the plugin's admin (`mosquitto_ctrl dynsec init`) and keeps device accounts in step
    /// with the registry; the API derives device passwords (`mqtt_password_secret`), which
    /// [`Stack::register_device`] takes from the registration answer. No password or ACL
    /// file.
    pub mosquitto_dynsec: bool,
    /// Presigned URLs point straight at S3 instead of the counting proxy (benchmarks).
    pub direct_s3: bool,
    /// Extra environment variables for the API and the bridge.
    pub service_env: Vec<(String, String)>,
    /// The bridge reaches the control API through a fault proxy ([`Stack::api_proxy`]).
    pub api_proxy: bool,
    /// Agents reach the broker through a fault proxy ([`Stack::mqtt_proxy`]).
    pub mqtt_proxy: bool,
    /// Control API instances (at least one). With more, they share the database and the
    /// command key, and a round-robin [`Balancer`] in front of them is the stack's
    /// `api_url` (for the bridges, the operator helpers and `device_http`);
    /// [`Stack::api_instance_urls`] reach each directly.
    pub apis: usize,
    /// Bridge instances (at least one). More need `external_broker` or `mosquitto_acl`:
    /// they share Mosquitto with shared subscriptions, each with its own client id.
    pub bridges: usize,
    /// TLS everywhere agents connect ([`Stack::tls`]): a throw-away CA; the broker (the
    /// embedded one's `tls_listen`, or a Mosquitto `listener` with `cafile/certfile/
    /// keyfile`) and storage (presigned URLs on an HTTPS relay) serve certificates it
    /// signed; agents and the bridge trust it (`ca_file`, `https_ca_file`).
    pub tls: bool,
    /// With `tls`: mutual TLS (the embedded broker's `tls_client_ca_file`, or Mosquitto's
    /// `require_certificate` and `use_identity_as_username`, with the test CA); every agent
    /// presents a client certificate the CA issued for its device id (common name).
    pub tls_client_certs: bool,
    /// The API's `s3.key_prefix`: object keys and the orphan sweep's reach start with it
    /// (a test that shortens `cleanup.orphan_grace_secs` needs one of its own, or its
    /// sweep aborts other tests' uploads in the shared bucket).
    pub key_prefix: String,
}

/// The TLS side of a stack ([`StackOptions::tls`]).
#[derive(Debug)]
pub struct StackTls {
    pub pki: crate::tls::Pki,
    /// The broker's TLS port (the plain one stays on [`Stack::mqtt_port`]).
    pub mqtt_port: u16,
    /// HTTPS in front of the counting proxy: presigned URLs point here.
    pub s3: crate::tls::TlsRelay,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            presign_ttl_secs: 900,
            replay_window_secs: 300,
            api_extra_toml: String::new(),
            external_broker: false,
            mosquitto_acl: false,
            mosquitto_dynsec: false,
            direct_s3: false,
            service_env: Vec::new(),
            api_proxy: false,
            mqtt_proxy: false,
            apis: 1,
            bridges: 1,
            tls: false,
            tls_client_certs: false,
            key_prefix: String::new(),
        }
    }
}

/// The stack's own services (agents are per device).
#[derive(Debug, Clone, Copy)]
pub enum Service {
    Api,
    Bridge,
}

/// How to configure an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub concurrency: u32,
    pub part_size_mib: u64,
    /// The agent's `hash_first_max_mib`: 0 (the default here) hashes every file while its
    /// parts upload; files up to it are hashed first (needed for deduplication).
    pub hash_first_max_mib: u64,
    pub request_timeout_secs: u64,
    /// Extra top-level TOML lines (before the `[mqtt]` table).
    pub extra_toml: String,
    /// Extra environment variables for the agent (e.g. `UPLINK_FAILPOINTS`).
    pub env: Vec<(String, String)>,
    /// Runs the agent under this command (program and its arguments, the agent's command
    /// line follows), e.g. `fiu-run -x -c …`.
    pub wrapper: Vec<String>,
    /// Runs the agent with its wall clock this many seconds off (under `faketime`, Debian
    /// package `faketime`; the monotonic clock is left alone, as on a gateway whose clock
    /// is merely set wrong). Comes before `wrapper`.
    pub clock_offset_secs: Option<i64>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            concurrency: 2,
            part_size_mib: 5,
            hash_first_max_mib: 0,
            request_timeout_secs: 5,
            extra_toml: String::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
            clock_offset_secs: None,
        }
    }
}

/// A registered device: its key and directories.
#[derive(Debug)]
pub struct Device {
    pub id: String,
    pub key: PrivateKey,
    pub public_key: String,
    pub key_file: PathBuf,
    /// Device directory (holds `root/`, `state/`, the config).
    pub dir: PathBuf,
    /// The agent's allowed root.
    pub root: PathBuf,
    pub state_dir: PathBuf,
    /// Its static MQTT password in Mosquitto's password file (username = device id);
    /// `None` unless [`StackOptions::mosquitto_acl`] or [`StackOptions::mosquitto_dynsec`].
    pub mqtt_password: Option<String>,
}

/// The Mosquitto configuration of docs/security.md (production paths and port; the stack
/// rewrites those).
pub const MOSQUITTO_CONF: &str = include_str!("../../configs/mosquitto/uplink.conf");
/// The Mosquitto ACL file of docs/security.md, used as is.
pub const MOSQUITTO_ACL: &str = include_str!("../../configs/mosquitto/uplink.acl");
/// The bridge's account in [`MOSQUITTO_ACL`].
pub const MOSQUITTO_BRIDGE_USER: &str = "uplink-bridge";

/// A random password for a Mosquitto account.
fn random_password() -> String {
    format!("pw-{}", uuid::Uuid::new_v4().simple())
}

/// [`MOSQUITTO_CONF`] for a test: listening on `127.0.0.1:port`, with the password and
/// ACL files at the given paths, logging everything to stderr.
pub fn mosquitto_test_conf(port: u16, passwd: &Path, acl: &Path) -> String {
    let mut conf = MOSQUITTO_CONF.to_string();
    for (from, to) in [
        (
            "\nlistener 1883\n",
            format!("\nlistener {port} 127.0.0.1\n"),
        ),
        (
            " /etc/mosquitto/uplink.passwd\n",
            format!(" {}\n", path_str(passwd)),
        ),
        (
            " /etc/mosquitto/uplink.acl\n",
            format!(" {}\n", path_str(acl)),
        ),
    ] {
        assert!(
            conf.contains(from),
            "configs/mosquitto/uplink.conf no longer holds {from:?}"
        );
        conf = conf.replace(from, &to);
    }
    // Test-only: keep root (Mosquitto would switch to user `mosquitto`, who cannot read the
    // stack's private directory), no persistence, every log line.
    conf.push_str("user root\npersistence false\nlog_dest stderr\nlog_type all\n");
    conf
}

/// The Mosquitto set-up of docs/security.md with the dynamic-security plugin.
pub const MOSQUITTO_DYNSEC_CONF: &str = include_str!("../../configs/mosquitto/uplink-dynsec.conf");

/// [`MOSQUITTO_DYNSEC_CONF`] for a test: on `127.0.0.1:port`, the plugin's file at `file`.
fn mosquitto_dynsec_conf(port: u16, file: &Path) -> String {
    let mut conf = MOSQUITTO_DYNSEC_CONF.to_string();
    for (from, to) in [
        (
            "\nlistener 1883\n",
            format!("\nlistener {port} 127.0.0.1\n"),
        ),
        (
            " /var/lib/mosquitto/dynamic-security.json\n",
            format!(" {}\n", path_str(file)),
        ),
    ] {
        assert!(
            conf.contains(from),
            "configs/mosquitto/uplink-dynsec.conf no longer holds {from:?}"
        );
        conf = conf.replace(from, &to);
    }
    conf.push_str("user root\npersistence false\nlog_dest stderr\nlog_type all\n");
    conf
}

/// The Mosquitto TLS listener of docs/security.md ("TLS").
pub const MOSQUITTO_TLS_CONF: &str = include_str!("../../configs/mosquitto/uplink-tls.conf");

/// [`MOSQUITTO_TLS_CONF`] for a test: on `127.0.0.1`, the stack's port and certificates.
/// Without `accounts` (anonymous Mosquitto) clients have no username to be their client
/// id, so that option goes, as on the anonymous plain listener.
/// With `client_certs`, its mutual-TLS lines are on (the device id from the certificate).
fn mosquitto_tls_conf(t: &StackTls, accounts: bool, client_certs: bool) -> String {
    let mut conf = MOSQUITTO_TLS_CONF.to_string();
    if !accounts {
        conf = conf.replace("\nuse_username_as_clientid true\n", "\n");
    }
    if client_certs {
        for line in ["require_certificate true", "use_identity_as_username true"] {
            let commented = format!("\n# {line}\n");
            assert!(
                conf.contains(&commented),
                "configs/mosquitto/uplink-tls.conf no longer holds {commented:?}"
            );
            conf = conf.replace(&commented, &format!("\n{line}\n"));
        }
    }
    for (from, to) in [
        (
            "\nlistener 8883\n",
            format!("\nlistener {} 127.0.0.1\n", t.mqtt_port),
        ),
        (
            " /etc/mosquitto/certs/ca.pem\n",
            format!(" {}\n", path_str(&t.pki.ca.cert_file)),
        ),
        (
            " /etc/mosquitto/certs/broker.pem\n",
            format!(" {}\n", path_str(&t.pki.server.cert)),
        ),
        (
            " /etc/mosquitto/certs/broker.key\n",
            format!(" {}\n", path_str(&t.pki.server.key)),
        ),
    ] {
        assert!(
            conf.contains(from),
            "configs/mosquitto/uplink-tls.conf no longer holds {from:?}"
        );
        conf = conf.replace(from, &to);
    }
    conf
}

static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free TCP port on 127.0.0.1 (bound, then released), never the same twice in a run.
pub fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let mut seen = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

pub struct Stack {
    pub env: TestEnv,
    pub opts: StackOptions,
    pub db: TestDatabase,
    pub api_url: String,
    pub mqtt_port: u16,
    pub operator_token: String,
    pub bridge_token: String,
    pub command_public_key: String,
    /// Between agents and S3: every presigned URL points here.
    pub proxy: CountingProxy,
    /// Between the bridge and the control API ([`StackOptions::api_proxy`]).
    pub api_proxy: Option<CountingProxy>,
    /// Between agents and the broker ([`StackOptions::mqtt_proxy`]).
    pub mqtt_proxy: Option<CountingProxy>,
    /// [`StackOptions::tls`].
    pub tls: Option<StackTls>,
    pub device_http: DeviceHttp,
    http: reqwest::Client,
    api: Mutex<Process>,
    bridge: Mutex<Process>,
    /// Every API instance's own URL, in instance order ([`StackOptions::apis`]).
    pub api_instance_urls: Vec<String>,
    /// In front of the API instances when there are several.
    pub balancer: Option<Balancer>,
    /// API instances 1.. (instance 0 is `api`).
    more_apis: Mutex<Vec<Process>>,
    /// Bridge instances 1.. (instance 0 is `bridge`).
    more_bridges: Mutex<Vec<Process>>,
    mosquitto: Mutex<Option<Process>>,
    /// Mosquitto's password file ([`StackOptions::mosquitto_acl`]).
    mosquitto_passwd: Option<PathBuf>,
    agents: Mutex<BTreeMap<String, Process>>,
    // Last: removed after the processes are gone.
    pub dir: tempfile::TempDir,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("api_url", &self.api_url)
            .field("mqtt_port", &self.mqtt_port)
            .field("db", &self.db.name)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn toml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

impl Stack {
    /// Starts the control API and the bridge (embedded broker) for one test.
    pub async fn start(opts: StackOptions) -> Stack {
        let env = TestEnv::from_env();
        env.require_binaries();
        let dir = tempfile::Builder::new()
            .prefix("uplink-e2e-")
            .tempdir()
            .expect("temp dir");
        let db = TestDatabase::create(&env.database_url).await;
        let s3_hostport = env
            .s3_endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let proxy = CountingProxy::start(&s3_hostport).await;
        let tls = if opts.tls {
            let pki = crate::tls::Pki::new(&dir.path().join("pki"));
            let relay_to = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.port));
            let s3 = crate::tls::TlsRelay::start(relay_to, &pki.server).await;
            Some(StackTls {
                pki,
                mqtt_port: free_port(),
                s3,
            })
        } else {
            None
        };

        // --- control API
        assert!(
            opts.apis >= 1 && opts.bridges >= 1,
            "a stack has at least one API and one bridge"
        );
        assert!(
            opts.bridges == 1 || opts.external_broker || opts.mosquitto_acl,
            "several bridges share an external broker: set external_broker or mosquitto_acl"
        );
        let api_ports: Vec<u16> = (0..opts.apis).map(|_| free_port()).collect();
        let api_port = api_ports[0];
        // TLS everywhere: with `tls` the API serves HTTPS (the bridge trusts the test CA).
        assert!(
            tls.is_none() || (opts.apis == 1 && !opts.api_proxy),
            "a TLS stack has one API and no API proxy"
        );
        let scheme = if tls.is_some() { "https" } else { "http" };
        let api_instance_urls: Vec<String> = api_ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}"))
            .collect();
        let balancer = if opts.apis > 1 {
            let backends = api_ports.iter().map(|p| format!("127.0.0.1:{p}"));
            Some(Balancer::start(backends.collect()).await)
        } else {
            None
        };
        let api_url = balancer
            .as_ref()
            .map_or(api_instance_urls[0].clone(), Balancer::url);
        let api_proxy = if opts.api_proxy {
            let upstream = api_url.trim_start_matches("http://");
            Some(CountingProxy::start(upstream).await)
        } else {
            None
        };
        let operator_token = format!("operator-{}", uuid::Uuid::new_v4().simple());
        let bridge_token = format!("bridge-{}", uuid::Uuid::new_v4().simple());
        let key_file = dir.path().join("command.key");
        let printed = run_output(
            &env.bin("uplink-api"),
            &["keygen", "--out", path_str(&key_file)],
        );
        let command_public_key = public_key_of(&key_file);
        assert_eq!(
            printed
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::trim),
            Some(command_public_key.as_str()),
            "`uplink-api keygen` must print the public key of the seed it wrote"
        );
        let api_config = dir.path().join("api.toml");
        std::fs::write(
            &api_config,
            format!(
                "listen = {listen}\n\
                 database_url = {db}\n\
                 operator_token = {op}\n\
                 bridge_token = {br}\n\
                 command_key_file = {key}\n\
                 replay_window_secs = {replay}\n\
                 command_ttl_secs = 86400\n\
                 {https}{mqtt_secret}\
                 \n[s3]\n\
                 endpoint = {endpoint}\n\
                 public_endpoint = {public}\n\
                 region = {region}\n\
                 bucket = {bucket}\n\
                 access_key_id = {ak}\n\
                 secret_access_key = {sk}\n\
                 presign_ttl_secs = {ttl}\n\
                 key_prefix = {prefix}\n\
                 {extra}\n",
                listen = toml_str(&format!("127.0.0.1:{api_port}")),
                db = toml_str(&db.url),
                op = toml_str(&operator_token),
                br = toml_str(&bridge_token),
                key = toml_str(path_str(&key_file)),
                replay = opts.replay_window_secs,
                endpoint = toml_str(&env.s3_endpoint),
                public = toml_str(&if opts.direct_s3 {
                    env.s3_endpoint.clone()
                } else if let Some(tls) = &tls {
                    tls.s3.url()
                } else {
                    proxy.url()
                }),
                region = toml_str(&env.s3_region),
                bucket = toml_str(&env.s3_bucket),
                ak = toml_str(&env.s3_access_key),
                sk = toml_str(&env.s3_secret_key),
                ttl = opts.presign_ttl_secs,
                https = tls.as_ref().map_or(String::new(), |t| format!(
                    "tls_cert_file = {}\ntls_key_file = {}\n",
                    toml_str(path_str(&t.pki.server.cert)),
                    toml_str(path_str(&t.pki.server.key))
                )),
                prefix = toml_str(&opts.key_prefix),
                mqtt_secret = if opts.mosquitto_dynsec {
                    format!("mqtt_password_secret = {}\n", toml_str(&random_password()))
                } else {
                    String::new()
                },
                extra = opts.api_extra_toml,
            ),
        )
        .expect("write api.toml");
        let mut api = Process::new(
            "uplink-api",
            &env.bin("uplink-api"),
            &["--config", path_str(&api_config), "run"],
            dir.path().join("api.log"),
        );
        for (k, v) in &opts.service_env {
            api = api.env(k, v);
        }
        api.start();
        let mut more_apis = Vec::new();
        for (i, port) in api_ports.iter().enumerate().skip(1) {
            let mut more = Process::new(
                "uplink-api",
                &env.bin("uplink-api"),
                &["--config", path_str(&api_config), "run"],
                dir.path().join(format!("api-{i}.log")),
            )
            .env("UPLINK_API_LISTEN", &format!("127.0.0.1:{port}"));
            for (k, v) in &opts.service_env {
                more = more.env(k, v);
            }
            more.start();
            more_apis.push(more);
        }

        // --- broker and bridge
        let mqtt_port = free_port();
        let mqtt_proxy = if opts.mqtt_proxy {
            Some(CountingProxy::start(&format!("127.0.0.1:{mqtt_port}")).await)
        } else {
            None
        };
        let mut mosquitto = None;
        let mut mosquitto_passwd = None;
        let mut bridge_login = String::new();
        let accounts = opts.mosquitto_acl || opts.mosquitto_dynsec;
        let broker_toml = if opts.external_broker || accounts {
            let conf = dir.path().join("mosquitto.conf");
            let text = if opts.mosquitto_dynsec {
                let file = dir.path().join("dynamic-security.json");
                let password = random_password();
                run_output(
                    &env.mosquitto_tool("mosquitto_ctrl"),
                    &[
                        "dynsec",
                        "init",
                        path_str(&file),
                        MOSQUITTO_BRIDGE_USER,
                        &password,
                    ],
                );
                bridge_login = format!(
                    "username = {}\npassword = {}\ndynamic_security = true\n",
                    toml_str(MOSQUITTO_BRIDGE_USER),
                    toml_str(&password)
                );
                mosquitto_dynsec_conf(mqtt_port, &file)
            } else if opts.mosquitto_acl {
                let passwd = dir.path().join("mosquitto.passwd");
                let acl = dir.path().join("uplink.acl");
                std::fs::write(&acl, MOSQUITTO_ACL).expect("write uplink.acl");
                let password = random_password();
                run_output(
                    &env.mosquitto_passwd(),
                    &[
                        "-c",
                        "-b",
                        path_str(&passwd),
                        MOSQUITTO_BRIDGE_USER,
                        &password,
                    ],
                );
                bridge_login = format!(
                    "username = {}\npassword = {}\n",
                    toml_str(MOSQUITTO_BRIDGE_USER),
                    toml_str(&password)
                );
                let text = mosquitto_test_conf(mqtt_port, &passwd, &acl);
                mosquitto_passwd = Some(passwd);
                text
            } else {
                format!(
                    "listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                     log_dest stderr\nlog_type all\n"
                )
            };
            let text = match &tls {
                Some(t) => format!(
                    "{text}{}",
                    mosquitto_tls_conf(t, accounts, opts.tls_client_certs)
                ),
                None => text,
            };
            std::fs::write(&conf, text).expect("write mosquitto.conf");
            let mut m = Process::new(
                "mosquitto",
                &env.mosquitto,
                &["-c", path_str(&conf)],
                dir.path().join("mosquitto.log"),
            );
            m.start();
            mosquitto = Some(m);
            match &tls {
                Some(t) => {
                    // Mutual TLS: the bridge, too, shows a certificate (CN: its account).
                    let client = if opts.tls_client_certs {
                        let files = t.pki.ca.issue(
                            &t.pki.dir,
                            "bridge-client",
                            MOSQUITTO_BRIDGE_USER,
                            &[],
                            true,
                            false,
                        );
                        format!(
                            "client_cert_file = {}\nclient_key_file = {}\n",
                            toml_str(path_str(&files.cert)),
                            toml_str(path_str(&files.key))
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        "mode = \"external\"\nhost = \"127.0.0.1\"\nport = {}\n{bridge_login}\
                         tls = true\nca_file = {}\n{client}",
                        t.mqtt_port,
                        toml_str(path_str(&t.pki.ca.cert_file))
                    )
                }
                None => format!(
                    "mode = \"external\"\nhost = \"127.0.0.1\"\nport = {mqtt_port}\n{bridge_login}"
                ),
            }
        } else {
            let tls_listener = tls.as_ref().map_or(String::new(), |t| {
                let clients = if opts.tls_client_certs {
                    format!(
                        "tls_client_ca_file = {}\n",
                        toml_str(path_str(&t.pki.ca.cert_file))
                    )
                } else {
                    String::new()
                };
                format!(
                    "tls_listen = {}\ntls_cert_file = {}\ntls_key_file = {}\n{clients}",
                    toml_str(&format!("127.0.0.1:{}", t.mqtt_port)),
                    toml_str(path_str(&t.pki.server.cert)),
                    toml_str(path_str(&t.pki.server.key)),
                )
            });
            format!(
                "mode = \"embedded\"\nlisten = {}\n{tls_listener}",
                toml_str(&format!("127.0.0.1:{mqtt_port}"))
            )
        };
        let bridge_config = dir.path().join("bridge.toml");
        std::fs::write(
            &bridge_config,
            format!(
                "api_url = {api}\napi_token = {tok}\npoll_interval_ms = 200\n{api_ca}\n\
                 [broker]\n{broker_toml}client_id = {cid}\n{shared}",
                api_ca = tls.as_ref().map_or(String::new(), |t| format!(
                    "api_ca_file = {}\n",
                    toml_str(path_str(&t.pki.ca.cert_file))
                )),
                api = toml_str(&api_proxy.as_ref().map_or(api_url.clone(), |p| p.url())),
                tok = toml_str(&bridge_token),
                cid = toml_str(&crate::unique("uplink-bridge")),
                shared = if opts.bridges > 1 {
                    "shared_subscriptions = true\n"
                } else {
                    ""
                },
            ),
        )
        .expect("write bridge.toml");
        let mut bridge = Process::new(
            "uplink-bridge",
            &env.bin("uplink-bridge"),
            &["--config", path_str(&bridge_config), "run"],
            dir.path().join("bridge.log"),
        );
        for (k, v) in &opts.service_env {
            bridge = bridge.env(k, v);
        }
        let mut more_bridges = Vec::new();
        for i in 1..opts.bridges {
            let mut more = Process::new(
                "uplink-bridge",
                &env.bin("uplink-bridge"),
                &["--config", path_str(&bridge_config), "run"],
                dir.path().join(format!("bridge-{i}.log")),
            )
            .env(
                "UPLINK_BRIDGE_BROKER__CLIENT_ID",
                &crate::unique("uplink-bridge"),
            );
            for (k, v) in &opts.service_env {
                more = more.env(k, v);
            }
            more_bridges.push(more);
        }

        let api_ca = tls.as_ref().map(|t| t.pki.ca.cert_file.clone());
        let stack = Stack {
            env,
            opts,
            db,
            api_url: api_url.clone(),
            mqtt_port,
            operator_token,
            bridge_token,
            command_public_key,
            proxy,
            api_proxy,
            mqtt_proxy,
            tls,
            device_http: DeviceHttp::new(&api_url, api_ca.as_deref()),
            http: crate::device::http_client(api_ca.as_deref()),
            api: Mutex::new(api),
            bridge: Mutex::new(bridge),
            api_instance_urls,
            balancer,
            more_apis: Mutex::new(more_apis),
            more_bridges: Mutex::new(more_bridges),
            mosquitto: Mutex::new(mosquitto),
            mosquitto_passwd,
            agents: Mutex::new(BTreeMap::new()),
            dir,
        };
        for i in 0..stack.opts.apis {
            stack
                .wait_instance_healthy(i, Duration::from_secs(90))
                .await;
        }
        let served = stack.get_json("/v1/command-key").await;
        assert_eq!(
            served.body["public_key"].as_str(),
            Some(stack.command_public_key.as_str()),
            "GET /v1/command-key must serve the command key's public half: {served}"
        );
        lock(&stack.bridge).start();
        for more in lock(&stack.more_bridges).iter_mut() {
            more.start();
        }
        stack
            .wait_tcp("uplink-bridge", mqtt_port, Duration::from_secs(60))
            .await;
        stack
    }

    async fn wait_api_healthy(&self, timeout: Duration) {
        self.wait_instance_healthy(0, timeout).await;
    }

    /// Waits until API instance `i` answers `GET /healthz` with 200.
    async fn wait_instance_healthy(&self, i: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.with_instance(Service::Api, i, |p| p.exited()) {
                panic!("uplink-api instance {i} exited during start-up ({status})");
            }
            if let Ok(resp) = self
                .http
                .get(format!("{}/healthz", self.api_instance_urls[i]))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if resp.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "uplink-api: GET /healthz not 200 within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_tcp(&self, name: &str, port: u16, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.assert_alive();
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: 127.0.0.1:{port} does not accept connections within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Panics when a service the test did not stop has exited.
    pub fn assert_alive(&self) {
        if let Some(status) = lock(&self.api).exited() {
            panic!("uplink-api exited unexpectedly ({status})");
        }
        if let Some(status) = lock(&self.bridge).exited() {
            panic!("uplink-bridge exited unexpectedly ({status})");
        }
        if let Some(status) = lock(&self.mosquitto).as_mut().and_then(|m| m.exited()) {
            panic!("mosquitto exited unexpectedly ({status})");
        }
        for (which, more) in [
            ("uplink-api", &self.more_apis),
            ("uplink-bridge", &self.more_bridges),
        ] {
            for (i, p) in lock(more).iter_mut().enumerate() {
                if let Some(status) = p.exited() {
                    panic!("{which} instance {} exited unexpectedly ({status})", i + 1);
                }
            }
        }
        for (id, agent) in lock(&self.agents).iter_mut() {
            if let Some(status) = agent.exited() {
                panic!("uplink-agent of {id} exited unexpectedly ({status})");
            }
        }
    }

    // --- operator API ----------------------------------------------------------------

    pub async fn operator(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Reply {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.api_url))
            .bearer_auth(&self.operator_token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        Reply::from_response(resp).await
    }

    pub async fn get_json(&self, path: &str) -> Reply {
        self.operator(reqwest::Method::GET, path, None).await
    }

    /// Makes a device key pair with `uplink-agent keygen` and registers the public key.
    pub async fn register_device(&self) -> Device {
        let id = crate::unique("robot");
        let dir = self.dir.path().join(&id);
        let root = dir.join("root");
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&root).expect("create root");
        std::fs::create_dir_all(&state_dir).expect("create state dir");
        let key_file = dir.join("device.key");
        let printed = run_output(
            &self.env.bin("uplink-agent"),
            &["keygen", "--out", path_str(&key_file)],
        );
        let public_key = public_key_of(&key_file);
        assert_eq!(
            printed
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::trim),
            Some(public_key.as_str()),
            "`uplink-agent keygen` must print the public key of the seed it wrote"
        );
        let key = sign::decode_private(&std::fs::read_to_string(&key_file).expect("read key"))
            .expect("device key file holds base64 of a 32-byte seed");
        let reply = self
            .operator(
                reqwest::Method::POST,
                "/v1/devices",
                Some(json!({ "device_id": id, "public_key": public_key })),
            )
            .await;
        assert_eq!(reply.status, 201, "POST /v1/devices: {reply}");
        let mqtt_password = if self.opts.mosquitto_dynsec {
            let password = reply.body["mqtt_password"]
                .as_str()
                .unwrap_or_else(|| panic!("no mqtt_password in {reply}"))
                .to_string();
            self.wait_mosquitto_login(&id, &password).await;
            Some(password)
        } else if self.mosquitto_passwd.is_some() {
            Some(self.add_mosquitto_user(&id).await)
        } else {
            None
        };
        Device {
            id,
            key,
            public_key,
            key_file,
            dir,
            root,
            state_dir,
            mqtt_password,
        }
    }

    /// Gives `user` a random password in Mosquitto's password file (`mosquitto_passwd -b`),
    /// has Mosquitto reload it (SIGHUP) and waits until that login is accepted.
    /// [`StackOptions::mosquitto_acl`] stacks only.
    pub async fn add_mosquitto_user(&self, user: &str) -> String {
        let passwd = self
            .mosquitto_passwd
            .as_ref()
            .expect("add_mosquitto_user needs StackOptions::mosquitto_acl");
        let password = random_password();
        run_output(
            &self.env.mosquitto_passwd(),
            &["-b", path_str(passwd), user, &password],
        );
        lock(&self.mosquitto)
            .as_ref()
            .expect("mosquitto runs")
            .signal("HUP");
        self.wait_mosquitto_login(user, &password).await;
        password
    }

    /// Waits (at most 20 s) until Mosquitto accepts `user` with `password` on its plain port.
    pub async fn wait_mosquitto_login(&self, user: &str, password: &str) {
        let login = crate::device::MqttLogin::user(user, password);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match crate::device::MqttDevice::connect_with(self.mqtt_port, &login).await {
                Ok(probe) => {
                    probe.disconnect().await;
                    return;
                }
                Err(e) => {
                    self.assert_alive();
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "mosquitto does not accept the account {user} within 20 s: {e:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// A client certificate of the stack's CA for `dev` (common name: its device id), made
    /// once in the device's directory ([`StackOptions::tls`]).
    pub fn client_cert(&self, dev: &Device) -> crate::tls::CertFiles {
        let tls = self
            .tls
            .as_ref()
            .expect("client_cert needs StackOptions::tls");
        let files = crate::tls::CertFiles {
            cert: dev.dir.join("client.pem"),
            key: dev.dir.join("client.key"),
        };
        if !files.cert.exists() {
            tls.pki
                .ca
                .issue(&dev.dir, "client", &dev.id, &[], true, false);
        }
        files
    }

    /// Writes the agent's config and starts it (after killing the device's previous agent,
    /// if any).
    pub fn start_agent(&self, dev: &Device, opts: &AgentOptions) {
        // Never two agents on one state directory: a previous one is killed first.
        let previous = lock(&self.agents).remove(&dev.id);
        if let Some(mut previous) = previous {
            previous.kill();
        }
        let config = dev.dir.join("agent.toml");
        // TLS: the broker's TLS port and the test CA, for MQTT and for the HTTPS storage.
        let (https_ca, mqtt_tls) = match &self.tls {
            Some(t) => {
                let ca = toml_str(path_str(&t.pki.ca.cert_file));
                let client = if self.opts.tls_client_certs {
                    let files = self.client_cert(dev);
                    format!(
                        "client_cert_file = {}\nclient_key_file = {}\n",
                        toml_str(path_str(&files.cert)),
                        toml_str(path_str(&files.key))
                    )
                } else {
                    String::new()
                };
                (
                    format!("https_ca_file = {ca}\n"),
                    format!("tls = true\nca_file = {ca}\n{client}"),
                )
            }
            None => (String::new(), String::new()),
        };
        // The static Mosquitto password, read from a file as docs/security.md advises.
        let mqtt_login = match &dev.mqtt_password {
            Some(password) => {
                let file = dev.dir.join("mqtt.password");
                std::fs::write(&file, format!("{password}\n")).expect("write mqtt.password");
                format!("password_file = {}\n", toml_str(path_str(&file)))
            }
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "device_id = {id}\n\
                 key_file = {key}\n\
                 command_public_key = {cmdkey}\n\
                 state_dir = {state}\n\
                 allowed_roots = [{root}]\n\
                 concurrency = {conc}\n\
                 part_size_mib = {part}\n\
                 hash_first_max_mib = {hash_first}\n\
                 request_timeout_secs = {rto}\n\
                 {https_ca}{extra}\n\
                 \n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n{mqtt_login}{mqtt_tls}",
                id = toml_str(&dev.id),
                key = toml_str(path_str(&dev.key_file)),
                cmdkey = toml_str(&self.command_public_key),
                state = toml_str(path_str(&dev.state_dir)),
                root = toml_str(path_str(&dev.root)),
                conc = opts.concurrency,
                part = opts.part_size_mib,
                hash_first = opts.hash_first_max_mib,
                rto = opts.request_timeout_secs,
                extra = opts.extra_toml,
                port = match (&self.tls, &self.mqtt_proxy) {
                    (Some(t), _) => t.mqtt_port,
                    (None, Some(p)) => p.port,
                    (None, None) => self.mqtt_port,
                },
            ),
        )
        .expect("write agent.toml");
        let bin = self.env.bin("uplink-agent");
        let mut wrapper = Vec::new();
        if let Some(offset) = opts.clock_offset_secs {
            let faketime = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|d| d.join("faketime"))
                .chain([PathBuf::from("/usr/bin/faketime")])
                .find(|p| p.is_file())
                .unwrap_or_else(|| {
                    panic!(
                        "faketime not found: install the Debian package faketime \
                         (apt-get install faketime; scripts/lib.sh ensure_deps installs it)"
                    )
                });
            wrapper.extend([
                path_str(&faketime).to_string(),
                "-f".into(),
                format!("{offset:+}"),
            ]);
        }
        wrapper.extend(opts.wrapper.iter().cloned());
        let mut args: Vec<&str> = wrapper.iter().skip(1).map(String::as_str).collect();
        if !wrapper.is_empty() {
            args.push(path_str(&bin));
        }
        args.extend(["--config", path_str(&config), "run"]);
        let program = wrapper.first().map_or(bin.clone(), PathBuf::from);
        let mut agent = Process::new("uplink-agent", &program, &args, dev.dir.join("agent.log"));
        if opts.clock_offset_secs.is_some() {
            agent = agent.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        for (k, v) in &opts.env {
            agent = agent.env(k, v);
        }
        agent.start();
        lock(&self.agents).insert(dev.id.clone(), agent);
    }

    /// Registers a device and starts its agent.
    pub async fn add_device(&self, opts: &AgentOptions) -> Device {
        let dev = self.register_device().await;
        self.start_agent(&dev, opts);
        dev
    }

    /// `Some(status)` once the device's agent has exited on its own.
    pub fn agent_exited(&self, dev: &Device) -> Option<ExitStatus> {
        lock(&self.agents).get_mut(&dev.id)?.exited()
    }

    /// Waits until the device's agent exits on its own (a failpoint, a fatal error) and
    /// returns how it ended; panics after `timeout` or when another service died.
    pub async fn wait_agent_exit(&self, dev: &Device, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = lock(&self.agents)
                .get_mut(&dev.id)
                .expect("agent started")
                .exited()
            {
                return status;
            }
            if let Some(status) = lock(&self.api).exited() {
                panic!("uplink-api exited unexpectedly ({status})");
            }
            if let Some(status) = lock(&self.bridge).exited() {
                panic!("uplink-bridge exited unexpectedly ({status})");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent of {} did not exit within {timeout:?}",
                dev.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the device's agent log holds `needle`; panics with `why` after `timeout`.
    pub async fn wait_agent_log(&self, dev: &Device, needle: &str, timeout: Duration, why: &str) {
        let deadline = tokio::time::Instant::now() + timeout;
        let log = dev.dir.join("agent.log");
        loop {
            if std::fs::read_to_string(&log).is_ok_and(|t| t.contains(needle)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no `{needle}` in {} within {timeout:?}: {why}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /v1/audit?subject=` as a list (oldest first).
    pub async fn audit(&self, subject: &str) -> Vec<Value> {
        let reply = self
            .get_json(&format!("/v1/audit?subject={subject}&limit=1000"))
            .await;
        assert_eq!(reply.status, 200, "GET /v1/audit: {reply}");
        as_list(&reply.body).unwrap_or_else(|| panic!("GET /v1/audit is not a list: {reply}"))
    }

    /// How many times the API recorded the command's ack moving it to `state`.
    pub async fn acks_recorded(&self, command_id: &str, state: &str) -> usize {
        self.audit(command_id)
            .await
            .iter()
            .filter(|e| e["action"] == "command.ack" && e["detail"]["state"] == state)
            .count()
    }

    /// Process id of the device's running agent.
    pub fn agent_pid(&self, dev: &Device) -> Option<u32> {
        lock(&self.agents).get(&dev.id).and_then(|a| a.pid())
    }

    /// SIGKILLs the device's agent.
    pub fn kill_agent(&self, dev: &Device) {
        lock(&self.agents)
            .get_mut(&dev.id)
            .expect("agent started")
            .kill();
    }

    /// Starts the agent again with the same config and state directory.
    pub fn restart_agent(&self, dev: &Device) {
        let mut agents = lock(&self.agents);
        let agent = agents.get_mut(&dev.id).expect("agent started");
        agent.kill();
        agent.start();
    }

    /// Sends SIGTERM to the API or the bridge.
    pub fn terminate(&self, which: Service) {
        lock(self.service(which)).terminate();
    }

    /// The log of the API or the bridge so far.
    pub fn log_of(&self, which: Service) -> String {
        let path = lock(self.service(which)).log.clone();
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Waits until the API or the bridge has exited on its own: its status, or `None` if it
    /// is still running after `timeout`.
    pub async fn wait_exit(&self, which: Service, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = lock(self.service(which)).exited() {
                return Some(status);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn service(&self, which: Service) -> &Mutex<Process> {
        match which {
            Service::Api => &self.api,
            Service::Bridge => &self.bridge,
        }
    }

    pub fn kill_api(&self) {
        lock(&self.api).kill();
    }

    pub async fn restart_api(&self) {
        self.restart_api_with(&[]).await;
    }

    /// Restarts the API with `env` set (kept for later restarts until set again).
    pub async fn restart_api_with(&self, env: &[(&str, &str)]) {
        {
            let mut api = lock(&self.api);
            api.kill();
            for (k, v) in env {
                api.set_env(k, v);
            }
            api.start();
        }
        self.wait_api_healthy(Duration::from_secs(60)).await;
    }

    pub fn kill_bridge(&self) {
        lock(&self.bridge).kill();
    }

    pub async fn restart_bridge(&self) {
        {
            let mut bridge = lock(&self.bridge);
            bridge.kill();
            bridge.start();
        }
        self.wait_tcp("uplink-bridge", self.mqtt_port, Duration::from_secs(30))
            .await;
    }

    /// Writes `size` random bytes at `relative` under the device's allowed root.
    pub async fn source_file(&self, dev: &Device, relative: &str, size: u64) -> SourceFile {
        crate::files::write_random_file(&dev.root.join(relative), size).await
    }

    /// `POST /v1/devices/{id}/commands` with an upload action; returns the command id.
    pub async fn upload_command(&self, device_id: &str, path: &str) -> String {
        let reply = self
            .operator(
                reqwest::Method::POST,
                &format!("/v1/devices/{device_id}/commands"),
                Some(json!({ "type": "upload", "path": path })),
            )
            .await;
        assert_eq!(reply.status, 201, "create upload command: {reply}");
        reply.body["command_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no command_id in {reply}"))
            .to_string()
    }

    pub async fn command(&self, command_id: &str) -> Value {
        let reply = self.get_json(&format!("/v1/commands/{command_id}")).await;
        assert_eq!(reply.status, 200, "GET /v1/commands/{command_id}: {reply}");
        reply.body
    }

    /// Polls until the command is `rejected`, `done`, `failed` or `expired`.
    pub async fn wait_command_final(&self, command_id: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_state = String::new();
        loop {
            let cmd = self.command(command_id).await;
            let state = cmd["state"].as_str().unwrap_or("").to_string();
            if matches!(state.as_str(), "rejected" | "done" | "failed" | "expired") {
                return cmd;
            }
            if state != last_state {
                eprintln!("command {command_id}: {state}");
                last_state = state;
            }
            self.assert_alive();
            if tokio::time::Instant::now() >= deadline {
                let sessions = self.sessions(cmd["device_id"].as_str().unwrap_or("")).await;
                panic!(
                    "command {command_id} not final after {timeout:?}: {cmd}\nsessions: {}",
                    Value::Array(sessions)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits for a completed session of the device's file with `sha256` (jobs started
    /// without a command: `uplink-agent upload`, directory watches).
    pub async fn wait_completed_session(
        &self,
        dev: &Device,
        sha256: &str,
        timeout: Duration,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let sessions = self.sessions(&dev.id).await;
            if let Some(s) = sessions
                .iter()
                .find(|s| s["sha256"] == sha256 && s["state"] == "completed")
            {
                return s.clone();
            }
            self.assert_alive();
            if tokio::time::Instant::now() > deadline {
                self.dump_logs();
                panic!(
                    "no completed session with sha256 {sha256} within {timeout:?}: {sessions:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// `GET /v1/sessions?device_id=` as a list.
    pub async fn sessions(&self, device_id: &str) -> Vec<Value> {
        let reply = self
            .get_json(&format!("/v1/sessions?device_id={device_id}"))
            .await;
        assert_eq!(reply.status, 200, "GET /v1/sessions: {reply}");
        as_list(&reply.body)
            .unwrap_or_else(|| panic!("GET /v1/sessions is not a list of sessions: {reply}"))
    }

    pub async fn session(&self, session_id: &str) -> Value {
        let reply = self.get_json(&format!("/v1/sessions/{session_id}")).await;
        assert_eq!(reply.status, 200, "GET /v1/sessions/{session_id}: {reply}");
        reply.body
    }

    /// Runs an upload command for `file` and checks everything: command `done`, session
    /// `completed` with the file's size and SHA-256, object in S3 byte-identical.
    /// Returns the final session.
    pub async fn upload_and_verify(
        &self,
        dev: &Device,
        file: &SourceFile,
        timeout: Duration,
    ) -> Value {
        let command_id = self.upload_command(&dev.id, file.path_str()).await;
        let cmd = self.wait_command_final(&command_id, timeout).await;
        self.verify_upload(file, &cmd).await
    }

    /// Waits until the API has checked the session's claimed SHA-256 against the stored
    /// bytes (`digest_check` no longer `pending`) and returns the session.
    pub async fn wait_digest_checked(&self, session_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.session(session_id).await;
            if s["digest_check"].as_str().is_some_and(|c| c != "pending") {
                return s;
            }
            self.assert_alive();
            assert!(
                tokio::time::Instant::now() < deadline,
                "digest of session {session_id} not checked within 60 s: {s}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Checks a final command for `file` (see [`Stack::upload_and_verify`]).
    pub async fn verify_upload(&self, file: &SourceFile, cmd: &Value) -> Value {
        assert_eq!(
            cmd["state"], "done",
            "upload command did not end done: {cmd}"
        );
        let session_id = cmd["session_id"]
            .as_str()
            .unwrap_or_else(|| panic!("done upload command has no session_id: {cmd}"));
        let session = self.session(session_id).await;
        assert_eq!(session["state"], "completed", "session: {session}");
        assert_eq!(
            session["size"].as_u64(),
            Some(file.size),
            "session size: {session}"
        );
        assert_eq!(
            session["sha256"].as_str(),
            Some(file.sha256.as_str()),
            "the session's recorded sha256 must equal the file's: {session}"
        );
        assert_eq!(
            session["command_id"].as_str(),
            cmd["command_id"].as_str(),
            "session.command_id: {session}"
        );
        let bucket = session["bucket"].as_str().expect("session.bucket");
        let key = session["object_key"].as_str().expect("session.object_key");
        let file_name = file
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name");
        let device_id = cmd["device_id"].as_str().unwrap_or("");
        assert_eq!(
            key,
            format!(
                "{}default/default/{device_id}/{session_id}/{file_name}",
                self.opts.key_prefix
            ),
            "object key layout ({{key_prefix}}{{project}}/{{dataset}}/{{device}}/{{session}}/{{filename}})"
        );
        let dest = self.dir.path().join(format!("download-{session_id}"));
        let code = s3_download(&self.env, bucket, key, &dest).await;
        assert_eq!(code, 200, "GET s3://{bucket}/{key}");
        let (sha, len) = sha256_file(&dest);
        std::fs::remove_file(&dest).ok();
        assert_eq!(len, file.size, "size of the object in S3");
        assert_eq!(sha, file.sha256, "SHA-256 of the object in S3");
        session
    }

    /// Restarts Mosquitto (external-broker stacks only) on the same port.
    pub async fn restart_mosquitto(&self) {
        {
            let mut m = lock(&self.mosquitto);
            let m = m
                .as_mut()
                .expect("restart_mosquitto needs a Mosquitto stack");
            m.kill();
            m.start();
        }
        self.wait_tcp("mosquitto", self.mqtt_port, Duration::from_secs(30))
            .await;
    }

    /// Waits until at least `bytes` went from agents through the proxy towards storage.
    /// Panics when the command ends first or nothing moves for `timeout`.
    pub async fn wait_proxy_bytes(&self, command_id: &str, bytes: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.proxy.bytes_sent() < bytes {
            let cmd = self.command(command_id).await;
            let state = cmd["state"].as_str().unwrap_or("");
            assert!(
                !matches!(state, "done" | "failed" | "rejected" | "expired"),
                "the command ended ({cmd}) before {bytes} bytes went to storage"
            );
            self.assert_alive();
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {bytes} bytes went to storage within {timeout:?}",
                self.proxy.bytes_sent()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Result of `PRAGMA integrity_check` on the agent's `state_dir/agent.db` (opened
    /// read-only; fine while the agent runs, the database is in WAL mode).
    pub fn agent_db_integrity(&self, dev: &Device) -> String {
        let path = dev.state_dir.join("agent.db");
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        conn.busy_timeout(Duration::from_secs(10)).ok();
        let rows: Vec<String> = conn
            .prepare("PRAGMA integrity_check")
            .and_then(|mut st| {
                st.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap_or_else(|e| panic!("PRAGMA integrity_check on {}: {e}", path.display()));
        rows.join("\n")
    }

    /// Keys of the multipart uploads open for `dev`'s objects (default key layout).
    pub async fn open_uploads_of(&self, dev: &Device) -> Vec<String> {
        let needle = format!("/{}/", dev.id);
        let mut open = self.s3_open_uploads(&self.opts.key_prefix).await;
        open.retain(|k| k.contains(&needle));
        open
    }

    /// Keys of the multipart uploads still open in the bucket under `prefix`
    /// (S3 ListMultipartUploads, SigV4-signed with curl).
    pub async fn s3_open_uploads(&self, prefix: &str) -> Vec<String> {
        // Sorted, encoded and with `uploads=`: curl signs the query as written.
        let url = format!(
            "{}/{}?prefix={}&uploads=",
            self.env.s3_endpoint,
            self.env.s3_bucket,
            prefix.replace('/', "%2F")
        );
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--fail-with-body", "--max-time", "30"])
            // Signed in; AWS S3 and Garage refuse a request without it (400).
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{}:s3", self.env.s3_region))
            .arg("--user")
            .arg(format!(
                "{}:{}",
                self.env.s3_access_key, self.env.s3_secret_key
            ))
            .arg(&url)
            .output()
            .await
            .expect("run curl");
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success() && body.contains("ListMultipartUploadsResult"),
            "GET {url}: {} {body}",
            String::from_utf8_lossy(&out.stderr)
        );
        body.split("<Upload>")
            .skip(1)
            .filter_map(|u| {
                let start = u.find("<Key>")? + "<Key>".len();
                let end = u[start..].find("</Key>")? + start;
                Some(u[start..end].to_string())
            })
            .collect()
    }

    /// The checks every fault test ends with: the command is `done` and the object
    /// byte-identical ([`Stack::verify_upload`]), the device has exactly one session, no
    /// multipart upload is left open under the device's prefix, and the agent's SQLite
    /// database passes `PRAGMA integrity_check`. Returns the session.
    pub async fn verify_fault_upload(&self, dev: &Device, file: &SourceFile, cmd: &Value) -> Value {
        let session = self.verify_upload(file, cmd).await;
        let sessions = self.sessions(&dev.id).await;
        assert_eq!(
            sessions.len(),
            1,
            "exactly one session for one upload: {}",
            Value::Array(sessions.clone())
        );
        assert_eq!(sessions[0]["session_id"], session["session_id"]);
        let open = self.open_uploads_of(dev).await;
        assert!(open.is_empty(), "multipart uploads left open: {open:?}");
        assert_eq!(self.agent_db_integrity(dev), "ok", "agent.db integrity");
        session
    }

    /// Prints every process's log (tail) to stderr.
    pub fn dump_logs(&self) {
        let mut logs: Vec<(String, PathBuf)> = vec![
            ("uplink-api".into(), lock(&self.api).log.clone()),
            ("uplink-bridge".into(), lock(&self.bridge).log.clone()),
        ];
        for (which, more) in [
            ("uplink-api", &self.more_apis),
            ("uplink-bridge", &self.more_bridges),
        ] {
            for (i, p) in lock(more).iter().enumerate() {
                logs.push((format!("{which} instance {}", i + 1), p.log.clone()));
            }
        }
        if let Some(m) = lock(&self.mosquitto).as_ref() {
            logs.push(("mosquitto".into(), m.log.clone()));
        }
        for (id, agent) in lock(&self.agents).iter() {
            logs.push((format!("uplink-agent {id}"), agent.log.clone()));
        }
        for (name, path) in logs {
            eprintln!(
                "\n----- {name} log ({}) -----\n{}",
                path.display(),
                log_tail(&path, 48 * 1024)
            );
        }
        eprintln!(
            "----- proxy: {} bytes from agents, {} bytes back, {} connections -----",
            self.proxy.bytes_sent(),
            self.proxy.bytes_received(),
            self.proxy.connections()
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for agent in lock(&self.agents).values_mut() {
            agent.kill();
        }
        lock(&self.bridge).kill();
        for p in lock(&self.more_bridges).iter_mut() {
            p.kill();
        }
        if let Some(m) = lock(&self.mosquitto).as_mut() {
            m.kill();
        }
        lock(&self.api).kill();
        for p in lock(&self.more_apis).iter_mut() {
            p.kill();
        }
        if std::thread::panicking() {
            eprintln!("\n===== test failed: logs of its processes =====");
            self.dump_logs();
        }
        if std::env::var("UPLINK_TEST_KEEP").as_deref() == Ok("1") {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("keeping {}", dir.keep().display());
        }
    }
}

/// The list in a list answer: a JSON array, or the first array field of an object.
pub fn as_list(v: &Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) => Some(a.clone()),
        Value::Object(o) => o.values().find_map(|x| x.as_array().cloned()),
        _ => None,
    }
}

/// Base64 public key of the base64 Ed25519 seed in `key_file`.
pub fn public_key_of(key_file: &Path) -> String {
    let text = std::fs::read_to_string(key_file)
        .unwrap_or_else(|e| panic!("read {}: {e}", key_file.display()));
    let key = sign::decode_private(&text)
        .unwrap_or_else(|e| panic!("{} is not a key file: {e}", key_file.display()));
    sign::encode_public(&key.verifying_key())
}
