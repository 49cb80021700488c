//! Mosquitto accounts kept in step with the API's registry (`[broker] dynamic_security`):
//! the bridge drives Mosquitto's dynamic-security plugin over `$CONTROL/dynamic-security/v1`
//! so that no device account or ACL is kept by hand.
//!
//! Every [`SYNC_EVERY`] (and at each connection) the bridge reads the registry
//! (`GET /v1/bridge/devices`, with each device's Mosquitto password, derived by the API
//! from `mqtt_password_secret`) and the plugin's clients (`listClients`), then:
//! - a registered device without a client gets a role `uplink-device-{id}` that allows only
//!   its own topics (publish on its `req`, `cmd/ack`, `progress`, `status`; subscribe under
//!   `uplink/v1/devices/{id}/`) and a client `{id}` with that role and its password,
//!   disabled if the device is;
//! - a device disabled (enabled) since the last sync is disabled (enabled): the plugin
//!   disconnects a disabled client at once and refuses it from then on;
//! - a device whose password changed (its key was rotated) gets the new one;
//! - a client the bridge made (text name [`MANAGED`]) whose device is gone is deleted,
//!   with its role.
//!
//! What was applied is remembered in memory; after a restart or a reconnection the bridge
//! sets every device's password and state once again. Clients the bridge did not make are
//! never touched. The bridge's own account (the plugin's admin, made with
//! `mosquitto_ctrl dynsec init`) gets the role [`BRIDGE_ROLE`] for the device topics.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, QoS, SubscribeFilter};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uplink_protocol::topics::{self, Channel};

use crate::api::devices::RegisteredDevice;
use crate::api::ApiClient;

/// Where commands go.
pub const CONTROL: &str = "$CONTROL/dynamic-security/v1";
/// Where the plugin answers.
pub const RESPONSE: &str = "$CONTROL/dynamic-security/v1/response";
/// Text name of the clients the bridge makes (and may delete).
pub const MANAGED: &str = "uplink device";
/// The bridge's own role: the device topics, both ways.
pub const BRIDGE_ROLE: &str = "uplink-bridge";
/// How often the registry is compared with the plugin's clients.
pub const SYNC_EVERY: Duration = Duration::from_secs(5);
/// How long the plugin has to answer a batch of commands.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// Commands per message.
const BATCH: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("registry: {0}")]
    Api(#[from] crate::api::ApiError),
    #[error("the API gives no Mosquitto passwords (set its mqtt_password_secret)")]
    NoPasswords,
    #[error("publishing to {CONTROL}: {0}")]
    Publish(#[from] rumqttc::ClientError),
    #[error("no answer from the dynamic-security plugin within {ANSWER_WITHIN:?} (is it loaded, and is the bridge's account its admin?)")]
    NoAnswer,
    #[error("the plugin's answer does not parse: {0}")]
    Answer(String),
}

/// What the bridge last applied to one device's client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Applied {
    enabled: bool,
    password: String,
}

/// The role of device `id`: its own topics only.
pub fn device_role(id: &str) -> Value {
    let topic = |c: Channel| topics::topic(id, c);
    let publish = [
        Channel::Req,
        Channel::CmdAck,
        Channel::Progress,
        Channel::Status,
    ]
    .map(|c| json!({"acltype": "publishClientSend", "topic": topic(c), "allow": true}));
    let mut acls: Vec<Value> = publish.into();
    for acltype in ["subscribePattern", "unsubscribePattern"] {
        acls.push(json!({"acltype": acltype, "topic": format!("uplink/v1/devices/{id}/#"), "allow": true}));
    }
    json!({"command": "createRole", "rolename": format!("uplink-device-{id}"), "acls": acls})
}

/// The bridge's role: publish and subscribe (also shared) on every device topic.
fn bridge_role() -> Value {
    let all = "uplink/v1/devices/#";
    let shared = format!("$share/uplink-bridge/{all}");
    json!({"command": "createRole", "rolename": BRIDGE_ROLE, "acls": [
        {"acltype": "publishClientSend", "topic": all, "allow": true},
        {"acltype": "subscribePattern", "topic": all, "allow": true},
        {"acltype": "subscribePattern", "topic": shared, "allow": true},
        {"acltype": "unsubscribePattern", "topic": all, "allow": true},
        {"acltype": "unsubscribePattern", "topic": shared, "allow": true},
    ]})
}

