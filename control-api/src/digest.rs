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

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
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
    /// The stored bytes hash to this digest: the claimed one, or (a session whose device
    /// named none) the one storage's bytes bear, every part matching its signed SHA-256.
    Verified(String),
    /// The stored bytes hash to this, not to the claimed digest (or a part is not the bytes
    /// its URL was signed for).
    Mismatch(String),
    /// The object is no longer in storage: nothing to check, never a dedupe source.
    Gone,
    /// The object could not be read; tried again after `retry_in`.
    Retry { error: String, retry_in: Duration },
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
    part_size: i64,
    part_checksum: String,
    /// `None`: a `sha256`-parts session whose device hashed no whole file.
    claimed_sha256: Option<String>,
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
         RETURNING session_id, project_id, bucket, object_key, size, part_size, part_checksum, claimed_sha256, digest_attempts",
    )
    .bind(st.config.validation.lease_secs as f64)
    .bind(claim)
    .fetch_optional(&st.store.pool)
    .await?;
    let Some(c) = claimed else {
        return Ok(None);
    };
    // Without a claim, each part is checked against the SHA-256 its URL was signed with.
    let part_digests = match (&c.claimed_sha256, c.part_checksum.as_str()) {
        (None, "sha256") => Some(st.store.planned_parts(c.session_id).await?),
        _ => None,
    };
    let Some(read) = under_lease(
        st,
        &LEASE,
        c.session_id,
        claim,
        hash(st, &c, part_digests.is_some()),
        shutdown,
    )
    .await?
    else {
        return Ok(Some((c.session_id, Outcome::Released)));
    };
    let outcome = match read {
        Ok((digest, parts)) => {
            let parts_match = part_digests.is_none_or(|planned| {
                planned.len() == parts.len()
                    && planned.iter().zip(&parts).all(|(p, d)| p.digest == *d)
            });
            match &c.claimed_sha256 {
                _ if !parts_match => Outcome::Mismatch(digest),
                Some(claimed) if *claimed != digest => Outcome::Mismatch(digest),
                _ => Outcome::Verified(digest),
            }
        }
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

/// The SHA-256 of the stored object, as lower-case hex, and with `by_part` each part's
/// (base64, in order). An `Err` is a read error.
async fn hash(st: &AppState, c: &Claimed, by_part: bool) -> io::Result<(String, Vec<String>)> {
    let obj = Object {
        bucket: &c.bucket,
        key: &c.object_key,
    };
    let body = st.storage.get_stream(&obj).await.map_err(read_error)?;
    let mut body = Exact::new(body, c.size.max(0) as u64);
    let mut whole = Sha256::new();
    let mut parts = Parts::new(by_part, c.part_size.max(1) as u64);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = body.read(&mut buf).await?;
        if n == 0 {
            return Ok((hex::encode(whole.finalize()), parts.finish()));
        }
        whole.update(&buf[..n]);
        parts.update(&buf[..n]);
    }
}

/// Each part's SHA-256 over a stream of the object (nothing when off).
struct Parts {
    on: bool,
    part_size: u64,
    left: u64,
    current: Sha256,
    done: Vec<String>,
}

impl Parts {
    fn new(on: bool, part_size: u64) -> Self {
        Parts {
            on,
            part_size,
            left: part_size,
            current: Sha256::new(),
            done: Vec::new(),
        }
    }

    fn update(&mut self, mut bytes: &[u8]) {
        while self.on && !bytes.is_empty() {
            let take = bytes.len().min(self.left as usize);
            self.current.update(&bytes[..take]);
            bytes = &bytes[take..];
            self.left -= take as u64;
            if self.left == 0 {
                self.done.push(B64.encode(self.current.finalize_reset()));
                self.left = self.part_size;
            }
        }
    }

    /// The digests; a last, short part (or a 0-byte object's only part) included.
    fn finish(mut self) -> Vec<String> {
        if self.on && (self.left != self.part_size || self.done.is_empty()) {
            self.done.push(B64.encode(self.current.finalize()));
        }
        self.done
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
        Outcome::Verified(d) => (Some("verified"), Some(d.as_str()), None),
        Outcome::Mismatch(d) => (Some("mismatch"), Some(d.as_str()), None),
        Outcome::Gone => (None, None, None),
        Outcome::Retry { retry_in, .. } => (Some("pending"), None, Some(retry_in.as_secs_f64())),
        Outcome::Lost | Outcome::Released => return Ok(false),
    };
    let mut tx = st.store.pool.begin().await?;
    // A session whose device named no digest takes the stored object's once verified.
    let n = sqlx::query(
        "UPDATE sessions SET digest_check = $3, stored_sha256 = $4, digest_claim = NULL,
                             sha256 = CASE WHEN $3 = 'verified' THEN COALESCE(sha256, $4) ELSE sha256 END,
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
        Outcome::Verified(_) => {
            tracing::debug!(session_id = %sid, "Stored object's SHA-256 verified")
        }
        Outcome::Mismatch(digest) => {
            tracing::warn!(session_id = %sid, claimed = ?c.claimed_sha256, stored = %digest,
            "Stored object's bytes are not the ones its device hashed; it is never a dedupe source")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sha_b64(bytes: &[u8]) -> String {
        B64.encode(Sha256::digest(bytes))
    }

    #[test]
    fn part_digests_follow_the_part_boundaries_whatever_the_chunks() {
        let data: Vec<u8> = (0..25u32).map(|i| i as u8).collect();
        for chunk in [1, 3, 10, 25] {
            let mut p = Parts::new(true, 10);
            data.chunks(chunk).for_each(|c| p.update(c));
            assert_eq!(
                p.finish(),
                vec![
                    sha_b64(&data[..10]),
                    sha_b64(&data[10..20]),
                    sha_b64(&data[20..])
                ],
                "chunks of {chunk}"
            );
        }
        // An exact multiple has no empty last part; an empty object has one.
        let mut p = Parts::new(true, 10);
        p.update(&data[..20]);
        assert_eq!(p.finish().len(), 2);
        assert_eq!(Parts::new(true, 10).finish(), vec![sha_b64(b"")]);
        let mut off = Parts::new(false, 10);
        off.update(&data);
        assert!(off.finish().is_empty());
    }
}
