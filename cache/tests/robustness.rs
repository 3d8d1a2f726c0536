//! Hostile manifests, backends that answer wrongly, priorities and concurrency bounds,
//! read-ahead, and two engines on one cache directory.

mod common;

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_cache::{
    BlobBackend, CacheConfig, CacheEngine, CacheError, Compression, LocalDirBackend, Manifest,
};
use common::{pseudo_random, publish, Fault, Faulty, Gated, OpenGateOnDrop};

const CHUNK: u32 = 64 * 1024;

fn config(dir: &std::path::Path) -> CacheConfig {
    let mut config = CacheConfig::new(dir);
    config.merge_min_bytes = u64::from(CHUNK);
    config.merge_max_bytes = u64::from(CHUNK);
    config.readahead_max_bytes = 0;
    config.retry_base_delay = Duration::from_millis(2);
    config
}

fn published(len: usize) -> (tempfile::TempDir, Arc<dyn BlobBackend>, Vec<u8>, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn BlobBackend> = Arc::new(LocalDirBackend::new(dir.path().join("store")));
    let data = pseudo_random(len as u64, len);
    let manifest = publish(&data, CHUNK, Compression::None, local.as_ref());
    (dir, local, data, manifest)
}

fn invalid(manifest: &Manifest) -> String {
    match manifest.validate() {
        Err(CacheError::InvalidManifest(message)) => message,
        other => panic!("expected an invalid manifest, got {other:?}"),
    }
}

#[test]
fn crafted_manifests_are_refused_naming_the_field() {
    let (_dir, _backend, _data, good) = published(5 * CHUNK as usize + 100);
    good.validate().unwrap();
    let text = serde_json::to_vec(&good).unwrap();
    assert_eq!(Manifest::parse(&text).unwrap(), good);

    let mut m = good.clone();
    m.chunks[0].offset = u64::MAX - 10;
    assert!(invalid(&m).contains("chunks[0].offset"), "{}", invalid(&m));

    let mut m = good.clone();
    m.chunks[2].offset += 1;
    assert!(invalid(&m).contains("chunks[2].offset"));

    let mut m = good.clone();
    m.compression = Compression::Zstd;
    m.chunks[1].stored_size = u64::MAX;
    assert!(
        invalid(&m).contains("chunks[1].stored_size"),
        "{}",
        invalid(&m)
    );

    let mut m = good.clone();
    m.chunks[3].stored_size = u64::from(CHUNK) + 1;
    assert!(invalid(&m).contains("chunks[3].stored_size"));

    let mut m = good.clone();
    m.chunks.pop();
    assert!(invalid(&m).contains("field `chunks`"));

    let mut m = good.clone();
    m.blob_size = u64::MAX;
    assert!(invalid(&m).contains("blob_size"));

    let mut m = good.clone();
    m.chunk_size = 3000;
    assert!(invalid(&m).contains("chunk_size"));

    let mut m = good.clone();
    m.chunks[4].digest = "zz".repeat(32);
    assert!(invalid(&m).contains("chunks[4].digest"));

    for object in ["", "/abs", "a/../b", "a//b", "a/./b"] {
        let mut m = good.clone();
        m.object = object.into();
        assert!(invalid(&m).contains("object"), "{object:?}");
    }
    for bootstrap in ["", "..", "dir/boot.img"] {
        let mut m = good.clone();
        m.bootstrap = bootstrap.into();
        assert!(invalid(&m).contains("bootstrap"), "{bootstrap:?}");
    }
    let mut m = good.clone();
    m.bootstrap_digest = Some("short".into());
    assert!(invalid(&m).contains("bootstrap_digest"));

    let mut m = good.clone();
    m.prefetch.push(berth_cache::PrefetchEntry {
        path: "/x".into(),
        ranges: vec![[10, 5]],
    });
    assert!(invalid(&m).contains("prefetch[0].ranges[0]"));

    let mut m = good.clone();
    m.version = 9;
    assert!(invalid(&m).contains("version"));

    assert!(Manifest::parse(b"{\"version\": 1").is_err());
    assert!(Manifest::parse(b"[]").is_err());
}

/// The seeds of the `manifest_parse` fuzz target parse (or are refused) without a
/// panic, and the valid ones keep their invariants.
#[test]
fn fuzz_corpus_of_the_manifest_parser_replays() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/manifest_parse");
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert!(
        entries.len() >= 3,
        "seed corpus missing in {}",
        dir.display()
    );
    let mut valid = 0;
    for entry in entries {
        let bytes = std::fs::read(entry.path()).unwrap();
        if let Ok(manifest) = Manifest::parse(&bytes) {
            valid += 1;
            assert_eq!(
                manifest.stored_size(),
                manifest.chunks.iter().map(|c| c.stored_size).sum::<u64>()
            );
        }
    }
    assert!(valid >= 1, "no seed is a valid manifest");
}

