//! Shared by the integration tests: a mock control API (axum on port 0) and a rumqttc
//! client acting as a device.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uplink_protocol::envelope::{RequestEnvelope, ResponseEnvelope};
use uplink_protocol::problem::Problem;
use uplink_protocol::sign::{PrivateKey, PublicKey, RequestToSign};
use uplink_protocol::telemetry::Status;
use uplink_protocol::topics::{self, Channel};
use uuid::Uuid;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .try_init();
}

pub const TOKEN: &str = "test-bridge-token";
pub const DEVICE: &str = "robot-17";
pub const DEVICE_PASSWORD: &str = "good-pass";
pub const WAIT: Duration = Duration::from_secs(10);
/// Devices `FLEET_PREFIX0`, `FLEET_PREFIX1`, … are known too (with `DEVICE_PASSWORD`).
pub const FLEET_PREFIX: &str = "fleet-";

// ---------- mock control API ----------

#[derive(Debug, Clone)]
pub struct DeviceCall {
    pub op: String,
    pub headers: HeaderMap,
    pub body: String,
}

#[derive(Default)]
pub struct Mock {
    pub auth_calls: Vec<(String, String)>,
    pub device_calls: Vec<DeviceCall>,
    pub presence: Vec<(String, Status)>,
    pub due: Vec<serde_json::Value>,
    pub published: Vec<Uuid>,
    /// Claims of due commands (`POST /v1/bridge/commands/claim`) so far.
    pub due_polls: usize,
    /// The `bridge` each claim named.
    pub claimants: Vec<String>,
    pub bad_bearer: usize,
}

#[derive(Clone)]
pub struct MockState {
    mock: Arc<Mutex<Mock>>,
    device_key: PublicKey,
}

pub fn bearer_ok(state: &MockState, headers: &HeaderMap) -> bool {
    let ok = headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if !ok {
        state.mock.lock().unwrap().bad_bearer += 1;
    }
    ok
}

