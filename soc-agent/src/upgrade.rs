//! Replacing the running agent without dropping service: the hand-over of listening sockets and of the intent
//! store from one agent process to the next.
//!
//! The running agent listens on `<data_dir>/handover.sock` (a `SOCK_SEQPACKET` unix socket, mode 0600, peers of
//! another user refused). A new process started with `--takeover` (by the running agent itself on SIGHUP, which
//! `systemctl reload` sends, or by hand) connects there:
//!
//! ```text
//! new → old  hello {pid, version}
//! old → new  sockets {count} + SCM_RIGHTS     every listening socket it serves on (API, admin, mesh listeners,
//!                                             NVMe/TCP listeners), in batches; both processes now accept on them
//! old → new  released {revision}              the old process gave the intent store up (its writes now fail
//!                                             with UNAVAILABLE: retry); the new one opens it and reconciles
//! new → old  ready                            the new process serves: every reconciler made its first pass
//!                                             (proxy listeners bound, volumes open, subsystems published)
//! old        stops accepting, drains its proxy connections, closes its NVMe/TCP connections once their running
//!            commands completed (hosts reconnect to the new process), tells systemd MAINPID=new, exits
//! ```
//!
//! If the new process goes away before `ready`, or is not ready in [`READY_TIMEOUT`] (it is then told
//! `failed` and exits), the old one takes the store back and serves on.
//!
//! Why SCM_RIGHTS between the two processes rather than systemd's file-descriptor store: the store only passes
//! sockets to a process systemd starts after the old one stopped, so every connection arriving during the old
//! process's drain would wait for it; here both processes accept during the overlap, the new one serves before
//! the old one stops, and the same path works without systemd (a container, a shell).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dpu_intent::Store;
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, sockopt,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The socket's name in the data directory.
pub const SOCKET_NAME: &str = "handover.sock";
/// How long the old process waits for the new one to serve.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long each side waits for the other's next message during the exchange itself.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors per message (the kernel takes at most 253).
const FDS_PER_MESSAGE: usize = 128;
const MAX_MESSAGE: usize = 64 * 1024;

/// The hand-over socket of the agent using `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Message {
    Hello { pid: u32, version: String },
    Sockets { count: usize },
    Released { revision: u64 },
    Ready,
    Failed { reason: String },
}

/// One end of a hand-over connection (blocking I/O).
#[derive(Debug)]
struct Peer {
    fd: OwnedFd,
}

impl Peer {
    fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsgs = if raw.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(&raw)] };
        socket::sendmsg::<()>(self.fd.as_raw_fd(), &[IoSlice::new(&bytes)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
        Ok(())
    }

    /// The next message and the descriptors it carried; `None` when the other side closed.
    fn recv(&self, timeout: Option<Duration>) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "no answer in time");
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = loop {
            // A zero timeval means no timeout: what is left of the deadline, at least a microsecond.
            let tv = match deadline {
                None => TimeVal::new(0, 0),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(timed_out());
                    }
                    let left = left.max(Duration::from_micros(1));
                    TimeVal::new(i64::try_from(left.as_secs()).unwrap_or(i64::MAX), i64::from(left.subsec_micros()))
                }
            };
            socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)?;
            match socket::recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => break msg,
                // With a receive timeout set, a signal handled meanwhile (the runtime's SIGCHLD, SIGHUP, ...)
                // interrupts recvmsg even under SA_RESTART (signal(7)): wait on for the rest of the time.
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return Err(timed_out()),
                Err(e) => return Err(io::Error::from(e)),
            }
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                for fd in received {
                    // SAFETY: the kernel installed `fd` in this process for this message (SCM_RIGHTS); nothing
                    // else refers to it, so ownership is taken exactly once here.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if msg.flags.intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a hand-over message was truncated"));
        }
        let len = msg.bytes;
        if len == 0 {
            return Ok(None);
        }
        let message = serde_json::from_slice(&buf[..len]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Some((message, fds)))
    }

    fn expect(&self, timeout: Option<Duration>, what: &str) -> io::Result<(Message, Vec<OwnedFd>)> {
        self.recv(timeout)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, format!("closed before {what}")))
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?)
}

/// The running agent's end: accepts processes that want to take over.
#[derive(Debug)]
pub struct Server {
    requests: mpsc::Receiver<Request>,
}

/// A process asking to take over.
#[derive(Debug)]
pub struct Request {
    peer: Peer,
    /// Its process id.
    pub pid: u32,
    /// Its version and revision.
    pub version: String,
}

