//! The gate in front of the embedded broker: devices connect here (`broker.listen`), rumqttd
//! listens on a loopback port only the bridge knows.
//!
//! For each connection the gate reads the CONNECT, has the control API check the device's
//! credentials (`POST /v1/bridge/mqtt-auth`), and forwards the CONNECT to rumqttd with the
//! password replaced by a secret made at start, which rumqttd's auth hook accepts (so a
//! client reaching rumqttd's port directly cannot log in as a device). Then it forwards
//! every packet the device sends only when it stays inside the device's own topics
//! ([`crate::mqtt_rules`]); anything else closes the connection. What rumqttd sends back is
//! copied unchanged: with subscriptions limited to its own subtree, a device receives only
//! its own messages.
//!
//! Every few seconds ([`Gate::recheck`]) the gate asks the API which devices are enabled
//! and closes the connections of the others: disabling a device disconnects it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::{ApiClient, Login};
use crate::broker::{INTERNAL_USERNAME, PACKET_HEADROOM};
use crate::mqtt_rules::{self, PacketError};
use uplink_protocol::envelope::MAX_PAYLOAD_BYTES;

/// How long a new connection has to send its CONNECT (rumqttd's own limit too).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an auth call to the control API may take before the client is refused.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest time between two warnings about refused connections.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(10);
/// Largest remaining length of a packet, as rumqttd's `max_payload_size`.
const MAX_REMAINING: usize = MAX_PAYLOAD_BYTES + PACKET_HEADROOM;

/// Open device connections, by device id.
#[derive(Default)]
struct Connections {
    next: u64,
    by_device: HashMap<String, HashMap<u64, CancellationToken>>,
}

pub struct Gate {
    /// rumqttd's loopback listener.
    pub upstream: SocketAddr,
    /// The password rumqttd accepts for a device the gate has checked.
    pub secret: String,
    pub api: ApiClient,
    /// How often enabled devices are re-checked.
    pub recheck: Duration,
    open: Mutex<Connections>,
    /// One permit per device connection the bridge can hold
    /// ([`crate::broker::device_connection_cap`]).
    slots: Arc<Semaphore>,
    /// Connections closed at once because every slot was taken.
    refused_full: AtomicU64,
    /// When that was last said in a warning.
    warned_full: Mutex<Option<tokio::time::Instant>>,
}

