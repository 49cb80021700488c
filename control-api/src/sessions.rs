//! Session operations: the device ops and the operator's pause/resume/abort. Calls the pure
//! domain code, the store and storage.

use uplink_protocol::ops::{
    valid_dataset, CreateSession, PresignParts, PresignedPart, PresignedParts, SessionInfo,
    SessionState, StoredPart, MAX_PRESIGN_BATCH,
};
use uplink_protocol::plan::{self, PartPlan};
use uuid::Uuid;

use crate::domain::session::Event;
use crate::domain::verify::{self, PlannedPart, VerifyError};
use crate::http::error::ApiError;
use crate::store::{audit, Actor, Session};
use crate::AppState;

pub fn plan_of(s: &Session) -> PartPlan {
    PartPlan {
        size: s.size as u64,
        part_size: s.part_size as u64,
        part_count: s.part_count as u32,
    }
}

pub fn info(s: &Session, stored_parts: Vec<StoredPart>) -> SessionInfo {
    SessionInfo {
        session_id: s.session_id,
        state: s.state(),
        bucket: s.bucket.clone(),
        object_key: s.object_key.clone(),
        size: s.size as u64,
        part_size: s.part_size as u64,
        part_count: s.part_count as u32,
        stored_parts,
        sha256: s.sha256.clone(),
        error: s.error.clone(),
    }
}

/// File names become the last segment of the object key.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control())
}

/// Where a session's object lives: `{prefix}devices/{device}/{session}/{file}`, or with a
/// dataset `{prefix}devices/{device}/datasets/{dataset}/{session}/{file}` (a session id is
/// never `datasets`, so the two layouts cannot collide). Inputs are already validated.
pub fn object_key(
    prefix: &str,
    device_id: &str,
    dataset: Option<&str>,
    session_id: Uuid,
    file_name: &str,
) -> String {
    match dataset {
        None => format!("{prefix}devices/{device_id}/{session_id}/{file_name}"),
        Some(d) => format!("{prefix}devices/{device_id}/datasets/{d}/{session_id}/{file_name}"),
    }
}

