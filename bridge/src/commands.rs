//! API → device: the command pump. It long-polls the API for due commands
//! (`POST /v1/bridge/commands/claim`): the API answers as soon as a command is due (stored,
//! or its device came online), with the commands leased to this bridge, so that exactly
//! one bridge publishes each even when several share the broker. Each is published on its
//! device's `cmd` topic (QoS 1) and marked published, which ends the lease.
//!
//! A long-poll that ends empty after `poll_interval_ms` is the periodic sweep: the next one
//! finds what came due by time (re-sends of unacknowledged commands, the leases of a bridge
//! that died). Anything that fails is left for a later pass: the API keeps re-offering
//! commands until they are acked.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uplink_protocol::topics::{self, Channel};

use crate::api::{ApiClient, DueCommand};
use crate::metrics::Metrics;

/// Most commands claimed per pass.
pub const BATCH: usize = 100;
/// The longest one claim waits (the API refuses longer waits).
pub const MAX_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error("MQTT client stopped: {0}")]
    Mqtt(#[from] rumqttc::ClientError),
}

/// Whether `due` may be published: its device id must be safe in a topic.
pub fn publishable(due: &DueCommand) -> bool {
    topics::valid_device_id(&due.device_id)
}

pub struct Pump {
    pub api: ApiClient,
    pub mqtt: AsyncClient,
    /// This bridge's name in its claims (its broker client id).
    pub name: String,
    /// `true` while the bridge holds a broker connection.
    pub connected: watch::Receiver<bool>,
    /// Ends the wait after a failed pass early.
    pub wake: Arc<Notify>,
    /// The longest a claim waits for a command: the sweep period.
    pub interval: Duration,
    pub metrics: Arc<Metrics>,
}

impl Pump {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let wait = self.interval.min(MAX_WAIT);
        let mut failing = false;
        loop {
            // Claim only while connected: a claimed command could not be published.
            if !*self.connected.borrow_and_update() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = self.connected.changed() => if changed.is_err() { return },
                }
                continue;
            }
            let started = tokio::time::Instant::now();
            let passed = tokio::select! {
                () = shutdown.cancelled() => return,
                passed = self.pass(wait) => passed,
            };
            let pause = match passed {
                Ok(n) => {
                    if failing {
                        info!("Command pump recovered");
                        failing = false;
                    }
                    // Commands, or a full wait: claim again at once. An empty answer
                    // before the wait (the API is stopping) is not a reason to spin.
                    if n > 0 || started.elapsed() >= wait {
                        continue;
                    }
                    wait.saturating_sub(started.elapsed())
                }
                Err(e) => {
                    // Say it once per outage, not once per pass.
                    if failing {
                        debug!(error = %e, "Command pass failed again");
                    } else {
                        warn!(error = %e, "Command pass failed; retrying every poll_interval_ms");
                        failing = true;
                    }
                    self.interval
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
                () = self.wake.notified() => debug!("Command pump woken"),
                changed = self.connected.changed() => if changed.is_err() { return },
            }
        }
    }

    /// One pass: claims (waiting up to `wait` for a command), publishes what it got and
    /// reports it published in one call; returns how many commands it claimed.
    async fn pass(&self, wait: Duration) -> Result<usize, PumpError> {
        let due = self.api.claim_commands(&self.name, BATCH, wait).await?;
        let claimed = due.len();
        let mut published = Vec::with_capacity(claimed);
        for cmd in due {
            if !publishable(&cmd) {
                warn!(command_id = %cmd.command_id, device_id = %cmd.device_id, "Command for an invalid device id; skipped");
                continue;
            }
            let payload = match serde_json::to_vec(&cmd.envelope) {
                Ok(p) => p,
                Err(e) => {
                    warn!(command_id = %cmd.command_id, error = %e, "Could not serialise a command");
                    continue;
                }
            };
            self.mqtt
                .publish(
                    topics::topic(&cmd.device_id, Channel::Cmd),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await?;
            self.metrics.command_published();
            info!(command_id = %cmd.command_id, device_id = %cmd.device_id, "Command published");
            published.push(cmd.command_id);
        }
        if !published.is_empty() {
            // Not recorded: the lease runs out and the command is published again (the
            // device answers a repeat with its earlier ack).
            if let Err(e) = self.api.mark_published(&published).await {
                warn!(count = published.len(), error = %e, "Could not mark commands published");
            }
        }
        Ok(claimed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn due_commands_parse_and_are_checked() {
        let json = r#"[{"command_id":"6f1c1f4e-8d3a-4a4f-9a59-1d2a3c4b5e6f","device_id":"robot-17",
            "envelope":{"v":1,"command":"{}","sig":"c2ln"},"extra":true}]"#;
        let due: Vec<DueCommand> = serde_json::from_str(json).unwrap();
        assert!(publishable(&due[0]));
        let mut bad = due[0].clone();
        bad.device_id = "+/#".into();
        assert!(!publishable(&bad));
    }
}
