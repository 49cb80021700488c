//! Finishing a job: completing the session with the signed manifest, and recording done,
//! failed or cancelled with the command's final ack.

use std::time::Duration;

use tracing::{debug, info, warn};
use uplink_protocol::command::AckState;
use uplink_protocol::ops::{
    parts_digest, CompleteSession, FileManifest, Op, SessionInfo, SessionRef, SessionState,
};
use uplink_protocol::telemetry::JobState;
use uplink_protocol::unix_now;
use uuid::Uuid;

use crate::rpc::RpcError;
use crate::store::{self, JobRecord, StoreError, StoredAck};

use super::{Agent, JobError};

impl Agent {
    /// What this device says it uploaded; the signed request carrying it is the file's
    /// chain of custody.
    pub(super) async fn manifest(
        &self,
        rec: &JobRecord,
        session_id: Uuid,
    ) -> Result<FileManifest, JobError> {
        let id = rec.id;
        let parts = self.store.call(move |c| store::parts(c, id)).await?;
        // Hashed while uploading: the SHA-256 was stored after `rec` was read. With SHA-256
        // parts it may be absent: the API takes the stored object's.
        let job = self.load(id).await?;
        if job.lacks_sha256() {
            return Err(JobError::Fatal("job was not hashed".into()));
        }
        let sha256 = job.sha256;
        Ok(FileManifest {
            device_id: self.device_id.clone(),
            session_id,
            path: rec.path.display().to_string(),
            size: rec.identity.map(|i| i.size).unwrap_or(0),
            sha256,
            part_count: parts.len() as u32,
            parts_digest: parts_digest(parts.iter().map(|p| (p.number, p.digest.as_str()))),
        })
    }

    pub(super) async fn complete(&self, rec: &JobRecord, session_id: Uuid) -> Result<(), JobError> {
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

    pub(super) async fn finish_done(
        &self,
        rec: &JobRecord,
        info: &SessionInfo,
    ) -> Result<(), JobError> {
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

    pub(super) async fn fail_job(&self, id: Uuid, reason: String) {
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

    pub(super) async fn cancel_job(&self, id: Uuid) {
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
}

pub(super) fn session_failure(info: &SessionInfo) -> String {
    match &info.error {
        Some(e) => format!(
            "session {} is {}: {e}",
            info.session_id,
            info.state.as_str()
        ),
        None => format!("session {} is {}", info.session_id, info.state.as_str()),
    }
}
