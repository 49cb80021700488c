//! SQLite state: commands (and their acks), jobs and parts, in `{state_dir}/agent.db`.
//!
//! The functions here are blocking and take a `Connection`; async code goes through
//! [`Store::call`], which runs them on the blocking pool. No lock is held across `.await`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use uplink_protocol::command::AckState;
use uplink_protocol::ops::StoredPart;
use uplink_protocol::plan::PartPlan;
use uplink_protocol::telemetry::JobState;
use uuid::Uuid;

use crate::hasher::{self, FileHash, FileIdentity};
use crate::job::{self, TransitionError};

pub const DB_FILE: &str = "agent.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot create state directory {0}: {1}")]
    StateDir(PathBuf, std::io::Error),
    #[error("{0}")]
    Transition(#[from] TransitionError),
    #[error("no job {0}")]
    NoJob(Uuid),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database worker stopped: {0}")]
    Worker(String),
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS commands (
    id          TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL,
    action      TEXT NOT NULL,
    ack_state   TEXT NOT NULL,
    ack_reason  TEXT,
    session_id  TEXT,
    ack_at      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id                TEXT PRIMARY KEY,
    path              TEXT NOT NULL,
    file_name         TEXT NOT NULL,
    size              INTEGER,
    mtime_ns          INTEGER,
    inode             INTEGER,
    part_size         INTEGER,
    sha256            TEXT,
    create_request_id TEXT NOT NULL,
    session_id        TEXT,
    state             TEXT NOT NULL,
    error             TEXT,
    bytes_total       INTEGER NOT NULL DEFAULT 0,
    pause_requested   INTEGER NOT NULL DEFAULT 0,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS parts (
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    number      INTEGER NOT NULL,
    part_offset INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    md5         TEXT NOT NULL,
    etag        TEXT,
    done        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, number)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"#;

/// The table of the files the watches (`crate::watch`) queued.
const WATCH_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS watched_files (
    path         TEXT NOT NULL,
    size         INTEGER NOT NULL,
    mtime_ns     INTEGER NOT NULL,
    inode        INTEGER NOT NULL,
    job_id       TEXT NOT NULL UNIQUE,
    dataset      TEXT NOT NULL,
    after_upload TEXT NOT NULL,
    queued_at    INTEGER NOT NULL,
    -- after_upload = 'delete' only: what became of the file once the job ended.
    outcome      TEXT,
    finished_at  INTEGER,
    PRIMARY KEY (path, size, mtime_ns, inode)
);
CREATE INDEX IF NOT EXISTS watched_files_pending ON watched_files(after_upload, outcome);
"#;

/// Schema changes after [`SCHEMA`], applied in order; `PRAGMA user_version` counts the ones
/// applied, so an older database upgrades in place when it is opened. Never edit a landed
/// entry; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: job priorities (flow control) and the overrides of signed `config` commands.
    "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 5;
     CREATE TABLE flow_overrides (
         id         INTEGER PRIMARY KEY CHECK (id = 1),
         config     TEXT NOT NULL,
         command_id TEXT NOT NULL,
         updated_at INTEGER NOT NULL
     );",
];

/// The ack stored for a command; re-sent as is when the command is delivered again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAck {
    pub state: AckState,
    pub reason: Option<String>,
    pub session_id: Option<Uuid>,
}

impl StoredAck {
    pub fn new(state: AckState) -> Self {
        StoredAck {
            state,
            reason: None,
            session_id: None,
        }
    }

