//! `dpu.v1.ImageService`: converted container images (`images/*`) resolved by the image reconciler, exported
//! into subsystems as read-only layer namespaces, registry credentials (`registryCredentials/*`, write-only),
//! the converter, and the chunk cache's statistics.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use dpu_intent::reconcile::{ObjectKey, StatusBoard};
use dpu_intent::{Resource, Store, Stored};
use dpu_proto::v1 as pb;
use dpu_storage::image::cache::ChunkCache;
use dpu_storage::image::convert::{self, Destination, ImageError, LayerOptions, Progress, Source};
use dpu_storage::image::oci::Platform;
use dpu_storage::image::reconcile::{Images, ResolvedImage};
use dpu_storage::image::registry::{Credentials, RegistryClient, RegistryError};
use dpu_storage::model::{
    DEFAULT_IMAGE_PLATFORM, ImageSpec, LayerRef, NamespaceSpec, RegistryCredentialSpec, SubsystemSpec, format_uuid,
};
use tokio::sync::{Mutex, mpsc};
use tonic::{Request, Response, Status};

use super::agent::{object_status, resource_status};
use super::{generation, intent_status, invalid, page, parse_name};

/// Status-board name of the image reconciler.
pub const IMAGE_SUBSYSTEM: &str = "images";

/// Implementation of `ImageService`.
#[derive(Debug)]
pub struct ImageApi {
    store: Store,
    status: StatusBoard,
    images: Images,
    cache: Arc<ChunkCache>,
    client: Arc<RegistryClient>,
    converter: LayerOptions,
    /// Shared with the storage API: serializes read-modify-write of subsystems.
    writes: Arc<Mutex<()>>,
    /// Conversions running at once (each unpacks a layer and holds its filesystem image in memory); more wait.
    conversions: Arc<tokio::sync::Semaphore>,
}

/// How many conversions run at once.
const CONCURRENT_CONVERSIONS: usize = 2;

impl ImageApi {
    pub fn new(
        store: Store,
        status: StatusBoard,
        images: Images,
        cache: Arc<ChunkCache>,
        client: Arc<RegistryClient>,
        converter: LayerOptions,
        writes: Arc<Mutex<()>>,
    ) -> Self {
        let conversions = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CONVERSIONS));
        Self { store, status, images, cache, client, converter, writes, conversions }
    }

    /// Per image id, the namespaces serving its layers: "subsystems/{s}/namespaces/{n}". One pass over the
    /// subsystems serves a whole list of images.
    fn exports(&self) -> Result<HashMap<String, Vec<String>>, Status> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for s in self.store.list_all::<SubsystemSpec>().map_err(intent_status)? {
            for (id, ns) in &s.spec.namespaces {
                for image in ns.layer.iter().flat_map(|l| &l.images) {
                    out.entry(image.clone()).or_default().push(format!("subsystems/{}/namespaces/{id}", s.id));
                }
            }
        }
        Ok(out)
    }

    fn image_message(&self, stored: Stored<ImageSpec>, exports: &HashMap<String, Vec<String>>) -> pb::Image {
        let key = ObjectKey::of::<ImageSpec>(&stored.id);
        let status = object_status(self.status.get(IMAGE_SUBSYSTEM, &key), &stored.meta);
        let mut image_status = self.images.get(&stored.id).map(|r| resolved_status(&r)).unwrap_or_default();
        image_status.exported_as = exports.get(&stored.id).cloned().unwrap_or_default();
        pb::Image {
            name: format!("images/{}", stored.id),
            reference: stored.spec.reference,
            credentials: stored.spec.credentials.map(|c| format!("registryCredentials/{c}")).unwrap_or_default(),
            platform: stored.spec.platform,
            generation: generation(stored.meta.generation),
            status: Some(status),
            image_status: Some(image_status),
        }
    }

    fn credentials(&self, name: &str, field: &str) -> Result<Credentials, Status> {
        if name.is_empty() {
            return Ok(Credentials::Anonymous);
        }
        let id = parse_name(name, RegistryCredentialSpec::KIND, field)?;
        match self.store.get::<RegistryCredentialSpec>(id) {
            Ok(c) => Ok(c.spec.credentials()),
            Err(dpu_intent::Error::NotFound { .. }) => {
                Err(Status::failed_precondition(format!("{field}: registryCredentials/{id} does not exist")))
            }
            Err(e) => Err(intent_status(e)),
        }
    }
}

