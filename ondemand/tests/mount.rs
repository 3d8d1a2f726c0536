//! End to end (root): an erofs image served lazily from a moto S3 server through
//! fanotify pre-content events. Skips with a reason when root, erofs, fanotify
//! pre-content, mkfs.erofs or moto are unavailable.

#[path = "../../cache/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_cache::{BlobBackend, CacheConfig, CacheEngine, Compression, ObjectStoreBackend};
use berth_ondemand::mount::check_support;
use berth_ondemand::{build_image, mount_image, BuildOptions, MountHandle, MountOptions};
use common::{pseudo_random, CountingProxy, Moto};

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
        self.mount_with(cache, |_| {})
    }

    fn mount_with(&self, cache: &str, tweak: impl FnOnce(&mut CacheConfig)) -> MountHandle {
        let mut config = CacheConfig::new(self.dir.path().join(cache));
        config.retry_base_delay = Duration::from_millis(20);
        tweak(&mut config);
        let engine = Arc::new(CacheEngine::new(config, self.backend.clone()).unwrap());
        let mountpoint = self.dir.path().join("mnt");
        std::fs::create_dir_all(&mountpoint).unwrap();
        mount_image(MountOptions {
            image: self.image.clone(),
            mountpoint,
            engine,
            handler_threads: 4,
            kernel_readahead: berth_ondemand::readahead::DEFAULT_KERNEL_READAHEAD,
        })
        .unwrap()
    }
}

/// No read-ahead and no merging: the backend sees exactly the chunks read.
fn exact(config: &mut CacheConfig) {
    config.readahead_max_bytes = 0;
    config.merge_max_bytes = 1 << 20;
}

/// The chunks the proxy saw requested (uncompressed blob: stored offsets are blob
/// offsets), each once, or the test fails.
fn chunks_requested(
    manifest: &berth_cache::Manifest,
    reads: &[std::ops::Range<u64>],
) -> BTreeSet<u64> {
    let mut chunks = BTreeSet::new();
    for range in reads {
        for chunk in manifest.chunks_of(range.clone()) {
            assert!(chunks.insert(chunk), "chunk {chunk} was requested twice");
        }
    }
    chunks
}

