//! The chunk index: how a converted layer's filesystem image is cut into fixed chunks, where each chunk sits in
//! the layer's data blob, how it is stored there and which digest its bytes must have.
//!
//! Encoding (little endian), stored in the registry as its own blob:
//!
//! ```text
//! header (80 bytes)
//!   magic "DPUCHIX1" | version u16 = 1 | reserved u16 | chunk_size u32 | image_size u64 | data_size u64
//!   | data_digest [32] | count u32 | reserved u32 | reserved u64
//! entries (count × 48 bytes)
//!   offset u64 (in the data blob) | stored_len u32 | encoding u32 (0 raw, 1 lz4 block, 2 zstd frame)
//!   | digest [32]
//! ```
//!
//! A compressed chunk is always smaller than its uncompressed bytes (the converter stores it raw otherwise).
//! A chunk's digest is the SHA-256 of its *uncompressed* bytes, so identical chunks are stored once in a blob,
//! cached once on the DPU and verified after decompression: nothing unverified is ever served. Every chunk but
//! the last is `chunk_size` bytes; the last holds the rest of `image_size`.

use std::ops::Range;

use super::Digest;

const MAGIC: &[u8; 8] = b"DPUCHIX1";
const VERSION: u16 = 1;
const HEADER: usize = 80;
const ENTRY: usize = 48;

/// Smallest and largest chunk sizes accepted (powers of two).
pub const MIN_CHUNK: u32 = 4096;
pub const MAX_CHUNK: u32 = 4 << 20;
/// Largest filesystem image a layer may have (1 TiB).
pub const MAX_IMAGE: u64 = 1 << 40;
/// Largest chunk count an index may declare, so a hostile header cannot make the decoder allocate much.
pub const MAX_CHUNKS: u64 = 1 << 22;

/// How a chunk's bytes are stored in the data blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Raw,
    /// One lz4 block.
    Lz4,
    /// One zstd frame, its content size declared.
    Zstd,
}

impl Encoding {
    fn code(self) -> u32 {
        match self {
            Self::Raw => 0,
            Self::Lz4 => 1,
            Self::Zstd => 2,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        [Self::Raw, Self::Lz4, Self::Zstd].into_iter().find(|e| e.code() == code)
    }
}

/// How the converter compresses chunks. Decoding handles every [`Encoding`] whatever was chosen here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Lz4,
    /// zstd at a level in 1..=22.
    Zstd(i32),
}

impl Compression {
    /// zstd level 9: measured on a real image in docs/benchmarks.md (bytes a start fetches against conversion
    /// time).
    pub const DEFAULT: Self = Self::Zstd(9);
}

impl Default for Compression {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Lz4 => f.write_str("lz4"),
            Self::Zstd(level) => write!(f, "zstd-{level}"),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    /// `lz4`, `zstd` (the default level) or `zstd-N`.
    fn from_str(text: &str) -> Result<Self, String> {
        let level = match text {
            "lz4" => return Ok(Self::Lz4),
            "zstd" => return Ok(Self::DEFAULT),
            _ => text.strip_prefix("zstd-").and_then(|n| n.parse::<i32>().ok()),
        };
        match level {
            Some(level @ 1..=22) => Ok(Self::Zstd(level)),
            _ => Err(format!("{text:?} is not lz4, zstd or zstd-N with N in 1..=22")),
        }
    }
}

/// One chunk of the filesystem image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Where its stored bytes start in the data blob.
    pub offset: u64,
    /// How many bytes it occupies in the data blob.
    pub stored_len: u32,
    pub encoding: Encoding,
    /// SHA-256 of the uncompressed bytes.
    pub digest: Digest,
}

impl ChunkEntry {
    /// Its byte range in the data blob.
    pub fn stored(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.stored_len)
    }
}

/// A decoded, validated chunk index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndex {
    pub chunk_size: u32,
    /// Bytes of the uncompressed filesystem image (a multiple of 4096).
    pub image_size: u64,
    /// Digest and size of the data blob the entries point into.
    pub data_digest: Digest,
    pub data_size: u64,
    pub chunks: Vec<ChunkEntry>,
}

