//! FUSE operations sent straight through a vhost-user queue with the berth-frontend, where a
//! guest kernel would hide or retry them: cache-mode timeouts and open flags, FSYNC, FLUSH,
//! SYNCFS, COPY_FILE_RANGE, LSEEK, FALLOCATE, RENAME2, POSIX locks and TMPFILE, the INIT
//! negotiation of POSIX ACLs, security labels and mmap, guest-sized xattr buffers, and inode
//! numbers the host reuses while the guest still holds the old node.
//!
//! Every reply is checked for error 0 and the effect looked at on the host directory.
//! `BERTH_TEST_DAEMON=/path/to/virtiofsd` runs the same tests against virtiofsd; checks of
//! berth-only behaviour skip then.

#[path = "common/frontend_util.rs"]
mod frontend_util;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_frontend::fuse::{
    init_flags, opcode, open_flags, setattr_valid, CopyFileRangeIn, CreateIn, FallocateIn,
    FileLock, FlushIn, FsyncIn, GetxattrIn, GetxattrOut, InitOut, LinkIn, LkIn, LkOut, LseekIn,
    LseekOut, MkdirIn, MknodIn, OpenOut, Rename2In, SetattrIn, SetxattrIn, WriteOut, ROOT_ID,
};
use berth_frontend::{EntryOut, FsQueue, Request, VhostUserFs};
use frontend_util::*;
use vm_memory::ByteValued;

/// A daemon with one request queue, FUSE_INIT done with `flags`. Fields drop in order: the
/// connection, the daemon, a mount over the shared directory, then the directory itself.
struct Session {
    queue: FsQueue,
    // Dropping the device disconnects: it lives as long as the session.
    _device: VhostUserFs,
    daemon: Daemon,
    init: Result<InitOut, berth_frontend::Error>,
    mount: Option<Ext4Mount>,
    fixture: Fixture,
}

impl Session {
    fn start(extra: &[&str]) -> Session {
        Self::start_in(Fixture::new(), extra, init_flags::DEFAULT)
    }

    fn start_in(fixture: Fixture, extra: &[&str], flags: u64) -> Session {
        let mut args = fixture.basic_args();
        args.extend(extra.iter().map(Into::into));
        let mut daemon = Daemon::spawn(args);
        daemon.wait_for_socket(&fixture.socket);
        let mut device = connect(&mut daemon, &fixture.socket, 1);
        let mut queue = device.take_request_queue(1).expect("request queue 1");
        let init = queue.init(flags, 128 * 1024);
        Session {
            queue,
            _device: device,
            daemon,
            init,
            mount: None,
            fixture,
        }
    }

    fn host(&self, name: &str) -> PathBuf {
        self.fixture.shared.join(name)
    }

    fn init_out(&self) -> InitOut {
        match &self.init {
            Ok(out) => *out,
            Err(e) => panic!("FUSE_INIT failed: {e}\n{}", self.daemon.stderr()),
        }
    }
}

fn create_in(mode: u32, flags: u32) -> CreateIn {
    CreateIn {
        flags,
        mode,
        umask: 0o022,
        fuse_flags: 0,
    }
}

fn entry_reply() -> Option<u32> {
    Some(std::mem::size_of::<EntryOut>() as u32)
}

// ----- cache modes -----

/// What virtiofsd 1.14 answers in each cache mode: entry/attr timeout in seconds, and the
/// FOPEN flags of OPEN, OPENDIR and CREATE.
struct CacheExpectation {
    timeout: u64,
    file: u32,
    dir: u32,
    create: u32,
}

fn check_cache_mode(mode: &str, expected: CacheExpectation) {
    let mut s = Session::start(&["--cache", mode]);
    s.init_out();
    let q = &mut s.queue;
    let hello = q.lookup(ROOT_ID, b"hello.txt").expect("LOOKUP");
    assert_eq!(
        (hello.entry_valid, hello.attr_valid),
        (expected.timeout, expected.timeout),
        "--cache {mode}: LOOKUP entry/attr timeouts (s)"
    );
    assert_eq!(
        (hello.entry_valid_nsec, hello.attr_valid_nsec),
        (0, 0),
        "--cache {mode}"
    );
    let attr = q.getattr(hello.nodeid).expect("GETATTR");
    assert_eq!(
        attr.attr_valid, expected.timeout,
        "--cache {mode}: GETATTR timeout"
    );
    let mask = open_flags::DIRECT_IO | open_flags::KEEP_CACHE | open_flags::CACHE_DIR;
    let file = q
        .open(hello.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN file");
    assert_eq!(
        file.open_flags & mask,
        expected.file,
        "--cache {mode}: OPEN flags"
    );
    let dir = q.opendir(ROOT_ID).expect("OPENDIR");
    assert_eq!(
        dir.open_flags & mask,
        expected.dir,
        "--cache {mode}: OPENDIR flags"
    );
    let (created, open) = q
        .create_with(
            ROOT_ID,
            b"new.txt",
            create_in(0o100644, libc::O_RDWR as u32),
        )
        .expect("CREATE");
    assert_eq!(
        open.open_flags & mask,
        expected.create,
        "--cache {mode}: CREATE flags"
    );
    assert_eq!(
        created.entry_valid, expected.timeout,
        "--cache {mode}: CREATE entry timeout"
    );
    s.daemon.assert_alive("after the cache-mode checks");
}

#[test]
fn cache_never_caches_nothing() {
    check_cache_mode(
        "never",
        CacheExpectation {
            timeout: 0,
            file: open_flags::DIRECT_IO,
            dir: 0,
            create: open_flags::DIRECT_IO,
        },
    );
}

#[test]
fn cache_metadata_caches_metadata_and_listings_only() {
    check_cache_mode(
        "metadata",
        CacheExpectation {
            timeout: 86400,
            file: open_flags::DIRECT_IO,
            dir: open_flags::CACHE_DIR | open_flags::KEEP_CACHE,
            create: open_flags::DIRECT_IO,
        },
    );
}

#[test]
fn cache_auto_is_close_to_open() {
    check_cache_mode(
        "auto",
        CacheExpectation {
            timeout: 1,
            file: 0,
            dir: 0,
            create: 0,
        },
    );
}

#[test]
fn cache_always_keeps_everything() {
    check_cache_mode(
        "always",
        CacheExpectation {
            timeout: 86400,
            file: open_flags::KEEP_CACHE,
            dir: open_flags::CACHE_DIR | open_flags::KEEP_CACHE,
            create: open_flags::KEEP_CACHE,
        },
    );
}

// ----- operations a guest kernel hides -----

fn fsync(q: &mut FsQueue, op: u32, nodeid: u64, fh: u64, datasync: bool) {
    let args = FsyncIn {
        fh,
        fsync_flags: u32::from(datasync),
        padding: 0,
    };
    q.request_empty(&Request {
        opcode: op,
        nodeid,
        args: &[args.as_slice()],
        payload: &[],
        reply_capacity: Some(0),
    })
    .unwrap_or_else(|e| panic!("{} (datasync {datasync}): {e}", op));
}

#[test]
fn fsync_flush_fsyncdir_and_syncfs_succeed() {
    let mut s = Session::start(&[]);
    s.init_out();
    let shared = s.fixture.shared.clone();
    let q = &mut s.queue;
    let (file, open) = q
        .create_with(
            ROOT_ID,
            b"synced.bin",
            create_in(0o100644, libc::O_RDWR as u32),
        )
        .expect("CREATE");
    assert_eq!(
        q.write(file.nodeid, open.fh, 0, b"durable").expect("WRITE"),
        7
    );
    fsync(q, opcode::FSYNC, file.nodeid, open.fh, false);
    fsync(q, opcode::FSYNC, file.nodeid, open.fh, true);
    let flush = FlushIn {
        fh: open.fh,
        unused: 0,
        padding: 0,
        lock_owner: 7,
    };
    q.request_empty(&Request {
        opcode: opcode::FLUSH,
        nodeid: file.nodeid,
        args: &[flush.as_slice()],
        payload: &[],
        reply_capacity: Some(0),
    })
    .expect("FLUSH");
    assert_eq!(fs::read(shared.join("synced.bin")).unwrap(), b"durable");
    let dir = q.opendir(ROOT_ID).expect("OPENDIR");
    fsync(q, opcode::FSYNCDIR, ROOT_ID, dir.fh, false);
    fsync(q, opcode::FSYNCDIR, ROOT_ID, dir.fh, true);
    q.request_empty(&Request {
        opcode: opcode::SYNCFS,
        nodeid: file.nodeid,
        args: &[&[0u8; 8]],
        payload: &[],
        reply_capacity: Some(0),
    })
    .expect("SYNCFS");
    // An unknown handle is the host's EBADF, not a silent success.
    let bad = FsyncIn {
        fh: open.fh + 1000,
        fsync_flags: 0,
        padding: 0,
    };
    let err = q
        .request_empty(&Request {
            opcode: opcode::FSYNC,
            nodeid: file.nodeid,
            args: &[bad.as_slice()],
            payload: &[],
            reply_capacity: Some(0),
        })
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EBADF), "{err}");
    s.daemon.assert_alive("after the sync operations");
}

