//! Agent configuration: a TOML file plus `UPLINK_AGENT_<FIELD>` environment overrides
//! (`__` separates nested fields, e.g. `UPLINK_AGENT_MQTT__HOST`).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use uplink_protocol::keyring::CommandKeys;
use uplink_protocol::sign::{self, PrivateKey};
use uplink_protocol::topics;
use uplink_service::config::{Layers, Report};

use crate::watch::{self, Watch, WatchConfig};

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "UPLINK_AGENT_";

pub use uplink_service::config::{Problem, Secret};

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub device_id: String,
    /// Ed25519 seed (base64) made by `uplink-agent keygen`.
    pub key_file: PathBuf,
    /// Base64 public key of the control API's command-signing key.
    pub command_public_key: String,
    /// More command public keys pinned beside `command_public_key`: the API's next key
    /// while its command key is rotated (docs/security.md, "Rotating the command key").
    #[serde(default)]
    pub command_public_keys: Vec<String>,
    /// Holds `agent.db`.
    pub state_dir: PathBuf,
    pub allowed_roots: Vec<PathBuf>,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_part_size_mib")]
    pub part_size_mib: u64,
    /// Files up to this size (MiB) are hashed whole before their session, so storage's
    /// verified copy of the same content can answer without a byte sent (deduplication);
    /// larger files are hashed while their parts upload, at no wait. 0 = never first.
    #[serde(default = "default_hash_first_max_mib")]
    pub hash_first_max_mib: u64,
    /// An unanswered request is re-sent (same request_id) after this many seconds.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Upload rate cap over all parts of all jobs; 0 = unlimited.
    #[serde(default)]
    pub max_upload_bytes_per_sec: u64,
    /// Parts in flight of any one job; unset = `concurrency`.
    #[serde(default)]
    pub per_job_concurrency: Option<usize>,
    /// `HH:MM-HH:MM` ranges of local time when parts may start; empty = always.
    #[serde(default)]
    pub upload_windows: Vec<String>,
    /// Serve Prometheus metrics at `http://{metrics_listen}/metrics`; off when unset.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The control API's base URL; only `uplink-agent doctor` uses it (clock skew check).
    #[serde(default)]
    pub api_url: Option<String>,
    /// Extra CA certificates (PEM) trusted for HTTPS, besides the built-in roots: storage
    /// PUTs and `api_url` (see [`crate::tls`]).
    #[serde(default)]
    pub https_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// `[[watch]]` entries: directories whose new files are uploaded without a command.
    #[serde(default)]
    pub watch: Vec<WatchConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Overrides the default username (the device id).
    #[serde(default)]
    pub username: Option<String>,
    /// Overrides the default password (derived from the device key).
    #[serde(default)]
    pub password: Option<Secret>,
    /// Reads the static password from this file instead of `password` (one line; a
    /// trailing newline is ignored), so it can live next to the device key rather than in
    /// the configuration. For brokers with their own accounts, e.g. Mosquitto's
    /// `password_file` (docs/security.md).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// MQTT over TLS (usually port 8883); the fields below need it ([`crate::tls`]).
    #[serde(default)]
    pub tls: bool,
    /// Trust only these CA certificates (PEM) for the broker; unset = the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; its CN must be the device id.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Check the broker's certificate against this name instead of `host`.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl MqttConfig {
    /// The static password: `password`, or the contents of `password_file`; `None` means
    /// the password derived from the device key. The problem never quotes the secret.
    pub fn static_password(&self) -> Result<Option<Secret>, Problem> {
        match (&self.password, &self.password_file) {
            (Some(_), Some(_)) => Err(Problem::new(
                "mqtt.password_file",
                "set either mqtt.password or mqtt.password_file, not both",
            )),
            (Some(p), None) if p.expose().is_empty() => Err(Problem::new(
                "mqtt.password",
                "must not be empty (leave it unset for the password derived from the device key)",
            )),
            (Some(p), None) => Ok(Some(p.clone())),
            (None, Some(file)) => read_password_file(file).map(Some),
            (None, None) => Ok(None),
        }
    }
}

/// One line of `file`, without its line ending; never empty.
fn read_password_file(file: &Path) -> Result<Secret, Problem> {
    let bad = |message: String| Problem::new("mqtt.password_file", message);
    let text = std::fs::read_to_string(file)
        .map_err(|e| bad(format!("cannot read {}: {e}", file.display())))?;
    let line = text
        .strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(&text);
    if line.is_empty() {
        return Err(bad(format!("{} is empty", file.display())));
    }
    if line.contains(['\n', '\r']) {
        return Err(bad(format!(
            "{} must hold the password on one line",
            file.display()
        )));
    }
    Ok(Secret::new(line))
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: default_host(),
            port: default_port(),
            username: None,
            password: None,
            password_file: None,
            tls: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            server_name: None,
        }
    }
}

