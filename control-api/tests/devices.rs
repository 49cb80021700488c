//! Devices and their commands through the API: commands from the operator through the
//! bridge's claim and publish to the device's acks (states only move forward), MQTT logins
//! checked for the embedded broker (password or certificate) and device registration,
//! disabling a device and rotating its key.

mod common;

use common::*;
#[tokio::test]
async fn commands_flow_through_the_bridge_api() {
    let app = TestApp::spawn().await;
    let key = app.register("robot-c").await;
    let other = app.register("robot-c2").await;

    let (status, p) = app
        .call(reqwest::Method::GET, "/v1/sessions", None, "wrong-token")
        .await;
    assert_eq!((status, p["code"].as_str()), (401, Some("unauthorized")));
    let (status, _) = app
        .call(
            reqwest::Method::GET,
            "/v1/bridge/commands/due",
            None,
            OPERATOR,
        )
        .await;
    assert_eq!(
        status, 401,
        "the operator token must not open the bridge API"
    );

    let (status, cmd) = app
        .operator(
            reqwest::Method::POST,
            "/v1/devices/robot-c/commands",
            Some(json!({"type": "upload", "path": "/data/run.mcap"})),
        )
        .await;
    assert_eq!(status, 201, "{cmd}");
    assert_eq!(cmd["state"], "pending");
    let cid = cmd["command_id"].as_str().expect("id").to_string();

    // Not due while the device is offline.
    let (_, due) = app
        .bridge(reqwest::Method::GET, "/v1/bridge/commands/due", None)
        .await;
    assert!(due.as_array().expect("list").is_empty());
    // Presence must be signed by the device, and newer than what the API has.
    let presence = |state: &str, ts_ms: i64, signer: &PrivateKey| {
        let s: uplink_protocol::telemetry::Status =
            serde_json::from_value(json!({"v": 1, "state": state, "ts_ms": ts_ms}))
                .expect("status");
        serde_json::to_value(s.signed(signer, "robot-c")).expect("json")
    };
    let put = |body: Value| {
        app.bridge(
            reqwest::Method::PUT,
            "/v1/bridge/devices/robot-c/presence",
            Some(body),
        )
    };
    let t1 = unix_now() * 1000 - 10_000;
    let (status, p) = put(json!({"v": 1, "state": "online", "ts_ms": t1})).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (401, Some("bad_signature")),
        "unsigned"
    );
    let (status, p) = put(presence("online", t1, &other)).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (401, Some("bad_signature")),
        "another device's key"
    );
    let (status, _) = put(presence("online", t1, &key)).await;
    assert_eq!(status, 204);
    let (_, dev) = app
        .operator(reqwest::Method::GET, "/v1/devices/robot-c", None)
        .await;
    assert_eq!(dev["online"], true);
    // The connection's Last Will (same ts) takes it offline; a replay of an older one
    // cannot, once the device is back.
    let (status, _) = put(presence("offline", t1, &key)).await;
    assert_eq!(status, 204);
    let (status, _) = put(presence("online", t1 + 5000, &key)).await;
    assert_eq!(status, 204);
    let (status, p) = put(presence("offline", t1, &key)).await;
    assert_eq!((status, p["code"].as_str()), (409, Some("stale_status")));
    let (_, dev) = app
        .operator(reqwest::Method::GET, "/v1/devices/robot-c", None)
        .await;
    assert_eq!(dev["online"], true, "{dev}");
    let (_, due) = app
        .bridge(reqwest::Method::GET, "/v1/bridge/commands/due", None)
        .await;
    assert_eq!(due[0]["command_id"], cid.as_str());
    // The envelope verifies with the API's published command key.
    let (_, ck) = app
        .call(reqwest::Method::GET, "/v1/command-key", None, "")
        .await;
    let public = sign::decode_public(ck["public_key"].as_str().expect("key")).expect("key");
    let envelope: uplink_protocol::envelope::CommandEnvelope =
        serde_json::from_value(due[0]["envelope"].clone()).expect("envelope");
    let opened = envelope
        .open(&public, "robot-c", unix_now())
        .expect("valid command");
    assert_eq!(opened.command_id.to_string(), cid);

    let (status, _) = app
        .bridge(
            reqwest::Method::POST,
            &format!("/v1/bridge/commands/{cid}/published"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (_, due) = app
        .bridge(reqwest::Method::GET, "/v1/bridge/commands/due", None)
        .await;
    assert!(
        due.as_array().expect("list").is_empty(),
        "published commands wait before re-sending"
    );
    // Reconnecting makes unacknowledged commands due again at once.
    let (status, _) = put(presence("online", t1 + 9000, &key)).await;
    assert_eq!(status, 204);
    let (_, due) = app
        .bridge(reqwest::Method::GET, "/v1/bridge/commands/due", None)
        .await;
    assert_eq!(due.as_array().expect("list").len(), 1);

    // Another device cannot ack it.
    let ack = json!({"command_id": cid, "state": "done"});
    let (status, _) = app
        .device(&other, "robot-c2", "command.ack", &rid(), &ack)
        .await;
    assert_eq!(status, 404);
    // robot-c's acks; each is answered 200 whether it moves the command on or not.
    let ack = |body: Value| {
        let (app, key) = (&app, &key);
        async move {
            let (status, answer) = app
                .device(key, "robot-c", "command.ack", &rid(), &body)
                .await;
            assert_eq!(status, 200, "{answer}");
        }
    };
    let command_view = || async {
        app.operator(reqwest::Method::GET, &format!("/v1/commands/{cid}"), None)
            .await
            .1
    };
    ack(json!({"command_id": cid, "state": "accepted"})).await;
    ack(json!({"command_id": cid, "state": "rejected", "reason": "expired"})).await;
    // Once accepted, "rejected" (a device refusing a re-published command) changes nothing.
    let view = command_view().await;
    assert_eq!(view["state"], "accepted", "{view}");
    ack(json!({"command_id": cid, "state": "failed", "reason": "disk gone"})).await;
    // A late "accepted" cannot undo a final state.
    ack(json!({"command_id": cid, "state": "accepted"})).await;
    let view = command_view().await;
    assert_eq!(view["state"], "failed");
    assert_eq!(view["reason"], "disk gone");
    let (_, due) = app
        .bridge(reqwest::Method::GET, "/v1/bridge/commands/due", None)
        .await;
    assert!(due.as_array().expect("list").is_empty());
    // One accepted and one final ack moved the command on; the late one did not.
    let metrics = app.metrics().await;
    for ack in ["accepted", "final"] {
        let count = format!("uplink_command_ack_seconds_count{{ack=\"{ack}\"}} 1");
        assert!(metrics.contains(&count), "{count} missing in:\n{metrics}");
    }
}

#[tokio::test]
async fn mqtt_auth_and_device_registration() {
    let app = TestApp::spawn().await;
    let key = app.register("robot-q").await;
    let auth = |user: &str, client: &str, pw: String| json!({"client_id": client, "username": user, "password": pw});
    let good = sign::mqtt_password(&key, "robot-q", unix_now());
    let (status, a) = app
        .bridge(
            reqwest::Method::POST,
            "/v1/bridge/mqtt-auth",
            Some(auth("robot-q", "robot-q", good.clone())),
        )
        .await;
    assert_eq!((status, a["allow"].as_bool()), (200, Some(true)));
    for (user, client, pw) in [
        ("robot-q", "robot-x", good.clone()),
        ("robot-x", "robot-x", good.clone()),
        ("robot-q", "robot-q", "password".to_string()),
        (
            "robot-q",
            "robot-q",
            sign::mqtt_password(&key, "robot-q", unix_now() - 3600),
        ),
        (
            "robot-q",
            "robot-q",
            sign::mqtt_password(&sign::generate(), "robot-q", unix_now()),
        ),
    ] {
        let (_, a) = app
            .bridge(
                reqwest::Method::POST,
                "/v1/bridge/mqtt-auth",
                Some(auth(user, client, pw)),
            )
            .await;
        assert_eq!(a["allow"], false, "{user} {client}");
    }
    // A client certificate the bridge verified stands for the password: the device must
    // still be itself, registered and enabled.
    app.register("robot-qd").await;
    let (status, _) = app
        .operator(
            reqwest::Method::PATCH,
            "/v1/devices/robot-qd",
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200);
    let cert = |user: &str, client: &str| json!({"client_id": client, "username": user, "client_certificate": true});
    let mut both = cert("robot-q", "robot-q");
    both["password"] = json!(good);
    for (body, allow) in [
        (cert("robot-q", "robot-q"), true),
        (cert("robot-x", "robot-x"), false),
        (cert("robot-x", "robot-q"), false),
        (cert("robot-qd", "robot-qd"), false),
        (both, false),
        (
            json!({"client_id": "robot-q", "username": "robot-q"}),
            false,
        ),
    ] {
        let (status, a) = app
            .bridge(
                reqwest::Method::POST,
                "/v1/bridge/mqtt-auth",
                Some(body.clone()),
            )
            .await;
        assert_eq!((status, a["allow"].as_bool()), (200, Some(allow)), "{body}");
    }

    let (status, p) = app.operator(reqwest::Method::POST, "/v1/devices", Some(json!({"device_id": "robot-q", "public_key": sign::encode_public(&key.verifying_key())}))).await;
    assert_eq!((status, p["code"].as_str()), (409, Some("device_exists")));
    let (status, p) = app
        .operator(
            reqwest::Method::POST,
            "/v1/devices",
            Some(json!({"device_id": "a/b", "public_key": "x"})),
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (422, Some("invalid_device_id"))
    );
    let reserved = json!({"device_id": "uplink-bridge-1", "public_key": sign::encode_public(&key.verifying_key())});
    let (status, p) = app
        .operator(reqwest::Method::POST, "/v1/devices", Some(reserved))
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (422, Some("reserved_device_id"))
    );
    let (status, p) = app
        .operator(
            reqwest::Method::POST,
            "/v1/devices",
            Some(json!({"device_id": "robot-z", "public_key": "AAAA"})),
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (422, Some("invalid_public_key"))
    );
    let (status, p) = app
        .operator(
            reqwest::Method::POST,
            "/v1/devices/robot-none/commands",
            Some(json!({"type": "upload", "path": "/x"})),
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (404, Some("device_not_found"))
    );
    let (status, p) = app
        .operator(
            reqwest::Method::POST,
            "/v1/devices/robot-q/commands",
            Some(json!({"type": "format_disk"})),
        )
        .await;
    assert_eq!((status, p["code"].as_str()), (422, Some("invalid_body")));
    let (status, p) = app
        .operator(
            reqwest::Method::POST,
            "/v1/devices/robot-q/commands",
            Some(json!({"type": "upload", "path": "relative/path"})),
        )
        .await;
    assert_eq!((status, p["code"].as_str()), (422, Some("invalid_path")));
}

