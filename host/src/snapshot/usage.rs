//! Disk usage of a directory tree, counted like containerd counts a snapshot's layer: every inode once (hard
//! links are not counted twice, the root directory is counted), size as allocated 512-byte blocks × 512 — so
//! sparse files count what they occupy and a directory counts its blocks, not the apparent byte length.
//! Symbolic links are not followed. Blocking; run it off the async runtime.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::Usage;

/// Walks `root`. Entries that disappear during the walk (the layer of an active snapshot may be in use) are
/// skipped; `root` itself must exist.
pub fn disk_usage(root: &Path) -> io::Result<Usage> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut size: u64 = 0;
    let mut pending: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound && path != root => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        if seen.insert((meta.dev(), meta.ino())) {
            size = size.saturating_add(meta.blocks().saturating_mul(512));
        }
        if meta.is_dir() {
            let entries = match fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound && path != root => continue,
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
            };
            for entry in entries {
                match entry {
                    Ok(entry) => pending.push(entry.path()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
                }
            }
        }
    }
    Ok(Usage { size, inodes: seen.len() as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocated(path: &Path) -> u64 {
        fs::symlink_metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn counts_each_inode_once_and_allocated_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("fs");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("sub/data"), vec![7u8; 10_000]).unwrap();
        fs::hard_link(root.join("sub/data"), root.join("link")).unwrap();
        std::os::unix::fs::symlink("sub/data", root.join("sym")).unwrap();
        // Sparse: a large apparent size, nothing allocated.
        fs::File::create(root.join("sparse")).unwrap().set_len(1 << 30).unwrap();

        let usage = disk_usage(&root).unwrap();
        // root, sub, data (= link), sym, sparse
        assert_eq!(usage.inodes, 5);
        let expected = allocated(&root)
            + allocated(&root.join("sub"))
            + allocated(&root.join("sub/data"))
            + allocated(&root.join("sym"))
            + allocated(&root.join("sparse"));
        assert_eq!(usage.size, expected);
        assert!(usage.size >= 10_000 && usage.size < 1 << 30, "{}", usage.size);
    }

    #[test]
    fn a_missing_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(disk_usage(&dir.path().join("absent")).unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