    pub fn with_reason(state: AckState, reason: impl Into<String>) -> Self {
        StoredAck {
            state,
            reason: Some(reason.into()),
            session_id: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRecord {
    pub id: Uuid,
    pub received_at: i64,
    /// The command's action, as JSON.
    pub action: String,
    pub ack: StoredAck,
    pub ack_at: i64,
}

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRecord {
    pub number: u32,
    pub offset: u64,
    pub size: u64,
    /// Base64 MD5; empty until the part is hashed (parts of a file hashed while it
    /// uploads).
    pub md5: String,
    pub etag: Option<String>,
    pub done: bool,
}

impl PartRecord {
    pub fn hashed(&self) -> bool {
        !self.md5.is_empty()
    }
}

/// Opens (creating when needed) the database in `state_dir`.
pub fn open(state_dir: &Path) -> Result<Connection, StoreError> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| StoreError::StateDir(state_dir.to_path_buf(), e))?;
    open_file(&state_dir.join(DB_FILE))
}

pub fn open_file(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.execute_batch(SCHEMA)?;
    migrate(&mut conn)?;
    conn.execute_batch(WATCH_SCHEMA)?;
    Ok(conn)
}

/// Applies the [`MIGRATIONS`] the database lacks, each in its own transaction (taken with
/// a write lock first, so an agent and `uplink-agent upload` opening it at once agree).
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if current >= version {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
    }
    Ok(())
}

/// The schema version a fully migrated database has.
pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Shared handle; blocking work runs on the blocking pool.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    pub fn new(conn: Connection) -> Self {
        Store {
            conn: Arc::new(Mutex::new(conn)),
        }
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<F, R>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Worker("connection lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Worker(e.to_string()))?
    }
}

fn uuid_col(row: &Row<'_>, idx: &str) -> rusqlite::Result<Uuid> {
    let s: String = row.get(idx)?;
    Uuid::parse_str(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn opt_uuid_col(row: &Row<'_>, idx: &str) -> rusqlite::Result<Option<Uuid>> {
    let s: Option<String> = row.get(idx)?;
    s.map(|s| Uuid::parse_str(&s)).transpose().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn parse_ack_state(s: &str) -> Option<AckState> {
    [
        AckState::Accepted,
        AckState::Rejected,
        AckState::Done,
        AckState::Failed,
    ]
    .into_iter()
    .find(|a| a.as_str() == s)
}

fn bad(what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        Box::<dyn std::error::Error + Send + Sync>::from(what),
    )
}

fn command_from_row(row: &Row<'_>) -> rusqlite::Result<CommandRecord> {
    let state: String = row.get("ack_state")?;
    Ok(CommandRecord {
        id: uuid_col(row, "id")?,
        received_at: row.get("received_at")?,
        action: row.get("action")?,
        ack: StoredAck {
            state: parse_ack_state(&state).ok_or_else(|| bad(format!("ack state {state}")))?,
            reason: row.get("ack_reason")?,
            session_id: opt_uuid_col(row, "session_id")?,
        },
        ack_at: row.get("ack_at")?,
    })
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

fn part_from_row(row: &Row<'_>) -> rusqlite::Result<PartRecord> {
    let offset: i64 = row.get("part_offset")?;
    let size: i64 = row.get("size")?;
    Ok(PartRecord {
        number: row.get("number")?,
        offset: offset as u64,
        size: size as u64,
        md5: row.get("md5")?,
        etag: row.get("etag")?,
        done: row.get("done")?,
    })
}

// ---- commands ----------------------------------------------------------------------------

pub fn get_command(conn: &Connection, id: Uuid) -> Result<Option<CommandRecord>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT * FROM commands WHERE id = ?1",
            params![id.to_string()],
            command_from_row,
        )
        .optional()?)
}

fn insert_command_tx(
    tx: &Transaction<'_>,
    id: Uuid,
    now: i64,
    action: &str,
    ack: &StoredAck,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO commands (id, received_at, action, ack_state, ack_reason, session_id, ack_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?2)",
        params![
            id.to_string(),
            now,
            action,
            ack.state.as_str(),
            ack.reason,
            ack.session_id.map(|s| s.to_string())
        ],
    )?;
    Ok(())
}

/// Records a command with its (first) ack.
pub fn insert_command(
    conn: &mut Connection,
    id: Uuid,
    now: i64,
    action: &str,
    ack: &StoredAck,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    insert_command_tx(&tx, id, now, action, ack)?;
    tx.commit()?;
    Ok(())
}

