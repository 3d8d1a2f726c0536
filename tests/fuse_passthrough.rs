//! FUSE passthrough on `berth fuse` (`--passthrough`): with it on, file data moves between
//! the kernel and the host file without a READ or WRITE request reaching berth, in every cache
//! mode; with `never` it all goes through berth; opens passthrough cannot honour are served
//! the classic way; backing ids are closed on RELEASE and at unmount.
//!
//! Proof comes from the daemon's own counts at exit: the requests it served per opcode, and
//! the backing ids it registered and closed (each close is the kernel's answer to
//! FUSE_DEV_IOC_BACKING_CLOSE; a refused close is counted as a failure).
//!
//! Needs root, /dev/fuse and a kernel with FUSE passthrough (Linux 6.9+); each test skips
//! with a printed reason otherwise.

#[path = "common/fuse_mount.rs"]
mod fuse_mount;
#[path = "common/tmpfs.rs"]
mod tmpfs;

use std::path::Path;
use std::process::Command;

use fuse_mount::*;
use tmpfs::TmpfsMount;

/// Starts `berth fuse` with passthrough insisted on (`--passthrough=always`) and `flags`;
/// `None` (after skipping) where the kernel does not offer passthrough.
fn start_with_passthrough(flags: &[&str]) -> Option<FuseMount> {
    let mut all = vec!["--passthrough=always"];
    all.extend_from_slice(flags);
    let mut fs = FuseMount::start(&all)?;
    // The kernel's offer is known at FUSE_INIT, which a first access waits for.
    let _ = std::fs::metadata(fs.mnt());
    let deadline = std::time::Instant::now() + DAEMON_TIMEOUT;
    while std::time::Instant::now() < deadline && !fs.log().contains("FUSE_INIT") {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if fs.log().contains("FUSE passthrough is on") {
        return Some(fs);
    }
    let status = fs.wait_exit(DAEMON_TIMEOUT);
    let log = fs.log();
    assert!(
        log.contains("kernel does not offer FUSE passthrough"),
        "berth neither turned passthrough on nor said why ({status:?}):\n{log}"
    );
    skip("the kernel does not offer FUSE passthrough (Linux 6.9+, CONFIG_FUSE_PASSTHROUGH)");
    None
}

fn served(log: &str, opcode: &str) -> u64 {
    exit_count(log, "FUSE requests served:", opcode)
}

fn backing(log: &str, name: &str) -> u64 {
    exit_count(log, "FUSE passthrough backing files:", name)
}

/// Every id registered was closed, by RELEASE or at unmount, and the kernel refused none.
fn assert_ids_balanced(log: &str) {
    let registered = backing(log, "registered");
    let closed = backing(log, "closed_on_release") + backing(log, "closed_at_end");
    assert_eq!(registered, closed, "backing ids left open:\n{log}");
    assert_eq!(backing(log, "close_failures"), 0, "{log}");
}

/// Reads and writes `name` through the mount in several ways (`mapped`: a shared mapping too)
/// and checks the host sees the same bytes.
fn exercise_data(fs: &FuseMount, name: &str, mapped: bool) {
    let data = pattern(7, 1 << 20);
    put(&fs.under(name), &data);
    for _ in 0..3 {
        assert_eq!(
            read_all(&fs.via(name)),
            data,
            "{name}: read through the mount"
        );
    }
    let fd = open(&fs.via(name), libc::O_RDWR, 0).expect("open read-write");
    let patch = pattern(8, 256 << 10);
    fd.pwrite_all(&patch, 64 << 10)
        .expect("write through the mount");
    let mut expected = data.clone();
    expected[64 << 10..(64 << 10) + patch.len()].copy_from_slice(&patch);
    assert_eq!(
        fd.pread_vec(expected.len(), 0).expect("read back"),
        expected,
        "{name}: read back on the same descriptor"
    );
    if mapped {
        check_shared_mapping(&fd, &expected, name);
    }
    fd.close().expect("close");
    assert_eq!(read_all(&fs.under(name)), expected, "{name}: the host file");
    // Created through the mount (CREATE), written and read back.
    let created = format!("{name}.new");
    put(&fs.via(&created), &patch);
    assert_eq!(
        read_all(&fs.under(&created)),
        patch,
        "{created}: the host file"
    );
    assert_eq!(read_all(&fs.via(&created)), patch, "{created}: read back");
}

/// A shared mapping of `fd` shows `expected` (with passthrough it maps the host file, even
/// with cache=never).
fn check_shared_mapping(fd: &Fd, expected: &[u8], name: &str) {
    // SAFETY: mapping an open descriptor read-only for its length; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            expected.len(),
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.raw(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "{name}: mmap of a passthrough file");
    // SAFETY: the mapping is `expected.len()` readable bytes until munmap.
    let mapped = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), expected.len()) };
    let same = mapped == expected;
    // SAFETY: unmapping exactly what was mapped.
    unsafe { libc::munmap(map, expected.len()) };
    assert!(same, "{name}: mapped content");
}

