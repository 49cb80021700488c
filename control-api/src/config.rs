//! Configuration: a TOML file with `UPLINK_API_…` environment overrides (`__` nests, e.g.
//! `UPLINK_API_S3__BUCKET`). Secrets are wrapped in [`Secret`] so they never print. Every
//! problem is reported with where it was set (`api.toml:7:1: s3.endpoint: …`, or the
//! environment variable); see [`uplink_service::config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use uplink_protocol::ops::PartChecksum;
use uplink_service::config::{Layers, Problem, Report};

pub use uplink_service::config::Secret;

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "UPLINK_API_";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serve HTTPS on `listen` with this certificate chain and key (PEM), read again when
    /// they change; plain HTTP without them.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    pub database_url: Secret,
    #[serde(default = "default_db_pool")]
    pub database_max_connections: u32,
    /// Bearer token of the operator API.
    pub operator_token: Secret,
    /// Bearer token of the bridge API.
    pub bridge_token: Secret,
    /// Devices get static Mosquitto passwords derived with this secret (at least 16
    /// characters), for the bridge's dynamic-security sync ([`crate::mqtt_login`]).
    #[serde(default)]
    pub mqtt_password_secret: Option<Secret>,
    /// File holding the base64 Ed25519 seed that signs commands.
    pub command_key_file: PathBuf,
    /// The next command key (base64 Ed25519 seed), announced at `GET /v1/command-key` as
    /// `next_public_key` so agents can pin it before it signs (docs/security.md, "Rotating
    /// the command key"). Never used to sign.
    #[serde(default)]
    pub command_next_key_file: Option<PathBuf>,
    /// Device requests signed further than this from now are refused.
    #[serde(default = "default_replay_window")]
    pub replay_window_secs: u64,
    /// How long a device may take to receive a command before it expires.
    #[serde(default = "default_command_ttl")]
    pub command_ttl_secs: u64,
    /// An unacknowledged command is re-published after this long.
    #[serde(default = "default_command_resend")]
    pub command_resend_secs: u64,
    /// An accepted command without a final ack is re-published after this long (until it
    /// expires), so that its device answers with its latest ack: a lost final ack is
    /// repaired.
    #[serde(default = "default_command_recheck")]
    pub command_recheck_secs: u64,
    /// A bridge that claimed a command has this long to publish it before another bridge
    /// may claim it.
    #[serde(default = "default_command_lease")]
    pub command_lease_secs: u64,
    pub s3: S3Config,
    #[serde(default)]
    pub cleanup: CleanupConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default)]
    pub validation: ValidationConfig,
}

/// The outbox: webhooks and `GET /v1/events`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// A webhook POST that has not answered in this long fails (and is retried).
    pub webhook_timeout_secs: u64,
    /// The longest wait between retries of a failing webhook (they double from 1 s).
    pub webhook_max_backoff_secs: u64,
    /// The longest a `GET /v1/events` long-poll is held, whatever `wait` asks (0-60).
    pub long_poll_max_secs: u64,
    /// Let webhooks reach loopback, private, link-local and other addresses that are not
    /// public. Off by default: whoever may create a webhook could otherwise make the API
    /// POST into its own network.
    pub webhook_allow_private: bool,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            webhook_timeout_secs: 10,
            webhook_max_backoff_secs: 300,
            long_poll_max_secs: 60,
            webhook_allow_private: false,
        }
    }
}

/// The validation worker: checks completed objects of datasets that have a validator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// How often the worker looks for pending objects when nothing wakes it (a completion on
    /// this instance wakes it at once; objects completed through another instance, and
    /// retries, wait for this); 0 disables the worker on this instance.
    pub interval_secs: u64,
    /// Objects validated at once on this instance.
    pub concurrency: u32,
    /// A claim on an object lasts this long and is renewed while the object is read; an
    /// object whose worker died is taken again once its claim runs out.
    pub lease_secs: u64,
    /// After a read error (storage unreachable) the object is tried again after this long,
    /// doubling with each failed attempt up to `retry_max_secs`.
    pub retry_initial_secs: u64,
    pub retry_max_secs: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            interval_secs: 10,
            concurrency: 2,
            lease_secs: 60,
            retry_initial_secs: 10,
            retry_max_secs: 600,
        }
    }
}

