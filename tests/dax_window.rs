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
            writable: true,
            descriptor_writable: true,
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

/// A SETUPMAPPING the daemon must refuse, and the errno it must give.
#[derive(Clone, Copy)]
struct Refusal {
    what: &'static str,
    node: u64,
    fh: u64,
    file_offset: u64,
    len: u64,
    flags: u64,
    window_offset: u64,
    errno: i32,
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
    // A valid request; each case changes one thing.
    let base = Refusal {
        what: "",
        node,
        fh: NO_HANDLE,
        file_offset: 0,
        len: 2 * MIB,
        flags: READ,
        window_offset: 0,
        errno: libc::EINVAL,
    };
    let cases = [
        Refusal {
            what: "past the window",
            window_offset: WINDOW,
            ..base
        },
        Refusal {
            what: "across the end",
            len: 4 * MIB,
            window_offset: WINDOW - 2 * MIB,
            ..base
        },
        Refusal {
            what: "misaligned in the window",
            window_offset: MIB,
            ..base
        },
        Refusal {
            what: "not whole 2 MiB",
            len: MIB,
            ..base
        },
        Refusal {
            what: "file offset not page-aligned",
            file_offset: 100,
            ..base
        },
        Refusal {
            what: "no access",
            flags: 0,
            ..base
        },
        Refusal {
            what: "unknown flag",
            flags: READ | 8,
            ..base
        },
        Refusal {
            what: "unknown handle",
            fh: 987_654,
            errno: libc::EBADF,
            ..base
        },
        Refusal {
            what: "writable, file opened read-only",
            fh: read_only_fh,
            flags: READ | WRITE,
            errno: libc::EACCES,
            ..base
        },
        Refusal {
            what: "a directory",
            node: dir,
            ..base
        },
        Refusal {
            what: "an unknown node",
            node: 424_242,
            errno: libc::EBADF,
            ..base
        },
    ];
    for case in cases {
        let r = s.queue.setupmapping(
            case.node,
            case.fh,
            case.file_offset,
            case.len,
            case.flags,
            case.window_offset,
        );
        assert_eq!(s.errno_of(r), case.errno, "{}", case.what);
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
    assert!(!window.mappings()[0].descriptor_writable);
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
    // QEMU 11.1 maps every range writable: read mappings on a writable share come with
    // read-write descriptors too (remainders of a split mapping included).
    assert!(window
        .mappings()
        .iter()
        .all(|m| !m.writable && m.descriptor_writable));
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

#[test]
fn pool_threads_map_under_their_own_filter() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&["--dax-window", "64M", "--thread-pool-size", "2"]);
    let window = s.window();
    let content = pattern(13, 2 * MIB as usize);
    let node = s.file("data", &content);
    s.queue
        .setupmapping(node, NO_HANDLE, 0, 2 * MIB, READ | WRITE, 4 * MIB)
        .expect("SETUPMAPPING from a pool thread");
    let mut seen = vec![0u8; content.len()];
    window.read(4 * MIB, &mut seen).unwrap();
    assert!(seen == content, "the window shows the file");
    s.queue.removemapping(node, &[(4 * MIB, 2 * MIB)]).unwrap();
    assert!(window.mappings().is_empty());
    s.daemon.assert_alive("after mapping from the pool");
}

#[test]
fn a_forgotten_file_stays_mapped_until_removed() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&["--dax-window", "64M"]);
    let window = s.window();
    let content = pattern(17, 2 * MIB as usize);
    let node = s.file("data", &content);
    let fh = s.queue.open(node, libc::O_RDONLY as u32).unwrap().fh;
    s.queue.setupmapping(node, fh, 0, 2 * MIB, READ, 0).unwrap();
    // The guest closes and forgets the file, and it goes from the host directory too.
    s.queue.release(node, fh, libc::O_RDONLY as u32).unwrap();
    s.queue.forget(node, 1).unwrap();
    fs::remove_file(s.fixture.shared.join("data")).unwrap();
    let mut seen = vec![0u8; content.len()];
    window.read(0, &mut seen).unwrap();
    assert!(seen == content, "the mapping still shows the file");
    // The node itself is gone: a new mapping of it has nothing to open.
    s.queue
        .setupmapping(node, NO_HANDLE, 0, 2 * MIB, READ, 2 * MIB)
        .expect_err("the forgotten node cannot be opened");
    assert_eq!(window.mappings().len(), 1);
    s.queue.removemapping(node, &[(0, 2 * MIB)]).unwrap();
    assert!(window.mappings().is_empty());
}

/// A guest with window ranges mapped cannot be migrated: the save is refused (the VMM then
/// cancels the migration and the guest runs on), saying why; once the guest has unmapped
/// them the state saves.
#[test]
fn a_guest_with_mapped_ranges_is_not_migrated() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&["--dax-window", "64M"]);
    let node = s.file("data", &pattern(3, 4 * MIB as usize));
    s.queue
        .setupmapping(node, NO_HANDLE, 0, 4 * MIB, READ, 2 * MIB)
        .expect("SETUPMAPPING");
    let bases = s.device.stop_queues().expect("stop the queues");
    let refused = s.device.save_device_state();
    assert!(refused.is_err(), "saved a guest with a mapped range");
    let log = s.daemon.stderr();
    assert!(
        log.contains("the guest has 1 ranges of the DAX window mapped"),
        "{log}"
    );
    // The guest runs on, unmaps, and then it can move.
    s.device.restart_queue(&s.queue, bases[1]).expect("restart");
    s.queue
        .removemapping(node, &[(2 * MIB, 4 * MIB)])
        .expect("REMOVEMAPPING");
    s.device.stop_queues().expect("stop the queues");
    let state = s.device.save_device_state().expect("save after the unmap");
    assert!(!state.is_empty());
    s.daemon
        .assert_alive("after the refused and the accepted save");
}

/// `--metrics-file`: the window's use and the VMM's round trips, and the FUSE requests by
/// opcode, rewritten while the daemon runs (here every second), from inside its sandbox.
#[test]
fn the_metrics_file_shows_the_window_and_the_requests() {
    if skip_unless_berth() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("berth.prom");
    let file_arg = file.to_str().unwrap().to_owned();
    let mut s = Session::start(&[
        "--dax-window",
        "64M",
        "--metrics-file",
        &file_arg,
        "--metrics-interval",
        "1",
    ]);
    let node = s.file("data", &pattern(5, 4 * MIB as usize));
    s.queue
        .setupmapping(node, NO_HANDLE, 0, 4 * MIB, READ, 0)
        .expect("SETUPMAPPING");
    let refused = s.queue.setupmapping(node, NO_HANDLE, 0, 4 * MIB, READ, 3);
    assert!(refused.is_err(), "an unaligned window offset was mapped");
    let wanted = [
        "berth_dax_window_bytes 67108864",
        "berth_dax_mapped_bytes 4194304",
        "berth_dax_live_ranges 1",
        "berth_dax_maps_total 1",
        "berth_dax_refused_total 1",
        "berth_dax_map_wait_seconds_count 1",
        "berth_fs_requests_total{opcode=\"SETUPMAPPING\"} 2",
        "berth_fs_requests_total{opcode=\"LOOKUP\"} 1",
        "# TYPE berth_dax_map_wait_seconds summary",
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut text = String::new();
    while std::time::Instant::now() < deadline {
        text = fs::read_to_string(&file).unwrap_or_default();
        if wanted.iter().all(|line| text.lines().any(|l| l == *line)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for line in wanted {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    s.daemon.assert_alive("while writing metrics");
}
