//! The bridge with its embedded broker, against a mock control API (axum on port 0) and a
//! rumqttc client acting as a device.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;
use uplink_bridge::broker::PACKET_HEADROOM;
use uplink_bridge::config::{BrokerConfig, BrokerMode, Config, Secret};
use uplink_protocol::command::{Action, Command};
use uplink_protocol::envelope::{CommandEnvelope, MAX_PAYLOAD_BYTES};
use uplink_protocol::sign;
use uplink_protocol::telemetry::{Presence, Status};
use uplink_protocol::topics::{self, Channel};
use uuid::Uuid;

// ---------- the test ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_with_embedded_broker() {
    init_tracing();
    let device_key = sign::generate();
    let (api_addr, mock) = start_mock(device_key.verifying_key()).await;
    let port = free_port();
    let config = Config {
        api_url: format!("http://{api_addr}/"),
        api_token: Secret::new(TOKEN),
        api_ca_file: None,
        // Long, so only start-up, connection and presence wake the pump.
        poll_interval_ms: 60_000,
        http_listen: None,
        broker: BrokerConfig {
            mode: BrokerMode::Embedded,
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            ..BrokerConfig::default()
        },
    };
    config.validate().unwrap();
    let shutdown = CancellationToken::new();
    let bridge = tokio::spawn(uplink_bridge::run(config, shutdown.clone()));

    // (1) good credentials are accepted; bad ones are refused.
    let (device, mut inbox) = connect_when_up(port).await;
    let refused = connect(port, DEVICE, DEVICE, "wrong-pass").await;
    assert!(refused.is_err(), "a wrong device password was accepted");
    let refused = connect(port, "robot-18", "robot-18", DEVICE_PASSWORD).await;
    assert!(refused.is_err(), "an unknown device was accepted");
    let refused = connect(port, "intruder", "uplink-bridge", "guess").await;
    assert!(refused.is_err(), "a guessed bridge password was accepted");
    {
        let m = mock.lock().unwrap();
        assert!(m.auth_calls.contains(&(DEVICE.into(), DEVICE.into())));
        assert!(m
            .auth_calls
            .contains(&("robot-18".into(), "robot-18".into())));
        assert!(
            !m.auth_calls.iter().any(|(_, u)| u == "uplink-bridge"),
            "the bridge's own user must be checked locally"
        );
    }
    for ch in [Channel::Res, Channel::Cmd] {
        device
            .subscribe(topics::topic(DEVICE, ch), QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    // Let the subscriptions land before anything is published to the device.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // (2) a signed request reaches the API with the right headers and body; the answer
    // arrives on `res`.
    let body = format!("{{\"session_id\":\"{}\"}}", Uuid::new_v4());
    let env = request(&device_key, "session.status", "req-1", &body);
    let res = ask_until_answered(&device, &mut inbox, &env).await;
    assert_eq!(res.request_id, "req-1");
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        res.result,
        Some(serde_json::json!({"op": "session.status", "echo": body}))
    );
    {
        let m = mock.lock().unwrap();
        let call = m.device_calls.last().unwrap();
        let h = |k: &str| call.headers.get(k).unwrap().to_str().unwrap().to_string();
        assert_eq!(call.op, "session.status");
        assert_eq!(call.body, body, "body must be forwarded verbatim");
        assert_eq!(h("x-uplink-device"), DEVICE);
        assert_eq!(h("idempotency-key"), "req-1");
        assert_eq!(h("x-uplink-timestamp"), env.ts.to_string());
        assert_eq!(h("x-uplink-signature"), env.sig);
        assert_eq!(h("content-type"), "application/json");
        assert_eq!(h("x-request-id"), format!("{DEVICE}:req-1"));
    }

    // An API problem document is passed through.
    let env = request(&device_key, "session.abort", "req-2", &body);
    send_req(&device, serde_json::to_vec(&env).unwrap()).await;
    let res = next_response(&mut inbox).await;
    assert_eq!((res.request_id.as_str(), res.status), ("req-2", 409));
    assert_eq!(res.problem.unwrap().code, "conflict");

    // (3) malformed payloads get a 400 problem (unknown ops a 404) and the bridge keeps
    // working, also after a payload that cannot be answered at all.
    send_req(
        &device,
        br#"{"v":1,"request_id":"bad-1","op":"session.status"}"#.to_vec(),
    )
    .await;
    let res = next_response(&mut inbox).await;
    assert_eq!((res.request_id.as_str(), res.status), ("bad-1", 400));
    assert_eq!(res.problem.unwrap().code, "malformed_request");

    send_req(&device, b"\xff not json at all".to_vec()).await;
    let env = request(&device_key, "session.delete", "bad-2", "{}");
    send_req(&device, serde_json::to_vec(&env).unwrap()).await;
    let res = next_response(&mut inbox).await;
    assert_eq!((res.request_id.as_str(), res.status), ("bad-2", 404));
    assert_eq!(res.problem.unwrap().code, "unknown_op");

    let mut big = request(&device_key, "session.create", "big-1", "{}");
    big.body = "x".repeat(uplink_protocol::envelope::MAX_PAYLOAD_BYTES);
    send_req(&device, serde_json::to_vec(&big).unwrap()).await;
    let res = next_response(&mut inbox).await;
    assert_eq!((res.request_id.as_str(), res.status), ("big-1", 413));
    assert_eq!(res.problem.unwrap().code, "payload_too_large");

    let env = request(&device_key, "session.status", "req-3", &body);
    send_req(&device, serde_json::to_vec(&env).unwrap()).await;
    let res = next_response(&mut inbox).await;
    assert_eq!((res.request_id.as_str(), res.status), ("req-3", 200));

    // cmd/ack is forwarded and nothing is published back.
    let ack = request(&device_key, "command.ack", "ack-1", "{}");
    device
        .publish(
            topics::topic(DEVICE, Channel::CmdAck),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&ack).unwrap(),
        )
        .await
        .unwrap();
    wait_until("the ack to reach the API", &mock, |m| {
        m.device_calls.iter().any(|c| c.op == "command.ack")
    })
    .await;

    // (4) + (5) a retained `status` online reaches the presence endpoint and wakes the pump,
    // which publishes the due command on `cmd` and marks it published.
    let command_key = sign::generate();
    let command = Command {
        command_id: Uuid::new_v4(),
        device_id: DEVICE.into(),
        issued_at: uplink_protocol::unix_now(),
        expires_at: uplink_protocol::unix_now() + 3600,
        action: Action::Upload {
            path: "/data/rec/run-042.mcap".into(),
            priority: None,
        },
    };
    let envelope = CommandEnvelope::sign(&command_key, &command);
    mock.lock().unwrap().due.push(serde_json::json!({
        "command_id": command.command_id,
        "device_id": DEVICE,
        "envelope": envelope,
    }));
    let online = Status {
        v: 1,
        state: Presence::Online,
        agent_version: Some("0.1.0".into()),
        queue_depth: Some(2),
        free_disk_bytes: None,
        clock_offset_secs: None,
        ts_ms: Some(1_700_000_000_000),
        sig: None,
    }
    // The bridge passes the device's signature on untouched; the API checks it.
    .signed(&sign::generate(), DEVICE);
    device
        .publish(
            topics::topic(DEVICE, Channel::Status),
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&online).unwrap(),
        )
        .await
        .unwrap();
    wait_until("the presence update", &mock, |m| {
        m.presence.iter().any(|(d, s)| d == DEVICE && *s == online)
    })
    .await;
    let cmd = next_on(&mut inbox, &topics::topic(DEVICE, Channel::Cmd)).await;
    let got: CommandEnvelope = serde_json::from_slice(&cmd.payload).unwrap();
    assert_eq!(got, envelope);
    assert_eq!(
        got.open(
            &command_key.verifying_key(),
            DEVICE,
            uplink_protocol::unix_now()
        ),
        Ok(command.clone())
    );
    wait_until("the command to be marked published", &mock, |m| {
        m.published == vec![command.command_id] && m.due.is_empty()
    })
    .await;
    // Every claim names this bridge (its broker client id), the holder of the lease.
    let claimants = mock.lock().unwrap().claimants.clone();
    assert!(!claimants.is_empty());
    assert!(
        claimants
            .iter()
            .all(|c| *c == BrokerConfig::default().client_id),
        "{claimants:?}"
    );

    assert_eq!(
        mock.lock().unwrap().bad_bearer,
        0,
        "bridge calls must carry the token"
    );

    // Clean shutdown.
    stop_bridge(shutdown, bridge).await;
}

