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

/// Closing a connection after some bytes from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// Bytes forwarded from the client before the connection is closed.
    pub after_bytes: u64,
    /// Which connections: those whose number is a multiple of this (1 or 0: every one).
    pub every_nth: u64,
    /// How many more connections to cut (None: no limit). Counts down as cuts are planned.
    pub remaining: Option<u64>,
    /// Close with RST (`SO_LINGER` 0) instead of FIN.
    pub reset: bool,
}

/// Flipping one byte of one connection's client → storage stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt {
    /// The connection's number (from 1, in accept order).
    pub connection: u64,
    /// Offset in that connection's client → storage stream (headers included).
    pub offset: u64,
}

/// The faults applied to connections accepted from now on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    pub cut: Option<Cut>,
    /// Fraction (0.0–1.0) of connections to black-hole: read, never forwarded or answered.
    pub black_hole: f64,
    pub corrupt: Option<Corrupt>,
    /// Reset (RST) the connection whose bytes carry the proxy's client → storage total
    /// across each multiple of this many bytes, counted from [`CountingProxy::set_faults`],
    /// on every connection, open or new (None: off).
    pub reset_every_bytes: Option<u64>,
}

impl Faults {
    /// Cut one connection (the next one accepted) after `after_bytes`.
    pub fn cut_once(after_bytes: u64, reset: bool) -> Faults {
        Faults {
            cut: Some(Cut {
                after_bytes,
                every_nth: 1,
                remaining: Some(1),
                reset,
            }),
            ..Faults::default()
        }
    }

    /// Reset the connection carrying the total across every multiple of `bytes` (from all
    /// clients together, counted from when the faults are set).
    pub fn reset_every_bytes(bytes: u64) -> Faults {
        Faults {
            reset_every_bytes: Some(bytes.max(1)),
            ..Faults::default()
        }
    }

    /// Cut every `every_nth` connection after `after_bytes`, without limit.
    pub fn cut_every(every_nth: u64, after_bytes: u64, reset: bool) -> Faults {
        Faults {
            cut: Some(Cut {
                after_bytes,
                every_nth,
                remaining: None,
                reset,
            }),
            ..Faults::default()
        }
    }
}

/// What happens to one connection, decided at accept.
#[derive(Debug, Clone, Copy, Default)]
struct Plan {
    /// (bytes, reset)
    cut: Option<(u64, bool)>,
    black_hole: bool,
    corrupt_at: Option<u64>,
}

/// How many faults were applied so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub cuts: u64,
    pub resets: u64,
    pub black_holed: u64,
    pub corrupted: u64,
}

