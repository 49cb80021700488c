//! The job pipeline: drives one job from its stored state to done, a pause or an error
//! (hash → session → parts → complete), resuming after a restart from what SQLite and
//! `session.status` say, and reports its progress.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use uplink_protocol::command::AckState;
use uplink_protocol::ops::{
    parts_digest, CompleteSession, CreateSession, FileManifest, Op, SessionInfo, SessionRef,
    SessionState,
};
use uplink_protocol::plan::{self, PartPlan};
use uplink_protocol::telemetry::{JobState, Progress};
use uplink_protocol::topics::Channel;
use uplink_protocol::unix_now;
use uuid::Uuid;

use tokio_util::sync::CancellationToken;

use crate::hasher::{self, FileHash, FileIdentity, HashError, PartHash};
use crate::job::{self, NextStep};
use crate::pass::{Pass, UploadEnd};
use crate::policy;
use crate::rpc::RpcError;
use crate::store::{self, JobRecord, StoreError, StoredAck};
use crate::uploader::{Control, UploadError};

use super::Agent;

/// At most one progress message per job per this interval.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

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

        let all_done = {
            let parts = self.store.call(move |c| store::parts(c, id)).await?;
            parts.iter().all(|p| p.done)
        };
        // Restarted while completing with every part in storage and the file hashed:
        // complete again. Otherwise (including storage having lost parts) upload what is
        // missing first, hashing the file on the way if it was not hashed first.
        let streaming = !rec.hashed();
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

    /// Prepares the job for its session, in the blocking pool (cancel stops it): a file up
    /// to `hash_first_max_mib` is hashed whole (one job at a time), so its SHA-256 goes
    /// with `session.create` and storage's copy of the content can answer; a larger one is
    /// only planned (size, identity, parts) and hashed while its parts upload.
    async fn hash(
        &self,
        rec: &JobRecord,
        rx: &mut watch::Receiver<Control>,
    ) -> Result<(), JobError> {
        let _permit = tokio::select! {
            p = self.hash_permits.acquire() => p.map_err(|_| JobError::Shutdown)?,
            _ = self.shutdown.cancelled() => return Err(JobError::Shutdown),
            _ = wait_for_cancel(rx) => return Err(JobError::Cancelled),
        };
        self.set_state(rec.id, JobState::Hashing).await?;
        self.progress(rec, JobState::Hashing, None, 0).await;
        let stop = self.shutdown.child_token();
        let (path, roots, hint) = (rec.path.clone(), self.roots.clone(), self.part_size_hint);
        let hash_first = self.hash_first_bytes;
        let token = stop.clone();
        let mut handle = tokio::task::spawn_blocking(move || {
            // The file may have been swapped since the command was accepted.
            let canonical = policy::check(&path.to_string_lossy(), &roots)
                .map_err(|e| JobError::Fatal(e.to_string()))?;
            if canonical != path {
                return Err(JobError::Fatal(format!(
                    "path {} now resolves elsewhere",
                    path.display()
                )));
            }
            let identity = FileIdentity::read(&path)
                .map_err(|e| JobError::Fatal(format!("cannot read {}: {e}", path.display())))?;
            if identity.size > hash_first {
                let plan =
                    plan::plan(identity.size, hint).map_err(|e| JobError::Fatal(e.to_string()))?;
                return Ok(Prepared::Planned(identity, plan));
            }
            hasher::hash_file(&path, hint, &token)
                .map(Prepared::Hashed)
                .map_err(hash_error)
        });
        let result = tokio::select! {
            r = &mut handle => r,
            _ = wait_for_cancel(rx) => {
                stop.cancel();
                let _ = handle.await;
                return Err(JobError::Cancelled);
            }
        };
        let (id, now) = (rec.id, unix_now());
        match result.map_err(|e| JobError::Transient(e.to_string()))?? {
            Prepared::Hashed(hash) => {
                info!(job_id = %id, size = hash.identity.size, parts = hash.parts.len(), sha256 = %hash.sha256, "File hashed");
                self.store
                    .call(move |c| store::store_hash(c, id, &hash, now))
                    .await?;
            }
            Prepared::Planned(identity, plan) => {
                info!(job_id = %id, size = identity.size, parts = plan.part_count, "File planned; hashing it while its parts upload");
                self.store
                    .call(move |c| store::store_plan(c, id, identity, &plan, now))
                    .await?;
            }
        }
        Ok(())
    }

    /// Starts the hash pass that runs beside the upload: each part's MD5 comes through the
    /// returned channel as soon as it is read (the pass takes it from there), the whole
    /// file's SHA-256 at the end from [`Hashing`].
    fn hash_while_uploading(
        &self,
        rec: &JobRecord,
    ) -> Result<(Hashing, mpsc::Receiver<PartHash>), JobError> {
        let (Some(identity), Some(part_size)) = (rec.identity, rec.part_size) else {
            return Err(JobError::Fatal("job was not planned".into()));
        };
        let plan =
            plan::validate(identity.size, part_size).map_err(|e| JobError::Fatal(e.to_string()))?;
        let (tx, rx) = mpsc::channel(1);
        let stop = self.shutdown.child_token();
        let (path, token) = (rec.path.clone(), stop.clone());
        let task = tokio::task::spawn_blocking(move || {
            hasher::hash_parts(&path, identity, plan, &token, |part| {
                // The pass is gone (paused, cancelled, failed): stop reading.
                tx.blocking_send(part).map_err(|_| HashError::Cancelled)
            })
            .map_err(hash_error)
        });
        Ok((Hashing { task, stop }, rx))
    }

    /// Waits for the SHA-256 of the hash pass that ran with the upload and stores it.
    async fn finish_hashing(&self, rec: &JobRecord, hashing: Hashing) -> Result<(), JobError> {
        let sha256 = hashing
            .task
            .await
            .map_err(|e| JobError::Transient(e.to_string()))??;
        info!(job_id = %rec.id, sha256 = %sha256, "File hashed while uploading");
        let (id, now) = (rec.id, unix_now());
        self.store
            .call(move |c| store::set_sha256(c, id, &sha256, now))
            .await?;
        Ok(())
    }

    async fn check_identity(&self, rec: &JobRecord) -> Result<(), JobError> {
        let Some(expected) = rec.identity else {
            return Ok(());
        };
        let path = rec.path.clone();
        let now = tokio::task::spawn_blocking(move || FileIdentity::read(&path))
            .await
            .map_err(|e| JobError::Transient(e.to_string()))?;
        match now {
            Ok(id) if id == expected => Ok(()),
            Ok(_) => Err(JobError::Fatal("file changed during upload".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(JobError::Fatal(
                "file changed during upload (it is gone)".into(),
            )),
            Err(e) => Err(JobError::Fatal(format!(
                "cannot read {}: {e}",
                rec.path.display()
            ))),
        }
    }

    async fn create_session(&self, rec: &JobRecord) -> Result<SessionInfo, JobError> {
        let (Some(identity), Some(part_size)) = (rec.identity, rec.part_size) else {
            return Err(JobError::Fatal("job was not planned".into()));
        };
        // Known when the file was hashed first; otherwise it goes with the manifest.
        let sha256 = rec.sha256.clone();
        let planned =
            plan::validate(identity.size, part_size).map_err(|e| JobError::Fatal(e.to_string()))?;
        let id = rec.id;
        let dataset = self
            .store
            .call(move |c| crate::watch::dataset_of(c, id))
            .await?;
        let body = CreateSession {
            job_id: rec.id,
            command_id: (!rec.local).then_some(rec.id),
            file_name: rec.file_name.clone(),
            dataset,
            size: identity.size,
            sha256,
            part_size,
        };
        let info: SessionInfo = self
            .link
            .call(Op::SessionCreate, &rec.create_request_id, &body)
            .await?;
        if info.part_count != planned.part_count || info.part_size != part_size {
            return Err(JobError::Fatal(format!(
                "session plans {} parts of {} bytes; the agent hashed {} parts of {} bytes",
                info.part_count, info.part_size, planned.part_count, part_size
            )));
        }
        let (id, sid, now) = (rec.id, info.session_id, unix_now());
        self.store
            .call(move |c| store::set_session(c, id, sid, now))
            .await?;
        info!(job_id = %id, session_id = %sid, object_key = %info.object_key, "Session created");
        Ok(info)
    }

    /// Asks `session.status` and makes the parts agree with storage.
    async fn reconcile(&self, rec: &JobRecord, session_id: Uuid) -> Result<SessionInfo, JobError> {
        let request_id = format!("status-{}", Uuid::new_v4().simple());
        let info: SessionInfo = self
            .link
            .call(Op::SessionStatus, &request_id, &SessionRef { session_id })
            .await?;
        match info.state {
            SessionState::Completed => Ok(info),
            SessionState::Aborted | SessionState::Expired | SessionState::Failed => {
                Err(JobError::Fatal(session_failure(&info)))
            }
            _ => {
                let id = rec.id;
                let stored = info.stored_parts.clone();
                let (parts, bytes) = self
                    .store
                    .call(move |c| store::reconcile_parts(c, id, &stored))
                    .await?;
                info!(job_id = %id, %session_id, state = info.state.as_str(), parts_held = parts, bytes_held = bytes, "Reconciled with storage");
                Ok(info)
            }
        }
    }

    /// What this device says it uploaded; the signed request carrying it is the file's
    /// chain of custody.
    async fn manifest(&self, rec: &JobRecord, session_id: Uuid) -> Result<FileManifest, JobError> {
        let id = rec.id;
        let parts = self.store.call(move |c| store::parts(c, id)).await?;
        // Hashed while uploading: the SHA-256 was stored after `rec` was read.
        let Some(sha256) = self.load(id).await?.sha256 else {
            return Err(JobError::Fatal("job was not hashed".into()));
        };
        Ok(FileManifest {
            device_id: self.device_id.clone(),
            session_id,
            path: rec.path.display().to_string(),
            size: rec.identity.map(|i| i.size).unwrap_or(0),
            sha256,
            part_count: parts.len() as u32,
            parts_digest: parts_digest(parts.iter().map(|p| (p.number, p.md5.as_str()))),
        })
    }

    async fn complete(&self, rec: &JobRecord, session_id: Uuid) -> Result<(), JobError> {
        self.progress(rec, JobState::Completing, None, 0).await;
        let request_id = format!("complete-{}", Uuid::new_v4().simple());
        let manifest = self.manifest(rec, session_id).await?;
        let body = CompleteSession {
            session_id,
            manifest: Some(manifest),
        };
        let mut info: SessionInfo = self
            .link
            .call(Op::SessionComplete, &request_id, &body)
            .await?;
        for _ in 0..60 {
            match info.state {
                SessionState::Completed => {
                    crate::failpoint::hit(crate::failpoint::COMPLETE_BEFORE_DONE);
                    return self.finish_done(rec, &info).await;
                }
                SessionState::Aborted | SessionState::Expired | SessionState::Failed => {
                    return Err(JobError::Fatal(session_failure(&info)));
                }
                _ => {
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(JobError::Shutdown),
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                    let request_id = format!("status-{}", Uuid::new_v4().simple());
                    info = self
                        .link
                        .call(Op::SessionStatus, &request_id, &SessionRef { session_id })
                        .await?;
                }
            }
        }
        Err(JobError::Transient(format!(
            "session {session_id} is still {}",
            info.state.as_str()
        )))
    }

    async fn finish_done(&self, rec: &JobRecord, info: &SessionInfo) -> Result<(), JobError> {
        let mut ack = StoredAck::new(AckState::Done);
        ack.session_id = Some(info.session_id);
        let (id, stored, now) = (rec.id, ack.clone(), unix_now());
        self.store
            .call(move |c| store::finish_job(c, id, JobState::Done, &stored, now))
            .await?;
        info!(job_id = %id, session_id = %info.session_id, object_key = %info.object_key, size = info.size, "Upload done");
        if !rec.local {
            self.send_ack(id, &ack).await;
        }
        let total = rec.identity.map(|i| i.size).unwrap_or(info.size);
        self.progress(rec, JobState::Done, Some(total), 0).await;
        self.refresh_queue_depth().await;
        Ok(())
    }

    async fn fail_job(&self, id: Uuid, reason: String) {
        warn!(job_id = %id, %reason, "Job failed");
        // Loaded before the failure is recorded; what is used of it (session, sizes,
        // local) does not change with the state.
        let rec = self.load(id).await.ok();
        let ack = StoredAck::with_reason(AckState::Failed, reason);
        let (stored, now) = (ack.clone(), unix_now());
        match self
            .store
            .call(move |c| store::finish_job(c, id, JobState::Failed, &stored, now))
            .await
        {
            Ok(()) => {}
            Err(StoreError::Transition(e)) => {
                debug!(job_id = %id, error = %e, "Job already finished");
                return;
            }
            Err(e) => {
                warn!(job_id = %id, error = %e, "Cannot record job failure; it is retried on restart");
                return;
            }
        }
        if let Some(session_id) = rec.as_ref().and_then(|r| r.session_id) {
            // Best effort: free the storage the session holds (a terminal session answers
            // with a conflict, which is fine). This comes before the ack, so an operator
            // who sees "failed" finds no parts left in storage.
            let request_id = format!("abort-{}", Uuid::new_v4().simple());
            let aborted: Result<SessionInfo, RpcError> = self
                .link
                .call(Op::SessionAbort, &request_id, &SessionRef { session_id })
                .await;
            if let Err(e) = aborted {
                debug!(job_id = %id, %session_id, error = %e, "Session not aborted");
            }
        }
        if !rec.as_ref().is_some_and(|r| r.local) {
            self.send_ack(id, &ack).await;
        }
        if let Some(rec) = rec {
            self.progress(&rec, JobState::Failed, None, 0).await;
        }
        self.refresh_queue_depth().await;
    }

    async fn cancel_job(&self, id: Uuid) {
        let rec = match self.load(id).await {
            Ok(r) if !r.state.is_terminal() => r,
            _ => return,
        };
        if let Some(session_id) = rec.session_id {
            let request_id = format!("abort-{}", Uuid::new_v4().simple());
            let aborted: Result<SessionInfo, RpcError> = self
                .link
                .call(Op::SessionAbort, &request_id, &SessionRef { session_id })
                .await;
            match aborted {
                Ok(_) => info!(job_id = %id, %session_id, "Session aborted"),
                Err(RpcError::Shutdown) => return,
                Err(e) => {
                    warn!(job_id = %id, %session_id, error = %e, "Session abort failed; storage cleanup expires it")
                }
            }
        }
        let ack = StoredAck::with_reason(AckState::Failed, "cancelled");
        let (stored, now) = (ack.clone(), unix_now());
        if let Err(e) = self
            .store
            .call(move |c| store::finish_job(c, id, JobState::Cancelled, &stored, now))
            .await
        {
            warn!(job_id = %id, error = %e, "Cannot record cancellation");
            return;
        }
        info!(job_id = %id, "Job cancelled");
        if !rec.local {
            self.send_ack(id, &ack).await;
        }
        self.progress(&rec, JobState::Cancelled, None, 0).await;
        self.refresh_queue_depth().await;
    }

    // ---- progress ------------------------------------------------------------------------

    fn progress_body(&self, rec: &JobRecord, state: JobState, done: u64, rate: u64) -> Progress {
        let waiting = state == JobState::Uploading && !self.flow.is_open();
        Progress {
            waiting_for: waiting.then(|| "upload_window".to_string()),
            job_id: rec.id,
            session_id: rec.session_id,
            state,
            bytes_done: done,
            bytes_total: rec.identity.map(|i| i.size).unwrap_or(rec.bytes_total),
            rate_bps: rate,
        }
    }

    /// Progress during the upload pass: dropped when the last one was under a second ago.
    fn progress_now(&self, rec: &JobRecord, state: JobState, done: u64, rate: u64) {
        let allowed = self
            .progress_throttle
            .lock()
            .is_ok_and(|mut t| t.try_now(rec.id, tokio::time::Instant::now()));
        if !allowed {
            return;
        }
        let body = self.progress_body(rec, state, done, rate);
        let request_id = format!("progress-{}", Uuid::new_v4().simple());
        self.link
            .send_signed_now(Channel::Progress, Op::Progress, &request_id, &body);
    }

    /// Progress at a state change: never dropped; sent later (in the background) when the
    /// job's last message was under a second ago.
    async fn progress(&self, rec: &JobRecord, state: JobState, done: Option<u64>, rate: u64) {
        let done = match done {
            Some(d) => d,
            None => {
                let id = rec.id;
                self.store
                    .call(move |c| store::bytes_done(c, id))
                    .await
                    .unwrap_or(0)
            }
        };
        let mut fresh = rec.clone();
        if fresh.session_id.is_none() {
            if let Ok(loaded) = self.load(rec.id).await {
                fresh = loaded;
            }
        }
        let wait = self
            .progress_throttle
            .lock()
            .map(|mut t| t.reserve(rec.id, tokio::time::Instant::now()))
            .unwrap_or_default();
        let body = self.progress_body(&fresh, state, done, rate);
        let request_id = format!("progress-{}", Uuid::new_v4().simple());
        if wait.is_zero() {
            self.link
                .send_signed_now(Channel::Progress, Op::Progress, &request_id, &body);
        } else {
            let link = self.link.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                link.send_signed_now(Channel::Progress, Op::Progress, &request_id, &body);
            });
        }
    }
}

