//! OCI image manifests, indexes and descriptors (image-spec v1.1) and their Docker v2 schema 2 equivalents, as a
//! registry serves them.
//!
//! [`parse_manifest`] treats its input as hostile: the document, the number of layers and index entries, every
//! descriptor's size and every annotation map are bounded, digests must be SHA-256, and each media type must be
//! one this crate can use, so a caller gets a clear error naming what is wrong instead of a surprise later.
//! An image manifest's config must be an image config and its layers tar archives (plain, gzip or zstd);
//! a manifest with an `artifactType` is an OCI artifact and may carry any well-formed config and layer types.
//! Foreign and non-distributable layers are refused: their bytes live at external URLs this client never fetches.
//!
//! Serialization uses the OCI field names, omits empty optional fields and orders annotations (`BTreeMap`), so
//! a manifest built twice serializes to the same bytes and has one digest.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Digest;

/// OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The empty descriptor's media type (`{}`), the config of artifacts without one.
pub const MEDIA_TYPE_OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// OCI layer, uncompressed tar.
pub const MEDIA_TYPE_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI layer, gzip-compressed tar.
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI layer, zstd-compressed tar.
pub const MEDIA_TYPE_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// OCI non-distributable layer, uncompressed (deprecated in image-spec v1.1; refused).
pub const MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
/// OCI non-distributable layer, gzip (refused).
pub const MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
/// OCI non-distributable layer, zstd (refused).
pub const MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_ZSTD: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
/// Docker image manifest, schema 2.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (the Docker index).
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker layer, gzip-compressed tar.
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker foreign layer (Windows base layers served from external URLs; refused).
pub const MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// Largest manifest or index document accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Most layers one manifest may list.
pub const MAX_LAYERS: usize = 1024;
/// Most entries one index may list.
pub const MAX_INDEX_ENTRIES: usize = 1024;
/// Largest size a descriptor may declare (1 TiB).
pub const MAX_BLOB_SIZE: u64 = 1 << 40;
/// Most bytes (keys plus values) one annotation map may hold.
pub const MAX_ANNOTATION_BYTES: usize = 64 << 10;
/// Longest media type accepted (RFC 6838 allows 127 characters on each side of the slash).
const MAX_MEDIA_TYPE: usize = 255;
/// Longest platform field (os, architecture, variant) accepted.
const MAX_PLATFORM_FIELD: usize = 64;
/// Most platforms an error message lists.
const MAX_LISTED_PLATFORMS: usize = 32;

