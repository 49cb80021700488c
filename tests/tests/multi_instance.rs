//! Several instances, proven: two control APIs behind a round-robin balancer and two
//! bridges on Mosquitto with shared subscriptions (`StackOptions::apis`, `bridges`).
//! Exactly-once outcomes are asserted, never timings:
//! - every device request is answered once (each goes to one bridge), and both bridges
//!   take a share;
//! - every command is claimed and published by one bridge, delivered to its device once
//!   and acked once; it is pushed (the operator call → device times are printed, for
//!   docs/operations.md, not asserted);
//! - one request sent to both APIs at once makes one session.
//!
//! Under load (four agents, twelve uploads), one bridge and then one API are SIGKILLed;
//! nothing may be lost: every upload completes byte-identical, one session per command,
//! one final ack each (a final ack lost with a killed instance is repaired by the accepted
//! command's re-publishing, `command_recheck_secs`), no multipart upload left open (the
//! orphan the killed API may leave is aborted by the sweep); the API workers do their work
//! once across the instances: one validation verdict per object, every digest checked, an
//! idle session expired once, audit rows numbered 1..N without a gap, every event delivered
//! to a webhook (twice at most for one event: the one whose delivery the killed API had in
//! flight).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Connection;
use uplink_e2e::device::signed;
use uplink_e2e::receiver::WebhookReceiver;
use uplink_e2e::stack::as_list;
use uplink_e2e::{
    AgentOptions, Device, DeviceHttp, MqttDevice, Service, SourceFile, Stack, StackOptions, MIB,
};
use uplink_protocol::envelope::{CommandEnvelope, ResponseEnvelope};
use uplink_protocol::topics::{self, Channel};

