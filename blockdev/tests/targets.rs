//! The block engine's targets and request semantics, without ublk: raw files, lazily
//! fetched images through the cache engine, and the copy-on-write overlay's crash
//! consistency.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use berth_blockdev::export::export_to_file;
use berth_blockdev::target::{discard_at, read_at, validate, write_at, write_zeroes_at};
use berth_blockdev::{
    BlockError, BlockTarget, Completion, ImageTarget, Op, OverlayOptions, OverlayRecovery,
    OverlayTarget, Progress, RawOptions, RawTarget, SharedTarget,
};
use berth_cache::manifest::ChunkEntry;
use berth_cache::{BlobBackend, CacheConfig, CacheEngine, Compression, LocalDirBackend, Manifest};

const BLOCK: usize = 4096;

/// Deterministic, block-distinct content: block `i` is filled from a seed of (tag, i).
fn pattern(tag: u8, block: u64) -> Vec<u8> {
    let mut state = (u64::from(tag) << 56) ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1;
    (0..BLOCK)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn base_file(dir: &Path, blocks: u64) -> std::path::PathBuf {
    let path = dir.join("base.img");
    let file = fs::File::create(&path).unwrap();
    for b in 0..blocks {
        file.write_all_at(&pattern(1, b), b * BLOCK as u64).unwrap();
    }
    path
}

fn read_block(target: &dyn BlockTarget, block: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    read_at(target, block * BLOCK as u64, &mut buf).unwrap();
    buf
}

fn raw_base(path: &Path) -> SharedTarget {
    Arc::new(
        RawTarget::open(
            path,
            &RawOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

#[test]
fn raw_target_round_trips_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let path = base_file(dir.path(), 64);
    let target = RawTarget::open(&path, &RawOptions::default()).unwrap();
    assert_eq!(target.info().size, 64 * BLOCK as u64);
    assert_eq!(read_block(&target, 5), pattern(1, 5));
    let data: Vec<u8> = [pattern(2, 10), pattern(2, 11)].concat();
    write_at(&target, 10 * BLOCK as u64, &data, true).unwrap();
    assert_eq!(read_block(&target, 11), pattern(2, 11));
    // The write reached the file itself.
    let mut on_disk = vec![0u8; BLOCK];
    fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut on_disk, 10 * BLOCK as u64)
        .unwrap();
    assert_eq!(on_disk, pattern(2, 10));
    write_zeroes_at(&target, 20 * BLOCK as u64, 2 * BLOCK as u64).unwrap();
    assert_eq!(read_block(&target, 21), vec![0u8; BLOCK]);
    assert_eq!(read_block(&target, 22), pattern(1, 22));
    discard_at(&target, 30 * BLOCK as u64, BLOCK as u64).unwrap();
    assert_eq!(
        read_block(&target, 30),
        vec![0u8; BLOCK],
        "a punched hole reads zeros"
    );
    target.flush().unwrap();
}

#[test]
fn requests_outside_the_device_misaligned_or_writing_read_only_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = base_file(dir.path(), 8);
    let ro = RawTarget::open(
        &path,
        &RawOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let info = ro.info().clone();
    assert!(matches!(
        validate(&info, Op::Read, 8 * BLOCK as u64, BLOCK as u64),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        validate(&info, Op::Read, u64::MAX - 10, BLOCK as u64),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        validate(&info, Op::Read, 512, BLOCK as u64),
        Err(BlockError::Misaligned { .. })
    ));
    assert!(matches!(
        validate(&info, Op::Write { fua: false }, 0, BLOCK as u64),
        Err(BlockError::ReadOnly)
    ));
    assert!(matches!(
        validate(&info, Op::Discard, 0, BLOCK as u64),
        Err(BlockError::ReadOnly)
    ));
    assert!(validate(&info, Op::Flush, 0, 0).is_ok());
    assert!(matches!(
        write_at(&ro, 0, &[0u8; BLOCK], false),
        Err(BlockError::ReadOnly)
    ));
    assert_eq!(BlockError::ReadOnly.errno(), libc::EROFS);
    // The file is unchanged.
    assert_eq!(read_block(&ro, 0), pattern(1, 0));
    // A file smaller than a block cannot be a device.
    let tiny = dir.path().join("tiny");
    fs::write(&tiny, b"abc").unwrap();
    assert!(matches!(
        RawTarget::open(&tiny, &RawOptions::default()),
        Err(BlockError::BadBacking { .. })
    ));
}

#[test]
fn overlay_reads_the_base_until_written_and_never_writes_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = base_file(dir.path(), 64);
    let before = fs::read(&base_path).unwrap();
    let overlay_path = dir.path().join("overlay");
    let (overlay, recovery) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions {
            size: Some(128 * BLOCK as u64),
        },
    )
    .unwrap();
    assert_eq!(recovery, OverlayRecovery::Created);
    assert_eq!(
        overlay.info().size,
        128 * BLOCK as u64,
        "the overlay can be larger than its base"
    );
    assert_eq!(read_block(&overlay, 3), pattern(1, 3));
    assert_eq!(
        read_block(&overlay, 100),
        vec![0u8; BLOCK],
        "past the base reads zeros"
    );
    // A write spanning written and unwritten clusters, then an overwrite in place.
    write_at(&overlay, 4 * BLOCK as u64, &pattern(3, 4), false).unwrap();
    let span: Vec<u8> = (3..7).flat_map(|b| pattern(4, b)).collect();
    write_at(&overlay, 3 * BLOCK as u64, &span, false).unwrap();
    for b in 3..7 {
        assert_eq!(read_block(&overlay, b), pattern(4, b));
    }
    assert_eq!(read_block(&overlay, 7), pattern(1, 7));
    write_at(&overlay, 100 * BLOCK as u64, &pattern(4, 100), false).unwrap();
    assert_eq!(read_block(&overlay, 100), pattern(4, 100));
    write_zeroes_at(&overlay, 10 * BLOCK as u64, 2 * BLOCK as u64).unwrap();
    discard_at(&overlay, 4 * BLOCK as u64, BLOCK as u64).unwrap();
    assert_eq!(
        read_block(&overlay, 10),
        vec![0u8; BLOCK],
        "write-zeroes hides the base"
    );
    assert_eq!(
        read_block(&overlay, 4),
        vec![0u8; BLOCK],
        "a discarded cluster reads zeros, not the base"
    );
    assert_eq!(read_block(&overlay, 5), pattern(4, 5));
    overlay.flush().unwrap();
    drop(overlay);
    assert_eq!(
        fs::read(&base_path).unwrap(),
        before,
        "the base is never written"
    );
    // Reopened after a clean close: everything is there.
    let (overlay, recovery) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    assert_eq!(recovery, OverlayRecovery::Clean);
    assert_eq!(read_block(&overlay, 6), pattern(4, 6));
    assert_eq!(read_block(&overlay, 11), vec![0u8; BLOCK]);
    assert_eq!(read_block(&overlay, 100), pattern(4, 100));
    assert_eq!(read_block(&overlay, 12), pattern(1, 12));
}

