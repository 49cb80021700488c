//! A webhook receiver for tests: a minimal HTTP/1.1 server on 127.0.0.1 that answers every
//! POST with 204 and records the `X-Uplink-Event-Seq` of each delivery, duplicates
//! included, so a test can tell a missed event from one delivered twice.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Debug)]
pub struct WebhookReceiver {
    pub port: u16,
    seqs: Arc<Mutex<Vec<i64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WebhookReceiver {
    pub async fn start() -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        let port = listener.local_addr().expect("receiver address").port();
        let seqs = Arc::new(Mutex::new(Vec::new()));
        let got = seqs.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let got = got.clone();
                tokio::spawn(async move {
                    let mut conn = BufReader::new(conn);
                    // Requests one after another on a kept-alive connection.
                    while let Some(seq) = read_request(&mut conn).await {
                        if let Some(seq) = seq {
                            got.lock().unwrap_or_else(|e| e.into_inner()).push(seq);
                        }
                        let answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
                        if conn.get_mut().write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WebhookReceiver { port, seqs, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// The `seq` of every delivery so far, in arrival order (duplicates kept).
    pub fn seqs(&self) -> Vec<i64> {
        self.seqs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Reads one request (head and body); `None` at the end of the connection, else the event
/// `seq` it carried, if any.
async fn read_request(conn: &mut BufReader<tokio::net::TcpStream>) -> Option<Option<i64>> {
    let mut length = 0usize;
    let mut seq = None;
    let mut first = true;
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            if first {
                continue;
            }
            break;
        }
        first = false;
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().ok()?,
                "x-uplink-event-seq" => seq = value.trim().parse().ok(),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await.ok()?;
    Some(seq)
}
