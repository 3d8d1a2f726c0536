//! DAX reclaim, driven by the repo's own frontend (which mmaps every SHMEM_MAP descriptor into
//! its window, as QEMU does, and would die of SIGBUS on a page past a file's end): when a
//! mapped file shrinks, whether through the guest's own SETATTR or OPEN O_TRUNC or through a
//! host process, the window pages it no longer reaches show zeros from berth's placeholder;
//! pages it reaches again show it again. The daemon runs with its default sandbox and
//! seccomp filter.

#[path = "common/frontend_util.rs"]
mod frontend_util;

use std::ffi::OsString;
use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_frontend::fuse::{setattr_valid, SetattrIn, ROOT_ID};
use berth_frontend::{FsQueue, ShmemMapping, ShmemWindow, VhostUserFs};
use frontend_util::*;

const MIB: u64 = 1 << 20;
const READ: u64 = 2;
const WRITE: u64 = 1;
const NO_HANDLE: u64 = u64::MAX;
/// Where the first test maps its file (not at the file offset, see `shape`).
const W: u64 = 16 * MIB;

fn page() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// Deterministic content distinct per file (`seed`) and per offset, never zero.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed) | 1)
        .collect()
}

struct Session {
    daemon: Daemon,
    device: VhostUserFs,
    queue: FsQueue,
    fixture: Fixture,
}

impl Session {
    fn start() -> Option<Session> {
        if !testing_berth() {
            eprintln!("skipping: the DAX window is berth's");
            return None;
        }
        let fixture = Fixture::new();
        let mut args = fixture.basic_args();
        args.extend(["--dax-window", "64M"].iter().map(OsString::from));
        let mut daemon = Daemon::spawn_with(args, |command| {
            command.env("RUST_LOG", "info");
        });
        daemon.wait_for_socket(&fixture.socket);
        let mut device = connect(&mut daemon, &fixture.socket, 1);
        let queue = init_first_queue(&mut device);
        Some(Session {
            daemon,
            device,
            queue,
            fixture,
        })
    }

    fn window(&self) -> Arc<ShmemWindow> {
        self.device
            .shmem_window()
            .expect("the daemon offers a DAX window")
            .clone()
    }

    fn file(&mut self, name: &str, content: &[u8]) -> u64 {
        fs::write(self.fixture.shared.join(name), content).unwrap();
        self.queue.lookup(ROOT_ID, name.as_bytes()).unwrap().nodeid
    }

    /// Disconnects and waits for the daemon's exit: what it logged.
    fn finish(self) -> String {
        let Session {
            mut daemon,
            device,
            queue,
            fixture: _fixture,
        } = self;
        drop(queue);
        drop(device);
        let status = daemon.wait_exit(Duration::from_secs(10));
        assert!(status.is_some(), "the daemon exits when the frontend goes");
        daemon.stderr()
    }
}

/// How the window shows a range mapped at `window_offset` whose file is `content` now: the
/// file's bytes where it reaches, zeros past its end (no fault in this process).
fn assert_window_shows(window: &ShmemWindow, window_offset: u64, len: u64, content: &[u8]) {
    let mut seen = vec![0xeeu8; len as usize];
    window.read(window_offset, &mut seen).unwrap();
    let below = content.len().min(seen.len());
    assert!(seen[..below] == content[..below], "the file's bytes");
    if let Some(past) = seen[below..].iter().position(|&b| b != 0) {
        panic!("byte {:#x} past the end is not zero", below + past);
    }
}

/// The window's pieces: (offset, len, whether from the placeholder). Placeholder pieces are
/// mapped at the file offset equal to their window offset; the tests map files at other
/// window offsets than file offsets, so file pieces never look like that.
fn shape(window: &ShmemWindow) -> Vec<(u64, u64, bool)> {
    window
        .mappings()
        .iter()
        .map(|m: &ShmemMapping| (m.offset, m.len, m.file_offset == m.offset))
        .collect()
}

/// Reads a counter from the daemon's exit line ("DAX window at exit: ... name=N ...").
fn exit_counter(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("DAX window at exit"))
        .unwrap_or_else(|| panic!("no exit metrics in:\n{log}"));
    let key = format!("{name}=");
    let at = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + key.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad {name} in {line}"))
}

