//! The operator API: devices, commands, sessions, audit. Every handler checks the caller's
//! role on the project the resource belongs to (see [`crate::domain::access`]).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use uplink_protocol::command::{Action, Command};
use uplink_protocol::envelope::CommandEnvelope;
use uplink_protocol::ops::SessionState;
use uplink_protocol::{sign, topics, unix_now};
use uuid::Uuid;

use super::auth::Caller;
use super::error::ApiError;
use super::{openapi, ApiJson, ApiPath, ApiQuery};
use crate::domain::access::Need;
use crate::domain::session::Event;
use crate::store::{self, audit, Actor, Device, Session, SessionFilter};
use crate::{sessions, AppState};

#[derive(Deserialize, utoipa::ToSchema)]
pub struct NewDevice {
    /// 1-64 of `[A-Za-z0-9._-]`, not starting with a dot (nor with `uplink-bridge`).
    #[schema(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")]
    pub device_id: String,
    pub public_key: String,
    /// The project the device belongs to (default `default`).
    #[serde(default = "default_project")]
    #[schema(default = "default")]
    pub project_id: String,
}

/// A device, with its Mosquitto password when the API derives them
/// (`mqtt_password_secret`, [`crate::mqtt_login`]).
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeviceWithLogin {
    #[serde(flatten)]
    pub device: Device,
    /// The device's static Mosquitto password (for its `[mqtt] password_file`); changes
    /// with its key. Only in the answers to registering and changing a device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_password: Option<String>,
}

impl DeviceWithLogin {
    fn of(st: &AppState, device: Device) -> Self {
        let mqtt_password =
            crate::mqtt_login::password_of(&st.config, &device.device_id, &device.public_key);
        DeviceWithLogin {
            device,
            mqtt_password,
        }
    }
}

fn default_project() -> String {
    "default".into()
}

pub fn project_missing(project: &str) -> impl FnOnce() -> ApiError + '_ {
    move || ApiError::NotFound("project_not_found", format!("no project {project}"))
}

fn device_missing(id: &str) -> impl FnOnce() -> ApiError + '_ {
    move || ApiError::NotFound("device_not_found", format!("no device {id}"))
}

/// The device, if the caller may `need` it; another project's device is not found.
pub async fn visible_device(
    st: &AppState,
    caller: &Caller,
    id: &str,
    need: Need,
) -> Result<Device, ApiError> {
    let device = st.store.device(id).await?.ok_or_else(device_missing(id))?;
    caller.allow(Some(&device.project_id), need, device_missing(id))?;
    Ok(device)
}

