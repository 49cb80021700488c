//! The device API: `POST /v1/device/{op}`, authenticated by the device's Ed25519 signature.
//!
//! Every op except `progress` is idempotent on (device, `Idempotency-Key`): the first
//! answer (success or 4xx) is stored and returned for every duplicate with the same body;
//! a different body under the same key is refused with 422.

use std::borrow::Cow;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use uplink_protocol::command::{AckState, CommandAck};
use uplink_protocol::envelope::answer_canonical;
use uplink_protocol::ops::{CompleteSession, Op, PresignParts, SessionInfo, SessionRef};
use uplink_protocol::sign::{self, RequestToSign};
use uplink_protocol::telemetry::Progress;
use uplink_protocol::{sha256_hex, topics, unix_now, valid_request_id};
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema as _, ToSchema as _};

use super::error::ApiError;
use super::openapi;
use crate::store::{Actor, Device};
use crate::{sessions, AppState};

pub const DEVICE_HEADER: &str = "x-uplink-device";
pub const TIMESTAMP_HEADER: &str = "x-uplink-timestamp";
pub const SIGNATURE_HEADER: &str = "x-uplink-signature";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// The API's signature over its answer (see `uplink_protocol::envelope::answer_canonical`).
pub const ANSWER_SIGNATURE_HEADER: &str = "x-uplink-answer-signature";

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::Unauthorized("missing_header", format!("the {name} header is required"))
        })
}

pub fn parse_body<T: DeserializeOwned>(body: &str) -> Result<T, ApiError> {
    serde_json::from_str(body)
        .map_err(|e| ApiError::Unprocessable("invalid_body", format!("body: {e}")))
}

/// A device request whose signature, device and timestamp have been checked.
struct Verified {
    /// The registered device that signed the request.
    device: Device,
    request_id: String,
    op: Op,
    body: String,
    ts: i64,
    signature: String,
}

async fn verify(
    st: &AppState,
    op: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Verified, ApiError> {
    let op = Op::parse(op)
        .ok_or_else(|| ApiError::NotFound("unknown_op", format!("unknown op {op:?}")))?;
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) => ApiError::PayloadTooLarge(format!(
            "request bodies are limited to {} bytes",
            uplink_protocol::envelope::MAX_PAYLOAD_BYTES
        )),
        e => ApiError::BadRequest("unreadable_body", e.to_string()),
    })?;
    let body = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::BadRequest("invalid_body", "body is not UTF-8".into()))?;
    let device_id = header(headers, DEVICE_HEADER)?;
    let request_id = header(headers, IDEMPOTENCY_HEADER)?;
    let ts: i64 = header(headers, TIMESTAMP_HEADER)?.parse().map_err(|_| {
        ApiError::Unauthorized("bad_timestamp", "timestamp must be Unix seconds".into())
    })?;
    let sig = header(headers, SIGNATURE_HEADER)?;
    if !topics::valid_device_id(device_id) {
        return Err(ApiError::Unauthorized(
            "unknown_device",
            "invalid device id".into(),
        ));
    }
    if !valid_request_id(request_id) {
        return Err(ApiError::BadRequest(
            "invalid_request_id",
            "request ids are 1-64 of [A-Za-z0-9_-]".into(),
        ));
    }
    let device = st.store.device(device_id).await?.ok_or_else(|| {
        ApiError::Unauthorized(
            "unknown_device",
            format!("device {device_id} is not registered"),
        )
    })?;
    let key = sign::decode_public(&device.public_key).map_err(|_| {
        ApiError::Internal(anyhow::anyhow!(
            "stored public key of {device_id} is invalid"
        ))
    })?;
    RequestToSign {
        device_id,
        op: op.as_str(),
        request_id,
        ts,
        body: &body,
    }
    .verify(&key, sig)
    .map_err(|e| ApiError::Unauthorized("bad_signature", e.to_string()))?;
    if !device.enabled {
        return Err(ApiError::Forbidden(
            "device_disabled",
            format!("device {device_id} is disabled"),
        ));
    }
    let (window, now) = (st.config.replay_window_secs, unix_now());
    if (now - ts).abs() > window as i64 {
        return Err(ApiError::StaleRequest {
            offset: ts - now,
            window,
            server_time: now,
        });
    }
    Ok(Verified {
        request_id: request_id.to_string(),
        op,
        body,
        ts,
        signature: sig.to_string(),
        device,
    })
}

/// The device op path parameter: one of [`Op::ALL`].
pub struct OpName;

impl utoipa::PartialSchema for OpName {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(Op::ALL.map(Op::as_str)))
            .into()
    }
}

