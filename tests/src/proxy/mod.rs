//! A TCP proxy between the agent and S3. The control API's `s3.public_endpoint` points at
//! it, so every presigned URL the agent uses goes through it (SigV4 signs the Host header,
//! which the proxy passes on untouched). It counts the bytes the agent sends (requests:
//! headers and part bodies) and can limit their rate, to make uploads slow enough to
//! interrupt. Bytes are counted when the proxy reads them from the agent, so they measure
//! what actually left the agent's kernel towards storage.
//!
//! It also injects network faults ([`Faults`], switchable at run time with
//! [`CountingProxy::set_faults`]; each connection's faults are decided when it is accepted):
//! - **cut**: after N bytes from the client, close the connection (FIN, or RST with
//!   `SO_LINGER` 0), on every connection, every k-th one, or a limited number of times;
//! - **black hole**: a seeded-random fraction of connections is accepted and read but never
//!   answered and never forwarded;
//! - **corrupt**: flip one byte at offset N of the k-th connection's client → storage stream;
//! - **link reset** ([`Faults::reset_every_bytes`]): every N bytes from all clients together
//!   (counted from when the faults were set), the connection that carries the total across
//!   the multiple forwards the bytes up to it and is reset (RST): a link that drops every N
//!   bytes however the clients pool their connections; applies to open connections too;
//! - **stall** ([`CountingProxy::set_stalled`]): every connection, open or new, stops
//!   forwarding in both directions (a black hole for a while; what was read is delivered
//!   once the stall ends, as TCP would after a partition heals).
//!
//! The same proxy also sits between the bridge and the control API and between agents and
//! the broker when a test asks for it (`StackOptions::api_proxy`, `mqtt_proxy`); "client"
//! and "storage" then mean the bridge and the API, or the agent and the broker.
//!
//! Connections are numbered from 1 in the order they are accepted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

mod faults;

pub use faults::{Corrupt, Cut, FaultCounts, Faults};
use faults::{FaultState, Plan};

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    sent: AtomicU64,
    received: AtomicU64,
    connections: AtomicU64,
    /// Bytes per second from the agent; 0 is unlimited.
    rate: AtomicU64,
    next_slot: Mutex<Option<Instant>>,
    faults: Mutex<FaultState>,
    /// Bumped by [`CountingProxy::drop_connections`]: open connections close (RST).
    generation: watch::Sender<u64>,
    /// True while every connection is stalled ([`CountingProxy::set_stalled`]).
    stalled: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn plan(&self, connection: u64) -> Plan {
        let mut st = lock(&self.faults);
        let mut plan = Plan::default();
        let black_hole = st.faults.black_hole;
        if black_hole > 0.0 && st.rng.gen_bool(black_hole.min(1.0)) {
            plan.black_hole = true;
            st.counts.black_holed += 1;
            return plan;
        }
        if let Some(cut) = st.faults.cut.as_mut() {
            let nth = cut.every_nth.max(1);
            if connection.is_multiple_of(nth) && cut.remaining != Some(0) {
                if let Some(r) = cut.remaining.as_mut() {
                    *r -= 1;
                }
                plan.cut = Some((cut.after_bytes, cut.reset));
            }
        }
        if let Some(c) = st.faults.corrupt {
            if c.connection == connection {
                plan.corrupt_at = Some(c.offset);
            }
        }
        plan
    }

    /// With a link reset set: how many of the `n` bytes read at total `before` go through
    /// before the total reaches the next multiple, if it does within them (that connection
    /// is then reset).
    fn link_reset_within(&self, before: u64, n: u64) -> Option<u64> {
        let (every, base) = lock(&self.faults).link_reset?;
        let from = before.saturating_sub(base);
        let to = (before + n).saturating_sub(base);
        if to / every == from / every {
            return None;
        }
        Some(base + (from / every + 1) * every - before)
    }

    fn count(&self, f: impl FnOnce(&mut FaultCounts)) {
        f(&mut lock(&self.faults).counts);
    }
}

