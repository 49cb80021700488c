//! The upload session state machine.
//!
//! `created → uploading ⇄ paused → completing → completed`; from any non-terminal state
//! `aborted`, `expired` or `failed`. Terminal states never change.

use uplink_protocol::ops::SessionState::{self, *};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// First part presigned.
    StartUpload,
    Pause,
    Resume,
    BeginComplete,
    /// Verification found parts missing: go back to uploading.
    CompleteRefused,
    Completed,
    Fail,
    Abort,
    Expire,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session is {from}: cannot {event:?}", from = from.as_str())]
pub struct TransitionError {
    pub from: SessionState,
    pub event: Event,
}

/// The state after `event`, or an error when the event is not allowed in `from`.
pub fn transition(from: SessionState, event: Event) -> Result<SessionState, TransitionError> {
    let to = match (from, event) {
        (s, _) if s.is_terminal() => None,
        (Created, Event::StartUpload) => Some(Uploading),
        (Uploading, Event::StartUpload) => Some(Uploading),
        (Created | Uploading, Event::Pause) => Some(Paused),
        (Paused, Event::Resume) => Some(Uploading),
        (Created | Uploading, Event::BeginComplete) => Some(Completing),
        (Completing, Event::BeginComplete) => Some(Completing),
        (Completing, Event::CompleteRefused) => Some(Uploading),
        (Completing, Event::Completed) => Some(Completed),
        (_, Event::Fail) => Some(Failed),
        (_, Event::Abort) => Some(Aborted),
        (_, Event::Expire) => Some(Expired),
        _ => None,
    };
    to.ok_or(TransitionError { from, event })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [SessionState; 8] = [
        Created, Uploading, Paused, Completing, Completed, Aborted, Expired, Failed,
    ];
    const EVENTS: [Event; 9] = [
        Event::StartUpload,
        Event::Pause,
        Event::Resume,
        Event::BeginComplete,
        Event::CompleteRefused,
        Event::Completed,
        Event::Fail,
        Event::Abort,
        Event::Expire,
    ];

    #[test]
    fn happy_path() {
        let mut s = Created;
        for e in [
            Event::StartUpload,
            Event::Pause,
            Event::Resume,
            Event::BeginComplete,
            Event::Completed,
        ] {
            s = transition(s, e).unwrap();
        }
        assert_eq!(s, Completed);
    }

    #[test]
    fn refused_moves() {
        assert!(transition(Paused, Event::BeginComplete).is_err());
        assert!(transition(Created, Event::Completed).is_err());
        assert!(transition(Uploading, Event::Resume).is_err());
        assert_eq!(
            transition(Completing, Event::CompleteRefused),
            Ok(Uploading)
        );
    }

    proptest! {
        /// Terminal states win: no sequence of events leaves one.
        #[test]
        fn terminal_states_never_change(events in proptest::collection::vec(0usize..EVENTS.len(), 0..30), start in 0usize..ALL.len()) {
            let mut s = ALL[start];
            let mut reached_terminal = s.is_terminal();
            let terminal = s;
            for i in events {
                match transition(s, EVENTS[i]) {
                    Ok(next) => {
                        prop_assert!(!reached_terminal, "left terminal state {:?}", terminal);
                        s = next;
                        reached_terminal = s.is_terminal();
                    }
                    Err(e) => prop_assert_eq!(e.from, s),
                }
            }
        }
    }
}
