//! 20 MB at 50 kB/s with 6 MiB parts: each part takes ~126 s. The agent has no overall
//! or read timeout on a PUT, only an idle timeout (no bytes moving), so it completes.
//! Slow (about 7 minutes), and part of the test command: the link speed is the point.

use std::time::{Duration, Instant};

use uplink_e2e::{AgentOptions, Stack, StackOptions};

const SLOW_RATE: u64 = 50_000;

async fn slow_link(size: u64, timeout: Duration) -> Duration {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack
        .add_device(&AgentOptions {
            concurrency: 1,
            part_size_mib: 6,
            ..AgentOptions::default()
        })
        .await;
    let file = stack.source_file(&dev, "net/slow.bin", size).await;
    stack.proxy.set_rate(Some(SLOW_RATE));
    let started = Instant::now();
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    let cmd = stack.wait_command_final(&command_id, timeout).await;
    stack.verify_fault_upload(&dev, &file, &cmd).await;
    started.elapsed()
}

/// 20 MB at 50 kB/s: ~7 minutes, 6 MiB parts of ~126 s each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_link_20mb_at_50kbps_completes() {
    let took = slow_link(20_000_000, Duration::from_secs(900)).await;
    assert!(took > Duration::from_secs(360), "{took:?}");
}
