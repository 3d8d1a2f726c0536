//! Confinement tests that must run in a process of their own (seccomp filters cannot be removed,
//! sandboxes fork and pivot): each test re-runs this test binary with one scenario selected by
//! an environment variable and checks the child's exit and output.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use berth_seccomp::{
    drop_capabilities, enter_sandbox, install_filter, CapsNeeded, SandboxConfig, SandboxMode,
    SandboxOutcome, SandboxPath, SandboxRoot, SeccompAction, ThreadRole,
};

const SCENARIO_ENV: &str = "BERTH_SECCOMP_SCENARIO";
const SHARED_DIR_ENV: &str = "BERTH_SECCOMP_SHARED_DIR";
/// Exit code of the trap scenario's SIGSYS handler when the signal came from seccomp.
const TRAPPED_EXIT: i32 = 42;
/// Exit code the sandbox scenarios end with, to see it forwarded by the namespace parent.
const SANDBOX_EXIT: i32 = 7;

fn run_scenario(scenario: &str, shared_dir: Option<&Path>) -> Output {
    let mut command = Command::new(std::env::current_exe().expect("test binary path"));
    command
        .args([
            "--exact",
            "scenario_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO_ENV, scenario);
    if let Some(dir) = shared_dir {
        command.env(SHARED_DIR_ENV, dir);
    }
    command.output().expect("re-running the test binary")
}

/// Reports that a test cannot run here: prints why, or, when `BERTH_TESTS_NO_SKIP=1` (CI, as
/// root), fails, because a skipped confinement test is an unchecked promise.
fn skip_or_fail(test: &str, reason: &str) {
    if std::env::var("BERTH_TESTS_NO_SKIP").is_ok_and(|v| v == "1") {
        panic!("{test} cannot run here and BERTH_TESTS_NO_SKIP=1 forbids skipping it: {reason}");
    }
    println!("SKIPPED {test}: {reason}");
}

/// Makes the kernel log SECCOMP_RET_LOG decisions (the default set has "log"; a host may have
/// narrowed it). Only root may change the setting.
fn ensure_log_action_is_logged() -> Result<(), String> {
    const PATH: &str = "/proc/sys/kernel/seccomp/actions_logged";
    let logged = std::fs::read_to_string(PATH).map_err(|e| format!("cannot read {PATH}: {e}"))?;
    if logged.split_whitespace().any(|a| a == "log") {
        return Ok(());
    }
    if !is_root() {
        return Err(format!("'log' is not in {PATH} and only root may add it"));
    }
    let wanted = format!("{} log", logged.trim());
    std::fs::write(PATH, wanted).map_err(|e| format!("cannot add 'log' to {PATH}: {e}"))
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A system call no role allows: harmless, so that `log` lets it through without side effects.
fn forbidden_syscall() -> libc::c_long {
    // SAFETY: getppid has no arguments and no side effects.
    unsafe { libc::syscall(libc::SYS_getppid) }
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    const SYS_SECCOMP: libc::c_int = 1;
    // SAFETY: the kernel passes a valid siginfo to SA_SIGINFO handlers; _exit is
    // async-signal-safe.
    unsafe {
        let code = if (*info).si_code == SYS_SECCOMP {
            TRAPPED_EXIT
        } else {
            1
        };
        libc::_exit(code);
    }
}

/// Runs one scenario in the re-executed child; does nothing in a normal test run.
#[test]
#[ignore = "helper run by the other tests in a child process"]
fn scenario_child() {
    let Ok(scenario) = std::env::var(SCENARIO_ENV) else {
        return;
    };
    let shared_dir = std::env::var_os(SHARED_DIR_ENV).map(PathBuf::from);
    match scenario.as_str() {
        "kill" | "log" => {
            let action = if scenario == "kill" {
                SeccompAction::Kill
            } else {
                SeccompAction::Log
            };
            install_filter(ThreadRole::ThreadPool, action).expect("install filter");
            say(&format!("filter installed in pid={}", std::process::id()));
            let ppid = forbidden_syscall();
            say(&format!("survived getppid={ppid}"));
            std::process::exit(0);
        }
        "unshare_namespace" => {
            // Worker threads may unshare their fs struct, nothing else.
            install_filter(ThreadRole::ThreadPool, SeccompAction::Kill).expect("install filter");
            // SAFETY: unshare(CLONE_FS) only detaches this thread's cwd/root/umask.
            let fs = unsafe { libc::unshare(libc::CLONE_FS) };
            say(&format!("unshare CLONE_FS={fs}"));
            // SAFETY: as above; the filter is expected to kill the process first.
            unsafe { libc::unshare(libc::CLONE_NEWNS) };
            say("survived");
            std::process::exit(0);
        }
        "trap" => {
            // SAFETY: installing a handler that only calls _exit; the struct is zeroed first.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigsys as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO;
                libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
            }
            install_filter(ThreadRole::ThreadPool, SeccompAction::Trap).expect("install filter");
            say("filter installed");
            forbidden_syscall();
            say("survived");
            std::process::exit(0);
        }
        "allowed" => {
            // File work the way the passthrough does it (relative to directory descriptors),
            // through the Rust runtime, under `kill`.
            let dir = shared_dir.expect("shared dir");
            let dir_file = std::fs::File::open(&dir).unwrap();
            // As in the daemon: the thread installs its filter first thing, and its exit (stack
            // unmapping, waking the joiner) happens under the filter too.
            let worker = std::thread::spawn(move || {
                install_filter(ThreadRole::ThreadPool, SeccompAction::Kill)
                    .expect("install filter");
                at_work(dir_file.as_raw_fd())
            });
            let names = worker.join().unwrap();
            say(&format!("served entries={names}"));
            std::process::exit(0);
        }
        "namespace" | "chroot" => {
            let dir = shared_dir.expect("shared dir");
            let host_net = std::fs::File::open("/proc/self/ns/net").unwrap();
            let (read_end, write_end) = pipe();
            let mode = if scenario == "namespace" {
                SandboxMode::Namespace
            } else {
                SandboxMode::Chroot
            };
            let outcome = enter_sandbox_and_say_where(mode, SandboxRoot::Dir(dir), false);
            say(&format!("marker={}", Path::new("/marker").exists()));
            say(&format!("host_etc={}", Path::new("/etc/passwd").exists()));
            // A descriptor from before the sandbox still works.
            let written = {
                // SAFETY: writing 2 bytes from a valid buffer to a pipe we own.
                unsafe { libc::write(write_end.as_raw_fd(), b"ok".as_ptr().cast(), 2) }
            };
            let mut buf = [0u8; 2];
            // SAFETY: reading into a valid 2-byte buffer.
            let read = unsafe { libc::read(read_end.as_raw_fd(), buf.as_mut_ptr().cast(), 2) };
            say(&format!(
                "pipe={}",
                written == 2 && read == 2 && &buf == b"ok"
            ));
            // The kept /proc/self/fd reaches our descriptors by number.
            let proc_fd = outcome.proc_self_fd.expect("proc_self_fd");
            let name = CString::new(write_end.as_raw_fd().to_string()).unwrap();
            // SAFETY: valid directory fd and NUL-terminated name.
            let reopened =
                unsafe { libc::openat(proc_fd.as_raw_fd(), name.as_ptr(), libc::O_WRONLY) };
            say(&format!("reopen={}", reopened >= 0));
            // The kept /proc/self/fdinfo describes our descriptors (live migration reads
            // their locks there); in the namespace mode `..` from it reaches nothing else.
            let fdinfo = outcome.proc_self_fdinfo.expect("proc_self_fdinfo");
            let open_in_fdinfo = |name: &str| {
                let name = CString::new(name).unwrap();
                // SAFETY: valid directory fd and NUL-terminated name; the result is checked.
                let fd = unsafe { libc::openat(fdinfo.as_raw_fd(), name.as_ptr(), libc::O_RDONLY) };
                // SAFETY: a descriptor just opened, owned by nothing else.
                (fd >= 0).then(|| unsafe { std::fs::File::from_raw_fd(fd) })
            };
            let mut info = String::new();
            if let Some(mut file) = open_in_fdinfo(&write_end.as_raw_fd().to_string()) {
                std::io::Read::read_to_string(&mut file, &mut info).unwrap();
            }
            say(&format!("fdinfo={}", info.contains("flags:")));
            say(&format!(
                "fdinfo_up={}",
                open_in_fdinfo("../status").is_some()
            ));
            say(&format!("interfaces={}", interfaces().join(",")));
            say(&format!("same_net={}", same_net_namespace(&host_net)));
            std::process::exit(SANDBOX_EXIT);
        }
        "paths" => {
            // A root of two binds below the fixture: `ro` read-only, `rw` writable.
            let dir = shared_dir.expect("shared dir");
            let host_net = std::fs::File::open("/proc/self/ns/net").unwrap();
            let root = SandboxRoot::Paths(vec![
                SandboxPath {
                    path: dir.join("ro"),
                    writable: false,
                },
                SandboxPath {
                    path: dir.join("rw"),
                    writable: true,
                },
            ]);
            let _outcome = enter_sandbox_and_say_where(SandboxMode::Namespace, root, true);
            say(&format!("ro_marker={}", dir.join("ro/marker").exists()));
            say(&format!("outside={}", dir.join("outside").exists()));
            say(&format!("host_etc={}", Path::new("/etc/passwd").exists()));
            let write = |path: PathBuf| match std::fs::write(path, b"y") {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("{:?}", e.raw_os_error()),
            };
            say(&format!("ro_write={}", write(dir.join("ro/new"))));
            say(&format!("rw_write={}", write(dir.join("rw/new"))));
            say(&format!("root_write={}", write(PathBuf::from("/new"))));
            say(&format!("same_net={}", same_net_namespace(&host_net)));
            std::process::exit(SANDBOX_EXIT);
        }
        "caps" => {
            let needed = CapsNeeded {
                file_handles: true,
                modcaps: "+sys_admin:-chown".parse().unwrap(),
            };
            let kept = drop_capabilities(&needed).expect("drop capabilities");
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            for line in status.lines().filter(|l| l.starts_with("Cap")) {
                say(line);
            }
            say(&format!("kept={}", kept.len()));
            std::process::exit(0);
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Creates, writes, reads, links, renames, lists and removes entries under `dir` with the
/// *at system calls; returns how many entries the listing saw.
/// Enters a sandbox of `mode` at `root` (no id maps, no supervisor filter), then says the
/// pid it has inside and the root directory it was given.
fn enter_sandbox_and_say_where(
    mode: SandboxMode,
    root: SandboxRoot,
    keep_network: bool,
) -> SandboxOutcome {
    let outcome = enter_sandbox(&SandboxConfig {
        mode,
        root,
        keep_network,
        uid_map: Vec::new(),
        gid_map: Vec::new(),
        supervisor_seccomp: SeccompAction::None,
    })
    .expect("enter sandbox");
    // SAFETY: getpid has no preconditions.
    say(&format!("pid={}", unsafe { libc::getpid() }));
    say(&format!("root_dir={}", outcome.root_dir.display()));
    outcome
}

fn at_work(dir: libc::c_int) -> usize {
    let check = |what: &str, ret: libc::c_int| {
        assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
        ret
    };
    // SAFETY: every call gets a valid directory descriptor and NUL-terminated names; the
    // descriptors opened here are closed before returning.
    unsafe {
        // A private fs struct, a umask and the guest caller's file system identity, per request.
        check("unshare(CLONE_FS)", libc::unshare(libc::CLONE_FS));
        libc::umask(0o022);
        libc::setfsuid(0);
        libc::setfsgid(0);
        let fd = check(
            "openat",
            libc::openat(
                dir,
                c"a".as_ptr(),
                libc::O_CREAT | libc::O_RDWR | libc::O_CLOEXEC,
                0o644,
            ),
        );
        check(
            "pwrite",
            libc::pwrite(fd, b"data".as_ptr().cast(), 4, 0) as libc::c_int,
        );
        let mut buf = [0u8; 4];
        check(
            "pread",
            libc::pread(fd, buf.as_mut_ptr().cast(), 4, 0) as libc::c_int,
        );
        assert_eq!(&buf, b"data");
        check("fsync", libc::fsync(fd));
        check("ftruncate", libc::ftruncate(fd, 2));
        check("fchmod", libc::fchmod(fd, 0o600));
        libc::close(fd);
        check("mkdirat", libc::mkdirat(dir, c"d".as_ptr(), 0o755));
        check(
            "symlinkat",
            libc::symlinkat(c"a".as_ptr(), dir, c"l".as_ptr()),
        );
        check(
            "renameat",
            libc::syscall(
                libc::SYS_renameat2,
                dir,
                c"a".as_ptr(),
                dir,
                c"b".as_ptr(),
                0,
            ) as libc::c_int,
        );
        let mut st: libc::stat = std::mem::zeroed();
        check(
            "fstatat",
            libc::fstatat(dir, c"b".as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW),
        );
        assert_eq!(st.st_size, 2);
        let listing = check(
            "openat dir",
            libc::openat(
                dir,
                c".".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            ),
        );
        let stream = libc::fdopendir(listing);
        assert!(!stream.is_null());
        let mut names = 0;
        while !libc::readdir64(stream).is_null() {
            names += 1;
        }
        libc::closedir(stream);
        check("unlinkat", libc::unlinkat(dir, c"b".as_ptr(), 0));
        check("unlinkat link", libc::unlinkat(dir, c"l".as_ptr(), 0));
        check(
            "unlinkat dir",
            libc::unlinkat(dir, c"d".as_ptr(), libc::AT_REMOVEDIR),
        );
        // ".", "..", b, d, l
        names
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Whether this process is in the network namespace `ns` (a descriptor of a
/// `/proc/PID/ns/net`), found through a socket's namespace (/proc may be out of reach).
fn same_net_namespace(ns: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    /// SIOCGSKNS: a descriptor of a socket's network namespace.
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: a plain socket call; the result is checked.
    let socket = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(socket >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `socket` was just opened and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(socket) };
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor, checked below.
    let current = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCGSKNS as _) };
    assert!(
        current >= 0,
        "SIOCGSKNS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor just returned by the kernel, owned by nothing else.
    let current = unsafe { std::fs::File::from_raw_fd(current) };
    current.metadata().unwrap().ino() == ns.metadata().unwrap().ino()
}

fn interfaces() -> Vec<String> {
    std::fs::read_to_string("/proc/net/dev")
        .map(|s| {
            s.lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .map(|n| n.trim().to_owned())
                .collect()
        })
        .unwrap_or_else(|_| {
            // /proc is not reachable by path in the sandbox: ask the kernel directly.
            // SAFETY: if_nameindex returns a list freed below.
            unsafe {
                let list = libc::if_nameindex();
                let mut names = Vec::new();
                let mut entry = list;
                while !entry.is_null() && (*entry).if_index != 0 {
                    names.push(
                        std::ffi::CStr::from_ptr((*entry).if_name)
                            .to_string_lossy()
                            .into_owned(),
                    );
                    entry = entry.add(1);
                }
                if !list.is_null() {
                    libc::if_freenameindex(list);
                }
                names
            }
        })
}

#[test]
fn kill_action_kills_the_process_with_sigsys() {
    let output = run_scenario("kill", None);
    assert!(stdout(&output).contains("filter installed"), "{output:?}");
    assert!(!stdout(&output).contains("survived"), "{output:?}");
    assert_eq!(output.status.signal(), Some(libc::SIGSYS), "{output:?}");
}

#[test]
fn unshare_other_than_clone_fs_is_refused() {
    let output = run_scenario("unshare_namespace", None);
    let out = stdout(&output);
    assert!(out.contains("unshare CLONE_FS=0"), "{output:?}");
    assert!(!out.contains("survived"), "{output:?}");
    assert_eq!(output.status.signal(), Some(libc::SIGSYS), "{output:?}");
}

#[test]
fn trap_action_raises_a_catchable_sigsys_from_seccomp() {
    let output = run_scenario("trap", None);
    assert!(stdout(&output).contains("filter installed"), "{output:?}");
    assert_eq!(output.status.code(), Some(TRAPPED_EXIT), "{output:?}");
}

#[test]
fn log_action_lets_the_call_through_and_audits_it() {
    let test = "log_action_lets_the_call_through_and_audits_it (audit record)";
    // Before the child runs: the kernel only logs what actions_logged names at the time.
    let audit = ensure_log_action_is_logged();
    let output = run_scenario("log", None);
    let out = stdout(&output);
    assert!(output.status.success(), "{output:?}");
    // getppid really ran: it returned our pid (the child's parent is this process).
    assert!(
        out.contains(&format!("survived getppid={}", std::process::id())),
        "{out}"
    );
    // The kernel logs SECCOMP_RET_LOG as audit type 1326 (to the kernel log when no audit
    // daemon runs), if "log" is among the logged actions.
    if let Err(reason) = audit {
        skip_or_fail(test, &reason);
        return;
    }
    if read_kmsg().is_none() {
        skip_or_fail(test, "/dev/kmsg is not readable");
        return;
    }
    let pid = out
        .split("filter installed in pid=")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .expect("child pid");
    let pid_field = format!(" pid={pid} ");
    let syscall_field = format!(" syscall={} ", libc::SYS_getppid);
    // code=0x7ffc0000 is SECCOMP_RET_LOG. The kernel's audit thread prints records a little
    // later, and later still on a busy machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let kmsg = read_kmsg().unwrap_or_default();
        if kmsg.lines().any(|l| {
            l.contains("type=1326")
                && l.contains(&pid_field)
                && l.contains(&syscall_field)
                && l.contains("code=0x7ffc0000")
        }) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit record for getppid of pid {pid} in the kernel log"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn read_kmsg() -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut text = String::new();
    let mut record = vec![0u8; 8192];
    // Each read returns one record; EAGAIN ends the buffer (and EPIPE a record overwritten
    // meanwhile, which is fine to stop at too).
    while let Ok(n) = file.read(&mut record) {
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&record[..n]));
    }
    Some(text)
}

#[test]
fn filesystem_work_passes_the_kill_filter() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_scenario("allowed", Some(dir.path()));
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("served entries=5"), "{output:?}");
}

fn sandbox_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("marker"), b"x").unwrap();
    dir
}

#[test]
fn namespace_sandbox_makes_the_shared_dir_root_in_new_namespaces() {
    if !is_root() {
        skip_or_fail(
            "namespace_sandbox_makes_the_shared_dir_root_in_new_namespaces",
            "needs root (the unprivileged variant runs in the berth binary's tests)",
        );
        return;
    }
    let dir = sandbox_fixture();
    let output = run_scenario("namespace", Some(dir.path()));
    let out = stdout(&output);
    // The supervising parent forwards the child's exit code.
    assert_eq!(output.status.code(), Some(SANDBOX_EXIT), "{output:?}");
    for expected in [
        "pid=1",
        "root_dir=/",
        "marker=true",
        "host_etc=false",
        "pipe=true",
        "reopen=true",
        "fdinfo=true",
        "fdinfo_up=false",
        "interfaces=lo\n",
        "same_net=false",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in {out}");
    }
    // Nothing leaked onto the host: the shared dir holds only the marker, with no mounts.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(dir.path().to_str().unwrap()),
        "mount leaked"
    );
}