#[test]
fn a_guest_truncation_repoints_before_the_file_shrinks() {
    let Some(mut s) = Session::start() else {
        return;
    };
    let window = s.window();
    let content = pattern(3, 8 * MIB as usize);
    let node = s.file("data", &content);
    s.queue
        .setupmapping(node, NO_HANDLE, 0, 8 * MIB, READ | WRITE, W)
        .unwrap();
    assert_eq!(shape(&window), vec![(W, 8 * MIB, false)]);
    // SETATTR to 3 MiB + 100 bytes: pages from the one after that on show the placeholder.
    let new_size = 3 * MIB + 100;
    s.queue
        .setattr(
            node,
            &SetattrIn {
                valid: setattr_valid::SIZE,
                size: new_size,
                ..Default::default()
            },
        )
        .unwrap();
    let reach = new_size.div_ceil(page()) * page();
    assert_eq!(
        shape(&window),
        vec![(W, reach, false), (W + reach, 8 * MIB - reach, true)]
    );
    assert_window_shows(&window, W, 8 * MIB, &content[..new_size as usize]);
    // The guest writes through the re-pointed part (QEMU maps it writable): only that window
    // offset sees it, and the file does not grow.
    window.write(W + 6 * MIB, b"scribble").unwrap();
    assert_eq!(
        fs::metadata(s.fixture.shared.join("data")).unwrap().len(),
        new_size
    );
    // The file grows again by FUSE WRITE (as a guest extends a file): its pages come back.
    let fh = s.queue.open(node, libc::O_RDWR as u32).unwrap().fh;
    let tail = pattern(9, MIB as usize);
    s.queue.write(node, fh, 5 * MIB, &tail[..4096]).unwrap();
    let mut grown = content[..new_size as usize].to_vec();
    grown.resize(5 * MIB as usize, 0);
    grown.extend_from_slice(&tail[..4096]);
    let reach = grown.len() as u64;
    assert_eq!(
        shape(&window),
        vec![(W, reach, false), (W + reach, 8 * MIB - reach, true)]
    );
    assert_window_shows(&window, W, 8 * MIB, &grown);
    // OPEN with O_TRUNC: nothing of the file is left in the window.
    s.queue
        .open(node, (libc::O_RDWR | libc::O_TRUNC) as u32)
        .unwrap();
    assert_eq!(shape(&window), vec![(W, 8 * MIB, true)]);
    assert_window_shows(&window, W, 8 * MIB, &[]);
    // Removing the range forgets what the guest wrote into the placeholder: a new range of
    // an empty file there reads zeros.
    s.queue.removemapping(node, &[(W, 8 * MIB)]).unwrap();
    let other = s.file("empty", &[]);
    s.queue
        .setupmapping(other, NO_HANDLE, 0, 8 * MIB, READ, W)
        .unwrap();
    assert_window_shows(&window, W, 8 * MIB, &[]);
    s.daemon.assert_alive("after the truncations");
    let log = s.finish();
    assert_eq!(exit_counter(&log, "repoints"), 2, "{log}");
    assert_eq!(exit_counter(&log, "restores"), 1, "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

/// Polls until the window's pieces are `expected` (the reclaim thread works on its own time).
fn wait_for_shape(window: &ShmemWindow, expected: &[(u64, u64, bool)], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while shape(window) != expected {
        assert!(
            Instant::now() < deadline,
            "{what}: the window stays {:?}",
            shape(window)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_host_truncation_is_seen_and_repointed() {
    let Some(mut s) = Session::start() else {
        return;
    };
    let window = s.window();
    let content = pattern(5, 4 * MIB as usize);
    let path = s.fixture.shared.join("data");
    let node = s.file("data", &content);
    s.queue
        .setupmapping(node, NO_HANDLE, 0, 4 * MIB, READ, 2 * MIB)
        .unwrap();
    let host = fs::OpenOptions::new().write(true).open(&path).unwrap();
    // The window is not read until the reclaim thread has re-pointed: reading it in between
    // would be exactly the race the README describes (SIGBUS in this process).
    let mut expected_repoints = 0;
    // Bytes of `content` the file still holds (what a shrink cut off comes back as zeros).
    let mut kept = content.len() as u64;
    for (round, size) in [MIB + 1, 3 * MIB, 0, 4 * MIB].into_iter().enumerate() {
        host.set_len(size).unwrap();
        kept = kept.min(size);
        let reach = size.div_ceil(page()) * page();
        let expected: Vec<_> = [
            (2 * MIB, reach, false),
            (2 * MIB + reach, 4 * MIB - reach, true),
        ]
        .into_iter()
        .filter(|&(_, len, _)| len > 0)
        .collect();
        wait_for_shape(
            &window,
            &expected,
            &format!("round {round}, size {size:#x}"),
        );
        let mut now = content[..kept as usize].to_vec();
        now.resize(size as usize, 0);
        assert_window_shows(&window, 2 * MIB, 4 * MIB, &now);
        if round != 1 && round != 3 {
            expected_repoints += 1;
        }
    }
    s.daemon.assert_alive("after host truncations");
    let log = s.finish();
    assert!(
        log.contains("A host process resized DAX-mapped files"),
        "{log}"
    );
    assert_eq!(exit_counter(&log, "repoints"), expected_repoints, "{log}");
    assert_eq!(exit_counter(&log, "restores"), 2, "{log}");
}

#[test]
fn a_forgotten_file_is_still_watched_until_its_range_goes() {
    let Some(mut s) = Session::start() else {
        return;
    };
    let window = s.window();
    let content = pattern(7, 2 * MIB as usize);
    let path = s.fixture.shared.join("data");
    let node = s.file("data", &content);
    s.queue
        .setupmapping(node, NO_HANDLE, 0, 2 * MIB, READ, 4 * MIB)
        .unwrap();
    // The guest forgets the file (its range stays, holding the file's descriptor).
    s.queue.forget(node, 1).unwrap();
    let host = fs::OpenOptions::new().write(true).open(&path).unwrap();
    host.set_len(page()).unwrap();
    wait_for_shape(
        &window,
        &[
            (4 * MIB, page(), false),
            (4 * MIB + page(), 2 * MIB - page(), true),
        ],
        "after a host truncation of a forgotten file",
    );
    assert_window_shows(&window, 4 * MIB, 2 * MIB, &content[..page() as usize]);
    s.queue.removemapping(node, &[(4 * MIB, 2 * MIB)]).unwrap();
    assert!(window.mappings().is_empty());
    s.daemon
        .assert_alive("after the forgotten file's range went");
}
