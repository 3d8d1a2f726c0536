//! The real berth binary with its default confinement (namespace sandbox, `--seccomp kill`,
//! capabilities dropped) serving every kind of request, as root and as unprivileged guest users,
//! inline and on the thread pool: no request may run into a system call its thread's seccomp
//! filter refuses (which would kill the daemon). Also checks that each thread runs under the
//! filter of its role, and, under `--seccomp log`, that a full workload leaves no audit record
//! (every system call made was allowed).

#[path = "common/frontend_util.rs"]
mod frontend_util;
#[path = "common/security_util.rs"]
mod security_util;

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use berth_frontend::fuse::{setattr_valid, SetattrIn, ROOT_ID};
use berth_frontend::fuse::{
    AccessIn, CopyFileRangeIn, CreateIn, FallocateIn, FileLock, FlushIn, FsyncIn, GetxattrIn, LkIn,
    LseekIn, SetxattrIn,
};
use berth_frontend::FsQueue;
use frontend_util::*;
use security_util::*;
use vm_memory::ByteValued;

/// The unprivileged guest user the workload runs as.
const GUEST_UID: u32 = 1000;
const GUEST_GID: u32 = 1000;

/// Opcodes the frontend has no typed call for.
const STATFS: u32 = 17;
const FSYNC: u32 = 20;
const SETXATTR: u32 = 21;
const GETXATTR: u32 = 22;
const LISTXATTR: u32 = 23;
const REMOVEXATTR: u32 = 24;
const FLUSH: u32 = 25;
const FSYNCDIR: u32 = 30;
const GETLK: u32 = 31;
const SETLK: u32 = 32;
const SETLKW: u32 = 33;
const ACCESS: u32 = 34;
const FALLOCATE: u32 = 43;
const LSEEK: u32 = 46;
const COPY_FILE_RANGE: u32 = 47;
const SYNCFS: u32 = 50;
const TMPFILE: u32 = 51;
const FUSE_LK_FLOCK: u32 = 1;

/// A shared directory with a directory the guest user owns (fsuid 1000 cannot write to the
/// root-owned share root, just as on a real host).
fn user_fixture() -> Fixture {
    let fixture = Fixture::new();
    let home = fixture.shared.join("home");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(GUEST_UID), Some(GUEST_GID)).unwrap();
    fs::set_permissions(&fixture.shared, fs::Permissions::from_mode(0o755)).unwrap();
    fixture
}

fn owner(path: &Path) -> (u32, u32) {
    let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.uid(), meta.gid())
}

/// Runs `work`; if it panics (a request failed or timed out), says what became of the daemon
/// (a seccomp kill shows as signal 31) and what it logged.
fn reporting_daemon_fate<T>(daemon: &mut Daemon, work: impl FnOnce(&mut Daemon) -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut *daemon))) {
        Ok(value) => value,
        Err(panic) => {
            let status = daemon.wait_exit(Duration::from_millis(500));
            eprintln!(
                "daemon: {}\n--- daemon stderr ---\n{}",
                status.map_or("still running".into(), describe_status),
                daemon.stderr()
            );
            std::panic::resume_unwind(panic)
        }
    }
}

