//! Mosquitto for a stack ([`StackOptions::external_broker`], [`StackOptions::mosquitto_acl`],
//! [`StackOptions::mosquitto_dynsec`]): the documented configuration files of
//! `configs/mosquitto/` made fit for a test (ports, paths, logging), device accounts in a
//! password file, and waiting until Mosquitto takes a login.
//!
//! [`StackOptions::external_broker`]: super::StackOptions::external_broker
//! [`StackOptions::mosquitto_acl`]: super::StackOptions::mosquitto_acl
//! [`StackOptions::mosquitto_dynsec`]: super::StackOptions::mosquitto_dynsec

use std::path::Path;
use std::time::Duration;

use super::{lock, path_str, Stack, StackTls};
use crate::process::run_output;

/// The Mosquitto configuration of docs/security.md (production paths and port; the stack
/// rewrites those).
pub const MOSQUITTO_CONF: &str = include_str!("../../../configs/mosquitto/uplink.conf");

/// The Mosquitto ACL file of docs/security.md, used as is.
pub const MOSQUITTO_ACL: &str = include_str!("../../../configs/mosquitto/uplink.acl");

/// The bridge's account in [`MOSQUITTO_ACL`].
pub const MOSQUITTO_BRIDGE_USER: &str = "uplink-bridge";

/// A random password for a Mosquitto account.
pub(super) fn random_password() -> String {
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
pub const MOSQUITTO_DYNSEC_CONF: &str =
    include_str!("../../../configs/mosquitto/uplink-dynsec.conf");

/// [`MOSQUITTO_DYNSEC_CONF`] for a test: on `127.0.0.1:port`, the plugin's file at `file`.
pub(super) fn mosquitto_dynsec_conf(port: u16, file: &Path) -> String {
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
pub const MOSQUITTO_TLS_CONF: &str = include_str!("../../../configs/mosquitto/uplink-tls.conf");

/// [`MOSQUITTO_TLS_CONF`] for a test: on `127.0.0.1`, the stack's port and certificates.
/// Without `accounts` (anonymous Mosquitto) clients have no username to be their client
/// id, so that option goes, as on the anonymous plain listener.
/// With `client_certs`, its mutual-TLS lines are on (the device id from the certificate).
pub(super) fn mosquitto_tls_conf(t: &StackTls, accounts: bool, client_certs: bool) -> String {
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

impl Stack {
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
}
