//! Projects, datasets (open → sealed, with a manifest) and storage policies (API keys:
//! `keys.rs`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use uplink_protocol::ops::valid_dataset;
use uplink_protocol::topics;
use uuid::Uuid;

use super::auth::Caller;
use super::error::ApiError;
use super::operator::project_missing;
use super::{no_such_endpoint, openapi, ApiJson, ApiPath};
use crate::domain::access::Need;
use crate::domain::policy::StoragePolicy;
use crate::guarantees;
use crate::storage::ObjectOptions;
use crate::store::{audit, Dataset, Project};
use crate::validate::Validator;
use crate::AppState;

/// Parses and checks a policy; a named bucket must be reachable, and storage must honour the
/// encryption and object lock it asks for ([`guarantees::probe`]). `project`: the project
/// whose policy a dataset's policy overrides (`None` for a project's own policy).
async fn checked_policy(
    st: &AppState,
    v: serde_json::Value,
    project: Option<&str>,
) -> Result<StoragePolicy, ApiError> {
    let policy: StoragePolicy = serde_json::from_value(v)
        .map_err(|e| ApiError::Unprocessable("invalid_policy", format!("policy: {e}")))?;
    let problems = policy.problems();
    if !problems.is_empty() {
        return Err(ApiError::Unprocessable(
            "invalid_policy",
            problems.join("; "),
        ));
    }
    if let Some(b) = &policy.bucket {
        if st.storage.check_bucket(b).await.is_err() {
            return Err(ApiError::Unprocessable(
                "bucket_unreachable",
                format!("bucket {b} does not exist or the API's credentials cannot reach it"),
            ));
        }
    }
    let mut under = st.config.default_policy();
    if let Some(project) = project {
        let p: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT policy FROM projects WHERE project_id = $1")
                .bind(project)
                .fetch_optional(&st.store.pool)
                .await?;
        let p: StoragePolicy = p
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        under = p.over(&under);
    }
    let effective = policy.over(&under);
    let bucket = effective.bucket.as_deref().unwrap_or(&st.storage.bucket);
    let unsupported = guarantees::probe(
        &st.storage,
        bucket,
        &st.config.s3.key_prefix,
        &ObjectOptions::of(&effective),
    )
    .await?;
    if !unsupported.is_empty() {
        return Err(ApiError::Unprocessable(
            "policy_not_supported",
            format!(
                "storage cannot honour this policy: {}",
                unsupported.join("; ")
            ),
        ));
    }
    Ok(policy)
}

fn to_value(p: &StoragePolicy) -> serde_json::Value {
    serde_json::to_value(p).unwrap_or_default()
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    /// 1-64 of `[A-Za-z0-9._-]`, not starting with a dot.
    #[schema(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")]
    pub project_id: String,
    pub name: Option<String>,
    /// Bytes; absent or `null`: no quota.
    pub quota_bytes: Option<i64>,
    /// Absent or `null`: the API's `[s3]` settings.
    #[serde(default)]
    #[schema(value_type = Option<StoragePolicy>)]
    pub policy: serde_json::Value,
}

fn check_quota(q: Option<i64>) -> Result<(), ApiError> {
    match q {
        Some(q) if q < 0 => Err(ApiError::Unprocessable(
            "invalid_quota",
            "quota_bytes must be 0 or more (null: no quota)".into(),
        )),
        _ => Ok(()),
    }
}

