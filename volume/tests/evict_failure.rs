//! An eviction round whose cache map cannot be persisted (error point `evict.persist`, in a
//! `failpoints` build): the regions it cleared stay allocated (the map on disk may still call
//! them cached, so punching them could make a crash read zeros), every read stays right, the
//! failing round is retried without clearing more of the cache, and once a persist works the
//! regions are punched. Before, they were never punched (the space stayed in use until the
//! volume was opened afresh).
#![cfg(feature = "failpoints")]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use berth_blockdev::target::{read_at, write_at};
use berth_testkit::pseudo_random;
use berth_volume::admin::{self, CreateOptions};
use berth_volume::{failpoint, Location, Volume, VolumeOptions};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const CACHE_LIMIT: u64 = 2 * MIB;

/// The local cache file below `dir`.
fn cache_file(dir: &Path) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = cache_file(&path) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == "cache") {
            return Some(path);
        }
    }
    None
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Reads MiB `first..end` back (a read of an evicted region fetches it into the cache
/// again).
fn assert_reads(volume: &Volume, first: u64, end: u64, what: &str) {
    for i in first..end {
        let mut got = vec![0u8; MIB as usize];
        read_at(volume, i * MIB, &mut got).unwrap_or_else(|e| panic!("{what}: MiB {i}: {e}"));
        assert!(
            got == pseudo_random(i + 1, MIB as usize),
            "{what}: MiB {i} reads back wrong"
        );
    }
}

#[test]
fn a_failed_eviction_persist_punches_its_regions_later_and_loses_nothing() {
    failpoint::set_failing("evict.persist", true);
    let dir = tempfile::tempdir().unwrap();
    let location = Location::parse(&format!(
        "file://{}/vol",
        dir.path().join("bucket").display()
    ))
    .unwrap();
    let create = CreateOptions {
        size: Some(SIZE),
        ..CreateOptions::default()
    };
    admin::create(&location, &create, None).unwrap();
    let cache_dir = dir.path().join("cache");
    let options = VolumeOptions {
        cache_dir: cache_dir.clone(),
        segment_bytes: MIB,
        pack_bytes: MIB,
        upload_interval: Duration::from_millis(5),
        cache_bytes: Some(CACHE_LIMIT),
        gc_interval: None,
        gc_after_released_bytes: None,
        open_timeout: Duration::from_secs(10),
        fetch_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(30),
        ..VolumeOptions::default()
    };
    let (volume, _) = Volume::open(&location, options).unwrap();
    // Eight times the cache limit: uploaded, applied to the cache, then over the limit.
    for i in 0..SIZE / MIB {
        write_at(&volume, i * MIB, &pseudo_random(i + 1, MIB as usize), false).unwrap();
    }
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    let cache = cache_file(&cache_dir).expect("the volume's cache file");
    let metrics = volume.metrics();

    // While persists fail, the cleared regions stay allocated and reads stay right; the
    // retries do not clear more (the cache map keeps about the limit's worth).
    let start = Instant::now();
    let mut lowest_cached = u64::MAX;
    while start.elapsed() < Duration::from_millis(1200) {
        lowest_cached = lowest_cached.min(metrics.cached_bytes.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = allocated(&cache);
    assert!(
        during > 2 * CACHE_LIMIT,
        "while the map cannot be persisted the cleared regions must stay (allocated {during})"
    );
    assert!(
        lowest_cached >= CACHE_LIMIT / 2,
        "the failing round was retried by clearing more of the cache: {lowest_cached} bytes \
         left in the map"
    );
    // Two MiB only: what is read is cached again, and would be evicted (and punched) anew.
    assert_reads(&volume, 0, 2, "while eviction persists fail");

    // Once persists work, the regions are punched.
    failpoint::set_failing("evict.persist", false);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = allocated(&cache);
    while now > CACHE_LIMIT + 2 * MIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        now = allocated(&cache);
    }
    assert!(
        now <= CACHE_LIMIT + 2 * MIB,
        "the regions of the failed rounds were never punched: {now} bytes of the cache file \
         allocated, {during} while failing, limit {CACHE_LIMIT}"
    );
    assert_reads(&volume, 0, SIZE / MIB, "after the failures");
    volume.close().unwrap();
}
