//! Uploads from workstations: sessions owned by an API key (`POST /v1/projects/{p}/uploads`,
//! `/v1/sessions/{id}/parts|status|complete`), with the roles, quota, resume, dedupe and
//! audit of device sessions.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const PART: usize = 5 << 20;

fn upload_body(job: Uuid, data: &[u8], name: &str) -> Value {
    json!({"job_id": job, "file_name": name, "size": data.len(), "sha256": sha256_hex(data), "part_size": PART})
}

/// Presigns parts `numbers` of `data` in session `sid` as `token`, PUTs them; checks each.
async fn send_parts(app: &TestApp, token: &str, sid: &str, data: &[u8], numbers: &[usize]) {
    let chunks: Vec<&[u8]> = data.chunks(PART).collect();
    let parts: Vec<Value> = numbers
        .iter()
        .map(|&n| json!({"number": n, "md5": md5_b64(chunks[n - 1])}))
        .collect();
    let (status, presigned) = app
        .call(
            Method::POST,
            &format!("/v1/sessions/{sid}/parts"),
            Some(json!({ "parts": parts })),
            token,
        )
        .await;
    assert_eq!(status, 200, "{presigned}");
    let http = reqwest::Client::new();
    for (part, &n) in presigned["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .zip(numbers)
    {
        let resp = put(&http, part, chunks[n - 1].to_vec()).await;
        assert!(
            resp.status().is_success(),
            "PUT part {n}: {}",
            resp.status()
        );
    }
}

#[tokio::test]
async fn an_operator_key_uploads_resumes_and_completes() {
    let app = TestApp::spawn().await;
    new_project(&app, json!({"project_id": "ws"})).await;
    let token = new_key(&app, "operator", Some("ws")).await;
    let data = file(2 * PART + 123, 4);
    let job = Uuid::new_v4();

    let (status, created) = app
        .call(
            Method::POST,
            "/v1/projects/ws/uploads",
            Some(upload_body(job, &data, "run.mcap")),
            &token,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let sid = created["session_id"].as_str().expect("id").to_string();
    assert_eq!(created["part_count"], 3, "{created}");
    // Interrupted after part 2; the same job opens the same session, whose status says
    // which parts storage holds.
    send_parts(&app, &token, &sid, &data, &[2]).await;
    let (status, again) = app
        .call(
            Method::POST,
            "/v1/projects/ws/uploads",
            Some(upload_body(job, &data, "run.mcap")),
            &token,
        )
        .await;
    assert_eq!(
        (status, again["session_id"].as_str()),
        (200, Some(sid.as_str()))
    );
    let (status, info) = app
        .call(
            Method::GET,
            &format!("/v1/sessions/{sid}/status"),
            None,
            &token,
        )
        .await;
    assert_eq!(status, 200, "{info}");
    let held: Vec<u64> = info["stored_parts"]
        .as_array()
        .expect("stored_parts")
        .iter()
        .map(|p| p["number"].as_u64().expect("number"))
        .collect();
    assert_eq!(held, vec![2]);
    send_parts(&app, &token, &sid, &data, &[1, 3]).await;
    let (status, done) = app
        .call(
            Method::POST,
            &format!("/v1/sessions/{sid}/complete"),
            None,
            &token,
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["sha256"], sha256_hex(&data).as_str());

    // The operator view: no device, the key as owner; in the audit log and the quota.
    let (_, view) = app
        .operator(Method::GET, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(view["device_id"], Value::Null, "{view}");
    assert!(
        view["owner"]
            .as_str()
            .is_some_and(|o| o.starts_with("key:")),
        "{view}"
    );
    assert!(
        view["object_key"]
            .as_str()
            .is_some_and(|k| k.contains("/ws/default/key-") && k.ends_with("/run.mcap")),
        "{view}"
    );
    let (_, project) = app.operator(Method::GET, "/v1/projects/ws", None).await;
    assert_eq!(project["used_bytes"], data.len(), "{project}");

    // Once the API has hashed the object, the same content is not sent again.
    check_digests(&app).await;
    let (status, copy) = app
        .call(
            Method::POST,
            "/v1/projects/ws/uploads",
            Some(upload_body(Uuid::new_v4(), &data, "copy.mcap")),
            &token,
        )
        .await;
    assert_eq!(
        (status, copy["state"].as_str()),
        (201, Some("completed")),
        "{copy}"
    );
}

#[tokio::test]
async fn who_may_upload_and_what_is_refused() {
    let app = TestApp::spawn().await;
    new_project(&app, json!({"project_id": "ws", "quota_bytes": 1000})).await;
    new_project(&app, json!({"project_id": "other"})).await;
    let viewer = new_key(&app, "viewer", Some("ws")).await;
    let outsider = new_key(&app, "operator", Some("other")).await;
    let owner = new_key(&app, "operator", Some("ws")).await;
    let colleague = new_key(&app, "operator", Some("ws")).await;
    let small = file(100, 1);

    let create = |token: String, data: Vec<u8>| {
        let app = &app;
        async move {
            app.call(
                Method::POST,
                "/v1/projects/ws/uploads",
                Some(upload_body(Uuid::new_v4(), &data, "f.bin")),
                &token,
            )
            .await
        }
    };
    let (status, p) = create(viewer.clone(), small.clone()).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (403, Some("forbidden")),
        "{p}"
    );
    let (status, p) = create(outsider.clone(), small.clone()).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (404, Some("project_not_found")),
        "{p}"
    );
    let (status, p) = create(owner.clone(), file(2000, 2)).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (413, Some("quota_exceeded")),
        "{p}"
    );

    let (status, created) = create(owner.clone(), small.clone()).await;
    assert_eq!(status, 201, "{created}");
    let sid = created["session_id"].as_str().expect("id");
    let parts = json!({"parts": [{"number": 1, "md5": md5_b64(&small)}]});
    // Only the owner presigns and completes; others may look, pause and abort.
    let (status, p) = app
        .call(
            Method::POST,
            &format!("/v1/sessions/{sid}/parts"),
            Some(parts.clone()),
            &colleague,
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (403, Some("not_session_owner")),
        "{p}"
    );
    let (status, p) = app
        .call(
            Method::POST,
            &format!("/v1/sessions/{sid}/complete"),
            None,
            &viewer,
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (403, Some("forbidden")),
        "{p}"
    );
    let (status, p) = app
        .call(
            Method::GET,
            &format!("/v1/sessions/{sid}/status"),
            None,
            &outsider,
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (404, Some("session_not_found")),
        "{p}"
    );
    let (status, p) = app
        .call(
            Method::POST,
            &format!("/v1/sessions/{sid}/pause"),
            None,
            &colleague,
        )
        .await;
    assert_eq!((status, p["state"].as_str()), (200, Some("paused")), "{p}");
    let (status, p) = app
        .call(
            Method::POST,
            &format!("/v1/sessions/{sid}/parts"),
            Some(parts.clone()),
            &owner,
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (409, Some("session_paused")),
        "{p}"
    );
    let (status, p) = app
        .call(
            Method::POST,
            &format!("/v1/sessions/{sid}/abort"),
            None,
            &colleague,
        )
        .await;
    assert_eq!((status, p["state"].as_str()), (200, Some("aborted")), "{p}");
    // No command went anywhere: a workstation session has no device.
    let (_, cmds) = app.operator(Method::GET, "/v1/commands", None).await;
    assert_eq!(cmds.as_array().map(Vec::len), Some(0), "{cmds}");

    // A device's session is the device's: an operator key cannot upload its parts.
    let key = register_in(&app, "ws", "dev-w").await;
    let (status, dev_session) = app
        .device(
            &key,
            "dev-w",
            "session.create",
            &rid(),
            &create_in(Uuid::new_v4(), &small, None, "d.bin"),
        )
        .await;
    assert_eq!(status, 201, "{dev_session}");
    let dsid = dev_session["session_id"].as_str().expect("id");
    let (status, p) = app
        .call(
            Method::POST,
            &format!("/v1/sessions/{dsid}/parts"),
            Some(parts),
            &owner,
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (409, Some("device_session")),
        "{p}"
    );
}
