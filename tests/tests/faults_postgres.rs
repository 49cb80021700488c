//! PostgreSQL restarted mid-upload (`pg_ctl restart -m fast` on the test cluster; alone in
//! this test binary because every test of a binary shares the cluster): while it is down
//! the control API answers 503 and recovers by itself; the upload finishes byte-identical
//! in one session.
//!
//! Needs `UPLINK_STACK_DIR` (exported by `scripts/lib.sh` `stack_up`, so by `scripts/test`).

use std::path::PathBuf;
use std::time::Duration;

use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

fn pg_ctl() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin/pg_ctl"))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| PathBuf::from("pg_ctl"))
}

/// Runs `pg_ctl -D $UPLINK_STACK_DIR/pg ARGS` as the postgres user when root.
fn pg(args: &[&str]) {
    let dir = std::env::var("UPLINK_STACK_DIR").expect(
        "UPLINK_STACK_DIR is not set: run the tests through scripts/test (stack_up exports it)",
    );
    let data = format!("{dir}/pg");
    let pg_ctl = pg_ctl();
    let mut cmd = if nix_is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
        c
    } else {
        std::process::Command::new(&pg_ctl)
    };
    let out = cmd
        .args(["-D", &data, "-w", "-t", "60"])
        .args(args)
        .output()
        .expect("run pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The server options of the cluster's last start (postmaster.opts without the binary and
/// its `-D`), to start it again the same way.
fn postmaster_opts() -> String {
    let dir = std::env::var("UPLINK_STACK_DIR").expect("UPLINK_STACK_DIR");
    let text =
        std::fs::read_to_string(format!("{dir}/pg/postmaster.opts")).expect("read postmaster.opts");
    let words: Vec<&str> = text.split_whitespace().skip(1).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        if words[i] == "\"-D\"" {
            i += 2;
            continue;
        }
        out.push(words[i]);
        i += 1;
    }
    out.join(" ")
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_upload() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack
        .add_device(&AgentOptions {
            concurrency: 2,
            part_size_mib: 5,
            ..AgentOptions::default()
        })
        .await;
    let file = stack.source_file(&dev, "pg/restart.bin", 16 * MIB).await;
    stack.proxy.set_rate(Some(4 * MIB));
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    stack
        .wait_proxy_bytes(&command_id, 4 * MIB, Duration::from_secs(60))
        .await;

    eprintln!("stopping PostgreSQL at {} bytes", stack.proxy.bytes_sent());
    pg(&["stop", "-m", "fast"]);
    // Down for 3 s: the API answers 503 meanwhile.
    let reply = stack.get_json(&format!("/v1/commands/{command_id}")).await;
    let ready = reqwest::get(format!("{}/readyz", stack.api_url))
        .await
        .expect("GET /readyz")
        .status()
        .as_u16();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // `start` does not reuse the options of the first start (port, sockets...):
    // pass them again from postmaster.opts.
    let opts = postmaster_opts();
    pg(&["start", "-l", "/dev/null", "-o", &opts]);
    eprintln!(
        "PostgreSQL up again; during the outage: GET command {}, readyz {ready}",
        reply.status
    );
    assert_eq!(
        reply.status, 503,
        "operator API while the database is down: {reply}"
    );
    assert_eq!(ready, 503, "/readyz while the database is down");

    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(180))
        .await;
    stack.verify_fault_upload(&dev, &file, &cmd).await;
}
