//! `berth block commit`: an overlay written through `berth block serve-vhost` (driven by
//! the repo's own frontend) is folded into a new block image, which, served again without
//! the overlay, reads byte for byte what the image with the overlay read. The image and
//! the overlay are left as they were; mismatched or busy overlays and unusable output
//! directories are refused. Unprivileged: no ublk, no root.

#[path = "common/frontend_util.rs"]
mod frontend_util;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use berth_frontend::blk::status;
use berth_frontend::{BlkDeviceConfig, VhostUserBlk};
use frontend_util::{describe_status, Daemon};

const BLOCK: usize = 4096;
/// The image: 6 MiB and three blocks (the last 64 KiB chunk is short).
const SIZE: usize = (6 << 20) + 3 * BLOCK;
const SECTOR: usize = 512;

/// Deterministic bytes that do not compress.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The source disk: noise with two zero regions (free space).
fn source_content(seed: u64) -> Vec<u8> {
    let mut content = noise(seed, SIZE);
    content[1 << 20..2 << 20].fill(0);
    content[4 << 20..(4 << 20) + (512 << 10)].fill(0);
    content
}

fn berth(args: &[&str], paths: &[&Path]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_berth"));
    command.args(args).args(paths);
    command.output().expect("run berth")
}

fn assert_ok(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `berth image build --block` of `content` into `dir/name`.
fn build_image(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let source = dir.join(format!("{name}.raw"));
    fs::write(&source, content).unwrap();
    let image = dir.join(name);
    let built = berth(
        &["image", "build", "--block", "--chunk-size", "64K", "--out"],
        &[&image, &source],
    );
    assert_ok(&built, "image build");
    image
}

/// Every file below `dir` with its content.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// A `berth block serve-vhost` daemon and a frontend connected to it.
struct Served {
    daemon: Daemon,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(target: &Path, cache: &Path, overlay: Option<&Path>) -> (Served, VhostUserBlk) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("blk.sock");
        let mut args: Vec<String> = vec![
            "block".into(),
            "serve-vhost".into(),
            "--socket-path".into(),
            socket.display().to_string(),
            "--cache-dir".into(),
            cache.display().to_string(),
        ];
        if let Some(overlay) = overlay {
            args.push("--overlay".into());
            args.push(overlay.display().to_string());
        }
        args.push(target.display().to_string());
        let mut daemon = Daemon::spawn(&args);
        daemon.wait_for_socket(&socket);
        let device = match VhostUserBlk::connect(
            &socket,
            BlkDeviceConfig::default(),
            Duration::from_secs(10),
        ) {
            Ok(device) => device,
            Err(e) => panic!("cannot connect: {e}\n--- stderr ---\n{}", daemon.stderr()),
        };
        (
            Served {
                daemon,
                socket,
                _dir: dir,
            },
            device,
        )
    }

    fn finish(mut self, device: VhostUserBlk) {
        device.disconnect();
        let status = self
            .daemon
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the daemon did not exit after the frontend left"));
        assert!(
            status.success(),
            "daemon ended with {}\n--- stderr ---\n{}",
            describe_status(status),
            self.daemon.stderr()
        );
        assert!(!self.socket.exists());
    }
}

/// Everything the device serving `target` (with `overlay`) reads.
fn read_device(target: &Path, cache: &Path, overlay: Option<&Path>) -> Vec<u8> {
    let (served, mut device) = Served::start(target, cache, overlay);
    let capacity = device.config().capacity as usize * SECTOR;
    let mut queue = device.take_queue(0).unwrap();
    let mut all = Vec::with_capacity(capacity);
    let piece = 256 << 10;
    while all.len() < capacity {
        let len = piece.min(capacity - all.len());
        let data = queue
            .read((all.len() / SECTOR) as u64, len as u32)
            .unwrap()
            .unwrap_or_else(|s| panic!("read failed with status {s}"));
        all.extend(data);
    }
    drop(queue);
    served.finish(device);
    all
}

