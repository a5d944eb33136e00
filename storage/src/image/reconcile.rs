//! Converges the images the API accepted (`images/*`) into lazy volumes: resolves each converted image in its
//! registry, reads its chunk indexes, and opens one [`LazyVolume`] per layer — shared by every image with the
//! same layer — in the [`Images`] table that the storage reconciler serves layer namespaces from and the API
//! reports status from. A change of the layers that are open asks the storage reconciler for a pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dpu_intent::Store;
use dpu_intent::reconcile::{ObjectKey, ObjectState, ObjectStatus, Pass, ReconcileError, Reconciler, Trigger};

use super::Digest;
use super::cache::ChunkCache;
use super::chunk::ChunkIndex;
use super::format::{LazyLayer, lazy_layers};
use super::lazy::{FetchPolicy, LazyVolume, RegistryBlob};
use super::oci::Descriptor;
use super::registry::{Credentials, RegistryClient, RegistryError};
use super::trace::{self, Trace};
use crate::bdev::SharedVolume;
use crate::model::{ImageSpec, RegistryCredentialSpec};

/// One layer of a resolved image.
#[derive(Debug, Clone)]
pub struct ResolvedLayer {
    pub layer: LazyLayer,
    pub volume: LazyVolume,
    /// The same volume as the target serves it.
    pub shared: SharedVolume,
}

/// A resolved image: what its reference pointed at when it was resolved, and its layers, bottom first.
#[derive(Debug)]
pub struct ResolvedImage {
    pub spec: ImageSpec,
    /// Digest of the credential spec it was resolved with, so a credential change resolves again.
    credentials: Option<Digest>,
    pub manifest_digest: Digest,
    pub layers: Vec<ResolvedLayer>,
    /// The start-up trace task (replay, or record and store), stopped with the image.
    background: Option<tokio::task::AbortHandle>,
}

impl Drop for ResolvedImage {
    fn drop(&mut self) {
        if let Some(task) = &self.background {
            task.abort();
        }
    }
}

/// What the DPU does in the background for a resolved image.
#[derive(Debug, Clone, Copy)]
pub struct BackgroundPolicy {
    /// Replay a stored start-up trace as prefetch.
    pub prefetch: bool,
    /// How long after its first read an image's trace is recorded before it is stored; zero: never stored.
    pub trace_window: Duration,
    /// Background fill of every chunk not read yet, in bytes per second; zero: off.
    pub fill_bytes_per_second: u64,
}

impl Default for BackgroundPolicy {
    fn default() -> Self {
        Self { prefetch: true, trace_window: Duration::from_secs(30), fill_bytes_per_second: 0 }
    }
}

/// The resolved images, by id, shared by the image reconciler (writer), the storage reconciler and the API.
#[derive(Debug, Clone, Default)]
pub struct Images {
    inner: Arc<RwLock<HashMap<String, Arc<ResolvedImage>>>>,
}

impl Images {
    pub fn get(&self, id: &str) -> Option<Arc<ResolvedImage>> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(id).cloned()
    }

    pub fn all(&self) -> Vec<(String, Arc<ResolvedImage>)> {
        let map = self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.iter().map(|(id, image)| (id.clone(), image.clone())).collect()
    }

    /// The volume serving the layer converted from `source`, whichever image resolved it.
    pub fn layer(&self, source: &Digest) -> Option<ResolvedLayer> {
        let map = self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.values().flat_map(|image| image.layers.iter()).find(|l| l.layer.source == *source).cloned()
    }

    fn replace(&self, next: HashMap<String, Arc<ResolvedImage>>) {
        *self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
    }
}

/// The image subsystem's reconciler.
#[derive(Debug)]
pub struct ImageReconciler {
    client: Arc<RegistryClient>,
    cache: Arc<ChunkCache>,
    policy: FetchPolicy,
    images: Images,
    /// Asked for a pass when the open layers change.
    storage: Trigger,
    /// This reconciler's own trigger, for retrying images whose registry was unavailable.
    retry: Arc<std::sync::OnceLock<Trigger>>,
    background: BackgroundPolicy,
}

/// Delay before an image that failed to resolve with a retryable error is tried again.
const RETRY: Duration = Duration::from_secs(5);

impl ImageReconciler {
    pub fn new(
        client: Arc<RegistryClient>,
        cache: Arc<ChunkCache>,
        policy: FetchPolicy,
        images: Images,
        storage: Trigger,
    ) -> Self {
        Self { client, cache, policy, images, storage, retry: Arc::default(), background: BackgroundPolicy::default() }
    }

