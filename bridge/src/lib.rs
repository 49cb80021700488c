//! Uplink bridge: device MQTT ⇄ control API HTTP. It carries control messages only; file
//! bytes never pass through it. Stateless apart from the optional embedded broker.
//!
//! # Layout
//! - [`config`]: TOML + `UPLINK_BRIDGE_*` environment configuration, secrets, validation.
//! - [`dynsec`]: Mosquitto's dynamic-security plugin kept in step with the registry.
//! - [`broker`]: the embedded rumqttd broker on a loopback port and its auth handler.
//! - [`gate`]: what devices connect to in front of the embedded broker: checks them with the
//!   control API, keeps each to its own topics ([`mqtt_rules`]), disconnects disabled ones.
//! - [`tls_listener`]: the embedded broker's TLS listener (rustls, into the gate),
//!   with certificate reload.
//! - [`api`]: reqwest client for the control API (device calls, mqtt-auth, presence,
//!   command claims).
//! - [`mqtt`]: the bridge's rumqttc client: options, subscriptions, the event loop task and
//!   per-message dispatch.
//! - [`forward`]: device → API forwarding of `req`, `cmd/ack` and `progress`; payload
//!   classification and answer mapping are pure functions.
//! - [`presence`]: `status` → presence updates, newest per device.
//! - [`commands`]: the pump that claims due commands (a long-poll) and publishes them on `cmd`.
//! - [`metrics`]: the shared counters and their Prometheus text rendering.
//! - [`http`]: the optional `http_listen` server: `/healthz`, `/readyz`, `/metrics`.
//!
//! [`run`] wires them together and returns when its shutdown token fires.

pub mod api;
pub mod broker;
pub mod commands;
pub mod config;
pub mod dynsec;
pub mod forward;
pub mod gate;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod mqtt_rules;
pub mod presence;
pub mod tls_listener;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{ApiClient, ApiError};
use crate::broker::BrokerError;
use crate::config::{BrokerMode, Config};

