//! `uplink-bench`: the agent against the tools a user would pick instead, in the same run,
//! against the same S3 server, with the same file size, part size and concurrency:
//! aws-cli (`aws s3 cp`), s5cmd (`s5cmd cp`), rclone (`rclone copyto`), and parallel `curl`
//! PUTs of presigned part URLs from the same control API. Run it through `scripts/bench`,
//! which starts the stack, installs the tools and builds everything in release mode. The
//! modes live in `tests/src/bench/`.
//!
//! Modes (each on a stack of its own):
//! - the comparison (default, [`bench::compare`]): every setting (part size × parts in
//!   flight) runs every tool `UPLINK_BENCH_REPS` times in rotating order; medians.
//! - `UPLINK_BENCH_BADLINK=1` ([`bench::badlink`]): the race on a bad link, every upload
//!   through the fault proxy at `UPLINK_BENCH_RATE` bytes/s (20 MB/s) with a reset every
//!   `UPLINK_BENCH_RESET_EVERY` bytes (100 MB).
//! - `UPLINK_BENCH_DISK=1` ([`bench::disk`]): bytes read from disk per upload, the agent in
//!   a memory cgroup of `UPLINK_BENCH_CGROUP_MIB` (160 MiB).
//! - `UPLINK_BENCH_UPLOADS=N` ([`bench::agent::memory_run`]): N uploads of
//!   `UPLINK_BENCH_SIZE_MIB` through one agent, its resident memory after each.
//!
//! Environment: `UPLINK_BENCH_SIZE_MIB` (default 1024), `UPLINK_BENCH_SETTINGS` (default
//! `8x4,8x8,16x4,16x8`: part MiB × in flight; the bad-link and disk modes use the first),
//! `UPLINK_BENCH_REPS` (default 3), `UPLINK_BENCH_SMALL=1` (64 MiB, `8x4`, one repetition,
//! and without a mode chosen, all three modes in turn, small: the test command's check
//! that the benchmark still works, asserting correctness only; its figures mean nothing).

use uplink_e2e::bench::{self, agent, badlink, compare, disk, flag, start_stack, Config};

#[tokio::main]
async fn main() {
    let cfg = Config::from_env();
    let uploads = bench::env_u64("UPLINK_BENCH_UPLOADS", 0) as usize;
    if uploads > 0 {
        let stack = start_stack(true).await;
        agent::memory_run(&stack, cfg.size, uploads).await;
        return;
    }
    let (bad_link, disk_reads) = (flag("UPLINK_BENCH_BADLINK"), flag("UPLINK_BENCH_DISK"));
    let all = cfg.small && !bad_link && !disk_reads;
    if all || (!bad_link && !disk_reads) {
        compare::run(&start_stack(true).await, &cfg).await;
    }
    if all || bad_link {
        println!();
        badlink::run(&start_stack(false).await, &cfg).await;
    }
    if all || disk_reads {
        println!();
        disk::run(&start_stack(true).await, &cfg).await;
    }
}
