//! Control API integration tests against a real PostgreSQL (one database per test) and a
//! real S3 server. `scripts/test` starts both and exports the `UPLINK_TEST_*` variables.
//! Uploads (multipart, empty, refused parts and batches), duplicate and signed requests,
//! operator pause/resume/abort and idempotency keys; devices and commands are in
//! devices.rs.

mod common;

use common::*;

#[tokio::test]
async fn multipart_upload_completes_and_verifies() {
    let app = TestApp::spawn().await;
    let key = app.register("robot-a").await;
    let data = file(5 * MIB + 1, 7);
    let sid = upload_all(&app, &key, "robot-a", &data).await;

    let (status, st) = app
        .device(
            &key,
            "robot-a",
            "session.status",
            &rid(),
            &json!({"session_id": sid}),
        )
        .await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["state"], "uploading");
    assert_eq!(st["stored_parts"].as_array().expect("parts").len(), 2);

    let (status, done) = app
        .device(
            &key,
            "robot-a",
            "session.complete",
            &rid(),
            &json!({"session_id": sid}),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "completed");
    assert_eq!(done["sha256"], sha256_hex(&data));
    let (size, _) = app
        .state
        .storage
        .head(&uplink_api::storage::Object {
            bucket: done["bucket"].as_str().expect("bucket"),
            key: done["object_key"].as_str().expect("key"),
        })
        .await
        .expect("head");
    assert_eq!(size, data.len() as u64);

    let (status, view) = app
        .operator(reqwest::Method::GET, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(view["state"], "completed");
    assert_eq!(view["bytes_done"], data.len());
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("uplink_sessions{state=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("uplink_parts_presigned_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("uplink_bytes_completed_total {}", data.len())),
        "{metrics}"
    );
    assert!(
        metrics.contains("uplink_device_requests_total{outcome=\"ok\"} 4"),
        "{metrics}"
    );
    // Completing again is harmless and answers the same.
    let (status, again) = app
        .device(
            &key,
            "robot-a",
            "session.complete",
            &rid(),
            &json!({"session_id": sid}),
        )
        .await;
    assert_eq!((status, &again["state"]), (200, &json!("completed")));
}

#[tokio::test]
async fn empty_file_is_one_put_object() {
    let app = TestApp::spawn().await;
    let key = app.register("robot-e").await;
    let sid = upload_all(&app, &key, "robot-e", &[]).await;
    let (status, done) = app
        .device(
            &key,
            "robot-e",
            "session.complete",
            &rid(),
            &json!({"session_id": sid}),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "completed");
    assert_eq!(done["sha256"], sha256_hex(&[]));
}

#[tokio::test]
async fn completion_refuses_missing_parts_and_storage_refuses_other_bytes() {
    let app = TestApp::spawn().await;
    let key = app.register("robot-m").await;
    let data = file(5 * MIB + 10, 1);
    let (_, created) = app
        .device(
            &key,
            "robot-m",
            "session.create",
            &rid(),
            &create_body(Uuid::new_v4(), &data, 5 * MIB),
        )
        .await;
    let sid = created["session_id"].as_str().expect("id");
    let parts = json!([{"number": 1, "md5": md5_b64(&data[..5 * MIB])}, {"number": 2, "md5": md5_b64(&data[5 * MIB..])}]);
    let (_, presigned) = app
        .device(
            &key,
            "robot-m",
            "parts.presign",
            &rid(),
            &json!({"session_id": sid, "parts": parts}),
        )
        .await;
    let p = &presigned["parts"][1];
    // The lifetime comes with the URL, so a device need not trust its own clock.
    let ttl = p["expires_in_secs"].as_i64().expect("expires_in_secs");
    assert!(ttl > 0, "{p}");
    let made_at = p["expires_at"].as_i64().expect("expires_at") - ttl;
    assert!((made_at - unix_now()).abs() <= 5, "{p}");
    // The URL signs part 2's Content-MD5: other bytes are refused by storage.
    let resp = put(&app.http, p, b"0123456789".to_vec()).await;
    assert!(
        resp.status().is_client_error(),
        "storage accepted bytes that don't match the signed MD5: {}",
        resp.status()
    );
    // A different Content-MD5 header breaks the signature.
    let resp = app
        .http
        .put(p["url"].as_str().expect("url"))
        .header("content-md5", md5_b64(b"0123456789"))
        .body(b"0123456789".to_vec())
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status().as_u16(), 403);
    // Only part 2 uploaded: completion is refused and the session goes back to uploading.
    assert_eq!(
        put(&app.http, p, data[5 * MIB..].to_vec())
            .await
            .status()
            .as_u16(),
        200
    );
    let (status, problem) = app
        .device(
            &key,
            "robot-m",
            "session.complete",
            &rid(),
            &json!({"session_id": sid}),
        )
        .await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["code"], "parts_incomplete");
    let (_, view) = app
        .operator(reqwest::Method::GET, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(view["state"], "uploading");
    // A different MD5 for an already planned part is refused.
    let (status, problem) = app
        .device(
            &key,
            "robot-m",
            "parts.presign",
            &rid(),
            &json!({"session_id": sid, "parts": [{"number": 1, "md5": md5_b64(b"x")}]}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("part_digest_mismatch"))
    );
}

