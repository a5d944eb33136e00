//! RAM volume. Memory is allocated in 1 MiB chunks on first write, so a large volume costs only what was
//! written; a discard that covers a whole chunk gives it back. Each chunk has its own lock, so I/O to different
//! regions proceeds in parallel.

use std::io::IoSlice;
use std::sync::{LazyLock, RwLock, RwLockReadGuard};

use super::{BufResult, Geometry, IoFuture, Loan, Volume, VolumeError};

const CHUNK: usize = 1 << 20;
/// What a chunk never written reads as, lent in pieces of this size (allocated zeroed on first use, so it takes
/// no room in the binary).
static ZEROES: LazyLock<Box<[u8]>> = LazyLock::new(|| vec![0; 64 * 1024].into_boxed_slice());

/// A chunk's memory; `None` until first written, and again once wholly discarded.
type Chunk = Option<Box<[u8]>>;

/// A thin RAM volume.
#[derive(Debug)]
pub struct MallocVolume {
    geometry: Geometry,
    chunks: Vec<RwLock<Chunk>>,
}

impl MallocVolume {
    /// A zero-filled volume of `blocks` blocks of `block_size` bytes.
    pub fn new(block_size: u32, blocks: u64) -> Self {
        let geometry = Geometry { block_size, blocks };
        let chunks = geometry.bytes().div_ceil(CHUNK as u64) as usize;
        Self { geometry, chunks: (0..chunks).map(|_| RwLock::new(None)).collect() }
    }

    /// Calls `f(chunk index, offset in chunk, range in the request)` for each chunk a byte range touches.
    fn spans(offset: u64, len: usize, mut f: impl FnMut(usize, usize, std::ops::Range<usize>)) {
        let mut done = 0;
        while done < len {
            let at = offset as usize + done;
            let (chunk, within) = (at / CHUNK, at % CHUNK);
            let n = (CHUNK - within).min(len - done);
            f(chunk, within, done..done + n);
            done += n;
        }
    }

    fn zero(&self, offset: u64, len: usize) {
        Self::spans(offset, len, |chunk, within, range| {
            let mut slot = self.chunks[chunk].write().unwrap_or_else(|e| e.into_inner());
            if range.len() == CHUNK {
                *slot = None;
            } else if let Some(data) = slot.as_mut() {
                data[within..within + range.len()].fill(0);
            }
        });
    }
}

/// Blocks lent out of a RAM volume: the chunks they span, each read-locked, and the byte range in it.
struct MallocLoan<'a> {
    parts: Vec<(RwLockReadGuard<'a, Chunk>, std::ops::Range<usize>)>,
}

impl Loan for MallocLoan<'_> {
    fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        for (chunk, range) in &self.parts {
            match chunk.as_deref() {
                Some(data) => out.push(IoSlice::new(&data[range.clone()])),
                None => {
                    let mut left = range.len();
                    while left > 0 {
                        let n = left.min(ZEROES.len());
                        out.push(IoSlice::new(&ZEROES[..n]));
                        left -= n;
                    }
                }
            }
        }
    }
}

