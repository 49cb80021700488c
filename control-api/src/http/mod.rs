//! HTTP routing. One module per audience: `device` (signed requests), `operator`, `bridge`.

pub mod auth;
pub mod bridge;
pub mod device;
pub mod error;
pub mod events;
pub mod idempotency;
pub mod operator;
pub mod projects;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tower_http::trace::TraceLayer;
use uplink_protocol::envelope::MAX_PAYLOAD_BYTES;

use self::error::ApiError;
use crate::AppState;

/// `Json` whose rejections are problem documents.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(e)) => Err(ApiError::PayloadTooLarge(e.body_text())),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::BadRequest(
                "unsupported_media_type",
                "send Content-Type: application/json".into(),
            )),
            Err(JsonRejection::JsonSyntaxError(e)) => {
                Err(ApiError::BadRequest("malformed_json", e.body_text()))
            }
            Err(e) => Err(ApiError::Unprocessable("invalid_body", e.body_text())),
        }
    }
}

fn token_matches(given: &str, expected: &str) -> bool {
    // Compare digests so the comparison time does not depend on where the tokens differ.
    Sha256::digest(given.as_bytes()) == Sha256::digest(expected.as_bytes())
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn require_bridge(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match bearer(&req) {
        Some(t) if token_matches(t, st.config.bridge_token.expose()) => next.run(req).await,
        _ => ApiError::Unauthorized("unauthorized", "bridge bearer token required".into())
            .into_response(),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Ready when the database and the bucket answer.
async fn readyz(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    sqlx::query("SELECT 1").execute(&st.store.pool).await?;
    st.storage.check().await?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

async fn command_key(State(st): State<AppState>) -> Json<serde_json::Value> {
    Json(
        serde_json::json!({"public_key": uplink_protocol::sign::encode_public(&st.command_key.verifying_key())}),
    )
}

/// The answer for a path that does not exist (or that the caller may not know exists).
pub(crate) fn no_such_endpoint() -> ApiError {
    ApiError::NotFound("not_found", "no such endpoint".into())
}

async fn not_found() -> ApiError {
    no_such_endpoint()
}

/// Every log line of a request carries its id: the bridge's `X-Request-Id`
/// (`device:request_id`), else the `Idempotency-Key`. Only the path is logged, never a query.
/// With trace export on, the span joins the caller's trace (`traceparent`).
fn request_span(req: &Request) -> tracing::Span {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let request_id = header("x-request-id")
        .or_else(|| header("idempotency-key"))
        .unwrap_or("-");
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), %request_id);
    uplink_service::otel::extract(&span, |name| header(name).map(str::to_owned));
    span
}

pub fn router(state: AppState) -> Router {
    let operator = Router::new()
        .route(
            "/v1/projects",
            post(projects::create_project).get(projects::list_projects),
        )
        .route(
            "/v1/projects/{id}",
            get(projects::get_project).patch(projects::patch_project),
        )
        .route(
            "/v1/projects/{id}/datasets",
            post(projects::create_dataset).get(projects::list_datasets),
        )
        .route(
            "/v1/projects/{id}/datasets/{name}",
            get(projects::get_dataset).patch(projects::patch_dataset),
        )
        .route(
            "/v1/projects/{id}/datasets/{name}/seal",
            post(projects::seal_dataset),
        )
        .route(
            "/v1/projects/{id}/datasets/{name}/manifest",
            get(projects::dataset_manifest),
        )
        .route(
            "/v1/keys",
            post(projects::create_key).get(projects::list_keys),
        )
        .route("/v1/keys/{id}", delete(projects::revoke_key))
        .route(
            "/v1/sessions/{id}/manifest",
            get(projects::session_manifest),
        )
        .route(
            "/v1/devices",
            post(operator::register_device).get(operator::list_devices),
        )
        .route(
            "/v1/devices/{id}",
            get(operator::get_device).patch(operator::patch_device),
        )
        .route("/v1/audit", get(operator::list_audit))
        .route("/v1/events", get(events::list_events))
        .route(
            "/v1/webhooks",
            post(events::create_webhook).get(events::list_webhooks),
        )
        .route(
            "/v1/webhooks/{id}",
            get(events::get_webhook).delete(events::delete_webhook),
        )
        .route("/v1/devices/{id}/commands", post(operator::create_command))
        .route("/v1/commands", get(operator::list_commands))
        .route("/v1/commands/{id}", get(operator::get_command))
        .route("/v1/sessions", get(operator::list_sessions))
        .route("/v1/sessions/{id}", get(operator::get_session))
        .route("/v1/sessions/{id}/pause", post(operator::pause_session))
        .route("/v1/sessions/{id}/resume", post(operator::resume_session))
        .route("/v1/sessions/{id}/abort", post(operator::abort_session))
        // Inner: runs only for authenticated operators.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::operator_idempotency,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let bridge = Router::new()
        .route("/v1/bridge/mqtt-auth", post(bridge::mqtt_auth))
        .route("/v1/bridge/devices/{id}/presence", put(bridge::presence))
        .route("/v1/bridge/commands/due", get(bridge::due_commands))
        .route(
            "/v1/bridge/commands/{id}/published",
            post(bridge::command_published),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_bridge,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::render))
        .route("/v1/command-key", get(command_key))
        .route("/v1/device/{op}", post(device::device_op))
        .merge(operator)
        .merge(bridge)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_PAYLOAD_BYTES))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}
