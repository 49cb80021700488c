//! Device request ops. Each op has an HTTP twin, `POST /v1/device/{op}`, with the same body.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Most parts one `parts.presign` request may ask for (keeps answers well under the 64 KiB MQTT payload limit).
pub const MAX_PRESIGN_BATCH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    SessionCreate,
    PartsPresign,
    SessionStatus,
    SessionComplete,
    SessionAbort,
    /// Ack of a command (sent on `cmd/ack`).
    CommandAck,
    /// Progress report (sent on `progress`).
    Progress,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::SessionCreate,
        Op::PartsPresign,
        Op::SessionStatus,
        Op::SessionComplete,
        Op::SessionAbort,
        Op::CommandAck,
        Op::Progress,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::SessionCreate => "session.create",
            Op::PartsPresign => "parts.presign",
            Op::SessionStatus => "session.status",
            Op::SessionComplete => "session.complete",
            Op::SessionAbort => "session.abort",
            Op::CommandAck => "command.ack",
            Op::Progress => "progress",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == s)
    }

    /// Path of the op on the control API's device HTTP API.
    pub fn http_path(self) -> String {
        format!("/v1/device/{}", self.as_str())
    }
}

/// `session.create`: open an upload session for a hashed file.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSession {
    /// The agent's job id (for command-started jobs, the upload command's id).
    pub job_id: Uuid,
    /// The upload command that started the job, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<Uuid>,
    /// File name (no directories) used in the object key.
    pub file_name: String,
    /// Dataset label (a directory watch's `dataset`); when present it becomes a segment of
    /// the object key (see [`valid_dataset`]). Absent for commands and `uplink-agent upload`,
    /// and from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    pub size: u64,
    /// Hex SHA-256 of the whole file, when the device hashed it before creating the
    /// session: then the API can answer with a stored copy (deduplication). Absent when the
    /// device hashes while its parts upload; the whole file's SHA-256 then arrives in the
    /// `session.complete` manifest, which is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Part size the agent hashed with; must pass [`crate::plan::validate`].
    pub part_size: u64,
    /// The part digest the device would rather send (`sha256`); the answer's
    /// `part_checksum` says which one the session uses. Absent: `md5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_checksum: Option<PartChecksum>,
}

/// The digest each part is presigned with (signed into its URL, so the URL admits only the
/// part's exact bytes): `sha256` as `x-amz-checksum-sha256` where storage checks it,
/// else `md5` as `Content-MD5`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartChecksum {
    #[default]
    Md5,
    Sha256,
}

impl PartChecksum {
    pub fn as_str(self) -> &'static str {
        match self {
            PartChecksum::Md5 => "md5",
            PartChecksum::Sha256 => "sha256",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "md5" => Some(PartChecksum::Md5),
            "sha256" => Some(PartChecksum::Sha256),
            _ => None,
        }
    }

    /// Bytes in the digest (before base64).
    pub fn digest_len(self) -> usize {
        match self {
            PartChecksum::Md5 => 16,
            PartChecksum::Sha256 => 32,
        }
    }
}

/// Longest dataset label.
pub const MAX_DATASET_LEN: usize = 64;

/// Whether `label` may name a dataset: 1-64 of `A-Z a-z 0-9 . _ -`, not starting with a dot
/// (it becomes one segment of an object key, so no `/`, no `.`/`..`).
pub fn valid_dataset(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= MAX_DATASET_LEN
        && !label.starts_with('.')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One part's digest in the session's [`PartChecksum`], standard base64: `md5` (16 bytes,
/// as in `Content-MD5`) or `sha256` (32 bytes, as in `x-amz-checksum-sha256`); exactly one.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartDigest {
    pub number: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl PartDigest {
    pub fn new(number: u32, checksum: PartChecksum, digest: String) -> Self {
        let (md5, sha256) = match checksum {
            PartChecksum::Md5 => (Some(digest), None),
            PartChecksum::Sha256 => (None, Some(digest)),
        };
        PartDigest {
            number,
            md5,
            sha256,
        }
    }

    /// The digest when it is the one `checksum` asks for and the only one.
    pub fn digest(&self, checksum: PartChecksum) -> Option<&str> {
        match (checksum, &self.md5, &self.sha256) {
            (PartChecksum::Md5, Some(d), None) | (PartChecksum::Sha256, None, Some(d)) => Some(d),
            _ => None,
        }
    }
}

/// `parts.presign`: URLs for up to [`MAX_PRESIGN_BATCH`] parts.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresignParts {
    pub session_id: Uuid,
    pub parts: Vec<PartDigest>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresignedPart {
    pub number: u32,
    /// HTTP method to use (`PUT`).
    pub method: String,
    pub url: String,
    /// Headers that must be sent exactly (they are signed into the URL), e.g. `content-md5`.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Vec<String>>))]
    pub headers: Vec<(String, String)>,
    /// Unix seconds after which the URL no longer works, by the API's clock (a device's
    /// clock may be off: judge the URL by `expires_in_secs` when present).
    pub expires_at: i64,
    /// The URL's lifetime in seconds from when the API made it. A device renews the URL a
    /// margin before this has passed, measured with its monotonic clock from when it sent
    /// the request, so a wrong device clock does not matter. Absent from APIs that predate
    /// it (then only `expires_at` is there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresignedParts {
    pub session_id: Uuid,
    pub parts: Vec<PresignedPart>,
}

/// `session.status`, `session.complete`, `session.abort`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    pub session_id: Uuid,
}

/// `session.complete`: the session, and the device's manifest of the file. The request is
/// signed by the device, so the stored request is the file's chain of custody.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteSession {
    pub session_id: Uuid,
    /// Absent from agents that predate manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<FileManifest>,
}