/// Why a manifest, index or platform was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OciError {
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge { what: String, size: u64, limit: u64 },
    #[error("{what} has {count} entries, over the limit of {limit}")]
    TooMany { what: &'static str, count: usize, limit: usize },
    #[error("invalid {what} JSON: {message}")]
    Json { what: &'static str, message: String },
    #[error("{what}: schemaVersion {version} is not supported (expected 2)")]
    SchemaVersion { what: &'static str, version: u64 },
    #[error("{what}: media type {media_type:?} is not {expected}")]
    MediaType { what: String, media_type: String, expected: &'static str },
    #[error("{what}: media type {media_type:?} is a foreign or non-distributable layer, stored outside the registry")]
    Nondistributable { what: String, media_type: String },
    #[error("the document is neither an image manifest nor an index (media type {0:?})")]
    UnknownDocument(String),
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("the index has no manifest for platform {wanted}; available: {available}")]
    NoMatchingPlatform { wanted: String, available: String },
    #[error("invalid platform {0:?}: expected os/architecture[/variant] in lowercase letters, digits, '.', '_', '-'")]
    Platform(String),
}

/// How a layer's tar archive is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

/// The compression of a distributable tar layer of `media_type`; `None` for anything else (configs, foreign
/// layers, artifact blobs).
pub fn layer_compression(media_type: &str) -> Option<LayerCompression> {
    match media_type {
        MEDIA_TYPE_OCI_LAYER => Some(LayerCompression::None),
        MEDIA_TYPE_OCI_LAYER_GZIP | MEDIA_TYPE_DOCKER_LAYER_GZIP => Some(LayerCompression::Gzip),
        MEDIA_TYPE_OCI_LAYER_ZSTD => Some(LayerCompression::Zstd),
        _ => None,
    }
}

/// Whether `media_type` is an image manifest (OCI or Docker).
pub fn is_manifest_type(media_type: &str) -> bool {
    matches!(media_type, MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST)
}

/// Whether `media_type` is an index (OCI index or Docker manifest list).
pub fn is_index_type(media_type: &str) -> bool {
    matches!(media_type, MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_MANIFEST_LIST)
}

fn is_config_type(media_type: &str) -> bool {
    matches!(media_type, MEDIA_TYPE_OCI_CONFIG | MEDIA_TYPE_DOCKER_CONFIG)
}

fn is_nondistributable(media_type: &str) -> bool {
    matches!(
        media_type,
        MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE
            | MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_GZIP
            | MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_ZSTD
            | MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP
    )
}

/// A content descriptor: what a blob or manifest is, its digest and size.
///
/// The `urls` field of the spec is not kept: blobs are fetched from the registry only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// The descriptor of `data` as a blob of `media_type`.
    pub fn of(media_type: &str, data: &[u8]) -> Self {
        Self {
            media_type: media_type.to_owned(),
            digest: Digest::of(data),
            size: data.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
            artifact_type: None,
        }
    }

    fn validate(&self, what: &str) -> Result<(), OciError> {
        check_media_type(what, &self.media_type)?;
        if self.size > MAX_BLOB_SIZE {
            return Err(OciError::TooLarge {
                what: format!("{what} (declared size)"),
                size: self.size,
                limit: MAX_BLOB_SIZE,
            });
        }
        check_annotations(what, &self.annotations)?;
        if let Some(artifact_type) = &self.artifact_type {
            check_media_type(&format!("{what} artifactType"), artifact_type)?;
        }
        if let Some(platform) = &self.platform {
            platform.check_bounds(what)?;
        }
        Ok(())
    }
}

/// An image manifest: one config blob and the layers, in order from the bottom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// An OCI image manifest (schema version 2) of `config` and `layers`.
    pub fn new(config: Descriptor, layers: Vec<Descriptor>) -> Self {
        Self {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_MANIFEST.to_owned()),
            artifact_type: None,
            config,
            layers,
            subject: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Checks every rule [`parse_manifest`] applies to a manifest.
    pub fn validate(&self) -> Result<(), OciError> {
        check_schema("manifest", self.schema_version)?;
        if let Some(media_type) = &self.media_type
            && !is_manifest_type(media_type)
        {
            return Err(media_type_error("manifest", media_type, "an image manifest type"));
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(OciError::TooMany { what: "manifest layers", count: self.layers.len(), limit: MAX_LAYERS });
        }
        check_annotations("manifest", &self.annotations)?;
        let artifact = match &self.artifact_type {
            Some(artifact_type) => {
                check_media_type("manifest artifactType", artifact_type)?;
                true
            }
            None => false,
        };
        self.config.validate("config")?;
        if !artifact && !is_config_type(&self.config.media_type) {
            let expected = "an image config type (OCI or Docker)";
            return Err(media_type_error("config", &self.config.media_type, expected));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let what = format!("layer {i}");
            layer.validate(&what)?;
            if is_nondistributable(&layer.media_type) {
                return Err(OciError::Nondistributable { what, media_type: layer.media_type.clone() });
            }
            if !artifact && layer_compression(&layer.media_type).is_none() {
                return Err(media_type_error(&what, &layer.media_type, "a tar layer type (plain, gzip or zstd)"));
            }
        }
        if let Some(subject) = &self.subject {
            subject.validate("subject")?;
        }
        Ok(())
    }

    /// The manifest as compact JSON; the same manifest always gives the same bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Strings, integers, digests and string-keyed maps: serialization to a Vec cannot fail.
        serde_json::to_vec(self).expect("a manifest serializes to JSON")
    }
}

