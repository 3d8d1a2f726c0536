//! The exact command lines container runtimes use to start a virtiofsd-compatible daemon, each
//! checked end to end: the daemon starts and answers FUSE_INIT through the berth-frontend.
//! Also: rejected flags exit with code 2 and say why, and `--print-capabilities` prints JSON.
//!
//! `BERTH_TEST_DAEMON=/path/to/virtiofsd` points the invocation tests at another daemon (see
//! tests/common/frontend_util.rs); tests of berth-only behaviour then skip.

#[path = "common/frontend_util.rs"]
mod frontend_util;

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use berth_frontend::fuse::ROOT_ID;
use berth_frontend::VhostUserFs;
use frontend_util::*;

/// Connects over `stream`, sends FUSE_INIT and a GETATTR of the root.
fn assert_answers_init(daemon: &mut Daemon, stream: UnixStream, shared: &Path) {
    let mut device = match VhostUserFs::from_stream(stream, test_config(1)) {
        Ok(device) => device,
        Err(err) => {
            let status = daemon.wait_exit(Duration::from_millis(200));
            panic!(
                "vhost-user setup failed: {err} (daemon: {})\n--- daemon stderr ---\n{}",
                status.map_or("running".into(), describe_status),
                daemon.stderr()
            );
        }
    };
    let mut queue = init_first_queue(&mut device);
    let root = queue.getattr(ROOT_ID).expect("GETATTR root");
    let meta = std::fs::metadata(shared).unwrap();
    assert_eq!(
        u64::from(root.attr.mode),
        u64::from(std::os::unix::fs::MetadataExt::mode(&meta))
    );
    daemon.assert_alive("after FUSE_INIT");
}

