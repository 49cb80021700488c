//! The digest worker: reads back each completed object and computes its SHA-256, so that
//! the digest a device claimed is trusted only once the stored bytes bear it out.
//!
//! A device's per-part MD5s prove that storage holds the bytes the device sent, not that
//! those bytes are the file whose SHA-256 it named at `session.create`. A hostile device
//! could upload file X while claiming the digest of file Y; if that claim made the object a
//! dedupe source, every later upload of Y would be "completed" by pointing at X. So only a
//! session whose `digest_check` is `verified` (the API hashed the stored object and found
//! the claimed digest) is ever a dedupe source ([`crate::sessions`]); until then a matching
//! upload proceeds normally. A `mismatch` is recorded with the digest storage really holds,
//! an audit event `session.digest_mismatch` (on the event feed and webhooks), a warning
//! and the `uplink_objects_digest{check="mismatch"}` gauge.
//!
//! Claims, leases and read retries work as for validation ([`crate::readback`], the
//! `[validation]` settings): safe on every API instance at once, a dead worker's object is
//! claimed again, a read error is retried with a backoff and never counts as a mismatch.

use std::io;
use std::time::Duration;

use rand::Rng as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use sqlx::FromRow;
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::http::error::ApiError;
use crate::readback::{self, read_error, retry_delay, under_lease, Exact, LeaseSql};
use crate::storage::Object;
use crate::store::{audit, Actor};
use crate::AppState;

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Verified,
    /// The stored bytes hash to this, not to the claimed digest.
    Mismatch(String),
    /// The object is no longer in storage: nothing to check, never a dedupe source.
    Gone,
    /// The object could not be read; tried again after `retry_in`.
    Retry {
        error: String,
        retry_in: Duration,
    },
    /// Another worker wrote the result first (this worker's claim had run out).
    Lost,
    /// Shutdown came first: the claim is given back.
    Released,
}

/// Runs one worker until `shutdown`: checks pending objects until none is left, then waits
/// for a completion on this instance ([`AppState::digest_wake`]) or `validation.interval_secs`.
pub async fn run(st: AppState, shutdown: CancellationToken) {
    if st.config.validation.interval_secs == 0 {
        tracing::info!("Digest worker disabled (validation.interval_secs = 0): no object becomes a dedupe source");
        return;
    }
    let pass = || async { run_once(&st, &shutdown).await.map(|o| o.is_some()) };
    readback::worker(&st, &st.digest_wake, &shutdown, "Digest", pass).await;
}

#[derive(Debug, FromRow)]
struct Claimed {
    session_id: Uuid,
    project_id: String,
    bucket: String,
    object_key: String,
    size: i64,
    claimed_sha256: String,
    digest_attempts: i32,
}

const LEASE: LeaseSql = LeaseSql {
    renew: "UPDATE sessions SET digest_after = now() + make_interval(secs => $3)
            WHERE session_id = $1 AND digest_claim = $2",
    release: "UPDATE sessions SET digest_after = NULL, digest_claim = NULL
              WHERE session_id = $1 AND digest_claim = $2",
};

