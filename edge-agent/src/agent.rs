//! Orchestration: [`run`] wires the store, the MQTT link and the uploader together, handles
//! commands, and drives each job (hash → session → upload → complete), resuming after a
//! restart from what SQLite and `session.status` say.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rumqttc::QoS;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uplink_protocol::command::{AckState, Action, Command, CommandAck};
use uplink_protocol::envelope::{CommandEnvelope, CommandError, MAX_PAYLOAD_BYTES};
use uplink_protocol::flow::{self as flow_wire, FlowConfig, DEFAULT_PRIORITY};
use uplink_protocol::keyring::CommandKeys;
use uplink_protocol::ops::{
    parts_digest, CompleteSession, CreateSession, FileManifest, Op, SessionInfo, SessionRef,
    SessionState,
};
use uplink_protocol::plan::{self, MIB};
use uplink_protocol::telemetry::{JobState, Progress};
use uplink_protocol::topics::Channel;
use uplink_protocol::unix_now;
use uuid::Uuid;

use crate::config::Loaded;
use crate::flow::{self, Flow};
use crate::hasher::{self, FileIdentity, HashError};
use crate::job::{self, NextStep};
use crate::rpc::{Link, LinkSettings, RetryPolicy, RpcError};
use crate::store::{self, JobRecord, NewJob, Store, StoreError, StoredAck};
use crate::uploader::{Control, Pass, UploadEnd, UploadError, Uploader};
use crate::{metrics, policy};

/// Final acks younger than this are re-sent after every (re)connect, in case one was lost.
const ACK_RESEND_WINDOW_SECS: i64 = 3600;
/// How long shutdown waits for jobs to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the store is polled for jobs queued with `uplink-agent upload`.
const LOCAL_POLL: Duration = Duration::from_millis(1500);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot open the state database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("startup task failed: {0}")]
    Task(String),
    #[error("cannot listen for metrics on {0}: {1} (check metrics_listen)")]
    Metrics(std::net::SocketAddr, std::io::Error),
}

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

/// Request id of the ack of `command_id` in `state`: stable, so a re-sent ack is idempotent.
pub fn ack_request_id(command_id: Uuid, state: AckState) -> String {
    format!("ack-{}-{}", command_id.simple(), state.as_str())
}

/// Reads the command id out of a command that failed to open for a reason other than its
/// signature (so it is authentic).
fn readable_command_id(command_json: &str) -> Option<Uuid> {
    let v: serde_json::Value = serde_json::from_str(command_json).ok()?;
    Uuid::parse_str(v.get("command_id")?.as_str()?).ok()
}

