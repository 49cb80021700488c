//! API → device: the command pump. Every `poll_interval_ms`, when a device comes online and
//! when the bridge (re)connects to the broker, it fetches due commands, publishes each
//! envelope on the device's `cmd` topic (QoS 1) and marks it published. Anything that fails
//! is left for the next pass: the API keeps re-offering commands until they are acked.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uplink_protocol::topics::{self, Channel};

use crate::api::{ApiClient, DueCommand};
use crate::metrics::Metrics;

/// Most commands fetched per pass.
pub const BATCH: usize = 100;

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
    /// `true` while the bridge holds a broker connection.
    pub connected: watch::Receiver<bool>,
    /// Wakes the pump before the next tick.
    pub wake: Arc<Notify>,
    pub interval: Duration,
    pub metrics: Arc<Metrics>,
}

impl Pump {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                () = self.wake.notified() => debug!("Command pump woken"),
                changed = self.connected.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            if !*self.connected.borrow() {
                continue;
            }
            // A full batch, all marked, means more may be waiting: go again at once.
            loop {
                match self.pass().await {
                    Ok(n) => {
                        if failing {
                            info!("Command pump recovered");
                            failing = false;
                        }
                        if n < BATCH || shutdown.is_cancelled() {
                            break;
                        }
                    }
                    Err(e) => {
                        // Say it once per outage, not once per tick.
                        if failing {
                            debug!(error = %e, "Command pass failed again");
                        } else {
                            warn!(error = %e, "Command pass failed; retrying every tick");
                            failing = true;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// One pass; returns how many commands were published and marked.
    async fn pass(&self) -> Result<usize, PumpError> {
        let due = self.api.commands_due(BATCH).await?;
        let mut marked = 0;
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
            match self.api.mark_published(cmd.command_id).await {
                Ok(()) => {
                    marked += 1;
                    info!(command_id = %cmd.command_id, device_id = %cmd.device_id, "Command published")
                }
                Err(e) => {
                    warn!(command_id = %cmd.command_id, error = %e, "Could not mark a command published")
                }
            }
        }
        Ok(marked)
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
