//! Poll mode: after a data path (the mesh proxy, the NVMe/TCP target) last moved bytes, the runtime's workers
//! keep polling for I/O for a bounded time instead of going to sleep. One mechanism for every data path on the
//! agent's runtime, because the workers are shared: all poll together or none.
//!
//! A worker that finds nothing to do parks in `epoll_wait`, and the next readiness event has to wake it: a
//! context switch in, and on a virtual or power-managed core an exit from the idle state first. At moderate
//! rates that wake-up is most of the latency a proxy adds, twice per request (the request arrives; the
//! upstream answers). Poll-mode data paths on DPUs (DPDK, SPDK) avoid it by never sleeping. Here one poller
//! task per worker yields in a loop while polling is wanted; each yield makes tokio poll its I/O driver with a
//! zero timeout, so a ready socket is served by a worker that is already running. Polling is wanted
//!
//! - [`Policy::InFlight`]: while an HTTP request is waiting for or streaming its answer — the wait for the
//!   upstream is polled, the gap until a client's next request is slept through, like hybrid polling of block
//!   completions: it takes one of the two wake-ups per request away for little more CPU than the requests
//!   themselves take when the upstream answers fast;
//! - [`Policy::Always`]: whenever the proxy has moved bytes, as in Seastar's idle poll time: both wake-ups go,
//!   and every worker stays busy while traffic keeps arriving within the window;
//!
//! and in both only until the window has passed since a data path last moved bytes, so a slow upstream or a
//! quiet spell is slept through and an idle agent costs nothing. Under `in_flight` each round of polling also
//! yields the core to any other thread ready to run on it, so on a machine shared with other work (the upstream
//! itself, perhaps) a polling worker delays nobody; it still counts as busy. Under `always` (cores given to the
//! agent) it does so every 50 µs. The agent's default is `in_flight` (`poll` in its config): on
//! one pinned core it cost 10–30% more CPU per request than parking, still 0.77–0.87× of Envoy's
//! (docs/benchmarks.md). `always` is for cores dedicated to the agent: it keeps them busy while traffic flows.
//!
//! All workers poll together, or none: tokio lets one parked worker own the I/O driver, and while it sleeps in
//! `epoll_wait` the others cannot poll it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Where the seconds spent polling are counted (a metrics counter).
pub type AwakeCounter = std::sync::Arc<dyn Fn(f64) + Send + Sync>;

/// When the workers poll instead of parking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Never: workers park whenever they run out of work.
    Off,
    /// While HTTP requests are in flight, within the window after the last bytes moved.
    #[default]
    InFlight,
    /// Within the window after the last bytes moved.
    Always,
}

const OFF: u8 = 0;
const IN_FLIGHT: u8 = 1;
const ALWAYS: u8 = 2;

/// The running policy; [`OFF`] until [`start`].
static POLICY: AtomicU8 = AtomicU8::new(OFF);
/// Set by the data path when it moves bytes; taken by a poller, which stamps [`LAST_MOVED_NS`].
static MOVED: AtomicBool = AtomicBool::new(false);
/// When a poller last saw [`MOVED`], in nanoseconds since [`epoch`]; 0 before any traffic.
static LAST_MOVED_NS: AtomicU64 = AtomicU64::new(0);
/// HTTP requests whose response has not ended (counted only while a policy runs).
static REQUESTS: AtomicUsize = AtomicUsize::new(0);
/// Pollers asleep, waiting for traffic.
static SLEEPERS: AtomicUsize = AtomicUsize::new(0);
static WAKE: Notify = Notify::const_new();

/// Under [`Policy::Always`], how often a polling worker offers its core to other threads.
const OS_YIELD_EVERY: Duration = Duration::from_micros(50);

/// How often a poller that never sleeps adds its awake time to the counter.
const ACCOUNT_EVERY: Duration = Duration::from_secs(1);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The data path moved bytes. One relaxed load while the pollers are awake or polling is off; wakes sleeping
/// pollers on the first traffic after a quiet spell.
#[inline]
pub fn moved() {
    if !MOVED.load(Ordering::Relaxed) {
        mark_moved();
    }
}

/// Bytes moved by a data path whose traffic keeps the workers polling only under [`Policy::Always`] (the NVMe/TCP
/// target: a busy volume's queue is rarely empty, so under `in_flight` it would keep them polling for good, and
/// would stretch the proxy's polling windows).
#[inline]
pub fn moved_always() {
    if POLICY.load(Ordering::Relaxed) == ALWAYS {
        moved();
    }
}