#[test]
fn copy_file_range_copies_on_the_host() {
    let mut s = Session::start(&[]);
    s.init_out();
    let shared = s.fixture.shared.clone();
    let source: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(shared.join("src.bin"), &source).unwrap();
    fs::write(shared.join("dst.bin"), vec![b'.'; 10]).unwrap();
    let q = &mut s.queue;
    let src = q.lookup(ROOT_ID, b"src.bin").unwrap();
    let dst = q.lookup(ROOT_ID, b"dst.bin").unwrap();
    let src_fh = q.open(src.nodeid, libc::O_RDONLY as u32).unwrap().fh;
    let dst_fh = q.open(dst.nodeid, libc::O_RDWR as u32).unwrap().fh;
    let args = CopyFileRangeIn {
        fh_in: src_fh,
        offset_in: 1000,
        nodeid_out: dst.nodeid,
        fh_out: dst_fh,
        offset_out: 4,
        len: 50_000,
        flags: 0,
    };
    let out: WriteOut = q
        .request_struct(&Request {
            opcode: opcode::COPY_FILE_RANGE,
            nodeid: src.nodeid,
            args: &[args.as_slice()],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<WriteOut>() as u32),
        })
        .expect("COPY_FILE_RANGE");
    assert_eq!(out.size, 50_000, "bytes copied");
    let mut expected = vec![b'.'; 4];
    expected.extend_from_slice(&source[1000..51_000]);
    assert!(
        fs::read(shared.join("dst.bin")).unwrap() == expected,
        "destination content on the host"
    );
    s.daemon.assert_alive("after COPY_FILE_RANGE");
}

fn host_lseek(path: &Path, offset: i64, whence: libc::c_int) -> Result<i64, i32> {
    let file = fs::File::open(path).unwrap();
    // SAFETY: lseek on a descriptor we own.
    let ret = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&file), offset, whence) };
    if ret < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(ret)
    }
}

fn fuse_lseek(q: &mut FsQueue, nodeid: u64, fh: u64, offset: u64, whence: i32) -> Result<i64, i32> {
    let args = LseekIn {
        fh,
        offset,
        whence: whence as u32,
        padding: 0,
    };
    q.request_struct::<LseekOut>(&Request {
        opcode: opcode::LSEEK,
        nodeid,
        args: &[args.as_slice()],
        payload: &[],
        reply_capacity: Some(std::mem::size_of::<LseekOut>() as u32),
    })
    .map(|out| out.offset as i64)
    .map_err(|e| e.errno().unwrap_or(-1))
}

#[test]
fn lseek_and_fallocate_match_the_host() {
    let mut s = Session::start(&[]);
    s.init_out();
    let path = s.host("sparse.bin");
    {
        let file = fs::File::create(&path).unwrap();
        file.write_all_at(&[1u8; 4096], 0).unwrap();
        file.write_all_at(&[2u8; 4096], 1 << 20).unwrap();
    }
    let q = &mut s.queue;
    let node = q.lookup(ROOT_ID, b"sparse.bin").unwrap();
    let fh = q.open(node.nodeid, libc::O_RDWR as u32).unwrap().fh;
    for (offset, whence) in [
        (0, libc::SEEK_DATA),
        (0, libc::SEEK_HOLE),
        (8192, libc::SEEK_DATA),
        (5000, libc::SEEK_SET),
        (100, libc::SEEK_END),
        (1 << 22, libc::SEEK_DATA),
    ] {
        assert_eq!(
            fuse_lseek(q, node.nodeid, fh, offset as u64, whence),
            host_lseek(&path, offset, whence),
            "LSEEK offset {offset} whence {whence}"
        );
    }
    let fallocate = |q: &mut FsQueue, mode: i32, offset: u64, length: u64| {
        let args = FallocateIn {
            fh,
            offset,
            length,
            mode: mode as u32,
            padding: 0,
        };
        q.request_empty(&Request {
            opcode: opcode::FALLOCATE,
            nodeid: node.nodeid,
            args: &[args.as_slice()],
            payload: &[],
            reply_capacity: Some(0),
        })
    };
    fallocate(q, 0, 0, 3 << 20).expect("FALLOCATE grow");
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        3 << 20,
        "size after FALLOCATE"
    );
    let blocks_before = fs::metadata(&path).unwrap().blocks();
    fallocate(
        q,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        0,
        4096,
    )
    .expect("FALLOCATE punch hole");
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 3 << 20, "KEEP_SIZE keeps the size");
    assert!(
        meta.blocks() < blocks_before,
        "the hole freed blocks: {} -> {}",
        blocks_before,
        meta.blocks()
    );
    let mut first = [9u8; 16];
    fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut first, 0)
        .unwrap();
    assert_eq!(first, [0u8; 16], "the punched range reads as zeros");
    // Bad modes are refused by the host, and the errno comes through.
    let err = fallocate(q, 0x7fff_0000, 0, 4096).unwrap_err();
    assert!(
        matches!(err.errno(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)),
        "{err}"
    );
    s.daemon.assert_alive("after LSEEK and FALLOCATE");
}

fn rename2(
    q: &mut FsQueue,
    old: &[u8],
    new: &[u8],
    flags: u32,
) -> Result<(), berth_frontend::Error> {
    let args = Rename2In {
        newdir: ROOT_ID,
        flags,
        padding: 0,
    };
    q.request_empty(&Request {
        opcode: opcode::RENAME2,
        nodeid: ROOT_ID,
        args: &[args.as_slice(), old, b"\0", new, b"\0"],
        payload: &[],
        reply_capacity: Some(0),
    })
}

#[test]
fn rename2_flags_act_on_the_host() {
    let mut s = Session::start(&[]);
    s.init_out();
    let shared = s.fixture.shared.clone();
    fs::write(shared.join("a"), b"content a").unwrap();
    fs::write(shared.join("b"), b"content b").unwrap();
    let q = &mut s.queue;
    let err = rename2(q, b"a", b"b", libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
    assert_eq!(
        fs::read(shared.join("b")).unwrap(),
        b"content b",
        "NOREPLACE kept b"
    );
    rename2(q, b"a", b"b", libc::RENAME_EXCHANGE).expect("RENAME2 EXCHANGE");
    assert_eq!(fs::read(shared.join("a")).unwrap(), b"content b");
    assert_eq!(fs::read(shared.join("b")).unwrap(), b"content a");
    rename2(q, b"a", b"c", libc::RENAME_NOREPLACE).expect("RENAME2 NOREPLACE to a new name");
    assert!(!shared.join("a").exists());
    assert_eq!(fs::read(shared.join("c")).unwrap(), b"content b");
    let err = rename2(q, b"missing", b"d", libc::RENAME_EXCHANGE).unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
    s.daemon.assert_alive("after RENAME2");
}

fn lock_request(fh: u64, owner: u64, kind: i32, start: u64, end: u64) -> LkIn {
    LkIn {
        fh,
        owner,
        lk: FileLock {
            start,
            end,
            type_: kind as u32,
            pid: 1234,
        },
        lk_flags: 0,
        padding: 0,
    }
}

/// What a host process sees when it asks for a write lock on `path` over `start..start+len`.
fn host_lock_conflict(path: &Path, start: i64, len: i64) -> libc::c_short {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    // SAFETY: flock is plain old data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: fcntl with a valid flock struct on our descriptor.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_OFD_GETLK,
            &mut fl,
        )
    };
    assert_eq!(
        rc,
        0,
        "host F_OFD_GETLK: {}",
        std::io::Error::last_os_error()
    );
    fl.l_type
}

