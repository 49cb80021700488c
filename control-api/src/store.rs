//! PostgreSQL access. Every state change of a session is a version-checked update plus an
//! audit event in one transaction.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{FromRow, Postgres, Transaction};
use uplink_protocol::ops::{PartChecksum, SessionState};
use uuid::Uuid;

use crate::domain::session::{transition, Event};
use crate::http::error::ApiError;
use crate::storage::Object;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(url)
        .await
}

/// A LISTEN connection of its own, outside `pool` (same database and options): a
/// listener made from `pool` itself would keep one of its slots for good.
pub async fn listener(pool: &PgPool) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_with((*pool.connect_options()).clone())
        .await?;
    sqlx::postgres::PgListener::connect_with(&own).await
}

/// Connections of [`Store::locks`] for a work pool of `max_connections`: half of it, so
/// that every request holding an idempotency lock can still get the (at most two) work
/// connections it needs at once.
pub fn lock_pool_size(max_connections: u32) -> u32 {
    (max_connections / 2).max(1)
}

/// The pool of idempotency locks ([`Store::locks`]); it opens its connections on demand.
pub fn connect_locks(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(lock_pool_size(max_connections))
        .min_connections(0)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy(url)
}

#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct Device {
    pub device_id: String,
    pub project_id: String,
    pub public_key: String,
    pub enabled: bool,
    pub online: bool,
    pub agent_version: Option<String>,
    pub queue_depth: Option<i32>,
    /// How far the device's clock is from the API's, in seconds (device minus API;
    /// positive: ahead), as last reported in its presence status. Beyond the replay window
    /// (`replay_window_secs`, 300 s by default) its signed requests are refused.
    pub clock_offset_secs: Option<i64>,
    /// Bytes free on the gateway (the fullest of its upload roots and state directory), as
    /// last reported in its presence status.
    pub free_disk_bytes: Option<i64>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// Grows with every change of the row: the cursor of `GET /v1/live`.
    pub changed_seq: i64,
}

#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct Session {
    pub session_id: Uuid,
    /// The device the session belongs to; `null` for an upload from a workstation.
    pub device_id: Option<String>,
    /// The API key (`key:<id>`) or operator token (`operator`) that opened an upload from a
    /// workstation; `null` for a device's session.
    pub owner: Option<String>,
    pub job_id: Uuid,
    pub command_id: Option<Uuid>,
    pub file_name: String,
    pub bucket: String,
    pub object_key: String,
    pub size: i64,
    pub part_size: i64,
    pub part_count: i32,
    /// `md5` or `sha256`: the digest each part is presigned with.
    pub part_checksum: String,
    #[serde(skip)]
    /// NULL until completion when the device hashes while uploading.
    pub claimed_sha256: Option<String>,
    #[serde(skip)]
    pub upload_id: Option<String>,
    #[schema(value_type = uplink_protocol::ops::SessionState)]
    pub state: String,
    #[serde(skip)]
    pub version: i32,
    pub bytes_done: i64,
    pub rate_bps: i64,
    pub sha256: Option<String>,
    pub etag: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub project_id: String,
    /// The dataset the object belongs to: the agent's label (directory watches), else `default`.
    pub dataset: String,
    /// Bytes of the project's quota this session holds until it ends.
    #[serde(skip)]
    pub reserved_bytes: i64,
    /// The completed session whose object this one points at (same content, not uploaded again).
    pub deduplicated_from: Option<Uuid>,
    /// `pending`, `accepted` or `rejected` when the dataset has a validator.
    pub validation: Option<String>,
    pub validation_error: Option<String>,
    /// The check of the claimed SHA-256 against the stored bytes, once completed: `pending`,
    /// `verified` or `mismatch`. Only a verified object is a dedupe source.
    pub digest_check: Option<String>,
    /// The SHA-256 the API computed from the stored object.
    pub stored_sha256: Option<String>,
    /// The storage policy in force at creation; completion checks that storage applied it.
    #[serde(skip)]
    pub policy: Option<serde_json::Value>,
    /// Grows with every change of the row: the cursor of `GET /v1/live`.
    pub changed_seq: i64,
}

