//! A hostile guest trying to reach host files outside the shared directory, against the real
//! daemon with its defaults (namespace sandbox, seccomp kill) over vhost-user, where the test
//! controls raw names, node ids and file handles; and through the host /dev/fuse mount where a
//! userspace view is the natural one (`..` out of a bind mount). Every attempt must fail, and
//! each test checks both the reply and the host: nothing outside was read, written, created or
//! changed.
//!
//! Outside the share each fixture keeps `outside/secret` (standing in for /etc/shadow) and an
//! empty `outside/` directory that must stay empty.

// Both helpers include the shared skip module on their own; the copies are identical.
#![allow(clippy::duplicate_mod)]

#[path = "common/frontend_util.rs"]
mod frontend_util;
#[path = "common/fuse_mount.rs"]
mod fuse_mount;
#[path = "common/security_util.rs"]
mod security_util;

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use berth_frontend::fuse::{kill_priv, opcode, setattr_valid, SetattrIn, ROOT_ID};
use berth_frontend::fuse::{CopyFileRangeIn, SetxattrIn};
use berth_frontend::EntryOut;
use berth_frontend::FsQueue;
use frontend_util::*;
use security_util::*;
use vm_memory::ByteValued;

const SECRET: &[u8] = b"root:$6$secret-hash:19000:0:99999:7:::\n";
const FUSE_ATTR_SUBMOUNT: u32 = 1;
const SETXATTR: u32 = 21;
const COPY_FILE_RANGE: u32 = 47;

/// A share plus, beside it, what a guest must never reach.
struct Escape {
    fixture: Fixture,
    outside: PathBuf,
    secret: PathBuf,
    /// Names a test itself put beside the share.
    beside: std::cell::RefCell<Vec<OsString>>,
}

impl Escape {
    fn new() -> Escape {
        let fixture = Fixture::new();
        let outside = fixture.root.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let secret = fixture.root.path().join("secret");
        fs::write(&secret, SECRET).unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        Escape {
            fixture,
            outside,
            secret,
            beside: Default::default(),
        }
    }

    /// A path beside the share that the test creates on purpose (not an escape).
    fn beside(&self, name: &str) -> PathBuf {
        self.beside.borrow_mut().push(name.into());
        self.fixture.root.path().join(name)
    }

    fn share(&self, rel: &str) -> PathBuf {
        self.fixture.shared.join(rel)
    }

    fn start(&self, extra: &[&str]) -> Daemon {
        let mut args = self.fixture.basic_args();
        args.extend(extra.iter().map(OsString::from));
        let mut daemon = Daemon::spawn(args);
        daemon.wait_for_socket(&self.fixture.socket);
        daemon
    }

    /// Connects and sends INIT; the device must live as long as the queue is used.
    fn connect(&self, daemon: &mut Daemon) -> (berth_frontend::VhostUserFs, FsQueue) {
        let mut device = connect(daemon, &self.fixture.socket, 1);
        let queue = init_first_queue(&mut device);
        (device, queue)
    }

