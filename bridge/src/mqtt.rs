//! The bridge's MQTT client: options, subscriptions and the event loop, polled continuously
//! in its own task. Each publish from a device is handed to its own task (bounded by
//! semaphores) so a slow API never stalls the loop.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, SubscribeFilter};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uplink_protocol::envelope::MAX_PAYLOAD_BYTES;
use uplink_protocol::topics::{self, Channel};

use crate::forward::{self, Forwarder};
use crate::metrics::Metrics;
use crate::presence::{self, PresenceQueue};

/// Channels the bridge listens to.
pub const SUBSCRIBED: [Channel; 4] = [
    Channel::Req,
    Channel::CmdAck,
    Channel::Progress,
    Channel::Status,
];
/// Messages handled at once.
pub const MAX_CONCURRENT: usize = 64;
/// Messages accepted (running or waiting for a slot) before new ones are dropped.
pub const MAX_QUEUED: usize = 4096;
/// Largest packet the bridge sends (responses carry up to 100 presigned URLs).
pub const MAX_OUTGOING_PACKET: usize = 1024 * 1024;
/// Largest packet the bridge takes from the broker: MQTT's own largest remaining length,
/// so that nothing a broker delivers can break the bridge's connection. The embedded broker
/// stops bigger packets at the publisher (see [`crate::broker::PACKET_HEADROOM`]); an
/// external one delivers whatever its configuration allows (Mosquitto by default: up to
/// this). Payloads over [`MAX_PAYLOAD_BYTES`] are then refused here (413 on `res`, or
/// dropped); with a smaller limit one of them, retained, would close the bridge's
/// connection again at every resubscription.
pub const MAX_INCOMING_PACKET: usize = 268_435_455;
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight messages to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how the bridge connects.
#[derive(Debug, Clone)]
pub struct Connection {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub shared_subscriptions: bool,
    /// TLS with these files; `None` = plain TCP.
    pub tls: Option<uplink_service::tls::ClientFiles>,
}

