//! Commands (cloud → device) and their acks (device → cloud).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::flow::FlowConfig;

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

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    /// Upload the regular file at `path` (must be under one of the agent's allowed roots).
    Upload {
        path: String,
        /// 0 (lowest) to 9 (highest); absent = 5. When PUT slots are scarce, parts of
        /// higher-priority jobs go first; equal priorities go first come, first served.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        priority: Option<u8>,
    },
    /// Pause the job `job_id` (an upload command's id) after its in-flight parts.
    Pause { job_id: Uuid },
    /// Resume a paused job.
    Resume { job_id: Uuid },
    /// Cancel a job: in-flight parts stop and the session is aborted.
    Cancel { job_id: Uuid },
    /// Change the agent's flow control at run time (bandwidth cap, upload windows,
    /// concurrency); kept until a later `config` command with `reset` drops it.
    Config(FlowConfig),
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Upload { .. } => "upload",
            Action::Pause { .. } => "pause",
            Action::Resume { .. } => "resume",
            Action::Cancel { .. } => "cancel",
            Action::Config(_) => "config",
        }
    }

    /// Checks the fields the wire types cannot (priority range, config values).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Action::Upload {
                priority: Some(p), ..
            } => crate::flow::check_priority(*p).map(|_| ()),
            Action::Config(c) => c.validate(),
            _ => Ok(()),
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
                priority: None,
            },
            Action::Upload {
                path: "/data/b".into(),
                priority: Some(9),
            },
            Action::Config(FlowConfig {
                max_upload_bytes_per_sec: Some(65536),
                upload_windows: Some(vec!["22:00-06:00".into()]),
                ..FlowConfig::default()
            }),
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
        assert_eq!(
            a,
            Action::Upload {
                path: "/x".into(),
                priority: None
            }
        );
        let a: Action =
            serde_json::from_str(r#"{"type":"upload","path":"/x","priority":7}"#).unwrap();
        assert_eq!(a.validate(), Ok(()));
        let a: Action =
            serde_json::from_str(r#"{"type":"upload","path":"/x","priority":12}"#).unwrap();
        assert!(a.validate().unwrap_err().contains("priority 12"));
        let a: Action =
            serde_json::from_str(r#"{"type":"config","concurrency":1,"upload_windows":[]}"#)
                .unwrap();
        assert_eq!(a.kind(), "config");
        assert_eq!(a.validate(), Ok(()));
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            serde_json::json!({"type":"config","concurrency":1,"upload_windows":[]})
        );
        assert!(serde_json::from_str::<Action>(r#"{"type":"config","bandwidth":1}"#).is_err());
        let a: Action = serde_json::from_str(r#"{"type":"config"}"#).unwrap();
        assert!(a.validate().is_err());
        assert!(serde_json::from_str::<Action>(r#"{"type":"format_disk"}"#).is_err());
    }
}
