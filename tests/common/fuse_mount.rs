//! Harness for the /dev/fuse integration tests: runs `berth fuse` on a fresh shared directory
//! and mountpoint, and offers thin syscall wrappers that report errno, so each test can perform
//! an operation through the mount and on the underlying directory and compare the outcomes.
//!
//! Included from each `tests/fuse_*.rs` file with `#[path = "common/fuse_mount.rs"] mod ...;`.

#![allow(dead_code)]

#[path = "skip.rs"]
mod skip;

#[allow(unused_imports)]
pub use skip::{skip, skip_by_design, skips_forbidden};

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the daemon gets to mount, and to exit after SIGTERM or an external umount.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an ordinary test may keep a mount before the watchdog kills the daemon.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Kills the daemon if the test runs too long: a request the daemon never answers would
/// otherwise block the test forever, whereas a dead daemon makes it fail with ENOTCONN.
struct Watchdog {
    stop: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(pid: u32, limit: Duration) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (stop2, fired2) = (stop.clone(), fired.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while !stop2.load(Ordering::SeqCst) {
                if Instant::now() > deadline {
                    eprintln!(
                        "WATCHDOG: the test still holds the mount after {limit:?}; killing daemon \
                         {pid} so that the blocked request fails with ENOTCONN"
                    );
                    fired2.store(true, Ordering::SeqCst);
                    // SAFETY: kill has no memory-safety preconditions; the daemon is not reaped
                    // before this thread is stopped and joined.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    return;
                }
                sleep(Duration::from_millis(100));
            }
        });
        Watchdog {
            stop,
            fired,
            thread: Some(thread),
        }
    }

    /// Stops the watchdog; returns whether it had fired.
    fn stop(&mut self) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.fired.load(Ordering::SeqCst)
    }
}

/// Why these tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root to mount a FUSE filesystem".to_string());
    }
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Some(format!("/dev/fuse cannot be opened: {e}"));
    }
    match fs::read_to_string("/proc/filesystems") {
        Ok(list)
            if list
                .lines()
                .any(|l| l.split_whitespace().last() == Some("fuse")) =>
        {
            None
        }
        Ok(_) => Some("the kernel does not list the fuse filesystem".to_string()),
        Err(e) => Some(format!("/proc/filesystems is unreadable: {e}")),
    }
}

/// Whether `path` is a mountpoint of a FUSE filesystem in this mount namespace.
pub fn is_fuse_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.as_os_str().as_bytes();
    info.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            return false;
        };
        let (Some(mount_point), Some(fstype)) = (fields.get(4), fields.get(sep + 1)) else {
            return false;
        };
        unescape_mountinfo(mount_point) == wanted
            && (*fstype == "fuse" || fstype.starts_with("fuse."))
    })
}

