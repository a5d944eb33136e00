//! Listening sockets that outlive one agent process.
//!
//! At an upgrade the running agent passes every listening socket it serves on (the API, the admin listener,
//! the mesh proxy's listeners, the NVMe/TCP listeners) to the process taking over. The new process puts them
//! here with [`inherit`] before anything binds; every owner then asks [`take`] for its address before binding
//! one, so the socket, its accept queue and the connections waiting in it carry over and no client sees a
//! refused connection. The other direction: each owner [`register`]s the sockets it serves on, and [`live`]
//! lists them for the hand-over.
//!
//! Sockets are keyed by their local address as the kernel reports it (`getsockname`), so a listener configured
//! with port 0 never matches an inherited one.
//!
//! A [`Keeper`] outside the process (systemd's file-descriptor store) can hold them too, so they outlive a plain
//! restart: it is told of every socket served and of every address no longer served, until [`keep_on_exit`]
//! says the process is stopping, from when the sockets it closes stay with the keeper for the next process.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use nix::sys::socket::{SockType, getsockopt, sockopt};

/// Sockets handed over by the previous process and not claimed yet.
static INHERITED: Mutex<Option<HashMap<SocketAddr, TcpListener>>> = Mutex::new(None);
/// Sockets this process serves on: a duplicate of each, by registration.
static LIVE: Mutex<BTreeMap<u64, (SocketAddr, OwnedFd)>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(1);
static KEEPER: OnceLock<Box<dyn Keeper>> = OnceLock::new();
/// False once the process stops: the sockets it closes then are not withdrawn from the keeper.
static WITHDRAWING: AtomicBool = AtomicBool::new(true);

/// Holds listening sockets across processes on the agent's behalf (systemd's file-descriptor store).
pub trait Keeper: Send + Sync + 'static {
    /// `fd` listens on `addr` and is served: keep a duplicate.
    fn keep(&self, addr: SocketAddr, fd: BorrowedFd<'_>);
    /// Nothing listens on `addr` any more: drop what is kept for it.
    fn withdraw(&self, addr: SocketAddr);
}

/// Tells `keeper` of every socket registered from now on (and of those registered before). Once per process.
pub fn set_keeper(keeper: Box<dyn Keeper>) {
    if KEEPER.set(keeper).is_err() {
        tracing::warn!("a keeper of listening sockets is set already");
        return;
    }
    if let Some(keeper) = KEEPER.get() {
        for (addr, fd) in lock(&LIVE).values() {
            keeper.keep(*addr, fd.as_fd());
        }
    }
}

/// The process is stopping: sockets closed from now on stay with the keeper, for the next process.
pub fn keep_on_exit() {
    WITHDRAWING.store(false, Ordering::Release);
}

fn withdraw(addr: SocketAddr) {
    if let Some(keeper) = KEEPER.get()
        && WITHDRAWING.load(Ordering::Acquire)
    {
        keeper.withdraw(addr);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why an inherited descriptor was not kept.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Not a socket, or the kernel would not say what it is.
    #[error("not a socket: {0}")]
    NotASocket(nix::Error),
    /// A socket, but not a listening TCP socket.
    #[error("not a listening TCP socket")]
    NotListening,
    /// The kernel would not say which address it is bound to.
    #[error("its address: {0}")]
    Address(io::Error),
    /// Two descriptors for one address.
    #[error("a second socket for {0}")]
    Duplicate(SocketAddr),
}

/// Keeps `sockets` for [`take`]: only listening TCP sockets, keyed by the address the kernel reports.
/// Returns the addresses kept, and what was refused and why (the refused descriptors are closed).
pub fn inherit(sockets: impl IntoIterator<Item = OwnedFd>) -> (Vec<SocketAddr>, Vec<Refused>) {
    let mut kept = Vec::new();
    let mut refused = Vec::new();
    let mut table = lock(&INHERITED);
    let table = table.get_or_insert_with(HashMap::new);
    for fd in sockets {
        let checked = getsockopt(&fd, sockopt::SockType)
            .and_then(|ty| Ok((ty, getsockopt(&fd, sockopt::AcceptConn)?)))
            .map_err(Refused::NotASocket);
        match checked {
            Ok((SockType::Stream, true)) => {}
            Ok(_) => {
                refused.push(Refused::NotListening);
                continue;
            }
            Err(e) => {
                refused.push(e);
                continue;
            }
        }
        let listener = TcpListener::from(fd);
        match listener.local_addr() {
            Ok(addr) if table.contains_key(&addr) => refused.push(Refused::Duplicate(addr)),
            Ok(addr) => {
                table.insert(addr, listener);
                kept.push(addr);
            }
            Err(e) => refused.push(Refused::Address(e)),
        }
    }
    (kept, refused)
}

/// The inherited listening socket bound to `addr`, if the previous process passed one (once). Without one,
/// inherited sockets that would keep `addr` from being bound (the same port on an overlapping address: the
/// configuration moved from 127.0.0.1:P to 0.0.0.0:P) are closed and withdrawn from the keeper; the keeper may
/// take a moment to close its copy, so a bind that follows retries briefly on EADDRINUSE.
pub fn take(addr: SocketAddr) -> Option<TcpListener> {
    if addr.port() == 0 {
        return None;
    }
    let mut table = lock(&INHERITED);
    let table = table.as_mut()?;
    if let Some(listener) = table.remove(&addr) {
        tracing::info!(%addr, "listening socket inherited from the previous agent process");
        return Some(listener);
    }
    let conflicting: Vec<SocketAddr> = table.keys().copied().filter(|old| overlaps(*old, addr)).collect();
    for old in conflicting {
        table.remove(&old);
        withdraw(old);
        tracing::info!(%old, new = %addr, "inherited listening socket closed: the configuration listens on another address");
    }
    None
}

/// Whether sockets bound to `a` and `b` cannot both listen: the same port, and one address covers the other.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Closes every inherited socket nobody claimed (the new configuration no longer listens there) and returns
/// their addresses.
pub fn close_unclaimed() -> Vec<SocketAddr> {
    let left = lock(&INHERITED).take().unwrap_or_default();
    let mut addrs: Vec<SocketAddr> = left.into_keys().collect();
    addrs.sort_unstable();
    for addr in &addrs {
        withdraw(*addr);
    }
    addrs
}

/// A socket listed by [`live`] while this is alive.
#[derive(Debug)]
pub struct Registration {
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = lock(&LIVE);
        let Some((addr, _)) = live.remove(&self.id) else { return };
        // Another registration of the address (a listener replaced by one on the same address) keeps it.
        if !live.values().any(|(a, _)| *a == addr) {
            drop(live);
            withdraw(addr);
        }
    }
}