#[cold]
fn mark_moved() {
    // Pairs with `traffic`: the poller counts itself asleep, then loads MOVED and REQUESTS; this stores, then
    // loads SLEEPERS. Either the poller sees the traffic and stays awake, or this sees the poller and wakes it.
    MOVED.store(true, Ordering::SeqCst);
    if SLEEPERS.load(Ordering::SeqCst) > 0 && wanted() {
        WAKE.notify_waiters();
    }
}

/// Whether traffic within the window should keep the workers polling.
fn wanted() -> bool {
    match POLICY.load(Ordering::Relaxed) {
        ALWAYS => true,
        IN_FLIGHT => REQUESTS.load(Ordering::SeqCst) > 0,
        _ => false,
    }
}

/// An HTTP request in flight, from its head until its response ends; keeps the workers polling under
/// [`Policy::InFlight`]. (NVMe commands do not count: a busy volume's queue is rarely empty, so the workers would
/// never park; NVMe/TCP traffic keeps them polling under [`Policy::Always`].)
#[derive(Debug)]
pub struct Request {
    counted: bool,
}

impl Request {
    pub fn start() -> Request {
        if POLICY.load(Ordering::Relaxed) == OFF {
            return Request { counted: false };
        }
        REQUESTS.fetch_add(1, Ordering::SeqCst);
        // The head's bytes were marked when they were read, so mark again: sleeping pollers that saw no request
        // then must see this one.
        mark_moved();
        Request { counted: true }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.counted {
            REQUESTS.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Why polling did not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartError {
    #[error("poll mode is already running in this process")]
    AlreadyStarted,
    #[error("poll mode needs a multi-thread tokio runtime (it polls on every worker)")]
    NotMultiThread,
}

/// Starts one poller per worker of the current multi-thread runtime, each keeping its worker polling while
/// `policy` wants it and `window` has not passed since the data path last moved bytes. `awake` counts the
/// seconds workers spent in that mode (polling, and serving what polling found), summed over workers. Once per
/// process; returns the number of pollers started (none for [`Policy::Off`]).
pub fn start(policy: Policy, window: Duration, awake: AwakeCounter) -> Result<usize, StartError> {
    let code = match policy {
        Policy::Off => return Ok(0),
        Policy::InFlight => IN_FLIGHT,
        Policy::Always => ALWAYS,
    };
    let handle = tokio::runtime::Handle::current();
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Err(StartError::NotMultiThread);
    }
    if POLICY.compare_exchange(OFF, code, Ordering::SeqCst, Ordering::SeqCst).is_err() {
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

async fn poller(window: Duration, awake: AwakeCounter) {
    let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
    loop {
        traffic().await;
        let mut accounted = Instant::now();
        let mut gave_core = accounted;
        loop {
            let now = Instant::now();
            let now_ns = nanos_since_epoch(now);
            if MOVED.load(Ordering::Relaxed) && MOVED.swap(false, Ordering::AcqRel) {
                LAST_MOVED_NS.fetch_max(now_ns.max(1), Ordering::AcqRel);
            }
            let last = LAST_MOVED_NS.load(Ordering::Acquire);
            let done = !wanted() || last == 0 || now_ns.saturating_sub(last) >= window_ns;
            if done || now.duration_since(accounted) >= ACCOUNT_EVERY {
                awake(now.duration_since(accounted).as_secs_f64());
                accounted = now;
            }
            if done {
                break;
            }
            // Give the core to any other thread that is ready to run on it (on a shared machine that may be the
            // very upstream the request waits for); back at once when there is none. Under `always` the cores are
            // the agent's: every OS_YIELD_EVERY is enough, and the polling loop stays out of the scheduler (a
            // sched_yield per round was a tenth of a polling core's time and a microsecond of latency).
            if POLICY.load(Ordering::Relaxed) != ALWAYS || now.duration_since(gave_core) >= OS_YIELD_EVERY {
                std::thread::yield_now();
                gave_core = now;
            }
            // Deferred to the end of the worker's turn: the worker polls its I/O driver without blocking, runs
            // whatever became ready, then this task again.
            tokio::task::yield_now().await;
        }
    }
}

/// Returns once the data path has moved bytes that no poller has seen yet, and the policy wants polling.
async fn traffic() {
    let notified = WAKE.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    SLEEPERS.fetch_add(1, Ordering::SeqCst);
    if !(MOVED.load(Ordering::SeqCst) && wanted()) {
        notified.await;
    }
    SLEEPERS.fetch_sub(1, Ordering::SeqCst);
}
