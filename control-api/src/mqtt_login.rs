//! Mosquitto logins of devices, for the bridge's dynamic-security sync
//! (`mqtt_password_secret`): Mosquitto cannot check the time-stamped password an agent
//! signs with its key, so with Mosquitto each device has a static password. It is derived,
//! not stored: HMAC-SHA256 over the device id and its public key under the secret, so a
//! key rotation changes it, and nothing but the secret needs keeping. The operator gets it
//! when registering the device or changing it (`POST /v1/devices`, `PATCH
//! /v1/devices/{id}`) and gives it to the gateway (`[mqtt] password_file`); the bridge
//! gets every device's from `GET /v1/bridge/devices` and gives it to Mosquitto.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{Config, Secret};

/// The Mosquitto password of `device_id` with `public_key`, when `config` has an
/// `mqtt_password_secret`.
pub fn password_of(config: &Config, device_id: &str, public_key: &str) -> Option<String> {
    config
        .mqtt_password_secret
        .as_ref()
        .map(|secret| mqtt_password(secret, device_id, public_key))
}

/// The Mosquitto password of `device_id` with `public_key` (base64 of 32 bytes: 43
/// characters of the URL-safe alphabet).
pub fn mqtt_password(secret: &Secret, device_id: &str, public_key: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(format!("uplink/v1/mqtt-password\n{device_id}\n{public_key}").as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_follow_the_device_its_key_and_the_secret() {
        let secret = Secret::new("a-secret-of-sixteen-or-more");
        let p = mqtt_password(&secret, "robot-1", "KEY1");
        assert_eq!(p.len(), 43);
        assert_eq!(p, mqtt_password(&secret, "robot-1", "KEY1"));
        for other in [
            mqtt_password(&secret, "robot-2", "KEY1"),
            mqtt_password(&secret, "robot-1", "KEY2"),
            mqtt_password(&Secret::new("another-secret-0123456"), "robot-1", "KEY1"),
        ] {
            assert_ne!(p, other);
        }
    }
}
