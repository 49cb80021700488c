//! The MQTT link: one connection to the broker, polled continuously in its own task, and
//! request/response over `req`/`res` correlated by request id.
//!
//! A request that gets no answer within the request timeout is re-sent with the same
//! request id and body (new timestamp and signature) until a total budget is spent; answers
//! with status 5xx, 429 or 408 are retried with jittered exponential backoff; other 4xx fail
//! at once with the problem's detail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS, Request, Subscribe,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uplink_protocol::envelope::{RequestEnvelope, ResponseEnvelope, MAX_PAYLOAD_BYTES};
use uplink_protocol::keyring::CommandKeys;
use uplink_protocol::ops::Op;
use uplink_protocol::sign::{self, PrivateKey, SignError};
use uplink_protocol::telemetry::{Presence, Status};
use uplink_protocol::topics::{self, Channel};
use uplink_protocol::{unix_now, VERSION};

use crate::config::Secret;

/// Largest packet accepted from the broker (room for 64 KiB payloads plus topic and header).
pub const MAX_INCOMING_PACKET: usize = 256 * 1024;
const MAX_OUTGOING_PACKET: usize = 256 * 1024;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const CHANNEL_CAPACITY: usize = 256;
const RECONNECT_MIN: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{op}: no answer within {budget_secs} s")]
    Timeout { op: &'static str, budget_secs: u64 },
    #[error("{op}: service unavailable ({status}): {detail}")]
    Unavailable {
        op: &'static str,
        status: u16,
        detail: String,
    },
    #[error("{op} refused ({status} {code}): {detail}")]
    Refused {
        op: &'static str,
        status: u16,
        code: String,
        detail: String,
    },
    #[error("{op}: unexpected answer: {detail}")]
    BadAnswer { op: &'static str, detail: String },
    #[error("could not encode request body: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("agent is shutting down")]
    Shutdown,
}

impl RpcError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            RpcError::Timeout { .. } | RpcError::Unavailable { .. } => true,
            // These conflicts mean the session is in a state that forbids the op just now
            // (paused by an operator, parts missing at completion, …): look again later
            // via `session.status`. Other conflicts are final.
            // This device's clock is beyond the replay window: retried (with the job's
            // backoff) until it is set right, which NTP often does minutes after boot.
            RpcError::Refused {
                status: 401, code, ..
            } if code == "stale_request" => true,
            RpcError::Refused { status, code, .. } => {
                *status == 409
                    && matches!(
                        code.as_str(),
                        "session_paused"
                            | "invalid_state"
                            | "parts_incomplete"
                            | "concurrent_update"
                    )
            }
            _ => false,
        }
    }
}

/// Retry policy of requests, as data.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Re-send an unanswered request after this long.
    pub request_timeout: Duration,
    /// Stop re-sending after this long in total.
    pub budget: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    pub fn new(request_timeout: Duration) -> Self {
        RetryPolicy {
            request_timeout,
            budget: (request_timeout * 12).max(Duration::from_secs(120)),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.min_backoff)
            .with_max_delay(self.max_backoff)
            .without_max_times()
            .build()
    }
}

