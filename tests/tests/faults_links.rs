//! Faults on the two control links, through the same fault proxy as the storage link
//! ([`uplink_e2e::proxy`]): between the bridge and the control API
//! (`StackOptions::api_proxy`) and between the agent and the broker
//! (`StackOptions::mqtt_proxy`). Each link is reset while the command is being delivered,
//! cut or reset again mid-upload, and black-holed (stalled) for a few seconds. The upload
//! must end done and byte-identical in exactly one session ([`Stack::verify_fault_upload`]),
//! the command's `done` ack recorded once, and no part sent to storage twice.

use std::time::Duration;

use uplink_e2e::proxy::{CountingProxy, Cut, Faults};
use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

/// Request headers of the PUTs (about 1 KiB each).
const HEADER_ALLOWANCE: u64 = 64 * 1024;
/// How long a link is black-holed.
const STALL: Duration = Duration::from_secs(4);

fn agent() -> AgentOptions {
    AgentOptions {
        concurrency: 2,
        part_size_mib: 5,
        ..AgentOptions::default()
    }
}

/// Runs a throttled 16 MiB upload and hits `link` with faults: `at_command` right after the
/// command is created, then a reset of every open connection and a stall of [`STALL`] once
/// 4 MiB went to storage. Checks everything at the end.
async fn upload_with_link_faults(
    stack: &Stack,
    name: &str,
    link: &CountingProxy,
    at_command: Faults,
) {
    let dev = stack.add_device(&agent()).await;
    let file = stack
        .source_file(&dev, &format!("links/{name}.bin"), 16 * MIB)
        .await;
    // 16 MiB at 2 MiB/s: ~8 s of parts, so every fault lands mid-upload.
    stack.proxy.set_rate(Some(2 * MIB));
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;

    // Mid-command: the command is being fetched, published, accepted.
    tokio::time::sleep(Duration::from_millis(150)).await;
    link.set_faults(at_command);
    link.drop_connections();

    // Mid-upload: every connection reset, then the link silent for a while.
    stack
        .wait_proxy_bytes(&command_id, 4 * MIB, Duration::from_secs(90))
        .await;
    eprintln!(
        "{name}: reset and stall at {} bytes",
        stack.proxy.bytes_sent()
    );
    link.drop_connections();
    tokio::time::sleep(Duration::from_millis(500)).await;
    link.set_stalled(true);
    tokio::time::sleep(STALL).await;
    link.set_stalled(false);

    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(180))
        .await;
    let counts = link.fault_counts();
    eprintln!(
        "{name}: faults applied {counts:?}; {} connections through the link",
        link.connections()
    );
    stack.verify_fault_upload(&dev, &file, &cmd).await;
    assert_eq!(
        stack.acks_recorded(&command_id, "done").await,
        1,
        "the done ack is recorded exactly once"
    );
    let sent = stack.proxy.bytes_sent();
    assert!(
        sent < file.size + HEADER_ALLOWANCE,
        "{sent} bytes went to storage for a {} byte file: a part was sent twice",
        file.size
    );
    assert!(
        counts.cuts + counts.resets >= 1,
        "the planned cut or reset of the link never happened: {counts:?}"
    );
    assert!(
        link.connections() >= 3,
        "the link was reconnected after each drop: {} connections",
        link.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_to_api_link_reset_and_black_holed() {
    let stack = Stack::start(StackOptions {
        api_proxy: true,
        ..StackOptions::default()
    })
    .await;
    let link = stack.api_proxy.as_ref().expect("api proxy");
    // Every second connection the bridge opens to the API is reset (RST) after 300 bytes,
    // three times: mid-request (inside the headers), whichever request that is (command
    // polls, acks, session create, presign, progress).
    let faults = Faults {
        cut: Some(Cut {
            after_bytes: 300,
            every_nth: 2,
            remaining: Some(3),
            reset: true,
        }),
        ..Faults::default()
    };
    upload_with_link_faults(&stack, "api", link, faults).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_to_broker_link_cut_and_black_holed() {
    let stack = Stack::start(StackOptions {
        mqtt_proxy: true,
        ..StackOptions::default()
    })
    .await;
    let link = stack.mqtt_proxy.as_ref().expect("mqtt proxy");
    // The agent's reconnection after the drop is closed (FIN) after 1500 bytes: mid-way
    // through the accept ack, the session request and the first presign.
    upload_with_link_faults(&stack, "mqtt", link, Faults::cut_once(1500, false)).await;
}
