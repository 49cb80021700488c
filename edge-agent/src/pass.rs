//! The upload pass of one job: presign parts ahead of need, PUT up to the job's share of the
//! concurrency at once (each streamed from disk by [`Uploader`]), commit finished parts as
//! soon as their slots are busy again; with a file hashed while it uploads, take each part
//! as the hash pass reaches it.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
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
use crate::rpc::{Link, RpcError};
use crate::store::{self, PartRecord, Store, StoreError};
use crate::uploader::{
    signature_fault, Control, PutError, UploadError, Uploader, UrlLife, MAX_REPRESIGNS,
    MAX_SIGNATURE_REFUSALS, SHUTDOWN_DRAIN,
};

/// How far the hash pass may run ahead of the PUTs: bytes of parts hashed and waiting for
/// a slot (besides those in flight), and at least [`HASHED_AHEAD_MIN`] parts. Close behind,
/// each part is still in the page cache when its PUT reads it, so a file larger than the
/// cache is read from disk once (with the sent parts' pages dropped, [`crate::uploader`]: a
/// 1 GiB file in a 160 MiB cgroup read 1.000 times; docs/performance.md). Far enough
/// ahead that one `parts.presign` request covers several parts: with two 8 MiB parts
/// waiting the agent asked for URLs two parts at a time, 64 requests per GiB.
const HASHED_AHEAD_BYTES: u64 = 64 << 20;
const HASHED_AHEAD_MIN: usize = 2;

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
    /// Which presign answer brought it: the latest answer's URLs are used even when already
    /// due for renewal (a lifetime shorter than the round trip would otherwise loop).
    answer: u64,
}

/// The URLs in hand by part number, and the number of the latest presign answer.
#[derive(Default)]
struct Urls {
    by_part: HashMap<u32, Url>,
    answers: u64,
}

impl Urls {
    /// Part `number`'s URL, if it may be used for a PUT now.
    fn usable(&self, number: u32) -> Option<&Url> {
        self.by_part
            .get(&number)
            .filter(|u| u.answer == self.answers || !u.life.needs_represign())
    }
}

/// A `parts.presign` answer: the numbers asked for, when, and the URLs.
type Presigned = (Vec<u32>, Instant, i64, Result<PresignedParts, RpcError>);

/// Parts uploaded, not yet committed to the store: (number, ETag, size).
type Finished = Vec<(u32, String, u64)>;

/// Which parts to presign, and with what: the session, the digest kind and the link.
struct Presigner<'a> {
    link: &'a Link,
    session_id: Uuid,
    checksum: PartChecksum,
    batch: usize,
}

impl<'a> Presigner<'a> {
    /// Asks for URLs of the first `batch` parts in line that lack a fresh one, without
    /// waiting: the answer arrives in the pass's loop while parts keep uploading.
    fn ask(&self, pending: &VecDeque<PartRecord>, urls: &Urls) -> Option<BoxFuture<'a, Presigned>> {
        let wanted: Vec<PartDigest> = pending
            .iter()
            .filter(|p| urls.usable(p.number).is_none())
            .take(self.batch)
            .map(|p| PartDigest::new(p.number, self.checksum, p.digest.clone()))
            .collect();
        if wanted.is_empty() {
            return None;
        }
        let numbers = wanted.iter().map(|p| p.number).collect();
        let body = PresignParts {
            session_id: self.session_id,
            parts: wanted,
        };
        let link = self.link;
        Some(Box::pin(async move {
            let request_id = format!("presign-{}", Uuid::new_v4().simple());
            // The API makes the URLs after the request is first sent: their lifetime is
            // counted from here.
            let (asked_at, asked_unix) = (Instant::now(), unix_now());
            let answer = link.call(Op::PartsPresign, &request_id, &body).await;
            (numbers, asked_at, asked_unix, answer)
        }))
    }
}

