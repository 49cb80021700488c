//! What the bridge does with requests it cannot forward: unknown ops are answered with a
//! problem on `res`; garbage is dropped without harming later requests.

use std::time::Duration;

use serde_json::json;
use uplink_e2e::device::signed;
use uplink_e2e::{MqttDevice, Stack, StackOptions};
use uplink_protocol::topics::{self, Channel};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ops_get_a_problem_and_garbage_is_dropped() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.register_device().await;
    let mut mqtt = MqttDevice::connect(stack.mqtt_port, &dev.id, &dev.key).await;
    let res = topics::topic(&dev.id, Channel::Res);
    let req = topics::topic(&dev.id, Channel::Req);
    mqtt.subscribe(&res).await;
    mqtt.wait_bridge_ready(&dev.id, &dev.key, Duration::from_secs(30))
        .await;

    // A signed request for an op that does not exist.
    let unknown = signed(&dev.key, &dev.id, "session.delete", &json!({}));
    mqtt.publish_request(&dev.id, &unknown).await;
    let answer = mqtt
        .response(&res, &unknown.request_id, Duration::from_secs(15))
        .await
        .expect("an unknown op with a readable request_id must be answered on res");
    assert!(
        (400..500).contains(&answer.status) && answer.problem.is_some(),
        "unknown op: {answer:?}"
    );

    // Not JSON, JSON without a request id: dropped. (Payloads over the broker's limit are
    // the broker's business: rumqttd disconnects the client.)
    mqtt.publish(&req, b"not json at all".to_vec()).await;
    mqtt.publish(&req, br#"{"v":1,"op":"session.status"}"#.to_vec())
        .await;

    // The bridge still serves requests.
    let ok = signed(
        &dev.key,
        &dev.id,
        "session.status",
        &json!({ "session_id": uuid::Uuid::new_v4() }),
    );
    mqtt.publish_request(&dev.id, &ok).await;
    let answer = mqtt
        .response(&res, &ok.request_id, Duration::from_secs(15))
        .await
        .expect("the bridge stopped answering after garbage input");
    assert_eq!(
        answer.status, 404,
        "status of an unknown session: {answer:?}"
    );
    stack.assert_alive();
}
