//! Converges the running target towards the storage intent: opens volumes, publishes subsystems with their
//! namespaces and hosts, and binds the TCP listeners they are exported on. Idempotent: a pass over unchanged
//! intent changes nothing and reports zero changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use dpu_intent::Store;
use dpu_intent::reconcile::{ObjectKey, ObjectState, ObjectStatus, Pass, ReconcileError, Reconciler};

use dpu_crypto::keys::Keys;
use dpu_crypto::xts::XtsCipher;

use crate::bdev::{
    EncryptedVolume, EncryptedVolumes, FileVolume, MallocVolume, NullVolume, SharedVolume, Uring, VolumeError,
};
use crate::image::Digest;
use crate::image::reconcile::Images;
use crate::model::{Backend, EncryptedSpec, Engine, SubsystemSpec, VolumeSpec};
use crate::target::{Namespace, Subsystem, Target};

/// The storage subsystem's reconciler.
#[derive(Debug)]
pub struct StorageReconciler {
    target: Target,
    /// Extra address serving only discovery.
    discovery: Option<SocketAddr>,
    /// Volumes opened so far, with the spec they were opened from (and for an encrypted volume, its base).
    volumes: Mutex<HashMap<String, OpenVolume>>,
    /// The io_uring engine for file volumes, set up on first use; `None` inside when the kernel has none.
    uring: std::sync::OnceLock<Option<Uring>>,
    /// Resolved images, whose layers namespaces may serve.
    images: Images,
    /// Keys of encrypted volumes; `None`: encrypted volumes are reported in error.
    keys: Option<Keys>,
    /// The encrypted volumes open now, shared with the metrics.
    encrypted: EncryptedVolumes,
    /// SPDK, when the agent runs it: `spdk` volumes and subsystems with `engine = "spdk"`.
    #[cfg(feature = "spdk")]
    spdk: Option<Arc<crate::spdk::SpdkEngine>>,
}

/// Why SPDK volumes and subsystems cannot be served by this agent.
#[cfg(not(feature = "spdk"))]
const NO_SPDK: &str = "this agent was built without SPDK (cargo feature `spdk`)";
#[cfg(feature = "spdk")]
const NO_SPDK: &str = "SPDK is not configured ([storage.spdk] in the agent's config)";

#[derive(Debug)]
struct OpenVolume {
    spec: VolumeSpec,
    volume: SharedVolume,
    /// The base an encrypted volume was built over: it is rebuilt when its base is reopened.
    base: Option<SharedVolume>,
}

fn open_volume(spec: &VolumeSpec, uring: Option<Uring>) -> Result<SharedVolume, String> {
    let error =
        |e: VolumeError| format!("{e}: {}", std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default());
    Ok(match &spec.backend {
        Backend::Malloc => Arc::new(MallocVolume::new(spec.block_size, spec.blocks())),
        Backend::Null => Arc::new(NullVolume::new(spec.block_size, spec.blocks())),
        Backend::File { path } => {
            Arc::new(FileVolume::open(path, spec.block_size, spec.blocks(), uring).map_err(error)?)
        }
        Backend::Encrypted(_) => unreachable!("encrypted volumes are opened over their base"),
        Backend::Spdk(_) => unreachable!("SPDK volumes are opened by the SPDK engine"),
    })
}

/// Builds an encrypted volume over `base`, with the key's material unwrapped just for building the cipher.
fn open_encrypted(
    spec: &VolumeSpec,
    encrypted: &EncryptedSpec,
    base: &SharedVolume,
    keys: Option<&Keys>,
    store: &Store,
) -> Result<Arc<EncryptedVolume>, String> {
    let keys = keys.ok_or("the agent has no key store for encrypted volumes")?;
    let placement = crate::bdev::encryption_placement(encrypted.policy).map_err(|e| e.to_string())?;
    if base.geometry() != (crate::bdev::Geometry { block_size: spec.block_size, blocks: spec.blocks() }) {
        return Err(format!("volumes/{} no longer has this volume's block size and capacity", encrypted.base));
    }
    let key = keys.xts_key(store, &encrypted.key).map_err(|e| format!("cryptoKeys/{}: {e}", encrypted.key))?;
    let cipher = XtsCipher::new(&key).map_err(|e| format!("cryptoKeys/{}: {e}", encrypted.key))?;
    let volume =
        EncryptedVolume::new(base.clone(), Arc::new(cipher), encrypted.data_unit).map_err(|e| e.to_string())?;
    tracing::info!(base = %encrypted.base, engine = placement.engine, hardware = placement.hardware,
        reason = %placement.reason, "encrypted volume over its base");
    Ok(Arc::new(volume))
}