#[test]
fn data_bypasses_the_daemon_in_every_cache_mode() {
    for cache in ["never", "metadata", "auto", "always"] {
        let flag = format!("--cache={cache}");
        let Some(fs) = start_with_passthrough(&[&flag]) else {
            return;
        };
        exercise_data(&fs, "data", true);
        let log = fs.stop_for_log();
        assert_eq!(
            served(&log, "READ"),
            0,
            "{flag}: READ reached berth:\n{log}"
        );
        assert_eq!(
            served(&log, "WRITE"),
            0,
            "{flag}: WRITE reached berth:\n{log}"
        );
        assert!(served(&log, "OPEN") > 0, "{flag}: no OPEN:\n{log}");
        assert!(served(&log, "CREATE") > 0, "{flag}: no CREATE:\n{log}");
        assert!(backing(&log, "registered") > 0, "{flag}: {log}");
        assert_eq!(backing(&log, "classic_opens"), 0, "{flag}: {log}");
        assert_ids_balanced(&log);
    }
}

#[test]
fn never_serves_every_byte_through_the_daemon() {
    let Some(fs) = FuseMount::start(&["--passthrough=never", "--cache=never"]) else {
        return;
    };
    exercise_data(&fs, "data", false);
    let log = fs.stop_for_log();
    assert!(served(&log, "READ") > 0, "no READ reached berth:\n{log}");
    assert!(served(&log, "WRITE") > 0, "no WRITE reached berth:\n{log}");
    assert!(
        !log.contains("FUSE passthrough backing files:"),
        "backing files set up with --passthrough=never:\n{log}"
    );
}

#[test]
fn release_closes_backing_ids_over_10000_opens() {
    let Some(fs) = start_with_passthrough(&["--cache=never"]) else {
        return;
    };
    put(&fs.under("f"), b"0123456789");
    let mut byte = [0u8; 1];
    // Warm up (the inode and its descriptor), then count.
    open(&fs.via("f"), libc::O_RDONLY, 0)
        .unwrap()
        .close()
        .unwrap();
    let fds_before = fs.daemon_fd_count();
    for round in 0..10_000 {
        let fd = open(&fs.via("f"), libc::O_RDONLY, 0)
            .unwrap_or_else(|e| panic!("open #{round}: {e}\n{}", fs.log()));
        assert_eq!(fd.pread(&mut byte, round % 10).unwrap(), 1);
        fd.close().expect("close");
    }
    // RELEASE is asynchronous: give the last one a moment to arrive.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let fds_after = fs.daemon_fd_count();
    assert!(
        fds_after <= fds_before + 2,
        "the daemon's descriptors grew from {fds_before} to {fds_after}"
    );
    // One file still open at unmount: its id is closed then.
    let held = open(&fs.via("f"), libc::O_RDONLY, 0).unwrap();
    let log = fs.stop_for_log();
    drop(held);
    assert!(
        backing(&log, "passthrough_opens") >= 10_002,
        "not every open was passed through:\n{log}"
    );
    // RELEASE reaches berth asynchronously: an open that arrives before the last one's
    // RELEASE shares its id instead of registering another. Most rounds register and close.
    assert!(
        backing(&log, "closed_on_release") >= 5_000,
        "RELEASE did not close the ids:\n{log}"
    );
    assert_eq!(backing(&log, "closed_at_end"), 1, "{log}");
    assert_ids_balanced(&log);
    assert_eq!(served(&log, "READ"), 0, "{log}");
}

