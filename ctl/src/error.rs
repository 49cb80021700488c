//! What can go wrong, and the exit code each gives (documented in docs/ctl.md).

/// Exit codes. Scripts rely on them: never renumber.
pub mod exit {
    /// Done.
    pub const OK: i32 = 0;
    /// The API accepted the request, but what it asked for failed: an upload or command
    /// ended `failed`, `rejected` or `expired`, a session ended `failed` or `aborted`.
    pub const FAILED: i32 = 1;
    /// Bad usage: unknown flags, bad values, no API URL or token, an unreadable profile.
    pub const USAGE: i32 = 2;
    /// The API refused the request (a 4xx problem: 401, 403, 404, 409, 413, 422, …).
    pub const REFUSED: i32 = 3;
    /// The API could not be reached, timed out or answered 5xx.
    pub const UNAVAILABLE: i32 = 4;
    /// Interrupted (Ctrl-C) while following; what was asked for goes on.
    pub const INTERRUPTED: i32 = 130;
}

/// An error with its exit code. Its text never holds the token (see [`crate::main`], which
/// also scrubs it from every message as a last line of defence).
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    /// A problem document from the API: `403 forbidden: <detail>`.
    #[error("{status} {code}: {detail}")]
    Refused {
        status: u16,
        code: String,
        detail: String,
        /// The whole problem document (shown with `--json`).
        problem: serde_json::Value,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Interrupted(String),
}

impl CtlError {
    pub fn code(&self) -> i32 {
        match self {
            CtlError::Usage(_) => exit::USAGE,
            CtlError::Refused { .. } => exit::REFUSED,
            CtlError::Unavailable(_) => exit::UNAVAILABLE,
            CtlError::Failed(_) => exit::FAILED,
            CtlError::Interrupted(_) => exit::INTERRUPTED,
        }
    }
}

pub type Result<T, E = CtlError> = std::result::Result<T, E>;

pub fn usage(msg: impl Into<String>) -> CtlError {
    CtlError::Usage(msg.into())
}
