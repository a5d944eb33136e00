//! Arbitrary bytes as a chunk index (fetched from a registry): decoding must accept or refuse, never panic;
//! an accepted index re-encodes to the same bytes, and every chunk it names lies inside its data blob.
#![no_main]

use dpu_storage::image::chunk::ChunkIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = ChunkIndex::decode(data) {
        assert_eq!(index.encode(), data);
        for (i, c) in index.chunks.iter().enumerate() {
            assert!(c.stored().end <= index.data_size);
            assert!(index.chunk_len(i) as u64 <= u64::from(index.chunk_size));
            // Decompressing hostile stored bytes is refused, never a panic.
            let stored = vec![0xa5; c.stored_len.min(1 << 16) as usize];
            let _ = index.open_chunk(i, &stored);
        }
        let _ = index.chunks_for(0..index.image_size + 4096);
    }
});
