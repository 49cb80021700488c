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

/// Retained presence on `status`; the Last Will carries `offline`.
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
        for st in JobState::ALL {
            assert_eq!(JobState::parse(st.as_str()), Some(st));
        }
    }
}
