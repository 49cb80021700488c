//! The in-process fakes the agent's flow tests run against: an embedded rumqttd broker
//! (checking the agent's MQTT password), a fake control plane answering requests over MQTT
//! (checking every signature), and a fake S3 that verifies Content-MD5 and answers MD5 ETags.

#![allow(clippy::unwrap_used)] // test code

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as AxPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest, Md5};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use uplink_agent::config::{Config, MqttConfig};
use uplink_protocol::command::{AckState, Action, Command, CommandAck};
use uplink_protocol::envelope::{CommandEnvelope, RequestEnvelope, ResponseEnvelope};
use uplink_protocol::ops::{
    CreateSession, Op, PartChecksum, PresignParts, PresignedPart, PresignedParts, SessionInfo,
    SessionRef, SessionState, StoredPart,
};
use uplink_protocol::problem::Problem;
use uplink_protocol::sign::{self, PrivateKey, PublicKey};
use uplink_protocol::telemetry::Status;
use uplink_protocol::topics::{self, Channel};
use uplink_protocol::{plan, unix_now};
use uuid::Uuid;

pub const DEVICE: &str = "robot-17";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn start_broker(port: u16, device_key: PublicKey) {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 10485760
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 262144
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    let mut config: rumqttd::Config = toml::from_str(&text).unwrap();
    if let Some(v4) = config.v4.as_mut() {
        for server in v4.values_mut() {
            server.set_auth_handler(move |client_id: String, user: String, pass: String| {
                let ok = if user == "fake-bridge" {
                    pass == "bridge-pw"
                } else {
                    user == DEVICE
                        && client_id == DEVICE
                        && sign::verify_mqtt_password(&device_key, DEVICE, &pass)
                            .is_ok_and(|ts| (unix_now() - ts).abs() < 300)
                };
                async move { ok }
            });
        }
    }
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
}

/// Fake S3: objects by key, parts by (session, number).
#[derive(Default)]
pub struct S3 {
    pub parts: Mutex<BTreeMap<(String, u32), Vec<u8>>>,
    /// PUTs per part number.
    pub puts_by_part: Mutex<HashMap<u32, u32>>,
    /// Part numbers to refuse once with this status (to exercise retries / re-presign).
    pub fail_once: Mutex<HashMap<u32, u16>>,
    pub puts: Mutex<u32>,
    /// At the next completion, storage "loses" this part (409 parts_incomplete).
    pub lose_at_complete: Mutex<Option<u32>>,
}

pub async fn put_part(
    State(s3): State<Arc<S3>>,
    AxPath((session, number)): AxPath<(String, u32)>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    *s3.puts.lock().unwrap() += 1;
    *s3.puts_by_part.lock().unwrap().entry(number).or_default() += 1;
    if let Some(status) = s3.fail_once.lock().unwrap().remove(&number) {
        return (
            StatusCode::from_u16(status).unwrap(),
            HeaderMap::new(),
            "injected",
        );
    }
    let md5 = Md5::digest(&body);
    let want = headers
        .get("content-md5")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if want != B64.encode(md5) {
        return (StatusCode::BAD_REQUEST, HeaderMap::new(), "BadDigest");
    }
    s3.parts
        .lock()
        .unwrap()
        .insert((session, number), body.to_vec());
    let mut h = HeaderMap::new();
    h.insert("etag", format!("\"{}\"", hex::encode(md5)).parse().unwrap());
    (StatusCode::OK, h, "")
}

pub async fn start_s3() -> (SocketAddr, Arc<S3>) {
    let s3 = Arc::new(S3::default());
    let app = axum::Router::new()
        .route("/bucket/{session}/{number}", axum::routing::put(put_part))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(s3.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, s3)
}

pub struct Session {
    pub info: SessionInfo,
    pub md5s: HashMap<u32, String>,
}

/// Fake control plane on MQTT: answers requests, collects acks and presence.
pub struct Cloud {
    pub client: AsyncClient,
    pub acks: mpsc::UnboundedReceiver<CommandAck>,
    pub statuses: Arc<Mutex<Vec<Status>>>,
    pub sessions: Arc<Mutex<HashMap<Uuid, Session>>>,
    pub cmd_key: PrivateKey,
}

