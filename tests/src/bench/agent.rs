//! The agent's side of the bench: one upload command to a running agent, timed by the
//! API's stamps from the command to its `done` ack and checked byte-identical; and the memory mode
//! (many uploads through one agent, its resident memory after each).

use std::time::{Duration, Instant};

use serde_json::Value;

use super::proc::{cpu_secs_of, peak_rss_kib, read_bytes_of, rss_kib, server_cpu_secs};
use crate::files::SourceFile;
use crate::stack::{AgentOptions, Device, Stack};
use crate::MIB;

/// An agent upload's time, in seconds between the API's own timestamps.
#[derive(Debug, Clone, Copy)]
pub struct Split {
    /// Command accepted → session created: delivery, planning, and the whole-file hash of
    /// a file hashed first.
    pub to_session: f64,
    /// Session created → completion asked for (`completing`): the presigns, the hash pass
    /// beside the upload, the PUTs.
    pub parts: f64,
    /// `completing` → `completed`: the API's ListParts, CompleteMultipartUpload and checks.
    pub completion: f64,
    /// Session completed → the command's `done` recorded: the agent's ack.
    pub ack: f64,
}

/// One agent upload.
#[derive(Debug, Clone, Copy)]
pub struct AgentMeasure {
    /// Command accepted → `done` recorded (the API's timestamps).
    pub end_to_end: f64,
    /// Session created → completed (the API's timestamps).
    pub upload_phase: f64,
    /// Where the time went, from the API's timestamps.
    pub split: Split,
    pub cpu_secs: f64,
    pub peak_rss_kib: u64,
    /// Bytes the agent read from storage between the command and `done` (`/proc/PID/io`).
    pub read_bytes: u64,
    /// The S3 server's CPU seconds from the command to `done`.
    pub server_cpu_secs: f64,
}

/// The agent options of a bench setting: `part_mib` parts, `concurrency` in flight.
pub fn options(part_mib: u64, concurrency: u32) -> AgentOptions {
    AgentOptions {
        concurrency,
        part_size_mib: part_mib,
        request_timeout_secs: 10,
        ..AgentOptions::default()
    }
}

/// Has the device's agent upload `file` (under its root): timed from the command to `done`,
/// the object checked byte-identical to the file, then deleted from storage. Panics when
/// the upload does not end `done`.
pub async fn agent_upload(stack: &Stack, dev: &Device, file: &SourceFile) -> AgentMeasure {
    let pid = stack.agent_pid(dev).expect("agent running");
    let cpu_before = cpu_secs_of(pid).expect("read the agent's /proc/PID/stat");
    let read_before = read_bytes_of(pid).expect("read the agent's /proc/PID/io");
    let server_before = server_cpu_secs();
    let started = Instant::now();
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(1800))
        .await;
    let waited = started.elapsed().as_secs_f64();
    let cpu_secs = cpu_secs_of(pid).expect("agent /proc/PID/stat") - cpu_before;
    let server_cpu_secs = server_cpu_secs() - server_before;
    let read_bytes = read_bytes_of(pid).expect("agent /proc/PID/io") - read_before;
    let peak_rss_kib = peak_rss_kib(pid).expect("read /proc/PID/status of the agent");
    // Verified: the stored object is byte-identical (downloaded and hashed).
    let session = stack.verify_upload(file, &cmd).await;
    let (bucket, key) = (
        session["bucket"].as_str().expect("bucket"),
        session["object_key"].as_str().expect("key"),
    );
    crate::files::s3_delete(&stack.env, bucket, key).await;
    let at = |v: &Value, k: &str| {
        chrono::DateTime::parse_from_rfc3339(v[k].as_str().expect("timestamp"))
            .expect("rfc3339")
            .timestamp_micros() as f64
            / 1e6
    };
    // From the API's own stamps: the command accepted → its `done` recorded (the harness
    // polls the command, which would add up to a poll interval).
    let end_to_end = at(&cmd, "updated_at") - at(&cmd, "created_at");
    assert!(
        end_to_end > 0.0 && end_to_end <= waited,
        "command → done from the API's stamps ({end_to_end:.3} s) must lie within the wait ({waited:.3} s): {cmd}"
    );
    // The session's move to `completing` is in the audit log, with its time.
    let sid = session["session_id"].as_str().expect("session_id");
    let audit = stack.audit(sid).await;
    let completing = audit
        .iter()
        .find(|e| e["action"] == "session.transition" && e["detail"]["to"] == "completing")
        .unwrap_or_else(|| panic!("no transition to completing audited for {sid}: {audit:?}"));
    let completing = at(completing, "at");
    let (created, completed) = (at(&session, "created_at"), at(&session, "completed_at"));
    AgentMeasure {
        end_to_end,
        upload_phase: completed - created,
        split: Split {
            to_session: created - at(&cmd, "created_at"),
            parts: completing - created,
            completion: completed - completing,
            ack: at(&cmd, "updated_at") - completed,
        },
        cpu_secs,
        peak_rss_kib,
        read_bytes,
        server_cpu_secs,
    }
}

/// [`agent_upload`] of a fresh file of `size` random bytes named `name`, removed after.
pub async fn agent_once(stack: &Stack, dev: &Device, size: u64, name: &str) -> AgentMeasure {
    let file = stack.source_file(dev, name, size).await;
    let m = agent_upload(stack, dev, &file).await;
    std::fs::remove_file(&file.path).ok();
    m
}

/// `uploads` uploads of `size` bytes through one agent (8 MiB × 4), each verified: its
/// resident memory after each, and its peak at the end.
pub async fn memory_run(stack: &Stack, size: u64, uploads: usize) {
    let dev = stack.add_device(&options(8, 4)).await;
    let pid = stack.agent_pid(&dev).expect("agent running");
    let mut after = Vec::with_capacity(uploads);
    for n in 0..uploads {
        agent_once(stack, &dev, size, &format!("bench-{}-{n}.bin", size / MIB)).await;
        after.push(rss_kib(pid).expect("read /proc/PID/status of the agent"));
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut marks: Vec<usize> = [1, 10, 25, 50, uploads]
        .into_iter()
        .filter(|&n| n <= uploads)
        .collect();
    marks.dedup();
    let rss: Vec<String> = marks
        .iter()
        .map(|&n| format!("{n}: {:.1}", mib(after[n - 1])))
        .collect();
    println!(
        "memory: {uploads} upload(s) of {} MiB through one agent; RSS (MiB) after upload {}; peak {:.1} MiB",
        size / MIB,
        rss.join(", "),
        mib(peak_rss_kib(pid).unwrap_or(0))
    );
}