#[test]
fn overlay_keeps_every_completed_write_when_the_process_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = base_file(dir.path(), 64);
    let overlay_path = dir.path().join("overlay");
    let (overlay, _) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    write_at(&overlay, 0, &pattern(5, 0), false).unwrap();
    overlay.flush().unwrap();
    for b in 1..20 {
        write_at(&overlay, b * BLOCK as u64, &pattern(5, b), false).unwrap();
    }
    write_zeroes_at(&overlay, 30 * BLOCK as u64, BLOCK as u64).unwrap();
    // No flush: killed.
    overlay.abandon_as_if_killed();
    let (overlay, recovery) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    assert_eq!(recovery, OverlayRecovery::AfterProcessCrash);
    for b in 0..20 {
        assert_eq!(read_block(&overlay, b), pattern(5, b), "block {b}");
    }
    assert_eq!(read_block(&overlay, 30), vec![0u8; BLOCK]);
    assert_eq!(read_block(&overlay, 31), pattern(1, 31));
    // Recovery committed the live map: a machine crash now loses nothing either.
    overlay.abandon_as_if_killed();
    OverlayTarget::mark_used_in_another_boot(&overlay_path).unwrap();
    let (overlay, recovery) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    assert_eq!(recovery, OverlayRecovery::AfterMachineCrash);
    for b in 0..20 {
        assert_eq!(
            read_block(&overlay, b),
            pattern(5, b),
            "block {b} after the machine crash"
        );
    }
}

