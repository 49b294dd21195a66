//! systemd's service notifications for `Type=notify` units: `READY=1` once the daemon
//! serves, `STOPPING=1` when it starts draining, `WATCHDOG=1` while its actor system
//! runs (when the unit sets `WatchdogSec`). Sent as datagrams to the socket that
//! `NOTIFY_SOCKET` names; outside systemd there is none and nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The notification socket, when systemd gave one.
pub struct SystemdNotifier {
    socket: UnixDatagram,
    target: std::os::unix::net::SocketAddr,
}

impl SystemdNotifier {
    /// Reads `NOTIFY_SOCKET` and removes it from the environment, so that the processes
    /// the daemon starts (the embedded PostgreSQL speaks this protocol too) cannot tell
    /// systemd that the service is ready before it is.
    pub fn from_env() -> Option<SystemdNotifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        // Edition 2021: safe to call; done at start, before threads or children exist.
        std::env::remove_var("NOTIFY_SOCKET");
        let target = match path.as_encoded_bytes() {
            [b'@', name @ ..] => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
            }
            _ => std::os::unix::net::SocketAddr::from_pathname(&path),
        };
        let socket = UnixDatagram::unbound();
        match (socket, target) {
            (Ok(socket), Ok(target)) => Some(SystemdNotifier { socket, target }),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, socket = ?path, "cannot use NOTIFY_SOCKET; systemd will not hear from this daemon");
                None
            }
        }
    }

    /// Sends `state` (`KEY=value` lines); a failure is logged, never fatal.
    pub fn notify(&self, state: &str) {
        if let Err(error) = self.socket.send_to_addr(state.as_bytes(), &self.target) {
            tracing::warn!(%error, state, "cannot notify systemd");
        }
    }

    /// Half the watchdog interval systemd asked for (`WATCHDOG_USEC`, for this process
    /// when `WATCHDOG_PID` names one), as sd_watchdog_enabled advises.
    pub fn watchdog_interval() -> Option<Duration> {
        if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|u| *u > 0)?;
        Some(Duration::from_micros(usec / 2))
    }
}
