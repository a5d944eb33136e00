//! The DPU's chunk cache: decompressed, verified chunks on local disk, addressed by their digest and shared by
//! every layer and image that holds the same chunk.
//!
//! Layout under the cache directory: `chunks/<2 hex>/<64 hex>` holds one chunk; `tmp/` holds chunks being
//! written. A chunk is written to `tmp/`, then renamed into place, so a crash (`kill -9`) leaves either a whole
//! chunk or none; `tmp/` is emptied at start. Chunks found at start are verified against their digest the first
//! time they are read (a power loss may leave a renamed file whose data never reached the disk), so a torn chunk
//! is dropped and fetched again instead of served.
//!
//! The cache is bounded: past its capacity the least recently used chunks are evicted (down to 90% of it).
//! Recency survives a restart through the files' modification times, which a hit refreshes at most once a
//! minute per chunk.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use super::Digest;
use crate::bdev::{Uring, UringOp};

/// How the cache is set up.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Most bytes of chunks kept.
    pub capacity_bytes: u64,
    /// Most chunk files kept open for reading.
    pub max_open_files: usize,
    /// `fdatasync` each chunk before it is published (survives power loss without re-fetching; costs a sync per
    /// chunk). Without it, chunks are still never served torn: see the module documentation.
    pub sync: bool,
    /// The io_uring engine [`ChunkCache::read_open`] reads through (the file volumes' engine); `None` where the
    /// kernel has none, and those reads take [`ChunkCache::read_at`] on a blocking thread instead.
    pub uring: Option<Uring>,
}

impl CacheConfig {
    pub fn new(dir: impl Into<PathBuf>, capacity_bytes: u64) -> Self {
        Self { dir: dir.into(), capacity_bytes, max_open_files: 1024, sync: false, uring: None }
    }
}

/// Cache counters, exported as metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub inserted_bytes: AtomicU64,
    pub evicted: AtomicU64,
    /// Chunks found on disk whose bytes no longer matched their digest (dropped and fetched again).
    pub corrupt: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    size: u64,
    last_use: u64,
    /// Bytes checked against the digest since this process found or wrote the file.
    verified: bool,
    file: Option<Arc<File>>,
    /// When the file's mtime was last refreshed (for recency across restarts).
    touched: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    used: u64,
    clock: u64,
    open_files: usize,
}

/// The shared, persistent chunk cache.
#[derive(Debug)]
pub struct ChunkCache {
    config: CacheConfig,
    state: Mutex<State>,
    stats: CacheStats,
    tmp_seq: AtomicU64,
    /// Set (and signalled) once the chunks found at open are indexed.
    indexed: (Mutex<bool>, std::sync::Condvar),
}

/// Recency ranks below this belong to chunks found at open (in mtime order); uses count up from it.
const FOUND_RANKS: u64 = 1 << 40;

const TOUCH_EVERY: Duration = Duration::from_secs(60);

impl ChunkCache {
    /// Opens (creating) the cache directory and clears unfinished writes of processes no longer running. The chunks already there are indexed
    /// by a thread of their own (a large cache holds hundreds of thousands of files, and the agent serves
    /// meanwhile): until [`ChunkCache::wait_indexed`] returns, a chunk not indexed yet reads as a miss.
    pub fn open(config: CacheConfig) -> io::Result<Arc<Self>> {
        let tmp = config.dir.join("tmp");
        std::fs::create_dir_all(config.dir.join("chunks"))?;
        std::fs::create_dir_all(&tmp)?;
        clear_unfinished(&tmp)?;
        // Chunks found on disk rank below every use from now on: their ranks are their mtime order, under this.
        let state = State { clock: FOUND_RANKS, ..State::default() };
        let cache = Arc::new(Self {
            config,
            state: Mutex::new(state),
            stats: CacheStats::default(),
            tmp_seq: 0.into(),
            indexed: (Mutex::new(false), std::sync::Condvar::new()),
        });
        let scanner = cache.clone();
        std::thread::Builder::new().name("dpu-cache-index".into()).spawn(move || scanner.index_found())?;
        Ok(cache)
    }

