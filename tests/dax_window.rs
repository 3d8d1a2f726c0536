//! The DAX window over vhost-user, driven by the repo's own frontend: `--dax-window` offers
//! protocol feature SHMEM and a region 0 of that size; FUSE_SETUPMAPPING / REMOVEMAPPING become
//! SHMEM_MAP / SHMEM_UNMAP, which the frontend carries out by mmapping the passed descriptor
//! into its window, as QEMU does. The daemon runs with its default sandbox and seccomp filter.

#[path = "common/frontend_util.rs"]
mod frontend_util;

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use berth_frontend::fuse::ROOT_ID;
use berth_frontend::{FsQueue, ShmemMapping, ShmemWindow, VhostUserFs};
use frontend_util::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

const MIB: u64 = 1 << 20;
const WINDOW: u64 = 64 * MIB;
const READ: u64 = 2;
const WRITE: u64 = 1;
const NO_HANDLE: u64 = u64::MAX;

/// Deterministic content distinct per file (`seed`) and per offset.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

struct Session {
    daemon: Daemon,
    device: VhostUserFs,
    queue: FsQueue,
    fixture: Fixture,
}

impl Session {
    fn start(extra: &[&str]) -> Session {
        let fixture = Fixture::new();
        let mut args = fixture.basic_args();
        args.extend(extra.iter().map(OsString::from));
        let mut daemon = Daemon::spawn_with(args, |command| {
            command.env("RUST_LOG", "info");
        });
        daemon.wait_for_socket(&fixture.socket);
        let mut device = connect(&mut daemon, &fixture.socket, 1);
        let queue = init_first_queue(&mut device);
        Session {
            daemon,
            device,
            queue,
            fixture,
        }
    }

    fn window(&self) -> Arc<ShmemWindow> {
        self.device
            .shmem_window()
            .expect("the daemon offers a DAX window")
            .clone()
    }

    /// Writes `shared/name` on the host and looks it up: its node id.
    fn file(&mut self, name: &str, content: &[u8]) -> u64 {
        fs::write(self.fixture.shared.join(name), content).unwrap();
        self.queue.lookup(ROOT_ID, name.as_bytes()).unwrap().nodeid
    }

    fn errno_of(&mut self, result: Result<(), berth_frontend::Error>) -> i32 {
        result.expect_err("refused").errno().expect("a FUSE error")
    }
}

fn skip_unless_berth() -> bool {
    if !testing_berth() {
        eprintln!("skipping: the DAX window is berth's");
        return true;
    }
    false
}

#[test]
fn without_a_window_nothing_is_offered_and_mappings_are_enosys() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&[]);
    assert!(!s
        .device
        .negotiated()
        .offered_protocol_features
        .contains(VhostUserProtocolFeatures::SHMEM));
    assert!(s.device.shmem_window().is_none());
    let node = s.file("f", &pattern(1, 4096));
    let r = s.queue.setupmapping(node, NO_HANDLE, 0, 2 * MIB, READ, 0);
    assert_eq!(s.errno_of(r), libc::ENOSYS);
}

#[test]
fn bytes_move_both_ways_between_the_file_and_the_window() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&["--dax-window", "64M"]);
    assert!(s
        .device
        .negotiated()
        .acked_protocol_features
        .contains(VhostUserProtocolFeatures::SHMEM));
    let window = s.window();
    assert_eq!(window.size(), WINDOW);
    let content = pattern(7, 4 * MIB as usize);
    let node = s.file("data", &content);
    s.queue
        .setupmapping(node, NO_HANDLE, 0, 4 * MIB, READ | WRITE, 2 * MIB)
        .expect("SETUPMAPPING");
    assert_eq!(
        window.mappings(),
        vec![ShmemMapping {
            offset: 2 * MIB,
            len: 4 * MIB,
            file_offset: 0,
            writable: true
        }]
    );
    // The file's bytes, read through the window.
    let mut seen = vec![0u8; content.len()];
    window.read(2 * MIB, &mut seen).unwrap();
    assert!(seen == content, "the window shows the file");
    // A write through the window lands in the host file.
    window
        .write(2 * MIB + 12_345, b"through the window")
        .unwrap();
    let host = fs::read(s.fixture.shared.join("data")).unwrap();
    assert_eq!(&host[12_345..12_345 + 18], b"through the window");
    // A host write, and a FUSE WRITE, show in the window.
    let file = fs::OpenOptions::new()
        .write(true)
        .open(s.fixture.shared.join("data"))
        .unwrap();
    file.write_all_at(b"from the host", 3 * MIB).unwrap();
    let mut buf = [0u8; 13];
    window.read(5 * MIB, &mut buf).unwrap();
    assert_eq!(&buf, b"from the host");
    let fh = s.queue.open(node, libc::O_RDWR as u32).unwrap().fh;
    s.queue.write(node, fh, 100, b"by FUSE_WRITE").unwrap();
    window.read(2 * MIB + 100, &mut buf).unwrap();
    assert_eq!(&buf, b"by FUSE_WRITE");
    // A mapping made with the guest's open handle works the same.
    s.queue
        .setupmapping(node, fh, 2 * MIB, 2 * MIB, READ, 10 * MIB)
        .expect("SETUPMAPPING with a handle");
    let mut tail = vec![0u8; 64];
    window.read(10 * MIB, &mut tail).unwrap();
    assert_eq!(tail, content[2 * MIB as usize..2 * MIB as usize + 64]);
    s.queue.removemapping(node, &[(2 * MIB, 4 * MIB)]).unwrap();
    assert_eq!(window.mappings().len(), 1);
    s.daemon
        .assert_alive("after mapping under the default seccomp filter");
}

