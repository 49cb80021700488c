//! The connection: MQTT options (credentials, TLS, Last Will) and the event loop that
//! polls the broker, subscribes, hands commands and answers on, reconnects with backoff
//! and says goodbye at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, Request, Subscribe,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uplink_protocol::envelope::{ResponseEnvelope, MAX_PAYLOAD_BYTES};
use uplink_protocol::sign;
use uplink_protocol::telemetry::Presence;
use uplink_protocol::topics::{self, Channel};
use uplink_protocol::unix_now;

use super::status::{last_will, status_payload, Report};
use super::*;

fn credentials(settings: &LinkSettings) -> (String, String) {
    let user = settings
        .username
        .clone()
        .unwrap_or_else(|| settings.device_id.clone());
    let password = match &settings.password {
        Some(p) => p.expose().to_string(),
        None => sign::mqtt_password(&settings.key, &settings.device_id, unix_now()),
    };
    (user, password)
}

/// Connection options: client id = device id, Last Will = retained `offline` status of a
/// connection that begins at `conn_ms`.
pub fn mqtt_options(settings: &LinkSettings, conn_ms: i64) -> MqttOptions {
    let mut opts = MqttOptions::new(
        settings.device_id.clone(),
        settings.host.clone(),
        settings.port,
    );
    opts.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
        .set_last_will(last_will(settings, conn_ms));
    let (user, password) = credentials(settings);
    opts.set_credentials(user, password);
    if let Some(files) = &settings.tls {
        opts.set_transport(tls_transport(files));
    }
    opts
}

/// The TLS transport of `files`; when they are unusable, one that fails every handshake
/// (never plain TCP), so the agent connects again once they are fixed.
fn tls_transport(files: &uplink_service::tls::ClientFiles) -> rumqttc::Transport {
    crate::tls::transport(files).unwrap_or_else(|e| {
        error!(error = %e, "MQTT TLS settings unusable; not connecting until they are fixed");
        rumqttc::Transport::tls(Vec::new(), None, None)
    })
}

/// Logs a failed connection attempt; a TLS handshake failure says why in plain words, as
/// an error (an operator must act: certificates, CA, names).
fn log_connection_error(e: &rumqttc::ConnectionError, settings: &LinkSettings, delay: Duration) {
    match uplink_service::tls::explain(e) {
        Some(why) => error!(
            host = %settings.host,
            port = settings.port,
            error = %e,
            retry_in_s = delay.as_secs(),
            "MQTT TLS handshake failed: {why}"
        ),
        None => {
            warn!(error = %e, retry_in_s = delay.as_secs(), "MQTT connection failed; reconnecting")
        }
    }
}

impl Link {
    /// Starts the event loop task. It runs until `shutdown` fires.
    pub fn start(settings: LinkSettings, shutdown: CancellationToken) -> LinkParts {
        let conn_ms = now_ms();
        let (client, mut eventloop) =
            AsyncClient::new(mqtt_options(&settings, conn_ms), CHANNEL_CAPACITY);
        // Requests and acks are small packets: without this, Nagle's algorithm holds one
        // back until the broker's delayed ACK of the previous (up to 40 ms a round trip).
        eventloop.network_options.set_tcp_nodelay(true);
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (conn_tx, conn_rx) = watch::channel(0u64);
        let link = Arc::new(Link {
            client,
            device_id: settings.device_id.clone(),
            key: settings.key.clone(),
            command_key: settings.command_key.clone(),
            policy: settings.policy,
            pending: Arc::new(Mutex::new(HashMap::new())),
            queue_depth: Arc::new(AtomicU32::new(0)),
            free_disk: AtomicU64::new(NO_FREE_DISK),
            conn_ms: AtomicI64::new(conn_ms),
            shutdown: shutdown.clone(),
        });
        let task = tokio::spawn(event_loop(
            eventloop,
            settings,
            link.clone(),
            cmd_tx,
            conn_tx,
            shutdown,
        ));
        LinkParts {
            link,
            commands: cmd_rx,
            connected: conn_rx,
            task,
        }
    }
}