/// What the link needs to connect.
#[derive(Clone)]
pub struct LinkSettings {
    pub device_id: String,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub key: PrivateKey,
    /// The control API's command key: answers on `res` must carry its signature.
    pub command_key: CommandKeys,
    pub policy: RetryPolicy,
    /// MQTT over TLS with these files (read again before each reconnect); `None` = TCP.
    pub tls: Option<uplink_service::tls::ClientFiles>,
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<ResponseEnvelope>>>>;

/// Handle to the MQTT link. Cheap to share behind an `Arc`.
pub struct Link {
    client: AsyncClient,
    device_id: String,
    key: PrivateKey,
    command_key: CommandKeys,
    policy: RetryPolicy,
    pending: Pending,
    queue_depth: Arc<AtomicU32>,
    /// Free disk bytes as last sent in `status` ([`NO_FREE_DISK`]: unknown).
    free_disk: AtomicU64,
    /// When the current MQTT connection began (unix ms): its `online` status and its Last
    /// Will carry it.
    conn_ms: AtomicI64,
    shutdown: CancellationToken,
}

/// What the link hands back besides itself.
pub struct LinkParts {
    pub link: Arc<Link>,
    /// Raw payloads received on `cmd`.
    pub commands: mpsc::Receiver<bytes::Bytes>,
    /// Counts connections (ConnAcks) so far.
    pub connected: watch::Receiver<u64>,
    /// The event-loop task; ends after `shutdown` fires (it then says goodbye).
    pub task: tokio::task::JoinHandle<()>,
}

pub fn agent_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Unix time in milliseconds, for presence ordering.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// [`Link::free_disk`] before the agent measured it.
const NO_FREE_DISK: u64 = u64::MAX;

/// What an `online` status reports about the gateway.
#[derive(Clone, Copy, Default)]
struct Report {
    queue_depth: Option<u32>,
    free_disk_bytes: Option<u64>,
}

/// A `status` payload signed with the device key. `ts_ms`: when the connection began (for
/// `online` and the Last Will), or now (for a goodbye).
fn status_payload(
    key: &sign::PrivateKey,
    device_id: &str,
    state: Presence,
    report: Report,
    ts_ms: i64,
) -> Vec<u8> {
    let status = Status {
        v: VERSION,
        state,
        agent_version: Some(agent_version()),
        queue_depth: report.queue_depth,
        free_disk_bytes: report.free_disk_bytes,
        ts_ms: Some(ts_ms),
        // Known only from answers of an API that reads the field (see `crate::clock`).
        clock_offset_secs: crate::clock::offset(),
        sig: None,
    }
    .signed(key, device_id);
    serde_json::to_vec(&status).unwrap_or_default()
}

/// The Last Will of a connection that begins at `conn_ms`: a retained, signed `offline`.
fn last_will(settings: &LinkSettings, conn_ms: i64) -> LastWill {
    LastWill::new(
        topics::topic(&settings.device_id, Channel::Status),
        status_payload(
            &settings.key,
            &settings.device_id,
            Presence::Offline,
            Report::default(),
            conn_ms,
        ),
        QoS::AtLeastOnce,
        true,
    )
}

fn credentials(settings: &LinkSettings) -> (String, String) {
    let user = settings
        .username
        .clone()
        .unwrap_or_else(|| settings.device_id.clone());
    let password = match &settings.password {
        Some(p) => p.expose().to_string(),
        None => sign::mqtt_password(&settings.key, &settings.device_id, unix_now()),
    };
    (user, password)
}

/// Connection options: client id = device id, Last Will = retained `offline` status of a
/// connection that begins at `conn_ms`.
pub fn mqtt_options(settings: &LinkSettings, conn_ms: i64) -> MqttOptions {
    let mut opts = MqttOptions::new(
        settings.device_id.clone(),
        settings.host.clone(),
        settings.port,
    );
    opts.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
        .set_last_will(last_will(settings, conn_ms));
    let (user, password) = credentials(settings);
    opts.set_credentials(user, password);
    if let Some(files) = &settings.tls {
        opts.set_transport(tls_transport(files));
    }
    opts
}

/// The TLS transport of `files`; when they are unusable, one that fails every handshake
/// (never plain TCP), so the agent connects again once they are fixed.
fn tls_transport(files: &uplink_service::tls::ClientFiles) -> rumqttc::Transport {
    crate::tls::transport(files).unwrap_or_else(|e| {
        error!(error = %e, "MQTT TLS settings unusable; not connecting until they are fixed");
        rumqttc::Transport::tls(Vec::new(), None, None)
    })
}

/// Logs a failed connection attempt; a TLS handshake failure says why in plain words, as
/// an error (an operator must act: certificates, CA, names).
fn log_connection_error(e: &rumqttc::ConnectionError, settings: &LinkSettings, delay: Duration) {
    match uplink_service::tls::explain(e) {
        Some(why) => error!(
            host = %settings.host,
            port = settings.port,
            error = %e,
            retry_in_s = delay.as_secs(),
            "MQTT TLS handshake failed: {why}"
        ),
        None => {
            warn!(error = %e, retry_in_s = delay.as_secs(), "MQTT connection failed; reconnecting")
        }
    }
}

impl Link {
    /// Starts the event loop task. It runs until `shutdown` fires.
    pub fn start(settings: LinkSettings, shutdown: CancellationToken) -> LinkParts {
        let conn_ms = now_ms();
        let (client, mut eventloop) =
            AsyncClient::new(mqtt_options(&settings, conn_ms), CHANNEL_CAPACITY);
        // Requests and acks are small packets: without this, Nagle's algorithm holds one
        // back until the broker's delayed ACK of the previous (up to 40 ms a round trip).
        eventloop.network_options.set_tcp_nodelay(true);
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (conn_tx, conn_rx) = watch::channel(0u64);
        let link = Arc::new(Link {
            client,
            device_id: settings.device_id.clone(),
            key: settings.key.clone(),
            command_key: settings.command_key.clone(),
            policy: settings.policy,
            pending: Arc::new(Mutex::new(HashMap::new())),
            queue_depth: Arc::new(AtomicU32::new(0)),
            free_disk: AtomicU64::new(NO_FREE_DISK),
            conn_ms: AtomicI64::new(conn_ms),
            shutdown: shutdown.clone(),
        });
        let task = tokio::spawn(event_loop(
            eventloop,
            settings,
            link.clone(),
            cmd_tx,
            conn_tx,
            shutdown,
        ));
        LinkParts {
            link,
            commands: cmd_rx,
            connected: conn_rx,
            task,
        }
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// Sets the queue depth reported in the `status` message and republishes it.
    pub fn set_queue_depth(&self, depth: u32) {
        let old = self.queue_depth.swap(depth, Ordering::Relaxed);
        if old != depth {
            self.publish_status();
        }
    }

    /// Sets the free disk space reported in the `status` message and republishes it when
    /// it moved enough to matter ([`crate::disk::worth_sending`]).
    pub fn set_free_disk(&self, free: Option<u64>) {
        let sent = Some(self.free_disk.load(Ordering::Relaxed)).filter(|b| *b != NO_FREE_DISK);
        if crate::disk::worth_sending(sent, free) {
            self.free_disk
                .store(free.unwrap_or(NO_FREE_DISK), Ordering::Relaxed);
            self.publish_status();
        }
    }

    /// What the next `online` status reports.
    fn report(&self) -> Report {
        Report {
            queue_depth: Some(self.queue_depth.load(Ordering::Relaxed)),
            free_disk_bytes: Some(self.free_disk.load(Ordering::Relaxed))
                .filter(|b| *b != NO_FREE_DISK),
        }
    }

    /// Republishes the `online` status (queue depth, free disk, clock offset) of this
    /// connection.
    fn publish_status(&self) {
        let payload = status_payload(
            &self.key,
            &self.device_id,
            Presence::Online,
            self.report(),
            self.conn_ms.load(Ordering::Relaxed),
        );
        let topic = topics::topic(&self.device_id, Channel::Status);
        if let Err(e) = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, payload)
        {
            debug!(error = %e, "Status not queued");
        }
    }