#[test]
fn after_a_machine_crash_unflushed_writes_read_old_data_never_zeros_or_other_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = base_file(dir.path(), 64);
    let overlay_path = dir.path().join("overlay");
    let (overlay, _) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    // Flushed: blocks 0..8 hold generation 6.
    let data: Vec<u8> = (0..8).flat_map(|b| pattern(6, b)).collect();
    write_at(&overlay, 0, &data, false).unwrap();
    overlay.flush().unwrap();
    // Not flushed: block 0 discarded (its slot freed), new blocks 40..48 written (they may
    // take freed slots only after a commit), block 1 rewritten in place.
    discard_at(&overlay, 0, BLOCK as u64).unwrap();
    let fresh: Vec<u8> = (40..48).flat_map(|b| pattern(7, b)).collect();
    write_at(&overlay, 40 * BLOCK as u64, &fresh, false).unwrap();
    write_at(&overlay, 50 * BLOCK as u64, &pattern(7, 50), false).unwrap();
    write_at(&overlay, BLOCK as u64, &pattern(7, 1), false).unwrap();
    overlay.abandon_as_if_killed();
    // The live map may have hit the disk before its data: simulate the worst, garbage in it.
    let garbage = vec![0xabu8; 4096];
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&overlay_path)
        .unwrap();
    let live_map_start = 4096 + (64 * 8u64).div_ceil(4096) * 4096;
    file.write_all_at(&garbage, live_map_start).unwrap();
    drop(file);
    OverlayTarget::mark_used_in_another_boot(&overlay_path).unwrap();
    let (overlay, recovery) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    assert_eq!(recovery, OverlayRecovery::AfterMachineCrash);
    // Block 0: the flushed data, or zeros only because the guest discarded it.
    let b0 = read_block(&overlay, 0);
    assert!(
        b0 == pattern(6, 0) || b0 == vec![0u8; BLOCK],
        "block 0 is neither its data nor discarded"
    );
    // Block 1 was rewritten in place: old or new, nothing else.
    let b1 = read_block(&overlay, 1);
    assert!(b1 == pattern(6, 1) || b1 == pattern(7, 1));
    for b in 2..8 {
        assert_eq!(read_block(&overlay, b), pattern(6, b), "flushed block {b}");
    }
    for b in (40..48).chain([50]) {
        assert_eq!(
            read_block(&overlay, b),
            pattern(1, b),
            "unflushed new block {b} falls back to the base"
        );
    }
    // The overlay works on: write, flush, reopen.
    write_at(&overlay, 40 * BLOCK as u64, &pattern(8, 40), false).unwrap();
    drop(overlay);
    let (overlay, recovery) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    assert_eq!(recovery, OverlayRecovery::Clean);
    assert_eq!(read_block(&overlay, 40), pattern(8, 40));
    assert_eq!(read_block(&overlay, 3), pattern(6, 3));
}

#[test]
fn a_freed_slot_is_not_reused_before_a_commit_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = base_file(dir.path(), 16);
    let overlay_path = dir.path().join("overlay");
    let (overlay, _) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    write_at(&overlay, 0, &pattern(9, 0), false).unwrap();
    overlay.flush().unwrap();
    write_zeroes_at(&overlay, 0, BLOCK as u64).unwrap();
    // Without a commit in between, this must not land in block 0's old slot.
    write_at(&overlay, 5 * BLOCK as u64, &pattern(9, 5), false).unwrap();
    overlay.abandon_as_if_killed();
    OverlayTarget::mark_used_in_another_boot(&overlay_path).unwrap();
    let (overlay, _) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    let b0 = read_block(&overlay, 0);
    assert_ne!(b0, pattern(9, 5), "block 0 shows block 5's data");
    assert!(b0 == pattern(9, 0) || b0 == vec![0u8; BLOCK]);
}

