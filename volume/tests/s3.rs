//! A volume in a real S3-compatible server (moto) on loopback: the lease's conditional
//! writes keep a second writer out, data moves to the next host through the bucket, and
//! a damaged pack fails reads instead of returning wrong data, several packs upload at
//! once while their manifest versions are published in order, and compaction rewrites
//! sparse packs (leaving a damaged one as it is).

use std::sync::Arc;
use std::time::Duration;

use berth_blockdev::target::{flush, read_at, write_at};
use berth_cache::{BlobBackend, ObjectStoreBackend, S3Config};
use berth_testkit::{pseudo_random, skip, CountingProxy, FaultAction, FaultRule, Moto};
use berth_volume::admin::{self, CreateOptions};
use berth_volume::{Durability, Location, Store, Volume, VolumeError, VolumeOptions};

fn options(cache_dir: &std::path::Path) -> VolumeOptions {
    VolumeOptions {
        cache_dir: cache_dir.to_path_buf(),
        upload_interval: Duration::from_secs(3600),
        gc_interval: None,
        gc_after_released_bytes: None,
        open_timeout: Duration::from_secs(20),
        fetch_timeout: Duration::from_secs(20),
        drain_timeout: Duration::from_secs(30),
        ..VolumeOptions::default()
    }
}

/// The whole bucket `berth` at `endpoint` (volumes add their prefixes).
fn bucket_at(endpoint: &str) -> Arc<dyn BlobBackend> {
    Arc::new(
        ObjectStoreBackend::s3(&S3Config {
            bucket: "berth".into(),
            prefix: String::new(),
            endpoint: Some(endpoint.into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("testing".into()),
            secret_access_key: Some("testing".into()),
            allow_http: true,
        })
        .unwrap(),
    )
}

/// An 8 MiB volume in moto's bucket `berth`, reached through a proxy that counts requests
/// and injects faults.
struct ProxiedVolume {
    proxy: CountingProxy,
    backend: Arc<dyn BlobBackend>,
    location: Location,
    _moto: Moto,
}

impl ProxiedVolume {
    /// Creates `s3://berth/volumes/NAME`; `None` (the reason printed) without moto.
    fn create(name: &str) -> Option<Self> {
        let moto = match Moto::start(None) {
            Ok(moto) => moto,
            Err(reason) => {
                skip(&reason);
                return None;
            }
        };
        moto.create_bucket("berth");
        let proxy = CountingProxy::start(moto.port);
        let bucket = Self {
            backend: bucket_at(&proxy.endpoint()),
            location: Location::parse(&format!("s3://berth/volumes/{name}")).unwrap(),
            proxy,
            _moto: moto,
        };
        let create = CreateOptions {
            size: Some(8 << 20),
            ..CreateOptions::default()
        };
        admin::create_in(&bucket.store(), &create, None).unwrap();
        Some(bucket)
    }

    fn store(&self) -> Arc<Store> {
        Store::with_backend(&self.location, self.backend.clone())
    }
}

#[test]
fn the_lease_refuses_a_second_writer_and_the_bucket_carries_the_data_to_the_next() {
    let moto = match Moto::start(None) {
        Ok(moto) => moto,
        Err(reason) => {
            skip(&reason);
            return;
        }
    };
    moto.create_bucket("berth");
    let backend = bucket_at(&moto.endpoint());
    let location = Location::parse("s3://berth/volumes/one").unwrap();
    let store = || Store::with_backend(&location, backend.clone());
    let create = CreateOptions {
        size: Some(8 << 20),
        ..CreateOptions::default()
    };
    admin::create_in(&store(), &create, None).unwrap();
    assert!(
        matches!(
            admin::create_in(&store(), &create, None),
            Err(VolumeError::VolumeExists(_))
        ),
        "creating over an existing volume is refused"
    );

    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(11, 3 << 20);
    let (first, _) = Volume::open_with_store(store(), options(&dir.path().join("host-a"))).unwrap();
    write_at(&first, 1 << 20, &data, false).unwrap();
    flush(&first).unwrap();

    match Volume::open_with_store(store(), options(&dir.path().join("host-b"))) {
        Err(VolumeError::Leased { holder, .. }) => assert!(!holder.is_empty()),
        other => panic!("the second writer must be refused by the lease, got {other:?}"),
    }

    first.close().unwrap();
    drop(first);
    let (second, _) =
        Volume::open_with_store(store(), options(&dir.path().join("host-b"))).unwrap();
    let mut got = vec![0u8; data.len()];
    read_at(&second, 1 << 20, &mut got).unwrap();
    assert!(got == data, "the next host reads what the first wrote");
    second.close().unwrap();
    drop(second);

    // Damage every pack: a host without a local copy must fail the read, not return
    // zeros or garbage.
    let packs = backend.list("volumes/one/packs").unwrap();
    assert!(!packs.is_empty(), "the write was uploaded as a pack");
    for pack in &packs {
        let size = backend.size(&pack.name).unwrap() as usize;
        backend.put_bytes(&pack.name, &vec![0xa5; size]).unwrap();
    }
    let (third, _) = Volume::open_with_store(store(), options(&dir.path().join("host-c"))).unwrap();
    let mut got = vec![0u8; 4096];
    let err = read_at(&third, 1 << 20, &mut got).unwrap_err();
    assert_eq!(
        err.errno(),
        libc::EIO,
        "a damaged pack is an I/O error: {err}"
    );
}

/// `--durability object` through a bucket outage: FLUSH fails with EIO after the flush
/// timeout instead of hanging or claiming durability, the acknowledged writes stay in
/// the local log, and once the bucket is back they reach it and the next host.
#[test]
fn a_bucket_outage_fails_object_flushes_in_bounded_time_and_loses_nothing() {
    let Some(bucket) = ProxiedVolume::create("outage") else {
        return;
    };
    let (proxy, store) = (&bucket.proxy, || bucket.store());
    let dir = tempfile::tempdir().unwrap();
    let object = |cache: &str| VolumeOptions {
        durability: Durability::Object,
        flush_timeout: Duration::from_secs(2),
        lease_ttl: Duration::from_secs(120),
        ..options(&dir.path().join(cache))
    };
    let (volume, _) = Volume::open_with_store(store(), object("host-a")).unwrap();
    let before = pseudo_random(21, 256 << 10);
    write_at(&volume, 0, &before, false).unwrap();
    flush(&volume).unwrap();

    proxy.outage();
    let during = pseudo_random(22, 256 << 10);
    write_at(&volume, 4 << 20, &during, false).unwrap();
    let started = std::time::Instant::now();
    let flusher_cpu_before = flusher_cpu_ticks();
    let err = flush(&volume).unwrap_err();
    let flusher_cpu = flusher_cpu_ticks() - flusher_cpu_before;
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the FLUSH failed within a bounded time, not after {:?}",
        started.elapsed()
    );
    // The flusher sleeps while a FLUSH waits for the bucket (it once spun on a CPU):
    // well under a quarter of the ~2 s wait in clock ticks (100 a second).
    assert!(
        flusher_cpu < 50,
        "the flushers used {flusher_cpu} clock ticks of CPU while a FLUSH waited for the bucket"
    );
    let mut got = vec![0u8; during.len()];
    read_at(&volume, 4 << 20, &mut got).unwrap();
    assert!(
        got == during,
        "the acknowledged write reads back during the outage"
    );

    proxy.clear_faults();
    flush(&volume).unwrap();
    volume.close().unwrap();
    drop(volume);
    let (next, _) = Volume::open_with_store(store(), options(&dir.path().join("host-b"))).unwrap();
    for (offset, data) in [(0u64, &before), (4 << 20, &during)] {
        let mut got = vec![0u8; data.len()];
        read_at(&next, offset, &mut got).unwrap();
        assert!(
            &got == data,
            "the write at {offset} reached the bucket after the outage"
        );
    }
}

