//! One test's services: the control API, the bridge with its embedded broker, devices and
//! their agents, all on free ports with their own database and directories. Optionally
//! several API instances behind a round-robin balancer and several bridges sharing
//! Mosquitto ([`instances`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use uplink_protocol::sign;

use crate::balancer::Balancer;
use crate::db::TestDatabase;
use crate::device::{DeviceHttp, Reply};
use crate::env::TestEnv;
use crate::process::{run_output, Process};
use crate::proxy::CountingProxy;

mod agents;
mod checks;
mod instances;
mod mosquitto;
mod services;

pub use agents::{AgentOptions, Device};
use mosquitto::{mosquitto_dynsec_conf, mosquitto_tls_conf, random_password};
pub use mosquitto::{
    mosquitto_test_conf, MOSQUITTO_ACL, MOSQUITTO_BRIDGE_USER, MOSQUITTO_CONF,
    MOSQUITTO_DYNSEC_CONF, MOSQUITTO_TLS_CONF,
};

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
        let command_public_key = keygen(&env, "uplink-api", &key_file);
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
                // A certificate of its own: tests replace the broker's files.
                https = tls.as_ref().map_or(String::new(), |t| {
                    let api = t.pki.ca.issue(
                        &t.pki.dir,
                        "api",
                        "uplink-test-api",
                        &["127.0.0.1"],
                        false,
                        false,
                    );
                    format!(
                        "tls_cert_file = {}\ntls_key_file = {}\n",
                        toml_str(path_str(&api.cert)),
                        toml_str(path_str(&api.key))
                    )
                }),
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
}

/// The list in a list answer: a JSON array, or the first array field of an object.
pub fn as_list(v: &Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) => Some(a.clone()),
        Value::Object(o) => o.values().find_map(|x| x.as_array().cloned()),
        _ => None,
    }
}

/// Runs `{tool} keygen --out key_file` and returns the public key of the seed it wrote,
/// checking that the tool printed the same.
fn keygen(env: &TestEnv, tool: &str, key_file: &Path) -> String {
    let printed = run_output(&env.bin(tool), &["keygen", "--out", path_str(key_file)]);
    let public_key = public_key_of(key_file);
    assert_eq!(
        printed
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(str::trim),
        Some(public_key.as_str()),
        "`{tool} keygen` must print the public key of the seed it wrote"
    );
    public_key
}

/// Base64 public key of the base64 Ed25519 seed in `key_file`.
pub fn public_key_of(key_file: &Path) -> String {
    let text = std::fs::read_to_string(key_file)
        .unwrap_or_else(|e| panic!("read {}: {e}", key_file.display()));
    let key = sign::decode_private(&text)
        .unwrap_or_else(|e| panic!("{} is not a key file: {e}", key_file.display()));
    sign::encode_public(&key.verifying_key())
}
