//! The race on a bad link: every byte towards storage goes through the stack's fault proxy
//! (presigned URLs point at it; the tools' endpoint is its URL), limited to
//! `UPLINK_BENCH_RATE` bytes/s in total (default 20 MB/s) and reset (RST) every
//! `UPLINK_BENCH_RESET_EVERY` bytes of the total (default 100 MB,
//! [`Faults::reset_every_bytes`], counted afresh for each run). The agent, aws-cli, s5cmd,
//! rclone and parallel curl each upload a file of their own of `UPLINK_BENCH_SIZE_MIB` at
//! one setting (the first of `UPLINK_BENCH_SETTINGS`, default 8 MiB × 4). Per run: time,
//! bytes the proxy read from it, resets, finished or not. A tool that fails is reported;
//! the agent failing fails the bench.

use std::time::Duration;

use super::agent::{agent_upload, options};
use super::curl::{curl_run, RETRY_ARGS};
use super::{env_u64, first_line, mib_per_s, Config, Target, Tool};
use crate::proxy::{CountingProxy, Faults};
use crate::stack::{Device, Stack};
use crate::MIB;

/// What the agent logs when a PUT fails and is tried again.
const AGENT_RETRY: &str = "Part upload failed; retrying";

/// One run of the race.
struct Run {
    who: String,
    /// Seconds, or why it failed.
    outcome: Result<f64, String>,
    bytes_sent: u64,
    resets: u64,
}

/// The proxy's counters before a run; faults set afresh (counting from now).
struct Mark {
    sent: u64,
    resets: u64,
}

impl Mark {
    fn start(proxy: &CountingProxy, every: u64) -> Mark {
        proxy.set_faults(Faults::reset_every_bytes(every));
        Mark {
            sent: proxy.bytes_sent(),
            resets: proxy.fault_counts().resets,
        }
    }

    fn end(self, proxy: &CountingProxy, who: &str, outcome: Result<f64, String>) -> Run {
        Run {
            who: who.to_string(),
            outcome,
            bytes_sent: proxy.bytes_sent() - self.sent,
            resets: proxy.fault_counts().resets - self.resets,
        }
    }
}

