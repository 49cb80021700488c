//! Configuration: a TOML file plus `UPLINK_BRIDGE_*` environment overrides (`__` nests,
//! e.g. `UPLINK_BRIDGE_BROKER__MODE=external`). Unknown field names are errors, so a typo
//! is reported by `uplink-bridge check-config` instead of being silently ignored. Every
//! problem is reported with where it was set (`bridge.toml:4:1: broker.port: …`, or the
//! environment variable); see [`uplink_service::config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use uplink_service::config::{lenient_opt_string, lenient_string, Layers, Problem, Report};
use uplink_service::tls::ClientFiles;

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "UPLINK_BRIDGE_";

pub use uplink_service::config::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Base URL of the control API, e.g. `http://127.0.0.1:8080`.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// Bearer token for the control API's bridge endpoints.
    pub api_token: Secret,
    /// An `https://` `api_url` behind a private CA: trust these CA certificates (PEM)
    /// besides the built-in roots.
    #[serde(default)]
    pub api_ca_file: Option<PathBuf>,
    /// The longest one claim of due commands waits (at most 30 s are used): new commands
    /// come at once, re-sends and a dead bridge's claims within this.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` over HTTP; off when unset.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    #[serde(default)]
    pub broker: BrokerConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerMode {
    /// rumqttd runs inside the bridge, on `listen`.
    Embedded,
    /// The bridge connects to a broker at `host:port`.
    External,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub mode: BrokerMode,
    /// Embedded: where rumqttd listens.
    pub listen: SocketAddr,
    /// External: the broker the bridge connects to.
    pub host: String,
    pub port: u16,
    /// External: the bridge's own credentials (embedded: generated at start).
    #[serde(deserialize_with = "lenient_opt_string")]
    pub username: Option<String>,
    pub password: Option<Secret>,
    #[serde(deserialize_with = "lenient_string")]
    pub client_id: String,
    /// External: subscribe with `$share/uplink-bridge/...` so instances split the load.
    pub shared_subscriptions: bool,
    /// External, Mosquitto: keep its dynamic-security plugin in step with the registry
    /// ([`crate::dynsec`]); the bridge's `username` must be the plugin's admin.
    pub dynamic_security: bool,
    /// External: connect over TLS (system roots, or `ca_file`).
    pub tls: bool,
    /// External, TLS: trust only these CA certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// External, TLS: client certificate and key (PEM) for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// External, TLS: check the broker's certificate against this name instead of `host`.
    pub server_name: Option<String>,
    /// Embedded: also listen for MQTT over TLS here (see [`crate::tls_listener`]).
    pub tls_listen: Option<SocketAddr>,
    /// Embedded, `tls_listen`: the server certificate chain and its key (PEM), reloaded
    /// when they change.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Embedded, `tls_listen`: mutual TLS. Every client there must present a certificate
    /// chained to one of these CA certificates (PEM), whose common name is the device id
    /// it connects as; it needs no password. Reloaded with the server certificate.
    pub tls_client_ca_file: Option<PathBuf>,
}

impl BrokerConfig {
    /// The external connection's TLS files, or `None` for plain TCP.
    pub fn client_tls(&self) -> Option<ClientFiles> {
        self.tls.then(|| ClientFiles {
            ca_file: self.ca_file.clone(),
            cert_file: self.client_cert_file.clone(),
            key_file: self.client_key_file.clone(),
            server_name: self.server_name.clone(),
        })
    }

