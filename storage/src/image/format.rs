//! The converted image as stored in a registry: an ordinary OCI image manifest with `artifactType`
//! [`ARTIFACT_TYPE`], the source image's config blob unchanged (entrypoint, environment, platform), and for each
//! source layer, bottom first, two blobs — its chunk index ([`MEDIA_TYPE_CHUNK_INDEX`]) and its chunk data
//! ([`MEDIA_TYPE_CHUNK_DATA`]) — each annotated with the source layer's digest. The manifest's annotations name
//! the source manifest and its layers, so a converted image says what it was made from; ordinary tools (skopeo,
//! the registry's garbage collector) see only ordinary blobs.

use std::collections::BTreeMap;

use super::Digest;
use super::oci::{Descriptor, Manifest};

pub const ARTIFACT_TYPE: &str = "application/vnd.dpu-agent.image.lazy.v1";
pub const MEDIA_TYPE_CHUNK_INDEX: &str = "application/vnd.dpu-agent.image.chunk-index.v1";
pub const MEDIA_TYPE_CHUNK_DATA: &str = "application/vnd.dpu-agent.image.chunk-data.v1";
/// On each layer blob: the digest of the source layer it was converted from.
pub const ANNOTATION_SOURCE_LAYER: &str = "io.dpu-agent.image.source-layer";
/// On the manifest: the source manifest's digest, and its layers' digests (comma separated, bottom first).
pub const ANNOTATION_SOURCE_MANIFEST: &str = "io.dpu-agent.image.source-manifest";
pub const ANNOTATION_SOURCE_LAYERS: &str = "io.dpu-agent.image.source-layers";

/// Why a manifest is not a converted image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a lazily loadable image: {0}")]
pub struct FormatError(pub String);

/// One converted layer's two blobs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LazyLayer {
    pub source: Digest,
    pub index: Descriptor,
    pub data: Descriptor,
}

fn annotated(mut d: Descriptor, source: &Digest) -> Descriptor {
    d.annotations.insert(ANNOTATION_SOURCE_LAYER.into(), source.to_string());
    d
}

/// The converted image's manifest.
pub fn build_manifest(config: Descriptor, source_manifest: &Digest, layers: &[LazyLayer]) -> Manifest {
    let mut blobs = Vec::with_capacity(layers.len() * 2);
    for l in layers {
        blobs.push(annotated(l.index.clone(), &l.source));
        blobs.push(annotated(l.data.clone(), &l.source));
    }
    let mut manifest = Manifest::new(config, blobs);
    manifest.artifact_type = Some(ARTIFACT_TYPE.into());
    let sources: Vec<String> = layers.iter().map(|l| l.source.to_string()).collect();
    manifest.annotations = BTreeMap::from([
        (ANNOTATION_SOURCE_MANIFEST.to_string(), source_manifest.to_string()),
        (ANNOTATION_SOURCE_LAYERS.to_string(), sources.join(",")),
    ]);
    manifest
}

/// The converted layers of `manifest`, bottom first; refuses anything else with the reason.
pub fn lazy_layers(manifest: &Manifest) -> Result<Vec<LazyLayer>, FormatError> {
    if manifest.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
        return Err(FormatError(format!(
            "artifactType is {:?}, not {ARTIFACT_TYPE:?} (convert the image first)",
            manifest.artifact_type.as_deref().unwrap_or("absent")
        )));
    }
    if manifest.layers.is_empty() || !manifest.layers.len().is_multiple_of(2) {
        return Err(FormatError(format!("{} layer blobs is not a positive number of pairs", manifest.layers.len())));
    }
    let source_of = |i: usize, d: &Descriptor| -> Result<Digest, FormatError> {
        let text = d
            .annotations
            .get(ANNOTATION_SOURCE_LAYER)
            .ok_or_else(|| FormatError(format!("blob {i} has no {ANNOTATION_SOURCE_LAYER} annotation")))?;
        text.parse().map_err(|e| FormatError(format!("blob {i}: {e}")))
    };
    let mut layers = Vec::with_capacity(manifest.layers.len() / 2);
    for (pair, blobs) in manifest.layers.chunks_exact(2).enumerate() {
        let (index, data) = (&blobs[0], &blobs[1]);
        if index.media_type != MEDIA_TYPE_CHUNK_INDEX || data.media_type != MEDIA_TYPE_CHUNK_DATA {
            return Err(FormatError(format!(
                "layer {pair}: blobs of types {:?} and {:?}, expected a chunk index then chunk data",
                index.media_type, data.media_type
            )));
        }
        let source = source_of(pair * 2, index)?;
        if source_of(pair * 2 + 1, data)? != source {
            return Err(FormatError(format!("layer {pair}: its index and data name different source layers")));
        }
        // The index is read whole into memory: bound it by the largest index a valid layer can have.
        let max_index = 80 + 48 * super::chunk::MAX_CHUNKS;
        if index.size > max_index {
            return Err(FormatError(format!("layer {pair}: a {}-byte chunk index is implausibly large", index.size)));
        }
        layers.push(LazyLayer { source, index: index.clone(), data: data.clone() });
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::oci::{MEDIA_TYPE_OCI_CONFIG, Parsed, parse_manifest};

    fn layer(n: u8) -> LazyLayer {
        LazyLayer {
            source: Digest::of(&[n]),
            index: Descriptor::of(MEDIA_TYPE_CHUNK_INDEX, &[n, 1]),
            data: Descriptor::of(MEDIA_TYPE_CHUNK_DATA, &[n, 2]),
        }
    }

    #[test]
    fn manifests_round_trip_and_others_are_refused() {
        let config = Descriptor::of(MEDIA_TYPE_OCI_CONFIG, b"{}");
        let layers = vec![layer(1), layer(2)];
        let manifest = build_manifest(config.clone(), &Digest::of(b"src"), &layers);
        let json = manifest.to_json();
        assert_eq!(json, build_manifest(config.clone(), &Digest::of(b"src"), &layers).to_json(), "deterministic");
        let Ok(Parsed::Manifest(parsed)) = parse_manifest(None, &json) else { panic!("a valid OCI manifest") };
        let back = lazy_layers(&parsed).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].source, layers[1].source);
        assert_eq!(back[1].data.digest, layers[1].data.digest);

        let mut plain = parsed.clone();
        plain.artifact_type = None;
        assert!(lazy_layers(&plain).unwrap_err().0.contains("convert the image first"));
        let mut odd = parsed.clone();
        odd.layers.pop();
        assert!(lazy_layers(&odd).unwrap_err().0.contains("pairs"));
        let mut swapped = parsed.clone();
        swapped.layers.swap(0, 1);
        assert!(lazy_layers(&swapped).unwrap_err().0.contains("expected a chunk index"));
        let mut mixed = parsed;
        mixed.layers[1] = annotated(layers[1].data.clone(), &layers[1].source);
        assert!(lazy_layers(&mixed).unwrap_err().0.contains("different source"));
    }
}