pub async fn mqtt_auth(
    State(state): State<MockState>,
    headers: HeaderMap,
    Json(req): Json<serde_json::Value>,
) -> Response {
    if !bearer_ok(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let field = |k: &str| req[k].as_str().unwrap_or_default().to_string();
    let (client_id, username, password) =
        (field("client_id"), field("username"), field("password"));
    state
        .mock
        .lock()
        .unwrap()
        .auth_calls
        .push((client_id.clone(), username.clone()));
    // The device, and the fleet of `FLEET_PREFIX…` devices some tests connect.
    let known = client_id == DEVICE || client_id.starts_with(FLEET_PREFIX);
    let allow = known && username == client_id && password == DEVICE_PASSWORD;
    Json(serde_json::json!({ "allow": allow })).into_response()
}

pub async fn device_op(
    State(state): State<MockState>,
    Path(op): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    state.mock.lock().unwrap().device_calls.push(DeviceCall {
        op: op.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let signed = RequestToSign {
        device_id: h("x-uplink-device"),
        op: &op,
        request_id: h("idempotency-key"),
        ts: h("x-uplink-timestamp").parse().unwrap_or(0),
        body: &body,
    };
    if signed
        .verify(&state.device_key, h("x-uplink-signature"))
        .is_err()
    {
        let p = Problem::new(401, "bad_signature", "Bad signature", None);
        return problem(p);
    }
    match op.as_str() {
        "session.abort" => problem(Problem::new(
            409,
            "conflict",
            "Conflict",
            Some("session is completed".into()),
        )),
        _ => (
            StatusCode::OK,
            Json(serde_json::json!({ "op": op, "echo": body })),
        )
            .into_response(),
    }
}

pub fn problem(p: Problem) -> Response {
    (
        StatusCode::from_u16(p.status).unwrap(),
        [("content-type", "application/problem+json")],
        serde_json::to_string(&p).unwrap(),
    )
        .into_response()
}

pub async fn presence(
    State(state): State<MockState>,
    Path(device): Path<String>,
    headers: HeaderMap,
    Json(status): Json<Status>,
) -> StatusCode {
    if !bearer_ok(&state, &headers) {
        return StatusCode::UNAUTHORIZED;
    }
    state.mock.lock().unwrap().presence.push((device, status));
    StatusCode::NO_CONTENT
}

/// Answers at once (a long-poll that never waits) with every command not yet published.
pub async fn claim(
    State(state): State<MockState>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    if !bearer_ok(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut m = state.mock.lock().unwrap();
    m.due_polls += 1;
    m.claimants
        .push(body["bridge"].as_str().unwrap_or_default().to_string());
    Json(serde_json::Value::Array(m.due.clone())).into_response()
}

pub async fn published(
    State(state): State<MockState>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> StatusCode {
    if !bearer_ok(&state, &headers) {
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(ids) = serde_json::from_value::<Vec<Uuid>>(body["command_ids"].clone()) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut m = state.mock.lock().unwrap();
    for id in ids {
        m.published.push(id);
        m.due.retain(|d| d["command_id"] != serde_json::json!(id));
    }
    StatusCode::NO_CONTENT
}

pub async fn start_mock(device_key: PublicKey) -> (SocketAddr, Arc<Mutex<Mock>>) {
    let (addr, mock, _stop) = start_stoppable_mock(device_key).await;
    (addr, mock)
}

/// Like [`start_mock`]; cancelling the token stops the mock (idle connections close).
pub async fn start_stoppable_mock(
    device_key: PublicKey,
) -> (SocketAddr, Arc<Mutex<Mock>>, CancellationToken) {
    let mock = Arc::new(Mutex::new(Mock::default()));
    let state = MockState {
        mock: mock.clone(),
        device_key,
    };
    let app = Router::new()
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/v1/bridge/mqtt-auth", post(mqtt_auth))
        .route("/v1/device/{op}", post(device_op))
        .route("/v1/bridge/devices/{device}/presence", put(presence))
        .route("/v1/bridge/commands/claim", post(claim))
        .route("/v1/bridge/commands/published", post(published))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let stopped = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
            .unwrap()
    });
    (addr, mock, stop)
}

// ---------- device side ----------

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn device_options(port: u16, client_id: &str, username: &str, password: &str) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_credentials(username, password);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    o
}

/// Connects; `Ok` with the client and its incoming publishes once the broker acks,
/// `Err` with the connection error otherwise.
pub async fn connect(
    port: u16,
    client_id: &str,
    username: &str,
    password: &str,
) -> Result<(AsyncClient, mpsc::UnboundedReceiver<Publish>), String> {
    connect_with(device_options(port, client_id, username, password)).await
}

/// [`connect`] with the given options.
pub async fn connect_with(
    options: MqttOptions,
) -> Result<(AsyncClient, mpsc::UnboundedReceiver<Publish>), String> {
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Err(_) => return Err("no answer from the broker".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Ok((client, rx))
}

pub async fn connect_when_up(port: u16) -> (AsyncClient, mpsc::UnboundedReceiver<Publish>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match connect(port, DEVICE, DEVICE, DEVICE_PASSWORD).await {
            Ok(c) => return c,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("device could not connect to the embedded broker: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Next publish on `topic`, failing the test after [`WAIT`].
pub async fn next_on(rx: &mut mpsc::UnboundedReceiver<Publish>, topic: &str) -> Publish {
    tokio::time::timeout(WAIT, async {
        loop {
            let p = rx.recv().await.expect("device event loop ended");
            if p.topic == topic {
                return p;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("nothing arrived on {topic}"))
}

pub async fn next_response(rx: &mut mpsc::UnboundedReceiver<Publish>) -> ResponseEnvelope {
    let p = next_on(rx, &topics::topic(DEVICE, Channel::Res)).await;
    serde_json::from_slice(&p.payload).unwrap()
}

pub async fn wait_until(what: &str, mock: &Arc<Mutex<Mock>>, cond: impl Fn(&Mock) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond(&mock.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn request(key: &PrivateKey, op: &str, request_id: &str, body: &str) -> RequestEnvelope {
    RequestEnvelope::sign(
        key,
        DEVICE,
        op,
        request_id,
        uplink_protocol::unix_now(),
        body.to_string(),
    )
}

pub async fn send_req(client: &AsyncClient, payload: Vec<u8>) {
    client
        .publish(
            topics::topic(DEVICE, Channel::Req),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();
}

/// Sends `env` on `req` until its answer arrives, re-sending with the same request id like
/// the agent does (the first request may beat the bridge's own subscription).
pub async fn ask_until_answered(
    client: &AsyncClient,
    rx: &mut mpsc::UnboundedReceiver<Publish>,
    env: &RequestEnvelope,
) -> ResponseEnvelope {
    let res_topic = topics::topic(DEVICE, Channel::Res);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        send_req(client, serde_json::to_vec(env).unwrap()).await;
        let answer = tokio::time::timeout(Duration::from_millis(1000), async {
            loop {
                let p = rx.recv().await.expect("device event loop ended");
                if p.topic == res_topic {
                    let r: ResponseEnvelope = serde_json::from_slice(&p.payload).unwrap();
                    if r.request_id == env.request_id {
                        return r;
                    }
                }
            }
        })
        .await;
        match answer {
            Ok(r) => return r,
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "no answer to {}",
                env.request_id
            ),
        }
    }
}

/// An MQTT CONNECT packet (clean session, user name = client id, a password).
pub fn connect_packet(level: u8, keep_alive: u16, client_id: &str, password: &str) -> Vec<u8> {
    let string = |s: &str| {
        let mut b = (s.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    };
    let mut rest = string("MQTT");
    rest.extend([level, 0xC2]);
    rest.extend(keep_alive.to_be_bytes());
    if level == 5 {
        rest.push(0); // no properties
    }
    for field in [client_id, client_id, password] {
        rest.extend(string(field));
    }
    assert!(rest.len() < 128);
    let mut packet = vec![0x10, rest.len() as u8];
    packet.extend(rest);
    packet
}

/// A bridge with its embedded broker listening on 127.0.0.1:`port`, against the mock API
/// at `api_addr`; its command pump waits long, so only start-up, connections and presence
/// wake it.
pub fn embedded_config(api_addr: SocketAddr, port: u16) -> uplink_bridge::config::Config {
    use uplink_bridge::config::{BrokerConfig, BrokerMode, Config, Secret};
    Config {
        api_url: format!("http://{api_addr}"),
        api_token: Secret::new(TOKEN),
        api_ca_file: None,
        poll_interval_ms: 60_000,
        http_listen: None,
        broker: BrokerConfig {
            mode: BrokerMode::Embedded,
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            ..BrokerConfig::default()
        },
    }
}

/// Cancels `shutdown` and waits (at most 15 s) for `bridge` to stop without an error.
pub async fn stop_bridge(
    shutdown: CancellationToken,
    bridge: tokio::task::JoinHandle<Result<(), uplink_bridge::BridgeError>>,
) {
    shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(15), bridge)
        .await
        .expect("bridge did not stop after shutdown")
        .unwrap();
    assert!(ended.is_ok(), "{ended:?}");
}