/// Opens of the same files from many threads at once: each registration is made without
/// the table locked, so two opens of one inode may both register; one id is kept and the
/// other closed, and every open reads the file's bytes without berth serving a READ.
#[test]
fn concurrent_opens_of_one_file_share_one_backing_id() {
    let Some(fs) = start_with_passthrough(&["--cache=never"]) else {
        return;
    };
    let names = ["a", "b"];
    for (i, name) in names.iter().enumerate() {
        put(&fs.under(name), &pattern(i as u64, 64 << 10));
    }
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let fs = &fs;
            scope.spawn(move || {
                let mut byte = [0u8; 1];
                for round in 0..400u64 {
                    let i = ((t + round) % 2) as usize;
                    let fd = open(&fs.via(names[i]), libc::O_RDONLY, 0)
                        .unwrap_or_else(|e| panic!("thread {t}, open #{round}: {e}"));
                    let at = (round * 97) % (64 << 10);
                    assert_eq!(fd.pread(&mut byte, at as i64).expect("pread"), 1);
                    assert_eq!(byte[0], pattern(i as u64, 64 << 10)[at as usize]);
                    fd.close().expect("close");
                }
            });
        }
    });
    let log = fs.stop_for_log();
    assert!(backing(&log, "passthrough_opens") >= 3_200, "{log}");
    assert_eq!(backing(&log, "classic_opens"), 0, "{log}");
    assert_eq!(served(&log, "READ"), 0, "{log}");
    assert_ids_balanced(&log);
}

/// The free bytes of the file system holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let st = statvfs(path).expect("statvfs");
    st.f_bavail as u64 * st.f_frsize as u64
}

/// A backing id keeps its file open in the kernel: the release of the last open must close
/// it (berth gathers closes and makes them at most 20 ms later), or a file deleted
/// afterwards keeps its blocks. Measured on a tmpfs of the test's own, which nothing else
/// writes to.
#[test]
fn a_deleted_file_gets_its_blocks_back_once_its_opens_are_released() {
    if unsafe { libc::geteuid() } != 0 {
        skip("mounting a tmpfs for the shared directory needs root");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("berth-passthrough-tmpfs-")
        .tempdir()
        .expect("tempdir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir shared");
    let _tmpfs = TmpfsMount::new(&shared, Some("256m"))
        .unwrap_or_else(|| panic!("mount a tmpfs on {}", shared.display()));
    let Some(fs) = FuseMount::start_sharing(&shared, &["--passthrough=always", "--cache=never"])
    else {
        return;
    };
    let _ = std::fs::metadata(fs.mnt());
    if !fs.log().contains("FUSE passthrough is on") {
        skip("the kernel does not offer FUSE passthrough (Linux 6.9+, CONFIG_FUSE_PASSTHROUGH)");
        return;
    }
    let size = 64usize << 20;
    let mut regained = Vec::new();
    for round in 0..3u64 {
        let name = format!("big{round}");
        // Written and read back through the mount, two opens passed through at once.
        let data = pattern(round, size);
        put(&fs.via(&name), &data);
        let first = open(&fs.via(&name), libc::O_RDONLY, 0).expect("open");
        let second = open(&fs.via(&name), libc::O_RDONLY, 0).expect("open again");
        let mut head = vec![0u8; 4096];
        assert_eq!(second.pread(&mut head, 0).expect("pread"), head.len());
        assert_eq!(head, data[..4096], "{name}: read through the mount");
        first.close().expect("close");
        second.close().expect("close");
        let before = free_bytes(&shared);
        std::fs::remove_file(fs.via(&name)).expect("unlink through the mount");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut free = free_bytes(&shared);
        while free < before + size as u64 * 9 / 10 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            free = free_bytes(&shared);
        }
        regained.push(free.saturating_sub(before));
    }
    let log = fs.stop_for_log();
    for (round, bytes) in regained.iter().enumerate() {
        assert!(
            *bytes >= size as u64 * 9 / 10,
            "round {round}: only {bytes} of the deleted file's {size} bytes came back within \
             5 s; its backing file is still open:\n{log}"
        );
    }
    assert!(backing(&log, "registered") >= 3, "{log}");
    assert_eq!(served(&log, "READ"), 0, "{log}");
    assert_ids_balanced(&log);
}

