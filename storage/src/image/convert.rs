//! The converter: an OCI layer (a tar, maybe gzip-compressed) becomes a read-only EROFS filesystem image, cut
//! into chunks (see [`super::chunk`]).
//!
//! A layer is unpacked into a scratch directory with its owners, modes, times and extended attributes, OCI
//! whiteouts become overlayfs whiteouts (`.wh.NAME` → a 0/0 character device `NAME`; `.wh..wh..opq` → the
//! directory's `trusted.overlay.opaque=y`), so the host stacks the layers with overlayfs as containerd does.
//! Then `mkfs.erofs` (erofs-utils) builds an uncompressed image with 4 KiB blocks — the host reads plain blocks;
//! decompression and verification happen on the DPU, per chunk.
//!
//! Reproducible: directory times are restored after unpacking, the filesystem UUID is derived from the layer's
//! digest, and the superblock's build time (the one field `mkfs.erofs` takes from the clock) is set to zero with
//! its checksum recomputed, so converting a layer twice gives the same bytes and so the same digests.

use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use super::Digest;
use super::chunk::{Chunked, Compression, chunk_image};

/// Media types of source layers the converter reads.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Default chunk size (see docs/benchmarks.md for how it was chosen).
pub const DEFAULT_CHUNK_SIZE: u32 = 32 << 10;

/// Why a layer could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("layer media type {0:?} is not supported (tar, tar+gzip or Docker's tar.gzip)")]
    MediaType(String),
    #[error("{0} is not installed or not on PATH (erofs-utils provides it)")]
    MissingTool(String),
    #[error("mkfs.erofs failed ({status}): {stderr}")]
    Mkfs { status: String, stderr: String },
    #[error("layer entry {path:?}: {reason}")]
    Entry { path: String, reason: String },
    #[error("unpacking the layer needs root (creating whiteout devices and setting owners): {0}")]
    Privilege(io::Error),
    #[error("the filesystem image is not an EROFS image: {0}")]
    NotErofs(String),
    #[error(transparent)]
    Chunk(#[from] super::chunk::IndexError),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ConvertError {
    let context = context.into();
    move |source| ConvertError::Io { context, source }
}

/// How layers are converted.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    pub chunk_size: u32,
    pub compression: Compression,
    /// Scratch space for unpacked layers and images (removed after each layer).
    pub work_dir: PathBuf,
    /// The `mkfs.erofs` program.
    pub mkfs: PathBuf,
}

impl LayerOptions {
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: Compression::DEFAULT,
            work_dir: work_dir.into(),
            mkfs: "mkfs.erofs".into(),
        }
    }
}

/// One converted layer.
#[derive(Debug)]
pub struct ConvertedLayer {
    pub chunked: Chunked,
    /// The encoded chunk index.
    pub index_blob: Vec<u8>,
    /// Regular files, directories, links and whiteouts unpacked.
    pub entries: u64,
}

/// The filesystem UUID of a layer's image: its digest's first 16 bytes, marked as an RFC 4122 name-based UUID.
pub fn layer_uuid(layer: &Digest) -> [u8; 16] {
    let mut id = [0u8; 16];
    id.copy_from_slice(&layer.0[..16]);
    id[6] = (id[6] & 0x0f) | 0x50;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// Converts the layer blob at `blob` (already verified against `digest`) of `media_type`. Blocking.
pub fn convert_layer(
    blob: &Path,
    media_type: &str,
    digest: &Digest,
    options: &LayerOptions,
) -> Result<ConvertedLayer, ConvertError> {
    let (image, entries) = layer_filesystem(blob, media_type, digest, options)?;
    let chunked = chunk_image(&image, options.chunk_size, options.compression)?;
    let index_blob = chunked.index.encode();
    Ok(ConvertedLayer { chunked, index_blob, entries })
}

/// The layer's EROFS filesystem image (before chunking) and the number of tar entries. Blocking.
pub fn layer_filesystem(
    blob: &Path,
    media_type: &str,
    digest: &Digest,
    options: &LayerOptions,
) -> Result<(Vec<u8>, u64), ConvertError> {
    let file = std::fs::File::open(blob).map_err(io_err(format!("opening {}", blob.display())))?;
    let reader: Box<dyn Read> = match media_type {
        LAYER_TAR => Box::new(BufReader::new(file)),
        LAYER_TAR_GZIP | DOCKER_LAYER_GZIP => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))),
        other => return Err(ConvertError::MediaType(other.to_string())),
    };
    std::fs::create_dir_all(&options.work_dir).map_err(io_err("creating the converter's work directory"))?;
    let scratch = tempfile::Builder::new()
        .prefix(&format!("layer-{}-", &digest.hex()[..12]))
        .tempdir_in(&options.work_dir)
        .map_err(io_err("creating a scratch directory"))?;
    let root = scratch.path().join("root");
    std::fs::create_dir(&root).map_err(io_err("creating the unpack directory"))?;
    let entries = unpack(reader, &root)?;
    let image_path = scratch.path().join("layer.erofs");
    mkfs(&options.mkfs, &image_path, &root, &layer_uuid(digest))?;
    let mut image = std::fs::read(&image_path).map_err(io_err("reading the built image"))?;
    normalize_superblock(&mut image)?;
    Ok((image, entries))
}

