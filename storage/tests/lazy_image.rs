//! A layer tar → EROFS → chunks → lazy volume → the host kernel's EROFS driver: the converted layer, read back
//! through the lazy volume, mounts and shows the layer's files, owners, times, links and overlayfs whiteouts.
//! Needs root (whiteout devices, loop mounts) and mkfs.erofs; says SKIPPED otherwise.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use dpu_storage::bdev::{IoFuture, Volume};
use dpu_storage::image::Digest;
use dpu_storage::image::cache::{CacheConfig, ChunkCache};
use dpu_storage::image::convert::{LAYER_TAR_GZIP, LayerOptions, convert_layer};
use dpu_storage::image::lazy::{BlobSource, FetchError, FetchPolicy, LazyVolume};

fn skip_reason() -> Option<String> {
    if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
        return Some("not root".into());
    }
    if Command::new("mkfs.erofs").arg("--help").output().is_err() {
        return Some("mkfs.erofs (erofs-utils) is not installed".into());
    }
    None
}

fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(1001);
    h.set_mtime(mtime);
    h
}

/// A gzip layer with a directory tree, a large file, a symlink, a hard link, a whiteout and an opaque marker.
fn layer(big: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8], mode: u32| {
        let mut h = header(path, kind, data.len() as u64, mode, 1_700_000_000);
        h.set_cksum();
        tar.append(&h, data).unwrap();
    };
    add("etc/", tar::EntryType::Directory, b"", 0o755);
    add("etc/hostname", tar::EntryType::Regular, b"lazy\n", 0o644);
    add("usr/lib/big.bin", tar::EntryType::Regular, big, 0o600);
    add("etc/.wh.motd", tar::EntryType::Regular, b"", 0o644);
    add("var/cache/.wh..wh..opq", tar::EntryType::Regular, b"", 0o644);
    add("var/cache/kept", tar::EntryType::Regular, b"kept\n", 0o644);
    let mut link = header("etc/alias", tar::EntryType::Symlink, 0, 0o777, 1_700_000_000);
    link.set_link_name("hostname").unwrap();
    link.set_cksum();
    tar.append(&link, &b""[..]).unwrap();
    let mut hard = header("usr/lib/big.hard", tar::EntryType::Link, 0, 0o600, 1_700_000_000);
    hard.set_link_name("usr/lib/big.bin").unwrap();
    hard.set_cksum();
    tar.append(&hard, &b""[..]).unwrap();
    let raw = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    gz.finish().unwrap()
}

#[derive(Debug)]
struct Memory(Vec<u8>);

impl BlobSource for Memory {
    fn fetch(&self, range: std::ops::Range<u64>) -> IoFuture<'_, Result<Bytes, FetchError>> {
        let bytes = Bytes::copy_from_slice(&self.0[range.start as usize..range.end as usize]);
        Box::pin(async move { Ok(bytes) })
    }
}

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converted_layer_mounts_through_the_lazy_volume() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: lazy image conversion ({reason})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let blob = layer(&big);
    let blob_path = dir.path().join("layer.tar.gz");
    std::fs::write(&blob_path, &blob).unwrap();
    let digest = Digest::of(&blob);
    let options = LayerOptions { chunk_size: 16384, ..LayerOptions::new(dir.path().join("work")) };

    let first = convert_layer(&blob_path, LAYER_TAR_GZIP, &digest, &options).unwrap();
    let again = convert_layer(&blob_path, LAYER_TAR_GZIP, &digest, &options).unwrap();
    assert_eq!(first.chunked.index.data_digest, again.chunked.index.data_digest, "conversion is reproducible");
    assert_eq!(Digest::of(&first.index_blob), Digest::of(&again.index_blob));
    assert_eq!(first.entries, 8);
    assert!(std::fs::read_dir(dir.path().join("work")).unwrap().next().is_none(), "scratch space is removed");

    // Serve it lazily and read the whole device back, in odd-sized pieces.
    let cache = ChunkCache::open(CacheConfig::new(dir.path().join("cache"), 64 << 20)).unwrap();
    let index = Arc::new(first.chunked.index.clone());
    let volume = LazyVolume::new(index, Arc::new(Memory(first.chunked.data)), cache, FetchPolicy::default());
    let blocks = volume.geometry().blocks;
    let mut device = Vec::new();
    let mut lba = 0;
    while lba < blocks {
        let n = (blocks - lba).min(7);
        let (buf, r) = volume.read(lba, vec![0; n as usize * 4096]).await;
        r.unwrap();
        device.extend_from_slice(&buf);
        lba += n;
    }
    let image = dir.path().join("device.img");
    std::fs::write(&image, &device).unwrap();

    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount").args(["-t", "erofs", "-o", "loop,ro"]).arg(&image).arg(&mnt).status().unwrap();
    assert!(status.success(), "the kernel mounts the image read through the lazy volume");
    let _mount = Mount(mnt.clone());
    let m = |p: &str| mnt.join(p);
    assert_eq!(std::fs::read(m("etc/hostname")).unwrap(), b"lazy\n");
    assert_eq!(std::fs::read(m("usr/lib/big.bin")).unwrap(), big);
    let meta = std::fs::metadata(m("usr/lib/big.bin")).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777, meta.mtime()), (1000, 1001, 0o600, 1_700_000_000));
    assert_eq!(meta.nlink(), 2, "the hard link is a link, not a copy");
    assert_eq!(std::fs::read_link(m("etc/alias")).unwrap(), Path::new("hostname"));
    let wh = std::fs::symlink_metadata(m("etc/motd")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "OCI whiteout → overlayfs whiteout");
    assert!(!m("etc/.wh.motd").exists());
    assert_eq!(xattr::get(m("var/cache"), "trusted.overlay.opaque").unwrap().as_deref(), Some(&b"y"[..]));
    assert_eq!(std::fs::read(m("var/cache/kept")).unwrap(), b"kept\n");
    assert_eq!(std::fs::metadata(m("etc")).unwrap().mtime(), 1_700_000_000, "directory times are the layer's");
}