#[test]
fn posix_locks_are_taken_on_the_host() {
    if !testing_berth() {
        skip_by_design("--posix-lock is berth's (virtiofsd keeps locks in the guest)");
        return;
    }
    let mut s = Session::start(&["--posix-lock"]);
    s.init_out();
    fs::write(s.host("locked"), vec![0u8; 4096]).unwrap();
    let path = s.host("locked");
    let q = &mut s.queue;
    let node = q.lookup(ROOT_ID, b"locked").unwrap();
    let fh = q.open(node.nodeid, libc::O_RDWR as u32).unwrap().fh;
    let setlk = |q: &mut FsQueue, lock: LkIn| {
        q.request_empty(&Request {
            opcode: opcode::SETLK,
            nodeid: node.nodeid,
            args: &[lock.as_slice()],
            payload: &[],
            reply_capacity: Some(0),
        })
    };
    let getlk = |q: &mut FsQueue, lock: LkIn| -> LkOut {
        q.request_struct(&Request {
            opcode: opcode::GETLK,
            nodeid: node.nodeid,
            args: &[lock.as_slice()],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<LkOut>() as u32),
        })
        .expect("GETLK")
    };
    assert_eq!(
        host_lock_conflict(&path, 0, 100),
        libc::F_UNLCK as libc::c_short
    );
    setlk(q, lock_request(fh, 1, libc::F_WRLCK, 0, 99)).expect("SETLK write lock");
    assert_eq!(
        host_lock_conflict(&path, 0, 100),
        libc::F_WRLCK as libc::c_short,
        "a host process sees the guest's lock"
    );
    assert_eq!(
        host_lock_conflict(&path, 100, 100),
        libc::F_UNLCK as libc::c_short,
        "only the locked range"
    );
    // Another owner conflicts, the same owner does not.
    let other = getlk(q, lock_request(fh, 2, libc::F_WRLCK, 50, 60));
    assert_eq!(
        other.lk.type_,
        libc::F_WRLCK as u32,
        "owner 2 sees owner 1's lock"
    );
    assert_eq!((other.lk.start, other.lk.end), (0, 99));
    let same = getlk(q, lock_request(fh, 1, libc::F_WRLCK, 50, 60));
    assert_eq!(
        same.lk.type_,
        libc::F_UNLCK as u32,
        "owner 1 does not conflict with itself"
    );
    let err = setlk(q, lock_request(fh, 2, libc::F_WRLCK, 0, 10)).unwrap_err();
    assert!(
        matches!(err.errno(), Some(libc::EAGAIN) | Some(libc::EACCES)),
        "{err}"
    );
    setlk(q, lock_request(fh, 1, libc::F_UNLCK, 0, 99)).expect("SETLK unlock");
    assert_eq!(
        host_lock_conflict(&path, 0, 100),
        libc::F_UNLCK as libc::c_short
    );
    setlk(q, lock_request(fh, 2, libc::F_WRLCK, 0, 10)).expect("owner 2 may lock now");
    s.daemon.assert_alive("after the lock requests");
}

