//! Directory watches on the real stack: a file dropped in a watched directory is uploaded
//! without any command, byte-identical, under its dataset's key; a file still being written
//! waits until it settles; a restart does not upload it again; `after_upload = "delete"`
//! removes the file after a verified upload and keeps it when the upload fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use uplink_e2e::files::{s3_download, sha256_file, SourceFile};
use uplink_e2e::{AgentOptions, Device, Stack, StackOptions, MIB};

const DATASET: &str = "field-tests";

/// Registers a device, creates `{root}/incoming` and starts its agent watching it.
async fn watching_device(stack: &Stack, settle_secs: u64, after_upload: &str) -> (Device, PathBuf) {
    let dev = stack.register_device().await;
    let incoming = dev.root.join("incoming");
    std::fs::create_dir_all(&incoming).expect("create the watched directory");
    let opts = AgentOptions {
        extra_toml: format!(
            "[[watch]]\nroot = {root}\nglob = \"**/*.bin\"\ndataset = \"{DATASET}\"\n\
             settle_secs = {settle_secs}\nscan_interval_secs = 1\nafter_upload = \"{after_upload}\"\n",
            root = Value::String(incoming.to_string_lossy().into_owned()),
        ),
        ..AgentOptions::default()
    };
    stack.start_agent(&dev, &opts);
    (dev, incoming)
}

/// The device's sessions for files named like `path`.
async fn sessions_for(stack: &Stack, dev: &Device, path: &Path) -> Vec<Value> {
    let name = path.file_name().and_then(|n| n.to_str()).expect("name");
    stack
        .sessions(&dev.id)
        .await
        .into_iter()
        .filter(|s| s["file_name"] == name)
        .collect()
}

/// The object is under the dataset's key and byte-identical to `file`.
async fn verify_object(stack: &Stack, dev: &Device, session: &Value, file: &SourceFile) {
    let sid = session["session_id"].as_str().expect("session_id");
    let name = file
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name");
    assert_eq!(
        session["object_key"].as_str(),
        Some(format!("default/{DATASET}/{}/{sid}/{name}", dev.id).as_str()),
        "object key layout with a dataset: {session}"
    );
    assert_eq!(session["dataset"], DATASET, "{session}");
    assert!(
        session["command_id"].is_null(),
        "no command started it: {session}"
    );
    assert_eq!(session["size"].as_u64(), Some(file.size), "{session}");
    let bucket = session["bucket"].as_str().expect("bucket");
    let key = session["object_key"].as_str().expect("object_key");
    let dest = stack.dir.path().join(format!("download-{sid}"));
    assert_eq!(s3_download(&stack.env, bucket, key, &dest).await, 200);
    let (sha, len) = sha256_file(&dest);
    std::fs::remove_file(&dest).ok();
    assert_eq!((sha.as_str(), len), (file.sha256.as_str(), file.size));
}