fn status(state: ObjectState, reason: impl Into<String>, generation: u64) -> ObjectStatus {
    ObjectStatus { state, reason: reason.into(), observed_generation: generation }
}

impl StorageReconciler {
    pub fn new(target: Target, discovery: Option<SocketAddr>) -> Self {
        Self::with_images(target, discovery, Images::default())
    }

    /// A reconciler that also serves the layers of the images in `images`.
    pub fn with_images(target: Target, discovery: Option<SocketAddr>, images: Images) -> Self {
        Self {
            target,
            discovery,
            volumes: Mutex::new(HashMap::new()),
            uring: std::sync::OnceLock::new(),
            images,
            keys: None,
            encrypted: EncryptedVolumes::default(),
            #[cfg(feature = "spdk")]
            spdk: None,
        }
    }

    /// Serves `spdk` volumes and `engine = "spdk"` subsystems with `engine`.
    #[cfg(feature = "spdk")]
    pub fn with_spdk(mut self, engine: Arc<crate::spdk::SpdkEngine>) -> Self {
        self.spdk = Some(engine);
        self
    }

    /// Opens the SPDK bdev of an `spdk` volume.
    fn open_spdk(&self, spec: &VolumeSpec, bdev: &crate::model::SpdkBdevSpec) -> Result<SharedVolume, String> {
        #[cfg(feature = "spdk")]
        if let Some(engine) = &self.spdk {
            return engine.open_volume(spec, bdev);
        }
        let _ = (spec, bdev);
        Err(NO_SPDK.into())
    }

    /// Opens encrypted volumes with keys from `keys`, and lists them in `encrypted`.
    pub fn with_keys(mut self, keys: Keys, encrypted: EncryptedVolumes) -> Self {
        self.keys = Some(keys);
        self.encrypted = encrypted;
        self
    }

    /// Serves file volumes through `uring`, probed by the caller (and shared, e.g. with the image chunk cache),
    /// instead of probing a ring of its own on the first file volume.
    pub fn with_uring(self, uring: Option<Uring>) -> Self {
        let _ = self.uring.set(uring);
        self
    }

    /// The shared ring, probed once; without io_uring file volumes fall back to the thread pool, and say so.
    fn uring(&self) -> Option<Uring> {
        self.uring
            .get_or_init(|| match Uring::new() {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring is unavailable: file volumes use the blocking thread pool");
                    None
                }
            })
            .clone()
    }

    /// Opens new volumes and forgets deleted ones. Returns (changes, statuses, usable volumes by id).
    fn volumes(
        &self,
        store: &Store,
        statuses: &mut Vec<(ObjectKey, ObjectStatus)>,
    ) -> Result<(usize, HashMap<String, SharedVolume>), ReconcileError> {
        let wanted = store.list_all::<VolumeSpec>()?;
        let mut open = self.volumes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut changes = 0;
        let ids: BTreeSet<String> = wanted.iter().map(|v| v.id.clone()).collect();
        let before = open.len();
        open.retain(|id, _| ids.contains(id));
        changes += before - open.len();
        // Plain volumes first: encrypted ones are built over them.
        let (encrypted, plain): (Vec<_>, Vec<_>) =
            wanted.iter().partition(|v| matches!(v.spec.backend, Backend::Encrypted(_)));
        for v in plain.into_iter().chain(encrypted) {
            let key = ObjectKey::of::<VolumeSpec>(&v.id);
            let base = match &v.spec.backend {
                Backend::Encrypted(e) => match open.get(&e.base) {
                    Some(base) if base.base.is_none() => Some((e, base.volume.clone())),
                    Some(_) => {
                        let reason = format!("volumes/{} is itself encrypted", e.base);
                        statuses.push((key, status(ObjectState::Error, reason, v.meta.generation)));
                        continue;
                    }
                    None => {
                        open.remove(&v.id);
                        let reason = format!("volumes/{} is not open", e.base);
                        statuses.push((key, status(ObjectState::Pending, reason, v.meta.generation)));
                        continue;
                    }
                },
                _ => None,
            };
            let current = open.get(&v.id).filter(|o| {
                o.spec == v.spec
                    && match (&o.base, &base) {
                        (Some(was), Some((_, now))) => Arc::ptr_eq(was, now),
                        (None, None) => true,
                        _ => false,
                    }
            });
            if current.is_some() {
                statuses.push((key, status(ObjectState::Ready, "", v.meta.generation)));
                continue;
            }
            let opened = match &base {
                Some((e, base)) => open_encrypted(&v.spec, e, base, self.keys.as_ref(), store).map(|volume| {
                    self.encrypted.insert(&v.id, volume.clone());
                    volume as SharedVolume
                }),
                None => match &v.spec.backend {
                    Backend::Spdk(bdev) => self.open_spdk(&v.spec, bdev),
                    _ => {
                        let uring = matches!(v.spec.backend, Backend::File { .. }).then(|| self.uring()).flatten();
                        open_volume(&v.spec, uring)
                    }
                },
            };
            match opened {
                Ok(volume) => {
                    tracing::info!(volume = %v.id, kind = volume.kind(), bytes = v.spec.size_bytes, "volume opened");
                    let base = base.map(|(_, b)| b);
                    open.insert(v.id.clone(), OpenVolume { spec: v.spec.clone(), volume, base });
                    changes += 1;
                    statuses.push((key, status(ObjectState::Ready, "", v.meta.generation)));
                }
                Err(reason) => {
                    open.remove(&v.id);
                    statuses.push((key, status(ObjectState::Error, reason, v.meta.generation)));
                }
            }
        }
        self.encrypted.retain(|id| open.contains_key(id));
        let mut counted = ids;
        for (_, image) in self.images.all() {
            counted.extend(image.layers.iter().map(|l| layer_volume_id(&l.layer.source)));
        }
        self.target.stats().retain(&counted);
        Ok((changes, open.iter().map(|(id, o)| (id.clone(), o.volume.clone())).collect()))
    }
}