impl Server {
    /// Listens on `path` (replacing a stale socket file there) from a thread of its own.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        socket::bind(fd.as_raw_fd(), &addr)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        socket::listen(&fd, Backlog::new(4)?)?;
        let (tx, requests) = mpsc::channel(1);
        std::thread::Builder::new().name("dpu-handover".into()).spawn(move || accept_loop(&fd, &tx))?;
        Ok(Self { requests })
    }

    /// The next process asking to take over.
    pub async fn next(&mut self) -> Option<Request> {
        self.requests.recv().await
    }
}

fn accept_loop(listener: &OwnedFd, requests: &mpsc::Sender<Request>) {
    loop {
        let fd = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(nix::Error::EINTR | nix::Error::ECONNABORTED) => continue,
            Err(e) => {
                tracing::error!(error = %e, "the hand-over socket failed: no upgrade without disruption from now on");
                return;
            }
        };
        let peer = Peer { fd };
        let request =
            socket::getsockopt(&peer.fd, sockopt::PeerCredentials).map_err(io::Error::from).and_then(|cred| {
                let uid = nix::unistd::geteuid().as_raw();
                if cred.uid() != uid && cred.uid() != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("user {} is not the agent's user {uid}", cred.uid()),
                    ));
                }
                match peer.expect(Some(STEP_TIMEOUT), "hello")? {
                    (Message::Hello { pid, version }, _) => Ok((pid, version)),
                    (other, _) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{other:?} before hello"))),
                }
            });
        match request {
            Ok((pid, version)) => {
                if requests.blocking_send(Request { peer, pid, version }).is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "hand-over request refused"),
        }
    }
}

impl Request {
    /// Hands this process's listening sockets and `store` over and waits for the new process to serve. On
    /// failure the store is taken back (waiting up to 30 s for the other process to let it go) and the reason
    /// returned.
    pub async fn hand_over(self, store: Store) -> Result<u32, String> {
        let pid = self.pid;
        tokio::task::spawn_blocking(move || {
            let result = exchange(&self.peer, &store);
            if let Err(e) = &result {
                let _ = self.peer.send(&Message::Failed { reason: e.clone() }, &[]);
                drop(self.peer);
                if store.is_released() {
                    reacquire(&store);
                }
            }
            result.map(|()| pid)
        })
        .await
        .map_err(|e| format!("the hand-over task failed: {e}"))?
    }
}

fn exchange(peer: &Peer, store: &Store) -> Result<(), String> {
    let sockets = dpu_intent::listen::live().map_err(|e| format!("listing the listening sockets: {e}"))?;
    let fail = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    for batch in sockets.chunks(FDS_PER_MESSAGE) {
        let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, fd)| fd.as_fd()).collect();
        peer.send(&Message::Sockets { count: fds.len() }, &fds).map_err(fail("sending the sockets"))?;
    }
    store.release();
    peer.send(&Message::Released { revision: store.revision() }, &[]).map_err(fail("releasing the store"))?;
    match peer.recv(Some(READY_TIMEOUT)) {
        Ok(Some((Message::Ready, _))) => Ok(()),
        Ok(Some((other, _))) => Err(format!("the new process answered {other:?}")),
        Ok(None) => Err("the new process went away before it served".into()),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            Err(format!("the new process did not serve within {} s", READY_TIMEOUT.as_secs()))
        }
        Err(e) => Err(format!("waiting for the new process: {e}")),
    }
}

fn reacquire(store: &Store) {
    let started = std::time::Instant::now();
    loop {
        match store.reacquire() {
            Ok(()) => return,
            Err(dpu_intent::Error::Locked { .. }) if started.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                // Serving on with a store this process cannot write would hide the failure: stop, and let the
                // supervisor start a fresh process.
                tracing::error!(error = %e, "cannot take the intent store back after a failed hand-over; exiting");
                std::process::exit(1);
            }
        }
    }
}

/// The new process's end, between taking the sockets and serving.
#[derive(Debug)]
pub struct Predecessor {
    peer: Arc<Peer>,
    /// The old process.
    pub pid: u32,
    /// Addresses of the sockets it handed over.
    pub sockets: Vec<std::net::SocketAddr>,
}

