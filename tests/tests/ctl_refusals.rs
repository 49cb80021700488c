//! What `uplinkctl` says when it is refused: a viewer key (made with `uplinkctl keys create
//! --role viewer`) reads but may not write (one line `error: 403 forbidden: …`, exit 3), a
//! bad token (401, exit 3), a project quota a gateway upload does not fit (the API's reason,
//! exit 1), an unknown device (404, exit 3), a path the gateway rejects (exit 1), an API
//! that is gone (exit 4); the token is in none of the messages.

use uplink_e2e::ctl::Ctl;
use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_key_and_bad_tokens_are_refused_clearly() {
    let stack = Stack::start(StackOptions::default()).await;
    let admin = Ctl::new(&stack);
    let dev = admin.register_device(&stack, None).await;

    // A viewer key of project default; its token is shown once, in the answer.
    let key = admin
        .ok(&[
            "keys",
            "create",
            "--name",
            "dashboard",
            "--role",
            "viewer",
            "--project",
            "default",
        ])
        .await;
    assert_eq!(key["role"], "viewer", "{key}");
    let token = key["token"].as_str().expect("token").to_string();
    let human = admin
        .run(&[
            "keys",
            "create",
            "--name",
            "second",
            "--role",
            "viewer",
            "--project",
            "default",
        ])
        .await;
    assert_eq!(human.code, Some(0), "{human}");
    assert!(human.stdout.contains("token: upk_"), "{human}");
    assert!(human.stderr.contains("shown once"), "{human}");
    let keys = admin.ok(&["keys", "list", "--project", "default"]).await;
    assert_eq!(keys.as_array().map(Vec::len), Some(2), "{keys}");
    assert!(
        !keys.to_string().contains(&token),
        "keys list shows no token"
    );

    // The viewer reads…
    let viewer = Ctl::with_token(&stack, &token);
    let shown = viewer.ok(&["devices", "show", &dev.id]).await;
    assert_eq!(shown["device_id"], dev.id.as_str());
    let listed = viewer.ok(&["devices", "list"]).await;
    assert!(listed.as_array().is_some_and(|l| l.len() == 1), "{listed}");

    // …and every write is refused with one clear line and exit 3, without the token.
    let refusals: [&[&str]; 4] = [
        &["devices", "disable", &dev.id],
        &["upload", &format!("{}:/data/x.mcap", dev.id), "--no-follow"],
        &["config", &dev.id, "--max-rate", "1MiB/s"],
        &["datasets", "create", "default", "trials"],
    ];
    for args in refusals {
        let run = viewer.run(args).await;
        assert_eq!(run.code, Some(3), "{run}");
        let err = run.stderr.trim_end();
        assert_eq!(err.lines().count(), 1, "one line: {run}");
        assert!(err.starts_with("error: 403 forbidden: "), "{run}");
        assert!(
            !run.stderr.contains(&token) && !run.stdout.contains(&token),
            "{run}"
        );
        let secret = token.rsplit('_').next().expect("secret part");
        assert!(!run.stderr.contains(secret), "{run}");
    }
    // With --json the problem document comes too (on stderr), then the line.
    let run = viewer.run(&["--json", "devices", "enable", &dev.id]).await;
    assert_eq!(run.code, Some(3), "{run}");
    let problem: serde_json::Value =
        serde_json::from_str(run.stderr.lines().next().expect("line")).expect("problem json");
    assert_eq!(problem["code"], "forbidden", "{run}");
    assert_eq!(problem["status"], 403, "{run}");
    // The device is untouched.
    let shown = admin.ok(&["devices", "show", &dev.id]).await;
    assert_eq!(shown["enabled"], true, "{shown}");

    // A bad token: 401, exit 3, not echoed.
    let bad_token = "upk_nosuchkey_d3adb33fd3adb33f";
    let bad = Ctl::with_token(&stack, bad_token);
    let run = bad.run(&["devices", "list"]).await;
    assert_eq!(run.code, Some(3), "{run}");
    assert!(run.stderr.starts_with("error: 401 unauthorized"), "{run}");
    assert!(!run.stderr.contains("d3adb33f"), "{run}");
    // A bad request (invalid body): refused by the API, the token is not in the message.
    let run = admin
        .run(&["devices", "register", "bad id!", "--public-key", "nope"])
        .await;
    assert_eq!(run.code, Some(3), "{run}");
    assert!(run.stderr.starts_with("error: 422 "), "{run}");
    assert!(!run.stderr.contains(&stack.operator_token), "{run}");
    // A revoked key is refused at once.
    let key_id = key["key_id"].as_str().expect("key_id");
    let revoked = admin.ok(&["keys", "revoke", key_id]).await;
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    let run = viewer.run(&["devices", "list"]).await;
    assert_eq!(run.code, Some(3), "{run}");

    // The API gone: exit 4, the token in no message.
    stack.kill_api();
    let run = admin.run(&["devices", "list"]).await;
    assert_eq!(run.code, Some(4), "{run}");
    assert!(run.stderr.contains("unreachable"), "{run}");
    assert!(!run.stderr.contains(&stack.operator_token), "{run}");
    stack.restart_api().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_fails_the_upload_with_the_apis_reason() {
    let stack = Stack::start(StackOptions::default()).await;
    let ctl = Ctl::new(&stack);
    let project = ctl
        .ok(&["projects", "create", "tight", "--quota", "1MiB"])
        .await;
    assert_eq!(project["quota_bytes"], 1_048_576, "{project}");
    let dev = ctl.register_device(&stack, Some("tight")).await;
    assert_eq!(
        ctl.ok(&["devices", "show", &dev.id]).await["project_id"],
        "tight"
    );
    stack.start_agent(&dev, &AgentOptions::default());
    // A device that does not exist: refused before anything is sent.
    let run = ctl
        .run(&["upload", "no-such-robot:/data/x.bin", "--follow"])
        .await;
    assert_eq!(run.code, Some(3), "{run}");
    assert!(
        run.stderr.starts_with("error: 404 device_not_found: "),
        "{run}"
    );
    // A path outside the agent's allowed roots: the gateway rejects the command.
    let run = ctl
        .run(&[
            "upload",
            &format!("{}:/etc/hostname", dev.id),
            "--follow",
            "--json",
        ])
        .await;
    assert_eq!(run.code, Some(1), "{run}");
    let last = run.json_lines().pop().expect("docs");
    assert_eq!(last["event"], "failed", "{run}");
    assert_eq!(last["command_state"], "rejected", "{run}");
    assert!(
        run.stderr
            .starts_with("error: upload failed: command rejected: "),
        "{run}"
    );

    let file = stack.source_file(&dev, "too-big.bin", 3 * MIB).await;
    let target = format!("{}:{}", dev.id, file.path_str());
    let run = ctl
        .run(&["upload", &target, "--follow", "--json", "--timeout", "120"])
        .await;
    assert_eq!(run.code, Some(1), "{run}");
    let docs = run.json_lines();
    let last = docs.last().expect("docs");
    assert_eq!(last["event"], "failed", "{run}");
    let reason = last["reason"].as_str().expect("reason");
    // The agent's ack carries the API's refusal: status, code and detail.
    assert!(
        reason.contains("413 quota_exceeded") && reason.contains("do not fit"),
        "the API's reason: {run}"
    );
    assert!(
        run.stderr.contains("error: upload failed: ") && run.stderr.contains("quota"),
        "{run}"
    );
    // The human form says the same.
    let again = ctl
        .run(&["upload", &target, "--follow", "--timeout", "120"])
        .await;
    assert_eq!(again.code, Some(1), "{again}");
    assert!(again.stderr.contains("quota"), "{again}");
    // Nothing was used; the project shows it.
    let project = ctl.ok(&["projects", "show", "tight"]).await;
    assert_eq!(project["used_bytes"], 0, "{project}");
    let table = ctl.run(&["projects", "list"]).await;
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("tight") && l.contains("1.0 MiB")),
        "{table}"
    );
    // Raising the quota lets the same upload through.
    let raised = ctl
        .ok(&["projects", "update", "tight", "--quota", "1GiB"])
        .await;
    assert_eq!(raised["quota_bytes"], 1_073_741_824u64, "{raised}");
    let run = ctl
        .run(&["upload", &target, "--follow", "--json", "--timeout", "120"])
        .await;
    assert_eq!(run.code, Some(0), "{run}");
    let done = run.json_lines().pop().expect("done");
    assert_eq!(done["sha256"], file.sha256.as_str(), "{done}");
}
