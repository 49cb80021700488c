//! Session operations: the device ops and the operator's pause/resume/abort. Calls the pure
//! domain code, the store and storage.

use uplink_protocol::ops::{
    valid_dataset, CreateSession, PartChecksum, SessionInfo, SessionState, StoredPart,
};
use uplink_protocol::plan::{self, PartPlan, MIB};
use uuid::Uuid;

use crate::domain::policy::{self, KeyVars, StoragePolicy};
use crate::domain::session::Event;
use crate::domain::verify;
use crate::guarantees;
use crate::http::error::ApiError;
use crate::storage::{Object, ObjectOptions};
use crate::store::{audit, Actor, Device, Session};
use crate::AppState;

pub use crate::completion::{complete, SignedRequest};
pub use crate::presign::presign;

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
        part_checksum: s.part_checksum(),
        stored_parts,
        sha256: s.sha256.clone(),
        error: s.error.clone(),
        validation: s.validation.clone(),
        validation_error: s.validation_error.clone(),
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

/// The policy in force for a dataset: the dataset's over the project's over the API's
/// configuration.
pub async fn effective_policy(
    st: &AppState,
    project: &str,
    dataset: &str,
) -> Result<StoragePolicy, ApiError> {
    let row: Option<(serde_json::Value, serde_json::Value)> = sqlx::query_as(
        "SELECT d.policy, p.policy FROM datasets d JOIN projects p USING (project_id)
         WHERE d.project_id = $1 AND d.name = $2",
    )
    .bind(project)
    .bind(dataset)
    .fetch_optional(&st.store.pool)
    .await?;
    let (d, p) = row.unwrap_or_default();
    let parse =
        |v: serde_json::Value| serde_json::from_value::<StoragePolicy>(v).unwrap_or_default();
    Ok(parse(d).over(&parse(p)).over(&st.config.default_policy()))
}

pub(crate) fn valid_sha256(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Who a session belongs to: a registered device, or (an upload from a workstation) the API
/// key or operator token that opened it, in a project it may operate.
pub enum Owner<'a> {
    Device(&'a Device),
    Client { project: &'a str, owner: &'a str },
}

impl Owner<'_> {
    fn project(&self) -> &str {
        match self {
            Owner::Device(d) => &d.project_id,
            Owner::Client { project, .. } => project,
        }
    }

    fn device_id(&self) -> Option<&str> {
        match self {
            Owner::Device(d) => Some(&d.device_id),
            Owner::Client { .. } => None,
        }
    }

    fn owner(&self) -> Option<&str> {
        match self {
            Owner::Device(_) => None,
            Owner::Client { owner, .. } => Some(owner),
        }
    }

    /// The key template's `{device}`: the device id, or the owner (`key-<id>`, `operator`).
    fn key_name(&self) -> String {
        match self {
            Owner::Device(d) => d.device_id.clone(),
            Owner::Client { owner, .. } => owner.replace(':', "-"),
        }
    }
}