#[test]
fn refusals_carry_their_errno_and_map_nothing() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&["--dax-window", "64M"]);
    let window = s.window();
    let node = s.file("data", &pattern(3, 8 * MIB as usize));
    let dir = s.queue.lookup(ROOT_ID, b"sub").unwrap().nodeid;
    let read_only_fh = s.queue.open(node, libc::O_RDONLY as u32).unwrap().fh;
    let cases: Vec<(&str, u64, u64, u64, u64, u64, u64, i32)> = vec![
        // what, node, fh, file offset, len, flags, window offset, errno
        (
            "past the window",
            node,
            NO_HANDLE,
            0,
            2 * MIB,
            READ,
            WINDOW,
            libc::EINVAL,
        ),
        (
            "across the end",
            node,
            NO_HANDLE,
            0,
            4 * MIB,
            READ,
            WINDOW - 2 * MIB,
            libc::EINVAL,
        ),
        (
            "misaligned in the window",
            node,
            NO_HANDLE,
            0,
            2 * MIB,
            READ,
            MIB,
            libc::EINVAL,
        ),
        (
            "not whole 2 MiB",
            node,
            NO_HANDLE,
            0,
            MIB,
            READ,
            0,
            libc::EINVAL,
        ),
        (
            "file offset not page-aligned",
            node,
            NO_HANDLE,
            100,
            2 * MIB,
            READ,
            0,
            libc::EINVAL,
        ),
        ("no access", node, NO_HANDLE, 0, 2 * MIB, 0, 0, libc::EINVAL),
        (
            "unknown flag",
            node,
            NO_HANDLE,
            0,
            2 * MIB,
            READ | 8,
            0,
            libc::EINVAL,
        ),
        (
            "unknown handle",
            node,
            987_654,
            0,
            2 * MIB,
            READ,
            0,
            libc::EBADF,
        ),
        (
            "writable, file opened read-only",
            node,
            read_only_fh,
            0,
            2 * MIB,
            READ | WRITE,
            0,
            libc::EACCES,
        ),
        (
            "a directory",
            dir,
            NO_HANDLE,
            0,
            2 * MIB,
            READ,
            0,
            libc::EINVAL,
        ),
        (
            "an unknown node",
            424_242,
            NO_HANDLE,
            0,
            2 * MIB,
            READ,
            0,
            libc::EBADF,
        ),
    ];
    for (what, node, fh, file_offset, len, flags, window_offset, errno) in cases {
        let r = s
            .queue
            .setupmapping(node, fh, file_offset, len, flags, window_offset);
        assert_eq!(s.errno_of(r), errno, "{what}");
    }
    assert!(window.messages().is_empty(), "nothing reached the VMM");
    // Removals: each range is checked before any is unmapped.
    s.queue
        .setupmapping(node, NO_HANDLE, 0, 2 * MIB, READ, 0)
        .unwrap();
    let r = s.queue.removemapping(node, &[(0, 2 * MIB), (MIB, MIB)]);
    assert_eq!(s.errno_of(r), libc::EINVAL);
    let r = s
        .queue
        .removemapping(node, &[(0, 2 * MIB), (WINDOW, 2 * MIB)]);
    assert_eq!(s.errno_of(r), libc::EINVAL);
    assert_eq!(window.mappings().len(), 1);
    s.daemon.assert_alive("after the refusals");
}

