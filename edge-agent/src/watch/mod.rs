//! Directory watches: each `[[watch]]` entry scans a directory every `scan_interval_secs`,
//! and a matching file whose size, mtime and inode have not changed for `settle_secs`
//! becomes a local job (the same queued job `uplink-agent upload` makes), labelled with the
//! watch's `dataset`.
//!
//! - **Once per file version.** Every file queued is recorded in `watched_files` (path, size,
//!   mtime, inode) in the same transaction as its job, so a re-scan, a restart or a crash
//!   right after queueing never queues it again. A file replaced later (new inode, size or
//!   mtime) is a new version and is uploaded again.
//! - **What is skipped.** Symlinks (files and directories: never followed), anything that is
//!   not a regular file, hidden names (a path component starting with `.`, as `rsync` and
//!   editors use for files being written), names ending in `.tmp`, `.part`, `.partial` or
//!   `~`, the agent's `state_dir` and `key_file`, paths that are not UTF-8, and anything
//!   [`policy::check`] refuses.
//! - **Bounded work.** A scan examines at most `max_entries_per_scan` directory entries, in
//!   sorted order; the next scan goes on after the last one examined, so a huge tree is
//!   covered over several scans.
//! - **`after_upload = "delete"`** removes the file once its job is `done` (storage verified
//!   the object) and only when the file is still the version that was hashed. Failed and
//!   cancelled jobs keep their file. The check runs after every scan, so a crash between
//!   `done` and the delete deletes on the next start.
//!
//! The settle and cursor logic ([`Settler`], [`walk`]) is plain code, tested without a
//! runtime; [`run`] is the loop around it.
//!
//! - `config`: the `[[watch]]` entries, their globs and their validation.
//! - `settle`: the [`Settler`], which says when a file has stopped changing.
//! - `scan`: the bounded, sorted directory walk.
//! - `queue`: the `watched_files` table: queueing a settled file as a job, and the deletes.
//! - `task`: the watcher task that runs the scans and the deletes.

mod config;
mod queue;
mod scan;
mod settle;
mod task;

pub use config::*;
pub use queue::*;
pub use scan::*;
pub use settle::*;
pub use task::*;

/// Deeper directories are not scanned (symlinks are never followed, so this only guards
/// against pathological trees).
const MAX_DEPTH: usize = 64;
/// Enough for a scan to always get past the deepest directory chain ([`MAX_DEPTH`]) to a
/// file, so successive limited scans make progress.
const MIN_ENTRIES_PER_SCAN: usize = 100;

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use globset::GlobMatcher;

    use super::compile_glob;
    use crate::hasher::FileIdentity;

    pub(super) fn id(size: u64, mtime_ns: i64, inode: u64) -> FileIdentity {
        FileIdentity {
            size,
            mtime_ns,
            inode,
        }
    }

    pub(super) fn glob(g: &str) -> GlobMatcher {
        compile_glob(g).unwrap()
    }

    pub(super) struct Tree {
        _dir: tempfile::TempDir,
        pub(super) root: PathBuf,
    }

    pub(super) fn tree(files: &[&str]) -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for f in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, f.as_bytes()).unwrap();
        }
        Tree { _dir: dir, root }
    }
}