#[derive(Debug)]
pub struct CountingProxy {
    pub port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Listens on 127.0.0.1 (free port) and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> CountingProxy {
        let upstream: SocketAddr = tokio::net::lookup_host(upstream)
            .await
            .unwrap_or_else(|e| panic!("resolve {upstream}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("{upstream} does not resolve"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let shared = Arc::new(Shared {
            upstream,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            next_slot: Mutex::new(None),
            faults: Mutex::new(FaultState {
                faults: Faults::default(),
                rng: rand::rngs::StdRng::seed_from_u64(0),
                counts: FaultCounts::default(),
                link_reset: None,
            }),
            generation: watch::channel(0).0,
            stalled: watch::channel(false).0,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let n = s.connections.fetch_add(1, Ordering::Relaxed) + 1;
                let plan = s.plan(n);
                if plan.black_hole {
                    tokio::spawn(black_hole(client, s.clone()));
                } else {
                    tokio::spawn(relay(client, s.clone(), plan));
                }
            }
        });
        CountingProxy { port, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Bytes read from clients (the agent) so far.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Bytes storage sent back to clients so far.
    pub fn bytes_received(&self) -> u64 {
        self.shared.received.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Limits client → storage bytes to `bytes_per_sec` in total (None: unlimited).
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        self.shared
            .rate
            .store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }

    /// Applies `faults` to connections accepted from now on; a link reset
    /// ([`Faults::reset_every_bytes`]) to open connections too, counting from now.
    pub fn set_faults(&self, faults: Faults) {
        let mut st = lock(&self.shared.faults);
        st.link_reset = faults
            .reset_every_bytes
            .map(|every| (every.max(1), self.bytes_sent()));
        st.faults = faults;
    }

    /// Seeds the random choice of black-holed connections.
    pub fn seed(&self, seed: u64) {
        lock(&self.shared.faults).rng = rand::rngs::StdRng::seed_from_u64(seed);
    }

    /// Which of the first `n` connections a proxy seeded with `seed` black-holes at
    /// `fraction` (as long as no other fault takes the random numbers).
    pub fn black_hole_preview(seed: u64, fraction: f64, n: usize) -> Vec<bool> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_bool(fraction.min(1.0))).collect()
    }

    /// No more faults for new connections (connections already planned keep theirs).
    pub fn clear_faults(&self) {
        self.set_faults(Faults::default());
    }

    /// The faults applied so far (cuts and resets count when they happen).
    pub fn fault_counts(&self) -> FaultCounts {
        lock(&self.shared.faults).counts
    }

    /// Stops (true) or resumes (false) forwarding on every connection, open or new, in both
    /// directions. Bytes read meanwhile are held and delivered when the stall ends.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.send_replace(stalled);
    }

    /// Closes every open connection with RST (the link drops under the client).
    pub fn drop_connections(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.drop_connections();
    }
}

/// Waits until `n` more bytes fit in the rate limit.
async fn pace(shared: &Shared, n: usize) {
    let rate = shared.rate.load(Ordering::Relaxed);
    if rate == 0 {
        return;
    }
    let start = {
        let mut next = lock(&shared.next_slot);
        let now = Instant::now();
        let start = next.map_or(now, |t| t.max(now));
        *next = Some(start + Duration::from_secs_f64(n as f64 / rate as f64));
        start
    };
    tokio::time::sleep_until(start).await;
}

/// Reads and discards everything from the client, never answers and never closes (until
/// the proxy drops its connections).
async fn black_hole(mut client: TcpStream, shared: Arc<Shared>) {
    let mut gen = shared.generation.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = true;
    loop {
        tokio::select! {
            r = client.read(&mut buf), if open => match r {
                Ok(0) | Err(_) => open = false,
                Ok(n) => {
                    shared.sent.fetch_add(n as u64, Ordering::Relaxed);
                }
            },
            _ = gen.changed() => {
                client.set_zero_linger().ok();
                return;
            }
        }
    }
}

/// Why the client → storage direction stopped.
enum UpEnd {
    /// The client finished sending (or an error): half-close as usual.
    Eof,
    /// The planned cut (true: with RST), or [`CountingProxy::drop_connections`].
    Cut(bool),
}

