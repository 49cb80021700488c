//! The cleanup worker: expires idle sessions (aborting their multipart uploads), aborts
//! orphan multipart uploads that no live session knows (every upload under `s3.key_prefix`
//! in `s3.bucket`; in the buckets storage policies name, the keys where an upload was being
//! created, see `upload_intents`), and drops old request answers.
//! Safe to run on every API instance at once: one pass runs at a time across instances (an
//! advisory lock, [`run_exclusive`]), and each step is idempotent besides.

use std::collections::HashSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::session::Event;
use crate::http::error::ApiError;
use crate::storage::Object;
use crate::store::{Actor, Session};
use crate::AppState;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub expired_sessions: usize,
    pub aborted_orphans: usize,
    pub dropped_requests: u64,
}

/// Advisory lock held by the instance whose cleanup pass runs.
pub const CLEANUP_LOCK: i64 = 0x7570_6c69_6e6b_0002;

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let every = state.config.cleanup.interval_secs;
    if every == 0 {
        tracing::info!("Cleanup worker disabled");
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(every));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        match run_exclusive(&state).await {
            Ok(Some(r)) if r != Report::default() => tracing::info!(?r, "Cleanup pass"),
            Ok(Some(_)) => {}
            Ok(None) => tracing::debug!("Another instance is cleaning up; pass skipped"),
            Err(e) => tracing::warn!(error = %e, "Cleanup pass failed; retrying next interval"),
        }
    }
}

/// [`run_once`], unless another API instance's pass is running (`None`). The lock is a
/// transaction's: it goes with the transaction, or with the connection of an instance that
/// died.
pub async fn run_exclusive(st: &AppState) -> Result<Option<Report>, ApiError> {
    let mut tx = st.store.pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(CLEANUP_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(None);
    }
    let report = run_once(st).await;
    tx.rollback().await?;
    report.map(Some)
}

pub async fn run_once(st: &AppState) -> Result<Report, ApiError> {
    let cfg = &st.config.cleanup;
    let actor = Actor::system("cleanup");
    let mut report = Report::default();

    let idle: Vec<Session> = sqlx::query_as(
        "SELECT * FROM sessions WHERE state IN ('created', 'uploading', 'paused', 'completing')
           AND updated_at < now() - make_interval(secs => $1) LIMIT 1000",
    )
    .bind(cfg.session_idle_secs as f64)
    .fetch_all(&st.store.pool)
    .await?;
    for s in idle {
        if let Some(upload_id) = &s.upload_id {
            st.storage.abort(&s.object(), upload_id).await?;
        }
        match st
            .store
            .transition(&s, Event::Expire, &actor, Some("expired: idle too long"))
            .await
        {
            Ok(_) => {
                report.expired_sessions += 1;
                tracing::info!(session_id = %s.session_id, device_id = ?s.device_id, "Session expired");
            }
            // Someone moved it meanwhile; next pass looks again.
            Err(ApiError::Conflict(..)) => {}
            Err(e) => return Err(e),
        }
    }

    report.aborted_orphans = abort_orphans(st, cfg.orphan_grace_secs).await?;

    for table in ["device_requests", "operator_requests"] {
        report.dropped_requests += sqlx::query(&format!(
            "DELETE FROM {table} WHERE created_at < now() - make_interval(secs => $1)"
        ))
        .bind(cfg.request_retention_secs as f64)
        .execute(&st.store.pool)
        .await?
        .rows_affected();
    }
    Ok(report)
}

/// Non-terminal states: a session in one of these may still use its multipart upload.
const LIVE: &str = "('created', 'uploading', 'paused', 'completing')";

/// Aborts the multipart uploads no live session knows that are older than `grace_secs`
/// (by storage's `Initiated`): every one under `s3.key_prefix` in `s3.bucket`, whoever
/// started it, and in other buckets (storage policies) those at keys with an upload intent
/// older than the grace period. Returns how many were aborted.
///
/// An upload being created right now is never touched. Session creation commits an intent
/// for the key, then creates the upload, then commits the session (with the upload id),
/// then deletes the intent. Storage is listed *before* the database is read, and intents
/// are read before sessions: an upload in the listing already had its intent, which is
/// still there when intents are read unless its session was committed before, and then
/// the session query sees it. A key whose intent is younger than the grace period is
/// skipped; an older intent protects nothing more (its create has long finished or died,
/// and an upload created since is itself younger than the grace period).
async fn abort_orphans(st: &AppState, grace_secs: u64) -> Result<usize, ApiError> {
    let now = uplink_protocol::unix_now();
    let grace = i64::try_from(grace_secs).unwrap_or(i64::MAX);
    // Intents that have outlived the grace period: their create finished or died.
    let stale: Vec<(String, String)> = sqlx::query_as(
        "SELECT bucket, object_key FROM upload_intents WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(grace_secs as f64)
    .fetch_all(&st.store.pool)
    .await?;

    // (bucket, prefix, only this exact key): the deployment's prefix in its bucket, and
    // the keys of stale intents elsewhere (storage policies put objects in any bucket,
    // where only what this deployment was creating is its business).
    let prefix = &st.config.s3.key_prefix;
    let mut places: Vec<(&str, &str, bool)> = vec![(&st.storage.bucket, prefix, false)];
    for (bucket, key) in &stale {
        if *bucket != st.storage.bucket || !key.starts_with(prefix.as_str()) {
            places.push((bucket, key, true));
        }
    }

    let mut aborted = 0;
    for (bucket, under, exact) in places {
        // (key, upload id) old enough, listed before anything is read from the database.
        // An upload whose start storage does not tell is never old.
        let old: Vec<(String, String)> = st
            .storage
            .list_uploads(bucket, under)
            .await?
            .into_iter()
            .filter(|(key, _, initiated)| {
                (!exact || key == under)
                    && initiated.is_some_and(|t| now.saturating_sub(t) >= grace)
            })
            .map(|(key, id, _)| (key, id))
            .collect();
        if old.is_empty() {
            continue;
        }
        let keys: Vec<&str> = old.iter().map(|(k, _)| k.as_str()).collect();
        let creating: HashSet<String> = sqlx::query_scalar(
            "SELECT object_key FROM upload_intents WHERE bucket = $1 AND object_key = ANY($2)
               AND created_at >= now() - make_interval(secs => $3)",
        )
        .bind(bucket)
        .bind(&keys)
        .bind(grace_secs as f64)
        .fetch_all(&st.store.pool)
        .await?
        .into_iter()
        .collect();
        let live: HashSet<String> = sqlx::query_scalar(&format!(
            "SELECT upload_id FROM sessions WHERE bucket = $1 AND object_key = ANY($2)
               AND upload_id IS NOT NULL AND state IN {LIVE}"
        ))
        .bind(bucket)
        .bind(&keys)
        .fetch_all(&st.store.pool)
        .await?
        .into_iter()
        .collect();
        for (key, upload_id) in old {
            if creating.contains(&key) || live.contains(&upload_id) {
                continue;
            }
            let obj = Object { bucket, key: &key };
            st.storage.abort(&obj, &upload_id).await?;
            aborted += 1;
            tracing::info!(%bucket, %key, "Orphan multipart upload aborted");
        }
    }

    // Every stale intent's key was swept above (under the prefix, or on its own).
    for (bucket, key) in &stale {
        sqlx::query(
            "DELETE FROM upload_intents WHERE bucket = $1 AND object_key = $2
               AND created_at < now() - make_interval(secs => $3)",
        )
        .bind(bucket)
        .bind(key)
        .bind(grace_secs as f64)
        .execute(&st.store.pool)
        .await?;
    }
    Ok(aborted)
}
