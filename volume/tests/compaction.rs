//! Compaction: packs whose blocks were mostly overwritten are rewritten into new ones
//! and then collected, so the bucket holds about what the volume uses; reads and writes
//! going on meanwhile always see the latest data, and the bucket alone reads back the
//! volume afterwards. Packs a snapshot holds are left alone.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use berth_blockdev::target::write_at;
use berth_testkit::{pseudo_random, soak_seconds, xorshift};
use berth_volume::admin::{self, COMMAND_PATIENCE};
use berth_volume::{Location, Store, Volume, VolumeOptions};

mod common;
use common::{create, missing_from_latest, read, MIB};

const BLOCK: u64 = 4096;

/// Small packs uploaded at once, compaction as soon as 1 MiB is dead in packs less than
/// half used, garbage collection as soon as 256 KiB of packs fell out of use.
fn options(cache_dir: &Path) -> VolumeOptions {
    VolumeOptions {
        cache_dir: cache_dir.to_path_buf(),
        segment_bytes: 256 << 10,
        pack_bytes: 256 << 10,
        upload_interval: Duration::from_millis(5),
        max_dirty_bytes: 2 * MIB,
        gc_interval: None,
        gc_after_released_bytes: Some(256 << 10),
        gc_grace: Duration::from_millis(100),
        compact_below: Some(0.5),
        compact_after_dead_bytes: MIB,
        compact_check_interval: Duration::from_millis(20),
        open_timeout: Duration::from_secs(10),
        fetch_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(30),
        flush_timeout: Duration::from_secs(10),
        ..VolumeOptions::default()
    }
}

fn pack_bytes(store: &Store) -> u64 {
    store
        .list("packs", COMMAND_PATIENCE)
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum()
}

fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter().zip(want).position(|(a, b)| a != b)
}

/// `volume` reads `model` from block 0; closed (the rest uploaded), its latest version has
/// all its packs, and opened again on `other_cache` (the bucket alone) it reads `model`.
fn close_and_read_back_from_the_bucket(
    volume: Volume,
    location: &Location,
    other_cache: &Path,
    model: &[u8],
) {
    if let Some(at) = first_difference(&read(&volume, 0, model.len()), model) {
        panic!("byte {at} reads wrong on the writer");
    }
    volume.close().unwrap();
    drop(volume);
    assert!(
        missing_from_latest(location).is_empty(),
        "a pack in use was deleted"
    );
    let (volume, _) = Volume::open(location, options(other_cache)).unwrap();
    if let Some(at) = first_difference(&read(&volume, 0, model.len()), model) {
        panic!("byte {at} reads wrong from the bucket alone");
    }
}

