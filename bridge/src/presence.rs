//! Presence: retained `status` messages become `PUT /v1/bridge/devices/{id}/presence`.
//!
//! The event loop drops each status into a [`PresenceQueue`] (a few per device, never
//! blocking), and one worker sends them in order; the API checks each one's signature and
//! order and keeps the newest. A device going online wakes the
//! command pump, since the API makes its unacknowledged commands due at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uplink_protocol::envelope::MAX_PAYLOAD_BYTES;
use uplink_protocol::telemetry::{Presence, Status};

use crate::api::ApiClient;

/// Delay before retrying statuses the API could not take.
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// Parses a `status` payload; `None` (logged) when it is not a status or is over
/// [`MAX_PAYLOAD_BYTES`]. An empty payload clears a retained message and is ignored quietly.
pub fn parse_status(device_id: &str, payload: &[u8]) -> Option<Status> {
    if payload.is_empty() {
        debug!(device_id, "Retained status cleared");
        return None;
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        warn!(
            device_id,
            bytes = payload.len(),
            "Status is too large; dropped"
        );
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

/// Statuses kept per device while the API is slow or down; older ones beyond it are
/// dropped (the newest are what matters).
const PER_DEVICE: usize = 8;

/// Unsent statuses per device, oldest first. Not only the newest: a status is signed by
/// its device and the API refuses forged or stale ones, so a forged status published right
/// after a real one must not displace it here.
#[derive(Debug, Default)]
pub struct PresenceQueue {
    pending: Mutex<HashMap<String, VecDeque<Status>>>,
    notify: Notify,
}

impl PresenceQueue {
    /// Appends `status` for `device_id`, dropping the oldest beyond [`PER_DEVICE`].
    pub fn push(&self, device_id: &str, status: Status) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            let queue = pending.entry(device_id.to_string()).or_default();
            queue.push_back(status);
            if queue.len() > PER_DEVICE {
                queue.pop_front();
                warn!(device_id, "Too many unsent statuses; dropped the oldest");
            }
        }
        self.notify.notify_one();
    }

    fn take(&self) -> HashMap<String, VecDeque<Status>> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts back statuses that could not be sent, before any that arrived meanwhile.
    fn requeue(&self, device_id: String, mut unsent: VecDeque<Status>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let queue = pending.entry(device_id).or_default();
        unsent.append(queue);
        while unsent.len() > PER_DEVICE {
            unsent.pop_front();
        }
        *queue = unsent;
    }
}

/// Sends queued statuses until `shutdown`; wakes `pump` when a device comes online. A
/// status the API refuses (a bad signature, older than what it has) is dropped; one it
/// could not take now is retried.
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
        for (device_id, mut statuses) in queue.take() {
            while let Some(status) = statuses.pop_front() {
                match api.put_presence(&device_id, &status).await {
                    Ok(()) => {
                        info!(%device_id, state = ?status.state, "Presence updated");
                        if status.state == Presence::Online {
                            pump.notify_one();
                        }
                    }
                    Err(e) if e.is_transient() => {
                        warn!(%device_id, error = %e, "Could not update presence; will retry");
                        statuses.push_front(status);
                        queue.requeue(device_id, statuses);
                        failed = true;
                        break;
                    }
                    Err(e) => {
                        warn!(%device_id, error = %e, "Status refused by the control API; dropped");
                    }
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
            clock_offset_secs: None,
            ts_ms: None,
            sig: None,
        }
    }

    #[test]
    fn queue_keeps_each_devices_statuses_in_order_and_bounded() {
        let q = PresenceQueue::default();
        q.push("a", status(Presence::Online));
        q.push("a", status(Presence::Offline));
        q.push("b", status(Presence::Online));
        let taken = q.take();
        assert_eq!(taken.len(), 2);
        let states: Vec<Presence> = taken["a"].iter().map(|s| s.state).collect();
        assert_eq!(states, [Presence::Online, Presence::Offline]);
        assert!(q.take().is_empty());

        // Unsent statuses go back before newer ones.
        q.push("a", status(Presence::Online));
        q.requeue("a".into(), VecDeque::from([status(Presence::Offline)]));
        let states: Vec<Presence> = q.take()["a"].iter().map(|s| s.state).collect();
        assert_eq!(states, [Presence::Offline, Presence::Online]);

        // Bounded: the oldest go first.
        for i in 0..20 {
            q.push(
                "a",
                Status {
                    queue_depth: Some(i),
                    ..status(Presence::Online)
                },
            );
        }
        let kept: Vec<Option<u32>> = q.take()["a"].iter().map(|s| s.queue_depth).collect();
        assert_eq!(kept, (12..20).map(Some).collect::<Vec<_>>());
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