/// Unpacks a layer tar into `root`, turning OCI whiteouts into overlayfs ones. Returns the entry count.
fn unpack(reader: impl Read, root: &Path) -> Result<u64, ConvertError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    // Directory times from their entries, set once everything inside each directory exists.
    let mut dir_times: std::collections::HashMap<PathBuf, u64> = std::collections::HashMap::new();
    let mut opaque = Vec::new();
    let mut count = 0;
    for entry in archive.entries().map_err(io_err("reading the layer tar"))? {
        let mut entry = entry.map_err(io_err("reading the layer tar"))?;
        let raw = entry.path().map_err(io_err("reading an entry name"))?.into_owned();
        let shown = raw.display().to_string();
        let rel = clean_path(&raw).ok_or_else(|| ConvertError::Entry {
            path: shown.clone(),
            reason: "escapes the layer root (absolute or `..`)".into(),
        })?;
        count += 1;
        let header = entry.header();
        let mtime = header.mtime().unwrap_or(0);
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if name == ".wh..wh..opq" {
            let dir = root.join(rel.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
            opaque.push(dir);
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            if hidden.is_empty() || hidden.starts_with(".wh.") {
                return Err(ConvertError::Entry { path: shown, reason: "malformed whiteout".into() });
            }
            let parent = root.join(rel.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&parent).map_err(io_err(format!("creating {}", parent.display())))?;
            let uid = header.uid().unwrap_or(0) as u32;
            let gid = header.gid().unwrap_or(0) as u32;
            whiteout(&parent.join(hidden), uid, gid, mtime)?;
            continue;
        }
        let is_dir = header.entry_type().is_dir();
        let unpacked =
            entry.unpack_in(root).map_err(|e| ConvertError::Entry { path: shown.clone(), reason: error_chain(&e) })?;
        if !unpacked {
            return Err(ConvertError::Entry {
                path: shown,
                reason: "refused by the unpacker (outside the root)".into(),
            });
        }
        if is_dir {
            dir_times.insert(root.join(&rel), mtime);
        }
    }
    for dir in opaque {
        xattr::set(&dir, "trusted.overlay.opaque", b"y")
            .map_err(io_err(format!("marking {} opaque", dir.display())))?;
    }
    // Every directory gets a time: its entry's, or zero when it was created implicitly (no entry of its own).
    // Setting a directory's time does not change its parent's, so the order does not matter.
    for dir in all_dirs(root)? {
        let secs = dir_times.get(&dir).copied().unwrap_or(0);
        let f = std::fs::File::open(&dir).map_err(io_err(format!("opening {}", dir.display())))?;
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .map_err(io_err(format!("setting the time of {}", dir.display())))?;
    }
    Ok(count)
}

/// Every directory under `root`, `root` included (symbolic links are not followed).
fn all_dirs(root: &Path) -> Result<Vec<PathBuf>, ConvertError> {
    let mut stack = vec![root.to_path_buf()];
    let mut found = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io_err(format!("listing {}", dir.display())))? {
            let e = e.map_err(io_err("listing the unpacked layer"))?;
            if e.file_type().map_err(io_err("reading a file type"))?.is_dir() {
                stack.push(e.path());
            }
        }
        found.push(dir);
    }
    Ok(found)
}

