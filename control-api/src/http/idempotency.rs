//! `Idempotency-Key` on state-changing operator calls: the first answer (anything but a 5xx)
//! to a key is stored and replayed for every retry with the same method, path and body; the
//! same key with a different request is refused with 422.

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use uplink_protocol::envelope::MAX_PAYLOAD_BYTES;
use uplink_protocol::{sha256_hex, valid_request_id};

use super::error::ApiError;
use crate::AppState;

#[derive(sqlx::FromRow)]
struct Stored {
    method: String,
    path: String,
    body_sha256: String,
    status: i32,
    content_type: Option<String>,
    response: Vec<u8>,
}

pub async fn operator_idempotency(
    State(st): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let Some(key) = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return next.run(req).await;
    };
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    // Keys are per caller: two API keys never see each other's answers.
    let caller = req
        .extensions()
        .get::<super::auth::Caller>()
        .map(|c| c.principal.name.clone())
        .unwrap_or_default();
    match replay_or_run(&st, caller, key, req, next).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn replay_or_run(
    st: &AppState,
    caller: String,
    key: String,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !valid_request_id(&key) {
        return Err(ApiError::BadRequest(
            "invalid_idempotency_key",
            "Idempotency-Key is 1-64 of [A-Za-z0-9_-]".into(),
        ));
    }
    let shown = key;
    let key = format!("{caller}:{shown}");
    let (parts, body) = req.into_parts();
    let body = to_bytes(body, MAX_PAYLOAD_BYTES).await.map_err(|_| {
        ApiError::PayloadTooLarge(format!(
            "request bodies are limited to {MAX_PAYLOAD_BYTES} bytes"
        ))
    })?;
    let method = parts.method.to_string();
    let path = parts.uri.path().to_string();
    let digest = sha256_hex(&body);

    let mut tx = st.store.locks.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('operator'), hashtext($1))")
        .bind(&key)
        .execute(&mut *tx)
        .await?;
    let stored: Option<Stored> = sqlx::query_as(
        "SELECT method, path, body_sha256, status, content_type, response FROM operator_requests WHERE idempotency_key = $1",
    )
    .bind(&key)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(Stored {
        method: m,
        path: p,
        body_sha256,
        status,
        content_type,
        response,
    }) = stored
    {
        if m != method || p != path || body_sha256 != digest {
            return Err(ApiError::Unprocessable(
                "idempotency_key_reused",
                format!("Idempotency-Key {shown} was already used for a different request"),
            ));
        }
        let mut r = Response::new(Body::from(response));
        *r.status_mut() = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
        if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
            r.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return Ok(r);
    }

    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    if response.status().is_server_error() {
        // Not stored: a retry must run the call again.
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let bytes = to_bytes(body, 16 * 1024 * 1024)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("buffer response: {e}")))?;
    sqlx::query(
        "INSERT INTO operator_requests (idempotency_key, method, path, body_sha256, status, content_type, response)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&key)
    .bind(&method)
    .bind(&path)
    .bind(&digest)
    .bind(i32::from(parts.status.as_u16()))
    .bind(parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()))
    .bind(bytes.as_ref())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Response::from_parts(parts, Body::from(bytes)))
}
