//! The outbox: the audit log, sequenced, fed to `GET /v1/events` long-polls and to webhooks.
//!
//! - **Relay.** Every committed audit row gets the next `seq`, gap-free, from one relay at
//!   a time (an advisory lock), in one transaction that reads the highest `seq` so far. A
//!   row is numbered only after its transaction commits, so a row committed late gets a
//!   later number, never one below what a reader has passed: reading `seq > N` in order
//!   misses nothing. Inserts wake the relay through `NOTIFY uplink_audit`; a relay that
//!   numbered rows tells every instance through `NOTIFY uplink_events`, and each instance's
//!   [`Hub`] wakes its long-polls and its deliverer.
//! - **Webhooks.** Each webhook has a cursor (the last `seq` delivered). The deliverer
//!   leases a due webhook, POSTs its next events one at a time in `seq` order, signed with
//!   HMAC-SHA256, and moves the cursor after each 2xx. A failure stops the webhook until
//!   `next_attempt_at` (1 s, 2 s, 4 s … up to `webhook_max_backoff_secs`); it never skips an
//!   event. The lease covers one POST (`webhook_timeout_secs`) plus [`LEASE_MARGIN`] and is
//!   renewed with each cursor move, so a webhook whose instance died is taken over that
//!   soon. Delivery is at least once: a receiver de-duplicates by `seq` (an instance that
//!   dies between a receiver's 2xx and the cursor move has that event delivered again).

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::AppState;

/// Advisory lock that makes one relay at a time assign sequence numbers.
const RELAY_LOCK: i64 = 0x7570_6c69_6e6b_0001;
/// Rows sequenced per relay pass.
const RELAY_BATCH: i64 = 1000;
/// Events one webhook lease delivers at most before other webhooks get their turn.
const DELIVERY_BATCH: i64 = 50;
/// A webhook lease lasts one POST's timeout plus this (renewed after each event).
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);
/// How long one delivery pass may take before it lets go of its lease.
const PASS_LIMIT: Duration = Duration::from_secs(30);

/// One event, as `GET /v1/events` lists it and a webhook receives it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Event {
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub request_id: Option<String>,
    pub project_id: Option<String>,
    pub detail: serde_json::Value,
}

/// The newest sequence number this instance knows of, and whether it is shutting down.
#[derive(Clone)]
pub struct Hub {
    latest: watch::Sender<i64>,
    closing: CancellationToken,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            latest: watch::Sender::new(0),
            closing: CancellationToken::new(),
        }
    }
}

impl Hub {
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.latest.subscribe()
    }

    fn advance(&self, seq: i64) {
        self.latest.send_if_modified(|latest| {
            let newer = seq > *latest;
            if newer {
                *latest = seq;
            }
            newer
        });
    }

    /// Ends every long-poll at once (shutdown).
    pub fn close(&self) {
        self.closing.cancel();
    }

    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }
}

/// Events after `after` visible in `project` (`None`: every project), oldest first.
pub async fn after(
    pool: &PgPool,
    after: i64,
    project: Option<&str>,
    actions: Option<&[String]>,
    limit: i64,
) -> Result<Vec<Event>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, at, actor, action, subject, request_id, project_id, detail FROM audit_events
         WHERE seq > $1 AND ($2::text IS NULL OR project_id = $2)
           AND ($3::text[] IS NULL OR action = ANY($3))
         ORDER BY seq LIMIT $4",
    )
    .bind(after)
    .bind(project)
    .bind(actions)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The highest sequence number assigned so far.
pub async fn latest(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM audit_events")
        .fetch_one(pool)
        .await
}

