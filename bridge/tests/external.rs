//! The bridge against an external broker (Mosquitto) with shared subscriptions, a mock
//! control API and a rumqttc client acting as a device. Needs `mosquitto` installed
//! (`apt-get install mosquitto`); fails, never skips, without it.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;
use uplink_bridge::config::{BrokerConfig, BrokerMode, Config, Secret};
use uplink_protocol::sign;
use uplink_protocol::telemetry::{Presence, Status};
use uplink_protocol::topics::{self, Channel};

/// Mosquitto on a free port, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Mosquitto {
    fn start() -> Mosquitto {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("uplink-bridge-mosquitto-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let binary = ["/usr/sbin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("-h")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect("mosquitto is not installed: `apt-get install mosquitto` to run this test");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Mosquitto { child, port, dir }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_with_external_broker_and_shared_subscriptions() {
    init_tracing();
    let mosquitto = Mosquitto::start();
    let device_key = sign::generate();
    let (api_addr, mock) = start_mock(device_key.verifying_key()).await;
    let config = Config {
        api_url: format!("http://{api_addr}"),
        api_token: Secret::new(TOKEN),
        api_ca_file: None,
        poll_interval_ms: 200,
        http_listen: None,
        broker: BrokerConfig {
            mode: BrokerMode::External,
            host: "127.0.0.1".into(),
            port: mosquitto.port,
            username: Some("uplink-bridge".into()),
            password: Some(Secret::new("unused-by-anonymous-mosquitto")),
            shared_subscriptions: true,
            ..BrokerConfig::default()
        },
    };
    config.validate().unwrap();
    let shutdown = CancellationToken::new();
    let bridge = tokio::spawn(uplink_bridge::run(config, shutdown.clone()));

    let (device, mut inbox) = connect_when_up(mosquitto.port).await;
    device
        .subscribe(topics::topic(DEVICE, Channel::Res), QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let env = request(&device_key, "session.status", "ext-1", "{}");
    let res = ask_until_answered(&device, &mut inbox, &env).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(
        mock.lock().unwrap().auth_calls.is_empty(),
        "external brokers do their own auth"
    );

    let online = Status {
        v: 1,
        state: Presence::Online,
        agent_version: None,
        queue_depth: None,
        free_disk_bytes: None,
        clock_offset_secs: None,
        ts_ms: Some(1_700_000_000_000),
        sig: None,
    }
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
    wait_until("periodic command polls", &mock, |m| m.due_polls >= 2).await;

    stop_bridge(shutdown, bridge).await;
}

/// On an external broker nothing limits what a device publishes to the broker's own limit
/// (Mosquitto's default is MQTT's 256 MB): a payload far over the bridge's 64 KiB is still
/// answered 413 on `res`, and neither it nor an oversized retained status knocks the
/// bridge off the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_do_not_disconnect_the_bridge() {
    init_tracing();
    let mosquitto = Mosquitto::start();
    let device_key = sign::generate();
    let (api_addr, _mock) = start_mock(device_key.verifying_key()).await;
    let config = Config {
        api_url: format!("http://{api_addr}"),
        api_token: Secret::new(TOKEN),
        api_ca_file: None,
        poll_interval_ms: 200,
        http_listen: None,
        broker: BrokerConfig {
            mode: BrokerMode::External,
            host: "127.0.0.1".into(),
            port: mosquitto.port,
            ..BrokerConfig::default()
        },
    };
    let shutdown = CancellationToken::new();
    let bridge = tokio::spawn(uplink_bridge::run(config, shutdown.clone()));

    let mut options = device_options(mosquitto.port, DEVICE, DEVICE, "unused");
    options.set_max_packet_size(4 << 20, 4 << 20);
    let deadline = tokio::time::Instant::now() + WAIT;
    let (device, mut inbox) = loop {
        match connect_with(options.clone()).await {
            Ok(c) => break c,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    device
        .subscribe(topics::topic(DEVICE, Channel::Res), QoS::AtLeastOnce)
        .await
        .unwrap();
    let env = request(&device_key, "session.status", "before", "{}");
    assert_eq!(
        ask_until_answered(&device, &mut inbox, &env).await.status,
        200
    );

    // A retained status the bridge would get again at every (re)subscription.
    device
        .publish(
            topics::topic(DEVICE, Channel::Status),
            QoS::AtLeastOnce,
            true,
            vec![b' '; 1 << 20],
        )
        .await
        .unwrap();
    let mut big = request(&device_key, "session.create", "big-ext", "{}");
    big.body = "x".repeat(1 << 20);
    send_req(&device, serde_json::to_vec(&big).unwrap()).await;
    let res = next_response(&mut inbox).await;
    assert_eq!((res.request_id.as_str(), res.status), ("big-ext", 413));
    assert_eq!(res.sig, None, "the bridge's own answers are unsigned");

    let env = request(&device_key, "session.status", "after", "{}");
    send_req(&device, serde_json::to_vec(&env).unwrap()).await;
    let res = next_response(&mut inbox).await;
    assert_eq!((res.request_id.as_str(), res.status), ("after", 200));

    stop_bridge(shutdown, bridge).await;
}