    /// Records that the API's clock read `api_now` (from a signed answer to this device's
    /// request) when this device's read `device_now`; a changed offset is reported in a
    /// new status.
    pub fn observe_api_clock(&self, api_now: i64, device_now: i64) {
        if crate::clock::observe(api_now, device_now).is_some() {
            self.publish_status();
        }
    }

    /// A signed `stale_request` refusal: says in the log by how much this device's clock is
    /// off (from the API's `server_time`) and reports it in the status.
    fn stale_request(&self, answer: &ResponseEnvelope) {
        let extra = answer.problem.as_ref().map(|p| &p.extra);
        let server_time = extra.and_then(|e| e.get("server_time")?.as_i64());
        let window = extra.and_then(|e| e.get("replay_window_secs")?.as_u64());
        match server_time {
            Some(t) => {
                if crate::clock::stale_request(t, window, unix_now()).is_some() {
                    self.publish_status();
                }
            }
            None => error!(
                "Request refused as stale: this device's clock is more than the API's replay window (300 s by default) off the API's; enable NTP (systemd-timesyncd or chrony), and run `uplink-agent doctor` to see the offset"
            ),
        }
    }

    fn envelope(&self, op: Op, request_id: &str, body: &str) -> Vec<u8> {
        let env = RequestEnvelope::sign(
            &self.key,
            &self.device_id,
            op.as_str(),
            request_id,
            unix_now(),
            body.to_string(),
        );
        serde_json::to_vec(&env).unwrap_or_default()
    }

