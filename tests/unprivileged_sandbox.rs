//! berth started by an unprivileged user: the namespace sandbox then adds a user namespace,
//! with `--uid-map` / `--gid-map` (virtiofsd's `:namespace_id:host_id:count:` syntax) saying
//! which id inside stands for the user's own. The test, as root, runs the real binary as
//! nobody (65534) and serves requests through it.

#[path = "common/frontend_util.rs"]
mod frontend_util;
#[path = "common/security_util.rs"]
mod security_util;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_frontend::fuse::ROOT_ID;
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
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls.
    unsafe {
        command.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A shared directory and socket directory nobody owns.
struct NobodyFixture {
    _root: tempfile::TempDir,
    shared: PathBuf,
    socket: PathBuf,
}

fn nobody_fixture() -> NobodyFixture {
    let root = tempfile::tempdir().unwrap();
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let shared = root.path().join("shared");
    let sockets = root.path().join("sockets");
    for dir in [&shared, &sockets] {
        fs::create_dir(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    fs::write(shared.join("hello"), b"hello").unwrap();
    std::os::unix::fs::chown(shared.join("hello"), Some(NOBODY), Some(NOBODY)).unwrap();
    NobodyFixture {
        socket: sockets.join("vfs.sock"),
        shared,
        _root: root,
    }
}

fn start_as_nobody(fixture: &NobodyFixture, extra: &[&str]) -> Daemon {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--socket-path".into(),
        fixture.socket.clone().into(),
        "--shared-dir".into(),
        fixture.shared.clone().into(),
    ];
    args.extend(extra.iter().map(Into::into));
    Daemon::spawn_with(args, |command| {
        unprivileged(command);
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
    if let Some(reason) = cannot_run() {
        skip_or_fail(test, &reason);
        return;
    }
    let fixture = nobody_fixture();
    let mut daemon = start_as_nobody(&fixture, &["--uid-map=:0:0:1:"]);
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("berth refuses to start");
    assert_eq!(status.code(), Some(1), "{}", daemon.stderr());
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("--uid-map") && stderr.contains("its own id 65534"),
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
