//! Idle polling: after the proxy last moved bytes, the runtime's workers keep polling for I/O for a bounded
//! time instead of going to sleep.
//!
//! A worker that finds nothing to do parks in `epoll_wait`, and the next readiness event has to wake it: a
//! context switch in, and on a virtual or power-managed core an exit from the idle state first. At moderate
//! rates that wake-up is most of the latency a proxy adds, twice per request (the request arrives; the
//! upstream answers). Poll-mode data paths on DPUs (DPDK, SPDK) avoid it by never sleeping; this is the bounded
//! form of that, as in Seastar's idle poll time: one poller task per worker yields in a loop while the data path
//! has moved bytes within the window. Each yield makes tokio poll its I/O driver with a zero timeout, so ready
//! sockets are served by a worker that is already running. Once the window passes without traffic the pollers
//! sleep and the workers park as usual, so an idle agent costs nothing.
//!
//! The price is CPU: while traffic keeps arriving within the window, every worker runs all the time. It suits
//! cores dedicated to the agent; it is off unless configured (`mesh.idle_poll_us`).
//!
//! All workers poll together, or none: tokio lets one parked worker own the I/O driver, and while it sleeps in
//! `epoll_wait` the others cannot poll it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

/// Set by the data path when it moves bytes; taken by a poller, which stamps [`LAST_MOVED_NS`].
static MOVED: AtomicBool = AtomicBool::new(false);
/// When a poller last saw [`MOVED`], in nanoseconds since [`epoch`]; 0 before any traffic.
static LAST_MOVED_NS: AtomicU64 = AtomicU64::new(0);
/// Pollers asleep, waiting for traffic.
static SLEEPERS: AtomicUsize = AtomicUsize::new(0);
static WAKE: Notify = Notify::const_new();
static STARTED: AtomicBool = AtomicBool::new(false);

/// How often a poller that never sleeps adds its awake time to the counter.
const ACCOUNT_EVERY: Duration = Duration::from_secs(1);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The data path moved bytes on some worker. One relaxed load while pollers are already awake (or idle polling
/// is off); wakes sleeping pollers on the first traffic after a quiet spell.
#[inline]
pub fn moved() {
    if !MOVED.load(Ordering::Relaxed) {
        mark_moved();
    }
}

#[cold]
fn mark_moved() {
    // Pairs with the poller's increment of SLEEPERS and load of MOVED: either it sees this store and stays
    // awake, or this sees it asleep and wakes it.
    MOVED.store(true, Ordering::SeqCst);
    if SLEEPERS.load(Ordering::SeqCst) > 0 {
        WAKE.notify_waiters();
    }
}

/// Why idle polling did not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartError {
    #[error("idle polling is already running in this process")]
    AlreadyStarted,
    #[error("idle polling needs a multi-thread tokio runtime (it polls on every worker)")]
    NotMultiThread,
}

/// Starts one poller per worker of the current multi-thread runtime, each keeping its worker polling until
/// `window` has passed since the data path last moved bytes. `awake` counts the seconds workers spent in that
/// mode (polling, and serving what polling found), summed over workers. Once per process.
pub fn start(window: Duration, awake: Counter<f64>) -> Result<usize, StartError> {
    let handle = tokio::runtime::Handle::current();
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Err(StartError::NotMultiThread);
    }
    if STARTED.swap(true, Ordering::SeqCst) {
        return Err(StartError::AlreadyStarted);
    }
    let workers = handle.metrics().num_workers();
    for _ in 0..workers {
        // Spawned from outside any worker, the pollers land in the shared queue; a worker that picks one up keeps
        // it in its LIFO slot after every yield, where other workers cannot steal it.
        handle.spawn(poller(window, awake.clone()));
    }
    Ok(workers)
}

async fn poller(window: Duration, awake: Counter<f64>) {
    let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
    loop {
        traffic().await;
        let mut accounted = Instant::now();
        loop {
            let now = Instant::now();
            let now_ns = nanos_since_epoch(now);
            if MOVED.load(Ordering::Relaxed) && MOVED.swap(false, Ordering::AcqRel) {
                LAST_MOVED_NS.fetch_max(now_ns.max(1), Ordering::AcqRel);
            }
            let last = LAST_MOVED_NS.load(Ordering::Acquire);
            let quiet = last == 0 || now_ns.saturating_sub(last) >= window_ns;
            if quiet || now.duration_since(accounted) >= ACCOUNT_EVERY {
                awake.inc_by(now.duration_since(accounted).as_secs_f64());
                accounted = now;
            }
            if quiet {
                break;
            }
            // Deferred to the end of the worker's turn: the worker polls its I/O driver without blocking, runs
            // whatever became ready, then this task again.
            tokio::task::yield_now().await;
        }
    }
}

/// Returns once the data path has moved bytes that no poller has seen yet.
async fn traffic() {
    let notified = WAKE.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    SLEEPERS.fetch_add(1, Ordering::SeqCst);
    if !MOVED.load(Ordering::SeqCst) {
        notified.await;
    }
    SLEEPERS.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn parks(handle: &tokio::runtime::Handle) -> u64 {
        let metrics = handle.metrics();
        (0..metrics.num_workers()).map(|w| metrics.worker_park_count(w)).sum()
    }

    /// An echo server on the runtime that reports its traffic the way the proxy's connections do.
    async fn echo() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = socket.read(&mut buf).await {
                        moved();
                        if socket.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        address
    }

    /// Within the window, ready sockets are served by workers that never park; after it the workers park; the
    /// next traffic starts another spell. The only test in this binary that starts polling (the state is per
    /// process).
    #[test]
    fn traffic_is_served_without_parking_until_the_window_passes() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let handle = runtime.handle().clone();
        let awake = Counter::<f64>::default();
        let window = Duration::from_secs(1);
        let workers = runtime.block_on(async { start(window, awake.clone()) }).unwrap();
        assert_eq!(workers, 2);
        assert_eq!(runtime.block_on(async { start(window, awake.clone()) }), Err(StartError::AlreadyStarted));
        let address = runtime.block_on(echo());

        // Nothing has moved yet: the pollers sleep from the start.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(awake.get(), 0.0, "no awake time accrues before any traffic");

        for spell in 1..=2 {
            let mut client = std::net::TcpStream::connect(address).unwrap();
            let mut ping = |round: u32| {
                let mut answer = [0u8; 4];
                std::thread::sleep(Duration::from_millis(5));
                client.write_all(&round.to_be_bytes()).unwrap();
                client.read_exact(&mut answer).unwrap();
                assert_eq!(answer, round.to_be_bytes());
            };
            // The first traffic wakes a parked worker, which wakes the pollers; they spread over the workers
            // (a worker holding two lets the other steal one) within a few pings.
            (0..5).for_each(&mut ping);
            // From then on, without polling, every ping would wake a parked worker (one park per wake-up).
            let before = parks(&handle);
            (5..25).for_each(&mut ping);
            assert_eq!(parks(&handle), before, "spell {spell}: a worker parked between pings");

            // After the window the pollers sleep, the workers park, and the spell is accounted: two workers for
            // about the window each, plus the pings.
            std::thread::sleep(window + Duration::from_millis(500));
            assert!(parks(&handle) > before, "spell {spell}: the workers parked after the window");
            let spent = awake.get();
            assert!(
                spent >= 2.0 * spell as f64 && spent < 2.0 * spell as f64 * 2.0,
                "spell {spell}: {spent} s awake in total, for {spell} one-second windows on 2 workers"
            );
        }
        drop(runtime);
    }
}
