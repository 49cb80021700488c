//! Uploads started by an operator's command arrive byte-identical, whatever the size, and
//! even when presigned URLs live only 2 seconds.

use std::time::{Duration, Instant};

use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

/// One device, one file of `size` bytes, one upload command; everything verified.
async fn upload_of(size: u64) {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.add_device(&AgentOptions::default()).await;
    let file = stack
        .source_file(&dev, &format!("rec/file-{size}.bin"), size)
        .await;
    let session = stack
        .upload_and_verify(&dev, &file, Duration::from_secs(240))
        .await;
    eprintln!(
        "{size} bytes: session {} ({} parts of {}), {} bytes through the proxy",
        session["session_id"],
        session["part_count"],
        session["part_size"],
        stack.proxy.bytes_sent()
    );
    assert_eq!(stack.sessions(&dev.id).await.len(), 1, "one session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_file_arrives_identical() {
    upload_of(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_file_arrives_identical() {
    upload_of(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_of_one_part_plus_one_byte_arrives_identical() {
    upload_of(5 * MIB + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_of_64_mib_arrives_identical() {
    upload_of(64 * MIB).await;
}

/// Presigned URLs live 2 s while the upload takes over 10 s (the proxy between agent and
/// S3 lets 1.25 MiB/s through; one part at a time, 4 parts): URLs handed out in advance
/// expire before they are used, so the agent must notice and ask for fresh ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_outlives_two_second_presigned_urls() {
    let stack = Stack::start(StackOptions {
        presign_ttl_secs: 2,
        ..StackOptions::default()
    })
    .await;
    let dev = stack
        .add_device(&AgentOptions {
            concurrency: 1,
            part_size_mib: 5,
            ..AgentOptions::default()
        })
        .await;
    let file = stack.source_file(&dev, "rec/slow.bin", 15 * MIB + 1).await;
    stack.proxy.set_rate(Some(MIB + MIB / 4));
    let started = Instant::now();
    let session = stack
        .upload_and_verify(&dev, &file, Duration::from_secs(300))
        .await;
    let took = started.elapsed();
    eprintln!(
        "slow upload took {took:?}; {} bytes through the proxy; session {session}",
        stack.proxy.bytes_sent()
    );
    assert!(
        took >= Duration::from_secs(10),
        "the upload took only {took:?}: the proxy did not slow it enough to outlive the URLs"
    );
}