/// The super-block options of the FUSE mount at `path` (for diagnostics: allow_other etc.).
pub fn mount_options(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.as_os_str().as_bytes();
    info.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        if unescape_mountinfo(fields.get(4)?) != wanted {
            return None;
        }
        Some(format!(
            "{} {}",
            fields.get(5)?,
            fields.get(sep + 3).unwrap_or(&"")
        ))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            let parsed = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok());
            if let Some(v) = parsed {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Extra daemon arguments for debugging a failing test, e.g. `--log-level debug`.
fn extra_daemon_args() -> Vec<String> {
    std::env::var("BERTH_FUSE_TEST_DAEMON_ARGS")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The FUSE passthrough mode the suites run in: `BERTH_FUSE_TEST_PASSTHROUGH` (`never` for
/// the classic path, `always` to insist), given as `--passthrough` to every daemon whose test
/// does not choose one itself; berth's default (`auto`: on wherever the kernel and root allow)
/// when unset.
fn passthrough_args(flags: &[&str]) -> Vec<String> {
    if flags.iter().any(|f| f.starts_with("--passthrough")) {
        return Vec::new();
    }
    match std::env::var("BERTH_FUSE_TEST_PASSTHROUGH") {
        Ok(mode) if !mode.is_empty() => vec![format!("--passthrough={mode}")],
        _ => Vec::new(),
    }
}

/// The FUSE transport the suites run over: `BERTH_FUSE_TEST_IO_URING` (`always` for FUSE over
/// io_uring, which needs the fuse module's enable_uring parameter set, `never` for /dev/fuse
/// read and write), given as `--io-uring` to every daemon whose test does not choose one
/// itself; berth's default (`auto`) when unset.
fn io_uring_args(flags: &[&str]) -> Vec<String> {
    if flags.iter().any(|f| f.starts_with("--io-uring")) {
        return Vec::new();
    }
    match std::env::var("BERTH_FUSE_TEST_IO_URING") {
        Ok(mode) if !mode.is_empty() => vec![format!("--io-uring={mode}")],
        _ => Vec::new(),
    }
}

/// A running `berth fuse` daemon serving `shared()` at `mnt()`.
pub struct FuseMount {
    child: Option<Child>,
    shared: PathBuf,
    mnt: PathBuf,
    log_path: PathBuf,
    watchdog: Option<Watchdog>,
    // Dropped last (declared last), after the mount is gone.
    root: Option<tempfile::TempDir>,
}

impl FuseMount {
    /// Starts the daemon with `flags` after the mandatory ones and waits until it has mounted.
    ///
    /// Returns `None` (after printing why) when the machine cannot run FUSE tests, or panics
    /// then under `BERTH_TESTS_NO_SKIP=1`; panics when the daemon fails to mount, since that is
    /// a failure of berth.
    pub fn start(flags: &[&str]) -> Option<FuseMount> {
        Self::start_with_limit(flags, TEST_TIMEOUT)
    }

    /// As [`FuseMount::start`], with a watchdog limit other than [`TEST_TIMEOUT`].
    pub fn start_with_limit(flags: &[&str], limit: Duration) -> Option<FuseMount> {
        Self::start_inner(None, flags, limit)
    }

    /// A second mount of `first`'s shared directory, on a mount point of its own.
    pub fn start_beside(first: &FuseMount, flags: &[&str]) -> Option<FuseMount> {
        Self::start_inner(Some(first.shared()), flags, TEST_TIMEOUT)
    }

    /// A mount of `shared`, a directory the caller made (a tmpfs of its own, say).
    #[allow(dead_code)]
    pub fn start_sharing(shared: &Path, flags: &[&str]) -> Option<FuseMount> {
        Self::start_inner(Some(shared), flags, TEST_TIMEOUT)
    }

    fn start_inner(existing: Option<&Path>, flags: &[&str], limit: Duration) -> Option<FuseMount> {
        if let Some(reason) = skip_reason() {
            skip(&reason);
            return None;
        }
        let root = tempfile::Builder::new()
            .prefix("berth-fuse-test-")
            .tempdir()
            .expect("create a temporary directory");
        // Searchable by everyone so tests can act as an unprivileged user below it.
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod the temporary directory");
        let base = root.path().canonicalize().expect("canonicalize tempdir");
        let shared = existing
            .map(Path::to_path_buf)
            .unwrap_or_else(|| base.join("shared"));
        let mnt = base.join("mnt");
        for dir in [&shared, &mnt] {
            if existing == Some(dir.as_path()) {
                continue;
            }
            fs::create_dir(dir).expect("create shared/ and mnt/");
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        }
        let log_path = base.join("daemon.log");
        let log = File::create(&log_path).expect("create the daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("fuse")
            .arg("--shared-dir")
            .arg(&shared)
            .arg("--mountpoint")
            .arg(&mnt)
            .args(flags)
            .args(passthrough_args(flags))
            .args(io_uring_args(flags))
            .args(extra_daemon_args())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn the berth binary");
        let mut mount = FuseMount {
            child: Some(child),
            shared,
            mnt,
            log_path,
            watchdog: None,
            root: Some(root),
        };
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        loop {
            if is_fuse_mounted(&mount.mnt) {
                mount.watchdog = Some(Watchdog::start(mount.pid(), limit));
                return Some(mount);
            }
            if let Some(status) = mount.try_wait() {
                panic!(
                    "berth fuse {flags:?} exited with {status} before mounting; its output:\n{}",
                    mount.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "berth fuse {flags:?} did not mount {} within {DAEMON_TIMEOUT:?}; its output:\n{}",
                    mount.mnt.display(),
                    mount.log()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// The host directory being shared (the underlying directory).
    pub fn shared(&self) -> &Path {
        &self.shared
    }

    /// The FUSE mountpoint.
    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// `shared()/rel`.
    pub fn under(&self, rel: &str) -> PathBuf {
        self.shared.join(rel)
    }

    /// `mnt()/rel`.
    pub fn via(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Everything the daemon printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// The process serving the mount: in the namespace sandbox (the default), the launched
    /// process only supervises its child, which serves.
    pub fn serving_pid(&self) -> u32 {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(pid)
    }

    /// The serving process's open file descriptors, counted in /proc.
    pub fn daemon_fd_count(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.serving_pid());
        fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
            .count()
    }

    /// The `flags` (as in fcntl F_GETFL) of every descriptor the daemon holds on `target`,
    /// read from /proc/PID/fdinfo.
    pub fn daemon_fd_flags(&self, target: &Path) -> Vec<libc::c_int> {
        use std::os::unix::fs::MetadataExt;
        // Compared by device and inode: inside the sandbox the link text is the path as the
        // serving process sees it, not the host's.
        let want = fs::metadata(target)
            .unwrap_or_else(|e| panic!("cannot stat {}: {e}", target.display()));
        let pid = self.serving_pid();
        let dir = format!("/proc/{pid}/fd");
        let mut flags = Vec::new();
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {dir}: {e}")) {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = fs::metadata(entry.path()) else {
                continue;
            };
            if (meta.dev(), meta.ino()) != (want.dev(), want.ino()) {
                continue;
            }
            let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            let Ok(text) = fs::read_to_string(&info) else {
                continue;
            };
            if let Some(octal) = text.lines().find_map(|l| l.strip_prefix("flags:")) {
                if let Ok(value) = libc::c_int::from_str_radix(octal.trim(), 8) {
                    flags.push(value);
                }
            }
        }
        flags
    }

    /// Whether the mount is still in the mount table.
    pub fn is_mounted(&self) -> bool {
        is_fuse_mounted(&self.mnt)
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("waitpid on the daemon"))
    }

    /// Waits up to `timeout` for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        // Reaping frees the pid: the watchdog must not signal it afterwards.
        self.stop_watchdog();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; pid is our own un-reaped child.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            io::Error::last_os_error()
        );
    }

    /// Ends the daemon with SIGTERM, checks it exited 0 and unmounted, and returns its
    /// output, for a test to read its exit lines.
    pub fn stop_for_log(mut self) -> String {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(DAEMON_TIMEOUT);
        let log = self.log();
        match status {
            Some(s) => assert!(s.success(), "the daemon exited with {s}:\n{log}"),
            None => panic!("no exit within {DAEMON_TIMEOUT:?} of SIGTERM:\n{log}"),
        }
        assert!(!self.is_mounted(), "still mounted after the daemon exited");
        log
    }

    /// Unmounts from outside (umount(8), as an operator would), checks the daemon exited
    /// 0 within the timeout, and returns its output.
    pub fn unmount_externally_for_log(mut self) -> String {
        let out = std::process::Command::new("umount")
            .arg(self.mnt())
            .output()
            .expect("run umount");
        assert!(
            out.status.success(),
            "umount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = self.wait_exit(DAEMON_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "no exit within {DAEMON_TIMEOUT:?} of umount:\n{}",
                self.log()
            )
        });
        let log = self.log();
        assert!(
            status.success(),
            "after an external umount the daemon exited with {status}, expected 0:\n{log}"
        );
        log
    }

    /// Ends a test: the daemon must still be running, must exit 0 within the timeout after
    /// SIGTERM, and must have removed its mount.
    pub fn finish(mut self) {
        if self.stop_watchdog() {
            panic!(
                "the test ran past its time limit and the watchdog killed the daemon; its \
                 output:\n{}",
                self.log()
            );
        }
        if let Some(status) = self.try_wait() {
            panic!(
                "the daemon died during the test with {status}; its output:\n{}",
                self.log()
            );
        }
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(DAEMON_TIMEOUT);
        let log = self.log();
        match status {
            Some(s) => assert!(
                s.success(),
                "after SIGTERM the daemon exited with {s}, expected 0; its output:\n{log}"
            ),
            None => panic!("the daemon did not exit within {DAEMON_TIMEOUT:?} of SIGTERM"),
        }
        assert!(
            !self.is_mounted(),
            "the daemon exited but {} is still mounted",
            self.mnt.display()
        );
    }

    /// Stops the watchdog; returns whether it had fired.
    fn stop_watchdog(&mut self) -> bool {
        self.watchdog.as_mut().is_some_and(Watchdog::stop)
    }

    fn cleanup(&mut self) {
        self.stop_watchdog();
        if self.try_wait().is_none() && self.child.is_some() {
            // SAFETY: kill has no memory-safety preconditions; the child is not yet reaped.
            unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
            if self.wait_exit(DAEMON_TIMEOUT).is_none() {
                lazy_unmount(&self.mnt);
                if let Some(child) = self.child.as_mut() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        if self.is_mounted() {
            lazy_unmount(&self.mnt);
        }
    }
}

fn lazy_unmount(mnt: &Path) {
    let _ = Command::new("umount")
        .arg("-l")
        .arg(mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        self.cleanup();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("--- last lines of the daemon's output ---\n{tail}\n---");
        }
        if self.is_mounted() {
            // Never delete through a live mount: leak the tempdir instead.
            if let Some(root) = self.root.take() {
                let _ = root.keep();
            }
        }
    }
}

/// Drops clean dentries and inodes (which makes the kernel send FORGETs).
/// `name=N` from the daemon's exit line starting with `line` (0 when the name is absent).
pub fn exit_count(log: &str, line: &str, name: &str) -> u64 {
    let Some(found) = log
        .lines()
        .find_map(|l| l.split_once(line).map(|(_, rest)| rest))
    else {
        panic!("no '{line}' line in the daemon's output:\n{log}");
    };
    found
        .trim_end_matches('.')
        .split_whitespace()
        .filter_map(|field| field.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.parse().expect("a count"))
        .unwrap_or(0)
}

pub fn drop_dentry_caches() {
    fs::write("/proc/sys/vm/drop_caches", "2").expect("write /proc/sys/vm/drop_caches");
}

// ---------------------------------------------------------------------------------------------
// Thin syscall wrappers returning io::Result so outcomes (incl. errno) can be compared.

/// A path as a C string (test paths never hold NUL).
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).expect("string without NUL")
}

