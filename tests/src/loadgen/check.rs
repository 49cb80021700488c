//! The end-of-run exactly-once check against PostgreSQL: every command the operator
//! issued is there once and `done`; every job has exactly one session, in the state its
//! flow left it, with each presigned part recorded once; nothing else was made for the
//! run's devices.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::ledger::Ledger;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Outcome {
    pub commands_issued: usize,
    pub commands_done: usize,
    pub sessions: usize,
    pub parts: i64,
    pub problems: Vec<String>,
}

/// Devices of the run that the API has `online` right now.
pub async fn online_count(pool: &PgPool, prefix: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM devices WHERE online AND starts_with(device_id, $1)")
        .bind(prefix)
        .fetch_one(pool)
        .await
}

pub async fn against_database(
    pool: &PgPool,
    prefix: &str,
    ledger: &Ledger,
) -> Result<Outcome, sqlx::Error> {
    let mut out = Outcome::default();
    let commands: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT command_id, state FROM commands WHERE starts_with(device_id, $1)")
            .bind(prefix)
            .fetch_all(pool)
            .await?;
    let issued: Vec<Uuid> = ledger
        .commands
        .iter()
        .filter(|(_, c)| c.issued_at.is_some())
        .map(|(id, _)| *id)
        .collect();
    out.commands_issued = issued.len();
    let states: HashMap<Uuid, String> = commands.into_iter().collect();
    out.commands_done = states.values().filter(|s| *s == "done").count();
    let missing = issued.iter().filter(|id| !states.contains_key(id)).count();
    if missing > 0 {
        out.problems.push(format!(
            "{missing} issued command(s) missing from the database"
        ));
    }
    let not_done = issued
        .iter()
        .filter(|id| states.get(id).is_some_and(|s| s != "done"))
        .count();
    if not_done > 0 {
        out.problems.push(format!(
            "{not_done} issued command(s) not `done` in the database"
        ));
    }
    if states.len() > issued.len() {
        out.problems.push(format!(
            "{} command(s) in the database that the operator did not get back",
            states.len() - issued.len()
        ));
    }

    let sessions: Vec<(Uuid, Uuid, String, i64)> = sqlx::query_as(
        "SELECT s.session_id, s.job_id, s.state,
                (SELECT count(*) FROM session_parts p WHERE p.session_id = s.session_id)
         FROM sessions s WHERE starts_with(s.device_id, $1)",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    out.sessions = sessions.len();
    out.parts = sessions.iter().map(|s| s.3).sum();
    let mut per_job: HashMap<Uuid, Vec<&(Uuid, Uuid, String, i64)>> = HashMap::new();
    for s in &sessions {
        per_job.entry(s.1).or_default().push(s);
    }
    let mut wrong = Vec::new();
    for (job_id, job) in &ledger.jobs {
        let rows = per_job.remove(job_id).unwrap_or_default();
        match (rows.as_slice(), &job.session_id) {
            ([], None) => {} // the flow never got a session: counted as unfinished
            ([], Some(_)) => wrong.push("a session the device was given is missing".to_string()),
            ([row], sid) => {
                if sid.is_some_and(|s| s != row.0) {
                    wrong.push("a job's session is not the one the device was given".into());
                }
                if let Some(state) = &job.final_state {
                    if &row.2 != state {
                        wrong.push(format!(
                            "a session is `{}`, its flow ended `{state}`",
                            row.2
                        ));
                    }
                    if row.3 != i64::from(job.parts) {
                        wrong.push(format!(
                            "a session records {} part(s), {} were presigned",
                            row.3, job.parts
                        ));
                    }
                }
            }
            (rows, _) => wrong.push(format!("a job has {} sessions", rows.len())),
        }
    }
    if !per_job.is_empty() {
        wrong.push(format!(
            "{} session(s) of jobs the devices never started",
            per_job.len()
        ));
    }
    let mut tally: std::collections::BTreeMap<String, usize> = Default::default();
    for w in wrong {
        *tally.entry(w).or_default() += 1;
    }
    out.problems
        .extend(tally.into_iter().map(|(w, n)| format!("{n} × {w}")));
    Ok(out)
}
