//! PUTs of parts to storage through presigned URLs: each part streamed from disk under the
//! bandwidth cap, retried, its ETag checked; what a URL's lifetime and storage's refusals
//! mean. The pass over a job's parts is in [`crate::pass`].
//!
//! - `put`: the HTTP client and the PUT of one part, streamed, watched for stalls, retried.
//! - `urls`: URL redaction for logs and when a presigned URL must be renewed.
//! - `answer`: what storage's error answers mean, as decisions and readable reasons.

use std::time::Duration;

use crate::rpc::RpcError;
use crate::store::StoreError;

mod answer;
mod put;
mod urls;

pub(crate) use answer::signature_fault;
pub use put::Uploader;
pub use urls::{redact_url, UrlLife};

/// A PUT that takes no bytes of its body for this long is abandoned and retried. Once the
/// whole body is handed off, the wait for the answer is longer (`idle_limit`: 188 s for a
/// part of 8 MiB or more swallowed at once). These are the only timeouts on a PUT once
/// connected: a part on a slow link may take hours.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Once the whole body is handed to the kernel, up to this much of it may still sit in
/// socket buffers and drain at the link's pace before storage can answer.
const BUFFERED_BYTES: u64 = 8 << 20;
/// The slowest drain of those buffers waited for (bytes per second) on top of the idle timeout.
const DRAIN_FLOOR_BPS: f64 = 64.0 * 1024.0;
/// Tries of one part against one URL before the error goes up to the job.
const PUT_ATTEMPTS: usize = 5;
/// Re-presigns of one part (after 403 / expiry) before the job gives up on this round.
pub(crate) const MAX_REPRESIGNS: u32 = 5;
/// Fresh URLs of one part that storage may refuse in a row as expired or not yet valid
/// before the job fails: storage refusing every fresh signature is a real fault (wrong
/// keys, storage's clock far off), not an expiry.
pub(crate) const MAX_SIGNATURE_REFUSALS: u32 = 3;
/// A URL refused with at least this long to go before its renewal counts as a refusal of
/// a fresh signature (towards [`MAX_SIGNATURE_REFUSALS`]).
const FRESH_URL: Duration = Duration::from_secs(5);
/// How long shutdown waits for the PUTs in flight (the agent's own grace is 10 s).
pub(crate) const SHUTDOWN_DRAIN: Duration = Duration::from_secs(8);

/// Job controls shared between the command handler and the job's runner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// Start no new parts; the job pauses once in-flight parts finish.
    pub pause: bool,
    /// Abort in-flight parts and cancel the job.
    pub cancel: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The URL is about to expire (`None`), or storage refused it as expired, not yet valid
    /// or otherwise not accepted (`Some(storage's answer)`): presign again.
    #[error("{}", match .0 { Some(a) => format!("storage refused the presigned URL: {a}"), None => "presigned URL about to expire".to_string() })]
    Expired(Option<String>),
    #[error("{0}")]
    Transient(String),
    #[error("storage refused the part: {0}")]
    Refused(String),
    /// Storage received other bytes than the signed Content-MD5 (BadDigest): corrupted in
    /// transit, or the file changed. The part is sent again; the job re-checks the file.
    #[error("storage refused the bytes as corrupted: {0}")]
    Corrupted(String),
    #[error("storage returned ETag {got}, expected {want}")]
    EtagMismatch { got: String, want: String },
    #[error("cannot read the file: {0}")]
    Io(String),
}

impl PutError {
    fn retryable(&self) -> bool {
        matches!(
            self,
            PutError::Transient(_) | PutError::EtagMismatch { .. } | PutError::Corrupted(_)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("part {number}: {source}")]
    Part { number: u32, source: PutError },
    #[error("presign answer lacks part {0}")]
    MissingUrl(u32),
    #[error("job cancelled")]
    Cancelled,
    #[error("agent is shutting down")]
    Shutdown,
    #[error("upload task failed: {0}")]
    Task(String),
    #[error("file changed during upload (part {0} hashes differently)")]
    FileChanged(u32),
}

impl UploadError {
    pub fn is_transient(&self) -> bool {
        match self {
            UploadError::Rpc(e) => e.is_transient(),
            UploadError::Part { source, .. } => {
                source.retryable() || matches!(source, PutError::Expired(_))
            }
            UploadError::Task(_) | UploadError::Store(_) => true,
            _ => false,
        }
    }
}