/// A SETLKW that waits for its lock must not wait where other requests are served: on its
/// queue's thread (no pool: berth's default, and Kata's `--thread-pool-size=1`) it would hold
/// up the rest of the queue, the holder's unlock too, and on the pool's threads as many waits
/// as threads would hold up the pool. Either way the guest's lock users would wait for each
/// other for ever.
#[test]
fn waiting_lock_requests_hold_up_neither_their_queue_nor_the_pool() {
    if !testing_berth() {
        skip_by_design("--posix-lock is berth's (virtiofsd keeps locks in the guest)");
        return;
    }
    const WAITERS: u64 = 3;
    for flags in [
        &["--posix-lock"][..],
        &["--posix-lock", "--thread-pool-size=1"],
        &["--posix-lock", "--thread-pool-size=2"],
    ] {
        let mut s = Session::start(flags);
        s.init_out();
        fs::write(s.host("locked"), vec![0u8; 4096]).unwrap();
        let path = s.host("locked");
        let q = &mut s.queue;
        let node = q.lookup(ROOT_ID, b"locked").unwrap();
        let fh = q.open(node.nodeid, libc::O_RDWR as u32).unwrap().fh;
        let lock = |q: &mut FsQueue, opcode: u32, lock: LkIn| {
            let ticket = q
                .submit(&Request {
                    opcode,
                    nodeid: node.nodeid,
                    args: &[lock.as_slice()],
                    payload: &[],
                    reply_capacity: Some(0),
                })
                .expect("submit");
            q.notify().expect("kick");
            ticket
        };
        let holder = lock(q, opcode::SETLK, lock_request(fh, 1, libc::F_WRLCK, 0, 99));
        q.wait_for(holder)
            .expect("owner 1 locks")
            .check()
            .expect("granted");
        // Owners 2.. wait for read locks on the range (more of them than pool threads);
        // owner 1's unlock and a lookup come after them.
        let waiters: Vec<_> = (2..2 + WAITERS)
            .map(|owner| {
                lock(
                    q,
                    opcode::SETLKW,
                    lock_request(fh, owner, libc::F_RDLCK, 0, 99),
                )
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            q.lookup(ROOT_ID, b"locked").is_ok(),
            "{flags:?}: the queue serves on"
        );
        let unlock = lock(q, opcode::SETLK, lock_request(fh, 1, libc::F_UNLCK, 0, 99));
        q.wait_for(unlock)
            .unwrap_or_else(|e| panic!("{flags:?}: owner 1's unlock: {e}"))
            .check()
            .expect("unlocked");
        for waiter in waiters {
            let granted = q
                .wait_for(waiter)
                .unwrap_or_else(|e| panic!("{flags:?}: a waiter: {e}"));
            assert_eq!(granted.header.map(|h| h.error), Some(0), "{flags:?}");
        }
        assert_eq!(
            host_lock_conflict(&path, 0, 100),
            libc::F_RDLCK as libc::c_short,
            "{flags:?}: the waiters hold the range on the host"
        );
        s.daemon.assert_alive("after the lock waits");
    }
}

#[test]
fn tmpfile_is_unnamed_until_linked() {
    if !testing_berth() {
        skip_by_design("virtiofsd 1.14 answers TMPFILE with ENOSYS");
        return;
    }
    let mut s = Session::start(&[]);
    s.init_out();
    let shared = s.fixture.shared.clone();
    let listing = |dir: &Path| -> Vec<_> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let before = listing(&s.fixture.shared);
    let q = &mut s.queue;
    let create = create_in(0o100600, libc::O_RDWR as u32);
    let entry_size = std::mem::size_of::<EntryOut>();
    let done = q
        .call(&Request {
            opcode: opcode::TMPFILE,
            nodeid: ROOT_ID,
            args: &[create.as_slice(), b"\0"],
            payload: &[],
            reply_capacity: Some((entry_size + std::mem::size_of::<OpenOut>()) as u32),
        })
        .expect("TMPFILE sent")
        .check()
        .expect("TMPFILE");
    let entry = EntryOut::from_slice(&done.body[..entry_size])
        .copied()
        .unwrap();
    let open = OpenOut::from_slice(&done.body[entry_size..])
        .copied()
        .unwrap();
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(entry.attr.mode & 0o777, 0o600);
    assert_eq!(entry.attr.nlink, 0, "an O_TMPFILE file has no name");
    assert_eq!(q.write(entry.nodeid, open.fh, 0, b"hidden").unwrap(), 6);
    assert_eq!(listing(&s.fixture.shared), before, "TMPFILE adds no name");
    let link = LinkIn {
        oldnodeid: entry.nodeid,
    };
    let linked: EntryOut = q
        .request_struct(&Request {
            opcode: opcode::LINK,
            nodeid: ROOT_ID,
            args: &[link.as_slice(), b"revealed\0"],
            payload: &[],
            reply_capacity: entry_reply(),
        })
        .expect("LINK of the tmpfile");
    assert_eq!(linked.nodeid, entry.nodeid, "the same inode");
    assert_eq!(fs::read(shared.join("revealed")).unwrap(), b"hidden");
    assert_eq!(
        fs::metadata(shared.join("revealed"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    s.daemon.assert_alive("after TMPFILE");
}

// ----- guest-sized xattr buffers -----

fn vm_peak_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The processes of the daemon under test: itself and, in the namespace sandbox, its child.
fn daemon_pids(daemon: &Daemon) -> Vec<u32> {
    let mut pids = vec![daemon.pid()];
    if let Ok(children) = fs::read_to_string(format!("/proc/{0}/task/{0}/children", daemon.pid())) {
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    pids
}

fn getxattr(
    q: &mut FsQueue,
    nodeid: u64,
    name: &[u8],
    size: u32,
    capacity: u32,
) -> Result<Vec<u8>, i32> {
    let args = GetxattrIn { size, padding: 0 };
    let done = q
        .call(&Request {
            opcode: opcode::GETXATTR,
            nodeid,
            args: &[args.as_slice(), name, b"\0"],
            payload: &[],
            reply_capacity: Some(capacity),
        })
        .expect("GETXATTR sent");
    done.check()
        .map(|c| c.body)
        .map_err(|e| e.errno().unwrap_or(-1))
}

fn listxattr(q: &mut FsQueue, nodeid: u64, size: u32, capacity: u32) -> Result<Vec<u8>, i32> {
    let args = GetxattrIn { size, padding: 0 };
    let done = q
        .call(&Request {
            opcode: opcode::LISTXATTR,
            nodeid,
            args: &[args.as_slice()],
            payload: &[],
            reply_capacity: Some(capacity),
        })
        .expect("LISTXATTR sent");
    done.check()
        .map(|c| c.body)
        .map_err(|e| e.errno().unwrap_or(-1))
}

fn setxattr(
    q: &mut FsQueue,
    nodeid: u64,
    name: &[u8],
    value: &[u8],
    declared: u32,
) -> Result<(), berth_frontend::Error> {
    let args = SetxattrIn {
        size: declared,
        flags: 0,
    };
    q.request_empty(&Request {
        opcode: opcode::SETXATTR,
        nodeid,
        args: &[args.as_slice(), name, b"\0"],
        payload: value,
        reply_capacity: Some(0),
    })
}

#[test]
fn xattr_sizes_from_the_guest_are_bounded_and_checked() {
    let mut s = Session::start(&["--xattr"]);
    s.init_out();
    let path = s.host("hello.txt");
    let name = CString::new("user.berth").unwrap();
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let value = b"0123456789";
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::setxattr(
            cpath.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "host setxattr: {}", std::io::Error::last_os_error());
    let hello = s.queue.lookup(ROOT_ID, b"hello.txt").unwrap();
    let peaks_before: Vec<_> = daemon_pids(&s.daemon)
        .iter()
        .map(|p| vm_peak_kib(*p))
        .collect();

    // A guest may ask for 4 GiB; it gets the value, and the daemon does not reserve 4 GiB.
    // (virtiofsd allocates what the guest asks for and fails with ENOMEM: berth only.)
    let q = &mut s.queue;
    let huge_size = if testing_berth() { u32::MAX } else { 4000 };
    assert_eq!(
        getxattr(q, hello.nodeid, b"user.berth", huge_size, 4000),
        Ok(value.to_vec())
    );
    let names = listxattr(q, hello.nodeid, huge_size, 4000).expect("LISTXATTR");
    assert!(
        names.split(|&b| b == 0).any(|n| n == b"user.berth"),
        "listed: {names:?}"
    );
    let peaks_after: Vec<_> = daemon_pids(&s.daemon)
        .iter()
        .map(|p| vm_peak_kib(*p))
        .collect();
    for (before, after) in peaks_before.iter().zip(&peaks_after) {
        if let (Some(before), Some(after)) = (before, after) {
            assert!(
                after.saturating_sub(*before) < 1 << 20,
                "the daemon's peak virtual size grew from {before} to {after} KiB"
            );
        }
    }
    // Sizes: the count, too small (ERANGE, as the host answers), exact.
    let count: GetxattrOut = GetxattrOut::from_slice(
        &getxattr(q, hello.nodeid, b"user.berth", 0, 64).expect("size query"),
    )
    .copied()
    .unwrap();
    assert_eq!(count.size, value.len() as u32);
    assert_eq!(
        getxattr(q, hello.nodeid, b"user.berth", 4, 4000),
        Err(libc::ERANGE)
    );
    assert_eq!(
        getxattr(q, hello.nodeid, b"user.none", 100, 4000),
        Err(libc::ENODATA)
    );
    assert_eq!(listxattr(q, hello.nodeid, 3, 4000), Err(libc::ERANGE));
    // SETXATTR whose declared size does not match what follows gets an error reply (the
    // request is answered, not dropped), and a value over XATTR_SIZE_MAX gets E2BIG.
    // (virtiofsd drops the mismatched request without a reply: berth only.)
    if testing_berth() {
        let err = setxattr(q, hello.nodeid, b"user.short", b"12345", 10).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
        let huge = vec![b'x'; 65537];
        let err = setxattr(q, hello.nodeid, b"user.huge", &huge, huge.len() as u32).unwrap_err();
        assert_eq!(err.errno(), Some(libc::E2BIG), "{err}");
    }
    setxattr(q, hello.nodeid, b"user.ok", b"fine", 4).expect("SETXATTR");
    assert_eq!(
        getxattr(q, hello.nodeid, b"user.ok", 100, 4000),
        Ok(b"fine".to_vec())
    );
    s.daemon.assert_alive("after the xattr requests");
}

// ----- INIT negotiation -----

const ACL_FLAGS: u64 = init_flags::POSIX_ACL | init_flags::DONT_MASK | init_flags::SETXATTR_EXT;

fn negotiated(extra: &[&str], offered: u64) -> Result<u64, i32> {
    let s = Session::start_in(Fixture::new(), extra, offered);
    let mut daemon = s.daemon;
    daemon.assert_alive("after FUSE_INIT");
    s.init
        .map(|out| u64::from(out.flags) | (u64::from(out.flags2) << 32))
        .map_err(|e| e.errno().unwrap_or(-1))
}

#[test]
fn posix_acl_needs_dont_mask_and_setxattr_ext() {
    let all = init_flags::DEFAULT | ACL_FLAGS;
    let flags = negotiated(&["--posix-acl"], all).expect("INIT with every ACL flag");
    assert_eq!(
        flags & ACL_FLAGS,
        ACL_FLAGS,
        "POSIX_ACL, DONT_MASK and SETXATTR_EXT on"
    );
    for missing in [
        init_flags::POSIX_ACL,
        init_flags::DONT_MASK,
        init_flags::SETXATTR_EXT,
    ] {
        assert_eq!(
            negotiated(&["--posix-acl"], all & !missing),
            Err(libc::EPROTO),
            "--posix-acl=always with flag {missing:#x} missing must refuse INIT"
        );
        let flags =
            negotiated(&["--posix-acl=auto"], all & !missing).expect("--posix-acl=auto carries on");
        assert_eq!(flags & init_flags::POSIX_ACL, 0, "but without ACLs");
    }
    let flags = negotiated(&[], all).expect("INIT");
    assert_eq!(flags & ACL_FLAGS, 0, "no ACLs unless asked for");
}

#[test]
fn security_label_and_allow_mmap_are_negotiated() {
    let offered = init_flags::DEFAULT | init_flags::SECURITY_CTX | init_flags::DIRECT_IO_ALLOW_MMAP;
    let flags = negotiated(&["--security-label"], offered).expect("INIT");
    assert_ne!(flags & init_flags::SECURITY_CTX, 0, "SECURITY_CTX on");
    assert_ne!(
        flags & init_flags::INIT_EXT,
        0,
        "flags2 is only read with INIT_EXT"
    );
    assert_eq!(
        negotiated(&["--security-label"], init_flags::DEFAULT),
        Err(libc::EPROTO),
        "--security-label=always needs the guest's SECURITY_CTX"
    );
    let flags = negotiated(&["--security-label=auto"], init_flags::DEFAULT).expect("INIT");
    assert_eq!(flags & init_flags::SECURITY_CTX, 0);
    let flags = negotiated(&[], offered).expect("INIT");
    assert_eq!(
        flags & (init_flags::SECURITY_CTX | init_flags::DIRECT_IO_ALLOW_MMAP),
        0
    );
    let flags = negotiated(&["--cache=never", "--allow-mmap"], offered).expect("INIT");
    assert_ne!(flags & init_flags::DIRECT_IO_ALLOW_MMAP, 0, "--allow-mmap");
}

/// The extended SETXATTR header (SETXATTR_EXT).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SetxattrInExt {
    size: u32,
    flags: u32,
    setxattr_flags: u32,
    padding: u32,
}
// SAFETY: four u32s, no padding.
unsafe impl ByteValued for SetxattrInExt {}

/// A POSIX ACL xattr value (version 2) with owner, group and other entries of `mode`.
fn acl_value(mode: u32) -> Vec<u8> {
    let mut value = 2u32.to_le_bytes().to_vec();
    for (tag, perm) in [
        (0x01u16, (mode >> 6) & 7),
        (0x04, (mode >> 3) & 7),
        (0x20, mode & 7),
    ] {
        value.extend_from_slice(&tag.to_le_bytes());
        value.extend_from_slice(&(perm as u16).to_le_bytes());
        value.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    value
}

#[test]
fn acl_writes_clear_setgid_when_the_guest_asks() {
    if !running_as_root() {
        skip("needs root to give a file a group and setgid");
        return;
    }
    let mut s = Session::start_in(
        Fixture::new(),
        &["--posix-acl"],
        init_flags::DEFAULT | ACL_FLAGS,
    );
    s.init_out();
    for (name, kill) in [("kill", true), ("keep", false)] {
        let path = s.host(name);
        fs::write(&path, b"x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o2775)).unwrap();
        let node = s.queue.lookup(ROOT_ID, name.as_bytes()).unwrap();
        let value = acl_value(0o755);
        let args = SetxattrInExt {
            size: value.len() as u32,
            flags: 0,
            setxattr_flags: u32::from(kill),
            padding: 0,
        };
        s.queue
            .request_empty(&Request {
                opcode: opcode::SETXATTR,
                nodeid: node.nodeid,
                args: &[args.as_slice(), b"system.posix_acl_access\0", &value],
                payload: &[],
                reply_capacity: Some(0),
            })
            .expect("SETXATTR system.posix_acl_access");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o755,
            "{name}: the ACL set the permission bits"
        );
        assert_eq!(
            mode & libc::S_ISGID != 0,
            !kill,
            "{name}: setgid after an ACL write with KILL_SGID={kill} (mode {mode:o})"
        );
    }
    s.daemon.assert_alive("after the ACL writes");
}

#[test]
fn acl_attributes_are_refused_without_posix_acl() {
    if !testing_berth() {
        skip_by_design("berth hides ACL attributes as virtiofsd does; checked on berth");
        return;
    }
    let mut s = Session::start(&["--xattr"]);
    s.init_out();
    let node = s.queue.lookup(ROOT_ID, b"hello.txt").unwrap();
    let value = acl_value(0o644);
    let err = setxattr(
        &mut s.queue,
        node.nodeid,
        b"system.posix_acl_access",
        &value,
        value.len() as u32,
    )
    .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EOPNOTSUPP), "{err}");
    assert_eq!(
        getxattr(
            &mut s.queue,
            node.nodeid,
            b"system.posix_acl_default",
            100,
            4000
        ),
        Err(libc::EOPNOTSUPP)
    );
}

// ----- security labels -----

const LABEL_NAME: &[u8] = b"security.selinux";
const LABEL: &[u8] = b"system_u:object_r:berth_test_t:s0\0";

/// A FUSE_SECURITY_CTX extension as Linux builds it (fs/fuse/dir.c get_security_context).
fn secctx_extension(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut record = (value.len() as u32).to_le_bytes().to_vec();
    record.extend_from_slice(&0u32.to_le_bytes());
    record.extend_from_slice(name);
    record.push(0);
    record.extend_from_slice(value);
    while !record.len().is_multiple_of(8) {
        record.push(0);
    }
    let mut ext = ((8 + record.len()) as u32).to_le_bytes().to_vec();
    ext.extend_from_slice(&1u32.to_le_bytes());
    ext.extend_from_slice(&record);
    ext
}

fn empty_secctx_extension() -> Vec<u8> {
    let mut ext = 8u32.to_le_bytes().to_vec();
    ext.extend_from_slice(&0u32.to_le_bytes());
    ext
}

fn host_label(path: &Path) -> Option<Vec<u8>> {
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(LABEL_NAME).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            cpath.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

fn labelled_session(extra: &[&str]) -> Session {
    let mut all = vec!["--security-label"];
    all.extend_from_slice(extra);
    let s = Session::start_in(
        Fixture::new(),
        &all,
        init_flags::DEFAULT | init_flags::SECURITY_CTX,
    );
    s.init_out();
    s
}

#[test]
fn security_labels_are_stored_with_new_nodes() {
    if !running_as_root() {
        skip("writing security.* attributes needs root (CAP_SYS_ADMIN)");
        return;
    }
    // Without an LSM on the host, security.* needs CAP_SYS_ADMIN, which the sandbox drops.
    let mut s = labelled_session(&["--modcaps=+sys_admin"]);
    let ext = secctx_extension(LABEL_NAME, LABEL);
    let q = &mut s.queue;
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let dir = q
        .call_with_extensions(
            &Request {
                opcode: opcode::MKDIR,
                nodeid: ROOT_ID,
                args: &[mkdir.as_slice(), b"labelled-dir\0"],
                payload: &[],
                reply_capacity: entry_reply(),
            },
            &ext,
        )
        .unwrap()
        .check()
        .expect("MKDIR with a security context");
    let dir = EntryOut::from_slice(&dir.body).copied().unwrap();
    assert_eq!(dir.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    let create = create_in(0o100640, libc::O_RDWR as u32);
    let file = q
        .call_with_extensions(
            &Request {
                opcode: opcode::CREATE,
                nodeid: dir.nodeid,
                args: &[create.as_slice(), b"labelled-file\0"],
                payload: &[],
                reply_capacity: Some(
                    (std::mem::size_of::<EntryOut>() + std::mem::size_of::<OpenOut>()) as u32,
                ),
            },
            &ext,
        )
        .unwrap()
        .check()
        .expect("CREATE with a security context");
    let file_entry = EntryOut::from_slice(&file.body[..std::mem::size_of::<EntryOut>()])
        .copied()
        .unwrap();
    let file_open = OpenOut::from_slice(&file.body[std::mem::size_of::<EntryOut>()..])
        .copied()
        .unwrap();
    assert_eq!(
        q.write(file_entry.nodeid, file_open.fh, 0, b"data")
            .unwrap(),
        4
    );
    let mknod = MknodIn {
        mode: libc::S_IFIFO | 0o600,
        rdev: 0,
        umask: 0,
        padding: 0,
    };
    q.call_with_extensions(
        &Request {
            opcode: opcode::MKNOD,
            nodeid: ROOT_ID,
            args: &[mknod.as_slice(), b"labelled-fifo\0"],
            payload: &[],
            reply_capacity: entry_reply(),
        },
        &ext,
    )
    .unwrap()
    .check()
    .expect("MKNOD with a security context");
    q.call_with_extensions(
        &Request {
            opcode: opcode::SYMLINK,
            nodeid: ROOT_ID,
            args: &[b"labelled-link\0", b"hello.txt\0"],
            payload: &[],
            reply_capacity: entry_reply(),
        },
        &ext,
    )
    .unwrap()
    .check()
    .expect("SYMLINK with a security context");
    let unlabelled = q
        .call_with_extensions(
            &Request {
                opcode: opcode::MKDIR,
                nodeid: ROOT_ID,
                args: &[mkdir.as_slice(), b"no-label\0"],
                payload: &[],
                reply_capacity: entry_reply(),
            },
            &empty_secctx_extension(),
        )
        .unwrap()
        .check();
    assert!(unlabelled.is_ok(), "an empty context header is no label");

    let shared = s.fixture.shared.clone();
    for name in [
        "labelled-dir",
        "labelled-dir/labelled-file",
        "labelled-fifo",
        "labelled-link",
    ] {
        assert_eq!(
            host_label(&shared.join(name)).as_deref(),
            Some(LABEL),
            "{name} carries the guest's label on the host"
        );
    }
    assert_eq!(host_label(&shared.join("no-label")), None);
    assert_eq!(
        fs::read(shared.join("labelled-dir/labelled-file")).unwrap(),
        b"data"
    );
    assert!(fs::symlink_metadata(shared.join("labelled-link"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        fs::read_link(shared.join("labelled-link")).unwrap(),
        Path::new("hello.txt")
    );

    s.daemon.assert_alive("after labelled creates");
    if !testing_berth() {
        // virtiofsd drops a malformed request without a reply.
        return;
    }
    // A malformed extension is refused, and nothing is created.
    let mut bad = ext.clone();
    bad[..4].copy_from_slice(&4096u32.to_le_bytes());
    let err = q
        .call_with_extensions(
            &Request {
                opcode: opcode::MKDIR,
                nodeid: ROOT_ID,
                args: &[mkdir.as_slice(), b"bad-label\0"],
                payload: &[],
                reply_capacity: entry_reply(),
            },
            &bad,
        )
        .unwrap()
        .check()
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    assert!(!shared.join("bad-label").exists());
    s.daemon.assert_alive("after labelled creates");
}

#[test]
fn a_label_that_cannot_be_stored_leaves_no_node_behind() {
    if !testing_berth() {
        skip_by_design("relies on berth's default capability set");
        return;
    }
    if !running_as_root() {
        skip("needs root for the namespace sandbox's capability drop");
        return;
    }
    // The default capabilities lack CAP_SYS_ADMIN, so the host refuses a security.* name no
    // LSM claims with EPERM (security.selinux may be the owner's to set while SELinux is
    // built in but not enabled).
    let mut s = labelled_session(&[]);
    let ext = secctx_extension(b"security.berth_test", LABEL);
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let err = s
        .queue
        .call_with_extensions(
            &Request {
                opcode: opcode::MKDIR,
                nodeid: ROOT_ID,
                args: &[mkdir.as_slice(), b"unlabelled-dir\0"],
                payload: &[],
                reply_capacity: entry_reply(),
            },
            &ext,
        )
        .unwrap()
        .check()
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EPERM), "{err}");
    assert!(
        !s.host("unlabelled-dir").exists(),
        "the directory was removed again"
    );
    let create = create_in(0o100644, libc::O_RDWR as u32);
    let err = s
        .queue
        .call_with_extensions(
            &Request {
                opcode: opcode::CREATE,
                nodeid: ROOT_ID,
                args: &[create.as_slice(), b"unlabelled-file\0"],
                payload: &[],
                reply_capacity: Some(
                    (std::mem::size_of::<EntryOut>() + std::mem::size_of::<OpenOut>()) as u32,
                ),
            },
            &ext,
        )
        .unwrap()
        .check()
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EPERM), "{err}");
    assert!(
        !s.host("unlabelled-file").exists(),
        "the file was removed again"
    );
    // An existing file opened through CREATE (no O_EXCL) is opened, and keeps no new label.
    let existing = s
        .queue
        .call_with_extensions(
            &Request {
                opcode: opcode::CREATE,
                nodeid: ROOT_ID,
                args: &[create.as_slice(), b"hello.txt\0"],
                payload: &[],
                reply_capacity: Some(
                    (std::mem::size_of::<EntryOut>() + std::mem::size_of::<OpenOut>()) as u32,
                ),
            },
            &ext,
        )
        .unwrap()
        .check();
    assert!(existing.is_ok(), "CREATE of an existing file opens it");
    assert_eq!(fs::read(s.host("hello.txt")).unwrap(), HELLO_CONTENT);
    s.daemon.assert_alive("after the refused labels");
}

// ----- inode numbers reused by the host -----

/// An ext4 filesystem in a file, loop-mounted for the life of the value: ext4 hands a freed
/// inode number to the next file created in the same group at once.
struct Ext4Mount {
    mountpoint: PathBuf,
}

impl Ext4Mount {
    fn new(image: &Path, mountpoint: &Path) -> Result<Ext4Mount, String> {
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let file = fs::File::create(image).map_err(|e| e.to_string())?;
        file.set_len(32 << 20).map_err(|e| e.to_string())?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(mountpoint))?;
        Ok(Ext4Mount {
            mountpoint: mountpoint.to_owned(),
        })
    }
}

impl Drop for Ext4Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

#[test]
fn a_reused_inode_number_gets_a_new_node() {
    if !running_as_root() {
        skip("needs root to loop-mount an ext4 image");
        return;
    }
    let fixture = Fixture::new();
    let image = fixture.root.path().join("ext4.img");
    let mount = match Ext4Mount::new(&image, &fixture.shared) {
        Ok(mount) => mount,
        Err(reason) => {
            skip(&format!("cannot loop-mount ext4: {reason}"));
            return;
        }
    };
    fs::write(fixture.shared.join("old"), b"the old file").unwrap();
    // The default --inode-file-handles=prefer holds inodes by handle on ext4.
    let mut s = Session::start_in(fixture, &[], init_flags::DEFAULT);
    s.mount = Some(mount);
    s.init_out();
    let old = s.queue.lookup(ROOT_ID, b"old").expect("LOOKUP old");
    let old_ino = old.attr.ino;
    // The guest keeps its reference (no FORGET) while the host replaces the file.
    fs::remove_file(s.host("old")).unwrap();
    fs::write(s.host("new"), b"new!").unwrap();
    let new_ino = fs::metadata(s.host("new")).unwrap().ino();
    assert_eq!(
        new_ino, old_ino,
        "ext4 should hand the freed inode number to the next file (the premise of this test)"
    );
    let new = s.queue.lookup(ROOT_ID, b"new").expect("LOOKUP new");
    assert_ne!(
        new.nodeid, old.nodeid,
        "a new file with a reused inode number must not resolve to the deleted file's node"
    );
    assert_eq!(new.attr.size, 4);
    let attr = s.queue.getattr(new.nodeid).expect("GETATTR new");
    assert_eq!(
        attr.attr.size, 4,
        "GETATTR of the new node reaches the new file"
    );
    let fh = s
        .queue
        .open(new.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN new")
        .fh;
    assert_eq!(s.queue.read(new.nodeid, fh, 0, 100).unwrap(), b"new!");
    // The old node is the deleted file: it is gone, not silently the new one.
    match s.queue.getattr(old.nodeid) {
        Err(e) => assert!(
            matches!(e.errno(), Some(libc::ESTALE) | Some(libc::ENOENT)),
            "GETATTR of the deleted file's node: {e}"
        ),
        Ok(attr) => assert_ne!(
            attr.attr.size, 4,
            "the deleted file's node must not show the new file"
        ),
    }
    // The same again for a directory entry created through the daemon itself.
    let (made, open) = s
        .queue
        .create_with(ROOT_ID, b"made", create_in(0o100644, libc::O_RDWR as u32))
        .expect("CREATE made");
    s.queue
        .release(made.nodeid, open.fh, libc::O_RDWR as u32)
        .unwrap();
    fs::remove_file(s.host("made")).unwrap();
    let (again, _) = s
        .queue
        .create_with(ROOT_ID, b"again", create_in(0o100644, libc::O_RDWR as u32))
        .expect("CREATE again");
    if again.attr.ino == made.attr.ino {
        assert_ne!(
            again.nodeid, made.nodeid,
            "CREATE over a reused inode number"
        );
    }
    s.daemon.assert_alive("after the inode reuse");
}

/// berth keeps the descriptors of directories in use. One of a directory the host has
/// replaced must not make the old node look like an empty, live directory: as when reopening
/// by file handle, requests under it get ESTALE (the guest then revalidates its path and
/// finds the new directory), never ENOENT.
#[test]
fn a_directory_replaced_on_the_host_gives_estale_under_its_old_node() {
    if !running_as_root() {
        skip("needs root: open_by_handle_at needs CAP_DAC_READ_SEARCH");
        return;
    }
    let fixture = Fixture::new();
    fs::create_dir(fixture.shared.join("d")).unwrap();
    fs::write(fixture.shared.join("d/x"), b"old").unwrap();
    let mut s = Session::start_in(
        fixture,
        &["--inode-file-handles=mandatory"],
        init_flags::DEFAULT,
    );
    s.init_out();
    let old_dir = s.queue.lookup(ROOT_ID, b"d").expect("LOOKUP d");
    // A lookup inside it puts its descriptor in use.
    s.queue.lookup(old_dir.nodeid, b"x").expect("LOOKUP d/x");

    fs::remove_dir_all(s.host("d")).unwrap();
    fs::create_dir(s.host("d")).unwrap();
    fs::write(s.host("d/x"), b"new!").unwrap();

    let errno_of = |r: Result<EntryOut, berth_frontend::Error>| match r {
        Ok(entry) => panic!("a request under the deleted directory succeeded: {entry:?}"),
        Err(e) => e.errno(),
    };
    assert_eq!(
        errno_of(s.queue.lookup(old_dir.nodeid, b"x")),
        Some(libc::ESTALE),
        "LOOKUP under the replaced directory"
    );
    assert_eq!(
        errno_of(s.queue.mkdir(old_dir.nodeid, b"sub", 0o755)),
        Some(libc::ESTALE),
        "MKDIR under the replaced directory"
    );
    assert_eq!(
        errno_of(
            s.queue
                .create_with(
                    old_dir.nodeid,
                    b"f",
                    create_in(0o100644, libc::O_RDWR as u32)
                )
                .map(|(entry, _)| entry)
        ),
        Some(libc::ESTALE),
        "CREATE under the replaced directory"
    );
    // What the guest does next: look the path up again, and reach the new directory.
    let new_dir = s.queue.lookup(ROOT_ID, b"d").expect("LOOKUP d again");
    assert_ne!(new_dir.nodeid, old_dir.nodeid);
    let x = s
        .queue
        .lookup(new_dir.nodeid, b"x")
        .expect("LOOKUP new d/x");
    assert_eq!(x.attr.size, 4, "the new directory's file");
    assert!(
        !s.host("d/sub").exists() && !s.host("d/f").exists(),
        "nothing was created in the new directory through the old node"
    );
    s.daemon.assert_alive("after the directory was replaced");
}

// ----- xattr name mapping (--xattrmap) -----

fn host_setxattr(path: &Path, name: &str, value: &[u8]) {
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let cname = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "host setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn host_getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let cname = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

/// The size in a GETXATTR or LISTXATTR reply to a size-0 probe.
fn probed_size(reply: Result<Vec<u8>, i32>) -> Result<u32, i32> {
    reply.map(|body| {
        GetxattrOut::from_slice(&body)
            .copied()
            .expect("a fuse_getxattr_out")
            .size
    })
}

#[test]
fn xattr_size_probes_answer_for_the_mapped_names() {
    let mut s = Session::start(&["--xattrmap=:map::user.virtiofs.:"]);
    s.init_out();
    let path = s.host("hello.txt");
    host_setxattr(&path, "user.virtiofs.user.berth", b"0123456789");
    // Host names the guest does not see: the host's list is far longer than the guest's (as
    // many as an ext4 inode holds in one block).
    for i in 0..30 {
        host_setxattr(&path, &format!("user.hidden-by-the-map-{i:03}"), b"h");
    }
    let node = s.queue.lookup(ROOT_ID, b"hello.txt").unwrap();
    let q = &mut s.queue;
    // GETXATTR reads the prefixed host name: its size, ERANGE below it, the value.
    assert_eq!(
        probed_size(getxattr(q, node.nodeid, b"user.berth", 0, 64)),
        Ok(10)
    );
    assert_eq!(
        getxattr(q, node.nodeid, b"user.berth", 9, 4000),
        Err(libc::ERANGE)
    );
    assert_eq!(
        getxattr(q, node.nodeid, b"user.berth", 10, 4000),
        Ok(b"0123456789".to_vec())
    );
    // The host's own names are not reachable under their names.
    assert_eq!(
        getxattr(q, node.nodeid, b"user.hidden-by-the-map-000", 0, 64),
        Err(libc::ENODATA)
    );
    // SETXATTR goes to the prefixed name, and the probe sees the new size.
    setxattr(q, node.nodeid, b"user.second", b"22", 2).expect("SETXATTR user.second");
    assert_eq!(
        host_getxattr(&path, "user.virtiofs.user.second"),
        Some(b"22".to_vec())
    );
    assert_eq!(host_getxattr(&path, "user.second"), None);
    let guest_list: &[u8] = b"user.berth\0user.second\0";
    if testing_berth() {
        // LISTXATTR's size probe answers the size of the mapped list (virtiofsd answers the
        // host list's size, and then ERANGE for a buffer of the size it gave).
        assert_eq!(
            probed_size(listxattr(q, node.nodeid, 0, 64)),
            Ok(guest_list.len() as u32)
        );
        let exact = listxattr(q, node.nodeid, guest_list.len() as u32, 4000).expect("LISTXATTR");
        let mut names: Vec<&[u8]> = exact.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
        names.sort();
        assert_eq!(names, [&b"user.berth"[..], b"user.second"]);
        assert_eq!(exact.len(), guest_list.len());
        assert_eq!(
            listxattr(q, node.nodeid, guest_list.len() as u32 - 1, 4000),
            Err(libc::ERANGE)
        );
    }
    // Any buffer the host list fits in works on both daemons.
    let names = listxattr(q, node.nodeid, 65536, 65536).expect("LISTXATTR");
    assert_eq!(names.len(), guest_list.len(), "listed: {names:?}");
    s.daemon.assert_alive("after the mapped xattr requests");
}

#[test]
fn acl_names_with_an_xattr_map() {
    // Without --posix-acl, the guest's ACL names are refused before mapping, and mapped host
    // copies are hidden (as virtiofsd).
    let mut s = Session::start(&["--xattrmap=:map::user.virtiofs.:"]);
    s.init_out();
    let path = s.host("hello.txt");
    host_setxattr(
        &path,
        "user.virtiofs.system.posix_acl_access",
        &acl_value(0o640),
    );
    host_setxattr(&path, "user.virtiofs.user.kept", b"k");
    let node = s.queue.lookup(ROOT_ID, b"hello.txt").unwrap();
    let value = acl_value(0o600);
    let err = setxattr(
        &mut s.queue,
        node.nodeid,
        b"system.posix_acl_access",
        &value,
        value.len() as u32,
    )
    .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EOPNOTSUPP), "{err}");
    assert_eq!(
        getxattr(
            &mut s.queue,
            node.nodeid,
            b"system.posix_acl_access",
            100,
            4000
        ),
        Err(libc::EOPNOTSUPP)
    );
    let names = listxattr(&mut s.queue, node.nodeid, 4096, 4096).expect("LISTXATTR");
    assert_eq!(names, b"user.kept\0");
    if testing_berth() {
        assert_eq!(
            probed_size(listxattr(&mut s.queue, node.nodeid, 0, 64)),
            Ok(b"user.kept\0".len() as u32)
        );
    }
    drop(s);

    // With ACLs negotiated, they are stored under the mapped name (the host then keeps them
    // as opaque data: it does not enforce them) and read back through it.
    let mut s = Session::start_in(
        Fixture::new(),
        &["--posix-acl", "--xattrmap=:map::user.virtiofs.:"],
        init_flags::DEFAULT | ACL_FLAGS,
    );
    s.init_out();
    let node = s.queue.lookup(ROOT_ID, b"hello.txt").unwrap();
    let args = SetxattrInExt {
        size: value.len() as u32,
        flags: 0,
        setxattr_flags: 0,
        padding: 0,
    };
    s.queue
        .request_empty(&Request {
            opcode: opcode::SETXATTR,
            nodeid: node.nodeid,
            args: &[args.as_slice(), b"system.posix_acl_access\0", &value],
            payload: &[],
            reply_capacity: Some(0),
        })
        .expect("SETXATTR system.posix_acl_access");
    let path = s.host("hello.txt");
    assert_eq!(
        host_getxattr(&path, "user.virtiofs.system.posix_acl_access"),
        Some(value.clone())
    );
    assert_eq!(host_getxattr(&path, "system.posix_acl_access"), None);
    assert_eq!(
        getxattr(
            &mut s.queue,
            node.nodeid,
            b"system.posix_acl_access",
            100,
            4000
        ),
        Ok(value.clone())
    );
    let names = listxattr(&mut s.queue, node.nodeid, 4096, 4096).expect("LISTXATTR");
    assert_eq!(names, b"system.posix_acl_access\0");
}

#[test]
fn security_labels_are_stored_under_mapped_names() {
    // Mapped into user.*, a label needs no CAP_SYS_ADMIN on the host.
    let mut s = labelled_session(&["--xattrmap=:map::user.virtiofs.:"]);
    let ext = secctx_extension(LABEL_NAME, LABEL);
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    s.queue
        .call_with_extensions(
            &Request {
                opcode: opcode::MKDIR,
                nodeid: ROOT_ID,
                args: &[mkdir.as_slice(), b"labelled\0"],
                payload: &[],
                reply_capacity: entry_reply(),
            },
            &ext,
        )
        .unwrap()
        .check()
        .expect("MKDIR with a security context");
    let create = create_in(0o100640, libc::O_RDWR as u32);
    s.queue
        .call_with_extensions(
            &Request {
                opcode: opcode::CREATE,
                nodeid: ROOT_ID,
                args: &[create.as_slice(), b"labelled-file\0"],
                payload: &[],
                reply_capacity: Some(
                    (std::mem::size_of::<EntryOut>() + std::mem::size_of::<OpenOut>()) as u32,
                ),
            },
            &ext,
        )
        .unwrap()
        .check()
        .expect("CREATE with a security context");
    for name in ["labelled", "labelled-file"] {
        let path = s.host(name);
        assert_eq!(
            host_getxattr(&path, "user.virtiofs.security.selinux").as_deref(),
            Some(LABEL),
            "{name}: the label under its mapped name"
        );
        assert_eq!(host_label(&path), None, "{name}: no host security.selinux");
    }
    drop(s);

    // A map that refuses security.* refuses labelled creates, and creates nothing.
    let mut s = labelled_session(&["--xattrmap=/bad/all/security./security./ /ok/all///"]);
    let reply = s
        .queue
        .call_with_extensions(
            &Request {
                opcode: opcode::MKDIR,
                nodeid: ROOT_ID,
                args: &[mkdir.as_slice(), b"refused\0"],
                payload: &[],
                reply_capacity: entry_reply(),
            },
            &ext,
        )
        .unwrap()
        .check();
    assert_eq!(reply.unwrap_err().errno(), Some(libc::EPERM));
    assert!(!s.host("refused").exists(), "nothing is created");
    s.daemon.assert_alive("after the refused label");
}

#[test]
fn names_no_xattrmap_rule_matches_are_refused_and_hidden() {
    if !testing_berth() {
        skip_by_design("virtiofsd aborts on a name its map does not cover; checked on berth");
        return;
    }
    // Only trusted.* is covered, in both directions.
    let mut s = Session::start(&["--xattrmap=:prefix:all:trusted.:user.virtiofs.:"]);
    s.init_out();
    let path = s.host("hello.txt");
    host_setxattr(&path, "user.virtiofs.trusted.x", b"t");
    host_setxattr(&path, "user.uncovered", b"u");
    let node = s.queue.lookup(ROOT_ID, b"hello.txt").unwrap();
    let q = &mut s.queue;
    let err = setxattr(q, node.nodeid, b"user.uncovered", b"v", 1).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EPERM), "{err}");
    assert_eq!(
        getxattr(q, node.nodeid, b"user.uncovered", 100, 4000),
        Err(libc::ENODATA)
    );
    assert_eq!(
        getxattr(q, node.nodeid, b"trusted.x", 100, 4000),
        Ok(b"t".to_vec())
    );
    assert_eq!(
        listxattr(q, node.nodeid, 4096, 4096).expect("LISTXATTR"),
        b"trusted.x\0"
    );
    assert_eq!(host_getxattr(&path, "user.uncovered"), Some(b"u".to_vec()));
    s.daemon.assert_alive("after names no rule matches");
    assert!(
        s.daemon
            .stderr()
            .contains("no --xattrmap rule matches every name"),
        "the daemon warns at start about the missing catch-all:\n{}",
        s.daemon.stderr()
    );
}

