//! Service faults during an upload: the bridge (with its embedded broker) restarted, the
//! control API restarted, Mosquitto restarted (external-broker mode), and the source file
//! changed while it is being sent (appended; rewritten in place at the same size, which
//! storage refuses as BadDigest until the job re-checks the file).

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

fn agent() -> AgentOptions {
    AgentOptions {
        concurrency: 2,
        part_size_mib: 5,
        ..AgentOptions::default()
    }
}

/// Starts a throttled 16 MiB upload, runs `fault` once 4 MiB went to storage, and checks
/// the upload finishes byte-identical in one session.
async fn upload_through(stack: &Stack, name: &str, fault: impl AsyncFnOnce(&Stack)) {
    let dev = stack.add_device(&agent()).await;
    let file = stack
        .source_file(&dev, &format!("svc/{name}.bin"), 16 * MIB)
        .await;
    // 16 MiB at 4 MiB/s: ~4 s of parts, so the fault lands mid-upload.
    stack.proxy.set_rate(Some(4 * MIB));
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    stack
        .wait_proxy_bytes(&command_id, 4 * MIB, Duration::from_secs(60))
        .await;
    eprintln!("{name}: fault at {} bytes", stack.proxy.bytes_sent());
    fault(stack).await;
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(180))
        .await;
    stack.verify_fault_upload(&dev, &file, &cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_restart_mid_upload() {
    let stack = Stack::start(StackOptions::default()).await;
    upload_through(&stack, "bridge", async |s: &Stack| s.restart_bridge().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_restart_mid_upload() {
    let stack = Stack::start(StackOptions {
        external_broker: true,
        ..StackOptions::default()
    })
    .await;
    upload_through(&stack, "mosquitto", async |s: &Stack| {
        s.restart_mosquitto().await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_restart_mid_upload() {
    let stack = Stack::start(StackOptions::default()).await;
    upload_through(&stack, "api", async |s: &Stack| {
        s.kill_api();
        // Down for a while: the agent's calls fail meanwhile.
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.restart_api().await
    })
    .await;
}

/// Starts a throttled upload, changes the source file with `change` once 2 MiB went to
/// storage, and checks the job fails with "file changed" and nothing is left in storage.
async fn change_during_upload(name: &str, change: impl FnOnce(&std::path::Path)) {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.add_device(&agent()).await;
    let file = stack
        .source_file(&dev, &format!("svc/{name}.bin"), 16 * MIB)
        .await;
    stack.proxy.set_rate(Some(2 * MIB));
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    stack
        .wait_proxy_bytes(&command_id, 2 * MIB, Duration::from_secs(60))
        .await;
    change(&file.path);
    stack.proxy.set_rate(None);
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(120))
        .await;
    eprintln!("command: {cmd}");
    assert_eq!(
        cmd["state"], "failed",
        "a changed file must fail the job: {cmd}"
    );
    let reason = cmd["reason"].as_str().unwrap_or("").to_lowercase();
    assert!(
        reason.contains("changed"),
        "the reason must say the file changed: {cmd}"
    );
    let sessions = stack.sessions(&dev.id).await;
    eprintln!("sessions: {sessions:?}");
    for s in sessions {
        assert_ne!(s["state"], "completed", "no completed object: {s}");
        if let (Some(bucket), Some(key)) = (s["bucket"].as_str(), s["object_key"].as_str()) {
            let dest = stack.dir.path().join("changed-download");
            let code = uplink_e2e::files::s3_download(&stack.env, bucket, key, &dest).await;
            assert_eq!(code, 404, "no object at s3://{bucket}/{key}");
        }
    }
    let open = stack.open_uploads_of(&dev).await;
    assert!(open.is_empty(), "multipart uploads left open: {open:?}");
    assert_eq!(stack.agent_db_integrity(&dev), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_file_appended_during_upload_fails_the_job() {
    change_during_upload("appended", |path| {
        // Append while parts are in flight (as a log writer would).
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open source for append");
        f.write_all(&[0x42; 4096]).expect("append");
        f.sync_all().expect("sync");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_file_rewritten_during_upload_fails_the_job() {
    change_during_upload("rewritten", |path| {
        // Same size, different bytes near the end (not sent yet).
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open source for writing");
        f.seek(SeekFrom::Start(15 * MIB)).expect("seek");
        f.write_all(&[0x42; 4096]).expect("rewrite");
        f.sync_all().expect("sync");
    })
    .await;
}