impl StorageReconciler {
    /// The volume a namespace serves: (id its counters are kept under, the volume when it is open).
    fn namespace_volume(
        &self,
        ns: &crate::model::NamespaceSpec,
        volumes: &HashMap<String, SharedVolume>,
    ) -> (String, Option<SharedVolume>) {
        match &ns.layer {
            None => (ns.volume.clone(), volumes.get(&ns.volume).cloned()),
            Some(layer) => (layer_volume_id(&layer.source), self.images.layer(&layer.source).map(|l| l.shared)),
        }
    }

    /// Every SPDK subsystem fails: this agent has no SPDK.
    #[cfg(not(feature = "spdk"))]
    async fn apply_spdk(
        &self,
        subsystems: &[dpu_intent::Stored<SubsystemSpec>],
        _volumes: &HashMap<String, SharedVolume>,
    ) -> (BTreeMap<String, Result<bool, String>>, BTreeMap<(String, String), String>) {
        (subsystems.iter().map(|s| (s.spec.nqn.clone(), Err(NO_SPDK.to_owned()))).collect(), BTreeMap::new())
    }

    /// Applies the SPDK subsystems; returns the outcome per NQN and the namespaces waiting for their volume
    /// ((subsystem id, namespace id) → why).
    #[cfg(feature = "spdk")]
    async fn apply_spdk(
        &self,
        subsystems: &[dpu_intent::Stored<SubsystemSpec>],
        volumes: &HashMap<String, SharedVolume>,
    ) -> (BTreeMap<String, Result<bool, String>>, BTreeMap<(String, String), String>) {
        let mut pending = BTreeMap::new();
        let Some(engine) = &self.spdk else {
            return (subsystems.iter().map(|s| (s.spec.nqn.clone(), Err(NO_SPDK.to_owned()))).collect(), pending);
        };
        let mut wanted = Vec::new();
        for s in subsystems {
            let mut namespaces = Vec::new();
            for (ns_id, ns) in &s.spec.namespaces {
                match self.namespace_volume(ns, volumes) {
                    (volume_id, Some(volume)) => namespaces.push(crate::spdk::SpdkNamespace {
                        nsid: ns.nsid,
                        stats: self.target.stats().for_volume(&volume_id),
                        volume_id,
                        volume,
                        uuid: ns.uuid,
                    }),
                    (_, None) => {
                        let reason = match &ns.layer {
                            None => format!("volumes/{} is not open", ns.volume),
                            Some(layer) => format!("no resolved image has layer {}", layer.source),
                        };
                        pending.insert((s.id.clone(), ns_id.clone()), reason);
                    }
                }
            }
            wanted.push(crate::spdk::WantedSubsystem {
                nqn: s.spec.nqn.clone(),
                serial: s.spec.serial.clone(),
                model: s.spec.model.clone(),
                allow_any_host: s.spec.allow_any_host,
                hosts: s.spec.allowed_hosts.clone(),
                namespaces,
                listeners: s.spec.listeners.values().map(|l| l.address).collect(),
            });
        }
        (engine.apply(wanted).await, pending)
    }