/// An image index (or Docker manifest list): manifests for several platforms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Index {
    /// An OCI index (schema version 2) of `manifests`.
    pub fn new(manifests: Vec<Descriptor>) -> Self {
        Self {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_INDEX.to_owned()),
            artifact_type: None,
            manifests,
            subject: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Checks every rule [`parse_manifest`] applies to an index. Entries of unknown (well-formed) media types
    /// are allowed, as the spec requires; [`select_platform`] only picks image manifests.
    pub fn validate(&self) -> Result<(), OciError> {
        check_schema("index", self.schema_version)?;
        if let Some(media_type) = &self.media_type
            && !is_index_type(media_type)
        {
            return Err(media_type_error("index", media_type, "an index type"));
        }
        if self.manifests.len() > MAX_INDEX_ENTRIES {
            let count = self.manifests.len();
            return Err(OciError::TooMany { what: "index manifests", count, limit: MAX_INDEX_ENTRIES });
        }
        check_annotations("index", &self.annotations)?;
        if let Some(artifact_type) = &self.artifact_type {
            check_media_type("index artifactType", artifact_type)?;
        }
        for (i, entry) in self.manifests.iter().enumerate() {
            entry.validate(&format!("index entry {i}"))?;
        }
        if let Some(subject) = &self.subject {
            subject.validate("subject")?;
        }
        Ok(())
    }

    /// The index as compact JSON; the same index always gives the same bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // As for `Manifest::to_json`: nothing in an index can fail to serialize.
        serde_json::to_vec(self).expect("an index serializes to JSON")
    }
}

/// A parsed manifest document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Manifest(Manifest),
    Index(Index),
}

impl Parsed {
    /// The document's `mediaType`, or the OCI type of its kind when it has none.
    pub fn media_type(&self) -> &str {
        match self {
            Self::Manifest(m) => m.media_type.as_deref().unwrap_or(MEDIA_TYPE_OCI_MANIFEST),
            Self::Index(i) => i.media_type.as_deref().unwrap_or(MEDIA_TYPE_OCI_INDEX),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Manifest,
    Index,
}

fn kind_of(media_type: &str) -> Option<Kind> {
    if is_manifest_type(media_type) {
        Some(Kind::Manifest)
    } else if is_index_type(media_type) {
        Some(Kind::Index)
    } else {
        None
    }
}

/// The fields that tell a manifest from an index, read before the full parse.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    schema_version: Option<u64>,
    media_type: Option<String>,
    config: Option<serde::de::IgnoredAny>,
    manifests: Option<serde::de::IgnoredAny>,
}

/// Parses and validates a manifest or index served with `media_type_header` (the response's `Content-Type`).
///
/// The kind is the document's own `mediaType`; without one, the `Content-Type` if it names a manifest or index
/// type; failing both, the shape of the document (`manifests` for an index, `config` for a manifest).
pub fn parse_manifest(media_type_header: Option<&str>, bytes: &[u8]) -> Result<Parsed, OciError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        let (size, limit) = (bytes.len() as u64, MAX_MANIFEST_BYTES as u64);
        return Err(OciError::TooLarge { what: "manifest document".to_owned(), size, limit });
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| json_error("manifest", &e))?;
    let version = probe.schema_version.ok_or_else(|| invalid("manifest", "schemaVersion is missing"))?;
    if version != 2 {
        return Err(OciError::SchemaVersion { what: "manifest", version });
    }
    let kind = match probe.media_type.as_deref() {
        Some(media_type) => kind_of(media_type).ok_or_else(|| OciError::UnknownDocument(shown(media_type)))?,
        None => match media_type_header.map(essence).as_deref().and_then(kind_of) {
            Some(kind) => kind,
            None if probe.manifests.is_some() => Kind::Index,
            None if probe.config.is_some() => Kind::Manifest,
            None => return Err(OciError::UnknownDocument(shown(media_type_header.unwrap_or("none")))),
        },
    };
    match kind {
        Kind::Manifest => {
            let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| json_error("manifest", &e))?;
            manifest.validate()?;
            Ok(Parsed::Manifest(manifest))
        }
        Kind::Index => {
            let index: Index = serde_json::from_slice(bytes).map_err(|e| json_error("index", &e))?;
            index.validate()?;
            Ok(Parsed::Index(index))
        }
    }
}

