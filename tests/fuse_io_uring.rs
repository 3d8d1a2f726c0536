//! FUSE over io_uring on `berth fuse` (`--io-uring`): with `always`, requests reach berth
//! through its per-CPU rings and not through read(2) on /dev/fuse; the filesystem behaves as
//! over the classic transport (data, directories, renames, xattrs, concurrent load from every
//! CPU); the daemon ends cleanly on SIGTERM and on an external unmount; `always` refuses to
//! start when the kernel cannot, and `auto` falls back and says so.
//!
//! Proof that the ring carries the requests comes from the daemon's count per transport at
//! exit (`FUSE requests by transport: io_uring=N dev_fuse=N forget_interrupt=N queueK=N`).
//!
//! Needs root and a kernel with FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING: the
//! fuse module's enable_uring parameter exists); skips with a printed reason otherwise. Each
//! test sets the parameter as it needs it and restores it afterwards; the tests of this file
//! run one at a time, since the parameter is global.

#[path = "common/fuse_mount.rs"]
mod fuse_mount;

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fuse_mount::*;
use sha2::{Digest, Sha256};

const PARAMETER: &str = "/sys/module/fuse/parameters/enable_uring";

/// The parameter is global: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The parameter set for one test, restored when dropped.
struct Parameter {
    saved: String,
    _serial: MutexGuard<'static, ()>,
}

impl Drop for Parameter {
    fn drop(&mut self) {
        if let Err(e) = fs::write(PARAMETER, &self.saved) {
            eprintln!("cannot restore {PARAMETER} to {}: {e}", self.saved);
        }
    }
}

/// Sets enable_uring to `value` for the running test; `None` (after skipping) where that
/// cannot be done.
fn set_parameter(value: &str) -> Option<Parameter> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(reason) = skip_reason() {
        skip(&reason);
        return None;
    }
    let saved = match fs::read_to_string(PARAMETER) {
        Ok(saved) => saved.trim().to_owned(),
        Err(e) => {
            skip(&format!(
                "the kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING): \
                 {PARAMETER}: {e}"
            ));
            return None;
        }
    };
    fs::write(PARAMETER, value).unwrap_or_else(|e| panic!("cannot set {PARAMETER}: {e}"));
    Some(Parameter {
        saved,
        _serial: serial,
    })
}