pub async fn start_cloud(
    port: u16,
    device_key: PublicKey,
    s3_addr: SocketAddr,
    s3: Arc<S3>,
) -> Cloud {
    let mut opts = MqttOptions::new("fake-bridge", "127.0.0.1", port);
    opts.set_credentials("fake-bridge", "bridge-pw");
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    for ch in [
        Channel::Req,
        Channel::CmdAck,
        Channel::Progress,
        Channel::Status,
    ] {
        client
            .subscribe(topics::filter_all(ch), QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    let (ack_tx, acks) = mpsc::unbounded_channel();
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let sessions: Arc<Mutex<HashMap<Uuid, Session>>> = Arc::default();
    let idem: Arc<Mutex<HashMap<String, (String, ResponseEnvelope)>>> = Arc::default();
    let (st, ss, responder) = (statuses.clone(), sessions.clone(), client.clone());
    let cmd_key = sign::generate();
    let signer = cmd_key.clone();
    tokio::spawn(async move {
        loop {
            let ev = match eventloop.poll().await {
                Ok(ev) => ev,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Event::Incoming(Packet::Publish(p)) = ev else {
                continue;
            };
            let Some((device, channel)) = topics::parse(&p.topic) else {
                continue;
            };
            if channel == Channel::Status {
                st.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&p.payload).unwrap());
                continue;
            }
            let env: RequestEnvelope = serde_json::from_slice(&p.payload).unwrap();
            env.verify(&device_key, device)
                .expect("valid device signature");
            assert!((unix_now() - env.ts).abs() < 60);
            match channel {
                Channel::CmdAck => {
                    ack_tx.send(serde_json::from_str(&env.body).unwrap()).ok();
                }
                Channel::Progress => {}
                Channel::Req => {
                    // Idempotency: same request id + same body → same answer.
                    let answer = {
                        let known = idem.lock().unwrap().get(&env.request_id).cloned();
                        match known {
                            Some((body, answer)) => {
                                assert_eq!(body, env.body, "same request id, same body");
                                answer
                            }
                            None => {
                                let answer = answer(&env, &ss, s3_addr, &s3).sign(&signer, device);
                                idem.lock().unwrap().insert(
                                    env.request_id.clone(),
                                    (env.body.clone(), answer.clone()),
                                );
                                answer
                            }
                        }
                    };
                    responder
                        .publish(
                            topics::topic(device, Channel::Res),
                            QoS::AtLeastOnce,
                            false,
                            serde_json::to_vec(&answer).unwrap(),
                        )
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
    });
    Cloud {
        client,
        acks,
        statuses,
        sessions,
        cmd_key,
    }
}

pub fn answer(
    env: &RequestEnvelope,
    sessions: &Mutex<HashMap<Uuid, Session>>,
    s3_addr: SocketAddr,
    s3: &S3,
) -> ResponseEnvelope {
    let ok = |v: serde_json::Value| ResponseEnvelope::ok(&env.request_id, 200, v);
    let problem = |status, code: &str, detail: String| {
        ResponseEnvelope::problem(&env.request_id, Problem::new(status, code, code, detail))
    };
    let mut sessions = sessions.lock().unwrap();
    match Op::parse(&env.op) {
        Some(Op::SessionCreate) => {
            let body: CreateSession = serde_json::from_str(&env.body).unwrap();
            let plan = match plan::validate(body.size, body.part_size) {
                Ok(p) => p,
                Err(e) => return problem(422, "invalid_plan", e.to_string()),
            };
            let id = Uuid::new_v4();
            let info = SessionInfo {
                session_id: id,
                state: SessionState::Created,
                bucket: "bucket".into(),
                object_key: format!("devices/{DEVICE}/{id}/{}", body.file_name),
                size: body.size,
                part_size: body.part_size,
                part_count: plan.part_count,
                // An API that keeps MD5 part digests: the agent hashes its parts again.
                part_checksum: PartChecksum::Md5,
                stored_parts: vec![],
                sha256: None,
                error: None,
                validation: None,
                validation_error: None,
            };
            sessions.insert(
                id,
                Session {
                    info: info.clone(),
                    md5s: HashMap::new(),
                },
            );
            ok(serde_json::to_value(info).unwrap())
        }
        Some(Op::PartsPresign) => {
            let body: PresignParts = serde_json::from_str(&env.body).unwrap();
            let Some(session) = sessions.get_mut(&body.session_id) else {
                return problem(404, "not_found", "no session".into());
            };
            session.info.state = SessionState::Uploading;
            let parts = body
                .parts
                .into_iter()
                .map(|p| {
                    let md5 = p.digest(PartChecksum::Md5).unwrap_or_default().to_string();
                    session.md5s.insert(p.number, md5.clone());
                    PresignedPart {
                        number: p.number,
                        method: "PUT".into(),
                        url: format!(
                            "http://{s3_addr}/bucket/{}/{}?X-Amz-Signature=secret",
                            body.session_id, p.number
                        ),
                        headers: vec![("content-md5".into(), md5)],
                        expires_at: unix_now() + 900,
                        // An API that predates expires_in_secs.
                        expires_in_secs: None,
                    }
                })
                .collect();
            ok(serde_json::to_value(PresignedParts {
                session_id: body.session_id,
                parts,
            })
            .unwrap())
        }
        Some(op @ (Op::SessionStatus | Op::SessionComplete | Op::SessionAbort)) => {
            let body: SessionRef = serde_json::from_str(&env.body).unwrap();
            let Some(session) = sessions.get_mut(&body.session_id) else {
                return problem(404, "not_found", "no session".into());
            };
            let sid = body.session_id.to_string();
            let stored: Vec<StoredPart> = s3
                .parts
                .lock()
                .unwrap()
                .iter()
                .filter(|((s, _), _)| *s == sid)
                .map(|((_, n), bytes)| StoredPart {
                    number: *n,
                    size: bytes.len() as u64,
                    etag: format!("\"{}\"", hex::encode(Md5::digest(bytes))),
                })
                .collect();
            match op {
                Op::SessionComplete => {
                    if let Some(n) = s3.lose_at_complete.lock().unwrap().take() {
                        s3.parts.lock().unwrap().remove(&(sid.clone(), n));
                        session.info.state = SessionState::Uploading;
                        return problem(409, "parts_incomplete", format!("part {n} is missing"));
                    }
                    if stored.len() as u32 != session.info.part_count {
                        return problem(409, "parts_incomplete", "parts missing".into());
                    }
                    session.info.state = SessionState::Completed;
                }
                Op::SessionAbort => session.info.state = SessionState::Aborted,
                _ => {}
            }
            let mut info = session.info.clone();
            if op == Op::SessionStatus {
                info.stored_parts = stored;
            }
            ok(serde_json::to_value(info).unwrap())
        }
        _ => problem(400, "unknown_op", env.op.clone()),
    }
}

impl Cloud {
    pub async fn command(&self, action: Action) -> Uuid {
        let cmd = Command {
            command_id: Uuid::new_v4(),
            device_id: DEVICE.into(),
            issued_at: unix_now(),
            expires_at: unix_now() + 600,
            action,
        };
        self.send(&cmd).await;
        cmd.command_id
    }

    pub async fn send(&self, cmd: &Command) {
        self.send_signed_by(&self.cmd_key, cmd).await;
    }

    /// Publishes `cmd` signed by `key` (the command key, or a forger's).
    pub async fn send_signed_by(&self, key: &PrivateKey, cmd: &Command) {
        let env = CommandEnvelope::sign(key, cmd);
        self.client
            .publish(
                topics::topic(DEVICE, Channel::Cmd),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&env).unwrap(),
            )
            .await
            .unwrap();
    }

    pub async fn ack(&mut self, id: Uuid, state: AckState) -> CommandAck {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ack = tokio::time::timeout_at(deadline, self.acks.recv())
                .await
                .unwrap_or_else(|_| panic!("no {state:?} ack for {id}"))
                .unwrap();
            if ack.command_id == id && ack.state == state {
                return ack;
            }
        }
    }
}

pub fn config(dir: &Path, port: u16, device_key: &PrivateKey, cmd_key: &PrivateKey) -> Config {
    let key_file = dir.join("device.key");
    std::fs::write(&key_file, sign::encode_private(device_key)).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    Config {
        device_id: DEVICE.into(),
        key_file,
        command_public_key: sign::encode_public(&cmd_key.verifying_key()),
        command_public_keys: Vec::new(),
        state_dir: dir.join("state"),
        allowed_roots: vec![dir.join("data")],
        concurrency: 2,
        part_size_mib: 5,
        hash_first_max_mib: 64,
        request_timeout_secs: 2,
        max_upload_bytes_per_sec: 0,
        per_job_concurrency: None,
        upload_windows: vec![],
        metrics_listen: None,
        api_url: None,
        https_ca_file: None,
        mqtt: MqttConfig {
            host: "127.0.0.1".into(),
            port,
            ..MqttConfig::default()
        },
        watch: vec![],
    }
}
