//! Completion verification: storage's part list (the authority) against the plan.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use uplink_protocol::ops::PartChecksum;
use uplink_protocol::plan::PartPlan;

/// A part as planned: the digest it was presigned with (base64, the session's checksum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPart {
    pub number: u32,
    pub digest_b64: String,
}

/// A part as listed by storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPart {
    pub number: u32,
    pub size: u64,
    pub etag: String,
    /// Base64 SHA-256 when storage reports one (AWS S3 and Garage do; SeaweedFS does not).
    pub checksum_sha256: Option<String>,
}

/// A part to complete the upload with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletePart {
    pub number: u32,
    pub etag: String,
    /// The planned SHA-256 (base64) in a `sha256` session: storage checks it again.
    pub checksum_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("parts {0:?} are not in storage")]
    Missing(Vec<u32>),
    #[error("part {number} is {actual} bytes in storage, {expected} planned")]
    WrongSize {
        number: u32,
        expected: u64,
        actual: u64,
    },
    #[error("part {number} in storage has digest {stored}, planned {planned}")]
    WrongDigest {
        number: u32,
        stored: String,
        planned: String,
    },
    #[error("part {0} was never presigned")]
    Unplanned(u32),
    #[error("storage holds part {0}, beyond the planned part count")]
    Extra(u32),
}

/// Hex form of a base64 MD5, or `None` when it isn't 16 bytes of base64.
pub fn md5_hex(md5_b64: &str) -> Option<String> {
    B64.decode(md5_b64)
        .ok()
        .filter(|b| b.len() == 16)
        .map(hex::encode)
}

/// Length in bytes of a base64 digest, or `None` when it is not base64.
pub fn digest_len(b64: &str) -> Option<usize> {
    B64.decode(b64).ok().map(|b| b.len())
}

/// Strips the quotes S3 puts around ETags.
pub fn bare_etag(etag: &str) -> &str {
    etag.trim().trim_matches('"')
}