/// What the device says it uploaded.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileManifest {
    pub device_id: String,
    pub session_id: Uuid,
    /// The file's path on the device.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the whole file. May be absent only in a session with `sha256` part
    /// checksums that was created without it: the API then takes the digest of the stored
    /// object, whose every part the signed checksums bind to the device's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub part_count: u32,
    /// [`parts_digest`] of the part digests (the session's [`PartChecksum`]).
    pub parts_digest: String,
}

/// Hex SHA-256 over `"{number}:{digest}\n"` for each part in order (digests as base64, as
/// sent to `parts.presign`): binds every part into a manifest small enough for one message.
pub fn parts_digest<'a>(parts: impl IntoIterator<Item = (u32, &'a str)>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (n, digest) in parts {
        h.update(format!("{n}:{digest}\n").as_bytes());
    }
    hex::encode(h.finalize())
}

/// Session states (see `docs/architecture.md`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Created,
    Uploading,
    Paused,
    Completing,
    Completed,
    Aborted,
    Expired,
    Failed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Created => "created",
            SessionState::Uploading => "uploading",
            SessionState::Paused => "paused",
            SessionState::Completing => "completing",
            SessionState::Completed => "completed",
            SessionState::Aborted => "aborted",
            SessionState::Expired => "expired",
            SessionState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        use SessionState::*;
        [
            Created, Uploading, Paused, Completing, Completed, Aborted, Expired, Failed,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SessionState::Completed
                | SessionState::Aborted
                | SessionState::Expired
                | SessionState::Failed
        )
    }
}

/// A part that storage already holds.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPart {
    pub number: u32,
    pub size: u64,
    pub etag: String,
}