/// Why an index was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk index: {0}")]
pub struct IndexError(pub String);

fn bad<T>(message: impl Into<String>) -> Result<T, IndexError> {
    Err(IndexError(message.into()))
}

impl ChunkIndex {
    /// Number of chunks an image of `image_size` bytes is cut into.
    pub fn count_for(image_size: u64, chunk_size: u32) -> u64 {
        image_size.div_ceil(u64::from(chunk_size))
    }

    /// Uncompressed length of chunk `i`.
    pub fn chunk_len(&self, i: usize) -> usize {
        let start = i as u64 * u64::from(self.chunk_size);
        (self.image_size - start).min(u64::from(self.chunk_size)) as usize
    }

    /// The chunks covering image bytes `range` (empty range → no chunks).
    pub fn chunks_for(&self, range: Range<u64>) -> Range<usize> {
        if range.start >= range.end {
            return 0..0;
        }
        let size = u64::from(self.chunk_size);
        (range.start / size) as usize..range.end.div_ceil(size).min(self.chunks.len() as u64) as usize
    }

    /// Checks everything [`ChunkIndex::decode`] checks; used by the encoder's caller too.
    pub fn validate(&self) -> Result<(), IndexError> {
        if !self.chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) {
            return bad(format!("chunk size {} is not a power of two in {MIN_CHUNK}..={MAX_CHUNK}", self.chunk_size));
        }
        if self.image_size == 0 || self.image_size > MAX_IMAGE || !self.image_size.is_multiple_of(4096) {
            return bad(format!("image size {} is not a positive multiple of 4096 up to 1 TiB", self.image_size));
        }
        let want = Self::count_for(self.image_size, self.chunk_size);
        if self.chunks.len() as u64 != want {
            return bad(format!("{} entries for an image of {want} chunks", self.chunks.len()));
        }
        for (i, c) in self.chunks.iter().enumerate() {
            let len = self.chunk_len(i) as u32;
            let end = c.offset.checked_add(u64::from(c.stored_len));
            if c.stored_len == 0 || end.is_none_or(|end| end > self.data_size) {
                return bad(format!("chunk {i} lies outside the {}-byte data blob", self.data_size));
            }
            let ok = match c.encoding {
                Encoding::Raw => c.stored_len == len,
                Encoding::Lz4 | Encoding::Zstd => c.stored_len < len,
            };
            if !ok {
                return bad(format!("chunk {i} stores {} bytes for {len} ({:?})", c.stored_len, c.encoding));
            }
        }
        Ok(())
    }

    /// The encoded index.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.chunks.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.data_size.to_le_bytes());
        out.extend_from_slice(&self.data_digest.0);
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 12]);
        for c in &self.chunks {
            out.extend_from_slice(&c.offset.to_le_bytes());
            out.extend_from_slice(&c.stored_len.to_le_bytes());
            out.extend_from_slice(&c.encoding.code().to_le_bytes());
            out.extend_from_slice(&c.digest.0);
        }
        out
    }

    /// Decodes and validates an index from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, IndexError> {
        if bytes.len() < HEADER {
            return bad(format!("{} bytes is shorter than the {HEADER}-byte header", bytes.len()));
        }
        if &bytes[..8] != MAGIC {
            return bad("bad magic (not a DPUCHIX1 chunk index)");
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        let digest_at = |at: usize| Digest(bytes[at..at + 32].try_into().unwrap_or_default());
        let version = u16_at(8);
        if version != VERSION {
            return bad(format!("version {version} is not supported (expected {VERSION})"));
        }
        if u16_at(10) != 0 || bytes[68..HEADER].iter().any(|&b| b != 0) {
            return bad("reserved header fields are not zero");
        }
        let (chunk_size, image_size, data_size, data_digest) = (u32_at(12), u64_at(16), u64_at(24), digest_at(32));
        let count = u64::from(u32_at(64));
        if count > MAX_CHUNKS {
            return bad(format!("{count} chunks is more than the {MAX_CHUNKS} allowed"));
        }
        let want = HEADER as u64 + count * ENTRY as u64;
        if bytes.len() as u64 != want {
            return bad(format!("{} bytes for {count} entries (expected {want})", bytes.len()));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = HEADER + i * ENTRY;
            let Some(encoding) = Encoding::from_code(u32_at(at + 12)) else {
                return bad(format!("chunk {i} has unknown encoding {}", u32_at(at + 12)));
            };
            chunks.push(ChunkEntry {
                offset: u64_at(at),
                stored_len: u32_at(at + 8),
                encoding,
                digest: digest_at(at + 16),
            });
        }
        let index = Self { chunk_size, image_size, data_digest, data_size, chunks };
        index.validate()?;
        Ok(index)
    }
}

