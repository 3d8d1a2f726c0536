//! The shared version table offered to a virtio-fs guest, driven by the repo's own frontend:
//! `--shared-cache` adds shared memory region 1 to GET_SHMEM_CONFIG and maps the table's
//! header and versions into it with SHMEM_MAP; FUSE_INIT negotiates the reply extension (flag
//! bit 62) and replies with attributes then carry each inode's slot and version. The versions
//! seen through the mapped region move after a change made through the daemon and after one
//! made by a host process. The daemon runs with its default sandbox and seccomp filter.

#[path = "common/frontend_util.rs"]
mod frontend_util;

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_frontend::fuse::{init_flags, opcode, setattr_valid, SetattrIn, ROOT_ID};
use berth_frontend::{FsQueue, ShmemWindow, VhostUserFs};
use berth_versions::wire::{VersionExt, INIT_SHARED_VERSIONS, VERSION_EXT_SIZE};
use frontend_util::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::ByteValued;

const ENTRY_OUT: usize = 128;
const ATTR_OUT: usize = 104;
const SLOTS: u64 = 4096;
/// Where slot versions start in the region (after the header page).
const VERSIONS_AT: u64 = 4096;

struct Session {
    daemon: Daemon,
    device: VhostUserFs,
    queue: FsQueue,
    fixture: Fixture,
}

impl Session {
    /// Starts the daemon with `extra` flags, connects, and sends FUSE_INIT offering `flags`.
    fn start(extra: &[&str], shared_cache: bool, flags: u64) -> (Session, u64) {
        let fixture = Fixture::new();
        let mut args = fixture.basic_args();
        if shared_cache {
            let table = fixture.root.path().join("versions.table");
            args.extend([
                OsString::from("--shared-cache"),
                "--version-table".into(),
                table.into(),
                "--version-slots".into(),
                SLOTS.to_string().into(),
            ]);
        }
        args.extend(extra.iter().map(OsString::from));
        let mut daemon = Daemon::spawn_with(args, |command| {
            command.env("RUST_LOG", "info");
        });
        daemon.wait_for_socket(&fixture.socket);
        let mut device = connect(&mut daemon, &fixture.socket, 1);
        let mut queue = device.take_request_queue(1).expect("request queue 1");
        let init = queue
            .init(flags | init_flags::INIT_EXT, 128 * 1024)
            .expect("FUSE_INIT");
        let enabled = u64::from(init.flags) | u64::from(init.flags2) << 32;
        (
            Session {
                daemon,
                device,
                queue,
                fixture,
            },
            enabled,
        )
    }

    /// LOOKUP `name` in the root with room for the extension: (node id, reply body).
    fn lookup(&mut self, name: &str) -> (u64, Vec<u8>) {
        let name = format!("{name}\0");
        let done = call(
            &mut self.queue,
            opcode::LOOKUP,
            ROOT_ID,
            &[name.as_bytes()],
            (ENTRY_OUT + VERSION_EXT_SIZE) as u32,
        )
        .expect("LOOKUP");
        let nodeid = u64::from_le_bytes(done.body[..8].try_into().unwrap());
        (nodeid, done.body)
    }

    fn region(&self) -> Arc<ShmemWindow> {
        self.device
            .shmem_region(1)
            .expect("the daemon offers region 1")
            .clone()
    }
}

/// The version of `slot` as a guest reads it from the mapped region.
fn version_in(region: &ShmemWindow, slot: u32) -> u64 {
    let mut bytes = [0u8; 8];
    region
        .read(VERSIONS_AT + 8 * u64::from(slot), &mut bytes)
        .expect("the versions are mapped");
    u64::from_le_bytes(bytes)
}

/// Waits (up to 10 s) until `done` holds.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn skip_unless_berth_as_root() -> bool {
    if !testing_berth() {
        eprintln!("skipping: the version table is berth's");
        return true;
    }
    if !running_as_root() {
        eprintln!("skipping: needs root (the default sandbox and fanotify)");
        return true;
    }
    false
}

#[test]
fn without_shared_cache_no_region_and_no_extension() {
    if skip_unless_berth_as_root() {
        return;
    }
    let (mut s, enabled) = Session::start(&[], false, INIT_SHARED_VERSIONS);
    assert!(!s
        .device
        .negotiated()
        .offered_protocol_features
        .contains(VhostUserProtocolFeatures::SHMEM));
    assert!(s.device.shmem_region(1).is_none());
    assert_eq!(enabled & INIT_SHARED_VERSIONS, 0, "{enabled:#x}");
    let (_, body) = s.lookup("hello.txt");
    assert_eq!(body.len(), ENTRY_OUT, "no extension without the table");
    s.daemon.assert_alive("after LOOKUP");
}

