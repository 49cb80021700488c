//! Prometheus metrics (`GET /metrics`, text format 0.0.4). Counters live in the process;
//! gauges are read from PostgreSQL and the pool when scraped, so every API instance reports
//! the same totals for shared state.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::http::error::ApiError;
use crate::AppState;

#[derive(Debug, Default)]
pub struct Counters {
    pub device_requests_ok: AtomicU64,
    pub device_requests_refused: AtomicU64,
    pub device_requests_failed: AtomicU64,
    pub parts_presigned: AtomicU64,
    pub sessions_completed: AtomicU64,
    pub bytes_completed: AtomicU64,
    pub commands_issued: AtomicU64,
    pub webhooks_delivered: AtomicU64,
    pub webhooks_failed: AtomicU64,
    /// Sessions failed because storage did not apply their storage policy.
    pub policy_violations: AtomicU64,
    /// Time from issue to the `accepted` ack, and to the final ack (microseconds).
    pub ack_accepted: Summary,
    pub ack_final: Summary,
}

/// A Prometheus summary without quantiles: a sum and a count.
#[derive(Debug, Default)]
pub struct Summary {
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Summary {
    pub fn observe(&self, seconds: f64) {
        // `as` saturates: negative (clock step) counts as 0, huge as u64::MAX.
        let micros = (seconds * 1e6) as u64;
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records how long a command took to reach an ack (`final_ack`: done, failed, rejected).
    pub fn command_acked(&self, final_ack: bool, seconds: f64) {
        if final_ack {
            self.ack_final.observe(seconds);
        } else {
            self.ack_accepted.observe(seconds);
        }
    }

    pub fn webhook_delivered(&self) {
        Self::add(&self.webhooks_delivered, 1);
    }

    pub fn webhook_failed(&self) {
        Self::add(&self.webhooks_failed, 1);
    }

    /// Counts a device request by its HTTP status.
    pub fn device_request(&self, status: u16) {
        let c = match status {
            0..=399 => &self.device_requests_ok,
            400..=499 => &self.device_requests_refused,
            _ => &self.device_requests_failed,
        };
        Self::add(c, 1);
    }
}

fn line(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "public",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"),
        (status = 503, response = crate::http::openapi::Unavailable),
    )
)]
pub async fn render(State(st): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let c = &st.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    line(
        &mut out,
        "uplink_device_requests_total",
        "counter",
        "Device requests by outcome (ok < 400, refused 4xx, failed 5xx).",
        &[
            ("{outcome=\"ok\"}".into(), get(&c.device_requests_ok)),
            (
                "{outcome=\"refused\"}".into(),
                get(&c.device_requests_refused),
            ),
            (
                "{outcome=\"failed\"}".into(),
                get(&c.device_requests_failed),
            ),
        ],
    );
    line(
        &mut out,
        "uplink_parts_presigned_total",
        "counter",
        "Part URLs presigned.",
        &[(String::new(), get(&c.parts_presigned))],
    );
    line(
        &mut out,
        "uplink_sessions_completed_total",
        "counter",
        "Sessions completed and verified by this instance.",
        &[(String::new(), get(&c.sessions_completed))],
    );
    line(
        &mut out,
        "uplink_bytes_completed_total",
        "counter",
        "Bytes in sessions completed by this instance.",
        &[(String::new(), get(&c.bytes_completed))],
    );
    line(
        &mut out,
        "uplink_commands_issued_total",
        "counter",
        "Commands signed and stored by this instance.",
        &[(String::new(), get(&c.commands_issued))],
    );
    line(
        &mut out,
        "uplink_webhook_deliveries_total",
        "counter",
        "Webhook POSTs by this instance, by outcome (failed: not a 2xx, retried later).",
        &[
            ("{outcome=\"ok\"}".into(), get(&c.webhooks_delivered)),
            ("{outcome=\"failed\"}".into(), get(&c.webhooks_failed)),
        ],
    );

    line(
        &mut out,
        "uplink_policy_violations_total",
        "counter",
        "Sessions this instance failed because storage did not apply their storage policy (encryption, lock, retention, legal hold).",
        &[(String::new(), get(&c.policy_violations))],
    );

    let name = "uplink_command_ack_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from a command's issue to its accepted and its final ack.\n# TYPE {name} summary"
    );
    for (ack, summary) in [("accepted", &c.ack_accepted), ("final", &c.ack_final)] {
        let sum = get(&summary.sum_micros) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{ack=\"{ack}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{ack=\"{ack}\"}} {}", get(&summary.count));
    }

    let sessions: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM sessions GROUP BY state ORDER BY state")
            .fetch_all(&st.store.pool)
            .await?;
    line(
        &mut out,
        "uplink_sessions",
        "gauge",
        "Sessions by state.",
        &sessions
            .into_iter()
            .map(|(s, n)| (format!("{{state=\"{s}\"}}"), n.max(0) as u64))
            .collect::<Vec<_>>(),
    );
    let commands: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM commands GROUP BY state ORDER BY state")
            .fetch_all(&st.store.pool)
            .await?;
    line(
        &mut out,
        "uplink_commands",
        "gauge",
        "Commands by state.",
        &commands
            .into_iter()
            .map(|(s, n)| (format!("{{state=\"{s}\"}}"), n.max(0) as u64))
            .collect::<Vec<_>>(),
    );
    let validation: Vec<(String, i64)> = sqlx::query_as(
        "SELECT validation, count(*) FROM sessions WHERE validation IS NOT NULL AND deduplicated_from IS NULL
         GROUP BY validation ORDER BY validation",
    )
    .fetch_all(&st.store.pool)
    .await?;
    line(
        &mut out,
        "uplink_objects_validation",
        "gauge",
        "Stored objects of datasets with a validator, by validation (pending, accepted, rejected).",
        &validation
            .into_iter()
            .map(|(s, n)| (format!("{{validation=\"{s}\"}}"), n.max(0) as u64))
            .collect::<Vec<_>>(),
    );
    let digests: Vec<(String, i64)> = sqlx::query_as(
        "SELECT digest_check, count(*) FROM sessions WHERE digest_check IS NOT NULL
         GROUP BY digest_check ORDER BY digest_check",
    )
    .fetch_all(&st.store.pool)
    .await?;
    line(
        &mut out,
        "uplink_objects_digest",
        "gauge",
        "Completed objects by the check of their SHA-256 against the stored bytes (pending, verified, mismatch).",
        &digests
            .into_iter()
            .map(|(s, n)| (format!("{{check=\"{s}\"}}"), n.max(0) as u64))
            .collect::<Vec<_>>(),
    );
    let (online, total): (i64, i64) =
        sqlx::query_as("SELECT count(*) FILTER (WHERE online), count(*) FROM devices")
            .fetch_one(&st.store.pool)
            .await?;
    line(
        &mut out,
        "uplink_devices",
        "gauge",
        "Registered devices, and how many are online.",
        &[
            ("{presence=\"online\"}".into(), online.max(0) as u64),
            ("{presence=\"all\"}".into(), total.max(0) as u64),
        ],
    );
    let unsequenced: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE seq IS NULL")
            .fetch_one(&st.store.pool)
            .await?;
    line(
        &mut out,
        "uplink_events_unsequenced",
        "gauge",
        "Audit events committed but not yet given a seq (waiting on an older transaction).",
        &[(String::new(), unsequenced.max(0) as u64)],
    );
    line(
        &mut out,
        "uplink_db_pool_connections",
        "gauge",
        "PostgreSQL pool connections.",
        &[
            ("{state=\"open\"}".into(), u64::from(st.store.pool.size())),
            ("{state=\"idle\"}".into(), st.store.pool.num_idle() as u64),
        ],
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