fn default_concurrency() -> usize {
    4
}
fn default_part_size_mib() -> u64 {
    8
}
fn default_hash_first_max_mib() -> u64 {
    64
}
fn default_request_timeout_secs() -> u64 {
    10
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Every problem, each with where it was set (file line or environment variable).
    #[error("{0}")]
    Report(#[from] Report),
    /// [`Config::validate`]'s problems, not yet located.
    #[error("invalid configuration:\n{}", list(.0))]
    Invalid(Vec<Problem>),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The validated configuration plus what it points at.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub key: PrivateKey,
    /// `command_public_key` first, then `command_public_keys`.
    pub command_key: CommandKeys,
    /// `allowed_roots`, canonicalised.
    pub roots: Vec<PathBuf>,
    /// The `[[watch]]` entries, checked.
    pub watches: Vec<Watch>,
    /// The static MQTT password ([`MqttConfig::static_password`]); `None` = derived from
    /// the device key at each connect.
    pub mqtt_password: Option<Secret>,
}

/// Reads the file (when given; it must exist) and the environment, without validating.
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    Ok(Layers::load(file, ENV_PREFIX)?.extract()?)
}

/// Loads and validates; every problem is reported at once, with where it was set.
pub fn load_and_validate(file: Option<&Path>) -> Result<Loaded, ConfigError> {
    let layers = Layers::load(file, ENV_PREFIX)?;
    match layers.extract::<Config>()?.validate() {
        Err(ConfigError::Invalid(problems)) => Err(layers.locate(problems).into()),
        other => other,
    }
}

