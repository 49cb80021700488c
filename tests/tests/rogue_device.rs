//! A registered but rogue device B against device A's real agent, on the embedded broker
//! and on Mosquitto (the ACL set-up of docs/security.md, or the dynamic-security plugin):
//!
//! - B subscribes to `#` during A's whole upload (a raw MQTT client that records every byte
//!   it receives, reconnecting whenever it is cut off): none of those bytes holds A's
//!   path, file name, device id, session id, command id or a presigned URL. On the embedded
//!   broker the gate closes B's connection at its SUBSCRIBE.
//! - B publishes a request validly signed with A's key on A's `req`: it never reaches the
//!   bridge (no session); the same envelope sent to the API directly opens one (control).
//! - B replays that request on its own `req`: refused (the signature is A's).
//! - Disabling B closes its open connection within a few seconds, and it cannot reconnect.
//!
//! Each broker is tried over plain TCP and over TLS (the stack's throw-away CA; B is then
//! a TLS client like A's agent), and Mosquitto also with the accounts the bridge keeps in
//! its dynamic-security plugin (there too disabling B closes its connection).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Login, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uplink_e2e::device::signed;
use uplink_e2e::{AgentOptions, Device, MqttDevice, MqttLogin, Service, Stack, StackOptions, MIB};
use uplink_protocol::topics::{self, Channel};
use uplink_service::tls::ClientFiles;

/// How `dev` logs in to the stack's broker: its password, and over TLS (trusting the
/// stack's CA) when the stack has TLS.
fn login(stack: &Stack, dev: &Device) -> MqttLogin {
    let mut login = match &dev.mqtt_password {
        Some(password) => MqttLogin::user(&dev.id, password),
        None => MqttLogin::derived(&dev.id, &dev.key),
    };
    login.tls = stack.tls.as_ref().map(|t| ClientFiles {
        ca_file: Some(t.pki.ca.cert_file.clone()),
        ..ClientFiles::default()
    });
    login
}

/// A device's connection to the broker: TCP, or TLS over it.
trait Wire: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Wire for T {}

/// Connects to 127.0.0.1:`port`, with TLS when `login` says so.
async fn open(port: u16, login: &MqttLogin) -> Option<Box<dyn Wire>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let Some(files) = &login.tls else {
        return Some(Box::new(tcp));
    };
    let config = uplink_service::tls::client_config(files).expect("TLS client config");
    let name =
        tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    Some(Box::new(tls))
}

/// What a raw `#` subscriber received over all its connections.
#[derive(Default)]
struct Spied {
    bytes: Vec<u8>,
    /// Connections whose CONNECT the broker accepted.
    accepted: usize,
    /// Connections the broker closed.
    closed: usize,
}

/// One connection: CONNECT as `dev`, SUBSCRIBE `#`, then every byte until the broker
/// closes it or `stop` is set.
async fn spy_once(port: u16, login: &MqttLogin, stop: &AtomicBool, out: &mut Spied) {
    let Some(mut tcp) = open(port, login).await else {
        tokio::time::sleep(Duration::from_millis(200)).await;
        return;
    };
    let mut connect = Connect::new(login.client_id.clone());
    connect.keep_alive = 30;
    connect.login = Some(Login::new(
        login.username.clone().unwrap_or_default(),
        login.password.clone().unwrap_or_default(),
    ));
    let mut wire = BytesMut::new();
    connect.write(&mut wire).expect("encode CONNECT");
    if tcp.write_all(&wire).await.is_err() {
        return;
    }
    // SUBSCRIBE once the CONNACK says B is logged in.
    let mut connack = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut connack)).await;
    if !matches!(read, Ok(Ok(_))) || connack != [0x20, 0x02, 0x00, 0x00] {
        out.closed += 1;
        return;
    }
    out.accepted += 1;
    let mut wire = BytesMut::new();
    let mut sub = Subscribe::new("#", QoS::AtLeastOnce);
    sub.pkid = 1;
    sub.write(&mut wire).expect("encode SUBSCRIBE");
    if tcp.write_all(&wire).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => {
                out.closed += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            Ok(Ok(n)) => out.bytes.extend_from_slice(&buf[..n]),
        }
    }
}

