//! Storage policies against whichever S3-compatible server the stack points at: the test
//! command runs this file against SeaweedFS with every other test, and again against Garage
//! (scripts/garage.sh) with the storage-facing tests. What a server cannot do is refused when
//! the policy is set (422 `policy_not_supported`); what it accepts, it must really do.
//! Never accepted and ignored.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use uplink_e2e::env::TestEnv;
use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

/// The response headers of a SigV4-signed HEAD of `bucket/key` (curl `--aws-sigv4`).
async fn head_headers(env: &TestEnv, bucket: &str, key: &str) -> String {
    let url = format!("{}/{bucket}/{key}", env.s3_endpoint);
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-I", "--max-time", "30"])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{}:s3", env.s3_region))
        .arg("--user")
        .arg(format!("{}:{}", env.s3_access_key, env.s3_secret_key))
        .arg(&url)
        .output()
        .await
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "HEAD {url}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_is_applied_or_the_policy_refused() {
    let stack = Stack::start(StackOptions::default()).await;
    let reply = stack
        .operator(
            Method::PATCH,
            "/v1/projects/default",
            Some(json!({"policy": {"sse": "AES256"}})),
        )
        .await;
    eprintln!("{}: PATCH sse=AES256 → {reply}", stack.env.s3_endpoint);
    let dev = stack.add_device(&AgentOptions::default()).await;
    let file = stack.source_file(&dev, "rec/enc.bin", 5 * MIB + 1).await;
    match reply.status {
        200 => {
            let session = stack
                .upload_and_verify(&dev, &file, Duration::from_secs(240))
                .await;
            let headers = head_headers(
                &stack.env,
                session["bucket"].as_str().expect("bucket"),
                session["object_key"].as_str().expect("key"),
            )
            .await;
            assert!(
                headers.contains("x-amz-server-side-encryption: aes256"),
                "the policy was accepted, so the object must be encrypted: {headers}"
            );
        }
        422 => {
            assert_eq!(reply.body["code"], "policy_not_supported", "{reply}");
            assert!(
                reply.body["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("server-side encryption")),
                "{reply}"
            );
            // The refused policy changed nothing: uploads go on as before.
            stack
                .upload_and_verify(&dev, &file, Duration::from_secs(240))
                .await;
        }
        _ => panic!("PATCH policy: {reply}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_lock_on_a_bucket_without_it_is_refused() {
    let stack = Stack::start(StackOptions::default()).await;
    for policy in [
        json!({"object_lock_mode": "GOVERNANCE", "retention_days": 1}),
        json!({"legal_hold": true}),
    ] {
        let reply = stack
            .operator(
                Method::PATCH,
                "/v1/projects/default",
                Some(json!({ "policy": policy })),
            )
            .await;
        assert_eq!(reply.status, 422, "{policy}: {reply}");
        assert_eq!(reply.body["code"], "policy_not_supported", "{reply}");
        assert!(
            reply.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("object lock")),
            "{reply}"
        );
    }
    let project = stack.get_json("/v1/projects/default").await;
    assert_eq!(project.body["policy"], json!({}), "{project}");
}
