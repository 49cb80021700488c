//! Progress messages of a job: at most one a second per job during the upload, and never
//! dropped at a state change.

use std::collections::HashMap;
use std::time::Duration;

use uplink_protocol::ops::Op;
use uplink_protocol::telemetry::{JobState, Progress};
use uplink_protocol::topics::Channel;
use uuid::Uuid;

use crate::store::{self, JobRecord};

use super::Agent;

/// At most one progress message per job per this interval.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

impl Agent {
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
    pub(super) fn progress_now(&self, rec: &JobRecord, state: JobState, done: u64, rate: u64) {
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
    pub(super) async fn progress(
        &self,
        rec: &JobRecord,
        state: JobState,
        done: Option<u64>,
        rate: u64,
    ) {
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
pub(in crate::agent) struct ProgressThrottle {
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

    pub(super) fn forget(&mut self, id: Uuid) {
        self.last.remove(&id);
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
