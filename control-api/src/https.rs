//! HTTPS served by the API itself (`tls_cert_file`, `tls_key_file`): a listener for
//! `axum::serve` whose connections come out of the TLS handshake.
//!
//! One task accepts TCP connections and runs each handshake in a task of its own with a
//! time limit, so a client that never finishes one holds nobody up; finished handshakes
//! reach `axum::serve` through a channel. The certificate and key are read again when
//! their modification times change ([`Reloading`]): a renewed certificate is served from
//! the next connection on, without a restart and without dropping open connections.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use uplink_service::tls::{Reloading, ServerFiles};

/// A handshake must end within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for `axum::serve` to take them.
const READY_QUEUE: usize = 64;

/// TLS connections for `axum::serve`.
pub struct HttpsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl HttpsListener {
    /// Loads the certificate and key (errors say which file and why) and starts accepting
    /// on `listener`.
    pub fn start(listener: TcpListener, files: ServerFiles) -> anyhow::Result<Self> {
        let config = Reloading::load(files)?;
        let addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let accepting = tokio::spawn(accept_loop(listener, config, tx));
        Ok(HttpsListener {
            ready,
            addr,
            accepting,
        })
    }
}

impl Drop for HttpsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    mut config: Reloading,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "HTTPS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(config.current());
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "TLS handshake not finished in time; closed"),
            }
        });
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
