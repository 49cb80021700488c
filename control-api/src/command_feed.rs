//! Commands pushed to the bridges: claims under a lease, and the wake-up that ends a
//! bridge's long-poll as soon as a command is due.
//!
//! - **Claim.** A bridge takes due commands with [`claim`]: one statement picks them
//!   (`FOR UPDATE SKIP LOCKED`, so concurrent claims never wait for nor get the same rows)
//!   and leases them to the bridge (`claimed_by`, `lease_until`). A leased command is
//!   offered to nobody else until the bridge reports it published (which clears the lease
//!   and starts the `command_resend_secs` clock) or the lease runs out (the bridge died
//!   between claim and publish): exactly one bridge publishes each command, and none is
//!   lost with a bridge. An `accepted` command is offered again every
//!   `command_recheck_secs` until its final ack comes (or it expires): the device answers
//!   a repeat with its latest ack, so a final ack lost with a bridge or an API is repaired.
//! - **Wake-up.** A trigger `NOTIFY`s `uplink_commands` when a command becomes due at once
//!   (stored, or its device came online). Each API instance LISTENs ([`run`]) and bumps its
//!   [`Feed`], which ends the long-polls waiting on it. Commands due by time (a re-send, a
//!   lease run out) are found by the next long-poll the bridge starts (its sweep). Without
//!   a LISTEN connection the feed ticks every [`DEGRADED_TICK`] instead, so long-polls
//!   degrade to polling, never to waiting out their whole wait.

use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::AppState;

/// The channel the `commands_due_notify` trigger (migration 0011) notifies.
pub const CHANNEL: &str = "uplink_commands";
/// How often long-polls re-claim while this instance has no LISTEN connection.
pub const DEGRADED_TICK: Duration = Duration::from_millis(500);
/// Wait before a lost LISTEN connection is made again.
const RELISTEN_AFTER: Duration = Duration::from_secs(1);

/// A command a bridge is to publish.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DueCommand {
    pub command_id: Uuid,
    pub device_id: String,
    /// The signed command envelope to publish on the device's command topic.
    #[schema(value_type = Object)]
    pub envelope: serde_json::Value,
}

/// How many times a command may have become due on this instance (a counter that only
/// grows), and whether the instance is shutting down.
#[derive(Clone)]
pub struct Feed {
    due: watch::Sender<u64>,
    closing: CancellationToken,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            due: watch::Sender::new(0),
            closing: CancellationToken::new(),
        }
    }
}

impl Feed {
    /// A receiver that sees every [`Feed::wake`] after this call.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.due.subscribe()
    }

    /// Ends the long-polls waiting now: a command may be due.
    pub fn wake(&self) {
        self.due.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Ends every long-poll at once (shutdown).
    pub fn close(&self) {
        self.closing.cancel();
    }

    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }
}

/// Leases to `bridge` for `lease` at most `limit` commands that are due, oldest first:
/// unexpired, for an online and enabled device, not leased to anyone (or their lease ran
/// out), and either unacknowledged and never published or published at least `resend`
/// ago, or `accepted` without a final ack for `recheck` (re-published so that the device
/// answers with its latest ack, which repairs a final ack lost on the way).
pub async fn claim(
    pool: &PgPool,
    bridge: &str,
    limit: i64,
    lease: Duration,
    resend: Duration,
    recheck: Duration,
) -> Result<Vec<DueCommand>, sqlx::Error> {
    // Two scans, each on its own partial index (commands_open, commands_accepted).
    let mut rows: Vec<(DueCommand, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "WITH open AS (
             SELECT c.command_id, c.created_at FROM commands c JOIN devices d USING (device_id)
              WHERE c.state IN ('pending', 'published') AND c.expires_at > now()
                AND d.online AND d.enabled
                AND (c.published_at IS NULL OR c.published_at < now() - make_interval(secs => $3))
                AND (c.lease_until IS NULL OR c.lease_until < now())
              ORDER BY c.created_at LIMIT $4
              FOR UPDATE OF c SKIP LOCKED),
         rechecked AS (
             SELECT c.command_id, c.created_at FROM commands c JOIN devices d USING (device_id)
              WHERE c.state = 'accepted' AND c.expires_at > now()
                AND d.online AND d.enabled
                AND c.updated_at < now() - make_interval(secs => $5)
                AND (c.lease_until IS NULL OR c.lease_until < now())
              ORDER BY c.updated_at LIMIT $4
              FOR UPDATE OF c SKIP LOCKED),
         due AS (
             SELECT command_id FROM (SELECT * FROM open UNION ALL SELECT * FROM rechecked) u
              ORDER BY created_at LIMIT $4)
         UPDATE commands c SET claimed_by = $1, lease_until = now() + make_interval(secs => $2)
           FROM due WHERE c.command_id = due.command_id
         RETURNING c.command_id, c.device_id, c.envelope, c.created_at",
    )
    .bind(bridge)
    .bind(lease.as_secs_f64())
    .bind(resend.as_secs_f64())
    .bind(limit)
    .bind(recheck.as_secs_f64())
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(command_id, device_id, envelope, created_at)| {
        (
            DueCommand {
                command_id,
                device_id,
                envelope,
            },
            created_at,
        )
    })
    .collect();
    rows.sort_by_key(|(_, created_at)| *created_at);
    Ok(rows.into_iter().map(|(c, _)| c).collect())
}

/// Records that the commands were published: the resend clock starts and the lease ends.
/// Returns how many of them exist.
pub async fn published(pool: &PgPool, command_ids: &[Uuid]) -> Result<u64, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE commands SET state = CASE WHEN state = 'pending' THEN 'published' ELSE state END,
                             published_at = now(), publish_count = publish_count + 1,
                             claimed_by = NULL, lease_until = NULL, updated_at = now()
         WHERE command_id = ANY($1)",
    )
    .bind(command_ids)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n)
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = crate::store::listener(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// LISTENs for due commands and wakes this instance's [`Feed`] until `shutdown`.
pub async fn run(st: AppState, shutdown: CancellationToken) {
    let feed = &st.command_feed;
    let pool = &st.store.pool;
    loop {
        let mut listener = match listen(pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot LISTEN for due commands; bridges' long-polls poll meanwhile");
                if degraded(feed, RELISTEN_AFTER, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        // Whatever became due while nobody listened is found by the long-polls now.
        feed.wake();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(_)) => {
                        // Many at once, one wake-up.
                        while listener.next_buffered().is_some() {}
                        feed.wake();
                    }
                    // The connection dropped; the next call makes it again. What was
                    // notified meanwhile is lost: look once more.
                    Ok(None) => feed.wake(),
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection for due commands lost; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

/// Wakes the feed every [`DEGRADED_TICK`] for `how_long`; `true` if shutdown came first.
async fn degraded(feed: &Feed, how_long: Duration, shutdown: &CancellationToken) -> bool {
    let until = tokio::time::Instant::now() + how_long;
    while tokio::time::Instant::now() < until {
        feed.wake();
        tokio::select! {
            () = shutdown.cancelled() => return true,
            () = tokio::time::sleep(DEGRADED_TICK) => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_after_subscribing_is_never_missed() {
        let feed = Feed::default();
        let mut rx = feed.subscribe();
        assert!(!rx.has_changed().unwrap_or(true));
        feed.wake();
        feed.wake();
        // Two wake-ups, one change seen: a long-poll claims once for both.
        assert!(rx.has_changed().unwrap_or(false));
        rx.changed().await.ok();
        assert!(!rx.has_changed().unwrap_or(true));
        feed.close();
        assert!(feed.closing().is_cancelled());
    }
}
