//! The Uplink wire contract, shared by the edge agent, the bridge and the control API.
//!
//! # Layout
//! - [`topics`]: MQTT topic names under `uplink/v1/devices/{device_id}/`, and device id rules.
//! - [`ops`]: the device request ops and the JSON bodies and results of each.
//! - [`envelope`]: the signed request envelope (device → cloud), the response envelope
//!   (cloud → device) and the signed command envelope (cloud → device).
//! - [`command`]: commands (upload, pause, resume, cancel, config) and their acks.
//! - [`flow`]: flow control: upload windows, job priorities, the `config` command's body.
//! - [`telemetry`]: progress and presence status messages.
//! - [`keyring`]: the set of command keys a device pins (rotation with overlap).
//! - [`sign`]: Ed25519 keys, the canonical strings that are signed, signing and verification.
//! - [`problem`]: RFC 7807 problem documents with stable codes.
//! - [`plan`]: part planning inside S3's multipart limits.
//!
//! Every payload is JSON with a `v` field ([`VERSION`]); unknown fields are ignored.

pub mod command;
pub mod envelope;
pub mod flow;
pub mod keyring;
pub mod ops;
pub mod plan;
pub mod problem;
pub mod sign;
pub mod telemetry;
pub mod topics;

/// Version of every payload on the wire (`v` field).
pub const VERSION: u32 = 1;

/// Current time as Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Whether `id` is a valid request or command identifier: 1–64 of `[A-Za-z0-9_-]`.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
