//! `berth fuse` confines itself like the vhost-user daemon: the mount is visible on the host,
//! but the serving process runs in the namespace sandbox (or chroot) with the shared directory
//! as its root, dropped capabilities and per-role seccomp filters, and an unmount guard outside
//! the sandbox takes the mount down on shutdown or when berth dies.

#[path = "common/fuse_mount.rs"]
mod fuse_mount;
#[path = "common/security_util.rs"]
mod security_util;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use fuse_mount::*;
use security_util::*;

const CAP_SYS_ADMIN: u32 = 21;

fn can_run(test: &str) -> bool {
    match skip_reason() {
        Some(reason) => {
            skip_or_fail(test, &reason);
            false
        }
        None => true,
    }
}

fn namespace_of(pid: u32, kind: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("ns/{kind} of {pid}: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// (device, inode) of the serving process's root directory.
fn root_of(pid: u32) -> (u64, u64) {
    let meta = fs::metadata(format!("/proc/{pid}/root")).expect("the server's root");
    (meta.dev(), meta.ino())
}

fn inode_of(path: &Path) -> (u64, u64) {
    let meta = fs::metadata(path).expect("stat");
    (meta.dev(), meta.ino())
}

/// The detached unmount guard of the mount at `mnt`: a berth process whose command line
/// names the mount point and that is not the launched daemon or its sandboxed child.
fn unmount_guard(mnt: &Path, launched: u32, server: u32) -> Option<u32> {
    // The mount is visible a moment before the guard is forked.
    let deadline = Instant::now() + DAEMON_TIMEOUT;
    loop {
        if let Some(pid) = find_unmount_guard(mnt, launched, server) {
            return Some(pid);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn find_unmount_guard(mnt: &Path, launched: u32, server: u32) -> Option<u32> {
    let wanted = mnt.as_os_str().as_encoded_bytes();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == launched || pid == server {
            continue;
        }
        // The short-lived intermediate child of the double fork is still berth's child.
        let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(launched) {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let is_berth_fuse = cmdline.split(|&b| b == 0).any(|a| a == b"fuse")
            && cmdline.windows(wanted.len()).any(|w| w == wanted);
        if is_berth_fuse {
            return Some(pid);
        }
    }
    None
}

fn fd_targets(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|t| t.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn default_namespace_sandbox_serves_the_host_mount_confined() {
    let test = "default_namespace_sandbox_serves_the_host_mount_confined";
    if !can_run(test) {
        return;
    }
    let Some(fs_mount) = FuseMount::start(&["--xattr", "--threads=3"]) else {
        return;
    };
    // Served and visible on the host.
    fs::write(fs_mount.under("hello"), b"from the host").unwrap();
    assert_eq!(fs::read(fs_mount.via("hello")).unwrap(), b"from the host");
    fs::write(fs_mount.via("made"), b"through the mount").unwrap();
    assert_eq!(
        fs::read(fs_mount.under("made")).unwrap(),
        b"through the mount"
    );

    let launched = fs_mount.pid();
    let server = serving_pid(launched, true);
    assert_ne!(server, launched, "the namespace sandbox forks its server");
    let me = std::process::id();
    for kind in ["mnt", "pid", "net"] {
        assert_ne!(
            namespace_of(server, kind),
            namespace_of(me, kind),
            "the server shares the host's {kind} namespace"
        );
    }
    assert_eq!(
        root_of(server),
        inode_of(fs_mount.shared()),
        "the server's root is not the shared directory"
    );

    let over_io_uring =
        std::env::var("BERTH_FUSE_TEST_IO_URING").is_ok_and(|mode| mode == "always");
    // Every thread started: named, under its filter, with its capabilities dropped.
    let threads = threads_when(server, |threads| {
        let started = |prefix: &str| {
            threads
                .iter()
                .filter(|t| t.name.starts_with(prefix) && t.seccomp_filters == 2)
                .count()
        };
        started("berth-fuse-") == 3
            && (!over_io_uring || started("berth-uring-") >= 2)
            && threads.iter().all(|t| {
                t.seccomp_mode == 2
                    && (t.name == "berth-backing" || t.cap_eff & (1 << CAP_SYS_ADMIN) == 0)
            })
    });
    // The /dev/fuse workers, and (over io_uring) the ring threads, each under its own
    // filter on top of the main one.
    let workers: Vec<_> = threads
        .iter()
        .filter(|t| t.name.starts_with("berth-fuse-"))
        .collect();
    let rings: Vec<_> = threads
        .iter()
        .filter(|t| t.name.starts_with("berth-uring-"))
        .collect();
    assert_eq!(workers.len(), 3, "{threads:#?}");
    if over_io_uring {
        assert!(rings.len() >= 2, "no FUSE ring threads: {threads:#?}");
    }
    for worker in workers.iter().chain(&rings) {
        assert_eq!(worker.seccomp_mode, 2, "{worker:?}");
        assert_eq!(worker.seccomp_filters, 2, "main + FUSE worker: {worker:?}");
    }
    for thread in &threads {
        assert_eq!(thread.seccomp_mode, 2, "{thread:?}");
        if thread.name == "berth-backing" {
            // FUSE passthrough's registrar keeps CAP_SYS_ADMIN, the kernel's condition for
            // registering backing files, and nothing else.
            assert_eq!(thread.cap_eff, 1 << CAP_SYS_ADMIN, "{thread:?}");
            continue;
        }
        assert_eq!(
            thread.cap_eff & (1 << CAP_SYS_ADMIN),
            0,
            "CAP_SYS_ADMIN kept: {thread:?}"
        );
    }
    // Without CAP_SYS_ADMIN the trusted.* namespace is out of reach, as with virtiofsd.
    let err = xattr_set(&fs_mount.via("hello"), "trusted.berth", b"t").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");

    // The supervisor and the guard, outside, are confined too; the guard holds no /dev/fuse.
    assert_eq!(threads_of(launched)[0].seccomp_mode, 2);
    let guard = unmount_guard(fs_mount.mnt(), launched, server).expect("an unmount guard");
    assert_eq!(
        threads_of(guard)[0].seccomp_mode,
        2,
        "the guard is unconfined"
    );
    let targets = fd_targets(guard);
    assert!(
        targets.iter().all(|t| t != "/dev/fuse"),
        "the guard keeps the FUSE connection alive: {targets:?}"
    );
    assert_eq!(namespace_of(guard, "mnt"), namespace_of(me, "mnt"));
    fs_mount.finish();
}

fn threads_of(pid: u32) -> Vec<ThreadInfo> {
    let found = threads(pid);
    assert!(!found.is_empty(), "no process {pid}");
    found
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a valid buffer.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mknod_char(path: &Path) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn chroot_sandbox_by_flag_and_by_legacy_option() {
    let test = "chroot_sandbox_by_flag_and_by_legacy_option";
    if !can_run(test) {
        return;
    }
    for flags in [&["--sandbox=chroot"][..], &["-o", "sandbox=chroot"]] {
        let Some(fs_mount) = FuseMount::start(flags) else {
            return;
        };
        fs::write(fs_mount.via("f"), b"x").unwrap();
        assert_eq!(fs::read(fs_mount.under("f")).unwrap(), b"x");
        let server = fs_mount.pid();
        assert_eq!(
            root_of(server),
            inode_of(fs_mount.shared()),
            "{flags:?}: not chrooted into the shared directory"
        );
        let me = std::process::id();
        assert_eq!(namespace_of(server, "pid"), namespace_of(me, "pid"));
        assert!(threads_of(server).iter().all(|t| t.seccomp_mode == 2));
        fs_mount.finish();
    }
}

#[test]
fn modcaps_minus_mknod_refuses_device_nodes() {
    let test = "modcaps_minus_mknod_refuses_device_nodes";
    if !can_run(test) {
        return;
    }
    // By default root in the guest (here: on the mount) may create device nodes.
    let Some(plain) = FuseMount::start(&[]) else {
        return;
    };
    mknod_char(&plain.via("null")).expect("mknod as root through the default mount");
    assert!(fs::symlink_metadata(plain.under("null")).is_ok());
    plain.finish();
    for flags in [&["--modcaps=-mknod"][..], &["-o", "modcaps=-mknod"]] {
        let Some(fs_mount) = FuseMount::start(flags) else {
            return;
        };
        let err = mknod_char(&fs_mount.via("null")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{flags:?}: {err}");
        assert!(fs::symlink_metadata(fs_mount.under("null")).is_err());
        fs_mount.finish();
    }
}

#[test]
fn no_sandbox_and_no_seccomp_still_serve_and_unmount() {
    let test = "no_sandbox_and_no_seccomp_still_serve_and_unmount";
    if !can_run(test) {
        return;
    }
    let Some(fs_mount) = FuseMount::start(&["--sandbox=none", "--seccomp=none"]) else {
        return;
    };
    fs::write(fs_mount.via("f"), b"x").unwrap();
    let server = fs_mount.pid();
    assert!(threads_of(server).iter().all(|t| t.seccomp_mode == 0));
    fs_mount.finish();
}

#[test]
fn a_killed_server_is_unmounted_by_the_guard() {
    let test = "a_killed_server_is_unmounted_by_the_guard";
    if !can_run(test) {
        return;
    }
    let Some(mut fs_mount) = FuseMount::start(&[]) else {
        return;
    };
    fs::write(fs_mount.via("f"), b"x").unwrap();
    let server = serving_pid(fs_mount.pid(), true);
    // SAFETY: signalling a process of this test's daemon.
    assert_eq!(
        unsafe { libc::kill(server as libc::pid_t, libc::SIGKILL) },
        0
    );
    let status = fs_mount
        .wait_exit(DAEMON_TIMEOUT)
        .expect("the supervisor mirrors its child's end");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "{status}"
    );
    let deadline = Instant::now() + DAEMON_TIMEOUT;
    while fs_mount.is_mounted() {
        assert!(
            Instant::now() < deadline,
            "{} is still mounted after berth died",
            fs_mount.mnt().display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn uid_maps_need_the_namespace_sandbox() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "fuse",
            "--shared-dir=/tmp",
            "--mountpoint=/mnt",
            "--sandbox=chroot",
            "--uid-map=:0:1000:1:",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("namespace sandbox"), "{stderr}");
}

/// Runs `script` with /bin/sh as uid/gid 1000.
fn as_guest_user(script: &str) -> std::process::ExitStatus {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new("/bin/sh");
    command.arg("-c").arg(script);
    // SAFETY: only async-signal-safe id changes between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(1000, 1000, 1000) != 0
                || libc::setresuid(1000, 1000, 1000) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.status().expect("run /bin/sh")
}

#[test]
fn a_full_workload_under_seccomp_log_leaves_no_audit_record() {
    use std::os::unix::fs::PermissionsExt;
    let test = "fuse_confinement::a_full_workload_under_seccomp_log_leaves_no_audit_record";
    if !can_run(test) {
        return;
    }
    if let Some(reason) = seccomp_audit_unavailable() {
        skip_or_fail(test, &reason);
        return;
    }
    let since = kmsg_position();
    let Some(mut fs_mount) = FuseMount::start(&[
        "--seccomp=log",
        "--xattr",
        "--posix-lock",
        "--flock",
        "--threads=2",
    ]) else {
        return;
    };
    let launched = fs_mount.pid();
    let server = serving_pid(launched, true);
    let guard = unmount_guard(fs_mount.mnt(), launched, server).expect("the unmount guard");
    let home = fs_mount.under("home");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(1000), Some(1000)).unwrap();
    fs::set_permissions(fs_mount.shared(), fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = fs_mount.mnt().display().to_string();
    // As root: the whole range of calls, from a shell and from here.
    let root_script = format!(
        "set -e; cd {mnt}; echo data > f; cat f >/dev/null; mkdir d; ln -s f l; ln f h; \
         mv h d/h; chmod 640 f; chown 1000:1000 f; truncate -s 2 f; mkfifo p; \
         touch -d @1000000 f; ls -la . d >/dev/null; stat -f . >/dev/null; \
         setfattr -n user.x -v 1 f 2>/dev/null || true; getfattr -d f >/dev/null 2>&1 || true; \
         flock f true; dd if=f of=g bs=1 count=1 conv=fsync 2>/dev/null; \
         fallocate -l 8192 g 2>/dev/null || true; cp --reflink=never g g2; rm -r d l p g g2"
    );
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&root_script)
        .status()
        .unwrap();
    assert!(status.success(), "the root workload failed");
    // As a guest user: creating calls switch the file system identity.
    let user_script = format!(
        "set -e; cd {mnt}/home; echo data > f; mkdir d; ln -s f l; ln f h; mv h d/h; \
         mkfifo p; chmod 600 f; truncate -s 1 f; ls -la . d >/dev/null; rm -r d l p f"
    );
    assert!(
        as_guest_user(&user_script).success(),
        "the guest user workload failed"
    );
    fs_mount.signal(libc::SIGTERM);
    let status = fs_mount
        .wait_exit(DAEMON_TIMEOUT)
        .expect("berth exits on SIGTERM");
    assert!(status.success(), "{status}\n{}", fs_mount.log());
    std::thread::sleep(Duration::from_secs(1));
    let records = seccomp_records(since, &[launched, server, guard]);
    assert!(
        records.is_empty(),
        "system calls outside the allow-lists (thread, number): {records:?}"
    );
}