/// Options of `conn`; fails only when its TLS files do not load.
pub fn options(conn: &Connection) -> Result<MqttOptions, uplink_service::tls::TlsError> {
    let mut o = MqttOptions::new(conn.client_id.clone(), conn.host.clone(), conn.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    o.set_clean_session(true);
    if let Some(user) = &conn.username {
        o.set_credentials(user.clone(), conn.password.clone().unwrap_or_default());
    }
    if let Some(files) = &conn.tls {
        let config = uplink_service::tls::client_config(files)?;
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    Ok(o)
}

/// The subscription filters (QoS 1) for all devices, and the dynamic-security plugin's
/// answers when the bridge syncs it.
pub fn filters(shared: bool, dynamic_security: bool) -> Vec<SubscribeFilter> {
    let control = dynamic_security
        .then(|| SubscribeFilter::new(crate::dynsec::RESPONSE.into(), QoS::AtLeastOnce));
    SUBSCRIBED
        .into_iter()
        .map(|c| {
            let path = if shared {
                topics::shared_filter_all(c)
            } else {
                topics::filter_all(c)
            };
            SubscribeFilter::new(path, QoS::AtLeastOnce)
        })
        .chain(control)
        .collect()
}

/// Everything the event loop hands messages to.
pub struct Dispatch {
    pub forwarder: Forwarder,
    pub presence: Arc<PresenceQueue>,
    pub concurrency: Arc<Semaphore>,
    pub admission: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    /// The dynamic-security plugin's answers ([`crate::dynsec`]), when the bridge syncs it.
    pub control_answers: Option<mpsc::UnboundedSender<bytes::Bytes>>,
}

impl Dispatch {
    pub fn new(forwarder: Forwarder, presence: Arc<PresenceQueue>, metrics: Arc<Metrics>) -> Self {
        Dispatch {
            metrics,
            forwarder,
            presence,
            concurrency: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            admission: Arc::new(Semaphore::new(MAX_QUEUED)),
            control_answers: None,
        }
    }

    fn dispatch(&self, publish: Publish) {
        if let Some(answers) = &self.control_answers {
            if publish.topic == crate::dynsec::RESPONSE {
                let _ = answers.send(publish.payload);
                return;
            }
        }
        let Some((device, channel)) = topics::parse(&publish.topic) else {
            debug!(topic = %publish.topic, "Message on a foreign topic; ignored");
            return;
        };
        self.metrics.message(channel);
        match channel {
            Channel::Status => {
                if let Some(status) = presence::parse_status(device, &publish.payload) {
                    self.presence.push(device, status);
                }
            }
            Channel::Req | Channel::CmdAck | Channel::Progress => {
                let Ok(admitted) = self.admission.clone().try_acquire_owned() else {
                    self.metrics.dropped();
                    warn!(
                        device_id = device,
                        channel = channel.suffix(),
                        "Bridge overloaded; message dropped"
                    );
                    return;
                };
                // An oversized payload is refused at once, so that only its small refusal
                // waits for a slot, not the payload.
                let payload = if publish.payload.len() > MAX_PAYLOAD_BYTES {
                    Err(forward::classify(&publish.payload))
                } else {
                    Ok(publish.payload)
                };
                let device = device.to_string();
                let forwarder = self.forwarder.clone();
                let concurrency = self.concurrency.clone();
                tokio::spawn(async move {
                    let _admitted = admitted;
                    let Ok(_slot) = concurrency.acquire_owned().await else {
                        return;
                    };
                    match payload {
                        Ok(payload) => forwarder.handle(&device, channel, &payload).await,
                        Err(classified) => {
                            forwarder
                                .handle_classified(&device, channel, classified)
                                .await
                        }
                    }
                });
            }
            Channel::Cmd | Channel::Res => {
                debug!(
                    device_id = device,
                    channel = channel.suffix(),
                    "Own message echoed; ignored"
                );
            }
        }
    }

    /// Waits until every accepted message is handled, or `DRAIN_TIMEOUT`.
    async fn drained(&self) -> bool {
        let all = u32::try_from(MAX_QUEUED).unwrap_or(u32::MAX);
        tokio::time::timeout(DRAIN_TIMEOUT, self.admission.acquire_many(all))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Polls `eventloop` until `shutdown`, reconnecting after errors; `connected` tells the
/// others whether a broker connection is up. With `quiet_start` (embedded broker, still
/// binding its port) failures before the first connection are logged at debug level only.
pub async fn run_event_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    subscriptions: Vec<SubscribeFilter>,
    quiet_start: bool,
    dispatch: Dispatch,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut delay = RETRY_MIN;
    let mut ever_connected = false;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(session_present = ack.session_present, "Connected to broker");
                delay = RETRY_MIN;
                ever_connected = true;
                connected.send_replace(true);
                // Subscribing goes through the request channel this loop drains: do it
                // from another task so a full channel cannot deadlock the loop.
                let client = client.clone();
                let subscriptions = subscriptions.clone();
                tokio::spawn(async move {
                    match client.subscribe_many(subscriptions).await {
                        Ok(()) => debug!("Subscriptions requested"),
                        Err(e) => warn!(error = %e, "Could not subscribe"),
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .count();
                if refused > 0 {
                    warn!(refused, "Broker refused subscriptions");
                } else {
                    info!("Subscribed to device topics");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => dispatch.dispatch(publish),
            Ok(_) => {}
            Err(e) => {
                connected.send_replace(false);
                let retry_in_ms = delay.as_millis() as u64;
                if quiet_start && !ever_connected {
                    debug!(error = %e, retry_in_ms, "Embedded broker not accepting yet");
                } else {
                    warn!(error = %e, retry_in_ms, "Broker connection failed");
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
    drain_and_disconnect(eventloop, client, dispatch).await;
    connected.send_replace(false);
}

/// Lets in-flight messages publish their answers, then disconnects cleanly.
async fn drain_and_disconnect(mut eventloop: EventLoop, client: AsyncClient, dispatch: Dispatch) {
    let flush = async {
        let mut disconnect_sent = false;
        let drained = dispatch.drained();
        tokio::pin!(drained);
        loop {
            tokio::select! {
                done = &mut drained, if !disconnect_sent => {
                    if !done {
                        warn!("Shutdown: some messages were still in flight");
                    }
                    disconnect_sent = true;
                    if client.try_disconnect().is_err() {
                        return;
                    }
                }
                event = eventloop.poll() => match event {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(_) if disconnect_sent => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
            }
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), flush)
        .await
        .is_err()
    {
        warn!("Shutdown: broker did not take the disconnect in time");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_cover_device_channels() {
        let plain: Vec<String> = filters(false, false).into_iter().map(|f| f.path).collect();
        assert_eq!(
            plain,
            vec![
                topics::filter_all(Channel::Req),
                topics::filter_all(Channel::CmdAck),
                topics::filter_all(Channel::Progress),
                topics::filter_all(Channel::Status),
            ]
        );
        assert!(filters(true, false)
            .iter()
            .all(|f| f.path.starts_with("$share/") && f.qos == QoS::AtLeastOnce));
        let synced = filters(true, true);
        assert_eq!(synced.len(), SUBSCRIBED.len() + 1);
        assert_eq!(
            synced.last().map(|f| f.path.as_str()),
            Some(crate::dynsec::RESPONSE)
        );
    }

    #[test]
    fn options_allow_the_largest_payload() {
        let o = options(&Connection {
            host: "h".into(),
            port: 1,
            client_id: "c".into(),
            username: Some("u".into()),
            password: None,
            shared_subscriptions: false,
            tls: None,
        })
        .unwrap();
        assert!(o.max_packet_size() > MAX_PAYLOAD_BYTES);
        assert_eq!(o.max_packet_size(), MAX_INCOMING_PACKET);
        assert!(o.credentials().is_some());
    }
}
