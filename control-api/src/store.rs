//! PostgreSQL access. Every state change of a session is a version-checked update plus an
//! audit event in one transaction.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{FromRow, Postgres, Transaction};
use uplink_protocol::ops::SessionState;
use uuid::Uuid;

use crate::domain::session::{transition, Event};
use crate::http::error::ApiError;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(url)
        .await
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Device {
    pub device_id: String,
    pub public_key: String,
    pub enabled: bool,
    pub online: bool,
    pub agent_version: Option<String>,
    pub queue_depth: Option<i32>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Session {
    pub session_id: Uuid,
    pub device_id: String,
    pub job_id: Uuid,
    pub command_id: Option<Uuid>,
    pub file_name: String,
    pub bucket: String,
    pub object_key: String,
    pub size: i64,
    pub part_size: i64,
    pub part_count: i32,
    #[serde(skip)]
    pub claimed_sha256: String,
    #[serde(skip)]
    pub upload_id: Option<String>,
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
    /// The dataset label the agent sent (directory watches); part of the object key.
    pub dataset: Option<String>,
}

impl Session {
    pub fn state(&self) -> SessionState {
        // The column only ever holds values written from SessionState.
        SessionState::parse(&self.state).unwrap_or(SessionState::Failed)
    }
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Command {
    pub command_id: Uuid,
    pub device_id: String,
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

#[derive(Debug, Clone, FromRow)]
pub struct PartRow {
    pub number: i32,
    pub md5: String,
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
    pub fn operator() -> Actor {
        Actor {
            name: "operator".into(),
            request_id: None,
        }
    }
    pub fn system(name: &str) -> Actor {
        Actor {
            name: format!("system:{name}"),
            request_id: None,
        }
    }
}

pub async fn audit(
    tx: &mut Transaction<'_, Postgres>,
    actor: &Actor,
    action: &str,
    subject: &str,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO audit_events (actor, action, subject, request_id, detail) VALUES ($1, $2, $3, $4, $5)")
        .bind(&actor.name)
        .bind(action)
        .bind(subject)
        .bind(&actor.request_id)
        .bind(detail)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[derive(Clone)]
pub struct Store {
    pub pool: PgPool,
}

impl Store {
    pub async fn device(&self, device_id: &str) -> Result<Option<Device>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM devices WHERE device_id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn devices(&self) -> Result<Vec<Device>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM devices ORDER BY device_id")
            .fetch_all(&self.pool)
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
            Some(s) if s.device_id == device_id => Ok(s),
            _ => Err(ApiError::NotFound(
                "session_not_found",
                format!("no session {session_id} for this device"),
            )),
        }
    }

    pub async fn sessions(
        &self,
        device_id: Option<&str>,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Session>, sqlx::Error> {
        sqlx::query_as(
            "SELECT * FROM sessions WHERE ($1::text IS NULL OR device_id = $1) AND ($2::text IS NULL OR state = $2)
             ORDER BY created_at DESC LIMIT $3",
        )
        .bind(device_id)
        .bind(state)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn planned_parts(&self, session_id: Uuid) -> Result<Vec<PartRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT number, md5 FROM session_parts WHERE session_id = $1 ORDER BY number",
        )
        .bind(session_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Applies `event` to the session if it is still at `session.version`; returns the updated row.
    /// `set` adds column updates (bound from $3 on) in the same statement.
    pub async fn transition(
        &self,
        session: &Session,
        event: Event,
        actor: &Actor,
        error: Option<&str>,
    ) -> Result<Session, ApiError> {
        let to = transition(session.state(), event)?;
        let mut tx = self.pool.begin().await?;
        let updated: Option<Session> = sqlx::query_as(
            "UPDATE sessions SET state = $1, version = version + 1, updated_at = now(), error = COALESCE($4, error)
             WHERE session_id = $2 AND version = $3 RETURNING *",
        )
        .bind(to.as_str())
        .bind(session.session_id)
        .bind(session.version)
        .bind(error)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(updated) = updated else {
            return Err(ApiError::Conflict(
                "concurrent_update",
                "the session changed while this request was handled; retry".into(),
            ));
        };
        if to != session.state() {
            audit(
                &mut tx,
                actor,
                "session.transition",
                &session.session_id.to_string(),
                serde_json::json!({"from": session.state, "to": to.as_str(), "event": format!("{event:?}"), "error": error}),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(updated)
    }
}
