//! The `jobs` table: one row an upload (command-started or local), its state moved only
//! as the state machine in `crate::job` allows.

use std::path::PathBuf;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use uplink_protocol::command::AckState;
use uplink_protocol::ops::PartChecksum;
use uplink_protocol::telemetry::JobState;
use uuid::Uuid;

use super::{bad, insert_command_tx, opt_uuid_col, set_ack_tx, uuid_col, StoreError, StoredAck};
use crate::hasher::FileIdentity;
use crate::job;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// The upload command's id.
    pub id: Uuid,
    /// Canonical path of the file.
    pub path: PathBuf,
    /// File name used in the object key.
    pub file_name: String,
    pub identity: Option<FileIdentity>,
    pub part_size: Option<u64>,
    pub sha256: Option<String>,
    /// The digest its parts carry (the session's once it has one).
    pub part_checksum: PartChecksum,
    /// Request id of `session.create`, fixed when the job is made, so a restart re-uses it.
    pub create_request_id: String,
    pub session_id: Option<Uuid>,
    pub state: JobState,
    pub error: Option<String>,
    pub bytes_total: u64,
    pub pause_requested: bool,
    pub cancel_requested: bool,
    pub created_at: i64,
    pub updated_at: i64,
    /// 0 (lowest) to 9 (highest); parts of higher-priority jobs get PUT slots first.
    pub priority: u8,
    /// Queued on the gateway (`uplink-agent upload`), not by a command: no acks are sent
    /// and the session carries no command id.
    pub local: bool,
}

impl JobRecord {
    /// Identity and part plan stored: the session can be created.
    pub fn planned(&self) -> bool {
        self.identity.is_some() && self.part_size.is_some()
    }

    /// The whole file's SHA-256 is known too.
    pub fn hashed(&self) -> bool {
        self.sha256.is_some() && self.planned()
    }

    /// Whether completing still waits for the whole file's SHA-256: an MD5 session needs it
    /// (its part digests do not bind the content strongly enough for the API to take the
    /// stored object's) and it is not known yet.
    pub fn lacks_sha256(&self) -> bool {
        self.part_checksum == PartChecksum::Md5 && self.sha256.is_none()
    }
}

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let state: String = row.get("state")?;
    let size: Option<i64> = row.get("size")?;
    let mtime_ns: Option<i64> = row.get("mtime_ns")?;
    let inode: Option<i64> = row.get("inode")?;
    let identity = match (size, mtime_ns, inode) {
        (Some(size), Some(mtime_ns), Some(inode)) => Some(FileIdentity {
            size: size as u64,
            mtime_ns,
            inode: inode as u64,
        }),
        _ => None,
    };
    let path: String = row.get("path")?;
    let part_size: Option<i64> = row.get("part_size")?;
    let bytes_total: i64 = row.get("bytes_total")?;
    Ok(JobRecord {
        id: uuid_col(row, "id")?,
        path: PathBuf::from(path),
        file_name: row.get("file_name")?,
        identity,
        part_size: part_size.map(|p| p as u64),
        sha256: row.get("sha256")?,
        part_checksum: {
            let c: String = row.get("part_checksum")?;
            PartChecksum::parse(&c).ok_or_else(|| bad(format!("part checksum {c}")))?
        },
        create_request_id: row.get("create_request_id")?,
        session_id: opt_uuid_col(row, "session_id")?,
        state: JobState::parse(&state).ok_or_else(|| bad(format!("job state {state}")))?,
        error: row.get("error")?,
        bytes_total: bytes_total as u64,
        pause_requested: row.get("pause_requested")?,
        cancel_requested: row.get("cancel_requested")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
        // A database not migrated yet (read by `status` before the agent upgraded it)
        // has no priority column: every job has the default.
        priority: row
            .get::<_, u8>("priority")
            .unwrap_or(uplink_protocol::flow::DEFAULT_PRIORITY),
        local: row.get("local")?,
    })
}

/// A new upload job to record together with its command.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub action: String,
    pub path: PathBuf,
    pub file_name: String,
    pub create_request_id: String,
    pub priority: u8,
}

