//! Local Prometheus metrics: process-wide counters (atomics bumped by the uploader and the
//! MQTT link), gauges read from the store, and a tiny HTTP responder serving `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{self, Store};

/// Process-wide counters.
#[derive(Debug)]
pub struct Counters {
    pub bytes_uploaded: AtomicU64,
    pub parts_uploaded: AtomicU64,
    pub parts_retried: AtomicU64,
    pub requests_resent: AtomicU64,
    pub mqtt_connected: AtomicBool,
    /// Flow control (set by [`crate::flow::Flow`]).
    pub upload_window_open: AtomicBool,
    pub jobs_waiting_for_slot: AtomicU64,
    pub max_upload_bytes_per_sec: AtomicU64,
    pub concurrency: AtomicU64,
}

/// The agent's counters (one process, one set).
pub static COUNTERS: Counters = Counters {
    bytes_uploaded: AtomicU64::new(0),
    parts_uploaded: AtomicU64::new(0),
    parts_retried: AtomicU64::new(0),
    requests_resent: AtomicU64::new(0),
    mqtt_connected: AtomicBool::new(false),
    upload_window_open: AtomicBool::new(true),
    jobs_waiting_for_slot: AtomicU64::new(0),
    max_upload_bytes_per_sec: AtomicU64::new(0),
    concurrency: AtomicU64::new(0),
};

/// A part was uploaded and committed.
pub fn part_uploaded(bytes: u64) {
    COUNTERS.parts_uploaded.fetch_add(1, Ordering::Relaxed);
    COUNTERS.bytes_uploaded.fetch_add(bytes, Ordering::Relaxed);
}

pub fn part_retried() {
    COUNTERS.parts_retried.fetch_add(1, Ordering::Relaxed);
}

pub fn request_resent() {
    COUNTERS.requests_resent.fetch_add(1, Ordering::Relaxed);
}

pub fn set_mqtt_connected(up: bool) {
    COUNTERS.mqtt_connected.store(up, Ordering::Relaxed);
}

/// Everything one scrape shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub bytes_uploaded: u64,
    pub parts_uploaded: u64,
    pub parts_retried: u64,
    pub requests_resent: u64,
    pub mqtt_connected: bool,
    pub upload_window_open: bool,
    pub jobs_waiting_for_slot: u64,
    pub max_upload_bytes_per_sec: u64,
    pub concurrency: u64,
    /// Jobs per state (every state listed, zeros included).
    pub jobs: Vec<(&'static str, u64)>,
    pub queue_depth: u64,
    /// This device's clock minus the API's, seconds, once measured ([`crate::clock`]).
    pub clock_offset_secs: Option<i64>,
}

/// Every job state, for the `uplink_agent_jobs{state}` gauge.
pub const JOB_STATES: [&str; 9] = [
    "queued",
    "hashing",
    "open",
    "uploading",
    "paused",
    "completing",
    "done",
    "failed",
    "cancelled",
];

impl Snapshot {
    /// Counters now, plus the given job counts per state (`(state, count)` from the store).
    pub fn take(counts: &[(String, u64)]) -> Snapshot {
        let jobs: Vec<(&'static str, u64)> = JOB_STATES
            .iter()
            .map(|s| {
                let n = counts
                    .iter()
                    .filter(|(state, _)| state == s)
                    .map(|(_, n)| *n)
                    .sum();
                (*s, n)
            })
            .collect();
        let queue_depth = jobs
            .iter()
            .filter(|(s, _)| !matches!(*s, "done" | "failed" | "cancelled"))
            .map(|(_, n)| n)
            .sum();
        Snapshot {
            bytes_uploaded: COUNTERS.bytes_uploaded.load(Ordering::Relaxed),
            parts_uploaded: COUNTERS.parts_uploaded.load(Ordering::Relaxed),
            parts_retried: COUNTERS.parts_retried.load(Ordering::Relaxed),
            requests_resent: COUNTERS.requests_resent.load(Ordering::Relaxed),
            mqtt_connected: COUNTERS.mqtt_connected.load(Ordering::Relaxed),
            upload_window_open: COUNTERS.upload_window_open.load(Ordering::Relaxed),
            jobs_waiting_for_slot: COUNTERS.jobs_waiting_for_slot.load(Ordering::Relaxed),
            max_upload_bytes_per_sec: COUNTERS.max_upload_bytes_per_sec.load(Ordering::Relaxed),
            concurrency: COUNTERS.concurrency.load(Ordering::Relaxed),
            jobs,
            queue_depth,
            clock_offset_secs: crate::clock::offset(),
        }
    }

    /// Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, value) in lines {
                out.push_str(&format!("{name}{labels} {value}\n"));
            }
        };
        metric(
            "uplink_agent_bytes_uploaded_total",
            "counter",
            "Bytes of parts uploaded and committed.",
            vec![(String::new(), self.bytes_uploaded)],
        );
        metric(
            "uplink_agent_parts_uploaded_total",
            "counter",
            "Parts uploaded and committed.",
            vec![(String::new(), self.parts_uploaded)],
        );
        metric(
            "uplink_agent_parts_retried_total",
            "counter",
            "Part uploads retried (transient failure or expired URL).",
            vec![(String::new(), self.parts_retried)],
        );
        metric(
            "uplink_agent_requests_resent_total",
            "counter",
            "MQTT requests re-sent after no answer in time.",
            vec![(String::new(), self.requests_resent)],
        );
        metric(
            "uplink_agent_jobs",
            "gauge",
            "Jobs in the state database, by state.",
            self.jobs
                .iter()
                .map(|(s, n)| (format!("{{state=\"{s}\"}}"), *n))
                .collect(),
        );
        metric(
            "uplink_agent_queue_depth",
            "gauge",
            "Jobs not finished yet.",
            vec![(String::new(), self.queue_depth)],
        );
        metric(
            "uplink_agent_mqtt_connected",
            "gauge",
            "1 when connected to the broker.",
            vec![(String::new(), u64::from(self.mqtt_connected))],
        );
        metric(
            "uplink_agent_upload_window_open",
            "gauge",
            "1 while parts may start (inside an upload window, or no windows configured).",
            vec![(String::new(), u64::from(self.upload_window_open))],
        );
        metric(
            "uplink_agent_jobs_waiting_for_slot",
            "gauge",
            "Jobs with parts waiting for a PUT slot (window closed or concurrency full).",
            vec![(String::new(), self.jobs_waiting_for_slot)],
        );
        metric(
            "uplink_agent_max_upload_bytes_per_sec",
            "gauge",
            "Effective bandwidth cap over all parts; 0 = unlimited.",
            vec![(String::new(), self.max_upload_bytes_per_sec)],
        );
        metric(
            "uplink_agent_concurrency",
            "gauge",
            "Effective number of parts in flight over all jobs.",
            vec![(String::new(), self.concurrency)],
        );
        // Signed, and only once measured (no sample rather than a made-up 0).
        if let Some(offset) = self.clock_offset_secs {
            out.push_str(&format!(
                "# HELP uplink_agent_clock_offset_seconds This device's clock minus the control API's, as last measured from its signed answers.\n# TYPE uplink_agent_clock_offset_seconds gauge\nuplink_agent_clock_offset_seconds {offset}\n"
            ));
        }
        out
    }
}

