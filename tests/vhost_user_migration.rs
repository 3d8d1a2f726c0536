//! Live migration of berth's device state, with the berth-frontend as both VMMs: the source
//! daemon's state is saved (queues stopped, SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE) and
//! loaded into a second daemon serving the same shared directory, which must then answer the
//! guest's node ids and open handles as the first did. Damaged, foreign, newer and truncated
//! streams must be refused, and an inode deleted on the host must follow
//! `--migration-on-error`. The guest's host-side locks move too, taken again by the
//! destination once the source lets go of its copies.

#[path = "common/frontend_util.rs"]
mod frontend_util;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use berth_frontend::fuse::ROOT_ID;
use berth_frontend::{FsQueue, VhostUserFs};
use frontend_util::*;

/// Files looked up before the migration (the "10 000 looked-up inodes").
const MANY: usize = 10_000;

fn start(shared: &Path, socket: &Path, extra: &[&str]) -> Daemon {
    let mut args: Vec<OsString> = vec![
        "--socket-path".into(),
        socket.into(),
        "--shared-dir".into(),
        shared.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    let mut daemon = Daemon::spawn(args);
    daemon.wait_for_socket(socket);
    daemon
}

fn socket(fixture: &Fixture, name: &str) -> PathBuf {
    fixture.root.path().join(name)
}

/// Saves the source's state as QEMU does: queues stopped first.
fn save(device: &mut VhostUserFs) -> Result<Vec<u8>, berth_frontend::Error> {
    device.stop_queues().expect("stop the queues");
    device.save_device_state()
}

/// A destination daemon on `shared`, connected, with its queue 1 taken (no FUSE_INIT: the
/// guest's session comes with the state).
fn destination(shared: &Path, socket: &Path, extra: &[&str]) -> (Daemon, VhostUserFs, FsQueue) {
    let mut daemon = start(shared, socket, extra);
    let mut device = connect(&mut daemon, socket, 1);
    let queue = device.take_request_queue(1).expect("request queue 1");
    (daemon, device, queue)
}

fn read_whole(queue: &mut FsQueue, nodeid: u64, fh: u64) -> Vec<u8> {
    let mut content = Vec::new();
    loop {
        let chunk = queue
            .read(nodeid, fh, content.len() as u64, 64 * 1024)
            .expect("READ");
        if chunk.is_empty() {
            return content;
        }
        content.extend_from_slice(&chunk);
    }
}

fn round_trip(flags: &[&str]) {
    let fixture = Fixture::new();
    let many = fixture.shared.join("many");
    fs::create_dir(&many).expect("create many/");
    for n in 0..MANY {
        fs::write(many.join(format!("f{n}")), n.to_string()).expect("create a small file");
    }
    let mode = flags.join(" ");
    let source_socket = socket(&fixture, "source.sock");
    let mut source = start(&fixture.shared, &source_socket, flags);
    let mut device = connect(&mut source, &source_socket, 1);
    let mut queue = init_first_queue(&mut device);

    let many_dir = queue.lookup(ROOT_ID, b"many\0").expect("LOOKUP many");
    let mut nodes = Vec::with_capacity(MANY);
    for n in 0..MANY {
        let name = format!("f{n}\0");
        nodes.push(
            queue
                .lookup(many_dir.nodeid, name.as_bytes())
                .expect("LOOKUP")
                .nodeid,
        );
    }
    // A file looked up three times, open for reading, and a directory open part-way.
    let big = queue.lookup(ROOT_ID, b"big.bin\0").expect("LOOKUP big.bin");
    for _ in 0..2 {
        queue
            .lookup(ROOT_ID, b"big.bin\0")
            .expect("LOOKUP big.bin again");
    }
    let big_fh = queue
        .open(big.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN")
        .fh;
    let sub = queue.lookup(ROOT_ID, b"sub\0").expect("LOOKUP sub");
    let sub_fh = queue.opendir(sub.nodeid).expect("OPENDIR").fh;
    let hello = queue.lookup(ROOT_ID, b"hello.txt\0").expect("LOOKUP hello");
    let hello_fh = queue
        .open(hello.nodeid, libc::O_RDWR as u32)
        .expect("OPEN rw")
        .fh;

    let state = save(&mut device)
        .unwrap_or_else(|e| panic!("save ({mode}) failed: {e}\n{}", source.stderr()));
    assert!(state.len() > MANY * 8, "the state holds every inode");
    drop(device);
    drop(source);

    let (mut dest, mut device, mut queue) =
        destination(&fixture.shared, &socket(&fixture, "dest.sock"), flags);
    device
        .load_device_state(&state)
        .unwrap_or_else(|e| panic!("load ({mode}) failed: {e}\n{}", dest.stderr()));

    // Same node ids, same handles.
    for (n, &node) in nodes.iter().enumerate().step_by(97) {
        let attr = queue.getattr(node).expect("GETATTR of a migrated node");
        assert_eq!(attr.attr.size, n.to_string().len() as u64, "size of f{n}");
    }
    assert_eq!(read_whole(&mut queue, big.nodeid, big_fh), big_content());
    let entries = queue
        .readdir(sub.nodeid, sub_fh, 0, 4096)
        .expect("READDIR on a migrated directory handle");
    assert!(entries.iter().any(|e| e.name == b"inner.txt"));
    queue
        .write(hello.nodeid, hello_fh, 0, b"HELLO")
        .expect("WRITE through a migrated read-write handle");
    assert!(fs::read(fixture.shared.join("hello.txt"))
        .expect("read hello.txt")
        .starts_with(b"HELLO"));
    // Lookup counts came along: big.bin goes only after all three lookups are forgotten.
    queue.forget(big.nodeid, 2).expect("FORGET 2");
    queue
        .getattr(big.nodeid)
        .expect("one lookup of big.bin is left");
    // New nodes and handles do not collide with migrated ones.
    let fresh = queue
        .lookup(ROOT_ID, b"mode640.txt\0")
        .expect("LOOKUP after migration");
    assert!(fresh.nodeid > *nodes.iter().max().unwrap_or(&0));
    let fresh_fh = queue
        .open(fresh.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN")
        .fh;
    assert!(![big_fh, sub_fh, hello_fh].contains(&fresh_fh));
    dest.assert_alive("after the migration");
}

#[test]
fn state_round_trip_in_find_paths_mode() {
    if !testing_berth() {
        skip_by_design("berth's own state format");
        return;
    }
    round_trip(&["--migration-mode", "find-paths"]);
}

#[test]
fn state_round_trip_with_verified_handles_and_confirmed_paths() {
    if !testing_berth() {
        skip_by_design("berth's own state format");
        return;
    }
    if !running_as_root() {
        skip("file handles need CAP_DAC_READ_SEARCH");
        return;
    }
    round_trip(&["--migration-verify-handles", "--migration-confirm-paths"]);
}

#[test]
fn state_round_trip_in_file_handles_mode() {
    if !testing_berth() {
        skip_by_design("berth's own state format");
        return;
    }
    if !running_as_root() {
        skip("file handles need CAP_DAC_READ_SEARCH");
        return;
    }
    round_trip(&["--migration-mode", "file-handles"]);
}

/// A valid stream from a source with a file looked up and open.
fn valid_state(fixture: &Fixture) -> Vec<u8> {
    let source_socket = socket(fixture, "source.sock");
    let mut source = start(&fixture.shared, &source_socket, &[]);
    let mut device = connect(&mut source, &source_socket, 1);
    let mut queue = init_first_queue(&mut device);
    let hello = queue.lookup(ROOT_ID, b"hello.txt\0").expect("LOOKUP");
    queue
        .open(hello.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN");
    save(&mut device).expect("save")
}

#[test]
fn damaged_foreign_newer_and_truncated_streams_are_refused() {
    if !testing_berth() {
        skip_by_design("berth's own state format");
        return;
    }
    let fixture = Fixture::new();
    let state = valid_state(&fixture);
    let (mut dest, mut device, mut queue) =
        destination(&fixture.shared, &socket(&fixture, "dest.sock"), &[]);

    let mut corrupt = state.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    let mut newer = state.clone();
    newer[8..12].copy_from_slice(&(berth_passthrough::STATE_FORMAT_VERSION + 1).to_le_bytes());
    let mut foreign_magic = state.clone();
    foreign_magic[0] = b'X';
    let cases: [(&str, &[u8], &str); 5] = [
        ("truncated", &state[..state.len() - 7], "truncated"),
        ("header only", &state[..10], "truncated"),
        ("corrupt", &corrupt, "checksum"),
        ("newer", &newer, "newer than this berth reads"),
        ("not berth's", &foreign_magic, "magic"),
    ];
    for (what, stream, message) in cases {
        assert!(
            device.load_device_state(stream).is_err(),
            "a {what} stream must be refused"
        );
        let log = dest.stderr();
        assert!(
            log.contains(message),
            "the refusal of a {what} stream says {message:?}:\n{log}"
        );
    }
    // Nothing was half-loaded: the destination holds no node of the source.
    assert!(queue.getattr(2).is_err(), "no migrated node after refusals");
    dest.assert_alive("after refusing streams");

    // A daemon serving another directory refuses the stream as foreign.
    let other = Fixture::new();
    let (mut foreign, mut device, _queue) =
        destination(&other.shared, &socket(&other, "other.sock"), &[]);
    assert!(device.load_device_state(&state).is_err());
    let log = foreign.stderr();
    assert!(
        log.contains("another shared directory"),
        "the refusal names the share:\n{log}"
    );
    foreign.assert_alive("after refusing a foreign stream");
}

/// A source whose looked-up, open `victim` is deleted on the host before the save.
fn save_with_deleted_inode(
    fixture: &Fixture,
    on_error: &str,
) -> (Daemon, Result<Vec<u8>, String>, u64, u64) {
    fs::write(fixture.shared.join("victim.txt"), b"doomed").expect("create victim");
    let source_socket = socket(fixture, "source.sock");
    let mut source = start(
        &fixture.shared,
        &source_socket,
        &["--migration-on-error", on_error],
    );
    let mut device = connect(&mut source, &source_socket, 1);
    let mut queue = init_first_queue(&mut device);
    let victim = queue
        .lookup(ROOT_ID, b"victim.txt\0")
        .expect("LOOKUP victim")
        .nodeid;
    let hello = queue
        .lookup(ROOT_ID, b"hello.txt\0")
        .expect("LOOKUP hello")
        .nodeid;
    fs::remove_file(fixture.shared.join("victim.txt")).expect("delete victim on the host");
    let saved = save(&mut device).map_err(|e| e.to_string());
    drop(device);
    (source, saved, victim, hello)
}

#[test]
fn a_host_deleted_inode_aborts_the_save_by_default() {
    if !testing_berth() {
        skip_by_design("berth's own state format");
        return;
    }
    let fixture = Fixture::new();
    let (source, saved, victim, _) = save_with_deleted_inode(&fixture, "abort");
    assert!(
        saved.is_err(),
        "the save must fail so QEMU keeps the source"
    );
    let log = source.stderr();
    assert!(
        log.contains(&format!("Cannot describe inode {victim}")) && log.contains("deleted"),
        "the source says which inode and why:\n{log}"
    );
}

#[test]
fn a_host_deleted_inode_answers_eio_with_guest_error() {
    if !testing_berth() {
        skip_by_design("berth's own state format");
        return;
    }
    let fixture = Fixture::new();
    let (_source, saved, victim, hello) = save_with_deleted_inode(&fixture, "guest-error");
    let state = saved.expect("the save succeeds with guest-error");
    let (mut dest, mut device, mut queue) = destination(
        &fixture.shared,
        &socket(&fixture, "dest.sock"),
        &["--migration-on-error", "guest-error"],
    );
    device.load_device_state(&state).expect("load");
    let err = queue.getattr(victim).expect_err("the lost inode fails");
    assert_eq!(
        err.errno(),
        Some(libc::EIO),
        "EIO for the lost inode: {err}"
    );
    queue.getattr(hello).expect("the other inode works");
    dest.assert_alive("after loading a lost inode");
}

#[test]
fn a_file_renamed_out_of_the_share_cannot_be_described() {
    if !testing_berth() {
        skip_by_design("berth's own state format");
        return;
    }
    let fixture = Fixture::new();
    fs::write(fixture.shared.join("leaving.txt"), b"bye").expect("create leaving.txt");
    let source_socket = socket(&fixture, "source.sock");
    let mut source = start(
        &fixture.shared,
        &source_socket,
        &["--migration-confirm-paths"],
    );
    let mut device = connect(&mut source, &source_socket, 1);
    let mut queue = init_first_queue(&mut device);
    let leaving = queue
        .lookup(ROOT_ID, b"leaving.txt\0")
        .expect("LOOKUP leaving.txt")
        .nodeid;
    fs::rename(
        fixture.shared.join("leaving.txt"),
        fixture.root.path().join("gone.txt"),
    )
    .expect("move the file out of the share on the host");
    assert!(save(&mut device).is_err(), "the save must fail");
    let log = source.stderr();
    assert!(
        log.contains(&format!("Cannot describe inode {leaving}")),
        "the source names the inode it cannot describe:\n{log}"
    );
}

/// FUSE_SETLK of `owner` on `fh`: a POSIX lock, or with `flock` a flock lock (FUSE_LK_FLOCK).
fn setlk(
    queue: &mut FsQueue,
    nodeid: u64,
    fh: u64,
    owner: u64,
    (kind, start, end): (libc::c_int, u64, u64),
    flock: bool,
) -> Result<(), berth_frontend::Error> {
    use berth_frontend::fuse::{opcode, FileLock, LkIn};
    use vm_memory::ByteValued;
    let lk = LkIn {
        fh,
        owner,
        lk: FileLock {
            start,
            end,
            type_: kind as u32,
            pid: 0,
        },
        lk_flags: u32::from(flock),
        padding: 0,
    };
    queue.request_empty(&berth_frontend::Request {
        opcode: opcode::SETLK,
        nodeid,
        args: &[lk.as_slice()],
        payload: &[],
        reply_capacity: Some(0),
    })
}

/// A host process's description of `path`.
fn host_open(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the shared file on the host")
}

/// F_OFD_GETLK from a host description: the type of a lock in the way of a write lock on
/// `start..start+len`, F_UNLCK when none is.
fn host_lock_in_the_way(path: &Path, start: i64, len: i64) -> libc::c_int {
    use std::os::fd::AsRawFd;
    let file = host_open(path);
    // SAFETY: flock is plain old data; all-zeroes is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: F_OFD_GETLK fills the struct it is given; the descriptor is open.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(ret, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    libc::c_int::from(fl.l_type)
}

/// Whether a host flock(LOCK_SH | LOCK_NB) on `path` is refused (it is let go at once).
fn host_flock_refused(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let file = host_open(path);
    // SAFETY: flock on an open descriptor.
    let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    if ret == 0 {
        return false;
    }
    let e = std::io::Error::last_os_error();
    assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK), "flock: {e}");
    true
}

#[test]
fn locks_are_taken_again_once_the_source_lets_go() {
    if !testing_berth() {
        skip_by_design("berth's host-side locks (--posix-lock, --flock)");
        return;
    }
    let fixture = Fixture::new();
    let flags = ["--posix-lock", "--flock"];
    let file = fixture.shared.join("hello.txt");
    let source_socket = socket(&fixture, "source.sock");
    let mut source = start(&fixture.shared, &source_socket, &flags);
    let mut device = connect(&mut source, &source_socket, 1);
    let mut queue = init_first_queue(&mut device);
    let hello = queue.lookup(ROOT_ID, b"hello.txt\0").expect("LOOKUP hello");
    let fh = queue
        .open(hello.nodeid, libc::O_RDWR as u32)
        .expect("OPEN rw")
        .fh;
    setlk(
        &mut queue,
        hello.nodeid,
        fh,
        7,
        (libc::F_WRLCK, 0, 99),
        false,
    )
    .expect("SETLK");
    setlk(&mut queue, hello.nodeid, fh, 7, (libc::F_WRLCK, 0, 0), true).expect("flock");
    let state = save(&mut device).unwrap_or_else(|e| panic!("save: {e}\n{}", source.stderr()));

    // The same-host order: the destination loads while the source still holds its copies.
    // Its log (at info) says when it took them again.
    let dest_socket = socket(&fixture, "dest.sock");
    let mut args: Vec<OsString> = vec![
        "--socket-path".into(),
        dest_socket.clone().into(),
        "--shared-dir".into(),
        fixture.shared.clone().into(),
    ];
    args.extend(flags.iter().map(OsString::from));
    let mut dest = Daemon::spawn_with(args, |command| {
        command.env("RUST_LOG", "info");
    });
    dest.wait_for_socket(&dest_socket);
    let mut dest_device = connect(&mut dest, &dest_socket, 1);
    let mut dest_queue = dest_device.take_request_queue(1).expect("request queue 1");
    dest_device
        .load_device_state(&state)
        .unwrap_or_else(|e| panic!("load: {e}\n{}", dest.stderr()));
    assert_eq!(host_lock_in_the_way(&file, 50, 1), libc::F_WRLCK);
    drop(device);
    drop(source);
    // The source's sandboxed child dies with it a moment later; the destination then takes
    // the locks on its next try.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen_free = false;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let stderr = dest.stderr();
        if stderr.matches("Took the guest's").count() >= 2 {
            break;
        }
        seen_free |= host_lock_in_the_way(&file, 50, 1) == libc::F_UNLCK;
        assert!(
            std::time::Instant::now() < deadline,
            "the destination did not take the locks again (seen free: {seen_free}):\n{stderr}"
        );
    }
    assert_eq!(host_lock_in_the_way(&file, 50, 1), libc::F_WRLCK);
    assert_eq!(host_lock_in_the_way(&file, 100, 0), libc::F_UNLCK);
    assert!(host_flock_refused(&file), "the guest's flock lock is held");

    // The guest lets go and locks again through the destination.
    setlk(
        &mut dest_queue,
        hello.nodeid,
        fh,
        7,
        (libc::F_UNLCK, 0, 99),
        false,
    )
    .expect("unlock");
    assert_eq!(host_lock_in_the_way(&file, 50, 1), libc::F_UNLCK);
    setlk(
        &mut dest_queue,
        hello.nodeid,
        fh,
        7,
        (libc::F_WRLCK, 40, 59),
        false,
    )
    .expect("relock");
    assert_eq!(host_lock_in_the_way(&file, 50, 1), libc::F_WRLCK);
    // Another lock owner of the guest is refused the range.
    let refused = setlk(
        &mut dest_queue,
        hello.nodeid,
        fh,
        8,
        (libc::F_RDLCK, 45, 45),
        false,
    );
    assert_eq!(refused.err().and_then(|e| e.errno()), Some(libc::EAGAIN));
    setlk(
        &mut dest_queue,
        hello.nodeid,
        fh,
        7,
        (libc::F_UNLCK, 0, 0),
        true,
    )
    .expect("funlock");
    assert!(!host_flock_refused(&file));
    assert!(
        !dest.stderr().contains("Lost the guest's"),
        "{}",
        dest.stderr()
    );
    dest.assert_alive("after the migration");
}

/// FUSE_SETLKW of `owner` on `fh`, published and kicked without waiting for the reply.
fn submit_setlkw(
    queue: &mut FsQueue,
    nodeid: u64,
    fh: u64,
    owner: u64,
    (kind, start, end): (libc::c_int, u64, u64),
    flock: bool,
) -> berth_frontend::Ticket {
    use berth_frontend::fuse::{opcode, FileLock, LkIn};
    use vm_memory::ByteValued;
    let lk = LkIn {
        fh,
        owner,
        lk: FileLock {
            start,
            end,
            type_: kind as u32,
            pid: 0,
        },
        lk_flags: u32::from(flock),
        padding: 0,
    };
    let ticket = queue
        .submit(&berth_frontend::Request {
            opcode: opcode::SETLKW,
            nodeid,
            args: &[lk.as_slice()],
            payload: &[],
            reply_capacity: Some(0),
        })
        .expect("submit SETLKW");
    queue.notify().expect("kick");
    ticket
}

/// The source of a waiting lock request: owner 7 (A) holds a write lock on bytes 0..=99 of
/// hello.txt, or an exclusive flock lock through its handle, and owner 8 (B) waits in SETLKW
/// for the same through another handle when the queues stop and the state is saved.
struct WaitingSource {
    fixture: Fixture,
    source: Daemon,
    device: VhostUserFs,
    hiprio: FsQueue,
    queue: FsQueue,
    bases: Vec<u32>,
    state: Vec<u8>,
    nodeid: u64,
    fh_a: u64,
    ticket: berth_frontend::Ticket,
}

const WAIT_FLAGS: [&str; 4] = ["--posix-lock", "--flock", "--thread-pool-size", "4"];

fn waiting_source(flock: bool) -> WaitingSource {
    let fixture = Fixture::new();
    let (mut source, source_socket) = lock_daemon(&fixture, "source.sock");
    let mut device = connect(&mut source, &source_socket, 1);
    let hiprio = device.take_queue(0).expect("hiprio queue");
    let mut queue = init_first_queue(&mut device);
    let hello = queue.lookup(ROOT_ID, b"hello.txt\0").expect("LOOKUP hello");
    let fh_a = queue
        .open(hello.nodeid, libc::O_RDWR as u32)
        .expect("OPEN for A")
        .fh;
    let fh_b = queue
        .open(hello.nodeid, libc::O_RDWR as u32)
        .expect("OPEN for B")
        .fh;
    setlk(
        &mut queue,
        hello.nodeid,
        fh_a,
        7,
        (libc::F_WRLCK, 0, 99),
        flock,
    )
    .expect("A's lock");
    let ticket = submit_setlkw(
        &mut queue,
        hello.nodeid,
        fh_b,
        8,
        (libc::F_WRLCK, 0, 99),
        flock,
    );
    // Time for B's request to be taken off the ring and wait on the source.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let bases = device.stop_queues().expect("stop the queues");
    let state = device
        .save_device_state()
        .unwrap_or_else(|e| panic!("save: {e}\n{}", source.stderr()));
    WaitingSource {
        fixture,
        source,
        device,
        hiprio,
        queue,
        bases,
        state,
        nodeid: hello.nodeid,
        fh_a,
        ticket,
    }
}

/// A daemon with host locks and a pool on `fixture`'s share, listening on socket `name`.
fn lock_daemon(fixture: &Fixture, name: &str) -> (Daemon, PathBuf) {
    let path = socket(fixture, name);
    let mut daemon = Daemon::spawn_with(
        [
            OsString::from("--socket-path"),
            path.clone().into(),
            "--shared-dir".into(),
            fixture.shared.clone().into(),
        ]
        .into_iter()
        .chain(WAIT_FLAGS.iter().map(OsString::from)),
        |command| {
            command.env("RUST_LOG", "info");
        },
    );
    daemon.wait_for_socket(&path);
    (daemon, path)
}

fn a_waiting_lock_request_is_answered_by_the_destination(flock: bool) {
    let WaitingSource {
        fixture,
        source,
        device,
        hiprio,
        mut queue,
        bases,
        state,
        nodeid,
        fh_a,
        ticket,
    } = waiting_source(flock);
    let file = fixture.shared.join("hello.txt");
    assert_eq!(
        u32::from_le_bytes([state[8], state[9], state[10], state[11]]),
        3,
        "a waiting request is carried in format 3"
    );
    assert!(
        source.stderr().contains("are waiting for their lock"),
        "the source parked B's wait:\n{}",
        source.stderr()
    );

    // The destination shares the guest's memory, loads the state and starts the queues where
    // the source stopped them, while the source still holds its host copies of A's lock.
    let (mut dest, dest_socket) = lock_daemon(&fixture, "dest.sock");
    let mut dest_device = berth_frontend::VhostUserFs::connect_migrated(
        &dest_socket,
        test_config(1),
        device.ram().clone(),
        STARTUP_TIMEOUT,
    )
    .expect("connect to the destination");
    dest_device
        .load_device_state(&state)
        .unwrap_or_else(|e| panic!("load: {e}\n{}", dest.stderr()));
    dest_device
        .restart_queue(&hiprio, bases[0])
        .expect("start hiprio");
    dest_device
        .restart_queue(&queue, bases[1])
        .expect("start queue 1");
    drop(device);
    drop(source);

    // A's lock is taken again once the source is gone; B still waits behind it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dest.stderr().contains("Took the guest's") {
        assert!(
            std::time::Instant::now() < deadline,
            "the destination did not take A's lock again:\n{}",
            dest.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !dest.stderr().contains("Answered a lock request"),
        "B was answered while A holds the lock:\n{}",
        dest.stderr()
    );

    // A lets go through the destination: B's request is answered in its own chain.
    setlk(&mut queue, nodeid, fh_a, 7, (libc::F_UNLCK, 0, 99), flock).expect("A unlocks");
    let done = queue
        .wait_for(ticket)
        .unwrap_or_else(|e| panic!("B's reply: {e}\n{}", dest.stderr()));
    assert_eq!(done.unique, ticket.unique);
    let header = done.header.expect("a reply header");
    assert_eq!(header.error, 0, "B is granted the lock");
    assert_eq!(header.unique, ticket.unique);
    assert_eq!(done.used_len, 16);
    // The host sees B's lock, held by the destination.
    if flock {
        assert!(host_flock_refused(&file), "B's flock lock is held");
    } else {
        assert_eq!(host_lock_in_the_way(&file, 50, 1), libc::F_WRLCK);
    }
    assert!(
        dest.stderr().contains("Answered a lock request"),
        "{}",
        dest.stderr()
    );
    dest.assert_alive("after answering the migrated request");
}

#[test]
fn a_waiting_posix_lock_request_moves_to_the_destination() {
    if !testing_berth() {
        skip_by_design("berth's own state format");
        return;
    }
    a_waiting_lock_request_is_answered_by_the_destination(false);
}

#[test]
fn a_waiting_flock_request_moves_to_the_destination() {
    if !testing_berth() {
        skip_by_design("berth's own state format");
        return;
    }
    a_waiting_lock_request_is_answered_by_the_destination(true);
}

#[test]
fn a_waiting_request_with_a_head_out_of_range_is_refused() {
    if !testing_berth() {
        skip_by_design("berth's own state format");
        return;
    }
    let source = waiting_source(false);
    let mut state = source.state.clone();
    drop(source.device);
    // The waiting request is the stream's last record: queue, head, queue size, ...
    const RECORD: usize = 84;
    const HEADER: usize = 28;
    let head_at = state.len() - RECORD + 4;
    assert_eq!(
        u32::from_le_bytes(state[head_at - 4..head_at].try_into().unwrap()),
        1,
        "the record names queue 1"
    );
    state[head_at..head_at + 4].copy_from_slice(&64u32.to_le_bytes());
    let crc = crc32c::crc32c(&state[HEADER..]);
    state[24..28].copy_from_slice(&crc.to_le_bytes());
    let (mut dest, dest_socket) = lock_daemon(&source.fixture, "dest.sock");
    let mut dest_device = connect(&mut dest, &dest_socket, 1);
    assert!(dest_device.load_device_state(&state).is_err());
    let log = dest.stderr();
    assert!(
        log.contains("head index out of range"),
        "the refusal says why:\n{log}"
    );
    dest.assert_alive("after refusing the stream");
}

#[test]
fn a_waiting_lock_request_is_answered_after_a_pause() {
    if !testing_berth() {
        skip_by_design("berth's host-side locks (--posix-lock)");
        return;
    }
    // A paused VM (or a failed migration): the queues stop while B waits and start again
    // where they stopped, on the same daemon; B's wait resumes and is answered there.
    let WaitingSource {
        fixture,
        mut source,
        mut device,
        hiprio,
        mut queue,
        bases,
        nodeid,
        fh_a,
        ticket,
        ..
    } = waiting_source(false);
    let file = fixture.shared.join("hello.txt");
    device
        .restart_queue(&hiprio, bases[0])
        .expect("start hiprio");
    device
        .restart_queue(&queue, bases[1])
        .expect("start queue 1");
    setlk(&mut queue, nodeid, fh_a, 7, (libc::F_UNLCK, 0, 99), false).expect("A unlocks");
    let done = queue
        .wait_for(ticket)
        .unwrap_or_else(|e| panic!("B's reply: {e}\n{}", source.stderr()));
    let header = done.header.expect("a reply header");
    assert_eq!((header.error, header.unique), (0, ticket.unique));
    assert_eq!(host_lock_in_the_way(&file, 50, 1), libc::F_WRLCK);
    let log = source.stderr();
    assert!(
        !log.contains("were still being served"),
        "the stop did not wait for B:\n{log}"
    );
    source.assert_alive("after the pause");
}

#[test]
fn a_new_fuse_session_drops_a_resumed_lock_request() {
    if !testing_berth() {
        skip_by_design("berth's host-side locks (--posix-lock)");
        return;
    }
    let WaitingSource {
        fixture,
        source,
        device,
        hiprio,
        mut queue,
        bases,
        state,
        ticket,
        ..
    } = waiting_source(false);
    let (mut dest, dest_socket) = lock_daemon(&fixture, "dest.sock");
    let mut dest_device = berth_frontend::VhostUserFs::connect_migrated(
        &dest_socket,
        test_config(1),
        device.ram().clone(),
        STARTUP_TIMEOUT,
    )
    .expect("connect to the destination");
    dest_device.load_device_state(&state).expect("load");
    dest_device
        .restart_queue(&hiprio, bases[0])
        .expect("start hiprio");
    dest_device
        .restart_queue(&queue, bases[1])
        .expect("start queue 1");
    // The guest starts a new FUSE session (a reboot that skipped the device reset): what
    // the old one waited for is nobody's any more.
    queue.init_default().expect("FUSE_INIT");
    drop(device);
    drop(source);
    // The lock is free once the source is gone; B's chain must stay unanswered.
    queue.set_timeout(std::time::Duration::from_secs(2));
    assert!(
        queue.wait_for(ticket).is_err(),
        "a request of the old session was answered:\n{}",
        dest.stderr()
    );
    assert!(!dest.stderr().contains("Answered a lock request"));
    dest.assert_alive("after the new session");
}
