//! TLS of the agent's links: MQTT (`[mqtt] tls = true`: system roots or `ca_file`, optional
//! client certificate for mutual TLS, `server_name` override; see
//! [`uplink_service::tls`]) and HTTPS (`https_ca_file`: extra CAs for storage PUTs and
//! `api_url`). The files are read at start (`check-config` and `doctor` check them) and
//! again before each MQTT reconnect, so renewed certificates are picked up without a
//! restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{TlsConfiguration, Transport};
use uplink_service::tls::{self, ClientFiles, TlsError};

use crate::config::{Config, MqttConfig};

/// The MQTT TLS files, or `None` for plain TCP.
pub fn mqtt_files(mqtt: &MqttConfig) -> Option<ClientFiles> {
    mqtt.tls.then(|| ClientFiles {
        ca_file: mqtt.ca_file.clone(),
        cert_file: mqtt.client_cert_file.clone(),
        key_file: mqtt.client_key_file.clone(),
        server_name: mqtt.server_name.clone(),
    })
}

/// The rumqttc transport for `files` (read now).
pub fn transport(files: &ClientFiles) -> Result<Transport, TlsError> {
    let config = tls::client_config(files)?;
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )))
}

/// The configuration field a TLS error is about.
fn field_of(mqtt: &MqttConfig, err: &TlsError) -> &'static str {
    let path = match err {
        TlsError::Read { path, .. } | TlsError::NoCertificate(path) => Some(path),
        TlsError::BadKey { .. } => return "mqtt.client_key_file",
        TlsError::BadServerName(_) => return "mqtt.server_name",
        TlsError::NoSystemRoots => return "mqtt.ca_file",
        _ => None,
    };
    let is = |f: &Option<PathBuf>| path.is_some() && f.as_ref() == path;
    if is(&mqtt.ca_file) {
        "mqtt.ca_file"
    } else if is(&mqtt.client_cert_file) {
        "mqtt.client_cert_file"
    } else {
        "mqtt.tls"
    }
}

/// Problems of the TLS settings: fields set without `tls`, half a client identity, files
/// that cannot be read or parsed.
pub fn validate(cfg: &Config) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let m = &cfg.mqtt;
    if !m.tls {
        let set = [
            ("mqtt.ca_file", m.ca_file.is_some()),
            ("mqtt.client_cert_file", m.client_cert_file.is_some()),
            ("mqtt.client_key_file", m.client_key_file.is_some()),
            ("mqtt.server_name", m.server_name.is_some()),
        ];
        for (field, _) in set.into_iter().filter(|(_, on)| *on) {
            problems.push((field, "needs mqtt.tls = true".to_string()));
        }
    } else if m.client_cert_file.is_some() != m.client_key_file.is_some() {
        problems.push((
            "mqtt.client_key_file",
            "set both mqtt.client_cert_file and mqtt.client_key_file, or neither".to_string(),
        ));
    } else if let Some(files) = mqtt_files(m) {
        if let Err(e) = tls::client_config(&files) {
            problems.push((field_of(m, &e), e.to_string()));
        }
    }
    if let Some(file) = &cfg.https_ca_file {
        if let Err(e) = https_roots(file) {
            problems.push(("https_ca_file", e));
        }
    }
    problems
}

pub use tls::https_roots;

/// `builder` trusting the certificates of `https_ca_file` too (when set).
pub fn https(
    builder: reqwest::ClientBuilder,
    https_ca_file: Option<&Path>,
) -> Result<reqwest::ClientBuilder, String> {
    let Some(file) = https_ca_file else {
        return Ok(builder);
    };
    Ok(https_roots(file)?
        .into_iter()
        .fold(builder, |b, cert| b.add_root_certificate(cert)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        toml::from_str(
            r#"
device_id = "robot-17"
key_file = "/k"
command_public_key = "x"
state_dir = "/s"
allowed_roots = ["/data"]
"#,
        )
        .unwrap()
    }

    #[test]
    fn tls_fields_need_tls() {
        let mut cfg = base();
        cfg.mqtt.ca_file = Some("/ca.pem".into());
        cfg.mqtt.server_name = Some("broker".into());
        let fields: Vec<_> = validate(&cfg).into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, vec!["mqtt.ca_file", "mqtt.server_name"]);
        assert!(mqtt_files(&cfg.mqtt).is_none());
    }

    #[test]
    fn half_a_client_identity_and_missing_files_are_named() {
        let mut cfg = base();
        cfg.mqtt.tls = true;
        cfg.mqtt.client_cert_file = Some("/c.pem".into());
        let p = validate(&cfg);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "mqtt.client_key_file");

        let mut cfg = base();
        cfg.mqtt.tls = true;
        cfg.mqtt.ca_file = Some("/nonexistent/ca.pem".into());
        cfg.https_ca_file = Some("/nonexistent/https-ca.pem".into());
        let p = validate(&cfg);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].0, "mqtt.ca_file");
        assert!(p[0].1.contains("/nonexistent/ca.pem"), "{}", p[0].1);
        assert_eq!(p[1].0, "https_ca_file");
    }
}
