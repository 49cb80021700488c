//! The watcher task: scans every watch when it is due, queues the files that settled, and
//! deals with the `delete` files whose jobs ended, until shutdown.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uplink_protocol::unix_now;

use super::{
    ended_deletes, finish_delete, queue, set_outcome, walk, Found, Settler, Verdict, Watch,
};
use crate::policy;
use crate::store::{Store, StoreError};

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