#[utoipa::path(
    post,
    path = "/v1/devices",
    tag = "devices",
    params(openapi::IdempotencyKey),
    request_body = NewDevice,
    responses(
        (status = 201, description = "The device", body = DeviceWithLogin),
        openapi::WriteConflictProblems,
    ),
    security(("operator" = []))
)]
pub async fn register_device(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewDevice>,
) -> Result<(StatusCode, Json<DeviceWithLogin>), ApiError> {
    caller.allow(
        Some(&req.project_id),
        Need::Operate,
        project_missing(&req.project_id),
    )?;
    if st.store.project(&req.project_id).await?.is_none() {
        return Err(project_missing(&req.project_id)());
    }
    if !topics::valid_device_id(&req.device_id) {
        return Err(ApiError::Unprocessable(
            "invalid_device_id",
            "device ids are 1-64 of [A-Za-z0-9._-], not starting with a dot".into(),
        ));
    }
    // The embedded broker keeps these names for the bridge's own connection.
    if req.device_id.starts_with("uplink-bridge") {
        return Err(ApiError::Unprocessable(
            "reserved_device_id",
            "device ids starting with uplink-bridge are reserved".into(),
        ));
    }
    let key = sign::decode_public(&req.public_key).map_err(|_| {
        ApiError::Unprocessable(
            "invalid_public_key",
            "public_key must be base64 of a 32-byte Ed25519 key".into(),
        )
    })?;
    let mut tx = st.store.pool.begin().await?;
    let device: Option<Device> = sqlx::query_as(
        "INSERT INTO devices (device_id, public_key, project_id) VALUES ($1, $2, $3) ON CONFLICT (device_id) DO NOTHING RETURNING *",
    )
    .bind(&req.device_id)
    .bind(sign::encode_public(&key))
    .bind(&req.project_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(device) = device else {
        return Err(ApiError::Conflict(
            "device_exists",
            format!("device {} is already registered", req.device_id),
        ));
    };
    audit(
        &mut tx,
        &caller.actor(),
        "device.register",
        &req.device_id,
        Some(&req.project_id),
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(device_id = %device.device_id, "Device registered");
    Ok((StatusCode::CREATED, Json(DeviceWithLogin::of(&st, device))))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceQuery {
    /// Only this project's devices.
    pub project_id: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/devices",
    tag = "devices",
    params(DeviceQuery),
    responses(
        (status = 200, description = "Devices", body = Vec<Device>),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn list_devices(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<DeviceQuery>,
) -> Result<Json<Vec<Device>>, ApiError> {
    let project = scope(&caller, q.project_id.as_deref())?;
    Ok(Json(st.store.devices(project).await?))
}

/// The project a listing is limited to: the one asked for (if visible), else the caller's.
pub fn scope<'a>(caller: &'a Caller, asked: Option<&'a str>) -> Result<Option<&'a str>, ApiError> {
    match asked {
        Some(p) => {
            caller.allow(Some(p), Need::Read, project_missing(p))?;
            Ok(Some(p))
        }
        None => Ok(caller.principal.visible()),
    }
}

#[utoipa::path(
    get,
    path = "/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The device", body = Device),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn get_device(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Device>, ApiError> {
    Ok(Json(visible_device(&st, &caller, &id, Need::Read).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct DevicePatch {
    /// A disabled device is refused by the device API and the embedded broker, and gets no commands.
    pub enabled: Option<bool>,
    /// Key rotation: the new base64 Ed25519 public key; requests signed with the old key fail from now on.
    pub public_key: Option<String>,
}

#[utoipa::path(
    patch,
    path = "/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "Device id"), openapi::IdempotencyKey),
    request_body = DevicePatch,
    responses(
        (status = 200, description = "The device", body = DeviceWithLogin),
        openapi::WriteProblems,
    ),
    security(("operator" = []))
)]
pub async fn patch_device(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(patch): ApiJson<DevicePatch>,
) -> Result<Json<DeviceWithLogin>, ApiError> {
    visible_device(&st, &caller, &id, Need::Operate).await?;
    let public_key = match &patch.public_key {
        Some(k) => Some(sign::encode_public(&sign::decode_public(k).map_err(
            |_| {
                ApiError::Unprocessable(
                    "invalid_public_key",
                    "public_key must be base64 of a 32-byte Ed25519 key".into(),
                )
            },
        )?)),
        None => None,
    };
    let mut tx = st.store.pool.begin().await?;
    let device: Option<Device> = sqlx::query_as(
        "UPDATE devices SET enabled = COALESCE($2, enabled), public_key = COALESCE($3, public_key),
                            online = online AND COALESCE($2, enabled)
         WHERE device_id = $1 RETURNING *",
    )
    .bind(&id)
    .bind(patch.enabled)
    .bind(&public_key)
    .fetch_optional(&mut *tx)
    .await?;
    let device =
        device.ok_or_else(|| ApiError::NotFound("device_not_found", format!("no device {id}")))?;
    // The audit log never holds key material, only that it changed.
    audit(
        &mut tx,
        &caller.actor(),
        "device.update",
        &id,
        Some(&device.project_id),
        serde_json::json!({"enabled": patch.enabled, "key_rotated": public_key.is_some()}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(device_id = %id, enabled = device.enabled, key_rotated = public_key.is_some(), "Device updated");
    Ok(Json(DeviceWithLogin::of(&st, device)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only events about this subject (a device id, session id, `key:{key_id}`, ...).
    pub subject: Option<String>,
    /// Only this project's events.
    pub project_id: Option<String>,
    /// Only events with a larger id (for paging forward).
    pub after: Option<i64>,
    /// At most this many (1-1000, default 100; other values are clamped).
    pub limit: Option<i64>,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditEvent {
    pub id: i64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub request_id: Option<String>,
    pub project_id: Option<String>,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// The append-only audit log, oldest first. A project-scoped key sees its project's events.
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "Audit events, oldest first", body = Vec<AuditEvent>),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn list_audit(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Vec<AuditEvent>>, ApiError> {
    let project = scope(&caller, q.project_id.as_deref())?;
    let rows = sqlx::query_as(
        "SELECT id, at, actor, action, subject, request_id, project_id, detail FROM audit_events
         WHERE ($1::text IS NULL OR subject = $1) AND id > $2 AND ($4::text IS NULL OR project_id = $4)
         ORDER BY id LIMIT $3",
    )
    .bind(&q.subject)
    .bind(q.after.unwrap_or(0))
    .bind(q.limit.unwrap_or(100).clamp(1, 1000))
    .bind(project)
    .fetch_all(&st.store.pool)
    .await?;
    Ok(Json(rows))
}

/// Signs and stores a command for `device_id`; the bridge publishes it.
pub async fn issue_command(
    st: &AppState,
    device_id: &str,
    action: Action,
    actor: &Actor,
) -> Result<store::Command, ApiError> {
    let device = st
        .store
        .device(device_id)
        .await?
        .ok_or_else(device_missing(device_id))?;
    if let Err(reason) = action.validate() {
        return Err(ApiError::Unprocessable(
            match action {
                Action::Config(_) => "invalid_config",
                _ => "invalid_command",
            },
            reason,
        ));
    }
    if let Action::Upload { path, .. } = &action {
        if !path.starts_with('/') || path.len() > 4096 || path.contains('\0') {
            return Err(ApiError::Unprocessable(
                "invalid_path",
                "path must be absolute, at most 4096 bytes".into(),
            ));
        }
    }
    let now = unix_now();
    let command = Command {
        command_id: Uuid::new_v4(),
        device_id: device_id.to_string(),
        issued_at: now,
        expires_at: now + st.config.command_ttl_secs as i64,
        action,
    };
    let envelope = CommandEnvelope::sign(&st.command_key, &command);
    let mut tx = st.store.pool.begin().await?;
    let row: store::Command = sqlx::query_as(
        "INSERT INTO commands (command_id, device_id, action, envelope, state, expires_at)
         VALUES ($1, $2, $3, $4, 'pending', to_timestamp($5)) RETURNING *",
    )
    .bind(command.command_id)
    .bind(device_id)
    .bind(serde_json::to_value(&command.action).unwrap_or_default())
    .bind(serde_json::to_value(&envelope).unwrap_or_default())
    .bind(command.expires_at as f64)
    .fetch_one(&mut *tx)
    .await?;
    audit(
        &mut tx,
        actor,
        "command.issue",
        &command.command_id.to_string(),
        Some(&device.project_id),
        serde_json::json!({"device_id": device_id, "action": row.action}),
    )
    .await?;
    tx.commit().await?;
    crate::metrics::Counters::add(&st.counters.commands_issued, 1);
    tracing::info!(command_id = %command.command_id, %device_id, kind = command.action.kind(), "Command issued");
    Ok(row)
}

#[utoipa::path(
    post,
    path = "/v1/devices/{id}/commands",
    tag = "devices",
    params(("id" = String, Path, description = "Device id"), openapi::IdempotencyKey),
    request_body = Action,
    responses(
        (status = 201, description = "The command, `pending`", body = store::Command),
        openapi::WriteProblems,
    ),
    security(("operator" = []))
)]
pub async fn create_command(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(device_id): ApiPath<String>,
    ApiJson(action): ApiJson<Action>,
) -> Result<(StatusCode, Json<store::Command>), ApiError> {
    visible_device(&st, &caller, &device_id, Need::Operate).await?;
    let row = issue_command(&st, &device_id, action, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(row)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CommandQuery {
    /// Only this device's commands.
    pub device_id: Option<String>,
    /// Only commands in this state (`pending`, `published`, `accepted`, `done`, `failed`,
    /// `rejected`, `expired`).
    pub state: Option<String>,
    /// Only this project's commands.
    pub project_id: Option<String>,
    /// At most this many (1-1000, default 100; other values are clamped).
    pub limit: Option<i64>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionQuery {
    /// Only this device's sessions.
    pub device_id: Option<String>,
    /// Only sessions in this state (an unknown state is 400 `invalid_state`).
    #[param(value_type = Option<SessionState>)]
    pub state: Option<String>,
    /// Only this project's sessions.
    pub project_id: Option<String>,
    /// Only this dataset's sessions.
    pub dataset: Option<String>,
    /// At most this many (1-1000, default 100; other values are clamped).
    pub limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/v1/commands",
    tag = "sessions",
    params(CommandQuery),
    responses(
        (status = 200, description = "Commands, newest first", body = Vec<store::Command>),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn list_commands(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<CommandQuery>,
) -> Result<Json<Vec<store::Command>>, ApiError> {
    let project = scope(&caller, q.project_id.as_deref())?;
    expire_commands(&st).await?;
    let rows = sqlx::query_as(
        "SELECT c.* FROM commands c JOIN devices d USING (device_id)
         WHERE ($1::text IS NULL OR c.device_id = $1) AND ($2::text IS NULL OR c.state = $2)
           AND ($4::text IS NULL OR d.project_id = $4)
         ORDER BY c.created_at DESC LIMIT $3",
    )
    .bind(&q.device_id)
    .bind(&q.state)
    .bind(q.limit.unwrap_or(100).clamp(1, 1000))
    .bind(project)
    .fetch_all(&st.store.pool)
    .await?;
    Ok(Json(rows))
}

#[utoipa::path(
    get,
    path = "/v1/commands/{id}",
    tag = "sessions",
    params(("id" = Uuid, Path, description = "Command id")),
    responses(
        (status = 200, description = "The command", body = store::Command),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn get_command(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<store::Command>, ApiError> {
    expire_commands(&st).await?;
    let missing = || ApiError::NotFound("command_not_found", format!("no command {id}"));
    let command: store::Command = sqlx::query_as("SELECT * FROM commands WHERE command_id = $1")
        .bind(id)
        .fetch_optional(&st.store.pool)
        .await?
        .ok_or_else(missing)?;
    let device = st
        .store
        .device(&command.device_id)
        .await?
        .ok_or_else(missing)?;
    caller.allow(Some(&device.project_id), Need::Read, missing)?;
    Ok(Json(command))
}

/// Commands nobody acknowledged before they expired end as `expired`.
pub async fn expire_commands(st: &AppState) -> Result<(), ApiError> {
    sqlx::query("UPDATE commands SET state = 'expired', updated_at = now() WHERE state IN ('pending', 'published') AND expires_at < now()")
        .execute(&st.store.pool)
        .await?;
    Ok(())
}

#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    params(SessionQuery),
    responses(
        (status = 200, description = "Sessions, newest first", body = Vec<Session>),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn list_sessions(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<SessionQuery>,
) -> Result<Json<Vec<Session>>, ApiError> {
    let project = scope(&caller, q.project_id.as_deref())?;
    if let Some(s) = &q.state {
        if SessionState::parse(s).is_none() {
            return Err(ApiError::BadRequest(
                "invalid_state",
                format!("unknown session state {s:?}"),
            ));
        }
    }
    Ok(Json(
        st.store
            .sessions(&SessionFilter {
                device_id: q.device_id.as_deref(),
                state: q.state.as_deref(),
                project,
                dataset: q.dataset.as_deref(),
                limit: q.limit.unwrap_or(100).clamp(1, 1000),
            })
            .await?,
    ))
}

/// The session, if the caller may `need` it.
pub async fn visible_session(
    st: &AppState,
    caller: &Caller,
    id: Uuid,
    need: Need,
) -> Result<Session, ApiError> {
    let missing = || ApiError::NotFound("session_not_found", format!("no session {id}"));
    let session = st.store.session(id).await?.ok_or_else(missing)?;
    caller.allow(Some(&session.project_id), need, missing)?;
    Ok(session)
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(("id" = Uuid, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session", body = Session),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn get_session(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(visible_session(&st, &caller, id, Need::Read).await?))
}

/// Moves the session (pause, resume or abort) and sends the device the matching command
/// for the session's job.
async fn steer_session(
    st: &AppState,
    caller: Caller,
    id: Uuid,
    event: Event,
) -> Result<Json<Session>, ApiError> {
    let actor = caller.actor();
    let session = visible_session(st, &caller, id, Need::Operate).await?;
    let job_id = session.job_id;
    let (session, action) = match event {
        Event::Abort => (
            sessions::abort(st, session, &actor).await?,
            Action::Cancel { job_id },
        ),
        Event::Resume => (
            st.store.transition(&session, event, &actor, None).await?,
            Action::Resume { job_id },
        ),
        _ => (
            st.store.transition(&session, event, &actor, None).await?,
            Action::Pause { job_id },
        ),
    };
    // A workstation's upload has no device to tell: its client sees the state on its next call.
    if let Some(device_id) = &session.device_id {
        issue_command(st, device_id, action, &actor).await?;
    }
    Ok(Json(session))
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/pause",
    tag = "sessions",
    params(("id" = Uuid, Path, description = "Session id"), openapi::IdempotencyKey),
    responses(
        (status = 200, description = "The session, `paused`; a `pause` command goes to the device", body = Session),
        openapi::WriteConflictProblems,
    ),
    security(("operator" = []))
)]
pub async fn pause_session(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Session>, ApiError> {
    steer_session(&st, caller, id, Event::Pause).await
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/resume",
    tag = "sessions",
    params(("id" = Uuid, Path, description = "Session id"), openapi::IdempotencyKey),
    responses(
        (status = 200, description = "The session, `uploading`; a `resume` command goes to the device", body = Session),
        openapi::WriteConflictProblems,
    ),
    security(("operator" = []))
)]
pub async fn resume_session(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Session>, ApiError> {
    steer_session(&st, caller, id, Event::Resume).await
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/abort",
    tag = "sessions",
    params(("id" = Uuid, Path, description = "Session id"), openapi::IdempotencyKey),
    responses(
        (status = 200, description = "The session, `aborted`; a `cancel` command goes to the device", body = Session),
        openapi::WriteConflictProblems,
    ),
    security(("operator" = []))
)]
pub async fn abort_session(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Session>, ApiError> {
    steer_session(&st, caller, id, Event::Abort).await
}
