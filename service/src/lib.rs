//! Pieces every Uplink service shares at start-up.
//!
//! # Layout
//! - [`config`]: the layered TOML + environment configuration, [`config::Secret`], and
//!   problems reported as `file:line:column: field: message`.
//! - [`sd_notify`]: systemd's service notification protocol (READY, WATCHDOG, STOPPING).
//! - [`json_logs`]: whether logs are JSON or text.
//! - [`failpoint`]: named crash points for the fault tests (cargo feature `failpoints`).
//! - [`otel`]: optional OpenTelemetry trace export and trace-context propagation.
//! - [`tls`]: rustls client/server configurations from PEM files; handshake errors
//!   explained.
//! - [`open_files`]: the open-files limit, raised to its hard limit at start.

pub mod config;
pub mod failpoint;
pub mod otel;
pub mod tls;

/// The open-files limit (`RLIMIT_NOFILE`). A service that holds a socket per device needs
/// more than the usual soft limit of 1024; the hard limit (systemd's default is 524288)
/// is what the administrator allows, so a service raises its soft limit to it at start.
pub mod open_files {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

    /// Raises the soft limit to the hard one; returns the soft limit now in force
    /// (`None`: unlimited).
    pub fn raise() -> Option<u64> {
        let limit = getrlimit(Resource::Nofile);
        if limit.current != limit.maximum {
            let raised = Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                tracing::warn!(error = %e, "Could not raise the open-files limit");
                return limit.current;
            }
        }
        getrlimit(Resource::Nofile).current
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn raise_reaches_the_hard_limit() {
            let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
            assert_eq!(super::raise(), hard);
        }
    }
}

/// systemd's service notification protocol (`sd_notify(3)`) without libsystemd: one datagram
/// per message to the socket `NOTIFY_SOCKET` names. Every call is a no-op when the process
/// was not started by systemd with `Type=notify`.
pub mod sd_notify {
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
                Some((b'/', _)) => SocketAddr::from_pathname(std::path::Path::new(path))?,
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("NOTIFY_SOCKET {path:?} is neither an absolute path nor @name"),
                    ))
                }
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
        watchdog_interval_of(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    /// Half of `usec` (`WATCHDOG_USEC`) when it is positive and `pid` (`WATCHDOG_PID`) is
    /// absent or `own_pid`.
    pub fn watchdog_interval_of(
        usec: Option<&str>,
        pid: Option<&str>,
        own_pid: u32,
    ) -> Option<Duration> {
        if let Some(pid) = pid {
            if pid.trim().parse::<u32>().ok() != Some(own_pid) {
                return None;
            }
        }
        let usec: u64 = usec?.trim().parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }

    /// Says `READY=1` and then [`supervise`]s; `service` names it in the log ("Told systemd
    /// the agent is ready"). A no-op outside systemd.
    pub fn ready(service: &str, shutdown: &tokio_util::sync::CancellationToken) {
        if let Some(notifier) = Notifier::from_env() {
            notifier.send("READY=1");
            tracing::info!("Told systemd the {service} is ready");
            supervise(std::sync::Arc::new(notifier), shutdown.clone());
        }
    }

    /// Pings the watchdog every [`watchdog_interval`] from a runtime task (so a wedged
    /// runtime stops the pings and systemd restarts the service), and sends `STOPPING=1`
    /// when `shutdown` fires.
    pub fn supervise(
        notifier: std::sync::Arc<Notifier>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let interval = watchdog_interval();
        if let Some(every) = interval {
            tracing::info!(
                every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
                "Pinging the systemd watchdog"
            );
        }
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

        #[test]
        fn rejects_relative_socket_names() {
            assert!(Notifier::open(std::ffi::OsStr::new("relative/notify.sock")).is_err());
            assert!(Notifier::open(std::ffi::OsStr::new("")).is_err());
        }

        #[test]
        fn watchdog_interval_is_half_and_for_us_only() {
            let half = Some(Duration::from_secs(15));
            assert_eq!(watchdog_interval_of(Some("30000000"), None, 7), half);
            assert_eq!(watchdog_interval_of(Some("30000000"), Some("7"), 7), half);
            assert_eq!(watchdog_interval_of(Some("30000000"), Some("8"), 7), None);
            assert_eq!(watchdog_interval_of(None, None, 7), None);
            assert_eq!(watchdog_interval_of(Some("0"), None, 7), None);
            assert_eq!(watchdog_interval_of(Some("x"), None, 7), None);
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

/// JSON logs when `UPLINK_LOG_FORMAT=json`, or under systemd (`JOURNAL_STREAM` or
/// `INVOCATION_ID` set) unless `UPLINK_LOG_FORMAT` says otherwise; text otherwise.
pub fn json_logs(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    match env("UPLINK_LOG_FORMAT") {
        Some(format) => format == "json",
        None => env("JOURNAL_STREAM").is_some() || env("INVOCATION_ID").is_some(),
    }
}

/// A layer over the plain registry, for [`init_logs`]' extra layers.
pub type BoxedLayer =
    Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static>;

/// Installs the global subscriber: logs on stderr (text or JSON, see [`json_logs`]) filtered
/// by `RUST_LOG` (else `default_filter`), spans to an OpenTelemetry collector when the
/// environment asks for it (see [`otel`]), and `extra` layers. Keep the returned guard until
/// exit: dropping it flushes the spans still batched.
pub fn init_logs(
    service: &'static str,
    default_filter: &str,
    extra: Vec<BoxedLayer>,
) -> Result<Option<otel::Guard>, String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter))
    };
    let fmt = if json_logs(|name| std::env::var_os(name)) {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let mut layers: Vec<BoxedLayer> = vec![fmt.with_filter(filter()).boxed()];
    let guard = match otel::layer(service)? {
        Some((layer, guard)) => {
            layers.push(layer.with_filter(filter()).boxed());
            Some(guard)
        }
        None => None,
    };
    layers.extend(extra);
    tracing_subscriber::registry().with(layers).init();
    Ok(guard)
}

/// An error and its causes on one line, `: `-separated (reqwest's and hyper's own messages
/// hide the reason in their sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::json_logs;

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
}
