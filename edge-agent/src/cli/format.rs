//! Formatting for `status`: progress bars, sizes, durations and ETAs, and one job's line
//! or JSON object. Pure code.

use std::fmt::Write as _;

use serde_json::json;
use uplink_protocol::flow::DEFAULT_PRIORITY;
use uplink_protocol::telemetry::JobState;

use crate::store::JobRecord;

/// `[#####-----]` with `width` cells; empty when the total is unknown.
pub fn progress_bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done.min(total) as u128 * width as u128) / total as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Percent done, one decimal (`None` when the total is unknown).
pub fn percent(done: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| (done.min(total) as f64 * 1000.0 / total as f64).floor() / 10.0)
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `42s`, `3m05s`, `2h07m`, `3d04h`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Seconds left at `rate` bytes/s (`None` when the rate is unknown or zero).
pub fn eta_secs(done: u64, total: u64, rate: u64) -> Option<u64> {
    (rate > 0 && total > 0).then(|| total.saturating_sub(done).div_ceil(rate))
}

/// What `status` shows for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job: JobRecord,
    pub bytes_done: u64,
    /// Average upload rate since the job was created (uploading jobs only).
    pub rate_bps: Option<u64>,
    /// `upload_window` when the job has parts to send but every upload window is closed.
    pub waiting_for: Option<&'static str>,
}

impl JobView {
    pub fn new(job: JobRecord, bytes_done: u64, now: i64) -> JobView {
        let elapsed = now.saturating_sub(job.created_at);
        let rate_bps = (job.state == JobState::Uploading && elapsed > 0 && bytes_done > 0)
            .then(|| bytes_done / elapsed as u64);
        JobView {
            job,
            bytes_done,
            rate_bps,
            waiting_for: None,
        }
    }

    fn total(&self) -> u64 {
        self.job
            .identity
            .map(|i| i.size)
            .unwrap_or(self.job.bytes_total)
    }

    fn done(&self) -> u64 {
        if self.job.state == JobState::Done {
            self.total()
        } else {
            self.bytes_done
        }
    }

    fn eta(&self) -> Option<u64> {
        self.rate_bps
            .and_then(|r| eta_secs(self.done(), self.total(), r))
    }