struct Agent {
    device_id: String,
    command_key: CommandKeys,
    roots: Vec<PathBuf>,
    part_size_hint: u64,
    store: Store,
    link: Arc<Link>,
    uploader: Uploader,
    /// PUT slots (windows, priorities, concurrency) and the bandwidth cap.
    flow: Arc<Flow>,
    hash_permits: Arc<Semaphore>,
    jobs: Mutex<HashMap<Uuid, watch::Sender<Control>>>,
    progress_throttle: Mutex<ProgressThrottle>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Runs the agent until `shutdown` fires.
pub async fn run(loaded: Loaded, shutdown: CancellationToken) -> Result<(), AgentError> {
    let cfg = loaded.config;
    let state_dir = cfg.state_dir.clone();
    let conn = tokio::task::spawn_blocking(move || store::open(&state_dir))
        .await
        .map_err(|e| AgentError::Task(e.to_string()))??;
    let store = Store::new(conn);
    let overrides = store
        .call(|c| store::flow_overrides(c))
        .await?
        .unwrap_or_default();
    let flow = Flow::new(flow::Settings::from_config(&cfg), &overrides);
    {
        let s = flow.settings();
        info!(max_upload_bytes_per_sec = s.max_upload_bytes_per_sec, upload_windows = %s.windows_text(), concurrency = s.concurrency, per_job_concurrency = s.per_job(), overridden = !overrides.is_empty(), "Flow control");
    }
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(
            metrics::bind(addr)
                .await
                .map_err(|e| AgentError::Metrics(addr, e))?,
        ),
        None => None,
    };
    let uploader = Uploader::new(flow.limiter())?;
    let link_parts = Link::start(
        LinkSettings {
            device_id: cfg.device_id.clone(),
            host: cfg.mqtt.host.clone(),
            port: cfg.mqtt.port,
            username: cfg.mqtt.username.clone(),
            password: loaded.mqtt_password,
            key: loaded.key,
            command_key: loaded.command_key.clone(),
            policy: RetryPolicy::new(Duration::from_secs(cfg.request_timeout_secs)),
        },
        shutdown.clone(),
    );
    let agent = Arc::new(Agent {
        device_id: cfg.device_id.clone(),
        command_key: loaded.command_key,
        roots: loaded.roots,
        part_size_hint: cfg.part_size_mib.saturating_mul(MIB),
        store,
        link: link_parts.link,
        uploader,
        flow: flow.clone(),
        hash_permits: Arc::new(Semaphore::new(1)),
        jobs: Mutex::new(HashMap::new()),
        progress_throttle: Mutex::new(ProgressThrottle::default()),
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });
    info!(device_id = %cfg.device_id, host = %cfg.mqtt.host, port = cfg.mqtt.port, version = env!("CARGO_PKG_VERSION"), "Agent starting");

    agent.refresh_queue_depth().await;
    let commands = tokio::spawn(agent.clone().command_loop(link_parts.commands));
    let connections = tokio::spawn(agent.clone().connection_loop(link_parts.connected));
    let local_jobs = tokio::spawn(agent.clone().local_job_loop());
    let clock = tokio::spawn(flow.clone().clock(shutdown.clone()));
    let watcher = (!loaded.watches.is_empty()).then(|| {
        tokio::spawn(crate::watch::run(
            loaded.watches,
            agent.roots.clone(),
            crate::watch::own_files(&cfg.state_dir, &cfg.key_file),
            agent.store.clone(),
            shutdown.clone(),
        ))
    });
    let metrics_task = metrics_listener
        .map(|l| tokio::spawn(metrics::serve(l, agent.store.clone(), shutdown.clone())));
    agent.resume_jobs().await;
    // READY=1 now; WATCHDOG=1 while the runtime runs; STOPPING=1 when `shutdown` fires.
    uplink_service::sd_notify::ready("agent", &shutdown);

    shutdown.cancelled().await;
    info!("Shutting down");
    agent.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, agent.tasks.wait())
        .await
        .is_err()
    {
        warn!("Jobs did not stop in time; they resume on the next start");
    }
    let mut tasks = vec![
        ("commands", commands),
        ("connections", connections),
        ("local jobs", local_jobs),
        ("flow clock", clock),
        ("mqtt", link_parts.task),
    ];
    if let Some(t) = metrics_task {
        tasks.push(("metrics", t));
    }
    if let Some(t) = watcher {
        tasks.push(("watch", t));
    }
    for (name, task) in tasks {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(())) => debug!(task = name, "Task ended"),
            Ok(Err(e)) => warn!(task = name, error = %e, "Task ended abnormally"),
            Err(_) => warn!(task = name, "Task did not end in time"),
        }
    }
    info!("Agent stopped");
    Ok(())
}

impl Agent {
    // ---- commands ------------------------------------------------------------------------

