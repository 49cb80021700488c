//! Command-key rotation: a device pins a *set* of command public keys, and a command or an
//! answer is authentic when any of them verifies it. The control API signs with one key
//! (its active key) and announces the next one (`GET /v1/command-key`: `next_public_key`),
//! so agents can pin both before the API switches (docs/security.md, "Rotating the command
//! key").

use crate::sign::{PublicKey, SignError};

/// Keys that may have signed a command or an answer.
pub trait KeyRing {
    /// `Ok` when `verify` succeeds with one of the keys; else the first key's error
    /// ([`SignError::Mismatch`] for an empty ring).
    fn verify_any(
        &self,
        verify: &dyn Fn(&PublicKey) -> Result<(), SignError>,
    ) -> Result<(), SignError>;
}

impl KeyRing for PublicKey {
    fn verify_any(
        &self,
        verify: &dyn Fn(&PublicKey) -> Result<(), SignError>,
    ) -> Result<(), SignError> {
        verify(self)
    }
}

/// The command keys a device pins, in order of preference (the current one first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandKeys(Vec<PublicKey>);

impl CommandKeys {
    /// The pinned keys; duplicates are dropped.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        let mut out: Vec<PublicKey> = Vec::new();
        for key in keys {
            if !out.contains(&key) {
                out.push(key);
            }
        }
        CommandKeys(out)
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.0
    }
}

impl From<PublicKey> for CommandKeys {
    fn from(key: PublicKey) -> Self {
        CommandKeys(vec![key])
    }
}

impl KeyRing for CommandKeys {
    fn verify_any(
        &self,
        verify: &dyn Fn(&PublicKey) -> Result<(), SignError>,
    ) -> Result<(), SignError> {
        let mut first = None;
        for key in &self.0 {
            match verify(key) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or(SignError::Mismatch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Action, Command};
    use crate::envelope::{CommandEnvelope, CommandError, ResponseEnvelope};
    use crate::sign;

    #[test]
    fn any_pinned_key_opens_commands_and_answers() {
        let old = sign::generate();
        let new = sign::generate();
        let stranger = sign::generate();
        let ring = CommandKeys::new([
            old.verifying_key(),
            new.verifying_key(),
            old.verifying_key(),
        ]);
        assert_eq!(ring.keys().len(), 2);
        let command = Command {
            command_id: uuid::Uuid::new_v4(),
            device_id: "robot-17".into(),
            issued_at: 100,
            expires_at: 200,
            action: Action::Pause {
                job_id: uuid::Uuid::new_v4(),
            },
        };
        for key in [&old, &new] {
            let env = CommandEnvelope::sign(key, &command);
            assert_eq!(env.open(&ring, "robot-17", 150), Ok(command.clone()));
            let answer =
                ResponseEnvelope::ok("r1", 200, serde_json::json!({})).sign(key, "robot-17");
            assert_eq!(answer.verify(&ring, "robot-17"), Ok(()));
            assert!(answer.verify(&ring, "robot-18").is_err());
        }
        let forged = CommandEnvelope::sign(&stranger, &command);
        assert!(matches!(
            forged.open(&ring, "robot-17", 150),
            Err(CommandError::Signature(SignError::Mismatch))
        ));
        // Only the old key pinned: the new key's commands are refused.
        let only_old = CommandKeys::from(old.verifying_key());
        assert!(CommandEnvelope::sign(&new, &command)
            .open(&only_old, "robot-17", 150)
            .is_err());
        assert!(CommandKeys::new([]).verify_any(&|_| Ok(())).is_err());
    }
}
