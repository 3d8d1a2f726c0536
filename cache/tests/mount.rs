//! End to end (root): an erofs image served lazily from a moto S3 server through
//! fanotify pre-content events. Skips with a reason when root, erofs, fanotify
//! pre-content, mkfs.erofs or moto are unavailable.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_cache::mount::check_support;
use berth_cache::{
    build_image, mount_image, BlobBackend, BuildOptions, CacheConfig, CacheEngine, Compression,
    MountHandle, MountOptions, ObjectStoreBackend,
};
use common::{pseudo_random, Moto};

const FILES: usize = 2000;
const BIG_FILES: [(usize, usize); 4] = [
    (0, 64 << 20),
    (500, 16 << 20),
    (1000, 8 << 20),
    (1500, 4 << 20),
];

fn file_size(index: usize) -> usize {
    BIG_FILES
        .iter()
        .find(|(i, _)| *i == index)
        .map(|(_, size)| *size)
        .unwrap_or((index * 7919) % (48 * 1024))
}

fn relative(index: usize) -> PathBuf {
    PathBuf::from(format!("d{:02}/f{index:04}", index % 20))
}

/// Writes the source tree; returns each file's blake3 digest.
fn generate_tree(root: &Path) -> BTreeMap<usize, blake3::Hash> {
    let mut digests = BTreeMap::new();
    for index in 0..FILES {
        let path = root.join(relative(index));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let data = pseudo_random(index as u64 + 1, file_size(index));
        std::fs::write(&path, &data).unwrap();
        digests.insert(index, blake3::hash(&data));
    }
    digests
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Reads and checks every file; returns the errors (path, errno) of unreadable ones.
fn verify_all(mnt: &Path, digests: &BTreeMap<usize, blake3::Hash>) -> Vec<(PathBuf, Option<i32>)> {
    let mut errors = Vec::new();
    for (index, digest) in digests {
        let path = mnt.join(relative(*index));
        match std::fs::read(&path) {
            Ok(data) => assert_eq!(
                blake3::hash(&data),
                *digest,
                "{} differs from its source",
                path.display()
            ),
            Err(err) => errors.push((path, err.raw_os_error())),
        }
    }
    errors
}

struct Fixture {
    dir: tempfile::TempDir,
    image: PathBuf,
    backend: Arc<dyn BlobBackend>,
}

impl Fixture {
    fn mount(&self, cache: &str) -> MountHandle {
        let mut config = CacheConfig::new(self.dir.path().join(cache));
        config.retry_base_delay = Duration::from_millis(20);
        let engine = Arc::new(CacheEngine::new(config, self.backend.clone()).unwrap());
        let mountpoint = self.dir.path().join("mnt");
        std::fs::create_dir_all(&mountpoint).unwrap();
        mount_image(MountOptions {
            image: self.image.clone(),
            mountpoint,
            engine,
            handler_threads: 4,
        })
        .unwrap()
    }
}

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn lazily_fetched_image_through_fanotify() {
    let scratch = tempfile::tempdir().unwrap();
    if let Err(reason) = check_support(scratch.path()) {
        common::skip(&reason);
        return;
    }
    let moto = match Moto::start(None) {
        Ok(moto) => moto,
        Err(reason) => {
            common::skip(&reason);
            return;
        }
    };
    let log = LogBuffer::default();
    let writer = log.clone();
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init();
    moto.create_bucket("berth");
    let s3_config = moto.s3_config("berth");
    let backend: Arc<dyn BlobBackend> = Arc::new(ObjectStoreBackend::s3(&s3_config).unwrap());

    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let digests = generate_tree(&dir.path().join("src"));
    let image = dir.path().join("image");
    let report = build_image(&BuildOptions {
        compression: Compression::None,
        ..BuildOptions::new(dir.path().join("src"), &image, backend.clone())
    })
    .unwrap();
    let total_chunks = report.manifest.chunks.len() as u64;
    eprintln!("built {} chunks in {:?}", total_chunks, started.elapsed());
    let fixture = Fixture {
        dir,
        image,
        backend: backend.clone(),
    };

    // Cold: reading one 4 MiB file fetches about its own chunks only.
    let step = Instant::now();
    let mount = fixture.mount("cache-a");
    let metrics = mount.engine().metrics();
    drop_caches();
    let small = std::fs::read(mount.mountpoint().join(relative(1500))).unwrap();
    assert_eq!(blake3::hash(&small), digests[&1500]);
    let fetched = metrics.chunks_fetched.load(Ordering::Relaxed);
    assert!(
        (4..=8).contains(&fetched),
        "a 4 MiB file fetched {fetched} chunks of {total_chunks}"
    );

    // Every file reads back identical to its source.
    assert!(verify_all(mount.mountpoint(), &digests).is_empty());
    let requests = metrics.backend_requests.load(Ordering::Relaxed);
    let fetched = metrics.chunks_fetched.load(Ordering::Relaxed);
    assert_eq!(
        fetched,
        mount.engine().ready_chunks(mount.blob().id()).unwrap(),
        "no chunk fetched twice"
    );
    // Second read after dropping the page cache: served from the cache file.
    drop_caches();
    assert!(verify_all(mount.mountpoint(), &digests).is_empty());
    assert_eq!(
        metrics.backend_requests.load(Ordering::Relaxed),
        requests,
        "warm reads hit the backend"
    );
    mount.unmount().unwrap();
    eprintln!("cold + warm reads: {:?}", step.elapsed());

    // Restart on the warm cache: nothing is refetched.
    let step = Instant::now();
    let mount = fixture.mount("cache-a");
    drop_caches();
    assert!(verify_all(mount.mountpoint(), &digests).is_empty());
    assert_eq!(
        mount
            .engine()
            .metrics()
            .backend_requests
            .load(Ordering::Relaxed),
        0
    );
    mount.unmount().unwrap();
    eprintln!("restart on warm cache: {:?}", step.elapsed());

    // 16 concurrent readers of one cold 64 MiB file: each chunk fetched once.
    let step = Instant::now();
    let mount = fixture.mount("cache-b");
    drop_caches();
    let path = mount.mountpoint().join(relative(0));
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || blake3::hash(&std::fs::read(path).unwrap()))
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.join().unwrap(), digests[&0]);
    }
    let metrics = mount.engine().metrics();
    let ready = mount.engine().ready_chunks(mount.blob().id()).unwrap();
    assert!(ready >= 64);
    assert_eq!(
        metrics.chunks_fetched.load(Ordering::Relaxed),
        ready,
        "a chunk was fetched twice"
    );
    mount.unmount().unwrap();
    eprintln!("16 concurrent readers: {:?}", step.elapsed());

    // The backend dies: reads fail (never zeros), then recover once it is back.
    let step = Instant::now();
    let mount = fixture.mount("cache-c");
    drop_caches();
    let port = moto.port;
    moto.kill();
    let victim = mount.mountpoint().join(relative(500));
    let err = std::fs::read(&victim).expect_err("a read without a backend must fail");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::EPERM)),
        "{err}"
    );
    let moto = Moto::start(Some(port)).unwrap();
    moto.create_bucket("berth");
    let raw_blob = report.raw_blob_path.clone().unwrap();
    backend
        .put_file(&report.manifest.object, &raw_blob)
        .unwrap();
    assert_eq!(
        blake3::hash(&std::fs::read(&victim).unwrap()),
        digests[&500]
    );
    mount.unmount().unwrap();
    eprintln!("backend death and recovery: {:?}", step.elapsed());

    // A chunk corrupted in the backend: its reads fail with an error naming it.
    let step = Instant::now();
    let bad_chunk = total_chunks / 2;
    let mut stored = std::fs::read(&raw_blob).unwrap();
    stored[(bad_chunk << 20) as usize + 100] ^= 0xff;
    let corrupt = fixture.dir.path().join("corrupt");
    std::fs::write(&corrupt, &stored).unwrap();
    backend.put_file(&report.manifest.object, &corrupt).unwrap();
    let mount = fixture.mount("cache-d");
    drop_caches();
    let errors = verify_all(mount.mountpoint(), &digests);
    assert!(
        !errors.is_empty(),
        "the corrupt chunk must make some read fail"
    );
    for (path, errno) in &errors {
        assert!(
            matches!(errno, Some(libc::EIO) | Some(libc::EPERM)),
            "{}: {errno:?}",
            path.display()
        );
    }
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    assert!(
        text.contains(&format!(
            "chunk {bad_chunk} of blob {} failed verification",
            report.manifest.blob_id
        )),
        "the log names the chunk"
    );
    assert!(
        mount
            .engine()
            .metrics()
            .verification_failures
            .load(Ordering::Relaxed)
            > 0
    );
    mount.unmount().unwrap();
    eprintln!(
        "corruption: {} files failed as expected, {:?}",
        errors.len(),
        step.elapsed()
    );
    eprintln!("total {:?}", started.elapsed());
}
