//! The OpenAPI 3.1 document. Each handler carries a `#[utoipa::path]` attribute and the
//! router registers it with `routes!` (see [`super::router`]), so a route and its
//! description are one piece of code; [`super::openapi`] collects them. Served at
//! `GET /openapi.json`, with a docs page at `GET /docs`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uplink_protocol::problem::Problem;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{Modify, OpenApi};

/// The parts of the document that belong to no handler: title, tags, security schemes and
/// the problem responses every handler refers to.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Uplink control API",
        description = "Sessions, presigning, completion, devices, commands, projects and datasets. \
Every error is an RFC 7807 problem document (`application/problem+json`) with a stable `code`; \
see docs/api.md."
    ),
    modifiers(&SecuritySchemes),
    components(
        schemas(Problem),
        responses(BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unprocessable, Unavailable)
    ),
    tags(
        (name = "public", description = "No authentication"),
        (name = "device", description = "Signed by the device's Ed25519 key (docs/protocol.md)"),
        (name = "projects", description = "Projects, datasets and storage policies"),
        (name = "keys", description = "API keys"),
        (name = "devices", description = "Devices and their commands"),
        (name = "sessions", description = "Upload sessions and commands"),
        (name = "audit", description = "The append-only audit log"),
        (name = "events", description = "The audit log as a gap-free feed (long-poll) and HMAC-signed webhooks"),
        (name = "bridge", description = "For uplink-bridge: bearer `bridge_token`"),
    )
)]
pub struct ApiDoc;

/// Security scheme names used by the handlers' `security(...)`.
pub const OPERATOR: &str = "operator";
pub const BRIDGE: &str = "bridge";

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let mut bearer = |name: &str, what: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(what.to_string());
            components.add_security_scheme(name, SecurityScheme::Http(http));
        };
        bearer(
            OPERATOR,
            "The bootstrap `operator_token`, or an API key `upk_{key_id}_{secret}`",
        );
        bearer(
            BRIDGE,
            "The `bridge_token` (the operator token does not open it)",
        );
    }
}

// The problem answers, one per status. The `code` member says which problem it is.

