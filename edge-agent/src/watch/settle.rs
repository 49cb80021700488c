//! Settling: a file is queued once its size, mtime and inode have not changed for the
//! watch's settle time. Pure code; time is passed in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::hasher::FileIdentity;

/// What the settler says about a file a scan saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New or changed since the last scan, or not unchanged for long enough yet.
    Settling,
    /// Unchanged for the settle time: queue it (unless the store knows it).
    Settled,
    /// This version was already handled (queued, known, or refused).
    Handled,
}

#[derive(Debug, Clone)]
struct Seen {
    identity: FileIdentity,
    /// When this identity was first seen.
    since: Instant,
    /// The scan pass that last saw it.
    pass: u64,
    handled: bool,
}

/// Remembers what the scans saw; pure (time is passed in).
#[derive(Debug)]
pub struct Settler {
    settle: Duration,
    files: HashMap<PathBuf, Seen>,
    pass: u64,
}

impl Settler {
    pub fn new(settle: Duration) -> Self {
        Settler {
            settle,
            files: HashMap::new(),
            pass: 0,
        }
    }

    /// Records that a scan saw `path` as `identity` at `now`.
    pub fn observe(&mut self, path: &Path, identity: FileIdentity, now: Instant) -> Verdict {
        let pass = self.pass;
        match self.files.get_mut(path) {
            Some(seen) if seen.identity == identity => {
                seen.pass = pass;
                if seen.handled {
                    Verdict::Handled
                } else if now.saturating_duration_since(seen.since) >= self.settle {
                    Verdict::Settled
                } else {
                    Verdict::Settling
                }
            }
            _ => {
                self.files.insert(
                    path.to_path_buf(),
                    Seen {
                        identity,
                        since: now,
                        pass,
                        handled: false,
                    },
                );
                Verdict::Settling
            }
        }
    }

    /// This version of `path` is done with (queued, already known, or refused).
    pub fn handled(&mut self, path: &Path) {
        if let Some(seen) = self.files.get_mut(path) {
            seen.handled = true;
        }
    }

    /// A full pass over the tree ended: forget the files it did not see (gone).
    pub fn end_pass(&mut self) {
        let pass = self.pass;
        self.files.retain(|_, s| s.pass == pass);
        self.pass += 1;
    }

    pub fn tracked(&self) -> usize {
        self.files.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::tests::id;

    #[test]
    fn a_file_settles_after_the_settle_time_unchanged() {
        let t0 = Instant::now();
        let s = Duration::from_secs(5);
        let mut st = Settler::new(s);
        let p = Path::new("/data/a.mcap");
        assert_eq!(st.observe(p, id(10, 1, 7), t0), Verdict::Settling);
        assert_eq!(
            st.observe(p, id(10, 1, 7), t0 + Duration::from_secs(4)),
            Verdict::Settling
        );
        // Grew: the clock starts again.
        assert_eq!(
            st.observe(p, id(20, 2, 7), t0 + Duration::from_secs(6)),
            Verdict::Settling
        );
        assert_eq!(
            st.observe(p, id(20, 2, 7), t0 + Duration::from_secs(10)),
            Verdict::Settling
        );
        assert_eq!(
            st.observe(p, id(20, 2, 7), t0 + Duration::from_secs(11)),
            Verdict::Settled
        );
        // Stays settled until handled, then handled.
        assert_eq!(
            st.observe(p, id(20, 2, 7), t0 + Duration::from_secs(12)),
            Verdict::Settled
        );
        st.handled(p);
        assert_eq!(
            st.observe(p, id(20, 2, 7), t0 + Duration::from_secs(13)),
            Verdict::Handled
        );
        // Replaced (new inode, same size and mtime): a new version, settling again.
        assert_eq!(
            st.observe(p, id(20, 2, 8), t0 + Duration::from_secs(14)),
            Verdict::Settling
        );
    }

    #[test]
    fn a_full_pass_forgets_files_that_are_gone() {
        let t0 = Instant::now();
        let mut st = Settler::new(Duration::from_secs(1));
        st.observe(Path::new("/d/a"), id(1, 1, 1), t0);
        st.observe(Path::new("/d/b"), id(1, 1, 2), t0);
        st.end_pass();
        assert_eq!(st.tracked(), 2);
        st.observe(Path::new("/d/a"), id(1, 1, 1), t0);
        st.end_pass();
        assert_eq!(st.tracked(), 1);
    }
}