    /// Serves the subsystems with `engine = "spdk"` through SPDK's target; returns the changes made.
    async fn reconcile_spdk(
        &self,
        subsystems: &[dpu_intent::Stored<SubsystemSpec>],
        volumes: &HashMap<String, SharedVolume>,
        statuses: &mut Vec<(ObjectKey, ObjectStatus)>,
    ) -> usize {
        let (outcome, pending) = self.apply_spdk(subsystems, volumes).await;
        let mut changes = 0;
        for s in subsystems {
            let generation = s.meta.generation;
            let result = outcome.get(&s.spec.nqn).cloned().unwrap_or(Ok(false));
            changes += usize::from(matches!(result, Ok(true)));
            let (state, reason) = match &result {
                Ok(_) => (ObjectState::Ready, String::new()),
                Err(e) => (ObjectState::Error, format!("SPDK engine: {e}")),
            };
            for ns_id in s.spec.namespaces.keys() {
                let key = ObjectKey { kind: "namespaces".into(), id: format!("{}/{ns_id}", s.id) };
                let status = match pending.get(&(s.id.clone(), ns_id.clone())) {
                    Some(why) => status(ObjectState::Pending, why.clone(), generation),
                    None => status(state, reason.clone(), generation),
                };
                statuses.push((key, status));
            }
            for l_id in s.spec.listeners.keys() {
                let key = ObjectKey { kind: "listeners".into(), id: format!("{}/{l_id}", s.id) };
                statuses.push((key, status(state, reason.clone(), generation)));
            }
            statuses.push((ObjectKey::of::<SubsystemSpec>(&s.id), status(state, reason.clone(), generation)));
        }
        changes
    }
}

/// The name a layer's I/O counters are kept under (per-volume storage stats and metrics).
pub fn layer_volume_id(source: &Digest) -> String {
    format!("layer-{}", &source.hex()[..16])
}