/// Claims and checks at most one pending object; `None` when none is due.
pub async fn run_once(
    st: &AppState,
    shutdown: &CancellationToken,
) -> Result<Option<(Uuid, Outcome)>, ApiError> {
    let claim = Uuid::new_v4();
    let claimed: Option<Claimed> = sqlx::query_as(
        "UPDATE sessions SET digest_after = now() + make_interval(secs => $1),
                             digest_attempts = digest_attempts + 1, digest_claim = $2
         WHERE session_id = (
             SELECT session_id FROM sessions
             WHERE digest_check = 'pending' AND (digest_after IS NULL OR digest_after <= now())
             ORDER BY completed_at LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING session_id, project_id, bucket, object_key, size, claimed_sha256, digest_attempts",
    )
    .bind(st.config.validation.lease_secs as f64)
    .bind(claim)
    .fetch_optional(&st.store.pool)
    .await?;
    let Some(c) = claimed else {
        return Ok(None);
    };
    let Some(read) = under_lease(st, &LEASE, c.session_id, claim, hash(st, &c), shutdown).await?
    else {
        return Ok(Some((c.session_id, Outcome::Released)));
    };
    let outcome = match read {
        Ok(digest) if digest == c.claimed_sha256 => Outcome::Verified,
        Ok(digest) => Outcome::Mismatch(digest),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Outcome::Gone,
        Err(e) => Outcome::Retry {
            error: e.to_string(),
            retry_in: retry_delay(
                &st.config.validation,
                c.digest_attempts.max(1) as u32,
                rand::thread_rng().gen(),
            ),
        },
    };
    let written = record(st, &c, claim, &outcome).await?;
    Ok(Some((
        c.session_id,
        if written { outcome } else { Outcome::Lost },
    )))
}

/// The SHA-256 of the stored object, as lower-case hex. An `Err` is a read error.
async fn hash(st: &AppState, c: &Claimed) -> io::Result<String> {
    let obj = Object {
        bucket: &c.bucket,
        key: &c.object_key,
    };
    let body = st.storage.get_stream(&obj).await.map_err(read_error)?;
    let mut body = Exact::new(body, c.size.max(0) as u64);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = body.read(&mut buf).await?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Writes `outcome` if this worker still holds `claim`; returns whether it did.
async fn record(
    st: &AppState,
    c: &Claimed,
    claim: Uuid,
    outcome: &Outcome,
) -> Result<bool, ApiError> {
    let sid = c.session_id;
    let (check, stored, after) = match outcome {
        Outcome::Verified => (Some("verified"), Some(c.claimed_sha256.as_str()), None),
        Outcome::Mismatch(d) => (Some("mismatch"), Some(d.as_str()), None),
        Outcome::Gone => (None, None, None),
        Outcome::Retry { retry_in, .. } => (Some("pending"), None, Some(retry_in.as_secs_f64())),
        Outcome::Lost | Outcome::Released => return Ok(false),
    };
    let mut tx = st.store.pool.begin().await?;
    let n = sqlx::query(
        "UPDATE sessions SET digest_check = $3, stored_sha256 = $4, digest_claim = NULL,
                             digest_after = CASE WHEN $5::float8 IS NULL THEN NULL
                                                 ELSE now() + make_interval(secs => $5) END
         WHERE session_id = $1 AND digest_claim = $2 AND digest_check = 'pending'",
    )
    .bind(sid)
    .bind(claim)
    .bind(check)
    .bind(stored)
    .bind(after)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Ok(false);
    }
    if let Outcome::Mismatch(digest) = outcome {
        audit(
            &mut tx,
            &Actor::system("digest"),
            "session.digest_mismatch",
            &sid.to_string(),
            Some(&c.project_id),
            json!({"claimed_sha256": c.claimed_sha256, "stored_sha256": digest,
                   "bucket": c.bucket, "object_key": c.object_key}),
        )
        .await?;
    }
    tx.commit().await?;
    match outcome {
        Outcome::Verified => tracing::debug!(session_id = %sid, "Stored object's SHA-256 verified"),
        Outcome::Mismatch(digest) => {
            tracing::warn!(session_id = %sid, claimed = %c.claimed_sha256, stored = %digest,
            "Stored object's SHA-256 is not the one its device claimed; it is never a dedupe source")
        }
        Outcome::Gone => {
            tracing::info!(session_id = %sid, "Object no longer in storage; digest not checked")
        }
        Outcome::Retry { error, retry_in } => {
            tracing::warn!(session_id = %sid, attempt = c.digest_attempts,
            retry_in_secs = retry_in.as_secs(), %error, "Object could not be read for its digest; trying again later")
        }
        Outcome::Lost | Outcome::Released => {}
    }
    Ok(true)
}
