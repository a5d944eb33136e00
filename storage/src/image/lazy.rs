//! The `lazy` volume: one converted layer served as a read-only block device whose blocks are fetched on first
//! read.
//!
//! A read maps to chunks. Cached chunks are read from the [`ChunkCache`]; missing ones are fetched from the
//! layer's data blob through a [`BlobSource`] — adjacent missing chunks of one read in one ranged request, and a
//! chunk already being fetched for another read is waited for, not fetched again. Every fetched chunk is
//! decompressed and checked against its digest before it is served or cached; a chunk that fails the check is
//! fetched once more, then the read fails. A source that is down is retried with backoff up to the policy's
//! deadline; then the read fails with [`VolumeError::Unavailable`], which the target reports as an unrecoverable
//! read error (the host sees EIO) instead of leaving the queue hung. The next read tries again, so reads succeed
//! again as soon as the source is back.
//!
//! The volume also records which chunks were first read, in order (the start-up trace), so the next cold start
//! of the same layer can prefetch them.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use super::Digest;
use super::cache::ChunkCache;
use super::chunk::ChunkIndex;
use crate::bdev::{BufResult, Geometry, IoFuture, Volume, VolumeError};

/// Block size of lazy volumes: EROFS on a 4 KiB-page host mounts only from 4 KiB blocks.
pub const BLOCK_SIZE: u32 = 4096;

/// Where a layer's data blob is read from (a registry in production, a twin in tests).
pub trait BlobSource: Send + Sync + std::fmt::Debug + 'static {
    /// Bytes `range` of the data blob.
    fn fetch(&self, range: Range<u64>) -> IoFuture<'_, Result<Bytes, FetchError>>;
}

/// Why a fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    /// Worth retrying (the source is unreachable, overloaded or timed out); otherwise final (not found, denied).
    pub retryable: bool,
    pub message: String,
}

/// How long and how often a missing chunk is fetched before a read fails.
#[derive(Debug, Clone, Copy)]
pub struct FetchPolicy {
    /// A read whose chunk cannot be fetched within this fails. Keep it under the host's I/O timeout
    /// (Linux `nvme_core.io_timeout`, 30 s), so the host sees an error rather than resetting the controller.
    pub deadline: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Most bytes one ranged request may cover when adjacent misses are coalesced.
    pub max_request_bytes: u64,
    /// Chunks recorded in the start-up trace (0: none).
    pub trace_chunks: usize,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(20),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_request_bytes: 8 << 20,
            trace_chunks: 16384,
        }
    }
}

/// Counters of one lazy volume.
#[derive(Debug, Default)]
pub struct LazyStats {
    /// Chunk reads served from the cache.
    pub chunk_hits: AtomicU64,
    /// Chunk reads that had to wait for a fetch.
    pub chunk_misses: AtomicU64,
    /// Ranged requests made to the source, and the bytes they returned.
    pub fetches: AtomicU64,
    pub fetched_bytes: AtomicU64,
    /// Sum of the successful requests' latencies.
    pub fetch_micros: AtomicU64,
    /// Failed requests (each retry counts).
    pub fetch_errors: AtomicU64,
    /// Chunks whose bytes failed verification.
    pub corrupt_chunks: AtomicU64,
    /// Reads failed back to the host.
    pub failed_reads: AtomicU64,
    /// Chunks fetched by [`LazyVolume::prefetch`].
    pub prefetched_chunks: AtomicU64,
}

type ChunkResult = Result<Arc<Vec<u8>>, Arc<str>>;
type ChunkSender = watch::Sender<Option<ChunkResult>>;

#[derive(Debug)]
struct Inner {
    index: Arc<ChunkIndex>,
    source: Arc<dyn BlobSource>,
    cache: Arc<ChunkCache>,
    policy: FetchPolicy,
    inflight: Mutex<HashMap<Digest, watch::Receiver<Option<ChunkResult>>>>,
    stats: LazyStats,
    last_error: Mutex<Option<String>>,
    trace: Mutex<Trace>,
    /// `trace.order.len()`, readable without the lock: a full trace costs a read nothing more.
    traced: AtomicUsize,
}

