//! The `watched_files` table: queueing a settled file as a local job (once per file
//! version) and, for `after_upload = "delete"`, what became of the file once its job ended.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::{Found, Watch};
use crate::hasher::FileIdentity;
use crate::store::{self, NewJob, StoreError};

/// Whether this version of the file was queued by a watch, or uploaded (or is being
/// uploaded) by any job.
pub fn is_known(conn: &Connection, path: &Path, id: &FileIdentity) -> Result<bool, StoreError> {
    let path = path.to_string_lossy();
    let (size, mtime, inode) = (id.size as i64, id.mtime_ns, id.inode as i64);
    let watched: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM watched_files WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3 AND inode = ?4",
            params![path, size, mtime, inode],
            |r| r.get(0),
        )
        .optional()?;
    if watched.is_some() {
        return Ok(true);
    }
    let job: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM jobs WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3 AND inode = ?4
               AND state NOT IN ('failed', 'cancelled') LIMIT 1",
            params![path, size, mtime, inode],
            |r| r.get(0),
        )
        .optional()?;
    Ok(job.is_some())
}

/// Queues a local job for `found` and records it, in one transaction. Returns the job id,
/// or `None` when this version is already known.
pub fn queue(
    conn: &mut Connection,
    found: &Found,
    watch: &Watch,
    now: i64,
) -> Result<Option<Uuid>, StoreError> {
    // `store::queue_local_upload` takes the connection itself, so the transaction is
    // spelled out; whatever fails (the commit included) leaves no transaction open.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = queue_in_tx(conn, found, watch, now);
    let result = result.and_then(|queued| {
        conn.execute_batch("COMMIT")?;
        Ok(queued)
    });
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

fn queue_in_tx(
    conn: &mut Connection,
    found: &Found,
    watch: &Watch,
    now: i64,
) -> Result<Option<Uuid>, StoreError> {
    if is_known(conn, &found.path, &found.identity)? {
        return Ok(None);
    }
    let job = NewJob {
        id: Uuid::new_v4(),
        action: String::new(),
        path: found.path.clone(),
        file_name: found
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into()),
        create_request_id: format!("create-{}", Uuid::new_v4().simple()),
        priority: uplink_protocol::flow::DEFAULT_PRIORITY,
    };
    store::queue_local_upload(conn, &job, now)?;
    conn.execute(
        "INSERT INTO watched_files (path, size, mtime_ns, inode, job_id, dataset, after_upload, queued_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            found.path.to_string_lossy(),
            found.identity.size as i64,
            found.identity.mtime_ns,
            found.identity.inode as i64,
            job.id.to_string(),
            watch.dataset,
            watch.after_upload.as_str(),
            now
        ],
    )?;
    Ok(Some(job.id))
}

/// The dataset of a job a watch queued (`None` for other jobs).
pub fn dataset_of(conn: &Connection, job_id: Uuid) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT dataset FROM watched_files WHERE job_id = ?1",
            params![job_id.to_string()],
            |r| r.get(0),
        )
        .optional()?)
}

/// A `delete` file whose job has ended and which is not dealt with yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub job_id: Uuid,
    pub path: PathBuf,
    pub state: String,
    /// What the job hashed (`None` if it ended before hashing).
    pub hashed: Option<FileIdentity>,
}

pub fn ended_deletes(conn: &Connection) -> Result<Vec<Ended>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT w.job_id, w.path, j.state, j.size, j.mtime_ns, j.inode
         FROM watched_files w JOIN jobs j ON j.id = w.job_id
         WHERE w.after_upload = 'delete' AND w.outcome IS NULL
           AND j.state IN ('done', 'failed', 'cancelled')",
    )?;
    let rows = stmt
        .query_map([], |r| {
            let id: String = r.get(0)?;
            let path: String = r.get(1)?;
            let (size, mtime, inode): (Option<i64>, Option<i64>, Option<i64>) =
                (r.get(3)?, r.get(4)?, r.get(5)?);
            Ok((id, path, r.get::<_, String>(2)?, size, mtime, inode))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(id, path, state, size, mtime, inode)| {
            let job_id = Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let hashed = match (size, mtime, inode) {
                (Some(size), Some(mtime_ns), Some(inode)) => Some(FileIdentity {
                    size: size as u64,
                    mtime_ns,
                    inode: inode as u64,
                }),
                _ => None,
            };
            Ok(Ended {
                job_id,
                path: PathBuf::from(path),
                state,
                hashed,
            })
        })
        .collect()
}