    /// Publishes a signed one-way message (`command.ack` on `cmd/ack`, `progress` on
    /// `progress`). QoS 0 messages are dropped when the link is congested.
    pub async fn send_signed<B: Serialize>(
        &self,
        channel: Channel,
        op: Op,
        request_id: &str,
        body: &B,
        qos: QoS,
    ) -> Result<(), RpcError> {
        let body = serde_json::to_string(body)?;
        let payload = self.envelope(op, request_id, &body);
        let topic = topics::topic(&self.device_id, channel);
        if qos == QoS::AtMostOnce {
            if let Err(e) = self.client.try_publish(topic, qos, false, payload) {
                debug!(op = op.as_str(), error = %e, "Message dropped; link congested");
            }
            return Ok(());
        }
        match tokio::time::timeout(
            self.policy.request_timeout,
            self.client.publish(topic, qos, false, payload),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                warn!(op = op.as_str(), error = %e, "Message not queued");
                Ok(())
            }
            Err(_) => {
                warn!(op = op.as_str(), "Message not queued in time; link is down");
                Ok(())
            }
        }
    }

    /// Publishes a signed QoS 0 message now, or drops it when the link is congested.
    pub fn send_signed_now<B: Serialize>(
        &self,
        channel: Channel,
        op: Op,
        request_id: &str,
        body: &B,
    ) {
        let Ok(body) = serde_json::to_string(body) else {
            return;
        };
        let payload = self.envelope(op, request_id, &body);
        let topic = topics::topic(&self.device_id, channel);
        if let Err(e) = self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, payload)
        {
            debug!(op = op.as_str(), error = %e, "Message dropped; link congested");
        }
    }

    /// Sends a request and waits for its answer, re-sending as the policy says.
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        op: Op,
        request_id: &str,
        body: &B,
    ) -> Result<R, RpcError> {
        let body = serde_json::to_string(body)?;
        let answer = self.call_raw(op, request_id, &body).await?;
        let result = answer.result.unwrap_or(serde_json::Value::Null);
        serde_json::from_value(result).map_err(|e| RpcError::BadAnswer {
            op: op.as_str(),
            detail: e.to_string(),
        })
    }

    async fn call_raw(
        &self,
        op: Op,
        request_id: &str,
        body: &str,
    ) -> Result<ResponseEnvelope, RpcError> {
        let _guard = PendingGuard {
            pending: &self.pending,
            request_id,
        };
        let started = tokio::time::Instant::now();
        let deadline = started + self.policy.budget;
        let mut backoff = self.policy.backoff();
        let topic = topics::topic(&self.device_id, Channel::Req);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let (tx, rx) = oneshot::channel();
            if let Ok(mut map) = self.pending.lock() {
                map.insert(request_id.to_string(), tx);
            }
            let payload = self.envelope(op, request_id, body);
            debug!(op = op.as_str(), request_id, attempt, "Sending request");
            let wait = async {
                // Queue the publish (may block while the link is down), then wait for the answer.
                self.client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await
                    .map_err(|_| ())?;
                rx.await.map_err(|_| ())
            };
            let outcome = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(RpcError::Shutdown),
                r = tokio::time::timeout(self.policy.request_timeout, wait) => r,
            };
            let retry_delay = match outcome {
                Ok(Ok(answer)) if answer.status < 400 => return Ok(answer),
                Ok(Ok(answer)) => {
                    let (code, detail) = match &answer.problem {
                        Some(p) => (
                            p.code.clone(),
                            p.detail.clone().unwrap_or_else(|| p.title.clone()),
                        ),
                        None => ("unknown".to_string(), format!("status {}", answer.status)),
                    };
                    if !(answer.status >= 500 || answer.status == 429 || answer.status == 408) {
                        if answer.status == 401 && code == "stale_request" {
                            self.stale_request(&answer);
                        }
                        return Err(RpcError::Refused {
                            op: op.as_str(),
                            status: answer.status,
                            code,
                            detail,
                        });
                    }
                    let delay = backoff.next().unwrap_or(self.policy.max_backoff);
                    if tokio::time::Instant::now() + delay >= deadline {
                        return Err(RpcError::Unavailable {
                            op: op.as_str(),
                            status: answer.status,
                            detail,
                        });
                    }
                    warn!(op = op.as_str(), request_id, status = answer.status, %code, retry_in_ms = delay.as_millis() as u64, "Request answered with a retryable error");
                    delay
                }
                Ok(Err(())) | Err(_) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(RpcError::Timeout {
                            op: op.as_str(),
                            budget_secs: self.policy.budget.as_secs(),
                        });
                    }
                    warn!(
                        op = op.as_str(),
                        request_id, attempt, "No answer in time; re-sending"
                    );
                    crate::metrics::request_resent();
                    Duration::ZERO
                }
            };
            if !retry_delay.is_zero() {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Err(RpcError::Shutdown),
                    _ = tokio::time::sleep(retry_delay) => {}
                }
            }
        }
    }

    /// Routes an answer from `res` to its waiting request. Only answers the control API
    /// signed for this device count; an unsigned one only as "retry later" (a 5xx the
    /// bridge made when it could not reach the API). Anything else on `res` is someone
    /// else's and is dropped: the request is re-sent and gets the API's answer.
    fn deliver(&self, answer: ResponseEnvelope) {
        let authentic = match answer.verify(&self.command_key, &self.device_id) {
            Ok(()) => true,
            Err(SignError::Missing) => answer.status >= 500,
            Err(_) => false,
        };
        if !authentic {
            warn!(request_id = %answer.request_id, status = answer.status, "Answer not signed by the control API; ignored");
            return;
        }
        let tx = self
            .pending
            .lock()
            .ok()
            .and_then(|mut map| map.remove(&answer.request_id));
        match tx {
            Some(tx) => {
                let _ = tx.send(answer);
            }
            None => {
                debug!(request_id = %answer.request_id, "Answer for no waiting request; ignored")
            }
        }
    }
}