#[test]
fn overlays_refuse_the_wrong_base_a_second_user_and_a_damaged_header() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = base_file(dir.path(), 16);
    let other_path = dir.path().join("other.img");
    fs::write(&other_path, vec![0u8; 32 * BLOCK]).unwrap();
    let overlay_path = dir.path().join("overlay");
    let (overlay, _) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    assert!(matches!(
        OverlayTarget::open(
            &overlay_path,
            raw_base(&base_path),
            &OverlayOptions::default()
        ),
        Err(BlockError::OverlayBusy { .. })
    ));
    drop(overlay);
    let err = OverlayTarget::open(
        &overlay_path,
        raw_base(&other_path),
        &OverlayOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, BlockError::OverlayBaseMismatch { .. }),
        "{err}"
    );
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&overlay_path)
        .unwrap();
    file.write_all_at(&[0x55u8; 1024], 0).unwrap();
    drop(file);
    let err = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no valid header"), "{err}");
    // Not an overlay at all.
    let err = OverlayTarget::open(
        &base_path,
        raw_base(&other_path),
        &OverlayOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, BlockError::InvalidOverlay { .. }), "{err}");
}

#[test]
fn concurrent_writers_and_flushes_keep_every_block_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = base_file(dir.path(), 256);
    let overlay_path = dir.path().join("overlay");
    let (overlay, _) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    let overlay = Arc::new(overlay);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let overlay = overlay.clone();
            std::thread::spawn(move || {
                // Thread t owns blocks b with b % 4 == t; it writes each several times.
                for round in 0..5u8 {
                    for b in (t..256).step_by(4) {
                        write_at(&*overlay, b * BLOCK as u64, &pattern(10 + round, b), false)
                            .unwrap();
                        if b % 37 == 0 {
                            overlay.flush().unwrap();
                        }
                        if b % 11 == 0 {
                            discard_at(&*overlay, b * BLOCK as u64, BLOCK as u64).unwrap();
                            write_at(&*overlay, b * BLOCK as u64, &pattern(10 + round, b), false)
                                .unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for b in 0..256 {
        assert_eq!(read_block(&*overlay, b), pattern(14, b), "block {b}");
    }
    let overlay = Arc::try_unwrap(overlay).unwrap();
    overlay.abandon_as_if_killed();
    let (overlay, _) = OverlayTarget::open(
        &overlay_path,
        raw_base(&base_path),
        &OverlayOptions::default(),
    )
    .unwrap();
    for b in 0..256 {
        assert_eq!(
            read_block(&overlay, b),
            pattern(14, b),
            "block {b} after a kill"
        );
    }
    // Freed slots were reused: the data area did not grow to 5 × 256 clusters.
    let len = fs::metadata(&overlay_path).unwrap().len();
    assert!(
        len < (1 << 20) + 600 * BLOCK as u64,
        "overlay grew to {len} bytes"
    );
}

/// Stores `data` as a chunked, digested blob under `dir/blobs` and returns its manifest.
fn store_blob(dir: &Path, data: &[u8], chunk_size: u32) -> Manifest {
    let blob_id = blake3::hash(data).to_hex().to_string();
    fs::create_dir_all(dir.join("blobs")).unwrap();
    fs::write(dir.join("blobs").join(&blob_id), data).unwrap();
    let chunks = data
        .chunks(chunk_size as usize)
        .enumerate()
        .map(|(i, c)| ChunkEntry {
            digest: blake3::hash(c).to_hex().to_string(),
            offset: (i * chunk_size as usize) as u64,
            stored_size: c.len() as u64,
        })
        .collect();
    Manifest {
        version: 1,
        blob_id: blob_id.clone(),
        blob_size: data.len() as u64,
        chunk_size,
        compression: Compression::None,
        object: format!("blobs/{blob_id}"),
        bootstrap: "disk.img".into(),
        bootstrap_digest: None,
        chunks,
        prefetch: Vec::new(),
    }
}

#[test]
fn an_image_fetches_only_the_chunks_read_and_an_overlay_makes_it_writable() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 256u64; // 1 MiB in 64 KiB chunks
    let data: Vec<u8> = (0..blocks).flat_map(|b| pattern(1, b)).collect();
    let manifest = store_blob(&dir.path().join("store"), &data, 64 << 10);
    let mut config = CacheConfig::new(dir.path().join("cache"));
    config.readahead_max_bytes = 0;
    config.merge_min_bytes = 0;
    let engine = CacheEngine::new(
        config,
        Arc::new(LocalDirBackend::new(dir.path().join("store"))),
    )
    .unwrap();
    let image = Arc::new(ImageTarget::new(engine.open_blob(&manifest).unwrap(), 4096));
    assert!(image.info().read_only);
    assert_eq!(read_block(&*image, 20), pattern(1, 20));
    assert_eq!(
        engine.ready_chunks(&manifest.blob_id).unwrap(),
        1,
        "one 64 KiB chunk fetched"
    );
    assert_eq!(read_block(&*image, 21), pattern(1, 21));
    assert_eq!(image.hits_and_misses(), (1, 1));
    assert!(matches!(
        write_at(&*image, 0, &[0u8; BLOCK], false),
        Err(BlockError::ReadOnly)
    ));
    let overlay_path = dir.path().join("overlay");
    let (overlay, _) =
        OverlayTarget::open(&overlay_path, image.clone(), &OverlayOptions::default()).unwrap();
    write_at(&overlay, 100 * BLOCK as u64, &pattern(2, 100), true).unwrap();
    assert_eq!(read_block(&overlay, 100), pattern(2, 100));
    assert_eq!(read_block(&overlay, 101), pattern(1, 101));
    assert_eq!(
        engine.ready_chunks(&manifest.blob_id).unwrap(),
        2,
        "a write to the overlay fetches nothing"
    );
    let text: String = overlay
        .counters()
        .iter()
        .map(|(name, _, v)| format!("{name} {v}\n"))
        .collect();
    assert!(text.contains("berth_block_cache_misses_total 2"), "{text}");
    assert!(text.contains("berth_block_overlay_clusters 1"), "{text}");
    // Folding the overlay and its base into one file.
    let out = dir.path().join("folded.img");
    export_to_file(&overlay, &out).unwrap();
    let folded = fs::read(&out).unwrap();
    assert_eq!(folded.len(), data.len());
    assert_eq!(&folded[100 * BLOCK..101 * BLOCK], &pattern(2, 100)[..]);
    assert_eq!(&folded[..100 * BLOCK], &data[..100 * BLOCK]);
    assert_eq!(&folded[101 * BLOCK..], &data[101 * BLOCK..]);
    // An overlay made for this image refuses another one.
    drop(overlay);
    let other = store_blob(&dir.path().join("store"), &vec![7u8; data.len()], 64 << 10);
    let other_image = Arc::new(ImageTarget::new(engine.open_blob(&other).unwrap(), 4096));
    let err =
        OverlayTarget::open(&overlay_path, other_image, &OverlayOptions::default()).unwrap_err();
    assert!(
        matches!(err, BlockError::OverlayBaseMismatch { .. }),
        "{err}"
    );
}

#[test]
fn an_image_whose_backend_lost_the_blob_fails_reads_instead_of_returning_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..64u64).flat_map(|b| pattern(3, b)).collect();
    let manifest = store_blob(&dir.path().join("store"), &data, 64 << 10);
    let mut config = CacheConfig::new(dir.path().join("cache"));
    config.fetch_attempts = 1;
    let engine = CacheEngine::new(
        config,
        Arc::new(LocalDirBackend::new(dir.path().join("store"))),
    )
    .unwrap();
    let image = ImageTarget::new(engine.open_blob(&manifest).unwrap(), 4096);
    fs::remove_file(dir.path().join("store").join(&manifest.object)).unwrap();
    let mut buf = vec![0xffu8; BLOCK];
    let err = read_at(&image, 0, &mut buf).unwrap_err();
    assert!(matches!(err, BlockError::Cache(_)), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(image.hits_and_misses(), (0, 1));
}

/// A raw file served by a target that moves data the moment a read's pin is dropped
/// (overwrites the mapped bytes with 0xee, as a volume retiring a log segment would) and
/// whose FLUSH and FUA finish on another thread after a delay.
struct MovingTarget {
    inner: RawTarget,
    flushes: Arc<std::sync::atomic::AtomicU64>,
    fail_flush: bool,
}

struct MoveOnRelease {
    file: fs::File,
    offset: u64,
    len: usize,
}

impl Drop for MoveOnRelease {
    fn drop(&mut self) {
        self.file
            .write_all_at(&vec![0xee; self.len], self.offset)
            .unwrap();
    }
}

impl MovingTarget {
    fn finish_later(&self) -> berth_blockdev::Progress {
        let completion = berth_blockdev::Completion::new().unwrap();
        let (done, flushes, fail) = (completion.clone(), self.flushes.clone(), self.fail_flush);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            flushes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            done.complete(if fail {
                Err(BlockError::Unsupported("flushing to nowhere"))
            } else {
                Ok(())
            });
        });
        berth_blockdev::Progress::Pending(completion)
    }
}