    fn validate_tls(&self, problems: &mut Vec<Problem>) {
        let embedded = self.mode == BrokerMode::Embedded;
        let client_fields = [
            ("broker.tls", self.tls),
            ("broker.ca_file", self.ca_file.is_some()),
            ("broker.client_cert_file", self.client_cert_file.is_some()),
            ("broker.client_key_file", self.client_key_file.is_some()),
            ("broker.server_name", self.server_name.is_some()),
        ];
        let listener_fields = [
            ("broker.tls_listen", self.tls_listen.is_some()),
            ("broker.tls_cert_file", self.tls_cert_file.is_some()),
            ("broker.tls_key_file", self.tls_key_file.is_some()),
            (
                "broker.tls_client_ca_file",
                self.tls_client_ca_file.is_some(),
            ),
        ];
        if self.dynamic_security {
            if embedded {
                problems.push(Problem::new(
                    "broker.dynamic_security",
                    "is for mode = \"external\" (Mosquitto with its dynamic-security plugin)",
                ));
            } else if self.username.is_none() {
                problems.push(Problem::new(
                    "broker.dynamic_security",
                    "needs broker.username (the plugin's admin account)",
                ));
            }
        }
        let (wrong, why) = if embedded {
            (
                &client_fields[..],
                "is for mode = \"external\" (the embedded broker's TLS is tls_listen)",
            )
        } else {
            (&listener_fields[..], "is for mode = \"embedded\"")
        };
        for (field, _) in wrong.iter().filter(|(_, set)| *set) {
            problems.push(Problem::new(*field, why));
        }
        if embedded {
            match (&self.tls_listen, &self.tls_cert_file, &self.tls_key_file) {
                (None, None, None) if self.tls_client_ca_file.is_some() => problems.push(
                    Problem::new("broker.tls_client_ca_file", "needs broker.tls_listen"),
                ),
                (None, None, None) => {}
                (Some(_), Some(cert), Some(key)) => {
                    let clients = self.tls_client_ca_file.as_deref();
                    if let Err(e) = uplink_service::tls::server_config(cert, key, clients) {
                        problems.push(Problem::new("broker.tls_cert_file", e.to_string()));
                    }
                }
                _ => problems.push(Problem::new(
                    "broker.tls_listen",
                    "set tls_listen, tls_cert_file and tls_key_file together",
                )),
            }
            if self.tls_listen.is_some_and(|a| a.port() == 0) {
                problems.push(Problem::new(
                    "broker.tls_listen",
                    "needs a fixed port, not 0",
                ));
            }
        } else if !self.tls {
            for (field, _) in client_fields[1..].iter().filter(|(_, set)| *set) {
                problems.push(Problem::new(*field, "needs broker.tls = true"));
            }
        } else if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            problems.push(Problem::new(
                "broker.client_key_file",
                "set both client_cert_file and client_key_file, or neither",
            ));
        } else if let Some(files) = self.client_tls() {
            if let Err(e) = uplink_service::tls::client_config(&files) {
                problems.push(Problem::new("broker.tls", e.to_string()));
            }
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            mode: BrokerMode::Embedded,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            host: "127.0.0.1".into(),
            port: 1883,
            username: None,
            password: None,
            client_id: "uplink-bridge-1".into(),
            shared_subscriptions: false,
            dynamic_security: false,
            tls: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            server_name: None,
            tls_listen: None,
            tls_client_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

fn default_api_url() -> String {
    "http://127.0.0.1:8080".into()
}

fn default_poll_interval_ms() -> u64 {
    5000
}

impl Config {
    /// Loads `file` (when given; it must exist) and the environment, then validates; the
    /// error lists every problem found.
    pub fn load(file: Option<&Path>) -> Result<Config, Report> {
        Self::from_layers(&Layers::load(file, ENV_PREFIX)?)
    }

    pub fn from_layers(layers: &Layers) -> Result<Config, Report> {
        let config: Config = layers.extract()?;
        config
            .validate()
            .map_err(|problems| layers.locate(problems))?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        match reqwest::Url::parse(&self.api_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            Ok(_) => problems.push(Problem::new(
                "api_url",
                format!("`{}` must be an http:// or https:// URL", self.api_url),
            )),
            Err(e) => problems.push(Problem::new(
                "api_url",
                format!("`{}` is not a URL: {e}", self.api_url),
            )),
        }
        if let Some(file) = &self.api_ca_file {
            if let Err(e) = uplink_service::tls::https_roots(file) {
                problems.push(Problem::new("api_ca_file", e));
            }
        }
        if self.api_token.expose().trim().is_empty() {
            problems.push(Problem::new("api_token", "must not be empty"));
        }
        if self.poll_interval_ms == 0 {
            problems.push(Problem::new("poll_interval_ms", "must be at least 1"));
        }
        let b = &self.broker;
        if b.client_id.is_empty() {
            problems.push(Problem::new("broker.client_id", "must not be empty"));
        }
        match b.mode {
            BrokerMode::Embedded => {
                if b.listen.port() == 0 {
                    problems.push(Problem::new("broker.listen", "needs a fixed port, not 0"));
                }
            }
            BrokerMode::External => {
                if b.host.trim().is_empty() {
                    problems.push(Problem::new(
                        "broker.host",
                        "must not be empty in external mode",
                    ));
                }
                if b.port == 0 {
                    problems.push(Problem::new("broker.port", "must not be 0"));
                }
                if b.password.is_some() && b.username.is_none() {
                    problems.push(Problem::new(
                        "broker.username",
                        "required when broker.password is set",
                    ));
                }
            }
        }
        b.validate_tls(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// `api_url` without a trailing slash, ready for `format!("{base}{path}")`.
    pub fn api_base(&self) -> String {
        self.api_url.trim_end_matches('/').to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn from_toml(text: &str) -> Result<Config, Report> {
        Config::from_layers(&Layers::from_toml(Path::new("bridge.toml"), text)?)
    }

    #[test]
    fn contract_example_parses() {
        let c = from_toml(
            r#"
            api_url = "http://127.0.0.1:8080/"
            api_token = "dev-bridge-token"
            poll_interval_ms = 1000
            [broker]
            mode = "embedded"
            listen = "127.0.0.1:1883"
            host = "127.0.0.1"
            port = 1883
            username = "uplink-bridge"
            password = "..."
            client_id = "uplink-bridge-1"
            shared_subscriptions = false
            "#,
        )
        .unwrap();
        assert_eq!(c.http_listen, None);
        assert_eq!(c.broker.mode, BrokerMode::Embedded);
        assert_eq!(c.api_base(), "http://127.0.0.1:8080");
        assert_eq!(format!("{:?}", c.api_token), "[redacted]");
        assert!(!format!("{c:?}").contains("dev-bridge-token"));
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = from_toml("api_token = \"t\"\napi_tokn = \"x\"").unwrap_err();
        assert!(err.to_string().contains("api_tokn"), "{err}");
        let err = from_toml("api_token = \"t\"\n[broker]\nmod = \"external\"").unwrap_err();
        assert!(err.to_string().contains("mod"), "{err}");
        let err = from_toml("api_token = \"t\"\n[broker]\nmode = \"sideways\"").unwrap_err();
        assert!(err.to_string().contains("mode"), "{err}");
        let err = from_toml("api_token = \"t\"\nhttp_listen = \"nowhere\"").unwrap_err();
        assert!(err.to_string().contains("http_listen"), "{err}");
        assert_eq!(
            from_toml("api_token = \"t\"\n\n[broker]\nmod = \"external\"")
                .unwrap_err()
                .to_string(),
            "invalid configuration:\nbridge.toml:4:1: broker.mod: unknown field (expected \
             one of: mode, listen, host, port, username, password, client_id, \
             shared_subscriptions, dynamic_security, tls, ca_file, client_cert_file, client_key_file, \
             server_name, tls_listen, tls_cert_file, tls_key_file, tls_client_ca_file)"
        );
    }

    #[test]
    fn invalid_values_are_named() {
        let err = from_toml("api_url = \"ftp://x\"\napi_token = \"\"\npoll_interval_ms = 0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("api_url"), "{err}");
        assert!(err.contains("api_token"), "{err}");
        assert!(err.contains("poll_interval_ms"), "{err}");
        assert_eq!(
            err,
            "invalid configuration:\n\
             bridge.toml:1:1: api_url: `ftp://x` must be an http:// or https:// URL\n\
             bridge.toml:2:1: api_token: must not be empty\n\
             bridge.toml:3:1: poll_interval_ms: must be at least 1"
        );
        assert!(from_toml("poll_interval_ms = 5")
            .unwrap_err()
            .to_string()
            .contains("api_token"));
    }

    #[test]
    fn environment_overrides_the_file() {
        Jail::expect_with(|jail| {
            jail.create_file("bridge.toml", "api_token = \"from-file\"\n")?;
            jail.set_env("UPLINK_BRIDGE_API_TOKEN", "1234");
            jail.set_env("UPLINK_BRIDGE_BROKER__MODE", "external");
            jail.set_env("UPLINK_BRIDGE_BROKER__PORT", "1884");
            jail.set_env("UPLINK_BRIDGE_BROKER__SHARED_SUBSCRIPTIONS", "true");
            jail.set_env("UPLINK_BRIDGE_HTTP_LISTEN", "127.0.0.1:9465");
            let c = Config::load(Some(Path::new("bridge.toml"))).unwrap();
            assert_eq!(
                c.http_listen,
                Some(SocketAddr::from(([127, 0, 0, 1], 9465)))
            );
            assert_eq!(c.api_token.expose(), "1234");
            assert_eq!(c.broker.mode, BrokerMode::External);
            assert_eq!(c.broker.port, 1884);
            assert!(c.broker.shared_subscriptions);
            assert!(Config::load(Some(Path::new("missing.toml"))).is_err());
            Ok(())
        });
    }
}