#[test]
fn a_root_of_paths_holds_them_at_their_own_paths_read_only_where_asked() {
    if !is_root() {
        skip_or_fail(
            "a_root_of_paths_holds_them_at_their_own_paths_read_only_where_asked",
            "needs root (serve-vhost's image test runs the same root unprivileged too)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    for sub in ["ro", "rw"] {
        std::fs::create_dir(base.join(sub)).unwrap();
    }
    std::fs::write(base.join("ro/marker"), b"x").unwrap();
    std::fs::write(base.join("outside"), b"x").unwrap();
    let output = run_scenario("paths", Some(&base));
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(SANDBOX_EXIT), "{output:?}");
    let erofs = format!("Some({})", libc::EROFS);
    for expected in [
        "pid=1".to_string(),
        "root_dir=/".into(),
        "ro_marker=true".into(),
        "outside=false".into(),
        "host_etc=false".into(),
        format!("ro_write={erofs}"),
        "rw_write=ok".into(),
        format!("root_write={erofs}"),
    ] {
        assert!(out.contains(&expected), "missing {expected:?} in {out}");
    }
    // The host's network is kept (a fresh namespace otherwise, as the next test shows).
    assert!(out.contains("same_net=true"), "{out}");
    assert!(
        base.join("rw/new").is_file(),
        "the writable bind is the host directory"
    );
    assert!(!base.join("ro/new").exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(base.to_str().unwrap()), "mount leaked");
}

