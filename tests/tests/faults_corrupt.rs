//! One byte corrupted in transit to storage (the proxy flips byte 300 000 of the first
//! connection, inside part 1's body). SeaweedFS checks the signed Content-MD5 and answers
//! 400 BadDigest; the agent treats that as a corrupted transfer, sends the part again, and
//! the object ends byte-identical.

use std::time::Duration;

use serde_json::Value;
use uplink_e2e::proxy::{Corrupt, Faults};
use uplink_e2e::{AgentOptions, Device, SourceFile, Stack, StackOptions, MIB};

fn agent(concurrency: u32, part_size_mib: u64) -> AgentOptions {
    AgentOptions {
        concurrency,
        part_size_mib,
        ..AgentOptions::default()
    }
}

async fn upload(stack: &Stack, dev: &Device, file: &SourceFile, timeout: Duration) -> Value {
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;
    let cmd = stack.wait_command_final(&command_id, timeout).await;
    stack.verify_fault_upload(dev, file, &cmd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_byte_in_transit_is_caught_and_part_resent() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.add_device(&agent(1, 5)).await;
    let file = stack.source_file(&dev, "net/corrupt.bin", 8 * MIB).await;
    // Offset 300 000 of the first connection: inside part 1's body (headers are ~1 KiB).
    stack.proxy.set_faults(Faults {
        corrupt: Some(Corrupt {
            connection: 1,
            offset: 300_000,
        }),
        ..Faults::default()
    });
    upload(&stack, &dev, &file, Duration::from_secs(120)).await;
    let counts = stack.proxy.fault_counts();
    eprintln!("faults applied: {counts:?}");
    assert_eq!(counts.corrupted, 1, "the byte was corrupted");
}
