//! [`DpuLayers`]: the remote layer source backed by the DPU. The DPU's agent turns an image into read-only
//! NVMe namespaces, one per layer, whose blocks it fetches from the registry on first read; this host's
//! kernel mounts them, so containerd neither downloads nor unpacks the layers.
//!
//! For the first layer of an image `Prepare` asks about (per image, once, others wait):
//!
//! 1. find the image on the agent (`images/ctrd-<hash of the converted reference>`, ready), or convert it
//!    (`ConvertImage` source → `<repository>:<tag><suffix>`; the agent reuses layers it converted before) and
//!    create it, then wait until it is ready;
//! 2. `ExportImage` into the configured subsystem: one namespace per layer, UUID derived from the layer digest;
//! 3. connect this host's initiator to the subsystem unless a controller is connected (`nvme connect`);
//!
//! then for each layer: wait for the namespace with the layer's UUID to appear (the target's
//! namespace-attribute event makes the kernel rescan), mount it read-only (EROFS) at
//! `<root>/remote/<layer digest hex>`, set its readahead, and record the snapshot with labels naming the
//! image and layer.
//!
//! Whatever fails (agent unreachable, image not convertible, namespace missing) is logged, counted and
//! answered with "not here": containerd then pulls and unpacks the layer as usual. Counts since the process
//! started are in the log and in `<root>/dpu-stats.json`.
//!
//! Removing the last snapshot of a layer unmounts it; removing the last of an image unexports and deletes the
//! image on the agent. At start and on `Cleanup`, every recorded layer is mounted again (after a reboot) and
//! images this snapshotter created that no snapshot uses are unexported and deleted.

pub mod nvme;
pub mod reference;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dpu_proto::v1 as pb;
use dpu_proto::v1::image_service_client::ImageServiceClient;
use dpu_proto::v1::storage_service_client::StorageServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use self::nvme::{Sysfs, Target};
use self::reference::{IMAGE_ID_PREFIX, Reference, digest_hex, image_id};
use crate::config::DpuConfig;
use crate::snapshot::remote::{LayerFuture, LayerRequest, RecordedLayer, RemoteError, RemoteLayer, SyncFuture};
use crate::snapshot::{Labels, RemoteLayerSource};

/// Labels the snapshotter records on a layer served by the DPU.
pub const IMAGE_LABEL: &str = "containerd.io/snapshot/dpu.image";
pub const SOURCE_LABEL: &str = "containerd.io/snapshot/dpu.source";
pub const LAYER_LABEL: &str = "containerd.io/snapshot/dpu.layer";
pub const UUID_LABEL: &str = "containerd.io/snapshot/dpu.uuid";

/// The image reference and layer digest of a `Prepare`, from the labels containerd's image handlers set:
/// stargz-snapshotter's (`ctr-remote images rpull`) or the CRI plugin's.
const IMAGE_REF_LABELS: [&str; 2] =
    ["containerd.io/snapshot/remote/stargz.reference", "containerd.io/snapshot/cri.image-ref"];
const LAYER_DIGEST_LABELS: [&str; 2] =
    ["containerd.io/snapshot/remote/stargz.digest", "containerd.io/snapshot/cri.layer-digest"];

/// How often readiness and device appearance are polled.
const POLL: Duration = Duration::from_millis(100);
/// Per unary call to the agent.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The DPU as a [`RemoteLayerSource`].
#[derive(Debug)]
pub struct DpuLayers {
    config: DpuConfig,
    /// `<root>/remote`: one mount point per layer.
    layers_dir: PathBuf,
    stats_path: PathBuf,
    images: ImageServiceClient<Channel>,
    storage: StorageServiceClient<Channel>,
    sysfs: Sysfs,
    /// Per agent image id: the export once done; the lock makes concurrent layers of one image wait for one
    /// conversion and export.
    exports: tokio::sync::Mutex<HashMap<String, ExportSlot>>,
    /// The fabrics target, learnt from the agent once.
    target: tokio::sync::Mutex<Option<Target>>,
    stats: Stats,
}

/// One image's export, once made; locked while it is being made.
type ExportSlot = Arc<tokio::sync::Mutex<Option<Arc<Export>>>>;

