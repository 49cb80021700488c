//! Presigned URLs: redacted for logs, and when one must be renewed (measured on this
//! device's monotonic clock).

use std::time::Duration;

use tokio::time::Instant;
use uplink_protocol::ops::PresignedPart;

/// The URL without its query string and fragment (where presigned signatures live) and
/// without credentials. Use it whenever a URL is logged.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            u.set_query(None);
            u.set_fragment(None);
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.to_string()
        }
        Err(_) => url.split(['?', '#']).next().unwrap_or_default().to_string(),
    }
}

/// When a presigned URL must be renewed, on this device's monotonic clock: max(1 s,
/// min(60 s, lifetime/4)) before its lifetime has passed.
///
/// The lifetime is the API's `expires_in_secs`, counted from when the presign request was
/// first sent (the API made the URL after that, so this errs early, never late), so a
/// device clock that is wrong, or is set while the agent runs, changes nothing. An API that
/// predates the field gives only `expires_at` (its clock): then it is compared with this
/// device's clock at that moment, as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlLife {
    renew_at: Instant,
}

impl UrlLife {
    /// `asked_at`/`asked_unix`: when the request was first sent, on the monotonic clock and
    /// on this device's wall clock.
    pub fn of(part: &PresignedPart, asked_at: Instant, asked_unix: i64) -> UrlLife {
        let margin = |lifetime: i64| (lifetime / 4).clamp(1, 60);
        let usable = match part.expires_in_secs {
            Some(secs) => {
                let secs = secs.min(i64::MAX as u64) as i64;
                secs - margin(secs)
            }
            None => {
                let left = part.expires_at - asked_unix;
                left - margin(left.max(0))
            }
        };
        UrlLife {
            renew_at: asked_at + Duration::from_secs(usable.max(0) as u64),
        }
    }

    /// Whether the URL must be presigned again before it is used now.
    pub fn needs_represign(&self) -> bool {
        Instant::now() >= self.renew_at
    }

    /// How long until it must be renewed.
    pub fn left(&self) -> Duration {
        self.renew_at.saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_query_and_credentials() {
        assert_eq!(
            redact_url(
                "http://127.0.0.1:8333/uplink/devices/r/s/f.bin?partNumber=1&X-Amz-Signature=abc"
            ),
            "http://127.0.0.1:8333/uplink/devices/r/s/f.bin"
        );
        assert_eq!(
            redact_url("https://user:pw@s3.example.com/b/k#frag"),
            "https://s3.example.com/b/k"
        );
        assert_eq!(redact_url("not a url?secret=1"), "not a url");
    }

    fn url(expires_at: i64, expires_in_secs: Option<u64>) -> PresignedPart {
        PresignedPart {
            number: 1,
            method: "PUT".into(),
            url: "http://s3/b/k".into(),
            headers: vec![],
            expires_at,
            expires_in_secs,
        }
    }

    /// Whether a URL asked for at unix `asked` (device clock) needs renewal `after` seconds
    /// later, on tokio's paused clock.
    async fn renews_after(part: &PresignedPart, asked: i64, after: u64) -> bool {
        let life = UrlLife::of(part, Instant::now(), asked);
        tokio::time::sleep(Duration::from_secs(after)).await;
        life.needs_represign()
    }

    #[tokio::test(start_paused = true)]
    async fn represign_margin_by_the_lifetime_on_the_monotonic_clock() {
        // 900 s lifetime: margin 60 s, whatever the device's clock says (expires_at is by
        // the API's clock: 240 s behind or an hour ahead changes nothing).
        for device_unix in [1000, 1240, 760, 4600] {
            assert!(!renews_after(&url(1900, Some(900)), device_unix, 839).await);
            assert!(renews_after(&url(1900, Some(900)), device_unix, 841).await);
        }
        // 20 s lifetime: margin 5 s.
        assert!(!renews_after(&url(1020, Some(20)), 0, 14).await);
        assert!(renews_after(&url(1020, Some(20)), 0, 16).await);
        // 2 s lifetime: margin at least 1 s.
        assert!(!renews_after(&url(1002, Some(2)), 0, 0).await);
        assert!(renews_after(&url(1002, Some(2)), 0, 1).await);
        assert!(renews_after(&url(1000, Some(0)), 0, 0).await);
    }

    #[tokio::test(start_paused = true)]
    async fn represign_margin_from_expires_at_with_an_older_api() {
        // No expires_in_secs: expires_at against this device's clock when asked.
        assert!(!renews_after(&url(1900, None), 1000, 839).await);
        assert!(renews_after(&url(1900, None), 1000, 841).await);
        assert!(!renews_after(&url(1020, None), 1000, 14).await);
        assert!(renews_after(&url(1020, None), 1000, 16).await);
        // Already expired by this clock.
        assert!(renews_after(&url(1000, None), 1001, 0).await);
    }
}
