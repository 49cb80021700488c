//! The `flow_overrides` table: the flow settings of the last `config` command, which
//! override the file's until another one changes them.

use rusqlite::{params, Connection, OptionalExtension};
use uplink_protocol::command::AckState;
use uuid::Uuid;

use super::{insert_command_tx, StoreError, StoredAck};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::get_command;
    use crate::store::tests::db;

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
}
