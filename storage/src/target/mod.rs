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
    listeners: Mutex<BTreeMap<SocketAddr, JoinHandle<()>>>,
    controllers: Mutex<HashMap<u16, Weak<Controller>>>,
    discovery_generation: AtomicU64,
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
            bound.retain(|addr, task| {
                let keep = wanted.contains(addr) && !task.is_finished();
                if !keep {
                    task.abort();
                    changes += 1;
                    tracing::info!(%addr, "NVMe/TCP listener closed");
                }
                keep
            });
            wanted.iter().filter(|a| !bound.contains_key(a)).copied().collect()
        };
        for addr in missing {
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, "NVMe/TCP listener open");
                    let task = tokio::spawn(self.clone().accept(listener, addr));
                    self.inner.listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(addr, task);
                    changes += 1;
                }
                Err(e) => {
                    failed.insert(addr, e.to_string());
                }
            }
        }
        (changes, failed)
    }

    async fn accept(self, listener: TcpListener, addr: SocketAddr) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let local = stream.local_addr().unwrap_or(addr);
                    tokio::spawn(connection::serve(stream, self.clone(), local, peer));
                }
                Err(e) => tracing::warn!(%addr, error = %e, "NVMe/TCP accept failed"),
            }
        }
    }
}
