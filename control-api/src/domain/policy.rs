//! Storage policies: where and how a dataset's objects are written. A project has one, each
//! dataset may override it field by field, and the API's `[s3]` configuration fills the rest.

use serde::{Deserialize, Serialize};

/// Variables a key template may use.
pub const TEMPLATE_VARS: [&str; 7] = [
    "project", "dataset", "device", "date", "session", "job", "filename",
];

/// The key layout when no policy sets one. `{session}` keeps every upload its own object.
pub const DEFAULT_TEMPLATE: &str = "{project}/{dataset}/{device}/{session}/{filename}";

#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sse {
    #[serde(rename = "AES256")]
    Aes256,
    #[serde(rename = "aws:kms")]
    Kms,
}

#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LockMode {
    Governance,
    Compliance,
}

/// A storage policy; every field is optional so a dataset can override one field only.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoragePolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// Object key template, e.g. `{project}/{dataset}/{device}/{date}/{filename}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_template: Option<String>,
    /// Smallest part size a device may use (MiB); smaller plans are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_part_size_mib: Option<u64>,
    /// Lifetime of presigned part URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presign_ttl_secs: Option<u64>,
    /// Server-side encryption asked of storage for every object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sse: Option<Sse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sse_kms_key_id: Option<String>,
    /// Object lock (the bucket must have object lock enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock_mode: Option<LockMode>,
    /// With `object_lock_mode`: objects are retained this many days after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legal_hold: Option<bool>,
}

impl StoragePolicy {
    /// `self`, with every unset field taken from `under`.
    pub fn over(&self, under: &StoragePolicy) -> StoragePolicy {
        StoragePolicy {
            bucket: self.bucket.clone().or_else(|| under.bucket.clone()),
            key_template: self
                .key_template
                .clone()
                .or_else(|| under.key_template.clone()),
            min_part_size_mib: self.min_part_size_mib.or(under.min_part_size_mib),
            presign_ttl_secs: self.presign_ttl_secs.or(under.presign_ttl_secs),
            sse: self.sse.or(under.sse),
            sse_kms_key_id: self
                .sse_kms_key_id
                .clone()
                .or_else(|| under.sse_kms_key_id.clone()),
            object_lock_mode: self.object_lock_mode.or(under.object_lock_mode),
            retention_days: self.retention_days.or(under.retention_days),
            legal_hold: self.legal_hold.or(under.legal_hold),
        }
    }

    /// Every problem with the policy's own fields (an empty list when it is valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(b) = &self.bucket {
            if !valid_bucket(b) {
                out.push(format!("bucket: {b:?} is not a valid S3 bucket name"));
            }
        }
        if let Some(t) = &self.key_template {
            if let Err(e) = check_template(t) {
                out.push(format!("key_template: {e}"));
            }
        }
        if let Some(m) = self.min_part_size_mib {
            if !(5..=5120).contains(&m) {
                out.push("min_part_size_mib: must be 5 to 5120".into());
            }
        }
        if let Some(t) = self.presign_ttl_secs {
            if !(60..=7 * 24 * 3600).contains(&t) {
                out.push("presign_ttl_secs: must be 60 to 604800 (7 days)".into());
            }
        }
        if self.sse_kms_key_id.is_some() && self.sse.is_some_and(|s| s != Sse::Kms) {
            out.push("sse_kms_key_id: only with sse = \"aws:kms\"".into());
        }
        if self.retention_days.is_some() && self.object_lock_mode.is_none() {
            out.push("retention_days: needs object_lock_mode".into());
        }
        if self.retention_days == Some(0) {
            out.push("retention_days: must be at least 1".into());
        }
        out
    }
}

/// S3 bucket naming rules (3-63 of lower-case letters, digits, dots and hyphens).
pub fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && b.as_bytes()[0].is_ascii_alphanumeric()
        && b.as_bytes()[b.len() - 1].is_ascii_alphanumeric()
}

