//! Projects, datasets, API keys and roles, and quota, against a real PostgreSQL and a real
//! S3 server (storage policies: `policies.rs`; dedupe and the signed manifest: `custody.rs`).

mod common;

use common::*;
use reqwest::Method;

#[tokio::test]
async fn every_role_against_every_endpoint_and_project() {
    let app = TestApp::spawn().await;
    new_project(&app, json!({"project_id": "a"})).await;
    new_project(&app, json!({"project_id": "b"})).await;
    let dev_a = register_in(&app, "a", "dev-a").await;
    let dev_b = register_in(&app, "b", "dev-b").await;
    let sa = upload(&app, &dev_a, "dev-a", None, "a.bin", b"in project a").await;
    let sb = upload(&app, &dev_b, "dev-b", None, "b.bin", b"in project b").await;
    let (sa, sb) = (
        sa["session_id"].as_str().expect("id").to_string(),
        sb["session_id"].as_str().expect("id").to_string(),
    );
    let viewer = new_key(&app, "viewer", Some("a")).await;
    let operator = new_key(&app, "operator", Some("a")).await;
    let admin = new_key(&app, "admin", Some("a")).await;
    let global_viewer = new_key(&app, "viewer", None).await;
    let global_admin = new_key(&app, "admin", None).await;
    // Webhooks of a, of b and of every project; their receiver is never there (.invalid
    // names never resolve).
    let hook_url = "https://hooks.invalid/hook";
    let mut hooks = Vec::new();
    for project in [Some("a"), Some("b"), None] {
        let (status, w) = app
            .operator(
                Method::POST,
                "/v1/webhooks",
                Some(json!({"url": hook_url, "project_id": project})),
            )
            .await;
        assert_eq!(status, 201, "{w}");
        hooks.push(w["webhook_id"].as_str().expect("id").to_string());
    }
    let (wa, wb, wall) = (&hooks[0], &hooks[1], &hooks[2]);
    let pk = || sign::encode_public(&sign::generate().verifying_key());

    // (method, path, body) and the status each caller gets:
    // [viewer a, operator a, admin a, global viewer, global admin].
    type Case = (Method, String, Option<Value>, [u16; 5]);
    let cases: Vec<Case> = vec![
        (
            Method::GET,
            "/v1/projects/a".into(),
            None,
            [200, 200, 200, 200, 200],
        ),
        (
            Method::GET,
            "/v1/projects/b".into(),
            None,
            [404, 404, 404, 200, 200],
        ),
        (
            Method::POST,
            "/v1/projects".into(),
            Some(json!({"project_id": "c1"})),
            [403, 403, 403, 403, 201],
        ),
        (
            Method::PATCH,
            "/v1/projects/a".into(),
            Some(json!({"name": "A"})),
            [403, 403, 200, 403, 200],
        ),
        (
            Method::PATCH,
            "/v1/projects/a".into(),
            Some(json!({"quota_bytes": 1000000000})),
            [403, 403, 403, 403, 200],
        ),
        (
            Method::PATCH,
            "/v1/projects/b".into(),
            Some(json!({"name": "B"})),
            [404, 404, 404, 403, 200],
        ),
        (
            Method::GET,
            "/v1/devices/dev-a".into(),
            None,
            [200, 200, 200, 200, 200],
        ),
        (
            Method::GET,
            "/v1/devices/dev-b".into(),
            None,
            [404, 404, 404, 200, 200],
        ),
        (
            Method::PATCH,
            "/v1/devices/dev-a".into(),
            Some(json!({"enabled": true})),
            [403, 200, 200, 403, 200],
        ),
        (
            Method::PATCH,
            "/v1/devices/dev-b".into(),
            Some(json!({"enabled": true})),
            [404, 404, 404, 403, 200],
        ),
        (
            Method::POST,
            "/v1/devices".into(),
            Some(json!({"device_id": "new-a", "public_key": pk(), "project_id": "a"})),
            [403, 201, 409, 403, 409],
        ),
        (
            Method::POST,
            "/v1/devices".into(),
            Some(json!({"device_id": "new-b", "public_key": pk(), "project_id": "b"})),
            [404, 404, 404, 403, 201],
        ),
        (
            Method::POST,
            "/v1/devices/dev-a/commands".into(),
            Some(json!({"type": "pause", "job_id": Uuid::new_v4()})),
            [403, 201, 201, 403, 201],
        ),
        (
            Method::POST,
            "/v1/devices/dev-b/commands".into(),
            Some(json!({"type": "pause", "job_id": Uuid::new_v4()})),
            [404, 404, 404, 403, 201],
        ),
        (
            Method::GET,
            format!("/v1/sessions/{sa}"),
            None,
            [200, 200, 200, 200, 200],
        ),
        (
            Method::GET,
            format!("/v1/sessions/{sb}"),
            None,
            [404, 404, 404, 200, 200],
        ),
        (
            Method::GET,
            format!("/v1/sessions/{sa}/manifest"),
            None,
            [200, 200, 200, 200, 200],
        ),
        (
            Method::GET,
            format!("/v1/sessions/{sb}/manifest"),
            None,
            [404, 404, 404, 200, 200],
        ),
        // Completed sessions cannot be paused (409) but only an operator gets that far.
        (
            Method::POST,
            format!("/v1/sessions/{sa}/pause"),
            None,
            [403, 409, 409, 403, 409],
        ),
        (
            Method::POST,
            format!("/v1/sessions/{sb}/abort"),
            None,
            [404, 404, 404, 403, 409],
        ),
        (
            Method::GET,
            "/v1/projects/a/datasets".into(),
            None,
            [200, 200, 200, 200, 200],
        ),
        (
            Method::GET,
            "/v1/projects/b/datasets".into(),
            None,
            [404, 404, 404, 200, 200],
        ),
        (
            Method::POST,
            "/v1/projects/a/datasets".into(),
            Some(json!({"name": "runs"})),
            [403, 201, 409, 403, 409],
        ),
        (
            Method::POST,
            "/v1/projects/a/datasets".into(),
            Some(json!({"name": "tables", "policy": {"presign_ttl_secs": 600}})),
            [403, 403, 201, 403, 409],
        ),
        (
            Method::PATCH,
            "/v1/projects/a/datasets/runs".into(),
            Some(json!({"policy": {"presign_ttl_secs": 600}})),
            [403, 403, 200, 403, 200],
        ),
        (
            Method::POST,
            "/v1/projects/b/datasets".into(),
            Some(json!({"name": "x"})),
            [404, 404, 404, 403, 201],
        ),
        (
            Method::GET,
            "/v1/projects/a/datasets/default/manifest".into(),
            None,
            [200, 200, 200, 200, 200],
        ),
        (
            Method::GET,
            "/v1/projects/b/datasets/default/manifest".into(),
            None,
            [404, 404, 404, 200, 200],
        ),
        (
            Method::GET,
            "/v1/keys?project_id=a".into(),
            None,
            [403, 403, 200, 403, 200],
        ),
        (
            Method::GET,
            "/v1/keys".into(),
            None,
            [403, 403, 200, 403, 200],
        ),
        (
            Method::GET,
            "/v1/keys?project_id=b".into(),
            None,
            [404, 404, 404, 403, 200],
        ),
        (
            Method::POST,
            "/v1/keys".into(),
            Some(json!({"name": "n", "role": "viewer", "project_id": "a"})),
            [403, 403, 201, 403, 201],
        ),
        (
            Method::POST,
            "/v1/keys".into(),
            Some(json!({"name": "n", "role": "admin"})),
            [403, 403, 403, 403, 201],
        ),
        (
            Method::GET,
            "/v1/events".into(),
            None,
            [200, 200, 200, 200, 200],
        ),
        (
            Method::GET,
            "/v1/events?project_id=b".into(),
            None,
            [404, 404, 404, 200, 200],
        ),
        (
            Method::POST,
            "/v1/webhooks".into(),
            Some(json!({"url": hook_url, "project_id": "a"})),
            [403, 403, 201, 403, 201],
        ),
        (
            Method::POST,
            "/v1/webhooks".into(),
            Some(json!({"url": hook_url, "project_id": "b"})),
            [404, 404, 404, 403, 201],
        ),
        (
            Method::POST,
            "/v1/webhooks".into(),
            Some(json!({"url": hook_url})),
            [403, 403, 403, 403, 201],
        ),
        (
            Method::GET,
            "/v1/webhooks".into(),
            None,
            [200, 200, 200, 200, 200],
        ),
        (
            Method::GET,
            format!("/v1/webhooks/{wa}"),
            None,
            [200, 200, 200, 200, 200],
        ),
        (
            Method::GET,
            format!("/v1/webhooks/{wb}"),
            None,
            [404, 404, 404, 200, 200],
        ),
        (
            Method::GET,
            format!("/v1/webhooks/{wall}"),
            None,
            [404, 404, 404, 200, 200],
        ),
        (
            Method::DELETE,
            format!("/v1/webhooks/{wall}"),
            None,
            [404, 404, 404, 403, 204],
        ),
        (
            Method::DELETE,
            format!("/v1/webhooks/{wb}"),
            None,
            [404, 404, 404, 403, 204],
        ),
        // Deleted by a's admin: the unscoped callers after it find nothing.
        (
            Method::DELETE,
            format!("/v1/webhooks/{wa}"),
            None,
            [403, 403, 204, 404, 404],
        ),
    ];
    let callers = [&viewer, &operator, &admin, &global_viewer, &global_admin];
    let mut wrong = Vec::new();
    for (method, path, body, want) in &cases {
        for (i, token) in callers.iter().enumerate() {
            let (status, reply) = app.call(method.clone(), path, body.clone(), token).await;
            if status != want[i] {
                wrong.push(format!(
                    "{method} {path} as caller {i}: got {status}, want {}: {reply}",
                    want[i]
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Listings show only the caller's project.
    let (_, devices) = app.call(Method::GET, "/v1/devices", None, &viewer).await;
    let ids: Vec<&str> = devices
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["device_id"].as_str())
        .collect();
    assert!(ids.contains(&"dev-a") && !ids.contains(&"dev-b"), "{ids:?}");
    let (_, sessions) = app.call(Method::GET, "/v1/sessions", None, &viewer).await;
    assert!(sessions
        .as_array()
        .expect("list")
        .iter()
        .all(|s| s["project_id"] == "a"));
    let (_, audit) = app.call(Method::GET, "/v1/audit", None, &viewer).await;
    let audit = audit.as_array().expect("audit");
    assert!(!audit.is_empty() && audit.iter().all(|e| e["project_id"] == "a"));
    // Operator actions carry who and the request id.
    let e = audit
        .iter()
        .find(|e| e["action"] == "dataset.create" && e["subject"] == "a/runs")
        .expect("dataset.create in the audit log");
    assert!(
        e["actor"].as_str().expect("actor").starts_with("key:"),
        "{e}"
    );
    assert!(
        e["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{e}"
    );

    // A revoked key is refused at once; an unknown or malformed token too.
    let key_id = admin
        .strip_prefix("upk_")
        .and_then(|r| r.split_once('_'))
        .expect("token shape")
        .0
        .to_string();
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/keys/{key_id}"),
            None,
            &operator,
        )
        .await;
    assert_eq!(status, 403, "an operator cannot revoke keys");
    let (status, revoked) = app
        .call(
            Method::DELETE,
            &format!("/v1/keys/{key_id}"),
            None,
            &global_admin,
        )
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert!(revoked["revoked_at"].is_string());
    for bad in [admin.as_str(), "upk_nope_nope", "not-a-token"] {
        let (status, reply) = app.call(Method::GET, "/v1/projects/a", None, bad).await;
        assert_eq!(status, 401, "{bad}: {reply}");
    }
    // The stored key is a hash: the secret is nowhere in the database.
    let secret = admin.rsplit('_').next().expect("secret");
    let (found,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM api_keys WHERE secret_hash LIKE '%' || $1 || '%' OR name LIKE '%' || $1 || '%')",
    )
    .bind(secret)
    .fetch_one(&app.state.store.pool)
    .await
    .expect("query");
    assert!(!found);
}

#[tokio::test]
async fn quota_is_reserved_atomically_and_settled() {
    let app = TestApp::spawn().await;
    let part = 5 * MIB;
    new_project(
        &app,
        json!({"project_id": "q", "quota_bytes": 4 * part + 100}),
    )
    .await;
    let key = register_in(&app, "q", "dev-q").await;
    let data = file(part, 1);
    // Ten creates at once for 5 MiB each: exactly four fit.
    let creates = (0..10u8).map(|i| {
        let (app, key) = (&app, &key);
        let body = json!({"job_id": Uuid::new_v4(), "file_name": format!("f{i}.bin"), "size": part,
                          "sha256": sha256_hex(&file(part, i)), "part_size": part});
        async move {
            app.device(key, "dev-q", "session.create", &rid(), &body)
                .await
        }
    });
    let results = futures::future::join_all(creates).await;
    let ok: Vec<&Value> = results
        .iter()
        .filter(|r| r.0 == 201)
        .map(|r| &r.1)
        .collect();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|r| r.0 == 413)
        .map(|r| &r.1)
        .collect();
    assert_eq!(ok.len(), 4, "{results:?}");
    assert_eq!(refused.len(), 6, "{results:?}");
    let p = refused[0];
    assert_eq!(p["code"], "quota_exceeded", "{p}");
    assert_eq!(p["limit"], 4 * part + 100);
    assert_eq!(p["requested"], part);
    assert_eq!(
        p["used"].as_i64().expect("used") + p["reserved"].as_i64().expect("reserved"),
        4 * part as i64
    );
    let (_, project) = app.operator(Method::GET, "/v1/projects/q", None).await;
    assert_eq!(project["reserved_bytes"], 4 * part);

    // Aborting one gives its bytes back.
    let aborted = ok[0]["session_id"].as_str().expect("id");
    let (status, _) = app
        .operator(Method::POST, &format!("/v1/sessions/{aborted}/abort"), None)
        .await;
    assert_eq!(status, 200);
    let (_, project) = app.operator(Method::GET, "/v1/projects/q", None).await;
    assert_eq!(project["reserved_bytes"], 3 * part);
    // A completed upload moves its bytes from reserved to used.
    let done = upload(&app, &key, "dev-q", None, "done.bin", &data).await;
    assert_eq!(done["size"], part);
    let (_, project) = app.operator(Method::GET, "/v1/projects/q", None).await;
    assert_eq!(project["used_bytes"], part, "{project}");
    assert_eq!(project["reserved_bytes"], 3 * part, "{project}");
    // Now full: one byte more is refused, and raising the quota lets it in.
    let (status, p) = app
        .device(
            &key,
            "dev-q",
            "session.create",
            &rid(),
            &create_in(Uuid::new_v4(), &file(101, 9), None, "x"),
        )
        .await;
    assert_eq!(status, 413, "{p}");
    let (status, _) = app
        .operator(
            Method::PATCH,
            "/v1/projects/q",
            Some(json!({"quota_bytes": null})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, p) = app
        .device(
            &key,
            "dev-q",
            "session.create",
            &rid(),
            &create_in(Uuid::new_v4(), &file(101, 9), None, "x"),
        )
        .await;
    assert_eq!(status, 201, "{p}");
}
