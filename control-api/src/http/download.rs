//! Download links (the web console's session page, `/console`). A download link is a short-lived presigned GET of a
//! completed session's object, so the bytes go from storage to the browser, never through
//! the API; asking for one is written to the audit log.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use uuid::Uuid;

use super::auth::Caller;
use super::error::ApiError;
use super::operator::visible_session;
use super::{openapi, ApiPath};
use crate::domain::access::Need;
use crate::AppState;

/// How long a download link lives (at most; a shorter `presign_ttl_secs` wins).
pub const DOWNLOAD_TTL: Duration = Duration::from_secs(300);

/// A presigned GET of a completed session's object.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DownloadLink {
    /// Presigned GET URL (a secret until it expires: do not log it).
    pub url: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/download",
    tag = "sessions",
    params(("id" = Uuid, Path, description = "Session id")),
    responses(
        (status = 200, description = "A short-lived presigned GET of the stored object", body = DownloadLink),
        (status = 409, response = openapi::Conflict),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn download_link(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<DownloadLink>, ApiError> {
    let session = visible_session(&st, &caller, id, Need::Read).await?;
    if session.state != "completed" {
        return Err(ApiError::Conflict(
            "not_completed",
            format!(
                "session {id} is {}: only a completed session has an object to download",
                session.state
            ),
        ));
    }
    let ttl = DOWNLOAD_TTL.min(Duration::from_secs(st.config.s3.presign_ttl_secs.max(1)));
    let presigned = st
        .storage
        .presign_get(&session.object(), &session.file_name, ttl)
        .await?;
    let mut tx = st.store.pool.begin().await?;
    crate::store::audit(
        &mut tx,
        &caller.actor(),
        "session.download_link",
        &id.to_string(),
        Some(&session.project_id),
        serde_json::json!({ "ttl_secs": ttl.as_secs() }),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(DownloadLink {
        url: presigned.url,
        expires_at: chrono::Utc::now()
            + chrono::Duration::seconds(i64::try_from(ttl.as_secs()).unwrap_or(300)),
    }))
}