    /// The host side of every escape check: the secret is untouched and nothing appeared
    /// outside the share.
    fn assert_outside_untouched(&self, context: &str) {
        let meta = fs::metadata(&self.secret).unwrap();
        assert_eq!(fs::read(&self.secret).unwrap(), SECRET, "{context}: secret");
        assert_eq!(meta.mode() & 0o7777, 0o600, "{context}: secret mode");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{context}: secret owner");
        assert_eq!(meta.nlink(), 1, "{context}: secret gained a link");
        let mut listing: Vec<OsString> = fs::read_dir(self.fixture.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        listing.sort();
        let mut expected: Vec<OsString> = ["outside", "secret", "shared", "vhost.sock"]
            .iter()
            .map(OsString::from)
            .collect();
        expected.extend(self.beside.borrow().iter().cloned());
        expected.sort();
        listing.retain(|n| n != "vhost.sock");
        expected.retain(|n| n != "vhost.sock");
        assert_eq!(
            listing, expected,
            "{context}: something appeared beside the share"
        );
        let outside: Vec<_> = fs::read_dir(&self.outside).unwrap().collect();
        assert!(outside.is_empty(), "{context}: outside/ gained {outside:?}");
    }
}

fn berth_only(test: &str) -> bool {
    if !testing_berth() {
        skip_or_fail(test, "checks berth's own replies");
        return false;
    }
    true
}

fn errno_of<T: std::fmt::Debug>(result: Result<T, berth_frontend::Error>, what: &str) -> i32 {
    match result {
        Ok(value) => panic!("{what} succeeded: {value:?}"),
        Err(e) => e
            .errno()
            .unwrap_or_else(|| panic!("{what}: no error reply but {e}")),
    }
}

fn file_type(entry: &EntryOut) -> u32 {
    entry.attr.mode & libc::S_IFMT
}

#[test]
fn dotdot_and_odd_names_at_the_root_stay_inside() {
    let test = "dotdot_and_odd_names_at_the_root_stay_inside";
    if !berth_only(test) {
        return;
    }
    let escape = Escape::new();
    let mut daemon = escape.start(&[]);
    let (_device, mut queue) = escape.connect(&mut daemon);
    let share_ino = fs::metadata(&escape.fixture.shared).unwrap().ino();
    for name in [&b".."[..], b"."] {
        let entry = queue.lookup(ROOT_ID, name).expect("LOOKUP at the root");
        assert_eq!(entry.nodeid, ROOT_ID, "{name:?} left the root");
        assert_eq!(entry.attr.ino, share_ino);
    }
    let sub = queue.lookup(ROOT_ID, b"sub").expect("LOOKUP sub");
    let long = vec![b'x'; 300];
    let huge = vec![b'y'; 3000];
    for (parent, name, context) in [
        (ROOT_ID, &b""[..], "empty name"),
        (ROOT_ID, b"sub/inner.txt", "a name with a slash"),
        (ROOT_ID, b"../secret", "a climbing name"),
        (
            ROOT_ID,
            b"../shared/hello.txt",
            "a round trip through the parent",
        ),
        (ROOT_ID, b"/etc", "an absolute name"),
        (ROOT_ID, b"secret", "a name only outside"),
        (ROOT_ID, b"outside", "a name only outside"),
        (sub.nodeid, b"..", "'..' below the root"),
        (sub.nodeid, b"../../secret", "climbing from below"),
        (ROOT_ID, &long, "an over-long name"),
        (ROOT_ID, &huge, "a name past PATH_MAX's component limit"),
    ] {
        let errno = errno_of(queue.lookup(parent, name), context);
        assert!(
            [libc::EINVAL, libc::ENOENT, libc::ENAMETOOLONG].contains(&errno),
            "{context}: errno {errno}"
        );
    }
    // A name without its terminating NUL: refused (an error reply, or the chain returned
    // without one), never looked up.
    match call(&mut queue, opcode::LOOKUP, ROOT_ID, &[b"hello.txt"], 128) {
        Ok(done) => panic!("an unterminated name was looked up: {done:?}"),
        Err(berth_frontend::Error::ShortReply { len: 0, .. }) => {}
        Err(e) => assert_eq!(e.errno(), Some(libc::EINVAL), "{e}"),
    }
    // Creating calls refuse the same names.
    for name in [&b".."[..], b".", b"a/b", b""] {
        assert!(queue.mkdir(ROOT_ID, name, 0o755).is_err(), "MKDIR {name:?}");
        assert!(
            queue
                .create(ROOT_ID, name, libc::S_IFREG | 0o644, libc::O_RDWR as u32)
                .is_err(),
            "CREATE {name:?}"
        );
        assert!(
            queue.symlink(ROOT_ID, name, b"x").is_err(),
            "SYMLINK {name:?}"
        );
    }
    escape.assert_outside_untouched("after the odd names");
    daemon.assert_alive("after the odd names");
}

/// Symlinks a host (or an earlier guest) left in the share, pointing out of it.
fn plant_outbound_symlinks(escape: &Escape) -> Vec<(&'static str, String)> {
    let root = escape.fixture.root.path();
    let links = vec![
        ("abs_dir", root.join("outside").display().to_string()),
        ("rel_dir", "../outside".to_owned()),
        ("abs_file", escape.secret.display().to_string()),
        ("rel_file", "../secret".to_owned()),
        ("etc", "/etc".to_owned()),
        (
            "dangling",
            root.join("outside/created-through-a-link")
                .display()
                .to_string(),
        ),
        ("proc_fd", "/proc/self/fd/3".to_owned()),
        ("proc_root", "/proc/self/root".to_owned()),
        ("init_root", "/proc/1/root".to_owned()),
        ("proc_cwd", "/proc/self/cwd/..".to_owned()),
    ];
    for (name, target) in &links {
        std::os::unix::fs::symlink(target, escape.share(name)).unwrap();
    }
    links
}

fn symlinks_are_never_followed(extra: &[&str]) {
    let escape = Escape::new();
    let links = plant_outbound_symlinks(&escape);
    let mut daemon = escape.start(extra);
    let (_device, mut queue) = escape.connect(&mut daemon);
    for (name, target) in &links {
        let link = queue
            .lookup(ROOT_ID, name.as_bytes())
            .unwrap_or_else(|e| panic!("LOOKUP {name}: {e}"));
        assert_eq!(file_type(&link), libc::S_IFLNK, "{name}: the target's type");
        assert_eq!(
            link.attr.size,
            target.len() as u64,
            "{name}: the target's size"
        );
        assert_eq!(
            queue.readlink(link.nodeid).expect("READLINK"),
            target.as_bytes(),
            "{name}: READLINK"
        );
        for below in [&b"passwd"[..], b"secret", b"shadow", b"etc", b"."] {
            if below == b"." {
                // "." names the symlink itself, which is harmless.
                continue;
            }
            assert_eq!(
                errno_of(queue.lookup(link.nodeid, below), "LOOKUP under a symlink"),
                libc::ENOTDIR,
                "{name}/{below:?}"
            );
        }
        for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY | libc::O_TRUNC] {
            let errno = errno_of(queue.open(link.nodeid, flags as u32), "OPEN of a symlink");
            assert_eq!(errno, libc::ELOOP, "{name} flags {flags:#o}");
        }
        assert_eq!(
            errno_of(queue.opendir(link.nodeid), "OPENDIR of a symlink"),
            libc::ENOTDIR,
            "{name}"
        );
        // Changing the link's attributes never reaches its target.
        let truncate = SetattrIn {
            valid: setattr_valid::SIZE,
            size: 0,
            ..Default::default()
        };
        assert!(
            queue.setattr(link.nodeid, &truncate).is_err(),
            "{name}: truncate"
        );
        let chmod = SetattrIn {
            valid: setattr_valid::MODE,
            mode: libc::S_IFLNK | 0o666,
            ..Default::default()
        };
        let _ = queue.setattr(link.nodeid, &chmod);
        let chown = SetattrIn {
            valid: setattr_valid::UID | setattr_valid::GID,
            uid: 1234,
            gid: 1234,
            ..Default::default()
        };
        let _ = queue.setattr(link.nodeid, &chown);
        let set = SetxattrIn { size: 1, flags: 0 };
        let _ = call(
            &mut queue,
            SETXATTR,
            link.nodeid,
            &[set.as_slice(), b"user.escape\0", b"1"],
            0,
        );
        // A hard link to the link is another link, not a link to the target.
        let alias = format!("alias_of_{name}");
        let linked = queue
            .link(link.nodeid, ROOT_ID, alias.as_bytes())
            .expect("LINK of a symlink");
        assert_eq!(file_type(&linked), libc::S_IFLNK);
        let host = fs::symlink_metadata(escape.share(&alias)).unwrap();
        assert!(host.file_type().is_symlink(), "{alias}");
        // Creating through the name, even with O_CREAT, opens nothing behind it.
        let errno = errno_of(
            queue.create(
                ROOT_ID,
                name.as_bytes(),
                libc::S_IFREG | 0o644,
                (libc::O_RDWR | libc::O_TRUNC) as u32,
            ),
            "CREATE over a symlink",
        );
        assert!(
            [libc::ELOOP, libc::EEXIST].contains(&errno),
            "{name}: {errno}"
        );
        assert_eq!(
            errno_of(
                queue.mkdir(ROOT_ID, name.as_bytes(), 0o755),
                "MKDIR over a symlink"
            ),
            libc::EEXIST
        );
        escape.assert_outside_untouched(name);
    }
    // The secret keeps no xattr the guest tried to set through a link.
    let mut buf = [0u8; 8];
    let path = std::ffi::CString::new(escape.secret.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid path, name and buffer.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.escape".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(n < 0, "the secret gained an xattr through a symlink");
    // A guest-made symlink pointing out is only text too.
    let made = queue
        .symlink(ROOT_ID, b"guest_link", b"/etc/shadow")
        .expect("SYMLINK");
    assert_eq!(queue.readlink(made.nodeid).unwrap(), b"/etc/shadow");
    assert_eq!(errno_of(queue.open(made.nodeid, 0), "OPEN"), libc::ELOOP);
    escape.assert_outside_untouched("after the symlink attempts");
    daemon.assert_alive("after the symlink attempts");
}

#[test]
fn symlinks_pointing_out_are_never_followed() {
    let test = "symlinks_pointing_out_are_never_followed";
    if berth_only(test) {
        symlinks_are_never_followed(&["--xattr"]);
    }
}

#[test]
fn symlinks_pointing_out_are_never_followed_without_file_handles() {
    let test = "symlinks_pointing_out_are_never_followed_without_file_handles";
    if berth_only(test) {
        symlinks_are_never_followed(&["--xattr", "--inode-file-handles=never"]);
    }
}

/// Replaces `path` (atomically) by a symlink to `target`, or back by a regular file.
fn swap(path: &Path, target: &Path, to_link: bool, scratch: &Path) {
    let _ = fs::remove_file(scratch);
    if to_link {
        std::os::unix::fs::symlink(target, scratch).unwrap();
    } else {
        fs::write(scratch, b"inside").unwrap();
    }
    fs::rename(scratch, path).unwrap();
}

fn swapped_symlinks_are_not_opened(extra: &[&str]) {
    let escape = Escape::new();
    let victim = escape.share("victim");
    let scratch = escape.share("scratch");
    fs::write(&victim, b"inside").unwrap();
    let mut daemon = escape.start(extra);
    let (_device, mut queue) = escape.connect(&mut daemon);

    // One swap exactly between LOOKUP and OPEN.
    let entry = queue.lookup(ROOT_ID, b"victim").expect("LOOKUP victim");
    assert_eq!(file_type(&entry), libc::S_IFREG);
    swap(&victim, &escape.secret, true, &scratch);
    match queue.open(entry.nodeid, libc::O_RDONLY as u32) {
        Ok(opened) => {
            let data = queue.read(entry.nodeid, opened.fh, 0, 4096).expect("READ");
            assert_eq!(data, b"inside", "OPEN after the swap opened another file");
            queue
                .release(entry.nodeid, opened.fh, libc::O_RDONLY as u32)
                .unwrap();
        }
        Err(e) => assert!(e.errno().is_some(), "{e}"),
    }
    queue.forget(entry.nodeid, 1).unwrap();

    // And continuously, while the guest looks up, opens and reads.
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let (victim, secret) = (victim.clone(), escape.secret.clone());
        let scratch = escape.share("scratch2");
        std::thread::spawn(move || {
            let mut to_link = false;
            while !stop.load(Ordering::Relaxed) {
                swap(&victim, &secret, to_link, &scratch);
                to_link = !to_link;
            }
        })
    };
    let mut opened_files = 0;
    for _ in 0..400 {
        let Ok(entry) = queue.lookup(ROOT_ID, b"victim") else {
            continue;
        };
        let attempt = queue.open(entry.nodeid, libc::O_RDONLY as u32);
        if file_type(&entry) == libc::S_IFLNK {
            assert!(attempt.is_err(), "a symlink node was opened");
        }
        if let Ok(opened) = attempt {
            if let Ok(data) = queue.read(entry.nodeid, opened.fh, 0, 4096) {
                assert_ne!(
                    data, SECRET,
                    "the secret was read through a swapped symlink"
                );
                assert_eq!(data, b"inside");
                opened_files += 1;
            }
            let _ = queue.release(entry.nodeid, opened.fh, libc::O_RDONLY as u32);
        }
        let _ = queue.forget(entry.nodeid, 1);
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    eprintln!("{extra:?}: {opened_files} of 400 race rounds opened the regular file");
    escape.assert_outside_untouched("after the swap race");
    daemon.assert_alive("after the swap race");
}

#[test]
fn a_symlink_swapped_in_between_lookup_and_open_is_not_followed() {
    let test = "a_symlink_swapped_in_between_lookup_and_open_is_not_followed";
    if !berth_only(test) {
        return;
    }
    for extra in [
        &[][..],
        &["--inode-file-handles=never"],
        &["--inode-file-handles=mandatory"],
    ] {
        swapped_symlinks_are_not_opened(extra);
    }
}

#[test]
fn forged_and_foreign_node_ids_and_handles_are_refused() {
    let test = "forged_and_foreign_node_ids_and_handles_are_refused";
    if !berth_only(test) {
        return;
    }
    let escape = Escape::new();
    let mut daemon = escape.start(&[]);
    let (_device, mut queue) = escape.connect(&mut daemon);
    let hello = queue.lookup(ROOT_ID, b"hello.txt").expect("LOOKUP");
    let big = queue.lookup(ROOT_ID, b"big.bin").expect("LOOKUP");
    let sub = queue.lookup(ROOT_ID, b"sub").expect("LOOKUP");
    for forged in [0u64, 2, 99, 12345, 1 << 40, u64::MAX - 1, u64::MAX] {
        if [hello.nodeid, big.nodeid, sub.nodeid, ROOT_ID].contains(&forged) {
            continue;
        }
        assert!(queue.getattr(forged).is_err(), "GETATTR {forged}");
        assert!(
            queue.lookup(forged, b"hello.txt").is_err(),
            "LOOKUP in {forged}"
        );
        assert!(queue.open(forged, 0).is_err(), "OPEN {forged}");
        assert!(queue.opendir(forged).is_err(), "OPENDIR {forged}");
        assert!(queue.readlink(forged).is_err(), "READLINK {forged}");
        assert!(
            queue.mkdir(forged, b"d", 0o755).is_err(),
            "MKDIR in {forged}"
        );
        assert!(
            queue
                .rename(ROOT_ID, b"hello.txt", forged, b"moved")
                .is_err(),
            "RENAME into {forged}"
        );
        assert!(
            queue.link(hello.nodeid, forged, b"linked").is_err(),
            "LINK into {forged}"
        );
        assert!(
            queue.link(forged, ROOT_ID, b"linked").is_err(),
            "LINK of {forged}"
        );
    }
    let fh_hello = queue.open(hello.nodeid, libc::O_RDWR as u32).unwrap().fh;
    let fh_big = queue.open(big.nodeid, libc::O_RDONLY as u32).unwrap().fh;
    let dir_fh = queue.opendir(sub.nodeid).unwrap().fh;
    // A handle belongs to its inode: big's handle does not read hello, and back.
    assert_eq!(
        errno_of(
            queue.read(hello.nodeid, fh_big, 0, 64),
            "READ with another inode's fh"
        ),
        libc::EBADF
    );
    assert_eq!(
        errno_of(
            queue.write(big.nodeid, fh_hello, 0, b"overwrite"),
            "WRITE with another inode's fh"
        ),
        libc::EBADF
    );
    assert_eq!(
        errno_of(
            queue.readdir(hello.nodeid, dir_fh, 0, 4096),
            "READDIR with a dir's fh"
        ),
        libc::EBADF
    );
    let errno = errno_of(
        queue.read(sub.nodeid, dir_fh, 0, 64),
        "READ of a directory handle",
    );
    assert!([libc::EISDIR, libc::EBADF].contains(&errno), "{errno}");
    let copy = CopyFileRangeIn {
        fh_in: fh_big,
        offset_in: 0,
        nodeid_out: hello.nodeid,
        fh_out: fh_big,
        offset_out: 0,
        len: 16,
        flags: 0,
    };
    assert_eq!(
        errno_of(
            call(
                &mut queue,
                COPY_FILE_RANGE,
                big.nodeid,
                &[copy.as_slice()],
                24
            ),
            "COPY_FILE_RANGE into a foreign handle"
        ),
        libc::EBADF
    );
    for forged in [0u64, 7777, u64::MAX] {
        if [fh_hello, fh_big, dir_fh].contains(&forged) {
            continue;
        }
        assert_eq!(
            errno_of(
                queue.read(hello.nodeid, forged, 0, 64),
                "READ with a forged fh"
            ),
            libc::EBADF
        );
    }
    // A released handle is gone.
    queue
        .release(big.nodeid, fh_big, libc::O_RDONLY as u32)
        .unwrap();
    assert_eq!(
        errno_of(queue.read(big.nodeid, fh_big, 0, 64), "READ after RELEASE"),
        libc::EBADF
    );
    // A forgotten node id is gone too.
    queue.forget(big.nodeid, 1).unwrap();
    assert!(queue.getattr(big.nodeid).is_err(), "GETATTR after FORGET");
    assert_eq!(fs::read(escape.share("big.bin")).unwrap(), big_content());
    assert_eq!(fs::read(escape.share("hello.txt")).unwrap(), HELLO_CONTENT);
    escape.assert_outside_untouched("after the forged ids");
    daemon.assert_alive("after the forged ids");
}

#[test]
fn a_replaced_file_gives_estale_by_handle_never_another_file() {
    let test = "a_replaced_file_gives_estale_by_handle_never_another_file";
    if !berth_only(test) {
        return;
    }
    if !is_root() {
        skip_or_fail(test, "open_by_handle_at needs CAP_DAC_READ_SEARCH (root)");
        return;
    }
    let escape = Escape::new();
    let victim = escape.share("victim");
    fs::write(&victim, b"the original").unwrap();
    let mut daemon = escape.start(&["--inode-file-handles=mandatory"]);
    let (_device, mut queue) = escape.connect(&mut daemon);
    for round in 0..20 {
        let entry = queue.lookup(ROOT_ID, b"victim").expect("LOOKUP");
        // The host replaces the file; ext4 and tmpfs reuse the freed inode number at once.
        fs::remove_file(&victim).unwrap();
        fs::write(&victim, format!("replacement {round}")).unwrap();
        match queue.open(entry.nodeid, libc::O_RDONLY as u32) {
            Ok(opened) => panic!(
                "round {round}: a stale node id opened {:?}",
                String::from_utf8_lossy(&queue.read(entry.nodeid, opened.fh, 0, 64).unwrap())
            ),
            Err(e) => assert!(
                [libc::ESTALE, libc::ENOENT].contains(&e.errno().unwrap_or(0)),
                "round {round}: {e}"
            ),
        }
        queue.forget(entry.nodeid, 1).unwrap();
    }
    escape.assert_outside_untouched("after the replacements");
    daemon.assert_alive("after the replacements");
}

#[test]
fn rename_and_link_cannot_cross_the_share_root() {
    let test = "rename_and_link_cannot_cross_the_share_root";
    if !berth_only(test) {
        return;
    }
    let escape = Escape::new();
    plant_outbound_symlinks(&escape);
    let mut daemon = escape.start(&[]);
    let (_device, mut queue) = escape.connect(&mut daemon);
    let hello = queue.lookup(ROOT_ID, b"hello.txt").unwrap();
    let sub = queue.lookup(ROOT_ID, b"sub").unwrap();
    let rel_dir = queue.lookup(ROOT_ID, b"rel_dir").unwrap();
    let abs_dir = queue.lookup(ROOT_ID, b"abs_dir").unwrap();
    for (newdir, newname) in [
        (ROOT_ID, &b".."[..]),
        (ROOT_ID, b"../escaped"),
        (ROOT_ID, b"../outside/escaped"),
        (sub.nodeid, b"../../escaped"),
        (ROOT_ID, b"outside/escaped"),
        (rel_dir.nodeid, b"escaped"),
        (abs_dir.nodeid, b"escaped"),
    ] {
        assert!(
            queue
                .rename(ROOT_ID, b"hello.txt", newdir, newname)
                .is_err(),
            "RENAME to {newname:?} in {newdir}"
        );
        assert!(
            queue.link(hello.nodeid, newdir, newname).is_err(),
            "LINK as {newname:?} in {newdir}"
        );
        assert!(
            queue
                .rename2(
                    ROOT_ID,
                    b"hello.txt",
                    newdir,
                    newname,
                    libc::RENAME_EXCHANGE
                )
                .is_err(),
            "RENAME2 to {newname:?}"
        );
    }
    for oldname in [&b".."[..], b"../secret", b"sub/../../secret"] {
        assert!(
            queue.rename(ROOT_ID, oldname, ROOT_ID, b"stolen").is_err(),
            "RENAME of {oldname:?}"
        );
    }
    // Exchanging a link pointing out with a file only swaps two names inside.
    queue
        .rename2(
            ROOT_ID,
            b"abs_file",
            ROOT_ID,
            b"hello.txt",
            libc::RENAME_EXCHANGE,
        )
        .expect("RENAME_EXCHANGE inside the share");
    assert!(fs::symlink_metadata(escape.share("hello.txt"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(escape.share("abs_file")).unwrap(), HELLO_CONTENT);
    assert_eq!(fs::read(escape.share("hello.txt")).unwrap(), SECRET);
    assert!(!escape.share("stolen").exists());
    escape.assert_outside_untouched("after the renames");
    daemon.assert_alive("after the renames");
}

#[test]
fn a_host_hard_link_shares_that_file_and_nothing_else() {
    let test = "a_host_hard_link_shares_that_file_and_nothing_else";
    if !berth_only(test) {
        return;
    }
    let escape = Escape::new();
    let shared_file = escape.beside("lent");
    fs::write(&shared_file, b"lent to the guest").unwrap();
    fs::hard_link(&shared_file, escape.share("lent")).unwrap();
    let mut daemon = escape.start(&[]);
    let (_device, mut queue) = escape.connect(&mut daemon);
    let lent = queue.lookup(ROOT_ID, b"lent").expect("LOOKUP lent");
    assert_eq!(lent.attr.nlink, 2);
    let fh = queue.open(lent.nodeid, libc::O_RDONLY as u32).unwrap().fh;
    assert_eq!(
        queue.read(lent.nodeid, fh, 0, 64).unwrap(),
        b"lent to the guest"
    );
    // From the file there is no way to its other name's directory.
    for name in [&b".."[..], b"secret", b"outside"] {
        let errno = errno_of(queue.lookup(lent.nodeid, name), "LOOKUP under a file");
        assert!(
            [libc::ENOTDIR, libc::EINVAL].contains(&errno),
            "{name:?}: {errno}"
        );
    }
    assert_eq!(
        errno_of(queue.opendir(lent.nodeid), "OPENDIR"),
        libc::ENOTDIR
    );
    assert_eq!(
        errno_of(queue.readlink(lent.nodeid), "READLINK"),
        libc::EINVAL
    );
    queue.rename(ROOT_ID, b"lent", ROOT_ID, b"moved").unwrap();
    assert!(
        shared_file.exists(),
        "renaming inside moved the outside name"
    );
    escape.assert_outside_untouched("after using the hard link");
    daemon.assert_alive("after using the hard link");
}

/// A bind mount of `source` on `target` for the life of the value.
struct BindMount(PathBuf);

impl BindMount {
    fn new(source: &Path, target: &Path) -> Option<BindMount> {
        let ok = std::process::Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| BindMount(target.to_owned()))
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_host_bind_mount_is_a_submount_with_no_way_up_to_its_source() {
    let test = "a_host_bind_mount_is_a_submount_with_no_way_up_to_its_source";
    if !berth_only(test) {
        return;
    }
    if !is_root() {
        skip_or_fail(test, "bind mounts need root");
        return;
    }
    let escape = Escape::new();
    let source = escape.beside("bound");
    fs::create_dir(&source).unwrap();
    fs::write(source.join("inside_the_mount"), b"bound").unwrap();
    fs::create_dir(escape.share("mnt")).unwrap();
    let Some(_bind) = BindMount::new(&source, &escape.share("mnt")) else {
        skip_or_fail(test, "mount --bind failed");
        return;
    };
    let mut daemon = escape.start(&[]);
    let (_device, mut queue) = escape.connect(&mut daemon);
    let mnt = queue.lookup(ROOT_ID, b"mnt").expect("LOOKUP mnt");
    assert_eq!(mnt.attr.flags & FUSE_ATTR_SUBMOUNT, FUSE_ATTR_SUBMOUNT);
    assert_eq!(mnt.attr.ino, fs::metadata(&source).unwrap().ino());
    let inner = queue
        .lookup(mnt.nodeid, b"inside_the_mount")
        .expect("LOOKUP in the bind mount");
    assert_eq!(inner.attr.size, 5);
    // The bind source's parent holds `secret`; nothing reaches it.
    for name in [&b".."[..], b"../secret", b"secret"] {
        assert!(queue.lookup(mnt.nodeid, name).is_err(), "{name:?}");
    }
    let listing = queue.list_dir_plus(mnt.nodeid).expect("READDIRPLUS");
    for entry in &listing {
        if entry.name == b".." || entry.name == b"." {
            assert_eq!(
                entry.entry.nodeid, 0,
                "'..' of a submount must not be looked up"
            );
        } else {
            assert_eq!(entry.name, b"inside_the_mount");
        }
    }
    escape.assert_outside_untouched("after walking the bind mount");
    daemon.assert_alive("after walking the bind mount");
}

#[test]
fn dotdot_from_a_bind_mount_root_leads_back_to_the_share_on_a_fuse_mount() {
    let test = "dotdot_from_a_bind_mount_root_leads_back_to_the_share_on_a_fuse_mount";
    if let Some(reason) = fuse_mount::skip_reason() {
        skip_or_fail(test, &reason);
        return;
    }
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), SECRET).unwrap();
    let source = outside.path().join("bound");
    fs::create_dir(&source).unwrap();
    fs::write(source.join("inside_the_mount"), b"bound").unwrap();
    // The bind mount is made after berth started: a chroot sandbox shares the host's mount
    // namespace and sees it at once (the namespace sandbox sees host mounts made before it
    // started, or later ones where the host's mounts propagate; see the vhost-user test).
    let Some(fuse) = fuse_mount::FuseMount::start(&["--sandbox=chroot"]) else {
        return;
    };
    fs::create_dir(fuse.under("mnt")).unwrap();
    fs::write(fuse.under("at_the_root"), b"root").unwrap();
    let Some(bind) = BindMount::new(&source, &fuse.under("mnt")) else {
        skip_or_fail(test, "mount --bind failed");
        return;
    };
    let via = fuse.via("mnt");
    assert_eq!(fs::read(via.join("inside_the_mount")).unwrap(), b"bound");
    let up = fs::metadata(via.join("..")).unwrap();
    let root = fs::metadata(fuse.mnt()).unwrap();
    assert_eq!(
        (up.dev(), up.ino()),
        (root.dev(), root.ino()),
        "'..' left the share"
    );
    let mut names: Vec<_> = fs::read_dir(via.join(".."))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["at_the_root", "mnt"]);
    assert!(!via.join("../secret").exists());
    assert_eq!(fs::read(outside.path().join("secret")).unwrap(), SECRET);
    drop(bind);
    fuse.finish();
}

#[test]
fn a_share_directory_named_proc_is_the_share_s_own() {
    let test = "a_share_directory_named_proc_is_the_share_s_own";
    if !berth_only(test) {
        return;
    }
    let escape = Escape::new();
    fs::create_dir(escape.share("proc")).unwrap();
    fs::write(escape.share("proc/mine"), b"share").unwrap();
    let mut daemon = escape.start(&[]);
    let (_device, mut queue) = escape.connect(&mut daemon);
    let proc_dir = queue.lookup(ROOT_ID, b"proc").expect("LOOKUP proc");
    for name in [&b"self"[..], b"1", b"mounts"] {
        assert_eq!(
            errno_of(queue.lookup(proc_dir.nodeid, name), "LOOKUP in proc"),
            libc::ENOENT,
            "{name:?}"
        );
    }
    queue
        .lookup(proc_dir.nodeid, b"mine")
        .expect("the share's own file");
    daemon.assert_alive("after looking into proc");
}

#[test]
fn device_nodes_made_by_the_guest_follow_the_options_and_are_never_opened() {
    let test = "device_nodes_made_by_the_guest_follow_the_options_and_are_never_opened";
    if !berth_only(test) {
        return;
    }
    if !is_root() {
        skip_or_fail(test, "creating device nodes needs CAP_MKNOD (root)");
        return;
    }
    // /dev/null and a block device a guest would love to read.
    let null = libc::makedev(1, 3) as u32;
    let disk = libc::makedev(7, 0) as u32;
    {
        let escape = Escape::new();
        let mut daemon = escape.start(&[]);
        let (_device, mut queue) = escape.connect(&mut daemon);
        let node = queue
            .mknod(ROOT_ID, b"null", libc::S_IFCHR | 0o666, null)
            .expect("MKNOD of a character device as guest root");
        assert!(fs::symlink_metadata(escape.share("null"))
            .unwrap()
            .file_type()
            .is_char_device());
        let block = queue
            .mknod(ROOT_ID, b"disk", libc::S_IFBLK | 0o600, disk)
            .expect("MKNOD of a block device");
        let fifo = queue
            .mknod(ROOT_ID, b"fifo", libc::S_IFIFO | 0o600, 0)
            .expect("MKNOD of a fifo");
        for (entry, what) in [
            (&node, "char device"),
            (&block, "block device"),
            (&fifo, "fifo"),
        ] {
            for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY] {
                assert_eq!(
                    errno_of(queue.open(entry.nodeid, flags as u32), "OPEN of a node"),
                    libc::ENXIO,
                    "{what}"
                );
            }
            // Truncation would have to open it: refused as well.
            let truncate = SetattrIn {
                valid: setattr_valid::SIZE,
                ..Default::default()
            };
            assert!(queue.setattr(entry.nodeid, &truncate).is_err(), "{what}");
        }
        daemon.assert_alive("after opening device nodes");
        escape.assert_outside_untouched("after the device nodes");
    }
    for (flags, errno, what) in [
        (&["--readonly"][..], libc::EROFS, "--readonly"),
        (&["--modcaps=-mknod"], libc::EPERM, "--modcaps=-mknod"),
        (&["-o", "modcaps=-mknod"], libc::EPERM, "-o modcaps=-mknod"),
    ] {
        let escape = Escape::new();
        let mut daemon = escape.start(flags);
        let (_device, mut queue) = escape.connect(&mut daemon);
        let name = format!("null2{}", flags.len());
        let got = errno_of(
            queue.mknod(ROOT_ID, name.as_bytes(), libc::S_IFCHR | 0o666, null),
            what,
        );
        assert_eq!(got, errno, "{what}");
        assert!(!escape.share(&name).exists(), "{what}");
        if what != "--readonly" {
            // Fifos need no capability.
            queue
                .mknod(
                    ROOT_ID,
                    format!("fifo{}", flags.len()).as_bytes(),
                    libc::S_IFIFO | 0o600,
                    0,
                )
                .expect("MKNOD fifo without CAP_MKNOD");
        }
        daemon.assert_alive(what);
        escape.assert_outside_untouched(what);
    }
}

