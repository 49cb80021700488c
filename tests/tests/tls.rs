//! TLS everywhere, with a throw-away CA made by the test (tests/src/tls.rs): agents upload
//! over MQTT-over-TLS on both brokers (the bridge's embedded one through its `tls_listen`,
//! Mosquitto through a `listener` with `cafile/certfile/keyfile`) and PUT their parts over
//! HTTPS (`https_ca_file`); the bridge reaches Mosquitto over TLS too, and the control API,
//! which serves HTTPS itself (`tls_cert_file`), through `api_ca_file`. A wrong CA, an
//! expired server certificate and a wrong host name each fail with a plain-words error in
//! the agent's log and in `uplink-agent doctor`. The embedded broker picks up replaced
//! certificate files at the next connection without dropping the open ones. With
//! `tls_client_ca_file` it takes client certificates instead of passwords (mutual TLS):
//! the certificate's common name is the only device a client may connect as.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use uplink_e2e::tls::{CertFiles, TestCa};
use uplink_e2e::{
    AgentOptions, ConnectFailure, Device, MqttDevice, MqttLogin, Stack, StackOptions, MIB,
};
use uplink_service::tls::ClientFiles;

const WRONG_CA: &str = "the server's certificate is not signed by a CA this client trusts";
const EXPIRED: &str = "the server's certificate has expired";
const WRONG_HOST: &str = "the server's certificate does not name the host connected to";

fn doctor(stack: &Stack, dev: &Device, envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(stack.env.bin("uplink-agent"));
    cmd.arg("--config")
        .arg(dev.dir.join("agent.toml"))
        .arg("doctor");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run uplink-agent doctor");
    eprintln!(
        "doctor {envs:?} -> {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `mqtt connect` line of doctor's output.
fn mqtt_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("mqtt connect"))
        .unwrap_or_default()
        .to_string()
}

fn assert_doctor_fails(stack: &Stack, dev: &Device, envs: &[(&str, &str)], words: &str) {
    let out = doctor(stack, dev, envs);
    assert_eq!(out.status.code(), Some(1), "doctor {envs:?} must fail");
    let line = mqtt_line(&out);
    assert!(
        line.contains("FAIL: TLS handshake with") && line.contains(words),
        "doctor {envs:?}: `{line}` must say `{words}`"
    );
}

/// Doctor with another CA's certificate as `ca_file`, then connecting as `localhost` (the
/// broker's certificate names only 127.0.0.1): each fails and says why.
fn assert_doctor_names_wrong_ca_and_host(stack: &Stack, dev: &Device, other_ca: &str) {
    for (env, words) in [
        (("UPLINK_AGENT_MQTT__CA_FILE", other_ca), WRONG_CA),
        (("UPLINK_AGENT_MQTT__HOST", "localhost"), WRONG_HOST),
    ] {
        assert_doctor_fails(stack, dev, &[env], words);
    }
}

fn assert_doctor_connects(stack: &Stack, dev: &Device) {
    let line = mqtt_line(&doctor(stack, dev, &[]));
    assert!(line.contains("ok: CONNECT as"), "doctor over TLS: `{line}`");
}

