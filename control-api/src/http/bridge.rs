//! The bridge API: broker authentication, presence, and the command pump. Bearer `bridge_token`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use uplink_protocol::telemetry::{Presence, Status};
use uplink_protocol::{sign, unix_now};
use uuid::Uuid;

use super::error::ApiError;
use super::operator::expire_commands;
use super::{openapi, ApiJson, ApiPath, ApiQuery};
use crate::AppState;

#[derive(Deserialize, utoipa::ToSchema)]
pub struct MqttAuth {
    pub client_id: String,
    pub username: String,
    pub password: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Allow {
    pub allow: bool,
}

/// A device may connect as itself only: username = client id = a registered, enabled
/// device, and a fresh password signed by its key.
#[utoipa::path(
    post,
    path = "/v1/bridge/mqtt-auth",
    tag = "bridge",
    request_body = MqttAuth,
    responses(
        (status = 200, description = "Whether the broker lets the client in", body = Allow),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, response = openapi::Unprocessable),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bridge" = []))
)]
pub async fn mqtt_auth(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<MqttAuth>,
) -> Result<Json<Allow>, ApiError> {
    let deny = |reason: &str| {
        tracing::info!(client_id = %req.client_id, %reason, "MQTT connection refused");
        Ok(Json(Allow { allow: false }))
    };
    if req.username != req.client_id {
        return deny("username differs from client id");
    }
    let Some(device) = st.store.device(&req.username).await? else {
        return deny("unknown device");
    };
    if !device.enabled {
        return deny("device disabled");
    }
    let Ok(key) = sign::decode_public(&device.public_key) else {
        return deny("stored key invalid");
    };
    match sign::verify_mqtt_password(&key, &device.device_id, &req.password) {
        Ok(ts) if (unix_now() - ts).abs() <= st.config.replay_window_secs as i64 => {
            Ok(Json(Allow { allow: true }))
        }
        Ok(_) => deny("password too old"),
        Err(_) => deny("bad password"),
    }
}

#[utoipa::path(
    put,
    path = "/v1/bridge/devices/{id}/presence",
    tag = "bridge",
    params(("id" = String, Path, description = "Device id")),
    request_body = Status,
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 404, response = openapi::NotFound),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, response = openapi::Unprocessable),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bridge" = []))
)]
pub async fn presence(
    State(st): State<AppState>,
    ApiPath(device_id): ApiPath<String>,
    ApiJson(status): ApiJson<Status>,
) -> Result<StatusCode, ApiError> {
    let online = status.state == Presence::Online;
    let mut tx = st.store.pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE devices SET online = $2, last_seen_at = now(), agent_version = COALESCE($3, agent_version),
                            queue_depth = COALESCE($4, queue_depth) WHERE device_id = $1",
    )
    .bind(&device_id)
    .bind(online)
    .bind(&status.agent_version)
    .bind(status.queue_depth.map(|q| q as i32))
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(ApiError::NotFound(
            "device_not_found",
            format!("no device {device_id}"),
        ));
    }
    if online {
        // A device that (re)connects gets its unacknowledged commands again at once.
        sqlx::query("UPDATE commands SET published_at = NULL WHERE device_id = $1 AND state IN ('pending', 'published')")
            .bind(&device_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    tracing::info!(%device_id, online, "Device presence");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DueQuery {
    /// At most this many (1-1000, default 100; other values are clamped).
    pub limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DueCommand {
    pub command_id: Uuid,
    pub device_id: String,
    /// The signed command envelope to publish on the device's command topic.
    #[schema(value_type = Object)]
    pub envelope: serde_json::Value,
}

#[utoipa::path(
    get,
    path = "/v1/bridge/commands/due",
    tag = "bridge",
    params(DueQuery),
    responses(
        (status = 200, description = "Commands to publish now", body = Vec<DueCommand>),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bridge" = []))
)]
pub async fn due_commands(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<DueQuery>,
) -> Result<Json<Vec<DueCommand>>, ApiError> {
    expire_commands(&st).await?;
    let rows: Vec<(Uuid, String, serde_json::Value)> = sqlx::query_as(
        "SELECT c.command_id, c.device_id, c.envelope FROM commands c JOIN devices d USING (device_id)
         WHERE c.state IN ('pending', 'published') AND c.expires_at > now() AND d.online AND d.enabled
           AND (c.published_at IS NULL OR c.published_at < now() - make_interval(secs => $1))
         ORDER BY c.created_at LIMIT $2",
    )
    .bind(st.config.command_resend_secs as f64)
    .bind(q.limit.unwrap_or(100).clamp(1, 1000))
    .fetch_all(&st.store.pool)
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|(command_id, device_id, envelope)| DueCommand {
                command_id,
                device_id,
                envelope,
            })
            .collect(),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/bridge/commands/{id}/published",
    tag = "bridge",
    params(("id" = Uuid, Path, description = "Command id")),
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bridge" = []))
)]
pub async fn command_published(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    sqlx::query(
        "UPDATE commands SET state = CASE WHEN state = 'pending' THEN 'published' ELSE state END,
                             published_at = now(), publish_count = publish_count + 1, updated_at = now()
         WHERE command_id = $1",
    )
    .bind(id)
    .execute(&st.store.pool)
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
