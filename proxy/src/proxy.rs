//! The proxy: turns each source's [`MeshSpecs`] into a snapshot, swaps it in atomically and keeps the listeners
//! in step (bind new ones, rebind changed addresses, drain removed ones).

use std::collections::{BTreeMap, HashMap};
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use dpu_intent::Resource;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::fairness::Fairness;
use crate::listener::{self, ListenerHandle, Runtime};
use crate::metrics::{ConfigErrorLabels, Metrics, SourceLabels};
use crate::model::{ListenerSpec, MeshSpecs};
use crate::poll::Policy;
use crate::snapshot::{Errors, Snapshot, SourceSnapshot, Taken, build_source};
use crate::tls::TlsStore;

/// Drained listeners get this long beyond their drain time to finish before shutdown stops waiting.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(2);

/// The shared service-mesh proxy. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    runtime: Arc<Runtime>,
    /// Serializes applies and owns the running listeners.
    state: tokio::sync::Mutex<State>,
    /// For the config dump, readable without waiting for an apply.
    listener_states: Mutex<BTreeMap<String, ListenerState>>,
    last_errors: Mutex<BTreeMap<String, Vec<ObjectError>>>,
}

#[derive(Debug, Default)]
struct State {
    listeners: HashMap<(String, String), ListenerHandle>,
    tls: HashMap<String, Arc<TlsStore>>,
    draining: Vec<JoinHandle<()>>,
}

#[derive(Debug, Clone, Serialize)]
struct ListenerState {
    address: SocketAddr,
    state: &'static str,
}

/// Objects of one apply that were left out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplyReport {
    pub errors: Vec<ObjectError>,
}

impl ApplyReport {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// One object left out of a snapshot, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectError {
    /// The model kind, e.g. `meshClusters`.
    pub kind: &'static str,
    pub id: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}: {}: {}", self.kind, self.id, self.field, self.message)
    }
}

