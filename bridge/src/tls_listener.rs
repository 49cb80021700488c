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
//! Certificate reload ([`Reloading`]): before each handshake the listener looks at the
//! modification times of `tls_cert_file`, `tls_key_file` and `tls_client_ca_file`, and
//! loads them again when one changed. Connections already open keep their session
//! (nothing is dropped, no restart, no signal); files that do not load keep the previous
//! configuration in use. Replace the files by renaming.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uplink_service::tls::{self, Reloading, ServerFiles, TlsError};

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
    pub files: ServerFiles,
}

/// A bound TLS listener with its first configuration loaded.
pub struct TlsListener {
    listener: TcpListener,
    settings: Settings,
    config: Reloading,
    gate: Arc<Gate>,
}

impl TlsListener {
    /// Loads the certificate and key (errors say which file and why) and binds; each
    /// connection then goes through `gate`.
    pub async fn bind(settings: Settings, gate: Arc<Gate>) -> Result<Self, TlsListenError> {
        let config = Reloading::load(settings.files.clone())?;
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
            config,
            gate,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Accepts until `shutdown` fires.
    pub async fn serve(mut self, shutdown: CancellationToken) {
        let mutual = self.settings.files.client_ca_file.is_some();
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
            let acceptor = TlsAcceptor::from(self.config.current());
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
