//! Disk errors under the agent's state database: the agent runs under `fiu-run` (libfiu's
//! POSIX preload, Debian package `fiu-utils`): once its upload is under way, it is killed
//! and started again under fiu with seeded random failures of `fsync`, `fdatasync`, `pwrite` and `pwritev` — the
//! calls SQLite writes and syncs `agent.db` and its WAL with. Sockets never see them (they
//! are written with `write`/`writev`/`send`), so the agent keeps talking to the broker and
//! storage while its database fails under it. Whenever it exits (a database it cannot
//! write is fatal at start-up), it is started under fiu again, for [`UNDER_FIU`].
//!
//! What must hold: the agent never says a job is done (its SQLite row, `uplink-agent status`,
//! the command's ack) unless the object in storage is complete and byte-identical. Started
//! again without fiu, the agent finishes the job: done, one session, no open multipart
//! upload, `agent.db` intact.
//!
//! Seeded (libfiu's `FIU_PRNG_SEED`): `UPLINK_FAULT_SEED=<seed>` replays a run's failure
//! pattern (thread timing still varies); the seed is printed.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use uplink_e2e::files::{s3_download, sha256_file};
use uplink_e2e::{AgentOptions, Device, SourceFile, Stack, StackOptions, MIB};

/// Probability of each `fsync`/`fdatasync` and each `pwrite`/`pwritev` failing.
const SYNC_FAILURE: f64 = 0.3;
const WRITE_FAILURE: f64 = 0.15;
/// How long the agent runs under fiu.
const UNDER_FIU: Duration = Duration::from_secs(15);

/// `fiu-run` or `fiu-ctrl`; panics saying how to install them when missing.
fn fiu_tool(name: &str) -> PathBuf {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .chain([PathBuf::from("/usr/bin").join(name)])
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{name} not found: install the Debian package fiu-utils \
             (apt-get install fiu-utils; scripts/lib.sh ensure_deps installs it)"
        )
    })
}

/// `fiu-run` with the disk failures on from the start, no control FIFO.
fn fiu_wrapper(fiu: &std::path::Path) -> Vec<String> {
    vec![
        fiu.to_str().expect("UTF-8 path").to_string(),
        "-x".into(),
        "-f".into(),
        String::new(),
        "-c".into(),
        format!("enable_random name=posix/io/sync/*,probability={SYNC_FAILURE}"),
        "-c".into(),
        format!("enable_random name=posix/io/rw/pwrite,probability={WRITE_FAILURE}"),
        "-c".into(),
        format!("enable_random name=posix/io/rw/pwritev,probability={WRITE_FAILURE}"),
    ]
}

fn fiu_env(seed: u64) -> Vec<(String, String)> {
    vec![("FIU_PRNG_SEED".to_string(), seed.to_string())]
}

fn agent(wrapper: Vec<String>, env: Vec<(String, String)>) -> AgentOptions {
    AgentOptions {
        concurrency: 2,
        part_size_mib: 5,
        env,
        wrapper,
        ..AgentOptions::default()
    }
}