/// A `Content-Type` without parameters, lowercased: `application/json; charset=utf-8` is `application/json`.
fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// An operating system and CPU architecture, as an index entry's `platform`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on, in OCI names (`x86_64` is `amd64`, `aarch64` is `arm64`).
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Self { architecture: architecture.to_owned(), os: std::env::consts::OS.to_owned(), variant: None }
    }

    /// The architecture in OCI names, accepting the kernel's (`aarch64`, `x86_64`) too.
    fn normalized_architecture(&self) -> &str {
        match self.architecture.as_str() {
            "aarch64" => "arm64",
            "x86_64" | "x86-64" => "amd64",
            other => other,
        }
    }

    /// The variant, where `arm64` without one means `v8`.
    fn normalized_variant(&self) -> Option<&str> {
        match (self.normalized_architecture(), self.variant.as_deref()) {
            ("arm64", None) => Some("v8"),
            (_, variant) => variant,
        }
    }

    fn check_bounds(&self, what: &str) -> Result<(), OciError> {
        let fields = [Some(&self.os), Some(&self.architecture), self.variant.as_ref()];
        if fields.into_iter().flatten().any(|f| f.len() > MAX_PLATFORM_FIELD) {
            return Err(invalid(what, format!("a platform field is longer than {MAX_PLATFORM_FIELD} bytes")));
        }
        Ok(())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(variant) => write!(f, "/{variant}"),
            None => Ok(()),
        }
    }
}

impl FromStr for Platform {
    type Err = OciError;

    /// Parses `os/architecture[/variant]`, as `linux/arm64` or `linux/arm64/v8`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let field = |f: &str| {
            !f.is_empty()
                && f.len() <= MAX_PLATFORM_FIELD
                && f.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        };
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| field(p)) {
            return Err(OciError::Platform(shown(s)));
        }
        Ok(Self {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }
}

/// The image manifest of `index` for `wanted`.
///
/// The os and architecture must match exactly (`aarch64`/`x86_64` count as `arm64`/`amd64`). An entry with the
/// wanted variant is preferred; an entry without a variant is accepted otherwise; `arm64` without a variant means
/// `v8`. Entries that are not image manifests (nested indexes, attestations of other types) are skipped. The
/// error lists the platforms the index has.
pub fn select_platform<'a>(index: &'a Index, wanted: &Platform) -> Result<&'a Descriptor, OciError> {
    let wanted_variant = wanted.normalized_variant();
    let mut best: Option<(u8, &Descriptor)> = None;
    for entry in index.manifests.iter().filter(|e| is_manifest_type(&e.media_type)) {
        let Some(platform) = &entry.platform else { continue };
        if platform.os != wanted.os || platform.normalized_architecture() != wanted.normalized_architecture() {
            continue;
        }
        let rank = if platform.normalized_variant() == wanted_variant {
            0
        } else if platform.variant.is_none() {
            1
        } else {
            continue;
        };
        if best.is_none_or(|(best_rank, _)| rank < best_rank) {
            best = Some((rank, entry));
        }
    }
    best.map(|(_, entry)| entry).ok_or_else(|| OciError::NoMatchingPlatform {
        wanted: wanted.to_string(),
        available: available_platforms(index),
    })
}