/// At most one progress message per job per second.
#[derive(Debug, Default)]
pub(super) struct ProgressThrottle {
    /// When each job's latest message was (or is scheduled to be) sent.
    last: HashMap<Uuid, tokio::time::Instant>,
}

impl ProgressThrottle {
    /// Takes the slot now if the job's last message is a second old; otherwise refuses.
    fn try_now(&mut self, id: Uuid, now: tokio::time::Instant) -> bool {
        match self.last.get(&id) {
            Some(t) if now < *t + PROGRESS_INTERVAL => false,
            _ => {
                self.last.insert(id, now);
                true
            }
        }
    }

    /// Reserves the job's next free slot and says how long to wait for it.
    fn reserve(&mut self, id: Uuid, now: tokio::time::Instant) -> Duration {
        let at = self
            .last
            .get(&id)
            .map_or(now, |t| (*t + PROGRESS_INTERVAL).max(now));
        self.last.insert(id, at);
        at - now
    }

    fn forget(&mut self, id: Uuid) {
        self.last.remove(&id);
    }
}

fn session_failure(info: &SessionInfo) -> String {
    match &info.error {
        Some(e) => format!(
            "session {} is {}: {e}",
            info.session_id,
            info.state.as_str()
        ),
        None => format!("session {} is {}", info.session_id, info.state.as_str()),
    }
}