/// Every request that changes the share, as a guest user would send them, each followed by a
/// check that the daemon is still there; `extended` adds xattrs, locks and the rarer calls.
fn guest_user_workload(daemon: &mut Daemon, queue: &mut FsQueue, shared: &Path, extended: bool) {
    let home_dir = shared.join("home");
    let home = queue.lookup(ROOT_ID, b"home").expect("LOOKUP home");
    queue.set_caller(GUEST_UID, GUEST_GID);

    let (file, opened) = queue
        .create(
            home.nodeid,
            b"f",
            libc::S_IFREG | 0o644,
            libc::O_RDWR as u32,
        )
        .expect("CREATE as the guest user");
    daemon.assert_alive("after CREATE by uid 1000");
    assert_eq!(owner(&home_dir.join("f")), (GUEST_UID, GUEST_GID));
    let written = queue
        .write(file.nodeid, opened.fh, 0, b"guest data")
        .expect("WRITE");
    assert_eq!(written, 10);
    daemon.assert_alive("after WRITE by uid 1000");

    let dir = queue
        .mkdir(home.nodeid, b"d", 0o755)
        .expect("MKDIR as the guest user");
    daemon.assert_alive("after MKDIR by uid 1000");
    assert_eq!(owner(&home_dir.join("d")), (GUEST_UID, GUEST_GID));

    let fifo_node = queue
        .mknod(home.nodeid, b"fifo", libc::S_IFIFO | 0o600, 0)
        .expect("MKNOD fifo as the guest user")
        .nodeid;
    daemon.assert_alive("after MKNOD by uid 1000");
    let fifo = fs::symlink_metadata(home_dir.join("fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!((fifo.uid(), fifo.gid()), (GUEST_UID, GUEST_GID));
    // A device node needs CAP_MKNOD, which a guest user's file system identity lacks.
    let err = queue
        .mknod(
            home.nodeid,
            b"null",
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3) as u32,
        )
        .expect_err("a guest user must not create device nodes");
    assert_eq!(err.errno(), Some(libc::EPERM), "{err}");
    daemon.assert_alive("after a refused MKNOD by uid 1000");

    let link = queue
        .symlink(home.nodeid, b"l", b"f")
        .expect("SYMLINK as the guest user");
    daemon.assert_alive("after SYMLINK by uid 1000");
    assert_eq!(owner(&home_dir.join("l")), (GUEST_UID, GUEST_GID));
    assert_eq!(queue.readlink(link.nodeid).expect("READLINK"), b"f");

    queue
        .rename(home.nodeid, b"f", dir.nodeid, b"g")
        .expect("RENAME as the guest user");
    daemon.assert_alive("after RENAME by uid 1000");
    assert!(home_dir.join("d/g").exists());
    queue
        .rename2(dir.nodeid, b"g", home.nodeid, b"l", libc::RENAME_EXCHANGE)
        .expect("RENAME2 exchange as the guest user");
    daemon.assert_alive("after RENAME2 by uid 1000");
    assert!(fs::symlink_metadata(home_dir.join("d/g"))
        .unwrap()
        .file_type()
        .is_symlink());

    let hard = queue
        .link(file.nodeid, home.nodeid, b"h")
        .expect("LINK as the guest user");
    daemon.assert_alive("after LINK by uid 1000");
    assert_eq!(hard.attr.nlink, 2);

    let setattr = SetattrIn {
        valid: setattr_valid::MODE | setattr_valid::SIZE | setattr_valid::ATIME,
        mode: libc::S_IFREG | 0o600,
        size: 5,
        atime: 1_000_000,
        ..Default::default()
    };
    let attr = queue
        .setattr(file.nodeid, &setattr)
        .expect("SETATTR as the guest user");
    daemon.assert_alive("after SETATTR by uid 1000");
    assert_eq!(attr.attr.size, 5);
    assert_eq!(attr.attr.mode & 0o7777, 0o600);
    assert_eq!(fs::read(home_dir.join("h")).unwrap(), b"guest");

    let tmp = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: 0o600,
        umask: 0o022,
        fuse_flags: 0,
    };
    let tmpfile =
        call(queue, TMPFILE, home.nodeid, &[tmp.as_slice(), b"\0"], 4096).expect("TMPFILE");
    let tmp_node = u64::from_ne_bytes(tmpfile.body[..8].try_into().unwrap());
    daemon.assert_alive("after TMPFILE by uid 1000");

    if extended {
        extended_workload(daemon, queue, file.nodeid, opened.fh, home.nodeid);
    }

    queue
        .release(file.nodeid, opened.fh, libc::O_RDWR as u32)
        .expect("RELEASE");
    for name in [&b"h"[..], b"l", b"fifo"] {
        queue.unlink(home.nodeid, name).expect("UNLINK");
    }
    queue.unlink(dir.nodeid, b"g").expect("UNLINK");
    queue.rmdir(home.nodeid, b"d").expect("RMDIR");
    daemon.assert_alive("after UNLINK and RMDIR by uid 1000");
    let listing = queue.list_dir_plus(home.nodeid).expect("READDIRPLUS");
    assert!(listing.iter().all(|e| e.name == b"." || e.name == b".."));
    queue.set_caller(0, 0);
    // Give every lookup back, as a guest does once it drops the dentries.
    let lookups = [
        home.nodeid,
        file.nodeid,
        file.nodeid,
        dir.nodeid,
        fifo_node,
        link.nodeid,
        tmp_node,
    ];
    let forgets: Vec<(u64, u64)> = lookups.iter().map(|&node| (node, 1)).collect();
    queue.batch_forget(&forgets).expect("BATCH_FORGET");
}

