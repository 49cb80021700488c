//! Ed25519 keys and the canonical strings that are signed.
//!
//! Keys travel as standard base64 of their 32 raw bytes (private key files hold the
//! 32-byte seed the same way). Signatures are standard base64 of 64 bytes.
//!
//! | what | canonical string (lines joined by `\n`) |
//! |---|---|
//! | device request | `uplink/v1/req`, device id, op, request id, timestamp, hex SHA-256 of the body |
//! | command | `uplink/v1/cmd`, then the command JSON exactly as sent |
//! | MQTT password | `uplink/v1/mqtt`, device id, timestamp |

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

pub use ed25519_dalek::{SigningKey as PrivateKey, VerifyingKey as PublicKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("key is not base64 of 32 bytes")]
    BadKey,
    #[error("signature is not base64 of 64 bytes")]
    BadSignatureEncoding,
    #[error("signature does not match")]
    Mismatch,
    #[error("MQTT password is not of the form v1.<timestamp>.<signature>")]
    BadPassword,
    #[error("not signed")]
    Missing,
}

/// A fresh key pair from the operating system's random source.
pub fn generate() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

pub fn encode_private(key: &SigningKey) -> String {
    B64.encode(key.to_bytes())
}

pub fn encode_public(key: &VerifyingKey) -> String {
    B64.encode(key.to_bytes())
}

pub fn decode_private(text: &str) -> Result<SigningKey, SignError> {
    let bytes: [u8; 32] = B64
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SignError::BadKey)?;
    Ok(SigningKey::from_bytes(&bytes))
}

pub fn decode_public(text: &str) -> Result<VerifyingKey, SignError> {
    let bytes: [u8; 32] = B64
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SignError::BadKey)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| SignError::BadKey)
}

fn sign_text(key: &SigningKey, text: &str) -> String {
    B64.encode(key.sign(text.as_bytes()).to_bytes())
}

fn verify_text(key: &VerifyingKey, text: &str, sig: &str) -> Result<(), SignError> {
    let bytes: [u8; 64] = B64
        .decode(sig.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SignError::BadSignatureEncoding)?;
    key.verify(text.as_bytes(), &Signature::from_bytes(&bytes))
        .map_err(|_| SignError::Mismatch)
}

/// The signed fields of a device request.
#[derive(Debug, Clone, Copy)]
pub struct RequestToSign<'a> {
    pub device_id: &'a str,
    pub op: &'a str,
    pub request_id: &'a str,
    pub ts: i64,
    pub body: &'a str,
}

impl RequestToSign<'_> {
    pub fn canonical(&self) -> String {
        format!(
            "uplink/v1/req\n{}\n{}\n{}\n{}\n{}",
            self.device_id,
            self.op,
            self.request_id,
            self.ts,
            crate::sha256_hex(self.body.as_bytes())
        )
    }

    pub fn sign(&self, key: &SigningKey) -> String {
        sign_text(key, &self.canonical())
    }

    pub fn verify(&self, key: &VerifyingKey, sig: &str) -> Result<(), SignError> {
        verify_text(key, &self.canonical(), sig)
    }
}

fn command_canonical(command_json: &str) -> String {
    format!("uplink/v1/cmd\n{command_json}")
}

pub fn sign_command(key: &SigningKey, command_json: &str) -> String {
    sign_text(key, &command_canonical(command_json))
}

pub fn verify_command(key: &VerifyingKey, command_json: &str, sig: &str) -> Result<(), SignError> {
    verify_text(key, &command_canonical(command_json), sig)
}

/// Signs an answer's canonical text (see [`crate::envelope::answer_canonical`]) with the
/// command key.
pub fn sign_answer(key: &SigningKey, canonical: &str) -> String {
    sign_text(key, canonical)
}

pub fn verify_answer(key: &VerifyingKey, canonical: &str, sig: &str) -> Result<(), SignError> {
    verify_text(key, canonical, sig)
}