    /// Blocks until the chunks found at open are indexed.
    pub fn wait_indexed(&self) {
        let (done, cond) = &self.indexed;
        let mut done = done.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while !*done {
            done = cond.wait(done).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Indexes the chunks on disk, oldest first, unless a fetch already put them in; then evicts past capacity.
    fn index_found(&self) {
        match self.scan() {
            Ok(mut found) => {
                found.sort();
                let mut state = self.lock();
                for (rank, (modified, digest, size)) in found.into_iter().enumerate() {
                    if state.entries.contains_key(&digest) {
                        continue;
                    }
                    state.used += size;
                    let entry =
                        Entry { size, last_use: rank as u64, verified: false, file: None, touched: Some(modified) };
                    state.entries.insert(digest, entry);
                }
                drop(state);
                if let Err(e) = self.evict_over_capacity() {
                    tracing::warn!(error = %e, "evicting from the chunk cache failed");
                }
                tracing::info!(
                    dir = %self.config.dir.display(),
                    chunks = self.len(),
                    bytes = self.used_bytes(),
                    capacity = self.config.capacity_bytes,
                    "chunk cache indexed"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.config.dir.display(), "indexing the chunk cache failed: its chunks will be fetched again")
            }
        }
        let (done, cond) = &self.indexed;
        *done.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        cond.notify_all();
    }

    /// (modification time, digest, size) of every chunk file; stray files are removed.
    fn scan(&self) -> io::Result<Vec<(SystemTime, Digest, u64)>> {
        let mut found = Vec::new();
        for shard in std::fs::read_dir(self.config.dir.join("chunks"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(shard.path())? {
                let file = file?;
                let name = file.file_name();
                let Some(digest) = name.to_str().and_then(|n| format!("sha256:{n}").parse::<Digest>().ok()) else {
                    tracing::warn!(path = %file.path().display(), "removing a stray file from the chunk cache");
                    std::fs::remove_file(file.path())?;
                    continue;
                };
                let meta = file.metadata()?;
                found.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), digest, meta.len()));
            }
        }
        Ok(found)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.config.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity_bytes
    }