fn valid_sha256(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub async fn create(
    st: &AppState,
    device_id: &str,
    actor: &Actor,
    req: CreateSession,
) -> Result<(u16, SessionInfo), ApiError> {
    if !valid_file_name(&req.file_name) {
        return Err(ApiError::Unprocessable(
            "invalid_file_name",
            format!("file name {:?} is not allowed", req.file_name),
        ));
    }
    if let Some(dataset) = &req.dataset {
        if !valid_dataset(dataset) {
            return Err(ApiError::Unprocessable(
                "invalid_dataset",
                format!(
                    "dataset {dataset:?} is not allowed (1-64 of A-Z a-z 0-9 . _ -, not starting with a dot)"
                ),
            ));
        }
    }
    if !valid_sha256(&req.sha256) {
        return Err(ApiError::Unprocessable(
            "invalid_sha256",
            "sha256 must be 64 lower-case hex digits".into(),
        ));
    }
    let plan = plan::validate(req.size, req.part_size)
        .map_err(|e| ApiError::Unprocessable("invalid_part_plan", e.to_string()))?;

    // One session per job: a repeated create for the same job answers with that session.
    let existing: Option<Session> =
        sqlx::query_as("SELECT * FROM sessions WHERE device_id = $1 AND job_id = $2")
            .bind(device_id)
            .bind(req.job_id)
            .fetch_optional(&st.store.pool)
            .await?;
    if let Some(s) = existing {
        if s.size as u64 != req.size
            || s.claimed_sha256 != req.sha256
            || s.part_size as u64 != req.part_size
            || s.dataset != req.dataset
        {
            return Err(ApiError::Conflict(
                "job_session_mismatch",
                format!(
                    "job {} already has session {} for a different file",
                    req.job_id, s.session_id
                ),
            ));
        }
        return Ok((200, info(&s, vec![])));
    }

    let session_id = Uuid::new_v4();
    let object_key = object_key(
        &st.config.s3.key_prefix,
        device_id,
        req.dataset.as_deref(),
        session_id,
        &req.file_name,
    );
    let upload_id = if plan.is_empty_object() {
        None
    } else {
        Some(st.storage.create_multipart(&object_key).await?)
    };

    let mut tx = st.store.pool.begin().await?;
    let inserted: Result<Session, sqlx::Error> = sqlx::query_as(
        "INSERT INTO sessions (session_id, device_id, job_id, command_id, file_name, bucket, object_key, size, part_size,
                               part_count, claimed_sha256, upload_id, state, dataset)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'created', $13) RETURNING *",
    )
    .bind(session_id)
    .bind(device_id)
    .bind(req.job_id)
    .bind(req.command_id)
    .bind(&req.file_name)
    .bind(&st.storage.bucket)
    .bind(&object_key)
    .bind(plan.size as i64)
    .bind(plan.part_size as i64)
    .bind(plan.part_count as i32)
    .bind(&req.sha256)
    .bind(&upload_id)
    .bind(&req.dataset)
    .fetch_one(&mut *tx)
    .await;
    let session = match inserted {
        Ok(s) => s,
        Err(e) => {
            // Lost a race with a concurrent create for the same job: don't leave an upload open.
            if let Some(id) = &upload_id {
                let _ = st.storage.abort(&object_key, id).await;
            }
            return Err(e.into());
        }
    };
    audit(
        &mut tx,
        actor,
        "session.create",
        &session_id.to_string(),
        serde_json::json!({"device_id": device_id, "job_id": req.job_id, "file_name": req.file_name, "dataset": req.dataset, "size": req.size, "sha256": req.sha256}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(%session_id, %device_id, size = req.size, parts = plan.part_count, "Session created");
    Ok((201, info(&session, vec![])))
}

pub async fn presign(
    st: &AppState,
    device_id: &str,
    actor: &Actor,
    req: PresignParts,
) -> Result<PresignedParts, ApiError> {
    let mut session = st.store.device_session(device_id, req.session_id).await?;
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
        if verify::md5_hex(&p.md5).is_none() {
            return Err(ApiError::Unprocessable(
                "invalid_md5",
                format!("part {}: md5 must be base64 of 16 bytes", p.number),
            ));
        }
    }
    // Record each part's MD5 once; a different MD5 for a part already planned is refused.
    let mut tx = st.store.pool.begin().await?;
    for p in &req.parts {
        let (_, len) = plan.part(p.number).unwrap_or((0, 0));
        let stored: (String,) = sqlx::query_as(
            "INSERT INTO session_parts (session_id, number, md5, size) VALUES ($1, $2, $3, $4)
             ON CONFLICT (session_id, number) DO UPDATE SET number = EXCLUDED.number RETURNING md5",
        )
        .bind(session.session_id)
        .bind(p.number as i32)
        .bind(&p.md5)
        .bind(len as i64)
        .fetch_one(&mut *tx)
        .await?;
        if stored.0 != p.md5 {
            return Err(ApiError::Conflict(
                "part_digest_mismatch",
                format!("part {} was planned with a different MD5", p.number),
            ));
        }
    }
    tx.commit().await?;
    if session.state() == SessionState::Created {
        session = st
            .store
            .transition(&session, Event::StartUpload, actor, None)
            .await?;
    }

    let expires_at = uplink_protocol::unix_now() + st.storage.presign_ttl().as_secs() as i64;
    let mut parts = Vec::with_capacity(req.parts.len());
    for p in &req.parts {
        let presigned = match &session.upload_id {
            Some(upload_id) => {
                st.storage
                    .presign_part(&session.object_key, upload_id, p.number, &p.md5)
                    .await?
            }
            None => st.storage.presign_put(&session.object_key, &p.md5).await?,
        };
        parts.push(PresignedPart {
            number: p.number,
            method: "PUT".into(),
            url: presigned.url,
            headers: presigned.headers,
            expires_at,
        });
    }
    crate::metrics::Counters::add(&st.counters.parts_presigned, parts.len() as u64);
    Ok(PresignedParts {
        session_id: session.session_id,
        parts,
    })
}