/// A setuid+setgid, group-executable file owned by the guest user, as a guest user's own
/// program in the share.
fn setuid_file(escape: &Escape, name: &str) -> PathBuf {
    let path = escape.share(name);
    fs::write(&path, b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(&path, Some(1000), Some(1000)).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o6775)).unwrap();
    path
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o7777
}

fn setuid_bits_are_cleared(extra: &[&str]) {
    let escape = Escape::new();
    fs::set_permissions(&escape.fixture.shared, fs::Permissions::from_mode(0o777)).unwrap();
    let killpriv_v2 = extra.contains(&"--killpriv-v2");
    let mut daemon = escape.start(extra);
    let mut device = connect(&mut daemon, &escape.fixture.socket, 1);
    let mut queue = device.take_request_queue(1).unwrap();
    // A guest kernel asks for HANDLE_KILLPRIV_V2 (bit 28) when it supports it.
    let init = queue
        .init(
            berth_frontend::fuse::init_flags::DEFAULT | (1 << 28),
            128 << 10,
        )
        .expect("INIT");
    assert_eq!(
        init.flags & (1 << 28) != 0,
        killpriv_v2,
        "KILLPRIV_V2 negotiation"
    );
    // An unprivileged guest kernel sets the kill flags only for unprivileged callers, which
    // is what the daemon is told here.
    let write_flags = if killpriv_v2 {
        kill_priv::WRITE_KILL_SUIDGID
    } else {
        0
    };
    queue.set_caller(1000, 1000);

    // WRITE.
    let written = setuid_file(&escape, "written");
    let entry = queue.lookup(ROOT_ID, b"written").unwrap();
    let fh = queue.open(entry.nodeid, libc::O_WRONLY as u32).unwrap().fh;
    queue
        .write_with(entry.nodeid, fh, 0, b"#!/bin/sh\nexit 0\n", write_flags)
        .expect("WRITE as uid 1000");
    assert_eq!(
        mode_of(&written) & 0o6000,
        0,
        "WRITE kept setuid/setgid: {extra:?}"
    );

    // Truncating SETATTR.
    let truncated = setuid_file(&escape, "truncated");
    let entry = queue.lookup(ROOT_ID, b"truncated").unwrap();
    let mut truncate = SetattrIn {
        valid: setattr_valid::SIZE,
        size: 1,
        ..Default::default()
    };
    if killpriv_v2 {
        truncate.valid |= setattr_valid::KILL_SUIDGID;
    }
    queue
        .setattr(entry.nodeid, &truncate)
        .expect("SETATTR size");
    assert_eq!(
        mode_of(&truncated) & 0o6000,
        0,
        "truncation kept setuid/setgid: {extra:?}"
    );

    // O_TRUNC open.
    let reopened = setuid_file(&escape, "reopened");
    let entry = queue.lookup(ROOT_ID, b"reopened").unwrap();
    let open_flags = if killpriv_v2 {
        kill_priv::OPEN_KILL_SUIDGID
    } else {
        0
    };
    queue
        .open_with(
            entry.nodeid,
            (libc::O_WRONLY | libc::O_TRUNC) as u32,
            open_flags,
        )
        .expect("OPEN O_TRUNC");
    assert_eq!(mode_of(&reopened) & 0o6000, 0, "O_TRUNC kept setuid/setgid");

    // Root writing keeps them (CAP_FSETID), as the kernel does.
    queue.set_caller(0, 0);
    let by_root = setuid_file(&escape, "by_root");
    let entry = queue.lookup(ROOT_ID, b"by_root").unwrap();
    let fh = queue.open(entry.nodeid, libc::O_WRONLY as u32).unwrap().fh;
    queue
        .write(entry.nodeid, fh, 0, b"#!/bin/sh\n")
        .expect("WRITE as root");
    assert_eq!(mode_of(&by_root), 0o6775, "root's write cleared the bits");
    daemon.assert_alive("after the setuid writes");
}

