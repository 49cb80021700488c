//! The upload pass of one job: presign parts on demand, PUT up to the job's share of the
//! concurrency at once (each streamed from disk by [`Uploader`]), commit each finished part
//! at once; with a file hashed while it uploads, take each part as the hash pass reaches it.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uplink_protocol::ops::{
    self, Op, PartChecksum, PartDigest, PresignParts, PresignedPart, PresignedParts,
};
use uplink_protocol::unix_now;
use uuid::Uuid;

use crate::flow::Flow;
use crate::hasher::PartHash;
use crate::rpc::Link;
use crate::store::{self, PartRecord, Store};
use crate::uploader::{
    signature_fault, Control, PutError, UploadError, Uploader, UrlLife, MAX_REPRESIGNS,
    MAX_SIGNATURE_REFUSALS, SHUTDOWN_DRAIN,
};

/// How an upload pass ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadEnd {
    AllDone,
    Paused,
}

/// Everything one job's upload pass needs.
pub struct Pass<'a> {
    pub job_id: Uuid,
    pub session_id: Uuid,
    pub path: PathBuf,
    pub store: &'a Store,
    pub link: &'a Link,
    pub uploader: &'a Uploader,
    /// The PUT gate shared by every job: windows, priorities, concurrency.
    pub flow: Arc<Flow>,
    /// The job's priority and creation time (its place in line for PUT slots).
    pub priority: u8,
    pub created_at: i64,
    pub control: &'a mut watch::Receiver<Control>,
    pub shutdown: &'a CancellationToken,
    /// Called about once a second with (bytes done, recent rate in bytes/s).
    pub on_progress: &'a (dyn Fn(u64, u64) + Send + Sync),
    /// The digest the parts are presigned with (the job's, which is the session's).
    pub checksum: PartChecksum,
    /// Parts hashed while the upload runs, in order (from [`crate::hasher::hash_parts`]),
    /// when the file was not hashed first; the pass ends only once this closes.
    pub hashed: Option<mpsc::Receiver<PartHash>>,
}

struct Url {
    part: PresignedPart,
    life: UrlLife,
}