/// The chunks holding the data of the files `indexes`.
fn chunks_of_files(
    image: &berth_ondemand::erofs::ErofsImage,
    manifest: &berth_cache::Manifest,
    indexes: impl Iterator<Item = usize>,
) -> BTreeSet<u64> {
    let mut chunks = BTreeSet::new();
    for index in indexes {
        let path = relative(index);
        for range in image.data_ranges(path.to_str().unwrap()).unwrap().unwrap() {
            chunks.extend(manifest.chunks_of(range));
        }
    }
    chunks
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
    let s3_config = common::s3_config(&moto, "berth");
    // Uploads go straight to the server; the mounts read through a proxy that records
    // what the server is asked for.
    let direct: Arc<dyn BlobBackend> = Arc::new(ObjectStoreBackend::s3(&s3_config).unwrap());
    let proxy = CountingProxy::start(moto.port);
    let proxied = berth_cache::S3Config {
        endpoint: Some(proxy.endpoint()),
        ..s3_config.clone()
    };
    let backend: Arc<dyn BlobBackend> = Arc::new(ObjectStoreBackend::s3(&proxied).unwrap());

    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let digests = generate_tree(&dir.path().join("src"));
    let image = dir.path().join("image");
    let report = build_image(&BuildOptions {
        compression: Compression::None,
        ..BuildOptions::new(dir.path().join("src"), &image, direct.clone())
    })
    .unwrap();
    let manifest = report.manifest.clone();
    let object = manifest.object.clone();
    let total_chunks = manifest.chunks.len() as u64;
    let erofs = berth_ondemand::erofs::ErofsImage::open(&report.bootstrap_path).unwrap();
    eprintln!("built {} chunks in {:?}", total_chunks, started.elapsed());
    let fixture = Fixture {
        dir,
        image,
        backend: backend.clone(),
    };

    // Cold: reading one 4 MiB file makes the server serve exactly that file's chunks.
    let step = Instant::now();
    let mount = fixture.mount_with("cache-a", exact);
    let metrics = mount.engine().metrics();
    drop_caches();
    let mark = proxy.count();
    let small = std::fs::read(mount.mountpoint().join(relative(1500))).unwrap();
    assert_eq!(blake3::hash(&small), digests[&1500]);
    let requested = chunks_requested(&manifest, &proxy.range_reads(&object, mark));
    let expected = chunks_of_files(&erofs, &manifest, [1500].into_iter());
    assert_eq!(
        requested, expected,
        "the server served other chunks than the file's"
    );

    // Every file reads back identical to its source; no chunk is requested twice.
    assert!(verify_all(mount.mountpoint(), &digests).is_empty());
    let requested = chunks_requested(&manifest, &proxy.range_reads(&object, mark));
    assert_eq!(
        requested.len() as u64,
        mount.engine().ready_chunks(mount.blob().id()).unwrap(),
    );
    let requests = metrics.backend_requests.load(Ordering::Relaxed);
    // Second read after dropping the page cache: served from the cache file.
    drop_caches();
    let mark = proxy.count();
    assert!(verify_all(mount.mountpoint(), &digests).is_empty());
    assert_eq!(
        proxy.range_reads(&object, mark),
        vec![],
        "warm reads reached the server"
    );
    assert_eq!(metrics.backend_requests.load(Ordering::Relaxed), requests);
    mount.unmount().unwrap();
    eprintln!("cold + warm reads: {:?}", step.elapsed());

    // Restart on the warm cache: nothing is refetched.
    let step = Instant::now();
    let mount = fixture.mount("cache-a");
    drop_caches();
    let mark = proxy.count();
    assert!(verify_all(mount.mountpoint(), &digests).is_empty());
    assert_eq!(proxy.range_reads(&object, mark), vec![]);
    mount.unmount().unwrap();
    eprintln!("restart on warm cache: {:?}", step.elapsed());

    // A partially warm cache: restarted, the fanotify mark stays (chunks are missing),
    // and the server is asked only for chunks not cached before.
    let step = Instant::now();
    let mount = fixture.mount_with("cache-p", exact);
    drop_caches();
    let mark = proxy.count();
    let first_half: BTreeMap<usize, blake3::Hash> =
        digests.range(..1000).map(|(k, v)| (*k, *v)).collect();
    assert!(verify_all(mount.mountpoint(), &first_half).is_empty());
    let before = chunks_requested(&manifest, &proxy.range_reads(&object, mark));
    mount.unmount().unwrap();
    let mount = fixture.mount_with("cache-p", exact);
    assert!(!mount.blob().is_complete());
    drop_caches();
    let mark = proxy.count();
    assert!(verify_all(mount.mountpoint(), &digests).is_empty());
    let after = chunks_requested(&manifest, &proxy.range_reads(&object, mark));
    assert!(
        before.is_disjoint(&after),
        "refetched {:?}",
        before.intersection(&after).collect::<Vec<_>>()
    );
    assert_eq!(before.len() + after.len(), total_chunks as usize);
    assert!(
        mount.engine().metrics().chunk_hits.load(Ordering::Relaxed) > 0,
        "reads of cached chunks went through the fanotify handler"
    );
    mount.unmount().unwrap();
    eprintln!("partially warm restart: {:?}", step.elapsed());

    // 16 concurrent readers of one cold 64 MiB file: each chunk fetched once.
    let step = Instant::now();
    let mount = fixture.mount("cache-b");
    drop_caches();
    let mark = proxy.count();
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
    assert!(engine_wait_idle(&mount));
    assert_eq!(
        chunks_requested(&manifest, &proxy.range_reads(&object, mark)).len() as u64,
        mount.engine().ready_chunks(mount.blob().id()).unwrap()
    );
    mount.unmount().unwrap();
    eprintln!("16 concurrent readers: {:?}", step.elapsed());

    // The backend dies in the middle of a cold 64 MiB read: the reader gets an error,
    // and every byte it got before is right; reads recover once the backend is back.
    let step = Instant::now();
    let mount = fixture.mount_with("cache-c", exact);
    drop_caches();
    proxy.set_delay(Duration::from_millis(30));
    let mark = proxy.count();
    let victim = mount.mountpoint().join(relative(0));
    let expected = pseudo_random(1, file_size(0));
    let reader = {
        let victim = victim.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::File::open(victim).unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match std::io::Read::read(&mut file, &mut buf) {
                    Ok(0) => return (got, None),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(err) => return (got, Some(err)),
                }
            }
        })
    };
    while proxy.range_reads(&object, mark).len() < 5 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let port = moto.port;
    moto.kill();
    let (got, err) = reader.join().unwrap();
    let err = err.expect("a read without a backend must fail");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::EPERM)),
        "{err}"
    );
    assert!(
        got.len() < expected.len() && got[..] == expected[..got.len()],
        "bytes read before the failure are wrong"
    );
    proxy.set_delay(Duration::ZERO);
    let moto = Moto::start(Some(port)).unwrap();
    moto.create_bucket("berth");
    let raw_blob = report.raw_blob_path.clone().unwrap();
    direct.put_file(&object, &raw_blob).unwrap();
    assert_eq!(blake3::hash(&std::fs::read(&victim).unwrap()), digests[&0]);
    mount.unmount().unwrap();
    eprintln!("backend death mid-read and recovery: {:?}", step.elapsed());

    // A chunk corrupted in the backend: its reads fail with an error naming it.
    let step = Instant::now();
    let bad_chunk = total_chunks / 2;
    let mut stored = std::fs::read(&raw_blob).unwrap();
    stored[(bad_chunk << 20) as usize + 100] ^= 0xff;
    let corrupt = fixture.dir.path().join("corrupt");
    std::fs::write(&corrupt, &stored).unwrap();
    direct.put_file(&object, &corrupt).unwrap();
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

fn engine_wait_idle(mount: &MountHandle) -> bool {
    mount.engine().wait_background_idle(Duration::from_secs(60))
}
