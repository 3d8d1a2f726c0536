//! kill -9 at every named crash point of the write, flush, rotation, upload, apply,
//! compaction, trim, eviction and open sequence (built with `--features failpoints`): a child
//! process writes rounds of data, FLUSHes each and records it as acknowledged, and is
//! killed at the N-th pass of one point; the volume then reopens from its local state
//! and every acknowledged round must read back exactly.

#![cfg(feature = "failpoints")]

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_blockdev::target::{flush, read_at, write_at};
use berth_testkit::pseudo_random;
use berth_volume::admin::{self, CreateOptions};
use berth_volume::{failpoint, wal, Location, Volume, VolumeOptions};

const ROUNDS: u64 = 40;
const ROUND_BYTES: usize = 64 << 10;
const ROUND_STRIDE: u64 = 384 << 10;

fn options(cache_dir: &Path) -> VolumeOptions {
    VolumeOptions {
        cache_dir: cache_dir.to_path_buf(),
        segment_bytes: 256 << 10,
        pack_bytes: 256 << 10,
        upload_interval: Duration::from_millis(5),
        // Smaller than what is written: uploaded data is evicted and fetched again.
        cache_bytes: Some(2 << 20),
        gc_interval: None,
        gc_after_released_bytes: None,
        // Each round rewrites half of the one before (with the same bytes): its pack goes
        // sparse and is compacted within a round or two.
        compact_below: Some(0.75),
        compact_after_dead_bytes: 64 << 10,
        compact_check_interval: Duration::from_millis(5),
        open_timeout: Duration::from_secs(10),
        fetch_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(10),
        ..VolumeOptions::default()
    }
}

/// Creates a volume of `size` bytes in a file:// bucket below `dir`.
fn create_volume(dir: &Path, size: u64) -> Location {
    let location =
        Location::parse(&format!("file://{}/vol", dir.join("bucket").display())).unwrap();
    let create = CreateOptions {
        size: Some(size),
        ..CreateOptions::default()
    };
    admin::create(&location, &create, None).unwrap();
    location
}

/// A command running only the ignored test `name` of this test binary, as a child process.
fn child_test(name: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args(["--exact", name, "--ignored", "--test-threads=1"]);
    command
}

/// Whether `len` bytes at `offset` of `volume` are `pseudo_random(seed, len)`.
fn holds(volume: &Volume, offset: u64, seed: u64, len: usize) -> bool {
    let mut buf = vec![0u8; len];
    read_at(volume, offset, &mut buf).unwrap();
    buf == pseudo_random(seed, len)
}

/// The child: writes and FLUSHes the rounds, appending each acknowledged round's number
/// to the file named by `BERTH_VOLUME_ACKS`, re-reading older rounds now and then.
#[test]
#[ignore = "the crash point test runs it as its child process"]
fn crash_point_child() {
    let (Ok(location), Ok(cache), Ok(acks)) = (
        std::env::var("BERTH_VOLUME_LOCATION"),
        std::env::var("BERTH_VOLUME_CACHE"),
        std::env::var("BERTH_VOLUME_ACKS"),
    ) else {
        return;
    };
    let location = Location::parse(&location).unwrap();
    let (volume, _) = Volume::open(&location, options(Path::new(&cache))).unwrap();
    let mut acks = std::fs::OpenOptions::new().append(true).open(acks).unwrap();
    for round in 0..ROUNDS {
        write_at(
            &volume,
            round * ROUND_STRIDE,
            &pseudo_random(round, ROUND_BYTES),
            false,
        )
        .unwrap();
        if round > 0 {
            let previous = round - 1;
            let same = pseudo_random(previous, ROUND_BYTES);
            write_at(
                &volume,
                previous * ROUND_STRIDE,
                &same[..ROUND_BYTES / 2],
                false,
            )
            .unwrap();
        }
        flush(&volume).unwrap();
        writeln!(acks, "{round}").unwrap();
        if round % 5 == 4 {
            let old = round / 2;
            assert!(
                holds(&volume, old * ROUND_STRIDE, old, ROUND_BYTES),
                "round {old} reads back"
            );
        }
    }
    volume.sync_to_bucket(Duration::from_secs(10)).unwrap();
    volume.close().unwrap();
}

