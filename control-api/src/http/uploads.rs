//! Uploads from workstations (`uplinkctl put`): sessions owned by the API key (or operator
//! token) that opened them, in a project where it may operate. The same session operations
//! as a device's ([`crate::sessions`]): quota, dedupe (from verified objects only), storage
//! policy, presigned part URLs with the part's MD5 signed in, verified completion, digest
//! check, audit and events. File bytes go straight to storage.
//!
//! Only the owner presigns and completes its session; any caller who may operate the project
//! sees it, pauses, resumes or aborts it (`/v1/sessions/{id}/…`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use uplink_protocol::ops::{
    CreateSession, PartChecksum, PartDigest, PresignParts, PresignedParts, SessionInfo,
};
use uuid::Uuid;

use super::auth::Caller;
use super::error::ApiError;
use super::operator::visible_session;
use super::{openapi, ApiJson, ApiPath};
use crate::domain::access::Need;
use crate::sessions::{self, Owner};
use crate::store::Session;
use crate::AppState;

/// `POST /v1/projects/{p}/uploads`: a session for a file on the caller's machine.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUpload {
    /// The client's id for this upload: the same id opens the same session again (resume).
    pub job_id: Uuid,
    /// File name (no directories): the last segment of the object key.
    pub file_name: String,
    /// Dataset of the project (`default` when absent).
    pub dataset: Option<String>,
    pub size: u64,
    /// Hex SHA-256 of the whole file.
    pub sha256: String,
    pub part_size: u64,
    /// `sha256` to presign parts with their SHA-256 (where storage checks it; the answer's
    /// `part_checksum` says); absent: `md5`.
    #[serde(default)]
    pub part_checksum: Option<PartChecksum>,
}

/// `POST /v1/sessions/{id}/parts`: the parts to presign, each with its digest.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PartsToPresign {
    pub parts: Vec<PartDigest>,
}

/// The session, if the caller may operate its project and owns it (a client session).
async fn owned_session(st: &AppState, caller: &Caller, id: Uuid) -> Result<Session, ApiError> {
    let session = visible_session(st, caller, id, Need::Operate).await?;
    match (&session.owner, &session.device_id) {
        (Some(owner), _) if *owner == caller.actor().name => Ok(session),
        (_, Some(device)) => Err(ApiError::Conflict(
            "device_session",
            format!("session {id} belongs to device {device}: only the device uploads its parts"),
        )),
        _ => Err(ApiError::Forbidden(
            "not_session_owner",
            format!("session {id} belongs to another API key: only it uploads the parts"),
        )),
    }
}

#[utoipa::path(
    post,
    path = "/v1/projects/{id}/uploads",
    tag = "uploads",
    params(("id" = String, Path, description = "Project id"), openapi::IdempotencyKey),
    request_body = NewUpload,
    responses(
        (status = 201, description = "A new session (already `completed` when the dataset holds the same verified content)", body = SessionInfo),
        (status = 200, description = "The session this `job_id` already has", body = SessionInfo),
        openapi::WriteConflictProblems,
    ),
    security(("operator" = []))
)]
pub async fn create_upload(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(project): ApiPath<String>,
    ApiJson(req): ApiJson<NewUpload>,
) -> Result<(StatusCode, Json<SessionInfo>), ApiError> {
    let missing = || ApiError::NotFound("project_not_found", format!("no project {project}"));
    caller.allow(Some(&project), Need::Operate, missing)?;
    if st.store.project(&project).await?.is_none() {
        return Err(missing());
    }
    let actor = caller.actor();
    let owner = Owner::Client {
        project: &project,
        owner: &actor.name,
    };
    let create = CreateSession {
        job_id: req.job_id,
        command_id: None,
        file_name: req.file_name,
        dataset: req.dataset,
        size: req.size,
        sha256: Some(req.sha256),
        part_size: req.part_size,
        part_checksum: req.part_checksum,
    };
    let (status, info) = sessions::create(&st, &owner, &actor, create).await?;
    Ok((
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        Json(info),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/parts",
    tag = "uploads",
    params(("id" = Uuid, Path, description = "Session id"), openapi::IdempotencyKey),
    request_body = PartsToPresign,
    responses(
        (status = 200, description = "A presigned PUT per part, with the headers to send", body = PresignedParts),
        openapi::WriteConflictProblems,
    ),
    security(("operator" = []))
)]
pub async fn presign_parts(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<PartsToPresign>,
) -> Result<Json<PresignedParts>, ApiError> {
    let session = owned_session(&st, &caller, id).await?;
    let req = PresignParts {
        session_id: id,
        parts: req.parts,
    };
    Ok(Json(
        sessions::presign(&st, session, &caller.actor(), req).await?,
    ))
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/status",
    tag = "uploads",
    params(("id" = Uuid, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session with the parts storage holds (`stored_parts`): what a resumed upload need not send again", body = SessionInfo),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn session_status(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<SessionInfo>, ApiError> {
    let session = visible_session(&st, &caller, id, Need::Read).await?;
    Ok(Json(sessions::status(&st, session).await?))
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/complete",
    tag = "uploads",
    params(("id" = Uuid, Path, description = "Session id"), openapi::IdempotencyKey),
    responses(
        (status = 200, description = "The session, `completed` once storage holds every part as presigned", body = SessionInfo),
        openapi::WriteConflictProblems,
    ),
    security(("operator" = []))
)]
pub async fn complete_upload(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<SessionInfo>, ApiError> {
    let session = owned_session(&st, &caller, id).await?;
    let req = uplink_protocol::ops::CompleteSession {
        session_id: id,
        manifest: None,
    };
    Ok(Json(
        sessions::complete(&st, session, &caller.actor(), req, None).await?,
    ))
}
