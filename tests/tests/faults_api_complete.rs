//! The control API dies (`abort`, like SIGKILL) at each step of `session.complete`: after
//! storage's CompleteMultipartUpload, after the object's HEAD, and inside the completion's
//! transaction before its commit. Started again (without failpoints), the agent's retry of
//! the completion finishes it: the session ends with its whole record (SHA-256, ETag, size,
//! completion time, the signed manifest), the digest check runs, and the command's `done`
//! ack is recorded exactly once.
//!
//! The crash points are the API's failpoints (`service/src/failpoint.rs`, cargo feature
//! `failpoints` of uplink-api, enabled by the e2e crate).

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use uplink_e2e::{AgentOptions, Service, Stack, StackOptions, MIB};

const SIGABRT: i32 = 6;

async fn api_dies_at(failpoint: &str) {
    let stack = Stack::start(StackOptions::default()).await;
    stack
        .restart_api_with(&[("UPLINK_FAILPOINTS", failpoint)])
        .await;
    assert!(
        stack
            .log_of(Service::Api)
            .contains("Failpoints compiled in"),
        "the API has no failpoints: build it together with the tests \
         (`cargo build --workspace` or scripts/test)"
    );
    let dev = stack
        .add_device(&AgentOptions {
            part_size_mib: 5,
            ..AgentOptions::default()
        })
        .await;
    let file = stack.source_file(&dev, "rec/crash.bin", 6 * MIB).await;
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;

    let status = stack
        .wait_exit(Service::Api, Duration::from_secs(120))
        .await
        .unwrap_or_else(|| panic!("the API did not reach failpoint {failpoint} in 120 s"));
    assert_eq!(
        status.signal(),
        Some(SIGABRT),
        "the API must die at {failpoint}, it ended {status}"
    );
    assert!(
        stack
            .log_of(Service::Api)
            .contains(&format!("failpoint {failpoint}: abort")),
        "the API died elsewhere than at {failpoint}"
    );

    stack.restart_api_with(&[("UPLINK_FAILPOINTS", "")]).await;
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(180))
        .await;
    let session = stack.verify_upload(&file, &cmd).await;
    let sid = session["session_id"].as_str().expect("session_id");
    assert_eq!(session["bytes_done"].as_u64(), Some(file.size), "{session}");
    assert!(
        session["etag"].as_str().is_some_and(|e| !e.is_empty()),
        "{session}"
    );
    assert!(session["completed_at"].is_string(), "{session}");
    let custody = stack
        .get_json(&format!("/v1/sessions/{sid}/manifest"))
        .await;
    assert_eq!(
        custody.status, 200,
        "the signed manifest was lost: {custody}"
    );
    // Hashed while uploading with SHA-256 parts: the agent names no whole-file digest; the
    // API's read-back gave the session's (checked against the file by verify_upload).
    assert!(
        custody.body["manifest"].get("sha256").is_none(),
        "{custody}"
    );
    assert_eq!(custody.body["part_checksum"], "sha256", "{custody}");
    assert_eq!(custody.body["parts_digest_valid"], true, "{custody}");
    assert_eq!(custody.body["signature_valid"], true, "{custody}");
    assert_eq!(stack.acks_recorded(&command_id, "done").await, 1);
    let completions = stack
        .audit(sid)
        .await
        .into_iter()
        .filter(|e| e["action"] == "session.transition" && e["detail"]["to"] == "completed")
        .count();
    assert_eq!(completions, 1, "one move to completed in the audit log");

    let checked = stack.wait_digest_checked(sid).await;
    assert_eq!(checked["digest_check"], "verified", "{checked}");
    assert_eq!(checked["stored_sha256"], file.sha256.as_str(), "{checked}");
    assert!(stack
        .s3_open_uploads(&format!("default/default/{}/", dev.id))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_dies_after_storage_completed_the_upload() {
    api_dies_at("api-complete-after-storage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_dies_after_reading_the_object_back() {
    api_dies_at("api-complete-after-head").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_dies_before_the_completion_commits() {
    api_dies_at("api-complete-before-commit").await;
}

/// The API's database connection is cut while the completion's transaction is open (every
/// statement run, not committed): the commit fails, nothing of the completion is kept, the
/// device is told to retry, and its retry records the whole completion once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connection_dropped_before_the_completion_commits() {
    use sqlx::Connection as _;
    let stack = Stack::start(StackOptions::default()).await;
    stack
        .restart_api_with(&[
            ("UPLINK_FAILPOINTS", "api-complete-before-commit"),
            ("UPLINK_FAILPOINT_PAUSE_MS", "3000"),
        ])
        .await;
    let dev = stack
        .add_device(&AgentOptions {
            part_size_mib: 5,
            ..AgentOptions::default()
        })
        .await;
    let file = stack.source_file(&dev, "rec/cut.bin", 6 * MIB).await;
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !stack
        .log_of(Service::Api)
        .contains("failpoint api-complete-before-commit: pause")
    {
        stack.assert_alive();
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API did not reach api-complete-before-commit in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut admin = sqlx::PgConnection::connect(&stack.env.database_url)
        .await
        .expect("connect as the admin");
    let cut: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND state = 'idle in transaction'",
    )
    .bind(&stack.db.name)
    .fetch_all(&mut admin)
    .await
    .expect("terminate the completion's connection");
    // The completion's transaction, and the request's idempotency record (held open for the
    // request's duration, see docs/security.md).
    assert!(
        !cut.is_empty() && cut.iter().all(|(ok,)| *ok),
        "the completion's open transaction must be cut: {cut:?}"
    );

    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(180))
        .await;
    let session = stack.verify_upload(&file, &cmd).await;
    let sid = session["session_id"].as_str().expect("session_id");
    assert!(session["completed_at"].is_string(), "{session}");
    let custody = stack
        .get_json(&format!("/v1/sessions/{sid}/manifest"))
        .await;
    assert_eq!(
        custody.status, 200,
        "the signed manifest was lost: {custody}"
    );
    assert_eq!(stack.acks_recorded(&command_id, "done").await, 1);
    assert!(
        stack
            .log_of(Service::Api)
            .matches("Session completed")
            .count()
            == 1,
        "the first completion must not have been recorded"
    );
}