#[test]
fn short_long_and_panicking_backend_replies_are_errors_never_data() {
    let (dir, local, data, manifest) = published(4 * CHUNK as usize);
    let faulty = Faulty::new(local, Duration::ZERO);
    let engine = CacheEngine::new(config(&dir.path().join("cache")), faulty.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let mut buf = vec![0u8; 1000];
    for fault in [Fault::Short, Fault::Long, Fault::Panic] {
        faulty.set(fault);
        let err = handle.read(u64::from(CHUNK) + 5, &mut buf).unwrap_err();
        assert!(
            matches!(err, CacheError::FetchFailed { chunk: 1, .. }),
            "{fault:?}: {err}"
        );
        if fault != Fault::Panic {
            assert!(err.to_string().contains("received"), "{err}");
        }
        assert!(!handle.is_present(u64::from(CHUNK)..u64::from(CHUNK) + 1));
        assert_eq!(engine.ready_chunks(handle.id()).unwrap(), 0);
    }
    // Nothing is left claimed by the failed fetches: a good backend serves the chunk.
    faulty.set(Fault::None);
    assert_eq!(handle.read(u64::from(CHUNK) + 5, &mut buf).unwrap(), 1000);
    assert_eq!(buf, data[CHUNK as usize + 5..CHUNK as usize + 1005]);
}

#[test]
fn presence_queries_and_the_ready_listener() {
    let (dir, local, _data, manifest) = published(8 * CHUNK as usize);
    let engine = CacheEngine::new(config(&dir.path().join("cache")), local).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let seen: Arc<Mutex<Vec<Range<u64>>>> = Arc::default();
    let sink = seen.clone();
    handle.set_ready_listener(move |range| sink.lock().unwrap().push(range));
    let chunk = u64::from(CHUNK);
    assert!(handle.is_present(0..0));
    assert!(!handle.is_present(0..1));
    handle.ensure_present(2 * chunk + 1..3 * chunk + 1).unwrap();
    assert!(handle.is_present(2 * chunk..4 * chunk));
    assert!(!handle.is_present(2 * chunk..4 * chunk + 1));
    assert_eq!(handle.present_ranges(), vec![2 * chunk..4 * chunk]);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![2 * chunk..3 * chunk, 3 * chunk..4 * chunk]
    );
    assert_eq!(engine.metrics().backend_requests.load(Ordering::Relaxed), 2);
}

/// Background work holds every permit it may; an on-demand read still starts next,
/// before the queued prefetch, and a chunk the prefetch list wants is fetched by the
/// reader itself rather than waited for.
#[test]
fn on_demand_reads_go_before_background_work() {
    let (dir, local, data, manifest) = published(32 * CHUNK as usize);
    let gated = Gated::new(local);
    let mut config = config(&dir.path().join("cache"));
    config.max_concurrent_fetches = 2;
    config.max_prefetch_fetches = 2;
    config.background_workers = 3;
    let engine = Arc::new(CacheEngine::new(config, gated.clone()).unwrap());
    let handle = Arc::new(engine.open_blob(&manifest).unwrap());
    let _open_gate_at_exit = OpenGateOnDrop(gated.clone());
    let chunk = u64::from(CHUNK);
    handle.prefetch(std::slice::from_ref(&(0..manifest.blob_size)));
    // Two prefetch reads in flight (chunks 0 and 1); the third worker waits for a
    // permit without having claimed anything.
    // Two workers take chunks 0 and 1 at once: which reaches the backend first is up to
    // the scheduler.
    let mut started = gated.wait_started(2);
    started.sort_by_key(|r| r.start);
    assert_eq!(started, vec![0..chunk, chunk..2 * chunk]);
    let reader = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 100];
            handle.read(2 * chunk + 7, &mut buf).unwrap();
            buf
        })
    };
    let other = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 100];
            handle.read(20 * chunk, &mut buf).unwrap();
            buf
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        gated.started().len(),
        2,
        "no third read while both permits are held"
    );
    gated.release(1);
    let started = gated.wait_started(3);
    gated.release(1);
    let started_next = gated.wait_started(4);
    // The two freed permits went to the two readers, not to the prefetch list (whose
    // next chunk, 2, the first reader fetched itself).
    let mut on_demand = vec![started[2].clone(), started_next[3].clone()];
    on_demand.sort_by_key(|r| r.start);
    assert_eq!(
        on_demand,
        vec![2 * chunk..3 * chunk, 20 * chunk..21 * chunk]
    );
    gated.release(1000);
    assert_eq!(
        reader.join().unwrap(),
        data[2 * CHUNK as usize + 7..2 * CHUNK as usize + 107]
    );
    assert_eq!(
        other.join().unwrap(),
        data[20 * CHUNK as usize..20 * CHUNK as usize + 100]
    );
    assert!(engine.wait_background_idle(Duration::from_secs(30)));
    assert!(handle.is_complete());
    let reads = gated.started();
    assert_eq!(reads.len(), 32, "every chunk read once: {reads:?}");
}

