//! Devices of a stack: registered with a fresh key (and, on Mosquitto, an account), their
//! agents configured for the stack's broker, storage and TLS, started, killed, restarted
//! and watched.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use serde_json::json;
use uplink_protocol::sign::{self, PrivateKey};

use super::{keygen, lock, path_str, toml_str, Stack};
use crate::process::Process;

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
    /// Runs the agent with its wall clock this many seconds off (libfaketime preloaded,
    /// Debian package `faketime`; the monotonic clock is left alone, as on a gateway whose
    /// clock is merely set wrong).
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

impl Stack {
    /// Makes a device key pair with `uplink-agent keygen` and registers the public key.
    pub async fn register_device(&self) -> Device {
        let id = crate::unique("robot");
        let dir = self.dir.path().join(&id);
        let root = dir.join("root");
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&root).expect("create root");
        std::fs::create_dir_all(&state_dir).expect("create state dir");
        let key_file = dir.join("device.key");
        let public_key = keygen(&self.env, "uplink-agent", &key_file);
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
        let wrapper = &opts.wrapper;
        let mut args: Vec<&str> = wrapper.iter().skip(1).map(String::as_str).collect();
        if !wrapper.is_empty() {
            args.push(path_str(&bin));
        }
        args.extend(["--config", path_str(&config), "run"]);
        let program = wrapper.first().map_or(bin.clone(), PathBuf::from);
        // As the packaged systemd unit runs it.
        let mut agent = Process::new("uplink-agent", &program, &args, dev.dir.join("agent.log"))
            .env("MALLOC_ARENA_MAX", "2");
        if let Some(offset) = opts.clock_offset_secs {
            // libfaketime preloaded, not its `faketime` wrapper. Both name a semaphore in
            // /dev/shm after their PID and leave it behind when the test kills them; a
            // later wrapper given the same PID exits ("sem_open: File exists"), while the
            // library carries on without it.
            agent = agent
                .env("LD_PRELOAD", path_str(&libfaketime()))
                .env("FAKETIME", &format!("{offset:+}"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
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
}

/// libfaketime's thread-safe build (the agent is multi-threaded), from the Debian package
/// `faketime`.
fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "libfaketimeMT.so.1 not found under /usr/lib/*/faketime: install the Debian \
             package faketime (apt-get install faketime; scripts/lib.sh ensure_deps installs it)"
        )
    })
}
