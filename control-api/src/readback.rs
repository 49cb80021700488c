//! Reading completed objects back from storage, shared by the workers that do it (validation,
//! digest): a claim on a session row held under a renewed lease, a backoff for read errors,
//! and a reader that refuses a body of the wrong length.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::ValidationConfig;
use crate::http::error::ApiError;
use crate::storage::StorageError;
use crate::AppState;

/// The delay before attempt `attempts + 1` after `attempts` failed reads:
/// `retry_initial_secs` doubled per earlier failure, at most `retry_max_secs`, plus
/// `jitter` (0..1) of a tenth of it so that many objects do not retry in step.
pub fn retry_delay(cfg: &ValidationConfig, attempts: u32, jitter: f64) -> Duration {
    let doublings = attempts.saturating_sub(1).min(32);
    let secs = cfg
        .retry_initial_secs
        .saturating_mul(1u64 << doublings)
        .min(cfg.retry_max_secs);
    Duration::from_secs(secs).mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 10.0)
}

/// A worker's loop: runs `pass` while it finds work (`Ok(true)`), then waits for `wake` (a
/// completion on this instance) or `validation.interval_secs`, until `shutdown`.
pub async fn worker<F, Fut>(
    st: &AppState,
    wake: &tokio::sync::Notify,
    shutdown: &CancellationToken,
    what: &str,
    pass: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<bool, ApiError>>,
{
    let every = Duration::from_secs(st.config.validation.interval_secs);
    loop {
        while !shutdown.is_cancelled() {
            match pass().await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "{what} pass failed; retrying next interval");
                    break;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The SQL a worker holds its claim with: `renew` binds (session id, claim, lease seconds)
/// and pushes the lease out; `release` binds (session id, claim) and gives the claim back.
pub struct LeaseSql {
    pub renew: &'static str,
    pub release: &'static str,
}

/// Runs `work` while renewing the claim `claim` on `session_id` every third of
/// `lease_secs`. `None`: shutdown came first and the claim was given back.
pub async fn under_lease<T>(
    st: &AppState,
    sql: &LeaseSql,
    session_id: Uuid,
    claim: Uuid,
    work: impl std::future::Future<Output = T>,
    shutdown: &CancellationToken,
) -> Result<Option<T>, ApiError> {
    let lease_secs = st.config.validation.lease_secs;
    tokio::pin!(work);
    let mut renew = tokio::time::interval(Duration::from_secs(lease_secs).div_f64(3.0));
    renew.tick().await;
    loop {
        tokio::select! {
            done = &mut work => return Ok(Some(done)),
            _ = renew.tick() => {
                sqlx::query(sql.renew)
                    .bind(session_id)
                    .bind(claim)
                    .bind(lease_secs as f64)
                    .execute(&st.store.pool)
                    .await?;
            }
            _ = shutdown.cancelled() => {
                sqlx::query(sql.release)
                    .bind(session_id)
                    .bind(claim)
                    .execute(&st.store.pool)
                    .await?;
                return Ok(None);
            }
        }
    }
}

pub fn read_error(e: StorageError) -> io::Error {
    match e {
        StorageError::NotFound => io::Error::new(io::ErrorKind::NotFound, e.to_string()),
        e => io::Error::other(e.to_string()),
    }
}

/// A reader of an object of known size: ending early, or running past the size, is a read
/// error (retry), never a verdict on a file cut short in transit.
pub struct Exact<R> {
    inner: R,
    expected: u64,
    seen: u64,
}

impl<R> Exact<R> {
    pub fn new(inner: R, expected: u64) -> Self {
        Exact {
            inner,
            expected,
            seen: 0,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Exact<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                this.seen += n;
                if n == 0 && buf.remaining() > 0 && this.seen < this.expected {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the object's body ended after {} of {} bytes",
                            this.seen, this.expected
                        ),
                    )));
                }
                if this.seen > this.expected {
                    // A read that fails leaves the buffer as it was.
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the object is longer than its {} bytes", this.expected),
                    )));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[test]
    fn retry_delay_doubles_up_to_the_max() {
        let cfg = ValidationConfig {
            retry_initial_secs: 10,
            retry_max_secs: 600,
            ..ValidationConfig::default()
        };
        let secs = |n| retry_delay(&cfg, n, 0.0).as_secs();
        assert_eq!(
            [
                secs(0),
                secs(1),
                secs(2),
                secs(3),
                secs(6),
                secs(7),
                secs(1000)
            ],
            [10, 10, 20, 40, 320, 600, 600]
        );
        assert_eq!(retry_delay(&cfg, 1, 1.0), Duration::from_secs(11));
        assert_eq!(retry_delay(&cfg, 1, 7.0), Duration::from_secs(11));
    }

    #[tokio::test]
    async fn exact_reader_refuses_short_and_long_bodies() {
        let mut out = Vec::new();
        let n = Exact::new(&b"hello"[..], 5)
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!((n, &out[..]), (5, &b"hello"[..]));

        let err = Exact::new(&b"hel"[..], 5)
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            err.to_string(),
            "the object's body ended after 3 of 5 bytes"
        );

        let err = Exact::new(&b"hello!"[..], 5)
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