impl Proxy {
    /// Registers the proxy's metric families (Istio names, unprefixed) in `registry`.
    pub fn new(registry: &mut Registry) -> Proxy {
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let metrics = Arc::new(Metrics::register(registry, snapshot.clone()));
        let runtime = Arc::new(Runtime { snapshot, metrics, fairness: Arc::new(Fairness::default()) });
        Proxy {
            inner: Arc::new(Inner {
                runtime,
                state: tokio::sync::Mutex::new(State::default()),
                listener_states: Mutex::new(BTreeMap::new()),
                last_errors: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Validates and compiles one source's specs ("intent", "xds"), swaps the new snapshot in atomically, binds
    /// new listeners, rebinds changed addresses, drains removed listeners. Objects that fail (validation, a
    /// dangling reference, a bind error, a bad certificate) are left out and reported; the rest applies.
    pub async fn apply(&self, source: &str, specs: MeshSpecs) -> ApplyReport {
        let inner = &self.inner;
        let runtime = &inner.runtime;
        let mut state = inner.state.lock().await;
        let current = runtime.snapshot.load_full();
        let taken = Taken::from_other_sources(&current, source);
        let previous_clusters = current.sources.get(source).map(|s| s.clusters.clone()).unwrap_or_default();
        let tls = state.tls.entry(source.to_string()).or_default().clone();
        let mut errors = Errors::default();
        let empty = specs == MeshSpecs::default();
        let mut src = build_source(source, specs, &previous_clusters, tls, &taken, &mut errors);

        // Listener lifecycle. Keys of this source's running listeners.
        let running: Vec<(String, String)> = state.listeners.keys().filter(|(s, _)| s == source).cloned().collect();
        let mut to_drain: Vec<(String, ListenerHandle, Duration)> = Vec::new();
        let mut stop_first: Vec<(String, ListenerHandle, Duration)> = Vec::new();
        for key in running {
            let old_drain = drain_time(current.listener(&key.0, &key.1).map(|l| &l.spec));
            let Some(handle) = state.listeners.get(&key) else { continue };
            match src.listeners.get(&key.1) {
                Some(new) if new.spec.address == handle.address && new.spec.transparent == handle.transparent => {}
                // Same socket address with other options: the old socket must close before the new one binds.
                Some(new) if new.spec.address == handle.address => {
                    if let Some(h) = state.listeners.remove(&key) {
                        stop_first.push((key.1, h, old_drain));
                    }
                }
                // Moved: the new address binds first, then the old one drains.
                Some(_) => {
                    if let Some(h) = state.listeners.remove(&key) {
                        to_drain.push((key.1, h, old_drain));
                    }
                }
                None => {
                    if let Some(h) = state.listeners.remove(&key) {
                        stop_first.push((key.1, h, old_drain));
                    }
                }
            }
        }
        for (id, handle, grace) in stop_first {
            let address = handle.address;
            let task = handle.drain(grace).await;
            self.track_drain(&mut state, source, &id, address, task);
        }

        // Bind what is new or moved; a bind failure leaves the listener out.
        let mut bound: Vec<(String, bool, TcpListener)> = Vec::new();
        let mut failed = Vec::new();
        for (id, l) in &src.listeners {
            if state.listeners.contains_key(&(source.to_string(), id.clone())) {
                continue;
            }
            match listener::bind(l.spec.address, l.spec.transparent) {
                Ok(socket) => bound.push((id.clone(), l.spec.transparent, socket)),
                Err(e) => {
                    let message = match e.source() {
                        Some(cause) => format!("{e}: {cause}"),
                        None => e.to_string(),
                    };
                    errors.push(ListenerSpec::KIND, id, "listener.address", message);
                    failed.push(id.clone());
                }
            }
        }
        for id in failed {
            src.listeners.remove(&id);
        }

        // Swap the snapshot in, then start accepting on the new sockets.
        let mut sources = current.sources.clone();
        if empty {
            sources.remove(source);
            state.tls.remove(source);
        } else {
            sources.insert(source.to_string(), Arc::new(src));
        }
        let snapshot = Snapshot::merge(sources);
        runtime.fairness.retain(|key| {
            key.split_once('/')
                .is_some_and(|(s, id)| snapshot.sources.get(s).is_some_and(|s| s.workloads.contains_key(id)))
        });
        runtime.snapshot.store(Arc::new(snapshot));
        drop(current);

        for (id, transparent, socket) in bound {
            let handle = listener::spawn(runtime.clone(), source.to_string(), id.clone(), transparent, socket);
            tracing::info!(source, listener = %id, address = %handle.address, transparent, "listener started");
            self.set_listener_state(source, &id, handle.address, "listening");
            state.listeners.insert((source.to_string(), id), handle);
        }
        for (id, handle, grace) in to_drain {
            let address = handle.address;
            let task = handle.drain(grace).await;
            self.track_drain(&mut state, source, &id, address, task);
        }
        state.draining.retain(|t| !t.is_finished());
        drop(state);

        runtime.metrics.config_applies.get_or_create(&SourceLabels { source: source.to_string() }).inc();
        for e in &errors.errors {
            runtime
                .metrics
                .config_errors
                .get_or_create(&ConfigErrorLabels { source: source.to_string(), kind: e.kind })
                .inc();
        }
        lock(&inner.last_errors).insert(source.to_string(), errors.errors.clone());
        tracing::info!(source, errors = errors.errors.len(), "configuration applied");
        ApplyReport { errors: errors.errors }
    }

    /// Redacted (no private keys) JSON of every source's specs plus live cluster stats and listener states.
    pub fn config_dump(&self) -> Value {
        let snapshot = self.inner.runtime.snapshot.load_full();
        let last_errors = lock(&self.inner.last_errors).clone();
        let mut sources = serde_json::Map::new();
        for (name, src) in &snapshot.sources {
            sources.insert(name.clone(), dump_source(src, last_errors.get(name).map(Vec::as_slice).unwrap_or(&[])));
        }
        let listeners: BTreeMap<String, ListenerState> = lock(&self.inner.listener_states).clone();
        json!({ "sources": sources, "listeners": listeners })
    }

    /// Keeps every worker of the current runtime polling for I/O, as `policy` wants, until `window` has passed
    /// since a data path (this proxy, the NVMe/TCP target) last moved bytes, instead of parking ([`crate::poll`]); returns the number of pollers
    /// (one per worker; none when `policy` is off). Once per process.
    pub fn start_polling(&self, policy: Policy, window: Duration) -> Result<usize, crate::poll::StartError> {
        let awake = self.inner.runtime.metrics.poll_awake.clone();
        crate::poll::start(
            policy,
            window,
            std::sync::Arc::new(move |seconds| {
                awake.inc_by(seconds);
            }),
        )
    }

    /// Stops accepting everywhere and drains for at most `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        let mut state = self.inner.state.lock().await;
        let handles: Vec<((String, String), ListenerHandle)> = state.listeners.drain().collect();
        for ((source, id), handle) in handles {
            let address = handle.address;
            let task = handle.drain(grace).await;
            self.track_drain(&mut state, &source, &id, address, task);
        }
        let tasks: Vec<JoinHandle<()>> = state.draining.drain(..).collect();
        drop(state);
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(grace + SHUTDOWN_SLACK, all).await.is_err() {
            tracing::warn!("connections still open after the shutdown grace period");
        }
        tracing::info!("proxy shut down");
    }

    fn set_listener_state(&self, source: &str, id: &str, address: SocketAddr, state: &'static str) {
        lock(&self.inner.listener_states).insert(format!("{source}/{id}"), ListenerState { address, state });
    }

    /// Marks a stopped listener as draining in the dump until its connections are gone.
    fn track_drain(&self, state: &mut State, source: &str, id: &str, address: SocketAddr, task: JoinHandle<()>) {
        let live = format!("{source}/{id}");
        let draining = format!("{live} (draining)");
        {
            let mut states = lock(&self.inner.listener_states);
            // A moved listener's new socket may already be listed under the live key.
            if states.get(&live).is_some_and(|s| s.address == address) {
                states.remove(&live);
            }
            states.insert(draining.clone(), ListenerState { address, state: "draining" });
        }
        let inner = Arc::downgrade(&self.inner);
        state.draining.push(tokio::spawn(async move {
            let _ = task.await;
            if let Some(inner) = inner.upgrade() {
                lock(&inner.listener_states).remove(&draining);
            }
        }));
    }
}

fn drain_time(spec: Option<&ListenerSpec>) -> Duration {
    Duration::from_millis(u64::from(
        spec.map_or(crate::model::ListenerTimeouts::default().drain_ms, |s| s.timeouts.drain_ms),
    ))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn dump_source(src: &SourceSnapshot, errors: &[ObjectError]) -> Value {
    let specs = &src.specs;
    let certificates: serde_json::Map<String, Value> = specs
        .certificates
        .iter()
        .map(|(id, c)| {
            (
                id.clone(),
                json!({
                    "spiffe_id": src.tls.identity(id).map(|s| s.to_string()),
                    "certificate_chain_pem_bytes": c.certificate_chain_pem.len(),
                    "trust_bundle_pem_bytes": c.trust_bundle_pem.len(),
                }),
            )
        })
        .collect();
    let clusters: serde_json::Map<String, Value> = specs
        .clusters
        .iter()
        .map(|(id, spec)| {
            let stats = src.clusters.get(id).map(|c| serde_json::to_value(c.stats()).unwrap_or(Value::Null));
            (id.clone(), json!({ "spec": spec, "active": stats.is_some(), "stats": stats }))
        })
        .collect();
    let active = |present: bool| if present { "active" } else { "error" };
    let listeners: serde_json::Map<String, Value> = specs
        .listeners
        .iter()
        .map(|(id, spec)| (id.clone(), json!({ "spec": spec, "state": active(src.listeners.contains_key(id)) })))
        .collect();
    let route_tables: serde_json::Map<String, Value> = specs
        .route_tables
        .iter()
        .map(|(id, spec)| (id.clone(), json!({ "spec": spec, "state": active(src.route_tables.contains_key(id)) })))
        .collect();
    let workloads: serde_json::Map<String, Value> = specs
        .workloads
        .iter()
        .map(|(id, spec)| (id.clone(), json!({ "spec": spec, "state": active(src.workloads.contains_key(id)) })))
        .collect();
    json!({
        "workloads": workloads,
        "certificates": certificates,
        "clusters": clusters,
        "route_tables": route_tables,
        "listeners": listeners,
        "policies": specs.policies,
        "errors": errors,
    })
}
