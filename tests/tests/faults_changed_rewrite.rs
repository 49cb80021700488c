//! The source file rewritten in place (same size, 4 KiB at 15 MiB) while it is uploaded.
//! The changed part's PUT fails with BadDigest (its Content-MD5 is from hashing time); the
//! agent re-sends it, the job re-checks the file's identity (size, mtime, inode) and fails
//! with "file changed during upload". Nothing is completed.

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
    let open = stack.s3_open_uploads(&format!("devices/{}/", dev.id)).await;
    assert!(open.is_empty(), "multipart uploads left open: {open:?}");
    assert_eq!(stack.agent_db_integrity(&dev), "ok");
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
