use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use uplink_api::config::Config;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Cmd::Run) {
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
            Err(e) => fail(anyhow::anyhow!("invalid configuration: {e}")),
        },
        Cmd::Run => {
            let config = match Config::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(anyhow::anyhow!("invalid configuration: {e}")),
            };
            init_tracing();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return fail(e.into()),
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            let result = runtime.block_on(async {
                let token = shutdown.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    token.cancel();
                });
                uplink_api::run(config, shutdown).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("uplink-api: {e:#}");
    ExitCode::FAILURE
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,aws=warn,tower_http=warn")
    });
    let json = std::env::var("UPLINK_LOG_FORMAT")
        .map(|f| f == "json")
        .unwrap_or(false);
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
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