/// Numbers the committed rows that have no `seq` yet. Returns the highest `seq` assigned
/// (if any) and whether a full batch was numbered (there may be more).
pub async fn relay_once(pool: &PgPool) -> Result<(Option<i64>, bool), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(RELAY_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        // Another instance is numbering; it will notify.
        return Ok((None, false));
    }
    // A new statement, so its snapshot sees what the previous lock holder committed.
    let (assigned, count): (Option<i64>, i64) = sqlx::query_as(
        "WITH ready AS (
             SELECT id, row_number() OVER (ORDER BY id) AS n FROM audit_events
              WHERE seq IS NULL ORDER BY id LIMIT $1),
         base AS (SELECT COALESCE(max(seq), 0) AS m FROM audit_events),
         done AS (
             UPDATE audit_events a SET seq = base.m + ready.n FROM ready, base
              WHERE a.id = ready.id RETURNING a.seq)
         SELECT max(seq), count(*) FROM done",
    )
    .bind(RELAY_BATCH)
    .fetch_one(&mut *tx)
    .await?;
    if let Some(seq) = assigned {
        sqlx::query("SELECT pg_notify('uplink_events', $1)")
            .bind(seq.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok((assigned, count == RELAY_BATCH))
}

/// Runs the relay and the webhook deliverer until `shutdown`.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let relay = tokio::spawn(relay(state.clone(), shutdown.clone()));
    let deliver = tokio::spawn(deliver(state, shutdown));
    for (task, handle) in [("events relay", relay), ("webhooks", deliver)] {
        match handle.await {
            Ok(()) => tracing::info!(task, "Task stopped"),
            Err(e) => tracing::error!(task, error = %e, "Task panicked"),
        }
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = crate::store::listener(pool).await?;
    listener
        .listen_all(["uplink_audit", "uplink_events"])
        .await?;
    Ok(listener)
}

/// Numbers new audit rows as they commit and keeps the [`Hub`] current. Without a
/// notification it still looks once a second.
async fn relay(st: AppState, shutdown: CancellationToken) {
    let pool = &st.store.pool;
    let mut listener = None;
    let mut pause = Duration::ZERO;
    loop {
        if listener.is_none() {
            listener = listen(pool)
                .await
                .map_err(|e| tracing::warn!(error = %e, "Cannot LISTEN for events; polling"))
                .ok();
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
            n = async { listener.as_mut().expect("listener").recv().await }, if listener.is_some() => {
                if let Err(e) = n {
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                    listener = None;
                }
                // Many inserts, one pass.
                while let Some(Some(_)) = listener.as_mut().map(|l| l.next_buffered()) {}
            }
        }
        pause = Duration::from_secs(1);
        match relay_once(pool).await {
            Ok((_, true)) => pause = Duration::ZERO,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Event relay pass failed; retrying"),
        }
        match latest(pool).await {
            Ok(seq) => st.events.advance(seq),
            Err(e) => tracing::warn!(error = %e, "Cannot read the latest event"),
        }
    }
}

/// One webhook's row, as the deliverer leases it.
#[derive(Debug, sqlx::FromRow)]
struct Lease {
    webhook_id: Uuid,
    project_id: Option<String>,
    url: String,
    secret: String,
    actions: Option<Vec<String>>,
    cursor: i64,
}

/// Delivers to every due webhook whenever events arrive, and at least once a second (for
/// retries that come due).
async fn deliver(st: AppState, shutdown: CancellationToken) {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(st.config.events.webhook_timeout_secs))
        .redirect(reqwest::redirect::Policy::none());
    if !st.config.events.webhook_allow_private {
        // Every name is resolved to public addresses only, and connected to directly (a
        // proxy would connect wherever the name points).
        builder = builder
            .dns_resolver(std::sync::Arc::new(crate::egress::PublicResolver))
            .no_proxy();
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Cannot build the webhook HTTP client; webhooks are off");
            return;
        }
    };
    let owner = Uuid::new_v4();
    let mut latest = st.events.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = latest.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if let Err(e) = deliver_once(&st, &client, owner, &shutdown).await {
            tracing::warn!(error = %e, "Webhook pass failed; retrying");
        }
    }
}

/// Leases each due webhook with events waiting and delivers to them, four at a time.
pub async fn deliver_once(
    st: &AppState,
    client: &reqwest::Client,
    owner: Uuid,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    use futures::StreamExt as _;
    let pool = &st.store.pool;
    let due: Vec<Uuid> = sqlx::query_scalar(
        "SELECT w.webhook_id FROM webhooks w
          WHERE w.next_attempt_at <= now() AND (w.lease_until IS NULL OR w.lease_until < now())
            AND EXISTS (SELECT 1 FROM audit_events e WHERE e.seq > w.cursor
                          AND (w.project_id IS NULL OR e.project_id = w.project_id)
                          AND (w.actions IS NULL OR e.action = ANY(w.actions)))",
    )
    .fetch_all(pool)
    .await?;
    futures::stream::iter(due)
        .for_each_concurrent(4, |id| async move {
            if let Err(e) = deliver_webhook(st, client, owner, id, shutdown).await {
                tracing::warn!(webhook = %id, error = %e, "Webhook delivery pass failed");
            }
        })
        .await;
    Ok(())
}

