//! Helpers of the confinement and escape suites: the skip convention, the daemon's processes
//! and threads as /proc shows them, and the kernel's seccomp audit records.
//!
//! A test that cannot run here (not root, a kernel feature missing) calls [`skip_or_fail`]: it
//! prints why and returns, unless `BERTH_TESTS_NO_SKIP=1` is set (CI, as root), where a skip
//! would hide an untested guarantee and so fails the test instead.

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Set to `1` where every test must run (CI): a would-be skip fails instead.
pub const NO_SKIP_ENV: &str = "BERTH_TESTS_NO_SKIP";

/// Whether skipping is forbidden in this run.
pub fn skipping_forbidden() -> bool {
    std::env::var(NO_SKIP_ENV).is_ok_and(|v| v == "1")
}

/// Reports that `test` cannot run because of `reason`: prints it, or panics with it when
/// `BERTH_TESTS_NO_SKIP=1`.
pub fn skip_or_fail(test: &str, reason: &str) {
    if skipping_forbidden() {
        panic!("{test} cannot run here and {NO_SKIP_ENV}=1 forbids skipping it: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// Whether the test process is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether the test process is root; when it is not, reports `test` skipped for `reason` as
/// [`skip_or_fail`] does, and the test is to return.
pub fn root_or_skip(test: &str, reason: &str) -> bool {
    if !is_root() {
        skip_or_fail(test, reason);
    }
    is_root()
}

/// The process that serves requests: with the namespace sandbox (`forks`), the child of the
/// launched process (the sandbox's pid 1) once it exists; otherwise the launched process.
pub fn serving_pid(launched: u32, forks: bool) -> u32 {
    if !forks {
        return launched;
    }
    let children = format!("/proc/{launched}/task/{launched}/children");
    for _ in 0..1000 {
        let text = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(child) = text.split_whitespace().next() {
            return child.parse().expect("a pid");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("process {launched} did not fork its sandboxed server");
}

/// One thread of a process, as /proc shows it.
#[derive(Debug, Clone)]
pub struct ThreadInfo {
    pub tid: u32,
    pub name: String,
    /// `Seccomp:` 0 none, 1 strict, 2 filter.
    pub seccomp_mode: u32,
    /// `Seccomp_filters:` how many filters are stacked on the thread.
    pub seccomp_filters: u32,
    /// `CapEff:` the effective capability mask.
    pub cap_eff: u64,
}

/// Every thread of `pid`, once `ready` holds for them (or after 10 s, for the caller's
/// assertions to report). A thread takes its name and its role's filter when it first
/// runs: on a loaded machine the newest may not have run yet when a test looks.
#[allow(dead_code)]
pub fn threads_when(pid: u32, ready: impl Fn(&[ThreadInfo]) -> bool) -> Vec<ThreadInfo> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let found = threads(pid);
        if ready(&found) || std::time::Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every thread of `pid`.
pub fn threads(pid: u32) -> Vec<ThreadInfo> {
    let mut threads = Vec::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for entry in entries.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        threads.push(ThreadInfo {
            tid,
            name: field("Name:"),
            seccomp_mode: field("Seccomp:").parse().unwrap_or(0),
            seccomp_filters: field("Seccomp_filters:").parse().unwrap_or(0),
            cap_eff: u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(0),
        });
    }
    threads.sort_by_key(|t| t.tid);
    threads
}

/// A peak or current memory figure of `pid` from /proc/PID/status, in KiB (`VmHWM`, `VmRSS`).
pub fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// How many descriptors `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The kernel log as /dev/kmsg holds it now, one record per line (`prio,seq,usec,flags;text`).
pub fn read_kmsg() -> Option<Vec<(u64, String)>> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut records = Vec::new();
    let mut record = vec![0u8; 8192];
    // Each read returns one record; EAGAIN ends the buffer, EPIPE an overwritten record.
    loop {
        match file.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                let text = String::from_utf8_lossy(&record[..n]).into_owned();
                let seq = text
                    .split(';')
                    .next()
                    .and_then(|prefix| prefix.split(',').nth(1))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                records.push((seq, text.trim_end().to_owned()));
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    Some(records)
}

/// Why seccomp audit records cannot be read here, if they cannot.
pub fn seccomp_audit_unavailable() -> Option<String> {
    let logged =
        std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_logged").unwrap_or_default();
    if !logged.split_whitespace().any(|a| a == "log") {
        return Some("'log' is not in /proc/sys/kernel/seccomp/actions_logged".into());
    }
    if read_kmsg().is_none() {
        return Some("/dev/kmsg is not readable".into());
    }
    None
}

/// The highest kernel log sequence number so far (records after it are new).
pub fn kmsg_position() -> u64 {
    read_kmsg()
        .and_then(|r| r.iter().map(|(seq, _)| *seq).max())
        .unwrap_or(0)
}

/// Seccomp audit records (type 1326) logged after `since` for any of `pids`, as
/// `(comm, syscall number)` pairs.
pub fn seccomp_records(since: u64, pids: &[u32]) -> Vec<(String, i64)> {
    let Some(records) = read_kmsg() else {
        return Vec::new();
    };
    records
        .into_iter()
        .filter(|(seq, text)| *seq > since && text.contains("type=1326"))
        .filter_map(|(_, text)| {
            let field = |name: &str| {
                text.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(|v| v.trim_matches('"').to_owned())
            };
            let pid: u32 = field("pid=")?.parse().ok()?;
            if !pids.contains(&pid) {
                return None;
            }
            Some((field("comm=")?, field("syscall=")?.parse().ok()?))
        })
        .collect()
}

/// Whether `path` is on a filesystem that can hold file handles and device nodes the way the
/// escape tests need (not a FUSE or overlay mount).
pub fn usable_for_handles(path: &Path) -> bool {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: statfs is plain old data; all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return false;
    }
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    st.f_type != FUSE_SUPER_MAGIC
}
