//! `--dax-policy`: which files a guest mounted with `-o dax=inode` maps through the DAX window.
//! The repo's frontend offers FUSE_HAS_INODE_DAX in FUSE_INIT (as Linux does for `dax=inode`)
//! and reads FUSE_ATTR_DAX from every reply that carries attributes: LOOKUP, GETATTR, SETATTR,
//! CREATE, MKNOD and READDIRPLUS.

#[path = "common/frontend_util.rs"]
mod frontend_util;

use std::ffi::{CString, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use berth_frontend::fuse::{init_flags, setattr_valid, SetattrIn, ROOT_ID};
use berth_frontend::{FsQueue, VhostUserFs};
use frontend_util::*;

/// FUSE_HAS_INODE_DAX (`flags2` bit 1 of FUSE_INIT).
const HAS_INODE_DAX: u64 = 1 << 33;
/// FUSE_ATTR_DAX in `fuse_attr.flags`.
const ATTR_DAX: u32 = 1 << 1;
const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

struct Session {
    daemon: Daemon,
    _device: VhostUserFs,
    queue: FsQueue,
    fixture: Fixture,
    /// Whether FUSE_INIT's answer enabled FUSE_HAS_INODE_DAX.
    inode_dax_enabled: bool,
}

impl Session {
    /// A daemon with `extra` arguments, initialised by a guest that offers (or not) per-file
    /// DAX; `prepare` fills the share first.
    fn start(extra: &[&str], offer_inode_dax: bool, prepare: impl FnOnce(&Path)) -> Session {
        let fixture = Fixture::new();
        prepare(&fixture.shared);
        let mut args = fixture.basic_args();
        args.extend(extra.iter().map(OsString::from));
        let mut daemon = Daemon::spawn(args);
        daemon.wait_for_socket(&fixture.socket);
        let mut device = connect(&mut daemon, &fixture.socket, 1);
        let mut queue = device
            .take_request_queue(1)
            .expect("request queue 1 exists");
        let mut flags = init_flags::DEFAULT;
        if offer_inode_dax {
            flags |= HAS_INODE_DAX | init_flags::INIT_EXT;
        }
        let init = queue.init(flags, 128 * 1024).expect("FUSE_INIT");
        let enabled = u64::from(init.flags) | (u64::from(init.flags2) << 32);
        Session {
            daemon,
            _device: device,
            queue,
            fixture,
            inode_dax_enabled: enabled & HAS_INODE_DAX != 0,
        }
    }

    /// Whether LOOKUP of `name` in the share's root says DAX.
    fn lookup_says_dax(&mut self, name: &str) -> bool {
        let entry = self.queue.lookup(ROOT_ID, name.as_bytes()).expect("LOOKUP");
        entry.attr.flags & ATTR_DAX != 0
    }

    /// Whether GETATTR of `name` says DAX.
    fn getattr_says_dax(&mut self, name: &str) -> bool {
        let node = self.queue.lookup(ROOT_ID, name.as_bytes()).unwrap().nodeid;
        self.queue.getattr(node).expect("GETATTR").attr.flags & ATTR_DAX != 0
    }

    /// The names READDIRPLUS of the root marks DAX, sorted.
    fn readdirplus_dax_names(&mut self) -> Vec<String> {
        let dir = self.queue.opendir(ROOT_ID).expect("OPENDIR");
        let entries = self
            .queue
            .readdirplus(ROOT_ID, dir.fh, 0, 64 * 1024)
            .expect("READDIRPLUS");
        self.queue.releasedir(ROOT_ID, dir.fh).expect("RELEASEDIR");
        let mut names: Vec<String> = entries
            .iter()
            .filter(|e| e.entry.nodeid != 0 && e.entry.attr.flags & ATTR_DAX != 0)
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect();
        names.sort();
        names
    }
}

fn skip_unless_berth() -> bool {
    if !testing_berth() {
        eprintln!("skipping: --dax-policy is berth's");
        return true;
    }
    false
}

fn sized_files(dir: &Path) {
    fs::write(dir.join("small"), vec![1u8; 4 * KIB]).unwrap();
    fs::write(dir.join("just-below"), vec![2u8; MIB - 1]).unwrap();
    fs::write(dir.join("exactly"), vec![3u8; MIB]).unwrap();
    fs::write(dir.join("large"), vec![4u8; 3 * MIB]).unwrap();
    std::os::unix::fs::symlink("large", dir.join("link-to-large")).unwrap();
}

/// Sets a user extended attribute on a host file; false where the filesystem has none.
fn set_user_xattr(path: &Path, name: &str, value: &[u8]) -> bool {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the given length; result checked.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    r == 0
}

#[test]
fn with_a_window_every_regular_file_is_dax_by_default() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&["--dax-window", "64M"], true, sized_files);
    assert!(s.inode_dax_enabled, "FUSE_HAS_INODE_DAX negotiated");
    for name in ["small", "just-below", "exactly", "large", "hello.txt"] {
        assert!(s.lookup_says_dax(name), "LOOKUP {name}: DAX");
        assert!(s.getattr_says_dax(name), "GETATTR {name}: DAX");
    }
    assert!(!s.lookup_says_dax("sub"), "a directory is never DAX");
    assert!(
        !s.lookup_says_dax("link-to-large"),
        "a symlink is never DAX"
    );
    assert!(!s.getattr_says_dax("sub"), "GETATTR of a directory");
    // New files, by CREATE and MKNOD.
    let (created, open) = s
        .queue
        .create(
            ROOT_ID,
            b"created",
            libc::S_IFREG | 0o644,
            libc::O_RDWR as u32,
        )
        .expect("CREATE");
    assert!(created.attr.flags & ATTR_DAX != 0, "CREATE: DAX");
    s.queue.release(created.nodeid, open.fh, 0).unwrap();
    let made = s
        .queue
        .mknod(ROOT_ID, b"made", libc::S_IFREG | 0o644, 0)
        .expect("MKNOD");
    assert!(made.attr.flags & ATTR_DAX != 0, "MKNOD: DAX");
    let mut expected = vec![
        "big.bin",
        "created",
        "exactly",
        "hello.txt",
        "just-below",
        "large",
        "made",
        "mode640.txt",
        "small",
    ];
    expected.sort();
    assert_eq!(s.readdirplus_dax_names(), expected, "READDIRPLUS");
    s.daemon.assert_alive("after the DAX policy checks");
}

