//! Envelopes: what travels on `req`, `res`, `cmd`, `cmd/ack` and `progress`.
//!
//! Signed payloads carry their body as a JSON *string*, so the exact signed bytes survive
//! any re-serialisation by the bridge or a broker, in any language.

use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::problem::Problem;
use crate::sign::{self, PrivateKey, PublicKey, RequestToSign, SignError};
use crate::VERSION;

/// Largest MQTT payload or device HTTP body the cloud side accepts.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// A device-signed request (on `req`, `cmd/ack` and `progress`). The device id is the
/// topic's (MQTT) or the `X-Uplink-Device` header's (HTTP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub v: u32,
    /// Idempotency key: the same id with the same body gets the same answer.
    pub request_id: String,
    pub op: String,
    /// Unix seconds when signed; outside the replay window the request is refused.
    pub ts: i64,
    /// The op's JSON body, as a string.
    pub body: String,
    /// Base64 Ed25519 signature of [`RequestToSign::canonical`].
    pub sig: String,
}

impl RequestEnvelope {
    /// Builds and signs a request.
    pub fn sign(
        key: &PrivateKey,
        device_id: &str,
        op: &str,
        request_id: &str,
        ts: i64,
        body: String,
    ) -> Self {
        let sig = RequestToSign {
            device_id,
            op,
            request_id,
            ts,
            body: &body,
        }
        .sign(key);
        RequestEnvelope {
            v: VERSION,
            request_id: request_id.to_string(),
            op: op.to_string(),
            ts,
            body,
            sig,
        }
    }

    pub fn verify(&self, key: &PublicKey, device_id: &str) -> Result<(), SignError> {
        RequestToSign {
            device_id,
            op: &self.op,
            request_id: &self.request_id,
            ts: self.ts,
            body: &self.body,
        }
        .verify(key, &self.sig)
    }
}

/// The answer to a request, on `res`: `result` when `status` < 400, else `problem`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub v: u32,
    pub request_id: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

impl ResponseEnvelope {
    pub fn ok(request_id: &str, status: u16, result: serde_json::Value) -> Self {
        ResponseEnvelope {
            v: VERSION,
            request_id: request_id.into(),
            status,
            result: Some(result),
            problem: None,
        }
    }

    pub fn problem(request_id: &str, problem: Problem) -> Self {
        ResponseEnvelope {
            v: VERSION,
            request_id: request_id.into(),
            status: problem.status,
            result: None,
            problem: Some(problem),
        }
    }
}

/// A control-API-signed command, on `cmd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    pub v: u32,
    /// The [`Command`] as a JSON string.
    pub command: String,
    /// Base64 Ed25519 signature of `uplink/v1/cmd\n` + `command`.
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command signature: {0}")]
    Signature(#[from] SignError),
    #[error("command is not valid JSON: {0}")]
    Malformed(String),
    #[error("command is for device {0}")]
    WrongDevice(String),
    #[error("command expired at {0}")]
    Expired(i64),
}

impl CommandEnvelope {
    pub fn sign(key: &PrivateKey, command: &Command) -> Self {
        let json = serde_json::to_string(command).unwrap_or_default();
        let sig = sign::sign_command(key, &json);
        CommandEnvelope {
            v: VERSION,
            command: json,
            sig,
        }
    }

    /// Checks signature, device and expiry, and returns the command. Whether the id was
    /// seen before is the receiver's to check.
    pub fn open(
        &self,
        key: &PublicKey,
        device_id: &str,
        now: i64,
    ) -> Result<Command, CommandError> {
        sign::verify_command(key, &self.command, &self.sig)?;
        let command: Command = serde_json::from_str(&self.command)
            .map_err(|e| CommandError::Malformed(e.to_string()))?;
        if command.device_id != device_id {
            return Err(CommandError::WrongDevice(command.device_id));
        }
        if command.expires_at < now {
            return Err(CommandError::Expired(command.expires_at));
        }
        Ok(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Action;
    use uuid::Uuid;

    #[test]
    fn request_round_trip_and_verify() {
        let key = sign::generate();
        let env = RequestEnvelope::sign(
            &key,
            "robot-17",
            "session.status",
            "req-1",
            100,
            "{\"x\":1}".into(),
        );
        let json = serde_json::to_string(&env).unwrap();
        let back: RequestEnvelope = serde_json::from_str(&json).unwrap();
        assert_eq!(back, env);
        assert!(back.verify(&key.verifying_key(), "robot-17").is_ok());
        assert!(back.verify(&key.verifying_key(), "robot-18").is_err());
        let mut tampered = back.clone();
        tampered.body = "{\"x\":2}".into();
        assert!(tampered.verify(&key.verifying_key(), "robot-17").is_err());
    }

    #[test]
    fn response_round_trip() {
        let ok = ResponseEnvelope::ok("r", 201, serde_json::json!({"a": 1}));
        assert_eq!(
            serde_json::from_str::<ResponseEnvelope>(&serde_json::to_string(&ok).unwrap()).unwrap(),
            ok
        );
        let bad = ResponseEnvelope::problem("r", Problem::new(404, "not_found", "Not found", None));
        let json = serde_json::to_value(&bad).unwrap();
        assert_eq!(json["status"], 404);
        assert!(json.get("result").is_none());
        assert_eq!(
            serde_json::from_value::<ResponseEnvelope>(json).unwrap(),
            bad
        );
    }

    #[test]
    fn commands_open_only_for_their_device_before_expiry() {
        let key = sign::generate();
        let cmd = Command {
            command_id: Uuid::new_v4(),
            device_id: "robot-17".into(),
            issued_at: 100,
            expires_at: 200,
            action: Action::Upload {
                path: "/data/rec/run-042.mcap".into(),
                priority: None,
            },
        };
        let env = CommandEnvelope::sign(&key, &cmd);
        let back: CommandEnvelope =
            serde_json::from_str(&serde_json::to_string(&env).unwrap()).unwrap();
        assert_eq!(back.open(&key.verifying_key(), "robot-17", 150), Ok(cmd));
        assert_eq!(
            back.open(&key.verifying_key(), "robot-18", 150),
            Err(CommandError::WrongDevice("robot-17".into()))
        );
        assert_eq!(
            back.open(&key.verifying_key(), "robot-17", 201),
            Err(CommandError::Expired(200))
        );
        let other = sign::generate();
        assert!(matches!(
            back.open(&other.verifying_key(), "robot-17", 150),
            Err(CommandError::Signature(_))
        ));
    }
}
