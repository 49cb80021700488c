//! Devices kept apart on Mosquitto: the set-up of docs/security.md ("Running with
//! Mosquitto": no anonymous clients, a password file made with `mosquitto_passwd`,
//! per-device topic ACLs), with the real bridge, agent and control API.
//!
//! - A real upload command to a device still completes end to end through the broker.
//! - A client logged in as device A receives nothing of device B (commands, answers with
//!   presigned URLs, requests, status), even subscribed to `#`, while B uploads.
//! - What A publishes on another device's topics reaches nobody: a request on B's `req`
//!   (validly signed with B's key, so only the ACL can stop it) creates no session, a
//!   forged `offline` status does not take B offline, a forged answer or command on C's
//!   `res` / `cmd` never reaches C's client.
//! - A asking for B's client id does not disconnect B's agent.
//! - Anonymous clients, wrong and unknown passwords and the key-derived password (which
//!   Mosquitto cannot check) are refused at CONNECT.

use std::time::Duration;

use rumqttc::ConnectReturnCode;
use serde_json::json;
use uplink_e2e::device::signed;
use uplink_e2e::stack::{MOSQUITTO_ACL, MOSQUITTO_CONF};
use uplink_e2e::{
    AgentOptions, ConnectFailure, Device, MqttDevice, MqttLogin, Stack, StackOptions, MIB,
};
use uplink_protocol::envelope::ResponseEnvelope;
use uplink_protocol::topics::{self, Channel};

fn acl_stack() -> StackOptions {
    StackOptions {
        mosquitto_acl: true,
        ..StackOptions::default()
    }
}

fn password(dev: &Device) -> String {
    dev.mqtt_password
        .clone()
        .expect("mosquitto_acl stacks give every device a password")
}

/// `GET /v1/devices/{id}` → `online`.
async fn online(stack: &Stack, id: &str) -> bool {
    let reply = stack.get_json(&format!("/v1/devices/{id}")).await;
    assert_eq!(reply.status, 200, "GET /v1/devices/{id}: {reply}");
    reply.body["online"]
        .as_bool()
        .unwrap_or_else(|| panic!("no `online` in {reply}"))
}

