//! API keys: a role, scoped to one project or to all; the token is shown once and only its
//! SHA-256 is stored.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::{new_token, Caller};
use super::error::ApiError;
use super::operator::scope;
use super::projects::{admin_need, visible_project};
use super::{no_such_endpoint, openapi, ApiJson, ApiPath, ApiQuery};
use crate::domain::access::{Need, Role};
use crate::store::audit;
use crate::AppState;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// 1-128 characters, no control characters.
    #[schema(pattern = r"^[^\u0000-\u001F\u007F-\u009F]{1,128}$")]
    pub name: String,
    pub role: Role,
    /// `null`/absent: every project (needs an unscoped admin).
    pub project_id: Option<String>,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ApiKey {
    pub key_id: String,
    pub name: String,
    #[schema(value_type = Role)]
    pub role: String,
    pub project_id: Option<String>,
    pub created_by: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The columns of an [`ApiKey`] (never `secret_hash`).
const KEY_COLUMNS: &str =
    "key_id, name, role, project_id, created_by, created_at, last_used_at, revoked_at";

#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: ApiKey,
    /// Shown once: only its hash is stored.
    pub token: String,
}

#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "keys",
    params(openapi::IdempotencyKey),
    request_body = NewKey,
    responses(
        (status = 201, description = "The key with its token, shown once", body = CreatedKey),
        openapi::WriteProblems,
    ),
    security(("operator" = []))
)]
pub async fn create_key(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let project = req.project_id.as_deref();
    match project {
        Some(p) => {
            visible_project(&st, &caller, p, Need::Admin).await?;
        }
        None => caller.allow(None, Need::Global, no_such_endpoint)?,
    }
    let chars = req.name.chars().count();
    if chars == 0 || chars > 128 || req.name.chars().any(char::is_control) {
        return Err(ApiError::Unprocessable(
            "invalid_name",
            "name must be 1-128 characters, no control characters".into(),
        ));
    }
    let t = new_token();
    let mut tx = st.store.pool.begin().await?;
    let key: ApiKey = sqlx::query_as(&format!(
        "INSERT INTO api_keys (key_id, secret_hash, name, role, project_id, created_by) VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING {KEY_COLUMNS}"
    ))
    .bind(&t.key_id)
    .bind(&t.secret_hash)
    .bind(&req.name)
    .bind(req.role.as_str())
    .bind(project)
    .bind(&caller.principal.name)
    .fetch_one(&mut *tx)
    .await?;
    audit(
        &mut tx,
        &caller.actor(),
        "key.create",
        &format!("key:{}", t.key_id),
        project,
        serde_json::json!({"name": req.name, "role": req.role.as_str()}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(key_id = %t.key_id, role = req.role.as_str(), project = ?project, "API key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key,
            token: t.token,
        }),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyQuery {
    /// Only this project's keys (needs its admin); absent: every key (needs an unscoped admin).
    pub project_id: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    params(KeyQuery),
    responses(
        (status = 200, description = "Keys (never their tokens)", body = Vec<ApiKey>),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 404, response = openapi::NotFound),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("operator" = []))
)]
pub async fn list_keys(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<KeyQuery>,
) -> Result<Json<Vec<ApiKey>>, ApiError> {
    let project = scope(&caller, q.project_id.as_deref())?;
    caller.allow(project, admin_need(project), no_such_endpoint)?;
    Ok(Json(
        sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE ($1::text IS NULL OR project_id = $1) ORDER BY created_at"
        ))
        .bind(project)
        .fetch_all(&st.store.pool)
        .await?,
    ))
}

/// Revokes a key at once: its next request is refused.
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    tag = "keys",
    params(("id" = String, Path, description = "API key id"), openapi::IdempotencyKey),
    responses(
        (status = 200, description = "The key, revoked", body = ApiKey),
        openapi::WriteProblems,
    ),
    security(("operator" = []))
)]
pub async fn revoke_key(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ApiKey>, ApiError> {
    let missing = || ApiError::NotFound("key_not_found", format!("no key {id}"));
    let project: Option<Option<String>> =
        sqlx::query_scalar("SELECT project_id FROM api_keys WHERE key_id = $1")
            .bind(&id)
            .fetch_optional(&st.store.pool)
            .await?;
    let project = project.ok_or_else(missing)?;
    caller.allow(project.as_deref(), admin_need(project.as_deref()), missing)?;
    let mut tx = st.store.pool.begin().await?;
    let key: ApiKey = sqlx::query_as(&format!(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE key_id = $1 RETURNING {KEY_COLUMNS}"
    ))
    .bind(&id)
    .fetch_one(&mut *tx)
    .await?;
    audit(
        &mut tx,
        &caller.actor(),
        "key.revoke",
        &format!("key:{id}"),
        project.as_deref(),
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(key))
}
