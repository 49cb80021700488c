//! `GET /v1/bridge/devices`: the device registry as the bridge needs it (the gate of the
//! embedded broker closes disabled devices' connections; the Mosquitto dynamic-security
//! sync mirrors it).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{check, ApiClient, ApiError};

/// One registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredDevice {
    pub device_id: String,
    pub enabled: bool,
    /// Base64 Ed25519 public key.
    pub public_key: String,
    /// Its static Mosquitto password, when the API derives them (`mqtt_password_secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_password: Option<String>,
}

impl ApiClient {
    /// Every registered device.
    pub async fn devices(&self) -> Result<Vec<RegisteredDevice>, ApiError> {
        const WHAT: &str = "devices";
        let req = self.bridge_request(reqwest::Method::GET, "/v1/bridge/devices");
        let res = self.send(req).await?;
        let res = check(WHAT, res).await?;
        res.json().await.map_err(|e| ApiError::Decode {
            what: WHAT,
            reason: e.to_string(),
        })
    }

    /// The ids of the enabled devices.
    pub async fn enabled_devices(&self) -> Result<HashSet<String>, ApiError> {
        Ok(self
            .devices()
            .await?
            .into_iter()
            .filter(|d| d.enabled)
            .map(|d| d.device_id)
            .collect())
    }
}
