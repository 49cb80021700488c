//! The embedded broker: rumqttd on `broker.listen`, on its own OS thread (its `start`
//! blocks and runs its own runtimes).
//!
//! Authentication: the bridge's own client (username [`INTERNAL_USERNAME`] and a random
//! password made at start) is checked locally; every other client is checked by the control
//! API (`POST /v1/bridge/mqtt-auth`). If the API cannot be asked, the client is refused.
//! rumqttd's auth hook can only say yes or no: a refused client's connection is closed
//! without a CONNACK (as are keep-alive 0 and anything but MQTT 3.1.1), which
//! docs/protocol.md tells devices (`tests/embedded.rs` holds it).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::runtime::Handle;
use tracing::{info, warn};
use uplink_protocol::envelope::MAX_PAYLOAD_BYTES;

use crate::api::ApiClient;
use crate::config::Secret;

/// Username of the bridge's own client on the embedded broker.
pub const INTERNAL_USERNAME: &str = "uplink-bridge";

/// Room for the topic and MQTT headers on top of the largest accepted payload, so a payload
/// slightly over the limit still arrives and is answered with a 413 problem. rumqttd closes
/// the connection of a client whose packet's remaining length is over 64 KiB + this (also
/// a CONNECT, before it is authenticated: the limit bounds what an unknown client makes
/// the broker buffer). docs/protocol.md states the numbers; `tests/embedded.rs` holds them.
pub const PACKET_HEADROOM: usize = 16 * 1024;

/// How long an auth call to the control API may take before the client is refused.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start the embedded broker thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    pub listen: SocketAddr,
    /// Password of the bridge's own client.
    pub internal_password: Secret,
    stopped: Arc<AtomicBool>,
}

impl EmbeddedBroker {
    /// Whether the broker thread has ended (it only does when it could not serve).
    pub fn has_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

/// A password nobody can guess: 244 random bits.
fn random_password() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Equality that takes as long whatever the first difference.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The rumqttd configuration: one v4 server on `listen`.
pub fn rumqttd_config(listen: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD_BYTES + PACKET_HEADROOM,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        // Publishing on a topic nobody subscribes to yet (e.g. a status before the bridge
        // is up) must not disconnect the publisher.
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "uplink-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 8,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}

/// Starts rumqttd on `listen`. API auth calls run on `runtime` (the bridge's runtime).
/// Returns once the listener thread is running; the caller waits for its own client to
/// connect to know the port accepts connections.
pub fn start(
    listen: SocketAddr,
    api: ApiClient,
    runtime: Handle,
) -> Result<EmbeddedBroker, BrokerError> {
    // rumqttd only logs a failed bind; check first so the operator gets a clear error.
    TcpListener::bind(listen)
        .map(drop)
        .map_err(|source| BrokerError::Listen {
            addr: listen,
            source,
        })?;

    let internal_password = random_password();
    let mut config = rumqttd_config(listen);
    if let Some(server) = config.v4.as_mut().and_then(|v4| v4.get_mut("1")) {
        let internal = Arc::new(internal_password.clone());
        server.set_auth_handler(
            move |client_id: String, username: String, password: String| {
                let internal = internal.clone();
                let api = api.clone();
                let runtime = runtime.clone();
                async move {
                    if username == INTERNAL_USERNAME {
                        return same_secret(&password, &internal);
                    }
                    authorize_with_api(api, runtime, client_id, username, password).await
                }
            },
        );
    }

    let stopped = Arc::new(AtomicBool::new(false));
    let flag = stopped.clone();
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            match broker.start() {
                Ok(()) => warn!(%listen, "Embedded broker stopped"),
                Err(e) => warn!(%listen, error = %e, "Embedded broker failed"),
            }
            flag.store(true, Ordering::SeqCst);
        })
        .map_err(BrokerError::Thread)?;
    info!(%listen, "Embedded broker starting");
    Ok(EmbeddedBroker {
        listen,
        internal_password: Secret::new(internal_password),
        stopped,
    })
}

/// Asks the control API whether a device may connect; any failure refuses it.
async fn authorize_with_api(
    api: ApiClient,
    runtime: Handle,
    client_id: String,
    username: String,
    password: String,
) -> bool {
    let call = runtime.spawn({
        let client_id = client_id.clone();
        let username = username.clone();
        async move {
            tokio::time::timeout(
                AUTH_TIMEOUT,
                api.mqtt_auth(&client_id, &username, &password),
            )
            .await
        }
    });
    match call.await {
        Ok(Ok(Ok(allow))) => {
            info!(%client_id, %username, allow, "MQTT client checked");
            allow
        }
        Ok(Ok(Err(e))) => {
            warn!(%client_id, %username, error = %e, "MQTT auth failed; client refused");
            false
        }
        Ok(Err(_)) => {
            warn!(%client_id, %username, "MQTT auth timed out; client refused");
            false
        }
        Err(e) => {
            warn!(%client_id, %username, error = %e, "MQTT auth task failed; client refused");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
        let a = random_password();
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_password());
    }

    #[test]
    fn config_allows_the_largest_payload() {
        let listen: SocketAddr = ([127, 0, 0, 1], 1883).into();
        let c = rumqttd_config(listen);
        let v4 = c.v4.as_ref().and_then(|v| v.get("1"));
        assert!(
            v4.is_some_and(|s| s.connections.max_payload_size > MAX_PAYLOAD_BYTES
                && s.connections.dynamic_filters
                && s.listen == listen)
        );
    }
}