impl utoipa::ToSchema for OpName {}

/// `anyOf` the given schemas, registering each of them.
fn any_of<const N: usize>(
    items: [(Cow<'static, str>, RefOr<Schema>); N],
    description: &str,
) -> RefOr<Schema> {
    let mut any = AnyOfBuilder::new().description(Some(description));
    for (name, _) in &items {
        any = any.item(Ref::from_schema_name(name.clone()));
    }
    any.into()
}

/// A device request body: which one depends on the op (docs/protocol.md).
pub struct DeviceRequest;

/// Schemas of the device request bodies.
fn request_schemas() -> [(Cow<'static, str>, RefOr<Schema>); 6] {
    use uplink_protocol::ops::{CompleteSession, CreateSession, PresignParts};
    [
        (CreateSession::name(), CreateSession::schema()),
        (PresignParts::name(), PresignParts::schema()),
        (SessionRef::name(), SessionRef::schema()),
        (CompleteSession::name(), CompleteSession::schema()),
        (CommandAck::name(), CommandAck::schema()),
        (Progress::name(), Progress::schema()),
    ]
}

impl utoipa::PartialSchema for DeviceRequest {
    fn schema() -> RefOr<Schema> {
        any_of(
            request_schemas(),
            "session.create: CreateSession; parts.presign: PresignParts; session.status and \
             session.abort: SessionRef; session.complete: CompleteSession; command.ack: \
             CommandAck; progress: Progress",
        )
    }
}

impl utoipa::ToSchema for DeviceRequest {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        use uplink_protocol::ops::{CompleteSession, CreateSession, PresignParts};
        CreateSession::schemas(schemas);
        PresignParts::schemas(schemas);
        SessionRef::schemas(schemas);
        CompleteSession::schemas(schemas);
        CommandAck::schemas(schemas);
        Progress::schemas(schemas);
        schemas.extend(request_schemas().map(|(n, s)| (n.into_owned(), s)));
    }
}

/// A device answer: which one depends on the op.
pub struct DeviceAnswer;

/// `{}`: the answer to `command.ack` and `progress`.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(max_properties = 0)]
pub struct Empty {}

fn answer_schemas() -> [(Cow<'static, str>, RefOr<Schema>); 3] {
    use uplink_protocol::ops::{PresignedParts, SessionInfo};
    [
        (SessionInfo::name(), SessionInfo::schema()),
        (PresignedParts::name(), PresignedParts::schema()),
        (Empty::name(), Empty::schema()),
    ]
}

impl utoipa::PartialSchema for DeviceAnswer {
    fn schema() -> RefOr<Schema> {
        any_of(
            answer_schemas(),
            "parts.presign: PresignedParts; command.ack and progress: {}; the session ops: SessionInfo",
        )
    }
}

impl utoipa::ToSchema for DeviceAnswer {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        use uplink_protocol::ops::{PresignedParts, SessionInfo};
        SessionInfo::schemas(schemas);
        PresignedParts::schemas(schemas);
        schemas.extend(answer_schemas().map(|(n, s)| (n.into_owned(), s)));
    }
}

/// Headers of a device request (docs/protocol.md).
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct DeviceHeaders {
    /// The device id.
    #[serde(rename = "X-Uplink-Device")]
    device: String,
    /// Unix seconds; within `replay_window_secs` of the server's clock.
    #[serde(rename = "X-Uplink-Timestamp")]
    timestamp: i64,
    /// Base64 Ed25519 signature over device, op, request id, timestamp and body.
    #[serde(rename = "X-Uplink-Signature")]
    signature: String,
    /// The request id: 1-64 of `[A-Za-z0-9_-]`; a retry with the same id and body gets the
    /// stored answer.
    #[serde(rename = "Idempotency-Key")]
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    request_id: String,
}

/// A device request, signed by the device's key. The answer (also a refusal) is signed with
/// the command key in `X-Uplink-Answer-Signature` when the request named a device and id.
#[utoipa::path(
    post,
    path = "/v1/device/{op}",
    tag = "device",
    params(("op" = inline(OpName), Path, description = "The op"), DeviceHeaders),
    request_body(content = DeviceRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The op's answer", body = DeviceAnswer,
            headers(("X-Uplink-Answer-Signature" = String, description = "The API's signature over the answer"))),
        (status = 201, description = "session.create: a new session", body = SessionInfo,
            headers(("X-Uplink-Answer-Signature" = String, description = "The API's signature over the answer"))),
        openapi::WriteConflictProblems,
    ),
    security(())
)]
pub async fn device_op(
    State(st): State<AppState>,
    Path(op): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (status, answer) = handle(&st, &op, &headers, body).await;
    st.counters.device_request(status);
    signed_answer(&st, &headers, status, answer)
}

