//! Storage policies against a real PostgreSQL and a real S3 server: key templates and sealed
//! datasets, encryption and object lock reaching the stored objects, policies storage cannot
//! honour refused when set, and completion failing when storage ignores one.

mod common;

use common::*;
use reqwest::Method;

#[tokio::test]
async fn policies_shape_keys_and_sealed_datasets_take_nothing_new() {
    let app = TestApp::spawn().await;
    new_project(&app, json!({"project_id": "p", "policy": {"key_template": "{project}/{dataset}/{device}/{date}/{filename}"}})).await;
    let key = register_in(&app, "p", "dev-p").await;
    let (status, _) = app
        .operator(
            Method::POST,
            "/v1/projects/p/datasets",
            Some(json!({"name": "short", "policy": {"presign_ttl_secs": 120}})),
        )
        .await;
    assert_eq!(status, 201);
    // An unknown validator is refused, not silently ignored.
    let (status, p) = app
        .operator(
            Method::POST,
            "/v1/projects/p/datasets",
            Some(json!({"name": "v", "validator": "xml"})),
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (422, Some("invalid_validator")),
        "{p}"
    );
    // Bad policies are refused with every reason.
    let (status, p) = app
        .operator(
            Method::PATCH,
            "/v1/projects/p",
            Some(json!({"policy": {"key_template": "{nope}", "presign_ttl_secs": 1}})),
        )
        .await;
    assert_eq!(status, 422, "{p}");
    let detail = p["detail"].as_str().expect("detail");
    assert!(
        detail.contains("key_template") && detail.contains("presign_ttl_secs"),
        "{detail}"
    );
    let (status, p) = app
        .operator(
            Method::PATCH,
            "/v1/projects/p",
            Some(json!({"policy": {"bucket": "no-such-bucket-here"}})),
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (422, Some("bucket_unreachable")),
        "{p}"
    );

    let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let prefix = &app.state.config.s3.key_prefix;
    let first = upload(&app, &key, "dev-p", Some("short"), "run.mcap", b"first").await;
    assert_eq!(
        first["object_key"],
        format!("{prefix}p/short/dev-p/{date}/run.mcap")
    );
    // Same name, same day, other bytes: stored beside it, never over it.
    let second = upload(&app, &key, "dev-p", Some("short"), "run.mcap", b"second").await;
    let sid = second["session_id"].as_str().expect("id");
    assert_eq!(
        second["object_key"],
        format!("{prefix}p/short/dev-p/{date}/{sid}/run.mcap")
    );
    // The dataset's presign lifetime applies.
    let (_, created) = app
        .device(
            &key,
            "dev-p",
            "session.create",
            &rid(),
            &create_in(Uuid::new_v4(), b"third", Some("short"), "t.bin"),
        )
        .await;
    let open_sid = created["session_id"].as_str().expect("id").to_string();
    let (_, presigned) = app
        .device(
            &key,
            "dev-p",
            "parts.presign",
            &rid(),
            &json!({"session_id": open_sid, "parts": [{"number": 1, "md5": md5_b64(b"third")}]}),
        )
        .await;
    let lifetime = presigned["parts"][0]["expires_at"]
        .as_i64()
        .expect("expires_at")
        - unix_now();
    assert!((100..=125).contains(&lifetime), "{lifetime}");
    assert!(presigned["parts"][0]["url"]
        .as_str()
        .expect("url")
        .contains("X-Amz-Expires=120"));

    // Sealing waits for open sessions, then writes the manifest once.
    let (status, p) = app
        .operator(Method::POST, "/v1/projects/p/datasets/short/seal", None)
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (409, Some("dataset_busy")),
        "{p}"
    );
    let (status, _) = app
        .operator(
            Method::POST,
            &format!("/v1/sessions/{open_sid}/abort"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, m) = app
        .operator(Method::POST, "/v1/projects/p/datasets/short/seal", None)
        .await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["sealed"], true);
    let objects = m["objects"].as_array().expect("objects");
    assert_eq!(objects.len(), 2, "{m}");
    assert_eq!(objects[0]["sha256"], sha256_hex(b"first"));
    assert_eq!(m["total_bytes"], 11);
    let (status, p) = app
        .device(
            &key,
            "dev-p",
            "session.create",
            &rid(),
            &create_in(Uuid::new_v4(), b"late", Some("short"), "late.bin"),
        )
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (409, Some("dataset_sealed")),
        "{p}"
    );
    let (_, d) = app
        .operator(Method::GET, "/v1/projects/p/datasets/short", None)
        .await;
    assert_eq!(d["state"], "sealed");
}

/// An S3 client for the test server, to look at objects the way an auditor would.
fn s3() -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new(
        env("UPLINK_TEST_S3_ACCESS_KEY"),
        env("UPLINK_TEST_S3_SECRET_KEY"),
        None,
        None,
        "test",
    );
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(env("UPLINK_TEST_S3_ENDPOINT"))
        .credentials_provider(creds)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// A policy's encryption, object lock, retention and legal hold reach the stored objects,
