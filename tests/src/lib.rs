//! End-to-end test harness: runs the real `uplink-api`, `uplink-bridge` (with its embedded
//! broker) and `uplink-agent` binaries against real PostgreSQL and a real S3 server.
//!
//! The environment comes from `scripts/test` (see [`env::TestEnv`]); a test run without it
//! fails with a message saying to run `scripts/test`, it never passes silently.
//!
//! # Layout
//! - [`env`]: the variables `scripts/test` exports (database, S3, binaries).
//! - [`db`]: a fresh PostgreSQL database per test, dropped at the end.
//! - [`process`]: a child process with its output in a log file, killed on drop.
//! - [`proxy`]: an in-process TCP fault proxy between the agent and S3 that counts the
//!   bytes the agent sends, slows, cuts, resets, black-holes, stalls or corrupts them; also
//!   usable between the bridge and the API and between agents and the broker.
//! - [`stack`]: one test's services: API, bridge, devices and their agents, and the
//!   operator-API helpers (commands, sessions, waiting for final states); optionally
//!   several APIs and bridges (`StackOptions::apis`, `bridges`; `stack/instances.rs`).
//! - [`balancer`]: a round-robin TCP balancer in front of several API instances.
//! - [`receiver`]: a webhook receiver that records each delivery's event `seq`.
//! - [`device`]: acting as a device without the agent: the signed device HTTP API and an
//!   MQTT client that publishes raw payloads.
//! - [`files`]: random source files, SHA-256, and downloading objects from S3.
//! - [`browser`]: headless Chromium driven over WebDriver (chromedriver), for the console.
//! - [`tls`]: a throw-away test CA and certificates (rcgen), and an HTTPS relay in front of
//!   a plain service (storage behind TLS).
//! - [`bench`]: the tools `uplink-bench` compares the agent with (aws-cli, s5cmd, rclone).
//! - [`loadgen`]: `uplink-loadgen`, many simulated devices against a running fleet.
//!
//! Every test gets its own database, device ids, ports and directories, so tests run in
//! parallel. When a test panics, the logs of every process it started are printed.

pub mod balancer;
pub mod bench;
pub mod browser;
pub mod ctl;
pub mod db;
pub mod device;
pub mod env;
pub mod files;
pub mod loadgen;
pub mod process;
pub mod proxy;
pub mod receiver;
pub mod stack;
pub mod tls;

pub use device::{Collected, ConnectFailure, DeviceHttp, MqttDevice, MqttLogin, Reply};
pub use files::SourceFile;
pub use stack::{AgentOptions, Device, Service, Stack, StackOptions};

pub const MIB: u64 = 1 << 20;

/// Unique suffix for ids and names in one test run.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}