struct PendingGuard<'a> {
    pending: &'a Pending,
    request_id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.pending.lock() {
            map.remove(self.request_id);
        }
    }
}

/// What an incoming publish is, for the agent.
#[derive(Debug, PartialEq)]
enum Incoming {
    Command,
    Response(ResponseEnvelope),
    Ignored(&'static str),
}

fn classify(device_id: &str, publish: &Publish) -> Incoming {
    if publish.payload.len() > MAX_PAYLOAD_BYTES {
        return Incoming::Ignored("payload too large");
    }
    match topics::parse(&publish.topic) {
        Some((dev, Channel::Cmd)) if dev == device_id => Incoming::Command,
        Some((dev, Channel::Res)) if dev == device_id => {
            match serde_json::from_slice::<ResponseEnvelope>(&publish.payload) {
                Ok(r) => Incoming::Response(r),
                Err(_) => Incoming::Ignored("malformed response"),
            }
        }
        _ => Incoming::Ignored("unexpected topic"),
    }
}

async fn event_loop(
    mut eventloop: EventLoop,
    settings: LinkSettings,
    link: Arc<Link>,
    commands: mpsc::Sender<bytes::Bytes>,
    connected: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let mut delay = RECONNECT_MIN;
    let mut failures = 0u32;
    let device = settings.device_id.clone();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(host = %settings.host, port = settings.port, tls = settings.tls.is_some(), code = ?ack.code, "Connected to broker");
                delay = RECONNECT_MIN;
                failures = 0;
                crate::metrics::set_mqtt_connected(true);
                // Subscribe and announce presence before anything else queued.
                let mut status = Publish::new(
                    topics::topic(&device, Channel::Status),
                    QoS::AtLeastOnce,
                    // The same time as this connection's Last Will, so the API takes
                    // the will (offline) as newer than this.
                    status_payload(
                        &link.key,
                        &device,
                        Presence::Online,
                        link.report(),
                        link.conn_ms.load(Ordering::Relaxed),
                    ),
                );
                status.retain = true;
                eventloop.pending.push_front(Request::Publish(status));
                eventloop
                    .pending
                    .push_front(Request::Subscribe(Subscribe::new_many([
                        rumqttc::SubscribeFilter::new(
                            topics::topic(&device, Channel::Cmd),
                            QoS::AtLeastOnce,
                        ),
                        rumqttc::SubscribeFilter::new(
                            topics::topic(&device, Channel::Res),
                            QoS::AtLeastOnce,
                        ),
                    ])));
                connected.send_modify(|n| *n += 1);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match classify(&device, &p) {
                Incoming::Command => {
                    if commands.try_send(p.payload).is_err() {
                        warn!("Command queue full; command dropped (the cloud re-sends it)");
                    }
                }
                Incoming::Response(r) => link.deliver(r),
                Incoming::Ignored(why) => {
                    debug!(topic = %p.topic, why, "Message ignored")
                }
            },
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                debug!(codes = ?ack.return_codes, "Subscribed");
            }
            Ok(_) => {}
            Err(e) => {
                crate::metrics::set_mqtt_connected(false);
                failures += 1;
                log_connection_error(&e, &settings, delay);
                if let Some(hint) = reconnect_hint(failures, crate::clock::offset()) {
                    warn!("{hint}");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RECONNECT_MAX);
                // The derived password carries a timestamp: make a fresh one for each attempt.
                let (user, password) = credentials(&settings);
                eventloop.mqtt_options.set_credentials(user, password);
                // And a Last Will of the new connection.
                let conn_ms = now_ms();
                link.conn_ms.store(conn_ms, Ordering::Relaxed);
                eventloop
                    .mqtt_options
                    .set_last_will(last_will(&settings, conn_ms));
                // Renewed certificates and CAs are taken at the next connection.
                if let Some(files) = settings.tls.clone() {
                    if let Ok(t) = tokio::task::spawn_blocking(move || tls_transport(&files)).await
                    {
                        eventloop.mqtt_options.set_transport(t);
                    }
                }
            }
        }
    }
    goodbye(&mut eventloop, &link, &device).await;
    crate::metrics::set_mqtt_connected(false);
}

