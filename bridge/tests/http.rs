//! The `http_listen` server: health, readiness and metrics of a bridge with its embedded
//! broker, against the mock control API.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio_util::sync::CancellationToken;
use uplink_bridge::config::{BrokerConfig, BrokerMode, Config, Secret};
use uplink_protocol::sign;

/// `GET http://{addr}{path}`: status and body, or why there is no answer.
async fn try_get(
    http: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String), reqwest::Error> {
    let res = http.get(format!("http://{addr}{path}")).send().await?;
    Ok((res.status().as_u16(), res.text().await?))
}

async fn get(http: &reqwest::Client, addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(http, addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Polls `path` until it answers `status`, failing the test after [`WAIT`].
async fn until_status(http: &reqwest::Client, addr: SocketAddr, path: &str, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // The bridge binds its port shortly after start: no answer yet is not a failure.
        let got = try_get(http, addr, path).await;
        if let Ok((got, body)) = &got {
            if *got == status {
                return body.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: {got:?}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the sample `name` (with labels) in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    init_tracing();
    let device_key = sign::generate();
    let (api_addr, mock, stop_mock) = start_stoppable_mock(device_key.verifying_key()).await;
    let port = free_port();
    let http_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = Config {
        api_url: format!("http://{api_addr}"),
        api_token: Secret::new(TOKEN),
        api_ca_file: None,
        poll_interval_ms: 60_000,
        http_listen: Some(http_addr),
        broker: BrokerConfig {
            mode: BrokerMode::Embedded,
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            ..BrokerConfig::default()
        },
    };
    config.validate().unwrap();
    let shutdown = CancellationToken::new();
    let bridge = tokio::spawn(uplink_bridge::run(config, shutdown.clone()));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    // Liveness needs nothing else; readiness needs the broker connection and the API.
    let body = until_status(&http, http_addr, "/healthz", 200).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"status": "ok"})
    );
    until_status(&http, http_addr, "/readyz", 200).await;
    let (_, text) = get(&http, http_addr, "/metrics").await;
    assert_eq!(sample(&text, "uplink_bridge_mqtt_connected"), 1.0);

    // A forwarded request, a refused one and a malformed payload.
    let (device, mut inbox) = connect_when_up(port).await;
    device
        .subscribe(
            uplink_protocol::topics::topic(DEVICE, uplink_protocol::topics::Channel::Res),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let env = request(&device_key, "session.status", "req-1", "{}");
    let res = ask_until_answered(&device, &mut inbox, &env).await;
    assert_eq!(res.status, 200, "{res:?}");
    let env = request(&device_key, "session.abort", "req-2", "{}");
    send_req(&device, serde_json::to_vec(&env).unwrap()).await;
    assert_eq!(next_response(&mut inbox).await.status, 409);
    send_req(
        &device,
        br#"{"v":1,"request_id":"bad-1","op":"session.status"}"#.to_vec(),
    )
    .await;
    assert_eq!(next_response(&mut inbox).await.status, 400);

    // `req-1` may have been sent more than once; every copy the bridge saw reached the API.
    let (calls, refused) = {
        let m = mock.lock().unwrap();
        let refused = m
            .device_calls
            .iter()
            .filter(|c| c.op == "session.abort")
            .count();
        (m.device_calls.len(), refused)
    };
    assert_eq!(refused, 1);
    let ok = (calls - refused) as f64;
    let (status, text) = get(&http, http_addr, "/metrics").await;
    assert_eq!(status, 200);
    for (name, want) in [
        ("uplink_bridge_mqtt_connected", 1.0),
        (
            "uplink_bridge_messages_total{channel=\"req\"}",
            calls as f64 + 1.0,
        ),
        ("uplink_bridge_messages_total{channel=\"cmd_ack\"}", 0.0),
        ("uplink_bridge_messages_total{channel=\"progress\"}", 0.0),
        ("uplink_bridge_messages_total{channel=\"status\"}", 0.0),
        ("uplink_bridge_requests_forwarded_total{outcome=\"ok\"}", ok),
        (
            "uplink_bridge_requests_forwarded_total{outcome=\"refused\"}",
            1.0,
        ),
        (
            "uplink_bridge_requests_forwarded_total{outcome=\"failed\"}",
            0.0,
        ),
        ("uplink_bridge_problems_published_total", 1.0),
        ("uplink_bridge_commands_published_total", 0.0),
        ("uplink_bridge_api_latency_seconds_count", ok + 1.0),
        ("uplink_bridge_dropped_total", 0.0),
    ] {
        assert_eq!(sample(&text, name), want, "{name} in\n{text}");
    }
    assert!(sample(&text, "uplink_bridge_api_latency_seconds_sum") > 0.0);

    // With the API gone, a request fails (answered 503) and the bridge is not ready.
    stop_mock.cancel();
    let deadline = tokio::time::Instant::now() + WAIT;
    for n in 0.. {
        let id = format!("down-{n}");
        let env = request(&device_key, "session.status", &id, "{}");
        send_req(&device, serde_json::to_vec(&env).unwrap()).await;
        let res = next_response(&mut inbox).await;
        if res.status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API never went away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = get(&http, http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["down"], serde_json::json!(["control_api"]), "{body}");
    let (_, text) = get(&http, http_addr, "/metrics").await;
    assert!(
        sample(
            &text,
            "uplink_bridge_requests_forwarded_total{outcome=\"failed\"}"
        ) >= 1.0
    );

    // The HTTP server stops with the bridge.
    stop_bridge(shutdown, bridge).await;
    assert!(
        tokio::net::TcpStream::connect(http_addr).await.is_err(),
        "the HTTP server still accepts connections after shutdown"
    );
}
