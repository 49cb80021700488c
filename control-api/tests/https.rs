//! The API serving HTTPS itself (`tls_cert_file`, `tls_key_file`), on `uplink_api::serve`:
//! a client that trusts the CA gets answers; one that does not, or that speaks plain HTTP,
//! gets none; a client that never finishes its handshake holds nobody up; renewed files
//! are served from the next connection on without a restart; shutdown still drains.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio_util::sync::CancellationToken;

/// A CA, its certificate written to `dir/{name}-ca.pem`, and a server certificate for
/// 127.0.0.1 it signed, written to `dir/{name}.pem` and `dir/{name}.key`.
fn ca_and_server(dir: &Path, name: &str) -> reqwest::Certificate {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Uplink test {name} CA"));
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key"))
        .expect("self-signed CA");
    std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).expect("write CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("sign");
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write cert");
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write key");
    reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA for reqwest")
}

/// A new client (no pooled connection) trusting only `ca`.
fn client(ca: &reqwest::Certificate) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.clone())
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

#[tokio::test]
async fn the_api_serves_https_and_renews_its_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = ca_and_server(dir.path(), "first");
    let second = ca_and_server(dir.path(), "second");
    let (cert, key) = (dir.path().join("api.pem"), dir.path().join("api.key"));
    std::fs::copy(dir.path().join("first.pem"), &cert).expect("copy");
    std::fs::copy(dir.path().join("first.key"), &key).expect("copy");
    let app = TestApp::spawn_config(|c| {
        c.tls_cert_file = Some(cert.clone());
        c.tls_key_file = Some(key.clone());
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(uplink_api::serve(
        app.state.clone(),
        listener,
        shutdown.clone(),
    ));
    let url = format!("https://{addr}/healthz");

    // A client that never finishes its handshake is open the whole time.
    let _stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let ok = client(&first).get(&url).send().await.expect("HTTPS answer");
    assert_eq!(ok.status(), 200);
    let err = client(&second)
        .get(&url)
        .send()
        .await
        .expect_err("a client trusting another CA");
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");

    // Renewed by renaming new files over the old ones: the next connection gets them.
    for (from, to) in [("second.pem", &cert), ("second.key", &key)] {
        let tmp = dir.path().join("renew.tmp");
        std::fs::copy(dir.path().join(from), &tmp).expect("copy");
        std::fs::rename(&tmp, to).expect("rename");
    }
    let renewed = client(&second).get(&url).send().await.expect("renewed");
    assert_eq!(renewed.status(), 200);
    assert!(client(&first).get(&url).send().await.is_err());

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("the API stops")
        .expect("serve task")
        .expect("serve");
}
