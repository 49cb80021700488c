//! `uplink-bench`: the agent against the tools a user would pick instead, in the same run,
//! against the same S3 server, with the same file size, part size and concurrency:
//! aws-cli (`aws s3 cp`), s5cmd (`s5cmd cp`), rclone (`rclone copyto`), and parallel `curl`
//! PUTs of presigned part URLs from the same control API. Run it through `scripts/bench`,
//! which starts the stack, installs the tools and builds everything in release mode.
//!
//! Every setting (part size × parts in flight) runs every tool `UPLINK_BENCH_REPS` times in
//! rotating order; medians are reported. Each tool uploads a file of its own content (so
//! dedupe cannot short-cut it) and each object is checked byte-identical.
//!
//! Environment: `UPLINK_BENCH_SIZE_MIB` (default 1024), `UPLINK_BENCH_SETTINGS` (default
//! `8x4,8x8,16x4,16x8`: part MiB × in flight), `UPLINK_BENCH_REPS` (default 3),
//! `UPLINK_BENCH_SMALL=1` (64 MiB, `8x4`, one repetition: the test command's check that the
//! benchmark still works; its figures mean nothing), `UPLINK_BENCH_UPLOADS=N` (instead of
//! the comparison: N uploads of `UPLINK_BENCH_SIZE_MIB` through one agent, its resident
//! memory after each, to see whether it grows).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest, Md5};
use serde_json::{json, Value};
use sha2::Sha256;
use uplink_e2e::bench;
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

