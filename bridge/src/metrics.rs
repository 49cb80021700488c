//! Prometheus counters (`GET /metrics`, text format 0.0.4), written by hand like the control
//! API's. Counters are atomics in one shared [`Metrics`]; the connection gauge is read from
//! the event loop's watch channel when scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use uplink_protocol::topics::Channel;

#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_req: AtomicU64,
    pub messages_cmd_ack: AtomicU64,
    pub messages_progress: AtomicU64,
    pub messages_status: AtomicU64,
    pub forwarded_ok: AtomicU64,
    pub forwarded_refused: AtomicU64,
    pub forwarded_failed: AtomicU64,
    pub problems_published: AtomicU64,
    pub commands_published: AtomicU64,
    /// Sum of forwarded request latencies, in microseconds.
    pub api_latency_micros: AtomicU64,
    pub api_latency_count: AtomicU64,
    pub dropped: AtomicU64,
}

/// How a forwarded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The API answered 2xx.
    Ok,
    /// The API answered 4xx.
    Refused,
    /// The API answered anything else, or could not be reached.
    Failed,
}

impl Outcome {
    /// The outcome of an HTTP answer with `status`.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            200..=299 => Outcome::Ok,
            400..=499 => Outcome::Refused,
            _ => Outcome::Failed,
        }
    }
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Metrics {
    /// Counts a message received on a device channel (others are not counted).
    pub fn message(&self, channel: Channel) {
        match channel {
            Channel::Req => inc(&self.messages_req),
            Channel::CmdAck => inc(&self.messages_cmd_ack),
            Channel::Progress => inc(&self.messages_progress),
            Channel::Status => inc(&self.messages_status),
            Channel::Cmd | Channel::Res => {}
        }
    }

    /// Counts a forwarded request and how long the API took.
    pub fn forwarded(&self, outcome: Outcome, latency: Duration) {
        inc(match outcome {
            Outcome::Ok => &self.forwarded_ok,
            Outcome::Refused => &self.forwarded_refused,
            Outcome::Failed => &self.forwarded_failed,
        });
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.api_latency_micros.fetch_add(micros, Ordering::Relaxed);
        inc(&self.api_latency_count);
    }

    pub fn problem_published(&self) {
        inc(&self.problems_published);
    }

    pub fn command_published(&self) {
        inc(&self.commands_published);
    }

    pub fn dropped(&self) {
        inc(&self.dropped);
    }

    /// The text exposition; `mqtt_connected` is the current broker connection state.
    pub fn render(&self, mqtt_connected: bool) -> String {
        let mut out = String::new();
        family(
            &mut out,
            "uplink_bridge_mqtt_connected",
            "gauge",
            "1 while the bridge holds a broker connection.",
            &[("", u64::from(mqtt_connected).to_string())],
        );
        family(
            &mut out,
            "uplink_bridge_messages_total",
            "counter",
            "Messages received from devices, by channel.",
            &[
                ("{channel=\"req\"}", get(&self.messages_req).to_string()),
                (
                    "{channel=\"cmd_ack\"}",
                    get(&self.messages_cmd_ack).to_string(),
                ),
                (
                    "{channel=\"progress\"}",
                    get(&self.messages_progress).to_string(),
                ),
                (
                    "{channel=\"status\"}",
                    get(&self.messages_status).to_string(),
                ),
            ],
        );
        family(
            &mut out,
            "uplink_bridge_requests_forwarded_total",
            "counter",
            "Messages forwarded to the control API, by outcome (ok 2xx, refused 4xx, failed 5xx or unreachable).",
            &[
                ("{outcome=\"ok\"}", get(&self.forwarded_ok).to_string()),
                (
                    "{outcome=\"refused\"}",
                    get(&self.forwarded_refused).to_string(),
                ),
                (
                    "{outcome=\"failed\"}",
                    get(&self.forwarded_failed).to_string(),
                ),
            ],
        );
        family(
            &mut out,
            "uplink_bridge_problems_published_total",
            "counter",
            "Problem answers published for malformed, unknown-op or too-large requests.",
            &[("", get(&self.problems_published).to_string())],
        );
        family(
            &mut out,
            "uplink_bridge_commands_published_total",
            "counter",
            "Commands published on device cmd topics.",
            &[("", get(&self.commands_published).to_string())],
        );
        let seconds = get(&self.api_latency_micros) as f64 / 1e6;
        let name = "uplink_bridge_api_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Control API latency of forwarded messages.\n# TYPE {name} summary"
        );
        let _ = writeln!(out, "{name}_sum {seconds}");
        let _ = writeln!(out, "{name}_count {}", get(&self.api_latency_count));
        family(
            &mut out,
            "uplink_bridge_dropped_total",
            "counter",
            "Messages dropped because the bridge's queue was full.",
            &[("", get(&self.dropped).to_string())],
        );
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_status_class() {
        assert_eq!(Outcome::of_status(201), Outcome::Ok);
        assert_eq!(Outcome::of_status(409), Outcome::Refused);
        assert_eq!(Outcome::of_status(503), Outcome::Failed);
        assert_eq!(Outcome::of_status(302), Outcome::Failed);
    }

    #[test]
    fn render_shows_every_family() {
        let m = Metrics::default();
        m.message(Channel::Req);
        m.message(Channel::Req);
        m.message(Channel::Status);
        m.message(Channel::Res);
        m.forwarded(Outcome::Ok, Duration::from_millis(250));
        m.forwarded(Outcome::Failed, Duration::from_millis(500));
        m.problem_published();
        m.command_published();
        m.dropped();
        let text = m.render(true);
        for line in [
            "uplink_bridge_mqtt_connected 1",
            "uplink_bridge_messages_total{channel=\"req\"} 2",
            "uplink_bridge_messages_total{channel=\"cmd_ack\"} 0",
            "uplink_bridge_messages_total{channel=\"status\"} 1",
            "uplink_bridge_requests_forwarded_total{outcome=\"ok\"} 1",
            "uplink_bridge_requests_forwarded_total{outcome=\"refused\"} 0",
            "uplink_bridge_requests_forwarded_total{outcome=\"failed\"} 1",
            "uplink_bridge_problems_published_total 1",
            "uplink_bridge_commands_published_total 1",
            "uplink_bridge_api_latency_seconds_sum 0.75",
            "uplink_bridge_api_latency_seconds_count 2",
            "uplink_bridge_dropped_total 1",
            "# TYPE uplink_bridge_api_latency_seconds summary",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        assert!(m.render(false).contains("uplink_bridge_mqtt_connected 0\n"));
    }
}
