//! A volume in a directory bucket (`file://`), driven through its block target the way
//! a transport drives it: data read back against an in-memory model while uploads and
//! log rotations run, crashes (a child process that aborts after FLUSH), lease
//! exclusion, object durability, the local disk lost, snapshots, clones and GC.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_blockdev::target::{flush, read_at, write_at, write_zeroes_at};
use berth_testkit::{fork_guard, pseudo_random, spawn_guarded, xorshift};
use berth_volume::admin::{self, CreateOptions};
use berth_volume::{Durability, Location, OpenReport, Volume, VolumeError, VolumeOptions};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Opens a volume under the fork guard: a crash child forked by another test at that moment
/// would otherwise still hold the local-state lock of a volume this test has closed.
fn open_volume(
    location: &Location,
    options: VolumeOptions,
) -> Result<(Volume, OpenReport), VolumeError> {
    let _guard = fork_guard();
    Volume::open(location, options)
}

fn create(bucket: &Path, name: &str) -> Location {
    let location = Location::parse(&format!("file://{}/{name}", bucket.display())).unwrap();
    let options = CreateOptions {
        size: Some(SIZE),
        ..CreateOptions::default()
    };
    admin::create(&location, &options, None).unwrap();
    location
}

/// Small segments and packs and a short upload interval: rotations and uploads all
/// the time.
fn busy_options(cache_dir: &Path) -> VolumeOptions {
    VolumeOptions {
        cache_dir: cache_dir.to_path_buf(),
        segment_bytes: 256 << 10,
        pack_bytes: 512 << 10,
        upload_interval: Duration::from_millis(5),
        gc_interval: None,
        gc_after_released_bytes: None,
        lease_ttl: Duration::from_secs(30),
        open_timeout: Duration::from_secs(10),
        fetch_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(30),
        flush_timeout: Duration::from_secs(10),
        ..VolumeOptions::default()
    }
}

/// Nothing goes to the bucket on its own (only on close or an `object` FLUSH).
fn lazy_options(cache_dir: &Path) -> VolumeOptions {
    VolumeOptions {
        upload_interval: Duration::from_secs(3600),
        segment_bytes: 4 * MIB,
        pack_bytes: 32 * MIB,
        ..busy_options(cache_dir)
    }
}

fn read(volume: &Volume, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0x5a; len];
    read_at(volume, offset, &mut buf).unwrap();
    buf
}

fn assert_same(volume: &Volume, model: &[u8], what: &str) {
    let got = read(volume, 0, model.len());
    if let Some(at) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {at} (block {}) reads {:#x}, expected {:#x}",
            at / 4096,
            got[at],
            model[at]
        );
    }
}