impl BlockTarget for MovingTarget {
    fn info(&self) -> &berth_blockdev::TargetInfo {
        self.inner.info()
    }
    fn map_read(
        &self,
        _: u64,
        _: u64,
        _: &mut Vec<berth_blockdev::Extent>,
    ) -> berth_blockdev::Result<()> {
        Err(BlockError::Unsupported("unpinned reads"))
    }
    fn map_read_pinned(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<berth_blockdev::Extent>,
    ) -> berth_blockdev::Result<berth_blockdev::ReadPin> {
        self.inner.map_read(offset, len, out)?;
        Ok(berth_blockdev::ReadPin::new(MoveOnRelease {
            file: self.inner.file().try_clone().unwrap(),
            offset,
            len: len as usize,
        }))
    }
    fn map_write(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<berth_blockdev::Extent>,
    ) -> berth_blockdev::Result<berth_blockdev::WriteTicket> {
        self.inner.map_write(offset, len, out)
    }
    fn finish_write(
        &self,
        _: berth_blockdev::WriteTicket,
        _: bool,
        _: bool,
    ) -> berth_blockdev::Result<()> {
        Err(BlockError::Unsupported("settling writes on the spot"))
    }
    fn start_finish_write(
        &self,
        _ticket: berth_blockdev::WriteTicket,
        _written: bool,
        _fua: bool,
    ) -> berth_blockdev::Progress {
        self.finish_later()
    }
    fn flush(&self) -> berth_blockdev::Result<()> {
        Err(BlockError::Unsupported("flushing on the spot"))
    }
    fn start_flush(&self) -> berth_blockdev::Progress {
        self.finish_later()
    }
    fn discard(&self, offset: u64, len: u64) -> berth_blockdev::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> berth_blockdev::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

#[test]
fn reads_hold_their_pin_until_the_data_moved_and_pending_flushes_are_awaited() {
    let dir = tempfile::tempdir().unwrap();
    let path = base_file(dir.path(), 16);
    let flushes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let target = MovingTarget {
        inner: RawTarget::open(&path, &RawOptions::default()).unwrap(),
        flushes: flushes.clone(),
        fail_flush: false,
    };
    // The data is read before the pin goes (after it, the bytes would be 0xee).
    assert_eq!(read_block(&target, 3), pattern(1, 3));
    let mut after = vec![0u8; BLOCK];
    fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut after, 3 * BLOCK as u64)
        .unwrap();
    assert_eq!(
        after,
        vec![0xee; BLOCK],
        "the pin was released after the read"
    );
    // Writes and flushes wait for the other thread's answer.
    write_at(&target, 5 * BLOCK as u64, &pattern(9, 5), true).unwrap();
    assert_eq!(flushes.load(std::sync::atomic::Ordering::SeqCst), 1);
    berth_blockdev::target::flush(&target).unwrap();
    assert_eq!(flushes.load(std::sync::atomic::Ordering::SeqCst), 2);
    let failing = MovingTarget {
        fail_flush: true,
        ..target
    };
    let err = berth_blockdev::target::flush(&failing).unwrap_err();
    assert!(matches!(err, BlockError::Unsupported(_)), "{err}");
    // A completion is finished once; its fd is readable afterwards.
    let completion = berth_blockdev::Completion::new().unwrap();
    assert!(!completion.is_complete());
    completion.complete(Ok(()));
    completion.complete(Err(BlockError::ReadOnly));
    let mut counter = [0u8; 8];
    // SAFETY (test): reads 8 bytes into `counter` from the completion's eventfd.
    let n = unsafe { libc::read(completion.raw_fd(), counter.as_mut_ptr().cast(), 8) };
    assert_eq!(n, 8);
    assert!(
        completion.take().unwrap().is_ok(),
        "the first outcome counts"
    );
    assert!(completion.take().is_none());
}

