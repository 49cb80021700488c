//! `GET /v1/events` (long-poll over the sequenced audit log) and webhooks. See
//! [`crate::events`] for how events are sequenced and delivered.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::Caller;
use super::error::ApiError;
use super::operator::scope;
use super::projects::{admin_need, visible_project};
use super::{openapi, ApiJson, ApiPath, ApiQuery};
use crate::domain::access::Need;
use crate::events::{self, Event};
use crate::store::audit;
use crate::AppState;

/// The longest a long-poll waits.
pub const MAX_WAIT_SECS: u64 = 60;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Events with a greater `seq` (default 0: from the start).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// At most this many (1-1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Seconds to wait when there is nothing yet (0-60, default 0; held at most
    /// `events.long_poll_max_secs`).
    #[param(minimum = 0, maximum = 60)]
    pub wait: Option<u64>,
    /// Only this project's events.
    pub project_id: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Pass as `after` next time: the last event's `seq`, or `after` when there was none.
    pub next: i64,
}

/// Events after `after` that the caller may see, oldest first. With `wait`, an empty answer
/// is held until an event arrives, the wait ends or the API shuts down.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(EventQuery),
    responses(
        (status = 200, description = "Events after `after`, oldest first, and the `next` to pass", body = EventPage),
        openapi::QueryProblems,
    ),
    security(("operator" = []))
)]
pub async fn list_events(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<EventQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let project = scope(&caller, q.project_id.as_deref())?;
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(100);
    let wait = q.wait.unwrap_or(0);
    if after < 0 || !(1..=1000).contains(&limit) || wait > MAX_WAIT_SECS {
        return Err(ApiError::Unprocessable(
            "invalid_query",
            format!("after must be >= 0, limit 1-1000 and wait 0-{MAX_WAIT_SECS}"),
        ));
    }
    let wait = wait.min(st.config.events.long_poll_max_secs);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut latest = st.events.subscribe();
    loop {
        latest.borrow_and_update();
        let found = events::after(&st.store.pool, after, project, None, limit).await?;
        if !found.is_empty() || tokio::time::Instant::now() >= deadline {
            let next = found.last().map_or(after, |e| e.seq);
            return Ok(Json(EventPage {
                events: found,
                next,
            }));
        }
        // Woken by the relay; the second is a safety net should notifications stop.
        tokio::select! {
            _ = latest.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = st.events.closing().cancelled() => {
                return Ok(Json(EventPage { events: Vec::new(), next: after }));
            }
        }
    }
}

/// A webhook as the API shows it; the secret is shown only at creation.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Webhook {
    pub webhook_id: Uuid,
    pub project_id: Option<String>,
    pub url: String,
    pub actions: Option<Vec<String>>,
    pub cursor: i64,
    pub failures: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub last_delivered_at: Option<DateTime<Utc>>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

const WEBHOOK_COLUMNS: &str = "webhook_id, project_id, url, actions, cursor, failures, \
    next_attempt_at, last_error, last_delivered_at, created_by, created_at";

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    pub url: String,
    /// `None`: every project (needs an unscoped admin).
    pub project_id: Option<String>,
    /// Only these actions (`session.completed`, …); `None`: all.
    pub actions: Option<Vec<String>>,
    /// Deliver events after this `seq`; default: the newest now (only new events).
    pub after: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    pub webhook: Webhook,
    /// The HMAC-SHA256 key of `X-Uplink-Signature`. Shown once.
    pub secret: String,
}

