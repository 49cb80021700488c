//! Preparing a job for its upload: hashing the file whole or planning it and hashing it
//! beside the upload, checking the file did not change, and opening the session (or
//! reconciling with one that exists).

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;
use uplink_protocol::ops::{CreateSession, Op, SessionInfo, SessionRef, SessionState};
use uplink_protocol::plan::{self, PartPlan};
use uplink_protocol::telemetry::JobState;
use uplink_protocol::unix_now;
use uuid::Uuid;

use crate::hasher::{self, FileHash, FileIdentity, HashError, PartHash};
use crate::policy;
use crate::store::{self, JobRecord};
use crate::uploader::Control;

use super::finish::session_failure;
use super::{wait_for_cancel, Agent, JobError};

impl Agent {
    /// Prepares the job for its session, in the blocking pool (cancel stops it): a file up
    /// to `hash_first_max_mib` is hashed whole (one job at a time), so its SHA-256 goes
    /// with `session.create` and storage's copy of the content can answer; a larger one is
    /// only planned (size, identity, parts) and hashed while its parts upload.
    pub(super) async fn hash(
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

    /// Starts the hash pass that runs beside the upload: each part's digest comes through
    /// the returned channel as soon as it is read (the pass takes it from there), the whole
    /// file's SHA-256 at the end from [`Hashing`], only when the job still needs it (an MD5
    /// session's manifest; with SHA-256 parts the API takes the stored object's).
    pub(super) fn hash_while_uploading(
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
        let (checksum, whole) = (rec.part_checksum, rec.lacks_sha256());
        let task = tokio::task::spawn_blocking(move || {
            hasher::hash_parts(&path, identity, plan, checksum, whole, &token, |part| {
                // The pass is gone (paused, cancelled, failed): stop reading.
                tx.blocking_send(part).map_err(|_| HashError::Cancelled)
            })
            .map_err(hash_error)
        });
        Ok((Hashing { task, stop }, rx))
    }

    /// Waits for the hash pass that ran with the upload and stores the SHA-256 it gave.
    pub(super) async fn finish_hashing(
        &self,
        rec: &JobRecord,
        hashing: Hashing,
    ) -> Result<(), JobError> {
        let Some(sha256) = hashing
            .task
            .await
            .map_err(|e| JobError::Transient(e.to_string()))??
        else {
            info!(job_id = %rec.id, "File's parts hashed while uploading");
            return Ok(());
        };
        info!(job_id = %rec.id, sha256 = %sha256, "File hashed while uploading");
        let (id, now) = (rec.id, unix_now());
        self.store
            .call(move |c| store::set_sha256(c, id, &sha256, now))
            .await?;
        Ok(())
    }

    pub(super) async fn check_identity(&self, rec: &JobRecord) -> Result<(), JobError> {
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

    pub(super) async fn create_session(&self, rec: &JobRecord) -> Result<SessionInfo, JobError> {
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
            part_checksum: Some(rec.part_checksum),
        };
        let info: SessionInfo = self
            .link
            .call(Op::SessionCreate, &rec.create_request_id, &body)
            .await?;
        self.adopt_checksum(rec, &info).await?;
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

    /// Takes the session's part checksum (an API or storage that keeps MD5 answers `md5`
    /// to a job hashed with SHA-256: its parts are hashed again beside the upload).
    async fn adopt_checksum(&self, rec: &JobRecord, info: &SessionInfo) -> Result<(), JobError> {
        let (id, checksum) = (rec.id, info.part_checksum);
        if self
            .store
            .call(move |c| store::adopt_checksum(c, id, checksum))
            .await?
        {
            info!(job_id = %id, part_checksum = checksum.as_str(), "Session presigns parts with another digest; hashing them again while they upload");
        }
        Ok(())
    }

    /// Asks `session.status` and makes the parts agree with storage.
    pub(super) async fn reconcile(
        &self,
        rec: &JobRecord,
        session_id: Uuid,
    ) -> Result<SessionInfo, JobError> {
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
                self.adopt_checksum(rec, &info).await?;
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
}

/// What preparing a job gave: the whole hash, or only the plan.
enum Prepared {
    Hashed(FileHash),
    Planned(FileIdentity, PartPlan),
}

/// The hash pass running beside a job's upload.
pub(super) struct Hashing {
    task: tokio::task::JoinHandle<Result<Option<String>, JobError>>,
    stop: CancellationToken,
}

impl Hashing {
    /// Stops the pass (the upload paused or failed) and waits for it.
    pub(super) async fn stop(self) {
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