/// 4 MiB written, then three blocks of every four overwritten: the first 4 MiB of packs
/// keep a quarter of their blocks each. Compaction moves those into new packs, garbage
/// collection deletes the old ones, and the bucket ends up holding what the volume uses.
#[test]
fn sparse_packs_are_rewritten_and_the_bucket_shrinks_to_what_is_used() {
    const SPAN: u64 = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"));
    // Below the threshold of dead bytes sparse packs stay: a quarter MiB here, so that
    // every sparse pack goes.
    let eager = VolumeOptions {
        compact_after_dead_bytes: 256 << 10,
        ..options(&dir.path().join("host1"))
    };
    let (volume, _) = Volume::open(&location, eager).unwrap();
    let store = Store::open(&location).unwrap();
    let mut model = pseudo_random(1, SPAN as usize);
    for offset in (0..SPAN).step_by(64 << 10) {
        let at = offset as usize;
        write_at(&volume, offset, &model[at..at + (64 << 10)], false).unwrap();
    }
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    let metrics = volume.metrics();
    assert_eq!(
        metrics.compactions.load(Ordering::Relaxed),
        0,
        "nothing is sparse yet"
    );
    for (i, block) in (0..SPAN / BLOCK).step_by(4).enumerate() {
        let data = pseudo_random(100 + i as u64, 3 * BLOCK as usize);
        let at = ((block + 1) * BLOCK) as usize;
        if at + data.len() > model.len() {
            break;
        }
        write_at(&volume, at as u64, &data, false).unwrap();
        model[at..at + data.len()].copy_from_slice(&data);
    }
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut held = pack_bytes(&store);
    let most_held = held;
    while (held > SPAN + SPAN / 8 || metrics.pack_dead_bytes.load(Ordering::Relaxed) >= 256 << 10)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
        held = pack_bytes(&store);
    }
    let (steps, moved, emptied, dead) = (
        metrics.compactions.load(Ordering::Relaxed),
        metrics.compacted_bytes.load(Ordering::Relaxed),
        metrics.compacted_packs.load(Ordering::Relaxed),
        metrics.pack_dead_bytes.load(Ordering::Relaxed),
    );
    eprintln!(
        "{SPAN} bytes in use: {most_held} bytes of packs before compaction, {held} after; \
         {steps} steps moved {moved} bytes and emptied {emptied} packs"
    );
    assert!(
        steps > 0 && emptied >= 12,
        "compaction ran ({steps} steps, {emptied} packs emptied)"
    );
    // Only the quarter still live moved, not whole packs.
    assert!(
        moved <= SPAN / 4 + SPAN / 16,
        "compaction moved {moved} bytes for {} live",
        SPAN / 4
    );
    // Sparse packs holding less than the threshold together stay.
    assert!(
        dead < 256 << 10,
        "packs in use still hold {dead} dead bytes"
    );
    assert!(
        held <= SPAN + SPAN / 8,
        "the bucket holds {held} bytes of packs for {SPAN} bytes in use"
    );
    close_and_read_back_from_the_bucket(volume, &location, &dir.path().join("host2"), &model);
}

/// Random overwrites with reads checked against a model, compaction taking every sparse
/// pack as soon as one block is dead, garbage collection right behind it, and a cache too
/// small to hold the volume (reads fetch packs that compaction is moving away from). The
/// bucket alone reads back the model afterwards. `BERTH_VOLUME_SOAK_SECONDS` lengthens it
/// (default 6).
#[test]
fn reads_and_writes_during_constant_compaction_see_the_latest_data() {
    let seconds = soak_seconds(6);
    const SPAN: u64 = 2 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"));
    let busy = |cache: &str| VolumeOptions {
        compact_below: Some(0.9),
        compact_after_dead_bytes: BLOCK,
        gc_after_released_bytes: Some(1),
        cache_bytes: Some(MIB),
        readahead_bytes: 64 << 10,
        full_every: 4,
        ..options(&dir.path().join(cache))
    };
    let (volume, _) = Volume::open(&location, busy("host1")).unwrap();
    let mut model = vec![0u8; SPAN as usize];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut writes, mut reads) = (0u64, 0u64);
    while Instant::now() < deadline {
        let block = xorshift(&mut state) % (SPAN / BLOCK);
        let blocks = 1 + xorshift(&mut state) % 16.min(SPAN / BLOCK - block);
        let (offset, len) = (block * BLOCK, (blocks * BLOCK) as usize);
        if xorshift(&mut state).is_multiple_of(3) {
            let got = read(&volume, offset, len);
            if let Some(at) = first_difference(&got, &model[offset as usize..][..len]) {
                panic!(
                    "after {writes} writes, byte {} reads {:#x}, expected {:#x}",
                    offset as usize + at,
                    got[at],
                    model[offset as usize + at]
                );
            }
            reads += 1;
        } else {
            let data = pseudo_random(1000 + writes, len);
            write_at(&volume, offset, &data, false).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            writes += 1;
        }
    }
    volume.sync_to_bucket(Duration::from_secs(60)).unwrap();
    let metrics = volume.metrics();
    let (steps, emptied, gc) = (
        metrics.compactions.load(Ordering::Relaxed),
        metrics.compacted_packs.load(Ordering::Relaxed),
        metrics.gc_packs_deleted.load(Ordering::Relaxed),
    );
    eprintln!("{writes} writes, {reads} reads checked; {steps} compaction steps emptied {emptied} packs, GC deleted {gc}");
    assert!(
        steps >= 3 && emptied > 0 && gc > 0,
        "compaction and collection ran all along ({steps} steps, {emptied} packs emptied, {gc} deleted)"
    );
    close_and_read_back_from_the_bucket(volume, &location, &dir.path().join("host2"), &model);
}

