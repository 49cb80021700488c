//! What the presigned part URLs allow: the signed bytes while fresh, nothing once expired,
//! nothing else ever (Content-MD5 is signed in). This is also the premise of the 2-second
//! URL test in `uploads.rs`: the store really refuses expired URLs.

use std::time::Duration;

use base64::Engine as _;
use md5::{Digest, Md5};
use serde_json::{json, Value};
use uplink_e2e::{Device, Stack, StackOptions, MIB};

fn md5_b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(bytes))
}

async fn presign(stack: &Stack, dev: &Device, session_id: &str, number: u32, md5: &str) -> Value {
    let reply = stack
        .device_http
        .call(
            &dev.id,
            &dev.key,
            "parts.presign",
            &json!({ "session_id": session_id, "parts": [{ "number": number, "md5": md5 }] }),
        )
        .await;
    assert!(reply.is_success(), "parts.presign: {reply}");
    let part = reply.body["parts"][0].clone();
    assert_eq!(part["number"], number, "{reply}");
    part
}

async fn put(part: &Value, body: Vec<u8>) -> (u16, String) {
    let url = part["url"].as_str().expect("url");
    let method = part["method"].as_str().unwrap_or("PUT");
    assert_eq!(method, "PUT");
    let mut req = reqwest::Client::new().put(url).body(body);
    for h in part["headers"].as_array().expect("headers") {
        req = req.header(
            h[0].as_str().expect("header name"),
            h[1].as_str().expect("header value"),
        );
    }
    let resp = req.send().await.expect("PUT part");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_part_urls_expire_and_bind_the_bytes() {
    let stack = Stack::start(StackOptions {
        presign_ttl_secs: 2,
        ..StackOptions::default()
    })
    .await;
    let dev = stack.register_device().await;
    let created = stack
        .device_http
        .call(
            &dev.id,
            &dev.key,
            "session.create",
            &json!({
                "job_id": uuid::Uuid::new_v4(),
                "file_name": "p.bin",
                "size": 6 * MIB,
                "sha256": "00".repeat(32),
                "part_size": 5 * MIB,
            }),
        )
        .await;
    assert!(created.is_success(), "session.create: {created}");
    let session_id = created.body["session_id"].as_str().expect("session_id");

    let part1 = vec![1u8; 5 * MIB as usize];
    let part2 = vec![2u8; MIB as usize];

    // Fresh URL, right bytes: stored.
    let p1 = presign(&stack, &dev, session_id, 1, &md5_b64(&part1)).await;
    let (status, text) = put(&p1, part1.clone()).await;
    assert_eq!(status, 200, "fresh URL with the signed bytes: {text}");

    // Fresh URL, other bytes than the signed MD5: refused.
    let p2 = presign(&stack, &dev, session_id, 2, &md5_b64(&part2)).await;
    let (status, text) = put(&p2, vec![3u8; MIB as usize]).await;
    assert!(
        (400..500).contains(&status),
        "bytes other than the signed MD5 must be refused, got {status}: {text}"
    );

    // Expired URL: refused.
    let p2 = presign(&stack, &dev, session_id, 2, &md5_b64(&part2)).await;
    let expires_at = p2["expires_at"].as_i64().expect("expires_at");
    let now = uplink_protocol::unix_now();
    assert!(
        expires_at <= now + 3,
        "presign_ttl_secs = 2 but the URL expires at {expires_at} (now {now})"
    );
    tokio::time::sleep(Duration::from_secs((expires_at - now + 2).max(0) as u64)).await;
    let (status, text) = put(&p2, part2.clone()).await;
    assert_eq!(status, 403, "an expired URL must be refused: {text}");

    // The session's storage view: only part 1.
    let status = stack
        .device_http
        .call(
            &dev.id,
            &dev.key,
            "session.status",
            &json!({ "session_id": session_id }),
        )
        .await;
    assert!(status.is_success(), "session.status: {status}");
    let stored: Vec<u64> = status.body["stored_parts"]
        .as_array()
        .expect("stored_parts")
        .iter()
        .filter_map(|p| p["number"].as_u64())
        .collect();
    assert_eq!(stored, vec![1], "storage must hold part 1 only: {status}");
}