    async fn command_loop(self: Arc<Self>, mut rx: mpsc::Receiver<bytes::Bytes>) {
        loop {
            let payload = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => break,
                },
            };
            self.handle_payload(&payload).await;
        }
    }

    async fn handle_payload(self: &Arc<Self>, payload: &[u8]) {
        if payload.len() > MAX_PAYLOAD_BYTES {
            warn!(bytes = payload.len(), "Command too large; dropped");
            return;
        }
        let env: CommandEnvelope = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "Malformed command envelope; dropped");
                return;
            }
        };
        match env.open(&self.command_key, &self.device_id, unix_now()) {
            Ok(cmd) => self.handle_command(cmd).await,
            Err(CommandError::Signature(e)) => {
                warn!(error = %e, "Command with a bad signature; dropped");
            }
            Err(reason) => {
                let Some(id) = readable_command_id(&env.command) else {
                    warn!(%reason, "Command refused; no command id to answer");
                    return;
                };
                if self.resend_if_seen(id).await {
                    return;
                }
                warn!(command_id = %id, %reason, "Command refused");
                let action = serde_json::from_str::<serde_json::Value>(&env.command)
                    .ok()
                    .and_then(|v| v.get("action").map(|a| a.to_string()))
                    .unwrap_or_else(|| "null".into());
                let ack = StoredAck::with_reason(AckState::Rejected, reason.to_string());
                self.record_and_ack(id, action, ack).await;
            }
        }
    }

    /// Re-sends the stored ack of a command seen before. Returns whether it was seen.
    async fn resend_if_seen(&self, id: Uuid) -> bool {
        match self.store.call(move |c| store::get_command(c, id)).await {
            Ok(Some(seen)) => {
                info!(command_id = %id, state = seen.ack.state.as_str(), "Command seen before; re-sending its ack");
                self.send_ack(id, &seen.ack).await;
                true
            }
            Ok(None) => false,
            Err(e) => {
                // Without the store we cannot tell; drop it and let the cloud re-send.
                warn!(command_id = %id, error = %e, "Cannot look up command; dropped");
                true
            }
        }
    }

    async fn handle_command(self: &Arc<Self>, cmd: Command) {
        let id = cmd.command_id;
        if self.resend_if_seen(id).await {
            return;
        }
        let action_json = serde_json::to_string(&cmd.action).unwrap_or_default();
        info!(command_id = %id, kind = cmd.action.kind(), "Command received");
        match cmd.action {
            Action::Upload { path, priority } => {
                self.accept_upload(id, path, priority, action_json).await
            }
            Action::Config(change) => self.apply_config(id, change, action_json).await,
            Action::Pause { job_id } => {
                self.control_command(id, job_id, action_json, |c| c.pause = true)
                    .await
            }
            Action::Resume { job_id } => {
                self.control_command(id, job_id, action_json, |c| c.pause = false)
                    .await
            }
            Action::Cancel { job_id } => {
                self.control_command(id, job_id, action_json, |c| c.cancel = true)
                    .await
            }
        }
    }

    async fn accept_upload(
        self: &Arc<Self>,
        id: Uuid,
        path: String,
        priority: Option<u8>,
        action: String,
    ) {
        let priority = match flow_wire::check_priority(priority.unwrap_or(DEFAULT_PRIORITY)) {
            Ok(p) => p,
            Err(e) => {
                warn!(command_id = %id, reason = %e, "Upload refused");
                let ack = StoredAck::with_reason(AckState::Rejected, e);
                return self.record_and_ack(id, action, ack).await;
            }
        };
        let roots = self.roots.clone();
        let requested = path.clone();
        let checked = tokio::task::spawn_blocking(move || policy::check(&requested, &roots)).await;
        let canonical = match checked {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                warn!(command_id = %id, %path, reason = %e, "Upload refused");
                let ack = StoredAck::with_reason(AckState::Rejected, e.to_string());
                self.record_and_ack(id, action, ack).await;
                return;
            }
            Err(e) => {
                warn!(command_id = %id, error = %e, "Path check failed; command dropped");
                return;
            }
        };
        let file_name = Path::new(&path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let job = NewJob {
            id,
            action,
            path: canonical,
            file_name,
            create_request_id: format!("create-{}", Uuid::new_v4().simple()),
            priority,
        };
        let now = unix_now();
        if let Err(e) = self
            .store
            .call(move |c| store::accept_upload(c, &job, now))
            .await
        {
            warn!(command_id = %id, error = %e, "Cannot record upload job; command dropped (the cloud re-sends it)");
            return;
        }
        info!(job_id = %id, %path, priority, "Upload accepted");
        self.send_ack(id, &StoredAck::new(AckState::Accepted)).await;
        self.refresh_queue_depth().await;
        self.control_job(id, Control::default(), |_| {}, true);
    }

    async fn control_command(
        self: &Arc<Self>,
        id: Uuid,
        job_id: Uuid,
        action: String,
        change: fn(&mut Control),
    ) {
        let job = match self.store.call(move |c| store::get_job(c, job_id)).await {
            Ok(j) => j,
            Err(e) => {
                warn!(command_id = %id, error = %e, "Cannot look up job; command dropped");
                return;
            }
        };
        let job = match job {
            None => {
                let ack = StoredAck::with_reason(AckState::Rejected, format!("no job {job_id}"));
                return self.record_and_ack(id, action, ack).await;
            }
            Some(j) if j.state.is_terminal() => {
                let ack = StoredAck::with_reason(
                    AckState::Rejected,
                    format!("job {job_id} is already {}", j.state.as_str()),
                );
                return self.record_and_ack(id, action, ack).await;
            }
            Some(j) => j,
        };
        let mut wanted = Control {
            pause: job.pause_requested,
            cancel: job.cancel_requested,
        };
        change(&mut wanted);
        let now = unix_now();
        let (pause, cancel) = (wanted.pause, wanted.cancel);
        let ack = StoredAck::new(AckState::Done);
        let stored_ack = ack.clone();
        let recorded = self
            .store
            .call(move |c| {
                store::set_job_flags(c, job_id, Some(pause), Some(cancel), now)?;
                store::insert_command(c, id, now, &action, &stored_ack)
            })
            .await;
        if let Err(e) = recorded {
            warn!(command_id = %id, error = %e, "Cannot record command; dropped");
            return;
        }
        info!(command_id = %id, %job_id, pause, cancel, "Job control applied");
        // Pausing needs no runner; resuming and cancelling do.
        let spawn = !pause || cancel;
        self.control_job(job_id, wanted, change, spawn);
        self.send_ack(id, &ack).await;
    }

    /// A `config` command: validated as a whole (any bad field rejects it and changes
    /// nothing), merged into the stored overrides, stored with its `done` ack, applied.
    async fn apply_config(&self, id: Uuid, change: FlowConfig, action: String) {
        if let Err(reason) = change.validate() {
            warn!(command_id = %id, %reason, "Config command refused");
            let ack = StoredAck::with_reason(AckState::Rejected, reason);
            return self.record_and_ack(id, action, ack).await;
        }
        let now = unix_now();
        let stored = self
            .store
            .call(move |c| {
                let current = store::flow_overrides(c)?.unwrap_or_default();
                let merged = current.merged(&change);
                store::set_flow_overrides(c, &merged, id, &action, now)?;
                Ok(merged)
            })
            .await;
        let merged = match stored {
            Ok(m) => m,
            Err(e) => {
                // Nothing applied; the cloud re-sends the command.
                warn!(command_id = %id, error = %e, "Cannot record config command; dropped");
                return;
            }
        };
        let s = self.flow.apply(&merged);
        info!(command_id = %id, max_upload_bytes_per_sec = s.max_upload_bytes_per_sec, upload_windows = %s.windows_text(), concurrency = s.concurrency, per_job_concurrency = s.per_job(), "Flow control changed");
        self.send_ack(id, &StoredAck::new(AckState::Done)).await;
    }

    async fn record_and_ack(&self, id: Uuid, action: String, ack: StoredAck) {
        let now = unix_now();
        let stored = ack.clone();
        if let Err(e) = self
            .store
            .call(move |c| store::insert_command(c, id, now, &action, &stored))
            .await
        {
            warn!(command_id = %id, error = %e, "Cannot record command ack");
        }
        self.send_ack(id, &ack).await;
    }

    async fn send_ack(&self, id: Uuid, ack: &StoredAck) {
        let body = CommandAck {
            command_id: id,
            state: ack.state,
            reason: ack.reason.clone(),
            session_id: ack.session_id,
        };
        let request_id = ack_request_id(id, ack.state);
        match self
            .link
            .send_signed(
                Channel::CmdAck,
                Op::CommandAck,
                &request_id,
                &body,
                QoS::AtLeastOnce,
            )
            .await
        {
            Ok(()) => {
                debug!(command_id = %id, state = ack.state.as_str(), reason = ack.reason.as_deref().unwrap_or(""), "Ack sent")
            }
            Err(e) => warn!(command_id = %id, error = %e, "Ack not sent"),
        }
    }

    // ---- connection events ---------------------------------------------------------------

    async fn connection_loop(self: Arc<Self>, mut connected: watch::Receiver<u64>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                changed = connected.changed() => if changed.is_err() { break },
            }
            let since = unix_now() - ACK_RESEND_WINDOW_SECS;
            match self
                .store
                .call(move |c| store::recent_final_acks(c, since))
                .await
            {
                Ok(acks) => {
                    if !acks.is_empty() {
                        debug!(count = acks.len(), "Re-sending recent final acks");
                    }
                    for (id, ack) in acks {
                        self.send_ack(id, &ack).await;
                    }
                }
                Err(e) => warn!(error = %e, "Cannot read recent acks"),
            }
        }
    }

    /// Starts runners for jobs queued on the gateway (`uplink-agent upload`), polling the
    /// store every [`LOCAL_POLL`].
    async fn local_job_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(LOCAL_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let ids = match self.store.call(|c| store::queued_local_jobs(c)).await {
                Ok(ids) => ids,
                Err(e) => {
                    debug!(error = %e, "Cannot list local jobs");
                    continue;
                }
            };
            let fresh: Vec<Uuid> = match self.jobs.lock() {
                Ok(jobs) => ids
                    .into_iter()
                    .filter(|id| !jobs.contains_key(id))
                    .collect(),
                Err(_) => continue,
            };
            if fresh.is_empty() {
                continue;
            }
            for id in fresh {
                info!(job_id = %id, "Local upload picked up");
                self.control_job(id, Control::default(), |_| {}, true);
            }
            self.refresh_queue_depth().await;
        }
    }

    async fn refresh_queue_depth(&self) {
        match self.store.call(|c| store::queue_depth(c)).await {
            Ok(depth) => self.link.set_queue_depth(depth),
            Err(e) => debug!(error = %e, "Cannot count jobs"),
        }
    }

    // ---- job runners ---------------------------------------------------------------------

    async fn resume_jobs(self: &Arc<Self>) {
        let store = self.store.clone();
        let jobs = store
            .call(|c| {
                let ids = store::live_jobs(c)?;
                ids.into_iter()
                    .map(|id| store::require_job(c, id))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await;
        match jobs {
            Ok(jobs) => {
                if !jobs.is_empty() {
                    info!(count = jobs.len(), "Resuming unfinished jobs");
                }
                for j in jobs {
                    let ctl = Control {
                        pause: j.pause_requested,
                        cancel: j.cancel_requested,
                    };
                    self.control_job(j.id, ctl, |_| {}, true);
                }
            }
            Err(e) => warn!(error = %e, "Cannot list unfinished jobs"),
        }
    }

    /// Applies `change` to the running job's controls, or starts a runner with `base` +
    /// `change` when none runs and `spawn` says so. Decided under the registry lock, so a
    /// runner that is about to stop for a pause cannot miss a resume.
    fn control_job(
        self: &Arc<Self>,
        id: Uuid,
        base: Control,
        change: impl FnOnce(&mut Control),
        spawn: bool,
    ) {
        let Ok(mut jobs) = self.jobs.lock() else {
            return;
        };
        if let Some(tx) = jobs.get(&id) {
            tx.send_modify(change);
            return;
        }
        if !spawn || self.tasks.is_closed() {
            return;
        }
        let mut ctl = base;
        change(&mut ctl);
        let (tx, rx) = watch::channel(ctl);
        jobs.insert(id, tx);
        drop(jobs);
        self.tasks.spawn(self.clone().drive(id, rx));
    }

    async fn drive(self: Arc<Self>, id: Uuid, mut rx: watch::Receiver<Control>) {
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
        match job::next_step(rec.state, rec.hashed(), rec.session_id.is_some()) {
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
        // Restarted while completing with every part in storage: complete again. Otherwise
        // (including storage having lost parts) upload what is missing first.
        if !(rec.state == JobState::Completing && all_done) {
            if rx.borrow().pause {
                self.to_paused(&rec).await?;
                return Ok(StepEnd::Paused);
            }
            self.set_state(id, JobState::Uploading).await?;
            self.progress(&rec, JobState::Uploading, None, 0).await;
            let on_progress = |done: u64, rate: u64| {
                self.progress_now(&rec, JobState::Uploading, done, rate);
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
            }
            .run()
            .await?;
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

    /// The hash pass, one job at a time, in the blocking pool; cancel stops it.
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
        info!(job_id = %rec.id, path = %rec.path.display(), "Hashing file");
        let stop = self.shutdown.child_token();
        let (path, roots, hint) = (rec.path.clone(), self.roots.clone(), self.part_size_hint);
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
            hasher::hash_file(&path, hint, &token).map_err(|e| match e {
                HashError::Cancelled => JobError::Shutdown,
                e => JobError::Fatal(e.to_string()),
            })
        });
        let result = tokio::select! {
            r = &mut handle => r,
            _ = wait_for_cancel(rx) => {
                stop.cancel();
                let _ = handle.await;
                return Err(JobError::Cancelled);
            }
        };
        let hash = result.map_err(|e| JobError::Transient(e.to_string()))??;
        let (id, now) = (rec.id, unix_now());
        info!(job_id = %id, size = hash.identity.size, parts = hash.parts.len(), sha256 = %hash.sha256, "File hashed");
        self.store
            .call(move |c| store::store_hash(c, id, &hash, now))
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
        let (Some(identity), Some(part_size), Some(sha256)) =
            (rec.identity, rec.part_size, rec.sha256.clone())
        else {
            return Err(JobError::Fatal("job was not hashed".into()));
        };
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
        Ok(FileManifest {
            device_id: self.device_id.clone(),
            session_id,
            path: rec.path.display().to_string(),
            size: rec.identity.map(|i| i.size).unwrap_or(0),
            sha256: rec.sha256.clone().unwrap_or_default(),
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
struct ProgressThrottle {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_request_ids_are_valid_and_stable() {
        let id = Uuid::new_v4();
        for state in [
            AckState::Accepted,
            AckState::Rejected,
            AckState::Done,
            AckState::Failed,
        ] {
            let r = ack_request_id(id, state);
            assert!(uplink_protocol::valid_request_id(&r), "{r}");
            assert_eq!(r, ack_request_id(id, state));
        }
        assert_ne!(
            ack_request_id(id, AckState::Accepted),
            ack_request_id(id, AckState::Done)
        );
        let create = format!("create-{}", Uuid::new_v4().simple());
        assert!(uplink_protocol::valid_request_id(&create));
        let presign = format!("progress-{}", Uuid::new_v4().simple());
        assert!(uplink_protocol::valid_request_id(&presign));
    }

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

    #[test]
    fn command_id_is_read_from_authentic_commands() {
        let id = Uuid::new_v4();
        let json = format!(
            r#"{{"command_id":"{id}","device_id":"x","issued_at":1,"expires_at":2,"action":{{"type":"format_disk"}}}}"#
        );
        assert_eq!(readable_command_id(&json), Some(id));
        assert_eq!(readable_command_id("{}"), None);
        assert_eq!(readable_command_id("nope"), None);
    }
}