#[derive(Debug, Default)]
struct Trace {
    seen: Vec<bool>,
    order: Vec<u32>,
}

/// A read-only volume over one converted layer.
#[derive(Debug, Clone)]
pub struct LazyVolume {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LazyVolume {
    pub fn new(
        index: Arc<ChunkIndex>,
        source: Arc<dyn BlobSource>,
        cache: Arc<ChunkCache>,
        policy: FetchPolicy,
    ) -> Self {
        let trace = Trace { seen: vec![false; index.chunks.len()], order: Vec::new() };
        Self {
            inner: Arc::new(Inner {
                index,
                source,
                cache,
                policy,
                inflight: Mutex::new(HashMap::new()),
                stats: LazyStats::default(),
                last_error: Mutex::new(None),
                trace: Mutex::new(trace),
                traced: AtomicUsize::new(0),
            }),
        }
    }

    pub fn index(&self) -> &ChunkIndex {
        &self.inner.index
    }

    pub fn stats(&self) -> &LazyStats {
        &self.inner.stats
    }

    /// The last fetch or verification failure, for the image's status.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.inner.last_error).clone()
    }

    /// Chunks in the order they were first read (at most `policy.trace_chunks`).
    pub fn trace(&self) -> Vec<u32> {
        lock(&self.inner.trace).order.clone()
    }

    /// How many chunks the trace holds.
    pub fn traced_chunks(&self) -> usize {
        self.inner.traced.load(Ordering::Relaxed)
    }

    /// Whether chunk `i` is in the cache.
    pub fn is_cached(&self, i: usize) -> bool {
        self.inner.index.chunks.get(i).is_some_and(|c| self.inner.cache.contains(&c.digest))
    }

    /// How many of the layer's chunks are in the cache, and their uncompressed bytes.
    pub fn cached(&self) -> (usize, u64) {
        let index = &self.inner.index;
        (0..index.chunks.len())
            .filter(|&i| self.inner.cache.contains(&index.chunks[i].digest))
            .fold((0, 0), |(n, bytes), i| (n + 1, bytes + index.chunk_len(i) as u64))
    }

    /// Fetches the given chunks into the cache (those not cached yet), coalescing adjacent ones; returns how
    /// many failed.
    pub async fn prefetch(&self, chunks: &[u32]) -> usize {
        let n = self.inner.index.chunks.len();
        let mut wanted: Vec<usize> = chunks.iter().map(|&c| c as usize).filter(|&c| c < n).collect();
        wanted.sort_unstable();
        wanted.dedup();
        wanted.retain(|&c| !self.inner.cache.contains(&self.inner.index.chunks[c].digest));
        let mut failed = 0;
        for waiter in Inner::start_fetches(&self.inner, &wanted) {
            match waiter.1.await {
                Ok(_) => self.inner.stats.prefetched_chunks.fetch_add(1, Ordering::Relaxed),
                Err(_) => {
                    failed += 1;
                    0
                }
            };
        }
        failed
    }
}

type Waiter = (usize, std::pin::Pin<Box<dyn std::future::Future<Output = ChunkResult> + Send>>);

impl Inner {
    fn record_trace(&self, chunks: Range<usize>) {
        if self.traced.load(Ordering::Relaxed) >= self.policy.trace_chunks {
            return;
        }
        let mut trace = lock(&self.trace);
        for c in chunks {
            if trace.order.len() >= self.policy.trace_chunks {
                break;
            }
            if !trace.seen[c] {
                trace.seen[c] = true;
                trace.order.push(c as u32);
            }
        }
        self.traced.store(trace.order.len(), Ordering::Relaxed);
    }