/// What to add to the log after `failures` connection failures in a row: the embedded
/// broker refuses a password whose timestamp is beyond the replay window by closing the
/// connection, which looks like a network fault, so the clock is named as a likely cause.
fn reconnect_hint(failures: u32, offset: Option<i64>) -> Option<String> {
    match offset {
        Some(o) if o.abs() > 300 && failures % 3 == 1 => Some(format!(
            "MQTT connections fail and {}",
            crate::clock::describe(o, Some(300))
        )),
        None if failures % 10 == 3 => Some(
            "MQTT connections keep failing: if the broker is reachable, this device's clock may be more than the replay window (300 s by default) off the API's (the broker refuses such passwords by closing the connection); run `uplink-agent doctor` (with api_url set) to check the clock, and enable NTP".to_string(),
        ),
        _ => None,
    }
}

/// Publishes the retained `offline` status and disconnects cleanly (best effort, ≤ 2 s).
async fn goodbye(eventloop: &mut EventLoop, link: &Link, device: &str) {
    if eventloop.network.is_none() {
        return;
    }
    let _ = link.client.try_publish(
        topics::topic(device, Channel::Status),
        QoS::AtLeastOnce,
        true,
        status_payload(
            &link.key,
            device,
            Presence::Offline,
            Report::default(),
            now_ms(),
        ),
    );
    let _ = link.client.try_disconnect();
    let drain = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        debug!("Broker did not take the goodbye in time");
    }
    info!("Disconnected from broker");
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplink_protocol::problem::Problem;

    #[test]
    fn options_carry_will_credentials_and_packet_limit() {
        let key = sign::generate();
        let settings = LinkSettings {
            device_id: "robot-17".into(),
            host: "127.0.0.1".into(),
            port: 1883,
            username: None,
            password: None,
            key: key.clone(),
            command_key: key.verifying_key().into(),
            policy: RetryPolicy::new(Duration::from_secs(10)),
            tls: None,
        };
        let opts = mqtt_options(&settings, 1_700_000_000_000);
        assert_eq!(opts.client_id(), "robot-17");
        assert!(opts.max_packet_size() >= MAX_PAYLOAD_BYTES + 1024);
        let will = opts.last_will().unwrap();
        assert_eq!(will.topic, "uplink/v1/devices/robot-17/status");
        assert!(will.retain);
        let status: Status = serde_json::from_slice(&will.message).unwrap();
        assert_eq!(status.state, Presence::Offline);
        assert_eq!(status.ts_ms, Some(1_700_000_000_000));
        status
            .verify(&key.verifying_key(), "robot-17")
            .expect("the will is signed by the device");
        let login = opts.credentials().unwrap();
        assert_eq!(login.username, "robot-17");
        let ts =
            sign::verify_mqtt_password(&key.verifying_key(), "robot-17", &login.password).unwrap();
        assert!((unix_now() - ts).abs() < 5);

        let overridden = LinkSettings {
            username: Some("u".into()),
            password: Some(Secret::new("p")),
            ..settings
        };
        let login = mqtt_options(&overridden, 0).credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("u", "p")
        );
    }

    #[tokio::test]
    async fn only_answers_the_api_signed_for_this_device_reach_a_request() {
        let api = sign::generate();
        let shutdown = CancellationToken::new();
        let parts = Link::start(
            LinkSettings {
                device_id: "robot-17".into(),
                host: "127.0.0.1".into(),
                port: 9,
                username: None,
                password: None,
                key: sign::generate(),
                command_key: api.verifying_key().into(),
                policy: RetryPolicy::new(Duration::from_secs(10)),
                tls: None,
            },
            shutdown.clone(),
        );
        let link = parts.link;
        let wait = |id: &str| {
            let (tx, rx) = oneshot::channel();
            link.pending.lock().unwrap().insert(id.into(), tx);
            rx
        };
        let answer = || ResponseEnvelope::ok("r1", 200, serde_json::json!({"url": "http://x"}));
        let mut rx = wait("r1");
        link.deliver(answer());
        link.deliver(answer().sign(&sign::generate(), "robot-17"));
        link.deliver(answer().sign(&api, "robot-18"));
        link.deliver(ResponseEnvelope::problem(
            "r1",
            Problem::new(409, "x", "x", None),
        ));
        assert!(
            rx.try_recv().is_err(),
            "unsigned or forged answers are dropped"
        );
        link.deliver(answer().sign(&api, "robot-17"));
        assert_eq!(rx.try_recv().unwrap().status, 200);
        // An unsigned 5xx (a bridge that could not reach the API) only means "retry".
        let mut rx = wait("r2");
        link.deliver(ResponseEnvelope::problem(
            "r2",
            Problem::new(503, "api_unavailable", "x", None),
        ));
        assert_eq!(rx.try_recv().unwrap().status, 503);
        shutdown.cancel();
    }

    #[test]
    fn classifies_incoming_messages() {
        let res = ResponseEnvelope::ok("r1", 200, serde_json::json!({}));
        let p = Publish::new(
            topics::topic("robot-17", Channel::Res),
            QoS::AtLeastOnce,
            serde_json::to_vec(&res).unwrap(),
        );
        assert_eq!(classify("robot-17", &p), Incoming::Response(res));
        let p = Publish::new(
            topics::topic("robot-17", Channel::Cmd),
            QoS::AtLeastOnce,
            "x",
        );
        assert_eq!(classify("robot-17", &p), Incoming::Command);
        let p = Publish::new(
            topics::topic("robot-18", Channel::Cmd),
            QoS::AtLeastOnce,
            "x",
        );
        assert!(matches!(classify("robot-17", &p), Incoming::Ignored(_)));
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        let p = Publish::new(
            topics::topic("robot-17", Channel::Cmd),
            QoS::AtLeastOnce,
            big,
        );
        assert!(matches!(classify("robot-17", &p), Incoming::Ignored(_)));
    }

    #[test]
    fn transient_errors() {
        assert!(RpcError::Timeout {
            op: "x",
            budget_secs: 1
        }
        .is_transient());
        let refused = |status, code: &str| RpcError::Refused {
            op: "x",
            status,
            code: code.into(),
            detail: "d".into(),
        };
        assert!(!refused(400, "invalid_body").is_transient());
        assert!(!refused(403, "device_disabled").is_transient());
        assert!(refused(409, "session_paused").is_transient());
        assert!(refused(409, "parts_incomplete").is_transient());
        assert!(!refused(409, "part_digest_mismatch").is_transient());
        assert!(!refused(422, "idempotency_key_reused").is_transient());
        assert!(refused(401, "stale_request").is_transient());
        assert!(!refused(401, "bad_signature").is_transient());
    }

    #[test]
    fn reconnect_hints_name_the_clock() {
        // Offset unknown: a hint at the 3rd failure in a row, then every 10th.
        let hints: Vec<u32> = (1..=25)
            .filter(|n| reconnect_hint(*n, None).is_some())
            .collect();
        assert_eq!(hints, [3, 13, 23]);
        // Known to be beyond the window: said with the offset.
        let hint = reconnect_hint(1, Some(-3600)).unwrap();
        assert!(hint.contains("3600 s behind"), "{hint}");
        assert!(reconnect_hint(1, Some(30)).is_none());
    }
}
