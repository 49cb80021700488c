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
//! The settle and cursor logic ([`Settler`], [`walk`]) is plain code, tested below without
//! a runtime; [`run`] is the loop around it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use globset::{GlobBuilder, GlobMatcher};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uplink_protocol::ops::valid_dataset;
use uplink_protocol::unix_now;
use uuid::Uuid;

use crate::hasher::FileIdentity;
use crate::policy;
use crate::store::{self, NewJob, Store, StoreError};

/// Deeper directories are not scanned (symlinks are never followed, so this only guards
/// against pathological trees).
const MAX_DEPTH: usize = 64;
/// Enough for a scan to always get past the deepest directory chain ([`MAX_DEPTH`]) to a
/// file, so successive limited scans make progress.
const MIN_ENTRIES_PER_SCAN: usize = 100;

// ---- configuration -----------------------------------------------------------------------

/// What to do with a watched file once its upload is done.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AfterUpload {
    #[default]
    Keep,
    Delete,
}

impl AfterUpload {
    pub fn as_str(self) -> &'static str {
        match self {
            AfterUpload::Keep => "keep",
            AfterUpload::Delete => "delete",
        }
    }
}

/// One `[[watch]]` entry as written.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// Directory to scan; must lie inside `allowed_roots`.
    pub root: PathBuf,
    /// Pattern matched against the path relative to `root` (`*` stays within a directory,
    /// `**` crosses them), e.g. `**/*.mcap`.
    pub glob: String,
    /// Label sent with each upload; a segment of the object key.
    pub dataset: String,
    /// A file counts as finished once its size and mtime have not changed for this long.
    #[serde(default = "default_settle_secs")]
    pub settle_secs: u64,
    #[serde(default)]
    pub after_upload: AfterUpload,
    #[serde(default = "default_scan_interval_secs")]
    pub scan_interval_secs: u64,
    /// Directory entries examined per scan at most; larger trees take several scans.
    #[serde(default = "default_max_entries_per_scan")]
    pub max_entries_per_scan: usize,
}

fn default_settle_secs() -> u64 {
    30
}
fn default_scan_interval_secs() -> u64 {
    10
}
fn default_max_entries_per_scan() -> usize {
    10_000
}

/// A validated watch.
#[derive(Debug, Clone)]
pub struct Watch {
    /// Canonical.
    pub root: PathBuf,
    pub glob: String,
    pub matcher: GlobMatcher,
    pub dataset: String,
    pub settle: Duration,
    pub after_upload: AfterUpload,
    pub scan_interval: Duration,
    pub max_entries: usize,
}

/// Compiles a watch glob: relative to the root, `*` does not cross `/`.
pub fn compile_glob(glob: &str) -> Result<GlobMatcher, String> {
    if glob.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if glob.starts_with('/') {
        return Err(format!(
            "{glob:?} is absolute; it is matched against paths relative to root"
        ));
    }
    GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{glob:?} is not a valid glob: {e}"))
}

