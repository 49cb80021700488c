//! `uplink-bench`: the agent's upload throughput and memory against a baseline measured in
//! the same run: the same file PUT by parallel `curl` processes to presigned part URLs from
//! the same control API and S3 server. Run it through `scripts/bench`, which starts the
//! stack and builds everything in release mode.
//!
//! Environment: `UPLINK_BENCH_SIZES_MIB` (default `256,1024`: the agent's peak RSS is
//! reported for each size, to show it does not grow with the file; the curl baseline runs on
//! the largest), `UPLINK_BENCH_CONCURRENCY` (default 4), `UPLINK_BENCH_PART_MIB` (default 8).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest, Md5};
use serde_json::{json, Value};
use uplink_e2e::files::SourceFile;
use uplink_e2e::stack::{AgentOptions, Device, Stack, StackOptions};

const MIB: u64 = 1 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

/// Peak resident set size (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct AgentRun {
    size: u64,
    end_to_end: f64,
    upload_phase: f64,
    peak_rss_kib: u64,
}

async fn agent_run(
    stack: &Stack,
    opts: &AgentOptions,
    size: u64,
) -> (AgentRun, SourceFile, Device) {
    let dev = stack.add_device(opts).await;
    let file = stack
        .source_file(&dev, &format!("bench-{}.bin", size / MIB), size)
        .await;
    let started = Instant::now();
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(1800))
        .await;
    let end_to_end = started.elapsed().as_secs_f64();
    let pid = stack.agent_pid(&dev).expect("agent running");
    let peak = peak_rss_kib(pid).expect("read /proc/PID/status of the agent");
    // Verified: the stored object is byte-identical (downloaded and hashed).
    let session = stack.verify_upload(&file, &cmd).await;
    // The session is created after the hash pass: created → completed is the upload phase.
    let secs = |k: &str| {
        chrono::DateTime::parse_from_rfc3339(session[k].as_str().expect("timestamp"))
            .expect("rfc3339")
            .timestamp_micros() as f64
            / 1e6
    };
    let upload_phase = secs("completed_at") - secs("created_at");
    (
        AgentRun {
            size,
            end_to_end,
            upload_phase,
            peak_rss_kib: peak,
        },
        file,
        dev,
    )
}

/// The baseline: open a session as the device, presign every part, then PUT the parts with
/// `concurrency` parallel `curl` processes; only the PUTs are timed.
async fn curl_run(
    stack: &Stack,
    dev: &Device,
    file: &SourceFile,
    part_size: u64,
    concurrency: usize,
) -> f64 {
    let parts_dir = stack.dir.path().join("curl-parts");
    std::fs::create_dir_all(&parts_dir).expect("parts dir");
    let (path, dir) = (file.path.clone(), parts_dir.clone());
    // Split into part files and compute their MD5s (not timed).
    let md5s: Vec<String> = tokio::task::spawn_blocking(move || split(&path, &dir, part_size))
        .await
        .expect("split");
    // A dataset of its own: the agent's upload of the same file must not be its dedupe
    // source (the baseline would then have nothing to upload).
    let dataset = format!(
        "curl-baseline-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let body = json!({"job_id": uuid::Uuid::new_v4(), "file_name": "curl-baseline.bin", "size": file.size,
                      "sha256": file.sha256, "part_size": part_size, "dataset": dataset});
    let created = stack
        .device_http
        .call(&dev.id, &dev.key, "session.create", &body)
        .await;
    assert_eq!(created.status, 201, "session.create: {created}");
    let session_id = created.body["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();
    let mut urls: Vec<Value> = Vec::new();
    for (i, chunk) in md5s
        .chunks(uplink_protocol::ops::MAX_PRESIGN_BATCH)
        .enumerate()
    {
        let parts: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(j, md5)| json!({"number": i * uplink_protocol::ops::MAX_PRESIGN_BATCH + j + 1, "md5": md5}))
            .collect();
        let reply = stack
            .device_http
            .call(
                &dev.id,
                &dev.key,
                "parts.presign",
                &json!({"session_id": session_id, "parts": parts}),
            )
            .await;
        assert_eq!(reply.status, 200, "parts.presign: {reply}");
        urls.extend(
            reply.body["parts"]
                .as_array()
                .expect("parts")
                .iter()
                .cloned(),
        );
    }

    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for part in urls {
        let permit = slots.clone().acquire_owned().await.expect("semaphore");
        let n = part["number"].as_u64().expect("number");
        let part_file = parts_dir.join(format!("part-{n:05}"));
        tasks.push(tokio::spawn(async move {
            let mut cmd = tokio::process::Command::new("curl");
            cmd.args(["-sS", "--fail", "-o", "/dev/null", "-T"])
                .arg(&part_file);
            for h in part["headers"].as_array().expect("headers") {
                cmd.arg("-H").arg(format!(
                    "{}: {}",
                    h[0].as_str().expect("name"),
                    h[1].as_str().expect("value")
                ));
            }
            cmd.arg(part["url"].as_str().expect("url"));
            let status = cmd.status().await.expect("run curl (apt install curl)");
            drop(permit);
            assert!(status.success(), "curl PUT of part {n} failed: {status}");
        }));
    }
    for t in tasks {
        t.await.expect("curl task");
    }
    let secs = started.elapsed().as_secs_f64();
    let done = stack
        .device_http
        .call(
            &dev.id,
            &dev.key,
            "session.complete",
            &json!({"session_id": session_id}),
        )
        .await;
    assert_eq!(
        done.body["state"], "completed",
        "the curl baseline's upload must complete: {done}"
    );
    std::fs::remove_dir_all(&parts_dir).ok();
    secs
}

