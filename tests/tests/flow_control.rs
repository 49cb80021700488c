//! Flow control on the agent, through the real stack: a signed `config` command changes the
//! bandwidth cap and the upload windows at run time, priorities order queued jobs when
//! PUT slots are scarce, and an invalid config command changes nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use chrono::Timelike;
use serde_json::{json, Value};
use uplink_e2e::{AgentOptions, Device, Stack, StackOptions, MIB};

/// `POST /v1/devices/{id}/commands` with `action`; returns the reply.
async fn post_command(stack: &Stack, dev: &Device, action: Value) -> uplink_e2e::Reply {
    stack
        .operator(
            reqwest::Method::POST,
            &format!("/v1/devices/{}/commands", dev.id),
            Some(action),
        )
        .await
}

/// Sends a config command and waits for the agent's final ack, which must be `done`.
async fn config(stack: &Stack, dev: &Device, fields: Value) {
    let mut action = fields;
    action["type"] = json!("config");
    let reply = post_command(stack, dev, action).await;
    assert_eq!(reply.status, 201, "config command: {reply}");
    let id = reply.body["command_id"].as_str().expect("command_id");
    let cmd = stack.wait_command_final(id, Duration::from_secs(60)).await;
    assert_eq!(cmd["state"], "done", "config command: {cmd}");
}

/// Sends an upload command (with an optional priority); returns the command id.
async fn upload(stack: &Stack, dev: &Device, path: &str, priority: Option<u8>) -> String {
    let mut action = json!({ "type": "upload", "path": path });
    if let Some(p) = priority {
        action["priority"] = json!(p);
    }
    let reply = post_command(stack, dev, action).await;
    assert_eq!(reply.status, 201, "upload command: {reply}");
    reply.body["command_id"]
        .as_str()
        .expect("command_id")
        .to_string()
}