/// The answer to `session.create`, `session.status`, `session.complete` and `session.abort`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: Uuid,
    pub state: SessionState,
    pub bucket: String,
    pub object_key: String,
    pub size: u64,
    pub part_size: u64,
    pub part_count: u32,
    /// The digest the parts are presigned with (`md5` from APIs that predate it).
    #[serde(default)]
    pub part_checksum: PartChecksum,
    /// Parts storage holds (filled by `session.status`; empty elsewhere).
    #[serde(default)]
    pub stored_parts: Vec<StoredPart>,
    /// Hex SHA-256 recorded at completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the dataset has a validator: `pending`, `accepted` or `rejected` (after
    /// completion; an object that is not yet completed has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<String>,
    /// Why the object was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use std::fmt::Debug;

    pub(crate) fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T) {
        let json = serde_json::to_string(&value).unwrap();
        let back: T = serde_json::from_str(&json).unwrap();
        assert_eq!(back, value, "{json}");
    }

    #[test]
    fn ops_parse() {
        for op in Op::ALL {
            assert_eq!(Op::parse(op.as_str()), Some(op));
        }
        assert_eq!(Op::parse("session.delete"), None);
        assert_eq!(Op::SessionCreate.http_path(), "/v1/device/session.create");
    }

    #[test]
    fn create_session_without_dataset_still_parses() {
        // What agents that predate datasets send.
        let id = Uuid::new_v4();
        let old = format!(
            r#"{{"job_id":"{id}","file_name":"a.bin","size":1,"sha256":"{}","part_size":5242880}}"#,
            "ab".repeat(32)
        );
        let body: CreateSession = serde_json::from_str(&old).unwrap();
        assert_eq!(body.dataset, None);
        let json = serde_json::to_string(&body).unwrap();
        assert!(!json.contains("dataset"), "{json}");
    }

    #[test]
    fn dataset_labels() {
        for ok in ["a", "field-tests", "run_2024.11", &"x".repeat(64)] {
            assert!(valid_dataset(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "ü",
            &"x".repeat(65),
            "a\\b",
        ] {
            assert!(!valid_dataset(bad), "{bad:?}");
        }
    }

    #[test]
    fn bodies_round_trip() {
        let id = Uuid::new_v4();
        round_trip(CreateSession {
            job_id: id,
            command_id: Some(id),
            file_name: "run-042.mcap".into(),
            dataset: Some("field-tests".into()),
            size: 42,
            sha256: Some("ab".repeat(32)),
            part_size: 8 << 20,
            part_checksum: Some(PartChecksum::Sha256),
        });
        round_trip(CreateSession {
            job_id: id,
            command_id: None,
            file_name: "run-042.mcap".into(),
            dataset: None,
            size: 42,
            // Hashed while uploading: the SHA-256 comes with the manifest.
            sha256: None,
            part_size: 8 << 20,
            part_checksum: None,
        });
        round_trip(PresignParts {
            session_id: id,
            parts: vec![
                PartDigest::new(1, PartChecksum::Md5, "1B2M2Y8AsgTpgAmY7PhCfg==".into()),
                PartDigest::new(
                    2,
                    PartChecksum::Sha256,
                    "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
                ),
            ],
        });
        round_trip(PresignedParts {
            session_id: id,
            parts: vec![PresignedPart {
                number: 1,
                method: "PUT".into(),
                url: "http://s3/b/k?X-Amz-Signature=x".into(),
                headers: vec![("content-md5".into(), "x".into())],
                expires_at: 5,
                expires_in_secs: Some(900),
            }],
        });
        round_trip(SessionRef { session_id: id });
        round_trip(SessionInfo {
            session_id: id,
            state: SessionState::Uploading,
            bucket: "b".into(),
            object_key: "k".into(),
            size: 1,
            part_size: 5 << 20,
            part_count: 1,
            part_checksum: PartChecksum::Sha256,
            stored_parts: vec![StoredPart {
                number: 1,
                size: 1,
                etag: "\"x\"".into(),
            }],
            sha256: None,
            error: None,
            validation: None,
            validation_error: None,
        });
        round_trip(SessionInfo {
            session_id: id,
            state: SessionState::Completed,
            bucket: "b".into(),
            object_key: "k".into(),
            size: 1,
            part_size: 5 << 20,
            part_count: 1,
            part_checksum: PartChecksum::Md5,
            stored_parts: vec![],
            sha256: Some("a".repeat(64)),
            error: None,
            validation: Some("rejected".into()),
            validation_error: Some("line 1: expected value at column 1".into()),
        });
    }

    #[test]
    fn part_digests_carry_exactly_the_sessions_checksum() {
        let md5 = PartDigest::new(1, PartChecksum::Md5, "m".into());
        assert_eq!(md5.digest(PartChecksum::Md5), Some("m"));
        assert_eq!(md5.digest(PartChecksum::Sha256), None);
        let both = PartDigest {
            number: 1,
            md5: Some("m".into()),
            sha256: Some("s".into()),
        };
        assert_eq!(both.digest(PartChecksum::Md5), None);
        assert_eq!(both.digest(PartChecksum::Sha256), None);
        // A SessionInfo from an API that predates part checksums is MD5.
        let old: SessionInfo = serde_json::from_str(
            r#"{"session_id":"6f1c2b8e-0000-4000-8000-000000000000","state":"created","bucket":"b","object_key":"k","size":1,"part_size":5242880,"part_count":1}"#,
        )
        .unwrap();
        assert_eq!(old.part_checksum, PartChecksum::Md5);
        assert_eq!(
            serde_json::to_string(&PartChecksum::Sha256).unwrap(),
            "\"sha256\""
        );
    }

    #[test]
    fn presigned_part_without_lifetime_reads() {
        // From an API that predates `expires_in_secs`.
        let p: PresignedPart = serde_json::from_str(
            r#"{"number":1,"method":"PUT","url":"http://s3/b/k","headers":[],"expires_at":5}"#,
        )
        .unwrap();
        assert_eq!((p.expires_at, p.expires_in_secs), (5, None));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let r: SessionRef = serde_json::from_str(
            r#"{"session_id":"6f1c1f4e-8d3a-4a4f-9a59-1d2a3c4b5e6f","future":1}"#,
        )
        .unwrap();
        assert_eq!(
            r.session_id.to_string(),
            "6f1c1f4e-8d3a-4a4f-9a59-1d2a3c4b5e6f"
        );
    }

    #[test]
    fn session_states() {
        for s in [
            "created",
            "uploading",
            "paused",
            "completing",
            "completed",
            "aborted",
            "expired",
            "failed",
        ] {
            let st = SessionState::parse(s).unwrap();
            assert_eq!(st.as_str(), s);
            assert_eq!(serde_json::to_value(st).unwrap(), s);
        }
        assert!(SessionState::Completed.is_terminal());
        assert!(!SessionState::Paused.is_terminal());
    }
}