/// Extended attributes, locks, syncs, allocation, seeking and copying on an open file.
fn extended_workload(daemon: &mut Daemon, queue: &mut FsQueue, node: u64, fh: u64, dir: u64) {
    let value = b"v1";
    let set = SetxattrIn {
        size: value.len() as u32,
        flags: 0,
    };
    call(
        queue,
        SETXATTR,
        node,
        &[set.as_slice(), b"user.berth\0", value],
        0,
    )
    .expect("SETXATTR");
    let get = GetxattrIn {
        size: 64,
        padding: 0,
    };
    let got = call(
        queue,
        GETXATTR,
        node,
        &[get.as_slice(), b"user.berth\0"],
        64,
    )
    .expect("GETXATTR");
    assert_eq!(got.body, value);
    let listed = call(queue, LISTXATTR, node, &[get.as_slice()], 64).expect("LISTXATTR");
    assert!(listed.body.windows(10).any(|w| w == b"user.berth"));
    call(queue, REMOVEXATTR, node, &[b"user.berth\0"], 0).expect("REMOVEXATTR");
    daemon.assert_alive("after the xattr calls");

    let lock = |type_: u32, flags: u32| LkIn {
        fh,
        owner: 77,
        lk: FileLock {
            start: 0,
            end: 10,
            type_,
            pid: 1,
        },
        lk_flags: flags,
        padding: 0,
    };
    let wr = libc::F_WRLCK as u32;
    let un = libc::F_UNLCK as u32;
    call(queue, SETLK, node, &[lock(wr, 0).as_slice()], 0).expect("SETLK");
    call(queue, GETLK, node, &[lock(wr, 0).as_slice()], 24).expect("GETLK");
    call(queue, SETLKW, node, &[lock(un, 0).as_slice()], 0).expect("SETLKW unlock");
    call(queue, SETLK, node, &[lock(wr, FUSE_LK_FLOCK).as_slice()], 0).expect("flock");
    call(queue, SETLK, node, &[lock(un, FUSE_LK_FLOCK).as_slice()], 0).expect("flock unlock");
    daemon.assert_alive("after the lock calls");

    let fsync = FsyncIn {
        fh,
        fsync_flags: 1,
        padding: 0,
    };
    call(queue, FSYNC, node, &[fsync.as_slice()], 0).expect("FSYNC datasync");
    let fsync = FsyncIn {
        fsync_flags: 0,
        ..fsync
    };
    call(queue, FSYNC, node, &[fsync.as_slice()], 0).expect("FSYNC");
    let flush = FlushIn {
        fh,
        unused: 0,
        padding: 0,
        lock_owner: 77,
    };
    call(queue, FLUSH, node, &[flush.as_slice()], 0).expect("FLUSH");
    call(queue, SYNCFS, node, &[&[0u8; 8]], 0).expect("SYNCFS");
    call(queue, STATFS, node, &[], 80).expect("STATFS");
    let access = AccessIn {
        mask: libc::R_OK as u32,
        padding: 0,
    };
    call(queue, ACCESS, node, &[access.as_slice()], 0).expect("ACCESS");
    let falloc = FallocateIn {
        fh,
        offset: 0,
        length: 65536,
        mode: 0,
        padding: 0,
    };
    call(queue, FALLOCATE, node, &[falloc.as_slice()], 0).expect("FALLOCATE");
    let seek = LseekIn {
        fh,
        offset: 0,
        whence: libc::SEEK_DATA as u32,
        padding: 0,
    };
    call(queue, LSEEK, node, &[seek.as_slice()], 8).expect("LSEEK");
    let copy = CopyFileRangeIn {
        fh_in: fh,
        offset_in: 0,
        nodeid_out: node,
        fh_out: fh,
        offset_out: 100_000,
        len: 4,
        flags: 0,
    };
    call(queue, COPY_FILE_RANGE, node, &[copy.as_slice()], 24).expect("COPY_FILE_RANGE");
    let dir_handle = queue.opendir(dir).expect("OPENDIR");
    queue.readdir(dir, dir_handle.fh, 0, 4096).expect("READDIR");
    let fsync = FsyncIn {
        fh: dir_handle.fh,
        fsync_flags: 0,
        padding: 0,
    };
    call(queue, FSYNCDIR, dir, &[fsync.as_slice()], 0).expect("FSYNCDIR");
    queue.releasedir(dir, dir_handle.fh).expect("RELEASEDIR");
    let read = queue.read(node, fh, 0, 4096).expect("READ");
    assert_eq!(&read[..5], b"guest");
    daemon.assert_alive("after the extended calls");
}