#[utoipa::path(
    post,
    path = "/v1/projects",
    tag = "projects",
    params(openapi::IdempotencyKey),
    request_body = NewProject,
    responses(
        (status = 201, description = "The project, with dataset `default`", body = Project),
        openapi::WriteConflictProblems,
    ),
    security(("operator" = []))
)]
pub async fn create_project(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewProject>,
) -> Result<(StatusCode, Json<Project>), ApiError> {
    caller.allow(None, Need::Global, no_such_endpoint)?;
    if !topics::valid_device_id(&req.project_id) {
        return Err(ApiError::Unprocessable(
            "invalid_project_id",
            "project ids are 1-64 of [A-Za-z0-9._-], not starting with a dot".into(),
        ));
    }
    check_quota(req.quota_bytes)?;
    let policy = if req.policy.is_null() {
        StoragePolicy::default()
    } else {
        checked_policy(&st, req.policy, None).await?
    };
    let mut tx = st.store.pool.begin().await?;
    let project: Option<Project> = sqlx::query_as(
        "INSERT INTO projects (project_id, name, quota_bytes, policy) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING RETURNING *",
    )
    .bind(&req.project_id)
    .bind(req.name.as_deref().unwrap_or(&req.project_id))
    .bind(req.quota_bytes)
    .bind(to_value(&policy))
    .fetch_optional(&mut *tx)
    .await?;
    let project = project.ok_or_else(|| {
        ApiError::Conflict(
            "project_exists",
            format!("project {} already exists", req.project_id),
        )
    })?;
    sqlx::query("INSERT INTO datasets (project_id, name) VALUES ($1, 'default')")
        .bind(&req.project_id)
        .execute(&mut *tx)
        .await?;
    audit(
        &mut tx,
        &caller.actor(),
        "project.create",
        &req.project_id,
        Some(&req.project_id),
        serde_json::json!({"quota_bytes": req.quota_bytes, "policy": project.policy}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(project)))
}