/// An image exported into the subsystem: its layers' namespace UUIDs by source layer digest.
#[derive(Debug)]
struct Export {
    image_id: String,
    layers: HashMap<String, String>,
}

#[derive(Debug, Default)]
struct Stats {
    served: AtomicU64,
    fallbacks: AtomicU64,
    declined: AtomicU64,
    released: AtomicU64,
    /// Recorded layers mounted again by `sync` (after a restart or reboot).
    restored: AtomicU64,
    last_fallback: std::sync::Mutex<String>,
}

impl DpuLayers {
    /// A source for the snapshot root `root`; connects to the agent lazily (the first layer, or `sync`).
    pub fn new(config: DpuConfig, root: &Path) -> anyhow::Result<Self> {
        let channel = channel(&config)?;
        Ok(Self {
            layers_dir: root.join("remote"),
            stats_path: root.join("dpu-stats.json"),
            images: ImageServiceClient::new(channel.clone()),
            storage: StorageServiceClient::new(channel),
            sysfs: Sysfs::default(),
            exports: tokio::sync::Mutex::new(HashMap::new()),
            target: tokio::sync::Mutex::new(None),
            stats: Stats::default(),
            config,
        })
    }

    async fn serve(&self, image_ref: &str, digest: &str) -> Result<RemoteLayer, String> {
        let hex = digest_hex(digest).ok_or_else(|| format!("layer digest {digest:?} is not sha256:<64 hex>"))?;
        let export = self.export(image_ref).await?;
        let uuid = export.layers.get(digest).ok_or_else(|| {
            format!(
                "the DPU's image {} has no layer {digest} (was the source tag moved after conversion?)",
                export.image_id
            )
        })?;
        let dir = self.layers_dir.join(hex);
        self.mount(uuid, &dir).await?;
        let labels = Labels::from([
            (IMAGE_LABEL.to_owned(), export.image_id.clone()),
            (SOURCE_LABEL.to_owned(), image_ref.to_owned()),
            (LAYER_LABEL.to_owned(), digest.to_owned()),
            (UUID_LABEL.to_owned(), uuid.clone()),
        ]);
        Ok(RemoteLayer { dir, labels })
    }

    /// The export of the image `image_ref` names, made once.
    async fn export(&self, image_ref: &str) -> Result<Arc<Export>, String> {
        let source = Reference::parse(image_ref).map_err(|e| e.to_string())?.rewritten(&self.config.registries);
        let converted = source.converted(&self.config.converted_suffix).map_err(|e| e.to_string())?;
        let id = image_id(&converted);
        let cell = Arc::clone(self.exports.lock().await.entry(id.clone()).or_default());
        let mut slot = cell.lock().await;
        if let Some(export) = &*slot {
            return Ok(Arc::clone(export));
        }
        let timeout = Duration::from_secs(self.config.image_timeout_seconds);
        let export =
            tokio::time::timeout(timeout, self.export_now(&source, &converted, &id)).await.map_err(|_| {
                format!("finding, converting and exporting {source} took longer than {} s", timeout.as_secs())
            })??;
        let export = Arc::new(export);
        *slot = Some(Arc::clone(&export));
        Ok(export)
    }

    async fn export_now(&self, source: &Reference, converted: &Reference, id: &str) -> Result<Export, String> {
        let name = format!("images/{id}");
        let found = match self.images.clone().get_image(request(pb::GetImageRequest { name: name.clone() })).await {
            Ok(image) => Some(image.into_inner()),
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => return Err(agent_error("GetImage", &status)),
        };
        if found.is_none() {
            let started = Instant::now();
            self.convert(source, converted).await?;
            tracing::info!(
                source = %source,
                converted = %converted,
                seconds = started.elapsed().as_secs_f64(),
                "the DPU converted the image"
            );
            let image =
                pb::Image { reference: converted.to_string(), platform: self.config.platform(), ..Default::default() };
            match self
                .images
                .clone()
                .create_image(request(pb::CreateImageRequest { image_id: id.to_owned(), image: Some(image) }))
                .await
            {
                Ok(_) => {}
                Err(status) if status.code() == Code::AlreadyExists => {}
                Err(status) => return Err(agent_error("CreateImage", &status)),
            }
        }
        let image = self.wait_ready(&name).await?;
        let exported = self
            .images
            .clone()
            .export_image(request(pb::ExportImageRequest {
                image: name.clone(),
                subsystem: self.config.subsystem_name(),
            }))
            .await
            .map_err(|status| agent_error("ExportImage", &status))?
            .into_inner();
        let status = image.image_status.unwrap_or_default();
        let layers: HashMap<String, String> =
            status.layers.into_iter().map(|layer| (layer.source_digest, layer.uuid)).collect();
        tracing::info!(
            image = %name,
            reference = %converted,
            layers = layers.len(),
            namespaces = exported.namespaces.len(),
            subsystem = %self.config.subsystem_name(),
            "image exported by the DPU"
        );
        Ok(Export { image_id: id.to_owned(), layers })
    }