    /// Starts (or joins) the fetches of `missing` chunks (ascending) and returns a waiter per chunk.
    fn start_fetches(this: &Arc<Self>, missing: &[usize]) -> Vec<Waiter> {
        let mut waiters: Vec<Waiter> = Vec::with_capacity(missing.len());
        let mut runs: Vec<(Vec<usize>, Vec<ChunkSender>)> = Vec::new();
        {
            let mut inflight = lock(&this.inflight);
            for &c in missing {
                let entry = this.index.chunks[c];
                let rx = match inflight.get(&entry.digest) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        inflight.insert(entry.digest, rx.clone());
                        let joins = runs.last().is_some_and(|(run, _): &(Vec<usize>, _)| {
                            let first = this.index.chunks[run[0]];
                            let last = this.index.chunks[*run.last().unwrap_or(&run[0])];
                            last.stored().end == entry.offset
                                && entry.stored().end - first.offset <= this.policy.max_request_bytes
                        });
                        if joins && let Some((run, senders)) = runs.last_mut() {
                            run.push(c);
                            senders.push(tx);
                        } else {
                            runs.push((vec![c], vec![tx]));
                        }
                        rx
                    }
                };
                let mut rx = rx;
                waiters.push((
                    c,
                    Box::pin(async move {
                        match rx.wait_for(Option::is_some).await {
                            Ok(v) => v.clone().unwrap_or_else(|| Err("fetch vanished".into())),
                            Err(_) => Err("the fetch was abandoned".into()),
                        }
                    }),
                ));
            }
        }
        for (run, senders) in runs {
            let this = this.clone();
            // The fetch runs on its own, so it completes (and fills the cache) even if the reader goes away.
            tokio::spawn(async move { this.fetch_run(run, senders).await });
        }
        waiters
    }

    /// Fetches a run of chunks stored back to back, verifies each, publishes it to its waiters, caches it.
    async fn fetch_run(self: Arc<Self>, run: Vec<usize>, senders: Vec<ChunkSender>) {
        let first = self.index.chunks[run[0]].offset;
        let end = run.iter().map(|&c| self.index.chunks[c].stored().end).max().unwrap_or(first);
        let fetched = self.fetch_with_deadline(first..end).await;
        let mut results = Vec::with_capacity(run.len());
        for &c in &run {
            let entry = self.index.chunks[c];
            let result: ChunkResult = match &fetched {
                Err(e) => Err(e.clone()),
                Ok(bytes) => {
                    let at = (entry.offset - first) as usize;
                    let stored = bytes.get(at..at + entry.stored_len as usize).unwrap_or_default();
                    match self.index.open_chunk(c, stored) {
                        Ok(data) => Ok(Arc::new(data)),
                        Err(e) => self.refetch_chunk(c, e).await,
                    }
                }
            };
            results.push((entry.digest, result));
        }
        // Cached before it is published, so a prefetch that returns has filled the cache and a reader that finds
        // no fetch in flight finds the chunk in the cache.
        let verified: Vec<(Digest, Arc<Vec<u8>>)> =
            results.iter().filter_map(|(d, r)| r.as_ref().ok().map(|data| (*d, data.clone()))).collect();
        if !verified.is_empty() {
            let this = self.clone();
            let stored = tokio::task::spawn_blocking(move || {
                for (digest, data) in &verified {
                    if let Err(e) = this.cache.insert(digest, data) {
                        tracing::warn!(chunk = %digest, error = %e, "could not cache a chunk; it will be fetched again");
                    }
                }
            })
            .await;
            if let Err(e) = stored {
                tracing::warn!(error = %e, "caching chunks failed");
            }
        }
        let mut inflight = lock(&self.inflight);
        for ((digest, result), tx) in results.into_iter().zip(senders) {
            inflight.remove(&digest);
            let _ = tx.send(Some(result));
        }
    }

    /// A chunk failed verification: fetch it alone once more; a second failure fails it.
    async fn refetch_chunk(&self, c: usize, first: super::chunk::ChunkError) -> ChunkResult {
        self.stats.corrupt_chunks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(chunk = c, error = %first, "fetched chunk failed verification; fetching it again");
        let entry = self.index.chunks[c];
        let again = self.fetch_with_deadline(entry.stored()).await?;
        match self.index.open_chunk(c, &again) {
            Ok(data) => Ok(Arc::new(data)),
            Err(e) => {
                self.stats.corrupt_chunks.fetch_add(1, Ordering::Relaxed);
                let message = format!("{e} (after a second fetch)");
                *lock(&self.last_error) = Some(message.clone());
                Err(message.into())
            }
        }
    }

    /// One ranged request, retried with backoff while the error is retryable and the deadline allows.
    async fn fetch_with_deadline(&self, range: Range<u64>) -> Result<Bytes, Arc<str>> {
        let started = Instant::now();
        let deadline = started + self.policy.deadline;
        let mut backoff = self.policy.initial_backoff;
        loop {
            let attempt = Instant::now();
            let remaining = deadline.saturating_duration_since(attempt);
            let outcome = match tokio::time::timeout(remaining, self.source.fetch(range.clone())).await {
                Ok(Ok(bytes)) if bytes.len() as u64 == range.end - range.start => Ok(bytes),
                Ok(Ok(bytes)) => Err(FetchError {
                    retryable: true,
                    message: format!("asked for {} bytes, got {}", range.end - range.start, bytes.len()),
                }),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(FetchError { retryable: true, message: "timed out".into() }),
            };
            match outcome {
                Ok(bytes) => {
                    self.stats.fetches.fetch_add(1, Ordering::Relaxed);
                    self.stats.fetched_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    self.stats.fetch_micros.fetch_add(attempt.elapsed().as_micros() as u64, Ordering::Relaxed);
                    return Ok(bytes);
                }
                Err(e) => {
                    self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    if !e.retryable || now + backoff >= deadline {
                        let message = format!(
                            "fetching bytes {}..{} of {} failed after {:.1}s: {}",
                            range.start,
                            range.end,
                            self.index.data_digest,
                            started.elapsed().as_secs_f64(),
                            e.message
                        );
                        tracing::warn!(error = %message, "chunk fetch failed");
                        *lock(&self.last_error) = Some(message.clone());
                        return Err(message.into());
                    }
                    tracing::debug!(error = %e, backoff_ms = backoff.as_millis() as u64, "chunk fetch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.policy.max_backoff);
                }
            }
        }
    }

    /// Fills `buf` with image bytes from `offset`, fetching what is missing.
    async fn read(self: Arc<Self>, offset: u64, buf: Vec<u8>) -> BufResult {
        let end = offset + buf.len() as u64;
        let chunks = self.index.chunks_for(offset..end);
        self.record_trace(chunks.clone());
        // The common case — a read inside one cached chunk whose file is open — goes straight to the ring.
        let buf = if chunks.len() == 1 {
            let (_, at) = self.part(chunks.start, offset, end);
            match self.cache.read_open(&self.index.chunks[chunks.start].digest, at, buf).await {
                Ok(buf) => {
                    self.stats.chunk_hits.fetch_add(1, Ordering::Relaxed);
                    return (buf, Ok(()));
                }
                Err(buf) => buf,
            }
        } else {
            buf
        };
        self.read_general(offset, buf).await
    }

    /// [`Inner::read`] for any range: cached parts copied on a blocking thread, missing chunks fetched.
    async fn read_general(self: Arc<Self>, offset: u64, mut buf: Vec<u8>) -> BufResult {
        let end = offset + buf.len() as u64;
        let chunks = self.index.chunks_for(offset..end);
        // Whatever is cached is copied on a blocking thread; the rest is listed.
        let this = self.clone();
        let lookup = tokio::task::spawn_blocking(move || {
            let mut missing = Vec::new();
            for c in chunks {
                let (part, at) = this.part(c, offset, end);
                let digest = this.index.chunks[c].digest;
                let dst = &mut buf[(part.start - offset) as usize..(part.end - offset) as usize];
                match this.cache.read_at(&digest, at, dst) {
                    Ok(true) => {
                        this.stats.chunk_hits.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => missing.push(c),
                    Err(e) => return (buf, Err(e)),
                }
            }
            (buf, Ok(missing))
        })
        .await;
        let (mut buf, missing) = match lookup {
            Ok((buf, Ok(missing))) => (buf, missing),
            Ok((buf, Err(e))) => return (buf, Err(VolumeError::Io(e))),
            Err(e) => return (Vec::new(), Err(VolumeError::Io(std::io::Error::other(e.to_string())))),
        };
        if missing.is_empty() {
            return (buf, Ok(()));
        }
        self.stats.chunk_misses.fetch_add(missing.len() as u64, Ordering::Relaxed);
        for (c, waiter) in Self::start_fetches(&self, &missing) {
            match waiter.await {
                Ok(data) => {
                    let (part, at) = self.part(c, offset, end);
                    let dst = &mut buf[(part.start - offset) as usize..(part.end - offset) as usize];
                    dst.copy_from_slice(&data[at as usize..at as usize + dst.len()]);
                }
                Err(e) => {
                    self.stats.failed_reads.fetch_add(1, Ordering::Relaxed);
                    return (buf, Err(VolumeError::Unavailable(e.to_string())));
                }
            }
        }
        (buf, Ok(()))
    }

    /// The image bytes of chunk `c` inside `offset..end`, and where they start within the chunk.
    fn part(&self, c: usize, offset: u64, end: u64) -> (Range<u64>, u64) {
        let chunk_start = c as u64 * u64::from(self.index.chunk_size);
        let chunk_end = chunk_start + self.index.chunk_len(c) as u64;
        let start = offset.max(chunk_start);
        (start..end.min(chunk_end), start - chunk_start)
    }
}

impl Volume for LazyVolume {
    fn kind(&self) -> &'static str {
        "lazy"
    }

    fn geometry(&self) -> Geometry {
        Geometry { block_size: BLOCK_SIZE, blocks: self.inner.index.image_size / u64::from(BLOCK_SIZE) }
    }

    fn read(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        let offset = match self.geometry().check(lba, buf.len()) {
            Ok(offset) => offset,
            Err(e) => return Box::pin(async move { (buf, Err(e)) }),
        };
        Box::pin(self.inner.clone().read(offset, buf))
    }

    fn write(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        let result = self.geometry().check(lba, buf.len()).and(Err(VolumeError::ReadOnly));
        Box::pin(async move { (buf, result) })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), VolumeError>> {
        Box::pin(async { Ok(()) })
    }

    fn discard(&self, _lba: u64, _blocks: u64) -> IoFuture<'_, Result<(), VolumeError>> {
        Box::pin(async { Err(VolumeError::ReadOnly) })
    }

    fn read_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::image::cache::CacheConfig;
    use crate::image::chunk::{Compression, chunk_image};

    /// The data blob in memory, with switches for an outage and for corruption, counting requests.
    #[derive(Debug, Default)]
    struct Twin {
        data: Vec<u8>,
        down: AtomicBool,
        corrupt_next: AtomicU64,
        requests: Mutex<Vec<Range<u64>>>,
        delay: Duration,
    }

    impl BlobSource for Twin {
        fn fetch(&self, range: Range<u64>) -> IoFuture<'_, Result<Bytes, FetchError>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                lock(&self.requests).push(range.clone());
                if self.down.load(Ordering::SeqCst) {
                    return Err(FetchError { retryable: true, message: "connection refused".into() });
                }
                let mut bytes = self.data[range.start as usize..range.end as usize].to_vec();
                if self.corrupt_next.load(Ordering::SeqCst) > 0 {
                    self.corrupt_next.fetch_sub(1, Ordering::SeqCst);
                    bytes[0] ^= 0xff;
                }
                Ok(Bytes::from(bytes))
            })
        }
    }

    fn image(len: usize) -> Vec<u8> {
        let mut x = 7u32;
        (0..len)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if (i / 4096) % 3 == 0 { (x >> 16) as u8 } else { (i % 251) as u8 }
            })
            .collect()
    }

    fn volume(image: &[u8], chunk: u32, policy: FetchPolicy) -> (LazyVolume, Arc<Twin>, tempfile::TempDir) {
        let chunked = chunk_image(image, chunk, Compression::DEFAULT).unwrap();
        let twin = Arc::new(Twin { data: chunked.data, delay: Duration::from_millis(5), ..Twin::default() });
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(CacheConfig::new(dir.path(), 64 << 20)).unwrap();
        (LazyVolume::new(Arc::new(chunked.index), twin.clone(), cache, policy), twin, dir)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_fetch_once_coalesce_and_then_hit_the_cache() {
        let image = image(64 * 4096);
        let (vol, twin, _dir) = volume(&image, 16384, FetchPolicy::default());
        assert_eq!(vol.geometry().blocks, 64);
        // A read over chunks 1..=3 is one request.
        let (buf, r) = vol.read(5, vec![0; 8 * 4096]).await;
        r.unwrap();
        assert_eq!(buf, image[5 * 4096..13 * 4096]);
        assert_eq!(lock(&twin.requests).len(), 1, "adjacent misses are one request");
        // Eight concurrent readers of one uncached chunk cause one fetch.
        let reads: Vec<_> = (0..8).map(|i| vol.read(40 + (i % 4), vec![0; 4096])).collect();
        for (i, (buf, r)) in futures_util::future::join_all(reads).await.into_iter().enumerate() {
            r.unwrap();
            let lba = 40 + (i % 4);
            assert_eq!(buf, image[lba * 4096..(lba + 1) * 4096]);
        }
        assert_eq!(lock(&twin.requests).len(), 2, "concurrent reads of one chunk fetch it once");
        // Everything cached: the whole image reads back with no further request.
        let (_, r) = vol.read(0, vec![0; 64 * 4096]).await;
        r.unwrap();
        let before = lock(&twin.requests).len();
        let (buf, r) = vol.read(0, vec![0; 64 * 4096]).await;
        r.unwrap();
        assert_eq!(buf, image);
        assert_eq!(lock(&twin.requests).len(), before);
        assert_eq!(vol.cached(), (vol.index().chunks.len(), vol.index().image_size));
        assert!(vol.stats().chunk_hits.load(Ordering::Relaxed) >= 16);
        assert_eq!(&vol.trace()[..3], &[1, 2, 3], "first reads are traced in order");
        let (_, r) = vol.write(0, vec![0; 4096]).await;
        assert!(matches!(r, Err(VolumeError::ReadOnly)));
        assert!(vol.read_only());
        let (_, r) = vol.read(63, vec![0; 8192]).await;
        assert!(matches!(r, Err(VolumeError::OutOfRange { .. })));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_reads_through_io_uring_return_the_same_bytes() {
        let image = image(48 * 4096);
        let chunked = chunk_image(&image, 16384, Compression::DEFAULT).unwrap();
        let twin = Arc::new(Twin { data: chunked.data, ..Twin::default() });
        let dir = tempfile::tempdir().unwrap();
        // Where the kernel has no io_uring (qemu-user) this exercises the blocking path only.
        let config = CacheConfig { uring: crate::bdev::Uring::new().ok(), ..CacheConfig::new(dir.path(), 64 << 20) };
        let cache = ChunkCache::open(config).unwrap();
        let vol = LazyVolume::new(Arc::new(chunked.index), twin.clone(), cache, FetchPolicy::default());
        for round in 0..3 {
            for lba in (0..48u64).rev() {
                let (buf, r) = vol.read(lba, vec![0; 4096]).await;
                r.unwrap();
                assert_eq!(buf, image[lba as usize * 4096..(lba as usize + 1) * 4096], "round {round}, block {lba}");
            }
        }
        assert_eq!(lock(&twin.requests).len(), 12, "each chunk fetched once");
        let hot = vol.inner.cache.read_open(&vol.index().chunks[0].digest, 0, vec![0; 4096]).await;
        if crate::bdev::Uring::new().is_ok() {
            assert_eq!(hot.unwrap(), image[..4096], "hot chunks keep an open handle and read through the ring");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_fails_reads_at_the_deadline_and_they_recover_without_reopening() {
        let image = image(16 * 4096);
        let policy = FetchPolicy {
            deadline: Duration::from_millis(400),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(80),
            ..FetchPolicy::default()
        };
        let (vol, twin, _dir) = volume(&image, 8192, policy);
        twin.down.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let (_, r) = vol.read(0, vec![0; 4096]).await;
        let waited = started.elapsed();
        assert!(matches!(&r, Err(VolumeError::Unavailable(m)) if m.contains("connection refused")), "{r:?}");
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "{waited:?}");
        assert!(lock(&twin.requests).len() >= 3, "retried with backoff");
        assert!(vol.last_error().unwrap().contains("connection refused"));
        // Back up: the same read succeeds.
        twin.down.store(false, Ordering::SeqCst);
        let (buf, r) = vol.read(0, vec![0; 4096]).await;
        r.unwrap();
        assert_eq!(buf, image[..4096]);
        // Down again, but cached chunks are still served.
        twin.down.store(true, Ordering::SeqCst);
        let (buf, r) = vol.read(1, vec![0; 4096]).await;
        r.unwrap();
        assert_eq!(buf, image[4096..8192]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_chunks_are_refetched_once_then_fail() {
        let image = image(16 * 4096);
        let (vol, twin, _dir) = volume(&image, 8192, FetchPolicy::default());
        twin.corrupt_next.store(1, Ordering::SeqCst);
        let (buf, r) = vol.read(0, vec![0; 4096]).await;
        r.unwrap();
        assert_eq!(buf, image[..4096], "one bad answer is healed by a second fetch");
        assert_eq!(vol.stats().corrupt_chunks.load(Ordering::Relaxed), 1);
        twin.corrupt_next.store(2, Ordering::SeqCst);
        let (_, r) = vol.read(4, vec![0; 4096]).await;
        assert!(matches!(&r, Err(VolumeError::Unavailable(m)) if m.contains("after a second fetch")), "{r:?}");
        assert!(vol.last_error().unwrap().contains("chunk 2"));
        assert!(!vol.inner.cache.contains(&vol.index().chunks[2].digest), "unverified bytes are never cached");
        let (buf, r) = vol.read(4, vec![0; 4096]).await;
        r.unwrap();
        assert_eq!(buf, image[4 * 4096..5 * 4096]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefetch_fills_the_cache_from_a_trace() {
        let image = image(32 * 4096);
        let (vol, twin, dir) = volume(&image, 8192, FetchPolicy::default());
        assert_eq!(vol.prefetch(&[3, 4, 5, 9, 200]).await, 0);
        assert_eq!(lock(&twin.requests).len(), 2, "3..=5 coalesce, 9 alone, 200 is ignored");
        // Another layer with the same chunks shares the cache.
        let cache = ChunkCache::open(CacheConfig::new(dir.path(), 64 << 20)).unwrap();
        cache.wait_indexed();
        let other = LazyVolume::new(vol.inner.index.clone(), twin.clone(), cache, FetchPolicy::default());
        let (buf, r) = other.read(6, vec![0; 3 * 8192]).await;
        r.unwrap();
        assert_eq!(buf, image[6 * 4096..12 * 4096]);
        assert_eq!(lock(&twin.requests).len(), 2, "prefetched chunks come from the shared cache");
    }
}

/// A layer's data blob in a registry, read by ranged GETs.
#[derive(Debug)]
pub struct RegistryBlob {
    pub client: Arc<super::registry::RegistryClient>,
    pub repository: super::registry::Reference,
    pub credentials: super::registry::Credentials,
    pub digest: Digest,
}

impl BlobSource for RegistryBlob {
    fn fetch(&self, range: Range<u64>) -> IoFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move {
            self.client
                .get_blob(&self.repository, &self.credentials, &self.digest, Some(range))
                .await
                .map_err(|e| FetchError { retryable: e.is_retryable(), message: e.to_string() })
        })
    }
}
