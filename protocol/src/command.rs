//! Commands (cloud → device) and their acks (device → cloud).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Each id is executed once; a re-delivered command is answered with its earlier ack.
    pub command_id: Uuid,
    pub device_id: String,
    pub issued_at: i64,
    /// Unix seconds after which the device refuses the command.
    pub expires_at: i64,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    /// Upload the regular file at `path` (must be under one of the agent's allowed roots).
    Upload { path: String },
    /// Pause the job `job_id` (an upload command's id) after its in-flight parts.
    Pause { job_id: Uuid },
    /// Resume a paused job.
    Resume { job_id: Uuid },
    /// Cancel a job: in-flight parts stop and the session is aborted.
    Cancel { job_id: Uuid },
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Upload { .. } => "upload",
            Action::Pause { .. } => "pause",
            Action::Resume { .. } => "resume",
            Action::Cancel { .. } => "cancel",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckState {
    /// Verified and taken on.
    Accepted,
    /// Refused; `reason` says why. Final.
    Rejected,
    /// Carried out (for an upload: the object is complete and verified). Final.
    Done,
    /// Taken on but could not be carried out; `reason` says why. Final.
    Failed,
}

impl AckState {
    pub fn as_str(self) -> &'static str {
        match self {
            AckState::Accepted => "accepted",
            AckState::Rejected => "rejected",
            AckState::Done => "done",
            AckState::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, AckState::Accepted)
    }
}

/// Body of the `command.ack` op (on `cmd/ack`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAck {
    pub command_id: Uuid,
    pub state: AckState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = Uuid::new_v4();
        for action in [
            Action::Upload {
                path: "/data/a".into(),
            },
            Action::Pause { job_id: id },
            Action::Resume { job_id: id },
            Action::Cancel { job_id: id },
        ] {
            let cmd = Command {
                command_id: id,
                device_id: "d".into(),
                issued_at: 1,
                expires_at: 2,
                action,
            };
            let json = serde_json::to_string(&cmd).unwrap();
            assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), cmd);
        }
        let ack = CommandAck {
            command_id: id,
            state: AckState::Rejected,
            reason: Some("outside roots".into()),
            session_id: None,
        };
        let json = serde_json::to_value(&ack).unwrap();
        assert_eq!(json["state"], "rejected");
        assert_eq!(serde_json::from_value::<CommandAck>(json).unwrap(), ack);
    }

    #[test]
    fn action_wire_shape() {
        let a: Action = serde_json::from_str(r#"{"type":"upload","path":"/x"}"#).unwrap();
        assert_eq!(a, Action::Upload { path: "/x".into() });
        assert!(serde_json::from_str::<Action>(r#"{"type":"format_disk"}"#).is_err());
    }
}