/// Maps a -1 return to the thread's errno.
pub fn cvt<T: Copy + PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The errno of an outcome, or 0 for success (handy for comparing and printing outcomes).
pub fn errno_of<T>(r: &io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// errno number and name, for messages.
pub fn errno_name(e: i32) -> String {
    if e == 0 {
        return "success".to_string();
    }
    format!("{} ({e})", io::Error::from_raw_os_error(e))
}

/// Asserts `r` failed with `expected` errno (or succeeded, for 0).
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(what: &str, r: &io::Result<T>, expected: i32) {
    let got = errno_of(r);
    assert_eq!(
        got,
        expected,
        "{what}: expected {}, got {} ({r:?})",
        errno_name(expected),
        errno_name(got)
    );
}

pub fn lstat(p: &Path) -> io::Result<libc::stat> {
    let c = cpath(p);
    // SAFETY: stat is plain-old-data; lstat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a valid out-pointer.
    cvt(unsafe { libc::lstat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn fstat(fd: libc::c_int) -> io::Result<libc::stat> {
    // SAFETY: stat is plain-old-data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out-pointer; a bad fd yields EBADF.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// The attributes a passthrough filesystem must reproduce exactly.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Attrs {
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: i64,
    pub blocks: i64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl From<&libc::stat> for Attrs {
    fn from(st: &libc::stat) -> Self {
        Attrs {
            mode: st.st_mode,
            nlink: st.st_nlink,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: st.st_size,
            blocks: st.st_blocks,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// Asserts lstat through the mount reports exactly what lstat on the underlying file does.
#[track_caller]
pub fn assert_same_attrs(what: &str, via_mount: &Path, underlying: &Path) {
    let m = lstat(via_mount).unwrap_or_else(|e| panic!("{what}: lstat {via_mount:?}: {e}"));
    let u = lstat(underlying).unwrap_or_else(|e| panic!("{what}: lstat {underlying:?}: {e}"));
    assert_eq!(
        Attrs::from(&m),
        Attrs::from(&u),
        "{what}: attributes through the mount (left) differ from the underlying file (right)"
    );
}

/// The parts of two different files' attributes that the same operation must make equal.
#[track_caller]
pub fn assert_same_shape(what: &str, a: &libc::stat, b: &libc::stat) {
    let shape = |s: &libc::stat| {
        (
            s.st_mode, s.st_nlink, s.st_uid, s.st_gid, s.st_rdev, s.st_size,
        )
    };
    assert_eq!(
        shape(a),
        shape(b),
        "{what}: (mode, nlink, uid, gid, rdev, size) differ between the twins"
    );
}

pub fn open(p: &Path, flags: libc::c_int, mode: libc::mode_t) -> io::Result<Fd> {
    let c = cpath(p);
    // SAFETY: c is a valid NUL-terminated path.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    Ok(Fd(fd))
}

/// An owned file descriptor whose close result can be checked.
#[derive(Debug)]
pub struct Fd(pub libc::c_int);

impl Fd {
    pub fn raw(&self) -> libc::c_int {
        self.0
    }

    /// Closes and reports the close result (FUSE sends FLUSH here).
    pub fn close(mut self) -> io::Result<()> {
        let fd = std::mem::replace(&mut self.0, -1);
        // SAFETY: fd is owned by self and closed exactly once.
        cvt(unsafe { libc::close(fd) }).map(|_| ())
    }

    pub fn pwrite(&self, buf: &[u8], off: i64) -> io::Result<usize> {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = cvt(unsafe { libc::pwrite(self.0, buf.as_ptr().cast(), buf.len(), off) })?;
        Ok(n as usize)
    }

    pub fn pread(&self, buf: &mut [u8], off: i64) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = cvt(unsafe { libc::pread(self.0, buf.as_mut_ptr().cast(), buf.len(), off) })?;
        Ok(n as usize)
    }

    /// Writes all of `buf` at `off`.
    pub fn pwrite_all(&self, mut buf: &[u8], mut off: i64) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.pwrite(buf, off)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote 0"));
            }
            buf = &buf[n..];
            off += n as i64;
        }
        Ok(())
    }

    /// Reads `len` bytes at `off` (fewer only at end of file).
    pub fn pread_vec(&self, len: usize, off: i64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let n = self.pread(&mut buf[done..], off + done as i64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn fstat(&self) -> io::Result<libc::stat> {
        fstat(self.0)
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        if self.0 >= 0 {
            // SAFETY: fd is owned by self and not closed yet.
            unsafe { libc::close(self.0) };
        }
    }
}

/// Reads a whole file, following symlinks.
pub fn read_all(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

pub fn mknod(p: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: c is a valid NUL-terminated path.
    cvt(unsafe { libc::mknod(c.as_ptr(), mode, dev) }).map(|_| ())
}

pub fn mkdir(p: &Path, mode: libc::mode_t) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: c is a valid NUL-terminated path.
    cvt(unsafe { libc::mkdir(c.as_ptr(), mode) }).map(|_| ())
}

pub fn rmdir(p: &Path) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: c is a valid NUL-terminated path.
    cvt(unsafe { libc::rmdir(c.as_ptr()) }).map(|_| ())
}

pub fn unlink(p: &Path) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: c is a valid NUL-terminated path.
    cvt(unsafe { libc::unlink(c.as_ptr()) }).map(|_| ())
}

pub fn symlink(target: &str, p: &Path) -> io::Result<()> {
    let (t, c) = (cstr(target), cpath(p));
    // SAFETY: both are valid NUL-terminated strings.
    cvt(unsafe { libc::symlink(t.as_ptr(), c.as_ptr()) }).map(|_| ())
}

pub fn link(from: &Path, to: &Path) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: both are valid NUL-terminated paths.
    cvt(unsafe { libc::link(a.as_ptr(), b.as_ptr()) }).map(|_| ())
}

pub fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: both are valid NUL-terminated paths; renameat2 takes no other pointers.
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
    .map(|_| ())
}

pub fn readlink(p: &Path) -> io::Result<Vec<u8>> {
    fs::read_link(p).map(|t| t.as_os_str().as_bytes().to_vec())
}

pub fn chmod(p: &Path, mode: libc::mode_t) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: c is a valid NUL-terminated path.
    cvt(unsafe { libc::chmod(c.as_ptr(), mode) }).map(|_| ())
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: c is a valid NUL-terminated path.
    cvt(unsafe { libc::lchown(c.as_ptr(), uid, gid) }).map(|_| ())
}

pub fn truncate(p: &Path, len: i64) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: c is a valid NUL-terminated path.
    cvt(unsafe { libc::truncate(c.as_ptr(), len) }).map(|_| ())
}

