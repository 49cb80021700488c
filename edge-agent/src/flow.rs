//! Flow control: which part may start a PUT, and when.
//!
//! - [`Settings`]: the effective bandwidth cap, upload windows and concurrencies: the
//!   configuration file overlaid with the overrides of signed `config` commands (kept in
//!   SQLite, see [`crate::store::flow_overrides`]).
//! - [`Queue`]: the pure scheduler: waiting parts ordered by job priority (higher first),
//!   then job age (first come, first served), then request order; grants PUT slots while an
//!   upload window is open and fewer than `concurrency` parts are in flight.
//! - [`Flow`]: the shared, async face of both: parts await a [`Slot`]; a clock task opens
//!   and closes the gate at window edges; a `config` command changes it all at run time.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Timelike;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use uplink_protocol::flow::{self as wire, FlowConfig, Window};
use uuid::Uuid;

use crate::config::Config;
use crate::rate::RateLimiter;

/// How often the clock task looks at the local time.
const CLOCK_TICK: Duration = Duration::from_secs(1);

/// The effective flow settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Bytes/s over all parts; 0 = unlimited.
    pub max_upload_bytes_per_sec: u64,
    /// Empty = always.
    pub upload_windows: Vec<Window>,
    pub concurrency: usize,
    /// Parts in flight of one job; `None` = `concurrency`.
    pub per_job_concurrency: Option<usize>,
}

impl Settings {
    /// The configuration file's settings (already validated).
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            max_upload_bytes_per_sec: cfg.max_upload_bytes_per_sec,
            upload_windows: wire::parse_windows(&cfg.upload_windows).unwrap_or_default(),
            concurrency: cfg.concurrency,
            per_job_concurrency: cfg.per_job_concurrency,
        }
    }

    /// These settings with `overrides` (valid, as stored) on top.
    pub fn with(&self, overrides: &FlowConfig) -> Settings {
        Settings {
            max_upload_bytes_per_sec: overrides
                .max_upload_bytes_per_sec
                .unwrap_or(self.max_upload_bytes_per_sec),
            upload_windows: match &overrides.upload_windows {
                Some(list) => wire::parse_windows(list).unwrap_or_default(),
                None => self.upload_windows.clone(),
            },
            concurrency: overrides
                .concurrency
                .map_or(self.concurrency, |n| n as usize),
            per_job_concurrency: overrides
                .per_job_concurrency
                .map(|n| n as usize)
                .or(self.per_job_concurrency),
        }
    }

    /// Parts in flight of one job.
    pub fn per_job(&self) -> usize {
        self.per_job_concurrency.unwrap_or(self.concurrency)
    }

    /// Whether parts may start at `minute` after local midnight.
    pub fn open_at(&self, minute: u16) -> bool {
        wire::in_windows(&self.upload_windows, minute)
    }

    /// `22:00-06:00, 12:00-13:00`, or `always`.
    pub fn windows_text(&self) -> String {
        if self.upload_windows.is_empty() {
            "always".into()
        } else {
            self.upload_windows
                .iter()
                .map(Window::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "max_upload_bytes_per_sec": self.max_upload_bytes_per_sec,
            "upload_windows": self.upload_windows.iter().map(Window::to_string).collect::<Vec<_>>(),
            "concurrency": self.concurrency,
            "per_job_concurrency": self.per_job(),
        })
    }
}

/// Minutes after midnight now, in the gateway's local time (chrono reads `TZ` or
/// `/etc/localtime`).
pub fn local_minute() -> u16 {
    let now = chrono::Local::now();
    (now.hour() * 60 + now.minute()) as u16
}

/// Where a waiting part stands in line: higher priority first, then older jobs, then the
/// order the parts asked in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    /// `PRIORITY_MAX - priority`, so that the highest priority sorts first.
    inverse_priority: u8,
    /// The job's creation time (Unix seconds).
    created_at: i64,
    /// Order of the request, assigned by the queue.
    ticket: u64,
}

/// The pure scheduler: who gets the next PUT slot.
#[derive(Debug)]
pub struct Queue<T> {
    waiting: BTreeMap<Rank, (Uuid, T)>,
    in_use: usize,
    next_ticket: u64,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            waiting: BTreeMap::new(),
            in_use: 0,
            next_ticket: 0,
        }
    }
}