fn set_ack_tx(tx: &Transaction<'_>, id: Uuid, ack: &StoredAck, now: i64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE commands SET ack_state = ?2, ack_reason = ?3, session_id = ?4, ack_at = ?5
         WHERE id = ?1",
        params![
            id.to_string(),
            ack.state.as_str(),
            ack.reason,
            ack.session_id.map(|s| s.to_string()),
            now
        ],
    )?;
    Ok(())
}

/// Final acks changed since `since` (re-sent after a reconnect, in case one was lost).
pub fn recent_final_acks(
    conn: &Connection,
    since: i64,
) -> Result<Vec<(Uuid, StoredAck)>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT * FROM commands WHERE ack_at >= ?1 AND ack_state != 'accepted' ORDER BY ack_at",
    )?;
    let rows = stmt
        .query_map(params![since], command_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows.into_iter().map(|c| (c.id, c.ack)).collect())
}

// ---- jobs --------------------------------------------------------------------------------

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

fn transition_tx(
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
        .map(|p| (p.number, p.offset, p.size, p.md5.as_str()))
        .collect();
    store_parts(
        conn,
        id,
        hash.identity,
        &hash.plan,
        Some(&hash.sha256),
        &parts,
        now,
    )
}

/// Stores the file's identity and part plan, its parts not hashed yet (they are hashed while
/// they upload), and moves the job `hashing → open`.
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
    store_parts(conn, id, identity, plan, None, &parts, now)
}

/// (number, offset, size, base64 MD5 or "" when not hashed yet).
type NewPart<'a> = (u32, u64, u64, &'a str);

fn store_parts(
    conn: &mut Connection,
    id: Uuid,
    identity: FileIdentity,
    plan: &PartPlan,
    sha256: Option<&str>,
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
            "INSERT INTO parts (job_id, number, part_offset, size, md5, etag, done)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, 0)",
        )?;
        for (number, offset, size, md5) in parts {
            stmt.execute(params![
                id.to_string(),
                number,
                *offset as i64,
                *size as i64,
                md5
            ])?;
        }
    }
    tx.execute(
        "UPDATE jobs SET size = ?2, mtime_ns = ?3, inode = ?4, part_size = ?5, sha256 = ?6,
                         bytes_total = ?2, updated_at = ?7
         WHERE id = ?1",
        params![
            id.to_string(),
            identity.size as i64,
            identity.mtime_ns,
            identity.inode as i64,
            plan.part_size as i64,
            sha256,
            now
        ],
    )?;
    transition_tx(&tx, id, JobState::Open, None, now)?;
    tx.commit()?;
    Ok(())
}

/// Records a part's MD5 from the hash pass that runs while the parts upload. A part hashed
/// before (by an earlier, interrupted pass) must hash the same, or the file changed:
/// returns whether the part was newly hashed, or `None` on a different MD5.
pub fn hash_part(
    conn: &Connection,
    job_id: Uuid,
    number: u32,
    md5: &str,
) -> Result<Option<bool>, StoreError> {
    let before: String = conn.query_row(
        "SELECT md5 FROM parts WHERE job_id = ?1 AND number = ?2",
        params![job_id.to_string(), number],
        |row| row.get(0),
    )?;
    if before.is_empty() {
        conn.execute(
            "UPDATE parts SET md5 = ?3 WHERE job_id = ?1 AND number = ?2",
            params![job_id.to_string(), number, md5],
        )?;
        Ok(Some(true))
    } else {
        Ok((before == md5).then_some(false))
    }
}

