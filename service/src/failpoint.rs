//! Crash points for the fault tests: the process dies on the spot (`abort`, like a power
//! cut) at a named place, so a test can check what a restart makes of the state left behind.
//!
//! Compiled only with the cargo feature `failpoints` (the end-to-end test crate enables it,
//! through the agent's and the API's features of the same name; release builds and the .deb
//! do not have it). Without the feature [`hit`] is an empty
//! inline function and the environment is never read.
//!
//! Armed by `UPLINK_FAILPOINTS=name[=n][,name[=n]...]`: the process aborts the `n`-th time
//! (default 1) it reaches `name`; with `UPLINK_FAILPOINT_PAUSE_MS=ms` it pauses that thread
//! for `ms` instead, and goes on. The points:
//! - [`PART_BEFORE_COMMIT`]: storage answered a part's PUT (ETag checked), before the part
//!   is committed to `agent.db`;
//! - [`COMPLETE_BEFORE_DONE`]: the control API answered the completion with a completed
//!   session, before the job is marked done in `agent.db` and acked.
//!
//! The API's, all in `session.complete` (`control-api/src/sessions.rs`):
//! - [`API_COMPLETE_AFTER_STORAGE`]: storage's CompleteMultipartUpload succeeded;
//! - [`API_COMPLETE_AFTER_HEAD`]: the object's size and ETag are read back, nothing recorded;
//! - [`API_COMPLETE_BEFORE_COMMIT`]: the completion's transaction has run every statement
//!   (state, digest, ETag, size, time, manifest), before its commit.

/// After a part's PUT succeeded, before it is committed to SQLite.
pub const PART_BEFORE_COMMIT: &str = "part-before-commit";
/// After the session is completed, before the job is marked done.
pub const COMPLETE_BEFORE_DONE: &str = "complete-before-done";

/// The API: after CompleteMultipartUpload, before the object is read back.
pub const API_COMPLETE_AFTER_STORAGE: &str = "api-complete-after-storage";
/// The API: after the object's HEAD, before the completion is recorded.
pub const API_COMPLETE_AFTER_HEAD: &str = "api-complete-after-head";
/// The API: inside the completion's transaction, before its commit.
pub const API_COMPLETE_BEFORE_COMMIT: &str = "api-complete-before-commit";

const KNOWN: [&str; 5] = [
    PART_BEFORE_COMMIT,
    COMPLETE_BEFORE_DONE,
    API_COMPLETE_AFTER_STORAGE,
    API_COMPLETE_AFTER_HEAD,
    API_COMPLETE_BEFORE_COMMIT,
];

/// With this set to a number of milliseconds, an armed failpoint pauses the thread that
/// reached it that long instead of aborting the process.
pub const PAUSE_ENV: &str = "UPLINK_FAILPOINT_PAUSE_MS";

/// The environment variable that arms failpoints.
pub const ENV: &str = "UPLINK_FAILPOINTS";

/// Aborts the process if `name` is armed and this is its `n`-th hit.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(feature = "failpoints")]
pub use armed::{announce, hit};

/// Does nothing without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn announce() {}

/// `name[=n]` items, comma-separated; `n` at least 1.
pub fn parse(spec: &str) -> Result<Vec<(String, u64)>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (name, n) = match item.split_once('=') {
                Some((name, n)) => (
                    name.trim(),
                    n.trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| format!("{ENV}: `{item}`: the count must be 1 or more"))?,
                ),
                None => (item, 1),
            };
            if KNOWN.contains(&name) {
                Ok((name.to_string(), n))
            } else {
                Err(format!(
                    "{ENV}: unknown failpoint `{name}` (known: {})",
                    KNOWN.join(", ")
                ))
            }
        })
        .collect()
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    struct Point {
        name: String,
        at: u64,
        hits: AtomicU64,
    }

    fn points() -> &'static [Point] {
        static POINTS: OnceLock<Vec<Point>> = OnceLock::new();
        POINTS.get_or_init(|| {
            let spec = std::env::var(super::ENV).unwrap_or_default();
            match super::parse(&spec) {
                Ok(points) => points
                    .into_iter()
                    .map(|(name, at)| Point {
                        name,
                        at,
                        hits: AtomicU64::new(0),
                    })
                    .collect(),
                Err(e) => {
                    // A test that sets a wrong name must not run without its crash.
                    eprintln!("{e}");
                    std::process::exit(2);
                }
            }
        })
    }

    /// Logs which failpoints are armed (the tests wait for this line).
    pub fn announce() {
        let armed: Vec<String> = points()
            .iter()
            .map(|p| format!("{}={}", p.name, p.at))
            .collect();
        tracing::warn!(failpoints = %armed.join(","), "Failpoints compiled in");
    }

    pub fn hit(name: &str) {
        for p in points().iter().filter(|p| p.name == name) {
            if p.hits.fetch_add(1, Ordering::SeqCst) + 1 == p.at {
                if let Some(ms) = std::env::var(super::PAUSE_ENV)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    // Blocks this thread on purpose: the test acts meanwhile (e.g. cuts the
                    // database connection the caller holds), then the caller goes on.
                    tracing::warn!(
                        failpoint = name,
                        hit = p.at,
                        pause_ms = ms,
                        "Failpoint: pausing"
                    );
                    eprintln!("failpoint {name}: pause at hit {}", p.at);
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                    return;
                }
                tracing::error!(failpoint = name, hit = p.at, "Failpoint: aborting");
                eprintln!("failpoint {name}: abort at hit {}", p.at);
                std::process::abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_counts() {
        assert_eq!(
            parse("part-before-commit=2, complete-before-done").ok(),
            Some(vec![
                (PART_BEFORE_COMMIT.to_string(), 2),
                (COMPLETE_BEFORE_DONE.to_string(), 1)
            ])
        );
        assert_eq!(parse("").ok(), Some(vec![]));
        assert!(parse("part-before-commit=0").is_err());
        assert!(parse("no-such-point").is_err());
    }
}