#[test]
fn every_acknowledged_write_survives_a_kill_at_every_crash_point() {
    let mut killed = 0;
    let mut runs = 0;
    let mut not_reached = Vec::new();
    for &point in failpoint::ALL {
        for pass in [1u64, 3] {
            let dir = tempfile::tempdir().unwrap();
            let location = create_volume(dir.path(), ROUNDS * ROUND_STRIDE);
            let cache = dir.path().join("cache");
            let acks = dir.path().join("acks");
            std::fs::write(&acks, b"").unwrap();
            let status = child_test("crash_point_child")
                .env("BERTH_VOLUME_LOCATION", location.to_string())
                .env("BERTH_VOLUME_CACHE", &cache)
                .env("BERTH_VOLUME_ACKS", &acks)
                .env("BERTH_VOLUME_FAILPOINT", format!("{point}:{pass}"))
                .status()
                .unwrap();
            runs += 1;
            let was_killed =
                std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL);
            assert!(
                was_killed || status.success(),
                "{point}:{pass}: the child failed on its own: {status}"
            );
            killed += u32::from(was_killed);
            if !was_killed {
                not_reached.push(format!("{point}:{pass}"));
            }

            let acked: Vec<u64> = std::fs::read_to_string(&acks)
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
            let (volume, report) = Volume::open(&location, options(&cache))
                .unwrap_or_else(|e| panic!("{point}:{pass}: reopening after the kill: {e}"));
            for &round in &acked {
                assert!(
                    holds(&volume, round * ROUND_STRIDE, round, ROUND_BYTES),
                    "{point}:{pass}: acknowledged round {round} of {} is lost or wrong after the kill ({report:?})",
                    acked.len()
                );
            }
            volume.close().unwrap();
            drop(volume);
            // And from the bucket alone, after the reopened volume uploaded the rest.
            let (volume, _) = Volume::open(&location, options(&dir.path().join("other")))
                .unwrap_or_else(|e| panic!("{point}:{pass}: opening from the bucket: {e}"));
            for &round in &acked {
                assert!(
                    holds(&volume, round * ROUND_STRIDE, round, ROUND_BYTES),
                    "{point}:{pass}: acknowledged round {round} is not in the bucket after recovery"
                );
            }
        }
    }
    eprintln!("{runs} runs, {killed} killed at their crash point; not reached: {not_reached:?}");
    // The upload and compaction sequences are walked whatever else the timing skips.
    for point in [
        "upload.after_pack_put:1",
        "upload.after_manifest_put:1",
        "compact.after_pack_put:1",
        "compact.after_manifest_put:1",
    ] {
        assert!(
            !not_reached.iter().any(|p| p == point),
            "the child never reached {point}"
        );
    }
    assert!(
        killed >= 40,
        "only {killed} of {runs} runs reached their crash point"
    );
}

const CUT_BYTES: usize = 64 << 10;

fn power_cut_options(cache_dir: &Path) -> VolumeOptions {
    VolumeOptions {
        cache_dir: cache_dir.to_path_buf(),
        segment_bytes: 4 << 20,
        // Nothing goes to the bucket on its own: only the child's explicit upload.
        upload_interval: Duration::from_secs(3600),
        gc_interval: None,
        gc_after_released_bytes: None,
        open_timeout: Duration::from_secs(10),
        fetch_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(10),
        ..VolumeOptions::default()
    }
}

