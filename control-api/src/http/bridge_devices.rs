//! `GET /v1/bridge/devices`: the registry as the bridge mirrors it. The embedded broker's
//! gate closes the connections of devices that are no longer enabled; the Mosquitto
//! dynamic-security sync gives each enabled device a client and disables the others.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::openapi;
use crate::AppState;

#[derive(Serialize, utoipa::ToSchema)]
pub struct RegisteredDevice {
    pub device_id: String,
    pub enabled: bool,
    /// Base64 Ed25519 public key.
    pub public_key: String,
    /// Its static Mosquitto password, when the API derives them (`mqtt_password_secret`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_password: Option<String>,
}

/// Every registered device with whether it is enabled and its key.
#[utoipa::path(
    get,
    path = "/v1/bridge/devices",
    tag = "bridge",
    responses(
        (status = 200, description = "Every registered device", body = [RegisteredDevice]),
        (status = 401, response = openapi::Unauthorized),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("bridge" = []))
)]
pub async fn devices(State(st): State<AppState>) -> Result<Json<Vec<RegisteredDevice>>, ApiError> {
    let devices = st.store.devices(None).await?;
    Ok(Json(
        devices
            .into_iter()
            .map(|d| RegisteredDevice {
                mqtt_password: crate::mqtt_login::password_of(
                    &st.config,
                    &d.device_id,
                    &d.public_key,
                ),
                device_id: d.device_id,
                enabled: d.enabled,
                public_key: d.public_key,
            })
            .collect(),
    ))
}
