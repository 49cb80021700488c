//! Per-operation measurements: latencies of the successful calls, errors by kind, and
//! units (e.g. presigned URLs) per call; summarised as throughput and percentiles.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Default)]
struct OpStats {
    micros: Vec<u64>,
    units: u64,
    errors: BTreeMap<String, u64>,
}

/// Shared by every task of a run.
#[derive(Debug, Default)]
pub struct Recorder {
    ops: Mutex<HashMap<String, OpStats>>,
}

/// One operation's figures over the measured window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OpSummary {
    pub op: String,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// Successful calls per second over the window.
    pub per_sec: f64,
    /// Units (presigned URLs for `parts.presign`) per second; 0 when the op has none.
    pub units_per_sec: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Recorder {
    fn with(&self, op: &str, f: impl FnOnce(&mut OpStats)) {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        f(ops.entry(op.to_string()).or_default());
    }

    /// A successful call that took `took`.
    pub fn ok(&self, op: &str, took: Duration) {
        self.ok_units(op, took, 0);
    }

    /// A successful call that produced `units` units.
    pub fn ok_units(&self, op: &str, took: Duration, units: u64) {
        self.with(op, |s| {
            s.micros.push(took.as_micros() as u64);
            s.units += units;
        });
    }

    /// A failed attempt of `op`, by kind (`timeout`, `503 api_unavailable`, …).
    pub fn error(&self, op: &str, kind: &str) {
        self.with(op, |s| *s.errors.entry(kind.to_string()).or_default() += 1);
    }

    /// Every operation's summary over a window of `window` (sorted by name).
    pub fn summary(&self, window: Duration) -> Vec<OpSummary> {
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<OpSummary> = ops.iter().map(|(op, s)| summarise(op, s, window)).collect();
        out.sort_by(|a, b| a.op.cmp(&b.op));
        out
    }
}

fn summarise(op: &str, s: &OpStats, window: Duration) -> OpSummary {
    let mut sorted = s.micros.clone();
    sorted.sort_unstable();
    let secs = window.as_secs_f64().max(1e-9);
    let ms = |p: f64| percentile(&sorted, p) as f64 / 1000.0;
    OpSummary {
        op: op.to_string(),
        ok: sorted.len() as u64,
        errors: s.errors.clone(),
        per_sec: round2(sorted.len() as f64 / secs),
        units_per_sec: round2(s.units as f64 / secs),
        p50_ms: round2(ms(50.0)),
        p95_ms: round2(ms(95.0)),
        p99_ms: round2(ms(99.0)),
        max_ms: round2(sorted.last().copied().unwrap_or(0) as f64 / 1000.0),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The nearest-rank percentile `p` (0–100) of ascending `sorted`; 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let xs: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&xs, 50.0), 50);
        assert_eq!(percentile(&xs, 99.0), 99);
        assert_eq!(percentile(&xs, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[1, 2], 0.0), 1);
    }

    #[test]
    fn summary_counts_units_and_errors_per_op() {
        let r = Recorder::default();
        r.ok_units("parts.presign", Duration::from_millis(10), 32);
        r.ok_units("parts.presign", Duration::from_millis(30), 32);
        r.error("parts.presign", "timeout");
        r.error("parts.presign", "timeout");
        r.ok("session.create", Duration::from_millis(5));
        let s = r.summary(Duration::from_secs(2));
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].op, "parts.presign");
        assert_eq!(s[0].ok, 2);
        assert_eq!(s[0].per_sec, 1.0);
        assert_eq!(s[0].units_per_sec, 32.0);
        assert_eq!(s[0].p50_ms, 10.0);
        assert_eq!(s[0].max_ms, 30.0);
        assert_eq!(s[0].errors.get("timeout"), Some(&2));
        assert_eq!(s[1].op, "session.create");
        assert!(s[1].errors.is_empty());
    }
}