/// The answer as HTTP, signed with the command key for the device and request id the
/// request named, so an agent can tell the API's answers from anyone else's (the bridge
/// copies the signature into the `res` envelope).
fn signed_answer(
    st: &AppState,
    headers: &HeaderMap,
    status: u16,
    answer: serde_json::Value,
) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = if status >= 400 {
        (
            code,
            [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
            answer.to_string(),
        )
            .into_response()
    } else {
        (code, Json(&answer)).into_response()
    };
    let named = |h| headers.get(h).and_then(|v| v.to_str().ok());
    if let (Some(device), Some(request_id)) = (named(DEVICE_HEADER), named(IDEMPOTENCY_HEADER)) {
        let sig = sign::sign_answer(
            &st.command_key,
            &answer_canonical(device, request_id, status, &answer),
        );
        if let Ok(v) = axum::http::HeaderValue::from_str(&sig) {
            response.headers_mut().insert(ANSWER_SIGNATURE_HEADER, v);
        }
    }
    response
}

/// A refusal as (status, problem document); causes of 5xx are logged, never sent.
fn refusal(e: ApiError) -> (u16, serde_json::Value) {
    let problem = e.logged_problem();
    (problem.status, to_json(&problem))
}

async fn handle(
    st: &AppState,
    op: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> (u16, serde_json::Value) {
    let req = match verify(st, op, headers, body).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(%op, code = %e.problem().code, "Device request refused");
            return refusal(e);
        }
    };
    if req.op == Op::Progress {
        return match progress(st, &req).await {
            Ok(()) => (200, serde_json::json!({})),
            Err(e) => refusal(e),
        };
    }
    match idempotent(st, &req).await {
        Ok(answer) => answer,
        Err(e) => refusal(e),
    }
}

