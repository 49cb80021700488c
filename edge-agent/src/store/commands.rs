//! The `commands` table: every command received, once, with the ack it got (re-sent as is
//! when the command is delivered again).

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use uplink_protocol::command::AckState;
use uuid::Uuid;

use super::{bad, opt_uuid_col, uuid_col, StoreError};

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

pub fn get_command(conn: &Connection, id: Uuid) -> Result<Option<CommandRecord>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT * FROM commands WHERE id = ?1",
            params![id.to_string()],
            command_from_row,
        )
        .optional()?)
}

pub(super) fn insert_command_tx(
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

pub(super) fn set_ack_tx(
    tx: &Transaction<'_>,
    id: Uuid,
    ack: &StoredAck,
    now: i64,
) -> Result<(), StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::db;

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
}
