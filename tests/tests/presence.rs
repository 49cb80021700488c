//! Presence is signed by the device, and on the embedded broker another registered device
//! cannot publish on a device's `status` topic (the gate closes its connection; the API
//! would refuse the forgery too), while the device's own Last Will still takes it offline.

use std::time::Duration;

use serde_json::json;
use uplink_e2e::{AgentOptions, MqttDevice, Service, Stack, StackOptions};
use uplink_protocol::telemetry::Status;
use uplink_protocol::topics::{self, Channel};

/// Waits until the API shows `device_id` online (or offline); panics after 30 s.
async fn wait_presence(stack: &Stack, device_id: &str, online: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let dev = stack.get_json(&format!("/v1/devices/{device_id}")).await;
        if dev.body["online"] == online {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{device_id} not online={online} after 30 s: {dev}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_device_cannot_set_a_devices_presence() {
    let stack = Stack::start(StackOptions::default()).await;
    let b = stack.add_device(&AgentOptions::default()).await;
    wait_presence(&stack, &b.id, true).await;

    // A, a registered device, publishes retained `offline` statuses on B's topic: one
    // unsigned, one signed with A's own key, both claiming to be the newest.
    let a = stack.register_device().await;
    let spy = MqttDevice::connect(stack.mqtt_port, &a.id, &a.key).await;
    let later = uplink_protocol::unix_now() * 1000 + 3_600_000;
    let unsigned: Status =
        serde_json::from_value(json!({"v": 1, "state": "offline", "ts_ms": later}))
            .expect("status");
    let signed_by_a = unsigned.clone().signed(&a.key, &b.id);
    for forged in [&unsigned, &signed_by_a] {
        spy.client
            .publish(
                topics::topic(&b.id, Channel::Status),
                rumqttc::QoS::AtLeastOnce,
                true,
                serde_json::to_vec(forged).expect("json"),
            )
            .await
            .expect("queue publish");
    }
    // The gate closes A's connection at the first one; neither reaches the bridge.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let why = format!("PUBLISH on {}", topics::topic(&b.id, Channel::Status));
    while !stack.log_of(Service::Bridge).contains(&why) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bridge never closed A's connection for its publish on B's status"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dev = stack.get_json(&format!("/v1/devices/{}", b.id)).await;
    assert_eq!(
        dev.body["online"], true,
        "a forged status took B offline: {dev}"
    );

    // B's own Last Will (signed when it connected) still takes it offline when its agent
    // dies, and its next connection brings it back.
    stack.kill_agent(&b);
    wait_presence(&stack, &b.id, false).await;
    stack.restart_agent(&b);
    wait_presence(&stack, &b.id, true).await;
    stack.assert_alive();
}