fn connect_path(daemon: &mut Daemon, socket: &Path) -> UnixStream {
    daemon.wait_for_socket(socket);
    UnixStream::connect(socket).unwrap_or_else(|e| {
        panic!(
            "connect {}: {e}\n--- daemon stderr ---\n{}",
            socket.display(),
            daemon.stderr()
        )
    })
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

#[test]
fn kata_go_runtime_invocation_with_inherited_fd() {
    if !Path::new("/dev/log").exists() {
        eprintln!("note: no /dev/log here; --syslog must not stop the daemon from running");
    }
    let fixture = Fixture::new();
    let listener = UnixListener::bind(&fixture.socket).expect("bind listening socket");
    let listener_fd = listener.as_raw_fd();
    let shared = format!("--shared-dir={}", fixture.shared.display());
    let mut daemon = Daemon::spawn_with(
        args(&[
            "--syslog",
            "--cache=auto",
            &shared,
            "--fd=3",
            "--thread-pool-size=1",
            "--announce-submounts",
        ]),
        |command| {
            // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) are made.
            unsafe {
                command.pre_exec(move || {
                    if listener_fd == 3 {
                        // dup2 onto itself would keep close-on-exec; clear it instead.
                        if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(listener_fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    // The daemon owns the listening socket now; ours would only compete for connections.
    drop(listener);
    let stream = UnixStream::connect(&fixture.socket).expect("connect to the fd-3 socket");
    assert_answers_init(&mut daemon, stream, &fixture.shared);
}

#[test]
fn kata_runtime_rs_invocation() {
    let fixture = Fixture::new();
    let socket = fixture.socket.to_str().unwrap().to_owned();
    let shared = fixture.shared.to_str().unwrap().to_owned();
    let mut daemon = Daemon::spawn(args(&[
        "--socket-path",
        &socket,
        "--shared-dir",
        &shared,
        "--cache",
        "auto",
        "--thread-pool-size=1",
        "-o",
        "announce_submounts",
        "--xattr",
    ]));
    let stream = connect_path(&mut daemon, &fixture.socket);
    assert_answers_init(&mut daemon, stream, &fixture.shared);
}

#[test]
fn legacy_dash_o_source_invocation() {
    let fixture = Fixture::new();
    let options = format!(
        "source={},cache=auto,xattr,announce_submounts",
        fixture.shared.display()
    );
    let socket = fixture.socket.to_str().unwrap().to_owned();
    let mut daemon = Daemon::spawn(args(&["-o", &options, "--socket-path", &socket]));
    let stream = connect_path(&mut daemon, &fixture.socket);
    assert_answers_init(&mut daemon, stream, &fixture.shared);
}

/// Runs the daemon to completion with `extra` flags after a valid base command line.
fn run_to_exit(extra: &[&str]) -> (Output, Fixture) {
    let fixture = Fixture::new();
    let (binary, _) = daemon_binary();
    let mut child = Command::new(binary)
        .args(fixture.basic_args())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn daemon");
    // A daemon that wrongly accepts the flags would wait for a frontend forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while child.try_wait().expect("query status").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("collect output");
            panic!(
                "daemon kept running with {extra:?}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().expect("collect output"), fixture)
}

fn assert_usage_error(test: &str, extra: &[&str], must_mention: &[&str]) {
    if !testing_berth() {
        skip_by_design(&format!("{test} checks berth's own flag handling"));
        return;
    }
    let (output, _fixture) = run_to_exit(extra);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{extra:?} should exit with code 2\n--- stderr ---\n{stderr}"
    );
    for word in must_mention {
        assert!(
            stderr.contains(word),
            "stderr for {extra:?} should mention {word:?}:\n{stderr}"
        );
    }
}

#[test]
fn unknown_flag_is_a_usage_error() {
    assert_usage_error(
        "unknown_flag_is_a_usage_error",
        &["--no-such-flag"],
        &["--no-such-flag"],
    );
}

#[test]
fn conflicting_flags_are_a_usage_error() {
    assert_usage_error(
        "conflicting_flags_are_a_usage_error",
        &["--announce-submounts", "--no-announce-submounts"],
        &["announce-submounts"],
    );
}

#[test]
fn malformed_xattrmaps_are_usage_errors_naming_the_rule() {
    let test = "malformed_xattrmaps_are_usage_errors_naming_the_rule";
    assert_usage_error(
        test,
        &[
            "--xattr",
            "--xattrmap=:ok:client:user.:: :prefix:everywhere:::",
        ],
        &[
            "--xattrmap",
            "rule 2",
            ":prefix:everywhere:::",
            "unknown scope 'everywhere'",
        ],
    );
    assert_usage_error(
        test,
        &["--xattrmap", ":prefix:all:trusted.:user.vm."],
        &["rule 1", "separator ':'"],
    );
    assert_usage_error(
        test,
        &["-o", "xattrmap=:map::user.virtiofs.: :ok:all:::"],
        &["-o xattrmap", "must be the last rule"],
    );
    assert_usage_error(
        test,
        &["--xattrmap=:map::user.a.:", "-o", "xattrmap=:map::user.b.:"],
        &["conflicting", "xattrmap"],
    );
}

/// Starts the daemon with `extra` isolation flags and checks it serves the share.
fn serves_with(extra: &[&str]) {
    let fixture = Fixture::new();
    let socket = fixture.socket.to_str().unwrap().to_owned();
    let shared = fixture.shared.to_str().unwrap().to_owned();
    let mut all = vec!["--socket-path", &socket, "--shared-dir", &shared];
    all.extend_from_slice(extra);
    let mut daemon = Daemon::spawn(args(&all));
    let stream = connect_path(&mut daemon, &fixture.socket);
    assert_answers_init(&mut daemon, stream, &fixture.shared);
}

/// Whether a berth-only test that needs root can run: prints why not (a failure under
/// `BERTH_TESTS_NO_SKIP=1` when root is what is missing).
fn berth_as_root() -> bool {
    if !testing_berth() {
        skip_by_design("checks berth's own sandbox");
        return false;
    }
    if !running_as_root() {
        skip("needs root");
        return false;
    }
    true
}

#[test]
fn namespace_sandbox_with_seccomp_kill_serves() {
    if !berth_as_root() {
        return;
    }
    serves_with(&["--sandbox", "namespace", "--seccomp", "kill"]);
}

#[test]
fn chroot_sandbox_with_modcaps_serves() {
    if !berth_as_root() {
        return;
    }
    serves_with(&["--sandbox=chroot", "--seccomp=log", "--modcaps=-mknod"]);
}

#[test]
fn unknown_isolation_values_are_usage_errors() {
    assert_usage_error(
        "unknown_isolation_values_are_usage_errors",
        &["--sandbox", "jail"],
        &["jail"],
    );
    assert_usage_error(
        "unknown_isolation_values_are_usage_errors",
        &["--seccomp", "maybe"],
        &["maybe"],
    );
    assert_usage_error(
        "unknown_isolation_values_are_usage_errors",
        &["--modcaps", "+no_such_capability"],
        &["modcaps"],
    );
}

#[test]
fn print_capabilities_is_json_of_type_fs() {
    let (binary, _) = daemon_binary();
    let output = Command::new(binary)
        .arg("--print-capabilities")
        .stdin(Stdio::null())
        .output()
        .expect("run --print-capabilities");
    assert!(
        output.status.success(),
        "--print-capabilities failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "--print-capabilities printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(json["type"], "fs", "capabilities: {json}");
}

/// A regular file in the shared directory at the socket's own path, as seen from inside the
/// sandbox (where the shared directory is `/`): removing the socket by path there would hit it.
fn plant_decoy(fixture: &Fixture) -> std::path::PathBuf {
    let relative = fixture
        .socket
        .strip_prefix("/")
        .expect("absolute socket path");
    let decoy = fixture.shared.join(relative);
    std::fs::create_dir_all(decoy.parent().unwrap()).unwrap();
    std::fs::write(&decoy, b"a guest's file").unwrap();
    decoy
}

fn connected_daemon(fixture: &Fixture) -> (Daemon, VhostUserFs) {
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    queue.getattr(ROOT_ID).expect("GETATTR");
    (daemon, device)
}

#[test]
fn sigterm_on_a_connected_daemon_exits_zero_and_removes_the_socket() {
    if !testing_berth() {
        skip_by_design("virtiofsd exits 1 on SIGTERM; berth exits 0");
        return;
    }
    let fixture = Fixture::new();
    let decoy = plant_decoy(&fixture);
    let (mut daemon, _device) = connected_daemon(&fixture);
    // SAFETY: kill has no memory-safety preconditions; the pid is our un-reaped child.
    assert_eq!(
        unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status = daemon
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM\n{}", daemon.stderr()));
    assert!(
        status.success(),
        "exit after SIGTERM: {}\n--- daemon stderr ---\n{}",
        describe_status(status),
        daemon.stderr()
    );
    assert!(
        !fixture.socket.exists(),
        "the socket file is removed (the daemon ran in the namespace sandbox)\n{}",
        daemon.stderr()
    );
    assert_eq!(std::fs::read(&decoy).unwrap(), b"a guest's file");
}

#[test]
fn disconnect_removes_the_socket_and_no_guest_file() {
    let fixture = Fixture::new();
    let decoy = plant_decoy(&fixture);
    let (mut daemon, device) = connected_daemon(&fixture);
    device.disconnect();
    let status = daemon.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "still running 5 s after the disconnect\n{}",
            daemon.stderr()
        )
    });
    assert!(status.success(), "{}", describe_status(status));
    assert_eq!(
        std::fs::read(&decoy).unwrap(),
        b"a guest's file",
        "the file at the socket's path inside the shared directory is untouched"
    );
    if testing_berth() {
        assert!(!fixture.socket.exists(), "the socket file is removed");
    }
}

#[test]
fn an_ordinary_start_logs_no_warning() {
    if !testing_berth() {
        skip_by_design("berth's own log");
        return;
    }
    let fixture = Fixture::new();
    // As an operator starts it: no RUST_LOG, so berth's default level (info).
    let mut daemon = Daemon::spawn_with(fixture.basic_args(), |command| {
        command.env_remove("RUST_LOG");
    });
    daemon.wait_for_socket(&fixture.socket);
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    queue.getattr(ROOT_ID).expect("GETATTR");
    drop(queue);
    device.disconnect();
    let status = daemon
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running after the disconnect\n{}", daemon.stderr()));
    assert!(status.success(), "{}", describe_status(status));
    let log = daemon.stderr();
    assert!(
        log.contains("INFO"),
        "the daemon logs at its default level: {log}"
    );
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .collect();
    assert!(
        warnings.is_empty(),
        "a start, a session and a disconnect log no warning:\n{}",
        warnings.join("\n")
    );
}

#[test]
fn print_capabilities_lists_the_features() {
    let (binary, _) = daemon_binary();
    let output = Command::new(binary)
        .arg("--print-capabilities")
        .stdin(Stdio::null())
        .output()
        .expect("run --print-capabilities");
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let features: Vec<&str> = json["features"]
        .as_array()
        .unwrap_or_else(|| panic!("no features array in {json}"))
        .iter()
        .map(|f| {
            f.as_str()
                .unwrap_or_else(|| panic!("feature {f} is not a string"))
        })
        .collect();
    for wanted in [
        "posix-acl-negotiation-mode",
        "security-label-negotiation-mode",
        "separate-options",
    ] {
        assert!(
            features.contains(&wanted),
            "{wanted} missing from {features:?}"
        );
    }
    if testing_berth() {
        // berth migrates (dirty logging and device state) and offers a DAX window with a
        // per-file policy, and says so; nothing more.
        for wanted in ["migrate-precopy", "dax-window", "dax-policy"] {
            assert!(
                features.contains(&wanted),
                "{wanted} missing from {features:?}"
            );
        }
        assert_eq!(features.len(), 6, "{features:?}");
    }
}

/// Some group of this machine other than the caller's own, with its gid.
fn another_group() -> Option<(String, u32)> {
    // SAFETY: getegid has no preconditions.
    let own = unsafe { libc::getegid() };
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let gid: u32 = fields.nth(1)?.parse().ok()?;
        (gid != own && !name.is_empty()).then(|| (name.to_owned(), gid))
    })
}

#[test]
fn socket_group_owns_the_socket() {
    if !running_as_root() {
        skip("giving the socket to another group needs root");
        return;
    }
    let Some((group, gid)) = another_group() else {
        skip("/etc/group lists no group but the caller's");
        return;
    };
    let mut spellings = vec![group.clone()];
    if testing_berth() {
        // A numeric group is berth's addition (virtiofsd looks up names only).
        spellings.push(gid.to_string());
    }
    for spelling in spellings {
        let fixture = Fixture::new();
        let mut args = fixture.basic_args();
        args.push("--socket-group".into());
        args.push(spelling.clone().into());
        let mut daemon = Daemon::spawn(args);
        daemon.wait_for_socket(&fixture.socket);
        let meta = std::fs::symlink_metadata(&fixture.socket).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::gid(&meta),
            gid,
            "--socket-group {spelling}"
        );
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o770,
            "owner and group may connect, others not (--socket-group {spelling})"
        );
        let stream = UnixStream::connect(&fixture.socket).expect("connect");
        assert_answers_init(&mut daemon, stream, &fixture.shared);
    }
    // Without the flag the socket is the owner's alone.
    let fixture = Fixture::new();
    let _daemon = fixture.start_daemon();
    let meta = std::fs::symlink_metadata(&fixture.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o700
    );
}

#[test]
fn unknown_socket_group_is_refused() {
    if !testing_berth() {
        skip_by_design("checks berth's message");
        return;
    }
    let (output, fixture) = run_to_exit(&["--socket-group", "no-such-group-berth"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no-such-group-berth"), "{stderr}");
    assert!(!fixture.socket.exists(), "no socket is left behind");
}

#[test]
fn legacy_sandbox_option_contradicting_the_flag_is_a_usage_error() {
    assert_usage_error(
        "legacy_sandbox_option_contradicting_the_flag_is_a_usage_error",
        &["--sandbox", "none", "-o", "sandbox=chroot"],
        &["--sandbox none", "sandbox=chroot"],
    );
    assert_usage_error(
        "legacy_sandbox_option_contradicting_the_flag_is_a_usage_error",
        &["--modcaps", "+sys_admin", "-o", "modcaps=-mknod"],
        &["modcaps"],
    );
}

#[test]
fn a_closed_stderr_does_not_stop_the_daemon() {
    // An operator's `berth ... 2>&1 | head` or a log collector that went away: every log line
    // then fails to write, and the daemon must keep serving regardless.
    let fixture = Fixture::new();
    let socket = fixture.socket.to_str().unwrap().to_owned();
    let shared = fixture.shared.to_str().unwrap().to_owned();
    let mut pipe = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here; the read end is closed at
    // once so that every write to the other end fails with EPIPE.
    let write_end = unsafe {
        libc::close(pipe[0]);
        std::os::fd::OwnedFd::from_raw_fd(pipe[1])
    };
    let mut daemon = Daemon::spawn_with(
        args(&[
            "--socket-path",
            &socket,
            "--shared-dir",
            &shared,
            "--log-level",
            "debug",
        ]),
        |command| {
            command.stderr(Stdio::from(write_end));
        },
    );
    let stream = connect_path(&mut daemon, &fixture.socket);
    let mut device = VhostUserFs::from_stream(stream, test_config(1)).expect("vhost-user set-up");
    let mut queue = init_first_queue(&mut device);
    for _ in 0..50 {
        queue.getattr(ROOT_ID).expect("GETATTR with stderr closed");
    }
    daemon.assert_alive("after logging into a closed pipe");
}
