//! An agent killed with SIGKILL mid-upload and started again with the same state directory
//! finishes the upload in the same session, and sends again at most the parts that were in
//! flight (concurrency × part size).
//!
//! How re-sent bytes are measured: the control API's `s3.public_endpoint` points at a TCP
//! proxy in the test ([`uplink_e2e::proxy`]), so every byte the agent sends to storage
//! passes through it and is counted (request headers and part bodies). The total over the
//! whole run minus the file size is what was sent more than once, plus the HTTP request
//! headers, which are allowed for with [`HEADER_ALLOWANCE`].

use std::time::Duration;

use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

/// Headers of the PUT requests (a presigned URL and a few headers each, about 1 KiB; a
/// 64 MiB upload in 5 MiB parts makes some 15–20 of them).
const HEADER_ALLOWANCE: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_upload_resumes_and_resends_at_most_in_flight_parts() {
    let stack = Stack::start(StackOptions::default()).await;
    let opts = AgentOptions {
        concurrency: 2,
        part_size_mib: 5,
        ..AgentOptions::default()
    };
    let dev = stack.add_device(&opts).await;
    let file = stack.source_file(&dev, "rec/crash.bin", 64 * MIB).await;

    // 8 MiB/s: the 64 MiB upload takes ~8 s, long enough to be caught mid-way.
    stack.proxy.set_rate(Some(8 * MIB));
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;

    // Kill once about a third of the file went through (several parts done, two in flight).
    let kill_at = 24 * MIB;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while stack.proxy.bytes_sent() < kill_at {
        let cmd = stack.command(&command_id).await;
        let state = cmd["state"].as_str().unwrap_or("");
        assert!(
            !matches!(state, "done" | "failed" | "rejected" | "expired"),
            "the command ended ({cmd}) before {kill_at} bytes reached storage"
        );
        stack.assert_alive();
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} bytes reached storage within 120 s",
            stack.proxy.bytes_sent()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.kill_agent(&dev);
    let sent_at_kill = stack.proxy.bytes_sent();
    let cmd_at_kill = stack.command(&command_id).await;
    let sessions_at_kill = stack.sessions(&dev.id).await;
    eprintln!(
        "killed the agent after {sent_at_kill} bytes; command {cmd_at_kill}; sessions {sessions_at_kill:?}"
    );
    assert!(
        sent_at_kill < file.size,
        "the whole file had already gone through when the agent was killed"
    );
    assert_ne!(
        cmd_at_kill["state"], "done",
        "killed too late: {cmd_at_kill}"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.proxy.set_rate(None);
    stack.restart_agent(&dev);

    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(240))
        .await;
    let session = stack.verify_upload(&file, &cmd).await;

    let sessions = stack.sessions(&dev.id).await;
    assert_eq!(
        sessions.len(),
        1,
        "the restarted agent must resume its session, not open another: {sessions:?}"
    );
    if let Some(before) = sessions_at_kill.first() {
        assert_eq!(
            before["session_id"], session["session_id"],
            "resumed in the same session"
        );
    }

    let total = stack.proxy.bytes_sent();
    let resent = total.saturating_sub(file.size);
    let bound = u64::from(opts.concurrency) * opts.part_size_mib * MIB;
    eprintln!(
        "file {} bytes; sent to storage {total} bytes in all ({sent_at_kill} before the kill); \
         re-sent + headers {resent} bytes; allowed {bound} + {HEADER_ALLOWANCE}",
        file.size
    );
    assert!(
        resent <= bound + HEADER_ALLOWANCE,
        "the agent sent {resent} bytes more than the file's {} (bound: concurrency {} × part \
         size {} MiB = {bound}, plus {HEADER_ALLOWANCE} for headers): it re-sent parts that \
         were already stored",
        file.size,
        opts.concurrency,
        opts.part_size_mib
    );
}
