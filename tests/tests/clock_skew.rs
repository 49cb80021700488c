//! Gateways whose clock is wrong (issue 17, section 3). The real agent runs under
//! `faketime` (its wall clock shifted, its monotonic clock not) against SeaweedFS with
//! presigned URLs that live 10 s, so that judging them by the device's clock would use them
//! long after they expired (clock behind) or never at all (clock ahead):
//! - ±290 s (inside the API's 300 s replay window): the upload completes byte-identical,
//!   storage never refuses a URL as expired, and the device's presence status carries the
//!   offset, shown in the operator's device view;
//! - ±1 hour (beyond the window): refused, and said so: an hour ahead on an external
//!   broker, every signed request gets `stale_request` and the agent logs by how much its
//!   clock is off (also reported in its status); an hour behind on the embedded broker, the
//!   MQTT password is refused and the API logs why. Nothing is uploaded; once the clock is
//!   right (the agent restarted without `faketime`) the same command completes.

use std::time::Duration;

use serde_json::Value;
use uplink_e2e::{AgentOptions, Device, Service, SourceFile, Stack, StackOptions, MIB};

/// URLs live 10 s: renewed 2 s before, by the lifetime the API gives.
const TTL_SECS: u64 = 10;

fn stack_options(external_broker: bool) -> StackOptions {
    StackOptions {
        presign_ttl_secs: TTL_SECS,
        external_broker,
        ..StackOptions::default()
    }
}

/// One part at a time, 5 MiB parts: with the link at 1 MiB/s a part takes ~5 s, so the
/// third and fourth URLs of a presign batch of four are used 10–15 s after they were made.
fn agent(clock_offset_secs: Option<i64>) -> AgentOptions {
    AgentOptions {
        concurrency: 1,
        part_size_mib: 5,
        clock_offset_secs,
        ..AgentOptions::default()
    }
}

async fn device_view(stack: &Stack, dev: &Device) -> Value {
    let reply = stack.get_json(&format!("/v1/devices/{}", dev.id)).await;
    assert_eq!(reply.status, 200, "{reply}");
    reply.body
}

/// Waits until the device view's `clock_offset_secs` is within `range`; returns the view.
async fn wait_offset(stack: &Stack, dev: &Device, range: std::ops::RangeInclusive<i64>) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view = device_view(stack, dev).await;
        if view["clock_offset_secs"]
            .as_i64()
            .is_some_and(|o| range.contains(&o))
        {
            return view;
        }
        if tokio::time::Instant::now() > deadline {
            stack.dump_logs();
            panic!("device view has no clock_offset_secs in {range:?} after 30 s: {view}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn agent_log(dev: &Device) -> String {
    std::fs::read_to_string(dev.dir.join("agent.log")).unwrap_or_default()
}

async fn uploads_with_clock_off_by(offset: i64) {
    let stack = Stack::start(stack_options(false)).await;
    let dev = stack.add_device(&agent(Some(offset))).await;
    let file: SourceFile = stack.source_file(&dev, "clock/skew.bin", 20 * MIB).await;
    stack.proxy.set_rate(Some(MIB));
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(180))
        .await;
    stack.verify_fault_upload(&dev, &file, &cmd).await;
    // The status carries the offset the agent measured from the presign answers.
    let view = wait_offset(&stack, &dev, offset - 3..=offset + 3).await;
    eprintln!("device view: {view}");
    let log = agent_log(&dev);
    assert!(
        !log.contains("Storage refused the presigned URL"),
        "a URL was used after it expired: URLs must be judged by their lifetime, not by the device's clock\n{log}"
    );
    assert!(
        log.contains("Clock offset from the API measured"),
        "the agent logs the offset it measured\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_clock_290s_behind_uploads_and_reports_its_offset() {
    uploads_with_clock_off_by(-290).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_clock_290s_ahead_uploads_and_reports_its_offset() {
    uploads_with_clock_off_by(290).await;
}

/// Restarts the agent with the right clock and checks the same command then completes.
async fn completes_once_the_clock_is_right(
    stack: &Stack,
    dev: &Device,
    file: &SourceFile,
    command_id: &str,
) {
    stack.start_agent(dev, &agent(None));
    let cmd = stack
        .wait_command_final(command_id, Duration::from_secs(180))
        .await;
    stack.verify_fault_upload(dev, file, &cmd).await;
    wait_offset(stack, dev, -3..=3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_clock_an_hour_ahead_is_refused_saying_why() {
    // An external broker takes the device's connection, so the refusal comes from the API
    // at the first signed request.
    let stack = Stack::start(stack_options(true)).await;
    let dev = stack.add_device(&agent(Some(3600))).await;
    let file = stack.source_file(&dev, "clock/hour.bin", 6 * MIB).await;
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    stack
        .wait_agent_log(
            &dev,
            "Request refused as stale: this device's clock is 3",
            Duration::from_secs(60),
            "the agent must say its clock is off",
        )
        .await;
    let log = agent_log(&dev);
    assert!(
        log.contains("s ahead of the control API's, more than its replay window (300 s)")
            && log.contains("NTP"),
        "the agent's log names the offset, the window and the fix:\n{log}"
    );
    // The operator sees it: the device is online, reports its offset, and the command is
    // not acknowledged (the acks are signed requests too); nothing was uploaded.
    let view = wait_offset(&stack, &dev, 3597..=3603).await;
    assert_eq!(view["online"], true, "{view}");
    let cmd = stack.command(&command_id).await;
    assert!(
        matches!(cmd["state"].as_str(), Some("pending" | "published")),
        "no ack can be taken from this device: {cmd}"
    );
    assert!(stack.sessions(&dev.id).await.is_empty());
    assert_eq!(stack.proxy.bytes_sent(), 0, "nothing may reach storage");
    // The API says why in its log too.
    let api_log = stack.log_of(Service::Api);
    assert!(
        api_log.contains("Device request refused: the device's clock is off"),
        "API log lacks the refusal"
    );

    completes_once_the_clock_is_right(&stack, &dev, &file, &command_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_clock_an_hour_behind_cannot_connect_and_the_api_says_why() {
    // The embedded broker refuses the MQTT password (its timestamp is an hour old) by
    // closing the connection: the device cannot tell why, so its log names the clock as
    // the likely cause, and the API's log says exactly.
    let stack = Stack::start(stack_options(false)).await;
    let dev = stack.add_device(&agent(Some(-3600))).await;
    let file = stack.source_file(&dev, "clock/hour.bin", 6 * MIB).await;
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    stack
        .wait_agent_log(
            &dev,
            "this device's clock may be more than the replay window",
            Duration::from_secs(60),
            "after three failed connections the agent names the clock",
        )
        .await;
    let api_log = stack.log_of(Service::Api);
    assert!(
        api_log.contains("password too old: the device's clock is 36")
            && api_log.contains("s behind the API's, more than the replay window (300 s)"),
        "the API logs why it refused the connection"
    );
    let view = device_view(&stack, &dev).await;
    assert_eq!(view["online"], false, "{view}");
    let cmd = stack.command(&command_id).await;
    assert_eq!(cmd["state"], "pending", "{cmd}");
    assert!(stack.sessions(&dev.id).await.is_empty());

    completes_once_the_clock_is_right(&stack, &dev, &file, &command_id).await;
}
