//! Acting as a device without the agent: the signed device HTTP API and a raw MQTT client.

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;
use uplink_protocol::envelope::{RequestEnvelope, ResponseEnvelope};
use uplink_protocol::sign::{self, PrivateKey};
use uplink_protocol::topics::{self, Channel};

/// An HTTP answer: status, content type and JSON body (`Value::Null` when not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Whether this is an RFC 7807 problem document with a `code`.
    pub fn is_problem(&self) -> bool {
        self.content_type.starts_with("application/problem+json")
            && self.body.get("code").and_then(Value::as_str).is_some()
    }

    pub(crate) async fn from_response(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            content_type,
            body,
            text,
        }
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HTTP {} [{}] {}",
            self.status, self.content_type, self.text
        )
    }
}

/// A test client of the API (30 s timeout) that also trusts `ca_file` (PEM) when given.
pub fn http_client(ca_file: Option<&std::path::Path>) -> reqwest::Client {
    let roots = ca_file.map_or(Vec::new(), |f| {
        uplink_service::tls::https_roots(f).expect("the test CA for reqwest")
    });
    roots
        .into_iter()
        .fold(reqwest::Client::builder(), |b, c| b.add_root_certificate(c))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// Client for `POST /v1/device/{op}` on the control API.
#[derive(Debug, Clone)]
pub struct DeviceHttp {
    pub api_url: String,
    http: reqwest::Client,
}

impl DeviceHttp {
    /// `ca_file`: an HTTPS API's CA (PEM), trusted besides the built-in roots.
    pub fn new(api_url: &str, ca_file: Option<&std::path::Path>) -> DeviceHttp {
        DeviceHttp {
            api_url: api_url.to_string(),
            http: http_client(ca_file),
        }
    }

    /// Sends an envelope as device `device_id` (the `X-Uplink-Device` header), exactly as
    /// the bridge would: headers from the envelope, body = the envelope's body string.
    pub async fn send(&self, device_id: &str, env: &RequestEnvelope) -> Reply {
        let resp = self
            .http
            .post(format!("{}/v1/device/{}", self.api_url, env.op))
            .header("X-Uplink-Device", device_id)
            .header("Idempotency-Key", &env.request_id)
            .header("X-Uplink-Timestamp", env.ts.to_string())
            .header("X-Uplink-Signature", &env.sig)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(env.body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /v1/device/{}: {e}", env.op));
        Reply::from_response(resp).await
    }

    /// Signs `body` with `key` as `device_id` (now, fresh request id) and sends it.
    pub async fn call(&self, device_id: &str, key: &PrivateKey, op: &str, body: &Value) -> Reply {
        let env = signed(key, device_id, op, body);
        self.send(device_id, &env).await
    }
}

/// A freshly signed envelope with a new request id and the current time.
pub fn signed(key: &PrivateKey, device_id: &str, op: &str, body: &Value) -> RequestEnvelope {
    RequestEnvelope::sign(
        key,
        device_id,
        op,
        &crate::unique("req"),
        uplink_protocol::unix_now(),
        body.to_string(),
    )
}

#[derive(Debug)]
enum MqttEvent {
    ConnAck(ConnectReturnCode),
    SubAck,
    Publish(String, Vec<u8>),
    Error(String),
}

/// An MQTT client connected to the bridge's broker as a device.
pub struct MqttDevice {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<MqttEvent>,
    task: tokio::task::JoinHandle<()>,
    /// Publishes received but not yet consumed.
    pending: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for MqttDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttDevice").finish_non_exhaustive()
    }
}

impl Drop for MqttDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Who an MQTT client connects as, and how.
#[derive(Debug, Clone, Default)]
pub struct MqttLogin {
    pub client_id: String,
    /// `None`: no credentials in the CONNECT (an anonymous client).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Over TLS with these files (CA, client certificate for mutual TLS); plain TCP when
    /// `None`.
    pub tls: Option<uplink_service::tls::ClientFiles>,
}

impl MqttLogin {
    /// Client id = username = `user`, with `password`.
    pub fn user(user: &str, password: &str) -> MqttLogin {
        MqttLogin {
            client_id: user.to_string(),
            username: Some(user.to_string()),
            password: Some(password.to_string()),
            tls: None,
        }
    }

    /// How the agent logs in by default: client id = username = device id, password
    /// derived from the device key now.
    pub fn derived(device_id: &str, key: &PrivateKey) -> MqttLogin {
        let password = sign::mqtt_password(key, device_id, uplink_protocol::unix_now());
        MqttLogin::user(device_id, &password)
    }
}

/// Why [`MqttDevice::connect_with`] got no connection.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectFailure {
    /// The broker answered the CONNECT with this refusal.
    Refused(ConnectReturnCode),
    /// Anything else: no TCP connection, no CONNACK in time.
    Failed(String),
}

/// What arrived on a connection during [`MqttDevice::collect`].
#[derive(Debug, Default)]
pub struct Collected {
    /// Publishes (topic, payload), oldest first.
    pub publishes: Vec<(String, Vec<u8>)>,
    /// Connection errors (a disconnect by the broker shows up here).
    pub errors: Vec<String>,
}

impl MqttDevice {
    /// Connects as `device_id` with the password derived from `key` (username = client id
    /// = device id) and waits for the broker's CONNACK.
    pub async fn connect(port: u16, device_id: &str, key: &PrivateKey) -> MqttDevice {
        match Self::connect_with(port, &MqttLogin::derived(device_id, key)).await {
            Ok(dev) => dev,
            Err(ConnectFailure::Refused(code)) => panic!("broker refused {device_id}: {code:?}"),
            Err(ConnectFailure::Failed(e)) => {
                panic!("MQTT connect as {device_id} to 127.0.0.1:{port} failed: {e}")
            }
        }
    }