/// Checks that storage holds exactly the planned parts with the planned sizes and digests
/// (the ETag against an MD5; a listed SHA-256 against a SHA-256, which storage already
/// checked at the PUT when it lists none), and returns the parts to complete with, in
/// ascending order.
pub fn verify_parts(
    plan: &PartPlan,
    checksum: PartChecksum,
    planned: &[PlannedPart],
    listed: &[ListedPart],
) -> Result<Vec<CompletePart>, VerifyError> {
    let mut out = Vec::with_capacity(plan.part_count as usize);
    let mut missing = Vec::new();
    for number in 1..=plan.part_count {
        let Some(part) = listed.iter().find(|p| p.number == number) else {
            missing.push(number);
            continue;
        };
        let (_, expected) = plan.part(number).unwrap_or((0, 0));
        if part.size != expected {
            return Err(VerifyError::WrongSize {
                number,
                expected,
                actual: part.size,
            });
        }
        let digest = planned
            .iter()
            .find(|p| p.number == number)
            .map(|p| p.digest_b64.as_str())
            .ok_or(VerifyError::Unplanned(number))?;
        let wrong = |stored: &str, planned: String| VerifyError::WrongDigest {
            number,
            stored: stored.to_string(),
            planned,
        };
        let checksum_sha256 = match checksum {
            PartChecksum::Md5 => {
                let md5 = md5_hex(digest).ok_or(VerifyError::Unplanned(number))?;
                if !bare_etag(&part.etag).eq_ignore_ascii_case(&md5) {
                    return Err(wrong(&part.etag, md5));
                }
                None
            }
            PartChecksum::Sha256 => {
                if let Some(stored) = part.checksum_sha256.as_deref() {
                    if stored != digest {
                        return Err(wrong(stored, digest.to_string()));
                    }
                }
                Some(digest.to_string())
            }
        };
        out.push(CompletePart {
            number,
            etag: part.etag.clone(),
            checksum_sha256,
        });
    }
    if !missing.is_empty() {
        return Err(VerifyError::Missing(missing));
    }
    if let Some(extra) = listed
        .iter()
        .find(|p| p.number == 0 || p.number > plan.part_count)
    {
        return Err(VerifyError::Extra(extra.number));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplink_protocol::plan::{plan, MIB};

    fn b64(hex_md5: &str) -> String {
        B64.encode(hex::decode(hex_md5).unwrap())
    }

    const MD5: PartChecksum = PartChecksum::Md5;
    const SHA: PartChecksum = PartChecksum::Sha256;
    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    fn setup() -> (PartPlan, Vec<PlannedPart>, Vec<ListedPart>) {
        let p = plan(5 * MIB + 10, 5 * MIB).unwrap();
        let planned = vec![
            PlannedPart {
                number: 1,
                digest_b64: b64(A),
            },
            PlannedPart {
                number: 2,
                digest_b64: b64(B),
            },
        ];
        let listed = vec![
            ListedPart {
                number: 2,
                size: 10,
                etag: format!("\"{B}\""),
                checksum_sha256: None,
            },
            ListedPart {
                number: 1,
                size: 5 * MIB,
                etag: format!("\"{A}\""),
                checksum_sha256: None,
            },
        ];
        (p, planned, listed)
    }

    #[test]
    fn accepts_exact_parts_in_order() {
        let (p, planned, listed) = setup();
        let parts = verify_parts(&p, MD5, &planned, &listed).unwrap();
        assert_eq!(
            parts.iter().map(|p| p.number).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(parts.iter().all(|p| p.checksum_sha256.is_none()));
    }

    #[test]
    fn sha256_parts_check_a_listed_checksum_and_complete_with_the_planned_one() {
        let (p, planned, mut listed) = setup();
        // Storage that lists no checksum (it checked the signed one at the PUT): the ETag,
        // an MD5 the API never saw, is not compared.
        listed[0].etag = "\"whatever\"".into();
        let parts = verify_parts(&p, SHA, &planned, &listed).unwrap();
        assert_eq!(parts[0].checksum_sha256.as_deref(), Some(b64(A).as_str()));
        assert_eq!(parts[1].checksum_sha256.as_deref(), Some(b64(B).as_str()));
        // Storage that lists one: it must be the planned one.
        listed[0].checksum_sha256 = Some(b64(B));
        listed[1].checksum_sha256 = Some(b64(A));
        assert!(verify_parts(&p, SHA, &planned, &listed).is_ok());
        listed[0].checksum_sha256 = Some(b64(A));
        assert!(matches!(
            verify_parts(&p, SHA, &planned, &listed),
            Err(VerifyError::WrongDigest { number: 2, .. })
        ));
    }

    #[test]
    fn refuses_missing_wrong_size_wrong_etag_and_extra() {
        let (p, planned, listed) = setup();
        assert_eq!(
            verify_parts(&p, MD5, &planned, &listed[..1]),
            Err(VerifyError::Missing(vec![1]))
        );
        let mut l = listed.clone();
        l[0].size = 9;
        assert!(matches!(
            verify_parts(&p, MD5, &planned, &l),
            Err(VerifyError::WrongSize { number: 2, .. })
        ));
        let mut l = listed.clone();
        l[1].etag = format!("\"{B}\"");
        assert!(matches!(
            verify_parts(&p, MD5, &planned, &l),
            Err(VerifyError::WrongDigest { number: 1, .. })
        ));
        assert_eq!(
            verify_parts(&p, MD5, &planned[..1], &listed),
            Err(VerifyError::Unplanned(2))
        );
        let mut l = listed.clone();
        l.push(ListedPart {
            number: 3,
            size: 1,
            etag: "x".into(),
            checksum_sha256: None,
        });
        assert_eq!(
            verify_parts(&p, MD5, &planned, &l),
            Err(VerifyError::Extra(3))
        );
    }

    #[test]
    fn md5_forms() {
        assert_eq!(md5_hex(&b64(A)).unwrap(), A);
        assert_eq!(md5_hex("AAAA"), None);
        assert_eq!(bare_etag("\"abc\""), "abc");
    }
}
