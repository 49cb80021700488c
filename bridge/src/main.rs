//! `uplink-bridge [--config FILE] [run | check-config | print-default-config]`.

use std::path::PathBuf;
use std::process::ExitCode;
use uplink_service::sd_notify;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use uplink_bridge::config::Config;

/// The commented example configuration, printed by `print-default-config`.
const DEFAULT_CONFIG: &str = include_str!("../../configs/bridge.toml");

#[derive(Parser)]
#[command(
    name = "uplink-bridge",
    version,
    about = "Uplink bridge: device MQTT <-> control API"
)]
struct Cli {
    /// TOML configuration file; `UPLINK_BRIDGE_*` environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Check the configuration and say what is wrong with it.
    CheckConfig,
    /// Print the commented example configuration
    /// (`uplink-bridge print-default-config > /etc/uplink/bridge.toml`).
    PrintDefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let load = || Config::load(cli.config.as_deref()).map_err(|e| eprintln!("uplink-bridge: {e}"));
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig => match load() {
            Ok(_) => {
                println!("config ok");
                ExitCode::SUCCESS
            }
            Err(()) => ExitCode::FAILURE,
        },
        Command::Run => match load() {
            Ok(config) => run(config),
            Err(()) => ExitCode::FAILURE,
        },
    }
}

fn run(config: Config) -> ExitCode {
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let _otel = match init_tracing(connected_tx) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("uplink-bridge: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "Could not start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown_on_signal(shutdown.clone()));
        tokio::spawn(notify_when_ready(connected_rx, shutdown.clone()));
        match uplink_bridge::run(config, shutdown).await {
            Ok(()) => {
                info!("Bridge stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!(error = %e, "Bridge failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Logs and optional trace export (see [`uplink_service::init_logs`]), plus a layer that
/// fires `connected` the first time the bridge's MQTT client is connected (see
/// [`ConnectedLayer`]), whatever `RUST_LOG` says.
fn init_tracing(
    connected: tokio::sync::oneshot::Sender<()>,
) -> Result<Option<uplink_service::otel::Guard>, String> {
    use tracing_subscriber::Layer as _;
    let connected = ConnectedLayer(std::sync::Mutex::new(Some(connected))).with_filter(
        tracing_subscriber::filter::Targets::new()
            .with_target(ConnectedLayer::TARGET, tracing::Level::INFO),
    );
    uplink_service::init_logs(
        "uplink-bridge",
        "info,rumqttd=warn",
        vec![connected.boxed()],
    )
}

/// Readiness without a hook in the library: the bridge's MQTT event loop logs
/// "Connected to broker" (target `uplink_bridge::mqtt`) on every CONNACK, i.e. once the
/// broker (embedded or external) is up and has accepted the bridge. The first such event
/// fires the sender. `scripts/check-units` fails if this message ever changes.
struct ConnectedLayer(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>);

impl ConnectedLayer {
    const TARGET: &'static str = "uplink_bridge::mqtt";
    const MESSAGE: &'static str = "Connected to broker";
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ConnectedLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != Self::TARGET {
            return;
        }
        let mut visitor = IsMessage(false);
        event.record(&mut visitor);
        if visitor.0 {
            if let Some(tx) = self.0.lock().ok().and_then(|mut tx| tx.take()) {
                let _ = tx.send(());
            }
        }
    }
}

/// True when an event's message is [`ConnectedLayer::MESSAGE`].
struct IsMessage(bool);

impl tracing::field::Visit for IsMessage {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" && value == ConnectedLayer::MESSAGE {
            self.0 = true;
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" && format!("{value:?}") == ConnectedLayer::MESSAGE {
            self.0 = true;
        }
    }
}

/// Sends READY=1 once the bridge is connected to its broker, then keeps the watchdog fed
/// and says STOPPING=1 at shutdown. If the broker never comes up no READY=1 is sent: the
/// embedded broker fails the bridge within 10 s, and for an external broker systemd's
/// start timeout fails the unit.
async fn notify_when_ready(
    connected: tokio::sync::oneshot::Receiver<()>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        r = connected => {
            if r.is_ok() {
                sd_notify::ready("bridge", &shutdown);
            }
        }
    }
}

/// Fires `shutdown` on Ctrl-C or SIGTERM.
async fn shutdown_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(error = %e, "Cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(error = %e, "Cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("Ctrl-C received; shutting down"),
        () = term => info!("SIGTERM received; shutting down"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_layer_fires_once_on_the_event_loop_connect_message() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let subscriber =
            tracing_subscriber::registry().with(ConnectedLayer(std::sync::Mutex::new(Some(tx))));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "uplink_bridge::mqtt", "Subscribed to device topics");
            tracing::info!(target: "uplink_bridge", "Connected to broker");
            assert!(rx.try_recv().is_err(), "fired on the wrong event");
            tracing::info!(
                target: "uplink_bridge::mqtt",
                session_present = false,
                "Connected to broker"
            );
            tracing::info!(target: "uplink_bridge::mqtt", "Connected to broker");
        });
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn default_config_is_the_example_and_parses() {
        let file = std::path::Path::new("bridge.toml");
        let config = uplink_service::config::Layers::from_toml(file, DEFAULT_CONFIG)
            .and_then(|layers| Config::from_layers(&layers));
        assert!(config.is_ok(), "{config:?}");
    }
}