async fn wait_online(stack: &Stack, id: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !online(stack, id).await {
        stack.assert_alive();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} not online within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn count(path: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// The files the docs tell operators to install are the ones these tests run.
#[test]
fn the_documented_mosquitto_files_are_the_tested_ones() {
    let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md");
    let doc = std::fs::read_to_string(doc_path).expect("read docs/security.md");
    for (name, text) in [
        ("configs/mosquitto/uplink.conf", MOSQUITTO_CONF),
        ("configs/mosquitto/uplink.acl", MOSQUITTO_ACL),
        (
            "configs/mosquitto/uplink-dynsec.conf",
            uplink_e2e::stack::MOSQUITTO_DYNSEC_CONF,
        ),
    ] {
        assert!(
            doc.contains(text),
            "docs/security.md must show {name} exactly as it is in the repository"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_needs_a_provisioned_account() {
    let stack = Stack::start(acl_stack()).await;
    let a = stack.register_device().await;
    let b = stack.register_device().await;
    let port = stack.mqtt_port;

    // The control: A's own account is accepted.
    MqttDevice::connect_with(port, &MqttLogin::user(&a.id, &password(&a)))
        .await
        .unwrap_or_else(|e| panic!("A's provisioned login must be accepted: {e:?}"))
        .disconnect()
        .await;

    let cases = [
        (
            "anonymous (no username)",
            MqttLogin {
                client_id: uplink_e2e::unique("anonymous"),
                username: None,
                password: None,
                tls: None,
            },
        ),
        (
            "A with a wrong password",
            MqttLogin::user(&a.id, &format!("{}-wrong", password(&a))),
        ),
        ("A with B's password", MqttLogin::user(&a.id, &password(&b))),
        (
            "an unknown username",
            MqttLogin::user(&uplink_e2e::unique("robot"), &password(&a)),
        ),
        (
            "A with the key-derived password (the agent's default)",
            MqttLogin::derived(&a.id, &a.key),
        ),
    ];
    for (what, login) in cases {
        match MqttDevice::connect_with(port, &login).await {
            Ok(_) => panic!("{what}: the broker accepted the CONNECT"),
            Err(ConnectFailure::Refused(code)) => assert!(
                matches!(
                    code,
                    ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword
                ),
                "{what}: refused with {code:?}, expected not authorised / bad username or password"
            ),
            Err(ConnectFailure::Failed(e)) => {
                panic!("{what}: expected a CONNACK refusal, got: {e}")
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_kept_apart_and_uploads_still_work() {
    let stack = Stack::start(acl_stack()).await;
    // B: a real agent, the one that is spied on and impersonated.
    let b = stack.add_device(&AgentOptions::default()).await;
    // A: the attacker, a registered device with its own broker account, as a raw client.
    let a = stack.register_device().await;
    // C: a third device as a raw client, to see what reaches a device's own topics.
    let c = stack.register_device().await;
    let port = stack.mqtt_port;
    wait_online(&stack, &b.id, Duration::from_secs(60)).await;
    let agent_log = b.dir.join("agent.log");
    let b_disconnects = count(&agent_log, "MQTT connection failed");

    // A logs in with its own account but asks for B's client id: the broker uses A's
    // username as client id instead, so B's connection is not taken over.
    let mut spy = MqttDevice::connect_with(
        port,
        &MqttLogin {
            client_id: b.id.clone(),
            username: Some(a.id.clone()),
            password: Some(password(&a)),
            tls: None,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("A logs in with its own account: {e:?}"));
    for channel in [
        Channel::Cmd,
        Channel::Res,
        Channel::Req,
        Channel::CmdAck,
        Channel::Progress,
        Channel::Status,
    ] {
        spy.subscribe(&topics::topic(&b.id, channel)).await;
    }
    for filter in ["uplink/v1/devices/+/res", "uplink/v1/devices/+/cmd", "#"] {
        spy.subscribe(filter).await;
    }
    // The control for the spy: answers on A's own `res` do reach it.
    spy.wait_bridge_ready(&a.id, &a.key, Duration::from_secs(60))
        .await;

    let mut c_client = MqttDevice::connect_with(port, &MqttLogin::user(&c.id, &password(&c)))
        .await
        .unwrap_or_else(|e| panic!("C logs in: {e:?}"));
    c_client
        .subscribe(&topics::topic(&c.id, Channel::Res))
        .await;
    c_client
        .subscribe(&topics::topic(&c.id, Channel::Cmd))
        .await;
    // The control for C: the bridge's answers on C's `res` reach it.
    c_client
        .wait_bridge_ready(&c.id, &c.key, Duration::from_secs(60))
        .await;

    // --- A publishes on other devices' topics.
    // A request on B's `req`, validly signed with B's key (a signature cannot stop it: only
    // the ACL can). Had the bridge seen it, B would have a session for this job.
    let forged_job = uuid::Uuid::new_v4();
    let forged_request = signed(
        &b.key,
        &b.id,
        "session.create",
        &json!({
            "job_id": forged_job,
            "file_name": "forged.bin",
            "size": 6 * MIB,
            "sha256": "ef".repeat(32),
            "part_size": 5 * MIB,
        }),
    );
    spy.publish_request(&b.id, &forged_request).await;
    // A retained `offline` on B's `status` (unsigned: the API would refuse it too; the ACL
    // stops it first).
    spy.client
        .publish(
            topics::topic(&b.id, Channel::Status),
            rumqttc::QoS::AtLeastOnce,
            true,
            br#"{"v":1,"state":"offline"}"#.to_vec(),
        )
        .await
        .expect("queue publish");
    // A forged answer on C's `res` (unsigned: C's agent would drop it too; the ACL stops it
    // first).
    let forged_answer = ResponseEnvelope::ok(
        "forged-answer",
        200,
        json!({"session_id": uuid::Uuid::new_v4(), "parts": []}),
    );
    spy.publish(
        &topics::topic(&c.id, Channel::Res),
        serde_json::to_vec(&forged_answer).expect("serialise"),
    )
    .await;
    spy.publish(
        &topics::topic(&c.id, Channel::Cmd),
        br#"{"v":1,"command":"{}","sig":"forged"}"#.to_vec(),
    )
    .await;

    // A round trip on A's own topics after its forgeries: had the broker passed them on,
    // the bridge would have them by now (it gets one connection's messages in order).
    spy.wait_bridge_ready(&a.id, &a.key, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let forged_sessions = |sessions: &[serde_json::Value]| {
        sessions
            .iter()
            .filter(|s| s["job_id"] == forged_job.to_string())
            .count()
    };
    let sessions = stack.sessions(&b.id).await;
    assert_eq!(
        forged_sessions(&sessions),
        0,
        "the request A published on B's req topic reached the bridge: {sessions:?}"
    );
    assert!(
        online(&stack, &b.id).await,
        "B went offline: the `offline` status A published on B's topic was delivered"
    );
    let at_c = c_client.collect(Duration::from_secs(1)).await;
    let forged_at_c: Vec<&String> = at_c
        .publishes
        .iter()
        .filter(|(topic, payload)| {
            *topic == topics::topic(&c.id, Channel::Cmd)
                || serde_json::from_slice::<ResponseEnvelope>(payload)
                    .is_ok_and(|r| r.request_id == forged_answer.request_id)
        })
        .map(|(topic, _)| topic)
        .collect();
    assert!(
        forged_at_c.is_empty(),
        "what A published on C's topics reached C: {forged_at_c:?}"
    );

    // --- B uploads for real through the same broker, while A listens.
    let file = stack.source_file(&b, "rec/acl.bin", 6 * MIB).await;
    let session = stack
        .upload_and_verify(&b, &file, Duration::from_secs(240))
        .await;

    // Nothing of any other device reached A (commands, answers, status…), and A was never
    // disconnected.
    let spied = spy.collect(Duration::from_secs(2)).await;
    let own = format!("uplink/v1/devices/{}/", a.id);
    let foreign: Vec<&String> = spied
        .publishes
        .iter()
        .map(|(topic, _)| topic)
        .filter(|topic| !topic.starts_with(&own))
        .collect();
    assert!(
        foreign.is_empty(),
        "a client logged in as {} received other devices' messages: {foreign:?}",
        a.id
    );
    assert!(
        spied.errors.is_empty(),
        "A's connection was interrupted: {:?}",
        spied.errors
    );
    // A asking for B's client id did not take B's connection over, and B stayed online.
    assert_eq!(
        count(&agent_log, "MQTT connection failed"),
        b_disconnects,
        "B's agent lost its broker connection while A was connected"
    );
    assert!(online(&stack, &b.id).await, "B went offline");

    // Still no trace of A's request: B's only session is the upload's.
    let sessions = stack.sessions(&b.id).await;
    assert_eq!(forged_sessions(&sessions), 0, "{sessions:?}");
    assert_eq!(
        sessions.len(),
        1,
        "B has exactly the upload's session: {sessions:?}"
    );
    assert_eq!(sessions[0]["session_id"], session["session_id"]);
    // The control: the same envelope sent straight to the API does create that session,
    // so only the broker kept it from the bridge.
    let direct = stack.device_http.send(&b.id, &forged_request).await;
    assert_eq!(
        direct.status, 201,
        "the envelope A published is a valid request: {direct}"
    );
    assert_eq!(forged_sessions(&stack.sessions(&b.id).await), 1);

    // The broker says why: it denied each of A's four publishes.
    let denied = count(
        &stack.dir.path().join("mosquitto.log"),
        &format!("Denied PUBLISH from {}", a.id),
    );
    assert!(
        denied >= 4,
        "mosquitto.log should show A's 4 publishes on other devices' topics denied, found {denied}"
    );
}