    /// Sets what is done in the background for resolved images (trace replay and recording, fill).
    pub fn with_background(mut self, background: BackgroundPolicy) -> Self {
        self.background = background;
        self
    }

    /// Where to put the trigger of the controller that runs this reconciler, once it exists: images whose
    /// registry was unavailable are retried through it.
    pub fn retry_trigger(&self) -> Arc<std::sync::OnceLock<Trigger>> {
        self.retry.clone()
    }

    async fn resolve(
        &self,
        id: &str,
        spec: &ImageSpec,
        credentials: &Credentials,
        open: &HashMap<Digest, ResolvedLayer>,
    ) -> Result<(Descriptor, Vec<ResolvedLayer>), ResolveError> {
        let (reference, _) = spec.parsed().map_err(|e| ResolveError::Final(e.to_string()))?;
        let resolution = match self.fetch(spec, credentials, open).await {
            Ok(resolution) => {
                if let Err(e) = resolution.save(self.cache.dir(), id) {
                    tracing::warn!(image = %id, error = %e, "could not record the image's resolution on disk");
                }
                resolution
            }
            Err(ResolveError::Retryable(reason)) => match Resolution::load(self.cache.dir(), id, spec) {
                Some(saved) => {
                    tracing::warn!(image = %id, %reason, "registry unavailable: serving the image as last resolved");
                    saved
                }
                None => return Err(ResolveError::Retryable(reason)),
            },
            Err(e) => return Err(e),
        };
        let mut resolved = Vec::with_capacity(resolution.layers.len());
        for (layer, index) in resolution.layers {
            if let Some(same) = open.get(&layer.source).filter(|l| l.layer.data == layer.data) {
                resolved.push(same.clone());
                continue;
            }
            let Some(index) = index else {
                return Err(ResolveError::Final(format!("no chunk index for layer {}", layer.source)));
            };
            let source = RegistryBlob {
                client: self.client.clone(),
                repository: reference.clone(),
                credentials: credentials.clone(),
                digest: layer.data.digest,
            };
            let volume = LazyVolume::new(Arc::new(index), Arc::new(source), self.cache.clone(), self.policy);
            let shared: SharedVolume = Arc::new(volume.clone());
            resolved.push(ResolvedLayer { layer, volume, shared });
        }
        Ok((resolution.manifest, resolved))
    }

    /// Reads the image's manifest and the chunk indexes of the layers not open yet from its registry.
    async fn fetch(
        &self,
        spec: &ImageSpec,
        credentials: &Credentials,
        open: &HashMap<Digest, ResolvedLayer>,
    ) -> Result<Resolution, ResolveError> {
        let (reference, platform) = spec.parsed().map_err(|e| ResolveError::Final(e.to_string()))?;
        let manifest = self.client.get_manifest(&reference, credentials, &platform).await?;
        let descriptor = Descriptor {
            media_type: manifest.media_type.clone(),
            digest: manifest.digest,
            size: manifest.bytes.len() as u64,
            platform: None,
            annotations: Default::default(),
            artifact_type: manifest.manifest.artifact_type.clone(),
        };
        let mut layers = Vec::new();
        for layer in lazy_layers(&manifest.manifest).map_err(|e| ResolveError::Final(e.to_string()))? {
            if open.get(&layer.source).is_some_and(|l| l.layer.data == layer.data) {
                layers.push((layer, None));
                continue;
            }
            let bytes = self.client.get_blob(&reference, credentials, &layer.index.digest, None).await?;
            let index = checked_index(&layer, &bytes).map_err(ResolveError::Final)?;
            layers.push((layer, Some(index)));
        }
        Ok(Resolution { spec: spec.clone(), manifest: descriptor, layers })
    }
}

/// Decodes a layer's chunk index and checks it describes the layer's data blob.
fn checked_index(layer: &LazyLayer, bytes: &[u8]) -> Result<ChunkIndex, String> {
    let index = ChunkIndex::decode(bytes).map_err(|e| e.to_string())?;
    if index.data_digest != layer.data.digest || index.data_size != layer.data.size {
        return Err(format!(
            "the chunk index of layer {} describes blob {} ({} bytes), the manifest names {} ({} bytes)",
            layer.source, index.data_digest, index.data_size, layer.data.digest, layer.data.size
        ));
    }
    Ok(index)
}

