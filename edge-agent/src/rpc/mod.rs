//! The MQTT link: one connection to the broker, polled continuously in its own task, and
//! request/response over `req`/`res` correlated by request id.
//!
//! A request that gets no answer within the request timeout is re-sent with the same
//! request id and body (new timestamp and signature) until a total budget is spent; answers
//! with status 5xx, 429 or 408 are retried with jittered exponential backoff; other 4xx fail
//! at once with the problem's detail.

//! - `connection`: connecting (options, TLS, Last Will) and the event loop that polls the
//!   broker, routes what arrives and reconnects.
//! - `request`: signed requests, their re-sends and backoff, and routing answers to them.
//! - `status`: the retained, signed `status` (presence, queue depth, free disk, clock).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rumqttc::AsyncClient;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use uplink_protocol::envelope::ResponseEnvelope;
use uplink_protocol::keyring::CommandKeys;
use uplink_protocol::sign::PrivateKey;

use crate::config::Secret;

mod connection;
mod request;
mod status;

pub use connection::mqtt_options;

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

impl Link {
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
