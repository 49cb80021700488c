//! Bytes read from disk per upload, where the page cache cannot hold the file: the agent
//! runs in a memory cgroup of its own ([`MemoryCgroup`], `UPLINK_BENCH_CGROUP_MIB`, default
//! 160 MiB: well above the agent's ~20 MiB, far below the file), each file is written,
//! synced and dropped from the page cache, and `/proc/PID/io` `read_bytes` of the agent is
//! read around its upload. Two files: one of `UPLINK_BENCH_SIZE_MIB` (over
//! `hash_first_max_mib`, 64: hashed beside its upload) and one of 48 MiB (hashed whole
//! first, then uploaded: its second read should come from the cache). s5cmd uploads the
//! large size in the same cgroup for comparison (GNU time's file system inputs).

use std::time::Duration;

use super::agent::{agent_upload, options};
use super::cgroup::{drop_page_cache, MemoryCgroup};
use super::{env_u64, first_line, Config, Target, Tool};
use crate::stack::{AgentOptions, Stack};
use crate::MIB;

/// The agent's `hash_first_max_mib` (its default).
const HASH_FIRST_MAX_MIB: u64 = 64;

struct Row {
    who: String,
    size: u64,
    /// Bytes read from disk, or why the run failed.
    read: Result<u64, String>,
    peak: u64,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.read
            .as_ref()
            .ok()
            .map(|r| *r as f64 / self.size as f64)
    }
}

pub async fn run(stack: &Stack, cfg: &Config) {
    let limit = env_u64("UPLINK_BENCH_CGROUP_MIB", if cfg.small { 96 } else { 160 }) * MIB;
    let (large, small_file) = if cfg.small {
        (80 * MIB, 16 * MIB)
    } else {
        (cfg.size, 48 * MIB)
    };
    assert!(
        large > HASH_FIRST_MAX_MIB * MIB && small_file <= HASH_FIRST_MAX_MIB * MIB,
        "the disk-read bench needs UPLINK_BENCH_SIZE_MIB over {HASH_FIRST_MAX_MIB}"
    );
    let (part_mib, concurrency) = cfg.settings[0];
    let cgroup = MemoryCgroup::create(limit).unwrap_or_else(|e| panic!("{e}"));
    // Started in the cgroup: its own memory counts against the limit too.
    let dev = stack
        .add_device(&AgentOptions {
            hash_first_max_mib: HASH_FIRST_MAX_MIB,
            wrapper: cgroup.wrapper(),
            ..options(part_mib, concurrency)
        })
        .await;
    println!(
        "uplink-bench, disk reads: the agent ({part_mib} MiB × {concurrency}, hash_first_max_mib {HASH_FIRST_MAX_MIB}) in memory cgroup {} limited to {} MiB; each file synced and dropped from the page cache before its upload",
        cgroup.dir().display(),
        limit / MIB
    );
    let mut rows = Vec::new();
    for (size, how) in [
        (large, "hashed beside its upload"),
        (small_file, "hashed whole first, then uploaded"),
    ] {
        let file = stack
            .source_file(&dev, &format!("disk-{}.bin", size / MIB), size)
            .await;
        drop_page_cache(&file.path);
        cgroup.reset_peak();
        let m = agent_upload(stack, &dev, &file).await;
        std::fs::remove_file(&file.path).ok();
        rows.push(Row {
            who: format!("agent, {how}"),
            size,
            read: Ok(m.read_bytes),
            peak: cgroup.peak_bytes(),
        });
    }
    let scratch = stack.dir.path().join("bench");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let tool = Tool::S5cmd;
    let file =
        crate::files::write_random_file(&scratch.join(format!("{}-disk.bin", tool.name())), large)
            .await;
    drop_page_cache(&file.path);
    cgroup.reset_peak();
    let wrapper = cgroup.wrapper();
    let target = Target {
        endpoint: &stack.env.s3_endpoint,
        part_mib,
        concurrency: concurrency as usize,
        wrapper: &wrapper,
        timeout: Duration::from_secs(1800),
    };
    let key = format!("bench-disk/{}/{}", tool.name(), uuid::Uuid::new_v4());
    let m = super::upload(&stack.env, &scratch, tool, &file, &key, &target).await;
    std::fs::remove_file(&file.path).ok();
    rows.push(Row {
        who: tool.name().to_string(),
        size: large,
        read: m.map(|m| m.read_bytes),
        peak: cgroup.peak_bytes(),
    });
    drop(cgroup);

    println!("\n| upload | file | read from disk | read / file size | cgroup peak (memory + page cache) |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let (read, ratio) = match (&r.read, r.ratio()) {
            (Ok(b), Some(x)) => (
                format!("{:.1} MiB", *b as f64 / MIB as f64),
                format!("{x:.3}"),
            ),
            (Err(e), _) => (format!("failed: {}", first_line(e)), "-".into()),
            _ => unreachable!("a read figure has a ratio"),
        };
        println!(
            "| {} | {} MiB | {read} | {ratio} | {:.0} MiB |",
            r.who,
            r.size / MIB,
            r.peak as f64 / MIB as f64
        );
    }
    if cfg.small {
        // Correctness only: every upload finished, the cache was dropped and the reads were
        // counted (0 bytes would mean the measurement is broken, not a thrifty uploader).
        for r in &rows {
            match &r.read {
                Ok(b) => assert!(*b > 0, "{}: no bytes read from disk counted", r.who),
                Err(e) => panic!("{} failed in the disk-read bench: {e}", r.who),
            }
        }
    }
    let ratio = |i: usize| rows[i].ratio().unwrap_or(f64::NAN);
    let met = |x: f64| if x <= 1.01 { "met" } else { "missed" };
    println!(
        "\nresult: disk reads in a {} MiB memory cgroup: the agent read {:.3}× the {} MiB file (hashed beside its upload) and {:.3}× the {} MiB file (hashed whole first); goal ≤ 1.0 (each byte read once): {} and {}",
        limit / MIB,
        ratio(0),
        large / MIB,
        ratio(1),
        small_file / MIB,
        met(ratio(0)),
        met(ratio(1)),
    );
}