async fn relay(client: TcpStream, shared: Arc<Shared>, plan: Plan) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    client.set_nodelay(true).ok();
    server.set_nodelay(true).ok();
    let (mut cr, cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Tells the storage → client direction to close the client's socket at once.
    let (cut_tx, mut cut_rx) = watch::channel(None::<bool>);
    let cut_tx = &cut_tx;
    let mut gen = shared.generation.subscribe();
    let up_shared = shared.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pos = 0u64;
        let end = loop {
            let chunk = if up_shared.rate.load(Ordering::Relaxed) > 0 {
                16 * 1024
            } else {
                buf.len()
            };
            let n = tokio::select! {
                r = cr.read(&mut buf[..chunk]) => match r {
                    Ok(0) | Err(_) => break UpEnd::Eof,
                    Ok(n) => n,
                },
                _ = gen.changed() => break UpEnd::Cut(true),
            };
            let total = up_shared.sent.fetch_add(n as u64, Ordering::Relaxed);
            let mut forward = n;
            let mut cut_now = None;
            if let Some((at, reset)) = plan.cut {
                if pos + n as u64 >= at {
                    forward = at.saturating_sub(pos) as usize;
                    cut_now = Some(reset);
                }
            }
            // The link reset: this connection carries the total across a multiple. (A cut
            // that drops those bytes first leaves that multiple without a reset.)
            if let Some(keep) = up_shared.link_reset_within(total, n as u64) {
                if keep as usize <= forward {
                    forward = keep as usize;
                    cut_now = Some(true);
                }
            }
            if let Some(at) = plan.corrupt_at {
                if at >= pos && at < pos + forward as u64 {
                    buf[(at - pos) as usize] ^= 0x5a;
                    up_shared.count(|c| c.corrupted += 1);
                }
            }
            let mut stall = up_shared.stalled.subscribe();
            tokio::select! {
                _ = stall.wait_for(|s| !*s) => {}
                _ = gen.changed() => break UpEnd::Cut(true),
            }
            pace(&up_shared, forward).await;
            if sw.write_all(&buf[..forward]).await.is_err() {
                break UpEnd::Eof;
            }
            pos += forward as u64;
            if let Some(reset) = cut_now {
                up_shared.count(|c| {
                    if reset {
                        c.resets += 1;
                    } else {
                        c.cuts += 1;
                    }
                });
                break UpEnd::Cut(reset);
            }
        };
        match end {
            UpEnd::Eof => {
                sw.shutdown().await.ok();
            }
            UpEnd::Cut(reset) => {
                cut_tx.send(Some(reset)).ok();
                // Dropping `sw` and `sr` (the other side) closes the storage connection.
            }
        }
    };
    let down_shared = shared.clone();
    let down = async move {
        let mut cw = cw;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // Biased, cut first: once cut, nothing more reaches the client, so it sees a
            // prefix of the stream (a chunk read meanwhile is dropped, never a later one
            // delivered after it).
            let n = tokio::select! {
                biased;
                r = cut_rx.wait_for(|c| c.is_some()) => {
                    let reset = r.ok().and_then(|c| *c).unwrap_or(false);
                    if reset {
                        // No FIN first (dropping a write half shuts it down): the socket
                        // closes with RST once the read half is dropped too.
                        cw.as_ref().set_zero_linger().ok();
                        cw.forget();
                    }
                    // Otherwise dropping `cw` here and `cr` in the other direction closes
                    // the socket (FIN).
                    return;
                }
                r = sr.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
            };
            down_shared.received.fetch_add(n as u64, Ordering::Relaxed);
            let mut stall = down_shared.stalled.subscribe();
            tokio::select! {
                biased;
                // Handled (FIN or RST) at the top of the loop.
                _ = cut_rx.wait_for(|c| c.is_some()) => continue,
                _ = stall.wait_for(|s| !*s) => {}
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        cw.shutdown().await.ok();
    };
    tokio::join!(up, down);
}

#[cfg(test)]
mod tests;
