//! Arbitrary bytes as a chunk's stored data (fetched from a registry, not yet verified), under each encoding:
//! opening it must give the chunk's exact bytes or an error, never a panic or an unbounded allocation.
#![no_main]

use dpu_storage::image::Digest;
use dpu_storage::image::chunk::{ChunkEntry, ChunkIndex, Encoding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stored)) = data.split_first() else { return };
    let encoding = [Encoding::Raw, Encoding::Lz4, Encoding::Zstd][usize::from(selector % 3)];
    // A 32 KiB chunk, or a short last one of 4 KiB.
    let len: u32 = if selector & 0x80 == 0 { 32768 } else { 4096 };
    let entry = ChunkEntry { offset: 0, stored_len: stored.len() as u32, encoding, digest: Digest::of(stored) };
    let index = ChunkIndex {
        chunk_size: 32768,
        image_size: u64::from(len),
        data_digest: Digest::of(stored),
        data_size: stored.len() as u64,
        chunks: vec![entry],
    };
    if let Ok(chunk) = index.open_chunk(0, stored) {
        assert_eq!(chunk.len(), len as usize);
        assert_eq!(Digest::of(&chunk), entry.digest);
    }
});
