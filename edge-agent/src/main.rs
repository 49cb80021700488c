//! `uplink-agent`: parse the command line, load the configuration, start telemetry, run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;
use uplink_agent::cli;
use uplink_protocol::sign;

#[derive(Parser)]
#[command(
    name = "uplink-agent",
    version,
    about = "Uplink edge agent",
    after_help = "Exit codes: 0 success; 1 error (bad configuration, database, a failed doctor \
check); 2 `upload` refused the file (path policy)."
)]
struct Cli {
    /// Configuration file (TOML); `UPLINK_AGENT_*` environment variables override it.
    #[arg(long, global = true, env = "UPLINK_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Make a device key (base64 Ed25519 seed, mode 0600) and print its public key.
    Keygen {
        /// Where to write the private key; never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Load and validate the configuration, then exit.
    CheckConfig,
    /// Show the jobs in the state database (read-only; works while the agent runs).
    #[command(after_help = "Exit codes: 0 listed; 1 no state database or a bad configuration.")]
    Status {
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
        /// At most this many jobs, newest first.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Queue FILE for upload by the running agent (no operator command needed); prints the
    /// job id.
    #[command(after_help = "Exit codes: 0 queued (the job id is printed); 1 error \
(configuration, database); 2 refused: FILE is outside allowed_roots, not a regular file, \
or unreadable.")]
    Upload {
        /// The file; it must be a regular file under one of `allowed_roots`.
        file: PathBuf,
        /// 0 (lowest) to 9 (highest; default 5): when PUT slots are scarce, parts of
        /// higher-priority jobs go first.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
        priority: Option<u8>,
    },
    /// Check the configuration, key, state directory, disk, broker and clock; one line each.
    #[command(
        after_help = "Exit codes: 0 every check ok; 1 at least one FAIL. The MQTT check \
connects as the device, so a running agent is briefly disconnected (it reconnects)."
    )]
    Doctor,
    /// Print a commented default configuration.
    PrintDefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = cli.config.as_deref();
    let result = match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Run => run(file),
        Cmd::Keygen { out } => keygen(&out),
        Cmd::CheckConfig => check_config(file),
        Cmd::Status { json, limit } => return code(cli::status(file, json, limit)),
        Cmd::Upload {
            file: path,
            priority,
        } => return code(cli::upload(file, &path, priority)),
        Cmd::Doctor => doctor(file),
        Cmd::PrintDefaultConfig => {
            print!("{}", cli::DEFAULT_CONFIG);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn code(result: Result<u8, cli::CliError>) -> ExitCode {
    match result {
        Ok(c) => ExitCode::from(c),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(cli::EXIT_FAIL)
        }
    }
}

fn doctor(file: Option<&Path>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match runtime.block_on(cli::doctor(file)) {
        cli::EXIT_OK => Ok(()),
        _ => bail!("some checks failed"),
    }
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = sign::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| {
            format!(
                "cannot create {} (it is never overwritten; remove it first or choose another path)",
                out.display()
            )
        })?;
    file.write_all(sign::encode_private(&key).as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("{}", sign::encode_public(&key.verifying_key()));
    Ok(())
}

fn check_config(file: Option<&Path>) -> anyhow::Result<()> {
    match uplink_agent::config::load_and_validate(file) {
        Ok(_) => {
            println!("config ok");
            Ok(())
        }
        Err(e) => bail!("{e}"),
    }
}

fn run(file: Option<&Path>) -> anyhow::Result<()> {
    let loaded =
        uplink_agent::config::load_and_validate(file).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Text on a terminal, JSON under systemd; spans to a collector when OTEL_* asks for it.
    let _otel = uplink_service::init_logs("uplink-agent", "info", Vec::new())
        .map_err(|e| anyhow::anyhow!(e))?;
    uplink_agent::failpoint::announce();
    // A small runtime keeps memory flat on small gateways.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(shutdown_signal(shutdown.clone()));
        let result = uplink_agent::run(loaded, shutdown).await;
        signals.abort();
        result
    })?;
    info!("Bye");
    Ok(())
}

/// Fires `shutdown` on SIGTERM or Ctrl-C (in one place).
async fn shutdown_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => info!("Ctrl-C received"),
        _ = term => info!("SIGTERM received"),
    }
    shutdown.cancel();
}