/// Lines of the device's agent log that hold `needle`.
fn log_lines(dev: &Device, needle: &str) -> Vec<String> {
    std::fs::read_to_string(dev.dir.join("agent.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

pub async fn run(stack: &Stack, cfg: &Config) {
    let rate = env_u64("UPLINK_BENCH_RATE", 20_000_000);
    let default_every = if cfg.small { 16_000_000 } else { 100_000_000 };
    let every = env_u64("UPLINK_BENCH_RESET_EVERY", default_every);
    let size = cfg.size;
    let (part_mib, concurrency) = cfg.settings[0];
    let proxy = &stack.proxy;
    assert!(
        !stack.opts.direct_s3,
        "the bad-link bench needs presigned URLs through the proxy"
    );
    let proxy_url = proxy.url();
    // A tool that makes no progress is given up after ten times the link's best time.
    let timeout = Duration::from_secs_f64((size as f64 / rate as f64 * 10.0).max(300.0));
    let target = Target {
        endpoint: &proxy_url,
        part_mib,
        concurrency: concurrency as usize,
        wrapper: &[],
        timeout,
    };
    let scratch = stack.dir.path().join("bench");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let dev = stack.add_device(&options(part_mib, concurrency)).await;
    println!(
        "uplink-bench, bad link: {} MiB per run, {part_mib} MiB × {concurrency}, through the fault proxy at {} MB/s with a reset (RST) every {} MB of the total",
        size / MIB,
        rate as f64 / 1e6,
        every as f64 / 1e6
    );
    proxy.set_rate(Some(rate));
    let mut runs = Vec::new();

    let file = stack.source_file(&dev, "badlink-agent.bin", size).await;
    let mark = Mark::start(proxy, every);
    let m = agent_upload(stack, &dev, &file).await;
    runs.push(mark.end(proxy, "agent, command → done", Ok(m.end_to_end)));
    std::fs::remove_file(&file.path).ok();
    // The device is new: every retry in its log is of this upload.
    let retries = log_lines(&dev, AGENT_RETRY);

    for tool in Tool::ALL {
        let file = crate::files::write_random_file(
            &scratch.join(format!("badlink-{}.bin", tool.name())),
            size,
        )
        .await;
        let key = format!("bench-badlink/{}/{}", tool.name(), uuid::Uuid::new_v4());
        let mark = Mark::start(proxy, every);
        let outcome = super::upload(&stack.env, &scratch, tool, &file, &key, &target)
            .await
            .map(|m| m.secs);
        runs.push(mark.end(proxy, tool.name(), outcome));
        std::fs::remove_file(&file.path).ok();
    }

    let file = stack.source_file(&dev, "badlink-curl.bin", size).await;
    let mark = Mark::start(proxy, every);
    let outcome = curl_run(stack, &dev, &file, part_mib * MIB, concurrency as usize)
        .await
        .map(|(secs, _)| secs);
    runs.push(mark.end(proxy, "parallel curl (PUTs only)", outcome));
    std::fs::remove_file(&file.path).ok();
    proxy.clear_faults();
    proxy.set_rate(None);

    report(&runs, size, &retries, rate, every);
    if cfg.small {
        // Correctness only: every run finished (each object was checked byte-identical)
        // and the link really was reset under each.
        for r in &runs {
            if let Err(e) = &r.outcome {
                panic!("{} failed on the bad link: {e}", r.who);
            }
            assert!(
                r.resets > 0,
                "{}: no reset in {} bytes sent (every {every})",
                r.who,
                r.bytes_sent
            );
        }
    }
}

fn report(runs: &[Run], size: u64, retries: &[String], rate: u64, every: u64) {
    println!(
        "\n| run | finished | seconds | MiB/s | sent through the proxy | sent / file size | resets |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in runs {
        let (finished, secs, speed) = match &r.outcome {
            Ok(s) => (
                "yes".to_string(),
                format!("{s:.1}"),
                format!("{:.1}", mib_per_s(size, *s)),
            ),
            Err(e) => (format!("no: {}", first_line(e)), "-".into(), "-".into()),
        };
        println!(
            "| {} | {finished} | {secs} | {speed} | {:.1} MiB | {:.3} | {} |",
            r.who,
            r.bytes_sent as f64 / MIB as f64,
            r.bytes_sent as f64 / size as f64,
            r.resets
        );
    }
    println!(
        "\nThe agent retried a part {} time(s) (its log: `{AGENT_RETRY}`){}",
        retries.len(),
        retries
            .first()
            .map_or(String::new(), |l| format!("; the first: {}", l.trim()))
    );
    println!(
        "curl runs with {}; aws-cli, s5cmd and rclone with their default retries.",
        RETRY_ARGS.join(" ")
    );
    let agent = &runs[0];
    let agent_secs = *agent.outcome.as_ref().expect("the agent finished");
    let fastest = runs[1..]
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok().map(|s| (*s, r.who.as_str())))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    let first = match fastest {
        None => "yes (no other tool finished)".to_string(),
        Some((s, who)) if agent_secs < s => format!(
            "yes, {:.1} s ({:.0} %) ahead of {who} ({s:.1} s)",
            s - agent_secs,
            (s - agent_secs) / s * 100.0
        ),
        Some((s, who)) => format!(
            "no: {who} took {s:.1} s, the agent {agent_secs:.1} s ({:+.0} %)",
            (agent_secs - s) / s * 100.0
        ),
    };
    let ratio = agent.bytes_sent as f64 / size as f64;
    println!(
        "\nresult: bad link ({} MB/s, a reset every {} MB, {} MiB): agent finished first: {first}; agent sent {ratio:.3}× the file's bytes (goal ≤ 1.05: {})",
        rate as f64 / 1e6,
        every as f64 / 1e6,
        size / MIB,
        if ratio <= 1.05 { "met" } else { "missed" }
    );
}