/// What the status of a resolved image reports: its layers and what the cache and fetches have done for them.
fn resolved_status(image: &ResolvedImage) -> pb::ImageStatus {
    let mut status = pb::ImageStatus { manifest_digest: image.manifest_digest.to_string(), ..Default::default() };
    let mut last_error = None;
    for l in &image.layers {
        let index = l.volume.index();
        let (cached, cached_bytes) = l.volume.cached();
        let stats = l.volume.stats();
        status.bytes_total += index.image_size;
        status.bytes_cached += cached_bytes;
        status.bytes_fetched += stats.fetched_bytes.load(Relaxed);
        status.fetches += stats.fetches.load(Relaxed);
        status.corrupt_chunks += stats.corrupt_chunks.load(Relaxed);
        status.failed_reads += stats.failed_reads.load(Relaxed);
        status.trace_chunks += l.volume.traced_chunks() as u32;
        status.prefetched_chunks += stats.prefetched_chunks.load(Relaxed) as u32;
        last_error = last_error.or(l.volume.last_error());
        status.layers.push(pb::ImageLayer {
            source_digest: l.layer.source.to_string(),
            data_digest: l.layer.data.digest.to_string(),
            size_bytes: index.image_size,
            chunks: index.chunks.len() as u32,
            cached_chunks: cached as u32,
            uuid: format_uuid(&convert::layer_uuid(&l.layer.source)),
        });
    }
    status.last_error = last_error.unwrap_or_default();
    status
}

fn image_from(i: pb::Image) -> Result<ImageSpec, Status> {
    let credentials = match i.credentials.as_str() {
        "" => None,
        name => Some(parse_name(name, RegistryCredentialSpec::KIND, "image.credentials")?.to_owned()),
    };
    let platform = if i.platform.is_empty() { DEFAULT_IMAGE_PLATFORM.to_owned() } else { i.platform };
    let spec = ImageSpec { reference: i.reference, credentials, platform };
    spec.validate().map_err(invalid)?;
    Ok(spec)
}

fn credential_message(stored: Stored<RegistryCredentialSpec>) -> pb::RegistryCredential {
    pb::RegistryCredential {
        name: format!("registryCredentials/{}", stored.id),
        username: stored.spec.username.clone(),
        password: String::new(),
        token: String::new(),
        has_secret: stored.spec.has_secret(),
        generation: generation(stored.meta.generation),
    }
}

/// The gRPC status of a failed conversion.
fn convert_status(e: &ImageError) -> Status {
    let message = e.to_string();
    match e {
        ImageError::Registry(RegistryError::NotFound { .. }) => Status::not_found(message),
        ImageError::Registry(RegistryError::Unauthorized(_)) => Status::permission_denied(message),
        ImageError::Registry(RegistryError::Invalid(_)) => Status::invalid_argument(message),
        ImageError::Registry(e) if e.is_retryable() => Status::unavailable(message),
        ImageError::Layer(convert::ConvertError::MissingTool(_) | convert::ConvertError::Privilege(_)) => {
            Status::failed_precondition(message)
        }
        ImageError::Source(_) | ImageError::Manifest(_) | ImageError::Layout { .. } => {
            Status::invalid_argument(message)
        }
        _ => Status::internal(message),
    }
}

fn progress_message(p: Progress) -> Option<pb::ConvertImageProgress> {
    use pb::convert_image_progress::Event;
    let event = match p {
        Progress::Resolved { layers, bytes } => {
            Event::Started(pb::ConvertStarted { layers: layers as u32, source_bytes: bytes })
        }
        Progress::BytesIn(n) => Event::BytesIn(n),
        Progress::LayerDone { layer, reused, chunks, stored_bytes } => {
            Event::LayerDone(pb::ConvertLayerDone { layer: layer as u32, reused, chunks: chunks as u32, stored_bytes })
        }
        Progress::LayerStarted { .. } | Progress::Pushed { .. } => return None,
    };
    Some(pb::ConvertImageProgress { event: Some(event) })
}

type ProgressStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ConvertImageProgress, Status>> + Send>>;

#[tonic::async_trait]
impl pb::image_service_server::ImageService for ImageApi {
    async fn create_image(&self, r: Request<pb::CreateImageRequest>) -> Result<Response<pb::Image>, Status> {
        let r = r.into_inner();
        let spec = image_from(r.image.ok_or_else(|| Status::invalid_argument("image: required"))?)?;
        if let Some(id) = &spec.credentials {
            self.store.get::<RegistryCredentialSpec>(id).map_err(|e| match e {
                dpu_intent::Error::NotFound { .. } => {
                    Status::failed_precondition(format!("image.credentials: registryCredentials/{id} does not exist"))
                }
                e => intent_status(e),
            })?;
        }
        let created = self.store.create(&r.image_id, spec).map_err(intent_status)?;
        Ok(Response::new(self.image_message(created.into_stored(), &self.exports()?)))
    }

    async fn get_image(&self, r: Request<pb::GetImageRequest>) -> Result<Response<pb::Image>, Status> {
        let id = parse_name(&r.get_ref().name, ImageSpec::KIND, "name")?;
        let stored = self.store.get::<ImageSpec>(id).map_err(intent_status)?;
        Ok(Response::new(self.image_message(stored, &self.exports()?)))
    }