async fn spy_until(port: u16, login: MqttLogin, stop: Arc<AtomicBool>) -> Spied {
    let mut out = Spied::default();
    while !stop.load(Ordering::SeqCst) {
        spy_once(port, &login, &stop, &mut out).await;
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The broker B and A meet on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Broker {
    Embedded,
    /// Mosquitto with the password and ACL files of docs/security.md.
    MosquittoFiles,
    /// Mosquitto with accounts the bridge keeps in its dynamic-security plugin.
    MosquittoDynsec,
}

async fn rogue_device_learns_and_does_nothing(broker: Broker, tls: bool) {
    let mosquitto = broker != Broker::Embedded;
    let stack = Stack::start(StackOptions {
        mosquitto_acl: broker == Broker::MosquittoFiles,
        mosquitto_dynsec: broker == Broker::MosquittoDynsec,
        tls,
        ..StackOptions::default()
    })
    .await;
    let a = stack.add_device(&AgentOptions::default()).await;
    let b = stack.register_device().await;
    let port = stack.tls.as_ref().map_or(stack.mqtt_port, |t| t.mqtt_port);

    // --- B listens to `#` during A's whole upload.
    let stop = Arc::new(AtomicBool::new(false));
    let spy = tokio::spawn(spy_until(port, login(&stack, &b), stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let file = stack
        .source_file(&a, "secret-site/rogue-target-run.bin", 6 * MIB)
        .await;
    let command_id = stack.upload_command(&a.id, file.path_str()).await;
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(240))
        .await;
    assert_eq!(cmd["state"], "done", "A's upload: {cmd}");
    stop.store(true, Ordering::SeqCst);
    let spied = spy.await.expect("spy task");
    let sessions = stack.sessions(&a.id).await;
    let session_id = sessions[0]["session_id"].as_str().expect("session id");

    assert!(
        spied.accepted >= 1,
        "B (a registered device) was never logged in: the spy proves nothing"
    );
    for needle in [
        "rogue-target-run",
        "secret-site",
        a.id.as_str(),
        session_id,
        command_id.as_str(),
        "X-Amz",
        "http://",
        "https://",
    ] {
        assert!(
            !contains(&spied.bytes, needle),
            "B's `#` subscription received {needle:?} of A ({} bytes over {} connections)",
            spied.bytes.len(),
            spied.accepted
        );
    }
    if !mosquitto {
        assert!(
            spied.closed >= 1,
            "the embedded broker let B keep a `#` subscription"
        );
    }

    // --- B publishes a request signed with A's key on A's `req`.
    let mut client = MqttDevice::connect_with(port, &login(&stack, &b))
        .await
        .unwrap_or_else(|e| panic!("B connects: {e:?}"));
    client.subscribe(&topics::topic(&b.id, Channel::Res)).await;
    client
        .wait_bridge_ready(&b.id, &b.key, Duration::from_secs(30))
        .await;
    let forged_job = uuid::Uuid::new_v4();
    let forged = signed(
        &a.key,
        &a.id,
        "session.create",
        &json!({"job_id": forged_job, "file_name": "forged.bin", "size": 6 * MIB,
                "sha256": "ab".repeat(32), "part_size": 5 * MIB}),
    );
    client.publish_request(&a.id, &forged).await;
    // Replayed on B's own `req`, A's signature does not pass for B.
    client.publish_request(&b.id, &forged).await;
    let replay = client
        .response(
            &topics::topic(&b.id, Channel::Res),
            &forged.request_id,
            Duration::from_secs(10),
        )
        .await;
    if mosquitto {
        let replay = replay.expect("the bridge answers B's own req");
        assert_eq!(replay.status, 401, "replay as B: {replay:?}");
    } else {
        // The gate closed B's connection at its publish on A's topic, before the replay.
        assert!(
            replay.is_none(),
            "B's replay after its forgery got through: {replay:?}"
        );
        let bridge_log = stack.log_of(Service::Bridge);
        for why in [
            "SUBSCRIBE to #".to_string(),
            format!("PUBLISH on {}", topics::topic(&a.id, Channel::Req)),
        ] {
            assert!(
                bridge_log.contains(&why),
                "the bridge never logged closing B for {why:?}"
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let forged_sessions = stack
        .sessions(&a.id)
        .await
        .iter()
        .filter(|s| s["job_id"] == forged_job.to_string())
        .count();
    assert_eq!(
        forged_sessions, 0,
        "B's publish on A's req reached the bridge"
    );
    let direct = stack.device_http.send(&a.id, &forged).await;
    assert_eq!(
        direct.status, 201,
        "control: the envelope is valid: {direct}"
    );
    drop(client);

    // --- Disabling B closes its open connection (Mosquitto's files know nothing of it).
    if broker != Broker::MosquittoFiles {
        let mut client = MqttDevice::connect_with(port, &login(&stack, &b))
            .await
            .unwrap_or_else(|e| panic!("B connects: {e:?}"));
        client.subscribe(&topics::topic(&b.id, Channel::Res)).await;
        let reply = stack
            .operator(
                reqwest::Method::PATCH,
                &format!("/v1/devices/{}", b.id),
                Some(json!({"enabled": false})),
            )
            .await;
        assert_eq!(reply.status, 200, "disable B: {reply}");
        let after = client.collect(Duration::from_secs(5)).await;
        assert!(
            !after.errors.is_empty(),
            "B's connection stayed open 5 s after it was disabled"
        );
        assert!(
            MqttDevice::connect_with(port, &login(&stack, &b))
                .await
                .is_err(),
            "a disabled device reconnected"
        );
    }
    stack.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_device_on_the_embedded_broker() {
    rogue_device_learns_and_does_nothing(Broker::Embedded, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_device_on_mosquitto() {
    rogue_device_learns_and_does_nothing(Broker::MosquittoFiles, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_device_on_the_embedded_broker_over_tls() {
    rogue_device_learns_and_does_nothing(Broker::Embedded, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_device_on_mosquitto_over_tls() {
    rogue_device_learns_and_does_nothing(Broker::MosquittoFiles, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_device_on_mosquitto_with_dynamic_security_over_tls() {
    rogue_device_learns_and_does_nothing(Broker::MosquittoDynsec, true).await;
}