#[test]
fn region_1_holds_the_table_and_replies_carry_slots_when_negotiated() {
    if skip_unless_berth_as_root() {
        return;
    }
    // A client that does not ask for the extension: region 1 is there, replies are as before.
    let (mut plain, enabled) = Session::start(&["--watch-host", "off"], true, 0);
    assert_eq!(enabled & INIT_SHARED_VERSIONS, 0);
    assert!(plain.device.shmem_region(0).is_none(), "no DAX window");
    let (_, body) = plain.lookup("hello.txt");
    assert_eq!(body.len(), ENTRY_OUT);
    drop(plain);

    let (mut s, enabled) = Session::start(&["--watch-host", "off"], true, INIT_SHARED_VERSIONS);
    assert!(s
        .device
        .negotiated()
        .acked_protocol_features
        .contains(VhostUserProtocolFeatures::SHMEM));
    assert_ne!(enabled & INIT_SHARED_VERSIONS, 0, "{enabled:#x}");
    let region = s.region();
    assert!(region.size().is_power_of_two());
    assert!(region.size() >= VERSIONS_AT + 8 * SLOTS);
    // The mapping is made once the device has started (its first memory table).
    eventually("the table's SHMEM_MAP", || !region.mappings().is_empty());
    let mapping = region.mappings()[0];
    assert_eq!(mapping.offset, 0);
    assert_eq!(mapping.file_offset, 0);
    assert!(mapping.len >= VERSIONS_AT + 8 * SLOTS);
    assert!(!mapping.writable, "read-only asked for");
    let mut magic = [0u8; 8];
    region.read(0, &mut magic).unwrap();
    assert_eq!(&magic, b"BERTHVT\0");

    // LOOKUP: the entry, then the extension with the file's slot and current version.
    let (nodeid, body) = s.lookup("hello.txt");
    assert_eq!(body.len(), ENTRY_OUT + VERSION_EXT_SIZE);
    let ext = VersionExt::decode(&body[ENTRY_OUT..]).unwrap();
    assert!(u64::from(ext.slot) < SLOTS, "{ext:?}");
    assert_eq!(ext.version, version_in(&region, ext.slot));

    // GETATTR: the same slot.
    let getattr = [0u8; 16];
    let done = call(
        &mut s.queue,
        opcode::GETATTR,
        nodeid,
        &[&getattr],
        (ATTR_OUT + VERSION_EXT_SIZE) as u32,
    )
    .expect("GETATTR");
    assert_eq!(done.body.len(), ATTR_OUT + VERSION_EXT_SIZE);
    let attr_ext = VersionExt::decode(&done.body[ATTR_OUT..]).unwrap();
    assert_eq!(attr_ext.slot, ext.slot);

    // A change through the daemon moves the version the guest sees in the region, and the
    // reply says it is as new as the moved version.
    let setattr = SetattrIn {
        valid: setattr_valid::MODE,
        mode: libc::S_IFREG | 0o600,
        ..Default::default()
    };
    let done = call(
        &mut s.queue,
        opcode::SETATTR,
        nodeid,
        &[setattr.as_slice()],
        (ATTR_OUT + VERSION_EXT_SIZE) as u32,
    )
    .expect("SETATTR");
    let changed = VersionExt::decode(&done.body[ATTR_OUT..]).unwrap();
    assert_eq!(version_in(&region, ext.slot), ext.version + 1);
    assert_eq!(changed.version, ext.version + 1);

    // Creating a file moves the root directory's version.
    let (root_slot, root_before) = {
        let done = call(
            &mut s.queue,
            opcode::GETATTR,
            ROOT_ID,
            &[&getattr],
            (ATTR_OUT + VERSION_EXT_SIZE) as u32,
        )
        .expect("GETATTR /");
        let root = VersionExt::decode(&done.body[ATTR_OUT..]).unwrap();
        (root.slot, root.version)
    };
    let mut mkdir_in = Vec::new();
    mkdir_in.extend_from_slice(&0o755u32.to_le_bytes());
    mkdir_in.extend_from_slice(&0u32.to_le_bytes());
    let done = call(
        &mut s.queue,
        opcode::MKDIR,
        ROOT_ID,
        &[&mkdir_in, b"made-by-guest\0"],
        (ENTRY_OUT + VERSION_EXT_SIZE) as u32,
    )
    .expect("MKDIR");
    assert!(s.fixture.shared.join("made-by-guest").is_dir());
    assert_eq!(version_in(&region, root_slot), root_before + 1);
    let made = VersionExt::decode(&done.body[ENTRY_OUT..]).unwrap();
    assert_eq!(made.parent_version, root_before + 1);
    s.daemon.assert_alive("after the changes");

    // The exit log counts the requests served.
    drop(s.queue);
    s.device.disconnect();
    let status = s.daemon.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|st| st.success()), "{status:?}");
    let log = s.daemon.stderr();
    assert!(
        log.contains("FUSE requests served: total=") && log.contains("LOOKUP=1"),
        "{log}"
    );
}

#[test]
fn a_host_process_change_moves_the_version_in_region_1() {
    if skip_unless_berth_as_root() {
        return;
    }
    let (mut s, enabled) = Session::start(&["--watch-host", "auto"], true, INIT_SHARED_VERSIONS);
    assert_ne!(enabled & INIT_SHARED_VERSIONS, 0);
    let region = s.region();
    eventually("the table's SHMEM_MAP", || !region.mappings().is_empty());
    let (_, body) = s.lookup("hello.txt");
    let ext = VersionExt::decode(&body[ENTRY_OUT..]).unwrap();
    assert_ne!(ext.slot, u32::MAX, "a watched file gets a slot");
    assert_eq!(version_in(&region, ext.slot), ext.version);
    // chmod by a host process, not through the daemon.
    fs::set_permissions(
        s.fixture.shared.join("hello.txt"),
        fs::Permissions::from_mode(0o604),
    )
    .unwrap();
    eventually("the host watcher's bump", || {
        version_in(&region, ext.slot) != ext.version
    });
    s.daemon.assert_alive("after the host change");
}

#[test]
fn shared_cache_refuses_a_dax_window() {
    if skip_unless_berth_as_root() {
        return;
    }
    let fixture = Fixture::new();
    let mut args = fixture.basic_args();
    args.extend(["--shared-cache", "--dax-window", "64M"].map(OsString::from));
    let mut daemon = Daemon::spawn(args);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|st| !st.success()), "{status:?}");
    assert!(
        daemon
            .stderr()
            .contains("--shared-cache cannot be combined with --dax-window"),
        "{}",
        daemon.stderr()
    );
}
