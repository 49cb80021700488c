//! `uplinkctl put`: uploads from a workstation, with the real binary against the stack. The
//! presigned URLs point at the test proxy, which counts (and can slow) what reaches storage.
//!
//! - a multi-part file arrives byte-identical, in a session owned by the API key;
//! - killed with SIGKILL mid-way and run again, it resumes the same session and sends
//!   fewer bytes than the file;
//! - a viewer key is refused with a clear message and exit code 3; a quota too small is
//!   refused with the API's reason.

use std::time::Duration;

use serde_json::{json, Value};
use uplink_e2e::ctl::{Ctl, CtlRun};
use uplink_e2e::files::{s3_download, sha256_file, write_random_file, SourceFile};
use uplink_e2e::{Stack, StackOptions, MIB};

async fn key(stack: &Stack, role: &str, project: &str) -> String {
    let reply = stack
        .operator(
            reqwest::Method::POST,
            "/v1/keys",
            Some(json!({"name": format!("{role} key"), "role": role, "project_id": project})),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    reply.body["token"].as_str().expect("token").to_string()
}

async fn stored_sha256(stack: &Stack, session: &Value) -> String {
    let dest = stack.dir.path().join(uplink_e2e::unique("download"));
    let code = s3_download(
        &stack.env,
        session["bucket"].as_str().expect("bucket"),
        session["object_key"].as_str().expect("key"),
        &dest,
    )
    .await;
    assert_eq!(code, 200);
    let (sha, _) = sha256_file(&dest);
    std::fs::remove_file(&dest).ok();
    sha
}

/// A `put` that ended well: its last line is `done` with the file's SHA-256, and the
/// session it names is completed with the file's bytes in storage. Returns the session.
async fn completed(stack: &Stack, run: &CtlRun, f: &SourceFile) -> Value {
    assert_eq!(run.code, Some(0), "{run}");
    let done = run.json_lines().pop().expect("a final line");
    assert_eq!(done["event"], "done", "{run}");
    assert_eq!(done["sha256"], f.sha256.as_str(), "{run}");
    let session = stack
        .session(done["session_id"].as_str().expect("session_id"))
        .await;
    assert_eq!(session["state"], "completed", "{session}");
    assert_eq!(stored_sha256(stack, &session).await, f.sha256);
    session
}

async fn file(stack: &Stack, name: &str, size: u64) -> SourceFile {
    write_random_file(&stack.dir.path().join("workstation").join(name), size).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_uploads_a_multi_part_file_byte_identical() {
    let stack = Stack::start(StackOptions::default()).await;
    let ctl = Ctl::with_token(&stack, &key(&stack, "operator", "default").await);
    let f = file(&stack, "run-042.mcap", 12 * MIB + 7).await;
    let run = ctl
        .run(&[
            "--json",
            "put",
            f.path_str(),
            "--part-size",
            "5MiB",
            "--concurrency",
            "3",
        ])
        .await;
    let session = completed(&stack, &run, &f).await;
    assert!(
        run.json_lines().iter().any(|l| l["event"] == "progress"),
        "progress lines before the end: {run}"
    );
    assert_eq!(session["part_count"], 3, "{session}");
    assert_eq!(session["device_id"], Value::Null, "{session}");
    assert!(
        session["owner"]
            .as_str()
            .is_some_and(|o| o.starts_with("key:")),
        "{session}"
    );
    let sent = stack.proxy.bytes_sent();
    assert!(
        (f.size..f.size + 64 * 1024).contains(&sent),
        "{sent} bytes through the proxy for a {} byte file",
        f.size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_killed_mid_way_resumes_without_sending_everything_again() {
    let stack = Stack::start(StackOptions::default()).await;
    let ctl = Ctl::with_token(&stack, &key(&stack, "operator", "default").await);
    let f = file(&stack, "big.bin", 20 * MIB).await;
    // 4 parts of 5 MiB, one at a time, at 2 MiB/s: killed once two parts are through.
    stack.proxy.set_rate(Some(2 * MIB));
    let mut first = ctl
        .command(&[
            "--json",
            "put",
            f.path_str(),
            "--part-size",
            "5MiB",
            "--concurrency",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn uplinkctl put");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stack.proxy.bytes_sent() < 11 * MIB {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first put sent only {} bytes in 60 s",
            stack.proxy.bytes_sent()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.start_kill().expect("SIGKILL");
    let status = first.wait().await.expect("wait");
    assert!(!status.success(), "killed, not finished: {status}");
    stack.proxy.set_rate(None);
    let before = stack.proxy.bytes_sent();

    let run = ctl
        .run(&[
            "--json",
            "put",
            f.path_str(),
            "--part-size",
            "5MiB",
            "--concurrency",
            "1",
        ])
        .await;
    completed(&stack, &run, &f).await;
    assert!(run.stderr.contains("resuming"), "{run}");
    let again = stack.proxy.bytes_sent() - before;
    assert!(
        again < f.size - 5 * MIB,
        "the resumed put sent {again} bytes of a {} byte file: parts storage held were sent again",
        f.size
    );
    // One session for the file, not one per run.
    let all = stack.get_json("/v1/sessions?project=default").await;
    let count = all.body.as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(count, 1, "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_is_refused_for_viewers_and_over_quota() {
    let stack = Stack::start(StackOptions::default()).await;
    let viewer = Ctl::with_token(&stack, &key(&stack, "viewer", "default").await);
    let f = file(&stack, "small.bin", 1000).await;
    let run = viewer.run(&["put", f.path_str()]).await;
    assert_eq!(run.code, Some(3), "{run}");
    assert!(
        run.stderr.contains("403 forbidden"),
        "one clear line naming the refusal: {run}"
    );
    assert!(
        !run.stderr.contains(&viewer.token),
        "the token is never printed: {run}"
    );

    let reply = stack
        .operator(
            reqwest::Method::PATCH,
            "/v1/projects/default",
            Some(json!({"quota_bytes": 500})),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    let operator = Ctl::with_token(&stack, &key(&stack, "operator", "default").await);
    let run = operator.run(&["put", f.path_str()]).await;
    assert_eq!(run.code, Some(3), "{run}");
    assert!(
        run.stderr.contains("413 quota_exceeded"),
        "the API's reason: {run}"
    );
}