fn start(fixture: &Fixture, extra: &[&str]) -> Daemon {
    let mut args = fixture.basic_args();
    args.extend(extra.iter().map(OsString::from));
    let mut daemon = Daemon::spawn(args);
    daemon.wait_for_socket(&fixture.socket);
    daemon
}

fn require_root_berth(test: &str) -> bool {
    if !testing_berth() {
        skip_or_fail(test, "tests berth's own confinement");
        return false;
    }
    if !is_root() {
        skip_or_fail(
            test,
            "needs root: only a root daemon switches to the guest user's identity",
        );
        return false;
    }
    true
}

fn run_guest_user_workload(test: &str, extra: &[&str], extended: bool) {
    if !require_root_berth(test) {
        return;
    }
    let fixture = user_fixture();
    let mut daemon = start(&fixture, extra);
    let mut device = connect(&mut daemon, &fixture.socket, 2);
    let mut queue = init_first_queue(&mut device);
    reporting_daemon_fate(&mut daemon, |daemon| {
        guest_user_workload(daemon, &mut queue, &fixture.shared, extended);
        // The second request queue has its own thread and filter.
        let mut second = device.take_request_queue(2).expect("queue 2");
        guest_user_workload(daemon, &mut second, &fixture.shared, extended);
    });
    daemon.assert_alive("at the end of the workload");
}

#[test]
fn guest_users_are_served_under_the_default_seccomp_filter() {
    run_guest_user_workload(
        "guest_users_are_served_under_the_default_seccomp_filter",
        &[],
        false,
    );
}

#[test]
fn thread_pool_serves_guest_users_under_the_default_seccomp_filter() {
    run_guest_user_workload(
        "thread_pool_serves_guest_users_under_the_default_seccomp_filter",
        &["--thread-pool-size=4"],
        false,
    );
}

#[test]
fn every_operation_passes_the_default_filters() {
    run_guest_user_workload(
        "every_operation_passes_the_default_filters",
        &["--xattr", "--posix-lock", "--flock", "--thread-pool-size=2"],
        true,
    );
}

#[test]
fn each_thread_runs_under_the_filter_of_its_role() {
    let test = "each_thread_runs_under_the_filter_of_its_role";
    if !require_root_berth(test) {
        return;
    }
    let fixture = user_fixture();
    let mut daemon = start(
        &fixture,
        &["--thread-pool-size=3", "--max-request-queues=2"],
    );
    let mut device = connect(&mut daemon, &fixture.socket, 2);
    let mut queue = init_first_queue(&mut device);
    for _ in 0..20 {
        queue.getattr(ROOT_ID).expect("GETATTR");
    }
    let server = serving_pid(daemon.pid(), true);
    let roles = [
        ("signals", 1, 1),
        ("berth-vhost-us", 1, 2),
        ("vring_worker", 3, 2),
        ("berth-pool-", 3, 2),
    ];
    let threads = security_util::threads_when(server, |threads| {
        roles.iter().all(|&(name, count, filters)| {
            threads
                .iter()
                .filter(|t| t.name.starts_with(name) && t.seccomp_filters == filters)
                .count()
                == count
        })
    });
    let by_name = |name: &str| -> Vec<&ThreadInfo> {
        threads
            .iter()
            .filter(|t| t.name.starts_with(name))
            .collect()
    };
    eprintln!("{threads:#?}");
    // The main thread and the signal thread run the main filter alone; every other thread has
    // stacked its role's narrower filter on top of the main one it inherited.
    assert_eq!(threads[0].seccomp_filters, 1, "main thread: {threads:#?}");
    for (name, count, filters) in roles {
        let found = by_name(name);
        assert_eq!(found.len(), count, "{name} threads: {threads:#?}");
        for thread in found {
            assert_eq!(thread.seccomp_mode, 2, "{thread:?}");
            assert_eq!(thread.seccomp_filters, filters, "{thread:?}");
        }
    }
    // Capabilities are down to the serving set (CHOWN .. SETFCAP, DAC_READ_SEARCH): no
    // SYS_ADMIN (21), no SYS_PTRACE (19), no NET_ADMIN (12).
    for thread in &threads {
        for forbidden in [12u32, 19, 21] {
            assert_eq!(
                thread.cap_eff & (1 << forbidden),
                0,
                "capability {forbidden} kept: {thread:?}"
            );
        }
    }
    // The supervising parent of the namespace sandbox handles no guest input but is confined
    // too.
    let supervisor = threads_of_supervisor(daemon.pid());
    assert_eq!(supervisor.seccomp_mode, 2, "supervisor: {supervisor:?}");
    daemon.assert_alive("after reading its threads");
}