/// Random writes, zeroings and flushes against a model; every write is read back at
/// once and the whole volume now and then, while the uploader packs, rotates segments
/// and applies batches underneath; a second thread keeps reading a region written once
/// and must never see anything else (zeros after a rotation were glidefs's bug). Then
/// the volume is closed, its local state thrown away, and it must read the same from
/// the bucket alone.
#[test]
fn reads_return_the_latest_write_through_uploads_and_rotations_and_from_the_bucket_alone() {
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"), "vol");
    let (volume, report) =
        open_volume(&location, busy_options(&dir.path().join("cache-a"))).unwrap();
    assert_eq!(report.replayed, 0);
    let volume = Arc::new(volume);
    let mut model = vec![0u8; SIZE as usize];

    // A stable region the reader thread checks throughout.
    let stable = pseudo_random(7, (2 * MIB) as usize);
    // In pieces: a write must fit in one log segment.
    for (i, piece) in stable.chunks(128 << 10).enumerate() {
        write_at(&*volume, 14 * MIB + (i as u64) * (128 << 10), piece, false).unwrap();
    }
    model[(14 * MIB) as usize..].copy_from_slice(&stable);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (volume, stop, stable) = (volume.clone(), stop.clone(), stable.clone());
        std::thread::spawn(move || {
            let mut passes = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let got = read(&volume, 14 * MIB, stable.len());
                assert!(got == stable, "the stable region changed on pass {passes}");
                passes += 1;
            }
            passes
        })
    };

    let start_version = volume.manifest_version();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for step in 0..1500u64 {
        let block = xorshift(&mut state) % (14 * MIB / 4096);
        let blocks = 1 + xorshift(&mut state) % 16.min(14 * MIB / 4096 - block);
        let (offset, len) = (block * 4096, (blocks * 4096) as usize);
        match xorshift(&mut state) % 10 {
            0 => {
                write_zeroes_at(&*volume, offset, len as u64).unwrap();
                model[offset as usize..offset as usize + len].fill(0);
            }
            1 => flush(&*volume).unwrap(),
            _ => {
                let data = pseudo_random(step, len);
                write_at(
                    &*volume,
                    offset,
                    &data,
                    xorshift(&mut state).is_multiple_of(7),
                )
                .unwrap();
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
        }
        let got = read(&volume, offset, len);
        assert!(
            got == model[offset as usize..offset as usize + len],
            "step {step}: the blocks just written read back wrong"
        );
        if step % 250 == 0 {
            assert_same(&volume, &model, &format!("step {step}"));
        }
    }
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    // In the bucket now; the log records go once the batch is applied to the cache.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while volume.dirty_bytes() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        volume.dirty_bytes(),
        0,
        "uploaded records are dropped from the log"
    );
    assert!(
        volume.manifest_version() > start_version + 5,
        "uploads ran during the test (manifest {} from {start_version})",
        volume.manifest_version()
    );
    assert_same(&volume, &model, "after the upload");
    stop.store(true, Ordering::SeqCst);
    let passes = reader.join().unwrap();
    assert!(passes > 0);
    volume.close().unwrap();
    drop(volume);

    // The local disk is lost: everything comes from the bucket.
    let (volume, report) =
        open_volume(&location, busy_options(&dir.path().join("cache-b"))).unwrap();
    assert_eq!(report.replayed, 0);
    assert_same(&volume, &model, "reopened from the bucket alone");
}

/// The child half of the crash tests: writes, FLUSHes and aborts (no drop, no close,
/// nothing uploaded by the volume on its way out).
#[test]
#[ignore = "the crash tests run it as their child process"]
fn crash_child() {
    let Ok(spec) = std::env::var("BERTH_VOLUME_CRASH_CHILD") else {
        return;
    };
    let (location, cache, durability) = {
        let mut parts = spec.split('|');
        let location = Location::parse(parts.next().unwrap()).unwrap();
        let cache = std::path::PathBuf::from(parts.next().unwrap());
        let durability = Durability::from_name(parts.next().unwrap()).unwrap();
        (location, cache, durability)
    };
    let options = VolumeOptions {
        durability,
        ..lazy_options(&cache)
    };
    let (volume, _) = open_volume(&location, options).unwrap();
    let version = volume.manifest_version();
    for i in 0..64u64 {
        write_at(&volume, i * 64 * 1024, &pseudo_random(i, 64 * 1024), false).unwrap();
    }
    // Written but never flushed: may or may not survive, must not be torn into zeros
    // of other blocks (not asserted: the parent only checks what was acknowledged).
    flush(&volume).unwrap();
    match durability {
        Durability::Local => assert_eq!(volume.manifest_version(), version, "nothing was uploaded"),
        Durability::Object => assert!(
            volume.manifest_version() > version,
            "the FLUSH waited for a manifest version in the bucket"
        ),
    }
    std::process::abort();
}

fn run_crash_child(location: &Location, cache: &Path, durability: Durability) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "BERTH_VOLUME_CRASH_CHILD",
            format!("{location}|{}|{}", cache.display(), durability.name()),
        );
    let status = spawn_guarded(&mut command).unwrap().wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGABRT),
        "the child should have aborted after its FLUSH: {status}"
    );
}