/// What an image resolved to: kept on the DPU's disk beside the chunk cache (`resolved/<image>.json`, the
/// indexes in `indexes/<digest>`), so an agent restarted while the registry is down serves the image again.
struct Resolution {
    spec: ImageSpec,
    manifest: Descriptor,
    /// Each layer with its decoded index (`None`: already open for another image).
    layers: Vec<(LazyLayer, Option<ChunkIndex>)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedResolution {
    spec: ImageSpec,
    manifest: Descriptor,
    layers: Vec<LazyLayer>,
}

impl Resolution {
    fn record(dir: &std::path::Path, id: &str) -> std::path::PathBuf {
        dir.join("resolved").join(format!("{id}.json"))
    }

    fn index_path(dir: &std::path::Path, digest: &Digest) -> std::path::PathBuf {
        dir.join("indexes").join(digest.hex())
    }

    /// Writes the record (indexes first, then the record by rename, so a crash leaves the old one or the new).
    fn save(&self, dir: &std::path::Path, id: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(dir.join("resolved"))?;
        std::fs::create_dir_all(dir.join("indexes"))?;
        for (layer, index) in &self.layers {
            let path = Self::index_path(dir, &layer.index.digest);
            if let Some(index) = index
                && !path.exists()
            {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, index.encode())?;
                std::fs::rename(&tmp, &path)?;
            }
        }
        let saved = SavedResolution {
            spec: self.spec.clone(),
            manifest: self.manifest.clone(),
            layers: self.layers.iter().map(|(l, _)| l.clone()).collect(),
        };
        let record = Self::record(dir, id);
        let tmp = record.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&saved).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &record)
    }

    /// The recorded resolution of image `id` if it was made for the same spec and every index is intact.
    fn load(dir: &std::path::Path, id: &str, spec: &ImageSpec) -> Option<Self> {
        let saved: SavedResolution = serde_json::from_slice(&std::fs::read(Self::record(dir, id)).ok()?).ok()?;
        if saved.spec != *spec {
            return None;
        }
        let mut layers = Vec::with_capacity(saved.layers.len());
        for layer in saved.layers {
            let bytes = std::fs::read(Self::index_path(dir, &layer.index.digest)).ok()?;
            if super::Digest::of(&bytes) != layer.index.digest {
                return None;
            }
            let index = checked_index(&layer, &bytes).ok()?;
            layers.push((layer, Some(index)));
        }
        Some(Self { spec: saved.spec, manifest: saved.manifest, layers })
    }
}

/// The background work of one resolved image: replay its stored start-up trace, or record one and store it;
/// then, if configured, fill the rest of its chunks at a bandwidth cap.
async fn background(
    client: Arc<RegistryClient>,
    image: String,
    spec: ImageSpec,
    credentials: Credentials,
    manifest: Descriptor,
    layers: Vec<ResolvedLayer>,
    policy: BackgroundPolicy,
) {
    let Ok((reference, _)) = spec.parsed() else { return };
    let stored = match trace::load(&client, &reference, &credentials, &manifest.digest).await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(%image, error = %e, "reading the stored start-up trace failed");
            None
        }
    };
    match stored {
        Some(t) if policy.prefetch => {
            let started = std::time::Instant::now();
            let cached = trace::replay(&layers, &t).await;
            tracing::info!(%image, chunks = t.chunks(), cached, ms = started.elapsed().as_millis() as u64, "start-up trace replayed");
        }
        Some(_) => {}
        None if !policy.trace_window.is_zero() => {
            // Record from the first read on, for the window, then store for the next cold start anywhere.
            while layers.iter().all(|l| l.volume.traced_chunks() == 0) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tokio::time::sleep(policy.trace_window).await;
            let recorded = Trace::recorded(&layers);
            match trace::store(&client, &reference, &credentials, manifest.clone(), &recorded).await {
                Ok(digest) => {
                    tracing::info!(%image, chunks = recorded.chunks(), trace = %digest, "start-up trace stored")
                }
                Err(e) => tracing::warn!(%image, error = %e, "storing the start-up trace failed"),
            }
        }
        None => {}
    }
    if policy.fill_bytes_per_second > 0 {
        fill(&image, &layers, policy.fill_bytes_per_second).await;
    }
}