/// A presign batch is recorded whole or not at all: a batch with one refused part records
/// none of its parts, and one number asked twice with two MD5s is refused.
#[tokio::test]
async fn a_refused_presign_batch_records_none_of_its_parts() {
    let app = TestApp::spawn().await;
    let key = app.register("robot-b").await;
    let data = file(10 * MIB + 10, 4);
    let (_, created) = app
        .device(
            &key,
            "robot-b",
            "session.create",
            &rid(),
            &create_body(Uuid::new_v4(), &data, 5 * MIB),
        )
        .await;
    let sid = created["session_id"].as_str().expect("id");
    let presign = |parts: Value| {
        let app = &app;
        let key = &key;
        async move {
            let body = json!({"session_id": sid, "parts": parts});
            app.device(key, "robot-b", "parts.presign", &rid(), &body)
                .await
        }
    };
    let (status, _) = presign(json!([{"number": 1, "md5": md5_b64(b"one")}])).await;
    assert_eq!(status, 200);
    // Part 2 is new, part 1 conflicts: 409, and part 2 stays unplanned.
    let (status, problem) = presign(json!([
        {"number": 2, "md5": md5_b64(b"not two")}, {"number": 1, "md5": md5_b64(b"other")}]))
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("part_digest_mismatch")),
        "{problem}"
    );
    let (status, problem) = presign(json!([{"number": 2, "md5": md5_b64(b"two")}])).await;
    assert_eq!(
        status, 200,
        "part 2 was not planned by the refused batch: {problem}"
    );
    let (status, problem) = presign(json!([
        {"number": 3, "md5": md5_b64(b"y")}, {"number": 3, "md5": md5_b64(b"z")}]))
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("part_digest_mismatch")),
        "{problem}"
    );
    // The same number twice with one MD5 is one part, presigned.
    let (status, answer) = presign(json!([
        {"number": 3, "md5": md5_b64(b"three")}, {"number": 3, "md5": md5_b64(b"three")}]))
    .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn duplicate_requests_give_one_session() {
    let app = TestApp::spawn().await;
    let key = app.register("robot-d").await;
    let data = file(100, 3);
    let body = create_body(Uuid::new_v4(), &data, 5 * MIB);
    let r = rid();
    // Two deliveries at once, then a late third.
    let (a, b) = tokio::join!(
        app.device(&key, "robot-d", "session.create", &r, &body),
        app.device(&key, "robot-d", "session.create", &r, &body)
    );
    let c = app
        .device(&key, "robot-d", "session.create", &r, &body)
        .await;
    assert_eq!(a.0, 201, "{}", a.1);
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(app.session_count("robot-d").await, 1);
    // Same key, different body: refused.
    let other = create_body(Uuid::new_v4(), &file(101, 3), 5 * MIB);
    let (status, problem) = app
        .device(&key, "robot-d", "session.create", &r, &other)
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    // A new request id for the same job returns the job's session.
    let (status, again) = app
        .device(&key, "robot-d", "session.create", &rid(), &body)
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["session_id"], a.1["session_id"]);
    assert_eq!(app.session_count("robot-d").await, 1);
}