/// The HTTP answer for one request head: `/metrics` gets `body`, anything else 404/405.
pub fn respond(request_head: &str, body: &str) -> String {
    let mut words = request_head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", body),
        ("GET", _) => ("404 Not Found", "text/plain", "not found; try /metrics\n"),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n"),
    };
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Binds the metrics listener (at start-up, so a bad `metrics_listen` stops the agent).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics` on `listener` until `shutdown`; one request per connection.
pub async fn serve(listener: TcpListener, store: Store, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "Serving metrics at /metrics");
    }
    loop {
        let (mut sock, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "Metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let store = store.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            let read = async {
                while len < buf.len() {
                    let n = sock.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            if tokio::time::timeout(std::time::Duration::from_secs(5), read)
                .await
                .is_err()
            {
                debug!(%peer, "Metrics request too slow; dropped");
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]).into_owned();
            let counts = store
                .call(|c| store::job_counts(c))
                .await
                .unwrap_or_default();
            let answer = respond(&head, &Snapshot::take(&counts).render());
            if let Err(e) = sock.write_all(answer.as_bytes()).await {
                debug!(%peer, error = %e, "Metrics answer not sent");
            }
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let s = Snapshot {
            bytes_uploaded: 10_485_760,
            parts_uploaded: 2,
            parts_retried: 1,
            requests_resent: 3,
            mqtt_connected: true,
            jobs: vec![("uploading", 1), ("done", 4)],
            queue_depth: 1,
            upload_window_open: false,
            jobs_waiting_for_slot: 2,
            max_upload_bytes_per_sec: 65536,
            concurrency: 3,
            clock_offset_secs: Some(-240),
        };
        let text = s.render();
        for line in [
            "uplink_agent_upload_window_open 0",
            "uplink_agent_jobs_waiting_for_slot 2",
            "uplink_agent_max_upload_bytes_per_sec 65536",
            "uplink_agent_concurrency 3",
            "# TYPE uplink_agent_bytes_uploaded_total counter",
            "uplink_agent_bytes_uploaded_total 10485760",
            "uplink_agent_parts_uploaded_total 2",
            "uplink_agent_parts_retried_total 1",
            "uplink_agent_requests_resent_total 3",
            "# TYPE uplink_agent_jobs gauge",
            "uplink_agent_jobs{state=\"uploading\"} 1",
            "uplink_agent_jobs{state=\"done\"} 4",
            "uplink_agent_queue_depth 1",
            "uplink_agent_mqtt_connected 1",
            "# TYPE uplink_agent_clock_offset_seconds gauge",
            "uplink_agent_clock_offset_seconds -240",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with('\n'));
        let unknown = Snapshot {
            clock_offset_secs: None,
            ..s
        }
        .render();
        assert!(!unknown.contains("clock_offset"), "{unknown}");
    }

    #[test]
    fn snapshot_lists_every_state_and_counts_the_queue() {
        let s = Snapshot::take(&[
            ("uploading".into(), 2),
            ("queued".into(), 1),
            ("done".into(), 7),
        ]);
        assert_eq!(s.jobs.len(), JOB_STATES.len());
        assert!(s.jobs.contains(&("paused", 0)));
        assert!(s.jobs.contains(&("done", 7)));
        assert_eq!(s.queue_depth, 3);
    }

    #[test]
    fn answers_metrics_and_404() {
        let ok = respond("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "a 1\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(ok.contains("content-length: 4\r\n"));
        assert!(ok.ends_with("\r\n\r\na 1\n"));
        assert!(respond("GET / HTTP/1.1\r\n\r\n", "").starts_with("HTTP/1.1 404"));
        assert!(respond("POST /metrics HTTP/1.1\r\n\r\n", "").starts_with("HTTP/1.1 405"));
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(store::open(dir.path()).unwrap());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, store, stop.clone()));
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        sock.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(
            answer.contains("uplink_agent_jobs{state=\"queued\"} 0"),
            "{answer}"
        );
        stop.cancel();
        task.await.unwrap();
    }
}