/// The cleanup worker: expires idle sessions and aborts orphan multipart uploads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CleanupConfig {
    /// How often the worker runs; 0 disables it.
    pub interval_secs: u64,
    /// A non-terminal session untouched this long expires and its upload is aborted.
    pub session_idle_secs: u64,
    /// A multipart upload under `s3.key_prefix` in `s3.bucket` (whoever started it) that no
    /// live session knows is aborted once older than this (storage's `Initiated` time).
    pub orphan_grace_secs: u64,
    /// Stored answers to device requests are kept this long.
    pub request_retention_secs: u64,
}

impl Default for CleanupConfig {
    fn default() -> Self {
        CleanupConfig {
            interval_secs: 60,
            session_idle_secs: 24 * 3600,
            orphan_grace_secs: 3600,
            request_retention_secs: 7 * 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint the API calls (create, list, complete, abort, head).
    pub endpoint: String,
    /// Endpoint written into presigned URLs for devices; defaults to `endpoint`.
    #[serde(default)]
    pub public_endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    /// Prefix of every object key this deployment writes (e.g. `site-a/`); the orphan sweep
    /// aborts any old multipart upload under it in `bucket` that no live session knows.
    #[serde(default)]
    pub key_prefix: String,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    #[serde(default = "default_true")]
    pub force_path_style: bool,
    /// Lifetime of presigned part URLs.
    #[serde(default = "default_presign_ttl")]
    pub presign_ttl_secs: u64,
    /// The part digest signed into part URLs for devices that can send it: `sha256`
    /// (`x-amz-checksum-sha256`; AWS S3, MinIO, SeaweedFS, Garage check it) or `md5`
    /// (`Content-MD5`, for storage that ignores the SHA-256 header). Devices that ask for
    /// nothing get `md5`.
    #[serde(default = "default_part_checksum")]
    pub part_checksum: PartChecksum,
}

fn default_part_checksum() -> PartChecksum {
    PartChecksum::Sha256
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_db_pool() -> u32 {
    16
}
fn default_replay_window() -> u64 {
    300
}
fn default_command_ttl() -> u64 {
    24 * 3600
}
fn default_command_resend() -> u64 {
    30
}
fn default_command_recheck() -> u64 {
    300
}
fn default_command_lease() -> u64 {
    10
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_true() -> bool {
    true
}
fn default_presign_ttl() -> u64 {
    900
}

impl Config {
    /// The storage policy under every project's: the configured bucket and presign lifetime.
    pub fn default_policy(&self) -> crate::domain::policy::StoragePolicy {
        crate::domain::policy::StoragePolicy {
            bucket: Some(self.s3.bucket.clone()),
            presign_ttl_secs: Some(self.s3.presign_ttl_secs),
            ..Default::default()
        }
    }

    /// Loads `path` (if given) and the environment, then validates; the error lists every
    /// problem found.
    pub fn load(path: Option<&Path>) -> Result<Config, Report> {
        let layers = Layers::load(path, ENV_PREFIX)?;
        let config: Config = layers.extract()?;
        config
            .validate()
            .map_err(|problems| layers.locate(problems))?;
        Ok(config)
    }

    /// Checks values that parse but cannot work; every problem, each naming its field.
    /// The HTTPS files, when the API serves HTTPS.
    pub fn tls_files(&self) -> Option<uplink_service::tls::ServerFiles> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(uplink_service::tls::ServerFiles {
                cert_file: cert.clone(),
                key_file: key.clone(),
                client_ca_file: None,
            }),
            _ => None,
        }
    }

    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                if let Err(e) = uplink_service::tls::server_config(cert, key, None) {
                    problems.push(Problem::new("tls_cert_file", e.to_string()));
                }
            }
            _ => problems.push(Problem::new(
                "tls_cert_file",
                "set tls_cert_file and tls_key_file together",
            )),
        }
        let mut invalid = |field: &str, reason: &str| problems.push(Problem::new(field, reason));
        if !self.database_url.expose().starts_with("postgres") {
            invalid("database_url", "must be a postgres:// or postgresql:// URL");
        }
        if self.operator_token.expose().len() < 16 {
            invalid("operator_token", "must be at least 16 characters");
        }
        if self
            .mqtt_password_secret
            .as_ref()
            .is_some_and(|s| s.expose().len() < 16)
        {
            invalid("mqtt_password_secret", "must be at least 16 characters");
        }
        if self.bridge_token.expose().len() < 16 {
            invalid("bridge_token", "must be at least 16 characters");
        } else if self.operator_token == self.bridge_token {
            invalid("bridge_token", "must differ from operator_token");
        }
        for (field, url) in [
            ("s3.endpoint", Some(&self.s3.endpoint)),
            ("s3.public_endpoint", self.s3.public_endpoint.as_ref()),
        ] {
            if let Some(url) = url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    invalid(field, "must be an http:// or https:// URL");
                }
            }
        }
        if self.s3.bucket.is_empty() {
            invalid("s3.bucket", "must not be empty");
        }
        if !(1..=7 * 24 * 3600).contains(&self.s3.presign_ttl_secs) {
            invalid(
                "s3.presign_ttl_secs",
                "must be between 1 and 604800 (7 days, the SigV4 limit)",
            );
        }
        if self.s3.key_prefix.starts_with('/') || self.s3.key_prefix.contains("..") {
            invalid(
                "s3.key_prefix",
                "must be relative and must not contain '..'",
            );
        }
        if !(1..=60).contains(&self.events.webhook_timeout_secs) {
            invalid("events.webhook_timeout_secs", "must be between 1 and 60");
        }
        if self.events.long_poll_max_secs > 60 {
            invalid("events.long_poll_max_secs", "must be at most 60");
        }
        if !(1..=86400).contains(&self.events.webhook_max_backoff_secs) {
            invalid(
                "events.webhook_max_backoff_secs",
                "must be between 1 and 86400 (a day)",
            );
        }
        let v = &self.validation;
        if !(1..=64).contains(&v.concurrency) {
            invalid("validation.concurrency", "must be between 1 and 64");
        }
        if v.lease_secs < 3 {
            invalid("validation.lease_secs", "must be at least 3");
        }
        if v.retry_initial_secs == 0 {
            invalid("validation.retry_initial_secs", "must be positive");
        }
        if v.retry_max_secs < v.retry_initial_secs {
            invalid(
                "validation.retry_max_secs",
                "must be at least validation.retry_initial_secs",
            );
        }
        if !(1..=600).contains(&self.command_lease_secs) {
            invalid("command_lease_secs", "must be between 1 and 600");
        }
        if self.replay_window_secs == 0 {
            invalid("replay_window_secs", "must be positive");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    pub fn public_endpoint(&self) -> &str {
        self.s3
            .public_endpoint
            .as_deref()
            .unwrap_or(&self.s3.endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
database_url = "postgres://u@127.0.0.1/db"
operator_token = "operator-token-0123456789"
bridge_token = "bridge-token-0123456789"
command_key_file = "command.key"
[s3]
endpoint = "http://127.0.0.1:8333"
bucket = "uplink"
access_key_id = "k"
secret_access_key = "s"
"#;

    fn parse(text: &str) -> Result<Config, Report> {
        let layers = Layers::from_toml(Path::new("api.toml"), text)?;
        let c: Config = layers.extract()?;
        c.validate().map_err(|p| layers.locate(p))?;
        Ok(c)
    }

    #[test]
    fn defaults_and_redaction() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.s3.presign_ttl_secs, 900);
        assert_eq!(c.public_endpoint(), "http://127.0.0.1:8333");
        let printed = format!("{c:?}");
        assert!(!printed.contains("operator-token-0123456789"), "{printed}");
        assert!(!printed.contains("secret_access_key: \"s\""));
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/api.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let c = parse(&text).unwrap();
        assert_eq!(c.cleanup.interval_secs, 60);
        assert_eq!(c.validation.lease_secs, 60);
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let bad = GOOD.replace("http://127.0.0.1:8333", "127.0.0.1:8333");
        assert_eq!(
            parse(&bad).unwrap_err().to_string(),
            "invalid configuration:\n\
             api.toml:7:1: s3.endpoint: must be an http:// or https:// URL"
        );
        let bad = GOOD
            .replace("bridge-token-0123456789", "short")
            .replace("\"uplink\"", "\"\"");
        assert_eq!(
            parse(&bad).unwrap_err().to_string(),
            "invalid configuration:\n\
             api.toml:4:1: bridge_token: must be at least 16 characters\n\
             api.toml:8:1: s3.bucket: must not be empty"
        );
        let bad = format!("{GOOD}\nunknown_field = 1");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(
            err.contains("api.toml:12:1: s3.unknown_field: unknown field"),
            "{err}"
        );
        let bad = GOOD.replace("bucket = \"uplink\"\n", "");
        assert_eq!(
            parse(&bad).unwrap_err().to_string(),
            "invalid configuration:\napi.toml:6:1: s3.bucket: missing (it has no default)"
        );
    }
}