/// Starts berth with `--io-uring=always` and `flags`, touches the mount (FUSE_INIT) and
/// waits until the daemon says the ring is in use.
fn start_on_the_ring(flags: &[&str]) -> FuseMount {
    let mut all = vec!["--io-uring=always"];
    all.extend_from_slice(flags);
    let fs = FuseMount::start(&all).expect("the parameter was checked");
    let _ = fs::metadata(fs.mnt());
    let deadline = Instant::now() + DAEMON_TIMEOUT;
    while !fs.log().contains("FUSE transport: io_uring") {
        assert!(
            Instant::now() < deadline,
            "the daemon did not say it serves over io_uring:\n{}",
            fs.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    fs
}

/// Ends the daemon with SIGTERM, checks it exited 0 and unmounted, prints its count of
/// requests by transport and returns its output.
fn stop(fs: FuseMount) -> String {
    let log = fs.stop_for_log();
    for line in log
        .lines()
        .filter(|l| l.contains("FUSE requests by transport"))
    {
        eprintln!("{line}");
    }
    log
}

fn transport(log: &str, name: &str) -> u64 {
    exit_count(log, "FUSE requests by transport:", name)
}

fn served(log: &str, opcode: &str) -> u64 {
    exit_count(log, "FUSE requests served:", opcode)
}

/// The requests that went through read(2) although they could have gone over the ring: only
/// FUSE_INIT may.
fn assert_ring_carried_everything(log: &str, at_least: u64) {
    let ring = transport(log, "io_uring");
    let device = transport(log, "dev_fuse") - transport(log, "forget_interrupt");
    assert!(
        ring >= at_least,
        "only {ring} requests over the ring:\n{log}"
    );
    assert!(
        device <= 1,
        "{device} requests other than FUSE_INIT, FORGET and INTERRUPT were read from \
         /dev/fuse:\n{log}"
    );
}

/// Deterministic pseudo-random bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn digest(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

fn file_digest(path: &Path) -> Vec<u8> {
    let mut file = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.finalize().to_vec()
}

/// The CPUs this process may run on.
fn cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, filled by the call.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid out-buffer of the size given.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    assert_eq!(rc, 0, "sched_getaffinity");
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: reading a bit of a valid set, within its size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

fn pin(cpu: usize) {
    // SAFETY: as in cpus().
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU numbers come from sched_getaffinity, within the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid set of the size given, for the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(rc, 0, "sched_setaffinity({cpu})");
}

#[test]
fn always_serves_a_tree_over_the_ring_from_every_cpu() {
    let Some(_parameter) = set_parameter("Y") else {
        return;
    };
    // The data path through berth (no passthrough), xattrs on.
    let fs = start_on_the_ring(&["--passthrough=never", "--xattr"]);
    let mnt = fs.mnt().to_path_buf();

    // A tree of small and large files (1 MiB is max_write: the larger ones take several
    // requests whose data is in the ring entry's payload buffer).
    let sizes = [
        0usize,
        1,
        100,
        4095,
        4096,
        65_537,
        1 << 20,
        (3 << 20) + 17,
        5 << 20,
    ];
    let mut expected = Vec::new();
    for dir in ["a", "a/b", "c"] {
        fs::create_dir(mnt.join(dir)).expect("mkdir");
        for (i, &size) in sizes.iter().enumerate() {
            let rel = format!("{dir}/f{i}");
            let data = pattern(i as u64 + dir.len() as u64 * 100, size);
            fs::write(mnt.join(&rel), &data).expect("write");
            expected.push((rel, digest(&data), size));
        }
    }
    drop_dentry_caches();
    for (rel, sum, size) in &expected {
        assert_eq!(
            &file_digest(&mnt.join(rel)),
            sum,
            "{rel} read back through the mount"
        );
        assert_eq!(&file_digest(&fs.under(rel)), sum, "{rel} on the host");
        assert_eq!(
            fs::metadata(mnt.join(rel)).expect("stat").len(),
            *size as u64
        );
    }

    // readdir against the host's listing.
    for dir in ["a", "a/b", "c"] {
        let names = |p: &Path| {
            let mut v: Vec<String> = fs::read_dir(p)
                .expect("readdir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let listed = names(&mnt.join(dir));
        assert_eq!(listed, names(&fs.under(dir)), "readdir of {dir}");
        assert!(listed.len() >= sizes.len(), "{listed:?}");
    }

    // rename and unlink.
    fs::rename(mnt.join("a/f5"), mnt.join("c/renamed")).expect("rename");
    assert!(!fs.under("a/f5").exists());
    assert_eq!(
        file_digest(&mnt.join("c/renamed")),
        digest(&pattern(5 + 100, sizes[5]))
    );
    fs::remove_file(mnt.join("c/renamed")).expect("unlink");
    assert!(!fs.under("c/renamed").exists());
    assert!(fs::metadata(mnt.join("c/renamed")).is_err());

    // xattrs: set, get, list, remove.
    let target = mnt.join("a/f2");
    setxattr(&target, "user.berth", b"over the ring", 0).expect("setxattr");
    assert_eq!(
        getxattr(&target, "user.berth").expect("getxattr"),
        b"over the ring"
    );
    assert_eq!(
        getxattr(&fs.under("a/f2"), "user.berth").expect("getxattr on the host"),
        b"over the ring"
    );
    assert!(listxattr(&target)
        .expect("listxattr")
        .iter()
        .any(|n| n == "user.berth"));
    removexattr(&target, "user.berth").expect("removexattr");
    assert_errno(
        "getxattr after removexattr",
        &getxattr(&target, "user.berth"),
        libc::ENODATA,
    );

    // Concurrent load: two threads pinned to each CPU, each writing, reading back and
    // stat-ing files of its own, so that every queue serves requests.
    let cpus = cpus();
    let workers: Vec<_> = cpus
        .iter()
        .flat_map(|&cpu| [(cpu, 0u64), (cpu, 1u64)])
        .map(|(cpu, n)| {
            let dir = mnt.join(format!("load-{cpu}-{n}"));
            std::thread::spawn(move || {
                pin(cpu);
                fs::create_dir(&dir).expect("mkdir");
                for i in 0..40u64 {
                    let seed = (cpu as u64) << 32 | n << 16 | i;
                    let data = pattern(seed, 1000 + (i as usize * 7919) % 300_000);
                    let path = dir.join(format!("f{i}"));
                    let mut file = fs::File::create(&path).expect("create");
                    file.write_all(&data).expect("write");
                    drop(file);
                    let back = fs::read(&path).expect("read");
                    assert!(back == data, "{} read back differently", path.display());
                    assert_eq!(fs::metadata(&path).expect("stat").len(), data.len() as u64);
                }
                for i in (0..40u64).step_by(2) {
                    fs::remove_file(dir.join(format!("f{i}"))).expect("unlink");
                }
                fs::read_dir(&dir).expect("readdir").count()
            })
        })
        .collect();
    for worker in workers {
        assert_eq!(worker.join().expect("a load thread panicked"), 20);
    }

    let log = stop(fs);
    assert_ring_carried_everything(&log, 1000);
    // Every CPU's queue served requests (its callers were pinned there).
    for cpu in cpus {
        let n = transport(&log, &format!("queue{cpu}"));
        assert!(n > 0, "queue {cpu} served nothing:\n{log}");
    }
    // The data went through berth, over the ring.
    assert!(
        served(&log, "WRITE") > 0 && served(&log, "READ") > 0,
        "{log}"
    );
}

#[test]
fn passthrough_opens_work_over_the_ring() {
    let Some(_parameter) = set_parameter("Y") else {
        return;
    };
    let fs = start_on_the_ring(&["--passthrough=auto"]);
    if !fs.log().contains("FUSE passthrough is on") {
        let log = stop(fs);
        skip(&format!("FUSE passthrough is not available here:\n{log}"));
        return;
    }
    let data = pattern(7, (2 << 20) + 3);
    fs::write(fs.via("p"), &data).expect("write");
    drop_dentry_caches();
    assert_eq!(file_digest(&fs.via("p")), digest(&data));
    assert_eq!(file_digest(&fs.under("p")), digest(&data));
    let log = stop(fs);
    assert_ring_carried_everything(&log, 3);
    // Both opens were answered over the ring with backing ids (the second may reuse the
    // first's id when its deferred close has not run yet); the data never reached berth.
    assert!(
        exit_count(&log, "FUSE passthrough backing files:", "passthrough_opens") >= 2
            && exit_count(&log, "FUSE passthrough backing files:", "registered") >= 1,
        "{log}"
    );
    assert_eq!(served(&log, "READ"), 0, "{log}");
    assert_eq!(served(&log, "WRITE"), 0, "{log}");
}

#[test]
fn external_unmount_ends_the_daemon_cleanly() {
    let Some(_parameter) = set_parameter("Y") else {
        return;
    };
    let fs = start_on_the_ring(&[]);
    fs::write(fs.via("x"), b"x").expect("write");
    let log = fs.unmount_externally_for_log();
    assert_ring_carried_everything(&log, 2);
}

#[test]
fn always_refuses_to_start_when_the_parameter_is_off() {
    let Some(_parameter) = set_parameter("N") else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let (shared, mnt) = (root.path().join("shared"), root.path().join("mnt"));
    fs::create_dir(&shared).expect("mkdir");
    fs::create_dir(&mnt).expect("mkdir");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("fuse")
        .arg("--shared-dir")
        .arg(&shared)
        .arg("--mountpoint")
        .arg(&mnt)
        .arg("--io-uring=always")
        .stdin(Stdio::null())
        .output()
        .expect("run berth");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started anyway:\n{stderr}");
    assert!(
        stderr.contains(
            "--io-uring always: the fuse module's enable_uring parameter is N; set \
             /sys/module/fuse/parameters/enable_uring to Y"
        ),
        "{stderr}"
    );
    assert!(
        started.elapsed() < DAEMON_TIMEOUT,
        "took {:?}",
        started.elapsed()
    );
    assert!(!is_fuse_mounted(&mnt), "left a mount behind");
}

#[test]
fn auto_falls_back_to_dev_fuse_and_says_why() {
    let Some(_parameter) = set_parameter("N") else {
        return;
    };
    let fs = FuseMount::start(&["--io-uring=auto"]).expect("the parameter was checked");
    fs::write(fs.via("x"), b"classic").expect("write");
    assert_eq!(fs::read(fs.via("x")).expect("read"), b"classic");
    let log = stop(fs);
    assert!(
        log.contains(
            "FUSE transport: /dev/fuse read and write (io_uring is off: the fuse module's \
             enable_uring parameter is N"
        ),
        "{log}"
    );
    assert_eq!(transport(&log, "io_uring"), 0, "{log}");
    assert!(transport(&log, "dev_fuse") >= 3, "{log}");
}

/// With host locks, `auto` keeps to /dev/fuse even where the rings could start: there a lock
/// request that waits goes to a thread of its own, while on a ring it would hold its entry.
#[test]
fn auto_keeps_host_locks_off_the_rings_and_says_why() {
    let Some(_parameter) = set_parameter("Y") else {
        return;
    };
    let fs = FuseMount::start(&["--io-uring=auto", "--posix-lock"]).expect("checked above");
    fs::write(fs.via("x"), b"classic").expect("write");
    assert_eq!(fs::read(fs.via("x")).expect("read"), b"classic");
    let log = stop(fs);
    assert!(
        log.contains(
            "FUSE transport: /dev/fuse read and write (io_uring is off: with --posix-lock or \
             --flock a lock request that waits holds its ring entry"
        ),
        "{log}"
    );
    assert_eq!(transport(&log, "io_uring"), 0, "{log}");
}

/// An OFD lock request on `fd`.
fn ofd_lock(fd: &Fd, cmd: libc::c_int, kind: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a zeroed flock is valid; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_len = 16;
    // SAFETY: a valid descriptor and flock.
    cvt(unsafe { libc::fcntl(fd.raw(), cmd, &mut fl) }).map(drop)
}

#[test]
fn a_request_blocked_in_berth_does_not_block_its_queue() {
    let Some(_parameter) = set_parameter("Y") else {
        return;
    };
    let fs = start_on_the_ring(&["--posix-lock"]);
    fs::write(fs.via("lock"), [0u8; 64]).expect("write");
    // Everything on one CPU: every request goes to that CPU's queue.
    let cpu = cpus()[0];
    pin(cpu);
    let holder = open(&fs.via("lock"), libc::O_RDWR, 0).expect("open");
    ofd_lock(&holder, libc::F_OFD_SETLK, libc::F_WRLCK).expect("take the lock");
    let path = fs.via("lock");
    let waiter = std::thread::spawn(move || {
        pin(cpu);
        let fd = open(&path, libc::O_RDWR, 0).expect("open");
        let started = Instant::now();
        // Waits in berth (SETLKW) until the holder lets go.
        ofd_lock(&fd, libc::F_OFD_SETLKW, libc::F_WRLCK).expect("F_OFD_SETLKW");
        started.elapsed()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiter.is_finished(),
        "F_OFD_SETLKW did not wait for the holder"
    );
    // Served by another thread of the same queue while the waiter's thread is blocked.
    let probe = open(&fs.via("lock"), libc::O_RDONLY, 0).expect("open beside the waiter");
    assert_eq!(
        fs::read(fs.via("lock"))
            .expect("read beside the waiter")
            .len(),
        64
    );
    ofd_lock(&holder, libc::F_OFD_SETLK, libc::F_UNLCK).expect("release the lock");
    let waited = waiter.join().expect("the waiter panicked");
    assert!(
        waited >= Duration::from_millis(250),
        "waited only {waited:?}"
    );
    probe.close().expect("close");
    drop(holder);
    let log = stop(fs);
    assert_ring_carried_everything(&log, 5);
}
