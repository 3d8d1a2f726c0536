//! berth started by an unprivileged user: the namespace sandbox then adds a user namespace,
//! with `--uid-map` / `--gid-map` (virtiofsd's `:namespace_id:host_id:count:` syntax, each
//! given as often as there are ranges) saying which ids inside stand for which host ids. The
//! tests, as root, run the real binary as nobody (65534), mapping its own id, and as a
//! throwaway user granted a subordinate range in /etc/subuid and /etc/subgid, mapping ranges
//! through newuidmap/newgidmap, and serve requests through it.

#[path = "common/frontend_util.rs"]
mod frontend_util;
#[path = "common/security_util.rs"]
mod security_util;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use berth_frontend::fuse::{setattr_valid, SetattrIn, ROOT_ID};
use frontend_util::*;
use security_util::*;

const NOBODY: u32 = 65534;

/// Why an unprivileged user namespace cannot be tried here, if it cannot.
fn cannot_run() -> Option<String> {
    if !testing_berth() {
        return Some("tests berth's own sandbox".into());
    }
    if !is_root() {
        return Some("needs root to start the daemon as another, unprivileged user".into());
    }
    // The kernel may forbid unprivileged user namespaces (sysctls of some distributions).
    let probe = unprivileged(Command::new("unshare").args(["--user", "--map-root-user", "true"]))
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(status) if status.success() => None,
        Ok(_) => Some("this kernel refuses unprivileged user namespaces".into()),
        Err(e) => Some(format!(
            "cannot run unshare(1) to probe user namespaces: {e}"
        )),
    }
}

/// Runs `command` as nobody:nogroup without supplementary groups.
fn unprivileged(command: &mut Command) -> &mut Command {
    run_as(command, NOBODY, NOBODY)
}

/// Runs `command` as `uid`:`gid` without supplementary groups.
fn run_as(command: &mut Command, uid: u32, gid: u32) -> &mut Command {
    run_as_in_groups(command, uid, gid, Vec::new())
}

/// Runs `command` as `uid`:`gid` with the supplementary groups `groups`.
fn run_as_in_groups(
    command: &mut Command,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
) -> &mut Command {
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (the group list was allocated before the fork).
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A shared directory and socket directory an unprivileged user owns.
struct NobodyFixture {
    _root: tempfile::TempDir,
    shared: PathBuf,
    socket: PathBuf,
}

fn nobody_fixture() -> NobodyFixture {
    fixture_owned_by(NOBODY, NOBODY)
}

fn fixture_owned_by(uid: u32, gid: u32) -> NobodyFixture {
    let root = tempfile::tempdir().unwrap();
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let shared = root.path().join("shared");
    let sockets = root.path().join("sockets");
    for dir in [&shared, &sockets] {
        fs::create_dir(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
    }
    fs::write(shared.join("hello"), b"hello").unwrap();
    std::os::unix::fs::chown(shared.join("hello"), Some(uid), Some(gid)).unwrap();
    NobodyFixture {
        socket: sockets.join("vfs.sock"),
        shared,
        _root: root,
    }
}

fn start_as_nobody(fixture: &NobodyFixture, extra: &[&str]) -> Daemon {
    start_as(fixture, NOBODY, NOBODY, extra)
}

fn start_as(fixture: &NobodyFixture, uid: u32, gid: u32, extra: &[&str]) -> Daemon {
    start_in_groups(fixture, uid, gid, Vec::new(), extra)
}

fn start_in_groups(
    fixture: &NobodyFixture,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    extra: &[&str],
) -> Daemon {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--socket-path".into(),
        fixture.socket.clone().into(),
        "--shared-dir".into(),
        fixture.shared.clone().into(),
    ];
    args.extend(extra.iter().map(Into::into));
    Daemon::spawn_with(args, |command| {
        run_as_in_groups(command, uid, gid, groups);
    })
}

fn owner(path: &Path) -> (u32, u32) {
    let meta = fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.gid())
}

fn host_ids(pid: u32) -> (u32, u32) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let first = |field: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (first("Uid:"), first("Gid:"))
}

