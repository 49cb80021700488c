//! The same upload through an external broker (Mosquitto) instead of the bridge's
//! embedded one: the bridge and the agent are both its clients.

use std::time::Duration;

use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_through_external_mosquitto_broker() {
    let stack = Stack::start(StackOptions {
        external_broker: true,
        ..StackOptions::default()
    })
    .await;
    let dev = stack.add_device(&AgentOptions::default()).await;
    let file = stack.source_file(&dev, "rec/external.bin", 6 * MIB).await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(240))
        .await;
}