/// Records the whole file's SHA-256 once the hash pass that ran with the upload ends.
pub fn set_sha256(conn: &Connection, id: Uuid, sha256: &str, now: i64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE jobs SET sha256 = ?2, updated_at = ?3 WHERE id = ?1",
        params![id.to_string(), sha256, now],
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

// ---- flow overrides ----------------------------------------------------------------------

/// The overrides of the `config` commands applied so far (none: the file's settings hold).
/// A database without the table (not migrated yet, read by `status`) has none.
pub fn flow_overrides(
    conn: &Connection,
) -> Result<Option<uplink_protocol::flow::FlowConfig>, StoreError> {
    let row: Option<String> = match conn
        .query_row("SELECT config FROM flow_overrides WHERE id = 1", [], |r| {
            r.get(0)
        })
        .optional()
    {
        Ok(r) => r,
        Err(rusqlite::Error::SqliteFailure(_, Some(msg))) if msg.contains("no such table") => None,
        Err(e) => return Err(e.into()),
    };
    row.map(|json| {
        serde_json::from_str(&json)
            .map_err(|e| StoreError::Corrupt(format!("flow overrides {json}: {e}")))
    })
    .transpose()
}

/// Stores the overrides and records the `config` command with its `done` ack, in one
/// transaction (so a re-delivered command finds its ack and changes nothing again).
pub fn set_flow_overrides(
    conn: &mut Connection,
    overrides: &uplink_protocol::flow::FlowConfig,
    command_id: Uuid,
    action: &str,
    now: i64,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(overrides)
        .map_err(|e| StoreError::Corrupt(format!("flow overrides: {e}")))?;
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO flow_overrides (id, config, command_id, updated_at) VALUES (1, ?1, ?2, ?3)
         ON CONFLICT (id) DO UPDATE SET config = ?1, command_id = ?2, updated_at = ?3",
        params![json, command_id.to_string(), now],
    )?;
    insert_command_tx(
        &tx,
        command_id,
        now,
        action,
        &StoredAck::new(AckState::Done),
    )?;
    tx.commit()?;
    Ok(())
}

// ---- parts -------------------------------------------------------------------------------

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
    let tx = conn.transaction()?;
    tx.execute(
        "UPDATE parts SET etag = ?3, done = 1 WHERE job_id = ?1 AND number = ?2",
        params![job_id.to_string(), number, etag],
    )?;
    tx.commit()?;
    Ok(())
}

