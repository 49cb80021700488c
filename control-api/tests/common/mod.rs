//! The control API in-process against a real PostgreSQL (one database per test) and a real
//! S3 server, for the integration tests. `scripts/test` starts both and exports the
//! `UPLINK_TEST_*` variables.
#![allow(dead_code)]

pub use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
pub use md5::{Digest, Md5};
pub use serde_json::{json, Value};
use sqlx::Connection;
use uplink_api::config::{CleanupConfig, Config, S3Config, Secret, ValidationConfig};
use uplink_protocol::envelope::RequestEnvelope;
pub use uplink_protocol::sign::{self, PrivateKey};
pub use uplink_protocol::unix_now;
pub use uuid::Uuid;

pub const OPERATOR: &str = "operator-token-for-tests";
pub const BRIDGE: &str = "bridge-token-for-tests-0";
pub const MIB: usize = 1 << 20;

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: these tests need PostgreSQL and an S3 server; run them with scripts/test")
    })
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub state: uplink_api::AppState,
    _dir: tempfile::TempDir,
}

impl TestApp {
    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    pub async fn spawn() -> TestApp {
        Self::spawn_with(900).await
    }

    pub async fn spawn_with(presign_ttl_secs: u64) -> TestApp {
        Self::spawn_config(|c| c.s3.presign_ttl_secs = presign_ttl_secs).await
    }

    /// An app whose configuration `change` adjusts first. The validation worker runs
    /// (waking on each completion; `validation.interval_secs = 0` keeps it off, for tests
    /// that call `uplink_api::validation::run_once` themselves); the cleanup worker does not.
    pub async fn spawn_config(change: impl FnOnce(&mut Config)) -> TestApp {
        let prefix = format!("test-{}/", Uuid::new_v4().simple());
        let admin_url = env("UPLINK_TEST_DATABASE_URL");
        let db = format!("api_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connect to the admin database");
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let mut url = url::Url::parse(&admin_url).expect("admin url");
        url.set_path(&db);

        let dir = tempfile::tempdir().expect("tempdir");
        let key_file = dir.path().join("command.key");
        std::fs::write(&key_file, sign::encode_private(&sign::generate())).expect("write key");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            tls_cert_file: None,
            tls_key_file: None,
            database_url: Secret::new(url.to_string()),
            database_max_connections: 16,
            operator_token: Secret::new(OPERATOR),
            bridge_token: Secret::new(BRIDGE),
            mqtt_password_secret: None,
            command_key_file: key_file,
            command_next_key_file: None,
            replay_window_secs: 300,
            command_ttl_secs: 3600,
            command_resend_secs: 30,
            command_recheck_secs: 300,
            command_lease_secs: 10,
            cleanup: CleanupConfig {
                interval_secs: 0,
                ..CleanupConfig::default()
            },
            events: Default::default(),
            validation: ValidationConfig {
                interval_secs: 1,
                lease_secs: 5,
                retry_initial_secs: 1,
                retry_max_secs: 2,
                ..ValidationConfig::default()
            },
            s3: S3Config {
                endpoint: env("UPLINK_TEST_S3_ENDPOINT"),
                public_endpoint: None,
                region: "us-east-1".into(),
                bucket: env("UPLINK_TEST_S3_BUCKET"),
                key_prefix: prefix,
                access_key_id: Secret::new(env("UPLINK_TEST_S3_ACCESS_KEY")),
                secret_access_key: Secret::new(env("UPLINK_TEST_S3_SECRET_KEY")),
                force_path_style: true,
                presign_ttl_secs: 900,
                part_checksum: uplink_protocol::ops::PartChecksum::Sha256,
            },
        };
        change(&mut config);
        config.validate().expect("valid config");
        let state = uplink_api::build_state(config).await.expect("build state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let router = uplink_api::http::router(state.clone());
        tokio::spawn(async move { axum_serve(listener, router).await });
        // The event relay and webhook deliverer, as `uplink_api::serve` runs them.
        tokio::spawn(uplink_api::events::run(
            state.clone(),
            tokio_util::sync::CancellationToken::new(),
        ));
        // The LISTEN that ends the bridges' command long-polls, as `uplink_api::serve` runs it.
        tokio::spawn(uplink_api::command_feed::run(
            state.clone(),
            tokio_util::sync::CancellationToken::new(),
        ));
        // The validation worker, as `uplink_api::serve` runs it.
        tokio::spawn(uplink_api::validation::run(
            state.clone(),
            tokio_util::sync::CancellationToken::new(),
        ));
        TestApp {
            base,
            http: reqwest::Client::new(),
            state,
            _dir: dir,
        }
    }