/// An error with its causes, `outer: inner: …`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// The entry's path relative to the layer root, or `None` when it would leave it.
fn clean_path(raw: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    Some(out)
}

/// An overlayfs whiteout: a character device 0/0.
fn whiteout(path: &Path, uid: u32, gid: u32, mtime: u64) -> Result<(), ConvertError> {
    use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
    use nix::sys::time::TimeSpec;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    }
    .map_err(io_err(format!("replacing {} by a whiteout", path.display())))?;
    mknod(path, SFlag::S_IFCHR, Mode::empty(), 0).map_err(|e| ConvertError::Privilege(e.into()))?;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(ConvertError::Privilege)?;
    let time = TimeSpec::new(mtime as i64, 0);
    utimensat(nix::fcntl::AT_FDCWD, path, &time, &time, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| ConvertError::Io { context: format!("setting the time of {}", path.display()), source: e.into() })
}

/// Builds an uncompressed EROFS image of `dir`.
fn mkfs(program: &Path, image: &Path, dir: &Path, uuid: &[u8; 16]) -> Result<(), ConvertError> {
    let output = Command::new(program)
        .arg("--quiet")
        .arg(format!("-U{}", crate::model::format_uuid(uuid)))
        .arg(image)
        .arg(dir)
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ConvertError::MissingTool(program.display().to_string()),
            _ => ConvertError::Io { context: format!("running {}", program.display()), source: e },
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).chars().take(2000).collect();
        return Err(ConvertError::Mkfs { status: output.status.to_string(), stderr });
    }
    Ok(())
}

/// EROFS superblock layout (fs/erofs/erofs_fs.h): at byte 1024 of the image.
const SB_OFFSET: usize = 1024;
const SB_MAGIC: u32 = 0xe0f5_e1e2;
const SB_CHECKSUM: usize = SB_OFFSET + 4;
const SB_FEATURE_COMPAT: usize = SB_OFFSET + 8;
const SB_BLKSZBITS: usize = SB_OFFSET + 12;
const SB_BUILD_TIME: usize = SB_OFFSET + 24;
const SB_BUILD_TIME_NSEC: usize = SB_OFFSET + 32;
const FEATURE_COMPAT_SB_CHKSUM: u32 = 1;

/// The superblock checksum as the kernel computes it: CRC32C seeded with !0, without the final inversion, over
/// the rest of the superblock's block with the checksum field zeroed.
fn sb_checksum(image: &[u8], block_size: usize) -> u32 {
    let mut block = image[SB_OFFSET..block_size].to_vec();
    block[4..8].fill(0);
    !crc32c::crc32c(&block)
}