impl<'a> Pass<'a> {
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
        let per_job = self.flow.per_job();
        let batch = (per_job * 2).clamp(4, 32).min(ops::MAX_PRESIGN_BATCH);
        let presigner = Presigner {
            link: self.link,
            session_id: self.session_id,
            checksum: self.checksum,
            batch,
        };
        let mut urls = Urls::default();
        // At most one presign request at a time, sent while fewer than a round of parts in
        // line hold a fresh URL: a PUT slot never waits for the API's round trip.
        let mut presigning: Option<BoxFuture<'a, Presigned>> = None;
        let mut represigns: HashMap<u32, u32> = HashMap::new();
        // Storage's refusals of fresh URLs per part, in a row.
        let mut refusals: HashMap<u32, u32> = HashMap::new();
        let mut in_flight: HashMap<u32, PartRecord> = HashMap::new();
        let mut finished: Finished = Vec::new();
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
            // Ask when the next part has no URL, or fewer than a round of parts in line do
            // (an older URL of a later part may still be good while the next one's lapsed).
            let front_waits = pending
                .front()
                .is_some_and(|p| urls.usable(p.number).is_none());
            let ready = pending
                .iter()
                .filter(|p| urls.usable(p.number).is_some())
                .count();
            if presigning.is_none() && open && !ctl.pause && (front_waits || ready < per_job) {
                presigning = presigner.ask(&pending, &urls);
            }
            // Parts start in order, each once its URL is there.
            while open && !ctl.pause && in_flight.len() < per_job {
                let Some(url) = pending.front().and_then(|p| urls.usable(p.number)) else {
                    break;
                };
                let (url, life) = (url.part.clone(), url.life);
                let Some(part) = pending.pop_front() else {
                    break;
                };
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
            // Parts that finished are committed once their slots are busy again.
            if !finished.is_empty() {
                done_bytes += commit(self.store, job_id, &mut finished).await?;
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

            let want_hashed = hashed.is_some()
                && !ctl.pause
                && (pending.len() < HASHED_AHEAD_MIN
                    || pending.iter().map(|p| p.size).sum::<u64>() < HASHED_AHEAD_BYTES);
            tokio::select! {
                answer = async { presigning.as_mut().expect("checked").await }, if presigning.is_some() => {
                    presigning = None;
                    let (numbers, asked_at, asked_unix, answer) = answer;
                    let answer = answer?;
                    debug!(job_id = %job_id, count = answer.parts.len(), "Parts presigned");
                    if let Some(p) = answer.parts.first() {
                        if let Some(secs) = p.expires_in_secs {
                            // The API's clock when it made the URLs, against this one's now.
                            let api_now = p.expires_at.saturating_sub(secs as i64);
                            self.link.observe_api_clock(api_now, unix_now());
                        }
                    }
                    if let Some(&n) = numbers
                        .iter()
                        .find(|&&n| !answer.parts.iter().any(|p| p.number == n))
                    {
                        tasks.abort_all();
                        return Err(UploadError::MissingUrl(n));
                    }
                    urls.answers += 1;
                    for p in answer.parts {
                        let life = UrlLife::of(&p, asked_at, asked_unix);
                        let answer = urls.answers;
                        urls.by_part.insert(p.number, Url { part: p, life, answer });
                    }
                }
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
                            debug!(job_id = %job_id, part = number, %etag, "Part uploaded");
                            finished.push((number, etag, part.size));
                        }
                        Err(PutError::Expired(refused)) => {
                            let n = represigns.entry(number).or_insert(0);
                            *n += 1;
                            urls.by_part.remove(&number);
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
                    commit(self.store, job_id, &mut finished).await?;
                    drain(job_id, self.store, &mut tasks, &mut in_flight).await;
                    return Err(UploadError::Shutdown);
                }
            }
        }
    }
}

/// Records the finished parts as done (one transaction); returns their bytes.
async fn commit(store: &Store, job_id: Uuid, finished: &mut Finished) -> Result<u64, StoreError> {
    if finished.is_empty() {
        return Ok(0);
    }
    let parts: Finished = std::mem::take(finished);
    for _ in &parts {
        crate::failpoint::hit(crate::failpoint::PART_BEFORE_COMMIT);
    }
    let sizes: Vec<u64> = parts.iter().map(|(_, _, size)| *size).collect();
    store
        .call(move |c| {
            let etags: Vec<(u32, &str)> = parts.iter().map(|(n, e, _)| (*n, e.as_str())).collect();
            store::commit_parts(c, job_id, &etags)
        })
        .await?;
    for size in &sizes {
        crate::metrics::part_uploaded(*size);
    }
    let bytes = sizes.iter().sum();
    Ok(bytes)
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