    /// Connects with `login` and waits for the broker's CONNACK (at most 20 s).
    pub async fn connect_with(port: u16, login: &MqttLogin) -> Result<MqttDevice, ConnectFailure> {
        let mut opts = MqttOptions::new(login.client_id.clone(), "127.0.0.1", port);
        if let Some(user) = &login.username {
            opts.set_credentials(user.clone(), login.password.clone().unwrap_or_default());
        }
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_clean_session(true);
        opts.set_max_packet_size(256 * 1024, 256 * 1024);
        if let Some(files) = &login.tls {
            let config = uplink_service::tls::client_config(files)
                .map_err(|e| ConnectFailure::Failed(format!("TLS files: {e}")))?;
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(config)),
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        eventloop.network_options.set_tcp_nodelay(true);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => MqttEvent::ConnAck(c.code),
                    Ok(Event::Incoming(Packet::SubAck(_))) => MqttEvent::SubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        MqttEvent::Publish(p.topic.clone(), p.payload.to_vec())
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        let ev = match e {
                            ConnectionError::ConnectionRefused(code) => MqttEvent::ConnAck(code),
                            e => MqttEvent::Error(e.to_string()),
                        };
                        if tx.send(ev).is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        let mut dev = MqttDevice {
            client,
            events,
            task,
            pending: Vec::new(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, dev.events.recv()).await {
                Ok(Some(MqttEvent::ConnAck(ConnectReturnCode::Success))) => return Ok(dev),
                Ok(Some(MqttEvent::ConnAck(code))) => return Err(ConnectFailure::Refused(code)),
                Ok(Some(MqttEvent::Error(e))) => return Err(ConnectFailure::Failed(e)),
                Ok(Some(MqttEvent::Publish(t, p))) => dev.pending.push((t, p)),
                Ok(Some(MqttEvent::SubAck)) => {}
                Ok(None) | Err(_) => {
                    return Err(ConnectFailure::Failed(format!(
                        "no CONNACK from 127.0.0.1:{port} within 20 s"
                    )))
                }
            }
        }
    }

    /// Everything that arrives within `wait` (and what earlier calls kept aside).
    pub async fn collect(&mut self, wait: Duration) -> Collected {
        let mut got = Collected {
            publishes: std::mem::take(&mut self.pending),
            errors: Vec::new(),
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(MqttEvent::Publish(t, p))) => got.publishes.push((t, p)),
                Ok(Some(MqttEvent::Error(e))) => got.errors.push(e),
                Ok(Some(MqttEvent::ConnAck(code))) => got.errors.push(format!("CONNACK {code:?}")),
                Ok(Some(MqttEvent::SubAck)) => {}
                Ok(None) | Err(_) => return got,
            }
        }
    }

    /// Sends DISCONNECT and waits (at most 2 s) until the connection is closed.
    pub async fn disconnect(mut self) {
        if self.client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(ev) = self.events.recv().await {
                    if matches!(ev, MqttEvent::Error(_)) {
                        return;
                    }
                }
            })
            .await;
        }
    }

    /// Subscribes (QoS 1) and waits for the SUBACK.
    pub async fn subscribe(&mut self, topic: &str) {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(MqttEvent::SubAck)) => return,
                Ok(Some(MqttEvent::Publish(t, p))) => self.pending.push((t, p)),
                Ok(Some(MqttEvent::Error(e))) => panic!("MQTT error while subscribing: {e}"),
                Ok(Some(MqttEvent::ConnAck(_))) => {}
                Ok(None) | Err(_) => panic!("no SUBACK for {topic} within 10 s"),
            }
        }
    }

    /// Publishes raw bytes with QoS 1.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue publish");
    }

    /// Publishes a request envelope on `device_id`'s `req` topic.
    pub async fn publish_request(&self, device_id: &str, env: &RequestEnvelope) {
        let payload = serde_json::to_vec(env).expect("serialise envelope");
        self.publish(&topics::topic(device_id, Channel::Req), payload)
            .await;
    }

    /// Next publish on `topic` that parses as a response to `request_id`, or `None` after
    /// `timeout`. Other publishes are kept for later calls.
    pub async fn response(
        &mut self,
        topic: &str,
        request_id: &str,
        timeout: Duration,
    ) -> Option<ResponseEnvelope> {
        let matches = |t: &str, p: &[u8]| -> Option<ResponseEnvelope> {
            if t != topic {
                return None;
            }
            serde_json::from_slice::<ResponseEnvelope>(p)
                .ok()
                .filter(|r| r.request_id == request_id)
        };
        if let Some(i) = self
            .pending
            .iter()
            .position(|(t, p)| matches(t, p).is_some())
        {
            let (t, p) = self.pending.remove(i);
            return matches(&t, &p);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(MqttEvent::Publish(t, p))) => {
                    if let Some(r) = matches(&t, &p) {
                        return Some(r);
                    }
                    self.pending.push((t, p));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Waits until the bridge answers requests on MQTT: sends `session.status` for an
    /// unknown session every 2 s until any answer comes back on `res` (at most `timeout`).
    pub async fn wait_bridge_ready(
        &mut self,
        device_id: &str,
        key: &PrivateKey,
        timeout: Duration,
    ) {
        let res_topic = topics::topic(device_id, Channel::Res);
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let probe = signed(
                key,
                device_id,
                "session.status",
                &serde_json::json!({ "session_id": uuid::Uuid::new_v4() }),
            );
            self.publish_request(device_id, &probe).await;
            if self
                .response(&res_topic, &probe.request_id, Duration::from_secs(2))
                .await
                .is_some()
            {
                return;
            }
        }
        panic!("the bridge answered no request on {res_topic} within {timeout:?}");
    }
}
