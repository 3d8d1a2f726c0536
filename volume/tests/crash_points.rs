//! kill -9 at every named crash point of the write, flush, rotation, upload, apply,
//! trim, eviction and open sequence (built with `--features failpoints`): a child
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
use berth_volume::{failpoint, Location, Volume, VolumeOptions};

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
        open_timeout: Duration::from_secs(10),
        fetch_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(10),
        ..VolumeOptions::default()
    }
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
        flush(&volume).unwrap();
        writeln!(acks, "{round}").unwrap();
        if round % 5 == 4 {
            let mut buf = vec![0u8; ROUND_BYTES];
            let old = round / 2;
            read_at(&volume, old * ROUND_STRIDE, &mut buf).unwrap();
            assert!(
                buf == pseudo_random(old, ROUND_BYTES),
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
    for &point in failpoint::ALL {
        for pass in [1u64, 3] {
            let dir = tempfile::tempdir().unwrap();
            let location = Location::parse(&format!(
                "file://{}/vol",
                dir.path().join("bucket").display()
            ))
            .unwrap();
            let create = CreateOptions {
                size: Some(ROUNDS * ROUND_STRIDE),
                ..CreateOptions::default()
            };
            admin::create(&location, &create, None).unwrap();
            let cache = dir.path().join("cache");
            let acks = dir.path().join("acks");
            std::fs::write(&acks, b"").unwrap();
            let status = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "crash_point_child",
                    "--ignored",
                    "--test-threads=1",
                ])
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

            let acked: Vec<u64> = std::fs::read_to_string(&acks)
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
            let (volume, report) = Volume::open(&location, options(&cache))
                .unwrap_or_else(|e| panic!("{point}:{pass}: reopening after the kill: {e}"));
            for &round in &acked {
                let mut buf = vec![0u8; ROUND_BYTES];
                read_at(&volume, round * ROUND_STRIDE, &mut buf).unwrap();
                assert!(
                    buf == pseudo_random(round, ROUND_BYTES),
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
                let mut buf = vec![0u8; ROUND_BYTES];
                read_at(&volume, round * ROUND_STRIDE, &mut buf).unwrap();
                assert!(
                    buf == pseudo_random(round, ROUND_BYTES),
                    "{point}:{pass}: acknowledged round {round} is not in the bucket after recovery"
                );
            }
        }
    }
    eprintln!("{runs} runs, {killed} killed at their crash point");
    assert!(
        killed >= 40,
        "only {killed} of {runs} runs reached their crash point"
    );
}