/// The power cut test's child: A at block 0, FLUSHed; then B over it and C at block 64,
/// never flushed; then one upload of all three, killed right after its manifest version
/// is in the bucket (before the batch is applied locally).
#[test]
#[ignore = "the power cut test runs it as its child process"]
fn power_cut_child() {
    let (Ok(location), Ok(cache)) = (
        std::env::var("BERTH_VOLUME_CUT_LOCATION"),
        std::env::var("BERTH_VOLUME_CUT_CACHE"),
    ) else {
        return;
    };
    let location = Location::parse(&location).unwrap();
    let (volume, _) = Volume::open(&location, power_cut_options(Path::new(&cache))).unwrap();
    write_at(&volume, 0, &pseudo_random(1, CUT_BYTES), false).unwrap();
    flush(&volume).unwrap();
    write_at(&volume, 0, &pseudo_random(2, CUT_BYTES), false).unwrap();
    write_at(&volume, 256 << 10, &pseudo_random(3, CUT_BYTES), false).unwrap();
    let _ = volume.sync_to_bucket(Duration::from_secs(10));
    panic!("the upload should have been killed after its manifest version");
}

/// A power cut of the local disk right after an upload of writes that were never
/// flushed, before the batch was applied locally: the local log has only the flushed
/// write A (the records of B and C never reached the disk), the bucket has A, B and C.
/// The volume must come back as one state the guest could have seen (the bucket's: B
/// over A, and C), not A from the log beside C from the bucket, and must read the same
/// after its cache is gone.
#[test]
fn a_power_cut_after_an_upload_of_unflushed_writes_leaves_the_bucket_state() {
    let dir = tempfile::tempdir().unwrap();
    let location = create_volume(dir.path(), 4 << 20);
    let cache = dir.path().join("cache");
    let status = child_test("power_cut_child")
        .env("BERTH_VOLUME_CUT_LOCATION", location.to_string())
        .env("BERTH_VOLUME_CUT_CACHE", &cache)
        .env("BERTH_VOLUME_FAILPOINT", "upload.after_manifest_put:1")
        .status()
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the child should have been killed after its manifest put: {status}"
    );

    // The power cut: the log records after the flushed one never reached the disk.
    let mut wal_dirs: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path().join("wal"))
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(wal_dirs.len(), 1, "one volume's local state");
    let wal_dir = wal_dirs.remove(0);
    let mut slots = Vec::new();
    for number in wal::list_segments(&wal_dir).unwrap() {
        let (_, index) = wal::segment_paths(&wal_dir, number);
        let raw = std::fs::read(&index).unwrap();
        for (i, slot) in raw.chunks_exact(wal::RECORD_LEN).enumerate() {
            if let Some(record) = wal::Record::decode(slot) {
                slots.push((record.seq, index.clone(), i));
            }
        }
    }
    slots.sort();
    assert_eq!(slots.len(), 3, "the log holds A, B and C: {slots:?}");
    for (_, index, i) in &slots[1..] {
        let file = std::fs::OpenOptions::new().write(true).open(index).unwrap();
        std::os::unix::fs::FileExt::write_all_at(
            &file,
            &[0u8; wal::RECORD_LEN],
            (*i * wal::RECORD_LEN) as u64,
        )
        .unwrap();
    }

    let (volume, report) = Volume::open(&location, power_cut_options(&cache)).unwrap();
    assert!(report.lost_tail, "{report:?}");
    let check = |volume: &Volume, what: &str| {
        assert!(
            holds(volume, 0, 2, CUT_BYTES),
            "{what}: block 0 is not B, the bucket's data (A would be from before C)"
        );
        assert!(
            holds(volume, 256 << 10, 3, CUT_BYTES),
            "{what}: C is in the bucket"
        );
    };
    check(&volume, "after the power cut");
    // New writes after the recovery reach the bucket and come back from it alone.
    write_at(&volume, 1 << 20, &pseudo_random(4, CUT_BYTES), false).unwrap();
    flush(&volume).unwrap();
    volume.sync_to_bucket(Duration::from_secs(10)).unwrap();
    volume.close().unwrap();
    drop(volume);
    let (volume, _) = Volume::open(&location, power_cut_options(&cache)).unwrap();
    check(&volume, "reopened");
    volume.close().unwrap();
    drop(volume);
    let (volume, _) =
        Volume::open(&location, power_cut_options(&dir.path().join("other"))).unwrap();
    check(&volume, "from the bucket alone");
    assert!(
        holds(&volume, 1 << 20, 4, CUT_BYTES),
        "the write after the recovery"
    );
}
