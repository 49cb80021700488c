//! The retained, signed `status`: `online` with the queue depth, free disk and clock
//! offset of this connection, republished when they change; `offline` as the Last Will.

use std::sync::atomic::Ordering;

use rumqttc::{LastWill, QoS};
use tracing::{debug, error};
use uplink_protocol::envelope::ResponseEnvelope;
use uplink_protocol::sign;
use uplink_protocol::telemetry::{Presence, Status};
use uplink_protocol::topics::{self, Channel};
use uplink_protocol::{unix_now, VERSION};

use super::{agent_version, Link, LinkSettings, NO_FREE_DISK};

/// What an `online` status reports about the gateway.
#[derive(Clone, Copy, Default)]
pub(super) struct Report {
    queue_depth: Option<u32>,
    free_disk_bytes: Option<u64>,
}

/// A `status` payload signed with the device key. `ts_ms`: when the connection began (for
/// `online` and the Last Will), or now (for a goodbye).
pub(super) fn status_payload(
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
pub(super) fn last_will(settings: &LinkSettings, conn_ms: i64) -> LastWill {
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

impl Link {
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
    pub(super) fn report(&self) -> Report {
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
    pub(super) fn stale_request(&self, answer: &ResponseEnvelope) {
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
}
