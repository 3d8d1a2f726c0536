//! `berth image build` and `berth mount` end to end, as an operator runs them: build an image
//! of a generated tree into a `file://` backend, mount it lazily as a child process, read every
//! file back, stop it with SIGTERM. The mount needs root, erofs, fanotify pre-content events
//! (Linux 6.14) and mkfs.erofs; without them that test skips and says why (and fails under
//! `BERTH_TESTS_NO_SKIP=1`).

#[path = "common/skip.rs"]
mod skip;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const FILES: usize = 50;

fn berth() -> Command {
    Command::new(env!("CARGO_BIN_EXE_berth"))
}

/// Deterministic bytes; files whose index ends in 0 or 5 are text, so compression has
/// something to do.
fn file_contents(index: usize) -> Vec<u8> {
    let len = match index {
        0 => 0,
        7 => 1 << 20,
        21 => 700_000,
        _ => (index * 37_813) % 150_000,
    };
    if matches!(index % 10, 0 | 5) {
        let line = format!("file {index}: the quick brown fox jumps over the lazy dog\n");
        return line.bytes().cycle().take(len).collect();
    }
    let mut state = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn relative(index: usize) -> PathBuf {
    PathBuf::from(format!("dir{}/sub{}/file{index:02}", index % 5, index % 3))
}

fn generate_tree(root: &Path) -> usize {
    let mut total = 0;
    for index in 0..FILES {
        let path = root.join(relative(index));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let data = file_contents(index);
        total += data.len();
        fs::write(&path, data).unwrap();
    }
    std::os::unix::fs::symlink("dir1/sub1/file01", root.join("link")).unwrap();
    total
}

/// Whether `path` is a mount point, from this process's mount table.
fn is_mounted(path: &Path) -> bool {
    let wanted = path.to_str().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted))
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn terminate(child: &Child) {
    // SAFETY: sends a signal to our own child process.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

/// A `berth mount` child, stopped (SIGTERM, then SIGKILL) if a test fails half way.
struct MountProcess {
    child: Child,
    stderr: PathBuf,
}

impl MountProcess {
    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            terminate(&self.child);
            if wait_with_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap();
    eprintln!("{command:?}: {}", output.status);
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The counter `name` in a Prometheus text file.
fn metric(metrics: &str, name: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

#[test]
fn build_then_mount_lazily_and_stop_with_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = berth_ondemand::mount::check_support(dir.path()) {
        skip::skip(&reason);
        return;
    }
    let source = dir.path().join("source");
    let image = dir.path().join("image");
    let store = dir.path().join("store");
    let cache = dir.path().join("cache");
    let mnt = dir.path().join("mnt");
    let metrics_file = dir.path().join("metrics.prom");
    fs::create_dir_all(&mnt).unwrap();
    let total = generate_tree(&source);
    assert!(total > 3 << 20, "the tree holds {total} bytes");

    let build = run(berth()
        .args(["image", "build"])
        .arg(&source)
        .arg("--out")
        .arg(&image)
        .arg(format!("--backend=file://{}", store.display()))
        .args(["--chunk-size=256K", "--compression=lz4"]));
    assert!(
        build.status.success(),
        "image build failed: {}",
        text(&build.stderr)
    );
    assert!(
        text(&build.stdout).starts_with("Built "),
        "{}",
        text(&build.stdout)
    );
    assert!(
        !text(&build.stderr).contains(" WARN "),
        "an ordinary build logs no warning: {}",
        text(&build.stderr)
    );
    assert!(image.join("manifest.json").is_file());
    assert!(image.join("boot.img").is_file());
    assert!(
        !image.join("blob.raw").exists(),
        "blob.raw is only kept with --keep-raw-blob"
    );
    let stored: Vec<_> = fs::read_dir(store.join("blobs")).unwrap().collect();
    assert_eq!(stored.len(), 1, "one blob object is uploaded");

    let stderr = dir.path().join("mount.stderr");
    let child = berth()
        .arg("mount")
        .arg(&image)
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(&cache)
        .arg(format!("--backend=file://{}", store.display()))
        .arg("--metrics-file")
        .arg(&metrics_file)
        .args(["--metrics-interval=3600", "--threads=2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut mount = MountProcess { child, stderr };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&mnt) {
        if let Some(status) = mount.child.try_wait().unwrap() {
            panic!("berth mount exited with {status}: {}", mount.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "not mounted after 30 s: {}",
            mount.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The mount's kernel read-ahead window is berth's default, 4 MiB, not the kernel's
    // 128 KiB. (Another test's mount at the same moment leaves it alone, and says so.)
    let log = mount.stderr();
    match log.split_once("kernel read-ahead of the mount set to 4096 KiB (") {
        Some((_, rest)) => {
            let device = rest.split(')').next().unwrap();
            let window = fs::read_to_string(format!("/sys/class/bdi/{device}/read_ahead_kb"))
                .unwrap_or_else(|e| panic!("{device}: {e}"));
            assert_eq!(window.trim(), "4096", "{device}");
        }
        None => assert!(
            log.contains("erofs backing devices appeared"),
            "no word of the read-ahead window: {log}"
        ),
    }

    for index in 0..FILES {
        let path = mnt.join(relative(index));
        let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            data == file_contents(index),
            "{} differs from its source",
            path.display()
        );
    }
    assert_eq!(
        fs::read_link(mnt.join("link")).unwrap(),
        Path::new("dir1/sub1/file01")
    );
    let mut top: Vec<_> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    assert_eq!(top, ["dir0", "dir1", "dir2", "dir3", "dir4", "link"]);
    // The data came through the cache: the blob's sparse cache file is in --cache-dir.
    let cached: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".data"))
        .collect();
    assert_eq!(cached.len(), 1, "cache directory holds {cached:?}");

    terminate(&mount.child);
    let status = wait_with_timeout(&mut mount.child, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("berth mount ignored SIGTERM: {}", mount.stderr()));
    assert_eq!(status.code(), Some(0), "{}", mount.stderr());
    assert!(!is_mounted(&mnt), "{} is still mounted", mnt.display());
    assert!(
        fs::read_dir(&mnt).unwrap().next().is_none(),
        "the mount point is empty again"
    );
    // The metrics file was rewritten on exit (the interval is an hour) with the fetches.
    let metrics = fs::read_to_string(&metrics_file).unwrap();
    let fetched = metric(&metrics, "berth_cache_chunks_fetched_total").unwrap();
    assert!(fetched > 0, "no chunk fetched according to:\n{metrics}");
    let read = metric(&metrics, "berth_cache_backend_bytes_total").unwrap();
    assert!(read > 0, "no backend bytes according to:\n{metrics}");
}

#[test]
fn default_backend_is_the_image_directory() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = berth_ondemand::mount::check_support(dir.path()) {
        skip::skip(&reason);
        return;
    }
    let source = dir.path().join("source");
    let image = dir.path().join("image");
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&source).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    let data = file_contents(7);
    fs::write(source.join("big"), &data).unwrap();

    let build = run(berth()
        .args(["image", "build"])
        .arg(&source)
        .arg("--out")
        .arg(&image));
    assert!(build.status.success(), "{}", text(&build.stderr));
    assert!(
        image.join("blobs").is_dir(),
        "the blob is stored under --out"
    );

    // A backend without the blob is refused up front rather than failing every read.
    let wrong = run(berth()
        .arg("mount")
        .arg(&image)
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg(format!("--backend=file://{}", source.display())));
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        text(&wrong.stderr).contains("is not available from"),
        "{}",
        text(&wrong.stderr)
    );
    assert!(!is_mounted(&mnt));

    let stderr = dir.path().join("mount.stderr");
    let child = berth()
        .arg("mount")
        .arg(image.join("manifest.json"))
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut mount = MountProcess { child, stderr };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&mnt) {
        if let Some(status) = mount.child.try_wait().unwrap() {
            panic!("berth mount exited with {status}: {}", mount.stderr());
        }
        assert!(Instant::now() < deadline, "not mounted after 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(fs::read(mnt.join("big")).unwrap() == data);
    // SIGINT stops it as well.
    // SAFETY: sends a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(mount.child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let status = wait_with_timeout(&mut mount.child, Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", mount.stderr());
    assert!(!is_mounted(&mnt));
}

/// Failures are one sentence on stderr and exit status 1; bad flags are usage errors (2).
#[test]
fn errors_and_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");

    let build = run(berth()
        .args(["image", "build"])
        .arg(&missing)
        .arg("--out")
        .arg(dir.path().join("out")));
    assert_eq!(build.status.code(), Some(1));
    let message = text(&build.stderr);
    assert!(
        message.contains("does not exist") && message.contains("missing"),
        "{message}"
    );

    let mount = run(berth().arg("mount").arg(&missing).arg(dir.path()));
    assert_eq!(mount.status.code(), Some(1));
    let message = text(&mount.stderr);
    assert!(message.contains("is not an image"), "{message}");

    let bad_backend = run(berth()
        .args(["image", "build"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("out"))
        .arg("--backend=s3://"));
    assert_eq!(bad_backend.status.code(), Some(1));
    assert!(
        text(&bad_backend.stderr).contains("s3://"),
        "{}",
        text(&bad_backend.stderr)
    );

    for args in [
        &["image", "build", "--out=/tmp/x"][..],
        &["image", "build", "/src", "--out=/o", "--chunk-size=1000"],
        &["image", "build", "/src", "--out=/o", "--compression=gzip"],
        &["mount", "/image"],
        &["mount", "/image", "/mnt", "--threads=0"],
    ] {
        let output = run(berth().args(args));
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Starts `berth mount IMAGE MNT --cache-dir CACHE ARGS...` and waits until mounted.
fn start_mount(dir: &Path, image: &Path, mnt: &Path, cache: &Path, args: &[&str]) -> MountProcess {
    fs::create_dir_all(mnt).unwrap();
    let stderr = dir.join(format!(
        "mount-{}.stderr",
        mnt.file_name().unwrap().to_string_lossy()
    ));
    let child = berth()
        .arg("mount")
        .arg(image)
        .arg(mnt)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut mount = MountProcess { child, stderr };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(mnt) {
        if let Some(status) = mount.child.try_wait().unwrap() {
            panic!("berth mount exited with {status}: {}", mount.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "not mounted after 30 s: {}",
            mount.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    mount
}

/// The pid of the (single) child of `parent`, from /proc.
fn child_of(parent: u32) -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
        // Fields after the parenthesised command: state, ppid, ...
        let rest = stat.rsplit_once(')')?.1;
        let mut fields = rest.split_whitespace();
        let state = fields.next()?;
        let ppid: u32 = fields.next()?.parse().ok()?;
        (ppid == parent && state != "Z").then_some(pid)
    })
}

/// Waits for a worker of `supervisor` other than `old`.
fn worker_of(supervisor: u32, old: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = child_of(supervisor).filter(|&p| Some(p) != old) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no mount worker appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill9(pid: u32) {
    // SAFETY: sends a signal to a process this test started (directly or not).
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s != "Z"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

struct Built {
    image: PathBuf,
    store: PathBuf,
    files: Vec<(PathBuf, Vec<u8>)>,
}

/// An image of `files` (name, size) built with 64 KiB chunks into a `file://` store.
fn build(dir: &Path, name: &str, files: &[(&str, usize)], extra: &[&str]) -> Built {
    let source = dir.join(format!("{name}-src"));
    let image = dir.join(name);
    let store = dir.join(format!("{name}-store"));
    let mut out = Vec::new();
    for (i, (file, len)) in files.iter().enumerate() {
        let path = source.join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let seed: u64 = name.bytes().map(u64::from).sum::<u64>() * 1000 + i as u64;
        let data = random_bytes(seed, *len);
        fs::write(&path, &data).unwrap();
        out.push((PathBuf::from(file), data));
    }
    let build = run(berth()
        .args(["image", "build"])
        .arg(&source)
        .arg("--out")
        .arg(&image)
        .arg(format!("--backend=file://{}", store.display()))
        .arg("--chunk-size=64K")
        .args(extra));
    assert!(build.status.success(), "{}", text(&build.stderr));
    Built {
        image,
        store,
        files: out,
    }
}

/// Every chunk the cache's map marks ready holds exactly the data the manifest says.
fn assert_ready_chunks_are_correct(cache: &Path, image: &Path) -> u64 {
    let manifest = berth_cache::Manifest::load(&image.join("manifest.json")).unwrap();
    let id = berth_cache::manifest::parse_digest(&manifest.blob_id).unwrap();
    let (map, _) = berth_cache::chunkmap::ChunkMap::open(
        &cache.join(format!("{}.map", manifest.blob_id)),
        id,
        manifest.chunk_size,
        manifest.blob_size,
    )
    .unwrap();
    let data = fs::read(cache.join(format!("{}.data", manifest.blob_id))).unwrap();
    for index in (0..map.chunk_count()).filter(|&i| map.is_ready(i)) {
        let range = manifest.chunk_range(index);
        let actual = blake3::hash(&data[range.start as usize..range.end as usize]);
        assert_eq!(
            actual.to_hex().as_str(),
            manifest.chunks[index as usize].digest,
            "chunk {index} is marked ready but holds other data"
        );
    }
    map.ready_count()
}

/// `kill -9` of the serving worker in the middle of reads: the supervisor keeps the
/// fanotify group, starts a new worker and hands it the waiting reads, so readers see
/// their data and never zeros; with the backend gone as well, reads fail with EIO and
/// recover when it is back. Every chunk marked ready after all this is correct.
#[test]
fn killed_worker_is_replaced_and_reads_never_see_zeros() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = berth_ondemand::mount::check_support(dir.path()) {
        skip::skip(&reason);
        return;
    }
    let mut files = vec![("big", 48 << 20), ("big2", 32 << 20)];
    let names: Vec<String> = (0..20).map(|i| format!("small/f{i:02}")).collect();
    files.extend(names.iter().map(|n| (n.as_str(), 300_000)));
    let built = build(dir.path(), "image", &files, &[]);
    let cache = dir.path().join("cache");
    let mnt = dir.path().join("mnt");
    let backend = format!("--backend=file://{}", built.store.display());
    let mut mount = start_mount(
        dir.path(),
        &built.image,
        &mnt,
        &cache,
        &["--readahead=0", "--threads=2", &backend],
    );
    let supervisor = mount.child.id();
    let first = worker_of(supervisor, None);

    let manifest = berth_cache::Manifest::load(&built.image.join("manifest.json")).unwrap();
    let cache_file = cache.join(format!("{}.data", manifest.blob_id));
    let cached = || {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&cache_file).map_or(0, |m| m.blocks() * 512)
    };
    // Waits until `more` bytes more are cached than `from`, or the reader is done.
    let progress = |from: u64, more: u64, reader: &std::thread::JoinHandle<_>| loop {
        if cached() >= from + more || reader.is_finished() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    };

    // 1. Killed in the middle of a long cold read: the read completes correctly.
    let path = mnt.join("big");
    let reader = std::thread::spawn(move || fs::read(path));
    progress(0, 2 << 20, &reader);
    assert!(
        !reader.is_finished(),
        "the read should still be in progress"
    );
    kill9(first);
    let second = worker_of(supervisor, Some(first));
    let data = reader
        .join()
        .unwrap()
        .expect("the read survives the worker's death");
    assert!(data == built.files[0].1, "big differs from its source");

    // 2. Killed again and again while reading: same, and no chunk is marked ready
    //    without its data.
    let path = mnt.join("big2");
    let reader = std::thread::spawn(move || fs::read(path));
    let mut worker = second;
    let mut kills = 0;
    for _ in 0..4 {
        progress(cached(), 3 << 20, &reader);
        if reader.is_finished() {
            break;
        }
        kill9(worker);
        kills += 1;
        worker = worker_of(supervisor, Some(worker));
    }
    assert!(kills >= 1, "no kill landed during the read");
    let data = reader
        .join()
        .unwrap()
        .expect("the read survives repeated deaths");
    assert!(data == built.files[1].1, "big2 differs from its source");

    // 3. Worker and backend gone: an unfetched file fails with EIO, never zeros; once
    //    the backend is back it reads correctly.
    let away = dir.path().join("store-away");
    fs::rename(&built.store, &away).unwrap();
    kill9(worker);
    let worker = worker_of(supervisor, Some(worker));
    let err = fs::read(mnt.join(&built.files[2].0)).expect_err("no backend: the read must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    fs::rename(&away, &built.store).unwrap();
    for (name, expected) in &built.files[2..] {
        assert!(
            fs::read(mnt.join(name)).unwrap() == *expected,
            "{}",
            name.display()
        );
    }
    assert!(alive(worker));
    terminate(&mount.child);
    let status = wait_with_timeout(&mut mount.child, Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", mount.stderr());
    assert!(!is_mounted(&mnt));
    let log = mount.stderr();
    assert!(log.contains("the mount worker died"), "{log}");
    let ready = assert_ready_chunks_are_correct(&cache, &built.image);
    // A killed worker had synced little or nothing of what it fetched (the engine's
    // group commit waits for a pause in the fetches); its successor adopted those chunks
    // from their pending record instead of fetching them again. So every chunk read,
    // which is every chunk of the blob, ends up marked.
    assert!(
        log.contains("adopted chunks an earlier process wrote but had not synced"),
        "{log}"
    );
    assert_eq!(
        ready,
        manifest.chunks.len() as u64,
        "chunks marked ready of the blob's {}",
        manifest.chunks.len()
    );
}

/// `kill -9` of the supervisor: the worker, which holds a duplicate of the group, takes
/// over; reads go on (one in flight may fail with EIO, none returns wrong data), and
/// SIGTERM to the worker then unmounts.
#[test]
fn killed_supervisor_leaves_the_worker_serving() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = berth_ondemand::mount::check_support(dir.path()) {
        skip::skip(&reason);
        return;
    }
    let mut files = vec![("big", 32 << 20)];
    let names: Vec<String> = (0..10).map(|i| format!("small/f{i:02}")).collect();
    files.extend(names.iter().map(|n| (n.as_str(), 200_000)));
    let built = build(dir.path(), "image", &files, &[]);
    let cache = dir.path().join("cache");
    let mnt = dir.path().join("mnt");
    let backend = format!("--backend=file://{}", built.store.display());
    let mut mount = start_mount(
        dir.path(),
        &built.image,
        &mnt,
        &cache,
        &["--readahead=0", &backend],
    );
    let supervisor = mount.child.id();
    let worker = worker_of(supervisor, None);
    let path = mnt.join("big");
    let reader = std::thread::spawn(move || fs::read(path));
    std::thread::sleep(Duration::from_millis(300));
    kill9(supervisor);
    let _ = mount.child.wait();
    match reader.join().unwrap() {
        Ok(data) => assert!(data == built.files[0].1, "big differs from its source"),
        Err(err) => assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}"),
    }
    assert!(is_mounted(&mnt), "the mount stays");
    for (name, expected) in &built.files {
        assert!(
            fs::read(mnt.join(name)).unwrap() == *expected,
            "{}",
            name.display()
        );
    }
    // SAFETY: signals the worker this test's mount started.
    assert_eq!(
        unsafe { libc::kill(worker as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(worker) {
        assert!(Instant::now() < deadline, "the worker ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_mounted(&mnt), "the worker unmounts before it exits");
    assert!(mount.stderr().contains("takes over"), "{}", mount.stderr());
}

/// A tar archive keeps modes, owners and xattrs through `berth image build x.tar` and
/// the mount.
#[test]
fn tar_input_keeps_modes_owners_and_xattrs() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = berth_ondemand::mount::check_support(dir.path()) {
        skip::skip(&reason);
        return;
    }
    let source = dir.path().join("tree");
    fs::create_dir_all(source.join("bin")).unwrap();
    let tool = source.join("bin/tool");
    let data = random_bytes(5, 200_000);
    fs::write(&tool, &data).unwrap();
    // chown clears setuid: owner first, then the mode.
    std::os::unix::fs::chown(&tool, Some(1234), Some(5678)).unwrap();
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o4751)).unwrap();
    let name = std::ffi::CString::new("user.berth").unwrap();
    let c_tool = std::ffi::CString::new(tool.to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated strings and a live value buffer.
    let rc = unsafe {
        libc::setxattr(
            c_tool.as_ptr(),
            name.as_ptr(),
            b"kept".as_ptr().cast(),
            4,
            0,
        )
    };
    if rc != 0 {
        skip::skip(&format!(
            "the scratch filesystem has no user xattrs: {}",
            std::io::Error::last_os_error()
        ));
        return;
    }
    std::os::unix::fs::symlink("bin/tool", source.join("link")).unwrap();
    let archive = dir.path().join("rootfs.tar");
    let tar = run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-cf"])
        .arg(&archive)
        .arg("-C")
        .arg(&source)
        .arg("."));
    assert!(tar.status.success(), "{}", text(&tar.stderr));
    let image = dir.path().join("image");
    let build = run(berth()
        .args(["image", "build"])
        .arg(&archive)
        .arg("--out")
        .arg(&image));
    assert!(build.status.success(), "{}", text(&build.stderr));
    let mnt = dir.path().join("mnt");
    let mount = start_mount(dir.path(), &image, &mnt, &dir.path().join("cache"), &[]);
    let mounted = mnt.join("bin/tool");
    let meta = fs::metadata(&mounted).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o4751);
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert!(fs::read(&mounted).unwrap() == data);
    let c_mounted = std::ffi::CString::new(mounted.to_str().unwrap()).unwrap();
    let mut value = [0u8; 16];
    // SAFETY: NUL-terminated strings and a live buffer of the given size.
    let n = unsafe {
        libc::getxattr(
            c_mounted.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    assert_eq!(n, 4, "getxattr: {}", std::io::Error::last_os_error());
    assert_eq!(&value[..4], b"kept");
    assert_eq!(
        fs::read_link(mnt.join("link")).unwrap(),
        Path::new("bin/tool")
    );
    drop(mount);
    assert!(!is_mounted(&mnt));
}

/// `--cache-capacity` evicts the cache of an image no longer mounted, never one in use
/// (not even by another `berth mount` on the same cache directory), and a second mount
/// of an image already served from the same cache directory is refused.
#[test]
fn cache_capacity_evicts_only_blobs_not_in_use() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = berth_ondemand::mount::check_support(dir.path()) {
        skip::skip(&reason);
        return;
    }
    let a = build(dir.path(), "a", &[("one", 3 << 20)], &[]);
    let b = build(dir.path(), "b", &[("two", 3 << 20)], &[]);
    let c = build(dir.path(), "c", &[("three", 3 << 20)], &[]);
    let blob_file = |built: &Built| {
        let manifest = berth_cache::Manifest::load(&built.image.join("manifest.json")).unwrap();
        dir.path()
            .join("cache")
            .join(format!("{}.data", manifest.blob_id))
    };
    let cache = dir.path().join("cache");
    // A is read fully and stays mounted (in use).
    let backend = |built: &Built| format!("--backend=file://{}", built.store.display());
    let mount_a = start_mount(
        dir.path(),
        &a.image,
        &dir.path().join("mnt-a"),
        &cache,
        &[&backend(&a)],
    );
    assert!(fs::read(dir.path().join("mnt-a/one")).unwrap() == a.files[0].1);
    // A second mount of A from the same cache directory is refused.
    fs::create_dir_all(dir.path().join("mnt-a2")).unwrap();
    let again = run(berth()
        .arg("mount")
        .arg(&a.image)
        .arg(dir.path().join("mnt-a2"))
        .arg("--cache-dir")
        .arg(&cache)
        .arg(backend(&a)));
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("in use by another process"),
        "{}",
        text(&again.stderr)
    );
    // B is read and unmounted: its cache is dormant.
    let mount_b = start_mount(
        dir.path(),
        &b.image,
        &dir.path().join("mnt-b"),
        &cache,
        &[&backend(&b)],
    );
    assert!(fs::read(dir.path().join("mnt-b/two")).unwrap() == b.files[0].1);
    drop(mount_b);
    // C with a 4 MiB capacity: B (not in use) is evicted, A (in use elsewhere) is not.
    let metrics = dir.path().join("metrics.prom");
    let mount_c = start_mount(
        dir.path(),
        &c.image,
        &dir.path().join("mnt-c"),
        &cache,
        &[
            "--cache-capacity=4M",
            "--metrics-file",
            metrics.to_str().unwrap(),
            &backend(&c),
        ],
    );
    assert!(fs::read(dir.path().join("mnt-c/three")).unwrap() == c.files[0].1);
    assert!(
        !blob_file(&b).exists(),
        "B's cache should have been evicted"
    );
    assert!(blob_file(&a).exists(), "A is in use and must stay");
    assert!(blob_file(&c).exists());
    drop(mount_c);
    let metrics = fs::read_to_string(&metrics).unwrap();
    assert!(
        metric(&metrics, "berth_cache_evictions_total").unwrap() >= 1,
        "{metrics}"
    );
    drop(mount_a);
}

/// `--prefetch-list` at build time and `--prefetch list` (the default) at mount time: the
/// listed files are fetched in the background before anyone reads them, so they read
/// back even with the backend gone, while a file not listed fails with EIO.
#[test]
fn prefetch_list_is_fetched_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = berth_ondemand::mount::check_support(dir.path()) {
        skip::skip(&reason);
        return;
    }
    let list = dir.path().join("prefetch.txt");
    fs::write(&list, "# boot first\n/hot\nwarm\n").unwrap();
    let built = build(
        dir.path(),
        "image",
        &[
            ("hot/a", 2 << 20),
            ("hot/b", 1 << 20),
            ("cold", 4 << 20),
            ("warm", 700_000),
        ],
        &["--prefetch-list", list.to_str().unwrap()],
    );
    let manifest = berth_cache::Manifest::load(&built.image.join("manifest.json")).unwrap();
    let paths: Vec<&str> = manifest.prefetch.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/hot", "warm"]);
    let listed: u64 = manifest
        .prefetch
        .iter()
        .flat_map(|e| e.ranges.iter())
        .map(|[start, end]| end - start)
        .sum();
    assert!(listed >= (3 << 20) + 700_000, "{listed}");
    let cache = dir.path().join("cache");
    let mnt = dir.path().join("mnt");
    let backend = format!("--backend=file://{}", built.store.display());
    let mount = start_mount(
        dir.path(),
        &built.image,
        &mnt,
        &cache,
        &[&backend, "--readahead=0"],
    );
    // Nobody reads; the listed chunks arrive anyway.
    let cache_file = cache.join(format!("{}.data", manifest.blob_id));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        use std::os::unix::fs::MetadataExt;
        let cached = fs::metadata(&cache_file).map_or(0, |m| m.blocks() * 512);
        if cached >= listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {cached} of {listed} bytes prefetched"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    fs::rename(&built.store, dir.path().join("store-away")).unwrap();
    for (name, expected) in &built.files {
        let read = fs::read(mnt.join(name));
        if name.starts_with("cold") {
            let err = read.expect_err("not prefetched, no backend: must fail");
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        } else {
            assert!(read.unwrap() == *expected, "{}", name.display());
        }
    }
    drop(mount);
    assert!(!is_mounted(&mnt));
}

/// SIGTERM while a file is open in the mount: it stays mounted and served (cold data
/// still reads correctly), and unmounts and exits 0 once the file is closed.
#[test]
fn busy_mount_is_served_until_released() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = berth_ondemand::mount::check_support(dir.path()) {
        skip::skip(&reason);
        return;
    }
    let built = build(
        dir.path(),
        "image",
        &[("held", 1 << 20), ("later", 2 << 20)],
        &[],
    );
    let mnt = dir.path().join("mnt");
    let backend = format!("--backend=file://{}", built.store.display());
    let mut mount = start_mount(
        dir.path(),
        &built.image,
        &mnt,
        &dir.path().join("cache"),
        &[&backend],
    );
    let held = fs::File::open(mnt.join("held")).unwrap();
    terminate(&mount.child);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        mount.child.try_wait().unwrap().is_none(),
        "exited with a file open"
    );
    assert!(is_mounted(&mnt));
    assert!(fs::read(mnt.join("later")).unwrap() == built.files[1].1);
    drop(held);
    let status = wait_with_timeout(&mut mount.child, Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", mount.stderr());
    assert!(!is_mounted(&mnt));
    assert!(mount.stderr().contains("is busy"), "{}", mount.stderr());
}

/// A worker that cannot come back (its cache directory is gone): waiting reads are
/// denied with EIO after the grace period rather than hanging or returning zeros, and
/// reads work again once a worker can start.
#[test]
fn reads_fail_with_eio_while_no_worker_can_start() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = berth_ondemand::mount::check_support(dir.path()) {
        skip::skip(&reason);
        return;
    }
    let built = build(
        dir.path(),
        "image",
        &[("first", 1 << 20), ("second", 1 << 20)],
        &[],
    );
    let mnt = dir.path().join("mnt");
    let cache = dir.path().join("cache");
    let backend = format!("--backend=file://{}", built.store.display());
    let mut mount = start_mount(
        dir.path(),
        &built.image,
        &mnt,
        &cache,
        &[&backend, "--readahead=0"],
    );
    assert!(fs::read(mnt.join("first")).unwrap() == built.files[0].1);
    let worker = worker_of(mount.child.id(), None);
    let away = dir.path().join("cache-away");
    fs::rename(&cache, &away).unwrap();
    kill9(worker);
    let err = fs::read(mnt.join("second")).expect_err("no worker: the read must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    fs::rename(&away, &cache).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let data = loop {
        match fs::read(mnt.join("second")) {
            Ok(data) => break data,
            Err(err) => {
                assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
                assert!(
                    Instant::now() < deadline,
                    "no worker came back: {}",
                    mount.stderr()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(data == built.files[1].1);
    assert!(
        mount.stderr().contains("no mount worker"),
        "{}",
        mount.stderr()
    );
    terminate(&mount.child);
    let status = wait_with_timeout(&mut mount.child, Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", mount.stderr());
}

/// A bootstrap that is not the one the manifest was built with is refused before
/// anything is mounted, and so is a manifest that does not validate.
#[test]
fn wrong_bootstrap_or_corrupt_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    if std::process::Command::new("mkfs.erofs")
        .arg("--help")
        .output()
        .is_err()
    {
        skip::skip("mkfs.erofs (erofs-utils) is not installed");
        return;
    }
    let built = build(dir.path(), "image", &[("file", 100_000)], &[]);
    let other = build(dir.path(), "other", &[("else", 100_000)], &[]);
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    fs::copy(other.image.join("boot.img"), built.image.join("boot.img")).unwrap();
    let output = run(berth()
        .arg("mount")
        .arg(&built.image)
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(dir.path().join("cache")));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("belongs to another image"),
        "{}",
        text(&output.stderr)
    );
    assert!(!is_mounted(&mnt));

    let manifest = other.image.join("manifest.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    value["chunks"][0]["stored_size"] = serde_json::json!(1u64 << 40);
    fs::write(&manifest, serde_json::to_vec(&value).unwrap()).unwrap();
    let output = run(berth()
        .arg("mount")
        .arg(&other.image)
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(dir.path().join("cache")));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("chunks[0].stored_size"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn check_reads_every_chunk_and_names_the_ones_not_intact() {
    let dir = tempfile::tempdir().unwrap();
    let built = build(
        dir.path(),
        "check",
        &[("big", 3 << 20), ("small", 5000)],
        &["--compression=zstd"],
    );
    let manifest = berth_cache::Manifest::load(&built.image.join("manifest.json")).unwrap();
    let store = format!("--backend=file://{}", built.store.display());
    let check = |extra: &[&str]| {
        run(berth()
            .args(["image", "check"])
            .arg(&built.image)
            .arg(&store)
            .args(extra))
    };
    let clean = check(&["--jobs", "3"]);
    assert!(clean.status.success(), "{}", text(&clean.stderr));
    let summary = text(&clean.stdout);
    assert!(
        summary.contains(&format!("Checked blob {}", manifest.blob_id))
            && summary.contains("every chunk matches its digest")
            && summary.contains("with 3 jobs"),
        "{summary}"
    );

    // Two chunks damaged in the backend: both named, the command fails.
    let object = built.store.join(&manifest.object);
    let mut stored = fs::read(&object).unwrap();
    for bad in [1usize, 7] {
        let entry = &manifest.chunks[bad];
        stored[(entry.offset + entry.stored_size / 3) as usize] ^= 0x20;
    }
    fs::write(&object, &stored).unwrap();
    let damaged = check(&[]);
    assert_eq!(damaged.status.code(), Some(1));
    let log = text(&damaged.stderr);
    for bad in [1, 7] {
        assert!(
            log.contains(&format!("Chunk {bad} of blob {}", manifest.blob_id)),
            "{log}"
        );
    }
    assert!(
        log.contains(&format!("2 of the {} chunks", manifest.chunks.len())),
        "{log}"
    );

    // A backend without the blob, and a blob of the wrong size, say so.
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let missing = run(berth()
        .args(["image", "check"])
        .arg(&built.image)
        .arg("--backend")
        .arg(&elsewhere));
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains(&manifest.object));
    fs::write(&object, &stored[..stored.len() - 1]).unwrap();
    let short = check(&[]);
    assert_eq!(short.status.code(), Some(1));
    assert!(
        text(&short.stderr).contains("but the manifest describes"),
        "{}",
        text(&short.stderr)
    );
}

#[test]
fn inspect_names_the_chunks_of_paths_and_auto_mode_says_what_it_chose() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = berth_ondemand::mount::check_support(dir.path()) {
        skip::skip(&reason);
        return;
    }
    let source = dir.path().join("source");
    let image = dir.path().join("image");
    generate_tree(&source);
    let build = run(berth()
        .args(["image", "build"])
        .arg(&source)
        .arg("--out")
        .arg(&image)
        .arg("--chunk-size=64K"));
    assert!(build.status.success(), "{}", text(&build.stderr));

    // The whole image in short.
    let summary = run(berth().args(["image", "inspect"]).arg(&image));
    assert!(summary.status.success(), "{}", text(&summary.stderr));
    let summary = text(&summary.stdout);
    let field = |name: &str| {
        summary
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}\t")))
            .unwrap_or_else(|| panic!("no {name} in {summary}"))
            .to_string()
    };
    assert_eq!(field("chunk_size"), "65536");
    let chunks: u64 = field("chunks").parse().unwrap();
    // Per path: a 1 MiB file spans 16 or 17 chunks of 64 KiB; the empty file none; a
    // directory the chunks of everything below it.
    let paths = run(berth().args(["image", "inspect"]).arg(&image).args([
        "dir2/sub1/file07",
        "dir0/sub0/file00",
        "/",
    ]));
    assert!(paths.status.success(), "{}", text(&paths.stderr));
    let lines: Vec<Vec<String>> = text(&paths.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0][0], "dir2/sub1/file07");
    let big: u64 = lines[0][1].parse().unwrap();
    assert!((16..=17).contains(&big), "{lines:?}");
    assert_eq!(lines[1][1], "0", "{lines:?}");
    assert_eq!(
        lines[2][1],
        chunks.to_string(),
        "the root holds every chunk"
    );
    let missing = run(berth()
        .args(["image", "inspect"])
        .arg(&image)
        .arg("no/such"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("no/such is not in the image"));

    // Without --mode, berth mount picks fanotify on a kernel with pre-content events,
    // and says so.
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let stderr = dir.path().join("mount.stderr");
    let child = berth()
        .arg("mount")
        .arg(&image)
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut mount = MountProcess { child, stderr };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&mnt) {
        if let Some(status) = mount.child.try_wait().unwrap() {
            panic!("berth mount exited with {status}: {}", mount.stderr());
        }
        assert!(Instant::now() < deadline, "not mounted: {}", mount.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        mount.stderr().contains("Mode fanotify"),
        "{}",
        mount.stderr()
    );
    assert_eq!(fs::read(mnt.join(relative(7))).unwrap(), file_contents(7));
    terminate(&mount.child);
    let status = wait_with_timeout(&mut mount.child, Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", mount.stderr());

    // fscache mode on a kernel without cachefiles fails at once, saying why.
    if !berth_ondemand::cachefiles::device::available() {
        let cachefiles = dir.path().join("cachefiles");
        let refused = run(berth()
            .arg("mount")
            .arg(&image)
            .arg(&mnt)
            .args(["--mode", "fscache", "--cachefiles-dir"])
            .arg(&cachefiles)
            .arg("--cache-dir")
            .arg(dir.path().join("cache")));
        assert_eq!(refused.status.code(), Some(1));
        assert!(
            text(&refused.stderr).contains("the kernel has no cachefiles"),
            "{}",
            text(&refused.stderr)
        );
        assert!(!is_mounted(&mnt));
    }
}
