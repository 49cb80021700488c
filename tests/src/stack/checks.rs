//! What tests check on a stack: upload commands and their outcome, sessions, the object in
//! storage byte for byte, open multipart uploads, the audit log and acks, and an agent's
//! database.

use std::time::Duration;

use serde_json::{json, Value};

use super::{as_list, Device, Stack};
use crate::files::{s3_download, sha256_file, SourceFile};

impl Stack {
    /// Writes `size` random bytes at `relative` under the device's allowed root.
    pub async fn source_file(&self, dev: &Device, relative: &str, size: u64) -> SourceFile {
        crate::files::write_random_file(&dev.root.join(relative), size).await
    }

    /// `POST /v1/devices/{id}/commands` with an upload action; returns the command id.
    pub async fn upload_command(&self, device_id: &str, path: &str) -> String {
        let reply = self
            .operator(
                reqwest::Method::POST,
                &format!("/v1/devices/{device_id}/commands"),
                Some(json!({ "type": "upload", "path": path })),
            )
            .await;
        assert_eq!(reply.status, 201, "create upload command: {reply}");
        reply.body["command_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no command_id in {reply}"))
            .to_string()
    }

    pub async fn command(&self, command_id: &str) -> Value {
        let reply = self.get_json(&format!("/v1/commands/{command_id}")).await;
        assert_eq!(reply.status, 200, "GET /v1/commands/{command_id}: {reply}");
        reply.body
    }

    /// Polls until the command is `rejected`, `done`, `failed` or `expired`.
    pub async fn wait_command_final(&self, command_id: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_state = String::new();
        loop {
            let cmd = self.command(command_id).await;
            let state = cmd["state"].as_str().unwrap_or("").to_string();
            if matches!(state.as_str(), "rejected" | "done" | "failed" | "expired") {
                return cmd;
            }
            if state != last_state {
                eprintln!("command {command_id}: {state}");
                last_state = state;
            }
            self.assert_alive();
            if tokio::time::Instant::now() >= deadline {
                let sessions = self.sessions(cmd["device_id"].as_str().unwrap_or("")).await;
                panic!(
                    "command {command_id} not final after {timeout:?}: {cmd}\nsessions: {}",
                    Value::Array(sessions)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits for a completed session of the device's file with `sha256` (jobs started
    /// without a command: `uplink-agent upload`, directory watches).
    pub async fn wait_completed_session(
        &self,
        dev: &Device,
        sha256: &str,
        timeout: Duration,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let sessions = self.sessions(&dev.id).await;
            if let Some(s) = sessions
                .iter()
                .find(|s| s["sha256"] == sha256 && s["state"] == "completed")
            {
                return s.clone();
            }
            self.assert_alive();
            if tokio::time::Instant::now() > deadline {
                self.dump_logs();
                panic!(
                    "no completed session with sha256 {sha256} within {timeout:?}: {sessions:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// `GET /v1/sessions?device_id=` as a list.
    pub async fn sessions(&self, device_id: &str) -> Vec<Value> {
        let reply = self
            .get_json(&format!("/v1/sessions?device_id={device_id}"))
            .await;
        assert_eq!(reply.status, 200, "GET /v1/sessions: {reply}");
        as_list(&reply.body)
            .unwrap_or_else(|| panic!("GET /v1/sessions is not a list of sessions: {reply}"))
    }

    pub async fn session(&self, session_id: &str) -> Value {
        let reply = self.get_json(&format!("/v1/sessions/{session_id}")).await;
        assert_eq!(reply.status, 200, "GET /v1/sessions/{session_id}: {reply}");
        reply.body
    }

    /// Runs an upload command for `file` and checks everything: command `done`, session
    /// `completed` with the file's size and SHA-256, object in S3 byte-identical.
    /// Returns the final session.
    pub async fn upload_and_verify(
        &self,
        dev: &Device,
        file: &SourceFile,
        timeout: Duration,
    ) -> Value {
        let command_id = self.upload_command(&dev.id, file.path_str()).await;
        let cmd = self.wait_command_final(&command_id, timeout).await;
        self.verify_upload(file, &cmd).await
    }

    /// Waits until the API has checked the session's claimed SHA-256 against the stored
    /// bytes (`digest_check` no longer `pending`) and returns the session.
    pub async fn wait_digest_checked(&self, session_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.session(session_id).await;
            if s["digest_check"].as_str().is_some_and(|c| c != "pending") {
                return s;
            }
            self.assert_alive();
            assert!(
                tokio::time::Instant::now() < deadline,
                "digest of session {session_id} not checked within 60 s: {s}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The session, once it has its SHA-256: with parts signed by their SHA-256 and no
    /// whole-file digest from the agent, the API's read-back of the stored object gives it
    /// after completion (at most 300 s of waiting).
    pub async fn wait_session_digest(&self, session_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        let mut session = self.session(session_id).await;
        while session["sha256"].is_null()
            && session["digest_check"] == "pending"
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            session = self.session(session_id).await;
        }
        session
    }

    /// Checks a final command for `file` (see [`Stack::upload_and_verify`]).
    pub async fn verify_upload(&self, file: &SourceFile, cmd: &Value) -> Value {
        assert_eq!(
            cmd["state"], "done",
            "upload command did not end done: {cmd}"
        );
        let session_id = cmd["session_id"]
            .as_str()
            .unwrap_or_else(|| panic!("done upload command has no session_id: {cmd}"));
        let session = self.wait_session_digest(session_id).await;
        assert_eq!(session["state"], "completed", "session: {session}");
        assert_eq!(
            session["size"].as_u64(),
            Some(file.size),
            "session size: {session}"
        );
        assert_eq!(
            session["sha256"].as_str(),
            Some(file.sha256.as_str()),
            "the session's recorded sha256 must equal the file's: {session}"
        );
        assert_eq!(
            session["command_id"].as_str(),
            cmd["command_id"].as_str(),
            "session.command_id: {session}"
        );
        let bucket = session["bucket"].as_str().expect("session.bucket");
        let key = session["object_key"].as_str().expect("session.object_key");
        let file_name = file
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name");
        let device_id = cmd["device_id"].as_str().unwrap_or("");
        assert_eq!(
            key,
            format!(
                "{}default/default/{device_id}/{session_id}/{file_name}",
                self.opts.key_prefix
            ),
            "object key layout ({{key_prefix}}{{project}}/{{dataset}}/{{device}}/{{session}}/{{filename}})"
        );
        let dest = self.dir.path().join(format!("download-{session_id}"));
        let code = s3_download(&self.env, bucket, key, &dest).await;
        assert_eq!(code, 200, "GET s3://{bucket}/{key}");
        let (sha, len) = sha256_file(&dest);
        std::fs::remove_file(&dest).ok();
        assert_eq!(len, file.size, "size of the object in S3");
        assert_eq!(sha, file.sha256, "SHA-256 of the object in S3");
        session
    }

    /// Waits until at least `bytes` went from agents through the proxy towards storage.
    /// Panics when the command ends first or nothing moves for `timeout`.
    pub async fn wait_proxy_bytes(&self, command_id: &str, bytes: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.proxy.bytes_sent() < bytes {
            let cmd = self.command(command_id).await;
            let state = cmd["state"].as_str().unwrap_or("");
            assert!(
                !matches!(state, "done" | "failed" | "rejected" | "expired"),
                "the command ended ({cmd}) before {bytes} bytes went to storage"
            );
            self.assert_alive();
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {bytes} bytes went to storage within {timeout:?}",
                self.proxy.bytes_sent()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Result of `PRAGMA integrity_check` on the agent's `state_dir/agent.db` (opened
    /// read-only; fine while the agent runs, the database is in WAL mode).
    pub fn agent_db_integrity(&self, dev: &Device) -> String {
        let path = dev.state_dir.join("agent.db");
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        conn.busy_timeout(Duration::from_secs(10)).ok();
        let rows: Vec<String> = conn
            .prepare("PRAGMA integrity_check")
            .and_then(|mut st| {
                st.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap_or_else(|e| panic!("PRAGMA integrity_check on {}: {e}", path.display()));
        rows.join("\n")
    }

    /// Keys of the multipart uploads open for `dev`'s objects (default key layout).
    pub async fn open_uploads_of(&self, dev: &Device) -> Vec<String> {
        let needle = format!("/{}/", dev.id);
        let mut open = self.s3_open_uploads(&self.opts.key_prefix).await;
        open.retain(|k| k.contains(&needle));
        open
    }

    /// Keys of the multipart uploads still open in the bucket under `prefix`
    /// (S3 ListMultipartUploads, SigV4-signed with curl).
    pub async fn s3_open_uploads(&self, prefix: &str) -> Vec<String> {
        // Sorted, encoded and with `uploads=`: curl signs the query as written.
        let url = format!(
            "{}/{}?prefix={}&uploads=",
            self.env.s3_endpoint,
            self.env.s3_bucket,
            prefix.replace('/', "%2F")
        );
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--fail-with-body", "--max-time", "30"])
            // Signed in; AWS S3 and Garage refuse a request without it (400).
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{}:s3", self.env.s3_region))
            .arg("--user")
            .arg(format!(
                "{}:{}",
                self.env.s3_access_key, self.env.s3_secret_key
            ))
            .arg(&url)
            .output()
            .await
            .expect("run curl");
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success() && body.contains("ListMultipartUploadsResult"),
            "GET {url}: {} {body}",
            String::from_utf8_lossy(&out.stderr)
        );
        body.split("<Upload>")
            .skip(1)
            .filter_map(|u| {
                let start = u.find("<Key>")? + "<Key>".len();
                let end = u[start..].find("</Key>")? + start;
                Some(u[start..end].to_string())
            })
            .collect()
    }

    /// The checks every fault test ends with: the command is `done` and the object
    /// byte-identical ([`Stack::verify_upload`]), the device has exactly one session, no
    /// multipart upload is left open under the device's prefix, and the agent's SQLite
    /// database passes `PRAGMA integrity_check`. Returns the session.
    pub async fn verify_fault_upload(&self, dev: &Device, file: &SourceFile, cmd: &Value) -> Value {
        let session = self.verify_upload(file, cmd).await;
        let sessions = self.sessions(&dev.id).await;
        assert_eq!(
            sessions.len(),
            1,
            "exactly one session for one upload: {}",
            Value::Array(sessions.clone())
        );
        assert_eq!(sessions[0]["session_id"], session["session_id"]);
        let open = self.open_uploads_of(dev).await;
        assert!(open.is_empty(), "multipart uploads left open: {open:?}");
        assert_eq!(self.agent_db_integrity(dev), "ok", "agent.db integrity");
        session
    }

    /// `GET /v1/audit?subject=` as a list (oldest first).
    pub async fn audit(&self, subject: &str) -> Vec<Value> {
        let reply = self
            .get_json(&format!("/v1/audit?subject={subject}&limit=1000"))
            .await;
        assert_eq!(reply.status, 200, "GET /v1/audit: {reply}");
        as_list(&reply.body).unwrap_or_else(|| panic!("GET /v1/audit is not a list: {reply}"))
    }

    /// How many times the API recorded the command's ack moving it to `state`.
    pub async fn acks_recorded(&self, command_id: &str, state: &str) -> usize {
        self.audit(command_id)
            .await
            .iter()
            .filter(|e| e["action"] == "command.ack" && e["detail"]["state"] == state)
            .count()
    }
}
