//! Mosquitto accounts from the registry: with `[broker] dynamic_security` the bridge keeps
//! Mosquitto's dynamic-security plugin (the real one Debian ships) in step with the API.
//! No password file and no ACL file exist: a registered device can log in with the
//! password the API gave its operator and upload; a key rotation gives it a new password
//! and the old one stops working; a disabled device is disconnected and refused, and
//! enabled again it logs in.

use std::time::Duration;

use serde_json::json;
use uplink_e2e::{AgentOptions, MqttDevice, MqttLogin, Stack, StackOptions, MIB};

/// Waits (at most 20 s) until Mosquitto refuses `user` with `password`.
async fn wait_refused(stack: &Stack, user: &str, password: &str, why: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while MqttDevice::connect_with(stack.mqtt_port, &MqttLogin::user(user, password))
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{why}: still accepted after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_accounts_follow_the_registry() {
    let stack = Stack::start(StackOptions {
        mosquitto_dynsec: true,
        ..StackOptions::default()
    })
    .await;
    for hand_kept in ["mosquitto.passwd", "uplink.acl"] {
        assert!(!stack.dir.path().join(hand_kept).exists(), "{hand_kept}");
    }

    // Registered, then at once an account: its agent uploads with the password the API
    // gave at registration (read from `[mqtt] password_file`).
    let a = stack.add_device(&AgentOptions::default()).await;
    let file = stack.source_file(&a, "rec/dynsec.bin", 6 * MIB).await;
    stack
        .upload_and_verify(&a, &file, Duration::from_secs(240))
        .await;

    // A rotated key: a new password, and the old one stops working.
    let b = stack.register_device().await;
    let old = b.mqtt_password.clone().expect("a password from the API");
    let new_key = uplink_protocol::sign::generate();
    let rotated = stack
        .operator(
            reqwest::Method::PATCH,
            &format!("/v1/devices/{}", b.id),
            Some(json!({"public_key": uplink_protocol::sign::encode_public(&new_key.verifying_key())})),
        )
        .await;
    assert_eq!(rotated.status, 200, "{rotated}");
    let new = rotated.body["mqtt_password"]
        .as_str()
        .expect("the new password")
        .to_string();
    assert_ne!(new, old);
    stack.wait_mosquitto_login(&b.id, &new).await;
    wait_refused(&stack, &b.id, &old, "the password of the old key").await;

    // Disabled: its open connection is closed and it cannot log in; enabled: it can.
    let mut open = MqttDevice::connect_with(stack.mqtt_port, &MqttLogin::user(&b.id, &new))
        .await
        .unwrap_or_else(|e| panic!("B logs in: {e:?}"));
    let set_enabled = |enabled: bool| {
        let (stack, id) = (&stack, &b.id);
        async move {
            let reply = stack
                .operator(
                    reqwest::Method::PATCH,
                    &format!("/v1/devices/{id}"),
                    Some(json!({ "enabled": enabled })),
                )
                .await;
            assert_eq!(reply.status, 200, "{reply}");
        }
    };
    set_enabled(false).await;
    let after = open.collect(Duration::from_secs(10)).await;
    assert!(
        !after.errors.is_empty(),
        "a disabled device's connection stayed open 10 s"
    );
    wait_refused(&stack, &b.id, &new, "a disabled device").await;
    set_enabled(true).await;
    stack.wait_mosquitto_login(&b.id, &new).await;

    // The bridge logged what it did, and A was never disturbed.
    assert!(stack
        .log_of(uplink_e2e::Service::Bridge)
        .contains("Mosquitto accounts brought in step with the registry"));
    stack.assert_alive();
}