/// CPU time (user + system, clock ticks) of this process's volume flusher threads.
fn flusher_cpu_ticks() -> u64 {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "berth-vol-flush" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is the 3rd; utime and stime the 14th
        // and 15th.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        for index in [11, 12] {
            ticks += fields
                .get(index)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ticks
}

/// Packs upload several at once, and a slow first pack holds back only the publishing:
/// its PUT is delayed while the next packs land, yet every manifest version adds packs
/// in the order they were numbered (each delta is over the one before), the FLUSH under
/// object durability waits for all of them, and a host with an empty cache reads every
/// byte back from the bucket.
/// A pack of data that does not compress is the batch's data itself, so once it is built
/// it holds no second copy and the upload memory budget counts it once: with a budget of
/// four packs' worth and every PUT slow, three full packs and a smaller fourth are in
/// flight at once, where counting each pack twice until its PUT ended allowed two.
#[test]
fn packs_that_do_not_compress_count_once_against_the_upload_memory_budget() {
    let Some(bucket) = ProxiedVolume::create("memory") else {
        return;
    };
    bucket.proxy.add_fault(FaultRule::on(
        "PUT",
        "/packs/",
        FaultAction::Delay(Duration::from_millis(400)),
    ));
    let dir = tempfile::tempdir().unwrap();
    let pack_bytes = 256usize << 10;
    let budget = 4 * pack_bytes as u64;
    let writer = VolumeOptions {
        durability: Durability::Object,
        pack_bytes: pack_bytes as u64,
        upload_streams: 4,
        upload_memory: budget,
        flush_timeout: Duration::from_secs(60),
        ..options(&dir.path().join("host-a"))
    };
    let (volume, _) = Volume::open_with_store(bucket.store(), writer).unwrap();
    let data = pseudo_random(47, 8 * pack_bytes);
    for (index, piece) in data.chunks(pack_bytes).enumerate() {
        write_at(&volume, (index * pack_bytes) as u64, piece, false).unwrap();
    }
    flush(&volume).unwrap();
    let metrics = volume.metrics();
    let at_once = metrics
        .uploads_in_flight_max
        .load(std::sync::atomic::Ordering::Relaxed);
    let held_max = metrics
        .upload_memory_max
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        at_once >= 3,
        "{at_once} packs at most were in flight within a budget of four packs' worth"
    );
    assert!(
        held_max <= budget,
        "the uploader held {held_max} bytes, over its {budget}-byte budget"
    );
    volume.close().unwrap();
    drop(volume);
    let (reader, _) =
        Volume::open_with_store(bucket.store(), options(&dir.path().join("host-b"))).unwrap();
    let mut back = vec![0u8; data.len()];
    read_at(&reader, 0, &mut back).unwrap();
    assert!(back == data, "the second host reads every byte back");
    reader.close().unwrap();
}

