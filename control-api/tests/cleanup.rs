//! The cleanup worker against a real PostgreSQL and a real S3 server: idle sessions expire,
//! orphan multipart uploads under the key prefix are aborted after the grace period, live
//! uploads and fresh intents are left alone.

mod common;

use common::*;

#[tokio::test]
async fn cleanup_expires_idle_sessions_and_aborts_orphans() {
    let mut app = TestApp::spawn().await;
    let key = app.register("robot-cl").await;
    let data = file(5 * MIB + 1, 4);
    let (_, idle) = app
        .device(
            &key,
            "robot-cl",
            "session.create",
            &rid(),
            &create_body(Uuid::new_v4(), &data, 5 * MIB),
        )
        .await;
    let (_, fresh) = app
        .device(
            &key,
            "robot-cl",
            "session.create",
            &rid(),
            &create_body(Uuid::new_v4(), &data, 5 * MIB),
        )
        .await;
    let idle_id: Uuid = idle["session_id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("uuid");
    sqlx::query("UPDATE sessions SET updated_at = now() - interval '2 days' WHERE session_id = $1")
        .bind(idle_id)
        .execute(&app.state.store.pool)
        .await
        .expect("backdate");
    // An upload no session knows: the API died between recording its intent and writing
    // the session.
    let prefix = app.state.config.s3.key_prefix.clone();
    let orphan_key = format!("{prefix}default/default/robot-cl/orphan/file.bin");
    let bucket = app.state.storage.bucket.clone();
    let orphan_obj = uplink_api::storage::Object {
        bucket: &bucket,
        key: &orphan_key,
    };
    sqlx::query("INSERT INTO upload_intents (bucket, object_key) VALUES ($1, $2)")
        .bind(&bucket)
        .bind(&orphan_key)
        .execute(&app.state.store.pool)
        .await
        .expect("intent");
    let orphan = app
        .state
        .storage
        .create_multipart(&orphan_obj, &Default::default(), Default::default())
        .await
        .expect("create orphan");
    // An upload another tool started under the prefix, straight in S3: no session, no intent.
    let foreign_key = format!("{prefix}by-another-tool/dump.bin");
    let foreign = app
        .state
        .storage
        .create_multipart(
            &uplink_api::storage::Object {
                bucket: &bucket,
                key: &foreign_key,
            },
            &Default::default(),
            Default::default(),
        )
        .await
        .expect("create foreign upload");
    // An upload being created: its intent is committed, its session not yet.
    let creating_key = format!("{prefix}default/default/robot-cl/creating/file.bin");
    sqlx::query("INSERT INTO upload_intents (bucket, object_key) VALUES ($1, $2)")
        .bind(&bucket)
        .bind(&creating_key)
        .execute(&app.state.store.pool)
        .await
        .expect("intent");
    let creating = app
        .state
        .storage
        .create_multipart(
            &uplink_api::storage::Object {
                bucket: &bucket,
                key: &creating_key,
            },
            &Default::default(),
            Default::default(),
        )
        .await
        .expect("create in-flight upload");
    // Within the grace period nothing is an orphan yet.
    let report = uplink_api::cleanup::run_once(&app.state)
        .await
        .expect("cleanup");
    assert_eq!(report.expired_sessions, 1);
    assert_eq!(report.aborted_orphans, 0, "{report:?}");
    assert!(upload_exists(&app, &foreign_key, &foreign).await);
    assert!(upload_exists(&app, &orphan_key, &orphan).await);

    // Past a 3 s grace period (by storage's Initiated time) ...
    let mut config = (*app.state.config).clone();
    config.cleanup.orphan_grace_secs = 3;
    app.state.config = std::sync::Arc::new(config);
    tokio::time::sleep(std::time::Duration::from_millis(4100)).await;
    // ... except the create still in flight: its intent is within the grace period (as
    // when storage's clock runs behind ours), so its key is skipped whatever Initiated says.
    sqlx::query("UPDATE upload_intents SET created_at = now() WHERE object_key = $1")
        .bind(&creating_key)
        .execute(&app.state.store.pool)
        .await
        .expect("refresh intent");
    let report = uplink_api::cleanup::run_once(&app.state)
        .await
        .expect("cleanup");
    assert_eq!(report.expired_sessions, 0);
    assert_eq!(report.aborted_orphans, 2, "{report:?}");

    let (_, view) = app
        .operator(
            reqwest::Method::GET,
            &format!("/v1/sessions/{idle_id}"),
            None,
        )
        .await;
    assert_eq!(view["state"], "expired");
    let s = app
        .state
        .store
        .session(idle_id)
        .await
        .expect("db")
        .expect("row");
    let gone = app
        .state
        .storage
        .list_parts(&s.object(), s.upload_id.as_deref().expect("upload id"))
        .await;
    assert!(
        gone.is_err(),
        "the idle session's multipart upload must be aborted"
    );
    assert!(
        !upload_exists(&app, &orphan_key, &orphan).await,
        "orphan must be aborted"
    );
    assert!(
        !upload_exists(&app, &foreign_key, &foreign).await,
        "an upload under the prefix that no session knows must be aborted"
    );
    assert!(
        upload_exists(&app, &creating_key, &creating).await,
        "an upload whose key has a fresh intent is being created: never aborted"
    );
    let intents: Vec<String> =
        sqlx::query_scalar("SELECT object_key FROM upload_intents ORDER BY object_key")
            .fetch_all(&app.state.store.pool)
            .await
            .expect("intents");
    assert_eq!(
        intents,
        vec![creating_key.clone()],
        "stale intents are dropped"
    );
    // The live session and its upload are untouched.
    let fresh_id: Uuid = fresh["session_id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("uuid");
    let (_, view) = app
        .operator(
            reqwest::Method::GET,
            &format!("/v1/sessions/{fresh_id}"),
            None,
        )
        .await;
    assert_eq!(view["state"], "created");
    let live = app
        .state
        .store
        .session(fresh_id)
        .await
        .expect("db")
        .expect("row");
    assert!(
        app.state
            .storage
            .list_parts(
                &live.object(),
                live.upload_id.as_deref().expect("upload id")
            )
            .await
            .is_ok(),
        "a live session's upload must survive"
    );
    // Still being created (its intent kept fresh): nothing more to do.
    sqlx::query("UPDATE upload_intents SET created_at = now()")
        .execute(&app.state.store.pool)
        .await
        .expect("refresh intent");
    let again = uplink_api::cleanup::run_once(&app.state)
        .await
        .expect("cleanup");
    assert_eq!(
        again.expired_sessions + again.aborted_orphans,
        0,
        "{again:?}"
    );
    assert!(upload_exists(&app, &creating_key, &creating).await);
}

/// Whether storage still has multipart upload `upload_id` at `key` in the test bucket.
async fn upload_exists(app: &TestApp, key: &str, upload_id: &str) -> bool {
    let obj = uplink_api::storage::Object {
        bucket: &app.state.storage.bucket,
        key,
    };
    app.state.storage.list_parts(&obj, upload_id).await.is_ok()
}