/// The embedded broker takes a PUBLISH whose remaining length (topic, packet id and
/// payload) is at most 64 KiB + [`PACKET_HEADROOM`]: up to there an oversized request is
/// answered 413 (unsigned), one byte more and the broker closes the publisher's
/// connection without an answer. docs/protocol.md states these numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_payload_limits() {
    init_tracing();
    let device_key = sign::generate();
    let (api_addr, _mock) = start_mock(device_key.verifying_key()).await;
    let port = free_port();
    let config = embedded_config(api_addr, port);
    let shutdown = CancellationToken::new();
    let bridge = tokio::spawn(uplink_bridge::run(config, shutdown.clone()));

    let req_topic = topics::topic(DEVICE, Channel::Req);
    let largest_packet = MAX_PAYLOAD_BYTES + PACKET_HEADROOM;
    assert_eq!(largest_packet, 81_920);
    // QoS 1 PUBLISH: 2-byte topic length, topic, 2-byte packet id, payload.
    let largest_payload = largest_packet - 4 - req_topic.len();
    let sized = |request_id: &str, len: usize| {
        let mut env = request(&device_key, "session.create", request_id, "");
        let base = serde_json::to_vec(&env).unwrap().len();
        env.body = "x".repeat(len - base);
        let payload = serde_json::to_vec(&env).unwrap();
        assert_eq!(payload.len(), len);
        payload
    };

    let (device, mut inbox) = connect_when_up(port).await;
    device
        .subscribe(topics::topic(DEVICE, Channel::Res), QoS::AtLeastOnce)
        .await
        .unwrap();
    let env = request(&device_key, "session.status", "up", "{}");
    assert_eq!(
        ask_until_answered(&device, &mut inbox, &env).await.status,
        200
    );
    send_req(&device, sized("at-limit", largest_payload)).await;
    let res = next_response(&mut inbox).await;
    assert_eq!((res.request_id.as_str(), res.status), ("at-limit", 413));
    assert_eq!(res.problem.unwrap().code, "payload_too_large");
    assert_eq!(res.sig, None);
    drop((device, inbox));

    // One byte more: the broker closes the connection, nothing is answered.
    let (client, mut eventloop) =
        rumqttc::AsyncClient::new(device_options(port, DEVICE, DEVICE, DEVICE_PASSWORD), 8);
    let res_topic = topics::topic(DEVICE, Channel::Res);
    let mut subscribed = false;
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    client
                        .subscribe(res_topic.clone(), QoS::AtLeastOnce)
                        .await
                        .unwrap();
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) if !subscribed => {
                    subscribed = true;
                    client
                        .publish(
                            req_topic.clone(),
                            QoS::AtLeastOnce,
                            false,
                            sized("over-limit", largest_payload + 1),
                        )
                        .await
                        .unwrap();
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    panic!("answered on {}: {:?}", p.topic, p.payload)
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
    })
    .await
    .expect("the broker kept the connection open");
    assert!(subscribed, "{closed}");
    assert!(closed.contains("by peer"), "{closed}");
    drop((client, eventloop));

    // The bridge is unaffected.
    let (device, mut inbox) = connect_when_up(port).await;
    device
        .subscribe(topics::topic(DEVICE, Channel::Res), QoS::AtLeastOnce)
        .await
        .unwrap();
    let env = request(&device_key, "session.status", "still-up", "{}");
    assert_eq!(
        ask_until_answered(&device, &mut inbox, &env).await.status,
        200
    );

    stop_bridge(shutdown, bridge).await;
}