#[tokio::test]
async fn disable_and_rotate_device_keys() {
    let app = TestApp::spawn().await;
    let old = app.register("robot-k").await;
    let body = create_body(Uuid::new_v4(), &file(10, 0), 5 * MIB);

    let (status, d) = app
        .operator(
            reqwest::Method::PATCH,
            "/v1/devices/robot-k",
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!((status, d["enabled"].as_bool()), (200, Some(false)));
    let (status, p) = app
        .device(&old, "robot-k", "session.create", &rid(), &body)
        .await;
    assert_eq!((status, p["code"].as_str()), (403, Some("device_disabled")));
    let pw = sign::mqtt_password(&old, "robot-k", unix_now());
    let (_, a) = app
        .bridge(
            reqwest::Method::POST,
            "/v1/bridge/mqtt-auth",
            Some(json!({"client_id": "robot-k", "username": "robot-k", "password": pw})),
        )
        .await;
    assert_eq!(
        a["allow"], false,
        "a disabled device must not reach the broker"
    );

    let new = sign::generate();
    let (status, _) = app
        .operator(
            reqwest::Method::PATCH,
            "/v1/devices/robot-k",
            Some(json!({"enabled": true, "public_key": sign::encode_public(&new.verifying_key())})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, p) = app
        .device(&old, "robot-k", "session.create", &rid(), &body)
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (401, Some("bad_signature")),
        "the old key must stop working"
    );
    let (status, _) = app
        .device(&new, "robot-k", "session.create", &rid(), &body)
        .await;
    assert_eq!(status, 201);

    let (status, p) = app
        .operator(
            reqwest::Method::PATCH,
            "/v1/devices/robot-k",
            Some(json!({"public_key": "AAAA"})),
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (422, Some("invalid_public_key"))
    );
    let (status, _) = app
        .operator(
            reqwest::Method::PATCH,
            "/v1/devices/robot-none",
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(status, 404);

    // Every change is in the audit log, without key material.
    let (status, events) = app
        .operator(reqwest::Method::GET, "/v1/audit?subject=robot-k", None)
        .await;
    assert_eq!(status, 200);
    let actions: Vec<&str> = events
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        vec!["device.register", "device.update", "device.update"]
    );
    assert!(!events
        .to_string()
        .contains(&sign::encode_public(&new.verifying_key())));
    assert_eq!(events[2]["detail"]["key_rotated"], true);
}