    /// Bytes of chunks held.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().entries.contains_key(digest) || self.adopt(digest)
    }

    /// While the chunks found at open are being indexed, indexes `digest` now if its file is there (unverified,
    /// like every chunk found at open), so a restarted agent serves what it has before the scan reaches it.
    fn adopt(&self, digest: &Digest) -> bool {
        if *self.indexed.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            return false;
        }
        let Ok(meta) = std::fs::metadata(self.path(digest)) else { return false };
        let mut state = self.lock();
        if !state.entries.contains_key(digest) {
            state.used += meta.len();
            let entry =
                Entry { size: meta.len(), last_use: 0, verified: false, file: None, touched: meta.modified().ok() };
            state.entries.insert(*digest, entry);
        }
        true
    }

    /// Reads bytes `offset..offset + buf.len()` of a verified cached chunk whose file is open, through the ring:
    /// the hot path, with no blocking thread. Gives the buffer back (`Err`) when it cannot serve the read — no
    /// ring, not cached, not verified since start, handle closed, or an I/O error — and [`ChunkCache::read_at`]
    /// must.
    pub async fn read_open(&self, digest: &Digest, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>, Vec<u8>> {
        let Some(ring) = &self.config.uring else { return Err(buf) };
        let Some(file) = self.handle(digest) else { return Err(buf) };
        match ring.submit(UringOp::Read, file, offset, buf).await {
            (buf, Ok(())) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Ok(buf)
            }
            (buf, Err(_)) => Err(buf),
        }
    }

    /// An open handle of a verified cached chunk, without any I/O. Counts as a use of the chunk.
    fn handle(&self, digest: &Digest) -> Option<Arc<File>> {
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        let entry = state.entries.get_mut(digest).filter(|e| e.verified)?;
        let file = entry.file.clone()?;
        entry.last_use = clock;
        Some(file)
    }

    /// Copies bytes `offset..offset + buf.len()` of chunk `digest` into `buf`. `Ok(false)` is a miss (not cached,
    /// or found corrupt and dropped). Blocking: call from a blocking thread.
    pub fn read_at(&self, digest: &Digest, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let (file, verified, touch) = {
            let mut state = self.lock();
            state.clock += 1;
            let clock = state.clock;
            let Some(entry) = state.entries.get_mut(digest) else {
                drop(state);
                if self.adopt(digest) {
                    return self.read_at(digest, offset, buf);
                }
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            };
            entry.last_use = clock;
            let now = SystemTime::now();
            let touch = entry.touched.is_none_or(|t| now.duration_since(t).unwrap_or_default() > TOUCH_EVERY);
            if touch {
                entry.touched = Some(now);
            }
            (entry.file.clone(), entry.verified, touch)
        };
        let file = match file {
            Some(file) => file,
            None => match self.open_file(digest) {
                Ok(Some(file)) => file,
                Ok(None) => return Ok(false),
                Err(e) => return Err(e),
            },
        };
        if !verified && !self.verify(digest, &file)? {
            return Ok(false);
        }
        if touch {
            // Recency for the next start; best effort.
            let _ = file.set_modified(SystemTime::now());
        }
        file.read_exact_at(buf, offset)?;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Opens a cached chunk's file and keeps the handle; `None` when the file vanished (the entry is dropped).
    fn open_file(&self, digest: &Digest) -> io::Result<Option<Arc<File>>> {
        let file = match File::open(self.path(digest)) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(digest);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mut state = self.lock();
        let over = state.open_files >= self.config.max_open_files;
        if over {
            // Close the least recently used half of the open handles.
            let mut open: Vec<(u64, Digest)> =
                state.entries.iter().filter(|(_, e)| e.file.is_some()).map(|(d, e)| (e.last_use, *d)).collect();
            open.sort_unstable();
            for (_, d) in open.iter().take(open.len().div_ceil(2)) {
                if let Some(e) = state.entries.get_mut(d) {
                    e.file = None;
                }
                state.open_files -= 1;
            }
        }
        if let Some(entry) = state.entries.get_mut(digest)
            && entry.file.is_none()
        {
            entry.file = Some(file.clone());
            state.open_files += 1;
        }
        Ok(Some(file))
    }

    /// Checks a chunk found at start against its digest; drops it when it does not match.
    fn verify(&self, digest: &Digest, file: &File) -> io::Result<bool> {
        let len = file.metadata()?.len();
        let mut data = vec![0; len as usize];
        file.read_exact_at(&mut data, 0)?;
        if Digest::of(&data) == *digest {
            if let Some(e) = self.lock().entries.get_mut(digest) {
                e.verified = true;
            }
            return Ok(true);
        }
        tracing::warn!(chunk = %digest, "cached chunk does not match its digest: dropped, it will be fetched again");
        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.forget(digest);
        let _ = std::fs::remove_file(self.path(digest));
        Ok(false)
    }

    fn forget(&self, digest: &Digest) {
        let mut state = self.lock();
        if let Some(e) = state.entries.remove(digest) {
            state.used -= e.size;
            state.open_files -= usize::from(e.file.is_some());
        }
    }

    /// Stores a verified chunk (the caller checked `data` against `digest`). Blocking.
    pub fn insert(&self, digest: &Digest, data: &[u8]) -> io::Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        let path = self.path(digest);
        // Named by process: during an upgrade's overlap the agent taking over clears only what no live process
        // is writing.
        let tmp = self.config.dir.join("tmp").join(format!(
            "{}.{}.{}",
            std::process::id(),
            digest.hex(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            if self.config.sync {
                f.sync_data()?;
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let size = data.len() as u64;
        {
            let mut state = self.lock();
            state.clock += 1;
            let entry =
                Entry { size, last_use: state.clock, verified: true, file: None, touched: Some(SystemTime::now()) };
            if state.entries.insert(*digest, entry).is_none() {
                state.used += size;
            }
        }
        self.stats.inserted_bytes.fetch_add(size, Ordering::Relaxed);
        self.evict_over_capacity()
    }

    /// Evicts least recently used chunks until `used` is at most 90% of the capacity, sparing the most recently
    /// used one (the chunk just inserted).
    fn evict_over_capacity(&self) -> io::Result<()> {
        let victims = {
            let mut state = self.lock();
            if state.used <= self.config.capacity_bytes {
                return Ok(());
            }
            let target = self.config.capacity_bytes / 10 * 9;
            let mut order: Vec<(u64, Digest, u64)> =
                state.entries.iter().map(|(d, e)| (e.last_use, *d, e.size)).collect();
            order.sort_unstable();
            let newest = state.clock;
            let mut victims = Vec::new();
            for (last_use, digest, size) in order {
                if state.used <= target || last_use == newest {
                    break;
                }
                if let Some(e) = state.entries.remove(&digest) {
                    state.open_files -= usize::from(e.file.is_some());
                }
                state.used -= size;
                victims.push(digest);
            }
            victims
        };
        self.stats.evicted.fetch_add(victims.len() as u64, Ordering::Relaxed);
        for digest in victims {
            // An open handle keeps an unlinked file readable, so a read in progress completes.
            match std::fs::remove_file(self.path(&digest)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The directory the cache lives in.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }
}

/// Removes the chunk writes a crash interrupted from `tmp`: every file not named after a live process
/// (`<pid>.<digest>.<seq>`; another agent process may be writing its own during an upgrade).
fn clear_unfinished(tmp: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(tmp)? {
        let entry = entry?;
        let name = entry.file_name();
        let writer = name.to_str().and_then(|n| n.split('.').next()).and_then(|pid| pid.parse::<u32>().ok());
        let live = writer.is_some_and(|pid| pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists());
        if !live {
            let path = entry.path();
            let removed =
                if entry.file_type()?.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            match removed {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seed: u8, len: usize) -> (Digest, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        (Digest::of(&data), data)
    }

    #[test]
    fn stores_reads_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(CacheConfig::new(dir.path(), 1 << 20)).unwrap();
        cache.wait_indexed();
        let (d, data) = chunk(1, 8192);
        let mut buf = vec![0; 100];
        assert!(!cache.read_at(&d, 0, &mut buf).unwrap(), "a miss before insert");
        cache.insert(&d, &data).unwrap();
        assert!(cache.read_at(&d, 4000, &mut buf).unwrap());
        assert_eq!(buf, data[4000..4100]);
        assert_eq!(cache.used_bytes(), 8192);
        // A write interrupted before its rename is discarded at start.
        std::fs::write(dir.path().join("tmp").join("partial"), b"torn").unwrap();
        // ... but not a write of another live process (the agent being replaced at an upgrade).
        std::fs::write(dir.path().join("tmp").join("1.ab.0"), b"busy").unwrap();
        drop(cache);
        let cache = ChunkCache::open(CacheConfig::new(dir.path(), 1 << 20)).unwrap();
        cache.wait_indexed();
        assert!(!dir.path().join("tmp").join("partial").exists());
        assert!(dir.path().join("tmp").join("1.ab.0").exists());
        assert_eq!(cache.len(), 1);
        assert!(cache.read_at(&d, 0, &mut buf).unwrap());
        assert_eq!(buf, data[..100]);
        assert_eq!(cache.stats().hits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn chunks_not_indexed_yet_are_served_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(CacheConfig::new(dir.path(), 1 << 20)).unwrap();
        cache.wait_indexed();
        // As while the scan at open is still running: a chunk on disk the index does not know yet.
        *cache.indexed.0.lock().unwrap() = false;
        let (d, data) = chunk(3, 8192);
        std::fs::create_dir_all(cache.path(&d).parent().unwrap()).unwrap();
        std::fs::write(cache.path(&d), &data).unwrap();
        assert!(cache.contains(&d));
        let mut buf = vec![0; 100];
        assert!(cache.read_at(&d, 100, &mut buf).unwrap(), "found on disk, verified, served");
        assert_eq!(buf, data[100..200]);
        assert_eq!(cache.used_bytes(), 8192);
        // A torn one is verified and dropped like any chunk found at open.
        let (t, torn) = chunk(4, 4096);
        std::fs::create_dir_all(cache.path(&t).parent().unwrap()).unwrap();
        std::fs::write(cache.path(&t), &torn[..2048]).unwrap();
        assert!(!cache.read_at(&t, 0, &mut buf).unwrap());
        assert_eq!(cache.stats().corrupt.load(Ordering::Relaxed), 1);
        // Once indexed, a missing chunk is a plain miss.
        *cache.indexed.0.lock().unwrap() = true;
        assert!(!cache.contains(&Digest::of(b"absent")));
    }

    #[test]
    fn a_torn_chunk_found_at_start_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(CacheConfig::new(dir.path(), 1 << 20)).unwrap();
        cache.wait_indexed();
        let (d, data) = chunk(2, 4096);
        cache.insert(&d, &data).unwrap();
        let path = cache.path(&d);
        drop(cache);
        // What a power loss can leave: the name in place, the data not.
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let cache = ChunkCache::open(CacheConfig::new(dir.path(), 1 << 20)).unwrap();
        cache.wait_indexed();
        let mut buf = vec![0; 4096];
        assert!(!cache.read_at(&d, 0, &mut buf).unwrap(), "a corrupt chunk is a miss");
        assert_eq!(cache.stats().corrupt.load(Ordering::Relaxed), 1);
        assert!(!path.exists());
        cache.insert(&d, &data).unwrap();
        assert!(cache.read_at(&d, 0, &mut buf).unwrap());
        assert_eq!(buf, data);
    }

    #[test]
    fn evicts_least_recently_used_past_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CacheConfig::new(dir.path(), 4 * 4096);
        config.max_open_files = 2;
        let cache = ChunkCache::open(config).unwrap();
        cache.wait_indexed();
        let chunks: Vec<_> = (0..4).map(|i| chunk(i, 4096)).collect();
        for (d, data) in &chunks {
            cache.insert(d, data).unwrap();
        }
        let mut buf = vec![0; 16];
        // Chunk 0 is used again, so chunk 1 is now the coldest.
        assert!(cache.read_at(&chunks[0].0, 0, &mut buf).unwrap());
        assert!(cache.read_at(&chunks[2].0, 0, &mut buf).unwrap());
        assert!(cache.read_at(&chunks[3].0, 0, &mut buf).unwrap(), "open handles past the limit are closed");
        let (d5, data5) = chunk(9, 4096);
        cache.insert(&d5, &data5).unwrap();
        assert!(cache.used_bytes() <= 4 * 4096 / 10 * 9 + 4096);
        assert!(!cache.contains(&chunks[1].0), "the coldest chunk goes first");
        assert!(!cache.contains(&chunks[0].0), "then the next coldest, down to 90% of the capacity");
        assert!(cache.contains(&chunks[2].0) && cache.contains(&chunks[3].0) && cache.contains(&d5));
        assert!(cache.stats().evicted.load(Ordering::Relaxed) >= 1);
        assert!(!cache.path(&chunks[1].0).exists());
        // Smaller capacity at the next start evicts down to it.
        drop(cache);
        let cache = ChunkCache::open(CacheConfig::new(dir.path(), 2 * 4096)).unwrap();
        cache.wait_indexed();
        assert!(cache.used_bytes() <= 2 * 4096);
    }
}