/// Checks every entry against the canonical `roots`; returns the watches and the problems
/// (each message names the entry: `watch[0] root: …`).
pub fn validate(entries: &[WatchConfig], roots: &[PathBuf]) -> (Vec<Watch>, Vec<String>) {
    let mut watches = Vec::new();
    let mut problems = Vec::new();
    for (i, w) in entries.iter().enumerate() {
        let mut bad = |field: &str, message: String| {
            problems.push(format!("watch[{i}] {field}: {message}"));
        };
        let root = if !w.root.is_absolute() {
            bad(
                "root",
                format!("{} is not an absolute path", w.root.display()),
            );
            None
        } else {
            match w.root.canonicalize() {
                Ok(c) if !c.is_dir() => {
                    bad("root", format!("{} is not a directory", w.root.display()));
                    None
                }
                Ok(c) if !policy::is_under_roots(&c, roots) => {
                    bad(
                        "root",
                        format!(
                            "{} is outside allowed_roots (a watch may only cover files the agent may upload)",
                            w.root.display()
                        ),
                    );
                    None
                }
                Ok(c) => Some(c),
                Err(e) => {
                    bad("root", format!("{}: {e}", w.root.display()));
                    None
                }
            }
        };
        let matcher = match compile_glob(&w.glob) {
            Ok(m) => Some(m),
            Err(e) => {
                bad("glob", e);
                None
            }
        };
        if !valid_dataset(&w.dataset) {
            bad(
                "dataset",
                format!(
                    "{:?} is not a valid dataset label (1-64 of A-Z a-z 0-9 . _ -, not starting with a dot)",
                    w.dataset
                ),
            );
        }
        if !(1..=86_400).contains(&w.settle_secs) {
            bad(
                "settle_secs",
                format!("{} is outside 1..=86400", w.settle_secs),
            );
        }
        if !(1..=3600).contains(&w.scan_interval_secs) {
            bad(
                "scan_interval_secs",
                format!("{} is outside 1..=3600", w.scan_interval_secs),
            );
        }
        if !(MIN_ENTRIES_PER_SCAN..=10_000_000).contains(&w.max_entries_per_scan) {
            bad(
                "max_entries_per_scan",
                format!(
                    "{} is outside {MIN_ENTRIES_PER_SCAN}..=10000000",
                    w.max_entries_per_scan
                ),
            );
        }
        if let (Some(root), Some(matcher)) = (root, matcher) {
            if watches
                .iter()
                .any(|o: &Watch| o.root == root && o.glob == w.glob)
            {
                bad(
                    "root",
                    format!("{} with glob {:?} is watched twice", root.display(), w.glob),
                );
                continue;
            }
            watches.push(Watch {
                root,
                glob: w.glob.clone(),
                matcher,
                dataset: w.dataset.clone(),
                settle: Duration::from_secs(w.settle_secs),
                after_upload: w.after_upload,
                scan_interval: Duration::from_secs(w.scan_interval_secs),
                max_entries: w.max_entries_per_scan,
            });
        }
    }
    if !problems.is_empty() {
        watches.clear();
    }
    (watches, problems)
}

// ---- settling ----------------------------------------------------------------------------

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

// ---- scanning ----------------------------------------------------------------------------

/// A matching regular file a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    pub identity: FileIdentity,
}

#[derive(Debug, Default)]
pub struct Scan {
    pub found: Vec<Found>,
    /// Directory entries examined.
    pub examined: usize,
    /// Where the next scan goes on (`None`: this one reached the end of the tree).
    pub resume_after: Option<PathBuf>,
    /// Directories that could not be read.
    pub errors: Vec<String>,
}

/// Names that are being written or are not meant to be uploaded.
pub fn ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || [".tmp", ".part", ".partial"]
            .iter()
            .any(|s| name.ends_with(s))
}

struct Walker<'a> {
    root: &'a Path,
    matcher: &'a GlobMatcher,
    skip: &'a [PathBuf],
    cursor: Option<&'a Path>,
    budget: usize,
    last: Option<PathBuf>,
    scan: Scan,
}

impl Walker<'_> {
    /// Returns false when the budget ran out.
    fn dir(&mut self, dir: &Path, depth: usize) -> bool {
        let mut names = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect::<Vec<_>>(),
            Err(e) => {
                self.scan.errors.push(format!("{}: {e}", dir.display()));
                return true;
            }
        };
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let Some(name) = name.to_str() else {
                continue; // not UTF-8: the job table and the policy work on UTF-8 paths
            };
            if ignored_name(name) || self.skip.iter().any(|s| path.starts_with(s)) {
                continue;
            }
            // Entries the previous, budget-limited scan examined come after it next time;
            // `path` orders exactly as this sorted depth-first walk visits.
            // The cursor is the last entry finished (a directory only once its whole subtree
            // is): skip it and everything before it, but enter the directories holding it.
            if let Some(cursor) = self.cursor {
                if path.as_path() <= cursor && (path == cursor || !cursor.starts_with(&path)) {
                    continue;
                }
            }
            if self.scan.examined >= self.budget {
                return false;
            }
            self.scan.examined += 1;
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // gone since read_dir
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                if depth < MAX_DEPTH && !self.dir(&path, depth + 1) {
                    return false;
                }
            } else if ft.is_file() {
                let matches = path
                    .strip_prefix(self.root)
                    .is_ok_and(|rel| self.matcher.is_match(rel));
                if matches {
                    self.scan.found.push(Found {
                        identity: FileIdentity::of(&meta),
                        path: path.clone(),
                    });
                }
            }
            // Symlinks, FIFOs, sockets and devices are skipped.
            self.last = Some(path);
        }
        true
    }
}

