//! The agent uploads only regular files under its allowed roots: anything else is rejected
//! with a reason and opens no session.

use std::time::Duration;

use uplink_e2e::{AgentOptions, Device, Stack, StackOptions};

/// Sends an upload command for `path` and expects `rejected` with a reason.
async fn assert_rejected(stack: &Stack, dev: &Device, path: &str) {
    let command_id = stack.upload_command(&dev.id, path).await;
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(60))
        .await;
    assert_eq!(cmd["state"], "rejected", "upload of {path}: {cmd}");
    let reason = cmd["reason"].as_str().unwrap_or("");
    assert!(
        !reason.trim().is_empty(),
        "rejection of {path} needs a reason: {cmd}"
    );
    assert!(
        cmd["session_id"].is_null(),
        "rejected command has a session: {cmd}"
    );
    eprintln!("{path}: rejected: {reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_allowed_roots_are_rejected() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.add_device(&AgentOptions::default()).await;

    // A file outside the root, next to it.
    let outside = uplink_e2e::files::write_random_file(&dev.dir.join("outside.bin"), 1000).await;
    // A symlink inside the root to a file outside it.
    let link = dev.root.join("link-to-passwd");
    std::os::unix::fs::symlink("/etc/passwd", &link).expect("symlink");
    let link2 = dev.root.join("link-to-outside");
    std::os::unix::fs::symlink(&outside.path, &link2).expect("symlink");

    assert_rejected(&stack, &dev, "/etc/passwd").await;
    assert_rejected(&stack, &dev, link.to_str().expect("utf-8")).await;
    assert_rejected(&stack, &dev, link2.to_str().expect("utf-8")).await;
    let dotdot = format!("{}/../outside.bin", dev.root.display());
    assert_rejected(&stack, &dev, &dotdot).await;
    // A relative path: the control API may refuse it up front (422), else the agent must.
    let reply = stack
        .operator(
            reqwest::Method::POST,
            &format!("/v1/devices/{}/commands", dev.id),
            Some(serde_json::json!({ "type": "upload", "path": "relative/path.bin" })),
        )
        .await;
    if reply.status == 422 {
        assert!(
            reply.is_problem(),
            "422 must be a problem document: {reply}"
        );
    } else {
        assert_eq!(reply.status, 201, "upload of a relative path: {reply}");
        let id = reply.body["command_id"].as_str().expect("command_id");
        let cmd = stack.wait_command_final(id, Duration::from_secs(60)).await;
        assert_eq!(cmd["state"], "rejected", "upload of a relative path: {cmd}");
    }
    assert_rejected(&stack, &dev, dev.root.to_str().expect("utf-8")).await;

    let sessions = stack.sessions(&dev.id).await;
    assert!(
        sessions.is_empty(),
        "rejected uploads opened sessions: {sessions:?}"
    );

    // The same agent still uploads a file that is inside its root.
    let good = stack.source_file(&dev, "ok/inside.bin", 4096).await;
    stack
        .upload_and_verify(&dev, &good, Duration::from_secs(120))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_inside_the_root_is_rejected() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.add_device(&AgentOptions::default()).await;
    let fifo = dev.root.join("pipe");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo failed");
    assert_rejected(&stack, &dev, fifo.to_str().expect("utf-8")).await;
    let sessions = stack.sessions(&dev.id).await;
    assert!(
        sessions.is_empty(),
        "a FIFO upload opened a session: {sessions:?}"
    );
}