/// `uplink-agent status --json`, the jobs as JSON.
fn status_jobs(stack: &Stack, dev: &Device) -> Vec<Value> {
    let out = std::process::Command::new(stack.env.bin("uplink-agent"))
        .arg("--config")
        .arg(dev.dir.join("agent.toml"))
        .args(["status", "--json"])
        .output()
        .expect("run uplink-agent status");
    assert!(out.status.success(), "status: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    v.as_array().cloned().unwrap_or_default()
}

/// The agent's jobs for `path` (which must exist: jobs hold canonical paths).
fn jobs_for(stack: &Stack, dev: &Device, path: &Path) -> Vec<Value> {
    let canonical = path.canonicalize().expect("canonical path");
    status_jobs(stack, dev)
        .into_iter()
        .filter(|j| j["path"].as_str() == canonical.to_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_file_uploads_once_under_its_dataset_even_across_a_restart() {
    let stack = Stack::start(StackOptions::default()).await;
    let (dev, incoming) = watching_device(&stack, 1, "keep").await;
    let file =
        uplink_e2e::files::write_random_file(&incoming.join("day1/run-1.bin"), 6 * MIB).await;
    // Neither of these may be uploaded: a hidden file being written, and another pattern.
    uplink_e2e::files::write_random_file(&incoming.join("day1/.run-2.bin.x7Yz"), MIB).await;
    uplink_e2e::files::write_random_file(&incoming.join("day1/notes.txt"), 1000).await;

    let session = stack
        .wait_completed_session(&dev, &file.sha256, Duration::from_secs(90))
        .await;
    verify_object(&stack, &dev, &session, &file).await;
    assert!(file.path.exists(), "after_upload = keep keeps the file");

    // A restart (and many scans) must not upload it again. A second file dropped after the
    // restart proves the watch is running again meanwhile.
    stack.restart_agent(&dev);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = uplink_e2e::files::write_random_file(&incoming.join("run-3.bin"), 2 * MIB).await;
    let s2 = stack
        .wait_completed_session(&dev, &second.sha256, Duration::from_secs(90))
        .await;
    verify_object(&stack, &dev, &s2, &second).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sessions = stack.sessions(&dev.id).await;
    assert_eq!(
        sessions.len(),
        2,
        "one session per file: no re-upload after the restart, nothing hidden or unmatched: {sessions:?}"
    );
    assert_eq!(sessions_for(&stack, &dev, &file.path).await.len(), 1);
    assert_eq!(jobs_for(&stack, &dev, &file.path).len(), 1, "one job");
    assert_eq!(stack.agent_db_integrity(&dev), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_growing_file_is_uploaded_only_once_it_settles() {
    let stack = Stack::start(StackOptions::default()).await;
    let (dev, incoming) = watching_device(&stack, 3, "keep").await;
    let path = incoming.join("growing.bin");
    // A writer appends 512 KiB every 700 ms for about 6 s (scans run every second).
    let mut f = std::fs::File::create(&path).expect("create");
    for i in 0..9u8 {
        f.write_all(&vec![i; 512 * 1024]).expect("append");
        f.sync_all().expect("sync");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let sessions = stack.sessions(&dev.id).await;
        assert!(
            sessions.is_empty(),
            "a file still being written must not be uploaded: {sessions:?}"
        );
        assert!(jobs_for(&stack, &dev, &path).is_empty(), "no job yet");
    }
    drop(f);
    let (sha256, size) = sha256_file(&path);
    let file = SourceFile { path, size, sha256 };
    let session = stack
        .wait_completed_session(&dev, &file.sha256, Duration::from_secs(90))
        .await;
    verify_object(&stack, &dev, &session, &file).await;
    let sessions = stack.sessions(&dev.id).await;
    assert_eq!(sessions.len(), 1, "only the settled file: {sessions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_after_upload_removes_the_file_on_success_and_keeps_it_on_failure() {
    let stack = Stack::start(StackOptions::default()).await;
    let (dev, incoming) = watching_device(&stack, 1, "delete").await;

    // Success: verified in storage, then deleted.
    let ok = uplink_e2e::files::write_random_file(&incoming.join("ok.bin"), 6 * MIB).await;
    let session = stack
        .wait_completed_session(&dev, &ok.sha256, Duration::from_secs(90))
        .await;
    verify_object(&stack, &dev, &session, &ok).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ok.path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an uploaded file with after_upload = delete must be deleted"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Failure: the operator aborts the session mid-upload; the file stays.
    stack.proxy.set_rate(Some(MIB));
    let bad = uplink_e2e::files::write_random_file(&incoming.join("aborted.bin"), 12 * MIB).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let sid = loop {
        let sessions = sessions_for(&stack, &dev, &bad.path).await;
        let started = sessions
            .iter()
            .find(|s| s["bytes_done"].as_u64().unwrap_or(0) > 0 || s["state"] == "uploading");
        if let Some(s) = started {
            break s["session_id"].as_str().expect("session_id").to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second upload never started: {sessions:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let reply = stack
        .operator(
            reqwest::Method::POST,
            &format!("/v1/sessions/{sid}/abort"),
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "abort: {reply}");
    stack.proxy.set_rate(None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = jobs_for(&stack, &dev, &bad.path);
        // The agent ends it `failed` or `cancelled` depending on where the abort finds it;
        // both must keep the file.
        if jobs
            .iter()
            .any(|j| j["state"] == "failed" || j["state"] == "cancelled")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job must end unsuccessfully once its session is aborted: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Several scans and delete passes later the file is still there, and not retried.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(bad.path.exists(), "a failed upload must keep its file");
    assert_eq!(sha256_file(&bad.path).0, bad.sha256, "untouched");
    assert_eq!(
        jobs_for(&stack, &dev, &bad.path).len(),
        1,
        "not queued again"
    );
    assert_eq!(sessions_for(&stack, &dev, &bad.path).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_datasets_and_watches_are_refused_with_clear_errors() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.add_device(&AgentOptions::default()).await;

    // The API: a label that is not one key segment is refused; no label keeps the old key.
    let body = |dataset: Option<&str>, job: uuid::Uuid| {
        let mut b = serde_json::json!({
            "job_id": job, "file_name": "x.bin", "size": 6 * MIB,
            "sha256": "ab".repeat(32), "part_size": 5 * MIB,
        });
        if let Some(d) = dataset {
            b["dataset"] = Value::String(d.into());
        }
        b
    };
    for bad in ["../up", "a/b", ".hidden", ""] {
        let reply = stack
            .device_http
            .call(
                &dev.id,
                &dev.key,
                "session.create",
                &body(Some(bad), uuid::Uuid::new_v4()),
            )
            .await;
        assert_eq!(reply.status, 422, "dataset {bad:?}: {reply}");
        assert!(
            reply.body.to_string().contains("invalid_dataset"),
            "{reply}"
        );
    }
    let job = uuid::Uuid::new_v4();
    let reply = stack
        .device_http
        .call(&dev.id, &dev.key, "session.create", &body(None, job))
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    let sid = reply.body["session_id"].as_str().expect("session_id");
    assert_eq!(
        reply.body["object_key"].as_str(),
        Some(format!("default/default/{}/{sid}/x.bin", dev.id).as_str()),
        "no dataset label: the project's default dataset"
    );
    let reply = stack
        .device_http
        .call(
            &dev.id,
            &dev.key,
            "session.create",
            &body(Some("other"), job),
        )
        .await;
    assert_eq!(reply.status, 409, "same job, another dataset: {reply}");

    // The agent: check-config refuses a watch outside allowed_roots and names it.
    let config = std::fs::read_to_string(dev.dir.join("agent.toml")).expect("agent.toml");
    let bad_config = dev.dir.join("bad-watch.toml");
    std::fs::write(
        &bad_config,
        format!(
            "{config}\n[[watch]]\nroot = {}\nglob = \"*.bin\"\ndataset = \"ok\"\n",
            Value::String(dev.dir.to_string_lossy().into_owned())
        ),
    )
    .expect("write config");
    let out = std::process::Command::new(stack.env.bin("uplink-agent"))
        .arg("--config")
        .arg(&bad_config)
        .arg("check-config")
        .output()
        .expect("run check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("watch[0] root") && text.contains("outside allowed_roots"),
        "{text}"
    );
}