fn commit(image: &Path, overlay: &Path, out: &Path, cache: &Path, extra: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_berth"));
    command
        .args(["block", "commit"])
        .arg(image)
        .arg("--overlay")
        .arg(overlay)
        .arg("--out")
        .arg(out)
        .arg("--cache-dir")
        .arg(cache)
        .args(extra);
    command.output().expect("run berth block commit")
}

fn summary(output: &Output) -> serde_json::Value {
    let stdout = assert_ok(output, "block commit");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn a_committed_image_reads_what_the_image_with_its_overlay_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = source_content(1);
    let image = build_image(dir.path(), "image", &expected);
    let overlay = dir.path().join("overlay");
    let cache = dir.path().join("cache");

    // Writes, a discard and zeroes through the device, as a guest makes them.
    let (served, mut device) = Served::start(&image, &cache, Some(&overlay));
    let mut queue = device.take_queue(0).unwrap();
    let mut write = |queue: &mut berth_frontend::BlkQueue, at: usize, data: Vec<u8>| {
        assert_eq!(
            queue.write((at / SECTOR) as u64, &data).unwrap(),
            status::OK
        );
        expected[at..at + data.len()].copy_from_slice(&data);
    };
    write(&mut queue, 2 * BLOCK, noise(2, 3 * BLOCK));
    // Across a chunk boundary, into the zero MiB.
    write(&mut queue, (1 << 20) + (60 << 10), noise(3, 128 << 10));
    write(&mut queue, SIZE - BLOCK, noise(4, BLOCK));
    // Zeros over data: a discard (which reads as zeros afterwards) and WRITE_ZEROES.
    let discarded = (2 << 20) + (32 << 10);
    assert_eq!(
        queue
            .discard(&[((discarded / SECTOR) as u64, (256 << 10) / SECTOR as u32, 0)])
            .unwrap(),
        status::OK
    );
    expected[discarded..discarded + (256 << 10)].fill(0);
    let zeroed = 3 << 20;
    assert_eq!(
        queue
            .write_zeroes(&[((zeroed / SECTOR) as u64, (64 << 10) / SECTOR as u32, 0)])
            .unwrap(),
        status::OK
    );
    expected[zeroed..zeroed + (64 << 10)].fill(0);
    assert_eq!(queue.flush().unwrap(), status::OK);
    drop(queue);
    served.finish(device);

    let image_before = snapshot(&image);
    let overlay_before = fs::read(&overlay).unwrap();
    let base_manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(image.join("manifest.json")).unwrap()).unwrap();

    let committed = dir.path().join("committed");
    let report = summary(&commit(
        &image,
        &overlay,
        &committed,
        &dir.path().join("cache-commit"),
        &["--json"],
    ));
    assert_eq!(report["size"], SIZE as u64);
    assert_eq!(
        report["blob_id"],
        blake3::hash(&expected).to_hex().to_string()
    );
    assert_eq!(report["base_blob_id"], base_manifest["blob_id"]);
    let chunks = report["chunks"].as_u64().unwrap();
    assert_eq!(chunks, SIZE.div_ceil(64 << 10) as u64, "cut like the image");
    // Chunks touched: 1 (blocks 2-4), 3 (128 KiB from 60 KiB into a chunk), the last one,
    // 5 discarded (256 KiB from 32 KiB into a chunk) and 1 zeroed.
    assert_eq!(report["changed_chunks"], 11, "{report}");
    assert!(committed.join("manifest.json").is_file());
    assert!(committed.join("block.json").is_file());

    // Served again, without the overlay: the same bytes.
    let served_again = read_device(&committed, &dir.path().join("cache-new"), None);
    assert_eq!(served_again.len(), SIZE);
    assert!(
        served_again == expected,
        "the committed image differs from the image with its overlay"
    );
    assert!(snapshot(&image) == image_before, "the image is unchanged");
    assert!(
        fs::read(&overlay).unwrap() == overlay_before,
        "the overlay is unchanged, header included"
    );

    // Compressed, the same content (same blob id) in fewer stored bytes.
    let compressed = summary(&commit(
        &image,
        &overlay,
        &dir.path().join("committed-zstd"),
        &dir.path().join("cache-commit"),
        &["--json", "--compression", "zstd"],
    ));
    assert_eq!(compressed["blob_id"], report["blob_id"]);
    assert!(
        compressed["stored_bytes"].as_u64() < report["stored_bytes"].as_u64(),
        "{compressed} vs {report}"
    );

    // The image with its overlay, served as before, still reads the same.
    assert!(read_device(&image, &cache, Some(&overlay)) == expected);
}