#[test]
fn size_policy_marks_files_of_at_least_the_size() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(
        &["--dax-window", "64M", "--dax-policy", "size:1M"],
        true,
        sized_files,
    );
    assert!(s.inode_dax_enabled);
    assert!(!s.lookup_says_dax("small"));
    assert!(!s.lookup_says_dax("just-below"));
    assert!(s.lookup_says_dax("exactly"));
    assert!(s.lookup_says_dax("large"));
    assert!(!s.lookup_says_dax("link-to-large"));
    assert_eq!(s.readdirplus_dax_names(), vec!["exactly", "large"]);
    // The attributes follow the file: grown on the host, GETATTR says DAX; truncated below
    // the size through SETATTR, the reply says not.
    fs::write(s.fixture.shared.join("small"), vec![9u8; 2 * MIB]).unwrap();
    assert!(s.getattr_says_dax("small"), "a file grown past the size");
    let node = s.queue.lookup(ROOT_ID, b"large").unwrap().nodeid;
    let shrink = SetattrIn {
        valid: setattr_valid::SIZE,
        size: 100,
        ..Default::default()
    };
    let after = s.queue.setattr(node, &shrink).expect("SETATTR size");
    assert_eq!(after.attr.size, 100);
    assert_eq!(
        after.attr.flags & ATTR_DAX,
        0,
        "SETATTR reply of a shrunk file"
    );
}