/// A template is `/`-separated segments of text and `{var}`s; it must use `{filename}`,
/// and no segment may be empty, `.` or `..`.
pub fn check_template(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > 512 {
        return Err("must be 1 to 512 characters".into());
    }
    let mut rest = t;
    let mut vars = Vec::new();
    while let Some(open) = rest.find('{') {
        if rest[..open].contains('}') {
            return Err("a stray '}' or a control character".into());
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| "an unclosed '{'".to_string())?;
        let var = &rest[open + 1..open + close];
        if !TEMPLATE_VARS.contains(&var) {
            return Err(format!(
                "unknown variable {{{var}}} (known: {})",
                TEMPLATE_VARS.map(|v| format!("{{{v}}}")).join(" ")
            ));
        }
        vars.push(var);
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') || t.chars().any(|c| c.is_control() || c == '\\') {
        return Err("a stray '}' or a control character".into());
    }
    if !vars.contains(&"filename") {
        return Err("must contain {filename}".into());
    }
    if t.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err("no empty, '.' or '..' segments (and no leading or trailing '/')".into());
    }
    Ok(())
}

/// The values a template is rendered with. All are already validated names (no `/`).
pub struct KeyVars<'a> {
    pub project: &'a str,
    pub dataset: &'a str,
    pub device: &'a str,
    /// UTC `YYYY-MM-DD`.
    pub date: &'a str,
    pub session: &'a str,
    pub job: &'a str,
    pub filename: &'a str,
}

/// Renders a template checked by [`check_template`].
pub fn render(template: &str, v: &KeyVars) -> String {
    template
        .replace("{project}", v.project)
        .replace("{dataset}", v.dataset)
        .replace("{device}", v.device)
        .replace("{date}", v.date)
        .replace("{session}", v.session)
        .replace("{job}", v.job)
        .replace("{filename}", v.filename)
}

/// The key used when `key` already names another live object: the session id becomes a
/// directory just above the last segment, so nothing stored is ever overwritten.
pub fn disambiguate(key: &str, session: &str) -> String {
    match key.rsplit_once('/') {
        Some((dir, last)) => format!("{dir}/{session}/{last}"),
        None => format!("{session}/{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> KeyVars<'static> {
        KeyVars {
            project: "p",
            dataset: "d",
            device: "robot-1",
            date: "2026-11-23",
            session: "s1",
            job: "j1",
            filename: "a.mcap",
        }
    }

    #[test]
    fn templates_render_and_are_checked() {
        assert_eq!(render(DEFAULT_TEMPLATE, &vars()), "p/d/robot-1/s1/a.mcap");
        assert_eq!(
            render("{project}/{dataset}/{device}/{date}/{filename}", &vars()),
            "p/d/robot-1/2026-11-23/a.mcap"
        );
        assert!(check_template(DEFAULT_TEMPLATE).is_ok());
        assert!(check_template("raw/{date}/{filename}").is_ok());
        for (bad, why) in [
            ("{project}/{dataset}", "must contain {filename}"),
            ("{nope}/{filename}", "unknown variable {nope}"),
            ("/{filename}", "no empty"),
            ("a//{filename}", "no empty"),
            ("../{filename}", "no empty"),
            ("{filename", "unclosed"),
            ("}{filename}", "stray"),
        ] {
            let e = check_template(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn taken_keys_get_the_session_as_a_directory() {
        assert_eq!(disambiguate("p/d/2026/a.mcap", "s9"), "p/d/2026/s9/a.mcap");
        assert_eq!(disambiguate("a.mcap", "s9"), "s9/a.mcap");
    }

    #[test]
    fn datasets_override_projects_field_by_field() {
        let project = StoragePolicy {
            bucket: Some("proj-bucket".into()),
            presign_ttl_secs: Some(600),
            ..Default::default()
        };
        let dataset = StoragePolicy {
            presign_ttl_secs: Some(120),
            sse: Some(Sse::Aes256),
            ..Default::default()
        };
        let eff = dataset.over(&project);
        assert_eq!(eff.bucket.as_deref(), Some("proj-bucket"));
        assert_eq!(eff.presign_ttl_secs, Some(120));
        assert_eq!(eff.sse, Some(Sse::Aes256));
    }

    #[test]
    fn policy_problems_are_listed() {
        let p: StoragePolicy = serde_json::from_str(
            r#"{"bucket":"Bad_Bucket","presign_ttl_secs":5,"retention_days":3,"sse":"AES256","sse_kms_key_id":"k"}"#,
        )
        .expect("parses");
        let problems = p.problems();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(serde_json::from_str::<StoragePolicy>(r#"{"buckt":"x"}"#).is_err());
        assert!(StoragePolicy::default().problems().is_empty());
        assert!(valid_bucket("uplink-data.eu"));
        assert!(!valid_bucket("-x-"));
    }
}