#[tokio::test]
async fn signatures_devices_and_replays_are_checked() {
    let app = TestApp::spawn().await;
    let key_a = app.register("robot-sa").await;
    let key_b = app.register("robot-sb").await;
    let body = create_body(Uuid::new_v4(), &file(10, 0), 5 * MIB);

    // Signed with B's key, claiming to be A.
    let (status, p) = app
        .device(&key_b, "robot-sa", "session.create", &rid(), &body)
        .await;
    assert_eq!((status, p["code"].as_str()), (401, Some("bad_signature")));
    // Unknown device.
    let (status, p) = app
        .device(&key_a, "robot-nobody", "session.create", &rid(), &body)
        .await;
    assert_eq!((status, p["code"].as_str()), (401, Some("unknown_device")));
    // Outside the replay window.
    let (status, p) = app
        .device_raw(
            &key_a,
            "robot-sa",
            "session.create",
            &rid(),
            unix_now() - 3600,
            body.to_string(),
        )
        .await;
    assert_eq!((status, p["code"].as_str()), (401, Some("stale_request")));
    // It says by how much the device's clock is off, and carries the API's clock.
    let offset = p["clock_offset_secs"].as_i64().expect("clock_offset_secs");
    assert!((-3602..=-3599).contains(&offset), "{p}");
    assert!((p["server_time"].as_i64().expect("server_time") - unix_now()).abs() <= 2);
    assert_eq!(p["replay_window_secs"], 300);
    let detail = p["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("the device's clock is 360")
            && detail.contains("s behind the API's")
            && detail.contains("NTP"),
        "{detail}"
    );
    assert_eq!(app.session_count("robot-sa").await, 0);

    // B may not see or abort A's session.
    let (status, created) = app
        .device(&key_a, "robot-sa", "session.create", &rid(), &body)
        .await;
    assert_eq!(status, 201);
    let sid = created["session_id"].as_str().expect("id");
    for op in ["session.status", "session.abort", "session.complete"] {
        let (status, p) = app
            .device(&key_b, "robot-sb", op, &rid(), &json!({"session_id": sid}))
            .await;
        assert_eq!(
            (status, p["code"].as_str()),
            (404, Some("session_not_found")),
            "{op}"
        );
    }
    let (_, view) = app
        .operator(reqwest::Method::GET, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(view["state"], "created");

    // Malformed body, unknown op, oversized body.
    let (status, p) = app
        .device_raw(
            &key_a,
            "robot-sa",
            "session.create",
            &rid(),
            unix_now(),
            "{not json".into(),
        )
        .await;
    assert_eq!((status, p["code"].as_str()), (422, Some("invalid_body")));
    let (status, p) = app
        .device(&key_a, "robot-sa", "session.delete", &rid(), &json!({}))
        .await;
    assert_eq!((status, p["code"].as_str()), (404, Some("unknown_op")));
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(200_000));
    let (status, p) = app
        .device_raw(
            &key_a,
            "robot-sa",
            "session.create",
            &rid(),
            unix_now(),
            big,
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    // Plans outside S3's limits.
    let bad = json!({"job_id": Uuid::new_v4(), "file_name": "x", "size": 100, "sha256": sha256_hex(b""), "part_size": 1024});
    let (status, p) = app
        .device(&key_a, "robot-sa", "session.create", &rid(), &bad)
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (422, Some("invalid_part_plan"))
    );
    let bad = json!({"job_id": Uuid::new_v4(), "file_name": "../../etc", "size": 1, "sha256": sha256_hex(b""), "part_size": 5 * MIB});
    let (status, p) = app
        .device(&key_a, "robot-sa", "session.create", &rid(), &bad)
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (422, Some("invalid_file_name"))
    );
}

