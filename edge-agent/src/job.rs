//! The agent's job state machine, as pure code.
//!
//! `queued → hashing → open → uploading ⇄ paused → completing → done`; any non-terminal
//! state may go to `failed` or `cancelled`; terminal states never change. Re-entering the
//! same non-terminal state (a restart in the middle of a step) is allowed. Like the API's
//! session, `completing → uploading` is allowed when storage turns out to lack parts
//! (`409 parts_incomplete`): the missing parts are uploaded again.

use uplink_protocol::telemetry::JobState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("job cannot go from {} to {}", .from.as_str(), .to.as_str())]
pub struct TransitionError {
    pub from: JobState,
    pub to: JobState,
}

/// Whether `from → to` is allowed.
pub fn can_transition(from: JobState, to: JobState) -> bool {
    use JobState::*;
    if from.is_terminal() {
        return false;
    }
    if from == to {
        return true;
    }
    matches!(
        (from, to),
        (Queued, Hashing)
            | (Hashing, Open)
            | (Open, Uploading)
            // The dataset already held this content: the session completed without upload.
            | (Open, Done)
            | (Uploading, Paused)
            | (Paused, Uploading)
            | (Uploading, Completing)
            | (Completing, Done)
            | (Completing, Uploading)
            | (_, Failed)
            | (_, Cancelled)
    )
}

/// Checks `from → to` and returns `to`.
pub fn transition(from: JobState, to: JobState) -> Result<JobState, TransitionError> {
    if can_transition(from, to) {
        Ok(to)
    } else {
        Err(TransitionError { from, to })
    }
}

/// Where a (re)started job picks up, given what is stored about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Nothing to do: the job is terminal.
    Nothing,
    /// The file has not been planned (stat and part plan) or, below the agent's
    /// `hash_first_max_mib`, hashed: hash or plan it.
    Hash,
    /// Planned, but no session yet: `session.create` (with the stored request id). The
    /// parts of a planned file that was not hashed first are hashed while they upload.
    CreateSession,
    /// A session exists: ask `session.status` and reconcile, then upload and complete.
    Reconcile,
}

pub fn next_step(state: JobState, planned: bool, has_session: bool) -> NextStep {
    if state.is_terminal() {
        NextStep::Nothing
    } else if !planned {
        NextStep::Hash
    } else if !has_session {
        NextStep::CreateSession
    } else {
        NextStep::Reconcile
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use JobState::*;

    #[test]
    fn happy_path() {
        let mut s = Queued;
        for next in [
            Hashing, Open, Uploading, Paused, Uploading, Completing, Done,
        ] {
            s = transition(s, next).unwrap();
        }
        assert_eq!(s, Done);
    }

    #[test]
    fn shortcuts_are_refused() {
        for (from, to) in [
            (Queued, Uploading),
            (Queued, Done),
            (Hashing, Uploading),
            (Open, Completing),
            (Open, Paused),
            (Paused, Completing),
            (Uploading, Done),
            (Completing, Paused),
            (Uploading, Queued),
        ] {
            assert_eq!(
                transition(from, to),
                Err(TransitionError { from, to }),
                "{from:?} -> {to:?}"
            );
        }
    }

    #[test]
    fn every_live_state_can_fail_or_be_cancelled() {
        for s in JobState::ALL.into_iter().filter(|s| !s.is_terminal()) {
            assert!(can_transition(s, Failed));
            assert!(can_transition(s, Cancelled));
        }
    }

    #[test]
    fn next_steps() {
        assert_eq!(next_step(Done, true, true), NextStep::Nothing);
        assert_eq!(next_step(Queued, false, false), NextStep::Hash);
        assert_eq!(next_step(Hashing, false, false), NextStep::Hash);
        assert_eq!(next_step(Open, true, false), NextStep::CreateSession);
        assert_eq!(next_step(Uploading, true, true), NextStep::Reconcile);
        assert_eq!(next_step(Completing, true, true), NextStep::Reconcile);
    }

    fn state() -> impl Strategy<Value = JobState> {
        proptest::sample::select(JobState::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn terminal_states_never_change(walk in proptest::collection::vec(state(), 0..40)) {
            let mut s = Queued;
            let mut reached_terminal: Option<JobState> = None;
            for to in walk {
                if let Ok(next) = transition(s, to) {
                    prop_assert!(reached_terminal.is_none(), "left terminal {:?}", reached_terminal);
                    s = next;
                    if s.is_terminal() {
                        reached_terminal = Some(s);
                    }
                }
            }
            if let Some(t) = reached_terminal {
                prop_assert_eq!(s, t);
            }
        }
    }
}
