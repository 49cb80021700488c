//! Uplink edge agent: receives signed commands over MQTT and uploads files, resumably and
//! verified, straight to S3-compatible storage through presigned URLs.
//!
//! # Layout
//! - [`config`]: TOML + `UPLINK_AGENT_*` environment configuration and its validation.
//! - [`store`]: SQLite state (`agent.db`): commands and their acks, jobs, parts.
//! - [`policy`]: which paths may be uploaded (regular files under the allowed roots).
//! - [`hasher`]: the hash pass (per-part MD5, whole-file SHA-256, file identity), ETag checks.
//! - [`job`]: the job state machine, as pure code.
//! - [`rpc`]: the MQTT link (event loop, presence, Last Will) and request/response over
//!   `req`/`res` with re-sends and backoff.
//! - [`uploader`]: streaming part PUTs, presign freshness, rate limiting, URL redaction, and
//!   the per-job upload pass.
//! - [`flow`]: flow control: upload windows, priorities, concurrency, the bandwidth cap, and
//!   their run-time overrides by `config` commands.
//! - [`agent`]: [`run`]: command handling, job runners, resume after restart, shutdown.
//! - [`watch`]: `[[watch]]` directory scans that queue settled files as local jobs, once per
//!   file version, and delete them after a verified upload when asked.
//! - [`clock`]: this device's clock offset from the API's (measured from signed answers,
//!   reported in the status, logged when requests are refused as stale).
//! - [`tls`]: MQTT over TLS (CA file or system roots, mutual TLS, server name) and the
//!   extra HTTPS CAs, from the configuration.
//! - [`metrics`]: counters and the optional Prometheus `/metrics` responder.
//! - [`failpoint`]: named crash points for the fault tests (cargo feature `failpoints` only;
//!   shared with the API, in `uplink-service`).
//! - [`cli`]: the operator commands on the gateway: `status`, `upload`, `doctor`,
//!   `print-default-config`.

pub mod agent;
pub mod cli;
pub mod clock;
pub mod config;
pub mod disk;
pub use uplink_service::failpoint;
pub mod flow;
pub mod hasher;
pub mod job;
pub mod metrics;
pub mod pass;
pub mod policy;
pub mod rate;
pub mod rpc;
pub mod store;
pub mod tls;
pub mod uploader;
pub mod watch;

pub use agent::run;
