//! The agent SIGKILLed at N random moments of one upload (hashing, session creation,
//! presigning, parts in flight, commits), started again each time with the same state
//! directory, finishes the upload: byte-identical object, one session, no multipart upload
//! left open, and its SQLite database passes `PRAGMA integrity_check` after every kill.
//!
//! The moments come from a seeded RNG; the seed is printed. `UPLINK_FAULT_SEED` replays a
//! seed, `UPLINK_FAULT_KILLS` sets N (default 6, e.g. 20 for a longer run).

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_at_random_moments_finishes_the_upload() {
    let kills = env_u64("UPLINK_FAULT_KILLS").unwrap_or(6);
    let seed = env_u64("UPLINK_FAULT_SEED").unwrap_or_else(rand::random);
    eprintln!("agent kills: {kills}, seed {seed} (replay: UPLINK_FAULT_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let stack = Stack::start(StackOptions::default()).await;
    let opts = AgentOptions {
        concurrency: 1,
        part_size_mib: 5,
        ..AgentOptions::default()
    };
    let dev = stack.add_device(&opts).await;
    let file = stack.source_file(&dev, "kill/random.bin", 24 * MIB).await;
    // With 6 kills: 3 MiB/s, ~1.7 s per 5 MiB part, kills 0.1–3 s apart: they fall before
    // the first part, inside parts and after commits, and the upload (8 s of bytes at
    // least) outlasts them. More kills, slower link, so that they still fit.
    let rate = (18 * MIB / kills.max(1)).clamp(512 * 1024, 3 * MIB);
    stack.proxy.set_rate(Some(rate));
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;

    let mut killed = 0;
    for i in 1..=kills {
        let delay = Duration::from_millis(rng.gen_range(100..3000));
        let until = Instant::now() + delay;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cmd = stack.command(&command_id).await;
        if matches!(
            cmd["state"].as_str(),
            Some("done" | "failed" | "rejected" | "expired")
        ) {
            eprintln!("the command ended before kill {i}: {cmd}");
            break;
        }
        stack.kill_agent(&dev);
        eprintln!(
            "kill {i}/{kills} after {delay:?}: {} bytes sent so far, command {}",
            stack.proxy.bytes_sent(),
            cmd["state"]
        );
        // The database must be intact right after the kill (WAL replayed read-only).
        if dev.state_dir.join("agent.db").exists() {
            assert_eq!(
                stack.agent_db_integrity(&dev),
                "ok",
                "agent.db after kill {i}"
            );
        }
        stack.restart_agent(&dev);
        killed += 1;
    }
    eprintln!("{killed} of {kills} kills made before the upload ended");
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(180))
        .await;
    stack.verify_fault_upload(&dev, &file, &cmd).await;
    eprintln!(
        "file {} bytes; {} bytes sent to storage in all",
        file.size,
        stack.proxy.bytes_sent()
    );
}