/// Walks `root` (canonical) in sorted depth-first order, after `cursor` when given, examining
/// at most `budget` entries. Never follows symlinks.
pub fn walk(
    root: &Path,
    matcher: &GlobMatcher,
    skip: &[PathBuf],
    cursor: Option<&Path>,
    budget: usize,
) -> Scan {
    let mut w = Walker {
        root,
        matcher,
        skip,
        cursor,
        budget,
        last: None,
        scan: Scan::default(),
    };
    let complete = w.dir(root, 0);
    let mut scan = w.scan;
    if !complete {
        // Nothing examined past the cursor yet: keep it.
        scan.resume_after = w.last.or_else(|| cursor.map(Path::to_path_buf));
    }
    scan
}

// ---- the store ---------------------------------------------------------------------------

/// Whether this version of the file was queued by a watch, or uploaded (or is being
/// uploaded) by any job.
pub fn is_known(conn: &Connection, path: &Path, id: &FileIdentity) -> Result<bool, StoreError> {
    let path = path.to_string_lossy();
    let (size, mtime, inode) = (id.size as i64, id.mtime_ns, id.inode as i64);
    let watched: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM watched_files WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3 AND inode = ?4",
            params![path, size, mtime, inode],
            |r| r.get(0),
        )
        .optional()?;
    if watched.is_some() {
        return Ok(true);
    }
    let job: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM jobs WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3 AND inode = ?4
               AND state NOT IN ('failed', 'cancelled') LIMIT 1",
            params![path, size, mtime, inode],
            |r| r.get(0),
        )
        .optional()?;
    Ok(job.is_some())
}

/// Queues a local job for `found` and records it, in one transaction. Returns the job id,
/// or `None` when this version is already known.
pub fn queue(
    conn: &mut Connection,
    found: &Found,
    watch: &Watch,
    now: i64,
) -> Result<Option<Uuid>, StoreError> {
    // `store::queue_local_upload` takes the connection itself, so the transaction is
    // spelled out; whatever fails (the commit included) leaves no transaction open.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = queue_in_tx(conn, found, watch, now);
    let result = result.and_then(|queued| {
        conn.execute_batch("COMMIT")?;
        Ok(queued)
    });
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

fn queue_in_tx(
    conn: &mut Connection,
    found: &Found,
    watch: &Watch,
    now: i64,
) -> Result<Option<Uuid>, StoreError> {
    if is_known(conn, &found.path, &found.identity)? {
        return Ok(None);
    }
    let job = NewJob {
        id: Uuid::new_v4(),
        action: String::new(),
        path: found.path.clone(),
        file_name: found
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into()),
        create_request_id: format!("create-{}", Uuid::new_v4().simple()),
        priority: uplink_protocol::flow::DEFAULT_PRIORITY,
    };
    store::queue_local_upload(conn, &job, now)?;
    conn.execute(
        "INSERT INTO watched_files (path, size, mtime_ns, inode, job_id, dataset, after_upload, queued_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            found.path.to_string_lossy(),
            found.identity.size as i64,
            found.identity.mtime_ns,
            found.identity.inode as i64,
            job.id.to_string(),
            watch.dataset,
            watch.after_upload.as_str(),
            now
        ],
    )?;
    Ok(Some(job.id))
}

/// The dataset of a job a watch queued (`None` for other jobs).
pub fn dataset_of(conn: &Connection, job_id: Uuid) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT dataset FROM watched_files WHERE job_id = ?1",
            params![job_id.to_string()],
            |r| r.get(0),
        )
        .optional()?)
}

/// A `delete` file whose job has ended and which is not dealt with yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub job_id: Uuid,
    pub path: PathBuf,
    pub state: String,
    /// What the job hashed (`None` if it ended before hashing).
    pub hashed: Option<FileIdentity>,
}

pub fn ended_deletes(conn: &Connection) -> Result<Vec<Ended>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT w.job_id, w.path, j.state, j.size, j.mtime_ns, j.inode
         FROM watched_files w JOIN jobs j ON j.id = w.job_id
         WHERE w.after_upload = 'delete' AND w.outcome IS NULL
           AND j.state IN ('done', 'failed', 'cancelled')",
    )?;
    let rows = stmt
        .query_map([], |r| {
            let id: String = r.get(0)?;
            let path: String = r.get(1)?;
            let (size, mtime, inode): (Option<i64>, Option<i64>, Option<i64>) =
                (r.get(3)?, r.get(4)?, r.get(5)?);
            Ok((id, path, r.get::<_, String>(2)?, size, mtime, inode))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(id, path, state, size, mtime, inode)| {
            let job_id = Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let hashed = match (size, mtime, inode) {
                (Some(size), Some(mtime_ns), Some(inode)) => Some(FileIdentity {
                    size: size as u64,
                    mtime_ns,
                    inode: inode as u64,
                }),
                _ => None,
            };
            Ok(Ended {
                job_id,
                path: PathBuf::from(path),
                state,
                hashed,
            })
        })
        .collect()
}