/// The job states `uplink-agent status --json` reports (read from `agent.db`).
fn status_states(stack: &Stack, dev: &Device) -> Vec<String> {
    let out = Command::new(stack.env.bin("uplink-agent"))
        .arg("--config")
        .arg(dev.dir.join("agent.toml"))
        .args(["status", "--json"])
        .output()
        .expect("run uplink-agent status");
    if !out.status.success() {
        // The database may be mid-recovery; status says so and exits non-zero.
        return Vec::new();
    }
    let jobs: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    jobs.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|j| j["state"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The job's state straight from `agent.db` (read-only).
fn db_states(dev: &Device) -> Vec<String> {
    let Ok(conn) = rusqlite::Connection::open_with_flags(
        dev.state_dir.join("agent.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return Vec::new();
    };
    conn.busy_timeout(Duration::from_secs(2)).ok();
    conn.prepare("SELECT state FROM jobs")
        .and_then(|mut st| {
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_default()
}

/// Panics unless storage holds the complete, byte-identical object of the device's one
/// completed session.
async fn assert_object_complete(stack: &Stack, dev: &Device, file: &SourceFile, who: &str) {
    let sessions = stack.sessions(&dev.id).await;
    let completed: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["state"] == "completed")
        .collect();
    assert_eq!(
        completed.len(),
        1,
        "{who} says done, but the device has no completed session: {sessions:?}"
    );
    let (bucket, key) = (
        completed[0]["bucket"].as_str().expect("bucket"),
        completed[0]["object_key"].as_str().expect("object_key"),
    );
    let dest = stack.dir.path().join("disk-check.bin");
    let code = s3_download(&stack.env, bucket, key, &dest).await;
    assert_eq!(
        code, 200,
        "{who} says done, but GET s3://{bucket}/{key} is {code}"
    );
    let (sha, len) = sha256_file(&dest);
    std::fs::remove_file(&dest).ok();
    assert_eq!(
        (sha.as_str(), len),
        (file.sha256.as_str(), file.size),
        "{who} says done, but the object differs from the file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_database_disk_errors_never_fake_done() {
    let fiu = fiu_tool("fiu-run");
    let seed: u64 = std::env::var("UPLINK_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    // libfiu seeds its generator with an unsigned int.
    let seed = seed % u64::from(u32::MAX);
    eprintln!(
        "disk faults: seed {seed} (replay: UPLINK_FAULT_SEED={seed}); \
         fsync/fdatasync fail with p={SYNC_FAILURE}, pwrite/pwritev with p={WRITE_FAILURE}"
    );
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.register_device().await;
    let file = stack.source_file(&dev, "disk/state.bin", 16 * MIB).await;
    // Started plainly; the disk starts failing once the upload is under way.
    stack.start_agent(&dev, &agent(Vec::new(), Vec::new()));
    // ~8 s of parts at 2 MiB/s: parts are committed (fsyncs) while the disk fails.
    stack.proxy.set_rate(Some(2 * MIB));
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    stack
        .wait_proxy_bytes(&command_id, 2 * MIB, Duration::from_secs(60))
        .await;
    eprintln!("disk faults on at {} bytes", stack.proxy.bytes_sent());

    let start = Instant::now();
    let mut seen_done = false;
    let mut starts = 0u64;
    while start.elapsed() < UNDER_FIU && !seen_done {
        if starts == 0 || stack.agent_exited(&dev).is_some() {
            // (Re)start under fiu: the agent resumes, or gives up, with a failing disk.
            let seed = (seed + starts) % u64::from(u32::MAX);
            stack.start_agent(&dev, &agent(fiu_wrapper(&fiu), fiu_env(seed)));
            starts += 1;
        }
        let cmd = stack.command(&command_id).await;
        let statuses = status_states(&stack, &dev);
        let db = db_states(&dev);
        for (who, done) in [
            ("the command's ack", cmd["state"] == "done"),
            (
                "`uplink-agent status`",
                statuses.iter().any(|s| s == "done"),
            ),
            ("agent.db", db.iter().any(|s| s == "done")),
        ] {
            if done {
                assert_object_complete(&stack, &dev, &file, who).await;
                seen_done = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(dev.dir.join("agent.log")).unwrap_or_default();
    // SQLite's words for SQLITE_IOERR and SQLITE_FULL.
    let io_errors = log
        .lines()
        .filter(|l| l.contains("I/O error") || l.contains("disk is full"))
        .count();
    eprintln!(
        "under fiu for {:?}: done seen: {seen_done}; {starts} agent start(s) under fiu; \
         {io_errors} log lines with a disk error",
        start.elapsed()
    );
    assert!(
        io_errors > 0,
        "no disk I/O error reached the agent (seed {seed}): the injection did not work"
    );

    // Without fiu, the same state directory: the job finishes.
    stack.proxy.set_rate(None);
    stack.start_agent(&dev, &agent(Vec::new(), Vec::new()));
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(120))
        .await;
    stack.verify_fault_upload(&dev, &file, &cmd).await;
    assert_eq!(
        stack.acks_recorded(&command_id, "done").await,
        1,
        "the done ack is recorded exactly once"
    );
}
