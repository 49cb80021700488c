//! `uplinkctl` driving uploads through a real gateway: `upload --follow --json` streams the
//! command, progress and the verified object (byte-identical in storage); a slowed upload
//! (`uplinkctl config --max-rate … --wait`) is paused, resumed and aborted with
//! `uplinkctl sessions …` while another `uplinkctl` follows it to its failure.

use std::time::Duration;

use serde_json::Value;
use uplink_e2e::ctl::Ctl;
use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_follow_json_streams_progress_then_the_verified_object() {
    let stack = Stack::start(StackOptions::default()).await;
    let ctl = Ctl::new(&stack);
    let dev = ctl.register_device(&stack, None).await;
    // 4 MiB/s: the 13 MiB upload takes about 3 s, long enough to be seen in progress.
    stack.start_agent(
        &dev,
        &AgentOptions {
            extra_toml: "max_upload_bytes_per_sec = 4194304".into(),
            ..Default::default()
        },
    );
    let file = stack
        .source_file(&dev, "rec/run-042.mcap", 13 * MIB + 12_345)
        .await;
    let target = format!("{}:{}", dev.id, file.path_str());
    let run = ctl
        .run(&["upload", &target, "--follow", "--json", "--priority", "7"])
        .await;
    assert_eq!(run.code, Some(0), "{run}");
    let docs = run.json_lines();
    assert!(docs.len() >= 3, "command, progress, done: {run}");

    // First the command, then progress only, then done.
    let first = &docs[0];
    assert_eq!(first["event"], "command", "{run}");
    assert_eq!(first["device_id"], dev.id.as_str());
    assert_eq!(first["path"], file.path_str());
    let command_id = first["command_id"]
        .as_str()
        .expect("command_id")
        .to_string();
    let done = docs.last().expect("docs");
    assert_eq!(done["event"], "done", "{run}");
    let progress: Vec<&Value> = docs[1..docs.len() - 1].iter().collect();
    assert!(!progress.is_empty(), "no progress documents: {run}");
    let mut last_bytes = 0;
    for p in &progress {
        assert_eq!(p["event"], "progress", "{run}");
        assert_eq!(p["command_id"], command_id.as_str(), "{p}");
        for field in [
            "command_state",
            "session_id",
            "state",
            "bytes_done",
            "size",
            "rate_bps",
            "eta_secs",
        ] {
            assert!(p.get(field).is_some(), "progress lacks {field}: {p}");
        }
        let bytes = p["bytes_done"].as_u64().expect("bytes_done");
        assert!(bytes >= last_bytes, "bytes_done went back: {run}");
        last_bytes = bytes;
        if let Some(size) = p["size"].as_u64() {
            assert_eq!(size, file.size, "{p}");
            assert!(bytes <= size, "{p}");
        }
    }
    assert!(
        progress.iter().any(|p| p["state"] == "uploading"),
        "the upload was never seen uploading: {run}"
    );

    // The final document: the verified object.
    let session_id = done["session_id"].as_str().expect("session_id").to_string();
    assert_eq!(done["command_id"], command_id.as_str());
    assert_eq!(done["sha256"], file.sha256.as_str(), "{done}");
    assert_eq!(done["size"].as_u64(), Some(file.size), "{done}");
    assert!(done["object_key"]
        .as_str()
        .is_some_and(|k| k.ends_with("/run-042.mcap")));
    assert!(done["bucket"].is_string(), "{done}");
    assert!(done["elapsed_secs"].is_number(), "{done}");
    assert!(
        matches!(done["digest_check"].as_str(), Some("verified" | "pending")),
        "{done}"
    );

    // The stack's own checks: command done, session completed, object byte-identical.
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(60))
        .await;
    assert_eq!(cmd["action"]["priority"], 7, "{cmd}");
    let session = stack.verify_upload(&file, &cmd).await;
    assert_eq!(session["session_id"], session_id.as_str());
    assert_eq!(session["object_key"], done["object_key"]);

    // The same through the read commands.
    let shown = ctl.ok(&["sessions", "show", &session_id]).await;
    assert_eq!(shown["state"], "completed", "{shown}");
    assert_eq!(shown["sha256"], file.sha256.as_str());
    let listed = ctl.ok(&["sessions", "list", "--device", &dev.id]).await;
    assert!(
        listed
            .as_array()
            .is_some_and(|l| l.iter().any(|s| s["session_id"] == session_id.as_str())),
        "{listed}"
    );
    let shown = ctl.ok(&["commands", "show", &command_id]).await;
    assert_eq!(shown["state"], "done", "{shown}");
    let listed = ctl.ok(&["commands", "list", "--device", &dev.id]).await;
    assert!(listed.as_array().is_some_and(|l| !l.is_empty()), "{listed}");
    let custody = ctl.ok(&["sessions", "manifest", &session_id]).await;
    assert_eq!(custody["signature_valid"], true, "{custody}");
    // Human output: a table with the session.
    let table = ctl.run(&["sessions", "list", "--device", &dev.id]).await;
    assert_eq!(table.code, Some(0), "{table}");
    assert!(table.stdout.starts_with("SESSION"), "{table}");
    assert!(table.stdout.contains(&session_id), "{table}");
    // The event feed shows the session's transitions.
    let events = ctl
        .run(&["--json", "events", "--after", "0", "--limit", "1000"])
        .await;
    assert_eq!(events.code, Some(0), "{events}");
    assert!(
        events
            .json_lines()
            .iter()
            .any(|e| e["action"] == "session.transition"
                && e["subject"] == session_id.as_str()
                && e["detail"]["to"] == "completed"),
        "{events}"
    );
    // Without --follow (and not on a terminal): the command only.
    let again = ctl.run(&["upload", &target, "--json"]).await;
    assert_eq!(again.code, Some(0), "{again}");
    let docs = again.json_lines();
    assert_eq!(docs.len(), 1, "{again}");
    assert_eq!(docs[0]["event"], "command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_abort_while_following() {
    let stack = Stack::start(StackOptions::default()).await;
    let ctl = Ctl::new(&stack);
    let dev = ctl.register_device(&stack, None).await;
    stack.start_agent(&dev, &AgentOptions::default());
    // Slow the gateway down at run time: 256 KiB/s makes the 12 MiB upload take ~50 s.
    let cfg = ctl
        .run(&[
            "--json",
            "config",
            &dev.id,
            "--max-rate",
            "256KiB/s",
            "--window",
            "00:00-23:59",
            "--wait",
        ])
        .await;
    assert_eq!(cfg.code, Some(0), "{cfg}");
    let cmd = cfg.json();
    assert_eq!(cmd["state"], "done", "{cmd}");
    assert_eq!(cmd["action"]["max_upload_bytes_per_sec"], 262_144, "{cmd}");
    assert_eq!(cmd["action"]["upload_windows"][0], "00:00-23:59", "{cmd}");

    let file = stack.source_file(&dev, "big.bin", 12 * MIB).await;
    let target = format!("{}:{}", dev.id, file.path_str());
    let mut follower = ctl.spawn(&["upload", &target, "--follow", "--json"]);
    let uploading = follower
        .until(Duration::from_secs(60), |d| d["state"] == "uploading")
        .await;
    let session_id = uploading["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();

    let paused = ctl.ok(&["sessions", "pause", &session_id]).await;
    assert_eq!(paused["state"], "paused", "{paused}");
    follower
        .until(Duration::from_secs(30), |d| d["state"] == "paused")
        .await;
    // Pausing twice is refused by the API: one line, exit 3.
    let twice = ctl.run(&["sessions", "pause", &session_id]).await;
    assert_eq!(twice.code, Some(3), "{twice}");
    assert!(
        twice.stderr.trim_end().starts_with("error: 409 ") && twice.stderr.lines().count() == 1,
        "{twice}"
    );

    let resumed = ctl.ok(&["sessions", "resume", &session_id]).await;
    assert_eq!(resumed["state"], "uploading", "{resumed}");
    follower
        .until(Duration::from_secs(30), |d| d["state"] == "uploading")
        .await;

    // Ctrl-C stops a follower (exit 130), not its upload.
    let other = stack.source_file(&dev, "other.bin", 6 * MIB).await;
    let mut interrupted = ctl.spawn(&[
        "upload",
        &format!("{}:{}", dev.id, other.path_str()),
        "--follow",
        "--json",
    ]);
    let started = interrupted
        .until(Duration::from_secs(30), |d| d["event"] == "command")
        .await;
    let other_command = started["command_id"].as_str().expect("id").to_string();
    let pid = interrupted.child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let (code, _, stderr) = interrupted.finish(Duration::from_secs(30)).await;
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("the upload goes on"), "{stderr}");
    let cmd = ctl.ok(&["commands", "show", &other_command]).await;
    assert!(
        !matches!(cmd["state"].as_str(), Some("failed" | "rejected")),
        "{cmd}"
    );

    let aborted = ctl.run(&["sessions", "abort", &session_id]).await;
    assert_eq!(aborted.code, Some(0), "{aborted}");
    assert_eq!(
        aborted.stdout.trim(),
        format!("session {session_id}: aborted")
    );
    // The follower ends with the failure: exit 1, a `failed` document and the reason.
    let (code, lines, stderr) = follower.finish(Duration::from_secs(60)).await;
    assert_eq!(code, Some(1), "stdout: {lines:?}\nstderr: {stderr}");
    let last: Value = serde_json::from_str(lines.last().expect("lines")).expect("json");
    assert_eq!(last["event"], "failed", "{last}");
    assert_eq!(last["state"], "aborted", "{last}");
    assert_eq!(last["session_id"], session_id.as_str(), "{last}");
    assert!(
        stderr.contains("error: upload failed: session aborted"),
        "{stderr}"
    );
    let shown = ctl.ok(&["sessions", "show", &session_id]).await;
    assert_eq!(shown["state"], "aborted", "{shown}");

    // Lift the cap and go back to the gateway's file.
    let reset = ctl
        .run(&[
            "config",
            &dev.id,
            "--max-rate",
            "unlimited",
            "--always",
            "--wait",
        ])
        .await;
    assert_eq!(reset.code, Some(0), "{reset}");
    assert!(reset.stdout.contains(": done"), "{reset}");
    let reset = ctl.run(&["config", &dev.id, "--reset", "--wait"]).await;
    assert_eq!(reset.code, Some(0), "{reset}");
}