/// Replaces the file by renaming a full copy over it, as docs/operations.md says to.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).expect("copy certificate file");
    std::fs::rename(&tmp, to).expect("rename certificate file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_over_tls_with_clear_errors_and_reload() {
    let stack = Stack::start(StackOptions {
        tls: true,
        ..StackOptions::default()
    })
    .await;
    let tls = stack.tls.as_ref().expect("tls stack");
    let dev = stack.add_device(&AgentOptions::default()).await;
    // Doctor's successful CONNECTs (same client id) take the agent's connection over; the
    // agent reconnects before the upload below.
    assert_doctor_connects(&stack, &dev);

    // Wrong CA, wrong host name: doctor says which.
    let other_ca = tls.pki.other_ca.to_str().expect("utf-8 path");
    assert_doctor_names_wrong_ca_and_host(&stack, &dev, other_ca);
    // ... and `server_name` is how a device connects by another name.
    let out = doctor(
        &stack,
        &dev,
        &[
            ("UPLINK_AGENT_MQTT__HOST", "localhost"),
            ("UPLINK_AGENT_MQTT__SERVER_NAME", "127.0.0.1"),
        ],
    );
    assert!(mqtt_line(&out).contains("ok: CONNECT as"), "server_name");

    let file = stack.source_file(&dev, "rec/tls-1.bin", 6 * MIB).await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(240))
        .await;
    assert!(
        tls.s3.handshakes() > 0,
        "the parts went to storage over HTTPS"
    );
    let connections = || {
        std::fs::read_to_string(dev.dir.join("agent.log"))
            .unwrap_or_default()
            .matches("Connected to broker")
            .count()
    };
    let before = connections();

    // The broker's certificate is replaced by an expired one: taken at the next connection
    // (doctor's), while the agent's open connection goes on working.
    replace(&tls.pki.expired.cert, &tls.pki.server.cert);
    replace(&tls.pki.expired.key, &tls.pki.server.key);
    assert_doctor_fails(&stack, &dev, &[], EXPIRED);
    let file = stack.source_file(&dev, "rec/tls-2.bin", MIB).await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(120))
        .await;
    assert_eq!(
        connections(),
        before,
        "the agent's connection survived the certificate change"
    );

    // A (re)starting agent says the same in its log, as an error.
    stack.restart_agent(&dev);
    stack
        .wait_agent_log(
            &dev,
            &format!("MQTT TLS handshake failed: {EXPIRED}"),
            Duration::from_secs(30),
            "an expired broker certificate is named in the agent log",
        )
        .await;

    // Renewed files: new connections succeed again, no restart of the bridge.
    let renewed = tls.pki.ca.issue(
        &tls.pki.dir,
        "renewed",
        "uplink-test-broker",
        &["127.0.0.1"],
        false,
        false,
    );
    replace(&renewed.cert, &tls.pki.server.cert);
    replace(&renewed.key, &tls.pki.server.key);
    assert_doctor_connects(&stack, &dev);

    for (env, words) in [
        (("UPLINK_AGENT_MQTT__CA_FILE", other_ca), WRONG_CA),
        (("UPLINK_AGENT_MQTT__HOST", "localhost"), WRONG_HOST),
    ] {
        stack.start_agent(
            &dev,
            &AgentOptions {
                env: vec![(env.0.to_string(), env.1.to_string())],
                ..AgentOptions::default()
            },
        );
        stack
            .wait_agent_log(
                &dev,
                &format!("MQTT TLS handshake failed: {words}"),
                Duration::from_secs(30),
                "a TLS failure is named in the agent log",
            )
            .await;
    }
    stack.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_over_tls() {
    let stack = Stack::start(StackOptions {
        external_broker: true,
        tls: true,
        ..StackOptions::default()
    })
    .await;
    let tls = stack.tls.as_ref().expect("tls stack");
    let dev = stack.add_device(&AgentOptions::default()).await;
    let file = stack
        .source_file(&dev, "rec/mosquitto-tls.bin", 6 * MIB)
        .await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(240))
        .await;
    assert!(tls.s3.handshakes() > 0, "parts went over HTTPS");
    // The bridge reached the control API over HTTPS (`api_ca_file`); plain HTTP gets
    // nothing there.
    assert!(stack.api_url.starts_with("https://"), "{}", stack.api_url);
    let plain = reqwest::Client::new()
        .get(stack.api_url.replace("https://", "http://") + "/healthz")
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "the API answered plain HTTP: {plain:?}");
    assert_doctor_connects(&stack, &dev);
    let other_ca = tls.pki.other_ca.to_str().expect("utf-8 path");
    assert_doctor_names_wrong_ca_and_host(&stack, &dev, other_ca);
}