fn lock(m: &Mutex<Connections>) -> std::sync::MutexGuard<'_, Connections> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("upstream", &self.upstream)
            .field("secret", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(
        upstream: SocketAddr,
        secret: String,
        api: ApiClient,
        recheck: Duration,
        max_connections: usize,
    ) -> Self {
        Gate {
            upstream,
            secret,
            api,
            recheck,
            open: Mutex::new(Connections::default()),
            slots: Arc::new(Semaphore::new(max_connections)),
            refused_full: AtomicU64::new(0),
            warned_full: Mutex::new(None),
        }
    }

    fn register(&self, device_id: &str) -> (u64, CancellationToken) {
        let mut open = lock(&self.open);
        open.next += 1;
        let id = open.next;
        let token = CancellationToken::new();
        open.by_device
            .entry(device_id.to_string())
            .or_default()
            .insert(id, token.clone());
        (id, token)
    }

    fn unregister(&self, device_id: &str, id: u64) {
        let mut open = lock(&self.open);
        if let Some(conns) = open.by_device.get_mut(device_id) {
            conns.remove(&id);
            if conns.is_empty() {
                open.by_device.remove(device_id);
            }
        }
    }

    /// Closes every connection of a device not in `enabled`; returns the devices closed.
    fn close_all_but(&self, enabled: &HashSet<String>) -> Vec<String> {
        let open = lock(&self.open);
        let mut closed = Vec::new();
        for (device, conns) in &open.by_device {
            if !enabled.contains(device) {
                conns.values().for_each(CancellationToken::cancel);
                closed.push(device.clone());
            }
        }
        closed
    }

    fn connected(&self) -> bool {
        !lock(&self.open).by_device.is_empty()
    }

    /// A slot for one more device connection, or `None` when the bridge holds as many as
    /// it can (said in a warning at most every [`FULL_WARNING_EVERY`]): the caller closes
    /// the connection at once and the device retries later.
    pub fn slot(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        let refused = self.refused_full.fetch_add(1, Ordering::Relaxed) + 1;
        let mut warned = self.warned_full.lock().unwrap_or_else(|e| e.into_inner());
        if warned.is_none_or(|t| t.elapsed() >= FULL_WARNING_EVERY) {
            *warned = Some(tokio::time::Instant::now());
            warn!(%peer, refused, "Device connection refused: the bridge holds as many as its open-files limit allows (raise LimitNOFILE)");
        }
        None
    }

    /// Accepts device connections on `listener` until `stop`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = self.slot(peer) else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let gate = self.clone();
                    // Open connections are not closed at shutdown: they end with the
                    // process, as rumqttd's own would (no Last Will is sent for them).
                    tokio::spawn(async move {
                        gate.handle(stream, peer, None).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Closes the connections of devices the API no longer lets in, every `recheck`.
    pub async fn run_recheck(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.recheck);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.connected() {
                continue;
            }
            match self.api.enabled_devices().await {
                Ok(enabled) => {
                    for device_id in self.close_all_but(&enabled) {
                        info!(%device_id, "Device disabled or removed; its MQTT connection closed");
                    }
                }
                Err(e) => warn!(error = %e, "Could not re-check connected devices"),
            }
        }
    }

    /// One device connection: CONNECT, auth, then filtered forwarding both ways.
    /// `certified`: the device id of a client certificate the TLS listener verified
    /// (mutual TLS); the device then connects as that id without a password.
    pub async fn handle<S>(&self, stream: S, peer: SocketAddr, certified: Option<String>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut client_rx, mut client_tx) = tokio::io::split(stream);
        let mut buf = BytesMut::with_capacity(4096);
        let first = tokio::time::timeout(CONNECT_TIMEOUT, read_frame(&mut client_rx, &mut buf));
        let frame = match first.await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "MQTT connection closed before CONNECT");
                return;
            }
            Err(_) => {
                debug!(%peer, "No CONNECT within 10 s; connection closed");
                return;
            }
        };
        let Some((device_id, connect)) = self.admit(&frame, peer, certified.as_deref()).await
        else {
            return;
        };
        let Ok(mut upstream) = TcpStream::connect(self.upstream).await else {
            warn!(%device_id, "Embedded broker unreachable; client refused");
            return;
        };
        let _ = upstream.set_nodelay(true);
        if upstream.write_all(&connect).await.is_err() {
            return;
        }
        let (id, token) = self.register(&device_id);
        let (mut up_rx, mut up_tx) = upstream.into_split();
        let inbound = async {
            loop {
                match read_frame(&mut client_rx, &mut buf).await {
                    Ok(Some(frame)) => {
                        if let Err(why) = mqtt_rules::check_packet(&device_id, &frame) {
                            warn!(%device_id, %why, "Device left its own topics; connection closed");
                            return;
                        }
                        if up_tx.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        debug!(%device_id, error = %e, "Bad MQTT packet; connection closed");
                        return;
                    }
                }
            }
        };
        let outbound = tokio::io::copy(&mut up_rx, &mut client_tx);
        tokio::select! {
            () = inbound => {}
            _ = outbound => {}
            () = token.cancelled() => {}
        }
        self.unregister(&device_id, id);
        let _ = client_tx.shutdown().await;
    }

    /// Checks a CONNECT; returns the device id and the CONNECT to forward, or `None` to
    /// close the connection (no CONNACK, as rumqttd does for a refused client). With a
    /// `certified` device id the client must connect as that device (client id, and
    /// username if it gives one) and the API checks only that the device is registered
    /// and enabled; otherwise it checks the key-derived password.
    async fn admit(
        &self,
        frame: &[u8],
        peer: SocketAddr,
        certified: Option<&str>,
    ) -> Option<(String, Vec<u8>)> {
        let connect = match mqtt_rules::parse_connect(frame) {
            Ok(c) => c,
            Err(e) => {
                debug!(%peer, error = %e, "Not an MQTT 3.1.1 CONNECT; connection closed");
                return None;
            }
        };
        let client_id = connect.client_id.clone();
        let login = match (certified, &connect.username, &connect.password) {
            (Some(cn), username, _) => {
                if client_id != cn || username.as_ref().is_some_and(|u| u != cn) {
                    warn!(%client_id, certificate = cn, ?username, "MQTT client not connecting as the device its certificate names; refused");
                    return None;
                }
                Login::Certificate
            }
            (None, Some(username), Some(password)) => Login::Password { username, password },
            (None, _, _) => {
                info!(%client_id, "MQTT client without username or password refused");
                return None;
            }
        };
        // Never checked by the API: the bridge's own login (rumqttd sees the client id as
        // the username).
        let username = match &login {
            Login::Password { username, .. } => username,
            Login::Certificate => client_id.as_str(),
        };
        if username == INTERNAL_USERNAME || client_id == INTERNAL_USERNAME {
            warn!(%client_id, "MQTT client using the bridge's username refused");
            return None;
        }
        let allowed =
            tokio::time::timeout(AUTH_TIMEOUT, self.api.mqtt_auth(&client_id, &login)).await;
        let how = login.kind();
        match allowed {
            Ok(Ok(true)) => info!(%client_id, how, allow = true, "MQTT client checked"),
            Ok(Ok(false)) => {
                info!(%client_id, how, allow = false, "MQTT client checked");
                return None;
            }
            Ok(Err(e)) => {
                warn!(%client_id, error = %e, "MQTT auth failed; client refused");
                return None;
            }
            Err(_) => {
                warn!(%client_id, "MQTT auth timed out; client refused");
                return None;
            }
        }
        if let Some(will) = &connect.will_topic {
            if !mqtt_rules::may_publish(&client_id, will) {
                warn!(%client_id, %will, "Last Will outside the device's topics; connection closed");
                return None;
            }
        }
        let forward = mqtt_rules::with_login(frame, &connect, &client_id, &self.secret)?;
        Some((client_id, forward))
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Packet(#[from] PacketError),
    #[error("connection closed inside a packet")]
    Eof,
}

/// Reads one complete packet; `None` at a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(
    rx: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<BytesMut>, ReadError> {
    loop {
        if let Some(len) = mqtt_rules::frame_len(buf, MAX_REMAINING)? {
            return Ok(Some(buf.split_to(len)));
        }
        if rx.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Eof)
            };
        }
    }
}
