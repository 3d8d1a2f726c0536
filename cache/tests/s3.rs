//! The object_store backends against a real S3-compatible server (moto) on loopback.

mod common;

use std::process::Command;
use std::sync::Arc;

use berth_cache::{
    open_backend, BlobBackend, CacheConfig, CacheEngine, Compression, ObjectStoreBackend,
};
use common::{pseudo_random, publish, Moto};

#[test]
fn s3_and_http_backends_serve_range_reads_through_the_engine() {
    let moto = match Moto::start(None) {
        Ok(moto) => moto,
        Err(reason) => {
            common::skip(&reason);
            return;
        }
    };
    moto.create_bucket("berth");
    let s3: Arc<dyn BlobBackend> =
        Arc::new(ObjectStoreBackend::s3(&common::s3_config(&moto, "berth")).unwrap());

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

/// Set (to the endpoint) only in the child process of the environment test.
const CHILD_ENDPOINT: &str = "BERTH_TEST_S3_ENDPOINT";

/// `open_backend("s3://…")` configured only through `AWS_*` variables, as an operator
/// would. The variables are set on a child process running
/// `s3_backend_from_environment_child`, so no other test thread sees them change.
#[test]
fn open_backend_takes_s3_settings_from_the_environment() {
    let moto = match Moto::start(None) {
        Ok(moto) => moto,
        Err(reason) => {
            common::skip(&reason);
            return;
        }
    };
    moto.create_bucket("berth-env");
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "s3_backend_from_environment_child",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CHILD_ENDPOINT, moto.endpoint())
        .env("AWS_ENDPOINT", moto.endpoint())
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The filter matched the child test and it ran (rather than nothing matching).
    assert!(
        stdout.contains("1 passed"),
        "the child did not run:\n{stdout}"
    );
}

#[test]
#[ignore = "run by open_backend_takes_s3_settings_from_the_environment in a child process"]
fn s3_backend_from_environment_child() {
    let Some(endpoint) = std::env::var_os(CHILD_ENDPOINT) else {
        eprintln!("skipping: only meaningful as the child of the environment test");
        return;
    };
    let s3 = open_backend("s3://berth-env/lazy/images").unwrap();
    assert_eq!(s3.describe(), "s3://berth-env/lazy/images");

    // Larger than one upload part: a multipart upload (POST), then range reads.
    let dir = tempfile::tempdir().unwrap();
    let big = pseudo_random(3, 17 << 20);
    let big_path = dir.path().join("big");
    std::fs::write(&big_path, &big).unwrap();
    s3.put_file("raw/big", &big_path).unwrap();
    assert_eq!(s3.size("raw/big").unwrap(), big.len() as u64);
    assert_eq!(
        s3.read_range("raw/big", 16_777_000..16_777_300).unwrap(),
        big[16_777_000..16_777_300]
    );

    // The prefix really is part of the object key: the object is reachable
    // anonymously at bucket/prefix/name (moto does not check signatures on GET).
    let port: u16 = endpoint
        .to_str()
        .and_then(|e| e.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let status = common::http_request(port, "HEAD", "/berth-env/lazy/images/raw/big").unwrap();
    assert!(status.contains("200"), "HEAD of the object: {status}");

    // And the engine serves a compressed blob published through it.
    let data = pseudo_random(4, 2 << 20);
    let manifest = publish(&data, 128 * 1024, Compression::Lz4, s3.as_ref());
    let engine = CacheEngine::new(CacheConfig::new(dir.path().join("cache")), s3).unwrap();
    let handle = engine.open_blob(&manifest).unwrap();
    let mut buf = vec![0u8; 300_000];
    assert_eq!(handle.read(1_500_000, &mut buf).unwrap(), buf.len());
    assert_eq!(buf, data[1_500_000..1_800_000]);
}
