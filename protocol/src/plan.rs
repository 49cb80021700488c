//! Part planning inside S3's multipart limits: 1–10,000 parts of 5 MiB–5 GiB, the last may
//! be smaller; objects up to 5 TiB. A 0-byte file is one part of 0 bytes, uploaded with a
//! single presigned PutObject instead of a multipart upload.
//!
//! The agent proposes a part size (from its hint) because it hashes each part before it
//! opens a session; the control API accepts any plan that [`validate`] accepts.

use serde::{Deserialize, Serialize};

pub const MIB: u64 = 1 << 20;
pub const MIN_PART_SIZE: u64 = 5 * MIB;
pub const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
pub const MAX_PARTS: u64 = 10_000;
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * MIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartPlan {
    pub size: u64,
    pub part_size: u64,
    pub part_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("object size {0} exceeds the 5 TiB S3 limit")]
    TooLarge(u64),
    #[error("part size {0} is not a multiple of 1 MiB")]
    NotMibAligned(u64),
    #[error("part size {0} is outside 5 MiB–5 GiB")]
    PartSizeOutOfRange(u64),
    #[error(
        "part size {part_size} gives {parts} parts for {size} bytes; at most 10,000 are allowed"
    )]
    TooManyParts {
        size: u64,
        part_size: u64,
        parts: u64,
    },
}

/// The plan for `size` bytes: part size = max(hint, 5 MiB, ceil(size / 10,000)) rounded up
/// to 1 MiB and capped at 5 GiB.
pub fn plan(size: u64, part_size_hint: u64) -> Result<PartPlan, PlanError> {
    if size > MAX_OBJECT_SIZE {
        return Err(PlanError::TooLarge(size));
    }
    let needed = size.div_ceil(MAX_PARTS);
    let part_size = part_size_hint
        .max(MIN_PART_SIZE)
        .max(needed)
        .div_ceil(MIB)
        .saturating_mul(MIB)
        .min(MAX_PART_SIZE);
    validate(size, part_size)
}

/// Checks a proposed part size for `size` bytes and returns the plan.
pub fn validate(size: u64, part_size: u64) -> Result<PartPlan, PlanError> {
    if size > MAX_OBJECT_SIZE {
        return Err(PlanError::TooLarge(size));
    }
    if !part_size.is_multiple_of(MIB) {
        return Err(PlanError::NotMibAligned(part_size));
    }
    if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
        return Err(PlanError::PartSizeOutOfRange(part_size));
    }
    let parts = size.div_ceil(part_size).max(1);
    if parts > MAX_PARTS {
        return Err(PlanError::TooManyParts {
            size,
            part_size,
            parts,
        });
    }
    Ok(PartPlan {
        size,
        part_size,
        part_count: parts as u32,
    })
}

impl PartPlan {
    /// Byte offset and length of part `number` (1-based), or `None` when out of range.
    pub fn part(&self, number: u32) -> Option<(u64, u64)> {
        if number == 0 || number > self.part_count {
            return None;
        }
        let offset = u64::from(number - 1) * self.part_size;
        let len = self.part_size.min(self.size - offset);
        Some((offset, len))
    }

    /// Whether this is a 0-byte object, uploaded with one PutObject.
    pub fn is_empty_object(&self) -> bool {
        self.size == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HINT: u64 = 8 * MIB;

    #[test]
    fn edge_sizes() {
        let p = plan(0, HINT).unwrap();
        assert_eq!((p.part_size, p.part_count), (HINT, 1));
        assert_eq!(p.part(1), Some((0, 0)));
        assert!(p.is_empty_object());

        let p = plan(1, HINT).unwrap();
        assert_eq!(p.part_count, 1);
        assert_eq!(p.part(1), Some((0, 1)));

        let p = plan(5 * MIB - 1, 0).unwrap();
        assert_eq!((p.part_size, p.part_count), (5 * MIB, 1));
        assert_eq!(p.part(1), Some((0, 5 * MIB - 1)));

        let p = plan(5 * MIB, 0).unwrap();
        assert_eq!(p.part_count, 1);

        let p = plan(5 * MIB + 1, 0).unwrap();
        assert_eq!(p.part_count, 2);
        assert_eq!(p.part(2), Some((5 * MIB, 1)));
        assert_eq!(p.part(3), None);
        assert_eq!(p.part(0), None);
    }

    #[test]
    fn grows_parts_beyond_ten_thousand() {
        // 100 GiB with an 8 MiB hint would need 12,800 parts.
        let size = 100 * 1024 * MIB;
        let p = plan(size, HINT).unwrap();
        assert!(p.part_count <= 10_000);
        assert_eq!(p.part_size, 11 * MIB);
        assert_eq!(
            validate(size, HINT),
            Err(PlanError::TooManyParts {
                size,
                part_size: HINT,
                parts: 12_800
            })
        );
    }

    #[test]
    fn limits() {
        assert!(plan(MAX_OBJECT_SIZE, 0).is_ok());
        assert_eq!(
            plan(MAX_OBJECT_SIZE + 1, 0),
            Err(PlanError::TooLarge(MAX_OBJECT_SIZE + 1))
        );
        assert_eq!(
            validate(10, 5 * MIB + 1),
            Err(PlanError::NotMibAligned(5 * MIB + 1))
        );
        assert_eq!(
            validate(10, 4 * MIB),
            Err(PlanError::PartSizeOutOfRange(4 * MIB))
        );
        assert_eq!(
            validate(10, 6 * 1024 * MIB),
            Err(PlanError::PartSizeOutOfRange(6 * 1024 * MIB))
        );
        assert_eq!(plan(10, u64::MAX).unwrap().part_size, MAX_PART_SIZE);
    }

    proptest! {
        #[test]
        fn plans_cover_the_file_inside_s3_limits(size in 0..=MAX_OBJECT_SIZE, hint in 0u64..(8 * 1024 * MIB)) {
            let p = plan(size, hint).unwrap();
            prop_assert!(p.part_count >= 1 && u64::from(p.part_count) <= MAX_PARTS);
            prop_assert!(p.part_size.is_multiple_of(MIB));
            prop_assert!((MIN_PART_SIZE..=MAX_PART_SIZE).contains(&p.part_size));
            prop_assert!(p.part_size >= hint.min(MAX_PART_SIZE) || p.part_size == MAX_PART_SIZE);
            prop_assert_eq!(validate(size, p.part_size), Ok(p));
            // The parts tile the file exactly; only the last may be smaller.
            let (last_off, last_len) = p.part(p.part_count).unwrap();
            prop_assert_eq!(last_off + last_len, size);
            prop_assert!(last_len <= p.part_size);
            if p.part_count > 1 {
                let (off, len) = p.part(p.part_count - 1).unwrap();
                prop_assert_eq!(len, p.part_size);
                prop_assert_eq!(off + len, last_off);
                prop_assert!(last_len > 0);
            }
        }
    }
}