fn available_platforms(index: &Index) -> String {
    let mut seen: Vec<String> = Vec::new();
    for platform in index.manifests.iter().filter_map(|e| e.platform.as_ref()) {
        let name = platform.to_string();
        if !seen.contains(&name) {
            seen.push(name);
        }
    }
    if seen.is_empty() {
        return "none".to_owned();
    }
    let more = seen.len().saturating_sub(MAX_LISTED_PLATFORMS);
    seen.truncate(MAX_LISTED_PLATFORMS);
    let mut list = seen.join(", ");
    if more > 0 {
        list.push_str(&format!(" and {more} more"));
    }
    list
}

fn check_schema(what: &'static str, version: u32) -> Result<(), OciError> {
    if version == 2 { Ok(()) } else { Err(OciError::SchemaVersion { what, version: u64::from(version) }) }
}

/// A media type must be `type/subtype` of RFC 6838 restricted names.
fn check_media_type(what: &str, media_type: &str) -> Result<(), OciError> {
    let restricted = |name: &str| {
        let bytes = name.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= 127
            && bytes[0].is_ascii_alphanumeric()
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(b))
    };
    let well_formed = media_type.len() <= MAX_MEDIA_TYPE
        && media_type.split_once('/').is_some_and(|(kind, sub)| restricted(kind) && restricted(sub));
    if well_formed { Ok(()) } else { Err(media_type_error(what, media_type, "a well-formed media type")) }
}

fn check_annotations(what: &str, annotations: &BTreeMap<String, String>) -> Result<(), OciError> {
    let total: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_ANNOTATION_BYTES {
        let (size, limit) = (total as u64, MAX_ANNOTATION_BYTES as u64);
        return Err(OciError::TooLarge { what: format!("{what} annotations"), size, limit });
    }
    if annotations.keys().any(|k| k.is_empty()) {
        return Err(invalid(what, "an annotation key is empty"));
    }
    Ok(())
}

fn media_type_error(what: &str, media_type: &str, expected: &'static str) -> OciError {
    OciError::MediaType { what: what.to_owned(), media_type: shown(media_type), expected }
}

fn invalid(what: &str, message: impl Into<String>) -> OciError {
    OciError::Invalid { what: what.to_owned(), message: message.into() }
}

fn json_error(what: &'static str, e: &serde_json::Error) -> OciError {
    let message = e.to_string();
    OciError::Json { what, message: shown(&message) }
}