/// The baseline: open a session as the device, presign every part, then PUT the parts with
/// `concurrency` parallel `curl` processes; only the PUTs are timed. Returns their seconds
/// and the S3 server's CPU seconds over them.
async fn curl_run(
    stack: &Stack,
    dev: &Device,
    file: &SourceFile,
    part_size: u64,
    concurrency: usize,
) -> (f64, f64) {
    let parts_dir = stack.dir.path().join("curl-parts");
    std::fs::create_dir_all(&parts_dir).expect("parts dir");
    let (path, dir) = (file.path.clone(), parts_dir.clone());
    // Split into part files and compute their digests (not timed).
    let digests = tokio::task::spawn_blocking(move || split(&path, &dir, part_size))
        .await
        .expect("split");
    // A dataset of its own: the agent's upload of the same file must not be its dedupe
    // source (the baseline would then have nothing to upload).
    let dataset = format!(
        "curl-baseline-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    // The part checksum the agent asks for (SHA-256 unless the API keeps MD5): the PUTs cost
    // storage the same as the agent's.
    let body = json!({"job_id": uuid::Uuid::new_v4(), "file_name": "curl-baseline.bin", "size": file.size,
                      "sha256": file.sha256, "part_size": part_size, "dataset": dataset,
                      "part_checksum": "sha256"});
    let created = stack
        .device_http
        .call(&dev.id, &dev.key, "session.create", &body)
        .await;
    assert_eq!(created.status, 201, "session.create: {created}");
    let session_id = created.body["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();
    let checksum = created.body["part_checksum"]
        .as_str()
        .unwrap_or("md5")
        .to_string();
    let mut urls: Vec<Value> = Vec::new();
    for (i, chunk) in digests
        .chunks(uplink_protocol::ops::MAX_PRESIGN_BATCH)
        .enumerate()
    {
        let parts: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(j, d)| {
                let digest = if checksum == "sha256" { &d.sha256 } else { &d.md5 };
                json!({"number": i * uplink_protocol::ops::MAX_PRESIGN_BATCH + j + 1, checksum.as_str(): digest})
            })
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
    let server_before = bench::server_cpu_secs();
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
    let server_cpu = bench::server_cpu_secs() - server_before;
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
    uplink_e2e::files::s3_delete(
        &stack.env,
        done.body["bucket"].as_str().expect("bucket"),
        done.body["object_key"].as_str().expect("key"),
    )
    .await;
    std::fs::remove_dir_all(&parts_dir).ok();
    (secs, server_cpu)
}

/// Splits the file into part files; each part's MD5 and SHA-256 (base64).
fn split(path: &Path, dir: &Path, part_size: u64) -> Vec<PartDigests> {
    use std::io::{Read, Write};
    let mut input = std::fs::File::open(path).expect("open source");
    let mut digests = Vec::new();
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
        let mut out = std::fs::File::create(dir.join(format!("part-{:05}", digests.len() + 1)))
            .expect("part file");
        out.write_all(&buf[..filled]).expect("write part");
        digests.push(PartDigests {
            md5: B64.encode(Md5::digest(&buf[..filled])),
            sha256: B64.encode(Sha256::digest(&buf[..filled])),
        });
        if filled < buf.len() {
            break;
        }
    }
    digests
}

struct PartDigests {
    md5: String,
    sha256: String,
}

/// One agent run: a fresh file, an upload command, timed to `done`.
struct AgentMeasure {
    end_to_end: f64,
    upload_phase: f64,
    /// Command issued → session created (delivery and the hash pass).
    before_session: f64,
    cpu_secs: f64,
    peak_rss_kib: u64,
    /// The S3 server's CPU seconds from the command to `done`.
    server_cpu_secs: f64,
}

async fn agent_once(stack: &Stack, dev: &Device, size: u64, rep: usize) -> AgentMeasure {
    let file = stack
        .source_file(dev, &format!("bench-{}-{rep}.bin", size / MIB), size)
        .await;
    let pid = stack.agent_pid(dev).expect("agent running");
    let cpu_before = bench::cpu_secs_of(pid).expect("read the agent's /proc/PID/stat");
    let server_before = bench::server_cpu_secs();
    let started = Instant::now();
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(1800))
        .await;
    let waited = started.elapsed().as_secs_f64();
    let cpu_secs = bench::cpu_secs_of(pid).expect("agent /proc/PID/stat") - cpu_before;
    let server_cpu_secs = bench::server_cpu_secs() - server_before;
    let peak_rss_kib = peak_rss_kib(pid).expect("read /proc/PID/status of the agent");
    // Verified: the stored object is byte-identical (downloaded and hashed).
    let session = stack.verify_upload(&file, &cmd).await;
    std::fs::remove_file(&file.path).ok();
    let (bucket, key) = (
        session["bucket"].as_str().expect("bucket"),
        session["object_key"].as_str().expect("key"),
    );
    uplink_e2e::files::s3_delete(&stack.env, bucket, key).await;
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
    AgentMeasure {
        end_to_end,
        upload_phase: at(&session, "completed_at") - at(&session, "created_at"),
        before_session: at(&session, "created_at") - at(&cmd, "created_at"),
        cpu_secs,
        peak_rss_kib,
        server_cpu_secs,
    }
}