/// The commands that bring the plugin from `listed` (its clients: username → text name)
/// and `applied` to `devices`; `applied` is updated as if they all succeed.
fn plan(
    devices: &[RegisteredDevice],
    listed: &HashMap<String, String>,
    applied: &mut HashMap<String, Applied>,
) -> Result<Vec<Value>, SyncError> {
    let mut commands = Vec::new();
    for d in devices {
        let password = d.mqtt_password.clone().ok_or(SyncError::NoPasswords)?;
        let id = &d.device_id;
        let want = Applied {
            enabled: d.enabled,
            password,
        };
        match listed.get(id) {
            None => {
                commands.push(device_role(id));
                commands.push(json!({"command": "createClient", "username": id,
                    "password": want.password, "textname": MANAGED,
                    "roles": [{"rolename": format!("uplink-device-{id}")}]}));
                if !want.enabled {
                    commands.push(json!({"command": "disableClient", "username": id}));
                }
            }
            Some(name) if name != MANAGED => {
                warn!(device_id = %id, "Mosquitto has a client of this name that the bridge did not make; left as it is");
                continue;
            }
            Some(_) => {
                let had = applied.get(id);
                if had.is_none_or(|a| a.password != want.password) {
                    commands.push(json!({"command": "setClientPassword", "username": id,
                        "password": want.password}));
                }
                if had.is_none_or(|a| a.enabled != want.enabled) {
                    let command = if want.enabled {
                        "enableClient"
                    } else {
                        "disableClient"
                    };
                    commands.push(json!({"command": command, "username": id}));
                }
            }
        }
        applied.insert(id.clone(), want);
    }
    for (name, text) in listed {
        if text == MANAGED && !devices.iter().any(|d| &d.device_id == name) {
            commands.push(json!({"command": "deleteClient", "username": name}));
            commands.push(
                json!({"command": "deleteRole", "rolename": format!("uplink-device-{name}")}),
            );
            applied.remove(name);
        }
    }
    Ok(commands)
}

/// The sync task's side of the broker connection.
pub struct Sync {
    pub client: AsyncClient,
    pub api: ApiClient,
    /// Payloads the event loop received on [`RESPONSE`].
    pub answers: mpsc::UnboundedReceiver<Bytes>,
    /// The bridge's own username (the plugin's admin).
    pub username: String,
    /// The bridge's subscriptions, made again once it has its role.
    pub subscriptions: Vec<SubscribeFilter>,
}

impl Sync {
    /// Publishes `commands` in batches and returns every answer, in order.
    async fn send(&mut self, commands: Vec<Value>) -> Result<Vec<Value>, SyncError> {
        let mut answers = Vec::new();
        while self.answers.try_recv().is_ok() {}
        for batch in commands.chunks(BATCH) {
            let payload = serde_json::to_vec(&json!({ "commands": batch })).expect("json");
            self.client
                .publish(CONTROL, QoS::AtLeastOnce, false, payload)
                .await?;
            let answer = tokio::time::timeout(ANSWER_WITHIN, self.answers.recv())
                .await
                .ok()
                .flatten()
                .ok_or(SyncError::NoAnswer)?;
            let parsed: Value =
                serde_json::from_slice(&answer).map_err(|e| SyncError::Answer(e.to_string()))?;
            let responses = parsed["responses"]
                .as_array()
                .ok_or_else(|| SyncError::Answer(parsed.to_string()))?;
            answers.extend(responses.iter().cloned());
        }
        Ok(answers)
    }

    /// The plugin's clients: username → text name.
    async fn clients(&mut self) -> Result<HashMap<String, String>, SyncError> {
        let answers = self
            .send(vec![
                json!({"command": "listClients", "verbose": true, "count": -1, "offset": 0}),
            ])
            .await?;
        let clients = answers
            .first()
            .and_then(|a| a["data"]["clients"].as_array())
            .ok_or_else(|| SyncError::Answer(format!("{answers:?}")))?;
        Ok(clients
            .iter()
            .filter_map(|c| {
                let name = c["username"].as_str()?.to_string();
                let text = c["textname"].as_str().unwrap_or_default().to_string();
                Some((name, text))
            })
            .collect())
    }

    /// Gives the bridge's own account its role, then subscribes again (subscriptions made
    /// before it had the role were refused).
    async fn own_role(&mut self) -> Result<(), SyncError> {
        let answers = self
            .send(vec![
                bridge_role(),
                json!({"command": "addClientRole", "username": self.username, "rolename": BRIDGE_ROLE}),
            ])
            .await?;
        log_errors(&answers);
        self.client
            .subscribe_many(self.subscriptions.clone())
            .await?;
        Ok(())
    }

    /// One comparison of the registry with the plugin.
    async fn once(&mut self, applied: &mut HashMap<String, Applied>) -> Result<(), SyncError> {
        let devices = self.api.devices().await?;
        let listed = self.clients().await?;
        let commands = plan(&devices, &listed, applied)?;
        if commands.is_empty() {
            return Ok(());
        }
        let count = commands.len();
        let answers = self.send(commands).await?;
        let failed = log_errors(&answers);
        info!(
            commands = count,
            failed, "Mosquitto accounts brought in step with the registry"
        );
        if failed > 0 {
            // Apply everything again next time.
            applied.clear();
        }
        Ok(())
    }

