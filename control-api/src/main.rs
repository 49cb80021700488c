//! `uplink-api [--config FILE] [run | check-config | keygen --out FILE | print-default-config]`.

use std::path::PathBuf;
use std::process::ExitCode;
use uplink_service::sd_notify;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use uplink_api::config::Config;

/// The commented example configuration, printed by `print-default-config`.
const DEFAULT_CONFIG: &str = include_str!("../../configs/api.toml");

/// Uplink control API: sessions, presigning, completion, devices and commands.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file (environment variables UPLINK_API_* override it).
    #[arg(long, short, global = true, env = "UPLINK_API_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the API (the default).
    Run,
    /// Load and validate the configuration, then exit.
    CheckConfig,
    /// Write a new command-signing key and print its public key.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the commented example configuration
    /// (`uplink-api print-default-config > /etc/uplink/api.toml`).
    PrintDefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Cmd::Keygen { out } => match write_key(&out) {
            Ok(public) => {
                println!("{public}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Cmd::CheckConfig => match Config::load(cli.config.as_deref()) {
            Ok(_) => {
                println!("config ok");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.into()),
        },
        Cmd::Run => {
            let config = match Config::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(e.into()),
            };
            let _otel = match uplink_service::init_logs(
                "uplink-api",
                "info,sqlx=warn,aws=warn,tower_http=warn",
                Vec::new(),
            ) {
                Ok(guard) => guard,
                Err(e) => return fail(anyhow::anyhow!(e)),
            };
            uplink_service::failpoint::announce();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return fail(e.into()),
            };
            let shutdown = CancellationToken::new();
            let result = runtime.block_on(async {
                let token = shutdown.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    token.cancel();
                });
                serve(config, shutdown).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}

/// Connects and migrates, binds, tells systemd it is ready (when run under it), then serves
/// until `shutdown`.
async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = config.listen;
    let state = uplink_api::build_state(config).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening on {addr}");
    sd_notify::ready("API", &shutdown);
    uplink_api::serve(state, listener, shutdown).await
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("uplink-api: {e:#}");
    ExitCode::FAILURE
}

fn write_key(out: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = uplink_protocol::sign::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| {
            anyhow::anyhow!(
                "could not create {}: {e} (an existing key is never overwritten)",
                out.display()
            )
        })?;
    writeln!(file, "{}", uplink_protocol::sign::encode_private(&key))?;
    Ok(uplink_protocol::sign::encode_public(&key.verifying_key()))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("Shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_the_example_and_parses() {
        assert!(DEFAULT_CONFIG.contains("command_key_file"));
        let dir = std::env::temp_dir().join(format!("uplink-api-default-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("api.toml");
        std::fs::write(&file, DEFAULT_CONFIG).unwrap();
        let loaded = Config::load(Some(&file));
        let _ = std::fs::remove_dir_all(&dir);
        loaded.unwrap();
    }
}
