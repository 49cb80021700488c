//! One device's upload flow over MQTT, as the agent runs it: `session.create` →
//! `parts.presign` (batches of at most 32) → PUT each part to storage → `session.complete`;
//! or, for control-plane load, create → presign every part → `session.abort`.

use std::time::Instant;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest, Md5};
use rand::RngCore;
use serde_json::{json, Value};
use uplink_protocol::envelope::ResponseEnvelope;
use uplink_protocol::ops::MAX_PRESIGN_BATCH;
use uplink_protocol::plan::MIN_PART_SIZE;
use uuid::Uuid;

use super::fleet::{Fleet, SimDevice};
use super::ledger::JobRecord;

/// What a flow uploads or only declares.
#[derive(Debug, Clone, Copy)]
pub struct FlowShape {
    pub parts: u32,
    pub presign_only: bool,
    pub part_bytes: usize,
}

fn fresh_id(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

/// Sends `op` and records its latency when the answer's status is `want`.
async fn call(
    fleet: &Fleet,
    dev: &SimDevice,
    op: &'static str,
    body: &Value,
    want: &[u16],
    units: u64,
) -> Option<Value> {
    let t0 = Instant::now();
    let answer: ResponseEnvelope = fleet
        .request(dev, op, &fresh_id("lg"), body.to_string())
        .await
        .ok()?;
    if !want.contains(&answer.status) {
        let code = answer.problem.map(|p| p.code).unwrap_or_default();
        fleet.stats.error(op, &format!("{} {code}", answer.status));
        return None;
    }
    fleet.stats.ok_units(op, t0.elapsed(), units);
    answer.result
}

/// Runs one flow for `dev`; its job is in the ledger from the start, with the final
/// state once the flow ends (absent when it gave up: reported as unfinished).
pub async fn session_flow(
    fleet: &Fleet,
    http: &reqwest::Client,
    dev: &SimDevice,
    shape: FlowShape,
) {
    let job_id = Uuid::new_v4();
    fleet.ledger().jobs.insert(
        job_id,
        JobRecord {
            device: dev.id.clone(),
            session_id: None,
            final_state: None,
            parts: 0,
        },
    );
    let mut data = vec![
        0u8;
        if shape.presign_only {
            0
        } else {
            shape.part_bytes
        }
    ];
    rand::thread_rng().fill_bytes(&mut data);
    // Random digests when nothing is uploaded: a fresh SHA-256 also keeps dedupe out.
    let (size, sha256, md5s) = if shape.presign_only {
        let mut digest = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut digest);
        let md5s: Vec<String> = (0..shape.parts)
            .map(|_| {
                let mut m = [0u8; 16];
                rand::thread_rng().fill_bytes(&mut m);
                B64.encode(m)
            })
            .collect();
        (
            u64::from(shape.parts) * MIN_PART_SIZE,
            hex::encode(digest),
            md5s,
        )
    } else {
        (
            data.len() as u64,
            uplink_protocol::sha256_hex(&data),
            vec![B64.encode(Md5::digest(&data))],
        )
    };
    let create = json!({
        "job_id": job_id, "file_name": format!("{job_id}.bin"), "size": size,
        "sha256": sha256, "part_size": MIN_PART_SIZE,
    });
    let Some(info) = call(fleet, dev, "session.create", &create, &[201], 0).await else {
        return;
    };
    let Some(session_id) = info["session_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
    else {
        fleet.stats.error("session.create", "no session_id");
        return;
    };
    if let Some(j) = fleet.ledger().jobs.get_mut(&job_id) {
        j.session_id = Some(session_id);
    }
    let mut urls = Vec::with_capacity(md5s.len());
    for (batch_no, batch) in md5s.chunks(MAX_PRESIGN_BATCH).enumerate() {
        let parts: Vec<Value> = batch
            .iter()
            .enumerate()
            .map(|(i, md5)| json!({"number": batch_no * MAX_PRESIGN_BATCH + i + 1, "md5": md5}))
            .collect();
        let body = json!({"session_id": session_id, "parts": parts});
        let Some(r) = call(
            fleet,
            dev,
            "parts.presign",
            &body,
            &[200],
            parts.len() as u64,
        )
        .await
        else {
            return;
        };
        let got = r["parts"].as_array().cloned().unwrap_or_default();
        if got.len() != batch.len() {
            fleet.stats.error("parts.presign", "wrong number of parts");
            return;
        }
        urls.extend(got);
    }
    if let Some(j) = fleet.ledger().jobs.get_mut(&job_id) {
        j.parts = urls.len() as u32;
    }
    let (op, want) = if shape.presign_only {
        ("session.abort", "aborted")
    } else {
        for part in &urls {
            if !put_part(fleet, http, part, &data, &md5s[0]).await {
                return;
            }
        }
        ("session.complete", "completed")
    };
    let Some(done) = call(
        fleet,
        dev,
        op,
        &json!({"session_id": session_id}),
        &[200],
        0,
    )
    .await
    else {
        return;
    };
    if done["state"] != want {
        fleet.stats.error(op, &format!("state {}", done["state"]));
        return;
    }
    if let Some(j) = fleet.ledger().jobs.get_mut(&job_id) {
        j.final_state = Some(want.to_string());
    }
}

/// PUTs `data` to a presigned part URL with its signed headers; checks the ETag.
async fn put_part(
    fleet: &Fleet,
    http: &reqwest::Client,
    part: &Value,
    data: &[u8],
    md5_b64: &str,
) -> bool {
    let Some(url) = part["url"].as_str() else {
        fleet.stats.error("part.put", "no url");
        return false;
    };
    let mut req = http.put(url).body(data.to_vec());
    for h in part["headers"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (h[0].as_str(), h[1].as_str()) {
            req = req.header(k, v);
        }
    }
    let t0 = Instant::now();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(300 << attempt)).await;
        }
        let Some(r) = req.try_clone() else {
            return false;
        };
        match r.send().await {
            Ok(resp) if resp.status().is_success() => {
                let etag = resp
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string();
                let want = B64.decode(md5_b64).map(hex::encode).unwrap_or_default();
                if etag != want {
                    fleet.stats.error("part.put", "etag is not the part's md5");
                    return false;
                }
                fleet.stats.ok("part.put", t0.elapsed());
                return true;
            }
            Ok(resp) => fleet
                .stats
                .error("part.put", &format!("{}", resp.status().as_u16())),
            Err(e) if e.is_timeout() => fleet.stats.error("part.put", "timeout"),
            Err(_) => fleet.stats.error("part.put", "http error"),
        }
    }
    false
}