/// What an incoming publish is, for the agent.
#[derive(Debug, PartialEq)]
enum Incoming {
    Command,
    Response(ResponseEnvelope),
    Ignored(&'static str),
}

fn classify(device_id: &str, publish: &Publish) -> Incoming {
    if publish.payload.len() > MAX_PAYLOAD_BYTES {
        return Incoming::Ignored("payload too large");
    }
    match topics::parse(&publish.topic) {
        Some((dev, Channel::Cmd)) if dev == device_id => Incoming::Command,
        Some((dev, Channel::Res)) if dev == device_id => {
            match serde_json::from_slice::<ResponseEnvelope>(&publish.payload) {
                Ok(r) => Incoming::Response(r),
                Err(_) => Incoming::Ignored("malformed response"),
            }
        }
        _ => Incoming::Ignored("unexpected topic"),
    }
}

async fn event_loop(
    mut eventloop: EventLoop,
    settings: LinkSettings,
    link: Arc<Link>,
    commands: mpsc::Sender<bytes::Bytes>,
    connected: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let mut delay = RECONNECT_MIN;
    let mut failures = 0u32;
    let device = settings.device_id.clone();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(host = %settings.host, port = settings.port, tls = settings.tls.is_some(), code = ?ack.code, "Connected to broker");
                delay = RECONNECT_MIN;
                failures = 0;
                crate::metrics::set_mqtt_connected(true);
                // Subscribe and announce presence before anything else queued.
                let mut status = Publish::new(
                    topics::topic(&device, Channel::Status),
                    QoS::AtLeastOnce,
                    // The same time as this connection's Last Will, so the API takes
                    // the will (offline) as newer than this.
                    status_payload(
                        &link.key,
                        &device,
                        Presence::Online,
                        link.report(),
                        link.conn_ms.load(Ordering::Relaxed),
                    ),
                );
                status.retain = true;
                eventloop.pending.push_front(Request::Publish(status));
                eventloop
                    .pending
                    .push_front(Request::Subscribe(Subscribe::new_many([
                        rumqttc::SubscribeFilter::new(
                            topics::topic(&device, Channel::Cmd),
                            QoS::AtLeastOnce,
                        ),
                        rumqttc::SubscribeFilter::new(
                            topics::topic(&device, Channel::Res),
                            QoS::AtLeastOnce,
                        ),
                    ])));
                connected.send_modify(|n| *n += 1);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match classify(&device, &p) {
                Incoming::Command => {
                    if commands.try_send(p.payload).is_err() {
                        warn!("Command queue full; command dropped (the cloud re-sends it)");
                    }
                }
                Incoming::Response(r) => link.deliver(r),
                Incoming::Ignored(why) => {
                    debug!(topic = %p.topic, why, "Message ignored")
                }
            },
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                debug!(codes = ?ack.return_codes, "Subscribed");
            }
            Ok(_) => {}
            Err(e) => {
                crate::metrics::set_mqtt_connected(false);
                failures += 1;
                log_connection_error(&e, &settings, delay);
                if let Some(hint) = reconnect_hint(failures, crate::clock::offset()) {
                    warn!("{hint}");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RECONNECT_MAX);
                // The derived password carries a timestamp: make a fresh one for each attempt.
                let (user, password) = credentials(&settings);
                eventloop.mqtt_options.set_credentials(user, password);
                // And a Last Will of the new connection.
                let conn_ms = now_ms();
                link.conn_ms.store(conn_ms, Ordering::Relaxed);
                eventloop
                    .mqtt_options
                    .set_last_will(last_will(&settings, conn_ms));
                // Renewed certificates and CAs are taken at the next connection.
                if let Some(files) = settings.tls.clone() {
                    if let Ok(t) = tokio::task::spawn_blocking(move || tls_transport(&files)).await
                    {
                        eventloop.mqtt_options.set_transport(t);
                    }
                }
            }
        }
    }
    goodbye(&mut eventloop, &link, &device).await;
    crate::metrics::set_mqtt_connected(false);
}

/// What to add to the log after `failures` connection failures in a row: the embedded
/// broker refuses a password whose timestamp is beyond the replay window by closing the
/// connection, which looks like a network fault, so the clock is named as a likely cause.
fn reconnect_hint(failures: u32, offset: Option<i64>) -> Option<String> {
    match offset {
        Some(o) if o.abs() > 300 && failures % 3 == 1 => Some(format!(
            "MQTT connections fail and {}",
            crate::clock::describe(o, Some(300))
        )),
        None if failures % 10 == 3 => Some(
            "MQTT connections keep failing: if the broker is reachable, this device's clock may be more than the replay window (300 s by default) off the API's (the broker refuses such passwords by closing the connection); run `uplink-agent doctor` (with api_url set) to check the clock, and enable NTP".to_string(),
        ),
        _ => None,
    }
}

