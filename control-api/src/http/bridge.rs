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
    /// The key-derived password; absent when `client_certificate` is true.
    #[serde(default)]
    pub password: Option<String>,
    /// The bridge verified a client certificate naming `client_id` (mutual TLS on the
    /// embedded broker): no password is checked.
    #[serde(default)]
    pub client_certificate: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Allow {
    pub allow: bool,
}

/// A device may connect as itself only: username = client id = a registered, enabled
/// device, with a fresh password signed by its key or a client certificate naming it
/// (verified by the bridge, which is trusted with every device's traffic anyway).
#[utoipa::path(
    post,
    path = "/v1/bridge/mqtt-auth",
    tag = "bridge",
    request_body = MqttAuth,
    responses(
        (status = 200, description = "Whether the broker lets the client in", body = Allow),
        openapi::BridgeBodyProblems,
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
    let password = match (&req.password, req.client_certificate) {
        (None, true) => return Ok(Json(Allow { allow: true })),
        (Some(password), false) => password,
        (Some(_), true) => return deny("both a password and a client certificate"),
        (None, false) => return deny("no password"),
    };
    let Ok(key) = sign::decode_public(&device.public_key) else {
        return deny("stored key invalid");
    };
    match sign::verify_mqtt_password(&key, &device.device_id, password) {
        Ok(ts) if (unix_now() - ts).abs() <= st.config.replay_window_secs as i64 => {
            Ok(Json(Allow { allow: true }))
        }
        Ok(ts) => deny(&format!(
            "password too old: {}",
            super::error::clock_advice(ts - unix_now(), st.config.replay_window_secs)
        )),
        Err(_) => deny("bad password"),
    }
}

