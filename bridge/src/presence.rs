//! Presence: retained `status` messages become `PUT /v1/bridge/devices/{id}/presence`.
//!
//! Only the newest status of each device matters, so the event loop drops each one into a
//! [`PresenceQueue`] that keeps the latest per device (bounded by the number of devices,
//! never blocking), and one worker sends them in order. A device going online wakes the
//! command pump, since the API makes its unacknowledged commands due at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uplink_protocol::telemetry::{Presence, Status};

use crate::api::ApiClient;

/// Delay before retrying statuses the API could not take.
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// Parses a `status` payload; `None` (logged) when it is not a status. An empty payload
/// clears a retained message and is ignored quietly.
pub fn parse_status(device_id: &str, payload: &[u8]) -> Option<Status> {
    if payload.is_empty() {
        debug!(device_id, "Retained status cleared");
        return None;
    }
    match serde_json::from_slice::<Status>(payload) {
        Ok(status) => Some(status),
        Err(e) => {
            warn!(device_id, error = %e, "Status is not valid; dropped");
            None
        }
    }
}

/// Latest unsent status per device.
#[derive(Debug, Default)]
pub struct PresenceQueue {
    pending: Mutex<HashMap<String, Status>>,
    notify: Notify,
}

impl PresenceQueue {
    /// Records `status` as the newest for `device_id`, replacing an unsent older one.
    pub fn push(&self, device_id: &str, status: Status) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(device_id.to_string(), status);
        self.notify.notify_one();
    }

    fn take(&self) -> HashMap<String, Status> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts back a status that could not be sent, unless a newer one arrived meanwhile.
    fn requeue(&self, device_id: String, status: Status) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(device_id)
            .or_insert(status);
    }
}

/// Sends queued statuses until `shutdown`; wakes `pump` when a device comes online.
pub async fn run_worker(
    queue: Arc<PresenceQueue>,
    api: ApiClient,
    pump: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = queue.notify.notified() => {}
        }
        let mut failed = false;
        for (device_id, status) in queue.take() {
            match api.put_presence(&device_id, &status).await {
                Ok(()) => {
                    info!(%device_id, state = ?status.state, "Presence updated");
                    if status.state == Presence::Online {
                        pump.notify_one();
                    }
                }
                Err(e) => {
                    warn!(%device_id, error = %e, "Could not update presence; will retry");
                    queue.requeue(device_id, status);
                    failed = true;
                }
            }
        }
        if failed {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY_DELAY) => queue.notify.notify_one(),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn status(state: Presence) -> Status {
        Status {
            v: 1,
            state,
            agent_version: None,
            queue_depth: None,
            free_disk_bytes: None,
        }
    }

    #[test]
    fn queue_keeps_the_newest_status_per_device() {
        let q = PresenceQueue::default();
        q.push("a", status(Presence::Online));
        q.push("a", status(Presence::Offline));
        q.push("b", status(Presence::Online));
        let taken = q.take();
        assert_eq!(taken.len(), 2);
        assert_eq!(taken["a"].state, Presence::Offline);
        assert!(q.take().is_empty());

        q.push("a", status(Presence::Online));
        q.requeue("a".into(), status(Presence::Offline));
        assert_eq!(q.take()["a"].state, Presence::Online);
    }

    #[test]
    fn statuses_parse() {
        assert_eq!(
            parse_status("a", br#"{"v":1,"state":"online","extra":1}"#)
                .unwrap()
                .state,
            Presence::Online
        );
        assert!(parse_status("a", b"").is_none());
        assert!(parse_status("a", b"{\"state\":\"sleeping\"}").is_none());
    }
}
