//! `GET /v1/live`: a long-poll that wakes on progress and presence (not audit events), as
//! the console's live views use it, against a real PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;

async fn live(app: &TestApp, query: &str, token: &str) -> (u16, Value) {
    app.call(Method::GET, &format!("/v1/live?{query}"), None, token)
        .await
}

fn next(page: &Value) -> i64 {
    page["next"].as_i64().expect("next")
}

#[tokio::test]
async fn a_long_poll_wakes_on_progress_and_presence() {
    let app = TestApp::spawn().await;
    let key = app.register("robot-live").await;
    let data = file(1024, 3);
    let job = Uuid::new_v4();
    let (status, created) = app
        .device(
            &key,
            "robot-live",
            "session.create",
            &rid(),
            &create_body(job, &data, 5 << 20),
        )
        .await;
    assert_eq!(status, 201, "{created}");

    // Without `after`: only the cursor, at once.
    let (status, first) = live(&app, "", OPERATOR).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["sessions"], json!([]));
    let cursor = next(&first);
    assert!(cursor > 0, "{first}");

    // A held poll is answered by the device's next progress report.
    let poll = {
        let app_base = app.base.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let page: Value = reqwest::Client::new()
                .get(format!("{app_base}/v1/live?after={cursor}&wait=20"))
                .bearer_auth(OPERATOR)
                .send()
                .await
                .expect("poll")
                .json()
                .await
                .expect("json");
            (page, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let progress = json!({"job_id": job, "state": "uploading", "bytes_done": 512,
                          "bytes_total": 1024, "rate_bps": 4096});
    let (status, reply) = app
        .device(&key, "robot-live", "progress", &rid(), &progress)
        .await;
    assert_eq!(status, 200, "{reply}");
    let (page, took) = poll.await.expect("poll task");
    assert!(
        took >= Duration::from_millis(600),
        "held until the progress: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "woken by it: {took:?}");
    let sessions = page["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 1, "{page}");
    assert_eq!(sessions[0]["session_id"], created["session_id"]);
    assert_eq!(sessions[0]["bytes_done"], 512);
    assert_eq!(sessions[0]["rate_bps"], 4096);
    let cursor = next(&page);

    // Nothing new: an empty answer after the wait, with the same cursor.
    let started = Instant::now();
    let (status, page) = live(&app, &format!("after={cursor}&wait=1"), OPERATOR).await;
    assert_eq!(status, 200, "{page}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        (page["sessions"].clone(), page["devices"].clone()),
        (json!([]), json!([]))
    );
    assert_eq!(next(&page), cursor);

    // A signed presence with free disk space.
    let status: uplink_protocol::telemetry::Status = serde_json::from_value(json!({
        "v": 1, "state": "online", "ts_ms": unix_now() * 1000, "free_disk_bytes": 123_456_789
    }))
    .expect("status");
    let (code, reply) = app
        .bridge(
            Method::PUT,
            "/v1/bridge/devices/robot-live/presence",
            Some(serde_json::to_value(status.signed(&key, "robot-live")).expect("json")),
        )
        .await;
    assert_eq!(code, 204, "{reply}");
    let (_, page) = live(&app, &format!("after={cursor}&wait=5"), OPERATOR).await;
    let devices = page["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{page}");
    assert_eq!(devices[0]["device_id"], "robot-live");
    assert_eq!(devices[0]["online"], true);
    assert_eq!(devices[0]["free_disk_bytes"], 123_456_789);
    let (_, device) = app
        .operator(Method::GET, "/v1/devices/robot-live", None)
        .await;
    assert_eq!(device["free_disk_bytes"], 123_456_789);
}

#[tokio::test]
async fn a_scoped_key_sees_only_its_project_and_bad_queries_are_refused() {
    let app = TestApp::spawn().await;
    new_project(&app, json!({"project_id": "elsewhere"})).await;
    let viewer = new_key(&app, "viewer", Some("elsewhere")).await;
    app.register("robot-default").await;
    let (status, page) = live(&app, "after=0", &viewer).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["devices"], json!([]), "another project's device");
    let (status, page) = live(&app, "after=0", OPERATOR).await;
    assert_eq!(status, 200, "{page}");
    assert!(page["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .any(|d| d["device_id"] == "robot-default"));
    let (status, _) = live(&app, "after=0&project_id=default", &viewer).await;
    assert_eq!(status, 404);
    for bad in ["after=-1", "wait=61", "after=x"] {
        let (status, problem) = live(&app, bad, OPERATOR).await;
        assert!(status == 400 || status == 422, "{bad}: {status} {problem}");
        assert!(problem["detail"].is_string(), "{bad}: {problem}");
    }
}
