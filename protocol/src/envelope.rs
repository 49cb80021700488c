//! Envelopes: what travels on `req`, `res`, `cmd`, `cmd/ack` and `progress`.
//!
//! Signed payloads carry their body as a JSON *string*, so the exact signed bytes survive
//! any re-serialisation by the bridge or a broker, in any language.

use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::keyring::KeyRing;
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
/// `sig` is the control API's signature (its command key) over the device, request id,
/// status and answer (see [`answer_canonical`]); agents accept an unsigned answer only as
/// "retry later" (status 5xx, made by a bridge that could not reach the API). The bridge's
/// own 4xx refusals (`malformed_request`, `unknown_op`, `payload_too_large`) are unsigned
/// too; they are never the API's answer (docs/protocol.md says what a device does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub v: u32,
    pub request_id: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// JSON with object keys sorted at every level: the same value always gives the same text,
/// whatever order its producer wrote.
pub fn canonical_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        serde_json::to_string(k).unwrap_or_default(),
                        canonical_json(&map[k])
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(canonical_json)
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => other.to_string(),
    }
}

/// What the control API signs for an answer: device, request id, status and the SHA-256 of
/// the canonical answer JSON (the result, or the problem document).
pub fn answer_canonical(
    device_id: &str,
    request_id: &str,
    status: u16,
    answer: &serde_json::Value,
) -> String {
    format!(
        "uplink/v1/res\n{device_id}\n{request_id}\n{status}\n{}",
        crate::sha256_hex(canonical_json(answer).as_bytes())
    )
}

impl ResponseEnvelope {
    pub fn ok(request_id: &str, status: u16, result: serde_json::Value) -> Self {
        ResponseEnvelope {
            v: VERSION,
            request_id: request_id.into(),
            status,
            result: Some(result),
            problem: None,
            sig: None,
        }
    }

    pub fn problem(request_id: &str, problem: Problem) -> Self {
        ResponseEnvelope {
            v: VERSION,
            request_id: request_id.into(),
            status: problem.status,
            result: None,
            problem: Some(problem),
            sig: None,
        }
    }

    pub fn with_sig(mut self, sig: Option<String>) -> Self {
        self.sig = sig;
        self
    }

    /// The answer the signature covers.
    pub fn answer(&self) -> serde_json::Value {
        match (&self.result, &self.problem) {
            (_, Some(p)) => serde_json::to_value(p).unwrap_or_default(),
            (Some(r), None) => r.clone(),
            (None, None) => serde_json::Value::Null,
        }
    }

    /// Signs the answer for `device_id` (the control API).
    pub fn sign(mut self, key: &PrivateKey, device_id: &str) -> Self {
        self.sig = Some(crate::sign::sign_answer(
            key,
            &answer_canonical(device_id, &self.request_id, self.status, &self.answer()),
        ));
        self
    }

    /// Whether the control API signed this answer for `device_id` (with one of `keys`).
    pub fn verify(&self, keys: &impl KeyRing, device_id: &str) -> Result<(), SignError> {
        let sig = self.sig.as_deref().ok_or(SignError::Missing)?;
        let canonical = answer_canonical(device_id, &self.request_id, self.status, &self.answer());
        keys.verify_any(&|key| crate::sign::verify_answer(key, &canonical, sig))
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
        keys: &impl KeyRing,
        device_id: &str,
        now: i64,
    ) -> Result<Command, CommandError> {
        keys.verify_any(&|key| sign::verify_command(key, &self.command, &self.sig))?;
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
    fn answers_are_signed_for_one_device_and_survive_reordering() {
        let key = sign::generate();
        let public = key.verifying_key();
        let signed = ResponseEnvelope::ok(
            "r1",
            201,
            serde_json::json!({"b": [1, {"y": 2, "x": "é"}], "a": null}),
        )
        .sign(&key, "robot-17");
        // Through a bridge that re-serialises with keys in another order.
        let text = serde_json::to_string(&signed)
            .unwrap()
            .replace(r#""b":"#, r#""c":0,"b":"#);
        let mut back: ResponseEnvelope =
            serde_json::from_str(&serde_json::to_string(&signed).unwrap()).unwrap();
        assert!(back.verify(&public, "robot-17").is_ok());
        assert_eq!(back.verify(&public, "robot-18"), Err(SignError::Mismatch));
        let forged: ResponseEnvelope = serde_json::from_str(&text).unwrap();
        assert_eq!(forged.verify(&public, "robot-17"), Err(SignError::Mismatch));
        back.status = 200;
        assert_eq!(back.verify(&public, "robot-17"), Err(SignError::Mismatch));
        let problem = ResponseEnvelope::problem("r2", Problem::new(409, "x", "Conflict", None))
            .sign(&key, "d");
        let back: ResponseEnvelope =
            serde_json::from_str(&serde_json::to_string(&problem).unwrap()).unwrap();
        assert!(back.verify(&public, "d").is_ok());
        assert_eq!(
            ResponseEnvelope::ok("r3", 200, serde_json::json!({})).verify(&public, "d"),
            Err(SignError::Missing)
        );
        let mut reordered = serde_json::Map::new();
        reordered.insert("z".into(), 1.into());
        reordered.insert("a".into(), 2.into());
        assert_eq!(
            canonical_json(&serde_json::Value::Object(reordered)),
            r#"{"a":2,"z":1}"#
        );
    }

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