pub fn set_outcome(
    conn: &Connection,
    job_id: Uuid,
    outcome: &str,
    now: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE watched_files SET outcome = ?2, finished_at = ?3 WHERE job_id = ?1",
        params![job_id.to_string(), outcome, now],
    )?;
    Ok(())
}

/// Decides and does what `after_upload = "delete"` asks for one ended job; returns the
/// outcome to record. The check and the unlink are not atomic: a file replaced in the
/// instant between them is deleted.
pub fn finish_delete(ended: &Ended) -> String {
    if ended.state != "done" {
        return format!("kept: job {}", ended.state);
    }
    let Some(hashed) = ended.hashed else {
        return "kept: job was not hashed".into();
    };
    match std::fs::symlink_metadata(&ended.path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "gone".into(),
        Err(e) => format!("kept: cannot stat: {e}"),
        Ok(meta) if !meta.file_type().is_file() => "kept: no longer a regular file".into(),
        Ok(meta) if FileIdentity::of(&meta) != hashed => "kept: changed since it was hashed".into(),
        Ok(_) => match std::fs::remove_file(&ended.path) {
            Ok(()) => "deleted".into(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "gone".into(),
            Err(e) => format!("kept: cannot delete: {e}"),
        },
    }
}

// ---- the loop ----------------------------------------------------------------------------

struct WatchState {
    watch: Watch,
    settler: Settler,
    cursor: Option<PathBuf>,
    next: tokio::time::Instant,
}

/// Paths no watch may pick up: the agent's own state and key.
pub fn own_files(state_dir: &Path, key_file: &Path) -> Vec<PathBuf> {
    [state_dir, key_file]
        .iter()
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.to_path_buf()))
        .collect()
}

/// Scans every watch when due and deals with ended `delete` jobs, until `shutdown`.
pub async fn run(
    watches: Vec<Watch>,
    roots: Vec<PathBuf>,
    skip: Vec<PathBuf>,
    store: Store,
    shutdown: CancellationToken,
) {
    let start = tokio::time::Instant::now();
    let mut states: Vec<WatchState> = watches
        .into_iter()
        .map(|watch| {
            info!(root = %watch.root.display(), glob = %watch.glob, dataset = %watch.dataset, after_upload = watch.after_upload.as_str(), "Watching directory");
            WatchState {
                settler: Settler::new(watch.settle),
                watch,
                cursor: None,
                next: start,
            }
        })
        .collect();
    loop {
        let due = states.iter().map(|s| s.next).min().unwrap_or(start);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(due) => {}
        }
        let now = tokio::time::Instant::now();
        for state in states.iter_mut().filter(|s| s.next <= now) {
            scan_once(state, &roots, &skip, &store, &shutdown).await;
            state.next = tokio::time::Instant::now() + state.watch.scan_interval;
        }
        finish_deletes(&store).await;
    }
}

async fn scan_once(
    state: &mut WatchState,
    roots: &[PathBuf],
    skip: &[PathBuf],
    store: &Store,
    shutdown: &CancellationToken,
) {
    let (root, matcher, skip_list, cursor, budget) = (
        state.watch.root.clone(),
        state.watch.matcher.clone(),
        skip.to_vec(),
        state.cursor.clone(),
        state.watch.max_entries,
    );
    let scan = match tokio::task::spawn_blocking(move || {
        walk(&root, &matcher, &skip_list, cursor.as_deref(), budget)
    })
    .await
    {
        Ok(scan) => scan,
        Err(e) => {
            warn!(root = %state.watch.root.display(), error = %e, "Scan failed");
            return;
        }
    };
    for e in &scan.errors {
        warn!(root = %state.watch.root.display(), error = %e, "Cannot read directory");
    }
    let now = Instant::now();
    let settled: Vec<Found> = scan
        .found
        .into_iter()
        .filter(|f| state.settler.observe(&f.path, f.identity, now) == Verdict::Settled)
        .collect();
    match scan.resume_after {
        Some(after) => {
            debug!(root = %state.watch.root.display(), examined = scan.examined, after = %after.display(), "Scan stopped at max_entries_per_scan; the next goes on");
            state.cursor = Some(after);
        }
        None => {
            state.cursor = None;
            state.settler.end_pass();
        }
    }
    for found in settled {
        if shutdown.is_cancelled() {
            return;
        }
        match queue_settled(&found, &state.watch, roots, store).await {
            Ok(()) => state.settler.handled(&found.path),
            Err(e) => {
                // Tried again next scan.
                warn!(path = %found.path.display(), error = %e, "Cannot queue watched file");
            }
        }
    }
}