pub fn utimens(p: &Path, times: [libc::timespec; 2], flags: libc::c_int) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: c is a valid path and times points to two timespecs.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) }).map(|_| ())
}

pub fn faccessat(p: &Path, mode: libc::c_int, flags: libc::c_int) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: c is a valid NUL-terminated path.
    cvt(unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, flags) }).map(|_| ())
}

pub fn statvfs(p: &Path) -> io::Result<libc::statvfs> {
    let c = cpath(p);
    // SAFETY: statvfs is plain-old-data.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid path and st a valid out-pointer.
    cvt(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (c, n) = (cpath(p), cstr(name));
    // SAFETY: valid C strings; value is valid for value.len() bytes.
    cvt(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(|_| ())
}

/// getxattr into a buffer of exactly `size` bytes (0 asks for the length).
pub fn getxattr_sized(p: &Path, name: &str, size: usize) -> io::Result<Vec<u8>> {
    let (c, n) = (cpath(p), cstr(name));
    let mut buf = vec![0u8; size];
    // SAFETY: valid C strings; buf is valid for writes of size bytes (null when 0).
    let len = cvt(unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            n.as_ptr(),
            if size == 0 {
                std::ptr::null_mut()
            } else {
                buf.as_mut_ptr().cast()
            },
            size,
        )
    })?;
    if size == 0 {
        return Ok(vec![0u8; len as usize]);
    }
    buf.truncate(len as usize);
    Ok(buf)
}

