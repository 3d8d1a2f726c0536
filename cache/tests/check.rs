//! Checking a blob in its backend (`berth_cache::check`), over the local-directory
//! backend.

mod common;

use std::sync::Arc;
use std::time::Duration;

use berth_cache::check::check_blob;
use berth_cache::engine::DEFAULT_MERGE_MAX_BYTES;
use berth_cache::{BlobBackend, CacheError, Compression, LocalDirBackend};
use common::{pseudo_random, publish, Fault, Faulty, Recording};

const CHUNK: u32 = 64 * 1024;

fn store() -> (tempfile::TempDir, Arc<dyn BlobBackend>) {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn BlobBackend> = Arc::new(LocalDirBackend::new(dir.path()));
    (dir, backend)
}

#[test]
fn an_intact_blob_is_read_once_in_runs_no_longer_than_the_backend_asks() {
    let (_dir, local) = store();
    let data = pseudo_random(1, 16 * CHUNK as usize);
    let manifest = publish(&data, CHUNK, Compression::None, local.as_ref());
    let recording = Recording::limited(local, Duration::ZERO, Some(4 * u64::from(CHUNK)));
    let report = check_blob(&manifest, recording.as_ref(), 3).unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    assert_eq!(report.chunks, 16);
    assert_eq!(report.raw_bytes, 16 * u64::from(CHUNK));
    assert_eq!(report.reads, 4);
    let mut reads = recording.reads();
    reads.sort_by_key(|range| range.start);
    let expected: Vec<_> = (0..4u64)
        .map(|run| run * 4 * u64::from(CHUNK)..(run + 1) * 4 * u64::from(CHUNK))
        .collect();
    assert_eq!(reads, expected, "every byte read once, four chunks a read");

    // A backend without a limit of its own is read in the default's pieces.
    let recording = Recording::new(recording.inner.clone(), Duration::ZERO);
    let report = check_blob(&manifest, recording.as_ref(), 2).unwrap();
    assert!(report.bad.is_empty());
    let longest = recording.reads().iter().map(|r| r.end - r.start).max();
    assert_eq!(
        longest,
        Some((16 * u64::from(CHUNK)).min(DEFAULT_MERGE_MAX_BYTES))
    );
}

#[test]
fn corrupt_chunks_are_each_named_and_the_rest_pass() {
    for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
        let (dir, local) = store();
        // Half of each chunk compresses, so compressed chunks differ in size.
        let mut data = pseudo_random(2, 12 * CHUNK as usize);
        for chunk in data.chunks_mut(CHUNK as usize) {
            chunk[..CHUNK as usize / 2].fill(7);
        }
        let manifest = publish(&data, CHUNK, compression, local.as_ref());
        let object = dir.path().join(&manifest.object);
        let mut stored = std::fs::read(&object).unwrap();
        for bad in [2usize, 9] {
            let entry = &manifest.chunks[bad];
            let at = (entry.offset + entry.stored_size / 2) as usize;
            stored[at] ^= 0x5a;
        }
        std::fs::write(&object, &stored).unwrap();
        let report = check_blob(&manifest, local.as_ref(), 4).unwrap();
        let bad: Vec<u64> = report.bad.iter().map(|chunk| chunk.index).collect();
        assert_eq!(bad, [2, 9], "{compression:?}: {:?}", report.bad);
        for chunk in &report.bad {
            assert!(
                matches!(
                    chunk.error,
                    CacheError::Verification { .. } | CacheError::Decompression { .. }
                ),
                "{compression:?}: {}",
                chunk.error
            );
            let message = chunk.error.to_string();
            assert!(
                message.contains(&format!(
                    "Chunk {} of blob {}",
                    chunk.index, manifest.blob_id
                )),
                "{message}"
            );
        }
    }
}

#[test]
fn an_object_of_the_wrong_size_is_refused_before_any_chunk_is_read() {
    let (dir, local) = store();
    let data = pseudo_random(3, 4 * CHUNK as usize);
    let manifest = publish(&data, CHUNK, Compression::None, local.as_ref());
    let object = dir.path().join(&manifest.object);
    let stored = std::fs::read(&object).unwrap();
    std::fs::write(&object, &stored[..stored.len() - 1]).unwrap();
    let recording = Recording::new(local, Duration::ZERO);
    let err = check_blob(&manifest, recording.as_ref(), 2).unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&manifest.object), "{message}");
    assert!(
        message.contains(&format!("{} bytes", stored.len() - 1)),
        "{message}"
    );
    assert!(recording.reads().is_empty());
}

#[test]
fn a_failing_backend_makes_every_chunk_of_its_reads_bad() {
    let (_dir, local) = store();
    let data = pseudo_random(4, 8 * CHUNK as usize);
    let manifest = publish(&data, CHUNK, Compression::None, local.as_ref());
    let faulty = Faulty::new(local, Duration::ZERO);
    faulty.set(Fault::Short);
    let report = check_blob(&manifest, faulty.as_ref(), 2).unwrap();
    assert_eq!(report.bad.len(), 8);
    for (index, chunk) in report.bad.iter().enumerate() {
        assert_eq!(chunk.index, index as u64);
        assert!(
            matches!(chunk.error, CacheError::FetchFailed { .. }),
            "{}",
            chunk.error
        );
    }
}
