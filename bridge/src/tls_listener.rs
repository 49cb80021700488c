//! The embedded broker's TLS listener (`broker.tls_listen`): rustls terminates TLS here and
//! each connection goes through the gate ([`crate::gate`]) as plain connections on
//! `broker.listen` do (keep that one on loopback for TLS-only service). Devices log in as
//! on plain TCP (key-derived password, checked by the API) or, with
//! `broker.tls_client_ca_file`, with a client certificate: the handshake requires one
//! chained to that CA, and its common name is the only device id the client may connect as.
//!
//! Why not rumqttd's own TLS listener: it does the handshake inside its accept loop, so a
//! client that never finishes one would hold every later connection; here each handshake
//! runs in its own task with a time limit.
//!
//! Certificate reload: before each handshake the listener looks at the modification times
//! of `tls_cert_file`, `tls_key_file` and `tls_client_ca_file`; when one changed it builds a new server
//! configuration from them and uses it for this and later connections. Connections already
//! open keep their session (nothing is dropped, no restart, no signal). Files that do not
//! load (half written, key not matching the certificate) are logged as an error and the
//! previous configuration stays in use until they do; replace both files by renaming.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uplink_service::tls::{self, TlsError};

use crate::gate::Gate;

/// A handshake must end within this long (as rumqttd's wait for a CONNECT).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Where the TLS listener listens and what it presents and asks for.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Mutual TLS: the CA certificates client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
}

/// Modification times of the files a configuration was made from.
type Stamp = [Option<SystemTime>; 3];

/// The server configuration in use and the file times it was made from.
struct Current {
    acceptor: TlsAcceptor,
    stamp: Stamp,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn stamp(s: &Settings) -> Stamp {
    [
        modified(&s.cert_file),
        modified(&s.key_file),
        s.client_ca_file.as_deref().and_then(modified),
    ]
}

fn load(s: &Settings) -> Result<Current, TlsError> {
    let stamp = stamp(s);
    let config = tls::server_config(&s.cert_file, &s.key_file, s.client_ca_file.as_deref())?;
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
    gate: Arc<Gate>,
}

impl TlsListener {
    /// Loads the certificate and key (errors say which file and why) and binds; each
    /// connection then goes through `gate`.
    pub async fn bind(settings: Settings, gate: Arc<Gate>) -> Result<Self, TlsListenError> {
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
            gate,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Accepts until `shutdown` fires.
    pub async fn serve(mut self, shutdown: CancellationToken) {
        let mutual = self.settings.client_ca_file.is_some();
        info!(listen = %self.settings.listen, client_certificates = mutual, "Embedded broker TLS listener");
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
            let Some(slot) = self.gate.slot(peer) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            refresh(&self.settings, &mut self.current);
            let acceptor = self.current.acceptor.clone();
            let gate = self.gate.clone();
            tokio::spawn(async move {
                serve_one(acceptor, tcp, peer, gate, mutual).await;
                drop(slot);
            });
        }
    }
}

/// One connection: handshake (time-limited), then the gate. With client certificates the
/// device id is the verified certificate's common name.
async fn serve_one(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    gate: Arc<Gate>,
    mutual: bool,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
    let certified = if mutual {
        let cn = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(tls::common_name);
        match cn {
            Some(cn) => Some(cn),
            None => {
                warn!(%peer, "Client certificate without a common name; closed");
                return;
            }
        }
    } else {
        None
    };
    debug!(%peer, ?certified, "TLS connection");
    gate.handle(stream, peer, certified).await;
}
