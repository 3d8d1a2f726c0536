//! Checking a blob where it is stored: every chunk read from the backend, restored and
//! hashed against the manifest, as the engine would before serving it, without caching
//! anything (`berth image check`). It answers "is this image's blob intact in this
//! backend" before a mount depends on it, and its rate is the most a cold reader could
//! get from the backend with verification on.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::BlobBackend;
use crate::engine::DEFAULT_MERGE_MAX_BYTES;
use crate::error::{CacheError, Result};
use crate::manifest::Manifest;

/// A chunk that is not intact in the backend, and why.
#[derive(Debug)]
pub struct BadChunk {
    pub index: u64,
    pub error: CacheError,
}

/// What [`check_blob`] found.
#[derive(Debug)]
pub struct CheckReport {
    /// Chunks checked (every chunk of the blob).
    pub chunks: u64,
    /// Bytes of the blob, as its chunks restore.
    pub raw_bytes: u64,
    /// Bytes read from the backend.
    pub stored_bytes: u64,
    /// Backend reads made.
    pub reads: u64,
    /// Chunks that could not be read, restored or verified, in chunk order.
    pub bad: Vec<BadChunk>,
    pub elapsed: Duration,
}

/// Reads every chunk of `manifest`'s blob from `backend` with `jobs` threads, each
/// taking the next run of adjacent chunks (up to the backend's merge limit, or
/// [`DEFAULT_MERGE_MAX_BYTES`]), and checks each against its digest. Bad chunks are
/// reported, not returned as an error: an error means the check itself could not run
/// (a manifest without valid digests, or an object of the wrong size).
pub fn check_blob(
    manifest: &Manifest,
    backend: &dyn BlobBackend,
    jobs: usize,
) -> Result<CheckReport> {
    let started = Instant::now();
    let digests = manifest.chunk_digests()?;
    let object = &manifest.object;
    manifest.check_stored_object(backend)?;
    let read_limit = backend
        .merge_limit(object)
        .unwrap_or(DEFAULT_MERGE_MAX_BYTES)
        .min(DEFAULT_MERGE_MAX_BYTES);
    let runs = runs_of(manifest, read_limit);
    let next = AtomicUsize::new(0);
    let bad = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, runs.len().max(1)) {
            scope.spawn(|| {
                let mut buffer = Vec::new();
                while let Some(run) = runs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let found = check_run(manifest, &digests, backend, run.clone(), &mut buffer);
                    if !found.is_empty() {
                        bad.lock().unwrap_or_else(|e| e.into_inner()).extend(found);
                    }
                }
            });
        }
    });
    let mut bad = bad.into_inner().unwrap_or_else(|e| e.into_inner());
    bad.sort_by_key(|chunk| chunk.index);
    Ok(CheckReport {
        chunks: manifest.chunk_count(),
        raw_bytes: manifest.blob_size,
        stored_bytes: manifest.stored_size(),
        reads: runs.len() as u64,
        bad,
        elapsed: started.elapsed(),
    })
}

/// The blob's chunks cut into runs of adjacent chunks whose stored bytes fit in
/// `read_limit` (a chunk larger than that is a run of its own).
fn runs_of(manifest: &Manifest, read_limit: u64) -> Vec<Range<u64>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (index, chunk) in manifest.chunks.iter().enumerate() {
        let index = index as u64;
        if index > start && bytes + chunk.stored_size > read_limit {
            runs.push(start..index);
            start = index;
            bytes = 0;
        }
        bytes += chunk.stored_size;
    }
    if start < manifest.chunk_count() {
        runs.push(start..manifest.chunk_count());
    }
    runs
}

/// Reads one run and checks its chunks; a failed read makes every chunk of the run bad.
fn check_run(
    manifest: &Manifest,
    digests: &[[u8; 32]],
    backend: &dyn BlobBackend,
    run: Range<u64>,
    buffer: &mut Vec<u8>,
) -> Vec<BadChunk> {
    let entries = &manifest.chunks[run.start as usize..run.end as usize];
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return Vec::new();
    };
    let offset = first.offset;
    // Chunks are contiguous in the object (the manifest is validated), so the run is
    // one range.
    let len = (last.offset + last.stored_size - offset) as usize;
    buffer.resize(len, 0);
    if let Err(err) = backend.read_range_into(&manifest.object, offset, buffer) {
        let message = err.to_string();
        return run
            .map(|index| BadChunk {
                index,
                error: CacheError::FetchFailed {
                    blob: manifest.blob_id.clone(),
                    chunk: index,
                    message: message.clone(),
                },
            })
            .collect();
    }
    let mut bad = Vec::new();
    for (index, entry) in run.zip(entries) {
        let at = (entry.offset - offset) as usize;
        let stored = &buffer[at..at + entry.stored_size as usize];
        if let Err(error) = manifest.restore_chunk(index, &digests[index as usize], stored) {
            bad.push(BadChunk { index, error });
        }
    }
    bad
}