async fn deliver_webhook(
    st: &AppState,
    client: &reqwest::Client,
    owner: Uuid,
    id: Uuid,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let pool = &st.store.pool;
    let lease_secs =
        (Duration::from_secs(st.config.events.webhook_timeout_secs) + LEASE_MARGIN).as_secs_f64();
    let lease: Option<Lease> = sqlx::query_as(
        "UPDATE webhooks SET lease_owner = $2, lease_until = now() + make_interval(secs => $3)
          WHERE webhook_id = $1 AND next_attempt_at <= now()
            AND (lease_until IS NULL OR lease_until < now())
          RETURNING webhook_id, project_id, url, secret, actions, cursor",
    )
    .bind(id)
    .bind(owner)
    .bind(lease_secs)
    .fetch_optional(pool)
    .await?;
    let Some(w) = lease else {
        return Ok(()); // another instance has it, or it is not due any more
    };
    let started = tokio::time::Instant::now();
    let events = after(
        pool,
        w.cursor,
        w.project_id.as_deref(),
        w.actions.as_deref(),
        DELIVERY_BATCH,
    )
    .await?;
    for event in events {
        if shutdown.is_cancelled() || started.elapsed() > PASS_LIMIT {
            break;
        }
        match post(client, &w, &event, st.config.events.webhook_allow_private).await {
            Ok(()) => {
                let still_ours = sqlx::query(
                    "UPDATE webhooks SET cursor = $2, failures = 0, last_error = NULL,
                            last_delivered_at = now(),
                            lease_until = now() + make_interval(secs => $4)
                      WHERE webhook_id = $1 AND lease_owner = $3",
                )
                .bind(w.webhook_id)
                .bind(event.seq)
                .bind(owner)
                .bind(lease_secs)
                .execute(pool)
                .await?
                .rows_affected();
                st.counters.webhook_delivered();
                if still_ours == 0 {
                    return Ok(()); // deleted, or the lease ran out
                }
            }
            Err(reason) => {
                st.counters.webhook_failed();
                tracing::warn!(webhook = %w.webhook_id, seq = event.seq, %reason, "Webhook delivery failed; will retry");
                sqlx::query(
                    "UPDATE webhooks SET failures = failures + 1, last_error = $2,
                            next_attempt_at = now() + make_interval(secs => LEAST(power(2, failures), $4)),
                            lease_owner = NULL, lease_until = NULL
                      WHERE webhook_id = $1 AND lease_owner = $3",
                )
                .bind(w.webhook_id)
                .bind(&reason)
                .bind(owner)
                .bind(st.config.events.webhook_max_backoff_secs as f64)
                .execute(pool)
                .await?;
                return Ok(());
            }
        }
    }
    sqlx::query(
        "UPDATE webhooks SET lease_owner = NULL, lease_until = NULL
          WHERE webhook_id = $1 AND lease_owner = $2",
    )
    .bind(w.webhook_id)
    .bind(owner)
    .execute(pool)
    .await?;
    Ok(())
}

/// `X-Uplink-Signature: t={unix seconds},v1={hex HMAC-SHA256(secret, "{t}.{body}")}`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// POSTs one event; any answer but a 2xx is a failure, described for `last_error`, and so
/// is a URL whose address is not public (unless `allow_private`).
async fn post(
    client: &reqwest::Client,
    w: &Lease,
    event: &Event,
    allow_private: bool,
) -> Result<(), String> {
    let url = reqwest::Url::parse(&w.url).map_err(|e| format!("invalid url: {e}"))?;
    crate::egress::check_url(&url, allow_private)?;
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let sig = signature(&w.secret, uplink_protocol::unix_now(), &body);
    let answer = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-uplink-webhook-id", w.webhook_id.to_string())
        .header("x-uplink-event-seq", event.seq.to_string())
        .header("x-uplink-signature", sig)
        .body(body)
        .send()
        .await
        .map_err(|e| uplink_service::error_chain(&e.without_url()))?;
    let status = answer.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_and_body() {
        // Computed independently:
        // printf '1700000000.{"seq":1}' | openssl dgst -sha256 -hmac whsec_test
        let sig = signature("whsec_test", 1_700_000_000, br#"{"seq":1}"#);
        assert_eq!(
            sig,
            "t=1700000000,v1=926c3c48823e4dc937cdb0992313bcbbc472579d779ab54f0d4e09e4049838aa"
        );
    }
}
