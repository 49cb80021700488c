//! `uplink-api [--config FILE] [run | check-config | keygen --out FILE | print-default-config]`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

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
    if let Some(notifier) = sd_notify::Notifier::from_env() {
        let notifier = Arc::new(notifier);
        notifier.send("READY=1");
        tracing::info!("Told systemd the API is ready");
        sd_notify::supervise(notifier, shutdown.clone());
    }
    uplink_api::serve(state, listener, shutdown).await
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("uplink-api: {e:#}");
    ExitCode::FAILURE
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,aws=warn,tower_http=warn")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json_logs(|name| std::env::var_os(name)) {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// JSON logs when `UPLINK_LOG_FORMAT=json`, or under systemd (`JOURNAL_STREAM` or
/// `INVOCATION_ID` set) unless `UPLINK_LOG_FORMAT` says otherwise; text otherwise.
fn json_logs(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    match env("UPLINK_LOG_FORMAT") {
        Some(format) => format == "json",
        None => env("JOURNAL_STREAM").is_some() || env("INVOCATION_ID").is_some(),
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

/// systemd's service notification protocol (`sd_notify(3)`) without libsystemd: one datagram
/// per message to the socket `NOTIFY_SOCKET` names. Every call is a no-op when the process
/// was not started by systemd with `Type=notify`. (The same few lines live in the other
/// service's `main.rs`; the wire contract is systemd's, not ours.)
mod sd_notify {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    use std::time::Duration;

    pub struct Notifier {
        socket: UnixDatagram,
        addr: SocketAddr,
    }

    impl Notifier {
        /// The notifier for `$NOTIFY_SOCKET`, or `None` outside systemd. A socket that
        /// cannot be opened is logged and treated as absent: systemd then fails the start
        /// on its own (no READY=1), which is louder than anything we could do here.
        pub fn from_env() -> Option<Self> {
            let path = std::env::var_os("NOTIFY_SOCKET")?;
            match Self::open(&path) {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::error!(error = %e, socket = ?path, "Cannot open NOTIFY_SOCKET");
                    None
                }
            }
        }

        fn open(path: &std::ffi::OsStr) -> std::io::Result<Self> {
            use std::os::unix::ffi::OsStrExt as _;
            let bytes = path.as_bytes();
            let addr = match bytes.split_first() {
                // "@name" is a Linux abstract socket.
                #[cfg(target_os = "linux")]
                Some((b'@', name)) => {
                    use std::os::linux::net::SocketAddrExt as _;
                    SocketAddr::from_abstract_name(name)?
                }
                _ => SocketAddr::from_pathname(std::path::Path::new(path))?,
            };
            Ok(Self {
                socket: UnixDatagram::unbound()?,
                addr,
            })
        }

        /// Sends one message (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, `STATUS=…`).
        pub fn send(&self, message: &str) {
            if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
                tracing::warn!(error = %e, message, "Could not notify systemd");
            }
        }
    }

    /// Half of `WATCHDOG_USEC` (systemd's advice), when the watchdog is on for this process.
    pub fn watchdog_interval() -> Option<Duration> {
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }

    /// Pings the watchdog every [`watchdog_interval`] from a runtime task (so a wedged
    /// runtime stops the pings and systemd restarts the service), and sends `STOPPING=1`
    /// when `shutdown` fires.
    pub fn supervise(
        notifier: std::sync::Arc<Notifier>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let interval = watchdog_interval();
        tokio::spawn(async move {
            let mut tick = interval.map(tokio::time::interval);
            loop {
                let next = async {
                    match tick.as_mut() {
                        Some(t) => {
                            t.tick().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => {
                        notifier.send("STOPPING=1");
                        return;
                    }
                    () = next => notifier.send("WATCHDOG=1"),
                }
            }
        });
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn sends_datagrams_to_a_path_socket() {
            let dir = std::env::temp_dir().join(format!("sd-notify-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("notify.sock");
            let _ = std::fs::remove_file(&path);
            let listener = UnixDatagram::bind(&path).unwrap();
            let notifier = Notifier::open(path.as_os_str()).unwrap();
            notifier.send("READY=1");
            let mut buf = [0u8; 64];
            let n = listener.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"READY=1");
            let _ = std::fs::remove_dir_all(&dir);
        }

        #[cfg(target_os = "linux")]
        #[test]
        fn sends_datagrams_to_an_abstract_socket() {
            use std::os::linux::net::SocketAddrExt as _;
            let name = format!("uplink-sd-notify-test-{}", std::process::id());
            let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let listener = UnixDatagram::bind_addr(&addr).unwrap();
            let notifier = Notifier::open(std::ffi::OsStr::new(&format!("@{name}"))).unwrap();
            notifier.send("WATCHDOG=1");
            let mut buf = [0u8; 64];
            let n = listener.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.into())
    }

    #[test]
    fn log_format_is_json_under_systemd_unless_told_otherwise() {
        assert!(!json_logs(env(&[])));
        assert!(json_logs(env(&[("UPLINK_LOG_FORMAT", "json")])));
        assert!(json_logs(env(&[("JOURNAL_STREAM", "8:1234")])));
        assert!(json_logs(env(&[("INVOCATION_ID", "abc")])));
        assert!(!json_logs(env(&[
            ("INVOCATION_ID", "abc"),
            ("UPLINK_LOG_FORMAT", "text")
        ])));
    }

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