/// Fetches every chunk not cached yet, a run at a time, pausing so the average stays under `rate` bytes/s.
async fn fill(image: &str, layers: &[ResolvedLayer], rate: u64) {
    const STEP: usize = 16;
    for l in layers {
        let missing: Vec<u32> =
            (0..l.volume.index().chunks.len()).filter(|&c| !l.volume.is_cached(c)).map(|c| c as u32).collect();
        for step in missing.chunks(STEP) {
            let started = std::time::Instant::now();
            let before = l.volume.stats().fetched_bytes.load(std::sync::atomic::Ordering::Relaxed);
            l.volume.prefetch(step).await;
            let bytes = l.volume.stats().fetched_bytes.load(std::sync::atomic::Ordering::Relaxed) - before;
            let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
            tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
        }
    }
    tracing::info!(%image, "background fill done");
}

enum ResolveError {
    Retryable(String),
    Final(String),
}

impl From<RegistryError> for ResolveError {
    fn from(e: RegistryError) -> Self {
        if e.is_retryable() { Self::Retryable(e.to_string()) } else { Self::Final(e.to_string()) }
    }
}

fn status(state: ObjectState, reason: impl Into<String>, generation: u64) -> ObjectStatus {
    ObjectStatus { state, reason: reason.into(), observed_generation: generation }
}

impl Reconciler for ImageReconciler {
    fn name(&self) -> &'static str {
        "images"
    }

    async fn reconcile(&self, store: &Store) -> Result<Pass, ReconcileError> {
        let wanted = store.list_all::<ImageSpec>()?;
        let credentials: BTreeMap<String, RegistryCredentialSpec> =
            store.list_all::<RegistryCredentialSpec>()?.into_iter().map(|c| (c.id, c.spec)).collect();
        let before = self.images.all().into_iter().collect::<HashMap<_, _>>();
        let mut open: HashMap<Digest, ResolvedLayer> = HashMap::new();
        for image in before.values() {
            for l in &image.layers {
                open.entry(l.layer.source).or_insert_with(|| l.clone());
            }
        }
        let mut next = HashMap::new();
        let mut statuses = Vec::new();
        let mut changes = 0;
        let mut retry = false;
        for image in &wanted {
            let key = ObjectKey::of::<ImageSpec>(&image.id);
            let generation = image.meta.generation;
            let (creds, creds_digest) = match &image.spec.credentials {
                None => (Credentials::Anonymous, None),
                Some(id) => match credentials.get(id) {
                    Some(c) => (c.credentials(), Some(Digest::of(&serde_json::to_vec(c).unwrap_or_default()))),
                    None => {
                        let reason = format!("registryCredentials/{id} does not exist");
                        statuses.push((key, status(ObjectState::Error, reason, generation)));
                        continue;
                    }
                },
            };
            if let Some(current) = before.get(&image.id)
                && current.spec == image.spec
                && current.credentials == creds_digest
            {
                next.insert(image.id.clone(), current.clone());
                statuses.push((key, status(ObjectState::Ready, "", generation)));
                continue;
            }
            match self.resolve(&image.id, &image.spec, &creds, &open).await {
                Ok((manifest, layers)) => {
                    tracing::info!(image = %image.id, manifest = %manifest.digest, layers = layers.len(), "image resolved");
                    for l in &layers {
                        open.entry(l.layer.source).or_insert_with(|| l.clone());
                    }
                    let task = tokio::spawn(background(
                        self.client.clone(),
                        image.id.clone(),
                        image.spec.clone(),
                        creds.clone(),
                        manifest.clone(),
                        layers.clone(),
                        self.background,
                    ));
                    let resolved = ResolvedImage {
                        spec: image.spec.clone(),
                        credentials: creds_digest,
                        manifest_digest: manifest.digest,
                        layers,
                        background: Some(task.abort_handle()),
                    };
                    next.insert(image.id.clone(), Arc::new(resolved));
                    changes += 1;
                    statuses.push((key, status(ObjectState::Ready, "", generation)));
                }
                Err(ResolveError::Retryable(reason)) => {
                    retry = true;
                    tracing::warn!(image = %image.id, %reason, "image not resolved; retrying");
                    statuses.push((key, status(ObjectState::Pending, reason, generation)));
                }
                Err(ResolveError::Final(reason)) => {
                    tracing::warn!(image = %image.id, %reason, "image not resolved");
                    statuses.push((key, status(ObjectState::Error, reason, generation)));
                }
            }
        }
        changes += before.keys().filter(|id| !next.contains_key(*id)).count();
        if changes > 0 {
            self.images.replace(next);
            self.storage.fire("image layers changed");
        }
        if retry && let Some(trigger) = self.retry.get().cloned() {
            tokio::spawn(async move {
                tokio::time::sleep(RETRY).await;
                trigger.fire("retrying images whose registry was unavailable");
            });
        }
        Ok(Pass { changes, statuses })
    }
}
