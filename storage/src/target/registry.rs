//! What the target serves right now: subsystems by NQN with their namespaces (volumes) and allowed hosts, and
//! the controllers hosts have created. The reconciler edits it; connections read it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, RwLock, Weak};

use crate::bdev::{SharedVolume, VolumeStats};

/// One namespace: a volume behind an NSID.
#[derive(Debug)]
pub struct Namespace {
    pub nsid: u32,
    pub volume_id: String,
    pub volume: SharedVolume,
    pub uuid: [u8; 16],
    pub stats: Arc<VolumeStats>,
}

/// Receives asynchronous events for one controller (namespace attribute changed).
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Namespaces of the controller's subsystem were added or removed.
    fn namespaces_changed(&self, nsids: &[u32]);
}

/// A subsystem as served.
#[derive(Debug)]
pub struct Subsystem {
    pub id: String,
    pub nqn: String,
    pub serial: String,
    pub model: String,
    state: RwLock<SubsystemState>,
}

#[derive(Debug, Default)]
struct SubsystemState {
    allow_any_host: bool,
    allowed_hosts: BTreeSet<String>,
    namespaces: BTreeMap<u32, Arc<Namespace>>,
    listeners: BTreeSet<SocketAddr>,
    controllers: Vec<Weak<dyn EventSink>>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Subsystem {
    pub fn new(id: &str, nqn: &str, serial: &str, model: &str) -> Self {
        Self {
            id: id.into(),
            nqn: nqn.into(),
            serial: serial.into(),
            model: model.into(),
            state: RwLock::new(SubsystemState::default()),
        }
    }

    /// Whether `host_nqn` may connect.
    pub fn allows(&self, host_nqn: &str) -> bool {
        let s = read(&self.state);
        s.allow_any_host || s.allowed_hosts.contains(host_nqn)
    }

    /// Replaces the host allow list. Returns true when it changed.
    pub fn set_hosts(&self, allow_any: bool, hosts: &BTreeSet<String>) -> bool {
        let mut s = write(&self.state);
        let changed = s.allow_any_host != allow_any || s.allowed_hosts != *hosts;
        s.allow_any_host = allow_any;
        s.allowed_hosts.clone_from(hosts);
        changed
    }

    /// The namespace with `nsid`.
    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        read(&self.state).namespaces.get(&nsid).cloned()
    }

    /// Active namespace ids, ascending.
    pub fn nsids(&self) -> Vec<u32> {
        read(&self.state).namespaces.keys().copied().collect()
    }

    /// Current namespaces, by nsid.
    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        read(&self.state).namespaces.values().cloned().collect()
    }

    /// Adds or replaces namespaces and removes those not in `wanted`; tells connected controllers.
    /// Returns the number of namespaces added, replaced or removed.
    pub fn set_namespaces(&self, wanted: Vec<Arc<Namespace>>) -> usize {
        let (changed, sinks) = {
            let mut s = write(&self.state);
            let wanted: BTreeMap<u32, Arc<Namespace>> = wanted.into_iter().map(|n| (n.nsid, n)).collect();
            let mut changed = Vec::new();
            for (nsid, ns) in &wanted {
                let same = s.namespaces.get(nsid).is_some_and(|old| {
                    Arc::ptr_eq(&old.volume, &ns.volume) && old.uuid == ns.uuid && old.volume_id == ns.volume_id
                });
                if !same {
                    changed.push(*nsid);
                }
            }
            changed.extend(s.namespaces.keys().filter(|n| !wanted.contains_key(n)));
            if changed.is_empty() {
                return 0;
            }
            s.namespaces = wanted;
            s.controllers.retain(|c| c.strong_count() > 0);
            (changed, s.controllers.iter().filter_map(Weak::upgrade).collect::<Vec<_>>())
        };
        for sink in sinks {
            sink.namespaces_changed(&changed);
        }
        changed.len()
    }

    /// Addresses this subsystem is exported on.
    pub fn listeners(&self) -> BTreeSet<SocketAddr> {
        read(&self.state).listeners.clone()
    }

    /// Replaces the listener set. Returns true when it changed.
    pub fn set_listeners(&self, listeners: BTreeSet<SocketAddr>) -> bool {
        let mut s = write(&self.state);
        let changed = s.listeners != listeners;
        s.listeners = listeners;
        changed
    }

    /// Registers a live controller for asynchronous events.
    pub fn attach(&self, sink: Weak<dyn EventSink>) {
        write(&self.state).controllers.push(sink);
    }
}

/// Per-volume I/O counters, shared with the API.
#[derive(Debug, Clone, Default)]
pub struct StatsSource(Arc<RwLock<BTreeMap<String, Arc<VolumeStats>>>>);

impl StatsSource {
    /// The counters of `volume`, created on first use.
    pub fn for_volume(&self, volume: &str) -> Arc<VolumeStats> {
        if let Some(s) = read(&self.0).get(volume) {
            return s.clone();
        }
        write(&self.0).entry(volume.to_owned()).or_default().clone()
    }

    /// Drops the counters of volumes that no longer exist.
    pub fn retain(&self, volumes: &BTreeSet<String>) {
        write(&self.0).retain(|k, _| volumes.contains(k));
    }

    /// Every volume's counters.
    pub fn snapshot(&self) -> Vec<(String, Arc<VolumeStats>)> {
        read(&self.0).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Every served subsystem by NQN, plus controller id allocation.
#[derive(Debug, Default)]
pub struct Registry {
    subsystems: RwLock<HashMap<String, Arc<Subsystem>>>,
    next_cntlid: AtomicU16,
}

impl Registry {
    /// The subsystem with this NQN.
    pub fn by_nqn(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        read(&self.subsystems).get(nqn).cloned()
    }

    /// Every subsystem.
    pub fn all(&self) -> Vec<Arc<Subsystem>> {
        let mut all: Vec<_> = read(&self.subsystems).values().cloned().collect();
        all.sort_by(|a, b| a.nqn.cmp(&b.nqn));
        all
    }

    /// Inserts or replaces the subsystem for its NQN.
    pub fn insert(&self, subsystem: Arc<Subsystem>) {
        write(&self.subsystems).insert(subsystem.nqn.clone(), subsystem);
    }

    /// Removes subsystems whose NQN is not in `keep`; returns how many.
    pub fn retain(&self, keep: &BTreeSet<String>) -> usize {
        let mut s = write(&self.subsystems);
        let before = s.len();
        s.retain(|nqn, _| keep.contains(nqn));
        before - s.len()
    }

    /// A controller id in 1..=0xFFEF (the spec reserves the rest), unique among recent ones.
    pub fn allocate_cntlid(&self) -> u16 {
        let id = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
        id % 0xFFEF + 1
    }
}
