//! The PUT of one part: the HTTP client (timeouts, extra CAs), the body streamed from disk
//! under the bandwidth cap, stalls detected, the ETag checked against the part's MD5, and
//! the retries against one URL.

use std::io::SeekFrom;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, ETAG};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::time::Instant;
use tokio_util::io::ReaderStream;
use tracing::{debug, warn};
use uplink_protocol::ops::PresignedPart;

use super::answer::{describe, signature_refused, storage_answer};
use super::*;
use crate::hasher;
use crate::rate::RateLimiter;
use crate::store::PartRecord;

/// How long a PUT may go without pulling a byte of its body before it is abandoned. While
/// the body is being read that is [`IDLE_TIMEOUT`]; once all of it is handed off, the bytes
/// may still be draining from socket buffers at the link's pace, so the wait for the answer
/// also allows twice the time the body took, and the buffered bytes at [`DRAIN_FLOOR_BPS`].
fn idle_limit(handed_off: bool, body_time: Duration, size: u64) -> Duration {
    if !handed_off {
        return IDLE_TIMEOUT;
    }
    let drain = Duration::from_secs_f64(size.min(BUFFERED_BYTES) as f64 / DRAIN_FLOOR_BPS);
    IDLE_TIMEOUT.max(body_time * 2) + drain
}

/// Why a silent PUT is abandoned, with the real wait (checked every 5 s, so up to 5 s past
/// the limit).
fn stall_reason(handed_off: bool, idle: Duration, limit: Duration) -> String {
    let (idle, limit) = (idle.as_secs(), limit.as_secs());
    if handed_off {
        format!("no answer from storage {idle} s after the whole body was sent (limit {limit} s)")
    } else {
        format!("no progress sending the body for {idle} s (limit {limit} s)")
    }
}

/// Tells the kernel a sent part's bytes will not be read again (`posix_fadvise(DONTNEED)`).
/// Its pages were read twice (hash pass, PUT), which makes them the ones the kernel keeps
/// longest, while the parts hashed and about to be sent were read once and would be evicted
/// first under memory pressure, to be read from disk again. Dropping what is sent keeps
/// those, and leaves the gateway's own work its cache. Only advice: failures are ignored.
async fn drop_cached(path: &Path, offset: u64, len: u64) {
    let path = path.to_path_buf();
    let dropped = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)?;
        rustix::fs::fadvise(
            &file,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::DontNeed,
        )
        .map_err(std::io::Error::from)
    })
    .await;
    if let Ok(Err(e)) = dropped {
        debug!(error = %e, "posix_fadvise(DONTNEED) of a sent part failed");
    }
}

/// HTTP side of the uploads, shared by all jobs.
#[derive(Clone)]
pub struct Uploader {
    http: reqwest::Client,
    limiter: Arc<RateLimiter>,
}

impl Uploader {
    /// `limiter` caps every PUT of every job (see [`crate::flow::Flow::limiter`]).
    pub fn new(limiter: Arc<RateLimiter>) -> Result<Self, reqwest::Error> {
        Self::with_roots(limiter, Vec::new())
    }

