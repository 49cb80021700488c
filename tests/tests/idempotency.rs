//! One request delivered twice gives one session: over MQTT (the same signed envelope
//! published twice, as a QoS 1 re-delivery would) and over the device HTTP API.

use std::time::Duration;

use serde_json::{json, Value};
use uplink_e2e::device::signed;
use uplink_e2e::{MqttDevice, Stack, StackOptions, MIB};
use uplink_protocol::topics::{self, Channel};

fn create_body() -> Value {
    json!({
        "job_id": uuid::Uuid::new_v4(),
        "file_name": "twice.bin",
        "size": 6 * MIB,
        "sha256": "ab".repeat(32),
        "part_size": 5 * MIB,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_create_published_twice_gives_one_session() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.register_device().await;
    let mut mqtt = MqttDevice::connect(stack.mqtt_port, &dev.id, &dev.key).await;
    let res_topic = topics::topic(&dev.id, Channel::Res);
    mqtt.subscribe(&res_topic).await;
    mqtt.wait_bridge_ready(&dev.id, &dev.key, Duration::from_secs(30))
        .await;

    let env = signed(&dev.key, &dev.id, "session.create", &create_body());
    mqtt.publish_request(&dev.id, &env).await;
    mqtt.publish_request(&dev.id, &env).await;

    let mut session_ids = Vec::new();
    for n in 1..=2 {
        let res = mqtt
            .response(&res_topic, &env.request_id, Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("answer {n} of 2 to {} never came on res", env.request_id));
        assert!(
            (200..300).contains(&res.status),
            "answer {n} to session.create: {res:?}"
        );
        let result = res.result.expect("a 2xx answer carries a result");
        session_ids.push(
            result["session_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no session_id in {result}"))
                .to_string(),
        );
    }
    assert_eq!(
        session_ids[0], session_ids[1],
        "both answers must name the same session"
    );
    let sessions = stack.sessions(&dev.id).await;
    assert_eq!(sessions.len(), 1, "exactly one session: {sessions:?}");
    assert_eq!(
        sessions[0]["session_id"].as_str(),
        Some(session_ids[0].as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_create_sent_twice_over_http_gives_one_session() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.register_device().await;
    let env = signed(&dev.key, &dev.id, "session.create", &create_body());

    let first = stack.device_http.send(&dev.id, &env).await;
    assert!(first.is_success(), "first session.create: {first}");
    let second = stack.device_http.send(&dev.id, &env).await;
    assert!(second.is_success(), "same session.create again: {second}");
    assert_eq!(
        first.body["session_id"], second.body["session_id"],
        "the same request must get the same session: {first} / {second}"
    );
    assert!(first.body["session_id"].is_string(), "{first}");

    // Same Idempotency-Key with another body: refused with 422, nothing created.
    let other = uplink_protocol::envelope::RequestEnvelope::sign(
        &dev.key,
        &dev.id,
        "session.create",
        &env.request_id,
        uplink_protocol::unix_now(),
        create_body().to_string(),
    );
    let reused = stack.device_http.send(&dev.id, &other).await;
    assert_eq!(reused.status, 422, "same key, different body: {reused}");
    assert!(
        reused.is_problem(),
        "422 must be a problem document: {reused}"
    );

    let sessions = stack.sessions(&dev.id).await;
    assert_eq!(sessions.len(), 1, "exactly one session: {sessions:?}");
}