impl Session {
    pub fn part_checksum(&self) -> PartChecksum {
        PartChecksum::parse(&self.part_checksum).unwrap_or_default()
    }

    pub fn object(&self) -> Object<'_> {
        Object {
            bucket: &self.bucket,
            key: &self.object_key,
        }
    }

    pub fn state(&self) -> SessionState {
        // The column only ever holds values written from SessionState.
        SessionState::parse(&self.state).unwrap_or(SessionState::Failed)
    }
}

#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct Command {
    pub command_id: Uuid,
    pub device_id: String,
    /// The command's action, as sent to the device.
    #[schema(value_type = uplink_protocol::command::Action)]
    pub action: serde_json::Value,
    #[serde(skip)]
    pub envelope: serde_json::Value,
    pub state: String,
    pub reason: Option<String>,
    pub session_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub publish_count: i32,
}

#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct Project {
    pub project_id: String,
    pub name: String,
    pub quota_bytes: Option<i64>,
    pub used_bytes: i64,
    pub reserved_bytes: i64,
    #[schema(value_type = crate::domain::policy::StoragePolicy)]
    pub policy: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct Dataset {
    pub project_id: String,
    pub name: String,
    pub state: String,
    #[schema(value_type = crate::domain::policy::StoragePolicy)]
    pub policy: serde_json::Value,
    pub validator: Option<String>,
    #[serde(skip)]
    pub manifest: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub sealed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, FromRow)]
pub struct PartRow {
    pub number: i32,
    /// Base64 digest in the session's `part_checksum`.
    pub digest: String,
}

/// Who did something, for the audit log.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub request_id: Option<String>,
}

impl Actor {
    pub fn device(device_id: &str, request_id: &str) -> Actor {
        Actor {
            name: format!("device:{device_id}"),
            request_id: Some(request_id.to_string()),
        }
    }
    pub fn system(name: &str) -> Actor {
        Actor {
            name: format!("system:{name}"),
            request_id: None,
        }
    }
}

/// A session that ends gives back its reservation; a completed one counts its (verified)
/// size as used.
async fn settle_quota(
    tx: &mut Transaction<'_, Postgres>,
    session: &Session,
    to: SessionState,
) -> Result<(), sqlx::Error> {
    let used = if to == SessionState::Completed {
        session.size
    } else {
        0
    };
    sqlx::query("UPDATE sessions SET reserved_bytes = 0 WHERE session_id = $1")
        .bind(session.session_id)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "UPDATE projects SET reserved_bytes = GREATEST(reserved_bytes - $2, 0), used_bytes = used_bytes + $3
         WHERE project_id = $1",
    )
    .bind(&session.project_id)
    .bind(session.reserved_bytes)
    .bind(used)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn audit(
    tx: &mut Transaction<'_, Postgres>,
    actor: &Actor,
    action: &str,
    subject: &str,
    project: Option<&str>,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO audit_events (actor, action, subject, request_id, project_id, detail) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&actor.name)
        .bind(action)
        .bind(subject)
        .bind(&actor.request_id)
        .bind(project)
        .bind(detail)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Which sessions a listing shows.
pub struct SessionFilter<'a> {
    pub device_id: Option<&'a str>,
    pub state: Option<&'a str>,
    pub project: Option<&'a str>,
    pub dataset: Option<&'a str>,
    pub limit: i64,
}

#[derive(Clone)]
pub struct Store {
    pub pool: PgPool,
    /// Only for the transactions that hold an idempotency lock (device requests, keyed
    /// operator calls) while the request runs on [`Store::pool`]. From one pool, requests
    /// as many as its size would each hold one connection and wait for a second that no
    /// one frees: every request of the instance stalled for the 5 s acquire timeout.
    pub locks: PgPool,
}

