//! The agent's command line on the gateway, against a running stack: `upload FILE` queues a
//! local job the running daemon uploads (no operator command), `status --json` shows it
//! done, a file outside the allowed roots is refused with exit code 2, `doctor` passes
//! against the stack and fails with a wrong broker port, and `/metrics` counts the upload.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use uplink_e2e::stack::free_port;
use uplink_e2e::{AgentOptions, Device, Stack, StackOptions, MIB};

fn agent_cli(stack: &Stack, dev: &Device, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let config = dev.dir.join("agent.toml");
    let mut cmd = Command::new(stack.env.bin("uplink-agent"));
    cmd.arg("--config").arg(&config).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run uplink-agent {args:?}: {e}"));
    eprintln!(
        "uplink-agent {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_upload_status_doctor_and_metrics() {
    let stack = Stack::start(StackOptions::default()).await;
    let metrics_port = free_port();
    let opts = AgentOptions {
        extra_toml: format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
        ..AgentOptions::default()
    };
    let dev = stack.add_device(&opts).await;
    let file = stack.source_file(&dev, "rec/local.bin", 12 * MIB).await;

    // upload: queued locally, picked up by the running daemon.
    let out = agent_cli(&stack, &dev, &["upload", file.path_str()], &[]);
    assert_eq!(out.status.code(), Some(0), "upload must queue the file");
    let job_id = stdout(&out).trim().to_string();
    assert!(uuid::Uuid::parse_str(&job_id).is_ok(), "job id: {job_id:?}");

    let session = stack
        .wait_completed_session(&dev, &file.sha256, Duration::from_secs(180))
        .await;
    assert_eq!(session["size"].as_u64(), Some(file.size), "{session}");
    assert!(
        session["command_id"].is_null(),
        "a local upload has no command: {session}"
    );
    // Byte-identical in storage (the checks of a command upload, without a command).
    let as_command = json!({
        "state": "done",
        "session_id": session["session_id"],
        "command_id": null,
        "device_id": dev.id,
    });
    stack.verify_upload(&file, &as_command).await;

    // status --json shows the job done (the agent records it right after completion).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let job = loop {
        let out = agent_cli(&stack, &dev, &["status", "--json"], &[]);
        assert_eq!(out.status.code(), Some(0));
        let jobs: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["job_id"] == job_id.as_str()))
            .cloned()
            .unwrap_or_else(|| panic!("job {job_id} not in status: {jobs}"));
        if job["state"] == "done" || tokio::time::Instant::now() > deadline {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["local"], true, "{job}");
    assert_eq!(job["bytes_done"].as_u64(), Some(file.size), "{job}");
    // Hashed while it uploaded, with SHA-256 parts: the agent computed no whole-file
    // digest (the API hashes the stored object); the session carries it.
    assert!(job["sha256"].is_null(), "{job}");
    let session = stack
        .wait_session_digest(job["session_id"].as_str().expect("session"))
        .await;
    assert_eq!(
        session["sha256"].as_str(),
        Some(file.sha256.as_str()),
        "{session}"
    );
    let out = agent_cli(&stack, &dev, &["status"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("100.0%"), "text status");

    // Metrics count the upload.
    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{metrics}"))
    };
    assert_eq!(value("uplink_agent_bytes_uploaded_total"), file.size);
    assert_eq!(value("uplink_agent_parts_uploaded_total"), 3);
    assert_eq!(value("uplink_agent_jobs{state=\"done\"}"), 1);
    assert_eq!(value("uplink_agent_queue_depth"), 0);
    assert_eq!(value("uplink_agent_mqtt_connected"), 1);
    value("uplink_agent_parts_retried_total");
    value("uplink_agent_requests_resent_total");

    // A file outside the allowed roots: refused, exit 2, with the reason.
    let out = agent_cli(&stack, &dev, &["upload", "/etc/passwd"], &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "upload /etc/passwd must be refused"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outside the allowed roots"), "reason: {err}");
    // And a missing one.
    let missing = dev.root.join("nope.bin");
    let out = agent_cli(&stack, &dev, &["upload", path(&missing)], &[]);
    assert_eq!(out.status.code(), Some(2));

    // doctor: all ok against the stack; a wrong broker port fails.
    let out = agent_cli(&stack, &dev, &["doctor"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "doctor against the running stack"
    );
    let text = stdout(&out);
    assert!(
        text.contains(&dev.public_key),
        "doctor prints the public key"
    );
    assert!(text.contains("CONNECT as"), "{text}");
    let wrong = free_port().to_string();
    let out = agent_cli(
        &stack,
        &dev,
        &["doctor"],
        &[("UPLINK_AGENT_MQTT__PORT", wrong.as_str())],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "doctor with a wrong broker port"
    );
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("broker tcp") && l.contains("FAIL")),
        "broker tcp must fail"
    );

    // print-default-config is a valid config once its placeholders are filled.
    let out = agent_cli(&stack, &dev, &["print-default-config"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("metrics_listen"));
    stack.assert_alive();
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}