pub fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    getxattr_sized(p, name, 65536)
}

/// listxattr into a buffer of exactly `size` bytes (0 asks for the length).
pub fn listxattr_sized(p: &Path, size: usize) -> io::Result<Vec<u8>> {
    let c = cpath(p);
    let mut buf = vec![0u8; size];
    // SAFETY: valid C string; buf is valid for writes of size bytes (null when 0).
    let len = cvt(unsafe {
        libc::llistxattr(
            c.as_ptr(),
            if size == 0 {
                std::ptr::null_mut()
            } else {
                buf.as_mut_ptr().cast()
            },
            size,
        )
    })?;
    if size == 0 {
        return Ok(vec![0u8; len as usize]);
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// The sorted names listxattr reports.
pub fn listxattr(p: &Path) -> io::Result<Vec<String>> {
    let raw = listxattr_sized(p, 65536)?;
    let mut names: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

pub fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cpath(p), cstr(name));
    // SAFETY: valid C strings.
    cvt(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }).map(|_| ())
}

/// (name, d_type) of every entry but `.` and `..`, read with readdir(3), sorted by name.
pub fn read_dir_types(p: &Path) -> io::Result<Vec<(Vec<u8>, u8)>> {
    let c = cpath(p);
    // SAFETY: c is a valid NUL-terminated path.
    let dir = unsafe { libc::opendir(c.as_ptr()) };
    if dir.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; clearing it distinguishes end-of-directory from error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: dir is an open DIR stream used by this thread only.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let err = io::Error::last_os_error();
            break if err.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(err)
            };
        }
        // SAFETY: readdir returned a valid entry that stays valid until the next call.
        let (name, kind) = unsafe {
            (
                std::ffi::CStr::from_ptr((*ent).d_name.as_ptr())
                    .to_bytes()
                    .to_vec(),
                (*ent).d_type,
            )
        };
        if name != b"." && name != b".." {
            out.push((name, kind));
        }
    };
    // SAFETY: dir is open and closed exactly once.
    unsafe { libc::closedir(dir) };
    result?;
    out.sort();
    Ok(out)
}