    /// Runs `ConvertImage` to its end: a conversion, or the reuse of one made before.
    async fn convert(&self, source: &Reference, converted: &Reference) -> Result<(), String> {
        let mut stream = self
            .images
            .clone()
            .convert_image(pb::ConvertImageRequest {
                source: source.to_string(),
                destination: converted.to_string(),
                platform: self.config.platform(),
                ..Default::default()
            })
            .await
            .map_err(|status| agent_error("ConvertImage", &status))?
            .into_inner();
        let mut summary = None;
        while let Some(progress) = stream.message().await.map_err(|status| agent_error("ConvertImage", &status))? {
            if let Some(pb::convert_image_progress::Event::Summary(s)) = progress.event {
                summary = Some(s);
            }
        }
        let summary = summary.ok_or("ConvertImage ended without a summary")?;
        tracing::debug!(
            layers = summary.layers,
            layers_reused = summary.layers_reused,
            bytes_in = summary.bytes_in,
            bytes_out = summary.bytes_out,
            "conversion summary"
        );
        Ok(())
    }

    async fn wait_ready(&self, name: &str) -> Result<pb::Image, String> {
        let mut last_reason = String::new();
        loop {
            let image = self
                .images
                .clone()
                .get_image(request(pb::GetImageRequest { name: name.to_owned() }))
                .await
                .map_err(|status| agent_error("GetImage", &status))?
                .into_inner();
            let status = image.status.clone().unwrap_or_default();
            if status.state == pb::ResourceState::Ready as i32 && status.observed_generation >= image.generation {
                return Ok(image);
            }
            if status.state == pb::ResourceState::Error as i32 && status.reason != last_reason {
                // The agent retries; so does this wait, until the image timeout.
                tracing::warn!(image = %name, reason = %status.reason, "the DPU cannot resolve the image yet");
                last_reason = status.reason;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Connects the initiator when no controller of the subsystem is, finds the namespace, mounts it at `dir`.
    async fn mount(&self, uuid: &str, dir: &Path) -> Result<(), String> {
        self.connect().await?;
        let timeout = Duration::from_secs(self.config.device_timeout_seconds);
        let deadline = Instant::now() + timeout;
        let device = loop {
            if let Some(device) = self.sysfs.namespace_by_uuid(uuid).map_err(|e| format!("reading sysfs: {e}"))? {
                break device;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no namespace with UUID {uuid} appeared on this host within {} s (is this host's NQN allowed \
                     on {}?)",
                    timeout.as_secs(),
                    self.config.subsystem_name()
                ));
            }
            tokio::time::sleep(POLL).await;
        };
        let (dir_owned, device_owned) = (dir.to_owned(), device.clone());
        tokio::task::spawn_blocking(move || nvme::mount_layer(&device_owned, &dir_owned))
            .await
            .map_err(|e| format!("mount task: {e}"))?
            .map_err(|e| e.to_string())?;
        if let Err(e) = self.sysfs.set_readahead(&device, self.config.readahead_kb) {
            tracing::warn!(device = %device, error = %e, "setting the layer's readahead");
        }
        tracing::debug!(uuid, device = %device, dir = %dir.display(), "layer mounted");
        Ok(())
    }

    async fn connect(&self) -> Result<(), String> {
        let mut known = self.target.lock().await;
        let target = match &*known {
            Some(target) => target.clone(),
            None => {
                let subsystem = self
                    .storage
                    .clone()
                    .get_subsystem(request(pb::GetSubsystemRequest { name: self.config.subsystem_name() }))
                    .await
                    .map_err(|status| agent_error("GetSubsystem", &status))?
                    .into_inner();
                let target = Target {
                    nqn: subsystem.nqn,
                    address: self.config.target_address().unwrap_or_default(),
                    port: self.config.target_port,
                    host_nqn: self.config.host_nqn.clone(),
                };
                *known = Some(target.clone());
                target
            }
        };
        let connected = self.sysfs.controllers(&target.nqn).map_err(|e| format!("reading sysfs: {e}"))?;
        if connected.is_empty() {
            nvme::connect(&target, CALL_TIMEOUT).await?;
            tracing::info!(nqn = %target.nqn, address = %target.address, port = target.port, "connected to the DPU");
        }
        Ok(())
    }

    /// Unexports and deletes an image on the agent; one that is already gone is fine.
    async fn drop_image(&self, id: &str) -> Result<(), String> {
        let name = format!("images/{id}");
        let unexport = pb::UnexportImageRequest { image: name.clone(), subsystem: self.config.subsystem_name() };
        match self.images.clone().unexport_image(request(unexport)).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return Err(agent_error("UnexportImage", &status)),
        }
        let delete = pb::DeleteImageRequest { name: name.clone(), allow_missing: true };
        self.images
            .clone()
            .delete_image(request(delete))
            .await
            .map_err(|status| agent_error("DeleteImage", &status))?;
        self.exports.lock().await.remove(id);
        tracing::info!(image = %name, "image unexported and deleted on the DPU");
        Ok(())
    }

    fn fallback(&self, target: &str, reason: &str) {
        let total = self.stats.fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut last) = self.stats.last_fallback.lock() {
            reason.clone_into(&mut last);
        }
        tracing::warn!(
            target = %target,
            reason = %reason,
            fallbacks_total = total,
            "the DPU cannot serve this layer; containerd pulls it"
        );
        self.write_stats();
    }