impl<T> Queue<T> {
    /// Puts a part of `job` (with its priority and creation time) in line.
    pub fn push(&mut self, job: Uuid, priority: u8, created_at: i64, item: T) -> Rank {
        let rank = Rank {
            inverse_priority: wire::PRIORITY_MAX.saturating_sub(priority),
            created_at,
            ticket: self.next_ticket,
        };
        self.next_ticket += 1;
        self.waiting.insert(rank, (job, item));
        rank
    }

    /// Takes a part out of line (it gave up waiting). Returns whether it was still waiting.
    pub fn remove(&mut self, rank: Rank) -> bool {
        self.waiting.remove(&rank).is_some()
    }

    /// Grants slots, best rank first, while the gate is open and slots are free.
    pub fn grant(&mut self, capacity: usize, open: bool) -> Vec<T> {
        let mut out = Vec::new();
        while open && self.in_use < capacity {
            let Some((_, (_, item))) = self.waiting.pop_first() else {
                break;
            };
            self.in_use += 1;
            out.push(item);
        }
        out
    }

    /// A granted slot is free again.
    pub fn release(&mut self) {
        self.in_use = self.in_use.saturating_sub(1);
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Jobs with at least one part waiting.
    pub fn waiting_jobs(&self) -> usize {
        let mut jobs: Vec<Uuid> = self.waiting.values().map(|(j, _)| *j).collect();
        jobs.sort_unstable();
        jobs.dedup();
        jobs.len()
    }
}

struct Gate {
    queue: Queue<oneshot::Sender<()>>,
    open: bool,
    closed: bool,
}

/// The gate every PUT passes, shared by all jobs.
pub struct Flow {
    base: Settings,
    settings: watch::Sender<Settings>,
    gate: Mutex<Gate>,
    /// Whether an upload window is open; changes wake upload passes.
    open: watch::Sender<bool>,
    limiter: Arc<RateLimiter>,
}

/// The gate is shut (the agent is stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the agent is shutting down")]
pub struct Closed;

/// A PUT slot; dropping it frees the slot.
pub struct Slot {
    flow: Arc<Flow>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut g) = self.flow.gate.lock() {
            g.queue.release();
            self.flow.dispatch(&mut g);
        }
    }
}

impl Flow {
    /// `base` is the configuration file's settings; `overrides` those stored from `config`
    /// commands.
    pub fn new(base: Settings, overrides: &FlowConfig) -> Arc<Flow> {
        let effective = base.with(overrides);
        let open = effective.open_at(local_minute());
        let limiter = Arc::new(RateLimiter::new(effective.max_upload_bytes_per_sec));
        let flow = Arc::new(Flow {
            base,
            settings: watch::Sender::new(effective.clone()),
            gate: Mutex::new(Gate {
                queue: Queue::default(),
                open,
                closed: false,
            }),
            open: watch::Sender::new(open),
            limiter,
        });
        flow.publish_metrics(&effective, open, 0);
        flow
    }

    pub fn limiter(&self) -> Arc<RateLimiter> {
        self.limiter.clone()
    }

    pub fn settings(&self) -> Settings {
        self.settings.borrow().clone()
    }

