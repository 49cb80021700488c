//! The `parts` table: a job's part plan, the part digests and SHA-256 of the hash pass,
//! finished parts, and their reconciliation with what storage holds.

use rusqlite::{params, Connection, Row};
use uplink_protocol::ops::{PartChecksum, StoredPart};
use uplink_protocol::plan::PartPlan;
use uplink_protocol::telemetry::JobState;
use uuid::Uuid;

use super::{transition_tx, StoreError};
use crate::hasher::{self, FileHash, FileIdentity};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRecord {
    pub number: u32,
    pub offset: u64,
    pub size: u64,
    /// Base64 digest in the job's `part_checksum`; empty until the part is hashed (parts
    /// of a file hashed while it uploads).
    pub digest: String,
    pub etag: Option<String>,
    pub done: bool,
}

impl PartRecord {
    pub fn hashed(&self) -> bool {
        !self.digest.is_empty()
    }
}

fn part_from_row(row: &Row<'_>) -> rusqlite::Result<PartRecord> {
    let offset: i64 = row.get("part_offset")?;
    let size: i64 = row.get("size")?;
    Ok(PartRecord {
        number: row.get("number")?,
        offset: offset as u64,
        size: size as u64,
        digest: row.get("digest")?,
        etag: row.get("etag")?,
        done: row.get("done")?,
    })
}

/// Stores the hash pass (identity, SHA-256, parts) and moves the job `hashing → open`.
pub fn store_hash(
    conn: &mut Connection,
    id: Uuid,
    hash: &FileHash,
    now: i64,
) -> Result<(), StoreError> {
    let parts: Vec<_> = hash
        .parts
        .iter()
        .map(|p| (p.number, p.offset, p.size, p.digest.as_str()))
        .collect();
    store_parts(
        conn,
        id,
        hash.identity,
        &hash.plan,
        (hash.checksum, Some(&hash.sha256)),
        &parts,
        now,
    )
}

/// Stores the file's identity and part plan, its parts not hashed yet (they are hashed while
/// they upload, with SHA-256), and moves the job `hashing → open`.
pub fn store_plan(
    conn: &mut Connection,
    id: Uuid,
    identity: FileIdentity,
    plan: &PartPlan,
    now: i64,
) -> Result<(), StoreError> {
    let parts: Vec<_> = (1..=plan.part_count)
        .filter_map(|n| plan.part(n).map(|(offset, size)| (n, offset, size, "")))
        .collect();
    store_parts(
        conn,
        id,
        identity,
        plan,
        (PartChecksum::Sha256, None),
        &parts,
        now,
    )
}

/// (number, offset, size, base64 digest or "" when not hashed yet).
type NewPart<'a> = (u32, u64, u64, &'a str);

fn store_parts(
    conn: &mut Connection,
    id: Uuid,
    identity: FileIdentity,
    plan: &PartPlan,
    (checksum, sha256): (PartChecksum, Option<&str>),
    parts: &[NewPart<'_>],
    now: i64,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    tx.execute(
        "DELETE FROM parts WHERE job_id = ?1",
        params![id.to_string()],
    )?;
    {
        let mut stmt = tx.prepare(
            "INSERT INTO parts (job_id, number, part_offset, size, digest, etag, done)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, 0)",
        )?;
        for (number, offset, size, digest) in parts {
            stmt.execute(params![
                id.to_string(),
                number,
                *offset as i64,
                *size as i64,
                digest
            ])?;
        }
    }
    tx.execute(
        "UPDATE jobs SET size = ?2, mtime_ns = ?3, inode = ?4, part_size = ?5, sha256 = ?6,
                         bytes_total = ?2, updated_at = ?7, part_checksum = ?8
         WHERE id = ?1",
        params![
            id.to_string(),
            identity.size as i64,
            identity.mtime_ns,
            identity.inode as i64,
            plan.part_size as i64,
            sha256,
            now,
            checksum.as_str()
        ],
    )?;
    transition_tx(&tx, id, JobState::Open, None, now)?;
    tx.commit()?;
    Ok(())
}

/// Records a part's digest from the hash pass that runs while the parts upload. A part
/// hashed before (by an earlier, interrupted pass) must hash the same, or the file changed:
/// returns whether the part was newly hashed, or `None` on a different digest.
pub fn hash_part(
    conn: &Connection,
    job_id: Uuid,
    number: u32,
    digest: &str,
) -> Result<Option<bool>, StoreError> {
    let before: String = conn.query_row(
        "SELECT digest FROM parts WHERE job_id = ?1 AND number = ?2",
        params![job_id.to_string(), number],
        |row| row.get(0),
    )?;
    if before.is_empty() {
        conn.execute(
            "UPDATE parts SET digest = ?3 WHERE job_id = ?1 AND number = ?2",
            params![job_id.to_string(), number, digest],
        )?;
        Ok(Some(true))
    } else {
        Ok((before == digest).then_some(false))
    }
}

/// Takes the part checksum the session answered with. When the parts were hashed with
/// another one (an API or storage that keeps MD5), their digests are dropped: the hash pass
/// beside the upload computes them again. Returns whether they were.
pub fn adopt_checksum(
    conn: &mut Connection,
    id: Uuid,
    checksum: PartChecksum,
) -> Result<bool, StoreError> {
    let tx = conn.transaction()?;
    let changed = tx.execute(
        "UPDATE jobs SET part_checksum = ?2 WHERE id = ?1 AND part_checksum <> ?2",
        params![id.to_string(), checksum.as_str()],
    )? > 0;
    if changed {
        tx.execute(
            "UPDATE parts SET digest = '' WHERE job_id = ?1",
            params![id.to_string()],
        )?;
    }
    tx.commit()?;
    Ok(changed)
}

/// Records the whole file's SHA-256 once the hash pass that ran with the upload ends.
pub fn set_sha256(conn: &Connection, id: Uuid, sha256: &str, now: i64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE jobs SET sha256 = ?2, updated_at = ?3 WHERE id = ?1",
        params![id.to_string(), sha256, now],
    )?;
    Ok(())
}

