//! The volume (bdev) layer: one async trait every volume kind implements, so kinds stack (a thin lvol over a
//! file, a lazy cache over a remote volume, encryption over anything) and a namespace can point at any of them.
//!
//! Buffers are owned and handed back with the result (`Vec<u8>` in, the same `Vec<u8>` out). That lets engines
//! move them to another thread or into an io_uring submission without copying and stays sound if the caller's
//! future is dropped mid-I/O; callers keep a pool of buffers, so the data path allocates no data buffers per I/O.

mod crypt;
mod file;
mod malloc;
mod null;
mod uring;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crypt::{EncryptedError, EncryptedVolume, EncryptedVolumes, NO_XTS_OFFLOAD, placement as encryption_placement};
pub use file::FileVolume;
pub use malloc::MallocVolume;
pub use null::NullVolume;
pub use uring::{Uring, UringOp};

/// Future returned by volume I/O. Boxed so volumes can be used as `Arc<dyn Volume>` and stacked.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A buffer handed back with the outcome of the I/O that used it.
pub type BufResult = (Vec<u8>, Result<(), VolumeError>);

/// Blocks a volume lends out of its own memory ([`Volume::lend`]) so they can be written to a socket without
/// being copied into a buffer first. Writers to those blocks wait while the loan lives: it is held across one
/// non-blocking write, never across an await. Taking a loan never waits (a caller may hold several at once).
pub trait Loan {
    /// Appends the lent bytes, in order, to `out`.
    fn slices<'a>(&'a self, out: &mut Vec<std::io::IoSlice<'a>>);
}

/// Why an I/O failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request reaches past the end of the volume.
    #[error("blocks {start}..{end} are beyond the volume's {capacity} blocks")]
    OutOfRange { start: u64, end: u64, capacity: u64 },
    /// The buffer is not a whole number of blocks.
    #[error("a transfer of {len} bytes is not a multiple of the {block_size}-byte block size")]
    Misaligned { len: usize, block_size: u32 },
    /// The backing store failed.
    #[error("I/O on the backing store failed")]
    Io(#[from] std::io::Error),
    /// The volume is read-only.
    #[error("the volume is read-only")]
    ReadOnly,
    /// The data could not be obtained (a remote source down past its deadline, or corrupt); retrying the same
    /// I/O at once will not help.
    #[error("data unavailable: {0}")]
    Unavailable(String),
}

/// Static facts about a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Capacity in blocks.
    pub blocks: u64,
}

impl Geometry {
    /// Capacity in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }

    /// Checks that `len` bytes at block `lba` fit; returns the byte offset.
    pub fn check(&self, lba: u64, len: usize) -> Result<u64, VolumeError> {
        let block = self.block_size as usize;
        if !len.is_multiple_of(block) {
            return Err(VolumeError::Misaligned { len, block_size: self.block_size });
        }
        let end = lba.saturating_add((len / block) as u64);
        if end > self.blocks {
            return Err(VolumeError::OutOfRange { start: lba, end, capacity: self.blocks });
        }
        Ok(lba * u64::from(self.block_size))
    }
}

/// A block volume. Offsets and lengths are in blocks of [`Geometry::block_size`]; buffers are whole blocks.
pub trait Volume: Send + Sync + std::fmt::Debug + 'static {
    /// Engine name, e.g. "malloc", "file", "null".
    fn kind(&self) -> &'static str;
    /// Block size and capacity.
    fn geometry(&self) -> Geometry;
    /// Fills `buf` from block `lba` on.
    fn read(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult>;
    /// Writes `buf` at block `lba`. Durable only after [`Volume::flush`] when the volume has a volatile cache.
    fn write(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult>;
    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_, Result<(), VolumeError>>;
    /// Deallocates `blocks` blocks from `lba`; they read back as zeroes.
    fn discard(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), VolumeError>>;
    /// Writes zeroes over `blocks` blocks from `lba` (may deallocate).
    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), VolumeError>> {
        self.discard(lba, blocks)
    }
    /// True when writes may sit in a volatile cache until flushed.
    fn volatile_write_cache(&self) -> bool {
        false
    }
    /// True when every write fails with [`VolumeError::ReadOnly`]; the namespace is reported write protected.
    fn read_only(&self) -> bool {
        false
    }
    /// The SPDK bdev this volume is, when it is one: SPDK's target then serves it directly.
    fn spdk_bdev(&self) -> Option<&str> {
        None
    }
    /// True when the volume keeps its blocks in memory and [`Volume::lend`] gives them out.
    fn lends(&self) -> bool {
        false
    }
    /// Lends `len` bytes from block `lba` without waiting; `None` when the volume does not lend, the range is not
    /// whole blocks inside it, or the blocks are being written just now (read them with [`Volume::read`] then).
    fn lend(&self, _lba: u64, _len: usize) -> Option<Box<dyn Loan + '_>> {
        None
    }
}

