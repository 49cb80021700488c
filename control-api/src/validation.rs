//! The validation worker: reads back each completed object of a dataset that has a
//! validator ([`crate::validate`]) and records the verdict on its session: `accepted`, or
//! `rejected` with the reason. Until then the session's `validation` is `pending`, and the
//! dataset cannot be sealed.
//!
//! Safe on every API instance at once. A worker claims one pending object at a time in
//! PostgreSQL (`FOR UPDATE SKIP LOCKED`, then a lease in `validation_after` that it renews
//! while it reads, and a claim token in `validation_claim`): two workers never read the
//! same object at once, only the claim's holder writes the verdict, and the object of a
//! worker that died is claimed again when its lease runs out.
//!
//! A read error (storage unreachable, a connection cut, a body that stalls or ends early)
//! never rejects a file: the object is tried again later, with a backoff that doubles per
//! failed attempt. Only the file's content, or its absence from storage, rejects it.
//! Memory stays bounded: JSONL and CSV are streamed, Parquet is read by range (its footer).
//!
//! A deduplicated session points at another session's object: it is not read again, it
//! takes the original's verdict.

use std::io;
use std::time::Duration;

use rand::Rng as _;
use serde_json::json;
use sqlx::FromRow;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::http::error::ApiError;
use crate::readback::{self, read_error, retry_delay, under_lease, Exact, LeaseSql};
use crate::storage::Object;
use crate::store::{audit, Actor};
use crate::validate::{validate_parquet, validate_stream, Validator, Verdict};
use crate::AppState;

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted {
        records: u64,
        bytes: u64,
    },
    Rejected(String),
    /// The object could not be read; it is tried again after `retry_in`.
    Retry {
        error: String,
        retry_in: Duration,
    },
    /// The session names no validator any more (nor does its dataset): `validation` is
    /// cleared.
    NoValidator,
    /// Another worker wrote the verdict first (this worker's claim had run out).
    Lost,
    /// Shutdown came first: the claim is given back.
    Released,
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Deduplicated sessions that took their original's verdict.
    pub copied: usize,
    /// The object validated (or tried), if one was pending.
    pub validated: Option<(Uuid, Outcome)>,
}

impl Pass {
    fn did_something(&self) -> bool {
        self.copied > 0 || self.validated.is_some()
    }
}

/// Runs `concurrency` workers until `shutdown`. Each validates pending objects until none
/// is left, then waits for a completion on this instance ([`AppState::validation_wake`])
/// or `interval_secs`.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let cfg = state.config.validation.clone();
    if cfg.interval_secs == 0 {
        tracing::info!("Validation worker disabled");
        return;
    }
    let workers: Vec<_> = (0..cfg.concurrency)
        .map(|_| tokio::spawn(worker(state.clone(), shutdown.clone())))
        .collect();
    for w in workers {
        if let Err(e) = w.await {
            tracing::error!(task = "validation", error = %e, "Validation worker panicked");
        }
    }
}

async fn worker(st: AppState, shutdown: CancellationToken) {
    let pass = || async { run_once(&st, &shutdown).await.map(|p| p.did_something()) };
    readback::worker(&st, &st.validation_wake, &shutdown, "Validation", pass).await;
}

#[derive(Debug, FromRow)]
struct Claimed {
    session_id: Uuid,
    project_id: String,
    bucket: String,
    object_key: String,
    size: i64,
    validator: Option<String>,
    validation_attempts: i32,
}

