//! The operator API: devices, commands, sessions. Bearer `operator_token`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use uplink_protocol::command::{Action, Command};
use uplink_protocol::envelope::CommandEnvelope;
use uplink_protocol::ops::SessionState;
use uplink_protocol::{sign, topics, unix_now};
use uuid::Uuid;

use super::error::ApiError;
use super::ApiJson;
use crate::domain::session::Event;
use crate::store::{self, audit, Actor, Device, Session};
use crate::{sessions, AppState};

#[derive(Deserialize)]
pub struct NewDevice {
    pub device_id: String,
    pub public_key: String,
}

pub async fn register_device(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<NewDevice>,
) -> Result<(StatusCode, Json<Device>), ApiError> {
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
        "INSERT INTO devices (device_id, public_key) VALUES ($1, $2) ON CONFLICT (device_id) DO NOTHING RETURNING *",
    )
    .bind(&req.device_id)
    .bind(sign::encode_public(&key))
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
        &Actor::operator(),
        "device.register",
        &req.device_id,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(device_id = %device.device_id, "Device registered");
    Ok((StatusCode::CREATED, Json(device)))
}

pub async fn list_devices(State(st): State<AppState>) -> Result<Json<Vec<Device>>, ApiError> {
    Ok(Json(st.store.devices().await?))
}

pub async fn get_device(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    st.store
        .device(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("device_not_found", format!("no device {id}")))
}

#[derive(Deserialize)]
pub struct DevicePatch {
    /// A disabled device is refused by the device API and the embedded broker, and gets no commands.
    pub enabled: Option<bool>,
    /// Key rotation: the new base64 Ed25519 public key; requests signed with the old key fail from now on.
    pub public_key: Option<String>,
}

pub async fn patch_device(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<DevicePatch>,
) -> Result<Json<Device>, ApiError> {
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
        &Actor::operator(),
        "device.update",
        &id,
        serde_json::json!({"enabled": patch.enabled, "key_rotated": public_key.is_some()}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(device_id = %id, enabled = device.enabled, key_rotated = public_key.is_some(), "Device updated");
    Ok(Json(device))
}

#[derive(Deserialize)]
pub struct AuditQuery {
    pub subject: Option<String>,
    /// Only events with a larger id (for paging forward).
    pub after: Option<i64>,
    pub limit: Option<i64>,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct AuditEvent {
    pub id: i64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub request_id: Option<String>,
    pub detail: serde_json::Value,
}

/// The append-only audit log, oldest first.
pub async fn list_audit(
    State(st): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEvent>>, ApiError> {
    let rows = sqlx::query_as(
        "SELECT * FROM audit_events WHERE ($1::text IS NULL OR subject = $1) AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(&q.subject)
    .bind(q.after.unwrap_or(0))
    .bind(q.limit.unwrap_or(100).clamp(1, 1000))
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
    if st.store.device(device_id).await?.is_none() {
        return Err(ApiError::NotFound(
            "device_not_found",
            format!("no device {device_id}"),
        ));
    }
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
        serde_json::json!({"device_id": device_id, "action": row.action}),
    )
    .await?;
    tx.commit().await?;
    crate::metrics::Counters::add(&st.counters.commands_issued, 1);
    tracing::info!(command_id = %command.command_id, %device_id, kind = command.action.kind(), "Command issued");
    Ok(row)
}

pub async fn create_command(
    State(st): State<AppState>,
    Path(device_id): Path<String>,
    ApiJson(action): ApiJson<Action>,
) -> Result<(StatusCode, Json<store::Command>), ApiError> {
    let row = issue_command(&st, &device_id, action, &Actor::operator()).await?;
    Ok((StatusCode::CREATED, Json(row)))
}

#[derive(Deserialize)]
pub struct ListQuery {
    pub device_id: Option<String>,
    pub state: Option<String>,
    pub limit: Option<i64>,
}

pub async fn list_commands(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<store::Command>>, ApiError> {
    expire_commands(&st).await?;
    let rows = sqlx::query_as(
        "SELECT * FROM commands WHERE ($1::text IS NULL OR device_id = $1) AND ($2::text IS NULL OR state = $2)
         ORDER BY created_at DESC LIMIT $3",
    )
    .bind(&q.device_id)
    .bind(&q.state)
    .bind(q.limit.unwrap_or(100).clamp(1, 1000))
    .fetch_all(&st.store.pool)
    .await?;
    Ok(Json(rows))
}

pub async fn get_command(
    State(st): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<store::Command>, ApiError> {
    expire_commands(&st).await?;
    sqlx::query_as("SELECT * FROM commands WHERE command_id = $1")
        .bind(id)
        .fetch_optional(&st.store.pool)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("command_not_found", format!("no command {id}")))
}

/// Commands nobody acknowledged before they expired end as `expired`.
pub async fn expire_commands(st: &AppState) -> Result<(), ApiError> {
    sqlx::query("UPDATE commands SET state = 'expired', updated_at = now() WHERE state IN ('pending', 'published') AND expires_at < now()")
        .execute(&st.store.pool)
        .await?;
    Ok(())
}

pub async fn list_sessions(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Session>>, ApiError> {
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
            .sessions(
                q.device_id.as_deref(),
                q.state.as_deref(),
                q.limit.unwrap_or(100).clamp(1, 1000),
            )
            .await?,
    ))
}

async fn session_or_404(st: &AppState, id: Uuid) -> Result<Session, ApiError> {
    st.store
        .session(id)
        .await?
        .ok_or_else(|| ApiError::NotFound("session_not_found", format!("no session {id}")))
}

pub async fn get_session(
    State(st): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(session_or_404(&st, id).await?))
}

/// Moves the session (pause, resume or abort) and sends the device the matching command
/// for the session's job.
async fn steer_session(st: &AppState, id: Uuid, event: Event) -> Result<Json<Session>, ApiError> {
    let actor = Actor::operator();
    let session = session_or_404(st, id).await?;
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
    issue_command(st, &session.device_id, action, &actor).await?;
    Ok(Json(session))
}

pub async fn pause_session(
    State(st): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<Session>, ApiError> {
    steer_session(&st, id, Event::Pause).await
}

pub async fn resume_session(
    State(st): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<Session>, ApiError> {
    steer_session(&st, id, Event::Resume).await
}

pub async fn abort_session(
    State(st): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<Session>, ApiError> {
    steer_session(&st, id, Event::Abort).await
}