/// Signs a presence status's canonical text (see [`crate::telemetry::Status::canonical`])
/// with the device key.
pub fn sign_status(key: &SigningKey, canonical: &str) -> String {
    sign_text(key, canonical)
}

pub fn verify_status(key: &VerifyingKey, canonical: &str, sig: &str) -> Result<(), SignError> {
    verify_text(key, canonical, sig)
}

fn mqtt_canonical(device_id: &str, ts: i64) -> String {
    format!("uplink/v1/mqtt\n{device_id}\n{ts}")
}

/// The MQTT password a device presents to a broker that checks it against the registry:
/// `v1.<unix seconds>.<signature>`; the username and client id are the device id.
pub fn mqtt_password(key: &SigningKey, device_id: &str, ts: i64) -> String {
    format!("v1.{ts}.{}", sign_text(key, &mqtt_canonical(device_id, ts)))
}

/// Verifies an MQTT password and returns its timestamp (the caller checks its age).
pub fn verify_mqtt_password(
    key: &VerifyingKey,
    device_id: &str,
    password: &str,
) -> Result<i64, SignError> {
    let rest = password.strip_prefix("v1.").ok_or(SignError::BadPassword)?;
    let (ts, sig) = rest.split_once('.').ok_or(SignError::BadPassword)?;
    let ts: i64 = ts.parse().map_err(|_| SignError::BadPassword)?;
    verify_text(key, &mqtt_canonical(device_id, ts), sig)?;
    Ok(ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> RequestToSign<'_> {
        RequestToSign {
            device_id: "robot-17",
            op: "session.create",
            request_id: "r1",
            ts: 1_700_000_000,
            body,
        }
    }

    #[test]
    fn request_signatures_bind_every_field() {
        let key = generate();
        let public = key.verifying_key();
        let sig = req("{}").sign(&key);
        assert_eq!(req("{}").verify(&public, &sig), Ok(()));
        assert_eq!(req("{ }").verify(&public, &sig), Err(SignError::Mismatch));
        for changed in [
            RequestToSign {
                device_id: "robot-18",
                ..req("{}")
            },
            RequestToSign {
                op: "session.abort",
                ..req("{}")
            },
            RequestToSign {
                request_id: "r2",
                ..req("{}")
            },
            RequestToSign {
                ts: 1_700_000_001,
                ..req("{}")
            },
        ] {
            assert_eq!(changed.verify(&public, &sig), Err(SignError::Mismatch));
        }
        let other = generate();
        assert_eq!(
            req("{}").verify(&other.verifying_key(), &sig),
            Err(SignError::Mismatch)
        );
        assert_eq!(
            req("{}").verify(&public, "not base64!"),
            Err(SignError::BadSignatureEncoding)
        );
    }

    #[test]
    fn keys_round_trip() {
        let key = generate();
        let back = decode_private(&encode_private(&key)).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
        let public = decode_public(&encode_public(&key.verifying_key())).unwrap();
        assert_eq!(public, key.verifying_key());
        assert_eq!(decode_public("AAAA").unwrap_err(), SignError::BadKey);
        assert_eq!(decode_private("%%").unwrap_err(), SignError::BadKey);
    }

    #[test]
    fn commands_and_mqtt_passwords() {
        let key = generate();
        let public = key.verifying_key();
        let sig = sign_command(&key, "{\"a\":1}");
        assert!(verify_command(&public, "{\"a\":1}", &sig).is_ok());
        assert!(verify_command(&public, "{\"a\":2}", &sig).is_err());

        let pw = mqtt_password(&key, "robot-17", 42);
        assert_eq!(verify_mqtt_password(&public, "robot-17", &pw), Ok(42));
        assert_eq!(
            verify_mqtt_password(&public, "robot-18", &pw),
            Err(SignError::Mismatch)
        );
        assert_eq!(
            verify_mqtt_password(&public, "robot-17", "secret"),
            Err(SignError::BadPassword)
        );
    }
}
