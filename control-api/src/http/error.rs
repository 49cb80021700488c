//! Every error the HTTP API returns, as an RFC 7807 problem document with a stable code.
//! Causes of 5xx answers are logged, never sent.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use uplink_protocol::problem::Problem;

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{1}")]
    BadRequest(&'static str, String),
    #[error("{1}")]
    Unauthorized(&'static str, String),
    #[error("{1}")]
    Forbidden(&'static str, String),
    #[error("{1}")]
    NotFound(&'static str, String),
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("{1}")]
    Unprocessable(&'static str, String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The project's quota cannot hold `requested` more bytes (413).
    #[error("project {project} quota exceeded")]
    QuotaExceeded {
        project: String,
        used: i64,
        reserved: i64,
        limit: i64,
        requested: i64,
    },
    /// A device's signed request whose `ts` is more than the replay window from the API's
    /// clock (401 `stale_request`): the problem says by how much and carries the API's
    /// clock (`server_time`, `clock_offset_secs`, `replay_window_secs`) so that the device
    /// can say why.
    #[error("request timestamp {offset:+} s from the server's clock")]
    StaleRequest {
        /// The request's `ts` minus the API's clock, seconds.
        offset: i64,
        window: u64,
        server_time: i64,
    },
    /// A dependency (database, storage) is down; the caller should retry.
    #[error("{0} unavailable: {1}")]
    Unavailable(&'static str, String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(..) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(..) | ApiError::StaleRequest { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(..) => StatusCode::FORBIDDEN,
            ApiError::NotFound(..) => StatusCode::NOT_FOUND,
            ApiError::Conflict(..) => StatusCode::CONFLICT,
            ApiError::Unprocessable(..) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) | ApiError::QuotaExceeded { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn problem(&self) -> Problem {
        let status = self.status().as_u16();
        let title = self.status().canonical_reason().unwrap_or("Error");
        match self {
            ApiError::BadRequest(code, d)
            | ApiError::Unauthorized(code, d)
            | ApiError::Forbidden(code, d)
            | ApiError::NotFound(code, d)
            | ApiError::Conflict(code, d)
            | ApiError::Unprocessable(code, d) => {
                Problem::new(status, code, title, Some(d.clone()))
            }
            ApiError::MethodNotAllowed(d) => {
                Problem::new(status, "method_not_allowed", title, Some(d.clone()))
            }
            ApiError::PayloadTooLarge(d) => {
                Problem::new(status, "payload_too_large", title, Some(d.clone()))
            }
            ApiError::QuotaExceeded {
                project,
                used,
                reserved,
                limit,
                requested,
            } => {
                let mut p = Problem::new(
                    status,
                    "quota_exceeded",
                    title,
                    Some(format!(
                        "project {project} has {used} bytes stored and {reserved} reserved of {limit}; {requested} more do not fit"
                    )),
                );
                for (k, v) in [
                    ("used", used),
                    ("reserved", reserved),
                    ("limit", limit),
                    ("requested", requested),
                ] {
                    p.extra.insert(k.into(), (*v).into());
                }
                p
            }
            ApiError::StaleRequest {
                offset,
                window,
                server_time,
            } => {
                let mut p = Problem::new(
                    status,
                    "stale_request",
                    title,
                    Some(stale_detail(*offset, *window)),
                );
                p.extra.insert("server_time".into(), (*server_time).into());
                p.extra.insert("clock_offset_secs".into(), (*offset).into());
                p.extra
                    .insert("replay_window_secs".into(), (*window).into());
                p
            }
            ApiError::Unavailable(what, _) => Problem::new(
                status,
                "unavailable",
                title,
                Some(format!("{what} is unavailable; retry later")),
            ),
            ApiError::Internal(_) => Problem::new(status, "internal", title, None),
        }
    }
}

/// Why a signed timestamp `offset` seconds from the API's clock is refused, for the device's
/// log and the API's (the same words for requests and MQTT passwords).
pub fn clock_advice(offset: i64, window: u64) -> String {
    let (how, secs) = if offset >= 0 {
        ("ahead of", offset)
    } else {
        ("behind", -offset)
    };
    format!(
        "the device's clock is {secs} s {how} the API's, more than the replay window ({window} s); set the device's clock (enable NTP: systemd-timesyncd or chrony)"
    )
}

/// The `detail` of a `stale_request` problem.
pub fn stale_detail(offset: i64, window: u64) -> String {
    format!(
        "request timestamp is more than {window}s from the server's clock: {}",
        clock_advice(offset, window)
    )
}

/// A problem document as an HTTP response.
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body,
    )
        .into_response()
}

impl ApiError {
    /// The problem document to send; the cause of a 5xx is logged here, never sent.
    pub fn logged_problem(&self) -> Problem {
        match self {
            ApiError::Internal(e) => tracing::error!(error = %format!("{e:#}"), "Request failed"),
            ApiError::Unavailable(what, cause) => {
                tracing::warn!(%what, %cause, "Dependency unavailable")
            }
            ApiError::StaleRequest { offset, window, .. } => {
                tracing::warn!(
                    clock_offset_secs = offset,
                    replay_window_secs = window,
                    "Device request refused: the device's clock is off"
                )
            }
            _ => {}
        }
        self.problem()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem_response(&self.logged_problem())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => ApiError::Unavailable("database", e.to_string()),
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                ApiError::Conflict("conflict", "a record with this key already exists".into())
            }
            // Data exceptions: a value PostgreSQL cannot take, e.g. a NUL character in text.
            sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22")) => {
                ApiError::BadRequest(
                    "invalid_value",
                    "a value in the request cannot be stored (e.g. a NUL character)".into(),
                )
            }
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| c.starts_with("57") || c.starts_with("08")) =>
            {
                // Admin shutdown, cannot connect now, connection failures.
                ApiError::Unavailable("database", e.to_string())
            }
            _ => ApiError::Internal(anyhow::Error::new(e).context("database query")),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        ApiError::Unavailable("storage", e.to_string())
    }
}

impl From<crate::domain::session::TransitionError> for ApiError {
    fn from(e: crate::domain::session::TransitionError) -> Self {
        ApiError::Conflict("invalid_state", e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_causes_are_not_sent() {
        let e = ApiError::Internal(anyhow::anyhow!("password=hunter2 in query"));
        let p = e.problem();
        assert_eq!(p.status, 500);
        assert!(p.detail.is_none());
        let e = ApiError::Unavailable("database", "connection refused at 10.0.0.1".into());
        assert!(!e.problem().detail.unwrap().contains("10.0.0.1"));
        let e = ApiError::Conflict("session_paused", "session is paused".into());
        assert_eq!(e.problem().code, "session_paused");
        assert_eq!(e.problem().status, 409);
    }
}
