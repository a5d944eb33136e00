//! The systemd service protocol (`sd_notify`): readiness, reloads, the watchdog and the main process id after a
//! hand-over. Without `$NOTIFY_SOCKET` (not started by systemd with `Type=notify`) every call does nothing.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service manager. Returns whether it was
/// sent; a failure is logged and otherwise ignored, as a notification is advisory.
pub fn notify(state: &str) -> bool {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => notify_to(&socket, state),
        None => false,
    }
}

fn notify_to(socket: &std::ffi::OsStr, state: &str) -> bool {
    let sent = (|| {
        let addr = match socket.as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(socket)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)
    })();
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, state, "notifying the service manager failed");
            false
        }
    }
}

/// The keep-alive interval the service manager asked for (`WatchdogSec=`): half its timeout, as systemd
/// recommends. `None` without a watchdog, or when `WATCHDOG_PID` names another process.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog(std::env::var("WATCHDOG_USEC").ok().as_deref(), std::env::var("WATCHDOG_PID").ok().as_deref())
}

fn watchdog(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok()?;
    if pid.is_some_and(|pid| pid.parse::<u32>().ok() != Some(std::process::id())) {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog from the runtime every `interval`: a wedged runtime stops the pings, and systemd restarts
/// the agent.
pub fn spawn_watchdog(interval: Duration) -> tokio::task::JoinHandle<()> {
    tracing::info!(interval_ms = interval.as_millis() as u64, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    })
}

/// `MONOTONIC_USEC=` for a `RELOADING=1` notification (`Type=notify-reload` requires it).
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        assert!(notify_to(path.as_os_str(), "READY=1\nSTATUS=serving"));
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        assert!(!notify_to(dir.path().join("absent").as_os_str(), "READY=1"), "no listener: not sent");
        let name = format!("@dpu-agent-test-{}", std::process::id());
        let abstract_receiver =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name.as_bytes()[1..]).expect("name"))
                .expect("bind abstract");
        assert!(notify_to(std::ffi::OsStr::new(&name), "WATCHDOG=1"));
        let n = abstract_receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_of_this_process() {
        let me = std::process::id().to_string();
        assert_eq!(watchdog(Some("30000000"), Some(&me)), Some(Duration::from_secs(15)));
        assert_eq!(watchdog(Some("30000000"), None), Some(Duration::from_secs(15)));
        assert_eq!(watchdog(Some("30000000"), Some("1")), None, "another process's watchdog");
        assert_eq!(watchdog(None, None), None);
        assert_eq!(watchdog(Some("0"), None), None);
        assert!(monotonic_usec() > 0);
    }
}