/// Why a chunk's stored bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {index}: {encoding:?} data does not decompress to {len} bytes: {reason}")]
    Decompress { index: usize, encoding: Encoding, len: usize, reason: String },
    #[error("chunk {index}: digest mismatch (expected {expected}, got {actual})")]
    Digest { index: usize, expected: Digest, actual: Digest },
}

impl ChunkIndex {
    /// Decodes chunk `i` from its stored bytes and verifies its digest: the only way bytes leave the blob.
    pub fn open_chunk(&self, i: usize, stored: &[u8]) -> Result<Vec<u8>, ChunkError> {
        let entry = &self.chunks[i];
        let len = self.chunk_len(i);
        let data = match entry.encoding {
            Encoding::Raw if stored.len() == len => stored.to_vec(),
            encoding @ Encoding::Raw => {
                let reason = format!("{} bytes stored", stored.len());
                return Err(ChunkError::Decompress { index: i, encoding, len, reason });
            }
            encoding => {
                let mut out = vec![0; len];
                let written = match encoding {
                    Encoding::Lz4 => lz4_flex::block::decompress_into(stored, &mut out).map_err(|e| e.to_string()),
                    _ => zstd_decompress(stored, &mut out),
                };
                match written {
                    Ok(n) if n == len => out,
                    Ok(n) => {
                        let reason = format!("got {n} bytes");
                        return Err(ChunkError::Decompress { index: i, encoding, len, reason });
                    }
                    Err(reason) => return Err(ChunkError::Decompress { index: i, encoding, len, reason }),
                }
            }
        };
        let actual = Digest::of(&data);
        if actual != entry.digest {
            return Err(ChunkError::Digest { index: i, expected: entry.digest, actual });
        }
        Ok(data)
    }
}

/// Decompresses one zstd frame into `out` (exactly its size), with this thread's reusable decoder context. One
/// pass into a buffer of the chunk's size: the decoder allocates no window, whatever the frame declares, and a
/// frame holding more than `out` is refused.
fn zstd_decompress(stored: &[u8], out: &mut [u8]) -> Result<usize, String> {
    thread_local! {
        static DECODER: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decoder = match &mut *cell {
            Some(decoder) => decoder,
            slot => slot.insert(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?),
        };
        decoder.decompress_to_buffer(stored, out).map_err(|e| e.to_string())
    })
}

/// Compresses unique chunks for [`chunk_image`].
enum Compressor {
    Lz4,
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

impl Compressor {
    fn new(compression: Compression) -> Result<Self, IndexError> {
        let Compression::Zstd(level) = compression else { return Ok(Self::Lz4) };
        let zstd_error = |e: std::io::Error| IndexError(format!("zstd level {level}: {e}"));
        let mut compressor = zstd::bulk::Compressor::new(level).map_err(zstd_error)?;
        // The index holds a SHA-256 of every chunk; the frame needs neither its own checksum nor a dictionary id,
        // but declares its size so the decoder checks it.
        for parameter in [
            zstd::zstd_safe::CParameter::ChecksumFlag(false),
            zstd::zstd_safe::CParameter::DictIdFlag(false),
            zstd::zstd_safe::CParameter::ContentSizeFlag(true),
        ] {
            compressor.set_parameter(parameter).map_err(zstd_error)?;
        }
        Ok(Self::Zstd(Box::new(compressor)))
    }