/// Names in a directory via std (getdents under the hood), sorted.
pub fn list_names(p: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<Vec<u8>> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", p.display()))
        .map(|e| e.expect("directory entry").file_name().as_bytes().to_vec())
        .collect();
    names.sort();
    names
}

pub fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Deterministic, cheap pseudo-random bytes (xorshift64*), so content checks need no storage.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fill_pattern(seed, &mut out);
    out
}

pub fn fill_pattern(seed: u64, buf: &mut [u8]) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, align).expect("valid layout");
        assert!(len > 0);
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, layout }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialized bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes and uniquely borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

// ---------------------------------------------------------------------------------------------
// Twin trees: the same operation done on a directory directly and on an identical directory
// through the mount, so outcomes and resulting attributes can be compared.

/// Two identical directories in the shared dir: `direct` used directly, `fused` through the mount.
pub struct Twin {
    direct: PathBuf,
    fused_under: PathBuf,
    fused: PathBuf,
}

impl Twin {
    /// Creates `shared/NAME.direct` and `shared/NAME.fused` and runs `setup` on each directly.
    pub fn new(mount: &FuseMount, name: &str, setup: impl Fn(&Path)) -> Twin {
        let direct = mount.under(&format!("{name}.direct"));
        let fused_under = mount.under(&format!("{name}.fused"));
        for dir in [&direct, &fused_under] {
            fs::create_dir(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            setup(dir);
        }
        Twin {
            direct,
            fused: mount.via(&format!("{name}.fused")),
            fused_under,
        }
    }

    /// The path in the direct twin.
    pub fn d(&self, rel: &str) -> PathBuf {
        join_rel(&self.direct, rel)
    }

    /// The path through the mount.
    pub fn v(&self, rel: &str) -> PathBuf {
        join_rel(&self.fused, rel)
    }

    /// The path through the mount, seen on the underlying directory.
    pub fn u(&self, rel: &str) -> PathBuf {
        join_rel(&self.fused_under, rel)
    }

    /// Runs `op` on both twins' bases; both must end with `expected` errno (0 for success).
    #[track_caller]
    pub fn op<T: std::fmt::Debug>(
        &self,
        what: &str,
        expected: i32,
        op: impl Fn(&Path) -> io::Result<T>,
    ) {
        let _ = self.op_result(what, expected, op);
    }

    /// As [`Twin::op`], returning the outcome through the mount.
    #[track_caller]
    pub fn op_result<T: std::fmt::Debug>(
        &self,
        what: &str,
        expected: i32,
        op: impl Fn(&Path) -> io::Result<T>,
    ) -> io::Result<T> {
        let direct = op(&self.direct);
        let fused = op(&self.fused);
        assert_errno(
            &format!("{what} (on the underlying directory)"),
            &direct,
            expected,
        );
        assert_errno(&format!("{what} (through the mount)"), &fused, expected);
        fused
    }

    /// After an operation: `rel` has the same shape in both twins (or is missing in both),
    /// and the mount shows exactly the underlying attributes.
    #[track_caller]
    pub fn same(&self, what: &str, rel: &str) {
        let d = lstat(&self.d(rel));
        let u = lstat(&self.u(rel));
        let v = lstat(&self.v(rel));
        match (&d, &u) {
            (Ok(d), Ok(u)) => {
                assert_same_shape(&format!("{what}: {rel}"), d, u);
                assert_same_attrs(&format!("{what}: {rel}"), &self.v(rel), &self.u(rel));
            }
            _ => {
                assert_eq!(
                    (errno_of(&d), errno_of(&u), errno_of(&v)),
                    (errno_of(&d), errno_of(&d), errno_of(&d)),
                    "{what}: lstat of {rel} (direct, underlying of mount, through mount)"
                );
            }
        }
    }
}

fn join_rel(base: &Path, rel: &str) -> PathBuf {
    if rel.is_empty() || rel == "." {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}

pub fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// Writes `data` to `p` (create or truncate).
pub fn put(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}