#[test]
fn a_read_only_share_maps_read_only() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&["--dax-window", "64M", "--readonly"]);
    let window = s.window();
    let node = s.file("data", &pattern(5, 2 * MIB as usize));
    let r = s
        .queue
        .setupmapping(node, NO_HANDLE, 0, 2 * MIB, READ | WRITE, 0);
    assert_eq!(s.errno_of(r), libc::EROFS);
    s.queue
        .setupmapping(node, NO_HANDLE, 0, 2 * MIB, READ, 0)
        .unwrap();
    assert!(!window.mappings()[0].writable);
    assert!(window.write(0, b"x").is_err(), "no writable mapping");
    let mut buf = vec![0u8; 4096];
    window.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(5, 4096));
}

#[test]
fn overlapping_setups_replace_and_partial_removals_split() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&["--dax-window", "64M"]);
    let window = s.window();
    let a = pattern(11, 8 * MIB as usize);
    let b = pattern(22, 2 * MIB as usize);
    let node_a = s.file("a", &a);
    let node_b = s.file("b", &b);
    s.queue
        .setupmapping(node_a, NO_HANDLE, 0, 8 * MIB, READ, 0)
        .unwrap();
    s.queue
        .setupmapping(node_b, NO_HANDLE, 0, 2 * MIB, READ, 2 * MIB)
        .unwrap();
    let shape: Vec<_> = window
        .mappings()
        .iter()
        .map(|m| (m.offset / MIB, m.len / MIB, m.file_offset / MIB))
        .collect();
    assert_eq!(shape, vec![(0, 2, 0), (2, 2, 0), (4, 4, 4)]);
    // The VMM was asked to unmap the whole first mapping, never a part of one.
    let messages = window.messages();
    assert_eq!(messages[1], (false, 0, 8 * MIB), "{messages:?}");
    let check = |offset: u64, expected: &[u8]| {
        let mut seen = vec![0u8; 4096];
        window.read(offset, &mut seen).unwrap();
        assert!(seen == expected[..4096], "window offset {offset:#x}");
    };
    check(0, &a[..]);
    check(2 * MIB, &b[..]);
    check(5 * MIB, &a[5 * MIB as usize..]);
    // Remove the middle of the last piece and the replacement.
    s.queue
        .removemapping(node_a, &[(6 * MIB, 2 * MIB), (2 * MIB, 2 * MIB)])
        .unwrap();
    let shape: Vec<_> = window
        .mappings()
        .iter()
        .map(|m| (m.offset / MIB, m.len / MIB, m.file_offset / MIB))
        .collect();
    assert_eq!(shape, vec![(0, 2, 0), (4, 2, 4)]);
    check(4 * MIB, &a[4 * MIB as usize..]);
    assert!(window.read(2 * MIB, &mut [0u8; 1]).is_err());
    // Removing space that holds nothing is fine.
    s.queue
        .removemapping(node_a, &[(20 * MIB, 2 * MIB)])
        .unwrap();
    assert_eq!(window.mappings().len(), 2);
}

#[test]
fn mappings_go_with_the_session() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&["--dax-window", "64M"]);
    let window = s.window();
    let node = s.file("data", &pattern(9, 4 * MIB as usize));
    let map = |s: &mut Session, node: u64| {
        s.queue
            .setupmapping(node, NO_HANDLE, 0, 4 * MIB, READ, 0)
            .unwrap();
        assert_eq!(window.mappings().len(), 1);
    };
    // A new INIT on a live session (a rebooted guest).
    map(&mut s, node);
    s.queue.init_default().unwrap();
    assert!(window.mappings().is_empty(), "a new session starts empty");
    // DESTROY (the guest unmounts).
    let node = s.queue.lookup(ROOT_ID, b"data").unwrap().nodeid;
    map(&mut s, node);
    s.queue.destroy().unwrap();
    assert!(window.mappings().is_empty(), "DESTROY unmaps everything");
    // A device reset: the rebooted guest's INIT unmaps what the old one left.
    s.queue.init_default().unwrap();
    let node = s.queue.lookup(ROOT_ID, b"data").unwrap().nodeid;
    map(&mut s, node);
    s.device.reset_device().unwrap();
    let mut queue = s.device.take_request_queue(1).unwrap();
    queue.init_default().unwrap();
    assert!(window.mappings().is_empty(), "nothing survives the reset");
    let log = s.daemon.stderr();
    assert!(log.contains("unmapped 1 DAX window ranges"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    s.daemon.assert_alive("after the sessions");
}
