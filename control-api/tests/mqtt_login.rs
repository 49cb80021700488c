//! Static Mosquitto passwords (`mqtt_password_secret`): given to the operator who registers
//! or changes a device and to the bridge, never in listings or to readers; a key rotation
//! changes the password; without the secret there are none.

mod common;

use common::*;
use uplink_api::config::Secret;

const SECRET: &str = "mqtt-password-secret-0123456789";

/// `GET /v1/bridge/devices`: device id → its mqtt_password.
async fn bridge_passwords(app: &TestApp) -> Vec<(String, Option<String>)> {
    let (status, list) = app
        .bridge(reqwest::Method::GET, "/v1/bridge/devices", None)
        .await;
    assert_eq!(status, 200, "{list}");
    list.as_array()
        .expect("a list")
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().expect("id").to_string(),
                d["mqtt_password"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[tokio::test]
async fn devices_get_a_mosquitto_password_that_follows_their_key() {
    let app = TestApp::spawn_config(|c| c.mqtt_password_secret = Some(Secret::new(SECRET))).await;
    let key = sign::generate();
    let (status, created) = app
        .operator(
            reqwest::Method::POST,
            "/v1/devices",
            Some(json!({"device_id": "robot-m", "public_key": sign::encode_public(&key.verifying_key())})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let first = created["mqtt_password"]
        .as_str()
        .expect("mqtt_password")
        .to_string();
    assert_eq!(first.len(), 43);
    assert_eq!(created["device_id"], "robot-m");
    assert_eq!(
        bridge_passwords(&app).await,
        vec![("robot-m".to_string(), Some(first.clone()))]
    );
    // Readers never see it.
    let (_, one) = app
        .operator(reqwest::Method::GET, "/v1/devices/robot-m", None)
        .await;
    let (_, all) = app
        .operator(reqwest::Method::GET, "/v1/devices", None)
        .await;
    for shown in [&one, &all] {
        assert!(!shown.to_string().contains(&first), "{shown}");
    }
    // Disabling keeps it; a new key changes it.
    let (status, patched) = app
        .operator(
            reqwest::Method::PATCH,
            "/v1/devices/robot-m",
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["mqtt_password"].as_str(), Some(first.as_str()));
    let new_key = sign::generate();
    let (_, rotated) = app
        .operator(
            reqwest::Method::PATCH,
            "/v1/devices/robot-m",
            Some(json!({"public_key": sign::encode_public(&new_key.verifying_key())})),
        )
        .await;
    let second = rotated["mqtt_password"].as_str().expect("mqtt_password");
    assert_ne!(second, first);
    assert_eq!(
        bridge_passwords(&app).await,
        vec![("robot-m".to_string(), Some(second.to_string()))]
    );
}

#[tokio::test]
async fn without_the_secret_there_are_no_mosquitto_passwords() {
    let app = TestApp::spawn().await;
    app.register("robot-n").await;
    assert_eq!(
        bridge_passwords(&app).await,
        vec![("robot-n".to_string(), None)]
    );
}
