//! `uplink-bench` (`tests/src/bin/uplink-bench.rs`): the agent against the tools a user
//! would pick instead, in the same run, against the same S3 server, with the same file
//! size, part size and concurrency. Run it through `scripts/bench`, which starts the stack's
//! PostgreSQL and SeaweedFS, installs the tools and builds everything.
//!
//! - [`tools`]: aws-cli, s5cmd and rclone, each run under GNU time, each object checked.
//! - [`curl`]: parallel `curl` PUTs of presigned part URLs from the same control API.
//! - [`agent`]: one upload command to a running agent, timed to `done`; the memory mode.
//! - [`compare`]: the comparison table (settings × tools, medians of repetitions).
//! - [`badlink`]: the race on a bad link (the fault proxy at 20 MB/s, a reset every
//!   ~100 MB).
//! - [`disk`]: bytes each upload reads from disk, the agent in a small memory cgroup.
//! - [`cgroup`]: that memory cgroup and dropping a file's page cache.
//! - [`proc`]: a process's CPU time, memory and bytes read, from `/proc`.

pub mod agent;
pub mod badlink;
pub mod cgroup;
pub mod compare;
pub mod curl;
pub mod disk;
pub mod proc;
pub mod tools;

pub use proc::cpu_secs_of;
pub use tools::{parse_time, upload, Measure, Target, Tool};

use crate::stack::{Stack, StackOptions};
use crate::MIB;

/// What to measure, from the environment (see `uplink-bench.rs`).
#[derive(Debug, Clone)]
pub struct Config {
    /// `UPLINK_BENCH_SMALL=1`: small files, one repetition, every mode checked for
    /// correctness only (the test command's run; its figures mean nothing).
    pub small: bool,
    /// File size in bytes (`UPLINK_BENCH_SIZE_MIB`).
    pub size: u64,
    pub reps: usize,
    /// (part MiB, parts in flight).
    pub settings: Vec<(u64, u32)>,
}

impl Config {
    pub fn from_env() -> Config {
        let small = flag("UPLINK_BENCH_SMALL");
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
        Config {
            small,
            size,
            reps,
            settings,
        }
    }
}

/// Starts the stack with presigned URLs pointing at storage itself (`direct`) or at the
/// stack's fault proxy.
pub async fn start_stack(direct: bool) -> Stack {
    Stack::start(StackOptions {
        direct_s3: direct,
        ..StackOptions::default()
    })
    .await
}

/// `NAME=1` in the environment.
pub fn flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

/// The first non-empty line of an error text, for a report.
pub fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no message)")
        .to_string()
}

/// The median of `xs` (the mean of the middle two for an even count); 0 when empty.
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_first_lines() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(
            first_line("\n  upload failed: reset\nmore\n"),
            "upload failed: reset"
        );
        assert_eq!(first_line(""), "(no message)");
    }
}
