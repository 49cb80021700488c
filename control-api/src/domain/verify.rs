//! Completion verification: storage's part list (the authority) against the plan.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use uplink_protocol::plan::PartPlan;

/// A part as planned: the MD5 it was presigned with (base64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPart {
    pub number: u32,
    pub md5_b64: String,
}

/// A part as listed by storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPart {
    pub number: u32,
    pub size: u64,
    pub etag: String,
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
    #[error("part {number} in storage has ETag {etag}, planned MD5 {md5_hex}")]
    WrongEtag {
        number: u32,
        etag: String,
        md5_hex: String,
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

/// Strips the quotes S3 puts around ETags.
pub fn bare_etag(etag: &str) -> &str {
    etag.trim().trim_matches('"')
}

/// Checks that storage holds exactly the planned parts with the planned sizes and MD5s, and
/// returns the `(number, etag)` list to complete with, in ascending order.
pub fn verify_parts(
    plan: &PartPlan,
    planned: &[PlannedPart],
    listed: &[ListedPart],
) -> Result<Vec<(u32, String)>, VerifyError> {
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
        let md5 = planned
            .iter()
            .find(|p| p.number == number)
            .and_then(|p| md5_hex(&p.md5_b64))
            .ok_or(VerifyError::Unplanned(number))?;
        if !bare_etag(&part.etag).eq_ignore_ascii_case(&md5) {
            return Err(VerifyError::WrongEtag {
                number,
                etag: part.etag.clone(),
                md5_hex: md5,
            });
        }
        out.push((number, part.etag.clone()));
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

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    fn setup() -> (PartPlan, Vec<PlannedPart>, Vec<ListedPart>) {
        let p = plan(5 * MIB + 10, 5 * MIB).unwrap();
        let planned = vec![
            PlannedPart {
                number: 1,
                md5_b64: b64(A),
            },
            PlannedPart {
                number: 2,
                md5_b64: b64(B),
            },
        ];
        let listed = vec![
            ListedPart {
                number: 2,
                size: 10,
                etag: format!("\"{B}\""),
            },
            ListedPart {
                number: 1,
                size: 5 * MIB,
                etag: format!("\"{A}\""),
            },
        ];
        (p, planned, listed)
    }

    #[test]
    fn accepts_exact_parts_in_order() {
        let (p, planned, listed) = setup();
        let parts = verify_parts(&p, &planned, &listed).unwrap();
        assert_eq!(
            parts.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn refuses_missing_wrong_size_wrong_etag_and_extra() {
        let (p, planned, listed) = setup();
        assert_eq!(
            verify_parts(&p, &planned, &listed[..1]),
            Err(VerifyError::Missing(vec![1]))
        );
        let mut l = listed.clone();
        l[0].size = 9;
        assert!(matches!(
            verify_parts(&p, &planned, &l),
            Err(VerifyError::WrongSize { number: 2, .. })
        ));
        let mut l = listed.clone();
        l[1].etag = format!("\"{B}\"");
        assert!(matches!(
            verify_parts(&p, &planned, &l),
            Err(VerifyError::WrongEtag { number: 1, .. })
        ));
        assert_eq!(
            verify_parts(&p, &planned[..1], &listed),
            Err(VerifyError::Unplanned(2))
        );
        let mut l = listed.clone();
        l.push(ListedPart {
            number: 3,
            size: 1,
            etag: "x".into(),
        });
        assert_eq!(verify_parts(&p, &planned, &l), Err(VerifyError::Extra(3)));
    }

    #[test]
    fn md5_forms() {
        assert_eq!(md5_hex(&b64(A)).unwrap(), A);
        assert_eq!(md5_hex("AAAA"), None);
        assert_eq!(bare_etag("\"abc\""), "abc");
    }
}
