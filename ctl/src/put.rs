//! `uplinkctl put`: an upload from the machine it runs on, straight to storage through
//! presigned part URLs (no file bytes through the API, no storage credentials here), in a
//! session owned by the caller's API key (`POST /v1/projects/{p}/uploads`, docs/api.md).
//!
//! Integrity as for a gateway: each part's MD5 is signed into its URL (storage refuses other
//! bytes), the API checks every part before completing, and reads the object back to check
//! its SHA-256 before it may serve as a copy for anyone else.
//!
//! Resume: before the first byte is sent, a manifest (file identity, SHA-256, part MD5s, the
//! client's job id, then the session) is written durably (temporary file, fsync, rename)
//! under `$XDG_STATE_HOME/uplink/put/`. Running the same `put` again after Ctrl-C, `kill -9`
//! or a network loss finds it, asks the API which parts storage holds, and sends only the
//! rest. A file changed since is refused unless `--restart`.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use md5::Md5;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::sync::Mutex;

use crate::api::{seg, Api};
use crate::error::{usage, CtlError, Result};
use crate::output::json_line;

/// Parts presigned per request (the API's limit is 32).
const PRESIGN_BATCH: usize = 32;
/// Tries of one part's PUT (each with a fresh URL) before the upload stops.
const PUT_TRIES: u32 = 5;

pub struct PutRequest<'a> {
    pub file: &'a Path,
    pub project: &'a str,
    pub dataset: Option<&'a str>,
    pub part_size: u64,
    pub concurrency: usize,
    /// Start over when the file changed since an interrupted `put`.
    pub restart: bool,
    /// Where manifests live (tests point it elsewhere); `None`: the default.
    pub state_dir: Option<PathBuf>,
    /// The API the manifest belongs to (a manifest of another API is not reused).
    pub api_url: &'a str,
    pub progress: bool,
}

/// What a `put` writes down before sending anything, and as parts are confirmed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub version: u32,
    pub api_url: String,
    pub project: String,
    pub dataset: Option<String>,
    pub file: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
    pub sha256: String,
    pub part_size: u64,
    /// Base64 MD5 of each part, in order.
    pub part_md5s: Vec<String>,
    /// The client's id for the upload: the API answers the same session for it.
    pub job_id: uuid::Uuid,
    pub session_id: Option<uuid::Uuid>,
    /// Parts storage confirmed (ETag checked).
    pub done: Vec<u32>,
}

fn default_state_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("uplink/put"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            usage("neither XDG_STATE_HOME nor HOME is set: nowhere to keep the put manifest")
        })?;
    Ok(PathBuf::from(home).join(".local/state/uplink/put"))
}

