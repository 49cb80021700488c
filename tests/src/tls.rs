//! TLS for the tests: a throw-away PKI made at test time (rcgen) and a TLS-terminating
//! relay (rustls) that puts HTTPS in front of a plain TCP service, e.g. S3.
//!
//! [`Pki::new`] writes into a directory: `ca.pem` (the test CA), `other-ca.pem` (a CA
//! nobody uses, for "wrong CA"), `server.pem`/`server.key` (valid for the IP address
//! 127.0.0.1 only, so connecting to `localhost` is a wrong host name) and
//! `expired.pem`/`expired.key` (same CA and name, expired in 2020).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that can issue certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub cert_file: PathBuf,
}

impl TestCa {
    /// A new CA, its certificate written to `dir/{name}.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Uplink test {name}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        let cert_file = dir.join(format!("{name}.pem"));
        std::fs::write(&cert_file, issuer.pem()).expect("write CA");
        TestCa { issuer, cert_file }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses) with common name `cn`,
    /// written to `dir/{stem}.pem` and `dir/{stem}.key`. `client`: for client
    /// authentication (mutual TLS) instead of a server. `expired`: valid only in 2020.
    pub fn issue(
        &self,
        dir: &Path,
        stem: &str,
        cn: &str,
        names: &[&str],
        client: bool,
        expired: bool,
    ) -> CertFiles {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        params.use_authority_key_identifier_extension = true;
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 2);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let files = CertFiles {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

/// The test PKI of one stack.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: TestCa,
    /// A CA that signed nothing the stack serves.
    pub other_ca: PathBuf,
    /// For 127.0.0.1 only.
    pub server: CertFiles,
    /// For 127.0.0.1, expired.
    pub expired: CertFiles,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish()
    }
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("create pki dir");
        let ca = TestCa::new(dir, "ca");
        let other_ca = TestCa::new(dir, "other-ca").cert_file;
        let server = ca.issue(
            dir,
            "server",
            "uplink-test-broker",
            &["127.0.0.1"],
            false,
            false,
        );
        let expired = ca.issue(
            dir,
            "expired",
            "uplink-test-broker",
            &["127.0.0.1"],
            false,
            true,
        );
        Pki {
            dir: dir.to_path_buf(),
            ca,
            other_ca,
            server,
            expired,
        }
    }

    /// A client certificate whose CN (and only DNS name) is `device_id`, for mutual TLS.
    pub fn client(&self, device_id: &str) -> CertFiles {
        self.ca.issue(
            &self.dir,
            &format!("client-{device_id}"),
            device_id,
            &[device_id],
            true,
            false,
        )
    }
}

/// HTTPS (or any TLS) in front of a plain TCP service on 127.0.0.1: each connection's TLS
/// is terminated here and its bytes relayed to `target`. Runs until dropped.
#[derive(Debug)]
pub struct TlsRelay {
    pub port: u16,
    /// TLS handshakes completed so far.
    handshakes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsRelay {
    pub async fn start(target: SocketAddr, server: &CertFiles) -> TlsRelay {
        let config = uplink_service::tls::server_config(&server.cert, &server.key, None)
            .expect("TLS relay server config");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind TLS relay");
        let port = listener.local_addr().expect("relay address").port();
        let handshakes = Arc::new(AtomicU64::new(0));
        let counter = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsRelay {
            port,
            handshakes,
            task,
        }
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// `https://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}
