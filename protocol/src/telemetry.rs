//! Progress (body of the `progress` op) and presence (`status`, retained).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Agent job states.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Hashing,
    Open,
    Uploading,
    Paused,
    Completing,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 9] = [
        JobState::Queued,
        JobState::Hashing,
        JobState::Open,
        JobState::Uploading,
        JobState::Paused,
        JobState::Completing,
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Hashing => "hashing",
            JobState::Open => "open",
            JobState::Uploading => "uploading",
            JobState::Paused => "paused",
            JobState::Completing => "completing",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub job_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Uuid>,
    pub state: JobState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Recent upload rate in bytes per second.
    pub rate_bps: u64,
    /// Why no part moves although the job has parts left: `upload_window` (outside every
    /// configured upload window). Absent when parts may move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Online,
    Offline,
}

/// Retained presence on `status`; the Last Will carries `offline`. Signed by the device
/// (`sig`, over [`Status::canonical`]) so that no one else can set its presence.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub v: u32,
    pub state: Presence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_disk_bytes: Option<u64>,
    /// Unix milliseconds at which the device's MQTT connection began: the `online` status
    /// and the Last Will of one connection carry the same value; a clean goodbye carries
    /// its own time. The API keeps the newest (`ts_ms`, then `offline` after `online`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_ms: Option<i64>,
    /// How far the device's clock is from the API's, in seconds (device minus API:
    /// positive when the device is ahead), as the device last measured it from the API's
    /// signed answers. Covered by the signature like every other field; a device sends it
    /// only once an answer showed the API knows it (an API that predates it drops it and
    /// the signature would no longer verify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_secs: Option<i64>,
    /// Base64 Ed25519 signature by the device key over [`Status::canonical`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

impl Status {
    /// What the signature covers: the device and every field but `sig`, as canonical JSON
    /// (sorted keys), so a status re-serialised by the bridge still verifies.
    pub fn canonical(&self, device_id: &str) -> String {
        let unsigned = Status {
            sig: None,
            ..self.clone()
        };
        let value = serde_json::to_value(&unsigned).unwrap_or_default();
        format!(
            "uplink/v1/status\n{device_id}\n{}",
            crate::envelope::canonical_json(&value)
        )
    }

    /// The status signed by `device_id`'s key.
    pub fn signed(self, key: &crate::sign::PrivateKey, device_id: &str) -> Status {
        let sig = crate::sign::sign_status(key, &self.canonical(device_id));
        Status {
            sig: Some(sig),
            ..self
        }
    }

    /// Checks the signature with the device's public key.
    pub fn verify(
        &self,
        key: &crate::sign::PublicKey,
        device_id: &str,
    ) -> Result<(), crate::sign::SignError> {
        let sig = self
            .sig
            .as_deref()
            .ok_or(crate::sign::SignError::BadSignatureEncoding)?;
        crate::sign::verify_status(key, &self.canonical(device_id), sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let p = Progress {
            job_id: Uuid::new_v4(),
            session_id: None,
            state: JobState::Uploading,
            bytes_done: 5,
            bytes_total: 10,
            rate_bps: 1,
            waiting_for: Some("upload_window".into()),
        };
        assert_eq!(
            serde_json::from_str::<Progress>(&serde_json::to_string(&p).unwrap()).unwrap(),
            p
        );
        let s = Status {
            v: 1,
            state: Presence::Offline,
            agent_version: None,
            queue_depth: None,
            free_disk_bytes: None,
            ts_ms: None,
            clock_offset_secs: None,
            sig: None,
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"v":1,"state":"offline"}"#
        );
        assert_eq!(
            serde_json::from_str::<Status>(r#"{"v":1,"state":"online","queue_depth":3}"#)
                .unwrap()
                .queue_depth,
            Some(3)
        );
        // Signed by one device: verifies for it, after a round trip through JSON with the
        // keys reordered; not for another device, another key, or with a changed field.
        let key = crate::sign::generate();
        let signed = Status {
            ts_ms: Some(1_700_000_000_123),
            queue_depth: Some(2),
            ..s
        }
        .signed(&key, "robot-17");
        let value = serde_json::to_value(&signed).unwrap();
        let reordered = format!(
            r#"{{"sig":{},"ts_ms":1700000000123,"queue_depth":2,"state":"offline","v":1}}"#,
            value["sig"]
        );
        let back: Status = serde_json::from_str(&reordered).unwrap();
        assert!(back.verify(&key.verifying_key(), "robot-17").is_ok());
        assert!(back.verify(&key.verifying_key(), "robot-18").is_err());
        assert!(back
            .verify(&crate::sign::generate().verifying_key(), "robot-17")
            .is_err());
        for changed in [
            Status {
                state: Presence::Online,
                ..back.clone()
            },
            Status {
                ts_ms: Some(1_700_000_000_124),
                ..back.clone()
            },
            Status {
                queue_depth: None,
                ..back.clone()
            },
            Status {
                clock_offset_secs: Some(-240),
                ..back.clone()
            },
            Status {
                sig: None,
                ..back.clone()
            },
        ] {
            assert!(
                changed.verify(&key.verifying_key(), "robot-17").is_err(),
                "{changed:?}"
            );
        }
        for st in JobState::ALL {
            assert_eq!(JobState::parse(st.as_str()), Some(st));
        }
    }
}
