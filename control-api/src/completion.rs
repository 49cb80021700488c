//! Completion of a session: the device's manifest checked, every part verified against what
//! was presigned, storage's CompleteMultipartUpload, the object read back (size, ETag, the
//! storage policy's guarantees), then everything recorded in one transaction. Repeatable
//! from any point: a crash or a lost database connection leaves the session `completing`,
//! and the retry finishes it (docs/reliability.md, API-side state changes).

use uplink_protocol::ops::{
    parts_digest, CompleteSession, FileManifest, PartChecksum, SessionInfo, SessionState,
};
use uplink_service::failpoint;

use crate::domain::policy::StoragePolicy;
use crate::domain::session::Event;
use crate::domain::verify::{self, PlannedPart, VerifyError};
use crate::guarantees;
use crate::http::error::ApiError;
use crate::sessions::{info, plan_of};
use crate::storage::ObjectOptions;
use crate::store::{audit, transition_in, Actor, Session};
use crate::AppState;

/// The signed request a manifest came in: enough to verify it again later.
#[derive(utoipa::ToSchema, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SignedRequest {
    pub device_id: String,
    pub op: String,
    pub request_id: String,
    pub ts: i64,
    pub signature: String,
    /// The device's public key when it signed.
    pub public_key: String,
    pub body: String,
}

/// Checks the device's manifest against what the session planned.
async fn check_manifest(st: &AppState, s: &Session, m: &FileManifest) -> Result<(), ApiError> {
    let parts = st.store.planned_parts(s.session_id).await?;
    let digest = parts_digest(parts.iter().map(|p| (p.number as u32, p.digest.as_str())));
    let mut wrong = Vec::new();
    if Some(&m.device_id) != s.device_id.as_ref() || m.session_id != s.session_id {
        wrong.push("device_id/session_id");
    }
    if m.size != s.size as u64 {
        wrong.push("size");
    }
    match (&s.claimed_sha256, &m.sha256) {
        (Some(claimed), Some(sha)) if claimed != sha => wrong.push("sha256"),
        (_, Some(sha)) if !crate::sessions::valid_sha256(sha) => wrong.push("sha256"),
        // Without a SHA-256 from the device, the stored object's becomes the session's:
        // only where the SHA-256 part checksums bind every part to the device's bytes.
        (None, None) if s.part_checksum() != PartChecksum::Sha256 => wrong.push("sha256"),
        _ => {}
    }
    if m.part_count != s.part_count as u32 {
        wrong.push("part_count");
    }
    if m.parts_digest != digest {
        wrong.push("parts_digest");
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(
            "manifest_mismatch",
            format!(
                "the manifest's {} differ from the session's",
                wrong.join(", ")
            ),
        ))
    }
}

/// Completes `session` (loaded, and checked to be the caller's).
pub async fn complete(
    st: &AppState,
    session: Session,
    actor: &Actor,
    req: CompleteSession,
    signed: Option<SignedRequest>,
) -> Result<SessionInfo, ApiError> {
    let session_id = session.session_id;
    if session.claimed_sha256.is_none() && req.manifest.is_none() {
        return Err(ApiError::Unprocessable(
            "manifest_required",
            "the session was created without the file's sha256: session.complete must carry the manifest with it".into(),
        ));
    }
    if let Some(m) = &req.manifest {
        if !session.state().is_terminal() || session.state() == SessionState::Completed {
            check_manifest(st, &session, m).await?;
        }
    }
    match session.state() {
        SessionState::Completed if session.completed_at.is_some() => {
            return Ok(info(&session, vec![]))
        }
        // Recorded as completed without its bookkeeping (by a version that did it in two
        // transactions and died between them): finish it now.
        SessionState::Completed => {
            let (_, etag) = st.storage.head(&session.object()).await?;
            return record_completion(st, &session, &etag, actor, &req, signed.as_ref()).await;
        }
        SessionState::Paused => {
            return Err(ApiError::Conflict(
                "session_paused",
                "the session is paused".into(),
            ))
        }
        s if s.is_terminal() => {
            return Err(ApiError::Conflict(
                "invalid_state",
                format!("the session is {}", s.as_str()),
            ))
        }
        _ => {}
    }
    let session = st
        .store
        .transition(&session, Event::BeginComplete, actor, None)
        .await?;
    let plan = plan_of(&session);
    // No part can be presigned any more: this list is final, for verification and custody.
    let part_rows = st.store.planned_parts(session_id).await?;

    let head = match &session.upload_id {
        Some(upload_id) => {
            let planned: Vec<PlannedPart> = part_rows
                .iter()
                .map(|p| PlannedPart {
                    number: p.number as u32,
                    digest_b64: p.digest.clone(),
                })
                .collect();
            let checksum = session.part_checksum();
            match st.storage.list_parts(&session.object(), upload_id).await {
                Ok(listed) => match verify::verify_parts(&plan, checksum, &planned, &listed) {
                    Ok(parts) => {
                        st.storage
                            .complete(&session.object(), upload_id, &parts)
                            .await?;
                        failpoint::hit(failpoint::API_COMPLETE_AFTER_STORAGE);
                    }
                    Err(
                        e @ (VerifyError::Missing(_)
                        | VerifyError::WrongDigest { .. }
                        | VerifyError::WrongSize { .. }
                        | VerifyError::Unplanned(_)),
                    ) => {
                        st.store
                            .transition(&session, Event::CompleteRefused, actor, None)
                            .await?;
                        return Err(ApiError::Conflict("parts_incomplete", e.to_string()));
                    }
                    Err(e) => {
                        let failed = st
                            .store
                            .transition(&session, Event::Fail, actor, Some(&e.to_string()))
                            .await?;
                        let _ = st.storage.abort(&failed.object(), upload_id).await;
                        return Err(ApiError::Conflict("verification_failed", e.to_string()));
                    }
                },
                // Completed by an earlier attempt that died before recording it: HEAD decides.
                Err(crate::storage::StorageError::NoSuchUpload) => {}
                Err(e) => return Err(e.into()),
            }
            st.storage
                .head_object(&session.object())
                .await
                .map_err(|e| match e {
                    crate::storage::StorageError::NotFound => ApiError::Conflict(
                        "upload_lost",
                        "storage has neither the upload nor the object".into(),
                    ),
                    e => e.into(),
                })?
        }
        None => match st.storage.head_object(&session.object()).await {
            Ok(head) => head,
            Err(crate::storage::StorageError::NotFound) => {
                st.store
                    .transition(&session, Event::CompleteRefused, actor, None)
                    .await?;
                return Err(ApiError::Conflict(
                    "parts_incomplete",
                    "the object is not in storage yet".into(),
                ));
            }
            Err(e) => return Err(e.into()),
        },
    };
    if head.size != plan.size {
        let reason = format!(
            "stored object is {} bytes, expected {}",
            head.size, plan.size
        );
        st.store
            .transition(&session, Event::Fail, actor, Some(&reason))
            .await?;
        return Err(ApiError::Conflict("verification_failed", reason));
    }
    if let Some(policy) = session
        .policy
        .as_ref()
        .and_then(|p| serde_json::from_value::<StoragePolicy>(p.clone()).ok())
    {
        let unmet = guarantees::unmet(
            &ObjectOptions::of(&policy),
            &head,
            session.created_at.timestamp(),
        );
        if !unmet.is_empty() {
            let reason = format!(
                "storage did not apply the storage policy: {}",
                unmet.join("; ")
            );
            st.store
                .transition(&session, Event::Fail, actor, Some(&reason))
                .await?;
            crate::metrics::Counters::add(&st.counters.policy_violations, 1);
            tracing::error!(%session_id, %reason, "Storage ignored the storage policy; session failed");
            return Err(ApiError::Conflict("policy_not_honoured", reason));
        }
    }

    failpoint::hit(failpoint::API_COMPLETE_AFTER_HEAD);
    record_completion(st, &session, &head.etag, actor, &req, signed.as_ref()).await
}

