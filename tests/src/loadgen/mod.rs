//! `uplink-loadgen`: many simulated devices with real MQTT connections and real signed
//! requests against a running Uplink on 127.0.0.1 (started by `scripts/loadtest`).
//!
//! # Layout
//! - [`args`]: the command line; only 127.0.0.1 is accepted.
//! - [`fleet`]: the devices: MQTT connections, signed `status`, requests on `req` matched
//!   with answers on `res`, commands on `cmd` acked once.
//! - [`operator`]: registering the fleet and issuing commands through the operator API.
//! - [`flows`]: a device's upload flow (create → presign → PUT → complete, or presign-only).
//! - [`ledger`]: exactly-once accounting as the devices saw it.
//! - [`check`]: the same accounting against PostgreSQL at the end.
//! - [`stats`]: latencies, throughput and errors per operation.
//! - [`procs`]: CPU, memory and PostgreSQL connections of each service, from /proc.
//! - [`report`]: the table and the JSON.
//! - [`run`]: one run, start to end.

pub mod args;
pub mod check;
pub mod fleet;
pub mod flows;
pub mod ledger;
pub mod operator;
pub mod procs;
pub mod report;
pub mod run;
pub mod stats;