fn threads_of_supervisor(pid: u32) -> ThreadInfo {
    let all = threads(pid);
    assert_eq!(all.len(), 1, "the supervisor is single-threaded: {all:?}");
    all[0].clone()
}

#[test]
fn a_full_workload_under_seccomp_log_leaves_no_audit_record() {
    let test = "a_full_workload_under_seccomp_log_leaves_no_audit_record";
    if !require_root_berth(test) {
        return;
    }
    if let Some(reason) = seccomp_audit_unavailable() {
        skip_or_fail(test, &reason);
        return;
    }
    for extra in [
        &["--seccomp=log", "--xattr", "--posix-lock", "--flock"][..],
        &[
            "--seccomp=log",
            "--xattr",
            "--posix-lock",
            "--flock",
            "--thread-pool-size=4",
            "--cache=never",
            "--inode-file-handles=never",
        ],
    ] {
        let since = kmsg_position();
        let fixture = user_fixture();
        let mut daemon = start(&fixture, extra);
        let server = serving_pid(daemon.pid(), true);
        let mut device = connect(&mut daemon, &fixture.socket, 2);
        let mut queue = init_first_queue(&mut device);
        reporting_daemon_fate(&mut daemon, |daemon| {
            guest_user_workload(daemon, &mut queue, &fixture.shared, true)
        });
        // The high-priority queue (FORGET) and a disconnect (thread exit, process exit).
        let mut hiprio = device
            .take_queue(berth_frontend::HIPRIO_QUEUE)
            .expect("hiprio queue");
        let hello = queue.lookup(ROOT_ID, b"hello.txt").expect("LOOKUP");
        hiprio.forget(hello.nodeid, 1).expect("FORGET");
        queue
            .batch_forget(&[(hello.nodeid, 0)])
            .expect("BATCH_FORGET");
        drop(queue);
        drop(hiprio);
        device.disconnect();
        let status = daemon
            .wait_exit(Duration::from_secs(10))
            .expect("berth exits after the disconnect");
        assert!(status.success(), "{}", daemon.stderr());
        // The kernel writes audit records asynchronously.
        std::thread::sleep(Duration::from_secs(1));
        let records = seccomp_records(since, &[daemon.pid(), server]);
        assert!(
            records.is_empty(),
            "{extra:?}: system calls outside the allow-lists (thread, number): {records:?}"
        );
    }
}

/// Gives the daemon a private /dev whose `log` is `socket` (root only: the test must not
/// create /dev/log on the host).
fn with_private_dev_log(command: &mut std::process::Command, socket: &Path) {
    use std::os::unix::process::CommandExt;
    let socket = std::ffi::CString::new(socket.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls on pointers it owns.
    unsafe {
        command.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            let none = std::ptr::null::<libc::c_char>();
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
                || libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/dev".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                ) != 0
            {
                return fail();
            }
            let fd = libc::open(c"/dev/log".as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600);
            if fd < 0 {
                return fail();
            }
            libc::close(fd);
            if libc::mount(
                socket.as_ptr(),
                c"/dev/log".as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
            Ok(())
        });
    }
}