fn serve_as_nobody(test: &str, extra: &[&str]) {
    if let Some(reason) = cannot_run() {
        skip_or_fail(test, &reason);
        return;
    }
    let fixture = nobody_fixture();
    let mut daemon = start_as_nobody(&fixture, extra);
    daemon.wait_for_socket(&fixture.socket);
    let server = serving_pid(daemon.pid(), true);
    let me = std::process::id();
    let user_ns = |pid: u32| fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    assert_ne!(user_ns(server), user_ns(me), "no user namespace");
    assert_eq!(host_ids(server), (NOBODY, NOBODY), "not running as nobody");
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let hello = queue.lookup(ROOT_ID, b"hello").expect("LOOKUP");
    let fh = queue
        .open(hello.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN")
        .fh;
    assert_eq!(queue.read(hello.nodeid, fh, 0, 64).expect("READ"), b"hello");
    // The guest's root is the namespace's root, which is nobody on the host.
    let (created, _) = queue
        .create(ROOT_ID, b"new", libc::S_IFREG | 0o644, libc::O_RDWR as u32)
        .expect("CREATE as guest root");
    assert_eq!(owner(&fixture.shared.join("new")), (NOBODY, NOBODY));
    assert_ne!(created.nodeid, 0);
    // Nothing above the shared directory is reachable.
    let up = queue.lookup(ROOT_ID, b"..").expect("LOOKUP ..");
    assert_eq!(up.nodeid, ROOT_ID);
    daemon.assert_alive("after serving as nobody");
    drop(queue);
    device.disconnect();
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("exit");
    assert!(status.success(), "{}", daemon.stderr());
}

#[test]
fn nobody_serves_with_the_default_id_maps() {
    serve_as_nobody("nobody_serves_with_the_default_id_maps", &[]);
}

#[test]
fn nobody_serves_with_explicit_id_maps() {
    serve_as_nobody(
        "nobody_serves_with_explicit_id_maps",
        &["--uid-map=:0:65534:1:", "--gid-map=:0:65534:1:"],
    );
}

#[test]
fn a_map_of_someone_elses_id_is_refused_with_a_reason() {
    let test = "a_map_of_someone_elses_id_is_refused_with_a_reason";
    if let Some(reason) = cannot_run().or_else(uidmap_unavailable) {
        skip_or_fail(test, &reason);
        return;
    }
    let fixture = nobody_fixture();
    // Host root is nobody's to map only if /etc/subuid says so, which it does not.
    let mut daemon = start_as_nobody(&fixture, &["--uid-map=:0:0:1:"]);
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("berth refuses to start");
    assert_eq!(status.code(), Some(1), "{}", daemon.stderr());
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("--uid-map: `newuidmap ")
            && stderr.contains(" 0 0 1` exited with status 1")
            && stderr.contains("(uid 65534) in /etc/subuid"),
        "{stderr}"
    );
}