/// Resolves once the job's controls ask for cancellation (never if the sender is gone).
async fn wait_for_cancel(rx: &mut watch::Receiver<Control>) {
    if rx.wait_for(|c| c.cancel).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What preparing a job gave: the whole hash, or only the plan.
enum Prepared {
    Hashed(FileHash),
    Planned(FileIdentity, PartPlan),
}

/// The hash pass running beside a job's upload.
struct Hashing {
    task: tokio::task::JoinHandle<Result<String, JobError>>,
    stop: CancellationToken,
}

impl Hashing {
    /// Stops the pass (the upload paused or failed) and waits for it.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn hash_error(e: HashError) -> JobError {
    match e {
        HashError::Cancelled => JobError::Shutdown,
        e => JobError::Fatal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_at_most_once_a_second_per_job() {
        let mut t = ProgressThrottle::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let t0 = tokio::time::Instant::now();
        assert!(t.try_now(a, t0));
        assert!(t.try_now(b, t0));
        assert!(!t.try_now(a, t0 + Duration::from_millis(999)));
        assert_eq!(
            t.reserve(a, t0 + Duration::from_millis(200)),
            Duration::from_millis(800)
        );
        // The reserved slot counts: the next one is a second after it.
        assert_eq!(
            t.reserve(a, t0 + Duration::from_millis(300)),
            Duration::from_millis(1700)
        );
        assert!(!t.try_now(a, t0 + Duration::from_millis(2500)));
        assert!(t.try_now(a, t0 + Duration::from_millis(3000)));
        t.forget(a);
        assert_eq!(t.reserve(a, t0), Duration::ZERO);
    }
}