    /// `<root>/dpu-stats.json`, rewritten on each change (best effort: the log has the same facts).
    fn write_stats(&self) {
        let last = self.stats.last_fallback.lock().map(|s| s.clone()).unwrap_or_default();
        let stats = serde_json::json!({
            "layers_served": self.stats.served.load(Ordering::Relaxed),
            "fallbacks": self.stats.fallbacks.load(Ordering::Relaxed),
            "declined": self.stats.declined.load(Ordering::Relaxed),
            "layers_released": self.stats.released.load(Ordering::Relaxed),
            "layers_restored": self.stats.restored.load(Ordering::Relaxed),
            "last_fallback_reason": last,
        });
        let tmp = self.stats_path.with_extension("json.tmp");
        let written =
            std::fs::write(&tmp, format!("{stats:#}\n")).and_then(|()| std::fs::rename(&tmp, &self.stats_path));
        if let Err(e) = written {
            tracing::debug!(path = %self.stats_path.display(), error = %e, "writing the statistics");
        }
    }
}

impl RemoteLayerSource for DpuLayers {
    fn resolve<'a>(&'a self, layer: &'a LayerRequest) -> LayerFuture<'a> {
        Box::pin(async move {
            let label = |names: &[&str]| names.iter().find_map(|n| layer.labels.get(*n)).cloned();
            let (Some(image_ref), Some(digest)) = (label(&IMAGE_REF_LABELS), label(&LAYER_DIGEST_LABELS)) else {
                // An ordinary pull (`ctr images pull`) names no image: containerd already has the blobs.
                self.stats.declined.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target = %layer.target, "no image reference or layer digest labels; not remote");
                return Ok(None);
            };
            let started = Instant::now();
            match self.serve(&image_ref, &digest).await {
                Ok(remote) => {
                    self.stats.served.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        image = %image_ref,
                        layer = %digest,
                        dir = %remote.dir.display(),
                        seconds = started.elapsed().as_secs_f64(),
                        "layer served by the DPU"
                    );
                    self.write_stats();
                    Ok(Some(remote))
                }
                Err(reason) => {
                    self.fallback(&layer.target, &format!("{image_ref} layer {digest}: {reason}"));
                    Ok(None)
                }
            }
        })
    }

    fn release<'a>(&'a self, removed: &'a RecordedLayer, remaining: &'a [RecordedLayer]) -> SyncFuture<'a> {
        Box::pin(async move {
            let Some(image) = removed.labels.get(IMAGE_LABEL) else {
                return Ok(());
            };
            if !remaining.iter().any(|r| r.dir == removed.dir) {
                let dir = removed.dir.clone();
                tokio::task::spawn_blocking(move || nvme::unmount_layer(&dir))
                    .await
                    .map_err(|e| RemoteError::new(format!("unmount task: {e}")))?
                    .map_err(|e| RemoteError::with_source(format!("unmounting {}", removed.dir.display()), e))?;
                self.stats.released.fetch_add(1, Ordering::Relaxed);
                self.write_stats();
                tracing::info!(snapshot = %removed.name, dir = %removed.dir.display(), "layer unmounted");
            }
            if !remaining.iter().any(|r| r.labels.get(IMAGE_LABEL) == Some(image)) {
                self.drop_image(image).await.map_err(RemoteError::new)?;
            }
            Ok(())
        })
    }

    fn sync<'a>(&'a self, recorded: &'a [RecordedLayer]) -> SyncFuture<'a> {
        Box::pin(async move {
            let mut failures = Vec::new();
            for layer in recorded {
                let (Some(source), Some(digest), Some(_)) =
                    (layer.labels.get(SOURCE_LABEL), layer.labels.get(LAYER_LABEL), layer.labels.get(IMAGE_LABEL))
                else {
                    continue;
                };
                let mounted = nvme::is_mount_point(&layer.dir).unwrap_or(false);
                if mounted {
                    continue;
                }
                match self.serve(source, digest).await {
                    Ok(_) => {
                        self.stats.restored.fetch_add(1, Ordering::Relaxed);
                        self.write_stats();
                        tracing::info!(snapshot = %layer.name, dir = %layer.dir.display(), "layer mounted again");
                    }
                    Err(reason) => failures.push(format!("{}: {reason}", layer.name)),
                }
            }
            // Images this snapshotter made that no recorded layer uses and no Prepare is exporting.
            let used: BTreeSet<&str> =
                recorded.iter().filter_map(|r| r.labels.get(IMAGE_LABEL)).map(String::as_str).collect();
            let stale: Vec<String> = {
                let exports = self.exports.lock().await;
                let listed = self.list_images().await.map_err(RemoteError::new)?;
                listed
                    .into_iter()
                    .filter(|id| id.starts_with(IMAGE_ID_PREFIX) && !used.contains(id.as_str()))
                    // A locked entry is an export in progress for a Prepare.
                    .filter(|id| exports.get(id).is_none_or(|cell| cell.try_lock().is_ok()))
                    .collect()
            };
            for id in stale {
                if let Err(reason) = self.drop_image(&id).await {
                    failures.push(format!("images/{id}: {reason}"));
                }
            }
            if failures.is_empty() { Ok(()) } else { Err(RemoteError::new(failures.join("; "))) }
        })
    }
}

