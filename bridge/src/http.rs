//! The optional observability server on `http_listen`: `GET /healthz` (the process is up),
//! `GET /readyz` (broker connection and control API both usable) and `GET /metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::ApiClient;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    /// `true` while the bridge holds a broker connection.
    pub connected: watch::Receiver<bool>,
    pub api: ApiClient,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: HttpState, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "Serving /healthz, /readyz and /metrics");
    }
    if let Err(e) = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!(error = %e, "HTTP server failed");
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(st): State<HttpState>) -> Response {
    let mut down = Vec::new();
    if !*st.connected.borrow() {
        down.push("mqtt");
    }
    if !st.api.last_call_ok() && !st.api.healthz().await {
        down.push("control_api");
    }
    if down.is_empty() {
        Json(serde_json::json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unavailable", "down": down })),
        )
            .into_response()
    }
}

async fn metrics(State(st): State<HttpState>) -> Response {
    let connected = *st.connected.borrow();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(connected),
    )
        .into_response()
}