    /// Syncs every [`SYNC_EVERY`] while connected, until `stop`.
    pub async fn run(mut self, mut connected: watch::Receiver<bool>, stop: CancellationToken) {
        let mut applied = HashMap::new();
        loop {
            // (Re)connected: the plugin may have lost or gained state; apply all again.
            tokio::select! {
                () = stop.cancelled() => return,
                up = connected.wait_for(|up| *up) => if up.is_err() { return },
            }
            applied.clear();
            if let Err(e) = self.own_role().await {
                warn!(error = %e, "Could not give the bridge its Mosquitto role");
            }
            while *connected.borrow() {
                if let Err(e) = self.once(&mut applied).await {
                    warn!(error = %e, "Mosquitto accounts not synced");
                    applied.clear();
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(SYNC_EVERY) => {}
                    _ = connected.changed() => {}
                }
            }
        }
    }
}

/// Logs the answers that carry an error (but "already exists", which a re-run expects);
/// returns how many did.
fn log_errors(answers: &[Value]) -> usize {
    let mut failed = 0;
    for a in answers {
        if let Some(error) = a["error"].as_str() {
            if error.contains("already") {
                debug!(command = %a["command"], error, "Already in place");
                continue;
            }
            failed += 1;
            warn!(command = %a["command"], error, "Dynamic-security command failed");
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, enabled: bool, password: &str) -> RegisteredDevice {
        RegisteredDevice {
            device_id: id.into(),
            enabled,
            public_key: "k".into(),
            mqtt_password: Some(password.into()),
        }
    }

    fn names(commands: &[Value]) -> Vec<String> {
        commands
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["command"].as_str().unwrap(),
                    c["username"].as_str().or(c["rolename"].as_str()).unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn the_plan_follows_the_registry_and_touches_only_its_own_clients() {
        let mut applied = HashMap::new();
        let listed = HashMap::from([
            ("admin".to_string(), String::new()),
            ("gone".to_string(), MANAGED.to_string()),
        ]);
        let devices = [device("a", true, "pa"), device("b", false, "pb")];
        let first = plan(&devices, &listed, &mut applied).unwrap();
        assert_eq!(
            names(&first),
            [
                "createRole uplink-device-a",
                "createClient a",
                "createRole uplink-device-b",
                "createClient b",
                "disableClient b",
                "deleteClient gone",
                "deleteRole uplink-device-gone",
            ]
        );
        // Now both exist: nothing to do until something changes.
        let listed = HashMap::from([
            ("a".to_string(), MANAGED.to_string()),
            ("b".to_string(), MANAGED.to_string()),
        ]);
        assert!(plan(&devices, &listed, &mut applied).unwrap().is_empty());
        let changed = [device("a", false, "pa"), device("b", true, "pb2")];
        assert_eq!(
            names(&plan(&changed, &listed, &mut applied).unwrap()),
            ["disableClient a", "setClientPassword b", "enableClient b"]
        );
        // After a restart (nothing applied yet) every password and state is set once.
        assert_eq!(
            names(&plan(&changed, &listed, &mut HashMap::new()).unwrap()),
            [
                "setClientPassword a",
                "disableClient a",
                "setClientPassword b",
                "enableClient b"
            ]
        );
        // A client of that name the bridge did not make is left alone.
        let foreign = HashMap::from([("a".to_string(), "someone".to_string())]);
        assert!(
            plan(&[device("a", true, "pa")], &foreign, &mut HashMap::new())
                .unwrap()
                .is_empty()
        );
        let no_password = RegisteredDevice {
            mqtt_password: None,
            ..device("a", true, "")
        };
        assert!(matches!(
            plan(&[no_password], &listed, &mut HashMap::new()),
            Err(SyncError::NoPasswords)
        ));
    }

    #[test]
    fn a_device_role_allows_only_its_own_topics() {
        let role = device_role("robot-1");
        let acls = role["acls"].as_array().unwrap();
        for acl in acls {
            let topic = acl["topic"].as_str().unwrap();
            assert!(topic.starts_with("uplink/v1/devices/robot-1/"), "{topic}");
            assert_eq!(acl["allow"], true);
        }
        let published: Vec<&str> = acls
            .iter()
            .filter(|a| a["acltype"] == "publishClientSend")
            .map(|a| a["topic"].as_str().unwrap())
            .collect();
        assert_eq!(
            published,
            [
                "uplink/v1/devices/robot-1/req",
                "uplink/v1/devices/robot-1/cmd/ack",
                "uplink/v1/devices/robot-1/progress",
                "uplink/v1/devices/robot-1/status"
            ]
        );
    }
}
