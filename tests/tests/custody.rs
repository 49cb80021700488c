//! Through the real agent: a completed upload keeps the device-signed manifest as its chain
//! of custody, and the same content uploaded again is not sent a second time.

use std::time::Duration;

use uplink_e2e::{AgentOptions, SourceFile, Stack, StackOptions, MIB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_manifest_is_kept_and_same_content_is_not_sent_again() {
    let stack = Stack::start(StackOptions::default()).await;
    // Files hashed before their session: the second upload below is answered by storage's
    // verified copy (deduplication).
    let dev = stack
        .add_device(&AgentOptions {
            hash_first_max_mib: 64,
            ..AgentOptions::default()
        })
        .await;
    let file = stack.source_file(&dev, "rec/first.bin", 6 * MIB).await;
    let first = stack
        .upload_and_verify(&dev, &file, Duration::from_secs(240))
        .await;
    let sid = first["session_id"].as_str().expect("session_id");

    let custody = stack
        .get_json(&format!("/v1/sessions/{sid}/manifest"))
        .await;
    assert_eq!(custody.status, 200, "{custody}");
    let c = &custody.body;
    assert_eq!(c["signature_valid"], true, "{c}");
    assert_eq!(c["parts_digest_valid"], true, "{c}");
    assert_eq!(c["manifest"]["device_id"], dev.id.as_str(), "{c}");
    assert_eq!(c["manifest"]["sha256"], file.sha256.as_str(), "{c}");
    assert_eq!(c["manifest"]["size"], file.size, "{c}");
    assert!(
        c["manifest"]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("rec/first.bin")),
        "{c}"
    );
    assert_eq!(c["part_digests"].as_array().map(Vec::len), Some(2), "{c}");

    // The same bytes under another name, once the API has hashed the stored object: done
    // without a byte sent to storage.
    let checked = stack.wait_digest_checked(sid).await;
    assert_eq!(checked["digest_check"], "verified", "{checked}");
    let copy = dev.root.join("rec/copy.bin");
    std::fs::copy(&file.path, &copy).expect("copy");
    let copy = SourceFile {
        path: copy,
        size: file.size,
        sha256: file.sha256.clone(),
    };
    let sent_before = stack.proxy.bytes_sent();
    let command_id = stack.upload_command(&dev.id, copy.path_str()).await;
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(120))
        .await;
    assert_eq!(cmd["state"], "done", "{cmd}");
    let second = stack
        .session(cmd["session_id"].as_str().expect("session_id"))
        .await;
    assert_eq!(second["state"], "completed", "{second}");
    assert_eq!(second["deduplicated_from"], sid, "{second}");
    assert_eq!(second["object_key"], first["object_key"], "{second}");
    let sent = stack.proxy.bytes_sent() - sent_before;
    assert!(
        sent < MIB,
        "{sent} bytes went to storage for content it already held"
    );
}
