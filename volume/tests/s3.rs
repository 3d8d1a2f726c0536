//! A volume in a real S3-compatible server (moto) on loopback: the lease's conditional
//! writes keep a second writer out, data moves to the next host through the bucket, and
//! a damaged pack fails reads instead of returning wrong data.

use std::sync::Arc;
use std::time::Duration;

use berth_blockdev::target::{flush, read_at, write_at};
use berth_cache::{BlobBackend, ObjectStoreBackend, S3Config};
use berth_testkit::{pseudo_random, skip, CountingProxy, Moto};
use berth_volume::admin::{self, CreateOptions};
use berth_volume::{Durability, Location, Store, Volume, VolumeError, VolumeOptions};

fn options(cache_dir: &std::path::Path) -> VolumeOptions {
    VolumeOptions {
        cache_dir: cache_dir.to_path_buf(),
        upload_interval: Duration::from_secs(3600),
        gc_interval: None,
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
    let moto = match Moto::start(None) {
        Ok(moto) => moto,
        Err(reason) => {
            skip(&reason);
            return;
        }
    };
    moto.create_bucket("berth");
    let proxy = CountingProxy::start(moto.port);
    let backend = bucket_at(&proxy.endpoint());
    let location = Location::parse("s3://berth/volumes/outage").unwrap();
    let store = || Store::with_backend(&location, backend.clone());
    let create = CreateOptions {
        size: Some(8 << 20),
        ..CreateOptions::default()
    };
    admin::create_in(&store(), &create, None).unwrap();
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
    let err = flush(&volume).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the FLUSH failed within a bounded time, not after {:?}",
        started.elapsed()
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