/// Many readers and the whole prefetch list against a slow backend: the number of
/// backend reads in flight never exceeds the configured bound.
#[test]
fn backend_concurrency_stays_within_bounds() {
    let (dir, local, data, manifest) = published(64 * CHUNK as usize);
    let faulty = Faulty::new(local, Duration::from_millis(20));
    let mut config = config(&dir.path().join("cache"));
    config.max_concurrent_fetches = 3;
    config.max_prefetch_fetches = 1;
    let engine = Arc::new(CacheEngine::new(config, faulty.clone()).unwrap());
    let handle = Arc::new(engine.open_blob(&manifest).unwrap());
    handle.prefetch(std::slice::from_ref(&(0..manifest.blob_size)));
    let readers: Vec<_> = (0..12u64)
        .map(|i| {
            let handle = handle.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK as usize];
                let offset = (63 - i * 5) * u64::from(CHUNK);
                handle.read(offset, &mut buf).unwrap();
                (offset, buf)
            })
        })
        .collect();
    for reader in readers {
        let (offset, buf) = reader.join().unwrap();
        assert_eq!(buf, data[offset as usize..offset as usize + CHUNK as usize]);
    }
    assert!(engine.wait_background_idle(Duration::from_secs(60)));
    assert!(handle.is_complete());
    let max = faulty.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 3, "{max} backend reads were in flight at once");
    assert!(max >= 2, "the readers should have overlapped ({max})");
    assert_eq!(faulty.requests.load(Ordering::SeqCst), 64);
}

/// A sequential reader gets chunks fetched ahead of it: fewer reads wait on the
/// backend, and the read-ahead is counted.
#[test]
fn sequential_reader_is_read_ahead() {
    let (dir, local, data, manifest) = published(64 * CHUNK as usize);
    let faulty = Faulty::new(local, Duration::from_millis(5));
    let mut sequential = config(&dir.path().join("cache"));
    sequential.readahead_max_bytes = 16 * u64::from(CHUNK);
    sequential.merge_max_bytes = 4 * u64::from(CHUNK);
    let engine = CacheEngine::new(sequential, faulty.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let mut out = vec![0u8; data.len()];
    for (i, piece) in out.chunks_mut(16 * 1024).enumerate() {
        handle.read(i as u64 * 16 * 1024, piece).unwrap();
    }
    assert_eq!(out, data);
    let metrics = engine.metrics();
    let ahead = metrics.chunks_read_ahead.load(Ordering::Relaxed);
    let on_demand = metrics.chunks_fetched.load(Ordering::Relaxed) - ahead;
    assert!(ahead >= 32, "only {ahead} of 64 chunks were read ahead");
    assert!(
        on_demand < 32,
        "{on_demand} chunks fetched on demand despite read-ahead"
    );
    let requests = faulty.requests.load(Ordering::SeqCst);
    assert!(
        requests < 64,
        "read-ahead should merge chunks into larger reads ({requests} reads for 64 chunks)"
    );
    // A random reader gets none.
    let (dir, local, _data, manifest) = published(64 * CHUNK as usize);
    let mut random = config(&dir.path().join("cache"));
    random.readahead_max_bytes = 16 * u64::from(CHUNK);
    let engine = CacheEngine::new(random, local).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let mut buf = vec![0u8; 10];
    for index in [40u64, 3, 57, 12, 30, 1, 50] {
        handle.read(index * u64::from(CHUNK), &mut buf).unwrap();
    }
    assert!(engine.wait_background_idle(Duration::from_secs(10)));
    assert_eq!(
        engine.metrics().chunks_read_ahead.load(Ordering::Relaxed),
        0
    );
}

/// Two engines on one cache directory (as two `berth mount` processes would be): the
/// second cannot open a blob the first has open, and does not evict it.
#[test]
fn a_blob_open_in_one_engine_is_neither_opened_nor_evicted_by_another() {
    let (dir, local, data, manifest) = published(8 * CHUNK as usize);
    let cache = dir.path().join("cache");
    let first = CacheEngine::new(config(&cache), local.clone()).unwrap();
    let handle = first.open_blob(&manifest).unwrap();
    let mut all = vec![0u8; data.len()];
    handle.read(0, &mut all).unwrap();

    let other_data = pseudo_random(99, 8 * CHUNK as usize);
    let other = publish(&other_data, CHUNK, Compression::None, local.as_ref());
    let mut tight = config(&cache);
    tight.capacity_bytes = Some(4 * u64::from(CHUNK));
    let second = CacheEngine::new(tight, local.clone()).unwrap();
    let err = second.open_blob(&manifest).unwrap_err();
    assert!(matches!(err, CacheError::BlobBusy { .. }), "{err}");
    assert!(err.to_string().contains("another process"), "{err}");
    // Over capacity with only the first engine's blob as a candidate: kept.
    {
        let h = second.open_blob(&other).unwrap();
        h.read(0, &mut vec![0u8; other_data.len()]).unwrap();
    }
    assert!(cache.join(format!("{}.data", manifest.blob_id)).exists());
    let mut again = vec![0u8; data.len()];
    handle.read(0, &mut again).unwrap();
    assert_eq!(again, data);
    // Once the first engine is gone, the blob can be evicted.
    drop(handle);
    drop(first);
    {
        let h = second.open_blob(&other).unwrap();
        h.read(0, &mut [0u8; 10]).unwrap();
    }
    assert!(!cache.join(format!("{}.data", manifest.blob_id)).exists());
}