/// Resident set size (VmRSS) of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `uploads` uploads of `size` bytes through one agent (8 MiB × 4), each verified: its
/// resident memory after each, and its peak at the end.
async fn memory_run(stack: &Stack, size: u64, uploads: usize) {
    let dev = stack
        .add_device(&AgentOptions {
            concurrency: 4,
            part_size_mib: 8,
            request_timeout_secs: 10,
            ..AgentOptions::default()
        })
        .await;
    let pid = stack.agent_pid(&dev).expect("agent running");
    let mut after = Vec::with_capacity(uploads);
    for n in 0..uploads {
        agent_once(stack, &dev, size, n).await;
        after.push(rss_kib(pid).expect("read /proc/PID/status of the agent"));
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let at = |n: usize| {
        after
            .get(n - 1)
            .map_or("-".to_string(), |k| format!("{:.1}", mib(*k)))
    };
    println!(
        "memory: {uploads} uploads of {} MiB through one agent; RSS (MiB) after upload 1: {}, 10: {}, 25: {}, 50: {}, {uploads}: {}; peak {:.1} MiB",
        size / MIB,
        at(1),
        at(10),
        at(25),
        at(50),
        at(uploads),
        mib(peak_rss_kib(pid).unwrap_or(0))
    );
}

/// Medians of one tool's runs at one setting.
#[derive(Default)]
struct Row {
    mib_s: Vec<f64>,
    cpu_per_gib: Vec<f64>,
    rss_mib: Vec<f64>,
    server_cpu_per_gib: Vec<f64>,
}

impl Row {
    fn add(&mut self, size: u64, secs: f64, cpu_secs: f64, rss_kib: u64, server_cpu_secs: f64) {
        let gib = size as f64 / (1u64 << 30) as f64;
        self.mib_s.push(mib_per_s(size, secs));
        self.cpu_per_gib.push(cpu_secs / gib);
        self.rss_mib.push(rss_kib as f64 / 1024.0);
        self.server_cpu_per_gib.push(server_cpu_secs / gib);
    }

    /// The S3 server's median CPU seconds per GiB of this client's uploads.
    fn server_cpu(&self) -> f64 {
        bench::median(self.server_cpu_per_gib.clone())
    }

    fn cell(&self) -> String {
        if self.mib_s.is_empty() {
            return "-".into();
        }
        let rss = self.rss_mib.iter().cloned().fold(0.0, f64::max);
        let rss = if rss > 0.0 {
            format!(", {rss:.0} MiB")
        } else {
            String::new()
        };
        // Runs without a CPU figure (the upload phase, curl) record 0.
        let cpu = bench::median(self.cpu_per_gib.clone());
        let cpu = if cpu > 0.0 {
            format!(", {cpu:.1} s/GiB")
        } else {
            String::new()
        };
        format!("{:.0} MiB/s{cpu}{rss}", bench::median(self.mib_s.clone()))
    }

    fn median(&self) -> f64 {
        bench::median(self.mib_s.clone())
    }
}

#[tokio::main]
async fn main() {
    let small = std::env::var("UPLINK_BENCH_SMALL").is_ok_and(|v| v == "1");
    let size = if small {
        64
    } else {
        env_u64("UPLINK_BENCH_SIZE_MIB", 1024)
    } * MIB;
    let reps = if small {
        1
    } else {
        env_u64("UPLINK_BENCH_REPS", 3) as usize
    };
    let settings: Vec<(u64, u32)> = if small {
        vec![(8, 4)]
    } else {
        std::env::var("UPLINK_BENCH_SETTINGS")
            .unwrap_or_else(|_| "8x4,8x8,16x4,16x8".into())
            .split(',')
            .filter_map(|s| {
                let (p, c) = s.trim().split_once('x')?;
                Some((p.parse().ok()?, c.parse().ok()?))
            })
            .collect()
    };
    assert!(
        !settings.is_empty() && reps > 0,
        "UPLINK_BENCH_SETTINGS must list PARTxINFLIGHT items, e.g. 8x4,16x8; UPLINK_BENCH_REPS >= 1"
    );
    let stack = Stack::start(StackOptions {
        direct_s3: true,
        ..StackOptions::default()
    })
    .await;
    let uploads = env_u64("UPLINK_BENCH_UPLOADS", 0) as usize;
    if uploads > 0 {
        memory_run(&stack, size, uploads).await;
        return;
    }
    let scratch = stack.dir.path().join("bench");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    println!(
        "uplink-bench: {} MiB file, settings {settings:?} (part MiB, in flight), {reps} repetition(s), S3 at {}",
        size / MIB,
        stack.env.s3_endpoint
    );
    println!(
        "\n| parts × in flight | agent, command → done | agent, upload phase | aws-cli | s5cmd | rclone | parallel curl |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for &(part_mib, concurrency) in &settings {
        let dev = stack
            .add_device(&AgentOptions {
                concurrency,
                part_size_mib: part_mib,
                request_timeout_secs: 10,
                ..AgentOptions::default()
            })
            .await;
        let (mut agent, mut phase, mut curl) = (Row::default(), Row::default(), Row::default());
        let mut tools: Vec<Row> = bench::Tool::ALL.iter().map(|_| Row::default()).collect();
        let mut before_session = Vec::new();
        // 0 = agent, 1..=3 = the tools, 4 = curl; each repetition starts one later.
        for rep in 0..reps {
            for k in 0..5 {
                match (rep + k) % 5 {
                    0 => {
                        let m = agent_once(&stack, &dev, size, rep).await;
                        agent.add(
                            size,
                            m.end_to_end,
                            m.cpu_secs,
                            m.peak_rss_kib,
                            m.server_cpu_secs,
                        );
                        phase.add(size, m.upload_phase, 0.0, 0, 0.0);
                        before_session.push(m.before_session);
                    }
                    i @ 1..=3 => {
                        let tool = bench::Tool::ALL[i - 1];
                        let file = uplink_e2e::files::write_random_file(
                            &scratch.join(format!(
                                "{}-{part_mib}x{concurrency}-{rep}.bin",
                                tool.name()
                            )),
                            size,
                        )
                        .await;
                        let key =
                            format!("bench-baselines/{}/{}", tool.name(), uuid::Uuid::new_v4());
                        let m = bench::upload(
                            &stack.env,
                            &scratch,
                            tool,
                            &file,
                            &key,
                            part_mib,
                            concurrency as usize,
                        )
                        .await;
                        std::fs::remove_file(&file.path).ok();
                        tools[i - 1].add(
                            size,
                            m.secs,
                            m.cpu_secs,
                            m.peak_rss_kib,
                            m.server_cpu_secs,
                        );
                    }
                    _ => {
                        let file = stack
                            .source_file(&dev, &format!("curl-{rep}.bin"), size)
                            .await;
                        let (secs, server_cpu) =
                            curl_run(&stack, &dev, &file, part_mib * MIB, concurrency as usize)
                                .await;
                        std::fs::remove_file(&file.path).ok();
                        curl.add(size, secs, 0.0, 0, server_cpu);
                    }
                }
            }
        }
        println!(
            "| {part_mib} MiB × {concurrency} | {} | {} | {} | {} | {} | {} |",
            agent.cell(),
            phase.cell(),
            tools[0].cell(),
            tools[1].cell(),
            tools[2].cell(),
            curl.cell()
        );
        let best = tools.iter().map(Row::median).fold(0.0, f64::max);
        verdicts.push(format!(
            "{part_mib} MiB × {concurrency}: agent end to end / best of aws, s5cmd, rclone = {:.2} (goal ≥ 1.10); upload phase / curl = {:.2} (goal ≥ 0.95); agent CPU {:.2} s/GiB (goal ≤ 1.5); command → session (delivery + hash pass) {:.1} s",
            agent.median() / best,
            phase.median() / curl.median(),
            bench::median(agent.cpu_per_gib.clone()),
            bench::median(before_session)
        ));
        verdicts.push(format!(
            "{part_mib} MiB × {concurrency}: S3 server CPU s/GiB while each uploads: agent {:.1}, aws-cli {:.1}, s5cmd {:.1}, rclone {:.1}, curl {:.1}",
            agent.server_cpu(),
            tools[0].server_cpu(),
            tools[1].server_cpu(),
            tools[2].server_cpu(),
            curl.server_cpu()
        ));
    }
    println!();
    for v in verdicts {
        println!("result: {v}");
    }
    println!(
        "MiB/s are medians over the repetitions; CPU is user + system seconds per GiB (GNU time for the tools, /proc/PID/stat for the agent); memory is the peak RSS. The upload phase and curl exclude hashing and planning."
    );
}
