//! The agent end to end against in-process fakes: an embedded rumqttd broker (checking the
//! agent's MQTT password), a fake control plane answering requests over MQTT (checking every
//! signature), and a fake S3 that verifies Content-MD5 and answers MD5 ETags. The real
//! cross-service tests live in `tests/`; this one needs nothing outside the process.

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
use tokio_util::sync::CancellationToken;
use uplink_agent::config::{Config, MqttConfig};
use uplink_protocol::command::{AckState, Action, Command, CommandAck};
use uplink_protocol::envelope::{CommandEnvelope, RequestEnvelope, ResponseEnvelope};
use uplink_protocol::ops::{
    CreateSession, Op, PartChecksum, PresignParts, PresignedPart, PresignedParts, SessionInfo,
    SessionRef, SessionState, StoredPart,
};
use uplink_protocol::problem::Problem;
use uplink_protocol::sign::{self, PrivateKey, PublicKey};
use uplink_protocol::telemetry::{Presence, Status};
use uplink_protocol::topics::{self, Channel};
use uplink_protocol::{plan, unix_now};
use uuid::Uuid;

const DEVICE: &str = "robot-17";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_broker(port: u16, device_key: PublicKey) {
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
struct S3 {
    parts: Mutex<BTreeMap<(String, u32), Vec<u8>>>,
    /// PUTs per part number.
    puts_by_part: Mutex<HashMap<u32, u32>>,
    /// Part numbers to refuse once with this status (to exercise retries / re-presign).
    fail_once: Mutex<HashMap<u32, u16>>,
    puts: Mutex<u32>,
    /// At the next completion, storage "loses" this part (409 parts_incomplete).
    lose_at_complete: Mutex<Option<u32>>,
}

async fn put_part(
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

async fn start_s3() -> (SocketAddr, Arc<S3>) {
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

struct Session {
    info: SessionInfo,
    md5s: HashMap<u32, String>,
}

/// Fake control plane on MQTT: answers requests, collects acks and presence.
struct Cloud {
    client: AsyncClient,
    acks: mpsc::UnboundedReceiver<CommandAck>,
    statuses: Arc<Mutex<Vec<Status>>>,
    sessions: Arc<Mutex<HashMap<Uuid, Session>>>,
    cmd_key: PrivateKey,
}

async fn start_cloud(port: u16, device_key: PublicKey, s3_addr: SocketAddr, s3: Arc<S3>) -> Cloud {
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

fn answer(
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
    async fn command(&self, action: Action) -> Uuid {
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

    async fn send(&self, cmd: &Command) {
        let env = CommandEnvelope::sign(&self.cmd_key, cmd);
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

    async fn ack(&mut self, id: Uuid, state: AckState) -> CommandAck {
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

fn config(dir: &Path, port: u16, device_key: &PrivateKey, cmd_key: &PrivateKey) -> Config {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_rejects_and_dedups_commands() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("uplink_agent=debug")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let device_key = sign::generate();
    let port = free_port();
    start_broker(port, device_key.verifying_key());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s3_addr, s3) = start_s3().await;
    let mut cloud = start_cloud(port, device_key.verifying_key(), s3_addr, s3.clone()).await;

    let cfg = config(&base, port, &device_key, &cloud.cmd_key);
    let loaded = cfg.validate().unwrap();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(uplink_agent::run(loaded, shutdown.clone()));

    // Wait for the agent's retained online status.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cloud
        .statuses
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.state == Presence::Online)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent never came online"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A 3-part file (5 MiB parts), with part 2 failing once with 500 and part 3 with 403.
    let size = 12 * plan::MIB as usize + 777;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
    let file = base.join("data/run-042.mcap");
    std::fs::write(&file, &data).unwrap();
    s3.fail_once.lock().unwrap().extend([(2, 500), (3, 403)]);

    let upload = cloud
        .command(Action::Upload {
            path: file.to_string_lossy().into_owned(),
            priority: None,
        })
        .await;
    cloud.ack(upload, AckState::Accepted).await;
    let done = cloud.ack(upload, AckState::Done).await;
    let session_id = done.session_id.expect("done ack carries the session id");
    let mut joined = Vec::new();
    for n in 1..=3u32 {
        joined.extend_from_slice(&s3.parts.lock().unwrap()[&(session_id.to_string(), n)]);
    }
    assert_eq!(joined, data, "storage holds exactly the file");
    assert_eq!(*s3.puts.lock().unwrap(), 5, "3 parts + 2 injected failures");
    assert_eq!(
        cloud.sessions.lock().unwrap()[&session_id].info.state,
        SessionState::Completed
    );

    // A path outside the roots is rejected with a clear reason.
    let bad = cloud
        .command(Action::Upload {
            path: "/etc/passwd".into(),
            priority: None,
        })
        .await;
    let ack = cloud.ack(bad, AckState::Rejected).await;
    assert_eq!(
        ack.reason.as_deref(),
        Some("path /etc/passwd is outside the allowed roots")
    );

    // Pausing a finished job is rejected; an unknown job too.
    let p = cloud.command(Action::Pause { job_id: upload }).await;
    assert!(cloud
        .ack(p, AckState::Rejected)
        .await
        .reason
        .unwrap()
        .contains("already done"));
    let p = cloud
        .command(Action::Pause {
            job_id: Uuid::new_v4(),
        })
        .await;
    assert!(cloud
        .ack(p, AckState::Rejected)
        .await
        .reason
        .unwrap()
        .contains("no job"));

    // An expired command is rejected; a re-delivered one gets its stored ack, once.
    let expired = Command {
        command_id: Uuid::new_v4(),
        device_id: DEVICE.into(),
        issued_at: unix_now() - 100,
        expires_at: unix_now() - 10,
        action: Action::Upload {
            path: file.to_string_lossy().into_owned(),
            priority: None,
        },
    };
    cloud.send(&expired).await;
    let ack = cloud.ack(expired.command_id, AckState::Rejected).await;
    assert!(ack.reason.unwrap().contains("expired"));

    let empty = base.join("data/empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let cmd = Command {
        command_id: Uuid::new_v4(),
        device_id: DEVICE.into(),
        issued_at: unix_now(),
        expires_at: unix_now() + 600,
        action: Action::Upload {
            path: empty.to_string_lossy().into_owned(),
            priority: None,
        },
    };
    cloud.send(&cmd).await;
    let done = cloud.ack(cmd.command_id, AckState::Done).await;
    let sid = done.session_id.unwrap().to_string();
    assert_eq!(s3.parts.lock().unwrap()[&(sid, 1)], Vec::<u8>::new());
    let puts = *s3.puts.lock().unwrap();
    cloud.send(&cmd).await; // duplicate delivery
    cloud.ack(cmd.command_id, AckState::Done).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*s3.puts.lock().unwrap(), puts, "executed once");

    // A command signed by another key is dropped without an ack.
    let forged = Command {
        command_id: Uuid::new_v4(),
        ..cmd.clone()
    };
    let env = CommandEnvelope::sign(&sign::generate(), &forged);
    cloud
        .client
        .publish(
            topics::topic(DEVICE, Channel::Cmd),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&env).unwrap(),
        )
        .await
        .unwrap();

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("agent stops on shutdown")
        .unwrap()
        .unwrap();
    while let Ok(ack) = cloud.acks.try_recv() {
        assert_ne!(
            ack.command_id, forged.command_id,
            "forged command was answered"
        );
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_restart_pauses_and_cancels() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("uplink_agent=debug")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let device_key = sign::generate();
    let port = free_port();
    start_broker(port, device_key.verifying_key());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s3_addr, s3) = start_s3().await;
    let mut cloud = start_cloud(port, device_key.verifying_key(), s3_addr, s3.clone()).await;

    let mut cfg = config(&base, port, &device_key, &cloud.cmd_key);
    cfg.concurrency = 1;
    cfg.max_upload_bytes_per_sec = 8 * plan::MIB;
    let size = 15 * plan::MIB as usize;
    let data: Vec<u8> = (0..size).map(|i| (i * 13 % 241) as u8).collect();
    let file = base.join("data/big.bin");
    std::fs::write(&file, &data).unwrap();

    // First run: stop the agent once part 1 is stored.
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(uplink_agent::run(
        cfg.clone().validate().unwrap(),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let upload = cloud
        .command(Action::Upload {
            path: file.to_string_lossy().into_owned(),
            priority: None,
        })
        .await;
    cloud.ack(upload, AckState::Accepted).await;
    wait_until("part 1 stored", || {
        s3.parts.lock().unwrap().keys().any(|(_, n)| *n == 1)
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!s3.puts_by_part.lock().unwrap().contains_key(&3));

    // Second run: resumes from session.status, uploads only what storage lacks.
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(uplink_agent::run(
        cfg.clone().validate().unwrap(),
        shutdown.clone(),
    ));
    let done = cloud.ack(upload, AckState::Done).await;
    let sid = done.session_id.unwrap().to_string();
    let mut joined = Vec::new();
    for n in 1..=3u32 {
        joined.extend_from_slice(&s3.parts.lock().unwrap()[&(sid.clone(), n)]);
    }
    assert_eq!(joined, data);
    assert_eq!(
        s3.puts_by_part.lock().unwrap()[&1],
        1,
        "part 1 was not uploaded again"
    );
    assert_eq!(
        cloud.sessions.lock().unwrap().len(),
        1,
        "session.create was not repeated"
    );

    // Pause stops new parts; resume finishes the job.
    let file2 = base.join("data/big2.bin");
    std::fs::write(&file2, &data).unwrap();
    s3.puts_by_part.lock().unwrap().clear();
    let up2 = cloud
        .command(Action::Upload {
            path: file2.to_string_lossy().into_owned(),
            priority: None,
        })
        .await;
    cloud.ack(up2, AckState::Accepted).await;
    wait_until("first part of job 2", || {
        !s3.puts_by_part.lock().unwrap().is_empty()
    })
    .await;
    let pause = cloud.command(Action::Pause { job_id: up2 }).await;
    cloud.ack(pause, AckState::Done).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let puts_while_paused = s3.puts_by_part.lock().unwrap().len();
    assert!(puts_while_paused < 3, "paused job kept uploading");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(s3.puts_by_part.lock().unwrap().len(), puts_while_paused);
    let resume = cloud.command(Action::Resume { job_id: up2 }).await;
    cloud.ack(resume, AckState::Done).await;
    cloud.ack(up2, AckState::Done).await;

    // Cancel aborts the session and fails the upload command with "cancelled".
    let file3 = base.join("data/big3.bin");
    std::fs::write(&file3, &data).unwrap();
    s3.puts_by_part.lock().unwrap().clear();
    let up3 = cloud
        .command(Action::Upload {
            path: file3.to_string_lossy().into_owned(),
            priority: None,
        })
        .await;
    cloud.ack(up3, AckState::Accepted).await;
    wait_until("first part of job 3", || {
        !s3.puts_by_part.lock().unwrap().is_empty()
    })
    .await;
    let cancel = cloud.command(Action::Cancel { job_id: up3 }).await;
    cloud.ack(cancel, AckState::Done).await;
    let failed = cloud.ack(up3, AckState::Failed).await;
    assert_eq!(failed.reason.as_deref(), Some("cancelled"));
    assert!(cloud
        .sessions
        .lock()
        .unwrap()
        .values()
        .any(|s| s.info.state == SessionState::Aborted));
    let again = cloud.command(Action::Resume { job_id: up3 }).await;
    assert!(cloud
        .ack(again, AckState::Rejected)
        .await
        .reason
        .unwrap()
        .contains("already cancelled"));

    // Storage loses a part at completion: the agent uploads it again and completes.
    let file4 = base.join("data/big4.bin");
    std::fs::write(&file4, &data).unwrap();
    s3.puts_by_part.lock().unwrap().clear();
    *s3.lose_at_complete.lock().unwrap() = Some(2);
    let up4 = cloud
        .command(Action::Upload {
            path: file4.to_string_lossy().into_owned(),
            priority: None,
        })
        .await;
    let done = cloud.ack(up4, AckState::Done).await;
    let sid = done.session_id.unwrap().to_string();
    assert_eq!(
        s3.puts_by_part.lock().unwrap()[&2],
        2,
        "lost part uploaded again"
    );
    assert_eq!(s3.puts_by_part.lock().unwrap()[&1], 1);
    let mut joined = Vec::new();
    for n in 1..=3u32 {
        joined.extend_from_slice(&s3.parts.lock().unwrap()[&(sid.clone(), n)]);
    }
    assert_eq!(joined, data);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `config` commands signed by the cloud but invalid are rejected by the agent itself (an
/// older or bypassed control API), changing nothing; valid ones are applied, kept in the
/// database across a restart, and dropped by `reset`. Upload priorities are checked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_commands_are_checked_applied_and_kept() {
    use uplink_protocol::flow::FlowConfig;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let device_key = sign::generate();
    let port = free_port();
    start_broker(port, device_key.verifying_key());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s3_addr, s3) = start_s3().await;
    let mut cloud = start_cloud(port, device_key.verifying_key(), s3_addr, s3.clone()).await;
    let cfg = config(&base, port, &device_key, &cloud.cmd_key);
    let overrides = || {
        let conn = uplink_agent::store::open(&base.join("state")).unwrap();
        uplink_agent::store::flow_overrides(&conn).unwrap()
    };

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(uplink_agent::run(
        cfg.clone().validate().unwrap(),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;

    let bad = cloud
        .command(Action::Config(FlowConfig {
            max_upload_bytes_per_sec: Some(65536),
            concurrency: Some(99),
            upload_windows: Some(vec!["6pm-8pm".into()]),
            ..FlowConfig::default()
        }))
        .await;
    let reason = cloud.ack(bad, AckState::Rejected).await.reason.unwrap();
    assert!(
        reason.contains("concurrency: 99 is outside 1..=64"),
        "{reason}"
    );
    assert!(reason.contains("\"6pm-8pm\""), "{reason}");
    assert_eq!(overrides(), None, "a rejected command changes nothing");

    let urgent = base.join("data/urgent.bin");
    std::fs::write(&urgent, b"urgent").unwrap();
    let bad = cloud
        .command(Action::Upload {
            path: urgent.to_string_lossy().into_owned(),
            priority: Some(10),
        })
        .await;
    let reason = cloud.ack(bad, AckState::Rejected).await.reason.unwrap();
    assert!(reason.contains("priority 10 is outside 0..=9"), "{reason}");

    let good = cloud
        .command(Action::Config(FlowConfig {
            max_upload_bytes_per_sec: Some(65536),
            per_job_concurrency: Some(1),
            ..FlowConfig::default()
        }))
        .await;
    cloud.ack(good, AckState::Done).await;
    let more = cloud
        .command(Action::Config(FlowConfig {
            upload_windows: Some(vec!["22:00-06:00".into()]),
            ..FlowConfig::default()
        }))
        .await;
    cloud.ack(more, AckState::Done).await;
    let kept = FlowConfig {
        max_upload_bytes_per_sec: Some(65536),
        per_job_concurrency: Some(1),
        upload_windows: Some(vec!["22:00-06:00".into()]),
        ..FlowConfig::default()
    };
    assert_eq!(overrides(), Some(kept.clone()), "overrides merge");

    // A high-priority upload is taken on and finishes (the window above may be closed
    // now, so open it first: `[]` = always).
    let open = cloud
        .command(Action::Config(FlowConfig {
            upload_windows: Some(vec![]),
            ..FlowConfig::default()
        }))
        .await;
    cloud.ack(open, AckState::Done).await;
    let job = cloud
        .command(Action::Upload {
            path: urgent.to_string_lossy().into_owned(),
            priority: Some(9),
        })
        .await;
    cloud.ack(job, AckState::Done).await;

    // Restart: the overrides hold; `reset` drops them.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        overrides().unwrap().max_upload_bytes_per_sec,
        Some(65536),
        "kept across the restart"
    );
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(uplink_agent::run(
        cfg.clone().validate().unwrap(),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let reset = cloud
        .command(Action::Config(FlowConfig {
            reset: true,
            ..FlowConfig::default()
        }))
        .await;
    cloud.ack(reset, AckState::Done).await;
    assert_eq!(overrides(), Some(FlowConfig::default()));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
