//! Presigning a session's parts (`parts.presign`, `POST /v1/sessions/{id}/parts`): each
//! part's digest (MD5 or SHA-256, the session's `part_checksum`) is recorded once, and every
//! URL signs that digest in, so a leaked URL can write only the exact bytes of its part.

use std::time::Duration;

use uplink_protocol::ops::{
    PartChecksum, PresignParts, PresignedPart, PresignedParts, SessionState, MAX_PRESIGN_BATCH,
};

use crate::domain::session::Event;
use crate::domain::verify;
use crate::http::error::ApiError;
use crate::sessions::{effective_policy, plan_of};
use crate::storage::ObjectOptions;
use crate::store::{Actor, Session};
use crate::AppState;

fn part_digest_mismatch(number: u32) -> ApiError {
    ApiError::Conflict(
        "part_digest_mismatch",
        format!("part {number} was planned with a different digest"),
    )
}

fn invalid_digest(number: u32, checksum: PartChecksum) -> ApiError {
    let (code, field, bytes) = match checksum {
        PartChecksum::Md5 => ("invalid_md5", "md5", 16),
        PartChecksum::Sha256 => ("invalid_sha256", "sha256", 32),
    };
    ApiError::Unprocessable(
        code,
        format!("part {number}: the session's parts carry `{field}`, base64 of {bytes} bytes, and nothing else"),
    )
}

/// Presigns parts of `session` (loaded, and checked to be the caller's).
pub async fn presign(
    st: &AppState,
    mut session: Session,
    actor: &Actor,
    req: PresignParts,
) -> Result<PresignedParts, ApiError> {
    match session.state() {
        SessionState::Created | SessionState::Uploading => {}
        SessionState::Paused => {
            return Err(ApiError::Conflict(
                "session_paused",
                "the session is paused".into(),
            ))
        }
        s => {
            return Err(ApiError::Conflict(
                "invalid_state",
                format!("the session is {}", s.as_str()),
            ))
        }
    }
    if req.parts.is_empty() || req.parts.len() > MAX_PRESIGN_BATCH {
        return Err(ApiError::Unprocessable(
            "invalid_batch",
            format!("ask for 1 to {MAX_PRESIGN_BATCH} parts at a time"),
        ));
    }
    let plan = plan_of(&session);
    for p in &req.parts {
        if plan.part(p.number).is_none() {
            return Err(ApiError::Unprocessable(
                "invalid_part_number",
                format!("part {} is outside 1..={}", p.number, plan.part_count),
            ));
        }
    }
    let checksum = session.part_checksum();
    // Record each part's digest once, in one statement; a different digest for a part
    // already planned (or asked twice in this batch) is refused.
    let mut planned: std::collections::BTreeMap<u32, &str> = std::collections::BTreeMap::new();
    for p in &req.parts {
        let digest = p
            .digest(checksum)
            .filter(|d| verify::digest_len(d) == Some(checksum.digest_len()))
            .ok_or_else(|| invalid_digest(p.number, checksum))?;
        if *planned.entry(p.number).or_insert(digest) != digest {
            return Err(part_digest_mismatch(p.number));
        }
    }
    let numbers: Vec<i32> = planned.keys().map(|n| *n as i32).collect();
    let digests: Vec<&str> = planned.values().copied().collect();
    let sizes: Vec<i64> = planned
        .keys()
        .map(|n| plan.part(*n).map_or(0, |(_, len)| len as i64))
        .collect();
    let mut tx = st.store.pool.begin().await?;
    let stored: Vec<(i32, String)> = sqlx::query_as(
        "INSERT INTO session_parts (session_id, number, digest, size)
         SELECT $1, n, d, s FROM UNNEST($2::int4[], $3::text[], $4::int8[]) AS t (n, d, s)
         ON CONFLICT (session_id, number) DO UPDATE SET number = EXCLUDED.number
         RETURNING number, digest",
    )
    .bind(session.session_id)
    .bind(&numbers)
    .bind(&digests)
    .bind(&sizes)
    .fetch_all(&mut *tx)
    .await?;
    if let Some((n, _)) = stored
        .iter()
        .find(|(n, digest)| planned.get(&(*n as u32)) != Some(&digest.as_str()))
    {
        // Dropping the transaction records none of the batch.
        return Err(part_digest_mismatch(*n as u32));
    }
    tx.commit().await?;
    if session.state() == SessionState::Created {
        session = match st
            .store
            .transition(&session, Event::StartUpload, actor, None)
            .await
        {
            Ok(s) => s,
            // Presigns of several parts at once: another one started the upload first.
            Err(e @ ApiError::Conflict("concurrent_update", _)) => {
                match st.store.session(session.session_id).await? {
                    Some(s) if s.state() == SessionState::Uploading => s,
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
    }

    let policy = effective_policy(st, &session.project_id, &session.dataset).await?;
    let ttl = Duration::from_secs(
        policy
            .presign_ttl_secs
            .unwrap_or(st.config.s3.presign_ttl_secs),
    );
    let expires_at = uplink_protocol::unix_now() + ttl.as_secs() as i64;
    let mut parts = Vec::with_capacity(req.parts.len());
    for p in &req.parts {
        let digest = (checksum, planned[&p.number]);
        let presigned = match &session.upload_id {
            Some(upload_id) => {
                st.storage
                    .presign_part(&session.object(), upload_id, p.number, digest, ttl)
                    .await?
            }
            None => {
                st.storage
                    .presign_put(&session.object(), digest, ttl, &ObjectOptions::of(&policy))
                    .await?
            }
        };
        parts.push(PresignedPart {
            number: p.number,
            method: "PUT".into(),
            url: presigned.url,
            headers: presigned.headers,
            expires_at,
            expires_in_secs: Some(ttl.as_secs()),
        });
    }
    crate::metrics::Counters::add(&st.counters.parts_presigned, parts.len() as u64);
    Ok(PresignedParts {
        session_id: session.session_id,
        parts,
    })
}