    pub fn per_job(&self) -> usize {
        self.settings.borrow().per_job()
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Follows the window opening and closing.
    pub fn watch_open(&self) -> watch::Receiver<bool> {
        self.open.subscribe()
    }

    /// Applies new overrides (valid) at once: the rate for the next chunk, the concurrency
    /// for the next part, the windows at once. Parts in flight are not touched.
    pub fn apply(&self, overrides: &FlowConfig) -> Settings {
        let effective = self.base.with(overrides);
        self.limiter.set_rate(effective.max_upload_bytes_per_sec);
        self.settings.send_replace(effective.clone());
        self.set_open(effective.open_at(local_minute()));
        effective
    }

    fn set_open(&self, open: bool) {
        let changed = self
            .open
            .send_if_modified(|o| std::mem::replace(o, open) != open);
        if let Ok(mut g) = self.gate.lock() {
            g.open = open;
            self.dispatch(&mut g);
        }
        if changed {
            tracing::info!(
                open,
                "Upload window {}",
                if open { "opened" } else { "closed" }
            );
        }
    }

    /// Hands out free slots (called under the gate lock).
    fn dispatch(&self, g: &mut Gate) {
        let capacity = if g.closed {
            0
        } else {
            self.settings.borrow().concurrency
        };
        let open = g.open;
        for tx in g.queue.grant(capacity, open) {
            if tx.send(()).is_err() {
                // The part gave up after it was picked; its slot goes back.
                g.queue.release();
            }
        }
        // Slots freed by dead waiters: hand them on.
        if g.queue.in_use() < capacity && open && !g.queue.waiting.is_empty() {
            self.dispatch(g);
            return;
        }
        let (settings, waiting) = (self.settings.borrow().clone(), g.queue.waiting_jobs());
        self.publish_metrics(&settings, open, waiting);
    }

    fn publish_metrics(&self, s: &Settings, open: bool, waiting_jobs: usize) {
        let c = &crate::metrics::COUNTERS;
        c.upload_window_open.store(open, Ordering::Relaxed);
        c.jobs_waiting_for_slot
            .store(waiting_jobs as u64, Ordering::Relaxed);
        c.max_upload_bytes_per_sec
            .store(s.max_upload_bytes_per_sec, Ordering::Relaxed);
        c.concurrency.store(s.concurrency as u64, Ordering::Relaxed);
    }

    /// Waits for a PUT slot for a part of `job`.
    pub async fn slot(
        self: &Arc<Self>,
        job: Uuid,
        priority: u8,
        created_at: i64,
    ) -> Result<Slot, Closed> {
        let (tx, mut rx) = oneshot::channel();
        let rank = {
            let mut g = self.gate.lock().map_err(|_| Closed)?;
            if g.closed {
                return Err(Closed);
            }
            let rank = g.queue.push(job, priority, created_at, tx);
            self.dispatch(&mut g);
            rank
        };
        // Taken out of line (or its slot handed back) if this future is dropped.
        struct Waiting<'a> {
            flow: &'a Flow,
            rank: Rank,
            armed: bool,
        }
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if !self.armed {
                    return;
                }
                if let Ok(mut g) = self.flow.gate.lock() {
                    if !g.queue.remove(self.rank) {
                        // Granted but never used.
                        g.queue.release();
                    }
                    self.flow.dispatch(&mut g);
                }
            }
        }
        let mut waiting = Waiting {
            flow: self,
            rank,
            armed: true,
        };
        match (&mut rx).await {
            Ok(()) => {
                waiting.armed = false;
                Ok(Slot { flow: self.clone() })
            }
            Err(_) => {
                // The gate was shut and the sender dropped.
                waiting.armed = false;
                Err(Closed)
            }
        }
    }

    /// Shuts the gate: waiting parts get [`Closed`], no slot is granted again.
    pub fn close(&self) {
        if let Ok(mut g) = self.gate.lock() {
            g.closed = true;
            g.queue.waiting.clear();
        }
    }

    /// Opens and closes the gate at window edges until `shutdown`.
    pub async fn clock(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(CLOCK_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let open = self.settings.borrow().open_at(local_minute());
            self.set_open(open);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_serves_priority_then_age_then_order() {
        let mut q = Queue::default();
        let (old, young, urgent) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        q.push(old, 5, 100, "old-1");
        q.push(young, 5, 200, "young-1");
        q.push(old, 5, 100, "old-2");
        q.push(urgent, 9, 300, "urgent-1");
        q.push(young, 0, 50, "low-1");
        assert_eq!(q.waiting_jobs(), 3);
        // Closed window: nothing moves.
        assert!(q.grant(2, false).is_empty());
        assert_eq!(q.grant(2, true), vec!["urgent-1", "old-1"]);
        // Full: nothing more until a slot is released.
        assert!(q.grant(2, true).is_empty());
        q.release();
        assert_eq!(q.grant(2, true), vec!["old-2"]);
        q.release();
        q.release();
        // A higher-priority part that arrives later still goes first.
        q.push(urgent, 9, 300, "urgent-2");
        assert_eq!(q.grant(2, true), vec!["urgent-2", "young-1"]);
        q.release();
        assert_eq!(q.grant(5, true), vec!["low-1"]);
        assert_eq!(q.in_use(), 2);
    }

    #[test]
    fn removed_parts_leave_the_line() {
        let mut q = Queue::default();
        let job = Uuid::new_v4();
        let a = q.push(job, 5, 1, 'a');
        q.push(job, 5, 1, 'b');
        assert!(q.remove(a));
        assert!(!q.remove(a));
        assert_eq!(q.grant(4, true), vec!['b']);
    }

    fn settings() -> Settings {
        Settings {
            max_upload_bytes_per_sec: 0,
            upload_windows: vec![],
            concurrency: 4,
            per_job_concurrency: None,
        }
    }

    #[test]
    fn overrides_overlay_the_file() {
        let base = Settings {
            upload_windows: vec!["22:00-06:00".parse().unwrap()],
            ..settings()
        };
        let o = FlowConfig {
            max_upload_bytes_per_sec: Some(8192),
            concurrency: Some(1),
            ..FlowConfig::default()
        };
        let eff = base.with(&o);
        assert_eq!(eff.max_upload_bytes_per_sec, 8192);
        assert_eq!(eff.concurrency, 1);
        assert_eq!(eff.per_job(), 1, "per job follows concurrency when unset");
        assert_eq!(eff.windows_text(), "22:00-06:00");
        assert!(eff.open_at(23 * 60) && !eff.open_at(12 * 60));
        let always = base.with(&FlowConfig {
            upload_windows: Some(vec![]),
            ..FlowConfig::default()
        });
        assert_eq!(always.windows_text(), "always");
        assert!(always.open_at(12 * 60));
    }

    #[tokio::test]
    async fn slots_follow_priority_concurrency_and_overrides() {
        let flow = Flow::new(
            Settings {
                concurrency: 1,
                ..settings()
            },
            &FlowConfig::default(),
        );
        let (low, high) = (Uuid::new_v4(), Uuid::new_v4());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = flow.slot(low, 1, 10).await.unwrap();
        let waiter = |job: Uuid, priority: u8, created_at: i64, name: &'static str| {
            let (f, order) = (flow.clone(), order.clone());
            tokio::spawn(async move {
                let slot = f.slot(job, priority, created_at).await.unwrap();
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(slot);
            })
        };
        let low_waiter = waiter(low, 1, 10, "low");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let high_waiter = waiter(high, 9, 20, "high");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(order.lock().unwrap().is_empty(), "concurrency 1 is full");
        drop(first);
        low_waiter.await.unwrap();
        high_waiter.await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["high", "low"]);

        // Closing the window holds new slots; opening by command releases them.
        let closed_now = {
            let m = local_minute();
            let start = (m + 60) % 1440;
            let end = (m + 120) % 1440;
            format!(
                "{:02}:{:02}-{:02}:{:02}",
                start / 60,
                start % 60,
                end / 60,
                end % 60
            )
        };
        let eff = flow.apply(&FlowConfig {
            upload_windows: Some(vec![closed_now]),
            concurrency: Some(2),
            ..FlowConfig::default()
        });
        assert_eq!(eff.concurrency, 2);
        assert!(!flow.is_open());
        let f = flow.clone();
        let held = tokio::spawn(async move { f.slot(low, 5, 1).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!held.is_finished());
        flow.apply(&FlowConfig::default());
        assert!(flow.is_open());
        assert!(held.await.unwrap());

        // Back to the file's concurrency of 1. A waiter that gives up leaves no slot taken.
        let a = flow.slot(low, 5, 1).await.unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(20), flow.slot(low, 5, 1)).await;
        assert!(gave_up.is_err());
        drop(a);
        let _c = tokio::time::timeout(Duration::from_secs(5), flow.slot(low, 5, 1))
            .await
            .expect("the slot of the waiter that gave up is free")
            .unwrap();
        flow.close();
        assert!(flow.slot(low, 5, 1).await.is_err());
    }
}