#[test]
fn chroot_sandbox_makes_the_shared_dir_root() {
    if !is_root() {
        skip_or_fail(
            "chroot_sandbox_makes_the_shared_dir_root",
            "chroot needs root",
        );
        return;
    }
    let dir = sandbox_fixture();
    let output = run_scenario("chroot", Some(dir.path()));
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(SANDBOX_EXIT), "{output:?}");
    for expected in [
        "root_dir=/",
        "marker=true",
        "host_etc=false",
        "pipe=true",
        "reopen=true",
        "fdinfo=true",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in {out}");
    }
    assert!(
        !out.contains("pid=1\n"),
        "chroot must not fork into a pid namespace: {out}"
    );
}

fn cap_mask(out: &str, field: &str) -> u64 {
    // libtest's "test scenario_child ... " may precede the first line.
    let hex = out
        .lines()
        .find_map(|l| l.split_once(field).map(|(_, value)| value.trim()))
        .unwrap_or_else(|| panic!("no {field} in {out}"));
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn dropping_capabilities_leaves_exactly_the_needed_set() {
    if !is_root() {
        skip_or_fail(
            "dropping_capabilities_leaves_exactly_the_needed_set",
            "dropping capabilities is only observable with root's full set",
        );
        return;
    }
    let output = run_scenario("caps", None);
    let out = stdout(&output);
    assert!(output.status.success(), "{output:?}");
    let bit = |cap: u32| 1u64 << cap;
    // Defaults minus CHOWN, plus SYS_ADMIN (modcaps) and DAC_READ_SEARCH (file handles).
    let expected = bit(1) // DAC_OVERRIDE
        | bit(2) // DAC_READ_SEARCH
        | bit(3) // FOWNER
        | bit(4) // FSETID
        | bit(6) // SETGID
        | bit(7) // SETUID
        | bit(21) // SYS_ADMIN
        | bit(27) // MKNOD
        | bit(31); // SETFCAP
    assert_eq!(cap_mask(&out, "CapEff:"), expected, "{out}");
    assert_eq!(cap_mask(&out, "CapPrm:"), expected, "{out}");
    assert_eq!(cap_mask(&out, "CapInh:"), 0, "{out}");
    assert_eq!(cap_mask(&out, "CapBnd:"), 0, "{out}");
    assert_eq!(cap_mask(&out, "CapAmb:"), 0, "{out}");
    assert!(out.contains("kept=9"), "{out}");
}