pub fn set_outcome(
    conn: &Connection,
    job_id: Uuid,
    outcome: &str,
    now: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE watched_files SET outcome = ?2, finished_at = ?3 WHERE job_id = ?1",
        params![job_id.to_string(), outcome, now],
    )?;
    Ok(())
}

/// Decides and does what `after_upload = "delete"` asks for one ended job; returns the
/// outcome to record. The check and the unlink are not atomic: a file replaced in the
/// instant between them is deleted.
pub fn finish_delete(ended: &Ended) -> String {
    if ended.state != "done" {
        return format!("kept: job {}", ended.state);
    }
    let Some(hashed) = ended.hashed else {
        return "kept: job was not hashed".into();
    };
    match std::fs::symlink_metadata(&ended.path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "gone".into(),
        Err(e) => format!("kept: cannot stat: {e}"),
        Ok(meta) if !meta.file_type().is_file() => "kept: no longer a regular file".into(),
        Ok(meta) if FileIdentity::of(&meta) != hashed => "kept: changed since it was hashed".into(),
        Ok(_) => match std::fs::remove_file(&ended.path) {
            Ok(()) => "deleted".into(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "gone".into(),
            Err(e) => format!("kept: cannot delete: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::watch::tests::{glob, id, tree};
    use crate::watch::AfterUpload;
    use uplink_protocol::telemetry::JobState;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = store::open(&dir.path().join("state")).unwrap();
        (dir, conn)
    }

    fn watch(root: &Path, after: AfterUpload) -> Watch {
        Watch {
            root: root.to_path_buf(),
            glob: "**/*.mcap".into(),
            matcher: glob("**/*.mcap"),
            dataset: "field-tests".into(),
            settle: Duration::from_secs(1),
            after_upload: after,
            scan_interval: Duration::from_secs(1),
            max_entries: 100,
        }
    }

    #[test]
    fn a_file_version_is_queued_once() {
        let (_d, mut conn) = db();
        let w = watch(Path::new("/data"), AfterUpload::Keep);
        let f = Found {
            path: "/data/a.mcap".into(),
            identity: id(10, 5, 9),
        };
        let job = queue(&mut conn, &f, &w, 1).unwrap().expect("queued");
        assert_eq!(queue(&mut conn, &f, &w, 2).unwrap(), None, "queued twice");
        assert_eq!(store::queued_local_jobs(&conn).unwrap(), vec![job]);
        assert_eq!(
            dataset_of(&conn, job).unwrap().as_deref(),
            Some("field-tests")
        );
        assert_eq!(dataset_of(&conn, Uuid::new_v4()).unwrap(), None);
        let rec = store::require_job(&conn, job).unwrap();
        assert_eq!(
            (rec.path, rec.file_name.as_str()),
            (f.path.clone(), "a.mcap")
        );
        // A replaced file is a new version.
        let newer = Found {
            identity: id(10, 5, 10),
            ..f.clone()
        };
        assert!(queue(&mut conn, &newer, &w, 3).unwrap().is_some());
        assert_eq!(store::queued_local_jobs(&conn).unwrap().len(), 2);
    }

    #[test]
    fn the_job_and_its_record_are_written_together_or_not_at_all() {
        let (_d, mut conn) = db();
        let w = watch(Path::new("/data"), AfterUpload::Keep);
        let f = Found {
            path: "/data/a.mcap".into(),
            identity: id(10, 5, 9),
        };
        // Make the record's insert fail: the job inserted before it must be rolled back.
        conn.execute_batch(
            "CREATE TEMP TRIGGER boom BEFORE INSERT ON watched_files
             BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
        )
        .unwrap();
        let err = queue(&mut conn, &f, &w, 1).unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert!(conn.is_autocommit(), "no transaction left open");
        assert!(store::queued_local_jobs(&conn).unwrap().is_empty());
        conn.execute_batch("DROP TRIGGER boom").unwrap();
        assert!(queue(&mut conn, &f, &w, 2).unwrap().is_some());
    }

    #[test]
    fn the_record_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let w = watch(Path::new("/data"), AfterUpload::Keep);
        let f = Found {
            path: "/data/a.mcap".into(),
            identity: id(10, 5, 9),
        };
        {
            let mut conn = store::open(&state).unwrap();
            queue(&mut conn, &f, &w, 1).unwrap().unwrap();
        }
        let mut conn = store::open(&state).unwrap();
        assert!(is_known(&conn, &f.path, &f.identity).unwrap());
        assert_eq!(queue(&mut conn, &f, &w, 2).unwrap(), None);
    }

    #[test]
    fn a_file_uploaded_by_another_job_is_known() {
        let (_d, mut conn) = db();
        let job = NewJob {
            id: Uuid::new_v4(),
            action: String::new(),
            path: "/data/a.mcap".into(),
            file_name: "a.mcap".into(),
            create_request_id: "create-x".into(),
            priority: uplink_protocol::flow::DEFAULT_PRIORITY,
        };
        store::queue_local_upload(&mut conn, &job, 1).unwrap();
        conn.execute(
            "UPDATE jobs SET size = 10, mtime_ns = 5, inode = 9 WHERE id = ?1",
            params![job.id.to_string()],
        )
        .unwrap();
        assert!(is_known(&conn, Path::new("/data/a.mcap"), &id(10, 5, 9)).unwrap());
        assert!(!is_known(&conn, Path::new("/data/a.mcap"), &id(11, 5, 9)).unwrap());
        store::set_job_state(&mut conn, job.id, JobState::Failed, 2).unwrap();
        assert!(
            !is_known(&conn, Path::new("/data/a.mcap"), &id(10, 5, 9)).unwrap(),
            "a failed job does not count"
        );
    }

    /// Queues `path` (as it is on disk) and moves its job to `end`, hashed as it is now.
    fn ended_job(conn: &mut Connection, path: &Path, after: AfterUpload, end: JobState) -> Uuid {
        let ident = FileIdentity::read(path).unwrap();
        let w = watch(path.parent().unwrap(), after);
        let f = Found {
            path: path.to_path_buf(),
            identity: ident,
        };
        let job = queue(conn, &f, &w, 1).unwrap().unwrap();
        conn.execute(
            "UPDATE jobs SET size = ?2, mtime_ns = ?3, inode = ?4 WHERE id = ?1",
            params![
                job.to_string(),
                ident.size as i64,
                ident.mtime_ns,
                ident.inode as i64
            ],
        )
        .unwrap();
        if end == JobState::Done {
            for s in [
                JobState::Hashing,
                JobState::Open,
                JobState::Uploading,
                JobState::Completing,
            ] {
                store::set_job_state(conn, job, s, 2).unwrap();
            }
        }
        store::set_job_state(conn, job, end, 3).unwrap();
        job
    }

    #[test]
    fn delete_only_after_done_and_only_the_hashed_version() {
        let t = tree(&["done.mcap", "failed.mcap", "changed.mcap", "kept.mcap"]);
        let (_d, mut conn) = db();
        let done = ended_job(
            &mut conn,
            &t.root.join("done.mcap"),
            AfterUpload::Delete,
            JobState::Done,
        );
        let failed = ended_job(
            &mut conn,
            &t.root.join("failed.mcap"),
            AfterUpload::Delete,
            JobState::Failed,
        );
        let changed = ended_job(
            &mut conn,
            &t.root.join("changed.mcap"),
            AfterUpload::Delete,
            JobState::Done,
        );
        ended_job(
            &mut conn,
            &t.root.join("kept.mcap"),
            AfterUpload::Keep,
            JobState::Done,
        );
        std::fs::write(t.root.join("changed.mcap"), b"new content, longer").unwrap();

        let ended = ended_deletes(&conn).unwrap();
        assert_eq!(ended.len(), 3, "keep files are never considered: {ended:?}");
        for e in &ended {
            let outcome = finish_delete(e);
            let want = if e.job_id == done {
                "deleted"
            } else if e.job_id == failed {
                "kept: job failed"
            } else {
                assert_eq!(e.job_id, changed);
                "kept: changed since it was hashed"
            };
            assert_eq!(outcome, want);
            set_outcome(&conn, e.job_id, &outcome, 4).unwrap();
        }
        assert!(!t.root.join("done.mcap").exists());
        for kept in ["failed.mcap", "changed.mcap", "kept.mcap"] {
            assert!(t.root.join(kept).exists(), "{kept}");
        }
        assert!(
            ended_deletes(&conn).unwrap().is_empty(),
            "each is dealt with once"
        );
    }
}
