//! The simulated devices: one MQTT connection each (many per process, each event loop
//! polled in its own task), a retained signed `online` status at every connect with the
//! `offline` Last Will, signed requests on `req` matched with their answers on `res`, and
//! commands on `cmd` answered with one `done` ack each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::oneshot;
use uplink_protocol::envelope::{CommandEnvelope, RequestEnvelope, ResponseEnvelope};
use uplink_protocol::sign::{PrivateKey, PublicKey};
use uplink_protocol::telemetry::{Presence, Status};
use uplink_protocol::topics::{self, Channel};

use super::args::BrokerKind;
use super::ledger::Ledger;
use super::stats::Recorder;

/// One simulated device.
pub struct SimDevice {
    pub id: String,
    pub key: PrivateKey,
    client: Mutex<Option<AsyncClient>>,
    connected: AtomicBool,
}

impl SimDevice {
    pub fn new(id: String, key: PrivateKey) -> SimDevice {
        SimDevice {
            id,
            key,
            client: Mutex::new(None),
            connected: AtomicBool::new(false),
        }
    }

    fn client(&self) -> Option<AsyncClient> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What every device task shares.
pub struct Fleet {
    pub devices: Vec<Arc<SimDevice>>,
    pub ledger: Mutex<Ledger>,
    pub stats: Recorder,
    command_key: PublicKey,
    pending: Mutex<HashMap<String, oneshot::Sender<ResponseEnvelope>>>,
    pub connected: AtomicUsize,
    pub max_connected: AtomicUsize,
    stopping: AtomicBool,
    broker: BrokerKind,
    mqtt_port: u16,
    request_timeout: Duration,
}

/// Answers worth sending the same request again for (protocol.md: 5xx, 429, 408).
fn retryable(status: u16) -> bool {
    status >= 500 || status == 429 || status == 408
}

fn problem_code(answer: &ResponseEnvelope) -> String {
    let code = answer
        .problem
        .as_ref()
        .map(|p| p.code.clone())
        .unwrap_or_default();
    format!("{} {code}", answer.status)
}

impl Fleet {
    pub fn new(
        devices: Vec<Arc<SimDevice>>,
        command_key: PublicKey,
        broker: BrokerKind,
        mqtt_port: u16,
        request_timeout: Duration,
    ) -> Arc<Fleet> {
        Arc::new(Fleet {
            devices,
            ledger: Mutex::new(Ledger::default()),
            stats: Recorder::default(),
            command_key,
            pending: Mutex::new(HashMap::new()),
            connected: AtomicUsize::new(0),
            max_connected: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            broker,
            mqtt_port,
            request_timeout,
        })
    }

    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts device `idx`'s connection; it reconnects by itself (1 s apart) until
    /// [`Fleet::stop`].
    pub fn connect(self: &Arc<Self>, idx: usize) {
        let dev = self.devices[idx].clone();
        let began_ms = chrono::Utc::now().timestamp_millis();
        let mut opts = MqttOptions::new(dev.id.clone(), "127.0.0.1", self.mqtt_port);
        opts.set_keep_alive(Duration::from_secs(60));
        opts.set_clean_session(true);
        opts.set_max_packet_size(128 * 1024, 128 * 1024);
        if self.broker == BrokerKind::Embedded {
            let password = uplink_protocol::sign::mqtt_password(
                &dev.key,
                &dev.id,
                uplink_protocol::unix_now(),
            );
            opts.set_credentials(dev.id.clone(), password);
        }
        let will = status(&dev, Presence::Offline, began_ms);
        opts.set_last_will(LastWill::new(
            topics::topic(&dev.id, Channel::Status),
            will,
            QoS::AtLeastOnce,
            true,
        ));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        // As the agent does (Nagle's algorithm would add up to 40 ms per request).
        eventloop.network_options.set_tcp_nodelay(true);
        *dev.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
        let fleet = self.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if first {
                            fleet.stats.ok("mqtt.connect", started.elapsed());
                            first = false;
                        } else {
                            fleet.stats.ok("mqtt.reconnect", Duration::ZERO);
                        }
                        fleet.on_connected(&dev, &client, began_ms);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        fleet.on_publish(&dev, &p.topic, &p.payload);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if dev.connected.swap(false, Ordering::SeqCst) {
                            fleet.connected.fetch_sub(1, Ordering::SeqCst);
                        }
                        if fleet.stopping.load(Ordering::SeqCst) {
                            return;
                        }
                        fleet.stats.error("mqtt.connection", &short_error(&e));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    fn on_connected(&self, dev: &SimDevice, client: &AsyncClient, began_ms: i64) {
        for channel in [Channel::Cmd, Channel::Res] {
            if client
                .try_subscribe(topics::topic(&dev.id, channel), QoS::AtLeastOnce)
                .is_err()
            {
                self.stats.error("mqtt.subscribe", "request queue full");
            }
        }
        self.publish_online(dev, client, began_ms);
        if !dev.connected.swap(true, Ordering::SeqCst) {
            let now = self.connected.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_connected.fetch_max(now, Ordering::SeqCst);
        }
    }

    /// Publishes `idx`'s `online` status again (a presence refresh).
    pub fn refresh_status(&self, idx: usize) {
        let dev = &self.devices[idx];
        if let Some(client) = dev.client() {
            self.publish_online(dev, &client, chrono::Utc::now().timestamp_millis());
        }
    }

    /// The retained, signed `online` status with `ts_ms`.
    fn publish_online(&self, dev: &SimDevice, client: &AsyncClient, ts_ms: i64) {
        let payload = status(dev, Presence::Online, ts_ms);
        let topic = topics::topic(&dev.id, Channel::Status);
        if client
            .try_publish(topic, QoS::AtLeastOnce, true, payload)
            .is_err()
        {
            self.stats.error("status", "request queue full");
        }
    }

    fn on_publish(self: &Arc<Self>, dev: &Arc<SimDevice>, topic: &str, payload: &[u8]) {
        match topics::parse(topic) {
            Some((_, Channel::Res)) => match serde_json::from_slice::<ResponseEnvelope>(payload) {
                Ok(answer) => {
                    if !self.ledger().answered(&answer.request_id) {
                        self.stats.error("res", "answer to an unknown request id");
                    }
                    let waiter = self
                        .pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&answer.request_id);
                    if let Some(tx) = waiter {
                        let _ = tx.send(answer);
                    }
                }
                Err(_) => self.stats.error("res", "unparsable answer"),
            },
            Some((_, Channel::Cmd)) => self.on_command(dev, payload),
            _ => self.stats.error("mqtt.publish", "unexpected topic"),
        }
    }

