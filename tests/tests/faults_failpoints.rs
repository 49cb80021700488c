//! Crashes at the two moments a SIGKILL at a random time rarely hits: the agent dies
//! (`abort`, like a power cut) right after storage took a part but before the part is
//! committed to `agent.db`, and right after the control API completed the session but before
//! the job is marked done. Started again normally, the agent finishes the job in the same
//! session, does not send again what storage already holds, and the command's `done` ack is
//! recorded exactly once.
//!
//! The crash points are the agent's failpoints (`edge-agent/src/failpoint.rs`, cargo feature
//! `failpoints`, armed with `UPLINK_FAILPOINTS`); the e2e crate enables the feature, so the
//! agent of a `cargo build --workspace` (or `scripts/test`) has them.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use uplink_e2e::{AgentOptions, Device, SourceFile, Stack, StackOptions, MIB};

/// Request headers of a few PUTs (a presigned URL and some headers each, about 1 KiB).
const HEADER_ALLOWANCE: u64 = 64 * 1024;
const SIGABRT: i32 = 6;

fn agent(failpoints: Option<&str>) -> AgentOptions {
    AgentOptions {
        // One part at a time: the crash moment is exact (which parts storage holds).
        concurrency: 1,
        part_size_mib: 5,
        env: failpoints
            .map(|f| vec![("UPLINK_FAILPOINTS".to_string(), f.to_string())])
            .unwrap_or_default(),
        ..AgentOptions::default()
    }
}

/// Starts an agent armed with `failpoint`, runs the upload of `file` until the agent
/// aborts there, and returns the command id.
async fn crash_at(stack: &Stack, dev: &Device, file: &SourceFile, failpoint: &str) -> String {
    stack
        .wait_agent_log(
            dev,
            "Failpoints compiled in",
            Duration::from_secs(20),
            "the agent has no failpoints: build it together with the tests \
             (`cargo build --workspace` or scripts/test), not with `cargo build -p uplink-agent`",
        )
        .await;
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    let status = stack.wait_agent_exit(dev, Duration::from_secs(60)).await;
    assert_eq!(
        status.signal(),
        Some(SIGABRT),
        "the agent must die at failpoint {failpoint}, it ended {status}"
    );
    let name = failpoint.split('=').next().unwrap_or(failpoint);
    stack
        .wait_agent_log(
            dev,
            &format!("failpoint {name}: abort"),
            Duration::from_secs(1),
            "the agent died elsewhere than at its failpoint",
        )
        .await;
    command_id
}

/// Restarts the agent without failpoints and checks the upload completes as after any
/// fault, with one `done` ack recorded and no more than `file.size` sent in all.
async fn restart_and_verify(stack: &Stack, dev: &Device, file: &SourceFile, command_id: &str) {
    stack.start_agent(dev, &agent(None));
    let cmd = stack
        .wait_command_final(command_id, Duration::from_secs(90))
        .await;
    stack.verify_fault_upload(dev, file, &cmd).await;
    let sent = stack.proxy.bytes_sent();
    eprintln!(
        "{sent} bytes sent to storage in all for {} bytes",
        file.size
    );
    assert!(
        sent < file.size + HEADER_ALLOWANCE,
        "{sent} bytes sent for a {} byte file: a part storage already held was sent again",
        file.size
    );
    assert_eq!(
        stack.acks_recorded(command_id, "done").await,
        1,
        "the done ack is recorded exactly once: {:?}",
        stack.audit(command_id).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_part_put_and_commit() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.add_device(&agent(Some("part-before-commit=2"))).await;
    // Parts of 5, 5 and 2 MiB: the agent dies once storage holds part 2, which agent.db
    // does not know about (part 1 is committed).
    let file = stack.source_file(&dev, "fp/part.bin", 12 * MIB).await;
    let command_id = crash_at(&stack, &dev, &file, "part-before-commit").await;
    let sent = stack.proxy.bytes_sent();
    assert!(
        (10 * MIB..file.size).contains(&sent),
        "parts 1 and 2, not 3, were sent before the crash: {sent} bytes"
    );
    let cmd = stack.command(&command_id).await;
    assert_ne!(cmd["state"], "done", "not done before the crash: {cmd}");
    restart_and_verify(&stack, &dev, &file, &command_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_complete_and_marking_done() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.add_device(&agent(Some("complete-before-done"))).await;
    let file = stack.source_file(&dev, "fp/complete.bin", 7 * MIB).await;
    let command_id = crash_at(&stack, &dev, &file, "complete-before-done").await;
    // Storage and the API finished; the agent did not record it nor ack it.
    let sessions = stack.sessions(&dev.id).await;
    assert_eq!(sessions.len(), 1, "one session: {sessions:?}");
    assert_eq!(
        sessions[0]["state"], "completed",
        "the API completed the session before the crash: {sessions:?}"
    );
    let cmd = stack.command(&command_id).await;
    assert_ne!(cmd["state"], "done", "the done ack was never sent: {cmd}");
    restart_and_verify(&stack, &dev, &file, &command_id).await;
}