pub fn parts(conn: &Connection, job_id: Uuid) -> Result<Vec<PartRecord>, StoreError> {
    let mut stmt = conn.prepare("SELECT * FROM parts WHERE job_id = ?1 ORDER BY number")?;
    let rows = stmt
        .query_map(params![job_id.to_string()], part_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Bytes of the parts already done.
pub fn bytes_done(conn: &Connection, job_id: Uuid) -> Result<u64, StoreError> {
    let n: i64 = conn.query_row(
        "SELECT COALESCE(SUM(size), 0) FROM parts WHERE job_id = ?1 AND done = 1",
        params![job_id.to_string()],
        |row| row.get(0),
    )?;
    Ok(n as u64)
}

/// Commits one finished part (number + ETag) in its own transaction.
pub fn commit_part(
    conn: &mut Connection,
    job_id: Uuid,
    number: u32,
    etag: &str,
) -> Result<(), StoreError> {
    commit_parts(conn, job_id, &[(number, etag)])
}

/// Marks uploaded parts done with their ETags, in one transaction.
pub fn commit_parts(
    conn: &mut Connection,
    job_id: Uuid,
    etags: &[(u32, &str)],
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut update =
            tx.prepare("UPDATE parts SET etag = ?3, done = 1 WHERE job_id = ?1 AND number = ?2")?;
        for (number, etag) in etags {
            update.execute(params![job_id.to_string(), number, etag])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Makes the parts agree with what storage holds (the authority): a part is done iff storage
/// holds it with our size and, with MD5 parts, an ETag equal to our MD5 (a SHA-256 part's
/// URL admitted only its exact bytes, and the API refuses another digest for a part).
/// Returns (parts done, bytes done).
pub fn reconcile_parts(
    conn: &mut Connection,
    job_id: Uuid,
    stored: &[StoredPart],
) -> Result<(u32, u64), StoreError> {
    let tx = conn.transaction()?;
    let ours = {
        let mut stmt = tx.prepare("SELECT * FROM parts WHERE job_id = ?1 ORDER BY number")?;
        let rows = stmt
            .query_map(params![job_id.to_string()], part_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows
    };
    let checksum: String = tx.query_row(
        "SELECT part_checksum FROM jobs WHERE id = ?1",
        params![job_id.to_string()],
        |row| row.get(0),
    )?;
    let md5 = checksum == PartChecksum::Md5.as_str();
    let (mut count, mut bytes) = (0u32, 0u64);
    for part in ours {
        let held = stored.iter().find(|s| {
            s.number == part.number
                && s.size == part.size
                && part.hashed()
                && (!md5 || hasher::etag_matches(&s.etag, &part.digest))
        });
        match held {
            Some(s) => {
                tx.execute(
                    "UPDATE parts SET etag = ?3, done = 1 WHERE job_id = ?1 AND number = ?2",
                    params![job_id.to_string(), part.number, hasher::strip_etag(&s.etag)],
                )?;
                count += 1;
                bytes += part.size;
            }
            None => {
                tx.execute(
                    "UPDATE parts SET etag = NULL, done = 0 WHERE job_id = ?1 AND number = ?2",
                    params![job_id.to_string(), part.number],
                )?;
            }
        }
    }
    tx.commit()?;
    Ok((count, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{db, hash, new_job};
    use crate::store::{accept_upload, commit_part, require_job, set_job_state};
    use uplink_protocol::plan;

    #[test]
    fn a_planned_job_is_hashed_part_by_part() {
        let (_d, mut c) = db();
        let id = Uuid::new_v4();
        accept_upload(&mut c, &new_job(id), 1).unwrap();
        set_job_state(&mut c, id, JobState::Hashing, 2).unwrap();
        let h = hash();
        store_plan(&mut c, id, h.identity, &h.plan, 3).unwrap();
        let j = require_job(&c, id).unwrap();
        assert_eq!(j.state, JobState::Open);
        assert!(j.planned() && !j.hashed());
        let ps = parts(&c, id).unwrap();
        assert_eq!(ps.len(), h.parts.len());
        assert!(ps.iter().all(|p| !p.hashed() && !p.done));
        assert_eq!(
            ps.iter()
                .map(|p| (p.number, p.offset, p.size))
                .collect::<Vec<_>>(),
            h.parts
                .iter()
                .map(|p| (p.number, p.offset, p.size))
                .collect::<Vec<_>>()
        );
        let md5 = &h.parts[0].digest;
        assert_eq!(hash_part(&c, id, 1, md5).unwrap(), Some(true));
        // Hashed again by a later pass: the same MD5 is no news, another one a changed file.
        assert_eq!(hash_part(&c, id, 1, md5).unwrap(), Some(false));
        assert_eq!(
            hash_part(&c, id, 1, "AAAAAAAAAAAAAAAAAAAAAA==").unwrap(),
            None
        );
        assert_eq!(&parts(&c, id).unwrap()[0].digest, md5);
        set_sha256(&c, id, &h.sha256, 4).unwrap();
        assert!(require_job(&c, id).unwrap().hashed());
    }

    #[test]
    fn a_session_with_another_checksum_drops_the_digests_and_sha256_parts_reconcile_by_size() {
        let (_d, mut c) = db();
        let id = Uuid::new_v4();
        accept_upload(&mut c, &new_job(id), 1).unwrap();
        set_job_state(&mut c, id, JobState::Hashing, 1).unwrap();
        store_hash(&mut c, id, &hash(), 1).unwrap(); // MD5 parts
        assert!(!adopt_checksum(&mut c, id, PartChecksum::Md5).unwrap());
        assert!(parts(&c, id).unwrap().iter().all(|p| p.hashed()));
        assert!(adopt_checksum(&mut c, id, PartChecksum::Sha256).unwrap());
        let j = require_job(&c, id).unwrap();
        assert_eq!(j.part_checksum, PartChecksum::Sha256);
        assert!(!j.lacks_sha256());
        assert!(parts(&c, id).unwrap().iter().all(|p| !p.hashed()));
        // Unhashed parts are never taken as held; hashed ones by number and size alone.
        let held = |n| StoredPart {
            number: n,
            size: 5 * plan::MIB,
            etag: "\"an md5 the agent never computed\"".into(),
        };
        assert_eq!(reconcile_parts(&mut c, id, &[held(1)]).unwrap(), (0, 0));
        hash_part(&c, id, 1, "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=").unwrap();
        assert_eq!(
            reconcile_parts(&mut c, id, &[held(1), held(2)]).unwrap(),
            (1, 5 * plan::MIB)
        );
    }

    #[test]
    fn reconcile_trusts_storage() {
        let (_d, mut conn) = db();
        let id = Uuid::new_v4();
        accept_upload(&mut conn, &new_job(id), 1).unwrap();
        set_job_state(&mut conn, id, JobState::Hashing, 1).unwrap();
        store_hash(&mut conn, id, &hash(), 1).unwrap();
        // We think part 3 is done; storage does not hold it.
        commit_part(&mut conn, id, 3, "900150983cd24fb0d6963f7d28e17f72").unwrap();
        let stored = vec![
            StoredPart {
                number: 1,
                size: 5 * plan::MIB,
                etag: "\"900150983cd24fb0d6963f7d28e17f72\"".into(),
            },
            // wrong ETag: must be uploaded again
            StoredPart {
                number: 2,
                size: 5 * plan::MIB,
                etag: "\"00000000000000000000000000000000\"".into(),
            },
        ];
        let (n, bytes) = reconcile_parts(&mut conn, id, &stored).unwrap();
        assert_eq!((n, bytes), (1, 5 * plan::MIB));
        let ps = parts(&conn, id).unwrap();
        assert_eq!(
            ps.iter().map(|p| p.done).collect::<Vec<_>>(),
            vec![true, false, false]
        );
        assert_eq!(
            ps[0].etag.as_deref(),
            Some("900150983cd24fb0d6963f7d28e17f72")
        );
        assert_eq!(ps[2].etag, None);
    }
}