/// multipart and single PUT (an empty file) alike, and storage then refuses to delete them.
#[tokio::test]
async fn policies_encrypt_and_lock_objects_in_storage() {
    use aws_sdk_s3::types::{ObjectLockLegalHoldStatus, ObjectLockMode, ServerSideEncryption};
    let app = TestApp::spawn().await;
    let s3 = s3();
    let bucket = format!("lock-{}", Uuid::new_v4().simple());
    s3.create_bucket()
        .bucket(&bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .expect("create a bucket with object lock");
    new_project(
        &app,
        json!({"project_id": "vault", "policy": {"bucket": bucket, "sse": "AES256",
               "object_lock_mode": "GOVERNANCE", "retention_days": 1, "legal_hold": true}}),
    )
    .await;
    let key = register_in(&app, "vault", "dev-v").await;
    for (name, data) in [("m.bin", file(3000, 7)), ("empty.bin", Vec::new())] {
        let done = upload(&app, &key, "dev-v", None, name, &data).await;
        assert_eq!(done["state"], "completed", "{done}");
        assert_eq!(done["bucket"], bucket.as_str());
        let object_key = done["object_key"].as_str().expect("key");
        let head = s3
            .head_object()
            .bucket(&bucket)
            .key(object_key)
            .send()
            .await
            .expect("head");
        assert_eq!(head.content_length(), Some(data.len() as i64), "{name}");
        assert_eq!(
            head.server_side_encryption(),
            Some(&ServerSideEncryption::Aes256),
            "{name}"
        );
        assert_eq!(
            head.object_lock_mode(),
            Some(&ObjectLockMode::Governance),
            "{name}"
        );
        assert_eq!(
            head.object_lock_legal_hold_status(),
            Some(&ObjectLockLegalHoldStatus::On),
            "{name}"
        );
        let until = head
            .object_lock_retain_until_date()
            .expect("retain-until")
            .secs();
        let day = unix_now() + 86_400;
        assert!((day - 600..=day + 600).contains(&until), "{name}: {until}");
        let refused = s3
            .delete_object()
            .bucket(&bucket)
            .key(object_key)
            .set_version_id(head.version_id().map(str::to_string))
            .send()
            .await;
        assert!(
            refused.is_err(),
            "{name}: a locked version cannot be deleted"
        );
    }
}

/// A policy storage cannot honour is refused when it is set: object lock on a bucket
/// without it. The reason names the missing guarantee; nothing is stored.
#[tokio::test]
async fn policies_storage_cannot_honour_are_refused() {
    let app = TestApp::spawn().await;
    let (status, p) = app
        .operator(
            Method::POST,
            "/v1/projects",
            Some(json!({"project_id": "nolock", "policy": {"object_lock_mode": "GOVERNANCE", "retention_days": 1}})),
        )
        .await;
    assert_eq!(status, 422, "{p}");
    assert_eq!(p["code"], "policy_not_supported", "{p}");
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("does not have object lock enabled")),
        "{p}"
    );
    let (status, _) = app.operator(Method::GET, "/v1/projects/nolock", None).await;
    assert_eq!(status, 404);

    // A dataset's legal hold, over a project policy storage honours, is checked the same way.
    new_project(
        &app,
        json!({"project_id": "enc", "policy": {"sse": "AES256"}}),
    )
    .await;
    let (status, p) = app
        .operator(
            Method::POST,
            "/v1/projects/enc/datasets",
            Some(json!({"name": "held", "policy": {"legal_hold": true}})),
        )
        .await;
    assert_eq!(status, 422, "{p}");
    assert_eq!(p["code"], "policy_not_supported", "{p}");
}

/// A policy that storage refuses at upload time (it was written straight into the database,
/// as if the bucket had lost object lock after the policy was set) is named as such, not
/// "storage unavailable". When storage accepts an upload but does not apply the session's
/// policy (simulated by changing the policy recorded on the session), completion fails the
/// session with a reason naming what is missing, and counts it.
#[tokio::test]
async fn completion_fails_when_storage_ignores_the_policy() {
    let app = TestApp::spawn().await;
    new_project(&app, json!({"project_id": "lax"})).await;
    let key = register_in(&app, "lax", "dev-l").await;
    let data = file(3000, 5);
    let create = || create_in(Uuid::new_v4(), &data, None, "l.bin");
    let hold = json!({"legal_hold": true});
    sqlx::query("UPDATE projects SET policy = $1 WHERE project_id = 'lax'")
        .bind(&hold)
        .execute(&app.state.store.pool)
        .await
        .expect("set policy");
    let (status, p) = app
        .device(&key, "dev-l", "session.create", &rid(), &create())
        .await;
    assert_eq!(status, 422, "{p}");
    assert_eq!(p["code"], "policy_not_supported", "{p}");
    sqlx::query("UPDATE projects SET policy = '{}' WHERE project_id = 'lax'")
        .execute(&app.state.store.pool)
        .await
        .expect("clear policy");

    let (status, created) = app
        .device(&key, "dev-l", "session.create", &rid(), &create())
        .await;
    assert_eq!(status, 201, "{created}");
    let sid = created["session_id"].as_str().expect("id").to_string();
    sqlx::query("UPDATE sessions SET policy = $1 WHERE session_id = $2::uuid")
        .bind(&hold)
        .bind(&sid)
        .execute(&app.state.store.pool)
        .await
        .expect("set the session's policy");
    put_parts(&app, &key, "dev-l", &sid, &data).await;
    let (status, p) = app
        .device(
            &key,
            "dev-l",
            "session.complete",
            &rid(),
            &json!({"session_id": sid}),
        )
        .await;
    assert_eq!(status, 409, "{p}");
    assert_eq!(p["code"], "policy_not_honoured", "{p}");
    let (_, view) = app
        .operator(Method::GET, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(
        view["error"], "storage did not apply the storage policy: legal hold: storage reports none",
        "{view}"
    );
    assert!(
        app.metrics()
            .await
            .contains("uplink_policy_violations_total 1"),
        "the violation is counted"
    );
}