/// Checks the policy and queues one settled file (or notes it is known). Errors are
/// transient (database); a refused file counts as handled.
async fn queue_settled(
    found: &Found,
    watch: &Watch,
    roots: &[PathBuf],
    store: &Store,
) -> Result<(), StoreError> {
    let (path, roots_owned) = (found.path.clone(), roots.to_vec());
    let checked = tokio::task::spawn_blocking(move || {
        let s = path.to_string_lossy().into_owned();
        policy::check(&s, &roots_owned).and_then(|canonical| {
            if canonical == path {
                Ok(())
            } else {
                Err(policy::PolicyError::OutsideRoots(s))
            }
        })
    })
    .await
    .map_err(|e| StoreError::Worker(e.to_string()))?;
    if let Err(e) = checked {
        warn!(path = %found.path.display(), reason = %e, "Watched file refused by the path policy; skipped");
        return Ok(());
    }
    let (f, w, now) = (found.clone(), watch.clone(), unix_now());
    match store.call(move |c| queue(c, &f, &w, now)).await? {
        Some(job_id) => {
            info!(%job_id, path = %found.path.display(), dataset = %watch.dataset, size = found.identity.size, "Watched file queued")
        }
        None => {
            debug!(path = %found.path.display(), "Watched file already queued or uploaded")
        }
    }
    Ok(())
}