    pub async fn operator(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call(method, path, body, OPERATOR).await
    }

    pub async fn bridge(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call(method, path, body, BRIDGE).await
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: &str,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn register(&self, device_id: &str) -> PrivateKey {
        let key = sign::generate();
        let (status, body) = self
            .operator(
                reqwest::Method::POST,
                "/v1/devices",
                Some(json!({"device_id": device_id, "public_key": sign::encode_public(&key.verifying_key())})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        key
    }

    /// A signed device request; returns status and JSON (result or problem).
    pub async fn device(
        &self,
        key: &PrivateKey,
        device_id: &str,
        op: &str,
        request_id: &str,
        body: &Value,
    ) -> (u16, Value) {
        self.device_raw(key, device_id, op, request_id, unix_now(), body.to_string())
            .await
    }

    pub async fn device_raw(
        &self,
        key: &PrivateKey,
        device_id: &str,
        op: &str,
        request_id: &str,
        ts: i64,
        body: String,
    ) -> (u16, Value) {
        let env = RequestEnvelope::sign(key, device_id, op, request_id, ts, body);
        let resp = self
            .http
            .post(format!("{}/v1/device/{op}", self.base))
            .header("x-uplink-device", device_id)
            .header("idempotency-key", request_id)
            .header("x-uplink-timestamp", ts.to_string())
            .header("x-uplink-signature", &env.sig)
            .header("content-type", "application/json")
            .body(env.body)
            .send()
            .await
            .expect("device request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn session_count(&self, device_id: &str) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM sessions WHERE device_id = $1")
            .bind(device_id)
            .fetch_one(&self.state.store.pool)
            .await
            .expect("count");
        n
    }
}

pub async fn new_project(app: &TestApp, body: Value) {
    let (status, reply) = app
        .operator(reqwest::Method::POST, "/v1/projects", Some(body))
        .await;
    assert_eq!(status, 201, "{reply}");
}

/// Creates an API key; returns its token.
pub async fn new_key(app: &TestApp, role: &str, project: Option<&str>) -> String {
    let (status, reply) = app
        .operator(
            reqwest::Method::POST,
            "/v1/keys",
            Some(json!({"name": format!("{role} key"), "role": role, "project_id": project})),
        )
        .await;
    assert_eq!(status, 201, "{reply}");
    reply["token"]
        .as_str()
        .expect("token shown once")
        .to_string()
}

pub async fn axum_serve(listener: tokio::net::TcpListener, router: axum::Router) {
    let _ = axum::serve(listener, router).await;
}

pub fn rid() -> String {
    Uuid::new_v4().simple().to_string()
}

pub fn md5_b64(data: &[u8]) -> String {
    B64.encode(Md5::digest(data))
}

pub fn sha256_hex(data: &[u8]) -> String {
    uplink_protocol::sha256_hex(data)
}

pub fn file(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub fn create_body(job: Uuid, data: &[u8], part_size: usize) -> Value {
    json!({"job_id": job, "file_name": "run-042.mcap", "size": data.len(), "sha256": sha256_hex(data), "part_size": part_size})
}

pub async fn put(http: &reqwest::Client, part: &Value, bytes: Vec<u8>) -> reqwest::Response {
    let mut req = http.put(part["url"].as_str().expect("url")).body(bytes);
    for h in part["headers"].as_array().expect("headers") {
        req = req.header(h[0].as_str().expect("name"), h[1].as_str().expect("value"));
    }
    req.send().await.expect("PUT")
}

/// `data`'s 5 MiB parts (one empty part for an empty file).
pub fn parts_of(data: &[u8]) -> Vec<&[u8]> {
    if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(5 * MIB).collect()
    }
}

/// `parts.presign` for `parts` (`{"number", "md5"|"sha256"}`) of session `sid`, checking
/// that it answers 200; returns the answer.
pub async fn presign_parts(
    app: &TestApp,
    key: &PrivateKey,
    device: &str,
    sid: &str,
    parts: Vec<Value>,
) -> Value {
    let (status, presigned) = app
        .device(
            key,
            device,
            "parts.presign",
            &rid(),
            &json!({"session_id": sid, "parts": parts}),
        )
        .await;
    assert_eq!(status, 200, "{presigned}");
    presigned
}

/// Presigns and PUTs every 5 MiB part of `data` (one empty part for an empty file) into
/// session `sid`, checking each answer and ETag; returns the parts' base64 MD5s.
pub async fn put_parts(
    app: &TestApp,
    key: &PrivateKey,
    device: &str,
    sid: &str,
    data: &[u8],
) -> Vec<String> {
    let chunks = parts_of(data);
    let md5s: Vec<String> = chunks.iter().map(|c| md5_b64(c)).collect();
    let parts: Vec<Value> = md5s
        .iter()
        .enumerate()
        .map(|(i, md5)| json!({"number": i + 1, "md5": md5}))
        .collect();
    let presigned = presign_parts(app, key, device, sid, parts).await;
    for (i, chunk) in chunks.iter().enumerate() {
        let resp = put(&app.http, &presigned["parts"][i], chunk.to_vec()).await;
        assert_eq!(
            resp.status().as_u16(),
            200,
            "PUT part {}: {}",
            i + 1,
            resp.text().await.unwrap_or_default()
        );
        let etag = resp.headers()["etag"]
            .to_str()
            .expect("etag")
            .trim_matches('"')
            .to_string();
        assert_eq!(etag, hex::encode(Md5::digest(chunk)));
    }
    md5s
}

/// Creates a session for `data`, uploads every part and returns the session id.
pub async fn upload_all(app: &TestApp, key: &PrivateKey, device: &str, data: &[u8]) -> String {
    let part_size = 5 * MIB;
    let (status, created) = app
        .device(
            key,
            device,
            "session.create",
            &rid(),
            &create_body(Uuid::new_v4(), data, part_size),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let sid = created["session_id"].as_str().expect("id").to_string();
    let md5s = put_parts(app, key, device, &sid, data).await;
    assert_eq!(created["part_count"], md5s.len());
    sid
}

/// Registers `device_id` in `project` (as the bootstrap operator).
pub async fn register_in(app: &TestApp, project: &str, device_id: &str) -> PrivateKey {
    let key = sign::generate();
    let (status, body) = app
        .operator(
            reqwest::Method::POST,
            "/v1/devices",
            Some(json!({"device_id": device_id, "public_key": sign::encode_public(&key.verifying_key()), "project_id": project})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    key
}

pub fn create_in(job: Uuid, data: &[u8], dataset: Option<&str>, name: &str) -> Value {
    let mut b = json!({"job_id": job, "file_name": name, "size": data.len(),
                       "sha256": sha256_hex(data), "part_size": 5 * MIB});
    if let Some(d) = dataset {
        b["dataset"] = json!(d);
    }
    b
}

/// Runs the digest worker until no completed object is left unchecked: the objects completed
/// so far become dedupe sources (or are found not to hold their claimed digest).
pub async fn check_digests(app: &TestApp) {
    let none = tokio_util::sync::CancellationToken::new();
    while uplink_api::digest::run_once(&app.state, &none)
        .await
        .expect("digest pass")
        .is_some()
    {}
}

/// Uploads `data` (in 5 MiB parts) in a new session and completes it with the device's
/// manifest; a session deduplicated at creation is returned as it is.
pub async fn upload(
    app: &TestApp,
    key: &PrivateKey,
    device: &str,
    dataset: Option<&str>,
    name: &str,
    data: &[u8],
) -> Value {
    let (status, created) = app
        .device(
            key,
            device,
            "session.create",
            &rid(),
            &create_in(Uuid::new_v4(), data, dataset, name),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    if created["state"] == "completed" {
        return created;
    }
    let sid = created["session_id"].as_str().expect("id").to_string();
    let md5s = put_parts(app, key, device, &sid, data).await;
    let digest = uplink_protocol::ops::parts_digest(
        md5s.iter()
            .enumerate()
            .map(|(i, m)| ((i + 1) as u32, m.as_str())),
    );
    let manifest = json!({"device_id": device, "session_id": sid, "path": format!("/data/{name}"),
        "size": data.len(), "sha256": sha256_hex(data), "part_count": md5s.len(),
        "parts_digest": digest});
    let (status, done) = app
        .device(
            key,
            device,
            "session.complete",
            &rid(),
            &json!({"session_id": sid, "manifest": manifest}),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "completed");
    done
}