/// Records the upload command (ack `accepted`) and its job (`queued`) in one transaction.
pub fn accept_upload(conn: &mut Connection, job: &NewJob, now: i64) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    insert_command_tx(
        &tx,
        job.id,
        now,
        &job.action,
        &StoredAck::new(AckState::Accepted),
    )?;
    insert_queued_job(&tx, job, now)?;
    tx.commit()?;
    Ok(())
}

/// Records a job queued on the gateway itself (no command, no ack): `queued`.
pub fn queue_local_upload(conn: &mut Connection, job: &NewJob, now: i64) -> Result<(), StoreError> {
    insert_queued_job(conn, job, now)
}

/// The job row of a new upload, `queued`; command-started and local jobs alike.
fn insert_queued_job(conn: &Connection, job: &NewJob, now: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO jobs (id, path, file_name, create_request_id, state, created_at, updated_at,
                           priority)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
        params![
            job.id.to_string(),
            job.path.to_string_lossy(),
            job.file_name,
            job.create_request_id,
            JobState::Queued.as_str(),
            now,
            job.priority
        ],
    )?;
    Ok(())
}

/// Local jobs still `queued` (picked up by the running agent), oldest first.
pub fn queued_local_jobs(conn: &Connection) -> Result<Vec<Uuid>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id FROM jobs WHERE state = 'queued'
           AND NOT EXISTS (SELECT 1 FROM commands WHERE commands.id = jobs.id)
         ORDER BY created_at, id",
    )?;
    let ids = stmt
        .query_map([], |row| uuid_col(row, "id"))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ids)
}

/// Every job, newest first (at most `limit`).
pub fn list_jobs(conn: &Connection, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT jobs.*, NOT EXISTS (SELECT 1 FROM commands WHERE commands.id = jobs.id) AS local
         FROM jobs ORDER BY created_at DESC, id LIMIT ?1",
    )?;
    let jobs = stmt
        .query_map(params![limit], job_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(jobs)
}

/// Number of jobs per state.
pub fn job_counts(conn: &Connection) -> Result<Vec<(String, u64)>, StoreError> {
    let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
    let rows = stmt
        .query_map([], |row| {
            let n: i64 = row.get(1)?;
            Ok((row.get::<_, String>(0)?, n as u64))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn get_job(conn: &Connection, id: Uuid) -> Result<Option<JobRecord>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT jobs.*, NOT EXISTS (SELECT 1 FROM commands WHERE commands.id = jobs.id) AS local
             FROM jobs WHERE id = ?1",
            params![id.to_string()],
            job_from_row,
        )
        .optional()?)
}

pub fn require_job(conn: &Connection, id: Uuid) -> Result<JobRecord, StoreError> {
    get_job(conn, id)?.ok_or(StoreError::NoJob(id))
}

/// Ids of the jobs that are not terminal, oldest first.
pub fn live_jobs(conn: &Connection) -> Result<Vec<Uuid>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id FROM jobs WHERE state NOT IN ('done', 'failed', 'cancelled') ORDER BY created_at, id",
    )?;
    let ids = stmt
        .query_map([], |row| uuid_col(row, "id"))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ids)
}

pub fn queue_depth(conn: &Connection) -> Result<u32, StoreError> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM jobs WHERE state NOT IN ('done', 'failed', 'cancelled')",
        [],
        |row| row.get(0),
    )?;
    Ok(n as u32)
}

fn job_state_tx(tx: &Transaction<'_>, id: Uuid) -> Result<JobState, StoreError> {
    let state: Option<String> = tx
        .query_row(
            "SELECT state FROM jobs WHERE id = ?1",
            params![id.to_string()],
            |row| row.get(0),
        )
        .optional()?;
    let state = state.ok_or(StoreError::NoJob(id))?;
    JobState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("job state {state}")))
}

pub(super) fn transition_tx(
    tx: &Transaction<'_>,
    id: Uuid,
    to: JobState,
    error: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    let from = job_state_tx(tx, id)?;
    job::transition(from, to)?;
    tx.execute(
        "UPDATE jobs SET state = ?2, error = COALESCE(?3, error), updated_at = ?4 WHERE id = ?1",
        params![id.to_string(), to.as_str(), error, now],
    )?;
    Ok(())
}

/// Moves a job to `to` if the state machine allows it.
pub fn set_job_state(
    conn: &mut Connection,
    id: Uuid,
    to: JobState,
    now: i64,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    transition_tx(&tx, id, to, None, now)?;
    tx.commit()?;
    Ok(())
}

