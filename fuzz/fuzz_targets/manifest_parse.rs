#![no_main]
//! The image manifest parser: arbitrary bytes must parse or be refused, never panic, and
//! whatever is accepted must be safe for the engine's offset arithmetic.

use berth_cache::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::parse(data) else {
        return;
    };
    // Every chunk lies inside the blob and the stored object, contiguously.
    let mut stored = 0u64;
    for (index, chunk) in manifest.chunks.iter().enumerate() {
        let raw = manifest.chunk_range(index as u64);
        assert!(raw.start < raw.end && raw.end <= manifest.blob_size);
        assert_eq!(chunk.offset, stored);
        stored = chunk.offset.checked_add(chunk.stored_size).unwrap();
    }
    assert_eq!(stored, manifest.stored_size());
    for entry in &manifest.prefetch {
        for &[start, end] in &entry.ranges {
            let chunks = manifest.chunks_of(start..end);
            assert!(chunks.end <= manifest.chunk_count());
        }
    }
});
