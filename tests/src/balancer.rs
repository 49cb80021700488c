//! A tiny round-robin TCP load balancer for tests with several API instances: each new
//! connection goes to the next backend that accepts it, so a stopped backend is skipped
//! (connections already open to it break, as behind a real balancer).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// How long one backend may take to accept before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Balancer {
    pub port: u16,
    /// Connections each backend took so far.
    taken: Arc<Vec<AtomicU64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    /// Listens on a free port of 127.0.0.1 in front of `backends` (`host:port` each).
    pub async fn start(backends: Vec<String>) -> Balancer {
        assert!(!backends.is_empty(), "a balancer needs a backend");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the balancer");
        let port = listener.local_addr().expect("balancer address").port();
        let taken: Arc<Vec<AtomicU64>> =
            Arc::new(backends.iter().map(|_| AtomicU64::new(0)).collect());
        let backends = Arc::new(backends);
        let next = Arc::new(AtomicUsize::new(0));
        let counts = taken.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let (backends, next, counts) = (backends.clone(), next.clone(), counts.clone());
                tokio::spawn(async move {
                    let n = backends.len();
                    for _ in 0..n {
                        let i = next.fetch_add(1, Ordering::Relaxed) % n;
                        let connect = TcpStream::connect(backends[i].as_str());
                        if let Ok(Ok(mut upstream)) =
                            tokio::time::timeout(CONNECT_TIMEOUT, connect).await
                        {
                            counts[i].fetch_add(1, Ordering::Relaxed);
                            upstream.set_nodelay(true).ok();
                            client.set_nodelay(true).ok();
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                            return;
                        }
                    }
                    // No backend accepts: the client sees its connection closed.
                });
            }
        });
        Balancer { port, taken, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections each backend took so far, in the order of `backends`.
    pub fn connections(&self) -> Vec<u64> {
        self.taken
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}
