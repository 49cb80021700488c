//! The lowest-level baseline: open a session as the device, presign every part, then PUT
//! the parts with parallel `curl` processes (`curl -T part-file URL`), as many at once as
//! the setting. Only the PUTs are timed. Each curl retries as a user on a flaky link would
//! have it (`--retry 10 --retry-all-errors --retry-delay 1`): without that, curl gives up on
//! the first reset.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest, Md5};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::files::SourceFile;
use crate::stack::{Device, Stack};

/// What each curl is told besides the part: retry any failure, ten times, a second apart.
pub const RETRY_ARGS: [&str; 5] = ["--retry", "10", "--retry-all-errors", "--retry-delay", "1"];

/// Uploads `file` as the device's session with `concurrency` curl PUTs at once: the
/// seconds the PUTs took and the S3 server's CPU seconds over them, or the first failed
/// part's error (the session is then aborted).
/// The completed object is checked byte-identical, then deleted.
pub async fn curl_run(
    stack: &Stack,
    dev: &Device,
    file: &SourceFile,
    part_size: u64,
    concurrency: usize,
) -> Result<(f64, f64), String> {
    // A dataset of its own: the agent's upload of the same file must not be its dedupe
    // source (the baseline would then have nothing to upload).
    let dataset = format!(
        "curl-baseline-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let body = json!({"job_id": uuid::Uuid::new_v4(), "file_name": "curl-baseline.bin", "size": file.size,
                      "sha256": file.sha256, "part_size": part_size, "dataset": dataset,
                      // The part checksum the agent asks for (SHA-256 unless the API keeps
                      // MD5): the PUTs cost storage what the agent's cost.
                      "part_checksum": "sha256"});
    let created = stack
        .device_http
        .call(&dev.id, &dev.key, "session.create", &body)
        .await;
    assert_eq!(created.status, 201, "session.create: {created}");
    let session_id = created.body["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();
    let checksum = created.body["part_checksum"]
        .as_str()
        .unwrap_or("md5")
        .to_string();
    let parts_dir = stack.dir.path().join("curl-parts");
    std::fs::create_dir_all(&parts_dir).expect("parts dir");
    let (path, dir, sha256) = (file.path.clone(), parts_dir.clone(), checksum == "sha256");
    // Split into part files and compute the digests the session takes (not timed).
    let digests = tokio::task::spawn_blocking(move || split(&path, &dir, part_size, sha256))
        .await
        .expect("split");
    let mut urls: Vec<Value> = Vec::new();
    for (i, chunk) in digests
        .chunks(uplink_protocol::ops::MAX_PRESIGN_BATCH)
        .enumerate()
    {
        let parts: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(j, digest)| {
                json!({"number": i * uplink_protocol::ops::MAX_PRESIGN_BATCH + j + 1, checksum.as_str(): digest})
            })
            .collect();
        let reply = stack
            .device_http
            .call(
                &dev.id,
                &dev.key,
                "parts.presign",
                &json!({"session_id": session_id, "parts": parts}),
            )
            .await;
        assert_eq!(reply.status, 200, "parts.presign: {reply}");
        urls.extend(
            reply.body["parts"]
                .as_array()
                .expect("parts")
                .iter()
                .cloned(),
        );
    }

    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let server_before = super::proc::server_cpu_secs();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for part in urls {
        let permit = slots.clone().acquire_owned().await.expect("semaphore");
        let n = part["number"].as_u64().expect("number");
        let part_file = parts_dir.join(format!("part-{n:05}"));
        tasks.push(tokio::spawn(async move {
            let mut cmd = tokio::process::Command::new("curl");
            cmd.args(["-sS", "--fail", "-o", "/dev/null"])
                .args(RETRY_ARGS)
                .arg("-T")
                .arg(&part_file);
            for h in part["headers"].as_array().expect("headers") {
                cmd.arg("-H").arg(format!(
                    "{}: {}",
                    h[0].as_str().expect("name"),
                    h[1].as_str().expect("value")
                ));
            }
            cmd.arg(part["url"].as_str().expect("url"));
            let out = cmd.output().await.expect("run curl (apt install curl)");
            drop(permit);
            if out.status.success() {
                Ok(())
            } else {
                let said = String::from_utf8_lossy(&out.stderr);
                Err(format!(
                    "PUT of part {n}: {}: {}",
                    out.status,
                    super::first_line(&said)
                ))
            }
        }));
    }
    let mut failed = None;
    for t in tasks {
        if let Err(e) = t.await.expect("curl task") {
            failed.get_or_insert(e);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let server_cpu = super::proc::server_cpu_secs() - server_before;
    std::fs::remove_dir_all(&parts_dir).ok();
    let (op, expect) = match failed {
        Some(_) => ("session.abort", "aborted"),
        None => ("session.complete", "completed"),
    };
    let done = stack
        .device_http
        .call(&dev.id, &dev.key, op, &json!({"session_id": session_id}))
        .await;
    assert_eq!(
        done.body["state"], expect,
        "the curl baseline's {op} must leave the session {expect}: {done}"
    );
    if let Some(e) = failed {
        return Err(e);
    }
    super::tools::check_stored(
        &stack.env,
        done.body["bucket"].as_str().expect("bucket"),
        done.body["object_key"].as_str().expect("key"),
        file,
        stack.dir.path(),
        "curl",
    )
    .await;
    Ok((secs, server_cpu))
}

/// Writes `path` as part files of `part_size` into `dir`; returns their SHA-256s (with
/// `sha256`) or MD5s, base64.
fn split(path: &Path, dir: &Path, part_size: u64, sha256: bool) -> Vec<String> {
    use std::io::{Read, Write};
    let mut input = std::fs::File::open(path).expect("open source");
    let mut digests = Vec::new();
    let mut buf = vec![0u8; part_size as usize];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = input.read(&mut buf[filled..]).expect("read source");
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let mut out = std::fs::File::create(dir.join(format!("part-{:05}", digests.len() + 1)))
            .expect("part file");
        out.write_all(&buf[..filled]).expect("write part");
        let part = &buf[..filled];
        digests.push(if sha256 {
            B64.encode(Sha256::digest(part))
        } else {
            B64.encode(Md5::digest(part))
        });
        if filled < buf.len() {
            break;
        }
    }
    digests
}