#[test]
fn packs_upload_in_parallel_and_publish_in_order_those_already_in_sharing_a_version() {
    let Some(bucket) = ProxiedVolume::create("parallel") else {
        return;
    };
    let (proxy, store) = (&bucket.proxy, || bucket.store());
    let versions_before = store()
        .manifest_versions(berth_volume::store::Patience::Forever)
        .unwrap();
    let first_new_version = versions_before.last().copied().unwrap_or(0) + 1;
    // The first pack this writer numbers is the volume's next pack id: 1 after create.
    proxy.add_fault(
        FaultRule::on(
            "PUT",
            "/packs/0000000000000001-",
            FaultAction::Delay(Duration::from_millis(1500)),
        )
        .times(1),
    );
    let dir = tempfile::tempdir().unwrap();
    let packs = 8usize;
    let pack_bytes = 256usize << 10;
    let writer = VolumeOptions {
        durability: Durability::Object,
        pack_bytes: pack_bytes as u64,
        upload_streams: 4,
        full_every: 1000,
        flush_timeout: Duration::from_secs(60),
        ..options(&dir.path().join("host-a"))
    };
    let (volume, _) = Volume::open_with_store(store(), writer).unwrap();
    let data = pseudo_random(31, packs * pack_bytes);
    for (index, piece) in data.chunks(pack_bytes).enumerate() {
        write_at(&volume, (index * pack_bytes) as u64, piece, false).unwrap();
    }
    flush(&volume).unwrap();
    let at_once = volume
        .metrics()
        .uploads_in_flight_max
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        at_once >= 2,
        "packs were uploaded one at a time ({at_once} at most) while the first was slow"
    );
    volume.close().unwrap();
    drop(volume);

    let in_bucket = store();
    let versions = in_bucket
        .manifest_versions(berth_volume::store::Patience::Forever)
        .unwrap();
    let new: Vec<u64> = versions
        .iter()
        .copied()
        .filter(|&v| v >= first_new_version)
        .collect();
    let expected: Vec<u64> = (first_new_version..first_new_version + new.len() as u64).collect();
    assert_eq!(new, expected, "manifest versions are consecutive");
    let mut last_pack = 0u64;
    let mut published = 0usize;
    let mut packs_per_version = Vec::new();
    for &version in &new {
        let key = in_bucket.manifest_key(version);
        let (bytes, _) = in_bucket
            .get(&key, berth_volume::store::Patience::Forever)
            .unwrap()
            .unwrap();
        let manifest = berth_volume::format::Manifest::decode(&key, &bytes).unwrap();
        for pack in &manifest.packs {
            assert!(
                pack.id > last_pack,
                "version {version} publishes pack {} after pack {last_pack}",
                pack.id
            );
            last_pack = pack.id;
            published += 1;
        }
        packs_per_version.push(manifest.packs.len());
    }
    assert!(
        published >= packs,
        "{published} packs published for {packs} packs of writes"
    );
    // The packs that reached the bucket while the first waited share its manifest version
    // (one at a time they took one version each).
    let with_packs = packs_per_version.iter().filter(|&&n| n > 0).count();
    assert!(
        packs_per_version.iter().max().is_some_and(|&n| n >= 4) && with_packs < packs,
        "packs per new manifest version: {packs_per_version:?}"
    );

    let (next, _) = Volume::open_with_store(store(), options(&dir.path().join("host-b"))).unwrap();
    let mut got = vec![0u8; data.len()];
    read_at(&next, 0, &mut got).unwrap();
    assert!(got == data, "every byte reads back from the bucket alone");
}

