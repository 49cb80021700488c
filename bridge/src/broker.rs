//! The embedded broker: rumqttd on a loopback port chosen at start, on its own OS thread
//! (its `start` blocks and runs its own runtimes), behind the gate ([`crate::gate`]) that
//! devices connect to on `broker.listen`.
//!
//! Authentication: the bridge's own client (username [`INTERNAL_USERNAME`] and a random
//! password made at start) is checked locally; a device is checked by the control API
//! (`POST /v1/bridge/mqtt-auth`) in the gate, which then logs it in to rumqttd with a second
//! random secret (the gate's). If the API cannot be asked, the client is refused. A refused
//! client's connection is closed without a CONNACK (as are keep-alive 0 and anything but
//! MQTT 3.1.1), which docs/protocol.md tells devices (`tests/embedded.rs` holds it).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
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

/// How often the gate asks the API which connected devices are still enabled.
const RECHECK: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded broker cannot get a loopback port: {0}")]
    Loopback(#[source] std::io::Error),
    #[error("could not start the embedded broker thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// Where devices connect (the gate).
    pub listen: SocketAddr,
    /// rumqttd's loopback listener, for the bridge's own client.
    pub internal: SocketAddr,
    /// Password of the bridge's own client.
    pub internal_password: Secret,
    /// The gate in front of rumqttd, and its bound listener (served by the caller).
    pub gate: Arc<crate::gate::Gate>,
    pub gate_listener: Option<tokio::net::TcpListener>,
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

/// Most device connections the embedded broker holds at once.
pub const MAX_DEVICE_CONNECTIONS: usize = 10_000;
/// Descriptors a device connection takes in the bridge: the device's socket at the gate,
/// the gate's to rumqttd, and rumqttd's side of that one.
const FILES_PER_DEVICE: u64 = 3;
/// Descriptors kept for everything else (HTTP to the API, logs, the listeners).
const FILES_RESERVED: u64 = 256;

/// How many device connections fit in `open_files` descriptors (at most
/// [`MAX_DEVICE_CONNECTIONS`]). Past it the gate refuses new connections: a process out of
/// descriptors cannot accept, and rumqttd then spins on its accept loop.
pub fn device_connection_cap(open_files: Option<u64>) -> usize {
    let fit = open_files.map_or(u64::MAX, |n| {
        n.saturating_sub(FILES_RESERVED) / FILES_PER_DEVICE
    });
    usize::try_from(fit).map_or(MAX_DEVICE_CONNECTIONS, |n| {
        n.clamp(1, MAX_DEVICE_CONNECTIONS)
    })
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
            // The devices, the bridge's own client and a few spare.
            max_connections: MAX_DEVICE_CONNECTIONS + 10,
            max_outgoing_packet_count: 200,
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 8,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}

/// Binds the gate on `listen` and starts rumqttd on a free loopback port. Device
/// credentials are checked by `api` (through the gate). Returns once the listener thread
/// is running; the caller serves the gate and waits for its own client to connect to know
/// rumqttd accepts connections.
pub fn start(listen: SocketAddr, api: ApiClient) -> Result<EmbeddedBroker, BrokerError> {
    let listen_error = |source| BrokerError::Listen {
        addr: listen,
        source,
    };
    let public = TcpListener::bind(listen).map_err(listen_error)?;
    public.set_nonblocking(true).map_err(listen_error)?;
    let listen = public.local_addr().map_err(listen_error)?;
    let gate_listener = tokio::net::TcpListener::from_std(public).map_err(listen_error)?;
    // rumqttd binds by address only: take a free loopback port and hand it over.
    let internal = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_err(BrokerError::Loopback)?;

    let internal_password = random_password();
    let gate_secret = random_password();
    let mut config = rumqttd_config(internal);
    if let Some(server) = config.v4.as_mut().and_then(|v4| v4.get_mut("1")) {
        let internal = Arc::new(internal_password.clone());
        let gate = Arc::new(gate_secret.clone());
        server.set_auth_handler(
            move |_client_id: String, username: String, password: String| {
                let internal = internal.clone();
                let gate = gate.clone();
                async move {
                    if username == INTERNAL_USERNAME {
                        same_secret(&password, &internal)
                    } else {
                        // A device the gate has checked with the control API.
                        same_secret(&password, &gate)
                    }
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
                Ok(()) => warn!(%internal, "Embedded broker stopped"),
                Err(e) => warn!(%internal, error = %e, "Embedded broker failed"),
            }
            flag.store(true, Ordering::SeqCst);
        })
        .map_err(BrokerError::Thread)?;
    let open_files = uplink_service::open_files::raise();
    let cap = device_connection_cap(open_files);
    info!(%listen, %internal, open_files_limit = ?open_files, max_device_connections = cap, "Embedded broker starting");
    Ok(EmbeddedBroker {
        listen,
        internal,
        internal_password: Secret::new(internal_password),
        gate: Arc::new(crate::gate::Gate::new(
            internal,
            gate_secret,
            api,
            RECHECK,
            cap,
        )),
        gate_listener: Some(gate_listener),
        stopped,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_connections_fit_the_open_files_limit() {
        use super::{device_connection_cap as cap, MAX_DEVICE_CONNECTIONS};
        assert_eq!(cap(Some(1024)), 256);
        assert_eq!(cap(Some(20_000)), 6581);
        assert_eq!(cap(Some(524_288)), MAX_DEVICE_CONNECTIONS);
        assert_eq!(cap(None), MAX_DEVICE_CONNECTIONS);
        assert_eq!(cap(Some(100)), 1);
    }
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