/// A client on the broker's TLS port with `cert` (or none) as `client_id`, with
/// `username` (and a password nobody checks) or none.
async fn connect_with_certificate(
    stack: &Stack,
    client_id: &str,
    username: Option<&str>,
    cert: Option<&CertFiles>,
) -> Result<MqttDevice, ConnectFailure> {
    let tls = stack.tls.as_ref().expect("tls stack");
    let login = MqttLogin {
        client_id: client_id.to_string(),
        username: username.map(str::to_string),
        password: username.map(|_| "not-checked".to_string()),
        tls: Some(ClientFiles {
            ca_file: Some(tls.pki.ca.cert_file.clone()),
            cert_file: cert.map(|c| c.cert.clone()),
            key_file: cert.map(|c| c.key.clone()),
            server_name: None,
        }),
    };
    MqttDevice::connect_with(tls.mqtt_port, &login).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_with_client_certificates() {
    let stack = Stack::start(StackOptions {
        tls: true,
        tls_client_certs: true,
        ..StackOptions::default()
    })
    .await;
    let tls = stack.tls.as_ref().expect("tls stack");
    // The agent presents its certificate (CN = its device id) and uploads.
    let dev = stack.add_device(&AgentOptions::default()).await;
    let file = stack.source_file(&dev, "rec/mtls.bin", 6 * MIB).await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(240))
        .await;

    // The certificate is the credential: no password needed, and the client may then use
    // its own topics.
    let other = stack.register_device().await;
    let cert = stack.client_cert(&other);
    let mut client = connect_with_certificate(&stack, &other.id, None, Some(&cert))
        .await
        .unwrap_or_else(|e| panic!("a client certificate alone logs in: {e:?}"));
    client
        .subscribe(&uplink_protocol::topics::topic(
            &other.id,
            uplink_protocol::topics::Channel::Cmd,
        ))
        .await;
    client.disconnect().await;

    // Refused: as another device (the one whose agent is connected), with a username
    // other than its own, without a certificate, with a certificate of another CA for the
    // right name, and once the device is disabled.
    let rogue_ca = TestCa::new(&tls.pki.dir, "rogue-ca");
    let forged = rogue_ca.issue(&tls.pki.dir, "forged", &other.id, &[], true, false);
    for (what, client_id, username, cert) in [
        ("another device's id", dev.id.as_str(), None, Some(&cert)),
        (
            "another username",
            other.id.as_str(),
            Some(dev.id.as_str()),
            Some(&cert),
        ),
        ("no certificate", other.id.as_str(), None, None),
        ("another CA", other.id.as_str(), None, Some(&forged)),
    ] {
        let refused = connect_with_certificate(&stack, client_id, username, cert).await;
        assert!(
            matches!(refused, Err(ConnectFailure::Failed(_))),
            "{what}: {refused:?}"
        );
    }
    let disabled = stack
        .operator(
            reqwest::Method::PATCH,
            &format!("/v1/devices/{}", other.id),
            Some(serde_json::json!({"enabled": false})),
        )
        .await;
    assert_eq!(disabled.status, 200, "{disabled}");
    let refused = connect_with_certificate(&stack, &other.id, None, Some(&cert)).await;
    assert!(refused.is_err(), "disabled: {refused:?}");
    for line in [
        "MQTT client not connecting as the device its certificate names; refused",
        "TLS handshake failed",
    ] {
        assert!(
            stack.log_of(uplink_e2e::Service::Bridge).contains(line),
            "bridge log says `{line}`"
        );
    }

    // The agent's connection was never disturbed: it uploads again.
    let file = stack.source_file(&dev, "rec/mtls-2.bin", MIB).await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(120))
        .await;
    stack.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_client_certificates() {
    let stack = Stack::start(StackOptions {
        mosquitto_acl: true,
        tls: true,
        tls_client_certs: true,
        ..StackOptions::default()
    })
    .await;
    let tls = stack.tls.as_ref().expect("tls stack");
    // The agent presents its certificate; Mosquitto takes its CN as the username, so the
    // ACL's %u is the device id.
    let dev = stack.add_device(&AgentOptions::default()).await;
    let file = stack
        .source_file(&dev, "rec/mosquitto-mtls.bin", 6 * MIB)
        .await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(240))
        .await;

    // A certificate alone logs in (no password), as the device it names.
    let other = stack.register_device().await;
    let cert = stack.client_cert(&other);
    connect_with_certificate(&stack, &other.id, None, Some(&cert))
        .await
        .unwrap_or_else(|e| panic!("a client certificate alone logs in: {e:?}"))
        .disconnect()
        .await;
    // Without a certificate, or with one of another CA, no TLS connection.
    let rogue_ca = TestCa::new(&tls.pki.dir, "rogue-ca");
    let forged = rogue_ca.issue(&tls.pki.dir, "forged", &other.id, &[], true, false);
    for (what, cert) in [("no certificate", None), ("another CA", Some(&forged))] {
        let refused = connect_with_certificate(&stack, &other.id, None, cert).await;
        assert!(refused.is_err(), "{what}: {refused:?}");
    }
    stack.assert_alive();
}