/// Why a presence status is refused, or `None` to take it. A status must be signed by the
/// device's key; then it is taken when it is not older than the newest taken so far
/// (`ts_ms`, and `offline` after `online` at the same `ts_ms`: a connection's Last Will
/// after its own `online`), or when it says `online` and is fresh (`ts_ms` within the replay
/// window: a gateway whose clock stepped back still comes online).
pub fn presence_refusal(
    status: &Status,
    device_id: &str,
    key: &sign::PublicKey,
    newest: Option<(i64, bool)>,
    now_ms: i64,
    window_ms: i64,
) -> Option<ApiError> {
    if status.verify(key, device_id).is_err() {
        return Some(ApiError::Unauthorized(
            "bad_signature",
            format!("status of {device_id} is not signed by its key"),
        ));
    }
    let Some(ts) = status.ts_ms else {
        return Some(ApiError::BadRequest(
            "invalid_status",
            "status has no ts_ms".into(),
        ));
    };
    let online = status.state == Presence::Online;
    // Order: time, then offline after online.
    let rank = |ts: i64, online: bool| (ts, !online);
    let newer = newest.is_none_or(|(t, on)| rank(ts, online) >= rank(t, on));
    let fresh = online && (now_ms - ts).abs() <= window_ms;
    if newer || fresh {
        None
    } else {
        Some(ApiError::Conflict(
            "stale_status",
            format!("status of {device_id} is older than the newest one taken"),
        ))
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
        (status = 409, response = openapi::Conflict),
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
    let row: Option<(String, Option<i64>, bool)> = sqlx::query_as(
        "SELECT public_key, presence_ts_ms, online FROM devices WHERE device_id = $1 FOR UPDATE",
    )
    .bind(&device_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((public_key, newest_ts, was_online)) = row else {
        return Err(ApiError::NotFound(
            "device_not_found",
            format!("no device {device_id}"),
        ));
    };
    let key = sign::decode_public(&public_key)
        .map_err(|_| anyhow::anyhow!("stored key of {device_id} is invalid"))?;
    let now_ms = unix_now() * 1000;
    let window_ms = st.config.replay_window_secs as i64 * 1000;
    let newest = newest_ts.map(|t| (t, was_online));
    if let Some(refused) = presence_refusal(&status, &device_id, &key, newest, now_ms, window_ms) {
        tracing::warn!(%device_id, error = %refused, "Presence status refused");
        return Err(refused);
    }
    sqlx::query(
        "UPDATE devices SET online = $2, last_seen_at = now(), agent_version = COALESCE($3, agent_version),
                            queue_depth = COALESCE($4, queue_depth), presence_ts_ms = $5,
                            clock_offset_secs = COALESCE($6, clock_offset_secs),
                            free_disk_bytes = COALESCE($7, free_disk_bytes) WHERE device_id = $1",
    )
    .bind(&device_id)
    .bind(online)
    .bind(&status.agent_version)
    .bind(status.queue_depth.map(|q| q as i32))
    .bind(status.ts_ms)
    .bind(status.clock_offset_secs)
    .bind(status.free_disk_bytes.map(|b| b.min(i64::MAX as u64) as i64))
    .execute(&mut *tx)
    .await?;
    // A new connection (not a status update of the one already known: same `ts_ms`).
    let connected = online && (!was_online || newest_ts != status.ts_ms);
    if connected {
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

pub use crate::command_feed::DueCommand;

/// Lists due commands without claiming them (commands leased to a bridge are left out).
/// Kept for bridges older than `POST /v1/bridge/commands/claim`: two of those publish the
/// same commands.
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
    let rows: Vec<DueCommand> = sqlx::query_as(
        "SELECT c.command_id, c.device_id, c.envelope FROM commands c JOIN devices d USING (device_id)
         WHERE c.state IN ('pending', 'published') AND c.expires_at > now() AND d.online AND d.enabled
           AND (c.published_at IS NULL OR c.published_at < now() - make_interval(secs => $1))
           AND (c.lease_until IS NULL OR c.lease_until < now())
         ORDER BY c.created_at LIMIT $2",
    )
    .bind(st.config.command_resend_secs as f64)
    .bind(q.limit.unwrap_or(100).clamp(1, 1000))
    .fetch_all(&st.store.pool)
    .await?;
    Ok(Json(rows))
}

/// The longest a claim may wait for a command.
pub const MAX_CLAIM_WAIT_MS: u64 = 30_000;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Who claims: the bridge's name (its broker client id), 1-128 characters. Recorded
    /// as the command's `claimed_by`.
    pub bridge: String,
    /// At most this many commands (1-1000, default 100).
    pub limit: Option<i64>,
    /// When none is due, wait this long for one (0-30000 ms, default 0).
    pub wait_ms: Option<u64>,
}

/// Claims due commands for the calling bridge, waiting up to `wait_ms` for one. Each
/// command returned is leased to the caller for `command_lease_secs`: no other bridge gets
/// it until the caller reports it published or the lease runs out.
#[utoipa::path(
    post,
    path = "/v1/bridge/commands/claim",
    tag = "bridge",
    request_body = ClaimRequest,
    responses(
        (status = 200, description = "Commands leased to the caller, oldest first; empty when none came due within wait_ms", body = Vec<DueCommand>),
        openapi::BridgeBodyProblems,
    ),
    security(("bridge" = []))
)]
pub async fn claim_commands(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> Result<Json<Vec<DueCommand>>, ApiError> {
    let limit = req.limit.unwrap_or(100);
    let wait_ms = req.wait_ms.unwrap_or(0);
    if req.bridge.is_empty()
        || req.bridge.chars().count() > 128
        || req.bridge.chars().any(char::is_control)
        || !(1..=1000).contains(&limit)
        || wait_ms > MAX_CLAIM_WAIT_MS
    {
        return Err(ApiError::BadRequest(
            "invalid_claim",
            format!(
                "bridge must be 1-128 printable characters, limit 1-1000 and wait_ms 0-{MAX_CLAIM_WAIT_MS}"
            ),
        ));
    }
    expire_commands(&st).await?;
    let feed = &st.command_feed;
    // Before the first claim: a command stored after it wakes this wait.
    let mut woken = feed.subscribe();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    let lease = std::time::Duration::from_secs(st.config.command_lease_secs);
    let resend = std::time::Duration::from_secs(st.config.command_resend_secs);
    let recheck = std::time::Duration::from_secs(st.config.command_recheck_secs);
    loop {
        let claimed =
            crate::command_feed::claim(&st.store.pool, &req.bridge, limit, lease, resend, recheck)
                .await?;
        if !claimed.is_empty() {
            tracing::debug!(bridge = %req.bridge, count = claimed.len(), "Commands claimed");
            return Ok(Json(claimed));
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return Ok(Json(Vec::new())),
            () = feed.closing().cancelled() => return Ok(Json(Vec::new())),
            changed = woken.changed() => {
                if changed.is_err() {
                    return Ok(Json(Vec::new()));
                }
            }
        }
    }
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
    crate::command_feed::published(&st.store.pool, &[id]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The most command ids one `published` report may carry.
pub const MAX_PUBLISHED_BATCH: usize = 1000;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishedReport {
    /// The commands the bridge published (1-1000).
    pub command_ids: Vec<Uuid>,
}

/// Reports several commands published at once (a claim's batch): for each, the lease ends
/// and the `command_resend_secs` clock starts. Unknown ids are ignored.
#[utoipa::path(
    post,
    path = "/v1/bridge/commands/published",
    tag = "bridge",
    request_body = PublishedReport,
    responses(
        (status = 204, description = "Recorded"),
        openapi::BridgeBodyProblems,
    ),
    security(("bridge" = []))
)]
pub async fn commands_published(
    State(st): State<AppState>,
    ApiJson(report): ApiJson<PublishedReport>,
) -> Result<StatusCode, ApiError> {
    if !(1..=MAX_PUBLISHED_BATCH).contains(&report.command_ids.len()) {
        return Err(ApiError::BadRequest(
            "invalid_batch",
            format!("command_ids must hold 1 to {MAX_PUBLISHED_BATCH} ids"),
        ));
    }
    crate::command_feed::published(&st.store.pool, &report.command_ids).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: Presence, ts_ms: i64) -> Status {
        Status {
            v: 1,
            state,
            agent_version: None,
            queue_depth: None,
            free_disk_bytes: None,
            clock_offset_secs: None,
            ts_ms: Some(ts_ms),
            sig: None,
        }
    }

    #[test]
    fn presence_takes_only_signed_newer_statuses() {
        let key = sign::generate();
        let public = key.verifying_key();
        let window = 300_000;
        let now = 1_800_000_000_000;
        let code = |s: &Status, newest: Option<(i64, bool)>| {
            presence_refusal(s, "robot-17", &public, newest, now, window).map(|e| e.problem().code)
        };
        let online = |t| status(Presence::Online, t).signed(&key, "robot-17");
        let offline = |t| status(Presence::Offline, t).signed(&key, "robot-17");
        let (t1, t2) = (now - 3_600_000, now - 1000);

        // Unsigned, signed by another key or for another device: refused.
        assert_eq!(
            code(&status(Presence::Offline, t2), None).as_deref(),
            Some("bad_signature")
        );
        let other = status(Presence::Offline, t2).signed(&sign::generate(), "robot-17");
        assert_eq!(code(&other, None).as_deref(), Some("bad_signature"));
        let elsewhere = status(Presence::Offline, t2).signed(&key, "robot-18");
        assert_eq!(code(&elsewhere, None).as_deref(), Some("bad_signature"));

        // A connection at t1: online, then its Last Will (same ts) is newer.
        assert_eq!(code(&online(t1), None), None);
        assert_eq!(code(&offline(t1), Some((t1, true))), None);
        // A queue-depth update of the same connection is taken while online...
        assert_eq!(code(&online(t1), Some((t1, true))), None);
        // ...but replayed after the will (and no longer fresh), it is refused.
        assert_eq!(
            code(&online(t1), Some((t1, false))).as_deref(),
            Some("stale_status")
        );
        // The next connection at t2 comes online; the old will replayed is refused.
        assert_eq!(code(&online(t2), Some((t1, false))), None);
        assert_eq!(
            code(&offline(t1), Some((t2, true))).as_deref(),
            Some("stale_status")
        );
        // A fresh online is taken even when the gateway's clock stepped back.
        assert_eq!(code(&online(t2 - 5000), Some((t2, false))), None);
    }
}
