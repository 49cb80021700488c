//! The job pipeline: drives one job from its stored state to done, a pause or an error
//! (hash → session → parts → complete), resuming after a restart from what SQLite and
//! `session.status` say, and reports its progress.
//!
//! This file has the loop and the step from state to state; the rest is one concern a file:
//! - `prepare`: hashing (whole, or beside the upload), the identity check, opening or
//!   reconciling the session.
//! - `finish`: completing the session with the manifest, and finishing, failing or
//!   cancelling the job with its ack.
//! - `progress`: progress messages, at most one a second per job.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use uplink_protocol::ops::SessionState;
use uplink_protocol::telemetry::JobState;
use uplink_protocol::unix_now;
use uuid::Uuid;

use crate::job::{self, NextStep};
use crate::pass::{Pass, UploadEnd};
use crate::rpc::RpcError;
use crate::store::{self, JobRecord, StoreError};
use crate::uploader::{Control, UploadError};

use super::Agent;

mod finish;
mod prepare;
mod progress;

pub(super) use progress::ProgressThrottle;

/// Why a job step stopped.
#[derive(Debug)]
enum JobError {
    /// Try the job again later (network, storage or database hiccup).
    Transient(String),
    /// The job cannot succeed; it fails with this reason.
    Fatal(String),
    Cancelled,
    Shutdown,
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Transition(_) | StoreError::NoJob(_) | StoreError::Corrupt(_) => {
                JobError::Fatal(e.to_string())
            }
            other => JobError::Transient(other.to_string()),
        }
    }
}

impl From<RpcError> for JobError {
    fn from(e: RpcError) -> Self {
        match e {
            RpcError::Shutdown => JobError::Shutdown,
            e if e.is_transient() => JobError::Transient(e.to_string()),
            e => JobError::Fatal(e.to_string()),
        }
    }
}

impl From<UploadError> for JobError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::Cancelled => JobError::Cancelled,
            UploadError::Shutdown | UploadError::Rpc(RpcError::Shutdown) => JobError::Shutdown,
            e if e.is_transient() => JobError::Transient(e.to_string()),
            e => JobError::Fatal(e.to_string()),
        }
    }
}

enum StepEnd {
    Finished,
    Paused,
}

