//! The job commands: `status` (the flow settings and the jobs, read-only on the running
//! agent's database) and `upload` (queue a local job the running agent picks up).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use uplink_protocol::flow::DEFAULT_PRIORITY;
use uplink_protocol::telemetry::JobState;
use uplink_protocol::unix_now;
use uuid::Uuid;

use super::{human_bytes, CliError, JobView, EXIT_OK, EXIT_REFUSED};
use crate::config;
use crate::config::Config;
use crate::store::{self, NewJob, StoreError};
use crate::{flow, policy};

/// Opens `agent.db` read-only (the running agent keeps writing; WAL lets both work).
fn open_read_only(state_dir: &Path) -> Result<Connection, CliError> {
    let path = state_dir.join(store::DB_FILE);
    if !path.exists() {
        return Err(CliError::NoDatabase(path));
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(StoreError::from)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(StoreError::from)?;
    Ok(conn)
}

/// Jobs, newest first, as `JobView`s.
pub fn job_views(state_dir: &Path, limit: u32) -> Result<Vec<JobView>, CliError> {
    let conn = open_read_only(state_dir)?;
    let now = unix_now();
    let jobs = store::list_jobs(&conn, limit)?;
    let mut views = Vec::with_capacity(jobs.len());
    for job in jobs {
        let done = store::bytes_done(&conn, job.id)?;
        views.push(JobView::new(job, done, now));
    }
    Ok(views)
}

/// The effective flow settings (the file plus stored `config` overrides) and whether any
/// override is in force.
pub fn flow_settings(cfg: &Config) -> Result<(flow::Settings, bool), CliError> {
    let conn = open_read_only(&cfg.state_dir)?;
    let overrides = store::flow_overrides(&conn)?.unwrap_or_default();
    let effective = flow::Settings::from_config(cfg).with(&overrides);
    Ok((effective, !overrides.is_empty()))
}

/// One line on the flow settings, e.g. `flow: bandwidth 64.0 KiB/s, windows 22:00-06:00
/// (closed now), concurrency 4 (2 per job), set by a config command`.
pub fn flow_text(s: &flow::Settings, open: bool, overridden: bool) -> String {
    let bandwidth = match s.max_upload_bytes_per_sec {
        0 => "unlimited".to_string(),
        n => format!("{}/s", human_bytes(n)),
    };
    format!(
        "flow: bandwidth {bandwidth}, windows {} ({} now), concurrency {} ({} per job){}",
        s.windows_text(),
        if open { "open" } else { "closed" },
        s.concurrency,
        s.per_job(),
        if overridden {
            ", changed by a config command"
        } else {
            ""
        }
    )
}

/// `status`: prints the flow settings and the jobs (newest first) as text, or the jobs as
/// JSON.
pub fn status(file: Option<&Path>, as_json: bool, limit: u32) -> Result<u8, CliError> {
    let cfg = config::load(file)?;
    let mut views = job_views(&cfg.state_dir, limit)?;
    let (settings, overridden) = flow_settings(&cfg)?;
    let open = settings.open_at(flow::local_minute());
    if !open {
        for v in &mut views {
            if matches!(
                v.job.state,
                JobState::Queued | JobState::Open | JobState::Uploading
            ) && !v.job.pause_requested
            {
                v.waiting_for = Some("upload_window");
            }
        }
    }
    if !as_json {
        println!("{}", flow_text(&settings, open, overridden));
    }
    if as_json {
        let list: Vec<serde_json::Value> = views.iter().map(JobView::json).collect();
        println!("{}", serde_json::Value::Array(list));
    } else if views.is_empty() {
        println!("no jobs");
    } else {
        for v in &views {
            println!("{}", v.text());
        }
    }
    Ok(EXIT_OK)
}

/// `upload FILE`: checks the path policy and queues a local job for the running agent.
/// `priority` (0..=9, checked by the caller) places it among the queued jobs.
pub fn upload(file: Option<&Path>, path: &Path, priority: Option<u8>) -> Result<u8, CliError> {
    let loaded = config::load_and_validate(file)?;
    let absolute = std::path::absolute(path)?;
    let canonical = match policy::check(&absolute.to_string_lossy(), &loaded.roots) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("refused: {e}");
            eprintln!(
                "allowed roots: {}",
                loaded
                    .roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok(EXIT_REFUSED);
        }
    };
    let file_name = canonical
        .file_name()
        .or_else(|| absolute.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let job = NewJob {
        id: Uuid::new_v4(),
        action: String::new(),
        path: canonical.clone(),
        file_name,
        create_request_id: format!("create-{}", Uuid::new_v4().simple()),
        priority: priority.unwrap_or(DEFAULT_PRIORITY),
    };
    let mut conn = store::open(&loaded.config.state_dir)?;
    store::queue_local_upload(&mut conn, &job, unix_now())?;
    println!("{}", job.id);
    eprintln!(
        "queued {}; the running agent starts it within 2 s (`uplink-agent status` shows it)",
        canonical.display()
    );
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_jobs_are_listed_and_read_only_status_works() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = store::open(dir.path()).unwrap();
        let job = NewJob {
            id: Uuid::new_v4(),
            action: String::new(),
            path: "/data/a.bin".into(),
            file_name: "a.bin".into(),
            create_request_id: "create-2".into(),
            priority: 9,
        };
        store::queue_local_upload(&mut conn, &job, 100).unwrap();
        assert_eq!(store::queued_local_jobs(&conn).unwrap(), vec![job.id]);
        let views = job_views(dir.path(), 10).unwrap();
        assert_eq!(views.len(), 1);
        assert!(views[0].job.local);
        assert_eq!(views[0].job.priority, 9);
        assert_eq!(views[0].job.state, JobState::Queued);
        assert!(matches!(
            job_views(&dir.path().join("nope"), 10),
            Err(CliError::NoDatabase(_))
        ));
    }
}
