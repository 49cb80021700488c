//! The hash pass: one read of the file gives each part's digest (base64: a SHA-256 as
//! `x-amz-checksum-sha256`, or an MD5 as `Content-MD5`, the session's [`PartChecksum`]) and,
//! when asked, the whole file's SHA-256 (hex), either before the upload ([`hash_file`]) or
//! part by part while the parts upload ([`hash_parts`]). Blocking: call it from
//! `spawn_blocking`.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest, Md5};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use uplink_protocol::ops::PartChecksum;
use uplink_protocol::plan::{self, PartPlan, PlanError};

/// Read buffer of the hash pass.
pub const BUFFER_BYTES: usize = 1 << 20;

/// What identifies the file's contents without reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    pub inode: u64,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            size: meta.len(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec(),
            inode: meta.ino(),
        }
    }

    /// Stats `path` (following symlinks).
    pub fn read(path: &Path) -> std::io::Result<Self> {
        Ok(Self::of(&std::fs::metadata(path)?))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartHash {
    pub number: u32,
    pub offset: u64,
    pub size: u64,
    /// Standard base64 of the part's digest (SHA-256 or MD5).
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHash {
    pub identity: FileIdentity,
    pub plan: PartPlan,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
    /// What `parts` carry ([`hash_file`]: SHA-256).
    pub checksum: PartChecksum,
    pub parts: Vec<PartHash>,
}

/// One part's running digest.
enum PartHasher {
    Md5(Md5),
    Sha256(Sha256),
}

impl PartHasher {
    fn new(checksum: PartChecksum) -> Self {
        match checksum {
            PartChecksum::Md5 => PartHasher::Md5(Md5::new()),
            PartChecksum::Sha256 => PartHasher::Sha256(Sha256::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            PartHasher::Md5(h) => h.update(bytes),
            PartHasher::Sha256(h) => h.update(bytes),
        }
    }

    fn finish(self) -> String {
        match self {
            PartHasher::Md5(h) => B64.encode(h.finalize()),
            PartHasher::Sha256(h) => B64.encode(h.finalize()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("file changed while it was being hashed")]
    Changed,
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("hashing was interrupted")]
    Cancelled,
}

/// Hashes `path` whole (its SHA-256) and by parts (SHA-256 each) with parts of
/// `part_size_hint` (adjusted by [`plan::plan`]).
pub fn hash_file(
    path: &Path,
    part_size_hint: u64,
    cancel: &CancellationToken,
) -> Result<FileHash, HashError> {
    let identity = FileIdentity::read(path).map_err(|source| io_error(path, source))?;
    let plan = plan::plan(identity.size, part_size_hint)?;
    let mut parts = Vec::with_capacity(plan.part_count as usize);
    let checksum = PartChecksum::Sha256;
    let sha256 = hash_parts(path, identity, plan, checksum, true, cancel, |p| {
        parts.push(p);
        Ok(())
    })?
    .unwrap_or_default();
    Ok(FileHash {
        identity,
        plan,
        sha256,
        checksum,
        parts,
    })
}

fn io_error(path: &Path, source: std::io::Error) -> HashError {
    HashError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads `path` once, in order: hands each part's `checksum` digest to `on_part` as soon as
/// the part is read (so its upload can start while the rest is hashed) and, with `whole`,
/// returns the whole file's SHA-256. The file must still be `identity` at the start and at
/// the end; an error from `on_part` stops the pass.
pub fn hash_parts(
    path: &Path,
    identity: FileIdentity,
    plan: PartPlan,
    checksum: PartChecksum,
    whole: bool,
    cancel: &CancellationToken,
    mut on_part: impl FnMut(PartHash) -> Result<(), HashError>,
) -> Result<Option<String>, HashError> {
    let io = |source| io_error(path, source);
    let mut file = File::open(path).map_err(io)?;
    if FileIdentity::of(&file.metadata().map_err(io)?) != identity {
        return Err(HashError::Changed);
    }
    let mut buf = vec![0u8; BUFFER_BYTES];
    let mut sha = whole.then(Sha256::new);
    for number in 1..=plan.part_count {
        let Some((offset, size)) = plan.part(number) else {
            break;
        };
        let mut part = PartHasher::new(checksum);
        let mut left = size;
        while left > 0 {
            if cancel.is_cancelled() {
                return Err(HashError::Cancelled);
            }
            let want = left.min(buf.len() as u64) as usize;
            let n = file.read(&mut buf[..want]).map_err(io)?;
            if n == 0 {
                return Err(HashError::Changed);
            }
            part.update(&buf[..n]);
            if let Some(sha) = &mut sha {
                sha.update(&buf[..n]);
            }
            left -= n as u64;
        }
        on_part(PartHash {
            number,
            offset,
            size,
            digest: part.finish(),
        })?;
    }
    // Longer than when we started, or touched meanwhile?
    let mut probe = [0u8; 1];
    if file.read(&mut probe).map_err(io)? != 0 {
        return Err(HashError::Changed);
    }
    if FileIdentity::of(&file.metadata().map_err(io)?) != identity {
        return Err(HashError::Changed);
    }
    Ok(sha.map(|sha| hex::encode(sha.finalize())))
}

/// Hex of a base64 MD5 (what S3 returns as the ETag of a part).
pub fn md5_hex(md5_b64: &str) -> Option<String> {
    B64.decode(md5_b64).ok().map(hex::encode)
}

/// Whether an ETag returned by storage (maybe quoted, any case) is the hex of `md5_b64`.
pub fn etag_matches(etag: &str, md5_b64: &str) -> bool {
    match md5_hex(md5_b64) {
        Some(hex) => strip_etag(etag).eq_ignore_ascii_case(&hex),
        None => false,
    }
}

/// The ETag without its surrounding quotes (and without a weak `W/` prefix).
pub fn strip_etag(etag: &str) -> &str {
    let e = etag.trim();
    let e = e.strip_prefix("W/").unwrap_or(e);
    e.trim_matches('"')
}

#[cfg(test)]
mod tests {
    use super::*;
    use plan::MIB;
    use std::io::Write;

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn known_values_of_small_files() {
        let none = CancellationToken::new();
        let f = write(b"");
        let h = hash_file(f.path(), 8 * MIB, &none).unwrap();
        assert_eq!(h.parts.len(), 1);
        assert_eq!(h.parts[0].size, 0);
        assert_eq!(h.checksum, PartChecksum::Sha256);
        assert_eq!(
            h.parts[0].digest,
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(
            h.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );

        let f = write(b"abc");
        let h = hash_file(f.path(), 8 * MIB, &none).unwrap();
        assert_eq!(h.identity.size, 3);
        assert_eq!(
            hex::encode(B64.decode(&h.parts[0].digest).unwrap()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            h.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn multi_part_file_matches_whole_buffer_digests() {
        // 3 parts of 5 MiB, the last one short; not a multiple of the read buffer.
        let size = 12 * MIB as usize + 12_345;
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let f = write(&data);
        let h = hash_file(f.path(), 0, &CancellationToken::new()).unwrap();
        assert_eq!(h.plan.part_size, 5 * MIB);
        assert_eq!(h.parts.len(), 3);
        assert_eq!(h.sha256, hex::encode(Sha256::digest(&data)));
        for p in &h.parts {
            let slice = &data[p.offset as usize..(p.offset + p.size) as usize];
            assert_eq!(
                p.digest,
                B64.encode(Sha256::digest(slice)),
                "part {}",
                p.number
            );
        }
        assert_eq!(h.parts[2].size, 2 * MIB + 12_345);
        let id = FileIdentity::read(f.path()).unwrap();
        assert_eq!(id, h.identity);
    }

    #[test]
    fn parts_come_one_by_one_and_agree_with_the_whole_pass() {
        let data: Vec<u8> = (0..11 * MIB as usize + 7)
            .map(|i| (i % 253) as u8)
            .collect();
        let f = write(&data);
        let none = CancellationToken::new();
        let whole = hash_file(f.path(), 0, &none).unwrap();
        let (id, plan) = (whole.identity, whole.plan);
        let mut seen = Vec::new();
        let sha = hash_parts(f.path(), id, plan, PartChecksum::Sha256, true, &none, |p| {
            seen.push(p);
            Ok(())
        })
        .unwrap();
        assert_eq!(sha.as_deref(), Some(whole.sha256.as_str()));
        assert_eq!(seen, whole.parts);
        // MD5 parts, and no whole-file digest when not asked for.
        let mut md5s = Vec::new();
        let sha = hash_parts(f.path(), id, plan, PartChecksum::Md5, false, &none, |p| {
            md5s.push(p);
            Ok(())
        })
        .unwrap();
        assert_eq!(sha, None);
        for p in &md5s {
            let slice = &data[p.offset as usize..(p.offset + p.size) as usize];
            assert_eq!(
                p.digest,
                B64.encode(Md5::digest(slice)),
                "part {}",
                p.number
            );
        }
        // The consumer can stop the pass.
        let mut calls = 0;
        let stopped = hash_parts(
            f.path(),
            id,
            plan,
            PartChecksum::Sha256,
            true,
            &none,
            |_| {
                calls += 1;
                Err(HashError::Cancelled)
            },
        );
        assert!(matches!(stopped, Err(HashError::Cancelled)));
        assert_eq!(calls, 1);
        // A file that is no longer the one planned is refused before it is read.
        let mut other = whole.identity;
        other.mtime_ns += 1;
        assert!(matches!(
            hash_parts(
                f.path(),
                other,
                plan,
                PartChecksum::Md5,
                true,
                &none,
                |_| Ok(())
            ),
            Err(HashError::Changed)
        ));
    }

    #[test]
    fn cancelled_hash_stops() {
        let f = write(b"abc");
        let c = CancellationToken::new();
        c.cancel();
        assert!(matches!(
            hash_file(f.path(), 0, &c),
            Err(HashError::Cancelled)
        ));
    }

    #[test]
    fn etag_comparison() {
        let md5 = "kAFQmDzST7DWlj99KOF/cg=="; // md5("abc")
        assert!(etag_matches("\"900150983cd24fb0d6963f7d28e17f72\"", md5));
        assert!(etag_matches("900150983CD24FB0D6963F7D28E17F72", md5));
        assert!(etag_matches("W/\"900150983cd24fb0d6963f7d28e17f72\"", md5));
        assert!(!etag_matches("\"900150983cd24fb0d6963f7d28e17f73\"", md5));
        assert!(!etag_matches("\"abc-2\"", md5));
        assert!(!etag_matches(
            "\"900150983cd24fb0d6963f7d28e17f72\"",
            "not base64!"
        ));
        assert_eq!(strip_etag(" \"x\" "), "x");
    }
}