/// Runs the op once per (device, request id) and returns the stored answer for duplicates.
async fn idempotent(st: &AppState, req: &Verified) -> Result<(u16, serde_json::Value), ApiError> {
    let digest = sha256_hex(req.body.as_bytes());
    // The transaction-scoped advisory lock serialises duplicates that arrive together; it is
    // released on commit or when the transaction is dropped.
    let mut tx = st.store.locks.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
        .bind(&req.device.device_id)
        .bind(&req.request_id)
        .execute(&mut *tx)
        .await?;
    let stored: Option<(String, String, i32, serde_json::Value)> = sqlx::query_as(
        "SELECT op, body_sha256, status, response FROM device_requests WHERE device_id = $1 AND request_id = $2",
    )
    .bind(&req.device.device_id)
    .bind(&req.request_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((op, body_sha256, status, response)) = stored {
        if op != req.op.as_str() || body_sha256 != digest {
            return Err(ApiError::Unprocessable(
                "idempotency_key_reused",
                format!(
                    "request id {} was already used for a different request",
                    req.request_id
                ),
            ));
        }
        tracing::debug!(device_id = %req.device.device_id, request_id = %req.request_id, "Duplicate request answered from store");
        return Ok((status as u16, response));
    }

    let (status, json) = match run_op(st, req).await {
        Ok(ok) => ok,
        // Transient failures are not stored: the retry must run the op again.
        Err(e @ (ApiError::Unavailable(..) | ApiError::Internal(_))) => return Err(e),
        Err(e) if matches!(&e, ApiError::Conflict("concurrent_update", _)) => return Err(e),
        Err(e) => {
            let problem = e.problem();
            (
                problem.status,
                serde_json::to_value(&problem).unwrap_or_default(),
            )
        }
    };
    sqlx::query(
        "INSERT INTO device_requests (device_id, request_id, op, body_sha256, status, response) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&req.device.device_id)
    .bind(&req.request_id)
    .bind(req.op.as_str())
    .bind(&digest)
    .bind(status as i32)
    .bind(&json)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((status, json))
}

fn to_json<T: serde::Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

async fn run_op(st: &AppState, req: &Verified) -> Result<(u16, serde_json::Value), ApiError> {
    let actor = Actor::device(&req.device.device_id, &req.request_id);
    let dev = req.device.device_id.as_str();
    match req.op {
        Op::SessionCreate => {
            let owner = sessions::Owner::Device(&req.device);
            let (status, info) =
                sessions::create(st, &owner, &actor, parse_body(&req.body)?).await?;
            Ok((status, to_json(info)))
        }
        Op::PartsPresign => {
            let r: PresignParts = parse_body(&req.body)?;
            let session = st.store.device_session(dev, r.session_id).await?;
            Ok((
                200,
                to_json(sessions::presign(st, session, &actor, r).await?),
            ))
        }
        Op::SessionStatus => {
            let r: SessionRef = parse_body(&req.body)?;
            let session = st.store.device_session(dev, r.session_id).await?;
            Ok((200, to_json(sessions::status(st, session).await?)))
        }
        Op::SessionComplete => {
            let signed = sessions::SignedRequest {
                device_id: req.device.device_id.clone(),
                op: req.op.as_str().to_string(),
                request_id: req.request_id.clone(),
                ts: req.ts,
                signature: req.signature.clone(),
                public_key: req.device.public_key.clone(),
                body: req.body.clone(),
            };
            let r: CompleteSession = parse_body(&req.body)?;
            let session = st.store.device_session(dev, r.session_id).await?;
            let info = sessions::complete(st, session, &actor, r, Some(signed)).await?;
            Ok((200, to_json(info)))
        }
        Op::SessionAbort => {
            let r: SessionRef = parse_body(&req.body)?;
            let session = st.store.device_session(dev, r.session_id).await?;
            let session = sessions::abort(st, session, &actor).await?;
            Ok((200, to_json(sessions::info(&session, vec![]))))
        }
        Op::CommandAck => {
            command_ack(st, &actor, &req.device, parse_body(&req.body)?).await?;
            Ok((200, serde_json::json!({})))
        }
        Op::Progress => Err(ApiError::Internal(anyhow::anyhow!(
            "progress is not idempotent-stored"
        ))),
    }
}

/// Records a command ack. States only move forward: a final state never changes.
async fn command_ack(
    st: &AppState,
    actor: &Actor,
    device: &Device,
    ack: CommandAck,
) -> Result<(), ApiError> {
    let device_id = device.device_id.as_str();
    // A device refuses a command before it takes it on: once `accepted`, only `done` or
    // `failed` end it (a device that answers a re-published command with `rejected`, say
    // because it has expired, does not undo the job it is carrying).
    let allowed_from: &[&str] = match ack.state {
        AckState::Accepted | AckState::Rejected => &["pending", "published"],
        _ => &["pending", "published", "accepted"],
    };
    let mut tx = st.store.pool.begin().await?;
    let owner: Option<(String,)> =
        sqlx::query_as("SELECT device_id FROM commands WHERE command_id = $1")
            .bind(ack.command_id)
            .fetch_optional(&mut *tx)
            .await?;
    if owner.map(|o| o.0) != Some(device_id.to_string()) {
        return Err(ApiError::NotFound(
            "command_not_found",
            format!("no command {} for this device", ack.command_id),
        ));
    }
    // Seconds since the command was issued, when this ack moved it on.
    let age: Option<f64> = sqlx::query_scalar(
        "UPDATE commands SET state = $2, reason = COALESCE($3, reason), session_id = COALESCE($4, session_id), updated_at = now()
         WHERE command_id = $1 AND state = ANY($5)
         RETURNING EXTRACT(EPOCH FROM now() - created_at)::float8",
    )
    .bind(ack.command_id)
    .bind(ack.state.as_str())
    .bind(&ack.reason)
    .bind(ack.session_id)
    .bind(allowed_from)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(age) = age {
        st.counters.command_acked(ack.state.is_final(), age);
        crate::store::audit(
            &mut tx,
            actor,
            "command.ack",
            &ack.command_id.to_string(),
            Some(&device.project_id),
            serde_json::json!({"state": ack.state.as_str(), "reason": ack.reason, "session_id": ack.session_id}),
        )
        .await?;
        tracing::info!(command_id = %ack.command_id, %device_id, state = ack.state.as_str(), reason = ?ack.reason, "Command acknowledged");
    }
    tx.commit().await?;
    Ok(())
}

async fn progress(st: &AppState, req: &Verified) -> Result<(), ApiError> {
    let p: Progress = parse_body(&req.body)?;
    sqlx::query(
        "UPDATE sessions SET bytes_done = LEAST($3, size), rate_bps = $4, updated_at = now()
         WHERE device_id = $1 AND job_id = $2 AND state IN ('created', 'uploading', 'paused', 'completing')",
    )
    .bind(&req.device.device_id)
    .bind(p.job_id)
    .bind(p.bytes_done.min(i64::MAX as u64) as i64)
    .bind(p.rate_bps.min(i64::MAX as u64) as i64)
    .execute(&st.store.pool)
    .await?;
    Ok(())
}