#[derive(Debug)]
struct FaultState {
    faults: Faults,
    rng: rand::rngs::StdRng,
    counts: FaultCounts,
    /// [`Faults::reset_every_bytes`] and the client → storage total when it was set.
    link_reset: Option<(u64, u64)>,
}

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
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    tokio::io::copy(&mut r, &mut w).await.ok();
                });
            }
        });
        addr
    }

    /// Sends `data` through the proxy to the echo server and reads the echo until EOF, an
    /// error or 2 s of silence. Returns the bytes back and the error, if any.
    async fn exchange(proxy: &CountingProxy, data: &[u8]) -> (Vec<u8>, Option<std::io::Error>) {
        let mut conn = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        let (mut r, mut w) = conn.split();
        let write = async {
            // The write fails when the proxy cuts: that is expected.
            if w.write_all(data).await.is_ok() {
                w.shutdown().await.ok();
            }
        };
        let read = async {
            let mut back = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match tokio::time::timeout(Duration::from_secs(2), r.read(&mut buf)).await {
                    Err(_) => return (back, Some(std::io::ErrorKind::TimedOut.into())),
                    Ok(Ok(0)) => return (back, None),
                    Ok(Ok(n)) => back.extend_from_slice(&buf[..n]),
                    Ok(Err(e)) => return (back, Some(e)),
                }
            }
        };
        let ((), out) = tokio::join!(write, read);
        out
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cuts_after_n_bytes_once_with_fin() {
        let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
        proxy.set_faults(Faults::cut_once(100_000, false));
        let data = pattern(300_000);
        let (back, err) = exchange(&proxy, &data).await;
        assert!(
            err.as_ref()
                .is_none_or(|e| e.kind() != std::io::ErrorKind::TimedOut),
            "{err:?}"
        );
        assert!(back.len() <= 100_000, "{} bytes came back", back.len());
        assert_eq!(back[..], data[..back.len()]);
        assert_eq!(proxy.fault_counts().cuts, 1);
        // Only once: the next connection goes through whole.
        let (back, err) = exchange(&proxy, &data).await;
        assert!(err.is_none(), "{err:?}");
        assert!(back == data, "{} bytes back", back.len());
        assert_eq!(proxy.fault_counts().cuts, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resets_every_second_connection() {
        let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
        proxy.set_faults(Faults::cut_every(2, 50_000, true));
        let data = pattern(200_000);
        let mut reset = 0;
        for i in 1..=4 {
            let (back, err) = exchange(&proxy, &data).await;
            if i % 2 == 0 {
                let err = err.expect("a reset connection ends in an error");
                assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
                assert!(back.len() <= 50_000);
                reset += 1;
            } else {
                assert!(err.is_none(), "connection {i}: {err:?}");
                assert!(back == data, "{} bytes back", back.len());
            }
        }
        assert_eq!(reset, 2);
        assert_eq!(proxy.fault_counts().resets, 2);
        assert_eq!(proxy.connections(), 4);
    }

    /// Writes `n` bytes of `pattern` on an open connection and reads their echo back.
    async fn echo_on(conn: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
        let data = pattern(n);
        conn.write_all(&data).await?;
        let mut back = vec![0u8; n];
        conn.read_exact(&mut back).await?;
        Ok(back)
    }

    /// The link reset counts every client's bytes together: neither connection alone sends
    /// 100 kB, yet the one whose bytes cross each multiple of the total is reset there, and
    /// only that one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn link_reset_hits_whichever_connection_crosses_each_multiple() {
        let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
        // Bytes sent before the faults are set do not count.
        let (back, err) = exchange(&proxy, &pattern(70_000)).await;
        assert!(err.is_none() && back.len() == 70_000, "{err:?}");
        proxy.set_faults(Faults::reset_every_bytes(100_000));
        let base = proxy.bytes_sent();
        let mut a = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        assert_eq!(echo_on(&mut a, 60_000).await.unwrap(), pattern(60_000));
        // B's 60 kB cross 100 kB of the total after 40 kB: B is reset, A is not.
        let data = pattern(60_000);
        let (back, err) = exchange(&proxy, &data).await;
        let err = err.expect("the connection crossing 100 kB is reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
        assert!(back.len() <= 40_000, "{} bytes back", back.len());
        assert_eq!(back[..], data[..back.len()]);
        assert_eq!(proxy.fault_counts().resets, 1);
        // A goes on up to just below 200 kB of the total, then crosses it.
        let below = (base + 200_000 - proxy.bytes_sent() - 1) as usize;
        assert_eq!(echo_on(&mut a, below).await.unwrap(), pattern(below));
        assert_eq!(proxy.fault_counts().resets, 1);
        let err = echo_on(&mut a, 10).await.expect_err("A crosses 200 kB");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ),
            "{err:?}"
        );
        assert_eq!(proxy.fault_counts().resets, 2);
        // Off again.
        proxy.clear_faults();
        let (back, err) = exchange(&proxy, &pattern(250_000)).await;
        assert!(err.is_none() && back.len() == 250_000, "{err:?}");
        assert_eq!(proxy.fault_counts().resets, 2);
    }

    /// Two clients sending at once, each opening a new connection after a reset until ten
    /// exchanges went through whole: one reset per multiple of the total crossed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn link_reset_counts_the_total_of_concurrent_clients() {
        let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
        proxy.set_faults(Faults::reset_every_bytes(100_000));
        let data = pattern(40_000);
        let client = || async {
            let (mut whole, mut reset) = (0, 0);
            while whole < 10 {
                match exchange(&proxy, &data).await {
                    (back, None) => {
                        assert!(back == data, "{} bytes back", back.len());
                        whole += 1;
                    }
                    (back, Some(e)) => {
                        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e:?}");
                        assert_eq!(back[..], data[..back.len()]);
                        reset += 1;
                    }
                }
            }
            reset
        };
        let (r1, r2) = tokio::join!(client(), client());
        let sent = proxy.bytes_sent();
        assert!(sent >= 800_000, "{sent}");
        assert_eq!(r1 + r2, proxy.fault_counts().resets);
        assert_eq!(proxy.fault_counts().resets, sent / 100_000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stall_holds_an_open_connection_until_it_ends() {
        let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
        let mut conn = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        let mut buf = [0u8; 5];
        conn.write_all(b"hello").await.unwrap();
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        proxy.set_stalled(true);
        conn.write_all(b"again").await.unwrap();
        let silent =
            tokio::time::timeout(Duration::from_millis(500), conn.read_exact(&mut buf)).await;
        assert!(silent.is_err(), "nothing comes back while stalled");
        proxy.set_stalled(false);
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
            .await
            .expect("the held bytes arrive once the stall ends")
            .unwrap();
        assert_eq!(&buf, b"again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn black_holes_a_seeded_fraction() {
        let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
        proxy.seed(7);
        proxy.set_faults(Faults {
            black_hole: 0.5,
            ..Faults::default()
        });
        let data = pattern(10_000);
        let mut holed = 0;
        for _ in 0..8 {
            let (back, err) = exchange(&proxy, &data).await;
            match err {
                Some(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    assert!(back.is_empty());
                    holed += 1;
                }
                None => assert!(back == data, "{} bytes back", back.len()),
                Some(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(holed, proxy.fault_counts().black_holed);
        assert!((1..8).contains(&holed), "{holed} of 8 black-holed");
        // The same seed picks the same connections.
        let again = CountingProxy::start(&echo_server().await.to_string()).await;
        again.seed(7);
        again.set_faults(Faults {
            black_hole: 0.5,
            ..Faults::default()
        });
        let picks: Vec<bool> = (1..=8).map(|n| again.shared.plan(n).black_hole).collect();
        assert_eq!(picks.iter().filter(|b| **b).count() as u64, holed);
        // Faults switch off at run time.
        proxy.clear_faults();
        let (back, err) = exchange(&proxy, &data).await;
        assert!(err.is_none(), "{err:?}");
        assert!(back == data, "{} bytes back", back.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupts_one_byte_of_the_kth_connection() {
        let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
        proxy.set_faults(Faults {
            corrupt: Some(Corrupt {
                connection: 2,
                offset: 70_000,
            }),
            ..Faults::default()
        });
        let data = pattern(200_000);
        let (first, _) = exchange(&proxy, &data).await;
        assert!(first == data, "connection 1 is untouched");
        let (second, err) = exchange(&proxy, &data).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(second.len(), data.len());
        let diff: Vec<usize> = (0..data.len()).filter(|&i| second[i] != data[i]).collect();
        assert_eq!(diff, vec![70_000]);
        assert_eq!(proxy.fault_counts().corrupted, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_connections_resets_open_ones() {
        let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
        let mut conn = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        conn.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).await.unwrap();
        proxy.drop_connections();
        let r = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
            .await
            .expect("closed at once");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }

    /// An echo server behind the proxy: bytes are counted both ways and the rate holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_and_paces() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    tokio::io::copy(&mut r, &mut w).await.ok();
                });
            }
        });
        let proxy = CountingProxy::start(&echo_addr.to_string()).await;
        proxy.set_rate(Some(1 << 20));
        let mut conn = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        let data = vec![7u8; 512 * 1024];
        let started = std::time::Instant::now();
        let (mut r, mut w) = conn.split();
        let write = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let read = async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::join!(write, read);
        let took = started.elapsed();
        assert_eq!(back.len(), data.len());
        assert_eq!(proxy.bytes_sent(), data.len() as u64);
        assert_eq!(proxy.bytes_received(), data.len() as u64);
        assert_eq!(proxy.connections(), 1);
        // 512 KiB at 1 MiB/s: about half a second (the first chunk goes at once).
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}