#[tokio::test]
async fn operator_pause_resume_abort() {
    let app = TestApp::spawn().await;
    let key = app.register("robot-p").await;
    let data = file(5 * MIB + 1, 9);
    let (_, created) = app
        .device(
            &key,
            "robot-p",
            "session.create",
            &rid(),
            &create_body(Uuid::new_v4(), &data, 5 * MIB),
        )
        .await;
    let sid = created["session_id"].as_str().expect("id");
    let presign =
        json!({"session_id": sid, "parts": [{"number": 1, "md5": md5_b64(&data[..5 * MIB])}]});

    let (status, s) = app
        .operator(
            reqwest::Method::POST,
            &format!("/v1/sessions/{sid}/pause"),
            None,
        )
        .await;
    assert_eq!((status, s["state"].as_str()), (200, Some("paused")));
    let (status, p) = app
        .device(&key, "robot-p", "parts.presign", &rid(), &presign)
        .await;
    assert_eq!((status, p["code"].as_str()), (409, Some("session_paused")));
    // Pausing issued a signed pause command for the job.
    let (_, cmds) = app
        .operator(reqwest::Method::GET, "/v1/commands?device_id=robot-p", None)
        .await;
    assert_eq!(cmds[0]["action"]["type"], "pause");
    let (_, view) = app
        .operator(reqwest::Method::GET, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(cmds[0]["action"]["job_id"], view["job_id"]);

    let (status, s) = app
        .operator(
            reqwest::Method::POST,
            &format!("/v1/sessions/{sid}/resume"),
            None,
        )
        .await;
    assert_eq!((status, s["state"].as_str()), (200, Some("uploading")));
    let (status, _) = app
        .device(&key, "robot-p", "parts.presign", &rid(), &presign)
        .await;
    assert_eq!(status, 200);

    let (status, s) = app
        .operator(
            reqwest::Method::POST,
            &format!("/v1/sessions/{sid}/abort"),
            None,
        )
        .await;
    assert_eq!((status, s["state"].as_str()), (200, Some("aborted")));
    // Terminal states win: no resume, no presign, no completion.
    let (status, _) = app
        .operator(
            reqwest::Method::POST,
            &format!("/v1/sessions/{sid}/resume"),
            None,
        )
        .await;
    assert_eq!(status, 409);
    let (status, _) = app
        .device(
            &key,
            "robot-p",
            "session.complete",
            &rid(),
            &json!({"session_id": sid}),
        )
        .await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn operator_idempotency_keys() {
    let app = TestApp::spawn().await;
    app.register("robot-i").await;
    let send = |key: &'static str, path: &'static str| {
        let req = app
            .http
            .post(format!("{}/v1/devices/robot-i/commands", app.base))
            .bearer_auth(OPERATOR)
            .header("idempotency-key", key)
            .json(&json!({"type": "upload", "path": path}));
        async move {
            let r = req.send().await.expect("request");
            let replayed = r.headers().contains_key("idempotent-replayed");
            (
                r.status().as_u16(),
                replayed,
                r.json::<Value>().await.expect("json"),
            )
        }
    };
    let (s1, replayed1, first) = send("op-key-1", "/data/a.mcap").await;
    let (s2, replayed2, second) = send("op-key-1", "/data/a.mcap").await;
    assert_eq!((s1, replayed1), (201, false), "{first}");
    assert_eq!((s2, replayed2), (201, true));
    assert_eq!(first["command_id"], second["command_id"]);
    let (_, cmds) = app
        .operator(reqwest::Method::GET, "/v1/commands?device_id=robot-i", None)
        .await;
    assert_eq!(
        cmds.as_array().expect("list").len(),
        1,
        "a retried call must not issue a second command"
    );
    let (status, _, p) = send("op-key-1", "/data/b.mcap").await;
    assert_eq!(
        (status, p["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    let (status, _, other) = send("op-key-2", "/data/a.mcap").await;
    assert_eq!(status, 201);
    assert_ne!(other["command_id"], first["command_id"]);
}
