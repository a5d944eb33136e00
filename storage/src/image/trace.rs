//! Start-up traces: which chunks of each layer an image's first start read, in order. The DPU sees every block
//! the host reads, so it records the trace itself; it stores the trace in the registry beside the converted
//! image, where every DPU finds it, and replays it as prefetch on the next cold start of that image.
//!
//! Stored as an OCI artifact: a manifest with `artifactType` [`ARTIFACT_TYPE`], the empty config, one JSON blob
//! ([`MEDIA_TYPE_TRACE`]) and `subject` = the converted image's manifest, tagged `sha256-<hex>.trace` after the
//! image's manifest digest (the tag schema OCI 1.1 gives registries without the referrers API, which includes
//! Debian's docker-registry).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Digest;
use super::oci::{self, Descriptor, Manifest, Parsed};
use super::reconcile::ResolvedLayer;
use super::registry::{Credentials, Reference, RegistryClient, RegistryError};

pub const ARTIFACT_TYPE: &str = "application/vnd.dpu-agent.image.trace.v1";
pub const MEDIA_TYPE_TRACE: &str = "application/vnd.dpu-agent.image.trace.v1+json";
/// Most chunks a stored trace may name per layer (a hostile trace cannot make the DPU prefetch more).
pub const MAX_TRACE_CHUNKS: usize = 1 << 20;

/// Chunk indexes per source layer, in the order they were first read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub layers: BTreeMap<Digest, Vec<u32>>,
}

impl Trace {
    /// The trace the layers' volumes have recorded so far.
    pub fn recorded(layers: &[ResolvedLayer]) -> Self {
        let layers = layers
            .iter()
            .map(|l| (l.layer.source, l.volume.trace()))
            .filter(|(_, chunks)| !chunks.is_empty())
            .collect();
        Self { layers }
    }

    pub fn chunks(&self) -> usize {
        self.layers.values().map(Vec::len).sum()
    }
}

/// The tag a trace of the image with manifest `digest` is stored under.
pub fn tag_for(digest: &Digest) -> String {
    format!("sha256-{}.trace", digest.hex())
}

/// The stored trace of the image whose manifest is `subject`, if any.
pub async fn load(
    client: &RegistryClient,
    image: &Reference,
    creds: &Credentials,
    subject: &Digest,
) -> Result<Option<Trace>, RegistryError> {
    let reference = image.with_tag(&tag_for(subject))?;
    let raw = match client.get_manifest_raw(&reference, creds).await {
        Ok(raw) => raw,
        Err(RegistryError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Parsed::Manifest(manifest) = oci::parse_manifest(raw.content_type.as_deref(), &raw.bytes)? else {
        return Err(RegistryError::Protocol(format!("{reference} is an index, not a trace")));
    };
    let blob = match (manifest.artifact_type.as_deref(), manifest.layers.as_slice()) {
        (Some(ARTIFACT_TYPE), [blob]) if blob.media_type == MEDIA_TYPE_TRACE => blob.clone(),
        _ => return Err(RegistryError::Protocol(format!("{reference} is not a start-up trace"))),
    };
    if manifest.subject.as_ref().is_none_or(|s| s.digest != *subject) {
        return Err(RegistryError::Protocol(format!("{reference} is a trace of another image")));
    }
    let bytes = client.get_blob(image, creds, &blob.digest, None).await?;
    let trace: Trace =
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Protocol(format!("trace {}: {e}", blob.digest)))?;
    if let Some((layer, chunks)) = trace.layers.iter().find(|(_, c)| c.len() > MAX_TRACE_CHUNKS) {
        return Err(RegistryError::Protocol(format!("trace names {} chunks of layer {layer}", chunks.len())));
    }
    Ok(Some(trace))
}

/// Stores `trace` for the image whose manifest is `subject`; returns the trace manifest's digest.
pub async fn store(
    client: &RegistryClient,
    image: &Reference,
    creds: &Credentials,
    subject: Descriptor,
    trace: &Trace,
) -> Result<Digest, RegistryError> {
    let empty = b"{}";
    let config = Descriptor::of(oci::MEDIA_TYPE_OCI_EMPTY, empty);
    client.push_blob(image, creds, &config.digest, Bytes::from_static(empty)).await?;
    let json = serde_json::to_vec(trace).map_err(|e| RegistryError::Invalid(e.to_string()))?;
    let blob = Descriptor::of(MEDIA_TYPE_TRACE, &json);
    client.push_blob(image, creds, &blob.digest, Bytes::from(json)).await?;
    let tag = tag_for(&subject.digest);
    let mut manifest = Manifest::new(config, vec![blob]);
    manifest.artifact_type = Some(ARTIFACT_TYPE.into());
    manifest.subject = Some(subject);
    client.push_manifest(image, creds, &tag, oci::MEDIA_TYPE_OCI_MANIFEST, Bytes::from(manifest.to_json())).await
}

/// Prefetches the traced chunks of `layers`, earliest first in batches; returns how many of them are cached
/// now (fetched, or there already).
pub async fn replay(layers: &[ResolvedLayer], trace: &Trace) -> usize {
    const BATCH: usize = 64;
    let by_source: HashMap<Digest, &ResolvedLayer> = layers.iter().map(|l| (l.layer.source, l)).collect();
    let mut fetched = 0;
    // Round-robin over the layers, so each one's earliest chunks come before any layer's later ones.
    let mut cursors: Vec<(&ResolvedLayer, &[u32])> =
        trace.layers.iter().filter_map(|(source, chunks)| Some((*by_source.get(source)?, chunks.as_slice()))).collect();
    while cursors.iter().any(|(_, rest)| !rest.is_empty()) {
        let mut round = Vec::new();
        for (layer, rest) in &mut cursors {
            let (now, later) = rest.split_at(rest.len().min(BATCH));
            *rest = later;
            if !now.is_empty() {
                round.push(async move {
                    let failed = layer.volume.prefetch(now).await;
                    now.len().saturating_sub(failed)
                });
            }
        }
        fetched += futures_util::future::join_all(round).await.into_iter().sum::<usize>();
    }
    fetched
}