impl Agent {
    pub(super) async fn drive(self: Arc<Self>, id: Uuid, mut rx: watch::Receiver<Control>) {
        let mut backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_secs(2))
            .with_max_delay(Duration::from_secs(120))
            .without_max_times()
            .build();
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            match self.step(id, &mut rx).await {
                Ok(StepEnd::Finished) => break,
                Ok(StepEnd::Paused) => {
                    let Ok(mut jobs) = self.jobs.lock() else {
                        return;
                    };
                    let ctl = *rx.borrow();
                    if ctl.pause && !ctl.cancel {
                        jobs.remove(&id);
                        return;
                    }
                    // Resumed (or cancelled) while pausing: go on.
                }
                Err(JobError::Shutdown) => break,
                Err(JobError::Cancelled) => {
                    self.cancel_job(id).await;
                    break;
                }
                Err(JobError::Fatal(reason)) => {
                    self.fail_job(id, reason).await;
                    break;
                }
                Err(JobError::Transient(error)) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(120));
                    warn!(job_id = %id, %error, retry_in_s = delay.as_secs(), "Job interrupted; will retry");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                        _ = wait_for_cancel(&mut rx) => {}
                    }
                }
            }
        }
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.remove(&id);
        }
        if let Ok(mut t) = self.progress_throttle.lock() {
            t.forget(id);
        }
    }

    async fn load(&self, id: Uuid) -> Result<JobRecord, JobError> {
        Ok(self.store.call(move |c| store::require_job(c, id)).await?)
    }

    async fn set_state(&self, id: Uuid, to: JobState) -> Result<(), JobError> {
        let now = unix_now();
        self.store
            .call(move |c| store::set_job_state(c, id, to, now))
            .await?;
        debug!(job_id = %id, state = to.as_str(), "Job state");
        Ok(())
    }

    /// One pass over the job from its stored state to done, a pause or an error.
    async fn step(&self, id: Uuid, rx: &mut watch::Receiver<Control>) -> Result<StepEnd, JobError> {
        let mut rec = self.load(id).await?;
        if rx.borrow().cancel {
            return if rec.state.is_terminal() {
                Ok(StepEnd::Finished)
            } else {
                Err(JobError::Cancelled)
            };
        }
        match job::next_step(rec.state, rec.planned(), rec.session_id.is_some()) {
            NextStep::Nothing => return Ok(StepEnd::Finished),
            NextStep::Hash => {
                self.hash(&rec, rx).await?;
                rec = self.load(id).await?;
            }
            NextStep::CreateSession | NextStep::Reconcile => {}
        }
        self.check_identity(&rec).await?;

        let session_id = match rec.session_id {
            None => {
                let info = self.create_session(&rec).await?;
                // Storage already held this content: the session is complete without upload.
                if info.state == SessionState::Completed {
                    info!(job_id = %id, session_id = %info.session_id, object_key = %info.object_key, "Content already stored; nothing to upload");
                    self.finish_done(&rec, &info).await?;
                    return Ok(StepEnd::Finished);
                }
                info.session_id
            }
            Some(session_id) => {
                let info = self.reconcile(&rec, session_id).await?;
                if info.state == SessionState::Completed {
                    self.finish_done(&rec, &info).await?;
                    return Ok(StepEnd::Finished);
                }
                session_id
            }
        };
        rec = self.load(id).await?;

        let (all_done, all_hashed) = {
            let parts = self.store.call(move |c| store::parts(c, id)).await?;
            (
                parts.iter().all(|p| p.done),
                parts.iter().all(|p| p.hashed()),
            )
        };
        // Restarted while completing with every part in storage and the file hashed:
        // complete again. Otherwise (including storage having lost parts) upload what is
        // missing first, hashing the file on the way if it was not hashed first.
        let streaming = !all_hashed || rec.lacks_sha256();
        if !(rec.state == JobState::Completing && all_done) || streaming {
            if rx.borrow().pause {
                self.to_paused(&rec).await?;
                return Ok(StepEnd::Paused);
            }
            self.set_state(id, JobState::Uploading).await?;
            self.progress(&rec, JobState::Uploading, None, 0).await;
            let on_progress = |done: u64, rate: u64| {
                self.progress_now(&rec, JobState::Uploading, done, rate);
            };
            let (hashing, hashed) = match streaming {
                true => {
                    let (h, rx) = self.hash_while_uploading(&rec)?;
                    (Some(h), Some(rx))
                }
                false => (None, None),
            };
            let end = Pass {
                job_id: id,
                session_id,
                path: rec.path.clone(),
                store: &self.store,
                link: &self.link,
                uploader: &self.uploader,
                flow: self.flow.clone(),
                priority: rec.priority,
                created_at: rec.created_at,
                control: &mut *rx,
                shutdown: &self.shutdown,
                on_progress: &on_progress,
                checksum: rec.part_checksum,
                hashed,
            }
            .run()
            .await;
            let end = match (end, hashing) {
                (Ok(UploadEnd::AllDone), Some(h)) => {
                    self.finish_hashing(&rec, h).await?;
                    UploadEnd::AllDone
                }
                (end, h) => {
                    if let Some(h) = h {
                        h.stop().await;
                    }
                    end?
                }
            };
            if end == UploadEnd::Paused {
                self.to_paused(&rec).await?;
                return Ok(StepEnd::Paused);
            }
            self.check_identity(&rec).await?;
            self.set_state(id, JobState::Completing).await?;
        }
        self.complete(&rec, session_id).await?;
        Ok(StepEnd::Finished)
    }

    async fn to_paused(&self, rec: &JobRecord) -> Result<(), JobError> {
        let current = self.load(rec.id).await?.state;
        if matches!(current, JobState::Open | JobState::Completing) {
            self.set_state(rec.id, JobState::Uploading).await?;
        }
        if current != JobState::Paused {
            self.set_state(rec.id, JobState::Paused).await?;
        }
        info!(job_id = %rec.id, "Job paused");
        self.progress(rec, JobState::Paused, None, 0).await;
        Ok(())
    }
}

/// Resolves once the job's controls ask for cancellation (never if the sender is gone).
async fn wait_for_cancel(rx: &mut watch::Receiver<Control>) {
    if rx.wait_for(|c| c.cancel).await.is_err() {
        std::future::pending::<()>().await;
    }
}
