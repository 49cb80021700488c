//! systemd service notifications (`sd_notify`): `READY=1`, `WATCHDOG=1`, `STOPPING=1` sent as
//! one datagram to `$NOTIFY_SOCKET` (a path, or an abstract socket when it starts with `@`).
//! Without `NOTIFY_SOCKET` every call is a no-op.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub const READY: &str = "READY=1";
pub const WATCHDOG: &str = "WATCHDOG=1";
pub const STOPPING: &str = "STOPPING=1";

/// The address `NOTIFY_SOCKET` names.
pub fn socket_addr(value: &str) -> io::Result<SocketAddr> {
    if let Some(name) = value.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if value.starts_with('/') {
        SocketAddr::from_pathname(value)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET {value:?} is neither a path nor an abstract name"),
        ))
    }
}

/// Sends `state` to the socket named by `socket` (the value of `NOTIFY_SOCKET`).
pub fn send_to(socket: &str, state: &str) -> io::Result<()> {
    let addr = socket_addr(socket)?;
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// Sends `state` when running under systemd with `Type=notify`. Returns whether it was sent.
pub fn notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let socket = socket.to_string_lossy();
    match send_to(&socket, state) {
        Ok(()) => {
            debug!(state, "Told systemd");
            true
        }
        Err(e) => {
            debug!(state, error = %e, "Cannot notify systemd");
            false
        }
    }
}

/// The watchdog ping interval: half of `WATCHDOG_USEC`, when it is set for this process
/// (`WATCHDOG_PID` absent or ours).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// Sends `READY=1` and, when systemd asks for a watchdog, pings it until `shutdown`.
pub fn ready(shutdown: &CancellationToken) {
    if !notify(READY) {
        return;
    }
    info!("Told systemd the agent is ready");
    let interval = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    );
    if let Some(every) = interval {
        info!(
            every_ms = every.as_millis() as u64,
            "Pinging the systemd watchdog"
        );
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => { notify(WATCHDOG); }
                }
            }
        });
    }
}

/// Sends `STOPPING=1`.
pub fn stopping() {
    notify(STOPPING);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), READY).unwrap();
        send_to(path.to_str().unwrap(), WATCHDOG).unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("uplink-agent-test-{}", uuid::Uuid::new_v4().simple());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), STOPPING).unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn rejects_relative_socket_names() {
        assert!(socket_addr("relative/notify.sock").is_err());
        assert!(send_to("/nonexistent/dir/notify.sock", READY).is_err());
    }

    #[test]
    fn watchdog_interval_is_half_and_for_us_only() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
    }
}