/// Writes arriving faster than the uploader's interval, as a guest's are: a step leaves
/// behind the packs whose other live blocks have writes pending (they fall out of use once
/// those are uploaded), and the next look finds only such blocks, nothing to move. That
/// must not hold compaction back for long (it used to wait a minute, so a busy volume
/// compacted about once a minute).
#[test]
fn compaction_keeps_up_with_writes_that_arrive_between_uploads() {
    const SPAN: u64 = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"));
    // The default pack size: one upload takes everything written since the last.
    let steady = VolumeOptions {
        cache_dir: dir.path().join("host1"),
        upload_interval: Duration::from_millis(400),
        compact_below: Some(0.9),
        compact_after_dead_bytes: 256 << 10,
        compact_check_interval: Duration::from_millis(100),
        ..VolumeOptions::default()
    };
    let (volume, _) = Volume::open(&location, steady).unwrap();
    let mut model = vec![0u8; SPAN as usize];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut writes = 0u64;
    while Instant::now() < deadline {
        let blocks = 1 + xorshift(&mut state) % 32;
        let block = xorshift(&mut state) % (SPAN / BLOCK - blocks);
        let (offset, len) = (block * BLOCK, (blocks * BLOCK) as usize);
        let data = pseudo_random(5000 + writes, len);
        write_at(&volume, offset, &data, false).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        writes += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let steps = volume.metrics().compactions.load(Ordering::Relaxed);
    eprintln!("{writes} writes; {steps} compaction steps");
    assert!(
        steps >= 4,
        "compaction ran {steps} steps in 8 s of steady writes, one look every 100 ms"
    );
    volume.sync_to_bucket(Duration::from_secs(60)).unwrap();
    close_and_read_back_from_the_bucket(volume, &location, &dir.path().join("host2"), &model);
}

/// A snapshot holds the packs it was taken with: rewriting them would add a copy and free
/// nothing, so compaction leaves them, and the snapshot stays whole.
#[test]
fn packs_a_snapshot_holds_are_not_compacted() {
    const SPAN: u64 = 2 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"));
    let (volume, _) = Volume::open(&location, options(&dir.path().join("host1"))).unwrap();
    let before = pseudo_random(7, SPAN as usize);
    write_at(&volume, 0, &before, false).unwrap();
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    admin::snapshot(&location, "kept").unwrap();
    let mut after = before.clone();
    for block in (0..SPAN / BLOCK).step_by(4) {
        let at = ((block + 1) * BLOCK) as usize;
        if at + 3 * BLOCK as usize > after.len() {
            break;
        }
        let data = pseudo_random(block + 50, 3 * BLOCK as usize);
        write_at(&volume, at as u64, &data, false).unwrap();
        after[at..at + data.len()].copy_from_slice(&data);
    }
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let metrics = volume.metrics();
    assert_eq!(
        metrics.compactions.load(Ordering::Relaxed),
        0,
        "packs the snapshot holds were compacted"
    );
    assert!(
        metrics.pack_dead_bytes.load(Ordering::Relaxed) >= SPAN / 2,
        "the overwrites left dead blocks in the snapshot's packs"
    );
    assert_eq!(read(&volume, 0, SPAN as usize), after);
    volume.close().unwrap();
    drop(volume);
    let clone = Location::parse(&format!(
        "file://{}/clone",
        dir.path().join("bucket").display()
    ))
    .unwrap();
    admin::clone_volume(&location, "kept", &clone).unwrap();
    let (volume, _) = Volume::open(&clone, options(&dir.path().join("host2"))).unwrap();
    assert_eq!(
        read(&volume, 0, SPAN as usize),
        before,
        "the snapshot reads back"
    );
}
