//! RFC 7807 problem documents. `code` is stable and machine-readable; `type` is
//! `urn:uplink:problem:{code}`.

use serde::{Deserialize, Serialize};

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// RFC 7807 extension members (e.g. `used`, `limit`, `requested` of a quota refusal).
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    pub fn new(status: u16, code: &str, title: &str, detail: impl Into<Option<String>>) -> Self {
        Problem {
            type_uri: format!("urn:uplink:problem:{code}"),
            title: title.to_string(),
            status,
            code: code.to_string(),
            detail: detail.into(),
            extra: serde_json::Map::new(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.title,
            self.code,
            self.detail.as_deref().unwrap_or("")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let p = Problem::new(
            409,
            "conflict",
            "Conflict",
            Some("session is completed".into()),
        );
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["type"], "urn:uplink:problem:conflict");
        assert_eq!(serde_json::from_value::<Problem>(json).unwrap(), p);
    }
}