#[utoipa::path(
    get,
    path = "/v1/projects",
    tag = "projects",
    responses(
        (status = 200, description = "Projects the caller can see", body = Vec<Project>),
        (status = 401, response = openapi::Unauthorized),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("operator" = []))
)]
pub async fn list_projects(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Project>>, ApiError> {
    Ok(Json(
        sqlx::query_as(
            "SELECT * FROM projects WHERE ($1::text IS NULL OR project_id = $1) ORDER BY project_id",
        )
        .bind(caller.principal.visible())
        .fetch_all(&st.store.pool)
        .await?,
    ))
}

pub(super) async fn visible_project(
    st: &AppState,
    caller: &Caller,
    id: &str,
    need: Need,
) -> Result<Project, ApiError> {
    caller.allow(Some(id), need, project_missing(id))?;
    st.store.project(id).await?.ok_or_else(project_missing(id))
}

#[utoipa::path(
    get,
    path = "/v1/projects/{id}",
    tag = "projects",
    params(("id" = String, Path, description = "Project id")),
    responses(
        (status = 200, description = "The project", body = Project),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn get_project(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Project>, ApiError> {
    Ok(Json(visible_project(&st, &caller, &id, Need::Read).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectPatch {
    pub name: Option<String>,
    /// Needs an unscoped admin. `null` removes the quota.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub quota_bytes: Option<Option<i64>>,
    #[schema(value_type = Option<StoragePolicy>)]
    pub policy: Option<serde_json::Value>,
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(d).map(Some)
    }
}

#[utoipa::path(
    patch,
    path = "/v1/projects/{id}",
    tag = "projects",
    params(("id" = String, Path, description = "Project id"), openapi::IdempotencyKey),
    request_body = ProjectPatch,
    responses(
        (status = 200, description = "The project", body = Project),
        openapi::WriteProblems,
    ),
    security(("operator" = []))
)]
pub async fn patch_project(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(patch): ApiJson<ProjectPatch>,
) -> Result<Json<Project>, ApiError> {
    visible_project(&st, &caller, &id, Need::Admin).await?;
    if let Some(q) = patch.quota_bytes {
        caller.allow(Some(&id), Need::Global, project_missing(&id))?;
        check_quota(q)?;
    }
    let policy = match patch.policy {
        Some(v) => Some(to_value(&checked_policy(&st, v, None).await?)),
        None => None,
    };
    let mut tx = st.store.pool.begin().await?;
    let project: Project = sqlx::query_as(
        "UPDATE projects SET name = COALESCE($2, name), policy = COALESCE($3, policy),
                             quota_bytes = CASE WHEN $4 THEN $5 ELSE quota_bytes END
         WHERE project_id = $1 RETURNING *",
    )
    .bind(&id)
    .bind(&patch.name)
    .bind(&policy)
    .bind(patch.quota_bytes.is_some())
    .bind(patch.quota_bytes.flatten())
    .fetch_one(&mut *tx)
    .await?;
    audit(
        &mut tx,
        &caller.actor(),
        "project.update",
        &id,
        Some(&id),
        serde_json::json!({"name": patch.name, "quota_bytes": patch.quota_bytes, "policy": policy}),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(project))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDataset {
    /// 1-64 of `[A-Za-z0-9._-]`, not starting with a dot.
    #[schema(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")]
    pub name: String,
    /// Needs an admin.
    #[schema(value_type = Option<StoragePolicy>)]
    pub policy: Option<serde_json::Value>,
    /// `jsonl`, `csv` or `parquet`; needs an admin.
    pub validator: Option<String>,
}

/// A validator name: `jsonl`, `csv` or `parquet` ([`Validator::parse`]).
fn check_validator(v: &Option<String>) -> Result<(), ApiError> {
    match v.as_deref() {
        Some(other) if Validator::parse(other).is_none() => Err(ApiError::Unprocessable(
            "invalid_validator",
            format!("validator {other:?} is not one of jsonl, csv, parquet"),
        )),
        _ => Ok(()),
    }
}

fn dataset_missing<'a>(project: &'a str, name: &'a str) -> impl FnOnce() -> ApiError + 'a {
    move || {
        ApiError::NotFound(
            "dataset_not_found",
            format!("no dataset {name} in project {project}"),
        )
    }
}

#[utoipa::path(
    post,
    path = "/v1/projects/{id}/datasets",
    tag = "projects",
    params(("id" = String, Path, description = "Project id"), openapi::IdempotencyKey),
    request_body = NewDataset,
    responses(
        (status = 201, description = "The dataset", body = Dataset),
        openapi::WriteConflictProblems,
    ),
    security(("operator" = []))
)]
pub async fn create_dataset(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(project): ApiPath<String>,
    ApiJson(req): ApiJson<NewDataset>,
) -> Result<(StatusCode, Json<Dataset>), ApiError> {
    let need = if req.policy.is_some() || req.validator.is_some() {
        Need::Admin
    } else {
        Need::Operate
    };
    visible_project(&st, &caller, &project, need).await?;
    if !valid_dataset(&req.name) {
        return Err(ApiError::Unprocessable(
            "invalid_dataset",
            "dataset names are 1-64 of A-Z a-z 0-9 . _ -, not starting with a dot".into(),
        ));
    }
    check_validator(&req.validator)?;
    let policy = match req.policy {
        Some(v) => checked_policy(&st, v, Some(&project)).await?,
        None => StoragePolicy::default(),
    };
    let mut tx = st.store.pool.begin().await?;
    let dataset: Option<Dataset> = sqlx::query_as(
        "INSERT INTO datasets (project_id, name, policy, validator) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING RETURNING *",
    )
    .bind(&project)
    .bind(&req.name)
    .bind(to_value(&policy))
    .bind(&req.validator)
    .fetch_optional(&mut *tx)
    .await?;
    let dataset = dataset.ok_or_else(|| {
        ApiError::Conflict(
            "dataset_exists",
            format!("dataset {} already exists in project {project}", req.name),
        )
    })?;
    audit(
        &mut tx,
        &caller.actor(),
        "dataset.create",
        &format!("{project}/{}", req.name),
        Some(&project),
        serde_json::json!({"policy": dataset.policy, "validator": dataset.validator}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(dataset)))
}

#[utoipa::path(
    get,
    path = "/v1/projects/{id}/datasets",
    tag = "projects",
    params(("id" = String, Path, description = "Project id")),
    responses(
        (status = 200, description = "The project's datasets", body = Vec<Dataset>),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn list_datasets(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(project): ApiPath<String>,
) -> Result<Json<Vec<Dataset>>, ApiError> {
    visible_project(&st, &caller, &project, Need::Read).await?;
    Ok(Json(
        sqlx::query_as("SELECT * FROM datasets WHERE project_id = $1 ORDER BY name")
            .bind(&project)
            .fetch_all(&st.store.pool)
            .await?,
    ))
}

async fn visible_dataset(
    st: &AppState,
    caller: &Caller,
    project: &str,
    name: &str,
    need: Need,
) -> Result<Dataset, ApiError> {
    caller.allow(Some(project), need, project_missing(project))?;
    st.store
        .dataset(project, name)
        .await?
        .ok_or_else(dataset_missing(project, name))
}

#[utoipa::path(
    get,
    path = "/v1/projects/{id}/datasets/{name}",
    tag = "projects",
    params(("id" = String, Path, description = "Project id"), ("name" = String, Path, description = "Dataset name")),
    responses(
        (status = 200, description = "The dataset", body = Dataset),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn get_dataset(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<Json<Dataset>, ApiError> {
    Ok(Json(
        visible_dataset(&st, &caller, &project, &name, Need::Read).await?,
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetPatch {
    #[schema(value_type = Option<StoragePolicy>)]
    pub policy: Option<serde_json::Value>,
    /// `null` removes the validator.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub validator: Option<Option<String>>,
}

#[utoipa::path(
    patch,
    path = "/v1/projects/{id}/datasets/{name}",
    tag = "projects",
    params(("id" = String, Path, description = "Project id"), ("name" = String, Path, description = "Dataset name"), openapi::IdempotencyKey),
    request_body = DatasetPatch,
    responses(
        (status = 200, description = "The dataset", body = Dataset),
        openapi::WriteProblems,
    ),
    security(("operator" = []))
)]
pub async fn patch_dataset(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((project, name)): ApiPath<(String, String)>,
    ApiJson(patch): ApiJson<DatasetPatch>,
) -> Result<Json<Dataset>, ApiError> {
    visible_dataset(&st, &caller, &project, &name, Need::Admin).await?;
    if let Some(v) = &patch.validator {
        check_validator(v)?;
    }
    let policy = match patch.policy {
        Some(v) => Some(to_value(&checked_policy(&st, v, Some(&project)).await?)),
        None => None,
    };
    let mut tx = st.store.pool.begin().await?;
    let dataset: Dataset = sqlx::query_as(
        "UPDATE datasets SET policy = COALESCE($3, policy),
                             validator = CASE WHEN $4 THEN $5 ELSE validator END
         WHERE project_id = $1 AND name = $2 RETURNING *",
    )
    .bind(&project)
    .bind(&name)
    .bind(&policy)
    .bind(patch.validator.is_some())
    .bind(patch.validator.clone().flatten())
    .fetch_one(&mut *tx)
    .await?;
    audit(
        &mut tx,
        &caller.actor(),
        "dataset.update",
        &format!("{project}/{name}"),
        Some(&project),
        serde_json::json!({"policy": policy, "validator": patch.validator}),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(dataset))
}

/// One object of a dataset manifest.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ManifestEntry {
    pub session_id: Uuid,
    pub device_id: String,
    pub file_name: String,
    pub bucket: String,
    pub object_key: String,
    pub size: i64,
    pub sha256: Option<String>,
    pub validation: Option<String>,
    pub completed_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Manifest {
    pub project_id: String,
    pub dataset: String,
    pub sealed: bool,
    pub objects: Vec<ManifestEntry>,
    pub total_bytes: i64,
}

/// Every accepted (or unvalidated) completed object of the dataset, once per object.
async fn current_manifest(
    exec: impl sqlx::PgExecutor<'_>,
    project: &str,
    name: &str,
    sealed: bool,
) -> Result<Manifest, ApiError> {
    let objects: Vec<ManifestEntry> = sqlx::query_as(
        "SELECT session_id, device_id, file_name, bucket, object_key, size, sha256, validation, completed_at
         FROM sessions WHERE project_id = $1 AND dataset = $2 AND state = 'completed'
           AND deduplicated_from IS NULL AND validation IS DISTINCT FROM 'rejected'
         ORDER BY completed_at, session_id",
    )
    .bind(project)
    .bind(name)
    .fetch_all(exec)
    .await?;
    Ok(Manifest {
        project_id: project.to_string(),
        dataset: name.to_string(),
        sealed,
        total_bytes: objects.iter().map(|o| o.size).sum(),
        objects,
    })
}

/// Seals the dataset: it takes no new files, and its manifest is written once. Refused
/// while sessions are still open or objects wait for validation.
#[utoipa::path(
    post,
    path = "/v1/projects/{id}/datasets/{name}/seal",
    tag = "projects",
    params(("id" = String, Path, description = "Project id"), ("name" = String, Path, description = "Dataset name"), openapi::IdempotencyKey),
    responses(
        (status = 200, description = "The sealed manifest (the same one when sealed again)", body = Manifest),
        openapi::WriteConflictProblems,
    ),
    security(("operator" = []))
)]
pub async fn seal_dataset(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<Json<Manifest>, ApiError> {
    let dataset = visible_dataset(&st, &caller, &project, &name, Need::Operate).await?;
    if dataset.state == "sealed" {
        return dataset
            .manifest
            .and_then(|m| serde_json::from_value(m).ok())
            .map(Json)
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("sealed dataset without manifest")));
    }
    let mut tx = st.store.pool.begin().await?;
    // Locks the dataset: a session create for it waits, then sees it sealed.
    sqlx::query("SELECT 1 FROM datasets WHERE project_id = $1 AND name = $2 FOR UPDATE")
        .bind(&project)
        .bind(&name)
        .execute(&mut *tx)
        .await?;
    let (open, pending): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state IN ('created', 'uploading', 'paused', 'completing')),
                count(*) FILTER (WHERE validation = 'pending')
         FROM sessions WHERE project_id = $1 AND dataset = $2",
    )
    .bind(&project)
    .bind(&name)
    .fetch_one(&mut *tx)
    .await?;
    if open > 0 || pending > 0 {
        return Err(ApiError::Conflict(
            "dataset_busy",
            format!("{open} sessions are still open and {pending} objects wait for validation; seal when they are done"),
        ));
    }
    let manifest = current_manifest(&mut *tx, &project, &name, true).await?;
    let value = serde_json::to_value(&manifest).map_err(|e| ApiError::Internal(e.into()))?;
    sqlx::query(
        "UPDATE datasets SET state = 'sealed', sealed_at = now(), manifest = $3 WHERE project_id = $1 AND name = $2",
    )
    .bind(&project)
    .bind(&name)
    .bind(&value)
    .execute(&mut *tx)
    .await?;
    audit(
        &mut tx,
        &caller.actor(),
        "dataset.seal",
        &format!("{project}/{name}"),
        Some(&project),
        serde_json::json!({"objects": manifest.objects.len(), "total_bytes": manifest.total_bytes,
                           "manifest_sha256": uplink_protocol::sha256_hex(value.to_string().as_bytes())}),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(manifest))
}

/// The sealed manifest, or for an open dataset what it would list now.
#[utoipa::path(
    get,
    path = "/v1/projects/{id}/datasets/{name}/manifest",
    tag = "projects",
    params(("id" = String, Path, description = "Project id"), ("name" = String, Path, description = "Dataset name")),
    responses(
        (status = 200, description = "The sealed manifest, or what an open dataset would list now", body = Manifest),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn dataset_manifest(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<Json<Manifest>, ApiError> {
    let dataset = visible_dataset(&st, &caller, &project, &name, Need::Read).await?;
    if let Some(m) = dataset
        .manifest
        .and_then(|m| serde_json::from_value(m).ok())
    {
        return Ok(Json(m));
    }
    Ok(Json(
        current_manifest(&st.store.pool, &project, &name, false).await?,
    ))
}

/// What a key or webhook of `project` (or of every project, `None`) needs of its creator.
pub(super) fn admin_need(project: Option<&str>) -> Need {
    if project.is_some() {
        Need::Admin
    } else {
        Need::Global
    }
}