    fn compress(&mut self, piece: &[u8]) -> Result<(Encoding, Vec<u8>), IndexError> {
        match self {
            Self::Lz4 => Ok((Encoding::Lz4, lz4_flex::block::compress(piece))),
            Self::Zstd(compressor) => compressor
                .compress(piece)
                .map(|frame| (Encoding::Zstd, frame))
                .map_err(|e| IndexError(format!("zstd: {e}"))),
        }
    }
}

/// Result of cutting an image into chunks: the data blob and its index.
#[derive(Debug)]
pub struct Chunked {
    pub index: ChunkIndex,
    pub data: Vec<u8>,
    /// Chunks whose bytes were already in the blob (identical content stored once).
    pub deduplicated: usize,
}

/// Cuts `image` (a multiple of 4096 bytes) into `chunk_size` chunks, compresses each as `compression` says where
/// that saves space, stores identical chunks once, and builds the index. Deterministic: the same image gives the
/// same bytes.
pub fn chunk_image(image: &[u8], chunk_size: u32, compression: Compression) -> Result<Chunked, IndexError> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
        return bad(format!("chunk size {chunk_size} is not a power of two in {MIN_CHUNK}..={MAX_CHUNK}"));
    }
    let mut data = Vec::new();
    let mut chunks = Vec::new();
    let mut seen: std::collections::HashMap<Digest, ChunkEntry> = std::collections::HashMap::new();
    let mut deduplicated = 0;
    let mut compressor = Compressor::new(compression)?;
    for piece in image.chunks(chunk_size as usize) {
        let digest = Digest::of(piece);
        if let Some(entry) = seen.get(&digest) {
            chunks.push(*entry);
            deduplicated += 1;
            continue;
        }
        let (encoding, compressed) = compressor.compress(piece)?;
        let (encoding, stored) =
            if compressed.len() < piece.len() { (encoding, &compressed[..]) } else { (Encoding::Raw, piece) };
        let entry = ChunkEntry { offset: data.len() as u64, stored_len: stored.len() as u32, encoding, digest };
        data.extend_from_slice(stored);
        seen.insert(digest, entry);
        chunks.push(entry);
    }
    let index = ChunkIndex {
        chunk_size,
        image_size: image.len() as u64,
        data_digest: Digest::of(&data),
        data_size: data.len() as u64,
        chunks,
    };
    index.validate()?;
    Ok(Chunked { index, data, deduplicated })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Vec<u8> {
        let mut image = vec![0u8; 4096 * 11];
        // Chunk 0 compressible text, chunk 1 noise, chunk 2 equal to chunk 0, the rest zeroes; the last is short.
        for (i, b) in image[..8192].iter_mut().enumerate() {
            *b = b"hello erofs "[i % 12];
        }
        let mut x = 0x1234_5678u32;
        for b in &mut image[8192..16384] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let (head, tail) = image.split_at_mut(16384);
        tail[..8192].copy_from_slice(&head[..8192]);
        image
    }

    #[test]
    fn round_trip_with_dedup_and_a_short_last_chunk() {
        let image = image();
        for (compression, encoding) in [
            (Compression::Lz4, Encoding::Lz4),
            (Compression::Zstd(1), Encoding::Zstd),
            (Compression::DEFAULT, Encoding::Zstd),
        ] {
            let chunked = chunk_image(&image, 8192, compression).unwrap();
            let index = &chunked.index;
            assert_eq!(index.chunks.len(), 6);
            assert_eq!(index.chunk_len(5), 4096);
            assert_eq!(index.chunks[1].encoding, Encoding::Raw, "noise is stored raw");
            assert_eq!(index.chunks[0].encoding, encoding, "{compression}");
            assert_eq!(index.chunks[2], index.chunks[0], "identical chunks share their stored bytes");
            assert_eq!(chunked.deduplicated, 2, "chunk 2 equals chunk 0, chunk 4 equals chunk 3");
            let decoded = ChunkIndex::decode(&index.encode()).unwrap();
            assert_eq!(&decoded, index);
            let mut back = Vec::new();
            for i in 0..decoded.chunks.len() {
                let stored =
                    &chunked.data[decoded.chunks[i].stored().start as usize..decoded.chunks[i].stored().end as usize];
                back.extend(decoded.open_chunk(i, stored).unwrap());
            }
            assert_eq!(back, image, "{compression}");
            assert_eq!(chunk_image(&image, 8192, compression).unwrap().data, chunked.data, "deterministic");
            assert_eq!(index.chunks_for(8191..8193), 0..2);
            assert_eq!(index.chunks_for(40960..45056), 5..6);
            assert_eq!(index.chunks_for(5..5), 0..0);
        }
    }

    #[test]
    fn compression_names() {
        for (text, compression) in
            [("lz4", Compression::Lz4), ("zstd", Compression::DEFAULT), ("zstd-3", Compression::Zstd(3))]
        {
            assert_eq!(text.parse(), Ok(compression));
        }
        assert_eq!(Compression::Zstd(19).to_string().parse(), Ok(Compression::Zstd(19)));
        for bad in ["gzip", "zstd-0", "zstd-23", "zstd-", "zstd--1"] {
            assert!(bad.parse::<Compression>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_zstd_frame_larger_than_its_chunk_is_refused() {
        // A valid frame of 8 MiB (a window larger than any chunk) opened as a 32 KiB chunk.
        let mut compressor = zstd::bulk::Compressor::new(1).unwrap();
        compressor.set_parameter(zstd::zstd_safe::CParameter::WindowLog(23)).unwrap();
        let frame = compressor.compress(&vec![1u8; 8 << 20]).unwrap();
        let mut out = vec![0; 32768];
        assert!(zstd_decompress(&frame, &mut out).is_err());
        // The thread's decoder still works afterwards; a frame shorter than its chunk reports its length.
        let small = zstd::bulk::compress(&[7u8; 8192], 1).unwrap();
        assert_eq!(zstd_decompress(&small, &mut out), Ok(8192));
        assert!(out[..8192].iter().all(|&b| b == 7));
    }

    #[test]
    fn corrupt_chunks_are_refused() {
        let chunked = chunk_image(&image(), 8192, Compression::DEFAULT).unwrap();
        let c0 = chunked.index.chunks[0];
        let mut stored = chunked.data[c0.stored().start as usize..c0.stored().end as usize].to_vec();
        let last = stored.len() - 1;
        stored[last] ^= 1;
        assert!(chunked.index.open_chunk(0, &stored).is_err());
        let c1 = chunked.index.chunks[1];
        let mut raw = chunked.data[c1.stored().start as usize..c1.stored().end as usize].to_vec();
        raw[0] ^= 1;
        assert!(matches!(chunked.index.open_chunk(1, &raw), Err(ChunkError::Digest { index: 1, .. })));
    }

    #[test]
    fn hostile_indexes_are_refused() {
        let good = chunk_image(&image(), 8192, Compression::DEFAULT).unwrap().index;
        let bytes = good.encode();
        assert!(ChunkIndex::decode(&bytes[..40]).unwrap_err().0.contains("shorter"));
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(ChunkIndex::decode(&b).unwrap_err().0.contains("magic"));
        let mut b = bytes.clone();
        b[64..68].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(ChunkIndex::decode(&b).unwrap_err().0.contains("more than"));
        let mut b = bytes.clone();
        b[HEADER..HEADER + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(ChunkIndex::decode(&b).unwrap_err().0.contains("outside"));
        let mut b = bytes.clone();
        b[12..16].copy_from_slice(&3000u32.to_le_bytes());
        assert!(ChunkIndex::decode(&b).unwrap_err().0.contains("power of two"));
        let mut b = bytes.clone();
        b[16..24].copy_from_slice(&(good.image_size + 16384).to_le_bytes());
        assert!(ChunkIndex::decode(&b).unwrap_err().0.contains("entries"));
        let mut b = bytes.clone();
        b[70] = 1;
        assert!(ChunkIndex::decode(&b).unwrap_err().0.contains("reserved"));
        let mut b = bytes;
        b[HEADER + 12] = 7;
        assert!(ChunkIndex::decode(&b).unwrap_err().0.contains("encoding"));
        assert!(chunk_image(&[0; 4096], 1000, Compression::DEFAULT).is_err());
    }
}