fn assert_crash_data(volume: &Volume) {
    for i in 0..64u64 {
        assert!(
            read(volume, i * 64 * 1024, 64 * 1024) == pseudo_random(i, 64 * 1024),
            "the flushed write {i} is lost or wrong"
        );
    }
}

/// `--durability local`: a FLUSHed write is in the local log only. After the writer
/// dies, another host cannot take the volume (its lease holds), and the same host
/// replays the log and finds every flushed write.
#[test]
fn after_a_crash_the_log_is_replayed_and_the_lease_keeps_other_hosts_out() {
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"), "vol");
    let cache = dir.path().join("cache");
    run_crash_child(&location, &cache, Durability::Local);

    let other_host = open_volume(&location, lazy_options(&dir.path().join("other")));
    match other_host {
        Err(VolumeError::Leased { .. }) => {}
        other => panic!("a second writer must be refused by the lease, got {other:?}"),
    }

    let (volume, report) = open_volume(&location, lazy_options(&cache)).unwrap();
    assert!(
        report.replayed >= 64,
        "replayed {} records",
        report.replayed
    );
    assert_crash_data(&volume);
    // And the replayed records reach the bucket.
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    volume.close().unwrap();
    let (volume, _) = open_volume(&location, lazy_options(&dir.path().join("other"))).unwrap();
    assert_crash_data(&volume);
}

/// `--durability object`: a finished FLUSH means the bucket has the data, so losing
/// the host entirely loses nothing once its lease is broken.
#[test]
fn an_object_flush_survives_losing_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"), "vol");
    let cache = dir.path().join("lost-host");
    run_crash_child(&location, &cache, Durability::Object);
    std::fs::remove_dir_all(&cache).unwrap();

    assert!(matches!(
        open_volume(&location, lazy_options(&dir.path().join("new-host"))),
        Err(VolumeError::Leased { .. })
    ));
    let broken = admin::break_lease(&location).unwrap();
    assert!(broken.is_some(), "there was a lease to break");
    let (volume, _) = open_volume(&location, lazy_options(&dir.path().join("new-host"))).unwrap();
    assert_crash_data(&volume);
}

/// Overwritten data's packs are collected, the snapshot's packs are kept, and both the
/// volume and a clone of the snapshot read correctly afterwards from the bucket alone.
#[test]
fn gc_deletes_only_packs_nothing_uses() {
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"), "vol");
    let first = pseudo_random(1, (4 * MIB) as usize);
    let second = pseudo_random(2, (4 * MIB) as usize);
    let third = pseudo_random(3, (4 * MIB) as usize);
    {
        let (volume, _) = open_volume(&location, lazy_options(&dir.path().join("c1"))).unwrap();
        write_at(&volume, 0, &first, false).unwrap();
        volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
        volume.close().unwrap();
    }
    admin::snapshot(&location, "base").unwrap();
    {
        let (volume, _) = open_volume(&location, lazy_options(&dir.path().join("c1"))).unwrap();
        write_at(&volume, 0, &second, false).unwrap();
        volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
        write_at(&volume, 0, &third, false).unwrap();
        volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
        volume.close().unwrap();
    }
    // No grace for packs: the overwritten pack goes at once, by reference alone.
    let report = admin::gc(&location, Duration::from_secs(3600), false).unwrap();
    assert!(
        report.packs_deleted >= 1,
        "the pack of the overwritten second write is garbage: {report:?}"
    );
    let again = admin::gc(&location, Duration::ZERO, false).unwrap();
    assert_eq!(
        again.packs_deleted, 0,
        "a second pass finds nothing more: {again:?}"
    );

    let (volume, _) = open_volume(&location, lazy_options(&dir.path().join("c2"))).unwrap();
    assert!(
        read(&volume, 0, third.len()) == third,
        "the volume lost live data to GC"
    );
    volume.close().unwrap();

    let clone = location.sibling("clone");
    admin::clone_volume(&location, "base", &clone).unwrap();
    let (volume, _) = open_volume(&clone, lazy_options(&dir.path().join("c3"))).unwrap();
    assert!(
        read(&volume, 0, first.len()) == first,
        "the snapshot lost its packs to GC"
    );
}

