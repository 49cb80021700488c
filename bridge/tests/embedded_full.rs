//! The embedded broker at its open-files limit. This test binary lowers its own
//! `RLIMIT_NOFILE` (soft and hard) before the bridge starts in it, so the bridge can hold
//! `(400 - 256) / 3 = 48` device connections. Past that the gate closes new connections at
//! once instead of running out of descriptors (where rumqttd spins on its accept loop and
//! floods the log); the connections it holds keep working, and a freed slot takes the
//! next device.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use rustix::process::{setrlimit, Resource, Rlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uplink_bridge::broker::device_connection_cap;
use uplink_protocol::sign;

const OPEN_FILES: u64 = 400;

/// Connects as `FLEET_PREFIX{n}`; the connection and its first 4 bytes back (a CONNACK),
/// or what came before the broker closed it.
async fn device(port: u16, n: usize) -> (TcpStream, Vec<u8>) {
    let id = format!("{FLEET_PREFIX}{n}");
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // The gate may close a refused connection before the CONNECT is written.
    let _ = stream
        .write_all(&connect_packet(4, 60, &id, DEVICE_PASSWORD))
        .await;
    let mut got = vec![0u8; 4];
    let mut filled = 0;
    let read = tokio::time::timeout(WAIT, async {
        while filled < 4 {
            match stream.read(&mut got[filled..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "device {n}: the broker neither answered nor closed"
    );
    got.truncate(filled);
    (stream, got)
}

const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_gate_refuses_new_devices_and_keeps_the_others() {
    init_tracing();
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(OPEN_FILES),
            maximum: Some(OPEN_FILES),
        },
    )
    .unwrap();
    let cap = device_connection_cap(Some(OPEN_FILES));
    assert_eq!(cap, 48);

    let device_key = sign::generate();
    let (api_addr, _mock) = start_mock(device_key.verifying_key()).await;
    let port = free_port();
    let config = embedded_config(api_addr, port);
    let shutdown = CancellationToken::new();
    let bridge = tokio::spawn(uplink_bridge::run(config, shutdown.clone()));
    // The first device (a rumqttc client) takes one slot, these the others.
    let _first = connect_when_up(port).await;
    let mut held = Vec::new();
    for n in 1..cap {
        let (stream, got) = device(port, n).await;
        assert_eq!(got, CONNACK, "device {n} of {cap}");
        held.push(stream);
    }
    // Full: the next devices are closed without a CONNACK, and the bridge keeps running.
    for n in cap..cap + 5 {
        let (_, got) = device(port, n).await;
        assert!(got.is_empty(), "device {n} past the cap got {got:02x?}");
    }
    assert!(!bridge.is_finished(), "the bridge stopped");

    // The held connections still work: a PINGREQ is answered.
    for (n, stream) in held.iter_mut().enumerate().take(3) {
        stream.write_all(&[0xC0, 0x00]).await.unwrap();
        let mut pong = [0u8; 2];
        tokio::time::timeout(WAIT, stream.read_exact(&mut pong))
            .await
            .unwrap_or_else(|_| panic!("device {n}: no PINGRESP"))
            .unwrap();
        assert_eq!(pong, [0xD0, 0x00], "device {n}");
    }

    // One leaves; its slot takes the next device.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (stream, got) = device(port, cap + 10).await;
        if got == CONNACK {
            held.push(stream);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a freed slot was not given to the next device"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stop_bridge(shutdown, bridge).await;
}