/// The manifest's path for this file, project, dataset and API.
fn manifest_path(dir: &Path, m: &Manifest) -> PathBuf {
    let id = Sha256::digest(
        format!(
            "{}\n{}\n{}\n{}",
            m.api_url,
            m.project,
            m.dataset.as_deref().unwrap_or(""),
            m.file.display()
        )
        .as_bytes(),
    );
    dir.join(format!("{}.json", hex(&id[..12])))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `m` to `path` durably: a temporary file, fsynced, renamed over the old one.
pub fn save(path: &Path, m: &Manifest) -> Result<()> {
    let fail = |e: std::io::Error| {
        CtlError::Failed(format!(
            "cannot write the put manifest {}: {e}",
            path.display()
        ))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(fail)?;
    f.write_all(&serde_json::to_vec_pretty(m).unwrap_or_default())
        .map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// One read of the file: its SHA-256 and each part's MD5.
fn hash_file(path: &Path, part_size: u64) -> std::io::Result<(String, Vec<String>)> {
    let mut f = std::fs::File::open(path)?;
    let mut whole = Sha256::new();
    let mut md5s = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut part = Md5::new();
        let mut left = part_size;
        let mut read_any = false;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            read_any = true;
            whole.update(&buf[..n]);
            part.update(&buf[..n]);
            left -= n as u64;
        }
        if read_any || md5s.is_empty() {
            md5s.push(base64::engine::general_purpose::STANDARD.encode(part.finalize()));
        }
        if left > 0 {
            break;
        }
    }
    Ok((hex(&whole.finalize()), md5s))
}

/// Runs a `put`; prints the stored object (or a JSON line) at the end.
pub async fn put(api: &Api, req: PutRequest<'_>, json_out: bool) -> Result<()> {
    let file = std::fs::canonicalize(req.file)
        .map_err(|e| usage(format!("cannot read {}: {e}", req.file.display())))?;
    let meta = std::fs::metadata(&file)
        .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
    if !meta.is_file() {
        return Err(usage(format!("{} is not a regular file", file.display())));
    }
    let file_name = file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| usage("the file name must be UTF-8"))?
        .to_string();
    let dir = match &req.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir()?,
    };
    let mut m = Manifest {
        version: 1,
        api_url: req.api_url.to_string(),
        project: req.project.to_string(),
        dataset: req.dataset.map(str::to_string),
        file: file.clone(),
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
        sha256: String::new(),
        part_size: req.part_size,
        part_md5s: Vec::new(),
        job_id: uuid::Uuid::new_v4(),
        session_id: None,
        done: Vec::new(),
    };
    let path = manifest_path(&dir, &m);
    let earlier: Option<Manifest> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match earlier {
        Some(e) if e.size == m.size && e.mtime_ns == m.mtime_ns && e.part_size == m.part_size => {
            eprintln!(
                "resuming the put of {} ({} of {} parts confirmed before)",
                file.display(),
                e.done.len(),
                e.part_md5s.len()
            );
            m = e;
        }
        Some(e) if !req.restart && (e.size != m.size || e.mtime_ns != m.mtime_ns) => {
            return Err(usage(format!(
                "{} changed since its interrupted put (manifest {}); run again with --restart to upload it anew",
                file.display(),
                path.display()
            )));
        }
        _ => {}
    }
    if m.sha256.is_empty() {
        let (f, part_size) = (file.clone(), m.part_size);
        let (sha, md5s) = tokio::task::spawn_blocking(move || hash_file(&f, part_size))
            .await
            .map_err(|e| CtlError::Failed(format!("hashing stopped: {e}")))?
            .map_err(|e| CtlError::Failed(format!("cannot read {}: {e}", file.display())))?;
        m.sha256 = sha;
        m.part_md5s = md5s;
        save(&path, &m)?;
    }

    let body = json!({"job_id": m.job_id, "file_name": file_name, "dataset": m.dataset,
                      "size": m.size, "sha256": m.sha256, "part_size": m.part_size});
    let session = api
        .post(
            &format!("/v1/projects/{}/uploads", seg(&m.project)),
            Some(body),
        )
        .await?;
    let sid = session["session_id"]
        .as_str()
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .ok_or_else(|| {
            CtlError::Unavailable(format!("the API answered no session id: {session}"))
        })?;
    if m.session_id != Some(sid) {
        m.session_id = Some(sid);
        save(&path, &m)?;
    }
    let session = if session["state"] == "completed" {
        session
    } else {
        send_parts(api, &req, &mut m, &path, sid, json_out).await?;
        api.post(&format!("/v1/sessions/{sid}/complete"), None)
            .await?
    };
    if session["state"] != "completed" {
        return Err(CtlError::Failed(format!(
            "session {sid} is {} after completion",
            session["state"]
        )));
    }
    let _ = std::fs::remove_file(&path);
    let done = json!({"event": "done", "session_id": sid, "bucket": session["bucket"],
                      "object_key": session["object_key"], "size": m.size, "sha256": session["sha256"],
                      "deduplicated": session["deduplicated_from"].is_string()});
    if json_out {
        json_line(&done);
    } else {
        println!(
            "done: {} bytes stored as s3://{}/{} (sha256 {})",
            m.size,
            session["bucket"].as_str().unwrap_or(""),
            session["object_key"].as_str().unwrap_or(""),
            session["sha256"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `uplinkctl resume MANIFEST`: the interrupted `put` that wrote `manifest`, again.
pub async fn resume(
    api: &Api,
    manifest: &Path,
    api_url: &str,
    concurrency: usize,
    progress: bool,
    json_out: bool,
) -> Result<()> {
    let m: Manifest = std::fs::read(manifest)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| usage(format!("{} is not a put manifest", manifest.display())))?;
    if m.api_url != api_url {
        return Err(usage(format!(
            "{} is a put to {}, not to {api_url}: use that API (--api-url or its profile)",
            manifest.display(),
            m.api_url
        )));
    }
    let req = PutRequest {
        file: &m.file,
        project: &m.project,
        dataset: m.dataset.as_deref(),
        part_size: m.part_size,
        concurrency,
        restart: false,
        state_dir: manifest.parent().map(Path::to_path_buf),
        api_url,
        progress,
    };
    put(api, req, json_out).await
}

/// Sends the parts storage does not hold yet, `concurrency` at a time, recording each one
/// storage confirms in the manifest.
async fn send_parts(
    api: &Api,
    req: &PutRequest<'_>,
    m: &mut Manifest,
    path: &Path,
    sid: uuid::Uuid,
    json_out: bool,
) -> Result<()> {
    // Storage is the truth of what it holds: a part is skipped only if its ETag is the MD5
    // this file's part has.
    let status = api.get(&format!("/v1/sessions/{sid}/status")).await?;
    let held: Vec<u32> = status["stored_parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let n = p["number"].as_u64()? as u32;
            let want = m.part_md5s.get(n as usize - 1)?;
            let md5 = base64::engine::general_purpose::STANDARD
                .decode(want)
                .ok()?;
            (p["etag"].as_str()? == hex(&md5)).then_some(n)
        })
        .collect();
    m.done = held.clone();
    save(path, m)?;
    let todo: Vec<u32> = (1..=m.part_md5s.len() as u32)
        .filter(|n| !held.contains(n))
        .collect();
    let part_len = |n: u32| {
        let start = (n as u64 - 1) * m.part_size;
        (start, m.part_size.min(m.size - start.min(m.size)))
    };
    let total: u64 = todo.iter().map(|&n| part_len(n).1).sum();
    let bar = progress_bar(req.progress && !json_out, m.size, m.size - total);
    let storage = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| CtlError::Unavailable(format!("cannot build the storage client: {e}")))?;
    let shared = Arc::new(Mutex::new(m.clone()));
    let slots = Arc::new(tokio::sync::Semaphore::new(req.concurrency.max(1)));
    let mut sent = m.size - total;
    for batch in todo.chunks(PRESIGN_BATCH) {
        let mut tasks = Vec::new();
        for &n in batch {
            let permit = slots.clone().acquire_owned().await.expect("semaphore open");
            let (start, len) = part_len(n);
            let md5 = m.part_md5s[n as usize - 1].clone();
            let (storage, file) = (storage.clone(), m.file.clone());
            let url_api = api.clone();
            tasks.push(tokio::spawn(async move {
                let r = put_part(&url_api, &storage, sid, n, &md5, &file, start, len).await;
                drop(permit);
                r.map(|()| (n, len))
            }));
        }
        for t in tasks {
            let (n, len) = t
                .await
                .map_err(|e| CtlError::Failed(format!("a part upload stopped: {e}")))??;
            let mut g = shared.lock().await;
            g.done.push(n);
            save(path, &g)?;
            sent += len;
            if let Some(b) = &bar {
                b.set_position(sent);
            }
            if json_out {
                json_line(
                    &json!({"event": "progress", "session_id": sid, "bytes_done": sent, "size": g.size}),
                );
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    *m = shared.lock().await.clone();
    Ok(())
}

fn progress_bar(on: bool, size: u64, at: u64) -> Option<indicatif::ProgressBar> {
    if !on {
        return None;
    }
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(at);
    Some(bar)
}

/// Presigns part `n` and PUTs it; a refused or failed PUT is tried again with a fresh URL
/// (an expired URL, a cut connection), at most [`PUT_TRIES`] times.
#[allow(clippy::too_many_arguments)]
async fn put_part(
    api: &Api,
    storage: &reqwest::Client,
    sid: uuid::Uuid,
    n: u32,
    md5: &str,
    file: &Path,
    start: u64,
    len: u64,
) -> Result<()> {
    let bytes = {
        let path = file.to_path_buf();
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(start))?;
            let mut buf = vec![0u8; len as usize];
            f.read_exact(&mut buf)?;
            Ok(buf)
        })
        .await
        .map_err(|e| CtlError::Failed(format!("reading part {n} stopped: {e}")))?
        .map_err(|e| {
            CtlError::Failed(format!("cannot read part {n} of {}: {e}", file.display()))
        })?;
        bytes::Bytes::from(read)
    };
    let mut last = String::new();
    for attempt in 0..PUT_TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt.min(4))).await;
        }
        let presigned = api
            .post(
                &format!("/v1/sessions/{sid}/parts"),
                Some(json!({"parts": [{"number": n, "md5": md5}]})),
            )
            .await?;
        let part: &Value = &presigned["parts"][0];
        let url = part["url"]
            .as_str()
            .ok_or_else(|| CtlError::Unavailable(format!("no URL for part {n}: {presigned}")))?;
        // Only the headers the URL was signed with: never the API token.
        let mut put = storage.put(url).body(bytes.clone());
        for h in part["headers"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (h[0].as_str(), h[1].as_str()) {
                put = put.header(k, v);
            }
        }
        match put.send().await {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                last = format!(
                    "storage answered {status}: {}",
                    text.split_whitespace().collect::<Vec<_>>().join(" ")
                );
            }
            Err(e) => last = format!("storage unreachable: {}", e.without_url()),
        }
    }
    Err(CtlError::Failed(format!(
        "part {n} could not be uploaded after {PUT_TRIES} tries: {last}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_parts_and_the_whole_file_in_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 10]).unwrap();
        let (sha, md5s) = hash_file(&p, 4).unwrap();
        assert_eq!(sha, hex(&Sha256::digest([7u8; 10])));
        let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(Md5::digest(d));
        assert_eq!(md5s, vec![b64(&[7; 4]), b64(&[7; 4]), b64(&[7; 2])]);
        // Exactly two parts: no empty third; an empty file is one empty part.
        std::fs::write(&p, vec![7u8; 8]).unwrap();
        assert_eq!(hash_file(&p, 4).unwrap().1.len(), 2);
        std::fs::write(&p, b"").unwrap();
        assert_eq!(hash_file(&p, 4).unwrap().1, vec![b64(b"")]);
    }

    #[test]
    fn manifests_are_saved_durably_and_named_by_file_and_api() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest {
            version: 1,
            api_url: "http://a".into(),
            project: "p".into(),
            dataset: None,
            file: "/data/f".into(),
            size: 1,
            mtime_ns: 2,
            sha256: "x".into(),
            part_size: 5,
            part_md5s: vec!["m".into()],
            job_id: uuid::Uuid::new_v4(),
            session_id: None,
            done: vec![],
        };
        let path = manifest_path(dir.path(), &m);
        save(&path, &m).unwrap();
        let back: Manifest = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, m);
        let other = Manifest {
            api_url: "http://b".into(),
            ..m.clone()
        };
        assert_ne!(manifest_path(dir.path(), &other), path);
    }
}
