//! Orchestration: [`run`] wires the store, the MQTT link and the uploader together and
//! takes commands in (verify, record, ack, start or steer a job). The job pipeline itself
//! (hash → session → parts → complete) is in [`pipeline`].

mod pipeline;

use pipeline::ProgressThrottle;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::QoS;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uplink_protocol::command::{AckState, Action, Command, CommandAck};
use uplink_protocol::envelope::{CommandEnvelope, CommandError, MAX_PAYLOAD_BYTES};
use uplink_protocol::flow::{self as flow_wire, FlowConfig, DEFAULT_PRIORITY};
use uplink_protocol::keyring::CommandKeys;
use uplink_protocol::ops::Op;
use uplink_protocol::plan::MIB;
use uplink_protocol::topics::Channel;
use uplink_protocol::unix_now;
use uuid::Uuid;

use crate::config::Loaded;
use crate::flow::{self, Flow};
use crate::rpc::{Link, LinkSettings, RetryPolicy};
use crate::store::{self, NewJob, Store, StoreError, StoredAck};
use crate::uploader::{Control, Uploader};
use crate::{metrics, policy};

/// Final acks younger than this are re-sent after every (re)connect, in case one was lost.
const ACK_RESEND_WINDOW_SECS: i64 = 3600;
/// How long shutdown waits for jobs to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
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
    #[error("https_ca_file: {0}")]
    HttpsCa(String),
    #[error("cannot listen for metrics on {0}: {1} (check metrics_listen)")]
    Metrics(std::net::SocketAddr, std::io::Error),
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
    /// Files up to this size are hashed whole before their session (`hash_first_max_mib`).
    hash_first_bytes: u64,
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
    let https_roots = match &cfg.https_ca_file {
        Some(file) => crate::tls::https_roots(file).map_err(AgentError::HttpsCa)?,
        None => Vec::new(),
    };
    let uploader = Uploader::with_roots(flow.limiter(), https_roots)?;
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
            tls: crate::tls::mqtt_files(&cfg.mqtt),
        },
        shutdown.clone(),
    );
    let agent = Arc::new(Agent {
        device_id: cfg.device_id.clone(),
        command_key: loaded.command_key,
        roots: loaded.roots,
        part_size_hint: cfg.part_size_mib.saturating_mul(MIB),
        hash_first_bytes: cfg.hash_first_max_mib.saturating_mul(MIB),
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
    let mut disk_paths = agent.roots.clone();
    disk_paths.push(cfg.state_dir.clone());
    let disk = tokio::spawn(disk_loop(agent.link.clone(), disk_paths, shutdown.clone()));
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
        ("free disk", disk),
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

/// Measures free disk space now and every [`crate::disk::CHECK_EVERY`] for the `status`.
async fn disk_loop(link: Arc<Link>, paths: Vec<PathBuf>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(crate::disk::CHECK_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let paths = paths.clone();
        // statvfs can hang on a dead network mount: off the async threads.
        match tokio::task::spawn_blocking(move || crate::disk::free_bytes(&paths)).await {
            Ok(free) => link.set_free_disk(free),
            Err(e) => debug!(error = %e, "Free disk not measured"),
        }
    }
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
