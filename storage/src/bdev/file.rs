//! File volume: a regular file (or block device) served through io_uring where the kernel offers it, else with
//! positioned reads and writes on tokio's blocking thread pool. Writes land in the page cache; `flush` is
//! `fdatasync`, so the controller advertises a volatile write cache and the host's flushes make data durable.
//! Discard punches holes, keeping the file's size.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{FallocateFlags, fallocate};

use super::uring::{Uring, UringOp};
use super::{BufResult, Geometry, IoFuture, Volume, VolumeError};

/// A volume backed by a file.
#[derive(Debug)]
pub struct FileVolume {
    geometry: Geometry,
    path: PathBuf,
    file: Arc<File>,
    /// The ring serving this volume; `None` uses the blocking thread pool.
    uring: Option<Uring>,
}

impl FileVolume {
    /// Opens `path`, creating it if needed, and sets its size to `blocks` blocks. An existing file keeps its
    /// data (the volume survives agent restarts); a larger existing file is not truncated.
    pub fn open(path: &Path, block_size: u32, blocks: u64, uring: Option<Uring>) -> Result<Self, VolumeError> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let geometry = Geometry { block_size, blocks };
        if file.metadata()?.len() < geometry.bytes() {
            file.set_len(geometry.bytes())?;
        }
        Ok(Self { geometry, path: path.to_owned(), file: Arc::new(file), uring })
    }

    /// "io_uring" or "thread pool".
    pub fn engine(&self) -> &'static str {
        if self.uring.is_some() { "io_uring" } else { "thread pool" }
    }

    /// The operation on the ring, or the buffer back when this volume has no ring.
    fn ring(&self, op: UringOp, offset: u64, buf: Vec<u8>) -> Result<IoFuture<'_, BufResult>, Vec<u8>> {
        let Some(ring) = self.uring.clone() else { return Err(buf) };
        let file = self.file.clone();
        Ok(Box::pin(async move {
            let (buf, result) = ring.submit(op, file, offset, buf).await;
            (buf, result.map_err(VolumeError::from))
        }))
    }

    /// The backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> T + Send + 'static,
    ) -> impl std::future::Future<Output = T> + Send + 'static {
        let file = self.file.clone();
        let task = tokio::task::spawn_blocking(move || f(&file));
        async move {
            match task.await {
                Ok(v) => v,
                // The closure does not panic on I/O errors; a panic here is a bug worth surfacing loudly.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
    }
}

impl Volume for FileVolume {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        let offset = match self.geometry.check(lba, buf.len()) {
            Ok(offset) => offset,
            Err(e) => return Box::pin(std::future::ready((buf, Err(e)))),
        };
        let mut buf = match self.ring(UringOp::Read, offset, buf) {
            Ok(on_ring) => return on_ring,
            Err(buf) => buf,
        };
        Box::pin(self.blocking(move |file| {
            let result = file.read_exact_at(&mut buf, offset).map_err(VolumeError::from);
            (buf, result)
        }))
    }

    fn write(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        let offset = match self.geometry.check(lba, buf.len()) {
            Ok(offset) => offset,
            Err(e) => return Box::pin(std::future::ready((buf, Err(e)))),
        };
        let buf = match self.ring(UringOp::Write, offset, buf) {
            Ok(on_ring) => return on_ring,
            Err(buf) => buf,
        };
        Box::pin(self.blocking(move |file| {
            let result = file.write_all_at(&buf, offset).map_err(VolumeError::from);
            (buf, result)
        }))
    }

    fn flush(&self) -> IoFuture<'_, Result<(), VolumeError>> {
        match self.ring(UringOp::Fdatasync, 0, Vec::new()) {
            Ok(on_ring) => Box::pin(async move { on_ring.await.1 }),
            Err(_) => Box::pin(self.blocking(|file| file.sync_data().map_err(VolumeError::from))),
        }
    }

    fn discard(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), VolumeError>> {
        let bs = u64::from(self.geometry.block_size);
        let end = lba.saturating_add(blocks);
        if end > self.geometry.blocks {
            let e = VolumeError::OutOfRange { start: lba, end, capacity: self.geometry.blocks };
            return Box::pin(std::future::ready(Err(e)));
        }
        let (offset, len) = (lba * bs, blocks * bs);
        Box::pin(self.blocking(move |file| {
            let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
                return Err(VolumeError::OutOfRange { start: lba, end, capacity: u64::MAX });
            };
            let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(file, flags, offset, len) {
                Ok(()) => Ok(()),
                // Filesystems without hole punching: write zeroes instead.
                Err(nix::errno::Errno::EOPNOTSUPP) => {
                    let zeroes = vec![0u8; 1 << 20];
                    let mut done = 0u64;
                    while done < len as u64 {
                        let n = (len as u64 - done).min(zeroes.len() as u64) as usize;
                        file.write_all_at(&zeroes[..n], offset as u64 + done)?;
                        done += n as u64;
                    }
                    Ok(())
                }
                Err(e) => Err(VolumeError::Io(e.into())),
            }
        }))
    }

    fn volatile_write_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.img");
        let volume = FileVolume::open(&path, 512, 4096, None).unwrap();
        super::super::tests::conformance(&volume).await;
        if let Ok(ring) = Uring::new() {
            let on_ring = FileVolume::open(&dir.path().join("ring.img"), 4096, 512, Some(ring)).unwrap();
            assert_eq!(on_ring.engine(), "io_uring");
            super::super::tests::conformance(&on_ring).await;
        }
        let (_, r) = volume.write(100, vec![0xab; 1024]).await;
        r.unwrap();
        volume.flush().await.unwrap();
        drop(volume);

        let volume = FileVolume::open(&path, 512, 4096, None).unwrap();
        let (back, r) = volume.read(100, vec![0; 1024]).await;
        r.unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096 * 512);
    }
}