#[test]
fn unprivileged_writes_clear_setuid_and_setgid() {
    let test = "unprivileged_writes_clear_setuid_and_setgid";
    if !berth_only(test) {
        return;
    }
    if !is_root() {
        skip_or_fail(test, "needs a root daemon to act for guest users");
        return;
    }
    setuid_bits_are_cleared(&[]);
}

#[test]
fn unprivileged_writes_clear_setuid_and_setgid_with_killpriv_v2() {
    let test = "unprivileged_writes_clear_setuid_and_setgid_with_killpriv_v2";
    if !berth_only(test) {
        return;
    }
    if !is_root() {
        skip_or_fail(test, "needs a root daemon to act for guest users");
        return;
    }
    setuid_bits_are_cleared(&["--killpriv-v2"]);
}

#[test]
fn guest_raw_file_handles_do_not_exist() {
    // The FUSE protocol berth serves has no request carrying a host file handle: node ids and
    // fhs are berth's own table indices (checked above). NFS-style export operations are not
    // offered either: INIT does not grant EXPORT_SUPPORT.
    let test = "guest_raw_file_handles_do_not_exist";
    if !berth_only(test) {
        return;
    }
    let escape = Escape::new();
    let mut daemon = escape.start(&[]);
    let mut device = connect(&mut daemon, &escape.fixture.socket, 1);
    let mut queue = device.take_request_queue(1).unwrap();
    let init = queue.init_default().expect("INIT");
    const EXPORT_SUPPORT: u32 = 1 << 4;
    assert_eq!(init.flags & EXPORT_SUPPORT, 0, "EXPORT_SUPPORT granted");
    daemon.assert_alive("after INIT");
}