/// A transport's first look at a read: data in the log or the cache is mapped at once, in
/// one look (a hit); data only in the bucket is handed to the fetch threads (a miss) and
/// mapped once its completion finishes, without another fetch.
#[test]
fn a_read_is_mapped_at_first_look_when_local_and_fetched_when_only_in_the_bucket() {
    use berth_blockdev::{BlockTarget, ReadMapping, Source};
    use std::os::unix::fs::FileExt;

    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"), "vol");
    let data = pseudo_random(7, 256 << 10);
    {
        let (volume, _) = open_volume(&location, lazy_options(&dir.path().join("a"))).unwrap();
        write_at(&volume, 0, &data, false).unwrap();
        volume.close().unwrap();
    }
    let (volume, _) = open_volume(&location, lazy_options(&dir.path().join("b"))).unwrap();
    let counts = |v: &Volume| {
        let m = v.metrics();
        (
            m.read_hits.load(Ordering::Relaxed),
            m.read_misses.load(Ordering::Relaxed),
        )
    };
    let read_mapped = |extents: &[berth_blockdev::Extent]| {
        let mut got = Vec::new();
        for extent in extents {
            let mut piece = vec![0u8; extent.len as usize];
            match extent.source {
                Source::Zero => {}
                Source::File { fd, offset } => {
                    use std::os::fd::BorrowedFd;
                    // SAFETY: the volume keeps the descriptor open while its pin is held.
                    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                    let file = std::fs::File::from(fd.try_clone_to_owned().unwrap());
                    file.read_exact_at(&mut piece, offset).unwrap();
                }
            }
            got.extend_from_slice(&piece);
        }
        got
    };

    let (offset, len) = (64 << 10, 64 << 10);
    let mut extents = Vec::new();
    let completion = match volume.map_read_or_fetch(offset, len, &mut extents).unwrap() {
        ReadMapping::Fetching(completion) => completion,
        ReadMapping::Mapped(_) => panic!("a read of blocks only in the bucket was mapped"),
    };
    assert!(extents.is_empty(), "a read being fetched maps nothing");
    assert_eq!(counts(&volume), (0, 1));
    completion.wait().unwrap();
    let pin = match volume.map_read_or_fetch(offset, len, &mut extents).unwrap() {
        ReadMapping::Mapped(pin) => pin,
        ReadMapping::Fetching(_) => panic!("fetched blocks were fetched again"),
    };
    assert_eq!(
        read_mapped(&extents),
        data[offset as usize..(offset + len) as usize],
        "the mapping holds the bucket's data"
    );
    drop(pin);
    assert_eq!(counts(&volume), (1, 1), "the second look is a hit");

    // Written here: in the log, mapped at the first look.
    let fresh = pseudo_random(8, 8192);
    write_at(&volume, 200 << 10, &fresh, false).unwrap();
    extents.clear();
    let ReadMapping::Mapped(pin) = volume
        .map_read_or_fetch(200 << 10, 8192, &mut extents)
        .unwrap()
    else {
        panic!("blocks in the log were not mapped at the first look");
    };
    assert_eq!(read_mapped(&extents), fresh);
    drop(pin);
    assert_eq!(counts(&volume), (2, 1));
    volume.close().unwrap();
}

