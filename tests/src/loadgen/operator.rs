//! The operator's side: registering the fleet through the API (many at once) and issuing
//! commands, both with an `Idempotency-Key` so that a retried call never makes a second
//! device or command. Calls go round-robin over the control API instances.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::fleet::{Fleet, SimDevice};

#[derive(Clone)]
pub struct Operator {
    apis: Arc<Vec<String>>,
    token: String,
    http: reqwest::Client,
    next: Arc<AtomicUsize>,
}

/// Why an operator call ended without success.
#[derive(Debug)]
pub struct CallError {
    pub kind: String,
}

impl Operator {
    pub fn new(apis: Vec<String>, token: String) -> Operator {
        Operator {
            apis: Arc::new(apis),
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(256)
                .build()
                .unwrap_or_default(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn base(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.apis[i % self.apis.len()]
    }

    pub async fn get(&self, path: &str) -> Result<Value, CallError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base()))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| CallError {
                kind: format!("GET {path}: {e}"),
            })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(CallError {
                kind: format!("GET {path}: {status} {body}"),
            });
        }
        Ok(body)
    }

    /// POSTs `body` with one idempotency key; retries connection errors and 5xx/429 (on
    /// any instance) with the same key. Returns the status and body of the final answer.
    async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value), CallError> {
        let key = Uuid::new_v4().simple().to_string();
        let mut last = String::new();
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let sent = self
                .http
                .post(format!("{}{path}", self.base()))
                .bearer_auth(&self.token)
                .header("Idempotency-Key", &key)
                .json(body)
                .send()
                .await;
            match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    if status >= 500 || status == 429 {
                        last = format!("{status} {}", body["code"].as_str().unwrap_or(""));
                        continue;
                    }
                    return Ok((status, body));
                }
                Err(e) if e.is_timeout() => last = "timeout".into(),
                Err(e) if e.is_connect() => last = "connect".into(),
                Err(_) => last = "http error".into(),
            }
        }
        Err(CallError { kind: last })
    }

    /// Registers every device, `concurrency` at a time; stops at the first refusal.
    pub async fn register(
        &self,
        devices: &[Arc<SimDevice>],
        concurrency: usize,
        fleet_stats: &super::stats::Recorder,
    ) -> Result<(), String> {
        let slots = Arc::new(Semaphore::new(concurrency));
        let mut tasks = Vec::with_capacity(devices.len());
        for dev in devices {
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            let op = self.clone();
            let body = json!({
                "device_id": dev.id,
                "public_key": uplink_protocol::sign::encode_public(&dev.key.verifying_key()),
            });
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let r = op.post("/v1/devices", &body).await;
                drop(permit);
                (t0.elapsed(), r)
            }));
        }
        for t in tasks {
            let (took, r) = t.await.map_err(|e| e.to_string())?;
            match r {
                Ok((201, _)) => fleet_stats.ok("device.register", took),
                Ok((status, body)) => {
                    return Err(format!("POST /v1/devices answered {status}: {body}"))
                }
                Err(e) => return Err(format!("POST /v1/devices failed: {}", e.kind)),
            }
        }
        Ok(())
    }

    /// Issues a `config` command to device `idx` (harmless for a simulated device) and
    /// records it in the ledger with the time just before the call.
    pub async fn issue_command(&self, fleet: &Fleet, idx: usize) {
        let dev = &fleet.devices[idx];
        let t0 = Instant::now();
        let body = json!({"type": "config", "concurrency": 1 + (idx % 8)});
        match self
            .post(&format!("/v1/devices/{}/commands", dev.id), &body)
            .await
        {
            Ok((201, reply)) => match reply["command_id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
            {
                Some(id) => {
                    fleet.stats.ok("command.create", t0.elapsed());
                    fleet.ledger().issued(id, &dev.id, t0);
                }
                None => fleet.stats.error("command.create", "no command_id"),
            },
            Ok((status, reply)) => fleet.stats.error(
                "command.create",
                &format!("{status} {}", reply["code"].as_str().unwrap_or("")),
            ),
            Err(e) => fleet.stats.error("command.create", &e.kind),
        }
    }
}