/// Lists `listener` (a listening socket this process serves on) for the hand-over until the returned value is
/// dropped. Keeps a duplicate of the descriptor: drop the registration with the listener.
pub fn register(listener: &impl AsFd) -> io::Result<Registration> {
    let fd = listener.as_fd().try_clone_to_owned()?;
    let addr = TcpListener::from(fd.try_clone()?).local_addr()?;
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    if let Some(keeper) = KEEPER.get() {
        keeper.keep(addr, fd.as_fd());
    }
    lock(&LIVE).insert(id, (addr, fd));
    Ok(Registration { id })
}

/// Duplicates of every registered listening socket, with their addresses, for the process taking over.
pub fn live() -> io::Result<Vec<(SocketAddr, OwnedFd)>> {
    lock(&LIVE).values().map(|(addr, fd)| Ok((*addr, fd.try_clone()?))).collect()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::Arc;

    use super::*;

    // One test: the tables are process-wide.
    #[test]
    fn sockets_carry_over_with_their_queued_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let told = Arc::new(Mutex::new(Vec::new()));
        set_keeper(Box::new(Recorder(told.clone())));
        let registration = register(&listener).expect("register");
        assert!(live().expect("live").iter().any(|(a, _)| *a == addr));
        let second = register(&listener).expect("the same socket again");
        drop(second);
        assert_eq!(*lock(told.as_ref()), [format!("keep {addr}"), format!("keep {addr}")], "still registered once");
        // A client connects before the hand-over; the connection waits in the accept queue.
        let mut client = TcpStream::connect(addr).expect("connect");
        client.write_all(b"ping").expect("write");

        let handed: Vec<OwnedFd> =
            live().expect("live").into_iter().filter(|(a, _)| *a == addr).map(|(_, fd)| fd).collect();
        let stream = TcpStream::connect(addr).expect("a second client");
        let not_listening = OwnedFd::from(stream);
        let (kept, refused) = inherit(handed.into_iter().chain([not_listening]));
        assert_eq!(kept, vec![addr]);
        assert!(matches!(refused.as_slice(), [Refused::NotListening]), "{refused:?}");
        drop(registration);
        drop(listener);
        assert!(live().expect("live").iter().all(|(a, _)| *a != addr), "unregistered with the listener");
        assert_eq!(lock(told.as_ref()).last(), Some(&format!("withdraw {addr}")));

        assert!(take(SocketAddr::from(([127, 0, 0, 1], 0))).is_none());
        let taken = take(addr).expect("inherited");
        assert!(take(addr).is_none(), "claimed once");
        let (mut server, _) = taken.accept().expect("the queued connection is still there");
        let mut buf = [0; 4];
        server.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ping");
        assert!(close_unclaimed().is_empty());

        // Stopping: a socket closed now stays with the keeper.
        keep_on_exit();
        let other = TcpListener::bind("127.0.0.1:0").expect("bind");
        let other_addr = other.local_addr().expect("addr");
        drop(register(&other).expect("register"));
        assert_eq!(lock(told.as_ref()).last(), Some(&format!("keep {other_addr}")), "kept, not withdrawn");
    }

    #[test]
    fn addresses_that_cannot_both_listen() {
        let at = |s: &str| s.parse::<SocketAddr>().expect("address");
        assert!(overlaps(at("127.0.0.1:50051"), at("0.0.0.0:50051")));
        assert!(overlaps(at("[::]:50051"), at("10.0.0.1:50051")));
        assert!(!overlaps(at("127.0.0.1:50051"), at("10.0.0.1:50051")));
        assert!(!overlaps(at("0.0.0.0:50051"), at("0.0.0.0:50052")));
    }

    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Keeper for Recorder {
        fn keep(&self, addr: SocketAddr, _fd: BorrowedFd<'_>) {
            lock(&self.0).push(format!("keep {addr}"));
        }

        fn withdraw(&self, addr: SocketAddr) {
            lock(&self.0).push(format!("withdraw {addr}"));
        }
    }
}