    /// Like [`Uploader::new`], trusting `roots` (`https_ca_file`) besides the built-in CAs.
    pub fn with_roots(
        limiter: Arc<RateLimiter>,
        roots: Vec<reqwest::Certificate>,
    ) -> Result<Self, reqwest::Error> {
        // Idle/read timeouts only: a slow link must be able to finish a large part.
        let http = roots
            .into_iter()
            .fold(reqwest::Client::builder(), |b, c| b.add_root_certificate(c))
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Uploader { http, limiter })
    }

    /// One PUT of one part, streamed from disk. Returns the ETag (quotes stripped).
    pub async fn put_once(
        &self,
        path: &Path,
        part: &PartRecord,
        url: &PresignedPart,
        sent: &Arc<AtomicU64>,
    ) -> Result<String, PutError> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, HeaderValue::from(part.size));
        for (name, value) in &url.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| PutError::Refused(format!("bad header name {name}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| PutError::Refused(format!("bad header value for {name}: {e}")))?;
            headers.insert(name, value);
        }
        let method = reqwest::Method::from_bytes(url.method.as_bytes())
            .map_err(|_| PutError::Refused(format!("bad method {}", url.method)))?;

        let activity = Arc::new(AtomicU64::new(0));
        let pulled = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let body = if part.size == 0 {
            reqwest::Body::from(Vec::new())
        } else {
            let mut file = tokio::fs::File::open(path)
                .await
                .map_err(|e| PutError::Io(e.to_string()))?;
            file.seek(SeekFrom::Start(part.offset))
                .await
                .map_err(|e| PutError::Io(e.to_string()))?;
            let limiter = self.limiter.clone();
            let sent = sent.clone();
            let act = activity.clone();
            let pulled = pulled.clone();
            let chunk_size = limiter.chunk();
            let stream =
                ReaderStream::with_capacity(file.take(part.size), chunk_size).then(move |chunk| {
                    let limiter = limiter.clone();
                    let sent = sent.clone();
                    let act = act.clone();
                    let pulled = pulled.clone();
                    async move {
                        if let Ok(bytes) = &chunk {
                            limiter.acquire(bytes.len()).await;
                            sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            pulled.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            act.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                        }
                        chunk
                    }
                });
            reqwest::Body::wrap_stream(stream)
        };

        let request = self
            .http
            .request(method, &url.url)
            .headers(headers)
            .body(body)
            .send();
        // Ends with why the PUT is abandoned: the silence and the limit it passed.
        let watchdog = async {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                let handed_off = pulled.load(Ordering::Relaxed) >= part.size;
                let (idle, limit) = (
                    started.elapsed().saturating_sub(last),
                    idle_limit(handed_off, last, part.size),
                );
                if idle > limit {
                    break stall_reason(handed_off, idle, limit);
                }
            }
        };
        let response = tokio::select! {
            r = request => r.map_err(|e| PutError::Transient(describe(e)))?,
            reason = watchdog => return Err(PutError::Transient(reason)),
        };
        let status = response.status();
        if status.is_success() {
            let etag = response
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(|s| hasher::strip_etag(s).to_string())
                .unwrap_or_default();
            // With a signed Content-MD5 the ETag is the part's MD5: compare. A signed SHA-256
            // was checked by storage before it answered 200, and storage echoes it.
            let signed_md5 = url
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-md5"));
            if signed_md5 && !hasher::etag_matches(&etag, &part.digest) {
                return Err(PutError::EtagMismatch {
                    got: etag,
                    want: hasher::md5_hex(&part.digest).unwrap_or_default(),
                });
            }
            let echoed = response
                .headers()
                .get("x-amz-checksum-sha256")
                .and_then(|v| v.to_str().ok());
            if let Some(echoed) = echoed.filter(|_| !signed_md5) {
                if echoed != part.digest {
                    return Err(PutError::EtagMismatch {
                        got: echoed.to_string(),
                        want: part.digest.clone(),
                    });
                }
            }
            return Ok(etag);
        }
        let code = status.as_u16();
        let text = response.text().await.unwrap_or_default();
        let answer = storage_answer(code, &text);
        if signature_refused(code, &text) {
            return Err(PutError::Expired(Some(answer)));
        }
        match code {
            // 499 ClientDisconnected, and S3's 400 RequestTimeout / IncompleteBody: the
            // connection broke mid-body, so the part is simply sent again.
            408 | 429 | 499 | 500..=599 => Err(PutError::Transient(answer)),
            400 if text.contains("RequestTimeout") || text.contains("IncompleteBody") => {
                Err(PutError::Transient(answer))
            }
            400 if text.contains("BadDigest") || text.contains("InvalidDigest") => {
                Err(PutError::Corrupted(answer))
            }
            _ => Err(PutError::Refused(answer)),
        }
    }

    /// Puts one part, retrying transient failures with backoff. A 403 or a URL about to
    /// expire comes back as [`PutError::Expired`] so the caller re-presigns.
    pub async fn put_part(
        &self,
        path: &Path,
        part: &PartRecord,
        url: &PresignedPart,
        life: UrlLife,
        sent: &Arc<AtomicU64>,
    ) -> Result<String, PutError> {
        let mut backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(20))
            .with_max_times(PUT_ATTEMPTS - 1)
            .build();
        loop {
            if life.needs_represign() {
                return Err(PutError::Expired(None));
            }
            let fresh = life.left() >= FRESH_URL;
            match self.put_once(path, part, url, sent).await {
                Ok(etag) => {
                    drop_cached(path, part.offset, part.size).await;
                    return Ok(etag);
                }
                // A URL used close to its end may expire on the way: an expiry, not a
                // refusal of a fresh signature.
                Err(PutError::Expired(Some(answer))) if !fresh => {
                    debug!(part = part.number, %answer, "URL used close to its expiry refused; presigning again");
                    return Err(PutError::Expired(None));
                }
                Err(e) if e.retryable() => match backoff.next() {
                    Some(delay) => {
                        crate::metrics::part_retried();
                        warn!(part = part.number, error = %e, url = %redact_url(&url.url), retry_in_ms = delay.as_millis() as u64, "Part upload failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplink_protocol::unix_now;

    #[test]
    fn idle_limit_waits_for_buffered_bytes_to_drain() {
        // While the body is being read: the plain idle timeout.
        assert_eq!(
            idle_limit(false, Duration::from_secs(500), 6 << 20),
            IDLE_TIMEOUT
        );
        // A 6 MiB body handed off after 55 s on a 50 kB/s link needs ~71 s more to drain.
        let limit = idle_limit(true, Duration::from_secs(55), 6 << 20);
        assert!(limit >= Duration::from_secs(110 + 90), "{limit:?}");
        // A black hole that swallows the body at once is given up after about 2 minutes.
        let limit = idle_limit(true, Duration::ZERO, 5 << 20);
        assert!(limit <= Duration::from_secs(150), "{limit:?}");
        assert_eq!(idle_limit(true, Duration::ZERO, 0), IDLE_TIMEOUT);
        // The default 8 MiB part swallowed at once: 60 s + 8 MiB at 64 KiB/s = 188 s, and
        // the log says so (not "60 s").
        let limit = idle_limit(true, Duration::ZERO, 8 << 20);
        assert_eq!(limit, Duration::from_secs(188));
        assert_eq!(
            stall_reason(true, Duration::from_millis(191_500), limit),
            "no answer from storage 191 s after the whole body was sent (limit 188 s)"
        );
        assert_eq!(
            stall_reason(false, Duration::from_secs(62), IDLE_TIMEOUT),
            "no progress sending the body for 62 s (limit 60 s)"
        );
    }

    fn part(size: u64, md5: &str) -> PartRecord {
        PartRecord {
            number: 1,
            offset: 0,
            size,
            digest: md5.into(),
            etag: None,
            done: false,
        }
    }

    /// A one-shot HTTP server on port 0 that records the request and answers `answer`.
    async fn serve_once(answer: &str) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        use tokio::io::AsyncWriteExt;
        let answer = answer.to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read headers, then the body by Content-Length.
            loop {
                let n = sock.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        let n = sock.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    break;
                }
                if n == 0 {
                    break;
                }
            }
            sock.write_all(answer.as_bytes()).await.unwrap();
            sock.shutdown().await.unwrap();
            buf
        });
        (
            format!("http://{addr}/bucket/key?X-Amz-Signature=secret"),
            handle,
        )
    }

    #[tokio::test]
    async fn put_streams_the_part_with_signed_headers_and_checks_etag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, b"xxabcyy").unwrap();
        let (url, server) = serve_once(
            "HTTP/1.1 200 OK\r\nETag: \"900150983cd24fb0d6963f7d28e17f72\"\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let up = Uploader::new(Arc::new(RateLimiter::new(0))).unwrap();
        let mut p = part(3, "kAFQmDzST7DWlj99KOF/cg==");
        p.offset = 2;
        let presigned = PresignedPart {
            number: 1,
            method: "PUT".into(),
            url,
            headers: vec![("content-md5".into(), "kAFQmDzST7DWlj99KOF/cg==".into())],
            expires_at: unix_now() + 900,
            expires_in_secs: Some(900),
        };
        let sent = Arc::new(AtomicU64::new(0));
        let etag = up.put_once(&path, &p, &presigned, &sent).await.unwrap();
        assert_eq!(etag, "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(sent.load(Ordering::Relaxed), 3);
        let req = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(
            req.starts_with("PUT /bucket/key?X-Amz-Signature=secret HTTP/1.1"),
            "{req}"
        );
        let lower = req.to_lowercase();
        assert!(lower.contains("content-length: 3\r\n"), "{req}");
        assert!(
            lower.contains("content-md5: kafqmdzst7dwlj99kof/cg==\r\n"),
            "{req}"
        );
        assert!(!lower.contains("transfer-encoding"), "{req}");
        assert!(req.ends_with("\r\n\r\nabc"), "{req}");
    }

    #[tokio::test]
    async fn put_reports_etag_mismatch_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, b"abc").unwrap();
        let up = Uploader::new(Arc::new(RateLimiter::new(0))).unwrap();
        let p = part(3, "kAFQmDzST7DWlj99KOF/cg==");
        let signed = |url: String, header: &str, digest: &str| PresignedPart {
            number: 1,
            method: "PUT".into(),
            url,
            headers: vec![(header.into(), digest.into())],
            expires_at: unix_now() + 900,
            expires_in_secs: Some(900),
        };
        let presigned = |url: String| signed(url, "content-md5", "kAFQmDzST7DWlj99KOF/cg==");
        let sent = Arc::new(AtomicU64::new(0));

        let (url, _s) =
            serve_once("HTTP/1.1 200 OK\r\nETag: \"deadbeef\"\r\nContent-Length: 0\r\n\r\n").await;
        assert!(matches!(
            up.put_once(&path, &p, &presigned(url), &sent).await,
            Err(PutError::EtagMismatch { .. })
        ));
        // A SHA-256 part: the ETag (an MD5 nobody planned) is not compared; an echoed
        // checksum is.
        let sha = "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="; // sha256("abc")
        let p256 = part(3, sha);
        let sha_url = |url| signed(url, "x-amz-checksum-sha256", sha);
        let (url, _s) = serve_once(&format!(
            "HTTP/1.1 200 OK\r\nETag: \"deadbeef\"\r\nx-amz-checksum-sha256: {sha}\r\nContent-Length: 0\r\n\r\n"
        ))
        .await;
        assert_eq!(
            up.put_once(&path, &p256, &sha_url(url), &sent)
                .await
                .unwrap(),
            "deadbeef"
        );
        let (url, _s) = serve_once(
            "HTTP/1.1 200 OK\r\nETag: \"deadbeef\"\r\nx-amz-checksum-sha256: AAAA\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(matches!(
            up.put_once(&path, &p256, &sha_url(url), &sent).await,
            Err(PutError::EtagMismatch { .. })
        ));
        let (url, _s) = serve_once("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n").await;
        assert!(matches!(
            up.put_once(&path, &p, &presigned(url), &sent).await,
            Err(PutError::Expired(Some(_)))
        ));
        // Garage's answer to an expired URL: 400, not 403.
        let garage = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InvalidRequest</Code><Message>Bad request: Date is too old</Message></Error>";
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{garage}",
            garage.len()
        );
        let (url, _s) = serve_once(Box::leak(answer.into_boxed_str())).await;
        match up.put_once(&path, &p, &presigned(url), &sent).await {
            Err(PutError::Expired(Some(a))) => {
                assert_eq!(
                    a,
                    "status 400: InvalidRequest: Bad request: Date is too old"
                )
            }
            other => panic!("{other:?}"),
        }
        let (url, _s) = serve_once("HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n").await;
        assert!(matches!(
            up.put_once(&path, &p, &presigned(url), &sent).await,
            Err(PutError::Transient(_))
        ));
        let (url, _s) =
            serve_once("HTTP/1.1 400 Bad Request\r\nContent-Length: 9\r\n\r\nBadDigest").await;
        match up.put_once(&path, &p, &presigned(url), &sent).await {
            Err(e @ PutError::Corrupted(_)) => assert!(e.retryable(), "{e}"),
            other => panic!("{other:?}"),
        }
        for answer in [
            "HTTP/1.1 499 Client Closed\r\nContent-Length: 18\r\n\r\nClientDisconnected",
            "HTTP/1.1 400 Bad Request\r\nContent-Length: 14\r\n\r\nIncompleteBody",
        ] {
            let (url, _s) = serve_once(answer).await;
            match up.put_once(&path, &p, &presigned(url), &sent).await {
                Err(e @ PutError::Transient(_)) => assert!(e.retryable(), "{e}"),
                other => panic!("{answer}: {other:?}"),
            }
        }
        let (url, _s) =
            serve_once("HTTP/1.1 400 Bad Request\r\nContent-Length: 10\r\n\r\nBadRequest").await;
        match up.put_once(&path, &p, &presigned(url), &sent).await {
            Err(e @ PutError::Refused(_)) => assert!(!e.retryable(), "{e}"),
            other => panic!("{other:?}"),
        }
        // Connection refused: transient, and the message carries no query string.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        match up
            .put_once(
                &path,
                &p,
                &presigned(format!("http://{addr}/b/k?X-Amz-Signature=secret")),
                &sent,
            )
            .await
        {
            Err(PutError::Transient(m)) => assert!(!m.contains("secret"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Expiring URLs are not even tried.
        let mut soon = presigned("http://127.0.0.1:1/x".into());
        soon.expires_in_secs = Some(0);
        let life = UrlLife::of(&soon, Instant::now(), unix_now());
        assert!(matches!(
            up.put_part(&path, &p, &soon, life, &sent).await,
            Err(PutError::Expired(None))
        ));
    }

    #[tokio::test]
    async fn no_such_upload_fails_the_part_with_a_readable_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, b"abc").unwrap();
        let up = Uploader::new(Arc::new(RateLimiter::new(0))).unwrap();
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchUpload</Code><Message>The specified multipart upload does not exist.</Message><Resource>/uplink/k</Resource><RequestId>17</RequestId></Error>";
        let answer = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (url, _s) = serve_once(Box::leak(answer.into_boxed_str())).await;
        let presigned = PresignedPart {
            number: 1,
            method: "PUT".into(),
            url,
            headers: vec![],
            expires_at: unix_now() + 900,
            expires_in_secs: Some(900),
        };
        let sent = Arc::new(AtomicU64::new(0));
        let err = up
            .put_once(
                &path,
                &part(3, "kAFQmDzST7DWlj99KOF/cg=="),
                &presigned,
                &sent,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, PutError::Refused(_)), "{err:?}");
        let reason = UploadError::Part {
            number: 1,
            source: err,
        }
        .to_string();
        assert_eq!(
            reason,
            "part 1: storage refused the part: status 404: NoSuchUpload: The specified multipart upload does not exist."
        );
    }

    #[tokio::test]
    async fn empty_part_is_an_empty_put() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, b"").unwrap();
        let (url, server) = serve_once(
            "HTTP/1.1 200 OK\r\nETag: \"d41d8cd98f00b204e9800998ecf8427e\"\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let up = Uploader::new(Arc::new(RateLimiter::new(0))).unwrap();
        let presigned = PresignedPart {
            number: 1,
            method: "PUT".into(),
            url,
            headers: vec![],
            expires_at: unix_now() + 900,
            expires_in_secs: Some(900),
        };
        let sent = Arc::new(AtomicU64::new(0));
        let etag = up
            .put_once(
                &path,
                &part(0, "1B2M2Y8AsgTpgAmY7PhCfg=="),
                &presigned,
                &sent,
            )
            .await
            .unwrap();
        assert_eq!(etag, "d41d8cd98f00b204e9800998ecf8427e");
        let req = String::from_utf8(server.await.unwrap())
            .unwrap()
            .to_lowercase();
        assert!(req.contains("content-length: 0\r\n"), "{req}");
    }
}