/// Counters kept for every volume the target serves.
#[derive(Debug, Default)]
pub struct VolumeStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub errors: AtomicU64,
    /// Latency histogram: bucket i counts I/Os that took < 2^i microseconds (last bucket: the rest).
    pub latency_us: [AtomicU64; LATENCY_BUCKETS],
}

/// Number of power-of-two latency buckets (1 µs … ~0.5 s, then overflow).
pub const LATENCY_BUCKETS: usize = 20;

impl VolumeStats {
    /// Records one completed I/O.
    pub fn record(&self, op: IoKind, bytes: u64, micros: u64, ok: bool) {
        let counter = match op {
            IoKind::Read => {
                self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
                &self.reads
            }
            IoKind::Write => {
                self.written_bytes.fetch_add(bytes, Ordering::Relaxed);
                &self.writes
            }
            IoKind::Flush => &self.flushes,
            IoKind::Discard => &self.discards,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let bucket = (u64::BITS - micros.leading_zeros()) as usize;
        self.latency_us[bucket.min(LATENCY_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }
}

/// Kinds of I/O counted in [`VolumeStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    Discard,
}

/// A shared volume handle.
pub type SharedVolume = Arc<dyn Volume>;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The behaviour every engine must show: round trip, zeroes after discard, range checks.
    pub(crate) async fn conformance(volume: &dyn Volume) {
        let g = volume.geometry();
        let bs = g.block_size as usize;
        let pattern: Vec<u8> = (0..bs * 3).map(|i| (i * 7 + 3) as u8).collect();
        let (_, r) = volume.write(1, pattern.clone()).await;
        r.unwrap();
        let (back, r) = volume.read(1, vec![0; bs * 3]).await;
        r.unwrap();
        if volume.kind() != "null" {
            assert_eq!(back, pattern);
            volume.discard(2, 1).await.unwrap();
            let (back, r) = volume.read(1, vec![0xff; bs * 3]).await;
            r.unwrap();
            assert_eq!(&back[..bs], &pattern[..bs]);
            assert!(back[bs..2 * bs].iter().all(|&b| b == 0));
            assert_eq!(&back[2 * bs..], &pattern[2 * bs..]);
        }
        volume.flush().await.unwrap();
        let (_, r) = volume.read(g.blocks - 1, vec![0; bs * 2]).await;
        assert!(matches!(r, Err(VolumeError::OutOfRange { .. })), "{r:?}");
        let (_, r) = volume.write(0, vec![0; bs + 1]).await;
        assert!(matches!(r, Err(VolumeError::Misaligned { .. })), "{r:?}");
        assert!(volume.discard(g.blocks, 1).await.is_err());
    }

    #[test]
    fn latency_buckets() {
        let stats = VolumeStats::default();
        stats.record(IoKind::Read, 4096, 0, true);
        stats.record(IoKind::Read, 4096, 3, true);
        stats.record(IoKind::Write, 512, u64::MAX, false);
        assert_eq!(stats.latency_us[0].load(Ordering::Relaxed), 1);
        assert_eq!(stats.latency_us[2].load(Ordering::Relaxed), 1);
        assert_eq!(stats.latency_us[LATENCY_BUCKETS - 1].load(Ordering::Relaxed), 1);
        assert_eq!(stats.read_bytes.load(Ordering::Relaxed), 8192);
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);
    }
}