#[test]
fn a_renamed_security_capability_is_dropped_on_write_truncate_and_chown() {
    if !testing_berth() {
        skip_by_design("virtiofsd drops it too, also on SETXATTR; berth's rule is checked");
        return;
    }
    if !running_as_root() {
        skip("needs root to chown a file");
        return;
    }
    // The host kernel drops the real security.capability by itself; the renamed one is
    // berth's to drop, whatever the guest negotiated.
    let mut s = Session::start(&["--xattrmap=:map::user.virtiofs.:"]);
    s.init_out();
    let path = s.host("hello.txt");
    let caps_name = "user.virtiofs.security.capability";
    let node = s.queue.lookup(ROOT_ID, b"hello.txt").unwrap();
    let open = s.queue.open(node.nodeid, libc::O_RDWR as u32).unwrap();
    let truncate = SetattrIn {
        valid: setattr_valid::SIZE,
        size: 3,
        ..Default::default()
    };
    let chown = SetattrIn {
        valid: setattr_valid::UID | setattr_valid::GID,
        uid: 1234,
        gid: 1234,
        ..Default::default()
    };
    let chmod = SetattrIn {
        valid: setattr_valid::MODE,
        mode: libc::S_IFREG | 0o640,
        ..Default::default()
    };
    for what in ["write", "truncate", "chown", "chmod"] {
        host_setxattr(&path, caps_name, b"caps");
        host_setxattr(&path, "user.virtiofs.user.other", b"kept");
        let q = &mut s.queue;
        match what {
            "write" => assert_eq!(q.write(node.nodeid, open.fh, 0, b"x").unwrap(), 1),
            "truncate" => drop(q.setattr(node.nodeid, &truncate).expect("SETATTR size")),
            "chown" => drop(q.setattr(node.nodeid, &chown).expect("SETATTR uid/gid")),
            _ => drop(q.setattr(node.nodeid, &chmod).expect("SETATTR mode")),
        }
        let left = host_getxattr(&path, caps_name);
        if what == "chmod" {
            assert_eq!(left, Some(b"caps".to_vec()), "chmod keeps capabilities");
        } else {
            assert_eq!(left, None, "{what} drops the renamed security.capability");
        }
        assert_eq!(
            host_getxattr(&path, "user.virtiofs.user.other"),
            Some(b"kept".to_vec()),
            "{what} keeps other attributes"
        );
    }
    // An O_TRUNC open too; without the attribute every operation still succeeds.
    host_setxattr(&path, caps_name, b"caps");
    let reopened = s
        .queue
        .open(node.nodeid, (libc::O_RDWR | libc::O_TRUNC) as u32)
        .unwrap();
    assert_eq!(host_getxattr(&path, caps_name), None, "O_TRUNC open");
    assert_eq!(s.queue.write(node.nodeid, reopened.fh, 0, b"y").unwrap(), 1);
    s.daemon.assert_alive("after the capability drops");
}