fn check_webhook(req: &NewWebhook, allow_private: bool) -> Result<(), ApiError> {
    let invalid = |code, why: &str| Err(ApiError::Unprocessable(code, why.into()));
    match reqwest::Url::parse(&req.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            if let Err(why) = crate::egress::check_url(&u, allow_private) {
                return invalid("url_not_public", &format!("url refused: {why}"));
            }
        }
        _ => {
            return invalid(
                "invalid_url",
                "url must be an absolute http:// or https:// URL",
            )
        }
    }
    if req.url.len() > 2048 {
        return invalid("invalid_url", "url must be at most 2048 characters");
    }
    if let Some(actions) = &req.actions {
        let bad =
            |a: &String| a.is_empty() || a.len() > 64 || !a.chars().all(|c| c.is_ascii_graphic());
        if actions.is_empty() || actions.len() > 100 || actions.iter().any(bad) {
            return invalid(
                "invalid_actions",
                "actions must be 1-100 names of 1-64 printable ASCII characters",
            );
        }
    }
    if req.after.is_some_and(|a| a < 0) {
        return invalid("invalid_after", "after must be >= 0");
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/v1/webhooks",
    tag = "events",
    params(openapi::IdempotencyKey),
    request_body = NewWebhook,
    responses(
        (status = 201, description = "The webhook, with its secret (shown once)", body = CreatedWebhook),
        openapi::WriteProblems,
    ),
    security(("operator" = []))
)]
pub async fn create_webhook(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewWebhook>,
) -> Result<(StatusCode, Json<CreatedWebhook>), ApiError> {
    let project = req.project_id.as_deref();
    match project {
        Some(p) => {
            visible_project(&st, &caller, p, Need::Admin).await?;
        }
        None => caller.allow(None, Need::Global, super::no_such_endpoint)?,
    }
    check_webhook(&req, st.config.events.webhook_allow_private)?;
    let latest = events::latest(&st.store.pool).await?;
    let cursor = req.after.unwrap_or(latest);
    if cursor > latest {
        return Err(ApiError::Unprocessable(
            "invalid_after",
            format!("after {cursor} is beyond the newest event ({latest})"),
        ));
    }
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let secret = format!("whsec_{}", hex::encode(secret));
    let id = Uuid::new_v4();
    let mut tx = st.store.pool.begin().await?;
    let webhook: Webhook = sqlx::query_as(&format!(
        "INSERT INTO webhooks (webhook_id, project_id, url, secret, actions, cursor, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {WEBHOOK_COLUMNS}"
    ))
    .bind(id)
    .bind(project)
    .bind(&req.url)
    .bind(&secret)
    .bind(&req.actions)
    .bind(cursor)
    .bind(&caller.principal.name)
    .fetch_one(&mut *tx)
    .await?;
    audit(
        &mut tx,
        &caller.actor(),
        "webhook.create",
        &format!("webhook:{id}"),
        project,
        serde_json::json!({"actions": req.actions, "after": cursor}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(webhook = %id, project = ?project, "Webhook created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook { webhook, secret }),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WebhookQuery {
    /// Only this project's webhooks.
    pub project_id: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/webhooks",
    tag = "events",
    params(WebhookQuery),
    responses(
        (status = 200, description = "Webhooks (never their secrets)", body = Vec<Webhook>),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn list_webhooks(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<WebhookQuery>,
) -> Result<Json<Vec<Webhook>>, ApiError> {
    let project = scope(&caller, q.project_id.as_deref())?;
    Ok(Json(
        sqlx::query_as(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks
              WHERE ($1::text IS NULL OR project_id = $1) ORDER BY created_at"
        ))
        .bind(project)
        .fetch_all(&st.store.pool)
        .await?,
    ))
}

/// The webhook, if the caller may see it (a project webhook: that project; an unscoped
/// one: unscoped callers).
async fn visible_webhook(
    st: &AppState,
    caller: &Caller,
    id: &str,
    need: impl Fn(Option<&str>) -> Need,
) -> Result<Webhook, ApiError> {
    let missing = || ApiError::NotFound("webhook_not_found", format!("no webhook {id}"));
    let Ok(uuid) = Uuid::parse_str(id) else {
        return Err(missing());
    };
    let webhook: Webhook = sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE webhook_id = $1"
    ))
    .bind(uuid)
    .fetch_optional(&st.store.pool)
    .await?
    .ok_or_else(missing)?;
    let project = webhook.project_id.as_deref();
    if project.is_none() && caller.principal.project.is_some() {
        return Err(missing());
    }
    caller.allow(project, need(project), missing)?;
    Ok(webhook)
}

#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}",
    tag = "events",
    params(("id" = String, Path, description = "Webhook id")),
    responses(
        (status = 200, description = "The webhook", body = Webhook),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn get_webhook(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Webhook>, ApiError> {
    Ok(Json(
        visible_webhook(&st, &caller, &id, |_| Need::Read).await?,
    ))
}

/// Deletes a webhook: nothing more is delivered to it.
#[utoipa::path(
    delete,
    path = "/v1/webhooks/{id}",
    tag = "events",
    params(("id" = String, Path, description = "Webhook id"), openapi::IdempotencyKey),
    responses(
        (status = 204, description = "Deleted"),
        openapi::WriteProblems,
    ),
    security(("operator" = []))
)]
pub async fn delete_webhook(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let webhook = visible_webhook(&st, &caller, &id, admin_need).await?;
    let mut tx = st.store.pool.begin().await?;
    sqlx::query("DELETE FROM webhooks WHERE webhook_id = $1")
        .bind(webhook.webhook_id)
        .execute(&mut *tx)
        .await?;
    audit(
        &mut tx,
        &caller.actor(),
        "webhook.delete",
        &format!("webhook:{}", webhook.webhook_id),
        webhook.project_id.as_deref(),
        serde_json::json!({"cursor": webhook.cursor}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