pub async fn create(
    st: &AppState,
    owner: &Owner<'_>,
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
    if req.sha256.as_deref().is_some_and(|h| !valid_sha256(h)) {
        return Err(ApiError::Unprocessable(
            "invalid_sha256",
            "sha256 must be 64 lower-case hex digits".into(),
        ));
    }
    let plan = plan::validate(req.size, req.part_size)
        .map_err(|e| ApiError::Unprocessable("invalid_part_plan", e.to_string()))?;
    let dataset = req.dataset.as_deref().unwrap_or(DEFAULT_DATASET);
    let device_id = owner.device_id();
    if let Some(command_id) = req.command_id {
        // Another device's command is "not found", as every other op answers for it.
        let owned: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM commands WHERE command_id = $1 AND device_id = $2)",
        )
        .bind(command_id)
        .bind(device_id)
        .fetch_one(&st.store.pool)
        .await?;
        if !owned {
            return Err(ApiError::NotFound(
                "command_not_found",
                format!("no command {command_id} for this device"),
            ));
        }
    }

    // One session per job: a repeated create for the same job answers with that session.
    let existing: Option<Session> = sqlx::query_as(
        "SELECT * FROM sessions WHERE (device_id = $1 OR owner = $2) AND job_id = $3",
    )
    .bind(device_id)
    .bind(owner.owner())
    .bind(req.job_id)
    .fetch_optional(&st.store.pool)
    .await?;
    if let Some(s) = existing {
        if s.size as u64 != req.size
            || matches!((&s.claimed_sha256, &req.sha256), (Some(a), Some(b)) if a != b)
            || s.part_size as u64 != req.part_size
            || s.dataset != dataset
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

    let project = owner.project();
    open_dataset(st, project, dataset, actor).await?;
    let policy = effective_policy(st, project, dataset).await?;
    if let Some(min) = policy.min_part_size_mib {
        if plan.part_count > 1 && plan.part_size < min * MIB {
            return Err(ApiError::Unprocessable(
                "part_size_below_policy",
                format!(
                    "dataset {dataset} needs parts of at least {min} MiB; set the agent's part_size_mib to {min} or more"
                ),
            ));
        }
    }
    let original = match &req.sha256 {
        Some(sha256) => stored_copy(st, project, dataset, &req, sha256).await?,
        None => None,
    };
    if let Some(original) = original {
        return deduplicate(st, owner, dataset, actor, &req, &plan, original).await;
    }
    let session_id = Uuid::new_v4();
    // SHA-256 part digests when the device can send them and storage checks them.
    let checksum = match req.part_checksum {
        Some(PartChecksum::Sha256) => st.config.s3.part_checksum,
        _ => PartChecksum::Md5,
    };

    let bucket = policy
        .bucket
        .clone()
        .unwrap_or_else(|| st.storage.bucket.clone());
    let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let (sid, job, key_name) = (
        session_id.to_string(),
        req.job_id.to_string(),
        owner.key_name(),
    );
    let mut object_key = format!(
        "{}{}",
        st.config.s3.key_prefix,
        policy::render(
            policy
                .key_template
                .as_deref()
                .unwrap_or(policy::DEFAULT_TEMPLATE),
            &KeyVars {
                project,
                dataset,
                device: &key_name,
                date: &date,
                session: &sid,
                job: &job,
                filename: &req.file_name,
            },
        )
    );
    if key_taken(st, &bucket, &object_key).await? {
        object_key = policy::disambiguate(&object_key, &sid);
    }

    if !plan.is_empty_object() {
        // Committed before the upload exists (and outside the transaction below, which must
        // not wait for a second connection while it holds the project row).
        sqlx::query("INSERT INTO upload_intents (bucket, object_key) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(&bucket)
            .bind(&object_key)
            .execute(&st.store.pool)
            .await?;
    }
    // The project row stays locked from the reservation to the commit: concurrent creates
    // in one project take turns, so the quota is never overshot.
    let mut tx = st.store.pool.begin().await?;
    reserve(&mut tx, project, plan.size as i64).await?;
    let upload_id = if plan.is_empty_object() {
        None
    } else {
        let obj = Object {
            bucket: &bucket,
            key: &object_key,
        };
        let opts = ObjectOptions::of(&policy);
        match st.storage.create_multipart(&obj, &opts, checksum).await {
            Ok(id) => Some(id),
            Err(e) => return Err(refused_policy(st, &bucket, &opts).await.unwrap_or(e.into())),
        }
    };
    let inserted: Result<Session, sqlx::Error> = sqlx::query_as(
        "INSERT INTO sessions (session_id, device_id, job_id, command_id, file_name, bucket, object_key, size, part_size,
                               part_count, claimed_sha256, upload_id, state, dataset, project_id, reserved_bytes, policy, owner, part_checksum)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'created', $13, $14, $8, $15, $16, $17) RETURNING *",
    )
    .bind(session_id)
    .bind(device_id)
    .bind(req.job_id)
    .bind(req.command_id)
    .bind(&req.file_name)
    .bind(&bucket)
    .bind(&object_key)
    .bind(plan.size as i64)
    .bind(plan.part_size as i64)
    .bind(plan.part_count as i32)
    .bind(&req.sha256)
    .bind(&upload_id)
    .bind(dataset)
    .bind(project)
    .bind(serde_json::to_value(&policy).unwrap_or_default())
    .bind(owner.owner())
    .bind(checksum.as_str())
    .fetch_one(&mut *tx)
    .await;
    let session = match inserted {
        Ok(s) => s,
        Err(e) => {
            // Lost a race with a concurrent create for the same job: don't leave an upload open.
            if let Some(id) = &upload_id {
                let obj = Object {
                    bucket: &bucket,
                    key: &object_key,
                };
                let _ = st.storage.abort(&obj, id).await;
            }
            return Err(e.into());
        }
    };
    audit(
        &mut tx,
        actor,
        "session.create",
        &session_id.to_string(),
        Some(project),
        serde_json::json!({"device_id": device_id, "owner": owner.owner(), "job_id": req.job_id, "file_name": req.file_name, "dataset": dataset, "size": req.size, "sha256": req.sha256, "bucket": bucket, "object_key": object_key}),
    )
    .await?;
    tx.commit().await?;
    // The session now knows the upload: the intent has served its purpose.
    sqlx::query("DELETE FROM upload_intents WHERE bucket = $1 AND object_key = $2")
        .bind(&bucket)
        .bind(&object_key)
        .execute(&st.store.pool)
        .await?;
    tracing::info!(%session_id, device_id = ?device_id, owner = ?owner.owner(), %project, %dataset, size = req.size, parts = plan.part_count, "Session created");
    Ok((201, info(&session, vec![])))
}

