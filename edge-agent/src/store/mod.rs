//! SQLite state: commands (and their acks), jobs and parts, in `{state_dir}/agent.db`.
//!
//! The functions here are blocking and take a `Connection`; async code goes through
//! [`Store::call`], which runs them on the blocking pool. No lock is held across `.await`.
//!
//! This file holds the handle, opening and migrations, and the errors; the queries live
//! one table a file, all re-exported here:
//! - `commands`: commands and their acks.
//! - `jobs`: the job rows and their state changes.
//! - `parts`: a job's part plan, the hash pass's results and finished parts.
//! - `overrides`: the flow overrides of `config` commands.
//!
//! The `watched_files` table is created here; its queries are in `crate::watch`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, Row};
use uuid::Uuid;

use crate::job::TransitionError;

mod commands;
mod jobs;
mod overrides;
mod parts;

pub use commands::*;
pub use jobs::*;
pub use overrides::*;
pub use parts::*;

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
    // 2: SHA-256 part digests: the job says which digest its parts carry.
    "ALTER TABLE jobs ADD COLUMN part_checksum TEXT NOT NULL DEFAULT 'md5';
     ALTER TABLE parts RENAME COLUMN md5 TO digest;",
];

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

fn bad(what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        Box::<dyn std::error::Error + Send + Sync>::from(what),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hasher::{FileHash, FileIdentity, PartHash};
    use rusqlite::params;
    use uplink_protocol::ops::PartChecksum;
    use uplink_protocol::plan;
    use uplink_protocol::telemetry::JobState;

    pub(super) fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("state")).unwrap();
        (dir, conn)
    }

    pub(super) fn new_job(id: Uuid) -> NewJob {
        NewJob {
            id,
            action: r#"{"type":"upload","path":"/data/a.bin"}"#.into(),
            path: "/data/a.bin".into(),
            file_name: "a.bin".into(),
            create_request_id: "create-1".into(),
            priority: 7,
        }
    }

    pub(super) fn hash() -> FileHash {
        let plan = plan::plan(12 * plan::MIB, 0).unwrap();
        FileHash {
            identity: FileIdentity {
                size: 12 * plan::MIB,
                mtime_ns: 1_700_000_000_123_456_789,
                inode: u64::MAX - 3,
            },
            plan,
            sha256: "ab".repeat(32),
            checksum: PartChecksum::Md5,
            parts: (1..=plan.part_count)
                .map(|n| {
                    let (offset, size) = plan.part(n).unwrap();
                    PartHash {
                        number: n,
                        offset,
                        size,
                        // md5("abc") for every part, for simplicity
                        digest: "kAFQmDzST7DWlj99KOF/cg==".into(),
                    }
                })
                .collect(),
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

    #[tokio::test]
    async fn async_calls_run_off_the_executor() {
        let (_d, conn) = db();
        let store = Store::new(conn);
        let depth = store.call(|c| queue_depth(c)).await.unwrap();
        assert_eq!(depth, 0);
    }
}