/// Sets the build time to zero (and recomputes the checksum) and checks what the host will need: an EROFS
/// image with 4 KiB blocks whose size is a whole number of blocks.
fn normalize_superblock(image: &mut [u8]) -> Result<(), ConvertError> {
    if image.len() < 4096 {
        return Err(ConvertError::NotErofs(format!("{} bytes is too small", image.len())));
    }
    let u32_at = |image: &[u8], at: usize| u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]]);
    if u32_at(image, SB_OFFSET) != SB_MAGIC {
        return Err(ConvertError::NotErofs("bad superblock magic".into()));
    }
    let block_size = 1usize << image[SB_BLKSZBITS].min(31);
    if block_size != 4096 || !image.len().is_multiple_of(block_size) {
        return Err(ConvertError::NotErofs(format!(
            "{block_size}-byte blocks over {} bytes (need 4096-byte blocks, whole blocks)",
            image.len()
        )));
    }
    let checksummed = u32_at(image, SB_FEATURE_COMPAT) & FEATURE_COMPAT_SB_CHKSUM != 0;
    if checksummed && sb_checksum(image, block_size) != u32_at(image, SB_CHECKSUM) {
        return Err(ConvertError::NotErofs("superblock checksum mismatch as built".into()));
    }
    image[SB_BUILD_TIME..SB_BUILD_TIME + 8].fill(0);
    image[SB_BUILD_TIME_NSEC..SB_BUILD_TIME_NSEC + 4].fill(0);
    if checksummed {
        let sum = sb_checksum(image, block_size);
        image[SB_CHECKSUM..SB_CHECKSUM + 4].copy_from_slice(&sum.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_stay_inside_the_root() {
        assert_eq!(clean_path(Path::new("./usr/bin/x")), Some(PathBuf::from("usr/bin/x")));
        assert_eq!(clean_path(Path::new("../etc/passwd")), None);
        assert_eq!(clean_path(Path::new("/etc/passwd")), None);
        assert_eq!(clean_path(Path::new("a/../../b")), None);
    }

    #[test]
    fn sources_name_a_layout_or_a_registry() {
        let layout = |text: &str| match Source::parse(text, Credentials::Anonymous).unwrap() {
            Source::Layout { dir, tag } => (dir, tag),
            Source::Registry { .. } => panic!("{text} is a layout"),
        };
        assert_eq!(layout("oci:/images/app:app:1"), (PathBuf::from("/images/app"), Some("app:1".into())));
        assert_eq!(layout("oci:/images/app:v1"), (PathBuf::from("/images/app"), Some("v1".into())));
        assert_eq!(layout("oci:/images/app"), (PathBuf::from("/images/app"), None));
        assert!(matches!(Source::parse("127.0.0.1:5000/app:v1", Credentials::Anonymous), Ok(Source::Registry { .. })));
        assert!(Source::parse("registry.example/App:v1", Credentials::Anonymous).is_err());
    }

    #[test]
    fn layer_uuids_are_stable_rfc4122() {
        let d = Digest::of(b"layer");
        let u = layer_uuid(&d);
        assert_eq!(u, layer_uuid(&d));
        assert_eq!(u[6] >> 4, 5);
        assert_ne!(u, layer_uuid(&Digest::of(b"other")));
    }

    #[test]
    fn superblocks_that_are_not_erofs_are_refused() {
        assert!(matches!(normalize_superblock(&mut [0u8; 100]), Err(ConvertError::NotErofs(_))));
        assert!(
            matches!(normalize_superblock(&mut [0u8; 8192]), Err(ConvertError::NotErofs(m)) if m.contains("magic"))
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Whole images: resolve the source, convert each layer (or reuse an earlier conversion), push the blobs and the
// converted manifest.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::format::{LazyLayer, MEDIA_TYPE_CHUNK_DATA, MEDIA_TYPE_CHUNK_INDEX, build_manifest};
use super::oci::{self, Descriptor, Manifest, Parsed, Platform};
use super::registry::{Credentials, Reference, RegistryClient, RegistryError};

/// Where a source image is read from.
#[derive(Debug, Clone)]
pub enum Source {
    Registry {
        reference: Reference,
        credentials: Credentials,
    },
    /// An OCI image layout directory (`skopeo copy … oci:DIR:TAG`, `umoci`), the image named by its
    /// `org.opencontainers.image.ref.name` annotation (which may hold colons: `oci:/images/app:app:1`), or the
    /// only image when no tag is given.
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
}

impl Source {
    /// `oci:DIR[:TAG]` is a layout directory; anything else a registry reference.
    pub fn parse(text: &str, credentials: Credentials) -> Result<Self, ImageError> {
        match text.strip_prefix("oci:") {
            Some(rest) => {
                // As skopeo reads `oci:PATH:REFERENCE`: the path ends at its first colon, so a reference may
                // hold colons (`app:1`) and a path may not.
                let (dir, tag) = match rest.split_once(':') {
                    Some((dir, tag)) => (dir, Some(tag.to_string())),
                    None => (rest, None),
                };
                Ok(Self::Layout { dir: dir.into(), tag })
            }
            None => Ok(Self::Registry { reference: text.parse()?, credentials }),
        }
    }
}

/// Where the converted image goes.
#[derive(Debug, Clone)]
pub struct Destination {
    pub reference: Reference,
    pub credentials: Credentials,
}

/// What a conversion reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The source manifest was read: its layer count and compressed size.
    Resolved {
        layers: usize,
        bytes: u64,
    },
    LayerStarted {
        layer: usize,
        digest: Digest,
        bytes: u64,
    },
    /// Bytes of source layers read so far (all layers).
    BytesIn(u64),
    LayerDone {
        layer: usize,
        reused: bool,
        chunks: usize,
        stored_bytes: u64,
    },
    Pushed {
        digest: Digest,
    },
}

/// The outcome of a conversion.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// The converted manifest's digest and the reference it was pushed as.
    pub manifest: Option<Digest>,
    pub reference: String,
    pub layers: usize,
    /// Layers whose earlier conversion was found in the destination and reused as is.
    pub layers_reused: usize,
    /// Compressed source bytes read.
    pub bytes_in: u64,
    /// Bytes uploaded (blobs the destination already had are not counted).
    pub bytes_out: u64,
    pub chunks: usize,
    /// Chunks not stored again: those of reused layers and repeats within a layer.
    pub chunks_reused: usize,
}

/// Why an image could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Layer(#[from] ConvertError),
    #[error("manifest refused: {0}")]
    Manifest(#[from] oci::OciError),
    #[error("source image: {0}")]
    Source(String),
    #[error("OCI layout {dir}: {reason}")]
    Layout { dir: String, reason: String },
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`). Its methods block: call them
/// from a blocking thread.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    fn error(&self, reason: String) -> ImageError {
        ImageError::Layout { dir: self.dir.display().to_string(), reason }
    }

    /// Where blob `digest` is stored.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    /// Blob `digest`, checked against it.
    pub fn blob(&self, digest: &Digest) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest);
        let data = std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
        if Digest::of(&data) != *digest {
            return Err(self.error(format!("blob {digest} does not match its digest")));
        }
        Ok(data)
    }

    /// The image manifest named `tag` by its `org.opencontainers.image.ref.name` annotation (or the only image
    /// when `tag` is `None`), an index resolved for `platform`, and its digest.
    pub fn manifest(&self, tag: Option<&str>, platform: &Platform) -> Result<(Manifest, Digest), ImageError> {
        let index = std::fs::read(self.dir.join("index.json")).map_err(|e| self.error(format!("index.json: {e}")))?;
        let Parsed::Index(index) =
            oci::parse_manifest(Some(oci::MEDIA_TYPE_OCI_INDEX), &index).map_err(|e| self.error(e.to_string()))?
        else {
            return Err(self.error("index.json is not an image index".into()));
        };
        let named: Vec<&Descriptor> = index
            .manifests
            .iter()
            .filter(|d| {
                let name = d.annotations.get("org.opencontainers.image.ref.name");
                tag.is_none_or(|t| name.is_some_and(|n| n == t))
            })
            .collect();
        let entry = match named.as_slice() {
            [one] => *one,
            [] => return Err(self.error(format!("no image named {:?}", tag.unwrap_or("(any)")))),
            _ => return Err(self.error("several images: name one with oci:DIR:TAG".into())),
        };
        let mut digest = entry.digest;
        let mut bytes = self.blob(&digest)?;
        if let Parsed::Index(nested) = oci::parse_manifest(Some(&entry.media_type), &bytes)? {
            digest = oci::select_platform(&nested, platform)?.digest;
            bytes = self.blob(&digest)?;
        }
        match oci::parse_manifest(None, &bytes)? {
            Parsed::Manifest(m) => Ok((m, digest)),
            Parsed::Index(_) => Err(self.error(format!("{digest} is an index inside an index"))),
        }
    }
}

/// Runs blocking layout work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ImageError::Source(e.to_string()))?
}

/// Reads the source image: its manifest, digest, and blobs copied to local files on demand.
enum Reader<'a> {
    Registry { client: &'a RegistryClient, reference: &'a Reference, credentials: &'a Credentials },
    Layout(Layout),
}

impl Reader<'_> {
    /// The blob as a verified local file (a layout's own file, or a download into `scratch`).
    async fn blob_file(
        &self,
        digest: &Digest,
        scratch: &Path,
        counted: &(dyn Fn(u64) + Sync),
    ) -> Result<PathBuf, ImageError> {
        match self {
            Self::Layout(layout) => {
                let path = layout.blob_path(digest);
                let check = path.clone();
                let actual =
                    blocking(move || Ok(hash_file(&check).map_err(io_err(format!("reading {}", check.display())))?))
                        .await?;
                if actual.0 != *digest {
                    return Err(layout.error(format!("blob {digest} hashes to {}", actual.0)));
                }
                counted(actual.1);
                Ok(path)
            }
            Self::Registry { client, reference, credentials } => {
                let path = scratch.join(digest.hex());
                let mut reader = client.blob_reader(reference, credentials, digest).await?;
                let mut file = tokio::fs::File::create(&path).await.map_err(io_err("creating a download file"))?;
                let mut hasher = super::Hasher::default();
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut reader, &mut buf)
                        .await
                        .map_err(|e| RegistryError::Unavailable(format!("reading blob {digest}: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    file.write_all(&buf[..n]).await.map_err(io_err("writing a download file"))?;
                    counted(n as u64);
                }
                file.flush().await.map_err(io_err("writing a download file"))?;
                let actual = hasher.finish();
                if actual != *digest {
                    return Err(RegistryError::DigestMismatch {
                        what: format!("blob {digest}"),
                        expected: *digest,
                        actual,
                    }
                    .into());
                }
                Ok(path)
            }
        }
    }

    async fn blob_bytes(&self, digest: &Digest) -> Result<Bytes, ImageError> {
        match self {
            Self::Layout(layout) => {
                let (layout, digest) = (layout.clone(), *digest);
                Ok(blocking(move || layout.blob(&digest)).await?.into())
            }
            Self::Registry { client, reference, credentials } => {
                Ok(client.get_blob(reference, credentials, digest, None).await?)
            }
        }
    }

    /// The image manifest for `platform` and its digest.
    async fn manifest(&self, tag: Option<&str>, platform: &Platform) -> Result<(Manifest, Digest), ImageError> {
        match self {
            Self::Registry { client, reference, credentials } => {
                let resolved = client.get_manifest(reference, credentials, platform).await?;
                Ok((resolved.manifest, resolved.digest))
            }
            Self::Layout(layout) => {
                let (layout, tag, platform) = (layout.clone(), tag.map(str::to_owned), platform.clone());
                blocking(move || layout.manifest(tag.as_deref(), &platform)).await
            }
        }
    }
}

/// SHA-256 and length of a file.
fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = super::Hasher::default();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((hasher.finish(), total));
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
}

/// A layer converted earlier, remembered under the converter's work directory by source digest, chunk size and
/// compression.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Remembered {
    index: Descriptor,
    data: Descriptor,
    chunks: usize,
}

fn remembered_path(options: &LayerOptions, source: &Digest) -> PathBuf {
    options.work_dir.join("converted").join(format!(
        "{}-{}-{}.json",
        source.hex(),
        options.chunk_size,
        options.compression
    ))
}

/// Converts `source` for `platform` and pushes the result to `destination`. Layers converted before (by this
/// converter, with the same chunk size and compression) whose blobs the destination already holds are reused
/// without being read again; blobs the destination has are not uploaded again.
pub async fn convert_image(
    client: &RegistryClient,
    source: &Source,
    destination: &Destination,
    platform: &Platform,
    options: &LayerOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Summary, ImageError> {
    let (reader, tag) = match source {
        Source::Registry { reference, credentials } => (Reader::Registry { client, reference, credentials }, None),
        Source::Layout { dir, tag } => (Reader::Layout(Layout { dir: dir.clone() }), tag.as_deref()),
    };
    let (manifest, source_digest) = reader.manifest(tag, platform).await?;
    if manifest.artifact_type.as_deref() == Some(super::format::ARTIFACT_TYPE) {
        return Err(ImageError::Source("the source is already a converted image".into()));
    }
    for (i, layer) in manifest.layers.iter().enumerate() {
        if oci::layer_compression(&layer.media_type).is_none() {
            return Err(ImageError::Source(format!(
                "layer {i} has media type {:?}, not a tar layer",
                layer.media_type
            )));
        }
    }
    progress(Progress::Resolved { layers: manifest.layers.len(), bytes: manifest.layers.iter().map(|l| l.size).sum() });
    tokio::fs::create_dir_all(options.work_dir.join("converted"))
        .await
        .map_err(io_err("creating the work directory"))?;
    let scratch = tempfile::Builder::new()
        .prefix("download-")
        .tempdir_in(&options.work_dir)
        .map_err(io_err("creating a download directory"))?;
    let dst = &destination.reference;
    let creds = &destination.credentials;
    let bytes_in = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = |n: u64| {
        let total = bytes_in.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        progress(Progress::BytesIn(total));
    };
    let mut summary = Summary { layers: manifest.layers.len(), reference: dst.to_string(), ..Summary::default() };
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, layer) in manifest.layers.iter().enumerate() {
        progress(Progress::LayerStarted { layer: i, digest: layer.digest, bytes: layer.size });
        let memo = remembered_path(options, &layer.digest);
        if let Some(known) = reusable(client, dst, creds, &memo).await? {
            summary.layers_reused += 1;
            summary.chunks += known.chunks;
            summary.chunks_reused += known.chunks;
            progress(Progress::LayerDone {
                layer: i,
                reused: true,
                chunks: known.chunks,
                stored_bytes: known.data.size,
            });
            layers.push(LazyLayer { source: layer.digest, index: known.index, data: known.data });
            continue;
        }
        let blob = reader.blob_file(&layer.digest, scratch.path(), &counted).await?;
        let (media_type, digest, opts) = (layer.media_type.clone(), layer.digest, options.clone());
        let converted = tokio::task::spawn_blocking(move || convert_layer(&blob, &media_type, &digest, &opts))
            .await
            .map_err(|e| ImageError::Source(format!("layer conversion stopped: {e}")))??;
        let chunks = converted.chunked.index.chunks.len();
        let index = Descriptor::of(MEDIA_TYPE_CHUNK_INDEX, &converted.index_blob);
        let data = Descriptor::of(MEDIA_TYPE_CHUNK_DATA, &converted.chunked.data);
        for (d, bytes) in [(&index, Bytes::from(converted.index_blob)), (&data, Bytes::from(converted.chunked.data))] {
            let size = bytes.len() as u64;
            if client.push_blob(dst, creds, &d.digest, bytes).await? {
                summary.bytes_out += size;
            }
            progress(Progress::Pushed { digest: d.digest });
        }
        let known = Remembered { index: index.clone(), data: data.clone(), chunks };
        let record = serde_json::to_vec(&known).map_err(|e| ImageError::Source(e.to_string()))?;
        tokio::fs::write(&memo, record).await.map_err(io_err("remembering a converted layer"))?;
        summary.chunks += chunks;
        summary.chunks_reused += converted.chunked.deduplicated;
        progress(Progress::LayerDone { layer: i, reused: false, chunks, stored_bytes: data.size });
        layers.push(LazyLayer { source: layer.digest, index, data });
    }
    let config = reader.blob_bytes(&manifest.config.digest).await?;
    let config_size = config.len() as u64;
    if client.push_blob(dst, creds, &manifest.config.digest, config).await? {
        summary.bytes_out += config_size;
    }
    let converted = build_manifest(manifest.config.clone(), &source_digest, &layers);
    let json = Bytes::from(converted.to_json());
    let tag = dst.tag().unwrap_or("latest").to_string();
    summary.bytes_out += json.len() as u64;
    let digest = client.push_manifest(dst, creds, &tag, oci::MEDIA_TYPE_OCI_MANIFEST, json).await?;
    progress(Progress::Pushed { digest });
    summary.manifest = Some(digest);
    summary.bytes_in = bytes_in.load(std::sync::atomic::Ordering::Relaxed);
    Ok(summary)
}

/// An earlier conversion of the layer whose blobs `dst` already holds.
async fn reusable(
    client: &RegistryClient,
    dst: &Reference,
    creds: &Credentials,
    memo: &Path,
) -> Result<Option<Remembered>, ImageError> {
    let Ok(record) = tokio::fs::read(memo).await else { return Ok(None) };
    let Ok(known) = serde_json::from_slice::<Remembered>(&record) else {
        tracing::warn!(path = %memo.display(), "ignoring an unreadable record of a converted layer");
        return Ok(None);
    };
    for d in [&known.index, &known.data] {
        if client.head_blob(dst, creds, &d.digest).await? != Some(d.size) {
            return Ok(None);
        }
    }
    Ok(Some(known))
}