    async fn list_images(&self, r: Request<pb::ListImagesRequest>) -> Result<Response<pb::ListImagesResponse>, Status> {
        let r = r.into_inner();
        let (size, token) = page(r.page_size, &r.page_token)?;
        let page = self.store.list::<ImageSpec>(size, token).map_err(intent_status)?;
        let exports = self.exports()?;
        Ok(Response::new(pb::ListImagesResponse {
            images: page.items.into_iter().map(|i| self.image_message(i, &exports)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_image(&self, r: Request<pb::DeleteImageRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        let id = parse_name(&r.name, ImageSpec::KIND, "name")?;
        let _guard = self.writes.lock().await;
        if let Some(user) = self.exports()?.get(id).and_then(|e| e.first()) {
            return Err(Status::failed_precondition(format!(
                "images/{id} is in use: its layer is exported as {user}; unexport it first"
            )));
        }
        self.store.delete::<ImageSpec>(id, r.allow_missing).map_err(intent_status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn export_image(
        &self,
        r: Request<pb::ExportImageRequest>,
    ) -> Result<Response<pb::ExportImageResponse>, Status> {
        let r = r.into_inner();
        let image_id = parse_name(&r.image, ImageSpec::KIND, "image")?.to_owned();
        let subsystem = parse_name(&r.subsystem, SubsystemSpec::KIND, "subsystem")?;
        let stored = self.store.get::<ImageSpec>(&image_id).map_err(intent_status)?;
        let resolved = self.images.get(&image_id).filter(|r| r.spec == stored.spec).ok_or_else(|| {
            let key = ObjectKey::of::<ImageSpec>(&image_id);
            let status = resource_status(self.status.get(IMAGE_SUBSYSTEM, &key), stored.meta.generation);
            Status::failed_precondition(format!("images/{image_id} is not ready: {}", status.reason))
        })?;
        let _guard = self.writes.lock().await;
        let current = self.store.get::<SubsystemSpec>(subsystem).map_err(intent_status)?;
        let mut spec = current.spec.clone();
        let mut ids = Vec::with_capacity(resolved.layers.len());
        for l in &resolved.layers {
            let source = l.layer.source;
            let existing =
                spec.namespaces.iter_mut().find(|(_, ns)| ns.layer.as_ref().is_some_and(|x| x.source == source));
            if let Some((id, ns)) = existing {
                if let Some(layer) = ns.layer.as_mut() {
                    layer.images.insert(image_id.clone());
                }
                ids.push(id.clone());
                continue;
            }
            let nsid = spec.free_nsid().ok_or_else(|| Status::resource_exhausted("no free namespace id"))?;
            let id = format!("layer-{}", &source.hex()[..16]);
            if spec.namespaces.contains_key(&id) {
                return Err(Status::already_exists(format!("subsystems/{subsystem}/namespaces/{id} serves a volume")));
            }
            let uuid = convert::layer_uuid(&source);
            let layer = Some(LayerRef { source, images: BTreeSet::from([image_id.clone()]) });
            spec.namespaces.insert(id.clone(), NamespaceSpec { nsid, volume: String::new(), uuid, layer });
            ids.push(id);
        }
        spec.validate().map_err(invalid)?;
        let written = if spec == current.spec {
            current
        } else {
            self.store.update(subsystem, spec, Some(current.meta.generation)).map_err(intent_status)?
        };
        let namespaces = ids
            .iter()
            .map(|id| {
                let ns = &written.spec.namespaces[id];
                pb::Namespace {
                    name: format!("subsystems/{subsystem}/namespaces/{id}"),
                    nsid: ns.nsid,
                    volume: ns.layer.as_ref().map(|l| format!("layers/{}", l.source)).unwrap_or_default(),
                    uuid: format_uuid(&ns.uuid),
                    generation: generation(written.meta.generation),
                    status: None,
                }
            })
            .collect();
        Ok(Response::new(pb::ExportImageResponse { namespaces }))
    }

    async fn unexport_image(
        &self,
        r: Request<pb::UnexportImageRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        let image_id = parse_name(&r.image, ImageSpec::KIND, "image")?;
        let subsystem = parse_name(&r.subsystem, SubsystemSpec::KIND, "subsystem")?;
        let _guard = self.writes.lock().await;
        let current = self.store.get::<SubsystemSpec>(subsystem).map_err(intent_status)?;
        let mut spec = current.spec.clone();
        spec.namespaces.retain(|_, ns| match ns.layer.as_mut() {
            None => true,
            Some(layer) => {
                layer.images.remove(image_id);
                !layer.images.is_empty()
            }
        });
        if spec != current.spec {
            self.store.update(subsystem, spec, Some(current.meta.generation)).map_err(intent_status)?;
        }
        Ok(Response::new(pb::DeleteResponse {}))
    }

    type ConvertImageStream = ProgressStream;

    async fn convert_image(
        &self,
        r: Request<pb::ConvertImageRequest>,
    ) -> Result<Response<Self::ConvertImageStream>, Status> {
        let r = r.into_inner();
        let source = Source::parse(&r.source, self.credentials(&r.source_credentials, "source_credentials")?)
            .map_err(|e| Status::invalid_argument(format!("source: {e}")))?;
        let reference = r.destination.parse().map_err(|e| Status::invalid_argument(format!("destination: {e}")))?;
        let destination = Destination {
            reference,
            credentials: self.credentials(&r.destination_credentials, "destination_credentials")?,
        };
        let platform: Platform = match r.platform.as_str() {
            "" => DEFAULT_IMAGE_PLATFORM.parse(),
            p => p.parse(),
        }
        .map_err(|e| Status::invalid_argument(format!("platform: {e}")))?;
        let mut options = self.converter.clone();
        if r.chunk_size != 0 {
            let size = r.chunk_size;
            if !size.is_power_of_two()
                || !(dpu_storage::image::chunk::MIN_CHUNK..=dpu_storage::image::chunk::MAX_CHUNK).contains(&size)
            {
                return Err(Status::invalid_argument(format!(
                    "chunk_size: {size} is not a power of two between 4 KiB and 4 MiB"
                )));
            }
            options.chunk_size = size;
        }
        let (tx, rx) = mpsc::channel(64);
        let client = self.client.clone();
        let conversions = self.conversions.clone();
        tokio::spawn(async move {
            // Closed only when the agent stops; then the stream just ends.
            let Ok(_permit) = conversions.acquire_owned().await else { return };
            let events = tx.clone();
            // Progress is best effort: byte counts that find the channel full are skipped; the summary is not.
            let progress = move |p: Progress| {
                if let Some(m) = progress_message(p) {
                    let _ = events.try_send(Ok(m));
                }
            };
            let work = convert::convert_image(&client, &source, &destination, &platform, &options, &progress);
            let outcome = tokio::select! {
                outcome = work => outcome,
                () = tx.closed() => {
                    tracing::info!(destination = %destination.reference, "conversion abandoned by its client");
                    return;
                }
            };
            let last = match outcome {
                Ok(s) => {
                    tracing::info!(reference = %s.reference, layers = s.layers, reused = s.layers_reused, "image converted");
                    Ok(pb::ConvertImageProgress {
                        event: Some(pb::convert_image_progress::Event::Summary(pb::ConvertSummary {
                            reference: s.reference,
                            manifest_digest: s.manifest.map(|d| d.to_string()).unwrap_or_default(),
                            layers: s.layers as u32,
                            layers_reused: s.layers_reused as u32,
                            bytes_in: s.bytes_in,
                            bytes_out: s.bytes_out,
                            chunks: s.chunks as u64,
                            chunks_reused: s.chunks_reused as u64,
                        })),
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "image conversion failed");
                    Err(convert_status(&e))
                }
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn create_registry_credential(
        &self,
        r: Request<pb::CreateRegistryCredentialRequest>,
    ) -> Result<Response<pb::RegistryCredential>, Status> {
        let r = r.into_inner();
        let c = r.credential.ok_or_else(|| Status::invalid_argument("credential: required"))?;
        let spec = RegistryCredentialSpec { username: c.username, password: c.password, token: c.token };
        spec.validate().map_err(invalid)?;
        let created = self.store.create(&r.credential_id, spec).map_err(intent_status)?;
        Ok(Response::new(credential_message(created.into_stored())))
    }

    async fn get_registry_credential(
        &self,
        r: Request<pb::GetRegistryCredentialRequest>,
    ) -> Result<Response<pb::RegistryCredential>, Status> {
        let id = parse_name(&r.get_ref().name, RegistryCredentialSpec::KIND, "name")?;
        let stored = self.store.get::<RegistryCredentialSpec>(id).map_err(intent_status)?;
        Ok(Response::new(credential_message(stored)))
    }

    async fn list_registry_credentials(
        &self,
        r: Request<pb::ListRegistryCredentialsRequest>,
    ) -> Result<Response<pb::ListRegistryCredentialsResponse>, Status> {
        let r = r.into_inner();
        let (size, token) = page(r.page_size, &r.page_token)?;
        let page = self.store.list::<RegistryCredentialSpec>(size, token).map_err(intent_status)?;
        Ok(Response::new(pb::ListRegistryCredentialsResponse {
            credentials: page.items.into_iter().map(credential_message).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_registry_credential(
        &self,
        r: Request<pb::DeleteRegistryCredentialRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        let id = parse_name(&r.name, RegistryCredentialSpec::KIND, "name")?;
        if let Some(user) = self
            .store
            .list_all::<ImageSpec>()
            .map_err(intent_status)?
            .iter()
            .find(|i| i.spec.credentials.as_deref() == Some(id))
        {
            return Err(Status::failed_precondition(format!("registryCredentials/{id} is used by images/{}", user.id)));
        }
        self.store.delete::<RegistryCredentialSpec>(id, r.allow_missing).map_err(intent_status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn get_image_cache_stats(
        &self,
        _: Request<pb::GetImageCacheStatsRequest>,
    ) -> Result<Response<pb::ImageCacheStats>, Status> {
        let s = self.cache.stats();
        Ok(Response::new(pb::ImageCacheStats {
            capacity_bytes: self.cache.capacity_bytes(),
            used_bytes: self.cache.used_bytes(),
            chunks: self.cache.len() as u64,
            hits: s.hits.load(Relaxed),
            misses: s.misses.load(Relaxed),
            evicted: s.evicted.load(Relaxed),
            corrupt: s.corrupt.load(Relaxed),
            inserted_bytes: s.inserted_bytes.load(Relaxed),
        }))
    }
}
