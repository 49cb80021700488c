//! Free disk space, reported in the device's `status` so operators see a gateway filling
//! up before its recordings stop.

use std::path::PathBuf;
use std::time::Duration;

/// How often the agent measures free space.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);

/// The least space available to the agent's user among the filesystems holding `paths`
/// (the allowed roots, where recordings grow, and the state directory, where `agent.db`
/// must be able to grow). `None` when none of them can be measured.
pub fn free_bytes(paths: &[PathBuf]) -> Option<u64> {
    paths
        .iter()
        .filter_map(|p| rustix::fs::statvfs(p).ok())
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .min()
}

/// Whether a new measurement is worth a new retained `status` (each one travels to the API
/// through the bridge): on becoming known or unknown, or a move of at least 1 % of the
/// last figure sent and at least 64 MiB.
pub fn worth_sending(sent: Option<u64>, now: Option<u64>) -> bool {
    match (sent, now) {
        (Some(a), Some(b)) => {
            let delta = a.abs_diff(b);
            delta >= 64 << 20 && delta.saturating_mul(100) >= a
        }
        (a, b) => a != b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_the_fullest_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(&[dir.path().to_path_buf()]).expect("a temp dir is measurable");
        assert!(free > 0);
        // A path that cannot be measured is left out, not counted as full.
        assert!(free_bytes(&[dir.path().to_path_buf(), "/nonexistent/x".into()]).is_some());
        assert_eq!(free_bytes(&["/nonexistent/x".into()]), None);
    }

    #[test]
    fn small_moves_are_not_sent() {
        const G: u64 = 1 << 30;
        assert!(worth_sending(None, Some(G)));
        assert!(worth_sending(Some(G), None));
        assert!(!worth_sending(None, None));
        assert!(
            !worth_sending(Some(100 * G), Some(100 * G - G / 2)),
            "0.5 % of 100 GiB"
        );
        assert!(worth_sending(Some(100 * G), Some(98 * G)), "2 %");
        assert!(!worth_sending(Some(G), Some(G - (32 << 20))), "32 MiB");
        assert!(worth_sending(Some(G), Some(G - (128 << 20))));
    }
}