/// After storage refused to create an object with `opts`: the policy's fault (422
/// `policy_not_supported`, naming what storage cannot do), if a probe finds one.
async fn refused_policy(st: &AppState, bucket: &str, opts: &ObjectOptions) -> Option<ApiError> {
    let unsupported = guarantees::probe(&st.storage, bucket, &st.config.s3.key_prefix, opts)
        .await
        .ok()?;
    (!unsupported.is_empty()).then(|| {
        ApiError::Unprocessable(
            "policy_not_supported",
            format!(
                "storage cannot honour the storage policy: {}",
                unsupported.join("; ")
            ),
        )
    })
}

/// The dataset every session without a label lands in.
pub const DEFAULT_DATASET: &str = "default";

/// Makes sure `dataset` exists in `project` (a new label opens a dataset) and is open.
async fn open_dataset(
    st: &AppState,
    project: &str,
    dataset: &str,
    actor: &Actor,
) -> Result<(), ApiError> {
    let mut tx = st.store.pool.begin().await?;
    let created = sqlx::query(
        "INSERT INTO datasets (project_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(project)
    .bind(dataset)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if created {
        audit(
            &mut tx,
            actor,
            "dataset.create",
            &format!("{project}/{dataset}"),
            Some(project),
            serde_json::json!({"by": "first upload"}),
        )
        .await?;
    }
    tx.commit().await?;
    match st.store.dataset(project, dataset).await? {
        Some(d) if d.state == "sealed" => Err(ApiError::Conflict(
            "dataset_sealed",
            format!("dataset {dataset} of project {project} is sealed; it takes no new files"),
        )),
        _ => Ok(()),
    }
}

/// Reserves `bytes` of the project's quota in `tx`, or refuses with 413.
async fn reserve(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    project: &str,
    bytes: i64,
) -> Result<(), ApiError> {
    let ok = sqlx::query(
        "UPDATE projects SET reserved_bytes = reserved_bytes + $2
         WHERE project_id = $1 AND (quota_bytes IS NULL OR used_bytes + reserved_bytes + $2 <= quota_bytes)",
    )
    .bind(project)
    .bind(bytes)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if ok {
        return Ok(());
    }
    let (used, reserved, limit): (i64, i64, Option<i64>) = sqlx::query_as(
        "SELECT used_bytes, reserved_bytes, quota_bytes FROM projects WHERE project_id = $1",
    )
    .bind(project)
    .fetch_one(&mut **tx)
    .await?;
    Err(ApiError::QuotaExceeded {
        project: project.to_string(),
        used,
        reserved,
        limit: limit.unwrap_or(i64::MAX),
        requested: bytes,
    })
}

/// Whether a live or completed object already has this key.
async fn key_taken(st: &AppState, bucket: &str, key: &str) -> Result<bool, ApiError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sessions WHERE bucket = $1 AND object_key = $2
                        AND state NOT IN ('aborted', 'expired', 'failed'))",
    )
    .bind(bucket)
    .bind(key)
    .fetch_one(&st.store.pool)
    .await?)
}