/// A local store whose reads wait until the test opens the gate.
#[derive(Debug)]
struct GatedBackend {
    inner: LocalDirBackend,
    open: Mutex<bool>,
    opened: Condvar,
}

impl GatedBackend {
    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl BlobBackend for GatedBackend {
    fn read_range(&self, name: &str, range: std::ops::Range<u64>) -> berth_cache::Result<Vec<u8>> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        self.inner.read_range(name, range)
    }
    fn size(&self, name: &str) -> berth_cache::Result<u64> {
        self.inner.size(name)
    }
    fn put_file(&self, name: &str, path: &Path) -> berth_cache::Result<()> {
        self.inner.put_file(name, path)
    }
    fn put_bytes(&self, name: &str, data: &[u8]) -> berth_cache::Result<()> {
        self.inner.put_bytes(name, data)
    }
    fn describe(&self) -> String {
        "gated".into()
    }
}

#[test]
fn start_read_hands_missing_chunks_to_the_fetch_threads_and_finishes_when_they_land() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..64u64).flat_map(|b| pattern(4, b)).collect();
    let manifest = store_blob(&dir.path().join("store"), &data, 64 << 10);
    let mut config = CacheConfig::new(dir.path().join("cache"));
    config.readahead_max_bytes = 0;
    config.merge_min_bytes = 0;
    let backend = Arc::new(GatedBackend {
        inner: LocalDirBackend::new(dir.path().join("store")),
        open: Mutex::new(false),
        opened: Condvar::new(),
    });
    let engine = CacheEngine::new(config, backend.clone()).unwrap();
    let image: Arc<ImageTarget> =
        Arc::new(ImageTarget::new(engine.open_blob(&manifest).unwrap(), 4096));
    let overlay_path = dir.path().join("overlay");
    let (overlay, _) =
        OverlayTarget::open(&overlay_path, image.clone(), &OverlayOptions::default()).unwrap();
    // Blocks 0-3 through the overlay (unwritten: its base's) and 20 of the image, in two
    // chunks, both waiting for the gate.
    let low = overlay.start_read(0, 4 * BLOCK as u64);
    let high = image.start_read(20 * BLOCK as u64, BLOCK as u64);
    let (Progress::Pending(low), Progress::Pending(high)) = (low, high) else {
        panic!("reads of missing chunks did not wait for the fetch threads");
    };
    let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for completion in [&low, &high] {
        let woken = woken.clone();
        completion.on_complete(Arc::new(move || {
            woken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !low.is_complete() && !high.is_complete(),
        "finished before the data came"
    );
    assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 0);
    backend.open_gate();
    low.wait().unwrap();
    high.wait().unwrap();
    assert_eq!(
        woken.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "each waker runs once"
    );
    // Present now: the reads are served without another fetch.
    assert!(matches!(
        image.start_read(20 * BLOCK as u64, BLOCK as u64),
        Progress::Done(Ok(()))
    ));
    assert_eq!(read_block(&overlay, 3), pattern(4, 3));
    assert_eq!(read_block(&*image, 20), pattern(4, 20));
    assert_eq!(engine.ready_chunks(&manifest.blob_id).unwrap(), 2);
    assert_eq!(
        image.hits_and_misses(),
        (3, 2),
        "two reads waited; the three after them found their chunks"
    );
    // A completion that already finished wakes at once.
    let late = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = late.clone();
    high.on_complete(Arc::new(move || {
        flag.store(true, std::sync::atomic::Ordering::SeqCst)
    }));
    assert!(late.load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn a_completion_of_many_finishes_with_the_last_and_carries_the_first_error() {
    let parts: Vec<_> = (0..3).map(|_| Completion::new().unwrap()).collect();
    let all = Completion::all_of(parts.clone()).unwrap();
    parts[1].complete(Err(BlockError::ReadOnly));
    parts[0].complete(Ok(()));
    assert!(!all.is_complete());
    parts[2].complete(Err(BlockError::Unsupported("discard")));
    assert!(matches!(all.wait(), Err(BlockError::ReadOnly)));
    assert!(matches!(
        Completion::all_of(Vec::new()).unwrap().wait(),
        Ok(())
    ));
}
