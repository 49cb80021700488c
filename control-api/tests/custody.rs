//! Custody of what devices store: the same content in a dataset stored once, and the
//! device-signed manifest kept at completion, against a real PostgreSQL and a real S3 server.

mod common;

use common::*;
use reqwest::Method;

#[tokio::test]
async fn same_content_in_a_dataset_is_stored_once() {
    let app = TestApp::spawn().await;
    let key = app.register("dev-d").await;
    let data = file(3000, 7);
    let first = upload(&app, &key, "dev-d", Some("runs"), "a.bin", &data).await;
    // Not before the API has hashed the stored object: until then the same content is
    // uploaded again.
    let unverified = upload(&app, &key, "dev-d", Some("runs"), "early.bin", &data).await;
    assert_eq!(unverified["deduplicated_from"], Value::Null, "{unverified}");
    assert_ne!(unverified["object_key"], first["object_key"]);
    check_digests(&app).await;
    let second = upload(&app, &key, "dev-d", Some("runs"), "again.bin", &data).await;
    assert_eq!(second["state"], "completed", "{second}");
    assert_eq!(second["object_key"], first["object_key"]);
    assert_ne!(second["session_id"], first["session_id"]);
    let (_, view) = app
        .operator(
            Method::GET,
            &format!(
                "/v1/sessions/{}",
                second["session_id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(view["deduplicated_from"], first["session_id"], "{view}");
    // Nothing was presigned for the copy.
    let (parts,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM session_parts WHERE session_id = $1")
            .bind(Uuid::parse_str(second["session_id"].as_str().expect("id")).expect("uuid"))
            .fetch_one(&app.state.store.pool)
            .await
            .expect("count");
    assert_eq!(parts, 0);
    // Another dataset, or other bytes, are uploaded.
    let other = upload(&app, &key, "dev-d", Some("other"), "a.bin", &data).await;
    assert_ne!(other["object_key"], first["object_key"]);
    let changed = upload(&app, &key, "dev-d", Some("runs"), "a.bin", &file(3000, 8)).await;
    assert_ne!(changed["object_key"], first["object_key"]);
    // The dataset manifest lists each object once.
    let (_, m) = app
        .operator(
            Method::GET,
            "/v1/projects/default/datasets/runs/manifest",
            None,
        )
        .await;
    assert_eq!(m["objects"].as_array().expect("objects").len(), 3, "{m}");
}

#[tokio::test]
async fn completion_keeps_the_device_signed_manifest() {
    let app = TestApp::spawn().await;
    let key = app.register("dev-m").await;
    let data = file(4000, 3);
    let done = upload(&app, &key, "dev-m", None, "m.bin", &data).await;
    let sid = done["session_id"].as_str().expect("id");
    let (status, custody) = app
        .operator(Method::GET, &format!("/v1/sessions/{sid}/manifest"), None)
        .await;
    assert_eq!(status, 200, "{custody}");
    assert_eq!(custody["signature_valid"], true, "{custody}");
    assert_eq!(custody["parts_digest_valid"], true, "{custody}");
    assert_eq!(custody["manifest"]["sha256"], sha256_hex(&data));
    assert_eq!(custody["manifest"]["path"], "/data/m.bin");
    assert_eq!(custody["part_digests"][0], md5_b64(&data));
    // The audit log refuses changes...
    let refused =
        sqlx::query("UPDATE audit_events SET actor = 'someone' WHERE action = 'session.manifest'")
            .execute(&app.state.store.pool)
            .await
            .expect_err("audit_events is append-only");
    assert!(refused.to_string().contains("append-only"), "{refused}");
    sqlx::query("DELETE FROM audit_events WHERE action = 'session.manifest'")
        .execute(&app.state.store.pool)
        .await
        .expect_err("audit_events is append-only");
    // ...but someone who owns the database can turn that off. Tampering is still detected.
    sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        .execute(&app.state.store.pool)
        .await
        .expect("disable");
    sqlx::query(
        "UPDATE audit_events SET detail = jsonb_set(detail, '{signed_request,body}', to_jsonb(replace(detail->'signed_request'->>'body', 'm.bin', 'x.bin')))
         WHERE action = 'session.manifest'",
    )
    .execute(&app.state.store.pool)
    .await
    .expect("tamper");
    let (_, custody) = app
        .operator(Method::GET, &format!("/v1/sessions/{sid}/manifest"), None)
        .await;
    assert_eq!(custody["signature_valid"], false, "{custody}");

    // A manifest that does not match the session is refused, and nothing completes.
    let other = file(2000, 4);
    let (_, created) = app
        .device(
            &key,
            "dev-m",
            "session.create",
            &rid(),
            &create_in(Uuid::new_v4(), &other, None, "o.bin"),
        )
        .await;
    let sid = created["session_id"].as_str().expect("id");
    let (status, p) = app
        .device(
            &key,
            "dev-m",
            "session.complete",
            &rid(),
            &json!({"session_id": sid, "manifest": {
            "device_id": "dev-m", "session_id": sid, "path": "/o.bin", "size": 2000,
            "sha256": sha256_hex(&data), "part_count": 1, "parts_digest": "00"}}),
        )
        .await;
    assert_eq!(status, 422, "{p}");
    assert_eq!(p["code"], "manifest_mismatch");
    assert!(
        p["detail"].as_str().expect("detail").contains("sha256"),
        "{p}"
    );
}

/// A device that hashes while its parts upload opens the session without the file's
/// SHA-256: nothing is deduplicated at create, completion needs the manifest (which names
/// the SHA-256), and the digest worker checks the stored bytes against it.
#[tokio::test]
async fn sha256_can_come_with_the_manifest_instead_of_at_create() {
    let app = TestApp::spawn().await;
    let key = app.register("dev-s").await;
    let data = file(5 * MIB + 3, 9);
    // The same bytes stored and verified first: a create with the SHA-256 would dedupe.
    let first = upload(&app, &key, "dev-s", None, "a.bin", &data).await;
    check_digests(&app).await;

    let mut body = create_in(Uuid::new_v4(), &data, None, "b.bin");
    body.as_object_mut().expect("object").remove("sha256");
    let (status, created) = app
        .device(&key, "dev-s", "session.create", &rid(), &body)
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created["state"], "created",
        "no dedupe without a SHA-256: {created}"
    );
    let sid = created["session_id"].as_str().expect("id").to_string();
    let md5s = put_parts(&app, &key, "dev-s", &sid, &data).await;

    // Without the manifest the API does not know what it is completing.
    let (status, refused) = app
        .device(
            &key,
            "dev-s",
            "session.complete",
            &rid(),
            &json!({"session_id": sid}),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["code"], "manifest_required", "{refused}");

    let digest = uplink_protocol::ops::parts_digest(
        md5s.iter()
            .enumerate()
            .map(|(i, m)| ((i + 1) as u32, m.as_str())),
    );
    let manifest = |sha256: String| {
        json!({"session_id": sid, "manifest": {"device_id": "dev-s", "session_id": sid,
            "path": "/data/b.bin", "size": data.len(), "sha256": sha256,
            "part_count": md5s.len(), "parts_digest": digest}})
    };
    let (status, bad) = app
        .device(
            &key,
            "dev-s",
            "session.complete",
            &rid(),
            &manifest("XYZ".into()),
        )
        .await;
    assert_eq!(
        (status, &bad["code"]),
        (422, &json!("manifest_mismatch")),
        "{bad}"
    );

    let (status, done) = app
        .device(
            &key,
            "dev-s",
            "session.complete",
            &rid(),
            &manifest(sha256_hex(&data)),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "completed");
    assert_eq!(done["sha256"], sha256_hex(&data));
    assert_ne!(done["object_key"], first["object_key"]);
    check_digests(&app).await;
    let (_, view) = app
        .operator(Method::GET, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(view["digest_check"], "verified", "{view}");
}
