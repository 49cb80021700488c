//! TLS for the services' MQTT links (rustls with the *ring* provider, the one reqwest uses,
//! so no second crypto library is linked): client configurations from PEM files, the
//! embedded broker's server configuration (with client certificates for mutual TLS), and
//! plain-language explanations of handshake failures for logs and `uplink-agent doctor`.
//!
//! Trust: the system roots by default, or only the certificates of a `ca_file`. A client
//! certificate and key turn on mutual TLS. `server_name` checks the server's certificate
//! against that name instead of the host connected to (an IP address, or a name the
//! certificate does not carry).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

pub use rustls::{ClientConfig, ServerConfig};

/// Files and names of one TLS client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFiles {
    /// Trust only these CA certificates (PEM); `None` = the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// Check the server's certificate against this name instead of the host.
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{path}: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("no system CA certificates found (install ca-certificates, or set a ca_file)")]
    NoSystemRoots,
    #[error("server_name {0:?} is not a valid DNS name or IP address")]
    BadServerName(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// The crypto provider of every TLS configuration made here.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |reason: String| TlsError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(pem_reason(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(pem_reason(e)))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::BadKey {
        path: path.to_path_buf(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "holds no PEM private key".into(),
            other => pem_reason(other),
        },
    })
}

fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("not valid PEM ({other:?})"),
    }
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(path)? {
                store.add(cert).map_err(|e| TlsError::Read {
                    path: path.to_path_buf(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    if store.is_empty() {
        return Err(TlsError::NoSystemRoots);
    }
    Ok(store)
}

/// A client configuration from `files` (reads them now; call again to pick up new files).
pub fn client_config(files: &ClientFiles) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(roots(files.ca_file.as_deref())?);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let verifier: Arc<dyn ServerCertVerifier> = match &files.server_name {
        Some(name) => Arc::new(NameOverride {
            name: ServerName::try_from(name.clone())
                .map_err(|_| TlsError::BadServerName(name.clone()))?,
            inner: webpki,
        }),
        None => webpki,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            builder.with_client_auth_cert(read_certs(cert)?, read_key(key)?)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// A server configuration with this certificate chain and key. With `client_ca_file`
/// every client must present a certificate chained to one of its CA certificates (mutual
/// TLS); without it, none is asked for.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(cert_file)?;
    let key = read_key(key_file)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca_file {
        Some(ca) => {
            let roots = Arc::new(roots(Some(ca))?);
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots, provider).build()?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    Ok(builder.with_single_cert(certs, key)?)
}

/// The CA certificates of a PEM file, for a reqwest client that trusts them besides the
/// built-in roots (storage or the control API behind a private CA).
pub fn https_roots(file: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    read_certs(file).map_err(|e| e.to_string())?;
    let pem = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", file.display()))
}

/// The files of a TLS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// Certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// Mutual TLS: client certificates must chain to these CA certificates (PEM).
    pub client_ca_file: Option<PathBuf>,
}

/// Modification times of a server's files.
type Stamp = [Option<SystemTime>; 3];

/// A server configuration that follows its files: [`Reloading::current`] compares their
/// modification times and, when one changed, loads them again and uses the new
/// configuration from then on. Files that do not load (half written, a key that does not
/// match the certificate) are logged as an error and the previous configuration stays in
/// use until they change again. Connections already open keep their session.
#[derive(Debug)]
pub struct Reloading {
    files: ServerFiles,
    config: Arc<ServerConfig>,
    stamp: Stamp,
}

impl Reloading {
    /// Loads the files now (errors say which file and why).
    pub fn load(files: ServerFiles) -> Result<Self, TlsError> {
        let stamp = Self::stamp_of(&files);
        let config = Arc::new(Self::config_of(&files)?);
        Ok(Reloading {
            files,
            config,
            stamp,
        })
    }

    fn stamp_of(files: &ServerFiles) -> Stamp {
        let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        [
            modified(&files.cert_file),
            modified(&files.key_file),
            files.client_ca_file.as_deref().and_then(modified),
        ]
    }

    fn config_of(files: &ServerFiles) -> Result<ServerConfig, TlsError> {
        server_config(
            &files.cert_file,
            &files.key_file,
            files.client_ca_file.as_deref(),
        )
    }

    /// The configuration for a new connection, reloaded first if the files changed.
    pub fn current(&mut self) -> Arc<ServerConfig> {
        let stamp = Self::stamp_of(&self.files);
        if stamp != self.stamp {
            // Tried again only when they change again.
            self.stamp = stamp;
            match Self::config_of(&self.files) {
                Ok(config) => {
                    tracing::info!(cert_file = %self.files.cert_file.display(), "TLS certificate reloaded");
                    self.config = Arc::new(config);
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate files changed but do not load; still serving the previous certificate");
                }
            }
        }
        self.config.clone()
    }
}

/// The subject's common name (CN) of a DER certificate: the identity a verified client
/// certificate carries (as Mosquitto's `use_identity_as_username`).
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// WebPKI verification against a configured name rather than the host connected to. The
/// chain, validity dates and signatures are checked exactly as without the override.
#[derive(Debug)]
struct NameOverride {
    name: ServerName<'static>,
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NameOverride {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls error somewhere in `err`'s chain (also inside an `io::Error`, where
/// tokio-rustls puts it).
fn find_rustls<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(r) = find_rustls(inner) {
                return Some(r);
            }
        }
        next = e.source();
    }
    None
}

/// What an operator should know about a failed TLS handshake in `err`'s chain; `None` when
/// the chain holds no TLS error.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let e = find_rustls(err)?;
    Some(match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "the server's certificate is not signed by a CA this client trusts ({e}); \
                 check ca_file"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "the server's certificate has expired ({e}); renew it on the server \
                 (or set this machine's clock if it is wrong)"
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!(
                    "the server's certificate is not valid yet ({e}); check this machine's \
                     clock"
                )
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the server's certificate does not name the host connected to ({e}); \
                     connect by a name it carries, or set server_name"
                )
            }
            _ => format!("the server's certificate was refused: {e}"),
        },
        rustls::Error::AlertReceived(alert) => format!(
            "the server refused the handshake (alert {alert:?}): it may want a client \
             certificate it trusts (cert_file / key_file), or a TLS version or cipher this \
             client lacks"
        ),
        other => format!("TLS handshake failed: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_wrapped(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn explains_certificate_errors_inside_io_errors() {
        let cases = [
            (CertificateError::UnknownIssuer, "not signed by a CA"),
            (CertificateError::Expired, "has expired"),
            (CertificateError::NotValidForName, "does not name the host"),
        ];
        for (cert, words) in cases {
            let err = io_wrapped(rustls::Error::InvalidCertificate(cert));
            let text = explain(&err).unwrap_or_default();
            assert!(text.contains(words), "{text}");
        }
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(explain(&plain), None);
    }

    #[test]
    fn missing_files_are_named() {
        let files = ClientFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..ClientFiles::default()
        };
        let err = client_config(&files).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let dir = std::env::temp_dir().join(format!("uplink-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        let err = read_certs(&empty).unwrap_err().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = read_key(&empty).unwrap_err().to_string();
        assert!(err.contains("no PEM private key"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_server_name_is_refused() {
        // System roots may be absent on a build machine; a CA-less server name check comes
        // after them, so only assert the message when roots exist.
        let files = ClientFiles {
            server_name: Some("not a name!".into()),
            ..ClientFiles::default()
        };
        match client_config(&files) {
            Err(TlsError::NoSystemRoots) => {}
            Err(e) => assert!(e.to_string().contains("server_name"), "{e}"),
            Ok(_) => panic!("accepted a bad server_name"),
        }
    }
}