impl Pass<'_> {
    /// Uploads every part not yet done. Pause stops new parts; cancel aborts in-flight ones.
    pub async fn run(self) -> Result<UploadEnd, UploadError> {
        let job_id = self.job_id;
        let all = self.store.call(move |c| store::parts(c, job_id)).await?;
        let mut done_bytes: u64 = all.iter().filter(|p| p.done).map(|p| p.size).sum();
        // Parts not hashed yet join the line as the hash pass reaches them.
        let mut unhashed: HashMap<u32, PartRecord> = HashMap::new();
        let mut pending: VecDeque<PartRecord> = VecDeque::new();
        for p in all.into_iter().filter(|p| !p.done) {
            if p.hashed() {
                pending.push_back(p);
            } else {
                unhashed.insert(p.number, p);
            }
        }
        let mut hashed = self.hashed;
        let batch = (self.flow.per_job() * 2)
            .clamp(4, 32)
            .min(ops::MAX_PRESIGN_BATCH);
        // How far the hash pass may run ahead of the PUTs: parts hashed and waiting. Close
        // behind, each part is still in the page cache when its PUT reads it, so the file
        // is read from disk once.
        let ahead = batch;
        let mut urls: HashMap<u32, Url> = HashMap::new();
        let mut represigns: HashMap<u32, u32> = HashMap::new();
        // Storage's refusals of fresh URLs per part, in a row.
        let mut refusals: HashMap<u32, u32> = HashMap::new();
        let mut in_flight: HashMap<u32, PartRecord> = HashMap::new();
        let mut tasks: JoinSet<(u32, Result<String, PutError>)> = JoinSet::new();
        let sent = Arc::new(AtomicU64::new(0));
        let mut last_sent = 0u64;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let control = self.control;
        let mut window = self.flow.watch_open();

        info!(job_id = %job_id, session_id = %self.session_id, parts = pending.len(), "Uploading parts");
        loop {
            let ctl = *control.borrow_and_update();
            if ctl.cancel {
                tasks.abort_all();
                return Err(UploadError::Cancelled);
            }
            // Outside every upload window no part starts (those in flight finish); the
            // window opening wakes this loop.
            let open = *window.borrow_and_update();
            while open && !ctl.pause && in_flight.len() < self.flow.per_job() {
                let Some(part) = pending.pop_front() else {
                    break;
                };
                let fresh = urls
                    .get(&part.number)
                    .is_some_and(|u| !u.life.needs_represign());
                if !fresh {
                    // Presign this part and the next few that lack a fresh URL.
                    let wanted: Vec<PartDigest> = std::iter::once(&part)
                        .chain(pending.iter())
                        .filter(|p| {
                            p.number == part.number
                                || urls.get(&p.number).is_none_or(|u| u.life.needs_represign())
                        })
                        .take(batch)
                        .map(|p| PartDigest::new(p.number, self.checksum, p.digest.clone()))
                        .collect();
                    let body = PresignParts {
                        session_id: self.session_id,
                        parts: wanted,
                    };
                    let request_id = format!("presign-{}", Uuid::new_v4().simple());
                    // The API makes the URLs after the request is first sent: their
                    // lifetime is counted from here.
                    let (asked_at, asked_unix) = (Instant::now(), unix_now());
                    let answer: PresignedParts = tokio::select! {
                        r = self.link.call(Op::PartsPresign, &request_id, &body) => r?,
                        _ = self.shutdown.cancelled() => {
                            self.flow.close();
                            drain(job_id, self.store, &mut tasks, &mut in_flight).await;
                            return Err(UploadError::Shutdown);
                        }
                    };
                    debug!(job_id = %job_id, count = answer.parts.len(), "Parts presigned");
                    if let Some(p) = answer.parts.first() {
                        if let Some(secs) = p.expires_in_secs {
                            // The API's clock when it made the URLs, against this one's now.
                            let api_now = p.expires_at.saturating_sub(secs as i64);
                            self.link.observe_api_clock(api_now, unix_now());
                        }
                    }
                    for p in answer.parts {
                        let life = UrlLife::of(&p, asked_at, asked_unix);
                        urls.insert(p.number, Url { part: p, life });
                    }
                }
                let Some(url) = urls.get(&part.number) else {
                    tasks.abort_all();
                    return Err(UploadError::MissingUrl(part.number));
                };
                let (url, life) = (url.part.clone(), url.life);
                let uploader = self.uploader.clone();
                let flow = self.flow.clone();
                let (priority, created_at) = (self.priority, self.created_at);
                let path = self.path.clone();
                let sent = sent.clone();
                let number = part.number;
                let task_part = part.clone();
                in_flight.insert(number, part);
                tasks.spawn(async move {
                    let _slot = match flow.slot(job_id, priority, created_at).await {
                        Ok(s) => s,
                        Err(_) => {
                            return (number, Err(PutError::Transient("shutting down".into())))
                        }
                    };
                    let r = uploader
                        .put_part(&path, &task_part, &url, life, &sent)
                        .await;
                    (number, r)
                });
            }

            if in_flight.is_empty() {
                if pending.is_empty() && hashed.is_none() {
                    return Ok(UploadEnd::AllDone);
                }
                if ctl.pause {
                    info!(job_id = %job_id, "Upload paused");
                    return Ok(UploadEnd::Paused);
                }
            }

            let want_hashed = hashed.is_some() && pending.len() < ahead && !ctl.pause;
            tokio::select! {
                part = recv(&mut hashed), if want_hashed => {
                    let Some(part) = part else {
                        hashed = None;
                        continue;
                    };
                    let (number, digest) = (part.number, part.digest.clone());
                    let fresh = self
                        .store
                        .call(move |c| store::hash_part(c, job_id, number, &digest))
                        .await?;
                    match (fresh, unhashed.remove(&part.number)) {
                        (None, _) => {
                            tasks.abort_all();
                            return Err(UploadError::FileChanged(part.number));
                        }
                        (Some(true), Some(mut rec)) => {
                            rec.digest = part.digest;
                            pending.push_back(rec);
                        }
                        // Hashed before and the same: already done or in line.
                        _ => {}
                    }
                }
                joined = tasks.join_next(), if !tasks.is_empty() => {
                    let (number, result) = match joined {
                        Some(Ok(r)) => r,
                        Some(Err(e)) => {
                            tasks.abort_all();
                            return Err(UploadError::Task(e.to_string()));
                        }
                        None => continue,
                    };
                    let Some(part) = in_flight.remove(&number) else { continue };
                    match result {
                        Ok(etag) => {
                            let size = part.size;
                            let etag_db = etag.clone();
                            crate::failpoint::hit(crate::failpoint::PART_BEFORE_COMMIT);
                            self.store
                                .call(move |c| store::commit_part(c, job_id, number, &etag_db))
                                .await?;
                            done_bytes += size;
                            crate::metrics::part_uploaded(size);
                            debug!(job_id = %job_id, part = number, %etag, "Part uploaded");
                        }
                        Err(PutError::Expired(refused)) => {
                            let n = represigns.entry(number).or_insert(0);
                            *n += 1;
                            urls.remove(&number);
                            if let Some(answer) = &refused {
                                let r = refusals.entry(number).or_insert(0);
                                *r += 1;
                                if *r >= MAX_SIGNATURE_REFUSALS {
                                    tasks.abort_all();
                                    return Err(UploadError::Part {
                                        number,
                                        source: PutError::Refused(signature_fault(*r, answer)),
                                    });
                                }
                                warn!(job_id = %job_id, part = number, answer = %answer, "Storage refused the presigned URL as expired or not yet valid; presigning again");
                            }
                            if *n > MAX_REPRESIGNS {
                                tasks.abort_all();
                                return Err(UploadError::Part { number, source: PutError::Expired(refused) });
                            }
                            crate::metrics::part_retried();
                            debug!(job_id = %job_id, part = number, "URL expired; re-presigning");
                            pending.push_front(part);
                        }
                        Err(source) => {
                            tasks.abort_all();
                            return Err(UploadError::Part { number, source });
                        }
                    }
                }
                changed = window.changed() => {
                    if changed.is_err() {
                        window = self.flow.watch_open();
                    }
                }
                changed = control.changed() => {
                    if changed.is_err() {
                        // The controller is gone: only shutdown remains, handled below.
                        tokio::select! {
                            _ = self.shutdown.cancelled() => {}
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                }
                _ = tick.tick() => {
                    let total = sent.load(Ordering::Relaxed);
                    let rate = total.saturating_sub(last_sent);
                    last_sent = total;
                    (self.on_progress)(done_bytes, rate);
                }
                _ = self.shutdown.cancelled() => {
                    self.flow.close();
                    drain(job_id, self.store, &mut tasks, &mut in_flight).await;
                    return Err(UploadError::Shutdown);
                }
            }
        }
    }
}

/// At shutdown: lets the PUTs in flight finish (and commits them) for at most
/// [`SHUTDOWN_DRAIN`], then abandons the rest (they are uploaded again after a restart).
/// No new PUT starts: the caller closed the PUT permits.
async fn drain(
    job_id: Uuid,
    store: &Store,
    tasks: &mut JoinSet<(u32, Result<String, PutError>)>,
    in_flight: &mut HashMap<u32, PartRecord>,
) {
    if tasks.is_empty() {
        return;
    }
    info!(job_id = %job_id, parts = in_flight.len(), "Shutting down; letting parts in flight finish");
    let finish = async {
        while let Some(joined) = tasks.join_next().await {
            let Ok((number, Ok(etag))) = joined else {
                continue;
            };
            let Some(part) = in_flight.remove(&number) else {
                continue;
            };
            let size = part.size;
            match store
                .call(move |c| store::commit_part(c, job_id, number, &etag))
                .await
            {
                Ok(()) => {
                    crate::metrics::part_uploaded(size);
                    debug!(job_id = %job_id, part = number, "Part uploaded during shutdown");
                }
                Err(e) => warn!(job_id = %job_id, part = number, error = %e, "Part not committed"),
            }
        }
    };
    if tokio::time::timeout(SHUTDOWN_DRAIN, finish).await.is_err() {
        warn!(job_id = %job_id, parts = tasks.len(), "Parts still in flight at shutdown abandoned; they are sent again after a restart");
    }
    tasks.abort_all();
}

/// The next hashed part; `None` once the hash pass has ended (or there is none).
async fn recv(hashed: &mut Option<mpsc::Receiver<PartHash>>) -> Option<PartHash> {
    match hashed {
        Some(rx) => rx.recv().await,
        None => None,
    }
}