    fn on_command(self: &Arc<Self>, dev: &Arc<SimDevice>, payload: &[u8]) {
        let at = Instant::now();
        let command = match serde_json::from_slice::<CommandEnvelope>(payload)
            .map_err(|e| e.to_string())
            .and_then(|env| {
                env.open(&self.command_key, &dev.id, uplink_protocol::unix_now())
                    .map_err(|e| e.to_string())
            }) {
            Ok(c) => c,
            Err(e) => {
                self.stats
                    .error("command.deliver", &format!("refused: {e}"));
                return;
            }
        };
        let id = command.command_id;
        if self.ledger().delivered(id, at) > 1 {
            // Run once: the first delivery's ack is (being) answered on `req`.
            return;
        }
        let fleet = self.clone();
        let dev = dev.clone();
        tokio::spawn(async move {
            let body = json!({"command_id": id, "state": "done"}).to_string();
            let request_id = format!("ack-{}", id.simple());
            let t0 = Instant::now();
            if let Ok(answer) = fleet.request(&dev, "command.ack", &request_id, body).await {
                if answer.status < 300 {
                    fleet.stats.ok("command.ack", t0.elapsed());
                    fleet.ledger().acked(id);
                } else {
                    fleet.stats.error("command.ack", &problem_code(&answer));
                }
            }
        });
    }

    /// Sends a signed request on `req` and waits for its answer; sends it again (same id
    /// and body, fresh signature) after a timeout or a retryable answer, at most 4 times.
    /// Failed attempts are recorded under `op`; the final answer is the caller's to judge.
    pub async fn request(
        &self,
        dev: &SimDevice,
        op: &'static str,
        request_id: &str,
        body: String,
    ) -> Result<ResponseEnvelope, ()> {
        let topic = topics::topic(&dev.id, Channel::Req);
        for attempt in 0..4u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            let env = RequestEnvelope::sign(
                &dev.key,
                &dev.id,
                op,
                request_id,
                uplink_protocol::unix_now(),
                body.clone(),
            );
            let (tx, rx) = oneshot::channel();
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(request_id.to_string(), tx);
            let Some(client) = dev.client() else {
                self.stats.error(op, "device not connected");
                return Err(());
            };
            self.ledger().sent(request_id, op);
            let payload = serde_json::to_vec(&env).unwrap_or_default();
            if client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                self.stats.error(op, "mqtt client stopped");
                return Err(());
            }
            match tokio::time::timeout(self.request_timeout, rx).await {
                Ok(Ok(answer)) if retryable(answer.status) => {
                    self.stats.error(op, &problem_code(&answer));
                }
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(_)) => self.stats.error(op, "waiter dropped"),
                Err(_) => {
                    self.pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(request_id);
                    self.stats.error(op, "timeout");
                }
            }
        }
        self.stats.error(op, "gave up after 4 attempts");
        Err(())
    }

    /// Disconnects every device (no Last Will: a clean goodbye).
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for dev in &self.devices {
            if let Some(client) = dev.client() {
                let _ = client.try_disconnect();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.connected.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn status(dev: &SimDevice, state: Presence, ts_ms: i64) -> Vec<u8> {
    let s = Status {
        v: uplink_protocol::VERSION,
        state,
        agent_version: Some("loadgen".into()),
        queue_depth: Some(0),
        free_disk_bytes: None,
        ts_ms: Some(ts_ms),
        clock_offset_secs: None,
        sig: None,
    }
    .signed(&dev.key, &dev.id);
    serde_json::to_vec(&s).unwrap_or_default()
}

/// A connection error's kind, without addresses or ids.
fn short_error(e: &rumqttc::ConnectionError) -> String {
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => format!("refused {code:?}"),
        E::Io(io) => format!("io {:?}", io.kind()),
        E::NetworkTimeout => "network timeout".into(),
        E::FlushTimeout => "flush timeout".into(),
        E::MqttState(s) => {
            let s = s.to_string();
            s.split(':').next().unwrap_or("mqtt state").to_string()
        }
        other => {
            let s = other.to_string();
            s.split(':').next().unwrap_or("error").to_string()
        }
    }
}