/// Compaction against the S3 server: sparse packs are rewritten and collected, and a second
/// host reads every byte back from the bucket alone. A pack damaged in the bucket is left
/// as it is (the other sparse packs are still compacted): its live blocks fail to read with
/// EIO on a host without a local copy, never read as wrong data.
#[test]
fn compaction_rewrites_sparse_packs_in_s3_and_leaves_a_damaged_one_alone() {
    let Some(bucket) = ProxiedVolume::create("compact") else {
        return;
    };
    const BLOCK: usize = 4096;
    let dir = tempfile::tempdir().unwrap();
    let eager = |host: &str| VolumeOptions {
        segment_bytes: 256 << 10,
        pack_bytes: 256 << 10,
        upload_interval: Duration::from_millis(5),
        compact_below: Some(0.5),
        compact_after_dead_bytes: 256 << 10,
        gc_after_released_bytes: Some(1),
        ..options(&dir.path().join(host))
    };
    let (volume, _) = Volume::open_with_store(bucket.store(), eager("host-a")).unwrap();
    // Region A (1 MiB at 0) is uploaded first; one of its packs is damaged below.
    let mut model = vec![0u8; 4 << 20];
    let first = pseudo_random(41, 1 << 20);
    write_at(&volume, 0, &first, false).unwrap();
    model[..first.len()].copy_from_slice(&first);
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    let packs_of_a = bucket.backend.list("volumes/compact/packs").unwrap();
    // Region B (2 MiB at 2 MiB).
    let second = pseudo_random(42, 2 << 20);
    write_at(&volume, 2 << 20, &second, false).unwrap();
    model[2 << 20..4 << 20].copy_from_slice(&second);
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    let listed = |prefix: &str| -> Vec<String> {
        bucket
            .backend
            .list(prefix)
            .unwrap()
            .into_iter()
            .map(|o| o.name)
            .collect()
    };
    let packs_of_a: Vec<String> = packs_of_a.into_iter().map(|o| o.name).collect();
    let packs_of_b: Vec<String> = listed("volumes/compact/packs")
        .into_iter()
        .filter(|name| !packs_of_a.contains(name))
        .collect();
    let damaged = &packs_of_a[0];
    let size = bucket.backend.size(damaged).unwrap() as usize;
    bucket
        .backend
        .put_bytes(damaged, &vec![0xa5; size])
        .unwrap();
    // Seven blocks of every eight overwritten in region A, three of every four in B: every
    // pack goes sparse, the damaged one most (so compaction meets it first).
    for (region, every) in [(0usize..1 << 20, 8), (2 << 20..4 << 20, 4)] {
        for at in region.step_by(every * BLOCK) {
            let data = pseudo_random(1000 + at as u64, (every - 1) * BLOCK);
            write_at(&volume, (at + BLOCK) as u64, &data, false).unwrap();
            model[at + BLOCK..at + every * BLOCK].copy_from_slice(&data);
        }
    }
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    // Region B's packs are compacted and then collected; the damaged one stays.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let b_left = || {
        let names = listed("volumes/compact/packs");
        packs_of_b.iter().filter(|p| names.contains(p)).count()
    };
    while b_left() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let steps = volume
        .metrics()
        .compactions
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        b_left() == 0 && steps > 0,
        "{} of region B's {} sparse packs are still in the bucket after {steps} compaction steps",
        b_left(),
        packs_of_b.len()
    );
    assert!(
        listed("volumes/compact/packs").contains(damaged),
        "the damaged pack is left in the bucket"
    );
    let mut got = vec![0u8; model.len()];
    read_at(&volume, 0, &mut got).unwrap();
    assert!(
        got == model,
        "the writer reads its data (its cache has every block)"
    );
    volume.close().unwrap();
    drop(volume);

    let (other, _) =
        Volume::open_with_store(bucket.store(), options(&dir.path().join("host-b"))).unwrap();
    let mut failed = 0;
    for block in 0..model.len() / BLOCK {
        let mut got = vec![0u8; BLOCK];
        match read_at(&other, (block * BLOCK) as u64, &mut got) {
            Ok(()) => assert!(
                got == model[block * BLOCK..(block + 1) * BLOCK],
                "block {block} reads wrong data from the bucket"
            ),
            Err(err) => {
                assert_eq!(err.errno(), libc::EIO, "block {block}: {err}");
                assert!(
                    block < 1 << 20 >> 12,
                    "block {block}, outside the damaged region, fails: {err}"
                );
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "the damaged pack's live blocks fail to read");
}