fn split(path: &Path, dir: &Path, part_size: u64) -> Vec<String> {
    use std::io::{Read, Write};
    let mut input = std::fs::File::open(path).expect("open source");
    let mut md5s = Vec::new();
    let mut buf = vec![0u8; part_size as usize];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = input.read(&mut buf[filled..]).expect("read source");
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let mut out = std::fs::File::create(dir.join(format!("part-{:05}", md5s.len() + 1)))
            .expect("part file");
        out.write_all(&buf[..filled]).expect("write part");
        md5s.push(B64.encode(Md5::digest(&buf[..filled])));
        if filled < buf.len() {
            break;
        }
    }
    md5s
}

#[tokio::main]
async fn main() {
    let sizes: Vec<u64> = std::env::var("UPLINK_BENCH_SIZES_MIB")
        .unwrap_or_else(|_| "256,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .map(|m| m * MIB)
        .collect();
    assert!(
        !sizes.is_empty(),
        "UPLINK_BENCH_SIZES_MIB must list sizes in MiB, e.g. 256,1024"
    );
    let concurrency = env_u64("UPLINK_BENCH_CONCURRENCY", 4) as u32;
    let part_mib = env_u64("UPLINK_BENCH_PART_MIB", 8);
    let stack = Stack::start(StackOptions {
        direct_s3: true,
        ..StackOptions::default()
    })
    .await;
    let opts = AgentOptions {
        concurrency,
        part_size_mib: part_mib,
        request_timeout_secs: 10,
        ..AgentOptions::default()
    };
    println!(
        "uplink-bench: parts of {part_mib} MiB, {concurrency} at a time, S3 at {}",
        stack.env.s3_endpoint
    );

    let mut runs = Vec::new();
    let mut largest = None;
    for &size in &sizes {
        let (run, file, dev) = agent_run(&stack, &opts, size).await;
        println!(
            "agent  {:>6} MiB: end to end {:>7.1} MiB/s ({:.1} s, includes the hash pass), upload phase {:>7.1} MiB/s ({:.1} s), peak RSS {:.1} MiB",
            size / MIB,
            mib_per_s(size, run.end_to_end),
            run.end_to_end,
            mib_per_s(size, run.upload_phase),
            run.upload_phase,
            run.peak_rss_kib as f64 / 1024.0
        );
        runs.push(run);
        largest = Some((file, dev));
    }
    let (file, dev) = largest.expect("at least one size");
    let curl_secs = curl_run(&stack, &dev, &file, part_mib * MIB, concurrency as usize).await;
    let curl = mib_per_s(file.size, curl_secs);
    println!(
        "curl   {:>6} MiB: {:>7.1} MiB/s ({:.1} s), {concurrency} parallel PUTs of presigned parts",
        file.size / MIB,
        curl,
        curl_secs
    );
    let last = runs.last().expect("runs");
    let agent = mib_per_s(last.size, last.upload_phase);
    println!(
        "result: agent upload phase / curl = {:.2} (target >= 0.90)",
        agent / curl
    );
    println!(
        "result: agent end to end / curl = {:.2} (the agent also hashes the file first)",
        mib_per_s(last.size, last.end_to_end) / curl
    );
    let rss: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "{} MiB file: {:.1} MiB",
                r.size / MIB,
                r.peak_rss_kib as f64 / 1024.0
            )
        })
        .collect();
    println!(
        "result: agent peak RSS {} (target <= 32 MiB, flat in file size)",
        rss.join(", ")
    );
}
