//! How far this device's clock is from the control API's.
//!
//! Gateways often boot without a battery-backed clock or NTP, so the agent never judges
//! anything the API dated by its own wall clock: presigned URLs are renewed by their
//! lifetime (`expires_in_secs`) on the monotonic clock (see `uploader::UrlLife`). The
//! offset is still measured, from the API's *signed* answers to this device's own requests
//! (a presign answer's `expires_at - expires_in_secs`, or the `server_time` of a
//! `stale_request` refusal), reported in the presence status (`clock_offset_secs`), as the
//! metric `uplink_agent_clock_offset_seconds`, and logged when it matters.
//!
//! Signed requests and MQTT passwords keep the device's own time: the API refuses those
//! more than its replay window (300 s by default) away from its clock, and the agent does
//! not shift its timestamps to get past that.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use tracing::{error, info, warn};

/// An offset that moved less than this since the last one reported is not reported again.
const REPORT_STEP_SECS: i64 = 2;
/// From this offset on, the agent warns in its log even when requests still pass.
pub const WARN_SECS: i64 = 60;

static OFFSET: AtomicI64 = AtomicI64::new(0);
static KNOWN: AtomicBool = AtomicBool::new(false);

/// The last measured offset in seconds (this device's clock minus the API's; positive when
/// the device is ahead), once one was measured.
pub fn offset() -> Option<i64> {
    KNOWN
        .load(Ordering::Relaxed)
        .then(|| OFFSET.load(Ordering::Relaxed))
}

/// Records that the API's clock read `api_now` when this device's read `device_now` (Unix
/// seconds). Returns the new offset when it differs from the last one by at least
/// [`REPORT_STEP_SECS`] (or is the first): worth a new presence status.
pub fn observe(api_now: i64, device_now: i64) -> Option<i64> {
    let offset = device_now - api_now;
    let previous = offset_swap(offset);
    let changed = previous.is_none_or(|p| (p - offset).abs() >= REPORT_STEP_SECS);
    if changed {
        if offset.abs() >= WARN_SECS {
            warn!(
                clock_offset_secs = offset,
                "Clock offset from the API measured: {}",
                describe(offset, None)
            );
        } else {
            info!(
                clock_offset_secs = offset,
                "Clock offset from the API measured"
            );
        }
        Some(offset)
    } else {
        None
    }
}

fn offset_swap(offset: i64) -> Option<i64> {
    let previous = OFFSET.swap(offset, Ordering::Relaxed);
    KNOWN.swap(true, Ordering::Relaxed).then_some(previous)
}

/// One line about an offset, with what to do when it is large: `window` is the API's replay
/// window when it refused a request because of it.
pub fn describe(offset: i64, window: Option<u64>) -> String {
    let (how, secs) = if offset >= 0 {
        ("ahead of", offset)
    } else {
        ("behind", -offset)
    };
    match window {
        Some(w) => format!(
            "this device's clock is {secs} s {how} the control API's, more than its replay window ({w} s): every signed request and MQTT password is refused until the clock is set; enable NTP (systemd-timesyncd or chrony: `timedatectl set-ntp true`) or set the time by hand"
        ),
        None => format!(
            "this device's clock is {secs} s {how} the control API's; uploads still work (URLs are judged by their lifetime), but beyond the replay window (300 s by default) the API refuses every signed request: enable NTP (systemd-timesyncd or chrony)"
        ),
    }
}

/// Logs a `stale_request` refusal: the API's clock (`server_time`) and window from its
/// signed problem. Returns the offset when it is worth a new presence status.
pub fn stale_request(server_time: i64, window: Option<u64>, device_now: i64) -> Option<i64> {
    let offset = device_now - server_time;
    error!(
        clock_offset_secs = offset,
        "Request refused as stale: {}",
        describe(offset, Some(window.unwrap_or(300)))
    );
    let previous = offset_swap(offset);
    previous
        .is_none_or(|p| (p - offset).abs() >= REPORT_STEP_SECS)
        .then_some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_their_words() {
        // One process-wide value: one test touches it.
        assert_eq!(observe(1000, 760), Some(-240));
        assert_eq!(offset(), Some(-240));
        assert_eq!(observe(1001, 762), None); // moved 1 s: not reported again
        assert_eq!(offset(), Some(-239));
        assert_eq!(observe(1000, 4600), Some(3600));
        assert_eq!(stale_request(1000, Some(300), 4601), None);
        assert_eq!(stale_request(1000, Some(300), 700), Some(-300));
        assert!(describe(-240, None).starts_with("this device's clock is 240 s behind"));
        let refused = describe(3600, Some(300));
        assert!(
            refused.starts_with(
                "this device's clock is 3600 s ahead of the control API's, more than its replay window (300 s)"
            ),
            "{refused}"
        );
        assert!(refused.contains("NTP"), "{refused}");
    }
}
