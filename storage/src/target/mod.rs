//! The NVMe/TCP target: TCP listeners, one connection per queue, controllers and the discovery service.
//!
//! ```text
//! listener (tokio accept) → connection task: ICReq/ICResp → Connect → admin or I/O queue loop
//!   admin queue: Identify, Get Log Page, features, Keep Alive, AER, properties → Controller
//!   I/O queue:   Read/Write/Flush/Write Zeroes/DSM → Namespace → Volume (bdev)
//! ```

mod connection;
mod controller;
mod registry;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use controller::Controller;
pub use registry::{EventSink, Namespace, Registry, StatsSource, Subsystem};

/// Handle to the running target; cheap to clone.
#[derive(Debug, Clone)]
pub struct Target {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    stats: StatsSource,
    listeners: Mutex<BTreeMap<SocketAddr, Listening>>,
    controllers: Mutex<HashMap<u16, Weak<Controller>>>,
    discovery_generation: AtomicU64,
    /// `true` once the target hands its hosts over to another process: connections finish what they run, then
    /// close.
    closing: watch::Sender<bool>,
    /// Open connections.
    connections: watch::Sender<usize>,
}

/// A listener's accept loop and its listing for a hand-over.
#[derive(Debug)]
struct Listening {
    task: JoinHandle<()>,
    _registration: Option<dpu_intent::listen::Registration>,
}

impl Default for Target {
    fn default() -> Self {
        Self::new()
    }
}

impl Target {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                registry: Registry::default(),
                stats: StatsSource::default(),
                listeners: Mutex::new(BTreeMap::new()),
                controllers: Mutex::new(HashMap::new()),
                discovery_generation: AtomicU64::new(1),
                closing: watch::Sender::new(false),
                connections: watch::Sender::new(0),
            }),
        }
    }

    /// Served subsystems.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Per-volume counters.
    pub fn stats(&self) -> &StatsSource {
        &self.inner.stats
    }

    /// Generation counter of the discovery log; bumped whenever what discovery reports may have changed.
    pub fn discovery_generation(&self) -> u64 {
        self.inner.discovery_generation.load(Ordering::Acquire)
    }

    /// Marks the discovery log as changed.
    pub fn discovery_changed(&self) {
        self.inner.discovery_generation.fetch_add(1, Ordering::AcqRel);
    }

    fn controllers(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Weak<Controller>>> {
        self.inner.controllers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new controller so its I/O queues can find it.
    pub fn remember_controller(&self, controller: &Arc<Controller>) {
        let mut all = self.controllers();
        all.retain(|_, c| c.strong_count() > 0);
        all.insert(controller.cntlid, Arc::downgrade(controller));
    }

    /// The live controller with this id.
    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.controllers().get(&cntlid).and_then(Weak::upgrade)
    }

    /// Drops a controller whose admin queue ended.
    pub fn forget_controller(&self, cntlid: u16) {
        self.controllers().remove(&cntlid);
    }

    /// Binds listeners on `wanted` addresses not yet bound and closes those no longer wanted (established
    /// connections stay up). Returns the number of listeners opened or closed and the bind failures.
    pub async fn set_listeners(&self, wanted: BTreeSet<SocketAddr>) -> (usize, BTreeMap<SocketAddr, String>) {
        let mut changes = 0;
        let mut failed = BTreeMap::new();
        let missing: Vec<SocketAddr> = {
            let mut bound = self.inner.listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            bound.retain(|addr, listening| {
                let keep = wanted.contains(addr) && !listening.task.is_finished();
                if !keep {
                    listening.task.abort();
                    changes += 1;
                    tracing::info!(%addr, "NVMe/TCP listener closed");
                }
                keep
            });
            wanted.iter().filter(|a| !bound.contains_key(a)).copied().collect()
        };
        for addr in missing {
            // The socket the previous agent process listened on, if this is an upgrade: hosts reconnecting
            // meanwhile wait in its accept queue.
            let inherited = dpu_intent::listen::take(addr)
                .map(|l| l.set_nonblocking(true).and_then(|()| TcpListener::from_std(l)).map_err(|e| (true, e)));
            let bound = match inherited {
                Some(result) => result,
                None => TcpListener::bind(addr).await.map_err(|e| (false, e)),
            };
            match bound {
                Ok(listener) => {
                    tracing::info!(%addr, "NVMe/TCP listener open");
                    let registration = dpu_intent::listen::register(&listener)
                        .inspect_err(|e| tracing::warn!(%addr, error = %e, "listener not listed for a hand-over"))
                        .ok();
                    let task = tokio::spawn(self.clone().accept(listener, addr));
                    let listening = Listening { task, _registration: registration };
                    self.inner
                        .listeners
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(addr, listening);
                    changes += 1;
                }
                Err((true, e)) => {
                    failed.insert(addr, format!("the socket inherited from the previous agent process: {e}"));
                }
                Err((false, e)) => {
                    failed.insert(addr, e.to_string());
                }
            }
        }
        (changes, failed)
    }

    /// Stops serving, for the process that serves the same sockets next (one taking over, or this one restarted
    /// on the sockets the service manager kept): closes every listener, then lets each connection finish the
    /// commands it is running, send their completions and close, without reading more. Commands a host sent but
    /// that were not started are retried by the host when it reconnects (Linux: after `reconnect_delay`). Returns
    /// once every connection is closed, or after `deadline` with the number still open.
    pub async fn stop_serving(&self, deadline: std::time::Duration) -> usize {
        {
            let mut bound = self.inner.listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (addr, listening) in std::mem::take(&mut *bound) {
                listening.task.abort();
                tracing::info!(%addr, "NVMe/TCP listener closed");
            }
        }
        self.inner.closing.send_replace(true);
        let mut open = self.inner.connections.subscribe();
        let closed = tokio::time::timeout(deadline, open.wait_for(|n| *n == 0)).await.is_ok();
        let left = *open.borrow();
        if closed {
            tracing::info!("NVMe/TCP connections closed after their running commands");
        } else {
            tracing::warn!(open = left, "NVMe/TCP connections still open at the drain deadline");
        }
        left
    }

    /// A receiver that turns `true` when the target stops serving.
    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }

    async fn accept(self, listener: TcpListener, addr: SocketAddr) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let local = stream.local_addr().unwrap_or(addr);
                    let target = self.clone();
                    target.inner.connections.send_modify(|n| *n += 1);
                    tokio::spawn(async move {
                        connection::serve(stream, target.clone(), local, peer).await;
                        target.inner.connections.send_modify(|n| *n = n.saturating_sub(1));
                    });
                }
                Err(e) => tracing::warn!(%addr, error = %e, "NVMe/TCP accept failed"),
            }
        }
    }
}