impl Store {
    pub async fn device(&self, device_id: &str) -> Result<Option<Device>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM devices WHERE device_id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await
    }

    /// Devices of `project` (`None`: all).
    pub async fn devices(&self, project: Option<&str>) -> Result<Vec<Device>, sqlx::Error> {
        sqlx::query_as(
            "SELECT * FROM devices WHERE ($1::text IS NULL OR project_id = $1) ORDER BY device_id",
        )
        .bind(project)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn project(&self, project_id: &str) -> Result<Option<Project>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM projects WHERE project_id = $1")
            .bind(project_id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn dataset(
        &self,
        project_id: &str,
        name: &str,
    ) -> Result<Option<Dataset>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM datasets WHERE project_id = $1 AND name = $2")
            .bind(project_id)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn session(&self, session_id: Uuid) -> Result<Option<Session>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM sessions WHERE session_id = $1")
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await
    }

    /// A session owned by `device_id`; another device's session is reported as not found.
    pub async fn device_session(
        &self,
        device_id: &str,
        session_id: Uuid,
    ) -> Result<Session, ApiError> {
        match self.session(session_id).await? {
            Some(s) if s.device_id.as_deref() == Some(device_id) => Ok(s),
            _ => Err(ApiError::NotFound(
                "session_not_found",
                format!("no session {session_id} for this device"),
            )),
        }
    }

    pub async fn sessions(&self, q: &SessionFilter<'_>) -> Result<Vec<Session>, sqlx::Error> {
        sqlx::query_as(
            "SELECT * FROM sessions WHERE ($1::text IS NULL OR device_id = $1) AND ($2::text IS NULL OR state = $2)
               AND ($3::text IS NULL OR project_id = $3) AND ($4::text IS NULL OR dataset = $4)
             ORDER BY created_at DESC LIMIT $5",
        )
        .bind(q.device_id)
        .bind(q.state)
        .bind(q.project)
        .bind(q.dataset)
        .bind(q.limit)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn planned_parts(&self, session_id: Uuid) -> Result<Vec<PartRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT number, digest FROM session_parts WHERE session_id = $1 ORDER BY number",
        )
        .bind(session_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Applies `event` to the session if it is still at `session.version`; returns the updated
    /// row. A session that ends settles its quota reservation in the same transaction.
    pub async fn transition(
        &self,
        session: &Session,
        event: Event,
        actor: &Actor,
        error: Option<&str>,
    ) -> Result<Session, ApiError> {
        let mut tx = self.pool.begin().await?;
        let updated = transition_in(&mut tx, session, event, actor, error).await?;
        tx.commit().await?;
        Ok(updated)
    }
}

/// [`Store::transition`] inside `tx`: the state change commits (or not) with whatever else
/// the caller writes in `tx`.
pub async fn transition_in(
    tx: &mut Transaction<'_, Postgres>,
    session: &Session,
    event: Event,
    actor: &Actor,
    error: Option<&str>,
) -> Result<Session, ApiError> {
    let to = transition(session.state(), event)?;
    let updated: Option<Session> = sqlx::query_as(
        "UPDATE sessions SET state = $1, version = version + 1, updated_at = now(), error = COALESCE($4, error)
         WHERE session_id = $2 AND version = $3 RETURNING *",
    )
    .bind(to.as_str())
    .bind(session.session_id)
    .bind(session.version)
    .bind(error)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(mut updated) = updated else {
        return Err(ApiError::Conflict(
            "concurrent_update",
            "the session changed while this request was handled; retry".into(),
        ));
    };
    if to.is_terminal() && updated.reserved_bytes > 0 {
        settle_quota(tx, &updated, to).await?;
        updated.reserved_bytes = 0;
    }
    if to != session.state() {
        audit(
            tx,
            actor,
            "session.transition",
            &session.session_id.to_string(),
            Some(&session.project_id),
            serde_json::json!({"from": session.state, "to": to.as_str(), "event": format!("{event:?}"), "error": error}),
        )
        .await?;
    }
    Ok(updated)
}