/// Makes the parts agree with what storage holds (the authority): a part is done iff storage
/// holds it with our size and an ETag equal to our MD5. Returns (parts done, bytes done).
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
    let (mut count, mut bytes) = (0u32, 0u64);
    for part in ours {
        let held = stored.iter().find(|s| {
            s.number == part.number
                && s.size == part.size
                && hasher::etag_matches(&s.etag, &part.md5)
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
    use crate::hasher::PartHash;
    use uplink_protocol::plan;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("state")).unwrap();
        (dir, conn)
    }

    fn new_job(id: Uuid) -> NewJob {
        NewJob {
            id,
            action: r#"{"type":"upload","path":"/data/a.bin"}"#.into(),
            path: "/data/a.bin".into(),
            file_name: "a.bin".into(),
            create_request_id: "create-1".into(),
            priority: 7,
        }
    }

    #[test]
    fn an_old_database_upgrades_in_place_and_keeps_its_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let id = Uuid::new_v4();
        {
            // A database as agents before schema versions made it.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(SCHEMA).unwrap();
            old.execute(
                "INSERT INTO jobs (id, path, file_name, create_request_id, state, created_at, updated_at)
                 VALUES (?1, '/data/old.bin', 'old.bin', 'create-old', 'uploading', 10, 10)",
                params![id.to_string()],
            )
            .unwrap();
            let v: i64 = old
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, 0);
        }
        let mut conn = open_file(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema_version());
        let job = require_job(&conn, id).unwrap();
        assert_eq!(job.state, JobState::Uploading);
        assert_eq!(job.priority, uplink_protocol::flow::DEFAULT_PRIORITY);
        assert_eq!(live_jobs(&conn).unwrap(), vec![id]);
        assert_eq!(flow_overrides(&conn).unwrap(), None);
        // Opening again (or by a second process) applies nothing twice.
        migrate(&mut conn).unwrap();
        drop(conn);
        let conn = open_file(&path).unwrap();
        assert_eq!(
            require_job(&conn, id).unwrap().path,
            PathBuf::from("/data/old.bin")
        );
    }

    #[test]
    fn flow_overrides_round_trip_with_their_command() {
        use uplink_protocol::flow::FlowConfig;
        let (_dir, mut conn) = db();
        assert_eq!(flow_overrides(&conn).unwrap(), None);
        let o = FlowConfig {
            max_upload_bytes_per_sec: Some(65536),
            upload_windows: Some(vec!["22:00-06:00".into()]),
            ..FlowConfig::default()
        };
        let cmd = Uuid::new_v4();
        set_flow_overrides(&mut conn, &o, cmd, r#"{"type":"config"}"#, 5).unwrap();
        assert_eq!(flow_overrides(&conn).unwrap(), Some(o));
        assert_eq!(
            get_command(&conn, cmd).unwrap().unwrap().ack.state,
            AckState::Done
        );
        let cleared = FlowConfig::default();
        set_flow_overrides(&mut conn, &cleared, Uuid::new_v4(), "{}", 6).unwrap();
        assert_eq!(flow_overrides(&conn).unwrap(), Some(cleared));
        // The same command twice is refused by the commands table: nothing changes.
        assert!(set_flow_overrides(&mut conn, &FlowConfig::default(), cmd, "{}", 7).is_err());
    }

    fn hash() -> FileHash {
        let plan = plan::plan(12 * plan::MIB, 0).unwrap();
        FileHash {
            identity: FileIdentity {
                size: 12 * plan::MIB,
                mtime_ns: 1_700_000_000_123_456_789,
                inode: u64::MAX - 3,
            },
            plan,
            sha256: "ab".repeat(32),
            parts: (1..=plan.part_count)
                .map(|n| {
                    let (offset, size) = plan.part(n).unwrap();
                    PartHash {
                        number: n,
                        offset,
                        size,
                        // md5("abc") for every part, for simplicity
                        md5: "kAFQmDzST7DWlj99KOF/cg==".into(),
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn pragmas_are_set() {
        let (_d, conn) = db();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2); // FULL
    }

    #[test]
    fn commands_round_trip() {
        let (_d, mut conn) = db();
        let id = Uuid::new_v4();
        assert_eq!(get_command(&conn, id).unwrap(), None);
        let ack = StoredAck::with_reason(
            AckState::Rejected,
            "path /etc/passwd is outside the allowed roots",
        );
        insert_command(&mut conn, id, 10, "{}", &ack).unwrap();
        let c = get_command(&conn, id).unwrap().unwrap();
        assert_eq!((c.id, c.received_at, c.ack.clone()), (id, 10, ack.clone()));
        // Ids are executed once: a second insert fails.
        assert!(insert_command(&mut conn, id, 11, "{}", &ack).is_err());
        assert_eq!(recent_final_acks(&conn, 10).unwrap(), vec![(id, ack)]);
        assert!(recent_final_acks(&conn, 11).unwrap().is_empty());
    }

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
        let md5 = &h.parts[0].md5;
        assert_eq!(hash_part(&c, id, 1, md5).unwrap(), Some(true));
        // Hashed again by a later pass: the same MD5 is no news, another one a changed file.
        assert_eq!(hash_part(&c, id, 1, md5).unwrap(), Some(false));
        assert_eq!(
            hash_part(&c, id, 1, "AAAAAAAAAAAAAAAAAAAAAA==").unwrap(),
            None
        );
        assert_eq!(&parts(&c, id).unwrap()[0].md5, md5);
        set_sha256(&c, id, &h.sha256, 4).unwrap();
        assert!(require_job(&c, id).unwrap().hashed());
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

    #[tokio::test]
    async fn async_calls_run_off_the_executor() {
        let (_d, conn) = db();
        let store = Store::new(conn);
        let depth = store.call(|c| queue_depth(c)).await.unwrap();
        assert_eq!(depth, 0);
    }
}