/// Asks the agent listening on `path` to hand over; `Ok(None)` when no agent listens there. The sockets go to
/// [`dpu_intent::listen`]; returns once the old process released the intent store.
pub fn take_over(path: &Path) -> Result<Option<Predecessor>, String> {
    let fd = seqpacket().map_err(|e| e.to_string())?;
    let addr = UnixAddr::new(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => return Ok(None),
        Err(e) => return Err(format!("connecting to {}: {e}", path.display())),
    }
    let peer = Peer { fd };
    let cred = socket::getsockopt(&peer.fd, sockopt::PeerCredentials).map_err(|e| e.to_string())?;
    let pid = u32::try_from(cred.pid()).unwrap_or_default();
    let version = format!("{} ({})", crate::VERSION, crate::GIT_REVISION);
    peer.send(&Message::Hello { pid: std::process::id(), version }, &[]).map_err(|e| format!("hello: {e}"))?;
    let mut fds = Vec::new();
    loop {
        match peer.expect(Some(STEP_TIMEOUT), "releasing the store").map_err(|e| e.to_string())? {
            (Message::Sockets { count }, received) if received.len() == count => fds.extend(received),
            (Message::Sockets { count }, received) => {
                return Err(format!("{count} sockets announced, {} received", received.len()));
            }
            (Message::Released { .. }, _) => break,
            (Message::Failed { reason }, _) => return Err(format!("the running agent refused: {reason}")),
            (other, _) => return Err(format!("unexpected {other:?}")),
        }
    }
    let (sockets, refused) = dpu_intent::listen::inherit(fds);
    for r in refused {
        tracing::warn!(reason = %r, "inherited descriptor dropped");
    }
    let peer = Arc::new(peer);
    // Until this process serves, the old one may give up on it: then this one must not go on.
    let watcher = peer.clone();
    std::thread::Builder::new()
        .name("dpu-handover".into())
        .spawn(move || {
            if let Ok(Some((Message::Failed { reason }, _))) = watcher.recv(None) {
                tracing::error!(%reason, "the previous agent process took the hand-over back; exiting");
                std::process::exit(1);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Some(Predecessor { peer, pid, sockets }))
}

impl Predecessor {
    /// Tells the old process that this one serves: it stops accepting, drains and exits.
    pub fn ready(&self) -> io::Result<()> {
        self.peer.send(&Message::Ready, &[])
    }
}

impl Drop for Predecessor {
    /// Ends the conversation (before `ready`: the old process takes its store back and serves on).
    fn drop(&mut self) {
        let _ = socket::shutdown(self.peer.fd.as_raw_fd(), socket::Shutdown::Both);
    }
}

/// Starts `exe` (the agent binary now installed where this process was started from) with this process's
/// arguments and `--takeover`; logs the child's exit if it ends while this process still runs.
pub fn spawn_successor(exe: &Path, args: &[std::ffi::OsString]) -> io::Result<u32> {
    let mut child = std::process::Command::new(exe)
        .args(args)
        .env("DPU_AGENT_TAKEOVER", "1")
        // The watchdog belongs to whichever process is the service's main one; systemd accepts the new process's
        // keep-alives (NotifyAccess=all).
        .env_remove("WATCHDOG_PID")
        // The service manager's sockets were this process's; the new one receives them in the hand-over.
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .spawn()?;
    let pid = child.id();
    std::thread::Builder::new().name("dpu-successor".into()).spawn(move || match child.wait() {
        Ok(status) => tracing::warn!(pid, %status, "the new agent process exited"),
        Err(e) => tracing::warn!(pid, error = %e, "waiting for the new agent process"),
    })?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sockets_and_store_pass_to_the_new_process_and_come_back_when_it_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path().join("data")).expect("store");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _registration = dpu_intent::listen::register(&listener).expect("register");
        let path = socket_path(dir.path());
        let mut server = Server::bind(&path).expect("server");
        let mode = std::fs::metadata(&path).expect("socket file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(take_over(&dir.path().join("nobody.sock")).expect("no agent").is_none());

        // A taker that goes away before it serves: the store comes back.
        let taker = {
            let path = path.clone();
            std::thread::spawn(move || take_over(&path))
        };
        let request = server.next().await.expect("request");
        let result = tokio::spawn(request.hand_over(store.clone()));
        let predecessor = taker.join().expect("thread").expect("taken").expect("an agent answered");
        assert_eq!(predecessor.pid, std::process::id());
        assert!(predecessor.sockets.contains(&addr), "{:?}", predecessor.sockets);
        assert!(store.is_released());
        assert!(matches!(store.create("x", Probe { n: 1 }), Err(dpu_intent::Error::Released { .. })));
        assert!(dpu_intent::listen::take(addr).is_some(), "the socket was inherited");
        drop(predecessor);
        let err = result.await.expect("join").expect_err("failed");
        assert!(err.contains("went away"), "{err}");
        assert!(!store.is_released(), "taken back");
        store.create("x", Probe { n: 1 }).expect("writes again");
    }

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Probe {
        n: u32,
    }
    impl dpu_intent::Resource for Probe {
        const KIND: &'static str = "probes";
    }
}
