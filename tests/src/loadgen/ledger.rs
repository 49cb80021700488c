//! Exactly-once accounting, as the devices and the operator saw it: every request id sent
//! and answered, every command issued, delivered and acked, every job's session and parts.
//! [`Ledger::problems`] names what was lost or duplicated; [`crate::loadgen::check`] then
//! compares the same records with PostgreSQL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

#[derive(Debug, Default, Clone)]
pub struct RequestRecord {
    pub op: &'static str,
    /// Times the request was published (re-sends keep the id and body).
    pub sends: u32,
    /// Answers that arrived on `res` with this id.
    pub answers: u32,
}

#[derive(Debug, Default, Clone)]
pub struct CommandRecord {
    pub device: String,
    /// Just before the operator's `POST /v1/devices/{id}/commands`.
    pub issued_at: Option<Instant>,
    pub deliveries: u32,
    pub first_delivery: Option<Instant>,
    /// The device's `done` ack got the API's answer.
    pub acked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub device: String,
    pub session_id: Option<Uuid>,
    /// The state the flow left the session in (`completed` or `aborted`); `None` while
    /// the flow runs or when it gave up.
    pub final_state: Option<String>,
    /// Parts presigned (each number once).
    pub parts: u32,
}

#[derive(Debug, Default)]
pub struct Ledger {
    pub requests: HashMap<String, RequestRecord>,
    pub commands: HashMap<Uuid, CommandRecord>,
    pub jobs: HashMap<Uuid, JobRecord>,
}

impl Ledger {
    pub fn sent(&mut self, request_id: &str, op: &'static str) {
        let r = self.requests.entry(request_id.to_string()).or_default();
        r.op = op;
        r.sends += 1;
    }

    /// An answer arrived; `false` when it names a request this run never sent.
    pub fn answered(&mut self, request_id: &str) -> bool {
        match self.requests.get_mut(request_id) {
            Some(r) => {
                r.answers += 1;
                true
            }
            None => false,
        }
    }

    pub fn issued(&mut self, command_id: Uuid, device: &str, at: Instant) {
        let c = self.commands.entry(command_id).or_default();
        c.device = device.to_string();
        c.issued_at = Some(at);
    }

    /// A delivery on `cmd`; returns how many there were so far (1 = the first).
    pub fn delivered(&mut self, command_id: Uuid, at: Instant) -> u32 {
        let c = self.commands.entry(command_id).or_default();
        c.deliveries += 1;
        c.first_delivery.get_or_insert(at);
        c.deliveries
    }

    pub fn acked(&mut self, command_id: Uuid) {
        if let Some(c) = self.commands.get_mut(&command_id) {
            c.acked = true;
        }
    }

    /// Commands not yet both delivered and acked.
    pub fn commands_open(&self) -> usize {
        self.commands
            .values()
            .filter(|c| c.deliveries == 0 || !c.acked)
            .count()
    }

    /// Issue → first delivery of every delivered command.
    pub fn delivery_latencies(&self) -> Vec<Duration> {
        self.commands
            .values()
            .filter_map(|c| Some(c.first_delivery?.saturating_duration_since(c.issued_at?)))
            .collect()
    }

    /// Deliveries beyond the first (the protocol allows them: a device answers a repeated
    /// command with its earlier ack and does not run it again).
    pub fn duplicate_deliveries(&self) -> u64 {
        self.commands
            .values()
            .map(|c| u64::from(c.deliveries.saturating_sub(1)))
            .sum()
    }

    /// What was lost or duplicated, as seen by the devices and the operator.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut note = |n: usize, what: &str| {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        };
        let requests = || self.requests.values();
        let commands = || self.commands.values();
        note(
            requests().filter(|r| r.answers == 0).count(),
            "request id(s) never answered",
        );
        note(
            requests().filter(|r| r.answers > r.sends).count(),
            "request id(s) answered more often than sent",
        );
        note(
            commands().filter(|c| c.issued_at.is_none()).count(),
            "command(s) delivered that the operator never issued",
        );
        note(
            commands()
                .filter(|c| c.issued_at.is_some() && c.deliveries == 0)
                .count(),
            "command(s) never delivered",
        );
        note(
            commands().filter(|c| c.deliveries > 0 && !c.acked).count(),
            "command(s) delivered but their ack never answered",
        );
        note(
            self.jobs
                .values()
                .filter(|j| j.final_state.is_none())
                .count(),
            "session flow(s) did not finish",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_run_has_no_problems() {
        let mut l = Ledger::default();
        l.sent("a", "session.create");
        l.sent("a", "session.create"); // a re-send after a timeout
        assert!(l.answered("a"));
        assert!(l.answered("a"));
        let c = Uuid::new_v4();
        let t0 = Instant::now();
        l.issued(c, "d1", t0);
        assert_eq!(l.delivered(c, t0 + Duration::from_millis(5)), 1);
        assert_eq!(l.delivered(c, t0 + Duration::from_millis(9)), 2);
        l.acked(c);
        assert_eq!(l.commands_open(), 0);
        assert_eq!(l.duplicate_deliveries(), 1);
        assert_eq!(l.delivery_latencies(), vec![Duration::from_millis(5)]);
        assert!(l.problems().is_empty(), "{:?}", l.problems());
    }

    #[test]
    fn lost_and_duplicated_outcomes_are_named() {
        let mut l = Ledger::default();
        l.sent("lost", "parts.presign");
        l.sent("twice", "session.create");
        l.answered("twice");
        l.answered("twice");
        assert!(!l.answered("never-sent"));
        l.issued(Uuid::new_v4(), "d1", Instant::now());
        let stray = Uuid::new_v4();
        l.delivered(stray, Instant::now());
        l.jobs.insert(
            Uuid::new_v4(),
            JobRecord {
                device: "d1".into(),
                session_id: None,
                final_state: None,
                parts: 0,
            },
        );
        let p = l.problems();
        assert_eq!(p.len(), 6, "{p:?}");
        assert!(p[0].contains("never answered"));
        assert!(p[1].contains("answered more often"));
        assert!(p[2].contains("never issued"));
        assert!(p[3].contains("never delivered"));
        assert!(p[4].contains("ack never answered"));
        assert!(p[5].contains("did not finish"));
    }
}
