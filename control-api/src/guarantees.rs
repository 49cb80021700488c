//! Whether storage really gives an object what its storage policy asks for. Some
//! S3-compatible servers accept the encryption and object-lock headers and ignore them (an
//! object "encrypted and locked" by the policy is then neither), so the API checks twice:
//!
//! - when a policy is set ([`probe`]): the bucket must have object lock enabled for a lock,
//!   retention or legal hold, and an empty probe object written with the policy's encryption
//!   must be reported back as encrypted; otherwise the policy is refused (422
//!   `policy_not_supported`) with the reason;
//! - at every completion ([`unmet`]): the stored object's HEAD must report each guarantee;
//!   otherwise the session fails (409 `policy_not_honoured`) with a reason that names the
//!   missing guarantee, recorded in the audit log and on the event feed, and counted in
//!   `uplink_policy_violations_total`.

use uuid::Uuid;

use crate::domain::policy::{LockMode, Sse};
use crate::storage::{Head, Object, ObjectOptions, Storage, StorageError};

fn sse_name(s: Sse) -> &'static str {
    match s {
        Sse::Aes256 => "AES256",
        Sse::Kms => "aws:kms",
    }
}

fn lock_name(m: LockMode) -> &'static str {
    match m {
        LockMode::Governance => "GOVERNANCE",
        LockMode::Compliance => "COMPLIANCE",
    }
}

/// Slack for the retain-until date: storage computes it from the request's time, which may
/// differ from the session's creation by a clock step or a slow request.
const RETAIN_SLACK_SECS: i64 = 3600;

/// The guarantees of `opts` that `head` does not report, each as one readable line; empty
/// when storage honours them all. `created_at` is when the upload was created (Unix
/// seconds): a retention of `d` days must run to at least `created_at + d` days.
pub fn unmet(opts: &ObjectOptions, head: &Head, created_at: i64) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(sse) = opts.sse {
        let want = sse_name(sse);
        match head.sse.as_deref() {
            Some(got) if got.eq_ignore_ascii_case(want) => {}
            Some(got) => out.push(format!(
                "server-side encryption {want}: storage reports {got}"
            )),
            None => out.push(format!(
                "server-side encryption {want}: storage reports the object unencrypted"
            )),
        }
    }
    if let Some(want) = &opts.sse_kms_key_id {
        let got = head.sse_kms_key_id.as_deref().unwrap_or_default();
        // AWS reports the key's ARN; a policy may name the key id or its alias.
        if !got.ends_with(want.as_str()) {
            out.push(format!(
                "KMS key {want}: storage reports {}",
                if got.is_empty() { "none" } else { got }
            ));
        }
    }
    if let Some(mode) = opts.lock_mode {
        let want = lock_name(mode);
        if head.lock_mode.as_deref() != Some(want) {
            out.push(format!(
                "object lock {want}: storage reports {}",
                head.lock_mode.as_deref().unwrap_or("no lock")
            ));
        }
        if let Some(days) = opts.retain_days {
            let want_until = created_at + i64::from(days) * 86_400 - RETAIN_SLACK_SECS;
            match head.retain_until {
                Some(until) if until >= want_until => {}
                Some(until) => out.push(format!(
                    "retention of {days} days: storage retains the object only until {}",
                    rfc3339(until)
                )),
                None => out.push(format!(
                    "retention of {days} days: storage reports no retain-until date"
                )),
            }
        }
    }
    if opts.legal_hold && !head.legal_hold {
        out.push("legal hold: storage reports none".into());
    }
    out
}

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| secs.to_string())
}

/// What `bucket` cannot do of `opts`, each as one readable line (empty: all of it). Writes
/// and deletes one empty probe object under `prefix` when encryption is asked for.
pub async fn probe(
    storage: &Storage,
    bucket: &str,
    prefix: &str,
    opts: &ObjectOptions,
) -> Result<Vec<String>, StorageError> {
    let mut out = Vec::new();
    if (opts.lock_mode.is_some() || opts.legal_hold) && !storage.object_lock_enabled(bucket).await?
    {
        out.push(format!(
            "object lock: bucket {bucket} does not have object lock enabled (or storage does not support it)"
        ));
    }
    if opts.sse.is_some() {
        let key = format!("{prefix}.uplink-probe/{}", Uuid::new_v4());
        let obj = Object { bucket, key: &key };
        let only_sse = ObjectOptions {
            sse: opts.sse,
            sse_kms_key_id: opts.sse_kms_key_id.clone(),
            ..ObjectOptions::default()
        };
        match storage.put_empty(&obj, &only_sse).await {
            Ok(()) => {
                let head = storage.head_object(&obj).await;
                let _ = storage.delete(&obj).await;
                out.extend(unmet(&only_sse, &head?, 0));
            }
            Err(e) => out.push(format!(
                "server-side encryption: storage refused an encrypted write: {e}"
            )),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> ObjectOptions {
        ObjectOptions {
            sse: Some(Sse::Kms),
            sse_kms_key_id: Some("key-1".into()),
            lock_mode: Some(LockMode::Governance),
            retain_days: Some(1),
            legal_hold: true,
        }
    }

    #[test]
    fn an_object_with_every_guarantee_meets_the_policy() {
        let head = Head {
            sse: Some("aws:kms".into()),
            sse_kms_key_id: Some("arn:aws:kms:eu-west-1:1:key/key-1".into()),
            lock_mode: Some("GOVERNANCE".into()),
            retain_until: Some(1_000 + 86_400),
            legal_hold: true,
            ..Head::default()
        };
        assert_eq!(unmet(&all(), &head, 1_000), Vec::<String>::new());
        assert_eq!(
            unmet(&ObjectOptions::default(), &Head::default(), 0),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_missing_guarantee_is_named() {
        let got = unmet(&all(), &Head::default(), 1_000);
        assert_eq!(
            got,
            vec![
                "server-side encryption aws:kms: storage reports the object unencrypted",
                "KMS key key-1: storage reports none",
                "object lock GOVERNANCE: storage reports no lock",
                "retention of 1 days: storage reports no retain-until date",
                "legal hold: storage reports none",
            ]
        );
        let short = Head {
            sse: Some("AES256".into()),
            lock_mode: Some("COMPLIANCE".into()),
            retain_until: Some(1_000),
            ..Head::default()
        };
        let got = unmet(&all(), &short, 1_000);
        assert_eq!(
            got[0],
            "server-side encryption aws:kms: storage reports AES256"
        );
        assert_eq!(got[2], "object lock GOVERNANCE: storage reports COMPLIANCE");
        assert!(
            got[3].starts_with(
                "retention of 1 days: storage retains the object only until 1970-01-01T00:16:40"
            ),
            "{}",
            got[3]
        );
    }
}
