//! A TCP proxy between the agent and S3. The control API's `s3.public_endpoint` points at
//! it, so every presigned URL the agent uses goes through it (SigV4 signs the Host header,
//! which the proxy passes on untouched). It counts the bytes the agent sends (requests:
//! headers and part bodies) and can limit their rate, to make uploads slow enough to
//! interrupt. Bytes are counted when the proxy reads them from the agent, so they measure
//! what actually left the agent's kernel towards storage.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    sent: AtomicU64,
    received: AtomicU64,
    connections: AtomicU64,
    /// Bytes per second from the agent; 0 is unlimited.
    rate: AtomicU64,
    next_slot: Mutex<Option<Instant>>,
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
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(relay(client, s.clone()));
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
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `n` more bytes fit in the rate limit.
async fn pace(shared: &Shared, n: usize) {
    let rate = shared.rate.load(Ordering::Relaxed);
    if rate == 0 {
        return;
    }
    let start = {
        let mut next = shared.next_slot.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let start = next.map_or(now, |t| t.max(now));
        *next = Some(start + Duration::from_secs_f64(n as f64 / rate as f64));
        start
    };
    tokio::time::sleep_until(start).await;
}

async fn relay(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    client.set_nodelay(true).ok();
    server.set_nodelay(true).ok();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up_shared = shared.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let chunk = if up_shared.rate.load(Ordering::Relaxed) > 0 {
                16 * 1024
            } else {
                buf.len()
            };
            let n = match cr.read(&mut buf[..chunk]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            up_shared.sent.fetch_add(n as u64, Ordering::Relaxed);
            pace(&up_shared, n).await;
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        sw.shutdown().await.ok();
    };
    let down_shared = shared.clone();
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            down_shared.received.fetch_add(n as u64, Ordering::Relaxed);
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
