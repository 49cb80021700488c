//! The Uplink control API (`uplink-api`): HTTP API for devices, operators and the bridge.
//! Owns PostgreSQL state and every S3 call.
//!
//! # Layout
//! - [`config`]: TOML + environment configuration, validated; secrets redacted.
//! - [`domain`]: pure logic: the session state machine, completion verification.
//! - [`store`]: PostgreSQL rows, version-checked transitions, the audit log.
//! - [`storage`]: the S3 adapter (create, presign, list parts, complete, abort, head).
//! - [`sessions`]: the session operations the device and operator APIs share.
//! - [`presign`]: presigning a session's parts (re-exported by [`sessions`]).
//! - [`completion`]: verified, crash-consistent completion of a session.
//! - [`cleanup`]: the worker that expires idle sessions and aborts orphan uploads.
//! - [`command_feed`]: commands pushed to the bridges: leased claims, LISTEN/NOTIFY wake-ups.
//! - [`egress`]: which addresses the API's own requests (webhooks) may reach.
//! - [`events`]: the outbox: the audit log sequenced for `GET /v1/events` and webhooks.
//! - [`metrics`]: Prometheus counters and gauges (`GET /metrics`).
//! - [`console`]: the operators' web console (`/console`), static files compiled in.
//! - [`http`]: routing, the device/operator/bridge endpoints, problem documents.
//! - [`validate`]: pure per-dataset validators (JSONL, CSV, Parquet) for completed objects.
//! - [`validation`]: the worker that reads completed objects back and records the verdict.
//! - [`digest`]: the worker that reads completed objects back and checks their SHA-256.
//! - [`guarantees`]: whether storage really applies a storage policy (probe, completion check).
//! - [`readback`]: what those two share: claims under a lease, backoff, exact-length reads.

pub mod cleanup;
pub mod command_feed;
pub mod completion;
pub mod config;
pub mod console;
pub mod digest;
pub mod domain;
pub mod egress;
pub mod events;
pub mod guarantees;
pub mod http;
pub mod https;
pub mod metrics;
pub mod mqtt_login;
pub mod presign;
pub mod readback;
pub mod sessions;
pub mod storage;
pub mod store;
pub mod validate;
pub mod validation;

use std::future::IntoFuture as _;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use uplink_protocol::sign::PrivateKey;

use crate::config::Config;
use crate::storage::Storage;
use crate::store::Store;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub storage: Storage,
    pub config: Arc<Config>,
    pub command_key: Arc<PrivateKey>,
    pub counters: Arc<metrics::Counters>,
    pub events: events::Hub,
    /// Wakes this instance's validation worker (a completion left an object pending).
    pub validation_wake: Arc<tokio::sync::Notify>,
    /// Wakes this instance's digest worker (a completion left a digest to check).
    pub digest_wake: Arc<tokio::sync::Notify>,
    /// Ends the bridges' command long-polls on this instance when a command is due.
    pub command_feed: command_feed::Feed,
}

pub fn load_command_key(path: &std::path::Path) -> anyhow::Result<PrivateKey> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "could not read command_key_file {}; create one with `uplink-api keygen --out {}`",
            path.display(),
            path.display()
        )
    })?;
    uplink_protocol::sign::decode_private(&text).with_context(|| {
        format!(
            "command_key_file {} does not hold a base64 Ed25519 seed",
            path.display()
        )
    })
}

/// Connects, migrates and builds the state.
pub async fn build_state(config: Config) -> anyhow::Result<AppState> {
    let command_key = load_command_key(&config.command_key_file)?;
    if let Some(next) = &config.command_next_key_file {
        load_command_key(next).context("command_next_key_file")?;
    }
    let pool = store::connect(
        config.database_url.expose(),
        config.database_max_connections,
    )
    .await
    .context("could not connect to database_url (is PostgreSQL running and the URL right?)")?;
    let locks = store::connect_locks(
        config.database_url.expose(),
        config.database_max_connections,
    )
    .context("database_url is not a PostgreSQL URL")?;
    store::MIGRATOR
        .run(&pool)
        .await
        .context("could not apply database migrations")?;
    let storage = Storage::new(&config.s3, config.public_endpoint());
    if let Err(e) = storage.check().await {
        tracing::warn!(error = %e, bucket = %config.s3.bucket, "Storage bucket not reachable yet");
    }
    Ok(AppState {
        store: Store { pool, locks },
        storage,
        config: Arc::new(config),
        command_key: Arc::new(command_key),
        counters: Arc::default(),
        events: events::Hub::default(),
        validation_wake: Arc::default(),
        digest_wake: Arc::default(),
        command_feed: command_feed::Feed::default(),
    })
}

/// Serves the API and runs the cleanup, validation and digest workers until `shutdown` is
/// cancelled, then drains in-flight requests.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = config.listen;
    let state = build_state(config).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening on {addr}");
    serve(state, listener, shutdown).await
}

/// How long requests in flight at shutdown may take to finish.
pub const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves the API on `listener` and runs the cleanup, validation and digest workers and the event
/// relay and webhook deliverer until `shutdown` is cancelled, then drains in-flight
/// requests (at most [`DRAIN_LIMIT`]). [`run`] is [`build_state`] + bind + `serve`; a
/// caller that must act between bind and serve (systemd readiness) calls the three itself.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cleanup = tokio::spawn(cleanup::run(state.clone(), shutdown.clone()));
    let events = tokio::spawn(events::run(state.clone(), shutdown.clone()));
    let commands = tokio::spawn(command_feed::run(state.clone(), shutdown.clone()));
    // Long-polls end at once at shutdown instead of holding the drain.
    let hub = state.events.clone();
    let feed = state.command_feed.clone();
    let closing = shutdown.clone();
    tokio::spawn(async move {
        closing.cancelled().await;
        hub.close();
        feed.close();
    });
    let validation = tokio::spawn(validation::run(state.clone(), shutdown.clone()));
    let digest = tokio::spawn(digest::run(state.clone(), shutdown.clone()));
    let router = http::router(state.clone());
    let graceful = shutdown.clone().cancelled_owned();
    let served: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> =
        match state.config.tls_files() {
            Some(files) => {
                let listener = https::HttpsListener::start(listener, files)
                    .context("tls_cert_file / tls_key_file")?;
                Box::pin(
                    axum::serve(listener, router)
                        .with_graceful_shutdown(graceful)
                        .into_future(),
                )
            }
            None => Box::pin(
                axum::serve(listener, router)
                    .with_graceful_shutdown(graceful)
                    .into_future(),
            ),
        };
    // After the signal no connection is accepted; requests in flight get DRAIN_LIMIT to
    // finish (systemd's TimeoutStopSec is 30 s), then their connections are dropped.
    let limit = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_LIMIT).await;
    };
    let served = tokio::select! {
        served = served => served,
        () = limit => {
            tracing::warn!(
                limit_secs = DRAIN_LIMIT.as_secs(),
                "Requests still in flight at the drain limit; closing their connections"
            );
            Ok(())
        }
    };
    shutdown.cancel();
    for (task, handle) in [
        ("cleanup", cleanup),
        ("events", events),
        ("command feed", commands),
        ("validation", validation),
        ("digest", digest),
    ] {
        match handle.await {
            Ok(()) => tracing::info!(task, "Task stopped"),
            Err(e) => tracing::error!(task, error = %e, "Task panicked"),
        }
    }
    served?;
    tracing::info!("API stopped");
    Ok(())
}
