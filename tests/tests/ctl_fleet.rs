//! `uplinkctl` for the fleet and the organisation, against the real API: login and
//! profiles, devices (register, list, show, disable, enable, rotate-key), projects and
//! datasets (create, seal, manifest), webhooks, the audit log and `events --follow`.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use uplink_e2e::ctl::Ctl;
use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_saves_a_profile_that_later_commands_use() {
    let stack = Stack::start(StackOptions::default()).await;
    let ctl = Ctl::new(&stack);
    // The token from standard input, nothing in the environment or the arguments.
    let mut login = ctl.command(&[
        "login",
        "--profile",
        "lab",
        "--api-url",
        &stack.api_url,
        "--set-default",
    ]);
    login
        .env_remove("UPLINK_TOKEN")
        .env_remove("UPLINK_API_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = login.spawn().expect("spawn login");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{}\n", stack.operator_token).as_bytes())
        .await
        .expect("write token");
    drop(stdin);
    let out = child.wait_with_output().await.expect("login");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "login: {stdout} {:?}", out.stderr);
    assert!(stdout.contains("saved as profile \"lab\""), "{stdout}");
    assert!(!stdout.contains(&stack.operator_token), "{stdout}");
    let file = ctl.home.path().join("config/uplink/ctl.toml");
    let mode = std::fs::metadata(&file)
        .expect("profile file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the profile file is private");
    let text = std::fs::read_to_string(&file).expect("read profiles");
    assert!(text.contains("default_profile = \"lab\""), "{text}");

    // Without URL or token in the environment: the default profile is used.
    let mut cmd = ctl.command(&["--json", "projects", "list"]);
    cmd.env_remove("UPLINK_TOKEN").env_remove("UPLINK_API_URL");
    let out = cmd.output().await.expect("projects list");
    assert!(out.status.success(), "{out:?}");
    let projects: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        projects
            .as_array()
            .is_some_and(|l| l.iter().any(|p| p["project_id"] == "default")),
        "{projects}"
    );
    // A login with a bad token is refused and saves nothing.
    let mut bad = ctl.command(&["login", "--profile", "broken", "--api-url", &stack.api_url]);
    bad.env("UPLINK_TOKEN", "upk_nope_nope");
    let out = bad.output().await.expect("bad login");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let text = std::fs::read_to_string(&file).expect("read profiles");
    assert!(!text.contains("broken"), "{text}");
    // `profiles` shows the profile, not the token.
    let run = ctl.run(&["profiles"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("lab *"), "{run}");
    assert!(!run.stdout.contains(&stack.operator_token), "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_projects_datasets_webhooks_audit_and_events() {
    let stack = Stack::start(StackOptions::default()).await;
    let ctl = Ctl::new(&stack);

    // The newest event now; a follower from there sees everything below.
    let newest = ctl
        .run(&["--json", "events", "--limit", "1"])
        .await
        .json_lines()
        .last()
        .and_then(|e| e["seq"].as_i64())
        .unwrap_or(0);
    let mut tail = ctl.spawn(&[
        "--json",
        "events",
        "--follow",
        "--after",
        &newest.to_string(),
    ]);

    // Projects and datasets.
    let project = ctl
        .ok(&[
            "projects",
            "create",
            "field",
            "--name",
            "Field trials",
            "--quota",
            "1GiB",
        ])
        .await;
    assert_eq!(project["name"], "Field trials", "{project}");
    let dataset = ctl
        .ok(&[
            "datasets",
            "create",
            "field",
            "trials",
            "--policy",
            r#"{"key_template":"{project}/{dataset}/{device}/{filename}"}"#,
        ])
        .await;
    assert_eq!(dataset["state"], "open", "{dataset}");
    let listed = ctl.ok(&["datasets", "list", "field"]).await;
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(2),
        "default and trials: {listed}"
    );
    let table = ctl.run(&["datasets", "list", "field"]).await;
    assert!(table.stdout.starts_with("DATASET"), "{table}");
    let shown = ctl.ok(&["datasets", "show", "field", "trials"]).await;
    assert_eq!(shown["name"], "trials");

    // A device in the project uploads into the default dataset.
    let dev = ctl.register_device(&stack, Some("field")).await;
    stack.start_agent(&dev, &AgentOptions::default());
    let file = stack.source_file(&dev, "a.bin", MIB + 7).await;
    let run = ctl
        .run(&[
            "--json",
            "upload",
            &format!("{}:{}", dev.id, file.path_str()),
            "--follow",
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run}");
    let done = run.json_lines().pop().expect("done");
    assert!(
        done["object_key"]
            .as_str()
            .is_some_and(|k| k.starts_with("field/default/")),
        "{done}"
    );

    // Manifest (open: what it would list now), then seal.
    let manifest = ctl.ok(&["datasets", "manifest", "field", "default"]).await;
    assert_eq!(manifest["sealed"], false, "{manifest}");
    assert_eq!(
        manifest["objects"][0]["sha256"],
        file.sha256.as_str(),
        "{manifest}"
    );
    let sealed = ctl.ok(&["datasets", "seal", "field", "trials"]).await;
    assert_eq!(sealed["sealed"], true, "{sealed}");
    let human = ctl.run(&["datasets", "manifest", "field", "default"]).await;
    assert!(human.stdout.contains(&file.sha256), "{human}");

    // Devices: list, show, disable, enable, rotate-key.
    let table = ctl.run(&["devices", "list", "--project", "field"]).await;
    assert!(
        table.stdout.starts_with("DEVICE") && table.stdout.contains(&dev.id),
        "{table}"
    );
    let d = ctl.ok(&["devices", "disable", &dev.id]).await;
    assert_eq!(d["enabled"], false, "{d}");
    let d = ctl.ok(&["devices", "show", &dev.id]).await;
    assert_eq!(d["enabled"], false, "{d}");
    let d = ctl.ok(&["devices", "enable", &dev.id]).await;
    assert_eq!(d["enabled"], true, "{d}");
    let other = ctl.register_device(&stack, None).await;
    let d = ctl
        .ok(&[
            "devices",
            "rotate-key",
            &dev.id,
            "--public-key",
            &other.public_key,
        ])
        .await;
    assert_eq!(d["public_key"], other.public_key.as_str(), "{d}");
    let dup = ctl
        .run(&[
            "devices",
            "register",
            &dev.id,
            "--public-key",
            &dev.public_key,
        ])
        .await;
    assert_eq!(dup.code, Some(3), "{dup}");
    assert!(
        dup.stderr.starts_with("error: 409 device_exists: "),
        "{dup}"
    );

    // Webhooks: the secret once, never in the listing.
    let hook = ctl
        .ok(&[
            "webhooks",
            "create",
            "https://hooks.example/uplink",
            "--project",
            "field",
            "--action",
            "session.transition",
        ])
        .await;
    let secret = hook["secret"].as_str().expect("secret").to_string();
    let hook_id = hook["webhook_id"].as_str().expect("id").to_string();
    let hooks = ctl.ok(&["webhooks", "list", "--project", "field"]).await;
    assert_eq!(hooks.as_array().map(Vec::len), Some(1), "{hooks}");
    assert!(!hooks.to_string().contains(&secret));
    let shown = ctl.ok(&["webhooks", "show", &hook_id]).await;
    assert_eq!(shown["url"], "https://hooks.example/uplink");
    let deleted = ctl.run(&["webhooks", "delete", &hook_id]).await;
    assert_eq!(deleted.code, Some(0), "{deleted}");
    let gone = ctl.run(&["webhooks", "show", &hook_id]).await;
    assert_eq!(gone.code, Some(3), "{gone}");
    assert!(
        gone.stderr.starts_with("error: 404 webhook_not_found"),
        "{gone}"
    );

    // The audit log has the device's story.
    let audit = ctl.ok(&["audit", "--subject", &dev.id]).await;
    let actions: Vec<&str> = audit
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"device.register"), "{audit}");
    assert!(actions.contains(&"device.update"), "{audit}");
    let table = ctl.run(&["audit", "--subject", &dev.id]).await;
    assert!(table.stdout.starts_with("ID"), "{table}");

    // The follower saw it all as it happened, in order.
    let mut seen = Vec::new();
    for action in [
        "project.create",
        "dataset.create",
        "device.register",
        "session.transition",
        "dataset.seal",
        "device.update",
        "webhook.create",
        "webhook.delete",
    ] {
        let e = tail
            .until(Duration::from_secs(30), |e| e["action"] == action)
            .await;
        let seq = e["seq"].as_i64().expect("seq");
        assert!(seq > newest, "{e}");
        seen.push(seq);
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
    // Still following: a later event arrives too.
    ctl.ok(&["devices", "disable", &other.id]).await;
    tail.until(Duration::from_secs(30), |e| {
        e["action"] == "device.update" && e["subject"] == other.id.as_str()
    })
    .await;
    // Ctrl-C ends the tail quietly (exit 0), like `tail -f`.
    interrupt(&tail.child);
    let (code, _, stderr) = tail.finish(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{stderr}");
}

/// SIGINT, as Ctrl-C sends.
fn interrupt(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(status.success());
}