/// Publishes the retained `offline` status and disconnects cleanly (best effort, ≤ 2 s).
async fn goodbye(eventloop: &mut EventLoop, link: &Link, device: &str) {
    if eventloop.network.is_none() {
        return;
    }
    let _ = link.client.try_publish(
        topics::topic(device, Channel::Status),
        QoS::AtLeastOnce,
        true,
        status_payload(
            &link.key,
            device,
            Presence::Offline,
            Report::default(),
            now_ms(),
        ),
    );
    let _ = link.client.try_disconnect();
    let drain = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        debug!("Broker did not take the goodbye in time");
    }
    info!("Disconnected from broker");
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplink_protocol::telemetry::Status;

    #[test]
    fn options_carry_will_credentials_and_packet_limit() {
        let key = sign::generate();
        let settings = LinkSettings {
            device_id: "robot-17".into(),
            host: "127.0.0.1".into(),
            port: 1883,
            username: None,
            password: None,
            key: key.clone(),
            command_key: key.verifying_key().into(),
            policy: RetryPolicy::new(Duration::from_secs(10)),
            tls: None,
        };
        let opts = mqtt_options(&settings, 1_700_000_000_000);
        assert_eq!(opts.client_id(), "robot-17");
        assert!(opts.max_packet_size() >= MAX_PAYLOAD_BYTES + 1024);
        let will = opts.last_will().unwrap();
        assert_eq!(will.topic, "uplink/v1/devices/robot-17/status");
        assert!(will.retain);
        let status: Status = serde_json::from_slice(&will.message).unwrap();
        assert_eq!(status.state, Presence::Offline);
        assert_eq!(status.ts_ms, Some(1_700_000_000_000));
        status
            .verify(&key.verifying_key(), "robot-17")
            .expect("the will is signed by the device");
        let login = opts.credentials().unwrap();
        assert_eq!(login.username, "robot-17");
        let ts =
            sign::verify_mqtt_password(&key.verifying_key(), "robot-17", &login.password).unwrap();
        assert!((unix_now() - ts).abs() < 5);

        let overridden = LinkSettings {
            username: Some("u".into()),
            password: Some(Secret::new("p")),
            ..settings
        };
        let login = mqtt_options(&overridden, 0).credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("u", "p")
        );
    }

    #[test]
    fn classifies_incoming_messages() {
        let res = ResponseEnvelope::ok("r1", 200, serde_json::json!({}));
        let p = Publish::new(
            topics::topic("robot-17", Channel::Res),
            QoS::AtLeastOnce,
            serde_json::to_vec(&res).unwrap(),
        );
        assert_eq!(classify("robot-17", &p), Incoming::Response(res));
        let p = Publish::new(
            topics::topic("robot-17", Channel::Cmd),
            QoS::AtLeastOnce,
            "x",
        );
        assert_eq!(classify("robot-17", &p), Incoming::Command);
        let p = Publish::new(
            topics::topic("robot-18", Channel::Cmd),
            QoS::AtLeastOnce,
            "x",
        );
        assert!(matches!(classify("robot-17", &p), Incoming::Ignored(_)));
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        let p = Publish::new(
            topics::topic("robot-17", Channel::Cmd),
            QoS::AtLeastOnce,
            big,
        );
        assert!(matches!(classify("robot-17", &p), Incoming::Ignored(_)));
    }

    #[test]
    fn reconnect_hints_name_the_clock() {
        // Offset unknown: a hint at the 3rd failure in a row, then every 10th.
        let hints: Vec<u32> = (1..=25)
            .filter(|n| reconnect_hint(*n, None).is_some())
            .collect();
        assert_eq!(hints, [3, 13, 23]);
        // Known to be beyond the window: said with the offset.
        let hint = reconnect_hint(1, Some(-3600)).unwrap();
        assert!(hint.contains("3600 s behind"), "{hint}");
        assert!(reconnect_hint(1, Some(30)).is_none());
    }
}