#[test]
fn opens_passthrough_cannot_honour_are_served_by_berth() {
    let Some(fs) = start_with_passthrough(&["--cache=never"]) else {
        return;
    };
    let data = pattern(3, 64 << 10);
    // O_DIRECT without --allow-direct-io: berth drops O_DIRECT on the host, which the kernel
    // would not.
    put(&fs.under("direct"), &data);
    let mut buf = AlignedBuf::new(data.len(), 4096);
    let fd = open(&fs.via("direct"), libc::O_RDONLY | libc::O_DIRECT, 0).unwrap();
    assert_eq!(fd.pread(buf.as_mut_slice(), 0).unwrap(), data.len());
    assert_eq!(buf.as_slice(), data.as_slice(), "O_DIRECT read content");
    fd.close().unwrap();
    // A setuid file opened for writing: the write must clear setuid as berth does.
    put(&fs.under("suid"), &data);
    chmod(&fs.under("suid"), 0o4755).unwrap();
    let fd = open(&fs.via("suid"), libc::O_WRONLY, 0).unwrap();
    fd.pwrite_all(b"x", 0).unwrap();
    fd.close().unwrap();
    let log_mid = fs.log();
    // A second open of an inode already open through passthrough follows it, even with
    // O_DIRECT (the kernel accepts nothing else), and reads the same bytes.
    put(&fs.under("mixed"), &data);
    let first = open(&fs.via("mixed"), libc::O_RDONLY, 0).unwrap();
    let second = open(&fs.via("mixed"), libc::O_RDONLY | libc::O_DIRECT, 0)
        .unwrap_or_else(|e| panic!("second open of a passthrough inode: {e}\n{log_mid}"));
    assert_eq!(second.pread(buf.as_mut_slice(), 0).unwrap(), data.len());
    assert_eq!(buf.as_slice(), data.as_slice(), "mixed read content");
    assert_eq!(first.pread_vec(data.len(), 0).unwrap(), data);
    drop((first, second));
    let log = fs.stop_for_log();
    assert_eq!(
        backing(&log, "classic_opens"),
        2,
        "O_DIRECT and the setuid write open are served by berth:\n{log}"
    );
    assert!(served(&log, "READ") > 0, "{log}");
    assert!(served(&log, "WRITE") > 0, "{log}");
    assert_ids_balanced(&log);
}

/// `berth fuse --passthrough=always` with an option passthrough cannot go with fails at
/// start, saying why, and leaves nothing mounted.
fn refuses_at_start(extra: &[&str], expected: &str) {
    if let Some(reason) = skip_reason() {
        skip(&reason);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (shared, mnt) = (dir.path().join("shared"), dir.path().join("mnt"));
    std::fs::create_dir(&shared).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["fuse", "--passthrough=always"])
        .arg("--shared-dir")
        .arg(&shared)
        .arg("--mountpoint")
        .arg(&mnt)
        .args(extra)
        .output()
        .expect("run berth");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{extra:?} started:\n{stderr}");
    assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    assert!(!is_fuse_mounted(Path::new(&mnt)), "{extra:?} left a mount");
}

#[test]
fn always_refuses_the_writeback_cache_and_shared_caching() {
    refuses_at_start(&["--writeback"], "writeback cache");
    refuses_at_start(&["--shared-cache"], "shared caching");
}