/// `uplink-agent status` (text) for the device.
fn status(stack: &Stack, dev: &Device) -> String {
    let out = Command::new(stack.env.bin("uplink-agent"))
        .arg("--config")
        .arg(dev.dir.join("agent.toml"))
        .arg("status")
        .output()
        .expect("run uplink-agent status");
    assert!(out.status.success(), "uplink-agent status: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A one-hour window starting two hours from now (local time): closed for the test.
fn closed_window() -> String {
    let now = chrono::Local::now();
    let m = now.hour() * 60 + now.minute();
    let (start, end) = ((m + 120) % 1440, (m + 180) % 1440);
    format!(
        "{:02}:{:02}-{:02}:{:02}",
        start / 60,
        start % 60,
        end / 60,
        end % 60
    )
}

/// Bytes that went through the proxy towards storage during `secs` seconds.
async fn bytes_during(stack: &Stack, secs: u64) -> u64 {
    let before = stack.proxy.bytes_sent();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stack.proxy.bytes_sent() - before
}

/// (a) The cap lowered by a config command slows the running upload; lifted, the upload
/// completes byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_command_changes_the_bandwidth_cap_at_run_time() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack
        .add_device(&AgentOptions {
            concurrency: 1,
            extra_toml: format!("max_upload_bytes_per_sec = {}", MIB),
            ..AgentOptions::default()
        })
        .await;
    let file = stack.source_file(&dev, "rec/capped.bin", 15 * MIB).await;
    let id = stack.upload_command(&dev.id, file.path_str()).await;
    stack
        .wait_proxy_bytes(&id, MIB / 2, Duration::from_secs(60))
        .await;
    let fast = bytes_during(&stack, 2).await;

    config(
        &stack,
        &dev,
        json!({ "max_upload_bytes_per_sec": 64 * 1024 }),
    )
    .await;
    assert!(
        status(&stack, &dev).contains("bandwidth 64.0 KiB/s"),
        "status shows the new cap"
    );
    // Let chunks read at the old rate drain, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let slow = bytes_during(&stack, 3).await;
    eprintln!("before: {fast} bytes in 2 s; after: {slow} bytes in 3 s");
    assert!(
        (slow as f64 / 3.0) < (fast as f64 / 2.0) * 0.4,
        "lowering the cap from 1 MiB/s to 64 KiB/s must slow the upload: {fast} B in 2 s \
         before, {slow} B in 3 s after"
    );
    let cmd = stack.command(&id).await;
    assert_eq!(cmd["state"], "accepted", "still running: {cmd}");

    config(&stack, &dev, json!({ "max_upload_bytes_per_sec": 0 })).await;
    let cmd = stack
        .wait_command_final(&id, Duration::from_secs(120))
        .await;
    stack.verify_upload(&file, &cmd).await;
    // Request headers add a few KiB; a part broken by the changes and sent again would add
    // up to 5 MiB.
    let sent = stack.proxy.bytes_sent();
    assert!(
        sent < 15 * MIB + MIB / 2,
        "{sent} bytes went to storage for a 15 MiB file: a part was sent twice"
    );
}

/// (b) Outside every upload window a job waits with no part uploaded; a config command
/// opening the window lets it finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_window_holds_a_job_until_a_config_command_opens_it() {
    let stack = Stack::start(StackOptions::default()).await;
    let window = closed_window();
    let dev = stack
        .add_device(&AgentOptions {
            extra_toml: format!("upload_windows = [\"{window}\"]"),
            ..AgentOptions::default()
        })
        .await;
    let file = stack.source_file(&dev, "rec/night.bin", 6 * MIB).await;
    let id = stack.upload_command(&dev.id, file.path_str()).await;
    // The job is hashed and its session made, then it waits.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = status(&stack, &dev);
        if text.contains("waiting for an upload window") {
            assert!(
                text.contains(&format!("windows {window} (closed now)")),
                "{text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job never waits for the window: {text}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stack.proxy.bytes_sent(),
        0,
        "no part moves outside the window"
    );
    assert_eq!(stack.command(&id).await["state"], "accepted");

    config(&stack, &dev, json!({ "upload_windows": [] })).await;
    let cmd = stack
        .wait_command_final(&id, Duration::from_secs(120))
        .await;
    stack.verify_upload(&file, &cmd).await;
    assert!(status(&stack, &dev).contains("windows always (open now)"));

    // The override outlives a restart; `reset` brings the file's window back.
    stack.restart_agent(&dev);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(status(&stack, &dev).contains("windows always"));
    config(&stack, &dev, json!({ "reset": true })).await;
    assert!(status(&stack, &dev).contains(&format!("windows {window} (closed now)")));
}

/// (c) With one PUT slot, a high-priority job queued after a low-priority one finishes
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_job_overtakes_a_queued_low_priority_one() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack
        .add_device(&AgentOptions {
            concurrency: 1,
            // The low job lines up all its parts at once; only priority can put the high
            // job's parts before them.
            extra_toml: format!(
                "per_job_concurrency = 4\nmax_upload_bytes_per_sec = {}",
                2 * MIB
            ),
            ..AgentOptions::default()
        })
        .await;
    let low_file = stack.source_file(&dev, "rec/low.bin", 20 * MIB).await;
    let high_file = stack.source_file(&dev, "rec/high.bin", 5 * MIB + 1).await;
    let low = upload(&stack, &dev, low_file.path_str(), Some(1)).await;
    stack
        .wait_proxy_bytes(&low, MIB / 4, Duration::from_secs(60))
        .await;
    let high = upload(&stack, &dev, high_file.path_str(), Some(9)).await;

    let deadline = Instant::now() + Duration::from_secs(180);
    let first = loop {
        let (l, h) = (stack.command(&low).await, stack.command(&high).await);
        match (l["state"].as_str(), h["state"].as_str()) {
            (Some("done"), _) => break "low",
            (_, Some("done")) => break "high",
            (a, b) => assert!(
                Instant::now() < deadline
                    && !matches!(a, Some("failed" | "rejected"))
                    && !matches!(b, Some("failed" | "rejected")),
                "low {l}, high {h}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(first, "high", "the priority 9 job must finish first");
    let h = stack
        .wait_command_final(&high, Duration::from_secs(10))
        .await;
    stack.verify_upload(&high_file, &h).await;
    let l = stack
        .wait_command_final(&low, Duration::from_secs(180))
        .await;
    stack.verify_upload(&low_file, &l).await;
}

/// (d) An invalid config command is refused with its reasons, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_command_is_refused_and_changes_nothing() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.add_device(&AgentOptions::default()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = status(&stack, &dev);

    let reply = post_command(
        &stack,
        &dev,
        json!({
            "type": "config",
            "max_upload_bytes_per_sec": 65536,
            "concurrency": 0,
            "upload_windows": ["22:00-06:00", "25:00-01:00"],
        }),
    )
    .await;
    assert_eq!(reply.status, 422, "{reply}");
    let detail = reply.body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("concurrency: 0 is outside"), "{reply}");
    assert!(detail.contains("\"25:00-01:00\""), "{reply}");
    for bad in [
        json!({ "type": "config" }),
        json!({ "type": "config", "bandwidth": 10 }),
        json!({ "type": "upload", "path": "/data/x", "priority": 10 }),
    ] {
        let reply = post_command(&stack, &dev, bad.clone()).await;
        assert!(
            (400..500).contains(&reply.status),
            "{bad} must be refused: {reply}"
        );
    }
    let commands = stack
        .get_json(&format!("/v1/commands?device_id={}", dev.id))
        .await;
    assert_eq!(
        commands.body.as_array().map(Vec::len),
        Some(0),
        "no command was issued: {commands}"
    );
    assert_eq!(status(&stack, &dev).lines().next(), before.lines().next());

    // The agent still uploads with its settings.
    let file = stack.source_file(&dev, "rec/after.bin", MIB).await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(120))
        .await;
}
