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
    if let Err(reason) = berth_cache::mount::check_support(dir.path()) {
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
    if let Err(reason) = berth_cache::mount::check_support(dir.path()) {
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
