//! Command line of `uplink-loadgen`. Every address is on 127.0.0.1: the tool refuses to
//! load anything else.

use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerKind {
    /// The bridge's embedded broker: devices log in with their signed MQTT password.
    Embedded,
    /// Mosquitto with anonymous clients (the load test's set-up; no per-device accounts).
    Mosquitto,
}

/// Simulated devices with real MQTT connections and signed requests against a running
/// Uplink (control APIs, bridges, a broker) on 127.0.0.1.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "uplink-loadgen", version)]
pub struct Args {
    /// Control API base URL (repeat for several instances; operator calls go round-robin).
    #[arg(long = "api", required = true)]
    pub apis: Vec<String>,
    /// The operator token of the control APIs.
    #[arg(long, env = "UPLINK_LOADGEN_OPERATOR_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub operator_token: String,
    /// PostgreSQL URL of the control APIs' database: the exactly-once checks at the end.
    #[arg(long, env = "UPLINK_LOADGEN_DATABASE_URL", hide_env_values = true)]
    #[serde(skip)]
    pub database_url: String,
    /// The broker's port on 127.0.0.1.
    #[arg(long)]
    pub mqtt_port: u16,
    #[arg(long, value_enum, default_value = "mosquitto")]
    pub broker: BrokerKind,
    /// Simulated devices.
    #[arg(long, default_value_t = 200)]
    pub devices: usize,
    /// Device connections started per second.
    #[arg(long, default_value_t = 500)]
    pub connect_rate: u32,
    /// Devices registered at once (`POST /v1/devices`).
    #[arg(long, default_value_t = 32)]
    pub register_concurrency: usize,
    /// Seconds of load after every device is online.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Commands issued per second, over all devices (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub command_rate: f64,
    /// Devices running session flows back to back (0: none).
    #[arg(long, default_value_t = 0)]
    pub session_workers: usize,
    /// Session flows started per second over all workers (0: as fast as they go).
    #[arg(long, default_value_t = 0.0)]
    pub session_rate: f64,
    /// Parts per session. With more than 1 part nothing is uploaded (parts are 5 MiB):
    /// use it with --presign-only.
    #[arg(long, default_value_t = 1)]
    pub parts: u32,
    /// Presign only (control-plane load): create, presign every part, abort; no PUTs.
    #[arg(long)]
    pub presign_only: bool,
    /// Bytes of the one part a full flow uploads.
    #[arg(long, default_value_t = 4096)]
    pub part_bytes: usize,
    /// Seconds between a device's `status` refreshes (0: only the one at connect).
    #[arg(long, default_value_t = 0)]
    pub status_every: u64,
    /// Seconds to wait for answers to a request before sending it again (same id).
    #[arg(long, default_value_t = 15)]
    pub request_timeout: u64,
    /// Seconds after the load to wait for outstanding commands and answers.
    #[arg(long, default_value_t = 60)]
    pub drain: u64,
    /// Seconds to wait for every device to be online (connected and seen by the API).
    #[arg(long, default_value_t = 300)]
    pub online_timeout: u64,
    /// A service to measure, NAME=PID (repeat).
    #[arg(long = "pid", value_parser = parse_pid)]
    pub pids: Vec<(String, u32)>,
    /// Device id prefix (default: a fresh random one).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

fn parse_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=PID"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("`{s}`: PID must be a number"))?;
    Ok((name.to_string(), pid))
}

impl Args {
    /// Refuses addresses other than 127.0.0.1 and settings that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        for api in &self.apis {
            let url = url::Url::parse(api).map_err(|e| format!("--api {api}: {e}"))?;
            if url.host_str() != Some("127.0.0.1") {
                return Err(format!(
                    "--api {api}: uplink-loadgen only targets 127.0.0.1"
                ));
            }
        }
        let db = url::Url::parse(&self.database_url)
            .map_err(|e| format!("--database-url is not a URL: {e}"))?;
        if db.host_str() != Some("127.0.0.1") {
            return Err("--database-url: uplink-loadgen only targets 127.0.0.1".into());
        }
        if self.devices == 0 {
            return Err("--devices must be at least 1".into());
        }
        if self.session_workers > self.devices {
            return Err("--session-workers cannot exceed --devices".into());
        }
        if self.parts == 0 || self.parts > 10_000 {
            return Err("--parts must be 1..=10000".into());
        }
        if self.parts > 1 && !self.presign_only {
            return Err("--parts above 1 needs --presign-only (parts are 5 MiB)".into());
        }
        if self.part_bytes == 0 || self.part_bytes > 5 << 20 {
            return Err("--part-bytes must be 1..=5 MiB".into());
        }
        if self.connect_rate == 0 || self.register_concurrency == 0 {
            return Err("--connect-rate and --register-concurrency must be at least 1".into());
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec![
            "uplink-loadgen",
            "--api",
            "http://127.0.0.1:8080",
            "--operator-token",
            "t",
            "--database-url",
            "postgres://u@127.0.0.1:5432/db",
            "--mqtt-port",
            "1883",
        ];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).expect("parse")
    }

    #[test]
    fn only_localhost_is_targeted() {
        assert!(args(&[]).validate().is_ok());
        let mut a = args(&[]);
        a.apis = vec!["http://10.0.0.1:8080".into()];
        assert!(a.validate().unwrap_err().contains("127.0.0.1"));
        let mut a = args(&[]);
        a.database_url = "postgres://u@db.example:5432/db".into();
        assert!(a.validate().unwrap_err().contains("127.0.0.1"));
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        assert!(args(&["--parts", "4"]).validate().is_err());
        assert!(args(&["--parts", "4", "--presign-only"]).validate().is_ok());
        assert!(args(&["--devices", "2", "--session-workers", "3"])
            .validate()
            .is_err());
        assert_eq!(
            args(&["--pid", "api-1=42"]).pids,
            vec![("api-1".to_string(), 42)]
        );
        assert!(Args::try_parse_from(["uplink-loadgen", "--pid", "x"]).is_err());
    }
}