/// Two APIs, two bridges, Mosquitto; workers fast enough for a short test.
fn fleet(extra_env: &[(&str, &str)]) -> StackOptions {
    let mut service_env: Vec<(String, String)> = vec![
        // A command whose ack was lost with a killed bridge is sent again soon.
        ("UPLINK_API_COMMAND_RESEND_SECS".into(), "5".into()),
    ];
    service_env.extend(
        extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    StackOptions {
        external_broker: true,
        apis: 2,
        bridges: 2,
        api_extra_toml: "\n[events]\nwebhook_allow_private = true\nwebhook_timeout_secs = 3\n\
             \n[cleanup]\ninterval_secs = 1\nsession_idle_secs = 20\n\
             \n[validation]\ninterval_secs = 1\nlease_secs = 3\nretry_initial_secs = 1\n"
            .into(),
        service_env,
        ..StackOptions::default()
    }
}

/// A device played by the test: registered, connected to Mosquitto, subscribed to its
/// `res` and `cmd` topics, and online (a signed, retained `status`).
async fn sim_device(stack: &Stack) -> (Device, MqttDevice) {
    let dev = stack.register_device().await;
    let mut mqtt = MqttDevice::connect(stack.mqtt_port, &dev.id, &dev.key).await;
    mqtt.subscribe(&topics::topic(&dev.id, Channel::Res)).await;
    mqtt.subscribe(&topics::topic(&dev.id, Channel::Cmd)).await;
    let status: uplink_protocol::telemetry::Status = serde_json::from_value(
        json!({"v": 1, "state": "online", "ts_ms": uplink_protocol::unix_now() * 1000}),
    )
    .expect("status");
    let status = serde_json::to_vec(&status.signed(&dev.key, &dev.id)).expect("json");
    mqtt.client
        .publish(
            topics::topic(&dev.id, Channel::Status),
            rumqttc::QoS::AtLeastOnce,
            true,
            status,
        )
        .await
        .expect("publish status");
    (dev, mqtt)
}

/// Waits until the API shows the device online.
async fn wait_online(stack: &Stack, dev: &Device) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d = stack.get_json(&format!("/v1/devices/{}", dev.id)).await;
        if d.body["online"] == true {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} not online within 20 s: {d}",
            dev.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes the device's signed ack of `command_id` on `cmd/ack`.
async fn ack(mqtt: &MqttDevice, dev: &Device, command_id: &str, state: &str) {
    let body = json!({"command_id": command_id, "state": state});
    let ack = signed(&dev.key, &dev.id, "command.ack", &body);
    mqtt.publish(
        &topics::topic(&dev.id, Channel::CmdAck),
        serde_json::to_vec(&ack).expect("json"),
    )
    .await;
}

/// The command id inside a `cmd` payload.
fn command_id_of(payload: &[u8]) -> String {
    let envelope: CommandEnvelope = serde_json::from_slice(payload).expect("a command envelope");
    let command: Value = serde_json::from_str(&envelope.command).expect("command JSON");
    command["command_id"]
        .as_str()
        .expect("command_id")
        .to_string()
}

/// The client ids Mosquitto delivered `req` messages to (from its `log_type all` log).
fn req_receivers(stack: &Stack) -> HashSet<String> {
    let log = std::fs::read_to_string(stack.dir.path().join("mosquitto.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("/req'"))
        .filter_map(|l| l.split("Sending PUBLISH to ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// How many times each bridge instance logged publishing `command_id`.
fn publications(stack: &Stack, command_id: &str) -> usize {
    (0..stack.instances(Service::Bridge))
        .map(|i| {
            stack
                .instance_log(Service::Bridge, i)
                .lines()
                .filter(|l| l.contains("Command published") && l.contains(command_id))
                .count()
        })
        .sum()
}

#[tokio::test]
async fn requests_and_commands_are_handled_once_across_instances() {
    // The old default sweep; pushed commands do not wait for it.
    let stack = Stack::start(fleet(&[("UPLINK_BRIDGE_POLL_INTERVAL_MS", "1000")])).await;
    stack.wait_bridges_subscribed(Duration::from_secs(30)).await;

    // --- device requests: six devices, ten requests each, all at once.
    let mut devices = Vec::new();
    for _ in 0..6 {
        devices.push(sim_device(&stack).await);
    }
    let mut asked: HashMap<String, String> = HashMap::new(); // request id → device
    for (dev, mqtt) in &devices {
        for _ in 0..10 {
            let body = json!({ "session_id": uuid::Uuid::new_v4() });
            let env = signed(&dev.key, &dev.id, "session.status", &body);
            mqtt.publish_request(&dev.id, &env).await;
            asked.insert(env.request_id.clone(), dev.id.clone());
        }
    }
    let mut answers: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut settled = None;
    loop {
        for (dev, mqtt) in devices.iter_mut() {
            let res_topic = topics::topic(&dev.id, Channel::Res);
            for (topic, payload) in mqtt.collect(Duration::from_millis(50)).await.publishes {
                if topic == res_topic {
                    let res: ResponseEnvelope =
                        serde_json::from_slice(&payload).expect("a response envelope");
                    *answers.entry(res.request_id).or_default() += 1;
                } else {
                    panic!("unexpected publish on {topic}");
                }
            }
        }
        let all = asked.keys().all(|r| answers.contains_key(r));
        // Once all are answered, listen a second longer for duplicates.
        match (all, settled) {
            (true, None) => settled = Some(tokio::time::Instant::now() + Duration::from_secs(1)),
            (true, Some(t)) if tokio::time::Instant::now() > t => break,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} requests answered within 60 s",
            answers.len(),
            asked.len()
        );
    }
    let twice: Vec<_> = answers.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "requests answered more than once: {twice:?}"
    );
    assert_eq!(answers.len(), asked.len(), "answers to requests never sent");
    let receivers = req_receivers(&stack);
    assert_eq!(
        receivers.len(),
        2,
        "both bridges take a share of the requests: {receivers:?}"
    );

    // --- one request sent to both APIs at once makes one session.
    let (dev, _) = &devices[0];
    let body = json!({"job_id": uuid::Uuid::new_v4(), "file_name": "twice.bin", "size": 1024,
                      "sha256": "0".repeat(64), "part_size": 5 * MIB});
    let env = signed(&dev.key, &dev.id, "session.create", &body);
    let a = DeviceHttp::new(&stack.api_instance_urls[0], None);
    let b = DeviceHttp::new(&stack.api_instance_urls[1], None);
    let (ra, rb) = tokio::join!(a.send(&dev.id, &env), b.send(&dev.id, &env));
    assert!(ra.is_success() && rb.is_success(), "{ra}\n{rb}");
    assert_eq!(ra.body["session_id"], rb.body["session_id"], "{ra}\n{rb}");
    assert_eq!(stack.sessions(&dev.id).await.len(), 1, "one session");

    // --- commands: pushed to a connected device, one bridge publishing each.
    let (dev, mqtt) = &mut devices[1];
    wait_online(&stack, dev).await;
    let cmd_topic = topics::topic(&dev.id, Channel::Cmd);
    let mut latencies = Vec::new();
    let mut ids = Vec::new();
    // Every delivery on `cmd`, by command id (a second one would be a duplicate).
    let mut delivered: HashMap<String, usize> = HashMap::new();
    for i in 0..10 {
        let started = Instant::now();
        let id = stack
            .upload_command(&dev.id, &format!("/data/run-{i}.bin"))
            .await;
        while !delivered.contains_key(&id) {
            let c = mqtt.collect(Duration::from_millis(5)).await;
            for (_, p) in c.publishes.iter().filter(|(t, _)| *t == cmd_topic) {
                *delivered.entry(command_id_of(p)).or_default() += 1;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "command {id} not delivered within 20 s"
            );
        }
        latencies.push(started.elapsed());
        ack(mqtt, dev, &id, "accepted").await;
        ids.push(id);
    }
    latencies.sort();
    eprintln!(
        "command → device over 2 APIs and 2 bridges (operator POST to MQTT delivery), \
         10 commands: min {:?}, median {:?}, max {:?}",
        latencies[0], latencies[5], latencies[9]
    );
    // `done` once `accepted` is recorded: the two acks may go to different bridges, and a
    // final state is never undone by a late `accepted`.
    for id in &ids {
        eventually(
            &stack,
            "the accepted ack recorded",
            Duration::from_secs(20),
            || {
                let stack = &stack;
                async move {
                    let state = stack.command(id).await["state"].clone();
                    if state == "accepted" {
                        Ok(())
                    } else {
                        Err(state.to_string())
                    }
                }
            },
        )
        .await;
        ack(mqtt, dev, id, "done").await;
    }
    for id in &ids {
        let cmd = stack.wait_command_final(id, Duration::from_secs(30)).await;
        assert_eq!(cmd["state"], "done", "{cmd}");
    }
    // No second delivery: the commands are acked, and none was published twice.
    let late = mqtt.collect(Duration::from_secs(2)).await.publishes;
    for (_, p) in late.iter().filter(|(t, _)| *t == cmd_topic) {
        *delivered.entry(command_id_of(p)).or_default() += 1;
    }
    let expected: HashMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(delivered, expected, "each command delivered once");
    for id in &ids {
        assert_eq!(publications(&stack, id), 1, "command {id} published once");
        assert_eq!(stack.acks_recorded(id, "accepted").await, 1, "{id}");
        assert_eq!(stack.acks_recorded(id, "done").await, 1, "{id}");
    }
}

/// Waits until `check` holds, polling every 300 ms; panics with `what` after `timeout`.
async fn eventually<F, Fut>(stack: &Stack, what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let outcome = check().await;
        match outcome {
            Ok(()) => return,
            Err(why) if tokio::time::Instant::now() > deadline => {
                stack.dump_logs();
                panic!("{what} not within {timeout:?}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// Writes a JSON Lines file of about `size` bytes under the device's root.
fn jsonl_file(dev: &Device, name: &str, size: u64) -> SourceFile {
    let path = dev.root.join(name);
    let mut text = String::new();
    let mut i = 0u64;
    while (text.len() as u64) < size {
        text.push_str(&format!(
            "{{\"i\":{i},\"device\":\"{}\",\"pad\":\"{}\"}}\n",
            dev.id,
            "x".repeat(200)
        ));
        i += 1;
    }
    std::fs::write(&path, &text).expect("write jsonl");
    let (sha256, size) = uplink_e2e::files::sha256_file(&path);
    SourceFile { path, size, sha256 }
}

/// Waits until agents have sent `bytes` towards storage; panics with `why` after 120 s.
async fn wait_bytes(stack: &Stack, bytes: u64, why: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while stack.proxy.bytes_sent() < bytes {
        stack.assert_alive();
        assert!(tokio::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn killing_a_bridge_and_an_api_mid_load_loses_nothing() {
    let stack = Stack::start(StackOptions {
        // The orphan sweep aborts, after a short grace, the multipart upload an API killed
        // between CreateMultipartUpload and storing its session leaves behind; a prefix of
        // its own keeps it away from other tests' uploads in the shared bucket.
        key_prefix: format!("kill-{}/", uuid::Uuid::new_v4()),
        ..fleet(&[
            ("UPLINK_API_CLEANUP__ORPHAN_GRACE_SECS", "10"),
            // A final ack lost with the killed bridge or API is repaired by re-publishing
            // the accepted command; the agent answers with its stored `done`.
            ("UPLINK_API_COMMAND_RECHECK_SECS", "5"),
        ])
    })
    .await;
    stack.wait_bridges_subscribed(Duration::from_secs(30)).await;
    let mut conn = sqlx::PgConnection::connect(&stack.db.url)
        .await
        .expect("connect to the test database");
    // Every object is validated: the default dataset takes JSON Lines.
    let patched = stack
        .operator(
            reqwest::Method::PATCH,
            "/v1/projects/default/datasets/default",
            Some(json!({"validator": "jsonl"})),
        )
        .await;
    assert_eq!(patched.status, 200, "{patched}");
    let receiver = WebhookReceiver::start().await;
    let hook = stack
        .operator(
            reqwest::Method::POST,
            "/v1/webhooks",
            // From the first event on.
            Some(json!({"url": receiver.url(), "after": 0})),
        )
        .await;
    assert_eq!(hook.status, 201, "{hook}");

    // An abandoned session: the cleanup worker expires it (once) after 20 s idle.
    let idle = stack.register_device().await;
    let created = stack
        .device_http
        .call(
            &idle.id,
            &idle.key,
            "session.create",
            &json!({"job_id": uuid::Uuid::new_v4(), "file_name": "idle.bin", "size": 1024,
                    "sha256": "0".repeat(64), "part_size": 5 * MIB}),
        )
        .await;
    assert!(created.is_success(), "{created}");
    let idle_session = created.body["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();

    // Four agents, three uploads each, all commanded at once.
    let agent = AgentOptions {
        request_timeout_secs: 3,
        ..AgentOptions::default()
    };
    let mut jobs: Vec<(usize, SourceFile, String)> = Vec::new();
    let mut devs = Vec::new();
    for d in 0..4 {
        let dev = stack.add_device(&agent).await;
        for (n, size) in [(0, MIB), (1, 3 * MIB), (2, 7 * MIB)] {
            let file = jsonl_file(&dev, &format!("run-{n}.jsonl"), size);
            jobs.push((d, file, String::new()));
        }
        devs.push(dev);
    }
    for (d, file, id) in jobs.iter_mut() {
        *id = stack.upload_command(&devs[*d].id, file.path_str()).await;
    }

    // Mid-load: a bridge, then an API, SIGKILLed once uploads are under way.
    let total: u64 = jobs.iter().map(|(_, f, _)| f.size).sum();
    wait_bytes(&stack, total / 5, "uploads did not start").await;
    stack.kill_instance(Service::Bridge, 0).await;
    wait_bytes(
        &stack,
        total / 2,
        "uploads stalled after the bridge was killed",
    )
    .await;
    stack.kill_instance(Service::Api, 0).await;
    eprintln!(
        "killed bridge 0 at {} of {total} bytes and API 0 at {} bytes; balancer connections {:?}",
        total / 5,
        stack.proxy.bytes_sent(),
        stack.balancer.as_ref().map(|b| b.connections())
    );

    // Nothing lost: every command done, its object byte-identical, one session each.
    let mut sessions = Vec::new();
    for (_, file, id) in &jobs {
        let cmd = stack.wait_command_final(id, Duration::from_secs(180)).await;
        let session = stack.verify_upload(file, &cmd).await;
        assert_eq!(stack.acks_recorded(id, "done").await, 1, "{id}");
        assert!(stack.acks_recorded(id, "accepted").await <= 1, "{id}");
        sessions.push(session["session_id"].as_str().expect("id").to_string());
    }
    for (d, dev) in devs.iter().enumerate() {
        let mine: Vec<_> = jobs.iter().filter(|(j, _, _)| *j == d).collect();
        assert_eq!(
            stack.sessions(&dev.id).await.len(),
            mine.len(),
            "one session per command of {}",
            dev.id
        );
    }
    eventually(
        &stack,
        "no multipart upload left open (orphans aborted by the sweep)",
        Duration::from_secs(60),
        || {
            let stack = &stack;
            let devs = &devs;
            async move {
                for dev in devs {
                    let open = stack.open_uploads_of(dev).await;
                    if !open.is_empty() {
                        return Err(format!("{}: {open:?}", dev.id));
                    }
                }
                Ok(())
            }
        },
    )
    .await;

    // The workers, once each across the instances.
    eventually(
        &stack,
        "every object validated and its digest checked",
        Duration::from_secs(60),
        || {
            let stack = &stack;
            let sessions = &sessions;
            async move {
                for sid in sessions {
                    let s = stack.session(sid).await;
                    if s["validation"] != "accepted" || s["digest_check"] != "verified" {
                        return Err(format!("{s}"));
                    }
                }
                Ok(())
            }
        },
    )
    .await;
    for sid in &sessions {
        let verdicts = stack
            .audit(sid)
            .await
            .iter()
            .filter(|e| e["action"] == "session.validated")
            .count();
        assert_eq!(verdicts, 1, "one validation verdict for {sid}");
    }
    eventually(
        &stack,
        "the idle session expired",
        Duration::from_secs(60),
        || {
            let stack = &stack;
            let sid = &idle_session;
            async move {
                let s = stack.session(sid).await;
                if s["state"] == "expired" {
                    Ok(())
                } else {
                    Err(format!("{s}"))
                }
            }
        },
    )
    .await;
    let expiries = stack
        .audit(&idle_session)
        .await
        .iter()
        .filter(|e| e["action"] == "session.transition" && e["detail"]["to"] == "expired")
        .count();
    assert_eq!(expiries, 1, "the idle session expired once");

    // Audit rows numbered 1..N without a gap, and each delivered to the webhook.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let numbered = loop {
        let (rows, seqs, max): (i64, i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), count(seq), max(seq) FROM audit_events")
                .fetch_one(&mut conn)
                .await
                .expect("count audit rows");
        let delivered: HashSet<i64> = receiver.seqs().into_iter().collect();
        let missing: Vec<i64> = (1..=rows).filter(|s| !delivered.contains(s)).collect();
        let why = if rows != seqs {
            format!("{seqs} of {rows} audit rows numbered")
        } else if max != Some(rows) {
            format!("seq runs to {max:?} over {rows} rows: a gap")
        } else if !missing.is_empty() {
            format!("events not delivered to the webhook: {missing:?}")
        } else {
            break rows;
        };
        if tokio::time::Instant::now() > deadline {
            stack.dump_logs();
            panic!("audit rows numbered and delivered, not within 60 s: {why}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT seq) FROM audit_events")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(distinct, numbered, "no seq given twice");
    let mut times: BTreeMap<i64, usize> = BTreeMap::new();
    for seq in receiver.seqs() {
        *times.entry(seq).or_default() += 1;
    }
    let twice: Vec<(&i64, &usize)> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.len() <= 1 && twice.iter().all(|(_, n)| **n == 2),
        "events delivered more than once beyond the one in flight at the kill: {twice:?}"
    );
    let hooks = stack.get_json("/v1/webhooks").await;
    let hooks = as_list(&hooks.body).expect("webhook list");
    assert_eq!(hooks[0]["cursor"].as_i64(), Some(numbered), "{hooks:?}");
}