async fn finish_deletes(store: &Store) {
    let ended = match store.call(|c| ended_deletes(c)).await {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "Cannot list ended watch jobs");
            return;
        }
    };
    for e in ended {
        let job = e.clone();
        let outcome = match tokio::task::spawn_blocking(move || finish_delete(&job)).await {
            Ok(o) => o,
            Err(err) => {
                warn!(job_id = %e.job_id, error = %err, "Delete check failed");
                continue;
            }
        };
        if outcome == "deleted" {
            info!(job_id = %e.job_id, path = %e.path.display(), "Watched file deleted after upload");
        } else if e.state == "done" {
            warn!(job_id = %e.job_id, path = %e.path.display(), %outcome, "Watched file not deleted");
        } else {
            info!(job_id = %e.job_id, path = %e.path.display(), %outcome, "Watched file kept: its upload did not succeed");
        }
        let (id, now) = (e.job_id, unix_now());
        let recorded = store.call(move |c| set_outcome(c, id, &outcome, now)).await;
        if let Err(err) = recorded {
            warn!(job_id = %e.job_id, error = %err, "Cannot record the watched file's outcome");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplink_protocol::telemetry::JobState;

    fn id(size: u64, mtime_ns: i64, inode: u64) -> FileIdentity {
        FileIdentity {
            size,
            mtime_ns,
            inode,
        }
    }

    fn glob(g: &str) -> GlobMatcher {
        compile_glob(g).unwrap()
    }

    #[test]
    fn globs_match_relative_paths() {
        let g = glob("**/*.mcap");
        assert!(g.is_match("a.mcap"));
        assert!(g.is_match("2024/11/run.mcap"));
        assert!(!g.is_match("run.mcap.tmp"));
        let top = glob("*.bag");
        assert!(top.is_match("x.bag"));
        assert!(!top.is_match("sub/x.bag"), "* must not cross directories");
        assert!(compile_glob("").is_err());
        assert!(compile_glob("/abs/*.mcap").is_err());
        assert!(compile_glob("a[").is_err());
    }

    #[test]
    fn ignored_names() {
        for n in [
            ".hidden.mcap",
            ".run.mcap.Xy12",
            "a.mcap~",
            "a.tmp",
            "a.part",
            "a.partial",
        ] {
            assert!(ignored_name(n), "{n}");
        }
        for n in ["a.mcap", "tmp.mcap", "partial-run.bag"] {
            assert!(!ignored_name(n), "{n}");
        }
    }

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

    struct Tree {
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    fn tree(files: &[&str]) -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for f in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, f.as_bytes()).unwrap();
        }
        Tree { _dir: dir, root }
    }

    fn rel(t: &Tree, scan: &Scan) -> Vec<String> {
        scan.found
            .iter()
            .map(|f| {
                f.path
                    .strip_prefix(&t.root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    #[test]
    fn walk_finds_matching_regular_files_only() {
        use std::os::unix::fs::symlink;
        let t = tree(&[
            "a.mcap",
            "b.txt",
            "sub/c.mcap",
            "sub/deeper/d.mcap",
            ".hidden/e.mcap",
            "sub/.f.mcap.tmpXYZ",
            "sub/g.mcap.part",
            "state/agent.mcap",
        ]);
        symlink(t.root.join("a.mcap"), t.root.join("link.mcap")).unwrap();
        symlink(t.root.join("sub"), t.root.join("linkdir")).unwrap();
        std::fs::create_dir(t.root.join("dir.mcap")).unwrap();
        let skip = vec![t.root.join("state")];
        let scan = walk(&t.root, &glob("**/*.mcap"), &skip, None, 1000);
        assert_eq!(
            rel(&t, &scan),
            vec!["a.mcap", "sub/c.mcap", "sub/deeper/d.mcap"]
        );
        assert_eq!(scan.resume_after, None);
        assert!(scan.errors.is_empty());
        let top = walk(&t.root, &glob("*.mcap"), &skip, None, 1000);
        assert_eq!(rel(&t, &top), vec!["a.mcap"]);
    }

    #[test]
    fn a_limited_walk_goes_on_where_it_stopped_and_covers_everything() {
        let names: Vec<String> = (0..7)
            .flat_map(|d| (0..5).map(move |f| format!("d{d}/f{f}.bin")))
            .collect();
        let t = tree(&names.iter().map(String::as_str).collect::<Vec<_>>());
        // Entries that are not files count too and must not stall the cursor.
        for i in 0..9 {
            std::fs::create_dir_all(t.root.join(format!("d3/empty{i}"))).unwrap();
            std::os::unix::fs::symlink(t.root.join("d0"), t.root.join(format!("d5/link{i}")))
                .unwrap();
        }
        let g = glob("**/*.bin");
        let mut cursor: Option<PathBuf> = None;
        let mut seen = Vec::new();
        let mut scans = 0;
        loop {
            let scan = walk(&t.root, &g, &[], cursor.as_deref(), 4);
            assert!(scan.examined <= 4, "budget respected");
            seen.extend(rel(&t, &scan));
            scans += 1;
            match scan.resume_after {
                Some(c) => cursor = Some(c),
                None => break,
            }
            assert!(scans < 100, "walk never ends");
        }
        let mut want = names.clone();
        want.sort();
        assert_eq!(seen, want, "every file exactly once, in order");
        assert!(scans > 5);
    }

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = store::open(&dir.path().join("state")).unwrap();
        (dir, conn)
    }

    fn watch(root: &Path, after: AfterUpload) -> Watch {
        Watch {
            root: root.to_path_buf(),
            glob: "**/*.mcap".into(),
            matcher: glob("**/*.mcap"),
            dataset: "field-tests".into(),
            settle: Duration::from_secs(1),
            after_upload: after,
            scan_interval: Duration::from_secs(1),
            max_entries: 100,
        }
    }

    #[test]
    fn a_file_version_is_queued_once() {
        let (_d, mut conn) = db();
        let w = watch(Path::new("/data"), AfterUpload::Keep);
        let f = Found {
            path: "/data/a.mcap".into(),
            identity: id(10, 5, 9),
        };
        let job = queue(&mut conn, &f, &w, 1).unwrap().expect("queued");
        assert_eq!(queue(&mut conn, &f, &w, 2).unwrap(), None, "queued twice");
        assert_eq!(store::queued_local_jobs(&conn).unwrap(), vec![job]);
        assert_eq!(
            dataset_of(&conn, job).unwrap().as_deref(),
            Some("field-tests")
        );
        assert_eq!(dataset_of(&conn, Uuid::new_v4()).unwrap(), None);
        let rec = store::require_job(&conn, job).unwrap();
        assert_eq!(
            (rec.path, rec.file_name.as_str()),
            (f.path.clone(), "a.mcap")
        );
        // A replaced file is a new version.
        let newer = Found {
            identity: id(10, 5, 10),
            ..f.clone()
        };
        assert!(queue(&mut conn, &newer, &w, 3).unwrap().is_some());
        assert_eq!(store::queued_local_jobs(&conn).unwrap().len(), 2);
    }

    #[test]
    fn the_job_and_its_record_are_written_together_or_not_at_all() {
        let (_d, mut conn) = db();
        let w = watch(Path::new("/data"), AfterUpload::Keep);
        let f = Found {
            path: "/data/a.mcap".into(),
            identity: id(10, 5, 9),
        };
        // Make the record's insert fail: the job inserted before it must be rolled back.
        conn.execute_batch(
            "CREATE TEMP TRIGGER boom BEFORE INSERT ON watched_files
             BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
        )
        .unwrap();
        let err = queue(&mut conn, &f, &w, 1).unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert!(conn.is_autocommit(), "no transaction left open");
        assert!(store::queued_local_jobs(&conn).unwrap().is_empty());
        conn.execute_batch("DROP TRIGGER boom").unwrap();
        assert!(queue(&mut conn, &f, &w, 2).unwrap().is_some());
    }

    #[test]
    fn the_record_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let w = watch(Path::new("/data"), AfterUpload::Keep);
        let f = Found {
            path: "/data/a.mcap".into(),
            identity: id(10, 5, 9),
        };
        {
            let mut conn = store::open(&state).unwrap();
            queue(&mut conn, &f, &w, 1).unwrap().unwrap();
        }
        let mut conn = store::open(&state).unwrap();
        assert!(is_known(&conn, &f.path, &f.identity).unwrap());
        assert_eq!(queue(&mut conn, &f, &w, 2).unwrap(), None);
    }

    #[test]
    fn a_file_uploaded_by_another_job_is_known() {
        let (_d, mut conn) = db();
        let job = NewJob {
            id: Uuid::new_v4(),
            action: String::new(),
            path: "/data/a.mcap".into(),
            file_name: "a.mcap".into(),
            create_request_id: "create-x".into(),
            priority: uplink_protocol::flow::DEFAULT_PRIORITY,
        };
        store::queue_local_upload(&mut conn, &job, 1).unwrap();
        conn.execute(
            "UPDATE jobs SET size = 10, mtime_ns = 5, inode = 9 WHERE id = ?1",
            params![job.id.to_string()],
        )
        .unwrap();
        assert!(is_known(&conn, Path::new("/data/a.mcap"), &id(10, 5, 9)).unwrap());
        assert!(!is_known(&conn, Path::new("/data/a.mcap"), &id(11, 5, 9)).unwrap());
        store::set_job_state(&mut conn, job.id, JobState::Failed, 2).unwrap();
        assert!(
            !is_known(&conn, Path::new("/data/a.mcap"), &id(10, 5, 9)).unwrap(),
            "a failed job does not count"
        );
    }

    /// Queues `path` (as it is on disk) and moves its job to `end`, hashed as it is now.
    fn ended_job(conn: &mut Connection, path: &Path, after: AfterUpload, end: JobState) -> Uuid {
        let ident = FileIdentity::read(path).unwrap();
        let w = watch(path.parent().unwrap(), after);
        let f = Found {
            path: path.to_path_buf(),
            identity: ident,
        };
        let job = queue(conn, &f, &w, 1).unwrap().unwrap();
        conn.execute(
            "UPDATE jobs SET size = ?2, mtime_ns = ?3, inode = ?4 WHERE id = ?1",
            params![
                job.to_string(),
                ident.size as i64,
                ident.mtime_ns,
                ident.inode as i64
            ],
        )
        .unwrap();
        if end == JobState::Done {
            for s in [
                JobState::Hashing,
                JobState::Open,
                JobState::Uploading,
                JobState::Completing,
            ] {
                store::set_job_state(conn, job, s, 2).unwrap();
            }
        }
        store::set_job_state(conn, job, end, 3).unwrap();
        job
    }

    #[test]
    fn delete_only_after_done_and_only_the_hashed_version() {
        let t = tree(&["done.mcap", "failed.mcap", "changed.mcap", "kept.mcap"]);
        let (_d, mut conn) = db();
        let done = ended_job(
            &mut conn,
            &t.root.join("done.mcap"),
            AfterUpload::Delete,
            JobState::Done,
        );
        let failed = ended_job(
            &mut conn,
            &t.root.join("failed.mcap"),
            AfterUpload::Delete,
            JobState::Failed,
        );
        let changed = ended_job(
            &mut conn,
            &t.root.join("changed.mcap"),
            AfterUpload::Delete,
            JobState::Done,
        );
        ended_job(
            &mut conn,
            &t.root.join("kept.mcap"),
            AfterUpload::Keep,
            JobState::Done,
        );
        std::fs::write(t.root.join("changed.mcap"), b"new content, longer").unwrap();

        let ended = ended_deletes(&conn).unwrap();
        assert_eq!(ended.len(), 3, "keep files are never considered: {ended:?}");
        for e in &ended {
            let outcome = finish_delete(e);
            let want = if e.job_id == done {
                "deleted"
            } else if e.job_id == failed {
                "kept: job failed"
            } else {
                assert_eq!(e.job_id, changed);
                "kept: changed since it was hashed"
            };
            assert_eq!(outcome, want);
            set_outcome(&conn, e.job_id, &outcome, 4).unwrap();
        }
        assert!(!t.root.join("done.mcap").exists());
        for kept in ["failed.mcap", "changed.mcap", "kept.mcap"] {
            assert!(t.root.join(kept).exists(), "{kept}");
        }
        assert!(
            ended_deletes(&conn).unwrap().is_empty(),
            "each is dealt with once"
        );
    }

    #[test]
    fn validation_names_each_bad_field() {
        let t = tree(&["inside/x"]);
        let roots = vec![t.root.join("inside")];
        let good = WatchConfig {
            root: t.root.join("inside"),
            glob: "**/*.mcap".into(),
            dataset: "field-tests".into(),
            settle_secs: 5,
            after_upload: AfterUpload::Delete,
            scan_interval_secs: 2,
            max_entries_per_scan: 100,
        };
        let (ws, problems) = validate(std::slice::from_ref(&good), &roots);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(ws.len(), 1);
        assert_eq!(ws[0].settle, Duration::from_secs(5));

        let cases = [
            (
                WatchConfig {
                    root: t.root.clone(),
                    ..good.clone()
                },
                "watch[0] root: ",
            ),
            (
                WatchConfig {
                    root: "rel".into(),
                    ..good.clone()
                },
                "watch[0] root: ",
            ),
            (
                WatchConfig {
                    root: t.root.join("inside/missing"),
                    ..good.clone()
                },
                "watch[0] root: ",
            ),
            (
                WatchConfig {
                    glob: "a[".into(),
                    ..good.clone()
                },
                "watch[0] glob: ",
            ),
            (
                WatchConfig {
                    dataset: "a/b".into(),
                    ..good.clone()
                },
                "watch[0] dataset: ",
            ),
            (
                WatchConfig {
                    settle_secs: 0,
                    ..good.clone()
                },
                "watch[0] settle_secs: ",
            ),
            (
                WatchConfig {
                    scan_interval_secs: 0,
                    ..good.clone()
                },
                "watch[0] scan_interval_secs: ",
            ),
            (
                WatchConfig {
                    max_entries_per_scan: 0,
                    ..good.clone()
                },
                "watch[0] max_entries_per_scan: ",
            ),
        ];
        for (cfg, want) in cases {
            let (ws, problems) = validate(&[cfg], &roots);
            assert!(ws.is_empty());
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].starts_with(want), "{problems:?} vs {want}");
        }
        let (_, problems) = validate(&[good.clone(), good], &roots);
        assert_eq!(problems.len(), 1, "duplicate: {problems:?}");
        assert!(problems[0].starts_with("watch[1] root: "));
    }

    #[test]
    fn the_commented_example_in_the_default_config_is_valid() {
        let text = crate::cli::DEFAULT_CONFIG;
        let start = text.find("# [[watch]]").expect("an example [[watch]]");
        let example: String = text[start..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let cfg: crate::config::Config =
            toml::from_str(&format!("{}\n{example}", &text[..start])).unwrap();
        assert_eq!(cfg.watch.len(), 1);
        assert_eq!(cfg.watch[0].dataset, "field-tests");
        let t = tree(&[]);
        let entry = WatchConfig {
            root: t.root.clone(),
            ..cfg.watch[0].clone()
        };
        let (_, problems) = validate(&[entry], std::slice::from_ref(&t.root));
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn watch_entries_parse_from_toml() {
        let w: WatchConfig = toml::from_str(
            r#"
root = "/data/rec"
glob = "**/*.mcap"
dataset = "field-tests"
after_upload = "delete"
"#,
        )
        .unwrap();
        assert_eq!(w.after_upload, AfterUpload::Delete);
        assert_eq!(
            (w.settle_secs, w.scan_interval_secs, w.max_entries_per_scan),
            (30, 10, 10_000)
        );
        assert!(toml::from_str::<WatchConfig>(
            "root='/d'\nglob='*'\ndataset='x'\nafter_upload='shred'"
        )
        .is_err());
        assert!(
            toml::from_str::<WatchConfig>("root='/d'\nglob='*'\ndataset='x'\nsettle='1'").is_err()
        );
    }
}
