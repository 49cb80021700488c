//! A registered but hostile device, over MQTT through the real bridge (embedded broker and
//! Mosquitto), against the real agent of another device in the same project:
//!
//! - Device B opens a session claiming the SHA-256 of file Y, uploads the parts of another
//!   file X with X's own MD5s and completes it. The control API hashes the stored object,
//!   finds X's digest, records a mismatch (`digest_check`, event `session.digest_mismatch`)
//!   and never offers B's object as a stored copy: the real agent's upload of Y is uploaded
//!   and stored intact, and a later upload of Y is deduplicated from that verified object,
//!   never from B's.
//! - Device B opening a session under device A's command id gets "not found"; the command
//!   lists no session of B.

use std::time::Duration;

use base64::Engine as _;
use md5::{Digest as _, Md5};
use serde_json::{json, Value};
use sha2::Sha256;
use uplink_e2e::device::signed;
use uplink_e2e::files::{s3_download, sha256_file};
use uplink_e2e::{
    AgentOptions, Device, MqttDevice, MqttLogin, SourceFile, Stack, StackOptions, MIB,
};
use uplink_protocol::envelope::ResponseEnvelope;
use uplink_protocol::topics::{self, Channel};

const PART: u64 = 5 * MIB;
const SIZE: u64 = 6 * MIB;

fn stack_options(mosquitto: bool) -> StackOptions {
    StackOptions {
        mosquitto_acl: mosquitto,
        ..StackOptions::default()
    }
}

fn agent() -> AgentOptions {
    AgentOptions {
        part_size_mib: 5,
        // Hashed before the session, so a stored copy can answer (deduplication).
        hash_first_max_mib: 64,
        ..AgentOptions::default()
    }
}

/// Device `dev` on the stack's broker, logged in as its agent would be.
async fn connect(stack: &Stack, dev: &Device) -> MqttDevice {
    let login = match &dev.mqtt_password {
        Some(password) => MqttLogin::user(&dev.id, password),
        None => MqttLogin::derived(&dev.id, &dev.key),
    };
    let mut client = MqttDevice::connect_with(stack.mqtt_port, &login)
        .await
        .unwrap_or_else(|e| panic!("{} cannot connect: {e:?}", dev.id));
    client
        .subscribe(&topics::topic(&dev.id, Channel::Res))
        .await;
    client
        .wait_bridge_ready(&dev.id, &dev.key, Duration::from_secs(30))
        .await;
    client
}

/// Sends a signed request over MQTT and returns the bridge's answer.
async fn request(client: &mut MqttDevice, dev: &Device, op: &str, body: Value) -> ResponseEnvelope {
    let env = signed(&dev.key, &dev.id, op, &body);
    client.publish_request(&dev.id, &env).await;
    client
        .response(
            &topics::topic(&dev.id, Channel::Res),
            &env.request_id,
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|| panic!("no answer to {op} within 30 s"))
}

fn result(answer: &ResponseEnvelope, op: &str) -> Value {
    assert!(
        (200..300).contains(&answer.status),
        "{op}: {} {:?}",
        answer.status,
        answer.problem
    );
    answer.result.clone().unwrap_or(Value::Null)
}

fn md5_b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(bytes))
}

/// SHA-256 of the object a session points at, downloaded from storage.
async fn stored_sha256(stack: &Stack, session: &Value) -> String {
    let bucket = session["bucket"].as_str().expect("bucket");
    let key = session["object_key"].as_str().expect("object_key");
    let dest = stack.dir.path().join(uplink_e2e::unique("download"));
    assert_eq!(
        s3_download(&stack.env, bucket, key, &dest).await,
        200,
        "GET {key}"
    );
    let (sha, _) = sha256_file(&dest);
    std::fs::remove_file(&dest).ok();
    sha
}

/// Device B uploads X's bytes under Y's digest; completes. Returns B's session.
async fn upload_x_claiming_y(stack: &Stack, b: &Device, x: &[u8], y: &SourceFile) -> Value {
    let mut client = connect(stack, b).await;
    let created = request(
        &mut client,
        b,
        "session.create",
        json!({"job_id": uuid::Uuid::new_v4(), "file_name": "y.bin", "size": SIZE,
               "sha256": y.sha256, "part_size": PART}),
    )
    .await;
    assert_eq!(created.status, 201, "create: {:?}", created.problem);
    let session = result(&created, "session.create");
    let sid = session["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();
    let chunks: Vec<&[u8]> = x.chunks(PART as usize).collect();
    let parts: Vec<Value> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"number": i + 1, "md5": md5_b64(c)}))
        .collect();
    let presigned = request(
        &mut client,
        b,
        "parts.presign",
        json!({"session_id": sid, "parts": parts}),
    )
    .await;
    let presigned = result(&presigned, "parts.presign");
    let http = reqwest::Client::new();
    for (part, chunk) in presigned["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .zip(&chunks)
    {
        let mut put = http.put(part["url"].as_str().expect("url"));
        // Headers signed into the URL: a list of [name, value] pairs.
        for pair in part["headers"].as_array().expect("headers") {
            let (k, v) = (pair[0].as_str(), pair[1].as_str());
            put = put.header(k.expect("header name"), v.expect("header value"));
        }
        let resp = put.body(chunk.to_vec()).send().await.expect("PUT part");
        assert!(resp.status().is_success(), "PUT part: {}", resp.status());
    }
    let completed = request(
        &mut client,
        b,
        "session.complete",
        json!({"session_id": sid}),
    )
    .await;
    let completed = result(&completed, "session.complete");
    assert_eq!(completed["state"], "completed", "{completed}");
    client.disconnect().await;
    stack.session(&sid).await
}