impl Config {
    /// Checks every field; returns the key material and canonical roots when all is well.
    pub fn validate(self) -> Result<Loaded, ConfigError> {
        let mut problems = Vec::new();
        let mut bad =
            |field: &'static str, message: String| problems.push(Problem::new(field, message));

        if !topics::valid_device_id(&self.device_id) {
            bad(
                "device_id",
                format!(
                    "{:?} is not a valid device id (1-64 of A-Z a-z 0-9 . _ -, not starting with a dot)",
                    self.device_id
                ),
            );
        }
        let key = match std::fs::read_to_string(&self.key_file) {
            Ok(text) => match sign::decode_private(&text) {
                Ok(k) => Some(k),
                Err(e) => {
                    bad(
                        "key_file",
                        format!(
                            "{}: {e} (make one with `uplink-agent keygen --out FILE`)",
                            self.key_file.display()
                        ),
                    );
                    None
                }
            },
            Err(e) => {
                bad(
                    "key_file",
                    format!(
                        "cannot read {}: {e} (make one with `uplink-agent keygen --out FILE`)",
                        self.key_file.display()
                    ),
                );
                None
            }
        };
        let command_key = match sign::decode_public(&self.command_public_key) {
            Ok(k) => Some(k),
            Err(e) => {
                bad(
                    "command_public_key",
                    format!("{e} (use the API's GET /v1/command-key public_key)"),
                );
                None
            }
        };
        let mut more_keys = Vec::new();
        for (i, text) in self.command_public_keys.iter().enumerate() {
            match sign::decode_public(text) {
                Ok(k) => more_keys.push(k),
                Err(e) => bad("command_public_keys", format!("entry {}: {e}", i + 1)),
            }
        }
        let command_key =
            command_key.map(|first| CommandKeys::new(std::iter::once(first).chain(more_keys)));
        if self.state_dir.as_os_str().is_empty() {
            bad("state_dir", "must not be empty".into());
        } else if self.state_dir.exists() && !self.state_dir.is_dir() {
            bad(
                "state_dir",
                format!("{} exists and is not a directory", self.state_dir.display()),
            );
        }
        let mut roots = Vec::new();
        if self.allowed_roots.is_empty() {
            bad("allowed_roots", "list at least one directory".into());
        }
        for root in &self.allowed_roots {
            if !root.is_absolute() {
                bad(
                    "allowed_roots",
                    format!("{} is not an absolute path", root.display()),
                );
                continue;
            }
            match root.canonicalize() {
                Ok(c) if c.is_dir() => roots.push(c),
                Ok(_) => bad(
                    "allowed_roots",
                    format!("{} is not a directory", root.display()),
                ),
                Err(e) => bad("allowed_roots", format!("{}: {e}", root.display())),
            }
        }
        if !(1..=64).contains(&self.concurrency) {
            bad(
                "concurrency",
                format!("{} is outside 1..=64", self.concurrency),
            );
        }
        if let Some(n) = self.per_job_concurrency {
            if !(1..=64).contains(&n) {
                bad("per_job_concurrency", format!("{n} is outside 1..=64"));
            }
        }
        if let Err(e) = uplink_protocol::flow::check_bandwidth(self.max_upload_bytes_per_sec) {
            bad("max_upload_bytes_per_sec", e);
        }
        if let Err(e) = uplink_protocol::flow::parse_windows(&self.upload_windows) {
            bad("upload_windows", e);
        }
        if !(5..=5120).contains(&self.part_size_mib) {
            bad(
                "part_size_mib",
                format!(
                    "{} is outside 5..=5120 (S3 part limits)",
                    self.part_size_mib
                ),
            );
        }
        if !(1..=3600).contains(&self.request_timeout_secs) {
            bad(
                "request_timeout_secs",
                format!("{} is outside 1..=3600", self.request_timeout_secs),
            );
        }
        if self.mqtt.host.trim().is_empty() {
            bad("mqtt.host", "must not be empty".into());
        }
        if let Some(url) = &self.api_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bad(
                    "api_url",
                    format!("{url:?} is not an http:// or https:// URL"),
                );
            }
        }
        if self.mqtt.port == 0 {
            bad("mqtt.port", "must not be 0".into());
        }
        if self.mqtt.username.as_deref().is_some_and(str::is_empty) {
            bad(
                "mqtt.username",
                "must not be empty (leave it unset for the device id)".into(),
            );
        }
        for (field, message) in crate::tls::validate(&self) {
            bad(field, message);
        }
        let (watches, watch_problems) = watch::validate(&self.watch, &roots);
        for message in watch_problems {
            bad("watch", message);
        }
        let mqtt_password = match self.mqtt.static_password() {
            Ok(p) => p,
            Err(problem) => {
                problems.push(problem);
                None
            }
        };

        match (key, command_key, problems.is_empty()) {
            (Some(key), Some(command_key), true) => Ok(Loaded {
                config: self,
                key,
                command_key,
                roots,
                watches,
                mqtt_password,
            }),
            _ => Err(ConfigError::Invalid(problems)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(dir: &Path) -> Config {
        let key = sign::generate();
        let key_file = dir.join("device.key");
        std::fs::write(&key_file, sign::encode_private(&key)).unwrap();
        let root = dir.join("data");
        std::fs::create_dir_all(&root).unwrap();
        Config {
            device_id: "robot-17".into(),
            key_file,
            command_public_key: sign::encode_public(&sign::generate().verifying_key()),
            command_public_keys: Vec::new(),
            state_dir: dir.join("state"),
            allowed_roots: vec![root],
            concurrency: 4,
            part_size_mib: 8,
            hash_first_max_mib: 64,
            request_timeout_secs: 10,
            max_upload_bytes_per_sec: 0,
            per_job_concurrency: None,
            upload_windows: vec![],
            metrics_listen: None,
            api_url: None,
            https_ca_file: None,
            mqtt: MqttConfig::default(),
            watch: vec![],
        }
    }

    fn fields(err: ConfigError) -> Vec<String> {
        match err {
            ConfigError::Invalid(p) => p.into_iter().map(|p| p.field).collect(),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn valid_config_passes() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = valid(dir.path()).validate().unwrap();
        assert_eq!(loaded.roots.len(), 1);
    }

    #[test]
    fn each_bad_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let base = valid(dir.path());
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    device_id: "a/b".into(),
                    ..base.clone()
                },
                "device_id",
            ),
            (
                Config {
                    key_file: dir.path().join("missing.key"),
                    ..base.clone()
                },
                "key_file",
            ),
            (
                Config {
                    command_public_key: "nope".into(),
                    ..base.clone()
                },
                "command_public_key",
            ),
            (
                Config {
                    allowed_roots: vec!["relative/dir".into()],
                    ..base.clone()
                },
                "allowed_roots",
            ),
            (
                Config {
                    allowed_roots: vec![dir.path().join("nope")],
                    ..base.clone()
                },
                "allowed_roots",
            ),
            (
                Config {
                    allowed_roots: vec![],
                    ..base.clone()
                },
                "allowed_roots",
            ),
            (
                Config {
                    concurrency: 0,
                    ..base.clone()
                },
                "concurrency",
            ),
            (
                Config {
                    concurrency: 65,
                    ..base.clone()
                },
                "concurrency",
            ),
            (
                Config {
                    per_job_concurrency: Some(0),
                    ..base.clone()
                },
                "per_job_concurrency",
            ),
            (
                Config {
                    max_upload_bytes_per_sec: 100,
                    ..base.clone()
                },
                "max_upload_bytes_per_sec",
            ),
            (
                Config {
                    upload_windows: vec!["22:00-06:00".into(), "6pm-8pm".into()],
                    ..base.clone()
                },
                "upload_windows",
            ),
            (
                Config {
                    part_size_mib: 1,
                    ..base.clone()
                },
                "part_size_mib",
            ),
            (
                Config {
                    request_timeout_secs: 0,
                    ..base.clone()
                },
                "request_timeout_secs",
            ),
        ];
        for (cfg, field) in cases {
            assert_eq!(fields(cfg.validate().unwrap_err()), vec![field]);
        }
    }

    #[test]
    fn mqtt_password_comes_from_the_file_or_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let base = valid(dir.path());
        assert_eq!(base.clone().validate().unwrap().mqtt_password, None);

        let file = dir.path().join("mqtt.password");
        for text in ["s3cret-pw\n", "s3cret-pw\r\n", "s3cret-pw"] {
            std::fs::write(&file, text).unwrap();
            let cfg = Config {
                mqtt: MqttConfig {
                    password_file: Some(file.clone()),
                    ..MqttConfig::default()
                },
                ..base.clone()
            };
            let loaded = cfg.validate().unwrap();
            assert_eq!(
                loaded.mqtt_password,
                Some(Secret::new("s3cret-pw")),
                "{text:?}"
            );
        }
        let cfg = Config {
            mqtt: MqttConfig {
                password: Some(Secret::new("inline")),
                ..MqttConfig::default()
            },
            ..base
        };
        assert_eq!(
            cfg.validate().unwrap().mqtt_password,
            Some(Secret::new("inline"))
        );
    }

    #[test]
    fn bad_mqtt_credentials_are_named_without_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let base = valid(dir.path());
        let file = dir.path().join("mqtt.password");
        let with = |mqtt: MqttConfig| Config {
            mqtt,
            ..base.clone()
        };
        let problems = |cfg: Config| match cfg.validate().unwrap_err() {
            ConfigError::Invalid(p) => p,
            other => panic!("unexpected {other}"),
        };

        std::fs::write(&file, "hunter2\n").unwrap();
        let both = problems(with(MqttConfig {
            password: Some(Secret::new("hunter2")),
            password_file: Some(file.clone()),
            ..MqttConfig::default()
        }));
        assert_eq!(both.len(), 1);
        assert_eq!(both[0].field, "mqtt.password_file");
        assert!(both[0].message.contains("not both"), "{}", both[0]);

        for (text, why) in [
            ("", "is empty"),
            ("\n", "is empty"),
            ("hunter2\nhunter3\n", "one line"),
        ] {
            std::fs::write(&file, text).unwrap();
            let p = problems(with(MqttConfig {
                password_file: Some(file.clone()),
                ..MqttConfig::default()
            }));
            assert_eq!(p.len(), 1, "{text:?}");
            assert_eq!(p[0].field, "mqtt.password_file");
            assert!(p[0].message.contains(why), "{text:?}: {}", p[0]);
            assert!(!p[0].message.contains("hunter"), "{}", p[0]);
        }

        let missing = problems(with(MqttConfig {
            password_file: Some(dir.path().join("nope")),
            ..MqttConfig::default()
        }));
        assert_eq!(missing[0].field, "mqtt.password_file");
        assert!(missing[0].message.contains("cannot read"), "{}", missing[0]);

        let empty = problems(with(MqttConfig {
            password: Some(Secret::new("")),
            ..MqttConfig::default()
        }));
        assert_eq!(empty[0].field, "mqtt.password");

        let no_user = problems(with(MqttConfig {
            username: Some(String::new()),
            ..MqttConfig::default()
        }));
        assert_eq!(no_user[0].field, "mqtt.username");
    }

    #[test]
    fn bad_key_file_contents() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = valid(dir.path());
        std::fs::write(&cfg.key_file, "not a key").unwrap();
        assert_eq!(fields(cfg.validate().unwrap_err()), vec!["key_file"]);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API
    fn loads_toml_with_defaults_and_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            r#"
device_id = "robot-17"
key_file = "/k"
command_public_key = "x"
state_dir = "/s"
allowed_roots = ["/data"]
[mqtt]
host = "broker"
password = "pw"
"#,
        )
        .unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("UPLINK_AGENT_CONCURRENCY", "9");
            jail.set_env("UPLINK_AGENT_MQTT__PORT", "1999");
            let cfg = load(Some(&file)).unwrap();
            assert_eq!(cfg.concurrency, 9);
            assert_eq!(cfg.part_size_mib, 8);
            assert_eq!(cfg.request_timeout_secs, 10);
            assert_eq!(cfg.mqtt.host, "broker");
            assert_eq!(cfg.mqtt.port, 1999);
            assert_eq!(cfg.mqtt.password, Some(Secret::new("pw")));
            assert_eq!(format!("{:?}", cfg.mqtt.password), "Some([redacted])");
            Ok(())
        });
        let missing = load(Some(&dir.path().join("nope.toml"))).unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("nope.toml: cannot read the file"),
            "{missing}"
        );
    }
}
