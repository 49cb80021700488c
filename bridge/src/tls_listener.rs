//! The embedded broker's TLS listener (`broker.tls_listen`): rustls terminates TLS here and
//! each connection is relayed, as plain MQTT, to rumqttd's listener on `broker.listen`
//! (keep that one on loopback for TLS-only service). Devices authenticate exactly as on
//! plain TCP (the auth handler of [`crate::broker`]).
//!
//! Why not rumqttd's own TLS listener: it does the handshake inside its accept loop, so a
//! client that never finishes one would hold every later connection; here each handshake
//! runs in its own task with a time limit.
//!
//! Certificate reload: before each handshake the listener looks at the modification times
//! of `tls_cert_file` and `tls_key_file`; when either changed it builds a new server
//! configuration from them and uses it for this and later connections. Connections already
//! open keep their session (nothing is dropped, no restart, no signal). Files that do not
//! load (half written, key not matching the certificate) are logged as an error and the
//! previous configuration stays in use until they do; replace both files by renaming.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uplink_service::tls::{self, TlsError};

/// A handshake must end within this long (as rumqttd's wait for a CONNECT).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections relayed at once (rumqttd's own limit is a little above).
const MAX_CONNECTIONS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum TlsListenError {
    #[error("broker.tls_cert_file / tls_key_file: {0}")]
    Files(#[from] TlsError),
    #[error("embedded broker cannot listen on tls_listen {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the TLS listener listens, what it presents, and where it relays to.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// rumqttd's plain listener.
    pub upstream: SocketAddr,
}

/// The server configuration in use and the file times it was made from.
struct Current {
    acceptor: TlsAcceptor,
    stamp: (Option<SystemTime>, Option<SystemTime>),
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn stamp(s: &Settings) -> (Option<SystemTime>, Option<SystemTime>) {
    (modified(&s.cert_file), modified(&s.key_file))
}

fn load(s: &Settings) -> Result<Current, TlsError> {
    let stamp = stamp(s);
    let config = tls::server_config(&s.cert_file, &s.key_file)?;
    Ok(Current {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        stamp,
    })
}

/// Reloads when the files changed since `current` was made; keeps `current` when they
/// do not load.
fn refresh(s: &Settings, current: &mut Current) {
    if stamp(s) == current.stamp {
        return;
    }
    match load(s) {
        Ok(new) => {
            info!(cert_file = %s.cert_file.display(), "TLS certificate reloaded");
            *current = new;
        }
        Err(e) => {
            error!(error = %e, "TLS certificate files changed but do not load; still serving the previous certificate");
            // Try again only when they change again.
            current.stamp = stamp(s);
        }
    }
}

/// A bound TLS listener with its first configuration loaded.
pub struct TlsListener {
    listener: TcpListener,
    settings: Settings,
    current: Current,
}

impl TlsListener {
    /// Loads the certificate and key (errors say which file and why) and binds.
    pub async fn bind(settings: Settings) -> Result<Self, TlsListenError> {
        let current = load(&settings)?;
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| TlsListenError::Listen {
                    addr: settings.listen,
                    source,
                })?;
        Ok(TlsListener {
            listener,
            settings,
            current,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Accepts until `shutdown` fires.
    pub async fn serve(mut self, shutdown: CancellationToken) {
        info!(listen = %self.settings.listen, upstream = %self.settings.upstream, "Embedded broker TLS listener");
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                a = self.listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "TLS listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                warn!(%peer, "Too many TLS connections; refused");
                continue;
            };
            refresh(&self.settings, &mut self.current);
            let acceptor = self.current.acceptor.clone();
            let upstream = self.settings.upstream;
            tokio::spawn(async move {
                relay(acceptor, tcp, peer, upstream).await;
                drop(slot);
            });
        }
    }
}

/// One connection: handshake (time-limited), then bytes both ways until either side ends.
async fn relay(acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr, upstream: SocketAddr) {
    let mut stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            info!(%peer, "TLS handshake not finished in time; closed");
            return;
        }
    };
    let mut broker = match TcpStream::connect(upstream).await {
        Ok(b) => b,
        Err(e) => {
            error!(%upstream, error = %e, "Cannot reach the embedded broker's listener");
            return;
        }
    };
    let _ = broker.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut stream, &mut broker).await {
        Ok((up, down)) => debug!(%peer, up, down, "TLS connection closed"),
        Err(e) => debug!(%peer, error = %e, "TLS connection ended"),
    }
}
