//! The systemd service protocol (`sd_notify`): readiness, reloads, the watchdog, the main process id after a
//! hand-over, and the file-descriptor store that keeps the listening sockets across a restart (`sd_listen_fds`
//! gives them back). Without `$NOTIFY_SOCKET` (not started by systemd with `Type=notify`) every call does
//! nothing.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{self, ControlMessage, MsgFlags, UnixAddr};

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service manager. Returns whether it was
/// sent; a failure is logged and otherwise ignored, as a notification is advisory.
pub fn notify(state: &str) -> bool {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => notify_to(&socket, state),
        None => false,
    }
}

fn notify_to(socket: &std::ffi::OsStr, state: &str) -> bool {
    notify_with_fd(socket, state, None)
}

/// Sends `state`, with `fd` attached (SCM_RIGHTS) when given.
fn notify_with_fd(socket: &std::ffi::OsStr, state: &str, fd: Option<BorrowedFd<'_>>) -> bool {
    let sent = (|| -> io::Result<()> {
        let addr = match socket.as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => UnixAddr::new_abstract(name)?,
            None => UnixAddr::new(socket)?,
        };
        let sender = UnixDatagram::unbound()?;
        let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsgs = if fds.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(&fds)] };
        let iov = [IoSlice::new(state.as_bytes())];
        socket::sendmsg(sender.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, Some(&addr))?;
        Ok(())
    })();
    match sent {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, state, "notifying the service manager failed");
            false
        }
    }
}

/// The sockets the service manager passed this process (`LISTEN_PID`/`LISTEN_FDS`, from descriptor 3 on): the
/// listening sockets its file-descriptor store kept across a restart. Call once, first thing in `main`, before
/// anything opens a descriptor.
pub fn listen_fds() -> Vec<OwnedFd> {
    let pid = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<RawFd>().ok()).unwrap_or(0);
    if pid != Some(std::process::id()) || count <= 0 {
        return Vec::new();
    }
    const FIRST: RawFd = 3;
    (FIRST..FIRST + count)
        .filter_map(|raw| {
            // SAFETY: the service manager opened descriptors 3..3+LISTEN_FDS for this process (LISTEN_PID is
            // ours) and nothing in it has taken them: this runs before anything opens a descriptor, once.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // Not for the processes this one starts (a successor gets them through the hand-over).
            match fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
                Ok(_) => Some(fd),
                Err(e) => {
                    tracing::warn!(fd = raw, error = %e, "a descriptor from the service manager is not usable");
                    None
                }
            }
        })
        .collect()
}

/// systemd's file-descriptor store as the keeper of the agent's listening sockets (`FileDescriptorStoreMax=` in
/// the unit): a restart finds them open, with the connections that came meanwhile waiting in their queues.
#[derive(Debug)]
pub struct FdStore {
    socket: std::ffi::OsString,
}

impl FdStore {
    /// The store of the service manager that started this process, if one did.
    pub fn from_env() -> Option<Self> {
        std::env::var_os("NOTIFY_SOCKET").map(|socket| Self { socket })
    }

    /// The name a socket is stored under (`FDNAME=`, where `:` is not allowed).
    fn name(addr: std::net::SocketAddr) -> String {
        format!("listen-{addr}").replace(':', "_")
    }
}

impl dpu_intent::listen::Keeper for FdStore {
    fn keep(&self, addr: std::net::SocketAddr, fd: BorrowedFd<'_>) {
        notify_with_fd(&self.socket, &format!("FDSTORE=1\nFDNAME={}", Self::name(addr)), Some(fd));
    }

    fn withdraw(&self, addr: std::net::SocketAddr) {
        notify_to(&self.socket, &format!("FDSTOREREMOVE=1\nFDNAME={}", Self::name(addr)));
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
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::net::SocketAddr;

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
    fn sockets_go_to_the_store_with_their_descriptor_and_names_without_colons() {
        use dpu_intent::listen::Keeper as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        let store = FdStore { socket: path.clone().into_os_string() };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("addr");
        store.keep(addr, std::os::fd::AsFd::as_fd(&listener));
        let mut buf = [0u8; 128];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(receiver.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
            .expect("recvmsg");
        let fds: Vec<RawFd> = msg
            .cmsgs()
            .expect("cmsgs")
            .filter_map(|c| match c {
                socket::ControlMessageOwned::ScmRights(fds) => Some(fds),
                _ => None,
            })
            .flatten()
            .collect();
        let n = msg.bytes;
        assert_eq!(fds.len(), 1, "the socket itself travels");
        // SAFETY: the descriptor was just received and belongs to this test alone.
        let received = std::net::TcpListener::from(unsafe { OwnedFd::from_raw_fd(fds[0]) });
        assert_eq!(received.local_addr().expect("addr"), addr);
        let name = format!("listen-127.0.0.1_{}", addr.port());
        assert_eq!(std::str::from_utf8(&buf[..n]).expect("utf-8"), format!("FDSTORE=1\nFDNAME={name}"));
        store.withdraw(addr);
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(std::str::from_utf8(&buf[..n]).expect("utf-8"), format!("FDSTOREREMOVE=1\nFDNAME={name}"));
        assert!(listen_fds().is_empty(), "not started by a service manager");
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