    /// Two lines: id, state, origin and path; then the bar, bytes, rate, ETA and error.
    pub fn text(&self) -> String {
        let (done, total) = (self.done(), self.total());
        let mut out = format!(
            "{}  {:<10}  {:<7}  {}\n    {} ",
            self.job.id,
            self.job.state.as_str(),
            if self.job.local { "local" } else { "command" },
            self.job.path.display(),
            progress_bar(done, total, 30),
        );
        match percent(done, total) {
            Some(p) => {
                let _ = write!(
                    out,
                    "{p:5.1}%  {} / {}",
                    human_bytes(done),
                    human_bytes(total)
                );
            }
            None => out.push_str("  size not known yet"),
        }
        if let Some(rate) = self.rate_bps {
            let _ = write!(out, "  {}/s avg", human_bytes(rate));
        }
        if let Some(eta) = self.eta() {
            let _ = write!(out, "  ETA {}", human_duration(eta));
        }
        if self.job.priority != DEFAULT_PRIORITY {
            let _ = write!(out, "  priority {}", self.job.priority);
        }
        if self.waiting_for == Some("upload_window") {
            out.push_str("  (waiting for an upload window)");
        }
        if let Some(e) = &self.job.error {
            let _ = write!(out, "\n    last error: {e}");
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let (done, total) = (self.done(), self.total());
        json!({
            "job_id": self.job.id,
            "local": self.job.local,
            "path": self.job.path,
            "file_name": self.job.file_name,
            "state": self.job.state.as_str(),
            "priority": self.job.priority,
            "waiting_for": self.waiting_for,
            "session_id": self.job.session_id,
            "bytes_done": done,
            "bytes_total": total,
            "percent": percent(done, total),
            "rate_bps": self.rate_bps,
            "eta_secs": self.eta(),
            "sha256": self.job.sha256,
            "error": self.job.error,
            "created_at": self.job.created_at,
            "updated_at": self.job.updated_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hasher::FileIdentity;
    use uuid::Uuid;

    #[test]
    fn progress_bars() {
        assert_eq!(progress_bar(0, 100, 10), "[----------]");
        assert_eq!(progress_bar(50, 100, 10), "[#####-----]");
        assert_eq!(progress_bar(99, 100, 10), "[#########-]");
        assert_eq!(progress_bar(100, 100, 10), "[##########]");
        assert_eq!(progress_bar(200, 100, 4), "[####]");
        assert_eq!(progress_bar(5, 0, 4), "[----]");
        assert_eq!(percent(1, 3), Some(33.3));
        assert_eq!(percent(3, 3), Some(100.0));
        assert_eq!(percent(3, 0), None);
    }

    #[test]
    fn sizes_durations_and_eta() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(185), "3m05s");
        assert_eq!(human_duration(7620), "2h07m");
        assert_eq!(human_duration(273_600), "3d04h");
        assert_eq!(eta_secs(0, 100, 10), Some(10));
        assert_eq!(eta_secs(95, 100, 10), Some(1));
        assert_eq!(eta_secs(100, 100, 10), Some(0));
        assert_eq!(eta_secs(0, 100, 0), None);
        assert_eq!(eta_secs(0, 0, 10), None);
    }

    fn job(state: JobState, size: Option<u64>, created_at: i64) -> JobRecord {
        JobRecord {
            id: Uuid::nil(),
            path: "/data/a.bin".into(),
            file_name: "a.bin".into(),
            identity: size.map(|size| FileIdentity {
                size,
                mtime_ns: 0,
                inode: 1,
            }),
            part_size: None,
            sha256: None,
            part_checksum: Default::default(),
            create_request_id: "create-1".into(),
            session_id: None,
            state,
            error: None,
            bytes_total: size.unwrap_or(0),
            pause_requested: false,
            cancel_requested: false,
            created_at,
            updated_at: created_at,
            priority: DEFAULT_PRIORITY,
            local: true,
        }
    }

    #[test]
    fn job_view_text_and_json() {
        let mib = 1024 * 1024;
        let v = JobView::new(
            job(JobState::Uploading, Some(100 * mib), 1000),
            25 * mib,
            1010,
        );
        assert_eq!(v.rate_bps, Some(25 * mib / 10));
        let text = v.text();
        assert!(text.contains("uploading"), "{text}");
        assert!(text.contains("local"), "{text}");
        assert!(text.contains("[#######-----------------------]"), "{text}");
        assert!(text.contains(" 25.0%  25.0 MiB / 100.0 MiB"), "{text}");
        assert!(text.contains("2.5 MiB/s avg"), "{text}");
        assert!(text.contains("ETA 30s"), "{text}");
        let j = v.json();
        assert_eq!(j["state"], "uploading");
        assert_eq!(j["eta_secs"], 30);
        assert_eq!(j["bytes_done"], 25 * mib);

        let mut failed = job(JobState::Failed, None, 1000);
        failed.error = Some("file changed during upload".into());
        let text = JobView::new(failed, 0, 2000).text();
        assert!(text.contains("size not known yet"), "{text}");
        assert!(
            text.contains("last error: file changed during upload"),
            "{text}"
        );
        assert!(!text.contains("ETA"), "{text}");

        let mut waiting = JobView::new(job(JobState::Uploading, Some(10), 1000), 0, 1000);
        waiting.job.priority = 9;
        waiting.waiting_for = Some("upload_window");
        let text = waiting.text();
        assert!(text.contains("priority 9"), "{text}");
        assert!(text.contains("waiting for an upload window"), "{text}");
        assert_eq!(waiting.json()["waiting_for"], "upload_window");
        assert_eq!(waiting.json()["priority"], 9);

        // A done job shows its whole size, whatever the part table says.
        let done = JobView::new(job(JobState::Done, Some(10), 1000), 0, 2000);
        assert_eq!(done.json()["bytes_done"], 10);
        assert_eq!(done.json()["percent"], 100.0);
    }
}