/// Records a verified completion: the state, the digest, ETag, size and time, the pending
/// digest check and validation, and the signed manifest, in one transaction. It either all
/// commits or none of it does, so a crash or a lost database connection at any point leaves
/// the session `completing` (or, from older versions, `completed` without a time), and the
/// device's retry of `session.complete` finishes it: storage's completion is repeatable
/// (`NoSuchUpload` then HEAD), this is not done twice.
async fn record_completion(
    st: &AppState,
    session: &Session,
    etag: &str,
    actor: &Actor,
    req: &CompleteSession,
    signed: Option<&SignedRequest>,
) -> Result<SessionInfo, ApiError> {
    let session_id = session.session_id;
    let validator = st
        .store
        .dataset(&session.project_id, &session.dataset)
        .await?
        .and_then(|d| d.validator);
    let part_digests: Vec<String> = match (&req.manifest, signed) {
        (Some(_), Some(_)) => st
            .store
            .planned_parts(session_id)
            .await?
            .into_iter()
            .map(|p| p.digest)
            .collect(),
        _ => Vec::new(),
    };
    let mut tx = st.store.pool.begin().await?;
    if session.state() != SessionState::Completed {
        transition_in(&mut tx, session, Event::Completed, actor, None).await?;
    }
    let done: Session = sqlx::query_as(
        "UPDATE sessions SET claimed_sha256 = COALESCE(claimed_sha256, $5), sha256 = COALESCE(claimed_sha256, $5), etag = $2, bytes_done = size, rate_bps = 0, completed_at = now(),
                             validation = $3, validator = $4, digest_check = 'pending'
         WHERE session_id = $1 RETURNING *",
    )
    .bind(session_id)
    .bind(verify::bare_etag(etag))
    .bind(validator.as_ref().map(|_| "pending"))
    .bind(&validator)
    .bind(req.manifest.as_ref().and_then(|m| m.sha256.as_ref()))
    .fetch_one(&mut *tx)
    .await?;
    if let (Some(manifest), Some(signed)) = (&req.manifest, signed) {
        audit(
            &mut tx,
            actor,
            "session.manifest",
            &session_id.to_string(),
            Some(&done.project_id),
            serde_json::json!({"manifest": manifest, "part_checksum": done.part_checksum, "part_digests": part_digests, "object_key": done.object_key,
                               "bucket": done.bucket, "etag": done.etag, "signed_request": signed}),
        )
        .await?;
    }
    failpoint::hit(failpoint::API_COMPLETE_BEFORE_COMMIT);
    tx.commit().await?;
    if done.validation.is_some() {
        st.validation_wake.notify_one();
    }
    st.digest_wake.notify_one();
    crate::metrics::Counters::add(&st.counters.sessions_completed, 1);
    crate::metrics::Counters::add(&st.counters.bytes_completed, done.size.max(0) as u64);
    tracing::info!(%session_id, device_id = ?done.device_id, owner = ?done.owner, size = done.size, "Session completed");
    Ok(info(&done, vec![]))
}