/// One pass: copies verdicts to deduplicated sessions, then claims and validates at most
/// one pending object.
pub async fn run_once(st: &AppState, shutdown: &CancellationToken) -> Result<Pass, ApiError> {
    let copied = copy_verdicts(st).await?;
    let cfg = &st.config.validation;
    let claim = Uuid::new_v4();
    let claimed: Option<Claimed> = sqlx::query_as(
        "UPDATE sessions s SET validation_after = now() + make_interval(secs => $1),
                               validation_attempts = validation_attempts + 1, validation_claim = $2
         WHERE session_id = (
             SELECT session_id FROM sessions
             WHERE validation = 'pending' AND deduplicated_from IS NULL
               AND (validation_after IS NULL OR validation_after <= now())
             ORDER BY completed_at LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING session_id, project_id, bucket, object_key, size, validation_attempts,
                   COALESCE(validator, (SELECT d.validator FROM datasets d
                                        WHERE d.project_id = s.project_id AND d.name = s.dataset)) AS validator",
    )
    .bind(cfg.lease_secs as f64)
    .bind(claim)
    .fetch_optional(&st.store.pool)
    .await?;
    let Some(c) = claimed else {
        return Ok(Pass {
            copied,
            validated: None,
        });
    };
    let outcome = match c.validator.as_deref().and_then(Validator::parse) {
        Some(v) => validate_claimed(st, &c, claim, v, shutdown).await?,
        None => {
            record(st, &c, claim, None, &Outcome::NoValidator).await?;
            Outcome::NoValidator
        }
    };
    Ok(Pass {
        copied,
        validated: Some((c.session_id, outcome)),
    })
}

const LEASE: LeaseSql = LeaseSql {
    renew: "UPDATE sessions SET validation_after = now() + make_interval(secs => $3)
            WHERE session_id = $1 AND validation_claim = $2",
    release: "UPDATE sessions SET validation_after = NULL, validation_claim = NULL
              WHERE session_id = $1 AND validation_claim = $2",
};

/// Reads the object (renewing the claim meanwhile) and records the verdict.
async fn validate_claimed(
    st: &AppState,
    c: &Claimed,
    claim: Uuid,
    v: Validator,
    shutdown: &CancellationToken,
) -> Result<Outcome, ApiError> {
    let cfg = &st.config.validation;
    let Some(read) =
        under_lease(st, &LEASE, c.session_id, claim, check(st, c, v), shutdown).await?
    else {
        return Ok(Outcome::Released);
    };
    let outcome = match read {
        Ok(Ok(report)) => Outcome::Accepted {
            records: report.records,
            bytes: report.bytes,
        },
        Ok(Err(rejection)) => Outcome::Rejected(rejection.reason),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Outcome::Rejected("the object is no longer in storage".into())
        }
        Err(e) => Outcome::Retry {
            error: e.to_string(),
            retry_in: retry_delay(
                cfg,
                c.validation_attempts.max(1) as u32,
                rand::thread_rng().gen(),
            ),
        },
    };
    let written = record(st, c, claim, Some(v), &outcome).await?;
    Ok(if written { outcome } else { Outcome::Lost })
}

/// Runs the validator over the stored object. An `Err` is a read error (retry later).
async fn check(st: &AppState, c: &Claimed, v: Validator) -> io::Result<Verdict> {
    let size = c.size.max(0) as u64;
    if v.needs_ranges() {
        let storage = st.storage.clone();
        let (bucket, key) = (c.bucket.clone(), c.object_key.clone());
        validate_parquet(size, move |offset, len| {
            let (storage, bucket, key) = (storage.clone(), bucket.clone(), key.clone());
            async move {
                let obj = Object {
                    bucket: &bucket,
                    key: &key,
                };
                storage
                    .get_range(&obj, offset, len)
                    .await
                    .map_err(read_error)
            }
        })
        .await
    } else {
        let obj = Object {
            bucket: &c.bucket,
            key: &c.object_key,
        };
        let body = st.storage.get_stream(&obj).await.map_err(read_error)?;
        validate_stream(v, Exact::new(body, size)).await
    }
}

