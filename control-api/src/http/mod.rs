//! HTTP routing. One module per audience: `device` (signed requests), `operator`, `bridge`;
//! `openapi` for the document every route is registered with.

pub mod auth;
pub mod bridge;
pub mod bridge_devices;
pub mod custody;
pub mod device;
pub mod download;
pub mod error;
pub mod events;
pub mod idempotency;
pub mod keys;
pub mod live;
pub mod openapi;
pub mod operator;
pub mod projects;
pub mod uploads;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tower_http::trace::TraceLayer;
use uplink_protocol::envelope::MAX_PAYLOAD_BYTES;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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

/// `Path` whose rejections (e.g. a session id that is not a UUID) are problem documents.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::BadRequest("invalid_parameter", e.body_text())),
        }
    }
}

/// `Query` whose rejections are problem documents.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(ApiError::BadRequest("invalid_parameter", e.body_text())),
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

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "public",
    responses((status = 200, description = "The process runs", body = openapi::Health)))]
async fn healthz() -> Json<openapi::Health> {
    Json(openapi::Health {
        status: "ok".into(),
    })
}

/// Ready when the database and the bucket answer.
#[utoipa::path(get, path = "/readyz", tag = "public",
    responses(
        (status = 200, description = "PostgreSQL and the bucket answer", body = openapi::Health),
        (status = 503, response = openapi::Unavailable),
    ))]
async fn readyz(State(st): State<AppState>) -> Result<Json<openapi::Health>, ApiError> {
    sqlx::query("SELECT 1").execute(&st.store.pool).await?;
    st.storage.check().await?;
    Ok(Json(openapi::Health {
        status: "ready".into(),
    }))
}

/// The public key agents pin to verify commands.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct CommandKey {
    /// Base64 of the 32-byte Ed25519 public key.
    pub public_key: String,
    /// The key that will sign next (`command_next_key_file`), when a rotation is under way:
    /// pin it beside `public_key` before the API switches to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
}

/// The key that signs commands and device answers.
#[utoipa::path(get, path = "/v1/command-key", tag = "public",
    responses((status = 200, description = "The command key", body = CommandKey)))]
async fn command_key(State(st): State<AppState>) -> Json<CommandKey> {
    // Checked at start; re-read so a file replaced since is announced as it is now.
    let next_public_key = st
        .config
        .command_next_key_file
        .as_deref()
        .and_then(|path| crate::load_command_key(path).ok())
        .map(|key| uplink_protocol::sign::encode_public(&key.verifying_key()));
    Json(CommandKey {
        public_key: uplink_protocol::sign::encode_public(&st.command_key.verifying_key()),
        next_public_key,
    })
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

/// Public routes: no authentication.
fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(crate::metrics::render))
        .routes(routes!(command_key))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(openapi::docs))
        .routes(routes!(device::device_op))
}

/// Operator routes: bearer operator token or API key (layers added by [`router`]).
fn operator_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(projects::create_project, projects::list_projects))
        .routes(routes!(projects::get_project, projects::patch_project))
        .routes(routes!(projects::create_dataset, projects::list_datasets))
        .routes(routes!(projects::get_dataset, projects::patch_dataset))
        .routes(routes!(projects::seal_dataset))
        .routes(routes!(projects::dataset_manifest))
        .routes(routes!(keys::create_key, keys::list_keys))
        .routes(routes!(keys::revoke_key))
        .routes(routes!(custody::session_manifest))
        .routes(routes!(operator::register_device, operator::list_devices))
        .routes(routes!(operator::get_device, operator::patch_device))
        .routes(routes!(operator::list_audit))
        .routes(routes!(events::list_events))
        .routes(routes!(live::live))
        .routes(routes!(events::create_webhook, events::list_webhooks))
        .routes(routes!(events::get_webhook, events::delete_webhook))
        .routes(routes!(operator::create_command))
        .routes(routes!(operator::list_commands))
        .routes(routes!(operator::get_command))
        .routes(routes!(operator::list_sessions))
        .routes(routes!(operator::get_session))
        .routes(routes!(operator::pause_session))
        .routes(routes!(operator::resume_session))
        .routes(routes!(operator::abort_session))
        .routes(routes!(uploads::create_upload))
        .routes(routes!(uploads::presign_parts))
        .routes(routes!(uploads::session_status))
        .routes(routes!(uploads::complete_upload))
        .routes(routes!(auth::whoami))
        .routes(routes!(download::download_link))
}

/// Bridge routes: bearer `bridge_token` (layer added by [`router`]).
fn bridge_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(bridge::mqtt_auth))
        .routes(routes!(bridge_devices::devices))
        .routes(routes!(bridge::presence))
        .routes(routes!(bridge::due_commands))
        .routes(routes!(bridge::claim_commands))
        .routes(routes!(bridge::command_published))
        .routes(routes!(bridge::commands_published))
}

/// The OpenAPI document of every route [`router`] serves: built from the same route lists.
pub fn openapi() -> utoipa::openapi::OpenApi {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(public_routes())
        .merge(operator_routes())
        .merge(bridge_routes())
        .into_openapi()
}

/// A method the path does not have.
async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed on this path (see Allow)".into())
}

pub fn router(state: AppState) -> Router {
    let operator = operator_routes()
        // Inner: runs only for authenticated operators.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::operator_idempotency,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let bridge = bridge_routes().route_layer(middleware::from_fn_with_state(
        state.clone(),
        require_bridge,
    ));
    let (router, _) = public_routes()
        .merge(operator)
        .merge(bridge)
        .split_for_parts();
    router
        .merge(crate::console::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_PAYLOAD_BYTES))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}