#[test]
fn syslog_logging_from_queue_and_pool_threads_passes_the_filters() {
    let test = "syslog_logging_from_queue_and_pool_threads_passes_the_filters";
    if !require_root_berth(test) {
        return;
    }
    for extra in [&["--syslog"][..], &["--syslog", "--thread-pool-size=2"]] {
        let fixture = Fixture::new();
        let log_socket = fixture.root.path().join("log.sock");
        let syslog = std::os::unix::net::UnixDatagram::bind(&log_socket).unwrap();
        syslog
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut args = fixture.basic_args();
        args.extend(extra.iter().map(OsString::from));
        let mut daemon = Daemon::spawn_with(args, |command| {
            with_private_dev_log(command, &log_socket);
        });
        daemon.wait_for_socket(&fixture.socket);
        let mut device = connect(&mut daemon, &fixture.socket, 1);
        let mut queue = init_first_queue(&mut device);
        // A chain without a writable reply buffer: the thread serving it logs a warning.
        use berth_frontend::virtqueue::VIRTQ_DESC_F_NEXT;
        use berth_frontend::{RawDescriptor, RawNext};
        let request = queue.allocate_raw_buffer(4096).unwrap();
        let getattr = berth_frontend::fuse::GetattrIn::default();
        let (_, len) = queue
            .write_request_bytes(request, 3, ROOT_ID, &[getattr.as_slice()])
            .unwrap();
        let reply = queue.allocate_raw_buffer(4096).unwrap();
        for _ in 0..3 {
            let head = queue
                .submit_raw(&[
                    RawDescriptor {
                        addr: request.0,
                        len,
                        flags: VIRTQ_DESC_F_NEXT,
                        next: RawNext::Following,
                    },
                    RawDescriptor {
                        addr: reply.0,
                        len: 4096,
                        flags: 0,
                        next: RawNext::Following,
                    },
                ])
                .unwrap();
            let _ = queue.wait_raw(head, Duration::from_millis(300));
        }
        queue
            .getattr(ROOT_ID)
            .expect("GETATTR after the malformed chains");
        daemon.assert_alive(&format!("{extra:?}: after logging from a serving thread"));
        let mut lines = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = syslog.recv(&mut buf) {
            lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains("Dropping a request") && l.starts_with("<12>berth[")),
            "{extra:?}: no warning reached syslog: {lines:#?}"
        );
    }
}

/// Once the queue threads have confined themselves their start-up events are closed: each
/// thread's epoll set holds only the library's own two events (exit, vring enabled) until a
/// frontend connects, and the daemon keeps no descriptor per thread beyond those.
#[test]
fn the_queue_threads_start_up_events_are_closed_once_they_are_confined() {
    let test = "the_queue_threads_start_up_events_are_closed_once_they_are_confined";
    if !require_root_berth(test) {
        return;
    }
    let fixture = user_fixture();
    let mut daemon = start(&fixture, &["--max-request-queues=2"]);
    let server = serving_pid(daemon.pid(), true);
    let kinds = || -> Vec<(String, String)> {
        std::fs::read_dir(format!("/proc/{server}/fd"))
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| {
                        let target = std::fs::read_link(e.path()).ok()?;
                        Some((
                            e.file_name().to_string_lossy().into_owned(),
                            target.to_string_lossy().into_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let epolls = |fds: &[(String, String)]| -> Vec<String> {
        fds.iter()
            .filter(|(_, target)| target == "anon_inode:[eventpoll]")
            .map(|(fd, _)| fd.clone())
            .collect()
    };
    // The socket is there before the threads have confined themselves: wait for that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let registered = |fd: &str| -> usize {
        std::fs::read_to_string(format!("/proc/{server}/fdinfo/{fd}"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with("tfd:"))
            .count()
    };
    let mut fds = kinds();
    while std::time::Instant::now() < deadline
        && !(epolls(&fds).len() == 3 && epolls(&fds).iter().all(|fd| registered(fd) == 2))
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
        fds = kinds();
    }
    let sets: Vec<(String, usize)> = epolls(&fds)
        .into_iter()
        .map(|fd| {
            let n = registered(&fd);
            (fd, n)
        })
        .collect();
    assert_eq!(sets.len(), 3, "one epoll set per queue thread: {fds:?}");
    assert!(
        sets.iter().all(|(_, n)| *n == 2),
        "each queue thread's epoll set holds its exit and vring-enabled events only: {sets:?}"
    );
    let eventfds = fds
        .iter()
        .filter(|(_, target)| target == "anon_inode:[eventfd]")
        .count();
    assert_eq!(
        eventfds, 12,
        "two event pairs per queue thread, nothing left from start-up: {fds:?}"
    );
    daemon.assert_alive("after its descriptors were read");
}