#[test]
fn an_overlay_without_writes_commits_to_the_same_content() {
    let dir = tempfile::tempdir().unwrap();
    let content = source_content(5);
    let image = build_image(dir.path(), "image", &content);
    let overlay = dir.path().join("overlay");
    let cache = dir.path().join("cache");
    let (served, device) = Served::start(&image, &cache, Some(&overlay));
    served.finish(device);
    assert!(overlay.is_file(), "serving created the overlay");

    let committed = dir.path().join("committed");
    let output = commit(&image, &overlay, &committed, &cache, &[]);
    let text = assert_ok(&output, "block commit");
    assert!(text.contains("0 of them differ"), "{text}");
    let base: serde_json::Value =
        serde_json::from_slice(&fs::read(image.join("manifest.json")).unwrap()).unwrap();
    let new: serde_json::Value =
        serde_json::from_slice(&fs::read(committed.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(new["blob_id"], base["blob_id"]);
    assert_eq!(new["chunks"], base["chunks"]);
    assert!(read_device(&committed, &dir.path().join("cache-new"), None) == content);
}

fn assert_refused(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "expected a refusal: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in:\n{stderr}");
}

#[test]
fn unusable_overlays_and_output_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = build_image(dir.path(), "image", &source_content(7));
    let other = build_image(dir.path(), "other", &source_content(8));
    let cache = dir.path().join("cache");
    let overlay = dir.path().join("overlay");
    let (served, device) = Served::start(&image, &cache, Some(&overlay));
    served.finish(device);
    let other_overlay = dir.path().join("other-overlay");
    let (served, device) = Served::start(&other, &cache, Some(&other_overlay));
    served.finish(device);
    let out = dir.path().join("out");

    assert_refused(
        &commit(&image, &dir.path().join("missing"), &out, &cache, &[]),
        "cannot read the overlay",
    );
    let junk = dir.path().join("junk");
    fs::write(&junk, noise(9, 8192)).unwrap();
    assert_refused(&commit(&image, &junk, &out, &cache, &[]), "no valid header");
    assert_refused(
        &commit(&image, &other_overlay, &out, &cache, &[]),
        "was made over another base",
    );
    assert_refused(
        &commit(&dir.path().join("image.raw"), &overlay, &out, &cache, &[]),
        "is not a block image",
    );
    assert_refused(
        &commit(&image, &overlay, &image.join("sub"), &cache, &[]),
        "inside the image's directory",
    );
    let store = format!("file://{}", image.display());
    assert_refused(
        &commit(&image, &overlay, &out, &cache, &["--store", &store]),
        "is inside the image's directory",
    );
    assert!(!out.exists(), "nothing was created on a refusal");
    let full = dir.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("keep"), b"x").unwrap();
    assert_refused(
        &commit(&image, &overlay, &full, &cache, &[]),
        "exists and is not empty",
    );
    assert_eq!(fs::read(full.join("keep")).unwrap(), b"x");

    // An overlay a device is serving is refused, and commits once the device is gone.
    let (served, device) = Served::start(&image, &cache, Some(&overlay));
    assert_refused(
        &commit(&image, &overlay, &out, &cache, &[]),
        "is in use by a running device",
    );
    assert!(!out.exists());
    served.finish(device);
    assert_ok(&commit(&image, &overlay, &out, &cache, &[]), "block commit");
}
