//! Operator authentication: the bootstrap `operator_token`, or an API key
//! (`upk_{key_id}_{secret}`; only the SHA-256 of the secret is stored). Every operator
//! request gets a request id (its `X-Request-Id`, else its `Idempotency-Key`, else a new
//! one), echoed in the answer and written into the audit log.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::RngCore as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use uplink_protocol::valid_request_id;

use super::error::ApiError;
use super::{bearer, token_matches};
use crate::domain::access::{Denied, Need, Principal, Role};
use crate::store::Actor;
use crate::AppState;

pub const TOKEN_PREFIX: &str = "upk_";

/// The authenticated caller of an operator endpoint.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub request_id: String,
}

impl Caller {
    pub fn actor(&self) -> Actor {
        Actor {
            name: self.principal.name.clone(),
            request_id: Some(self.request_id.clone()),
        }
    }

    /// Checks `need` on `project`; a project the caller cannot see answers `missing` (404).
    pub fn allow(
        &self,
        project: Option<&str>,
        need: Need,
        missing: impl FnOnce() -> ApiError,
    ) -> Result<(), ApiError> {
        self.principal
            .check(project, need)
            .map_err(|denied| match denied {
                Denied::NotVisible => missing(),
                Denied::Forbidden => ApiError::Forbidden(
                    "forbidden",
                    match &self.principal.project {
                        Some(p) => format!(
                            "the {} role of project {p} cannot do this",
                            self.principal.role.as_str()
                        ),
                        None => format!("the {} role cannot do this", self.principal.role.as_str()),
                    },
                ),
            })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("operator route without auth")))
    }
}

/// A new key's token and the values stored for it.
pub struct NewToken {
    pub key_id: String,
    pub token: String,
    pub secret_hash: String,
}

pub fn new_token() -> NewToken {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut id);
    rand::thread_rng().fill_bytes(&mut secret);
    let key_id = hex::encode(id);
    let secret = hex::encode(secret);
    NewToken {
        token: format!("{TOKEN_PREFIX}{key_id}_{secret}"),
        secret_hash: hex::encode(Sha256::digest(secret.as_bytes())),
        key_id,
    }
}

async fn principal(st: &AppState, token: &str) -> Result<Option<Principal>, ApiError> {
    if token_matches(token, st.config.operator_token.expose()) {
        return Ok(Some(Principal::bootstrap()));
    }
    let Some((key_id, secret)) = token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|t| t.split_once('_'))
    else {
        return Ok(None);
    };
    let row: Option<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT secret_hash, role, project_id FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL",
    )
    .bind(key_id)
    .fetch_optional(&st.store.pool)
    .await?;
    let Some((hash, role, project)) = row else {
        return Ok(None);
    };
    // Both sides are digests of high-entropy secrets: comparing them leaks nothing useful.
    if hex::encode(Sha256::digest(secret.as_bytes())) != hash {
        return Ok(None);
    }
    // At most one write a minute per key.
    sqlx::query(
        "UPDATE api_keys SET last_used_at = now() WHERE key_id = $1
         AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(key_id)
    .execute(&st.store.pool)
    .await?;
    Ok(Role::parse(&role).map(|role| Principal {
        name: format!("key:{key_id}"),
        role,
        project,
    }))
}

fn request_id(req: &Request) -> String {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| valid_request_id(v))
            .map(str::to_string)
    };
    header("x-request-id")
        .or_else(|| header("idempotency-key"))
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

pub async fn authenticate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    // Owned: a borrow of the request must not live across the await (its body is not Sync).
    let token = bearer(&req).map(str::to_string);
    let request_id = request_id(&req);
    let principal = match token {
        Some(t) => match principal(&st, &t).await {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        },
        None => None,
    };
    let Some(principal) = principal else {
        return ApiError::Unauthorized(
            "unauthorized",
            "an operator bearer token or API key is required (it may be revoked)".into(),
        )
        .into_response();
    };
    req.extensions_mut().insert(Caller {
        principal,
        request_id: request_id.clone(),
    });
    let mut response = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// `GET /v1/whoami`: who the bearer token is and what it may do.
#[derive(Serialize, utoipa::ToSchema)]
pub struct WhoAmI {
    /// As in the audit log: `operator` (bootstrap token) or `key:{key_id}`.
    pub name: String,
    pub role: Role,
    /// The one project the key may see; `null`: every project.
    pub project_id: Option<String>,
}

/// The caller's identity, role and project scope (the console hides what it may not do;
/// the API enforces it anyway).
#[utoipa::path(
    get,
    path = "/v1/whoami",
    tag = "keys",
    responses(
        (status = 200, description = "The caller", body = WhoAmI),
        (status = 401, response = super::openapi::Unauthorized),
        (status = 503, response = super::openapi::Unavailable),
    ),
    security(("operator" = []))
)]
pub async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        name: caller.principal.name,
        role: caller.principal.role,
        project_id: caller.principal.project,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_their_id_and_only_a_hash_is_kept() {
        let t = new_token();
        let (id, secret) = t
            .token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|r| r.split_once('_'))
            .expect("token shape");
        assert_eq!(id, t.key_id);
        assert_eq!(secret.len(), 64);
        assert!(!t.secret_hash.contains(secret));
        assert_eq!(
            t.secret_hash,
            hex::encode(Sha256::digest(secret.as_bytes()))
        );
        assert_ne!(new_token().token, t.token);
    }
}
