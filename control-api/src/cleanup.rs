//! The cleanup worker: expires idle sessions (aborting their multipart uploads), aborts
//! orphan multipart uploads that no live session knows (where an upload was being created,
//! see `upload_intents`), and drops old request answers.
//! Safe to run on every API instance at once: each step is idempotent.

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
        match run_once(&state).await {
            Ok(r) if r != Report::default() => tracing::info!(?r, "Cleanup pass"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Cleanup pass failed; retrying next interval"),
        }
    }
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
                tracing::info!(session_id = %s.session_id, device_id = %s.device_id, "Session expired");
            }
            // Someone moved it meanwhile; next pass looks again.
            Err(ApiError::Conflict(..)) => {}
            Err(e) => return Err(e),
        }
    }

    // Keys where an upload was being created: any upload there that no live session knows
    // is an orphan once older than the grace period.
    let intents: Vec<(String, String)> = sqlx::query_as(
        "SELECT bucket, object_key FROM upload_intents WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(cfg.orphan_grace_secs as f64)
    .fetch_all(&st.store.pool)
    .await?;
    for (bucket, key) in intents {
        let live: HashSet<String> = sqlx::query_scalar(
            "SELECT upload_id FROM sessions WHERE bucket = $1 AND object_key = $2 AND upload_id IS NOT NULL
               AND state IN ('created', 'uploading', 'paused', 'completing')",
        )
        .bind(&bucket)
        .bind(&key)
        .fetch_all(&st.store.pool)
        .await?
        .into_iter()
        .collect();
        let obj = Object {
            bucket: &bucket,
            key: &key,
        };
        for (k, upload_id, _) in st.storage.list_uploads(&bucket, &key).await? {
            if k == key && !live.contains(&upload_id) {
                st.storage.abort(&obj, &upload_id).await?;
                report.aborted_orphans += 1;
                tracing::info!(%bucket, %key, "Orphan multipart upload aborted");
            }
        }
        sqlx::query("DELETE FROM upload_intents WHERE bucket = $1 AND object_key = $2")
            .bind(&bucket)
            .bind(&key)
            .execute(&st.store.pool)
            .await?;
    }

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
