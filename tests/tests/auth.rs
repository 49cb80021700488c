//! Device requests are checked against the registered key of the device they claim to come
//! from, and a device can touch only its own sessions.

use std::time::Duration;

use serde_json::{json, Value};
use uplink_e2e::device::signed;
use uplink_e2e::{Device, MqttDevice, Reply, Stack, StackOptions, MIB};
use uplink_protocol::envelope::RequestEnvelope;
use uplink_protocol::topics::{self, Channel};

fn create_body() -> Value {
    json!({
        "job_id": uuid::Uuid::new_v4(),
        "file_name": "mine.bin",
        "size": 6 * MIB,
        "sha256": "cd".repeat(32),
        "part_size": 5 * MIB,
    })
}

fn assert_refused(reply: &Reply, allowed: &[u16], what: &str) {
    assert!(
        allowed.contains(&reply.status),
        "{what}: expected one of {allowed:?}, got {reply}"
    );
    assert!(
        reply.is_problem(),
        "{what}: refusal must be a problem document: {reply}"
    );
}

async fn assert_no_sessions(stack: &Stack, dev: &Device) {
    let sessions = stack.sessions(&dev.id).await;
    assert!(
        sessions.is_empty(),
        "{} must have no session: {sessions:?}",
        dev.id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_signed_by_another_devices_key_is_refused() {
    let stack = Stack::start(StackOptions::default()).await;
    let a = stack.register_device().await;
    let b = stack.register_device().await;

    // Over HTTP: claims to be A, signed with B's key.
    let forged = signed(&b.key, &a.id, "session.create", &create_body());
    let reply = stack.device_http.send(&a.id, &forged).await;
    assert_refused(&reply, &[401, 403], "session.create as A signed by B");

    // A body changed after signing.
    let mut tampered = signed(&a.key, &a.id, "session.create", &create_body());
    tampered.body = create_body().to_string();
    let reply = stack.device_http.send(&a.id, &tampered).await;
    assert_refused(
        &reply,
        &[401, 403],
        "session.create with a body changed after signing",
    );

    // Over MQTT: B, connected with its own credentials, publishes on A's req topic an
    // envelope signed with B's key (the embedded broker's gate closes B's connection at
    // that publish: it never reaches the bridge; rogue_device.rs checks that part).
    let mut mqtt = MqttDevice::connect(stack.mqtt_port, &b.id, &b.key).await;
    let a_res = topics::topic(&a.id, Channel::Res);
    mqtt.subscribe(&topics::topic(&b.id, Channel::Res)).await;
    mqtt.wait_bridge_ready(&b.id, &b.key, Duration::from_secs(30))
        .await;
    let forged = signed(&b.key, &a.id, "session.create", &create_body());
    mqtt.publish_request(&a.id, &forged).await;
    match mqtt
        .response(&a_res, &forged.request_id, Duration::from_secs(10))
        .await
    {
        Some(res) => {
            assert!(
                matches!(res.status, 401 | 403) && res.problem.is_some(),
                "forged session.create over MQTT must be answered 401/403 with a problem: {res:?}"
            );
        }
        None => eprintln!("forged MQTT request got no answer (dropped): also a refusal"),
    }

    assert_no_sessions(&stack, &a).await;
    assert_no_sessions(&stack, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_cannot_touch_another_devices_session() {
    let stack = Stack::start(StackOptions::default()).await;
    let a = stack.register_device().await;
    let b = stack.register_device().await;

    let created = stack
        .device_http
        .call(&a.id, &a.key, "session.create", &create_body())
        .await;
    assert!(created.is_success(), "A's session.create: {created}");
    let session_id = created.body["session_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no session_id: {created}"))
        .to_string();
    let before = stack.session(&session_id).await;

    let target = json!({ "session_id": session_id });
    for op in ["session.status", "session.abort", "session.complete"] {
        let reply = stack.device_http.call(&b.id, &b.key, op, &target).await;
        assert_refused(&reply, &[403, 404], &format!("B's {op} on A's session"));
    }
    let presign = json!({
        "session_id": session_id,
        "parts": [{ "number": 1, "md5": "1B2M2Y8AsgTpgAmY7PhCfg==" }],
    });
    let reply = stack
        .device_http
        .call(&b.id, &b.key, "parts.presign", &presign)
        .await;
    assert_refused(&reply, &[403, 404], "B's parts.presign on A's session");

    let after = stack.session(&session_id).await;
    assert_eq!(
        after["state"], before["state"],
        "A's session state changed: {after}"
    );
    assert_eq!(after["state"], "created", "A's session: {after}");
    assert_eq!(after["device_id"].as_str(), Some(a.id.as_str()));
    assert_no_sessions(&stack, &b).await;

    // A still owns it.
    let status = stack
        .device_http
        .call(&a.id, &a.key, "session.status", &target)
        .await;
    assert!(status.is_success(), "A's session.status: {status}");
    assert_eq!(status.body["state"], "created", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outside_the_replay_window_are_refused() {
    let stack = Stack::start(StackOptions::default()).await;
    let a = stack.register_device().await;
    for skew in [-3600i64, 3600] {
        let env = RequestEnvelope::sign(
            &a.key,
            &a.id,
            "session.create",
            &uplink_e2e::unique("req"),
            uplink_protocol::unix_now() + skew,
            create_body().to_string(),
        );
        let reply = stack.device_http.send(&a.id, &env).await;
        assert_refused(
            &reply,
            &[401, 403],
            &format!("request signed {skew} s from now"),
        );
    }
    // An unknown device.
    let stranger = uplink_protocol::sign::generate();
    let env = signed(&stranger, "robot-nobody", "session.create", &create_body());
    let reply = stack.device_http.send("robot-nobody", &env).await;
    assert_refused(
        &reply,
        &[401, 403, 404],
        "request from an unregistered device",
    );
    assert_no_sessions(&stack, &a).await;
}