/// A raw MQTT CONNECT: protocol `level` (4 = 3.1.1, 5 = MQTT 5), clean session, username
/// and password.
/// Everything the broker sends after `packet` until it closes the connection.
async fn broker_answer(port: u16, packet: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(packet).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.len() >= 4 {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the broker neither answered nor closed");
    got
}

/// What docs/protocol.md says a device sees: the embedded broker answers a CONNECT it
/// refuses (bad password, keep-alive 0, not MQTT 3.1.1) by closing the connection without a
/// CONNACK; an accepted one gets CONNACK 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_refuses_without_connack() {
    init_tracing();
    let device_key = sign::generate();
    let (api_addr, _mock) = start_mock(device_key.verifying_key()).await;
    let port = free_port();
    let config = embedded_config(api_addr, port);
    let shutdown = CancellationToken::new();
    let bridge = tokio::spawn(uplink_bridge::run(config, shutdown.clone()));
    drop(connect_when_up(port).await);

    let accepted = broker_answer(port, &connect_packet(4, 30, DEVICE, DEVICE_PASSWORD)).await;
    assert_eq!(accepted, [0x20, 0x02, 0x00, 0x00], "CONNACK, accepted");
    for (what, packet) in [
        ("bad password", connect_packet(4, 30, DEVICE, "wrong-pass")),
        (
            "keep-alive 0",
            connect_packet(4, 0, DEVICE, DEVICE_PASSWORD),
        ),
        ("MQTT 5", connect_packet(5, 30, DEVICE, DEVICE_PASSWORD)),
    ] {
        let got = broker_answer(port, &packet).await;
        assert!(got.is_empty(), "{what}: the broker sent {got:02x?}");
    }

    stop_bridge(shutdown, bridge).await;
}
