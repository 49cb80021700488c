//! `GET /v1/live`: a long-poll of what changed in sessions and devices (progress, rate,
//! presence, free disk), which the event feed does not carry (they are not audit events).
//! Every insert or update of a row takes the next number of one sequence (`changed_seq`,
//! migration 0013); a client passes the last `next` it got and is answered with the rows
//! changed since. Best effort by design: a number is taken when a row changes, not when its
//! transaction commits, so a row can be passed over while still uncommitted and shows up
//! with its next change. Transitions a client must not miss are in the gap-free event feed.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::error::ApiError;
use super::events::MAX_WAIT_SECS;
use super::operator::scope;
use super::{openapi, ApiQuery};
use crate::store::{Device, Session};
use crate::AppState;

/// Rows of each kind in one answer at most.
const LIMIT: i64 = 200;
/// How often a held long-poll looks again (changes arrive on any API instance).
const RECHECK: Duration = Duration::from_millis(500);

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LiveQuery {
    /// Rows changed after this `next`; leave it out to get only the current `next` (then
    /// read the lists, then long-poll from it: nothing is missed in between).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Seconds to hold an empty answer (0-60, default 0; at most `events.long_poll_max_secs`).
    #[param(minimum = 0, maximum = 60)]
    pub wait: Option<u64>,
    /// Only this project's rows.
    pub project_id: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct LivePage {
    /// Sessions changed after `after`, in the order they changed (at most 200).
    pub sessions: Vec<Session>,
    /// Devices changed after `after`, in the order they changed (at most 200).
    pub devices: Vec<Device>,
    /// Pass as `after` next time.
    pub next: i64,
}

/// Sessions and devices the caller may see that changed after `after`. With `wait`, an
/// empty answer is held until something changes, the wait ends or the API shuts down.
#[utoipa::path(
    get,
    path = "/v1/live",
    tag = "events",
    params(LiveQuery),
    responses(
        (status = 200, description = "What changed, and the `next` to pass", body = LivePage),
        openapi::QueryProblems,
    ),
    security(("operator" = []))
)]
pub async fn live(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<LiveQuery>,
) -> Result<Json<LivePage>, ApiError> {
    let project = scope(&caller, q.project_id.as_deref())?;
    let wait = q.wait.unwrap_or(0);
    if q.after.is_some_and(|a| a < 0) || wait > MAX_WAIT_SECS {
        return Err(ApiError::Unprocessable(
            "invalid_query",
            format!("after must be >= 0 and wait 0-{MAX_WAIT_SECS}"),
        ));
    }
    let Some(after) = q.after else {
        let (next,): (i64,) = sqlx::query_as(
            "SELECT GREATEST((SELECT COALESCE(max(changed_seq), 0) FROM sessions),
                             (SELECT COALESCE(max(changed_seq), 0) FROM devices))",
        )
        .fetch_one(&st.store.pool)
        .await?;
        return Ok(Json(LivePage {
            sessions: Vec::new(),
            devices: Vec::new(),
            next,
        }));
    };
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(wait.min(st.config.events.long_poll_max_secs));
    loop {
        let page = changed(&st, project, after).await?;
        let done = !page.sessions.is_empty() || !page.devices.is_empty();
        if done || tokio::time::Instant::now() >= deadline {
            return Ok(Json(page));
        }
        tokio::select! {
            _ = tokio::time::sleep(RECHECK) => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = st.events.closing().cancelled() => return Ok(Json(page)),
        }
    }
}

async fn changed(st: &AppState, project: Option<&str>, after: i64) -> Result<LivePage, ApiError> {
    let sessions: Vec<Session> = changed_rows(st, "sessions", project, after).await?;
    let devices: Vec<Device> = changed_rows(st, "devices", project, after).await?;
    let next = next_cursor(
        after,
        sessions.last().map(|s| (s.changed_seq, sessions.len())),
        devices.last().map(|d| (d.changed_seq, devices.len())),
    );
    Ok(LivePage {
        sessions,
        devices,
        next,
    })
}

/// Rows of `table` (a project-owned table with `changed_seq`) changed after `after`.
async fn changed_rows<T>(
    st: &AppState,
    table: &'static str,
    project: Option<&str>,
    after: i64,
) -> Result<Vec<T>, sqlx::Error>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    sqlx::query_as(&format!(
        "SELECT * FROM {table} WHERE changed_seq > $1 AND ($2::text IS NULL OR project_id = $2)
         ORDER BY changed_seq LIMIT $3"
    ))
    .bind(after)
    .bind(project)
    .bind(LIMIT)
    .fetch_all(&st.store.pool)
    .await
}

/// The cursor after an answer: the newest change returned, except that a list cut at
/// [`LIMIT`] holds it back to its own last row (rows of the other list past it come again).
fn next_cursor(after: i64, sessions: Option<(i64, usize)>, devices: Option<(i64, usize)>) -> i64 {
    let lists = [sessions, devices];
    let newest = lists.iter().flatten().map(|(seq, _)| *seq).max();
    let cut = lists
        .iter()
        .flatten()
        .filter(|(_, n)| *n as i64 >= LIMIT)
        .map(|(seq, _)| *seq)
        .min();
    cut.or(newest).unwrap_or(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_never_skips_rows_a_full_list_left_out() {
        let full = LIMIT as usize;
        assert_eq!(next_cursor(7, None, None), 7);
        assert_eq!(next_cursor(7, Some((9, 1)), Some((12, 3))), 12);
        assert_eq!(next_cursor(7, Some((9, full)), Some((12, 3))), 9);
        assert_eq!(next_cursor(7, Some((30, full)), Some((12, full))), 12);
    }
}
