//! The object_store backends against a real S3-compatible server (moto) on loopback.

mod common;

use std::sync::Arc;

use berth_cache::{BlobBackend, CacheConfig, CacheEngine, Compression, ObjectStoreBackend};
use common::{pseudo_random, publish, Moto};

#[test]
fn s3_and_http_backends_serve_range_reads_through_the_engine() {
    let moto = match Moto::start(None) {
        Ok(moto) => moto,
        Err(reason) => {
            eprintln!("skipping: {reason}");
            return;
        }
    };
    moto.create_bucket("berth");
    let s3: Arc<dyn BlobBackend> =
        Arc::new(ObjectStoreBackend::s3(&moto.s3_config("berth")).unwrap());

    // A file larger than one upload part goes up as a multipart upload.
    let dir = tempfile::tempdir().unwrap();
    let big = pseudo_random(1, 20 << 20);
    let big_path = dir.path().join("big");
    std::fs::write(&big_path, &big).unwrap();
    s3.put_file("raw/big", &big_path).unwrap();
    assert_eq!(s3.size("raw/big").unwrap(), big.len() as u64);
    assert_eq!(
        s3.read_range("raw/big", 17_000_000..17_000_100).unwrap(),
        big[17_000_000..17_000_100]
    );
    assert!(s3.read_range("raw/missing", 0..10).is_err());

    let data = pseudo_random(2, 3 << 20);
    let manifest = publish(&data, 256 * 1024, Compression::Zstd, s3.as_ref());
    let engine = CacheEngine::new(CacheConfig::new(dir.path().join("cache")), s3.clone()).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let mut buf = vec![0u8; 700_000];
    assert_eq!(handle.read(1_000_000, &mut buf).unwrap(), buf.len());
    assert_eq!(buf, data[1_000_000..1_700_000]);

    // Plain HTTP range reads of the same objects (moto serves them without signatures).
    let http: Arc<dyn BlobBackend> =
        Arc::new(ObjectStoreBackend::http(&format!("{}/berth/images", moto.endpoint())).unwrap());
    assert_eq!(http.read_range("raw/big", 5..105).unwrap(), big[5..105]);
    // moto answers anonymous GETs for the multipart-uploaded object, so serve the
    // uncompressed layout of `big` from it.
    let mut big_manifest = publish(&big, 1 << 20, Compression::None, s3.as_ref());
    big_manifest.object = "raw/big".into();
    let engine = CacheEngine::new(CacheConfig::new(dir.path().join("cache-http")), http).unwrap();
    let handle = engine.open_blob(&big_manifest).unwrap();
    let mut all = vec![0u8; big.len()];
    assert_eq!(handle.read(0, &mut all).unwrap(), big.len());
    assert_eq!(all, big);
}