#[test]
fn id_maps_are_refused_for_root_and_malformed_ones_at_parse_time() {
    let berth = env!("CARGO_BIN_EXE_berth");
    let run = |args: &[&str]| {
        Command::new(berth)
            .args(["--socket-path=/nonexistent/s", "--shared-dir=/tmp"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--uid-map=0:1000:1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(&["--gid-map=:0:1000:0:"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("count must be at least 1"));
    if is_root() {
        // virtiofsd refuses maps for root, which needs no user namespace.
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let out = Command::new(berth)
            .arg("--socket-path")
            .arg(&socket)
            .args(["--shared-dir=/tmp", "--uid-map=:0:0:1:"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("unprivileged"),
            "{out:?}"
        );
    }
}

/// The subordinate range the throwaway user is granted in /etc/subuid and /etc/subgid.
const SUBORDINATE_FIRST: u32 = 200_000;
const SUBORDINATE_COUNT: u32 = 65_536;

/// Why newuidmap/newgidmap cannot be had, if they cannot. As root, Debian's `uidmap` package
/// is installed when missing (once per test run).
fn uidmap_unavailable() -> Option<String> {
    static OUTCOME: OnceLock<Option<String>> = OnceLock::new();
    OUTCOME
        .get_or_init(|| {
            let installed = || {
                ["newuidmap", "newgidmap"].iter().all(|helper| {
                    Command::new(helper)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok()
                })
            };
            if installed() {
                return None;
            }
            let package_absent = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", "uidmap"])
                .output()
                .map(|out| !String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
                .unwrap_or(false);
            if !is_root() || !package_absent {
                return Some(
                    "newuidmap/newgidmap are not installed (Debian package uidmap) and cannot be \
                     installed here"
                        .into(),
                );
            }
            let apt_get = |args: &[&str]| {
                Command::new("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            };
            let install = ["install", "-y", "-qq", "--no-install-recommends", "uidmap"];
            // The package lists may be stale or absent: refresh them once if the first try fails.
            let installed_now =
                apt_get(&install) || (apt_get(&["update", "-qq"]) && apt_get(&install));
            if !installed_now {
                return Some("apt-get install uidmap failed".into());
            }
            (!installed()).then(|| "uidmap installed but newuidmap/newgidmap do not run".into())
        })
        .clone()
}

/// Serialises the tests that change the host's user database and subordinate id files.
static USER_DATABASE: Mutex<()> = Mutex::new(());

/// A system user made for one test, granted [`SUBORDINATE_FIRST`]..+[`SUBORDINATE_COUNT`] in
/// /etc/subuid and /etc/subgid. Dropping it (also when the test fails) deletes the user and
/// puts both files back as they were.
struct ThrowawayUser {
    name: String,
    uid: u32,
    gid: u32,
    /// The subordinate id files' contents before the test (`None`: the file did not exist).
    saved: Vec<(&'static str, Option<Vec<u8>>)>,
    created: bool,
    _lock: MutexGuard<'static, ()>,
}

impl ThrowawayUser {
    fn create() -> Result<ThrowawayUser, String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let lock = USER_DATABASE.lock().unwrap_or_else(PoisonError::into_inner);
        let name = format!(
            "berth-map-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let saved = ["/etc/subuid", "/etc/subgid"]
            .into_iter()
            .map(|path| (path, fs::read(path).ok()))
            .collect();
        let mut user = ThrowawayUser {
            name,
            uid: 0,
            gid: 0,
            saved,
            created: false,
            _lock: lock,
        };
        // A system user gets no subordinate ids of its own: the test grants exactly one range.
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group"])
            .args(["--shell", "/usr/sbin/nologin", &user.name])
            .output()
            .map_err(|e| format!("cannot run useradd: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "useradd {} failed: {}",
                user.name,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        user.created = true;
        let id = |flag: &str| -> Result<u32, String> {
            let out = Command::new("id")
                .args([flag, &user.name])
                .output()
                .map_err(|e| format!("cannot run id: {e}"))?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|_| format!("id {flag} {} printed no number", user.name))
        };
        user.uid = id("-u")?;
        user.gid = id("-g")?;
        let grant = format!("{}:{SUBORDINATE_FIRST}:{SUBORDINATE_COUNT}\n", user.name);
        for (path, before) in &user.saved {
            let mut content = before.clone().unwrap_or_default();
            if !content.is_empty() && !content.ends_with(b"\n") {
                content.push(b'\n');
            }
            content.extend_from_slice(grant.as_bytes());
            fs::write(path, content).map_err(|e| format!("cannot write {path}: {e}"))?;
        }
        Ok(user)
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        if self.created {
            // The daemon's processes may take a moment to be gone; userdel refuses until then.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let deleted = Command::new("userdel")
                    .arg(&self.name)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success());
                if deleted {
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = Command::new("userdel")
                        .args(["--force", &self.name])
                        .status();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for (path, before) in &self.saved {
            let _ = match before {
                Some(content) => fs::write(path, content),
                None => fs::remove_file(path),
            };
        }
    }
}

/// Prepares a ranges test: the throwaway user and a shared directory it owns, or why not.
fn ranges_setup() -> Result<(ThrowawayUser, NobodyFixture), String> {
    if let Some(reason) = cannot_run().or_else(uidmap_unavailable) {
        return Err(reason);
    }
    let user = ThrowawayUser::create()?;
    let fixture = fixture_owned_by(user.uid, user.gid);
    Ok((user, fixture))
}

/// The launched process's child in the new user namespace. (The first child may still be the
/// process that writes the maps from outside.)
fn namespaced_server(launched: u32) -> u32 {
    let user_ns = |pid: u32| fs::read_link(format!("/proc/{pid}/ns/user")).ok();
    let ours = user_ns(std::process::id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = fs::read_to_string(format!("/proc/{launched}/task/{launched}/children"))
            .unwrap_or_default();
        let found = children
            .split_whitespace()
            .filter_map(|pid| pid.parse::<u32>().ok())
            .find(|&pid| user_ns(pid).is_some_and(|ns| Some(ns) != ours));
        if let Some(pid) = found {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "process {launched} did not fork its sandboxed server"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What `inside` (at least 1) stands for on the host under `:0:own:1: :1:FIRST:COUNT:`.
fn subordinate(inside: u32) -> u32 {
    SUBORDINATE_FIRST + inside - 1
}

#[test]
fn ranges_map_guest_users_to_the_granted_subordinate_ids() {
    let test = "ranges_map_guest_users_to_the_granted_subordinate_ids";
    let (user, fixture) = match ranges_setup() {
        Ok(setup) => setup,
        Err(reason) => {
            skip_or_fail(test, &reason);
            return;
        }
    };
    // Guest root is the user; guest ids 1.. are the subordinate range (virtiofsd's syntax, one
    // flag per range).
    let maps = [
        format!("--uid-map=:0:{}:1:", user.uid),
        format!("--uid-map=:1:{SUBORDINATE_FIRST}:{SUBORDINATE_COUNT}:"),
        format!("--gid-map=:0:{}:1:", user.gid),
        format!("--gid-map=:1:{SUBORDINATE_FIRST}:{SUBORDINATE_COUNT}:"),
    ];
    let maps: Vec<&str> = maps.iter().map(String::as_str).collect();
    // Started with a supplementary group the guest's users must not inherit.
    const LAUNCHER_GROUP: libc::gid_t = 4242;
    let mut daemon = start_in_groups(&fixture, user.uid, user.gid, vec![LAUNCHER_GROUP], &maps);
    daemon.wait_for_socket(&fixture.socket);
    let server = namespaced_server(daemon.pid());
    assert_eq!(
        host_ids(server),
        (user.uid, user.gid),
        "not running as the user"
    );
    let uid_map = fs::read_to_string(format!("/proc/{server}/uid_map")).unwrap();
    let lines: Vec<Vec<&str>> = uid_map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let own = user.uid.to_string();
    let (first, count) = (SUBORDINATE_FIRST.to_string(), SUBORDINATE_COUNT.to_string());
    assert_eq!(
        lines,
        [vec!["0", own.as_str(), "1"], vec!["1", &first, &count]],
        "{uid_map}"
    );
    // newgidmap leaves setgroups allowed for granted ranges, so berth dropped the launcher's
    // supplementary groups itself.
    let groups = |pid: u32| {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(
        groups(server),
        "",
        "the server kept the launcher's group {LAUNCHER_GROUP}"
    );
    assert_eq!(
        fs::read_to_string(format!("/proc/{server}/setgroups"))
            .unwrap()
            .trim(),
        "allow"
    );

    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let rw = libc::O_RDWR as u32;
    let (by_root, _) = queue
        .create(ROOT_ID, b"by-root", libc::S_IFREG | 0o644, rw)
        .expect("CREATE as guest root");
    assert_eq!((by_root.attr.uid, by_root.attr.gid), (0, 0));
    assert_eq!(owner(&fixture.shared.join("by-root")), (user.uid, user.gid));
    // Guest root hands a directory to guest user 1000, who creates in it.
    let home = queue.mkdir(ROOT_ID, b"home", 0o755).expect("MKDIR");
    let chown = SetattrIn {
        valid: setattr_valid::UID | setattr_valid::GID,
        uid: 1000,
        gid: 1000,
        ..Default::default()
    };
    let attr = queue.setattr(home.nodeid, &chown).expect("SETATTR chown");
    assert_eq!((attr.attr.uid, attr.attr.gid), (1000, 1000));
    assert_eq!(
        owner(&fixture.shared.join("home")),
        (subordinate(1000), subordinate(1000))
    );
    queue.set_caller(1000, 1000);
    let (by_user, _) = queue
        .create(home.nodeid, b"by-1000", libc::S_IFREG | 0o600, rw)
        .expect("CREATE as guest uid 1000");
    assert_eq!((by_user.attr.uid, by_user.attr.gid), (1000, 1000));
    assert_eq!(
        owner(&fixture.shared.join("home/by-1000")),
        (subordinate(1000), subordinate(1000)),
        "guest uid 1000 is host uid {} + 999",
        SUBORDINATE_FIRST
    );
    // Another guest user owns nothing of 1000's: the credential switch is real.
    queue.set_caller(1001, 1001);
    assert!(
        queue
            .create(home.nodeid, b"by-1001", libc::S_IFREG | 0o600, rw)
            .is_err(),
        "guest uid 1001 created a file in a 0755 directory of uid 1000"
    );
    assert!(!fixture.shared.join("home/by-1001").exists());
    daemon.assert_alive("after serving with id ranges");
    drop(queue);
    device.disconnect();
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("exit");
    assert!(status.success(), "{}", daemon.stderr());
    drop(user);
}

#[test]
fn a_range_not_granted_in_subuid_is_refused_naming_newuidmap() {
    let test = "a_range_not_granted_in_subuid_is_refused_naming_newuidmap";
    let (user, fixture) = match ranges_setup() {
        Ok(setup) => setup,
        Err(reason) => {
            skip_or_fail(test, &reason);
            return;
        }
    };
    // One id past the granted range.
    let too_far = format!(
        "--uid-map=:1:{SUBORDINATE_FIRST}:{}:",
        SUBORDINATE_COUNT + 1
    );
    let own = format!("--uid-map=:0:{}:1:", user.uid);
    let mut daemon = start_as(&fixture, user.uid, user.gid, &[&own, &too_far]);
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("berth refuses to start");
    let stderr = daemon.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let expected = format!(
        "--uid-map: `newuidmap {{pid}} 0 {} 1 1 {SUBORDINATE_FIRST} {}` exited with status 1",
        user.uid,
        SUBORDINATE_COUNT + 1
    );
    let (before, after) = expected.split_once("{pid}").unwrap();
    assert!(
        stderr.contains(before) && stderr.contains(after),
        "expected {expected:?} in:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("(uid {}) in /etc/subuid", user.uid)),
        "{stderr}"
    );
    // The gid side is checked the same way, against /etc/subgid.
    let too_far = format!("--gid-map=:1:{}:10:", SUBORDINATE_FIRST + SUBORDINATE_COUNT);
    let mut daemon = start_as(&fixture, user.uid, user.gid, &[&too_far]);
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("berth refuses to start");
    let stderr = daemon.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--gid-map: `newgidmap ") && stderr.contains("in /etc/subgid"),
        "{stderr}"
    );
    drop(user);
}

/// Runs `berth fuse ARGS --mountpoint MOUNTPOINT` as nobody; its output and stderr.
fn berth_fuse_as_nobody(mountpoint: &Path, args: &[&str]) -> (std::process::Output, String) {
    let out = unprivileged(
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("fuse")
            .args(args)
            .arg("--mountpoint")
            .arg(mountpoint),
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

#[test]
fn berth_fuse_refuses_ranges_with_a_reason() {
    let test = "berth_fuse_refuses_ranges_with_a_reason";
    if !is_root() {
        skip_or_fail(test, "needs root to run berth fuse as nobody");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (out, stderr) = berth_fuse_as_nobody(
        dir.path(),
        &[
            "--shared-dir=/tmp",
            "--uid-map=:0:65534:1:",
            "--uid-map=:1:200000:65536:",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("berth fuse cannot use --uid-map :0:65534:1: :1:200000:65536:")
            && stderr.contains("host ids"),
        "{stderr}"
    );
    // The own id under another number would make host root's files look like the caller's.
    let (out, stderr) =
        berth_fuse_as_nobody(dir.path(), &["--shared-dir=/tmp", "--uid-map=:0:65534:1:"]);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("maps your own id 65534 to itself"),
        "{stderr}"
    );
    // The user's own id mapped to itself is what berth fuse uses anyway: not refused.
    let (out, stderr) = berth_fuse_as_nobody(
        dir.path(),
        &["--shared-dir=/nonexistent/dir", "--uid-map=:65534:65534:1:"],
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains("berth fuse cannot use") && stderr.contains("/nonexistent/dir"),
        "{stderr}"
    );
}

#[test]
fn a_uid_range_with_only_the_own_gid_mixes_helper_and_direct_maps() {
    let test = "a_uid_range_with_only_the_own_gid_mixes_helper_and_direct_maps";
    let (user, fixture) = match ranges_setup() {
        Ok(setup) => setup,
        Err(reason) => {
            skip_or_fail(test, &reason);
            return;
        }
    };
    fs::set_permissions(&fixture.shared, fs::Permissions::from_mode(0o777)).unwrap();
    // The uid range goes through newuidmap, the default gid map (own gid only) is written
    // directly from outside, which needs setgroups denied first.
    let maps = [
        format!("--uid-map=:0:{}:1:", user.uid),
        format!("--uid-map=:1:{SUBORDINATE_FIRST}:{SUBORDINATE_COUNT}:"),
    ];
    let maps: Vec<&str> = maps.iter().map(String::as_str).collect();
    let mut daemon = start_in_groups(&fixture, user.uid, user.gid, vec![4242], &maps);
    daemon.wait_for_socket(&fixture.socket);
    let server = namespaced_server(daemon.pid());
    let read = |file: &str| fs::read_to_string(format!("/proc/{server}/{file}")).unwrap();
    assert_eq!(read("setgroups").trim(), "deny");
    let gid_map: Vec<String> = read("gid_map")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(gid_map, ["0", &user.gid.to_string(), "1"]);
    // The group the launcher had cannot be dropped: berth says so.
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("supplementary groups stay with every guest user"),
        "{stderr}"
    );
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    queue.set_caller(1000, 0);
    queue
        .create(
            ROOT_ID,
            b"by-1000",
            libc::S_IFREG | 0o600,
            libc::O_RDWR as u32,
        )
        .expect("CREATE as guest uid 1000");
    assert_eq!(
        owner(&fixture.shared.join("by-1000")),
        (subordinate(1000), user.gid)
    );
    drop(queue);
    device.disconnect();
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("exit");
    assert!(status.success(), "{}", daemon.stderr());
    drop(user);
}

/// Gives everyone read and write access to /dev/fuse for the life of the value, as Debian's
/// default 0666 does, when this machine has it narrower; the mode is put back when dropped.
struct DevFuseOpenToAll {
    restore: Option<u32>,
}

impl DevFuseOpenToAll {
    fn new() -> Result<Self, String> {
        let mode = fs::metadata("/dev/fuse")
            .map_err(|e| format!("no /dev/fuse: {e}"))?
            .permissions()
            .mode()
            & 0o7777;
        if mode & 0o006 == 0o006 {
            return Ok(DevFuseOpenToAll { restore: None });
        }
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(mode | 0o666))
            .map_err(|e| format!("cannot open /dev/fuse to users: {e}"))?;
        Ok(DevFuseOpenToAll {
            restore: Some(mode),
        })
    }
}

impl Drop for DevFuseOpenToAll {
    fn drop(&mut self) {
        if let Some(mode) = self.restore {
            let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(mode));
        }
    }
}

fn is_mounted(mountpoint: &Path) -> bool {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let wanted = mountpoint.to_string_lossy();
    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_ref()))
}

/// `berth fuse` started by an ordinary user: it mounts through fusermount, confines itself in
/// a user namespace mapping the user's own ids to themselves, and what the user creates
/// through the mount lands on the host as the user. Without user_allow_other in
/// /etc/fuse.conf the mount is the user's alone (and still mounts).
#[test]
fn berth_fuse_serves_an_unprivileged_user_through_fusermount() {
    let test = "berth_fuse_serves_an_unprivileged_user_through_fusermount";
    if let Some(reason) = cannot_run() {
        skip_or_fail(test, &reason);
        return;
    }
    if Command::new("fusermount3")
        .arg("--version")
        .output()
        .is_err()
    {
        skip_or_fail(test, "fusermount3 is not installed (Debian: fuse3)");
        return;
    }
    let _dev_fuse = match DevFuseOpenToAll::new() {
        Ok(guard) => guard,
        Err(reason) => {
            skip_or_fail(test, &reason);
            return;
        }
    };
    let fixture = nobody_fixture();
    let mountpoint = fixture.shared.parent().unwrap().join("mnt");
    fs::create_dir(&mountpoint).unwrap();
    std::os::unix::fs::chown(&mountpoint, Some(NOBODY), Some(NOBODY)).unwrap();
    let log = fixture.shared.parent().unwrap().join("berth.log");
    let mut berth = unprivileged(
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("fuse")
            .arg("--shared-dir")
            .arg(&fixture.shared)
            .arg("--mountpoint")
            .arg(&mountpoint),
    )
    .stdout(Stdio::null())
    .stderr(fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(&mountpoint) {
        if let Ok(Some(status)) = berth.try_wait() {
            panic!(
                "berth fuse exited ({status}) before mounting:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "berth fuse did not mount in 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let as_user = |script: &str| {
        let out = unprivileged(Command::new("sh").arg("-c").arg(script))
            .env("M", &mountpoint)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}\nberth: {}",
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(&log).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(as_user("cat \"$M/hello\""), "hello");
    as_user("echo mine > \"$M/by-user\" && mkdir \"$M/dir\" && ln -s hello \"$M/link\"");
    for made in ["by-user", "dir", "link"] {
        assert_eq!(
            owner(&fixture.shared.join(made)),
            (NOBODY, NOBODY),
            "{made} created through the mount must belong to the user on the host"
        );
    }
    assert_eq!(fs::read(fixture.shared.join("by-user")).unwrap(), b"mine\n");
    // The serving process is in its own user namespace, as nobody on the host.
    let server = serving_pid(berth.id(), true);
    let user_ns = |pid: u32| fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    assert_ne!(
        user_ns(server),
        user_ns(std::process::id()),
        "no user namespace"
    );
    assert_eq!(host_ids(server), (NOBODY, NOBODY));
    // Other users (root included) get in only where /etc/fuse.conf allows it.
    let allow_other = fs::read_to_string("/etc/fuse.conf")
        .map(|c| c.lines().any(|l| l.trim() == "user_allow_other"))
        .unwrap_or(false);
    match fs::read(mountpoint.join("hello")) {
        Ok(data) => assert!(allow_other, "root read {data:?} without user_allow_other"),
        Err(e) => {
            assert!(
                !allow_other,
                "root could not read with user_allow_other: {e}"
            );
            assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        }
    }
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(berth.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = berth.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "berth fuse ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{status}: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!is_mounted(&mountpoint), "the mount outlived berth fuse");
}

#[test]
fn berth_fuse_as_nobody_refuses_passthrough_always_before_mounting() {
    let test = "berth_fuse_as_nobody_refuses_passthrough_always_before_mounting";
    if !is_root() {
        skip_or_fail(test, "needs root to run berth fuse as nobody");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (out, stderr) =
        berth_fuse_as_nobody(dir.path(), &["--shared-dir=/tmp", "--passthrough=always"]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--passthrough always cannot be honoured")
            && stderr.contains("CAP_SYS_ADMIN in the initial user namespace"),
        "{stderr}"
    );
    assert!(
        !fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(dir.path().to_str().unwrap()),
        "it mounted anyway"
    );
}