/// Writes `outcome` if this worker still holds `claim`; returns whether it did. A verdict
/// is written with its audit event in one transaction, and copied to the deduplicated
/// sessions already pointing at the object.
async fn record(
    st: &AppState,
    c: &Claimed,
    claim: Uuid,
    v: Option<Validator>,
    outcome: &Outcome,
) -> Result<bool, ApiError> {
    let sid = c.session_id;
    let validator = v.map(Validator::as_str);
    if let Outcome::Retry { error, retry_in } = outcome {
        let n = sqlx::query(
            "UPDATE sessions SET validation_after = now() + make_interval(secs => $3), validation_claim = NULL
             WHERE session_id = $1 AND validation_claim = $2 AND validation = 'pending'",
        )
        .bind(sid)
        .bind(claim)
        .bind(retry_in.as_secs_f64())
        .execute(&st.store.pool)
        .await?
        .rows_affected();
        tracing::warn!(session_id = %sid, validator, attempt = c.validation_attempts, retry_in_secs = retry_in.as_secs(),
            %error, "Object could not be read for validation; trying again later");
        return Ok(n == 1);
    }
    let (validation, reason, detail) = match outcome {
        Outcome::Accepted { records, bytes } => (
            Some("accepted"),
            None,
            json!({"verdict": "accepted", "validator": validator, "records": records, "bytes": bytes}),
        ),
        Outcome::Rejected(reason) => (
            Some("rejected"),
            Some(reason.as_str()),
            json!({"verdict": "rejected", "validator": validator, "reason": reason}),
        ),
        _ => (
            None,
            None,
            json!({"verdict": "none", "reason": "neither the session nor its dataset names a validator"}),
        ),
    };
    let mut tx = st.store.pool.begin().await?;
    let n = sqlx::query(
        "UPDATE sessions SET validation = $3, validation_error = $4, validation_after = NULL, validation_claim = NULL
         WHERE session_id = $1 AND validation_claim = $2 AND validation = 'pending'",
    )
    .bind(sid)
    .bind(claim)
    .bind(validation)
    .bind(reason)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Ok(false);
    }
    let actor = Actor::system("validation");
    audit(
        &mut tx,
        &actor,
        "session.validated",
        &sid.to_string(),
        Some(&c.project_id),
        detail,
    )
    .await?;
    let copies: Vec<(Uuid, String)> = sqlx::query_as(
        "UPDATE sessions SET validation = $2, validation_error = $3
         WHERE deduplicated_from = $1 AND validation = 'pending' RETURNING session_id, project_id",
    )
    .bind(sid)
    .bind(validation)
    .bind(reason)
    .fetch_all(&mut *tx)
    .await?;
    for (copy, project) in &copies {
        audit(
            &mut tx,
            &actor,
            "session.validated",
            &copy.to_string(),
            Some(project),
            json!({"verdict": validation.unwrap_or("none"), "reason": reason, "original_session_id": sid}),
        )
        .await?;
    }
    tx.commit().await?;
    match outcome {
        Outcome::Accepted { records, bytes } => {
            tracing::info!(session_id = %sid, validator, records, bytes, "Object accepted")
        }
        Outcome::Rejected(reason) => {
            tracing::warn!(session_id = %sid, validator, %reason, "Object rejected")
        }
        _ => {
            tracing::warn!(session_id = %sid, "Pending object without a validator; validation cleared")
        }
    }
    Ok(true)
}

/// Deduplicated sessions still `pending` whose original has its verdict take it (a
/// session deduplicated while its original was being validated).
async fn copy_verdicts(st: &AppState) -> Result<usize, ApiError> {
    let mut tx = st.store.pool.begin().await?;
    #[derive(FromRow)]
    struct Copied {
        session_id: Uuid,
        project_id: String,
        validation: Option<String>,
        validation_error: Option<String>,
        original: Uuid,
    }
    let copied: Vec<Copied> = sqlx::query_as(
        "UPDATE sessions d SET validation = o.validation, validation_error = o.validation_error
         FROM sessions o
         WHERE d.deduplicated_from = o.session_id AND d.validation = 'pending'
           AND o.validation IS DISTINCT FROM 'pending'
         RETURNING d.session_id, d.project_id, d.validation, d.validation_error, o.session_id AS original",
    )
    .fetch_all(&mut *tx)
    .await?;
    let actor = Actor::system("validation");
    for c in &copied {
        audit(
            &mut tx,
            &actor,
            "session.validated",
            &c.session_id.to_string(),
            Some(&c.project_id),
            json!({"verdict": c.validation.as_deref().unwrap_or("none"), "reason": c.validation_error,
                   "original_session_id": c.original}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(copied.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_short_body_is_a_read_error_not_a_rejection() {
        // A CSV cut inside a quoted field would be rejected if the cut were believed.
        let body = &b"a,b\n1,\"tw"[..];
        let read = validate_stream(Validator::Csv, Exact::new(body, 20)).await;
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