impl DpuLayers {
    /// The ids of every image on the agent.
    async fn list_images(&self) -> Result<Vec<String>, String> {
        let mut ids = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .images
                .clone()
                .list_images(request(pb::ListImagesRequest { page_size: 100, page_token }))
                .await
                .map_err(|status| agent_error("ListImages", &status))?
                .into_inner();
            ids.extend(page.images.into_iter().filter_map(|i| i.name.strip_prefix("images/").map(str::to_owned)));
            if page.next_page_token.is_empty() {
                return Ok(ids);
            }
            page_token = page.next_page_token;
        }
    }
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

fn agent_error(call: &str, status: &Status) -> String {
    format!("the DPU agent answered {call} with {:?}: {}", status.code(), status.message())
}

/// A lazily connecting channel to the agent's API, with mTLS for https.
fn channel(config: &DpuConfig) -> anyhow::Result<Channel> {
    use anyhow::Context as _;
    let mut endpoint = Endpoint::from_shared(config.api.clone())
        .with_context(|| format!("[dpu] api {:?} is not a URL", config.api))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    if config.api.starts_with("https://") {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let ca = config.ca.as_deref().context("[dpu] ca is required for https")?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &config.server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls).context("[dpu] TLS configuration")?;
    }
    Ok(endpoint.connect_lazy())
}