#[test]
fn xattr_policy_marks_files_whose_host_attribute_is_one() {
    if skip_unless_berth() {
        return;
    }
    let mut usable = true;
    let mut s = Session::start(
        &["--dax-window", "64M", "--dax-policy", "xattr"],
        true,
        |dir| {
            sized_files(dir);
            usable = set_user_xattr(&dir.join("small"), "user.berth.dax", b"1")
                && set_user_xattr(&dir.join("large"), "user.berth.dax", b"0")
                && set_user_xattr(&dir.join("exactly"), "user.berth.dax", b"10")
                && set_user_xattr(&dir.join("sub"), "user.berth.dax", b"1");
        },
    );
    if !usable {
        eprintln!("skipping: the temporary directory's filesystem has no user xattrs");
        return;
    }
    assert!(s.inode_dax_enabled);
    assert!(s.lookup_says_dax("small"), "value 1");
    assert!(!s.lookup_says_dax("large"), "value 0");
    assert!(!s.lookup_says_dax("exactly"), "value 10");
    assert!(!s.lookup_says_dax("just-below"), "no attribute");
    assert!(!s.lookup_says_dax("sub"), "a directory, even marked");
    assert_eq!(s.readdirplus_dax_names(), vec!["small"]);
    // Marked later on the host: the next GETATTR says so (the guest re-reads the inode).
    assert!(set_user_xattr(
        &s.fixture.shared.join("hello.txt"),
        "user.berth.dax",
        b"1"
    ));
    assert!(s.getattr_says_dax("hello.txt"));
}

#[test]
fn never_or_a_guest_without_inode_dax_gets_no_flag() {
    if skip_unless_berth() {
        return;
    }
    let mut never = Session::start(
        &["--dax-window", "64M", "--dax-policy", "never"],
        true,
        sized_files,
    );
    assert!(!never.inode_dax_enabled, "never: HAS_INODE_DAX not enabled");
    assert!(!never.lookup_says_dax("large"));
    assert!(never.readdirplus_dax_names().is_empty());

    // A `dax=always` (or no-dax) guest does not offer HAS_INODE_DAX: no flags either.
    let mut plain = Session::start(&["--dax-window", "64M"], false, sized_files);
    assert!(!plain.inode_dax_enabled);
    assert!(!plain.lookup_says_dax("large"));
    assert!(!plain.getattr_says_dax("large"));
}

#[test]
fn without_a_window_there_is_no_flag_and_the_policy_is_reported_idle() {
    if skip_unless_berth() {
        return;
    }
    let mut s = Session::start(&["--dax-policy", "always"], true, sized_files);
    assert!(!s.inode_dax_enabled, "no window: HAS_INODE_DAX not enabled");
    assert!(!s.lookup_says_dax("large"));
    assert!(!s.getattr_says_dax("large"));
    let stderr = s.daemon.stderr();
    assert!(
        stderr.contains("--dax-policy has no effect without a DAX window"),
        "the daemon warns that the policy is idle: {stderr}"
    );
}

#[test]
fn bad_policies_are_refused_with_a_reason() {
    if skip_unless_berth() {
        return;
    }
    let (binary, _) = daemon_binary();
    for (policy, reason) in [
        ("sometimes", "unknown DAX policy 'sometimes'"),
        ("size:", "needs a size in bytes"),
        ("size:1T", "needs a size in bytes"),
        ("size:-1", "needs a size in bytes"),
        ("size:99999999999999999999", "needs a size in bytes"),
        ("size:20000000000G", "needs a size in bytes"),
        ("Always", "unknown DAX policy 'Always'"),
    ] {
        let fixture = Fixture::new();
        let mut args = fixture.basic_args();
        args.extend(["--dax-window", "64M", "--dax-policy", policy].map(OsString::from));
        let mut child = std::process::Command::new(&binary)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run the daemon");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "--dax-policy {policy}: the daemon did not refuse it"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!status.success(), "--dax-policy {policy} refused");
        assert!(
            stderr.contains(reason) && stderr.contains("--dax-policy"),
            "--dax-policy {policy}: stderr names the option and '{reason}': {stderr}"
        );
        assert!(
            !fixture.socket.exists(),
            "no socket for a refused command line"
        );
    }
}