/// 400: malformed JSON, a body that is not `application/json`, a bad path or query
/// parameter, a bad `Idempotency-Key`.
#[derive(utoipa::ToResponse)]
#[response(
    description = "Bad request (malformed_json, unsupported_media_type, invalid_parameter, invalid_idempotency_key, ...)",
    content_type = "application/problem+json"
)]
pub struct BadRequest(#[allow(dead_code)] Problem);

#[derive(utoipa::ToResponse)]
#[response(
    description = "Missing or wrong credentials (unauthorized; for devices: missing_header, bad_signature, unknown_device, stale_request, bad_timestamp)",
    content_type = "application/problem+json"
)]
pub struct Unauthorized(#[allow(dead_code)] Problem);

#[derive(utoipa::ToResponse)]
#[response(
    description = "The caller's role may not do this (forbidden; device_disabled)",
    content_type = "application/problem+json"
)]
pub struct Forbidden(#[allow(dead_code)] Problem);

#[derive(utoipa::ToResponse)]
#[response(
    description = "Not found, or not visible to the caller (`code` names what: device_not_found, project_not_found, ...)",
    content_type = "application/problem+json"
)]
pub struct NotFound(#[allow(dead_code)] Problem);

#[derive(utoipa::ToResponse)]
#[response(
    description = "Conflict with the current state (`code`: *_exists, invalid_state, dataset_busy, dataset_sealed, ...)",
    content_type = "application/problem+json"
)]
pub struct Conflict(#[allow(dead_code)] Problem);

#[derive(utoipa::ToResponse)]
#[response(
    description = "Body over 64 KiB (payload_too_large), or a session over the project's quota (quota_exceeded, with used, reserved, limit, requested)",
    content_type = "application/problem+json"
)]
pub struct PayloadTooLarge(#[allow(dead_code)] Problem);

#[derive(utoipa::ToResponse)]
#[response(
    description = "Well-formed but refused (invalid_body, invalid_*, idempotency_key_reused, ...)",
    content_type = "application/problem+json"
)]
pub struct Unprocessable(#[allow(dead_code)] Problem);

#[derive(utoipa::ToResponse)]
#[response(
    description = "The database or the storage is down (unavailable): retry",
    content_type = "application/problem+json"
)]
pub struct Unavailable(#[allow(dead_code)] Problem);

/// Declares a set of the problem answers above that many handlers share, so a handler
/// lists it once: `responses((status = 200, ...), openapi::ReadProblems)`. Each status
/// refers to the component, as `(status = N, response = openapi::X)` does.
macro_rules! problem_set {
    ($(#[$doc:meta])* $name:ident: $($status:literal => $problem:ident),+ $(,)?) => {
        $(#[$doc])*
        pub struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
                BTreeMap::from([$((
                    $status.to_string(),
                    RefOr::Ref(Ref::from_response_name(
                        <$problem as utoipa::ToResponse>::response().0,
                    )),
                )),+])
            }
        }
    };
}

problem_set!(
    /// A read: bad parameters, credentials, not found (or not visible), down.
    ReadProblems: 400 => BadRequest, 401 => Unauthorized, 404 => NotFound, 503 => Unavailable
);

problem_set!(
    /// A bridge call with a JSON body: no role to lack, nothing to find.
    BridgeBodyProblems: 400 => BadRequest, 401 => Unauthorized, 413 => PayloadTooLarge,
    422 => Unprocessable, 503 => Unavailable
);

problem_set!(
    /// A read with checked query values (a long-poll's `after` and `wait`).
    QueryProblems: 400 => BadRequest, 401 => Unauthorized, 404 => NotFound,
    422 => Unprocessable, 503 => Unavailable
);

problem_set!(
    /// A change: a read's problems, plus a role that may not, an oversized body and a
    /// refused one.
    WriteProblems: 400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound,
    413 => PayloadTooLarge, 422 => Unprocessable, 503 => Unavailable
);

problem_set!(
    /// A change that can also conflict with the current state (409).
    WriteConflictProblems: 400 => BadRequest, 401 => Unauthorized, 403 => Forbidden,
    404 => NotFound, 409 => Conflict, 413 => PayloadTooLarge, 422 => Unprocessable,
    503 => Unavailable
);

/// `Idempotency-Key` of a state-changing operator call (see docs/api.md).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKey {
    /// 1-64 of `[A-Za-z0-9_-]`, per caller: a retry with the same key, method, path and body
    /// gets the first answer again (`Idempotent-Replayed: true`); the same key with another
    /// request gets 422 `idempotency_key_reused`.
    #[serde(rename = "Idempotency-Key")]
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub idempotency_key: Option<String>,
}

/// `{"status": ...}` of `/healthz` and `/readyz`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok` (healthz) or `ready` (readyz).
    pub status: String,
}

/// The document, serialised once.
fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        super::openapi()
            .to_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    })
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "public",
    responses((status = 200, description = "The OpenAPI document", body = serde_json::Value, content_type = "application/json"))
)]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

/// The API reference, rendered in the browser from `/openapi.json`. The viewer script loads
/// from a CDN, pinned to one release and checked by the browser against its SHA-384
/// (subresource integrity), so a changed or compromised CDN file does not run. To move to a
/// newer release: `npm pack @scalar/api-reference@VERSION`, then
/// `openssl dgst -sha384 -binary package/dist/browser/standalone.js | openssl base64 -A`.
const DOCS_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Uplink control API</title>
</head>
<body>
<noscript>The API reference needs JavaScript; the document itself is at <a href="openapi.json">openapi.json</a>.</noscript>
<script id="api-reference" data-url="openapi.json"></script>
<script src="https://cdn.jsdelivr.net/npm/@scalar/api-reference@1.72.1/dist/browser/standalone.js"
 integrity="sha384-U11tb2XnKvmwt8RlTvnwUnYgrN+ur4Xyh9htLhjajWNR/Oyl5AX5DEz00qRmlrmK"
 crossorigin="anonymous"></script>
</body>
</html>
"#;

/// The API reference as a web page.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "public",
    responses((status = 200, description = "HTML page rendering /openapi.json", body = String, content_type = "text/html"))
)]
pub async fn docs() -> Html<&'static str> {
    Html(DOCS_PAGE)
}
