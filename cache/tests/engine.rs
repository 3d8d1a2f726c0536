//! Engine behaviour over the local-directory backend.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use berth_cache::chunkmap::ChunkMap;
use berth_cache::manifest::parse_digest;
use berth_cache::{
    BlobBackend, CacheConfig, CacheEngine, CacheError, Compression, LocalDirBackend, VerifyOnOpen,
};
use common::{pseudo_random, publish, Recording};

const CHUNK: u32 = 64 * 1024;

fn config(dir: &std::path::Path) -> CacheConfig {
    let mut config = CacheConfig::new(dir);
    config.merge_min_bytes = u64::from(CHUNK);
    config.retry_base_delay = Duration::from_millis(5);
    // Off unless a test is about it: it would add backend reads to exact counts.
    config.readahead_max_bytes = 0;
    config
}

struct Setup {
    _dir: tempfile::TempDir,
    store: std::path::PathBuf,
    cache: std::path::PathBuf,
    data: Vec<u8>,
    backend: Arc<Recording>,
}

fn setup(len: usize, compression: Compression, delay: Duration) -> (Setup, berth_cache::Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cache = dir.path().join("cache");
    let local: Arc<dyn BlobBackend> = Arc::new(LocalDirBackend::new(&store));
    let data = pseudo_random(len as u64, len);
    let manifest = publish(&data, CHUNK, compression, local.as_ref());
    let backend = Recording::new(local, delay);
    (
        Setup {
            _dir: dir,
            store,
            cache,
            data,
            backend,
        },
        manifest,
    )
}

fn read_all(engine: &CacheEngine, id: &str, len: usize, step: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut offset = 0;
    while offset < len {
        let end = (offset + step).min(len);
        let n = engine
            .read(id, offset as u64, &mut out[offset..end])
            .unwrap();
        assert!(n > 0);
        offset += n;
    }
    out
}

#[test]
fn reads_match_and_repeat_reads_are_local() {
    for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
        let (s, manifest) = setup(1_000_000, compression, Duration::ZERO);
        let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
        let handle = engine.open_blob(&manifest).unwrap();
        assert_eq!(
            read_all(&engine, handle.id(), s.data.len(), 10_000),
            s.data,
            "{compression:?}"
        );
        let fetched = s.backend.reads().len();
        assert!(fetched > 0 && fetched <= manifest.chunks.len());
        assert_eq!(read_all(&engine, handle.id(), s.data.len(), 77_777), s.data);
        assert_eq!(
            s.backend.reads().len(),
            fetched,
            "second read must not touch the backend"
        );
        let metrics = engine.metrics();
        assert_eq!(
            metrics.chunks_fetched.load(Ordering::Relaxed),
            manifest.chunks.len() as u64
        );
        assert!(metrics.chunk_hits.load(Ordering::Relaxed) > 0);
        // Past the end reads nothing.
        assert_eq!(
            engine
                .read(handle.id(), s.data.len() as u64, &mut [0u8; 10])
                .unwrap(),
            0
        );
        let text = engine.render_prometheus();
        assert!(
            text.contains(&format!(
                "berth_cache_chunks_fetched_total {}",
                manifest.chunks.len()
            )),
            "{text}"
        );
        assert!(text.contains("berth_cache_fetch_latency_seconds_count"));
    }
}

#[test]
fn concurrent_readers_of_one_chunk_cause_one_backend_read() {
    let (s, manifest) = setup(
        4 * CHUNK as usize,
        Compression::None,
        Duration::from_millis(200),
    );
    let engine = Arc::new(CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap());
    let handle = engine.open_blob(&manifest).unwrap();
    let barrier = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (engine, barrier, id) = (engine.clone(), barrier.clone(), handle.id().to_string());
            std::thread::spawn(move || {
                barrier.wait();
                let mut buf = vec![0u8; 1000];
                engine.read(&id, 100 + i * 10, &mut buf).unwrap();
                buf
            })
        })
        .collect();
    for (i, thread) in threads.into_iter().enumerate() {
        let start = 100 + i * 10;
        assert_eq!(thread.join().unwrap(), s.data[start..start + 1000]);
    }
    assert_eq!(
        s.backend.reads(),
        vec![0..u64::from(CHUNK)],
        "one read of chunk 0 only"
    );
}