/// Session info with the parts storage holds; also refreshes `bytes_done` from storage.
pub async fn status(
    st: &AppState,
    device_id: &str,
    session_id: Uuid,
) -> Result<SessionInfo, ApiError> {
    let session = st.store.device_session(device_id, session_id).await?;
    let mut stored = Vec::new();
    if let (Some(upload_id), false) = (&session.upload_id, session.state().is_terminal()) {
        match st.storage.list_parts(&session.object_key, upload_id).await {
            Ok(parts) => {
                let bytes: u64 = parts.iter().map(|p| p.size).sum();
                sqlx::query("UPDATE sessions SET bytes_done = $2 WHERE session_id = $1 AND state NOT IN ('completed','aborted','expired','failed')")
                    .bind(session_id)
                    .bind(bytes as i64)
                    .execute(&st.store.pool)
                    .await?;
                stored = parts
                    .into_iter()
                    .map(|p| StoredPart {
                        number: p.number,
                        size: p.size,
                        etag: verify::bare_etag(&p.etag).to_string(),
                    })
                    .collect();
            }
            Err(crate::storage::StorageError::NoSuchUpload)
                if session.state() == SessionState::Completing => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(info(&session, stored))
}

pub async fn complete(
    st: &AppState,
    device_id: &str,
    actor: &Actor,
    session_id: Uuid,
) -> Result<SessionInfo, ApiError> {
    let session = st.store.device_session(device_id, session_id).await?;
    match session.state() {
        SessionState::Completed => return Ok(info(&session, vec![])),
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

    let etag = match &session.upload_id {
        Some(upload_id) => {
            let planned: Vec<PlannedPart> = st
                .store
                .planned_parts(session_id)
                .await?
                .into_iter()
                .map(|p| PlannedPart {
                    number: p.number as u32,
                    md5_b64: p.md5,
                })
                .collect();
            match st.storage.list_parts(&session.object_key, upload_id).await {
                Ok(listed) => match verify::verify_parts(&plan, &planned, &listed) {
                    Ok(parts) => {
                        st.storage
                            .complete(&session.object_key, upload_id, &parts)
                            .await?;
                    }
                    Err(
                        e @ (VerifyError::Missing(_)
                        | VerifyError::WrongEtag { .. }
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
                        let _ = st.storage.abort(&failed.object_key, upload_id).await;
                        return Err(ApiError::Conflict("verification_failed", e.to_string()));
                    }
                },
                // Completed by an earlier attempt that died before recording it: HEAD decides.
                Err(crate::storage::StorageError::NoSuchUpload) => {}
                Err(e) => return Err(e.into()),
            }
            let (size, etag) = st
                .storage
                .head(&session.object_key)
                .await
                .map_err(|e| match e {
                    crate::storage::StorageError::NotFound => ApiError::Conflict(
                        "upload_lost",
                        "storage has neither the upload nor the object".into(),
                    ),
                    e => e.into(),
                })?;
            if size != plan.size {
                let reason = format!("stored object is {size} bytes, expected {}", plan.size);
                st.store
                    .transition(&session, Event::Fail, actor, Some(&reason))
                    .await?;
                return Err(ApiError::Conflict("verification_failed", reason));
            }
            etag
        }
        None => match st.storage.head(&session.object_key).await {
            Ok((0, etag)) => etag,
            Ok((size, _)) => {
                let reason = format!("stored object is {size} bytes, expected 0");
                st.store
                    .transition(&session, Event::Fail, actor, Some(&reason))
                    .await?;
                return Err(ApiError::Conflict("verification_failed", reason));
            }
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

    let done = st
        .store
        .transition(&session, Event::Completed, actor, None)
        .await?;
    let done: Session = sqlx::query_as(
        "UPDATE sessions SET sha256 = claimed_sha256, etag = $2, bytes_done = size, rate_bps = 0, completed_at = now()
         WHERE session_id = $1 RETURNING *",
    )
    .bind(done.session_id)
    .bind(verify::bare_etag(&etag))
    .fetch_one(&st.store.pool)
    .await?;
    crate::metrics::Counters::add(&st.counters.sessions_completed, 1);
    crate::metrics::Counters::add(&st.counters.bytes_completed, done.size.max(0) as u64);
    tracing::info!(%session_id, %device_id, size = done.size, "Session completed");
    Ok(info(&done, vec![]))
}

pub async fn abort(st: &AppState, session: Session, actor: &Actor) -> Result<Session, ApiError> {
    match session.state() {
        SessionState::Aborted => return Ok(session),
        s if s.is_terminal() => {
            return Err(ApiError::Conflict(
                "invalid_state",
                format!("the session is {}", s.as_str()),
            ))
        }
        _ => {}
    }
    if let Some(upload_id) = &session.upload_id {
        st.storage.abort(&session.object_key, upload_id).await?;
    }
    let s = st
        .store
        .transition(&session, Event::Abort, actor, Some("aborted"))
        .await?;
    tracing::info!(session_id = %s.session_id, "Session aborted");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert!(valid_file_name("run-042.mcap"));
        assert!(valid_file_name("with space.bag"));
        for bad in ["", ".", "..", "a/b", "a\\b", "a\nb", &"x".repeat(256)] {
            assert!(!valid_file_name(bad), "{bad:?}");
        }
        assert!(valid_sha256(&"a".repeat(64)));
        assert!(!valid_sha256(&"A".repeat(64)));
    }

    #[test]
    fn object_keys_with_and_without_a_dataset() {
        let sid = Uuid::nil();
        assert_eq!(
            object_key("", "robot-17", None, sid, "a.mcap"),
            format!("devices/robot-17/{sid}/a.mcap")
        );
        assert_eq!(
            object_key("up/", "robot-17", Some("field-tests"), sid, "a.mcap"),
            format!("up/devices/robot-17/datasets/field-tests/{sid}/a.mcap")
        );
    }
}