impl Reconciler for StorageReconciler {
    fn name(&self) -> &'static str {
        "storage"
    }

    async fn reconcile(&self, store: &Store) -> Result<Pass, ReconcileError> {
        let mut statuses = Vec::new();
        let (mut changes, volumes) = self.volumes(store, &mut statuses)?;
        let subsystems = store.list_all::<SubsystemSpec>()?;
        let registry = self.target.registry();

        // Address → (status key, generation of the owning subsystem) of every listener exported there.
        let mut wanted_listeners: BTreeMap<SocketAddr, Vec<(String, u64)>> = BTreeMap::new();
        let (spdk_subsystems, subsystems): (Vec<_>, Vec<_>) =
            subsystems.into_iter().partition(|s| s.spec.engine == Engine::Spdk);
        for s in &subsystems {
            let spec = &s.spec;
            let served = match registry.by_nqn(&spec.nqn) {
                Some(existing)
                    if existing.id == s.id && existing.serial == spec.serial && existing.model == spec.model =>
                {
                    existing
                }
                _ => {
                    let fresh = Arc::new(Subsystem::new(&s.id, &spec.nqn, &spec.serial, &spec.model));
                    registry.insert(fresh.clone());
                    changes += 1;
                    fresh
                }
            };
            changes += usize::from(served.set_hosts(spec.allow_any_host, &spec.allowed_hosts));
            let mut namespaces = Vec::new();
            for (ns_id, ns) in &spec.namespaces {
                let key = ObjectKey { kind: "namespaces".into(), id: format!("{}/{ns_id}", s.id) };
                let (volume_id, volume) = self.namespace_volume(ns, &volumes);
                match volume.as_ref() {
                    Some(volume) => {
                        let existing = served
                            .namespace(ns.nsid)
                            .filter(|old| Arc::ptr_eq(&old.volume, volume) && old.uuid == ns.uuid);
                        namespaces.push(existing.unwrap_or_else(|| {
                            Arc::new(Namespace {
                                nsid: ns.nsid,
                                volume_id: volume_id.clone(),
                                volume: volume.clone(),
                                uuid: ns.uuid,
                                stats: self.target.stats().for_volume(&volume_id),
                            })
                        }));
                        statuses.push((key, status(ObjectState::Ready, "", s.meta.generation)));
                    }
                    None => {
                        let reason = match &ns.layer {
                            None => format!("volumes/{} is not open", ns.volume),
                            Some(layer) => format!("no resolved image has layer {}", layer.source),
                        };
                        statuses.push((key, status(ObjectState::Pending, reason, s.meta.generation)));
                    }
                }
            }
            changes += served.set_namespaces(namespaces);
            let addresses: BTreeSet<SocketAddr> = spec.listeners.values().map(|l| l.address).collect();
            changes += usize::from(served.set_listeners(addresses.clone()));
            for (l_id, l) in &spec.listeners {
                wanted_listeners.entry(l.address).or_default().push((format!("{}/{l_id}", s.id), s.meta.generation));
            }
            statuses.push((ObjectKey::of::<SubsystemSpec>(&s.id), status(ObjectState::Ready, "", s.meta.generation)));
        }
        let nqns: BTreeSet<String> = subsystems.iter().map(|s| s.spec.nqn.clone()).collect();
        changes += registry.retain(&nqns);

        let mut addresses: BTreeSet<SocketAddr> = wanted_listeners.keys().copied().collect();
        addresses.extend(self.discovery);
        let (bound, failed) = self.target.set_listeners(addresses).await;
        changes += bound;
        for (address, listeners) in wanted_listeners {
            for (id, generation) in listeners {
                let state = match failed.get(&address) {
                    Some(reason) => status(ObjectState::Error, format!("binding {address}: {reason}"), generation),
                    None => status(ObjectState::Ready, "", generation),
                };
                statuses.push((ObjectKey { kind: "listeners".into(), id }, state));
            }
        }
        if changes > 0 {
            // Subsystems, hosts or addresses may differ from what discovery reported before.
            self.target.discovery_changed();
        }
        changes += self.reconcile_spdk(&spdk_subsystems, &volumes, &mut statuses).await;
        Ok(Pass { changes, statuses })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{ListenerSpec, NamespaceSpec};

    fn subsystem(nqn: &str, volume: &str, address: SocketAddr) -> SubsystemSpec {
        SubsystemSpec {
            nqn: nqn.into(),
            serial: "S1".into(),
            model: "m".into(),
            allow_any_host: true,
            allowed_hosts: BTreeSet::new(),
            namespaces: [("n1".into(), NamespaceSpec { nsid: 1, volume: volume.into(), uuid: [1; 16], layer: None })]
                .into(),
            listeners: [("tcp".into(), ListenerSpec { address })].into(),
            engine: Engine::Native,
        }
    }

    #[tokio::test]
    async fn converges_once_then_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let volume = VolumeSpec { block_size: 512, size_bytes: 1 << 20, backend: Backend::Malloc };
        store.create("v1", volume.clone()).unwrap();
        store.create("v2", volume).unwrap();
        // Two subsystems share one address.
        let address = SocketAddr::from(([127, 0, 0, 1], 0));
        store.create("a", subsystem("nqn.2026-11.io.test:a", "v1", address)).unwrap();
        store.create("b", subsystem("nqn.2026-11.io.test:b", "v2", address)).unwrap();
        store.update("b", subsystem("nqn.2026-11.io.test:b", "v2", address), None).unwrap();

        let target = Target::new();
        let reconciler = StorageReconciler::new(target.clone(), None);
        let generation = target.discovery_generation();
        let first = reconciler.reconcile(&store).await.unwrap();
        assert!(first.changes > 0);
        assert!(target.discovery_generation() > generation, "discovery must see the new subsystems");
        for (key, status) in &first.statuses {
            assert_eq!(status.state, ObjectState::Ready, "{key}: {}", status.reason);
        }
        let listener_b = first.statuses.iter().find(|(k, _)| k.kind == "listeners" && k.id == "b/tcp").unwrap();
        assert_eq!(listener_b.1.observed_generation, store.get::<SubsystemSpec>("b").unwrap().meta.generation);
        assert_eq!(target.registry().all().len(), 2);

        let generation = target.discovery_generation();
        let second = reconciler.reconcile(&store).await.unwrap();
        assert_eq!(second.changes, 0, "unchanged intent must change nothing");
        assert_eq!(target.discovery_generation(), generation);

        store.delete::<SubsystemSpec>("a", false).unwrap();
        let third = reconciler.reconcile(&store).await.unwrap();
        assert!(third.changes > 0);
        assert!(target.registry().by_nqn("nqn.2026-11.io.test:a").is_none());
    }
}