/// Moves a job to a terminal state and records its command's final ack, in one transaction.
pub fn finish_job(
    conn: &mut Connection,
    id: Uuid,
    to: JobState,
    ack: &StoredAck,
    now: i64,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    transition_tx(&tx, id, to, ack.reason.as_deref(), now)?;
    set_ack_tx(&tx, id, ack, now)?;
    tx.commit()?;
    Ok(())
}

/// Records a pause/resume or cancel request so that a restart honours it.
pub fn set_job_flags(
    conn: &Connection,
    id: Uuid,
    pause: Option<bool>,
    cancel: Option<bool>,
    now: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE jobs SET pause_requested = COALESCE(?2, pause_requested),
                         cancel_requested = COALESCE(?3, cancel_requested),
                         updated_at = ?4
         WHERE id = ?1",
        params![id.to_string(), pause, cancel, now],
    )?;
    Ok(())
}

pub fn set_session(
    conn: &Connection,
    id: Uuid,
    session_id: Uuid,
    now: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE jobs SET session_id = ?2, updated_at = ?3 WHERE id = ?1",
        params![id.to_string(), session_id.to_string(), now],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{db, hash, new_job};
    use crate::store::{bytes_done, commit_part, get_command, parts, store_hash};
    use uplink_protocol::plan;

    #[test]
    fn job_lifecycle_round_trip() {
        let (_d, mut conn) = db();
        let id = Uuid::new_v4();
        accept_upload(&mut conn, &new_job(id), 100).unwrap();
        let c = get_command(&conn, id).unwrap().unwrap();
        assert_eq!(c.ack.state, AckState::Accepted);
        let j = require_job(&conn, id).unwrap();
        assert_eq!(j.state, JobState::Queued);
        assert!(!j.hashed());
        assert_eq!(j.create_request_id, "create-1");
        assert_eq!(live_jobs(&conn).unwrap(), vec![id]);
        assert_eq!(queue_depth(&conn).unwrap(), 1);

        // open needs hashing first
        assert!(matches!(
            set_job_state(&mut conn, id, JobState::Open, 101),
            Err(StoreError::Transition(_))
        ));
        set_job_state(&mut conn, id, JobState::Hashing, 101).unwrap();
        let h = hash();
        store_hash(&mut conn, id, &h, 102).unwrap();
        let j = require_job(&conn, id).unwrap();
        assert_eq!(j.state, JobState::Open);
        assert_eq!(j.identity, Some(h.identity));
        assert_eq!(j.part_size, Some(5 * plan::MIB));
        assert_eq!(j.bytes_total, 12 * plan::MIB);
        assert!(j.hashed());
        let ps = parts(&conn, id).unwrap();
        assert_eq!(ps.len(), 3);
        assert_eq!((ps[2].offset, ps[2].size), (10 * plan::MIB, 2 * plan::MIB));

        let session = Uuid::new_v4();
        set_session(&conn, id, session, 103).unwrap();
        set_job_state(&mut conn, id, JobState::Uploading, 103).unwrap();
        commit_part(&mut conn, id, 2, "900150983cd24fb0d6963f7d28e17f72").unwrap();
        assert_eq!(bytes_done(&conn, id).unwrap(), 5 * plan::MIB);
        let ps = parts(&conn, id).unwrap();
        assert!(ps[1].done && !ps[0].done);

        set_job_flags(&conn, id, Some(true), None, 104).unwrap();
        let j = require_job(&conn, id).unwrap();
        assert!(j.pause_requested && !j.cancel_requested);
        assert_eq!(j.session_id, Some(session));

        set_job_state(&mut conn, id, JobState::Completing, 105).unwrap();
        let mut ack = StoredAck::new(AckState::Done);
        ack.session_id = Some(session);
        finish_job(&mut conn, id, JobState::Done, &ack, 106).unwrap();
        assert_eq!(require_job(&conn, id).unwrap().state, JobState::Done);
        assert_eq!(get_command(&conn, id).unwrap().unwrap().ack, ack);
        assert!(live_jobs(&conn).unwrap().is_empty());
        // Terminal states never change.
        assert!(set_job_state(&mut conn, id, JobState::Failed, 107).is_err());
    }
}