/// How long the embedded broker may take to accept the bridge's own connection.
const EMBEDDED_START_TIMEOUT: Duration = Duration::from_secs(10);
/// After the bridge's own client has published its last answers and disconnected, the
/// embedded broker (which dies with this process) gets this long to deliver them to devices.
const EMBEDDED_FLUSH: Duration = Duration::from_millis(500);
/// Capacity of the rumqttc request channel.
const REQUEST_CHANNEL: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    TlsListen(#[from] tls_listener::TlsListenError),
    #[error("broker TLS settings: {0}")]
    Tls(#[from] uplink_service::tls::TlsError),
    #[error("embedded broker on {0} did not accept the bridge's connection in time")]
    BrokerNotReady(std::net::SocketAddr),
    #[error("could not listen on http_listen {addr}: {source}")]
    HttpListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("task {0} ended before shutdown")]
    TaskEnded(&'static str),
    #[error("task {name} panicked: {reason}")]
    TaskPanicked { name: &'static str, reason: String },
}

/// Runs the bridge until `shutdown` fires (or a task ends on its own, which is an error).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BridgeError> {
    let api = ApiClient::new(
        config.api_base(),
        config.api_token.clone(),
        config.api_ca_file.as_deref(),
    )?;
    let http_listener = match config.http_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| BridgeError::HttpListen { addr, source })?,
        ),
        None => None,
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let b = &config.broker;

    let (connection, mut embedded) = match b.mode {
        BrokerMode::Embedded => {
            let embedded = broker::start(b.listen, api.clone())?;
            let connection = mqtt::Connection {
                host: embedded.internal.ip().to_string(),
                port: embedded.internal.port(),
                client_id: b.client_id.clone(),
                username: Some(broker::INTERNAL_USERNAME.to_string()),
                password: Some(embedded.internal_password.expose().to_string()),
                shared_subscriptions: false,
                tls: None,
            };
            (connection, Some(embedded))
        }
        BrokerMode::External => (
            mqtt::Connection {
                host: b.host.clone(),
                port: b.port,
                client_id: b.client_id.clone(),
                username: b.username.clone(),
                password: b.password.as_ref().map(|p| p.expose().to_string()),
                shared_subscriptions: b.shared_subscriptions,
                tls: b.client_tls(),
            },
            None,
        ),
    };
    let tls_listener = match (&embedded, b.tls_listen, &b.tls_cert_file, &b.tls_key_file) {
        (Some(embedded), Some(listen), Some(cert), Some(key)) => Some(
            tls_listener::TlsListener::bind(
                tls_listener::Settings {
                    listen,
                    files: uplink_service::tls::ServerFiles {
                        cert_file: cert.clone(),
                        key_file: key.clone(),
                        client_ca_file: b.tls_client_ca_file.clone(),
                    },
                },
                embedded.gate.clone(),
            )
            .await?,
        ),
        _ => None,
    };
    info!(
        mode = ?b.mode,
        host = %connection.host,
        port = connection.port,
        client_id = %connection.client_id,
        api_url = %config.api_base(),
        "Bridge starting"
    );

    let (client, mut eventloop) =
        rumqttc::AsyncClient::new(mqtt::options(&connection)?, REQUEST_CHANNEL);
    // Answers go out as soon as they are written, not after the broker's delayed ACK of
    // the previous packet (Nagle's algorithm, up to 40 ms per answer).
    eventloop.network_options.set_tcp_nodelay(true);
    let (connected_tx, mut connected_rx) = watch::channel(false);
    let presence_queue = Arc::new(presence::PresenceQueue::default());
    let wake_pump = Arc::new(Notify::new());
    let tasks_stop = shutdown.child_token();

    let mut tasks = JoinSet::new();
    let mut names = HashMap::new();
    let mut dispatch = mqtt::Dispatch::new(
        forward::Forwarder {
            api: api.clone(),
            mqtt: client.clone(),
            metrics: metrics.clone(),
        },
        presence_queue.clone(),
        metrics.clone(),
    );
    let dynamic_security = b.mode == BrokerMode::External && b.dynamic_security;
    let subscriptions = mqtt::filters(connection.shared_subscriptions, dynamic_security);
    if dynamic_security {
        let (answers_tx, answers) = tokio::sync::mpsc::unbounded_channel();
        dispatch.control_answers = Some(answers_tx);
        let sync = dynsec::Sync {
            client: client.clone(),
            api: api.clone(),
            answers,
            username: connection.username.clone().unwrap_or_default(),
            subscriptions: subscriptions.clone(),
        };
        let handle = tasks.spawn(sync.run(connected_rx.clone(), tasks_stop.clone()));
        names.insert(handle.id(), "dynamic-security");
    }
    let handle = tasks.spawn(mqtt::run_event_loop(
        eventloop,
        client.clone(),
        subscriptions,
        embedded.is_some(),
        dispatch,
        connected_tx,
        tasks_stop.clone(),
    ));
    names.insert(handle.id(), "mqtt-event-loop");
    if let Some(listener) = tls_listener {
        let handle = tasks.spawn(listener.serve(tasks_stop.clone()));
        names.insert(handle.id(), "tls-listener");
    }
    let handle = tasks.spawn(presence::run_worker(
        presence_queue,
        api.clone(),
        wake_pump.clone(),
        tasks_stop.clone(),
    ));
    names.insert(handle.id(), "presence");
    if let Some(embedded) = embedded.as_mut() {
        if let Some(listener) = embedded.gate_listener.take() {
            let handle = tasks.spawn(embedded.gate.clone().serve(listener, tasks_stop.clone()));
            names.insert(handle.id(), "mqtt-gate");
        }
        let handle = tasks.spawn(embedded.gate.clone().run_recheck(tasks_stop.clone()));
        names.insert(handle.id(), "mqtt-gate-recheck");
    }
    if let Some(listener) = http_listener {
        let state = http::HttpState {
            metrics: metrics.clone(),
            connected: connected_rx.clone(),
            api: api.clone(),
        };
        let handle = tasks.spawn(http::serve(listener, state, tasks_stop.clone()));
        names.insert(handle.id(), "http");
    }
    let pump = commands::Pump {
        api,
        metrics,
        mqtt: client,
        name: b.client_id.clone(),
        connected: connected_rx.clone(),
        wake: wake_pump,
        interval: Duration::from_millis(config.poll_interval_ms),
    };
    let handle = tasks.spawn(pump.run(tasks_stop.clone()));
    names.insert(handle.id(), "command-pump");

    let mut result = Ok(());
    if let Some(embedded) = &embedded {
        let ready = tokio::time::timeout(EMBEDDED_START_TIMEOUT, async {
            loop {
                if *connected_rx.borrow_and_update() || embedded.has_stopped() {
                    return;
                }
                if connected_rx.changed().await.is_err() {
                    return;
                }
            }
        });
        tokio::select! {
            () = shutdown.cancelled() => {}
            r = ready => {
                if r.is_ok() && *connected_rx.borrow() && !embedded.has_stopped() {
                    info!("broker listening on {}", embedded.listen);
                } else {
                    result = Err(BridgeError::BrokerNotReady(embedded.listen));
                    tasks_stop.cancel();
                }
            }
        }
    }

    // Run until shutdown, or until a task ends on its own (which it should not).
    while result.is_ok() {
        tokio::select! {
            biased;
            () = tasks_stop.cancelled() => break,
            joined = tasks.join_next_with_id() => {
                let Some(joined) = joined else { break };
                if tasks_stop.is_cancelled() {
                    log_stopped(&names, joined);
                    break;
                }
                let outcome = task_outcome(&names, joined);
                error!(error = %outcome, "Task ended before shutdown; stopping the bridge");
                result = Err(outcome);
            }
        }
    }
    tasks_stop.cancel();
    info!("Bridge stopping");
    while let Some(joined) = tasks.join_next_with_id().await {
        log_stopped(&names, joined);
    }
    if embedded.is_some() {
        tokio::time::sleep(EMBEDDED_FLUSH).await;
    }
    result
}

type Joined = Result<(tokio::task::Id, ()), tokio::task::JoinError>;

fn log_stopped(names: &HashMap<tokio::task::Id, &'static str>, joined: Joined) {
    match joined {
        Ok((id, ())) => info!(
            task = names.get(&id).copied().unwrap_or("?"),
            "Task stopped"
        ),
        Err(e) => {
            let name = names.get(&e.id()).copied().unwrap_or("?");
            warn!(task = name, error = %e, "Task failed while stopping");
        }
    }
}

fn task_outcome(names: &HashMap<tokio::task::Id, &'static str>, joined: Joined) -> BridgeError {
    match joined {
        Ok((id, ())) => BridgeError::TaskEnded(names.get(&id).copied().unwrap_or("?")),
        Err(e) => BridgeError::TaskPanicked {
            name: names.get(&e.id()).copied().unwrap_or("?"),
            reason: e.to_string(),
        },
    }
}