/// A burst of writes far larger than the uploader may hold: the uploader never holds more
/// than its memory budget (batches shrink to fit, the compressed copies counted), the
/// acknowledged bytes not yet in the bucket never pass the dirty limit (writes wait for
/// the uploader instead), and every byte reaches the bucket in order.
#[test]
fn sustained_writes_stay_within_the_upload_memory_budget_and_the_dirty_limit() {
    const BUDGET: u64 = 12 * MIB;
    const MAX_DIRTY: u64 = 24 * MIB;
    const WRITE: usize = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"), "vol");
    let options = |cache: &str| VolumeOptions {
        pack_bytes: 4 * MIB,
        segment_bytes: 2 * MIB,
        upload_streams: 4,
        upload_memory: BUDGET,
        max_dirty_bytes: MAX_DIRTY,
        ..busy_options(&dir.path().join(cache))
    };
    let (volume, _) = open_volume(&location, options("a")).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    // 64 MiB over a 16 MiB volume: half of each write compresses, half does not.
    let mut state = 0x5eed_u64;
    for step in 0..(64 * MIB as usize / WRITE) {
        let offset = (xorshift(&mut state) % (SIZE / WRITE as u64)) * WRITE as u64;
        let mut data = pseudo_random(step as u64, WRITE);
        data[..WRITE / 2].fill(step as u8);
        write_at(&volume, offset, &data, false).unwrap();
        model[offset as usize..offset as usize + WRITE].copy_from_slice(&data);
        assert!(
            volume.dirty_bytes() <= MAX_DIRTY,
            "step {step}: {} acknowledged bytes not in the bucket, over the {MAX_DIRTY} limit",
            volume.dirty_bytes()
        );
    }
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    let metrics = volume.metrics();
    let held_max = metrics.upload_memory_max.load(Ordering::Relaxed);
    assert!(held_max > 0, "the uploader's memory was accounted");
    assert!(
        held_max <= BUDGET,
        "the uploader held {held_max} bytes, over its {BUDGET}-byte budget"
    );
    let raw = metrics.upload_raw_bytes.load(Ordering::Relaxed);
    assert!(
        raw >= SIZE,
        "the burst was uploaded ({raw} raw bytes in packs)"
    );
    assert_same(&volume, &model, "after the burst");
    volume.close().unwrap();
    drop(volume);
    let (volume, _) = open_volume(&location, options("b")).unwrap();
    assert_same(&volume, &model, "reopened from the bucket alone");
}

/// A small tmpfs mounted over `dir` for the test's life (root only).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        use std::ffi::CString;
        std::fs::create_dir_all(dir).unwrap();
        let target = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let options = CString::new(format!("size={size}")).unwrap();
        // SAFETY: mount with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        (rc == 0).then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2 with a NUL-terminated path; MNT_DETACH needs no further state.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The local disk fills up: the cache directory is a tmpfs far smaller than the volume.