#[test]
fn adjacent_misses_merge_into_one_backend_read() {
    let (s, manifest) = setup(64 * CHUNK as usize, Compression::None, Duration::ZERO);
    let mut config = config(&s.cache);
    config.merge_min_bytes = 1 << 20;
    config.merge_max_bytes = 1 << 20;
    let engine = CacheEngine::new(config, s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let chunk = u64::from(CHUNK);
    // A one-byte miss is extended to a 1 MiB read.
    handle.ensure_present(5..6).unwrap();
    assert_eq!(s.backend.reads(), vec![0..(1 << 20)]);
    // A 10-chunk request is one read; ready chunk 20 splits the next request.
    handle.ensure_present(20 * chunk..21 * chunk).unwrap();
    handle.ensure_present(18 * chunk..28 * chunk).unwrap();
    let reads = s.backend.reads();
    assert_eq!(
        reads[1],
        20 * chunk..36 * chunk,
        "extended to 1 MiB of read-ahead"
    );
    assert_eq!(
        reads[2],
        18 * chunk..20 * chunk,
        "chunks before the ready one"
    );
    assert_eq!(reads.len(), 3);
    // A long request is split at merge_max_bytes.
    handle.ensure_present(36 * chunk..64 * chunk).unwrap();
    let reads = s.backend.reads();
    assert_eq!(
        &reads[3..],
        &[36 * chunk..52 * chunk, 52 * chunk..64 * chunk]
    );
    assert_eq!(
        engine.ready_chunks(handle.id()).unwrap(),
        62,
        "all but chunks 16 and 17"
    );
}

#[test]
fn a_backend_asking_for_shorter_reads_than_the_engine_gets_them() {
    let (s, manifest) = setup(32 * CHUNK as usize, Compression::None, Duration::ZERO);
    let chunk = u64::from(CHUNK);
    let mut config = config_for_merge(&s.cache);
    config.merge_max_bytes = 16 * chunk;
    let local: Arc<dyn BlobBackend> = Arc::new(LocalDirBackend::new(&s.store));
    // Four chunks at most, as the backend asks: a 16-chunk miss is four reads.
    let short = Recording::limited(local.clone(), Duration::ZERO, Some(4 * chunk));
    let engine = CacheEngine::new(config.clone(), short.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    handle.ensure_present(0..16 * chunk).unwrap();
    assert_eq!(
        short.reads(),
        vec![
            0..4 * chunk,
            4 * chunk..8 * chunk,
            8 * chunk..12 * chunk,
            12 * chunk..16 * chunk
        ]
    );
    drop(handle);
    drop(engine);
    // A backend limit above the engine's bound leaves the bound in charge.
    std::fs::remove_dir_all(&s.cache).unwrap();
    let long = Recording::limited(local, Duration::ZERO, Some(64 * chunk));
    let engine = CacheEngine::new(config, long.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    handle.ensure_present(0..32 * chunk).unwrap();
    assert_eq!(long.reads(), vec![0..16 * chunk, 16 * chunk..32 * chunk]);
}

#[test]
fn corrupt_chunk_fails_with_an_error_naming_it_and_is_not_cached() {
    let (s, manifest) = setup(8 * CHUNK as usize, Compression::None, Duration::ZERO);
    // Flip one byte of chunk 3 in the backend object.
    let object = s.store.join(&manifest.object);
    let mut stored = std::fs::read(&object).unwrap();
    stored[3 * CHUNK as usize + 17] ^= 0x55;
    std::fs::write(&object, &stored).unwrap();
    let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let mut buf = vec![0u8; 100];
    let err = handle
        .read(3 * u64::from(CHUNK) + 10, &mut buf)
        .unwrap_err();
    assert!(
        matches!(err, CacheError::Verification { chunk: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Chunk 3"), "{err}");
    // Neighbours are fine, the bad chunk stays missing and keeps failing.
    assert_eq!(handle.read(2 * u64::from(CHUNK), &mut buf).unwrap(), 100);
    assert_eq!(buf, s.data[2 * CHUNK as usize..2 * CHUNK as usize + 100]);
    assert!(handle.read(3 * u64::from(CHUNK), &mut buf).is_err());
    assert_eq!(engine.ready_chunks(handle.id()).unwrap(), 1);
    assert_eq!(
        engine
            .metrics()
            .verification_failures
            .load(Ordering::Relaxed),
        2
    );
}

#[test]
fn warm_restart_refetches_nothing() {
    let (s, manifest) = setup(10 * CHUNK as usize, Compression::Zstd, Duration::ZERO);
    {
        let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
        let handle = engine.open_blob(&manifest).unwrap();
        read_all(&engine, handle.id(), s.data.len(), 50_000);
    }
    let before = s.backend.reads().len();
    let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    assert_eq!(engine.ready_chunks(handle.id()).unwrap(), 10);
    assert_eq!(read_all(&engine, handle.id(), s.data.len(), 50_000), s.data);
    assert_eq!(s.backend.reads().len(), before);
}

#[test]
fn data_written_without_map_update_is_not_trusted() {
    let (s, manifest) = setup(4 * CHUNK as usize, Compression::None, Duration::ZERO);
    {
        let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
        engine.open_blob(&manifest).unwrap();
    }
    // A crash after the data write but before the map update: data present, map empty.
    let data_path = s.cache.join(format!("{}.data", manifest.blob_id));
    let mut cache = std::fs::read(&data_path).unwrap();
    cache[CHUNK as usize..2 * CHUNK as usize]
        .copy_from_slice(&s.data[CHUNK as usize..2 * CHUNK as usize]);
    std::fs::write(&data_path, &cache).unwrap();
    let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    assert_eq!(engine.ready_chunks(handle.id()).unwrap(), 0);
    let mut buf = vec![0u8; 10];
    handle.read(u64::from(CHUNK), &mut buf).unwrap();
    assert_eq!(
        s.backend.reads(),
        vec![u64::from(CHUNK)..2 * u64::from(CHUNK)],
        "refetched, not assumed"
    );
}

#[test]
fn map_marked_ready_without_data_is_repaired_on_open() {
    let (s, manifest) = setup(4 * CHUNK as usize, Compression::None, Duration::ZERO);
    {
        let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
        engine.open_blob(&manifest).unwrap();
    }
    // The order rule forbids this state; build it by hand to prove it is caught.
    let map_path = s.cache.join(format!("{}.map", manifest.blob_id));
    let id = parse_digest(&manifest.blob_id).unwrap();
    let (mut map, _) = ChunkMap::open(&map_path, id, CHUNK, manifest.blob_size).unwrap();
    map.mark_ready(&[2]).unwrap();
    drop(map);
    let mut config = config(&s.cache);
    config.verify_on_open = VerifyOnOpen::Always;
    let engine = CacheEngine::new(config, s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    assert_eq!(
        engine.ready_chunks(handle.id()).unwrap(),
        0,
        "the hole is not served as data"
    );
    let mut buf = vec![0u8; 4096];
    handle.read(2 * u64::from(CHUNK), &mut buf).unwrap();
    assert_eq!(buf, s.data[2 * CHUNK as usize..2 * CHUNK as usize + 4096]);
    assert_eq!(s.backend.reads().len(), 1);
}

#[test]
fn unavailable_backend_gives_errors_then_recovers() {
    let (s, manifest) = setup(4 * CHUNK as usize, Compression::None, Duration::ZERO);
    let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let hidden = s.store.with_extension("away");
    std::fs::rename(&s.store, &hidden).unwrap();
    let mut buf = vec![0u8; 100];
    let err = handle.read(0, &mut buf).unwrap_err();
    assert!(
        matches!(err, CacheError::FetchFailed { chunk: 0, .. }),
        "{err}"
    );
    assert_eq!(s.backend.reads().len(), 4, "retried up to fetch_attempts");
    std::fs::rename(&hidden, &s.store).unwrap();
    assert_eq!(handle.read(0, &mut buf).unwrap(), 100);
    assert_eq!(buf, s.data[..100]);
}

#[test]
fn prefetch_fills_in_the_background() {
    let (s, manifest) = setup(16 * CHUNK as usize, Compression::None, Duration::ZERO);
    let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let whole_blob = 0..manifest.blob_size;
    handle.prefetch(std::slice::from_ref(&whole_blob));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while engine.ready_chunks(handle.id()).unwrap() < 16 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(engine.ready_chunks(handle.id()).unwrap(), 16);
    assert_eq!(
        engine.metrics().chunks_prefetched.load(Ordering::Relaxed),
        16
    );
    assert_eq!(
        engine.metrics().chunk_misses.load(Ordering::Relaxed),
        0,
        "prefetch is not a demand miss"
    );
    let before = s.backend.reads().len();
    assert_eq!(
        read_all(&engine, handle.id(), s.data.len(), 100_000),
        s.data
    );
    assert_eq!(s.backend.reads().len(), before);
}

#[test]
fn lru_blobs_not_in_use_are_evicted_over_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn BlobBackend> = Arc::new(LocalDirBackend::new(dir.path().join("store")));
    let blobs: Vec<_> = (0..3u64)
        .map(|i| {
            let data = pseudo_random(100 + i, 8 * CHUNK as usize);
            let manifest = publish(&data, CHUNK, Compression::None, local.as_ref());
            (data, manifest)
        })
        .collect();
    let mut config = config(&dir.path().join("cache"));
    config.capacity_bytes = Some(20 * u64::from(CHUNK));
    let engine = CacheEngine::new(config, local).unwrap();
    let cache_file =
        |m: &berth_cache::Manifest| dir.path().join("cache").join(format!("{}.data", m.blob_id));
    let pinned = engine.open_blob(&blobs[0].1).unwrap();
    for (data, manifest) in &blobs {
        let handle = engine.open_blob(manifest).unwrap();
        assert_eq!(read_all(&engine, handle.id(), data.len(), 1 << 20), *data);
    }
    // 24 chunks cached over a 20 chunk limit: blob 1, the least recently used one
    // not in use, goes; blob 0 is in use and stays.
    assert_eq!(engine.metrics().evictions.load(Ordering::Relaxed), 1);
    assert!(!cache_file(&blobs[1].1).exists());
    assert!(cache_file(&blobs[0].1).exists() && cache_file(&blobs[2].1).exists());
    assert!(engine.cached_bytes() <= 20 * u64::from(CHUNK));
    assert_eq!(engine.ready_chunks(pinned.id()).unwrap(), 8);
}

/// The map as a crash would leave it: a copy of the file, read as a restarted engine
/// reads it.
fn ready_on_disk(s: &Setup, manifest: &berth_cache::Manifest) -> u64 {
    ready_in(&s.cache, manifest)
}

fn ready_in(cache: &std::path::Path, manifest: &berth_cache::Manifest) -> u64 {
    let copy = cache.join("copy.map");
    std::fs::copy(cache.join(format!("{}.map", manifest.blob_id)), &copy).unwrap();
    let id = parse_digest(&manifest.blob_id).unwrap();
    let (map, _) = ChunkMap::open(&copy, id, manifest.chunk_size, manifest.blob_size).unwrap();
    let ready = map.ready_count();
    drop(map);
    std::fs::remove_file(&copy).unwrap();
    ready
}

#[test]
fn fetched_chunks_are_served_at_once_and_marked_only_once_synced() {
    let (s, manifest) = setup(8 * CHUNK as usize, Compression::None, Duration::ZERO);
    let mut config = config(&s.cache);
    // A group commit that never comes by itself.
    config.sync_interval = Duration::from_secs(3600);
    let engine = CacheEngine::new(config, s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let mut buf = vec![0u8; 3 * CHUNK as usize];
    handle.read(0, &mut buf).unwrap();
    assert_eq!(buf, s.data[..buf.len()]);
    assert_eq!(
        engine.ready_chunks(handle.id()).unwrap(),
        3,
        "served and counted"
    );
    // A crash now: the map claims nothing that was not synced.
    assert_eq!(ready_on_disk(&s, &manifest), 0);
    engine.sync();
    assert_eq!(ready_on_disk(&s, &manifest), 3);
    // The rest, then a clean close: everything is marked without an explicit sync.
    handle.read(3 * u64::from(CHUNK), &mut buf).unwrap();
    drop(handle);
    drop(engine);
    assert_eq!(ready_on_disk(&s, &manifest), 6);
    let reads = s.backend.reads().len();
    let engine = CacheEngine::new(self::config(&s.cache), s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    assert_eq!(engine.ready_chunks(handle.id()).unwrap(), 6);
    handle.read(0, &mut buf).unwrap();
    assert_eq!(
        s.backend.reads().len(),
        reads,
        "nothing refetched after the restart"
    );
}

/// Reads chunks `chunks` of the blob one at a time, `gap` apart, calling `between` after
/// each (with the chunks read so far).
fn read_chunks_spaced(
    engine: &CacheEngine,
    id: &str,
    chunks: std::ops::Range<u64>,
    gap: Duration,
    mut between: impl FnMut(u64),
) {
    let mut buf = vec![0u8; CHUNK as usize];
    for index in chunks.clone() {
        engine.read(id, index * u64::from(CHUNK), &mut buf).unwrap();
        between(index + 1 - chunks.start);
        std::thread::sleep(gap);
    }
}

/// Polls `ready_on_disk` until it reaches `want` or `within` passes; returns the last count.
fn wait_ready_on_disk(
    s: &Setup,
    manifest: &berth_cache::Manifest,
    want: u64,
    within: Duration,
) -> u64 {
    let deadline = std::time::Instant::now() + within;
    loop {
        let ready = ready_on_disk(s, manifest);
        if ready >= want || std::time::Instant::now() >= deadline {
            return ready;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An engine over a blob of `chunks` chunks whose sync rounds wait for a pause of
/// `quiet`, at most `max_delay`, and start at once at `batch_bytes` waiting.
fn deferred_syncs(
    chunks: usize,
    quiet: Duration,
    max_delay: Duration,
    batch_bytes: u64,
) -> (
    Setup,
    berth_cache::Manifest,
    CacheEngine,
    berth_cache::BlobHandle,
) {
    let (s, manifest) = setup(chunks * CHUNK as usize, Compression::None, Duration::ZERO);
    let mut config = config(&s.cache);
    config.sync_interval = quiet;
    config.sync_max_delay = max_delay;
    config.sync_batch_bytes = batch_bytes;
    let engine = CacheEngine::new(config, s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    (s, manifest, engine, handle)
}

#[test]
fn a_sync_round_waits_for_the_fetches_to_pause() {
    let (s, manifest, engine, handle) = deferred_syncs(
        32,
        Duration::from_secs(2),
        Duration::from_secs(3600),
        u64::MAX,
    );
    // 20 fetches 100 ms apart: 2 s of fetching, never a pause of 2 s.
    read_chunks_spaced(
        &engine,
        handle.id(),
        0..20,
        Duration::from_millis(100),
        |_| {
            assert_eq!(
                ready_on_disk(&s, &manifest),
                0,
                "a round ran while the fetches went on"
            );
        },
    );
    // Once they stop, the round comes by itself.
    assert_eq!(
        wait_ready_on_disk(&s, &manifest, 20, Duration::from_secs(20)),
        20
    );
    assert_eq!(engine.ready_chunks(handle.id()).unwrap(), 20);
}

#[test]
fn fetches_that_never_pause_are_synced_within_the_longest_delay() {
    let (s, manifest, engine, handle) = deferred_syncs(
        32,
        Duration::from_secs(3600),
        Duration::from_millis(300),
        u64::MAX,
    );
    let mut marked_while_fetching = 0;
    read_chunks_spaced(
        &engine,
        handle.id(),
        0..20,
        Duration::from_millis(100),
        |_| {
            marked_while_fetching = ready_on_disk(&s, &manifest);
        },
    );
    assert!(
        marked_while_fetching >= 5,
        "only {marked_while_fetching} of 20 chunks marked while fetching went on for 2 s"
    );
}

#[test]
fn a_blob_with_a_batch_of_unsynced_bytes_is_synced_at_once() {
    let (s, manifest, engine, handle) = deferred_syncs(
        8,
        Duration::from_secs(3600),
        Duration::from_secs(3600),
        4 * u64::from(CHUNK),
    );
    read_chunks_spaced(&engine, handle.id(), 0..3, Duration::ZERO, |_| {});
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ready_on_disk(&s, &manifest), 0, "below the batch");
    read_chunks_spaced(&engine, handle.id(), 3..4, Duration::ZERO, |_| {});
    assert_eq!(
        wait_ready_on_disk(&s, &manifest, 4, Duration::from_secs(20)),
        4
    );
}

#[test]
fn chunks_a_killed_process_wrote_but_never_synced_are_adopted_by_the_next() {
    let (s, manifest, engine, handle) = deferred_syncs(
        8,
        Duration::from_secs(3600),
        Duration::from_secs(3600),
        u64::MAX,
    );
    let mut buf = vec![0u8; 5 * CHUNK as usize];
    handle.read(0, &mut buf).unwrap();
    assert_eq!(ready_on_disk(&s, &manifest), 0, "nothing synced yet");
    // The process dies here: its files as they stand, without the clean close, and one
    // chunk's data lost on the way.
    let crashed = s.cache.parent().unwrap().join("crashed");
    std::fs::create_dir_all(&crashed).unwrap();
    for ext in ["data", "map", "pending"] {
        let name = format!("{}.{ext}", manifest.blob_id);
        std::fs::copy(s.cache.join(&name), crashed.join(&name)).unwrap();
    }
    let data_copy = crashed.join(format!("{}.data", manifest.blob_id));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&data_copy)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0u8; 100], 4 * u64::from(CHUNK)).unwrap();
    drop(file);

    let reads = s.backend.reads().len();
    let next = CacheEngine::new(self::config(&crashed), s.backend.clone()).unwrap();
    let adopted = next.open_blob(&manifest).unwrap();
    assert_eq!(
        next.ready_chunks(adopted.id()).unwrap(),
        4,
        "the four intact chunks adopted, the damaged one not"
    );
    let mut again = vec![0u8; 4 * CHUNK as usize];
    adopted.read(0, &mut again).unwrap();
    assert_eq!(again, s.data[..again.len()]);
    assert_eq!(
        s.backend.reads().len(),
        reads,
        "an adopted chunk was fetched again"
    );
    let mut fifth = vec![0u8; CHUNK as usize];
    adopted.read(4 * u64::from(CHUNK), &mut fifth).unwrap();
    assert_eq!(fifth, s.data[4 * CHUNK as usize..5 * CHUNK as usize]);
    assert_eq!(
        s.backend.reads().len(),
        reads + 1,
        "the damaged chunk refetched"
    );
    // A clean close marks them all and leaves no record behind.
    drop(adopted);
    drop(next);
    assert_eq!(ready_in(&crashed, &manifest), 5);
    assert!(!crashed
        .join(format!("{}.pending", manifest.blob_id))
        .exists());
    drop(handle);
    drop(engine);
}

/// A disk-image-like blob: data chunks with runs of all-zero chunks between them.
fn sparse_setup(compression: Compression) -> (Setup, berth_cache::Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cache = dir.path().join("cache");
    let local: Arc<dyn BlobBackend> = Arc::new(LocalDirBackend::new(&store));
    let chunk = CHUNK as usize;
    // Chunks 0-1 and 10 hold data, 2-9 and 11-15 are zeros; the blob ends mid-chunk.
    let mut data = vec![0u8; 16 * chunk - 100];
    data[..2 * chunk].copy_from_slice(&pseudo_random(3, 2 * chunk));
    data[10 * chunk..11 * chunk].copy_from_slice(&pseudo_random(4, chunk));
    let manifest = publish(&data, CHUNK, compression, local.as_ref());
    let backend = Recording::new(local, Duration::ZERO);
    (
        Setup {
            _dir: dir,
            store,
            cache,
            data,
            backend,
        },
        manifest,
    )
}

#[test]
fn zero_chunks_are_made_present_without_a_backend_read_and_take_no_space() {
    let (s, manifest) = sparse_setup(Compression::Zstd);
    let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let chunk = u64::from(CHUNK);
    // A stale byte where a zero chunk lies (a cache file reused after a crash) must not
    // survive: the zeros are punched, not assumed.
    let cache_file = engine.cache_file_path(handle.id()).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(&cache_file)
            .unwrap(),
        &[0xaa; 16],
        3 * chunk + 5,
    )
    .unwrap();
    let mut buf = vec![0xffu8; (8 * chunk) as usize];
    handle.read(2 * chunk, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "zero chunks read as zeros");
    assert!(s.backend.reads().is_empty(), "{:?}", s.backend.reads());
    assert!(handle.is_present(2 * chunk..10 * chunk));
    assert_eq!(engine.ready_chunks(handle.id()).unwrap(), 8);
    // The tail chunk is shorter: still recognised as zeros.
    let mut tail = vec![0xffu8; 100];
    handle.read(16 * chunk - 200, &mut tail).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    assert!(s.backend.reads().is_empty(), "{:?}", s.backend.reads());
    let allocated = std::fs::metadata(&cache_file).unwrap().blocks() * 512;
    assert!(
        allocated < chunk,
        "zero chunks are holes, {allocated} bytes allocated"
    );
    // Data chunks still come from the backend and verify.
    let mut all = vec![0u8; s.data.len()];
    let mut at = 0;
    while at < all.len() {
        at += handle.read(at as u64, &mut all[at..]).unwrap();
    }
    assert!(all == s.data, "the whole blob reads back");
    assert_eq!(s.backend.reads().len(), 2, "{:?}", s.backend.reads());
    let metrics = engine.metrics();
    assert_eq!(metrics.chunks_fetched.load(Ordering::Relaxed), 16);
    assert_eq!(metrics.zero_chunks.load(Ordering::Relaxed), 13);
}

#[test]
fn a_miss_is_merged_by_uncompressed_bytes_and_never_over_zero_chunks() {
    let (s, manifest) = sparse_setup(Compression::Zstd);
    let mut config = config(&s.cache);
    // Two chunks of blob, however small they are stored.
    config.merge_min_bytes = 2 * u64::from(CHUNK);
    let engine = CacheEngine::new(config, s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let chunk = u64::from(CHUNK);
    handle.ensure_present(0..1).unwrap();
    let stored = |i: usize| {
        manifest.chunks[i].offset..manifest.chunks[i].offset + manifest.chunks[i].stored_size
    };
    assert_eq!(
        s.backend.reads(),
        vec![stored(0).start..stored(1).end],
        "extended to the second chunk"
    );
    // A miss of chunk 10 is not extended over the zero chunks after it (nothing to
    // fetch there), and they are not made present either.
    handle.ensure_present(10 * chunk..10 * chunk + 1).unwrap();
    assert_eq!(s.backend.reads()[1], stored(10));
    assert_eq!(s.backend.reads().len(), 2);
    assert!(!handle.is_present(11 * chunk..12 * chunk));
    // A request over data and zeros reads only the data.
    drop(handle);
    drop(engine);
    let (s, manifest) = sparse_setup(Compression::None);
    let engine = CacheEngine::new(config_for_merge(&s.cache), s.backend.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    handle.ensure_present(chunk..11 * chunk).unwrap();
    assert_eq!(
        s.backend.reads(),
        vec![chunk..2 * chunk, 10 * chunk..11 * chunk]
    );
}

fn config_for_merge(dir: &std::path::Path) -> CacheConfig {
    let mut config = config(dir);
    config.merge_min_bytes = 1 << 20;
    config
}

/// What a delivered blob's consumer was handed: the bytes at their offsets, and how
/// often each offset came.
#[derive(Default)]
struct Delivered {
    bytes: std::sync::Mutex<std::collections::BTreeMap<u64, Vec<u8>>>,
    times: std::sync::Mutex<std::collections::HashMap<u64, usize>>,
}

impl Delivered {
    fn take(self: &Arc<Self>) -> impl Fn(u64, &[u8]) -> std::io::Result<()> + Send + Sync {
        let me = self.clone();
        move |offset, data| {
            me.bytes.lock().unwrap().insert(offset, data.to_vec());
            *me.times.lock().unwrap().entry(offset).or_default() += 1;
            Ok(())
        }
    }

    fn times(&self, offset: u64) -> usize {
        self.times
            .lock()
            .unwrap()
            .get(&offset)
            .copied()
            .unwrap_or(0)
    }

    /// The blob as delivered (holes as zeros).
    fn image(&self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        for (&offset, data) in self.bytes.lock().unwrap().iter() {
            out[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        out
    }
}

#[test]
fn a_delivered_blob_hands_each_verified_chunk_over_once_and_keeps_no_copy() {
    for compression in [Compression::None, Compression::Lz4] {
        let (s, manifest) = setup(
            8 * CHUNK as usize - 1000,
            compression,
            Duration::from_millis(100),
        );
        let engine = Arc::new(CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap());
        let delivered = Arc::new(Delivered::default());
        let handle = Arc::new(
            engine
                .open_blob_delivering(&manifest, delivered.take())
                .unwrap(),
        );
        // Sixteen readers of chunks 2-3 at once: one fetch, one delivery per chunk.
        let chunk = u64::from(CHUNK);
        let barrier = Arc::new(Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (handle, barrier) = (handle.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    handle.ensure_present(2 * chunk + i * 100..3 * chunk + 10)
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap().unwrap();
        }
        assert_eq!(s.backend.reads().len(), 1, "{compression:?}");
        assert_eq!(delivered.times(2 * chunk), 1);
        assert_eq!(delivered.times(3 * chunk), 1);
        assert!(handle.is_present(2 * chunk..4 * chunk));
        // Present now means delivered: asked again, nothing is fetched or delivered.
        handle.ensure_present(2 * chunk..4 * chunk).unwrap();
        assert_eq!(s.backend.reads().len(), 1);
        assert_eq!(delivered.times(2 * chunk), 1);
        // All of it, including the short last chunk, arrives verified and whole.
        handle.ensure_present(0..manifest.blob_size).unwrap();
        assert_eq!(delivered.image(s.data.len()), s.data, "{compression:?}");
        assert!((0..8).all(|i| delivered.times(i * chunk) == 1));
        // Nothing in the cache directory, nothing counted as cached, no reads.
        let files: Vec<_> = std::fs::read_dir(&s.cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(files.is_empty(), "{files:?}");
        assert_eq!(engine.metrics().cached_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(engine.metrics().chunks_fetched.load(Ordering::Relaxed), 8);
        let err = handle.read(0, &mut [0u8; 10]).unwrap_err();
        assert!(matches!(err, CacheError::NoLocalCopy(_)), "{err}");
        assert!(handle.cache_path().is_err());
        // Nor may the blob be opened a second time, in either way.
        assert!(engine.open_blob(&manifest).is_err());
        assert!(engine
            .open_blob_delivering(&manifest, delivered.take())
            .is_err());
        // Once its last handle is gone, the blob is closed with its consumer, and can be
        // opened again (an image mounted again): its chunks are delivered anew.
        drop(handle);
        assert_eq!(Arc::strong_count(&delivered), 1, "the consumer is let go");
        let again = engine
            .open_blob_delivering(&manifest, delivered.take())
            .unwrap();
        assert!(!again.is_present(0..1));
        again.ensure_present(0..1).unwrap();
        assert_eq!(delivered.times(0), 2, "{compression:?}");
    }
}

#[test]
fn a_delivered_blob_never_hands_over_a_corrupt_chunk_and_refetches_what_its_consumer_lost() {
    let (s, manifest) = setup(8 * CHUNK as usize, Compression::None, Duration::ZERO);
    let object = s.store.join(&manifest.object);
    let mut stored = std::fs::read(&object).unwrap();
    stored[5 * CHUNK as usize + 3] ^= 0x10;
    std::fs::write(&object, &stored).unwrap();
    let engine = CacheEngine::new(config(&s.cache), s.backend.clone()).unwrap();
    let delivered = Arc::new(Delivered::default());
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handle = {
        let (take, refuse) = (delivered.take(), refuse.clone());
        engine
            .open_blob_delivering(&manifest, move |offset, data| {
                if refuse.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other("the consumer is full"));
                }
                take(offset, data)
            })
            .unwrap()
    };
    let chunk = u64::from(CHUNK);
    let err = handle.ensure_present(5 * chunk..5 * chunk + 1).unwrap_err();
    assert!(
        matches!(err, CacheError::Verification { chunk: 5, .. }),
        "{err}"
    );
    assert_eq!(delivered.times(5 * chunk), 0, "never handed over");
    // A consumer that cannot take a chunk fails its readers; the chunk stays missing.
    refuse.store(true, Ordering::SeqCst);
    let err = handle.ensure_present(0..1).unwrap_err();
    assert!(err.to_string().contains("the consumer is full"), "{err}");
    assert!(!handle.is_present(0..1));
    refuse.store(false, Ordering::SeqCst);
    handle.ensure_present(0..2 * chunk).unwrap();
    assert_eq!(delivered.times(0), 1);
    // The consumer lost chunk 1 and holds chunk 6 from elsewhere (an earlier process):
    // after a reconcile, chunk 1 is fetched and delivered again, chunk 6 never.
    let fetched = s.backend.reads().len();
    handle
        .reconcile_delivered(|range| range.start == 0 || range.start == 6 * chunk)
        .unwrap();
    assert!(!handle.is_present(chunk..chunk + 1));
    assert!(handle.is_present(6 * chunk..6 * chunk + 1));
    handle.ensure_present(chunk..chunk + 1).unwrap();
    handle.ensure_present(6 * chunk..7 * chunk).unwrap();
    assert_eq!(delivered.times(chunk), 2);
    assert_eq!(delivered.times(6 * chunk), 0);
    assert_eq!(s.backend.reads().len(), fetched + 1);
    // Reconciling is for delivered blobs only.
    let other = tempfile::tempdir().unwrap();
    let local_engine = CacheEngine::new(config(other.path()), s.backend.clone()).unwrap();
    let local = local_engine.open_blob(&manifest).unwrap();
    assert!(local.reconcile_delivered(|_| true).is_err());
}