async fn false_digest_is_never_a_dedupe_source(mosquitto: bool) {
    let stack = Stack::start(stack_options(mosquitto)).await;
    let a = stack.add_device(&agent()).await;
    let b = stack.register_device().await;
    let y = stack.source_file(&a, "rec/y.bin", SIZE).await;
    let x: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    let x_sha = hex::encode(Sha256::digest(&x));
    assert_ne!(x_sha, y.sha256);

    let forged = upload_x_claiming_y(&stack, &b, &x, &y).await;
    let forged_id = forged["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();

    // The real agent uploads Y at once, before or while B's object is checked: sent and
    // stored intact, whatever the check's progress.
    let sent_before = stack.proxy.bytes_sent();
    let first = stack
        .upload_and_verify(&a, &y, Duration::from_secs(240))
        .await;
    assert_eq!(first["deduplicated_from"], Value::Null, "{first}");
    assert!(
        stack.proxy.bytes_sent() - sent_before >= SIZE,
        "Y's bytes must go to storage"
    );

    // The check finds X's digest in B's object.
    let forged = stack.wait_digest_checked(&forged_id).await;
    assert_eq!(forged["digest_check"], "mismatch", "{forged}");
    assert_eq!(forged["stored_sha256"], x_sha.as_str(), "{forged}");
    assert_eq!(stored_sha256(&stack, &forged).await, x_sha);
    let events = stack.audit(&forged_id).await;
    assert!(
        events
            .iter()
            .any(|e| e["action"] == "session.digest_mismatch"
                && e["detail"]["claimed_sha256"] == y.sha256.as_str()
                && e["detail"]["stored_sha256"] == x_sha.as_str()),
        "no session.digest_mismatch event: {events:?}"
    );
    let first_id = first["session_id"].as_str().expect("session_id");
    let first = stack.wait_digest_checked(first_id).await;
    assert_eq!(first["digest_check"], "verified", "{first}");

    // Y again, now that both are checked: deduplicated from A's verified object, never B's.
    let copy = a.root.join("rec/y-again.bin");
    std::fs::copy(&y.path, &copy).expect("copy");
    let command_id = stack
        .upload_command(&a.id, copy.to_str().expect("utf-8"))
        .await;
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(120))
        .await;
    assert_eq!(cmd["state"], "done", "{cmd}");
    let again = stack
        .session(cmd["session_id"].as_str().expect("session_id"))
        .await;
    assert_eq!(again["deduplicated_from"], first_id, "{again}");
    assert_ne!(again["object_key"], forged["object_key"], "{again}");
    assert_eq!(stored_sha256(&stack, &again).await, y.sha256);
    // Every session that says Y holds Y.
    for s in stack.sessions(&a.id).await {
        assert_eq!(stored_sha256(&stack, &s).await, y.sha256, "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn false_digest_is_never_a_dedupe_source_embedded_broker() {
    false_digest_is_never_a_dedupe_source(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn false_digest_is_never_a_dedupe_source_mosquitto() {
    false_digest_is_never_a_dedupe_source(true).await;
}

async fn another_devices_command_is_not_found(mosquitto: bool) {
    let stack = Stack::start(stack_options(mosquitto)).await;
    let a = stack.register_device().await;
    let b = stack.register_device().await;
    // A command for A (A is offline: it stays pending).
    let command_id = stack.upload_command(&a.id, "/data/rec/run.mcap").await;

    let mut client = connect(&stack, &b).await;
    let answer = request(
        &mut client,
        &b,
        "session.create",
        json!({"job_id": command_id, "command_id": command_id, "file_name": "run.mcap",
               "size": 1024, "sha256": "a".repeat(64), "part_size": PART}),
    )
    .await;
    assert_eq!(answer.status, 404, "{answer:?}");
    let problem = answer.problem.expect("a problem document");
    assert_eq!(problem.code, "command_not_found", "{problem:?}");
    assert!(answer.sig.is_some(), "the API's answer is signed");
    assert!(stack.sessions(&b.id).await.is_empty());
    let cmd = stack.command(&command_id).await;
    assert_eq!(cmd["session_id"], Value::Null, "{cmd}");
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_devices_command_is_not_found_embedded_broker() {
    another_devices_command_is_not_found(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_devices_command_is_not_found_mosquitto() {
    another_devices_command_is_not_found(true).await;
}