impl Volume for MallocVolume {
    fn kind(&self) -> &'static str {
        "malloc"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, lba: u64, mut buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        let result = self.geometry.check(lba, buf.len()).map(|offset| {
            Self::spans(offset, buf.len(), |chunk, within, range| {
                let slot = self.chunks[chunk].read().unwrap_or_else(|e| e.into_inner());
                match slot.as_ref() {
                    Some(data) => buf[range.clone()].copy_from_slice(&data[within..within + range.len()]),
                    None => buf[range].fill(0),
                }
            });
        });
        Box::pin(std::future::ready((buf, result)))
    }

    fn write(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        let result = self.geometry.check(lba, buf.len()).map(|offset| {
            Self::spans(offset, buf.len(), |chunk, within, range| {
                let mut slot = self.chunks[chunk].write().unwrap_or_else(|e| e.into_inner());
                let data = slot.get_or_insert_with(|| vec![0; CHUNK].into_boxed_slice());
                data[within..within + range.len()].copy_from_slice(&buf[range]);
            });
        });
        Box::pin(std::future::ready((buf, result)))
    }

    fn flush(&self) -> IoFuture<'_, Result<(), VolumeError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn lends(&self) -> bool {
        true
    }

    fn lend(&self, lba: u64, len: usize) -> Option<Box<dyn Loan + '_>> {
        let offset = self.geometry.check(lba, len).ok()?;
        let mut parts = Vec::with_capacity(2);
        let mut busy = false;
        // try_read: a caller holding other loans must not wait here (a writer queued behind one of them would
        // wait for it in turn).
        Self::spans(offset, len, |chunk, within, range| match self.chunks[chunk].try_read() {
            Ok(guard) => parts.push((guard, within..within + range.len())),
            Err(std::sync::TryLockError::Poisoned(e)) => parts.push((e.into_inner(), within..within + range.len())),
            Err(std::sync::TryLockError::WouldBlock) => busy = true,
        });
        (!busy).then(|| Box::new(MallocLoan { parts }) as Box<dyn Loan + '_>)
    }

    fn discard(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), VolumeError>> {
        let len = blocks.saturating_mul(u64::from(self.geometry.block_size));
        let result = usize::try_from(len)
            .map_err(|_| VolumeError::OutOfRange { start: lba, end: u64::MAX, capacity: self.geometry.blocks })
            .and_then(|len| self.geometry.check(lba, len).map(|offset| self.zero(offset, len)));
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        super::super::tests::conformance(&MallocVolume::new(512, 8192)).await;
        super::super::tests::conformance(&MallocVolume::new(4096, 1024)).await;
    }

    fn lent(volume: &MallocVolume, lba: u64, len: usize) -> Vec<u8> {
        let loan = volume.lend(lba, len).expect("lends");
        let mut slices = Vec::new();
        loan.slices(&mut slices);
        slices.iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[tokio::test]
    async fn lends_what_reads_return_across_chunks_and_holes() {
        let volume = MallocVolume::new(512, (3 * CHUNK / 512) as u64);
        // Written data spanning chunks 0 and 1; chunk 2 never written.
        let lba = (CHUNK / 512 - 2) as u64;
        let data: Vec<u8> = (0..4096).map(|i| (i % 253) as u8 + 1).collect();
        volume.write(lba, data.clone()).await.1.unwrap();
        assert_eq!(lent(&volume, lba, data.len()), data);
        let hole = (2 * CHUNK / 512) as u64;
        assert_eq!(lent(&volume, hole, 128 * 1024), vec![0; 128 * 1024]);
        // What a read returns, a loan returns.
        let (read, r) = volume.read(lba - 8, vec![0; 8192]).await;
        r.unwrap();
        assert_eq!(lent(&volume, lba - 8, 8192), read);
        // Not whole blocks, or past the end: no loan.
        assert!(volume.lend(0, 100).is_none());
        assert!(volume.lend(volume.geometry.blocks, 512).is_none());
        // Two loans of one chunk at once; none while the chunk is being written.
        let first = volume.lend(0, 512).expect("lends");
        assert!(volume.lend(8, 512).is_some());
        drop(first);
        let writing = volume.chunks[0].write().unwrap();
        assert!(volume.lend(0, 512).is_none(), "lent a chunk being written");
        drop(writing);
    }

    #[tokio::test]
    async fn spans_chunk_boundaries_and_frees_whole_chunks() {
        let volume = MallocVolume::new(512, (3 * CHUNK / 512) as u64);
        let lba = (CHUNK / 512 - 1) as u64;
        let data: Vec<u8> = (0..CHUNK + 1024).map(|i| (i % 251) as u8).collect();
        let (_, r) = volume.write(lba, data.clone()).await;
        r.unwrap();
        let (back, r) = volume.read(lba, vec![0; data.len()]).await;
        r.unwrap();
        assert_eq!(back, data);
        volume.discard((CHUNK / 512) as u64, (CHUNK / 512) as u64).await.unwrap();
        assert!(volume.chunks[1].read().unwrap().is_none(), "a fully discarded chunk is released");
    }
}