/// At most 256 characters of untrusted text, for error messages.
fn shown(s: &str) -> String {
    const MAX: usize = 256;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn descriptor(media_type: &str, n: u8) -> serde_json::Value {
        serde_json::json!({ "mediaType": media_type, "digest": digest(n).to_string(), "size": 100 + u64::from(n) })
    }

    fn manifest_json(layers: Vec<serde_json::Value>) -> serde_json::Value {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": descriptor(MEDIA_TYPE_OCI_CONFIG, 0),
            "layers": layers,
        })
    }

    fn parse(value: &serde_json::Value) -> Result<Parsed, OciError> {
        parse_manifest(None, &serde_json::to_vec(value).unwrap())
    }

    fn platform_entry(platform: &str, n: u8) -> Descriptor {
        Descriptor { platform: Some(platform.parse().unwrap()), ..Descriptor::of(MEDIA_TYPE_OCI_MANIFEST, &[n]) }
    }

    #[test]
    fn parses_oci_and_docker_manifests() {
        let doc =
            manifest_json(vec![descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, 1), descriptor(MEDIA_TYPE_OCI_LAYER_ZSTD, 2)]);
        let Parsed::Manifest(m) = parse(&doc).unwrap() else { panic!("not a manifest") };
        assert_eq!(m.layers.len(), 2);
        assert_eq!(m.layers[1].digest, digest(2));
        assert_eq!(m.config.size, 100);
        assert_eq!(layer_compression(&m.layers[1].media_type), Some(LayerCompression::Zstd));

        let docker = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
            "config": descriptor(MEDIA_TYPE_DOCKER_CONFIG, 0),
            "layers": [descriptor(MEDIA_TYPE_DOCKER_LAYER_GZIP, 1)],
        });
        let parsed = parse(&docker).unwrap();
        assert_eq!(parsed.media_type(), MEDIA_TYPE_DOCKER_MANIFEST);
    }

    #[test]
    fn detects_the_kind_from_content_type_then_shape() {
        let mut doc = manifest_json(vec![descriptor(MEDIA_TYPE_OCI_LAYER, 1)]);
        doc.as_object_mut().unwrap().remove("mediaType");
        let bytes = serde_json::to_vec(&doc).unwrap();
        assert!(matches!(parse_manifest(None, &bytes), Ok(Parsed::Manifest(_))));
        let header = "application/vnd.oci.image.manifest.v1+json; charset=utf-8";
        assert!(matches!(parse_manifest(Some(header), &bytes), Ok(Parsed::Manifest(_))));
        // The header names an index, so the document must be one.
        let err = parse_manifest(Some(MEDIA_TYPE_OCI_INDEX), &bytes).unwrap_err();
        assert!(err.to_string().contains("manifests"), "{err}");

        let index = serde_json::json!({ "schemaVersion": 2, "manifests": [] });
        let bytes = serde_json::to_vec(&index).unwrap();
        assert!(matches!(parse_manifest(Some("application/json"), &bytes), Ok(Parsed::Index(_))));
        let neither = serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2 })).unwrap();
        assert!(matches!(parse_manifest(None, &neither), Err(OciError::UnknownDocument(_))));
        let unknown = serde_json::json!({ "schemaVersion": 2, "mediaType": "text/plain", "config": {} });
        assert!(matches!(parse(&unknown), Err(OciError::UnknownDocument(t)) if t == "text/plain"));
    }

    #[test]
    fn refuses_oversized_documents_and_counts() {
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(parse_manifest(None, &huge), Err(OciError::TooLarge { .. })));

        let layers = (0..=MAX_LAYERS).map(|i| descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, i as u8)).collect();
        let err = parse(&manifest_json(layers)).unwrap_err();
        assert!(matches!(err, OciError::TooMany { count: 1025, .. }), "{err}");

        let entries: Vec<_> = (0..=MAX_INDEX_ENTRIES).map(|i| descriptor(MEDIA_TYPE_OCI_MANIFEST, i as u8)).collect();
        let index = serde_json::json!({ "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": entries });
        assert!(matches!(parse(&index), Err(OciError::TooMany { what: "index manifests", .. })));

        let mut big = descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, 1);
        big["size"] = serde_json::json!(MAX_BLOB_SIZE + 1);
        let err = parse(&manifest_json(vec![big])).unwrap_err();
        assert!(err.to_string().starts_with("layer 0 (declared size)"), "{err}");
        let mut negative = descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, 1);
        negative["size"] = serde_json::json!(-1);
        assert!(matches!(parse(&manifest_json(vec![negative])), Err(OciError::Json { .. })));

        let mut annotated = manifest_json(vec![]);
        annotated["annotations"] = serde_json::json!({ "k": "v".repeat(MAX_ANNOTATION_BYTES) });
        let err = parse(&annotated).unwrap_err();
        assert!(matches!(&err, OciError::TooLarge { what, .. } if what == "manifest annotations"), "{err}");
        let mut layer = descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, 1);
        layer["annotations"] = serde_json::json!({ "": "x" });
        assert!(matches!(parse(&manifest_json(vec![layer])), Err(OciError::Invalid { .. })));
    }

    #[test]
    fn names_wrong_media_types_schema_versions_and_digests() {
        let err = parse(&manifest_json(vec![descriptor("application/octet-stream", 1)])).unwrap_err();
        assert!(matches!(&err, OciError::MediaType { what, .. } if what == "layer 0"), "{err}");
        assert!(err.to_string().contains("application/octet-stream"));

        let err = parse(&manifest_json(vec![descriptor(MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP, 1)])).unwrap_err();
        assert!(matches!(err, OciError::Nondistributable { .. }), "{err}");
        let err = parse(&manifest_json(vec![descriptor(MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_GZIP, 1)])).unwrap_err();
        assert!(err.to_string().contains("non-distributable"), "{err}");

        let mut doc = manifest_json(vec![]);
        doc["config"] = descriptor(MEDIA_TYPE_OCI_LAYER, 0);
        assert!(matches!(parse(&doc), Err(OciError::MediaType { what, .. }) if what == "config"));
        doc["config"] = descriptor("not a media type", 0);
        assert!(matches!(parse(&doc), Err(OciError::MediaType { expected: "a well-formed media type", .. })));

        let mut doc = manifest_json(vec![]);
        doc["schemaVersion"] = serde_json::json!(1);
        assert!(matches!(parse(&doc), Err(OciError::SchemaVersion { version: 1, .. })));
        doc.as_object_mut().unwrap().remove("schemaVersion");
        assert!(matches!(parse(&doc), Err(OciError::Invalid { .. })));

        let mut layer = descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, 1);
        layer["digest"] = serde_json::json!("sha512:abcd");
        let err = parse(&manifest_json(vec![layer])).unwrap_err();
        assert!(err.to_string().contains("sha512"), "{err}");
        let mut layer = descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, 1);
        layer["digest"] = serde_json::json!("sha256:XYZ");
        assert!(matches!(parse(&manifest_json(vec![layer])), Err(OciError::Json { .. })));

        let duplicate = br#"{"schemaVersion":2,"schemaVersion":2,"config":{},"layers":[]}"#;
        assert!(matches!(parse_manifest(None, duplicate), Err(OciError::Json { .. })));
        assert!(matches!(parse_manifest(None, b"\xff\xfe"), Err(OciError::Json { .. })));
    }

    #[test]
    fn artifacts_may_carry_any_well_formed_types() {
        let mut doc = manifest_json(vec![descriptor("application/vnd.example.chunks.v1", 1)]);
        doc["config"] = descriptor(MEDIA_TYPE_OCI_EMPTY, 0);
        assert!(matches!(parse(&doc), Err(OciError::MediaType { .. })));
        doc["artifactType"] = serde_json::json!("application/vnd.example.image.v1");
        assert!(matches!(parse(&doc), Ok(Parsed::Manifest(_))));
        doc["layers"] = serde_json::json!([descriptor(MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP, 1)]);
        assert!(matches!(parse(&doc), Err(OciError::Nondistributable { .. })));
    }

    #[test]
    fn serializes_deterministically_with_oci_field_names() {
        let build = || {
            let mut layer = Descriptor::of(MEDIA_TYPE_OCI_LAYER_GZIP, b"layer");
            layer.annotations.insert("z.last".into(), "1".into());
            layer.annotations.insert("a.first".into(), "2".into());
            let mut m = Manifest::new(Descriptor::of(MEDIA_TYPE_OCI_CONFIG, b"{}"), vec![layer]);
            m.annotations.insert("org.opencontainers.image.created".into(), "2026-01-01T00:00:00Z".into());
            m.to_json()
        };
        let bytes = build();
        assert_eq!(bytes, build());
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with(r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","#));
        assert!(text.find("a.first").unwrap() < text.find("z.last").unwrap());
        for absent in ["artifactType", "subject", "platform", "urls", "null"] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
        let Parsed::Manifest(parsed) = parse_manifest(None, &bytes).unwrap() else { panic!("not a manifest") };
        assert_eq!(parsed.to_json(), bytes);

        let index = Index::new(vec![platform_entry("linux/arm64", 1)]);
        let text = String::from_utf8(index.to_json()).unwrap();
        assert!(text.contains(r#""platform":{"architecture":"arm64","os":"linux"}"#), "{text}");
        assert_eq!(parse_manifest(None, text.as_bytes()).unwrap(), Parsed::Index(index));
    }

    #[test]
    fn platforms_parse_print_and_map_the_host() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str(), p.variant.as_deref()), ("linux", "arm64", Some("v8")));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!("linux/amd64".parse::<Platform>().unwrap().to_string(), "linux/amd64");
        for bad in ["linux", "linux/", "/amd64", "linux/amd64/v1/x", "Linux/amd64", "linux/amd 64", ""] {
            assert!(matches!(bad.parse::<Platform>(), Err(OciError::Platform(_))), "{bad}");
        }
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        let expected = if cfg!(target_arch = "x86_64") { "amd64" } else { "arm64" };
        assert_eq!(host.architecture, expected);
    }

    #[test]
    fn selects_platforms() {
        let index = Index::new(vec![
            platform_entry("linux/amd64", 1),
            platform_entry("linux/arm/v7", 2),
            platform_entry("linux/arm64", 3),
            platform_entry("linux/arm64/v8", 4),
            Descriptor {
                platform: Some("unknown/unknown".parse().unwrap()),
                ..Descriptor::of("application/vnd.in-toto+json", &[5])
            },
        ]);
        let pick = |p: &str| select_platform(&index, &p.parse().unwrap()).map(|d| d.digest);
        assert_eq!(pick("linux/amd64").unwrap(), digest(1));
        assert_eq!(pick("linux/arm/v7").unwrap(), digest(2));
        // arm64 without a variant is v8: the first entry matches exactly.
        assert_eq!(pick("linux/arm64/v8").unwrap(), digest(3));
        assert_eq!(pick("linux/arm64").unwrap(), digest(3));
        let aarch64 = Platform { architecture: "aarch64".into(), os: "linux".into(), variant: None };
        assert_eq!(select_platform(&index, &aarch64).unwrap().digest, digest(3));

        let err = pick("linux/arm/v6").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("linux/arm/v6"), "{text}");
        assert!(text.contains("linux/amd64, linux/arm/v7, linux/arm64, linux/arm64/v8, unknown/unknown"), "{text}");
        assert!(matches!(pick("windows/amd64"), Err(OciError::NoMatchingPlatform { .. })));

        // An exact variant wins over a missing one, whatever the order.
        let index = Index::new(vec![platform_entry("linux/arm/v7", 6), platform_entry("linux/arm", 7)]);
        assert_eq!(select_platform(&index, &"linux/arm".parse().unwrap()).unwrap().digest, digest(7));
        let index = Index::new(vec![platform_entry("linux/arm", 7), platform_entry("linux/arm/v7", 6)]);
        assert_eq!(select_platform(&index, &"linux/arm/v7".parse().unwrap()).unwrap().digest, digest(6));
        // Missing variant is accepted when nothing better exists; a different variant is not.
        assert_eq!(select_platform(&index, &"linux/arm/v5".parse().unwrap()).unwrap().digest, digest(7));
        let index = Index::new(vec![platform_entry("linux/arm64/v9", 8)]);
        assert!(select_platform(&index, &"linux/arm64".parse().unwrap()).is_err());
        let err = select_platform(&Index::new(vec![]), &Platform::host()).unwrap_err();
        assert!(err.to_string().ends_with("available: none"), "{err}");
    }

    #[test]
    fn long_platform_lists_are_cut() {
        let entries = (0..40u8).map(|i| platform_entry(&format!("linux/arch{i}"), i)).collect();
        let err = select_platform(&Index::new(entries), &"linux/amd64".parse().unwrap()).unwrap_err();
        assert!(err.to_string().ends_with("and 8 more"), "{err}");
    }
}