/// A completed, not rejected session of the dataset with the same content whose object is
/// still in storage, unchanged. The content is the digest the API computed from the stored
/// bytes ([`crate::digest`]), never only the one a device claimed: a device that uploaded
/// other bytes under this digest does not make them the answer for the real file.
async fn stored_copy(
    st: &AppState,
    project: &str,
    dataset: &str,
    req: &CreateSession,
    sha256: &str,
) -> Result<Option<Session>, ApiError> {
    let found: Option<Session> = sqlx::query_as(
        "SELECT * FROM sessions WHERE project_id = $1 AND dataset = $2 AND stored_sha256 = $3 AND size = $4
           AND state = 'completed' AND digest_check = 'verified' AND validation IS DISTINCT FROM 'rejected'
         ORDER BY completed_at LIMIT 1",
    )
    .bind(project)
    .bind(dataset)
    .bind(sha256)
    .bind(req.size as i64)
    .fetch_optional(&st.store.pool)
    .await?;
    let Some(original) = found else {
        return Ok(None);
    };
    match st.storage.head(&original.object()).await {
        // The same size and ETag: the object the digest was computed from.
        Ok((size, etag))
            if size == req.size && original.etag.as_deref() == Some(verify::bare_etag(&etag)) =>
        {
            Ok(Some(original))
        }
        Ok(_) | Err(crate::storage::StorageError::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Completes a new session at once, pointing at `original`'s object: nothing is uploaded
/// and no quota is used.
async fn deduplicate(
    st: &AppState,
    owner: &Owner<'_>,
    dataset: &str,
    actor: &Actor,
    req: &CreateSession,
    plan: &PartPlan,
    original: Session,
) -> Result<(u16, SessionInfo), ApiError> {
    let session_id = Uuid::new_v4();
    let mut tx = st.store.pool.begin().await?;
    let session: Session = sqlx::query_as(
        "INSERT INTO sessions (session_id, device_id, job_id, command_id, file_name, bucket, object_key, size, part_size,
                               part_count, claimed_sha256, sha256, etag, state, dataset, project_id, bytes_done,
                               completed_at, deduplicated_from, validation, validation_error, digest_check, stored_sha256, owner)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12, 'completed', $13, $14, $8, now(), $15, $16, $17,
                 'verified', $11, $18)
         RETURNING *",
    )
    .bind(session_id)
    .bind(owner.device_id())
    .bind(req.job_id)
    .bind(req.command_id)
    .bind(&req.file_name)
    .bind(&original.bucket)
    .bind(&original.object_key)
    .bind(plan.size as i64)
    .bind(plan.part_size as i64)
    .bind(plan.part_count as i32)
    .bind(&req.sha256)
    .bind(&original.etag)
    .bind(dataset)
    .bind(owner.project())
    .bind(original.session_id)
    .bind(&original.validation)
    .bind(&original.validation_error)
    .bind(owner.owner())
    .fetch_one(&mut *tx)
    .await?;
    audit(
        &mut tx,
        actor,
        "session.deduplicated",
        &session_id.to_string(),
        Some(owner.project()),
        serde_json::json!({"device_id": owner.device_id(), "owner": owner.owner(), "job_id": req.job_id, "file_name": req.file_name, "dataset": dataset,
                           "size": req.size, "sha256": req.sha256, "original_session_id": original.session_id, "object_key": original.object_key}),
    )
    .await?;
    tx.commit().await?;
    if session.validation.as_deref() == Some("pending") {
        // The original's verdict is copied to this session once there is one.
        st.validation_wake.notify_one();
    }
    crate::metrics::Counters::add(&st.counters.sessions_completed, 1);
    tracing::info!(%session_id, device_id = ?owner.device_id(), owner = ?owner.owner(), original = %original.session_id, "Content already stored: session completed without upload");
    Ok((201, info(&session, vec![])))
}

/// Session info with the parts storage holds; also refreshes `bytes_done` from storage.
pub async fn status(st: &AppState, session: Session) -> Result<SessionInfo, ApiError> {
    let session_id = session.session_id;
    let mut stored = Vec::new();
    if let (Some(upload_id), false) = (&session.upload_id, session.state().is_terminal()) {
        match st.storage.list_parts(&session.object(), upload_id).await {
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
        st.storage.abort(&session.object(), upload_id).await?;
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
}