/// Published data that does not fit stays out of the cache (counted, read back from the
/// bucket), cached blocks are evicted to make room, a write waits for room and fails at
/// worst with ENOSPC (never EIO, and the volume keeps going), and every acknowledged write
/// reads back, then again from the bucket alone.
#[test]
fn a_full_local_disk_costs_cache_not_data() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        berth_testkit::skip("mounting a small tmpfs for the local disk needs root");
        return;
    }
    const WRITE: usize = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"), "vol");
    let Some(_disk) = SmallDisk::mount(&dir.path().join("small"), "10m") else {
        berth_testkit::skip("mounting a tmpfs failed");
        return;
    };
    let options = VolumeOptions {
        segment_bytes: MIB,
        pack_bytes: MIB,
        max_dirty_bytes: 3 * MIB,
        ..busy_options(&dir.path().join("small/cache"))
    };
    let (volume, _) = open_volume(&location, options).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut state = 0xd15c_u64;
    let mut refused = 0u32;
    // Three times the volume, which is more than half again the disk.
    for step in 0..(3 * SIZE as usize / WRITE) {
        let offset = (xorshift(&mut state) % (SIZE / WRITE as u64)) * WRITE as u64;
        let data = pseudo_random(step as u64 + 1, WRITE);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match write_at(&volume, offset, &data, false) {
                Ok(()) => break,
                Err(err) => {
                    assert_eq!(
                        err.errno(),
                        libc::ENOSPC,
                        "step {step}: a full disk fails a write with ENOSPC only: {err}"
                    );
                    refused += 1;
                    assert!(
                        std::time::Instant::now() < deadline,
                        "step {step}: writes kept failing for want of space: {err}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        model[offset as usize..offset as usize + WRITE].copy_from_slice(&data);
    }
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    let metrics = volume.metrics();
    let uncached = metrics.uncached_bytes.load(Ordering::Relaxed);
    let evicted = metrics.evicted_bytes.load(Ordering::Relaxed);
    eprintln!("full disk: {uncached} bytes left out of the cache, {evicted} evicted, {refused} writes refused with ENOSPC");
    assert!(
        uncached > 0 || evicted > 0,
        "the 10 MiB disk could not hold a 16 MiB cache and the log: it filled"
    );
    // In reads of 1 MiB, as a transport sends them (a read is served from the cache: all
    // of it must fit at once).
    for (i, expected) in model.chunks(MIB as usize).enumerate() {
        let offset = i as u64 * MIB;
        let mut got = vec![0u8; MIB as usize];
        if let Err(err) = read_at(&volume, offset, &mut got) {
            panic!("the read of MiB {i} failed with the local disk full: {err}");
        }
        assert!(
            got == expected,
            "MiB {i} reads back wrong with the local disk full"
        );
    }
    volume.close().unwrap();
    drop(volume);
    let (volume, _) = open_volume(&location, busy_options(&dir.path().join("roomy"))).unwrap();
    assert_same(&volume, &model, "reopened from the bucket alone");
}

/// Uploaded batches reach the cache file with direct I/O where the file system offers it,
/// and what they wrote there is what a reopened volume serves from the cache, without the
/// bucket.
#[test]
fn uploaded_batches_are_written_to_the_cache_directly_and_serve_reads_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    let probe_file = std::fs::File::create(&probe).unwrap();
    let direct_expected =
        berth_volume::local::DirectWrites::open(&probe, &probe_file, 4096).is_some();
    if !direct_expected {
        eprintln!(
            "note: the temporary directory's file system offers no direct I/O: this test checks the page-cache path only"
        );
    }
    let location = create(&dir.path().join("bucket"), "vol");
    let cache = dir.path().join("cache");
    let options = VolumeOptions {
        durability: Durability::Object,
        ..lazy_options(&cache)
    };
    let data = pseudo_random(11, (3 * MIB) as usize);
    {
        let (volume, _) = open_volume(&location, options.clone()).unwrap();
        // Whole blocks at block offsets, and a run that starts mid-way through the volume.
        write_at(&volume, 0, &data[..(2 * MIB) as usize], false).unwrap();
        write_at(&volume, 5 * MIB + 4096, &data[(2 * MIB) as usize..], false).unwrap();
        flush(&volume).unwrap();
        // The FLUSH answers once the manifest is in the bucket; the local apply follows.
        let direct_bytes = || volume.metrics().cache_direct_bytes.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while direct_expected && direct_bytes() < 3 * MIB && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let direct = direct_bytes();
        if direct_expected {
            assert_eq!(direct, 3 * MIB, "bytes written to the cache directly");
        } else {
            assert_eq!(direct, 0);
        }
        volume.close().unwrap();
    }
    // The bucket's packs are gone: only the cache can answer now.
    let packs = dir.path().join("bucket/vol/packs");
    let removed = std::fs::read_dir(&packs)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| std::fs::remove_file(e.path()).is_ok())
                .count()
        })
        .unwrap_or(0);
    assert!(removed > 0, "no pack found under {}", packs.display());
    let (volume, _) = open_volume(&location, options).unwrap();
    assert!(read(&volume, 0, (2 * MIB) as usize) == data[..(2 * MIB) as usize]);
    assert!(read(&volume, 5 * MIB + 4096, MIB as usize) == data[(2 * MIB) as usize..]);
    assert_eq!(
        volume.metrics().fetches.load(Ordering::Relaxed),
        0,
        "a read went to the bucket"
    );
    volume.close().unwrap();
}
