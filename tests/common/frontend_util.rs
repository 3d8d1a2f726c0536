//! Helpers shared by the vhost-user protocol and CLI tests: start a daemon, connect the
//! berth-frontend to it, build a shared-directory fixture.
//!
//! Set `BERTH_TEST_DAEMON=/path/to/virtiofsd` to run the same tests against another
//! virtiofsd-compatible daemon; it is then started with `--sandbox none --seccomp none`, and
//! tests of berth-only behaviour skip with a printed reason (never a failure, even under
//! `BERTH_TESTS_NO_SKIP=1`, which turns only skips for a missing machine feature into failures).

#![allow(dead_code)]

#[path = "skip.rs"]
mod skip;

#[allow(unused_imports)]
pub use skip::{skip, skip_by_design, skips_forbidden};

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use berth_frontend::{Completion, DeviceConfig, FsQueue, Request, VhostUserFs};

/// Environment variable naming an alternative daemon binary to test.
pub const DAEMON_OVERRIDE_ENV: &str = "BERTH_TEST_DAEMON";

/// How long a daemon gets to create its socket.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon binary under test and whether it is berth itself.
pub fn daemon_binary() -> (PathBuf, bool) {
    match std::env::var_os(DAEMON_OVERRIDE_ENV) {
        Some(path) if !path.is_empty() => (PathBuf::from(path), false),
        _ => (PathBuf::from(env!("CARGO_BIN_EXE_berth")), true),
    }
}

/// True when the tests run against berth rather than an override.
pub fn testing_berth() -> bool {
    daemon_binary().1
}

/// Flags an override daemon needs to run unprivileged-in-test (virtiofsd sandboxes itself by
/// default, which needs namespaces and a seccomp filter that a test harness cannot offer).
pub fn override_extra_args() -> Vec<OsString> {
    if testing_berth() {
        Vec::new()
    } else {
        ["--sandbox", "none", "--seccomp", "none"]
            .iter()
            .map(OsString::from)
            .collect()
    }
}

/// A daemon child process, killed when dropped.
pub struct Daemon {
    child: Child,
    stderr_path: PathBuf,
    /// Keeps the socket directory alive as long as the daemon.
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon under test with `args` (plus any override flags), stdout and stderr
    /// captured to files.
    pub fn spawn<I, S>(args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with(args, |_| {})
    }

    /// Like [`Daemon::spawn`], letting the caller adjust the command (e.g. to pass an fd).
    pub fn spawn_with<I, S>(args: I, adjust: impl FnOnce(&mut Command)) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let dir = tempfile::tempdir().expect("create daemon log dir");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = fs::File::create(&stderr_path).expect("create stderr log");
        let (binary, _) = daemon_binary();
        let mut command = Command::new(&binary);
        command
            .args(args)
            .args(override_extra_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        adjust(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        Daemon {
            child,
            stderr_path,
            _dir: dir,
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.stderr_path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// `None` while the daemon runs, its exit status once it exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("query daemon status")
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics with the daemon's stderr unless it is still running.
    pub fn assert_alive(&mut self, context: &str) {
        if let Some(status) = self.try_status() {
            panic!(
                "daemon died {context}: {}\n--- daemon stderr ---\n{}",
                describe_status(status),
                self.stderr()
            );
        }
    }

    /// Waits until `socket` exists (the daemon is listening) or the daemon exits.
    pub fn wait_for_socket(&mut self, socket: &Path) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while !socket.exists() {
            if let Some(status) = self.try_status() {
                panic!(
                    "daemon exited before creating {}: {}\n--- daemon stderr ---\n{}",
                    socket.display(),
                    describe_status(status),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not create {} within {STARTUP_TIMEOUT:?}\n--- daemon stderr ---\n{}",
                socket.display(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Exit code or signal, for messages.
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "unknown status".into(),
    }
}

/// A temporary shared directory plus a socket path next to it.
pub struct Fixture {
    pub root: tempfile::TempDir,
    pub shared: PathBuf,
    pub socket: PathBuf,
}

/// Contents of the fixture's files, for comparisons.
pub const HELLO_CONTENT: &[u8] = b"hello from the host\n";
pub const INNER_CONTENT: &[u8] = b"inner file\n";
/// Size of `big.bin`: larger than one 128 KiB request so reads take several chunks.
pub const BIG_SIZE: usize = 300 * 1024 + 123;

/// Deterministic content of `big.bin`.
pub fn big_content() -> Vec<u8> {
    (0..BIG_SIZE)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}

impl Fixture {
    /// Creates `shared/` with hello.txt, big.bin, mode640.txt and sub/inner.txt.
    pub fn new() -> Fixture {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("create fixture dir");
        let shared = root.path().join("shared");
        fs::create_dir(&shared).expect("create shared dir");
        fs::write(shared.join("hello.txt"), HELLO_CONTENT).expect("write hello.txt");
        fs::write(shared.join("big.bin"), big_content()).expect("write big.bin");
        fs::write(shared.join("mode640.txt"), b"x").expect("write mode640.txt");
        fs::set_permissions(
            shared.join("mode640.txt"),
            fs::Permissions::from_mode(0o640),
        )
        .expect("chmod mode640.txt");
        fs::create_dir(shared.join("sub")).expect("create sub");
        fs::write(shared.join("sub/inner.txt"), INNER_CONTENT).expect("write inner.txt");
        let socket = root.path().join("vhost.sock");
        Fixture {
            root,
            shared,
            socket,
        }
    }

    /// `--socket-path SOCK --shared-dir DIR`, the minimal invocation.
    pub fn basic_args(&self) -> Vec<OsString> {
        vec![
            "--socket-path".into(),
            self.socket.clone().into(),
            "--shared-dir".into(),
            self.shared.clone().into(),
        ]
    }

    /// Starts the daemon with `basic_args()` and waits for its socket.
    pub fn start_daemon(&self) -> Daemon {
        let mut daemon = Daemon::spawn(self.basic_args());
        daemon.wait_for_socket(&self.socket);
        daemon
    }
}

/// Test-sized device settings: 64 MiB of guest RAM, 5 s timeouts.
pub fn test_config(request_queues: u16) -> DeviceConfig {
    let mut config = DeviceConfig {
        memory_size: 64 << 20,
        request_queues,
        ..DeviceConfig::default()
    };
    config.queue.depth = 16;
    config.queue.size = 64;
    config.queue.timeout = Duration::from_secs(5);
    config
}

/// Connects to the daemon's socket and sets up `request_queues` request queues.
pub fn connect(daemon: &mut Daemon, socket: &Path, request_queues: u16) -> VhostUserFs {
    connect_with(daemon, socket, test_config(request_queues))
}

/// Connects to the daemon's socket with explicit device settings.
pub fn connect_with(daemon: &mut Daemon, socket: &Path, config: DeviceConfig) -> VhostUserFs {
    match VhostUserFs::connect(socket, config, STARTUP_TIMEOUT) {
        Ok(device) => device,
        Err(err) => {
            let status = daemon.wait_exit(Duration::from_millis(200));
            panic!(
                "vhost-user setup failed: {err}\n(daemon status: {})\n--- daemon stderr ---\n{}",
                status.map_or("running".into(), describe_status),
                daemon.stderr()
            );
        }
    }
}

/// Takes request queue 1 and sends FUSE_INIT on it.
pub fn init_first_queue(device: &mut VhostUserFs) -> FsQueue {
    let mut queue = device
        .take_request_queue(1)
        .expect("request queue 1 exists");
    let init = queue.init_default().expect("FUSE_INIT");
    assert_eq!(init.major, 7, "FUSE major version");
    queue
}

/// Whether the tests run as root.
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sends one FUSE request with no payload, `args` as its arguments and room for a `reply` of
/// that many bytes, and fails on an error reply.
pub fn call(
    queue: &mut FsQueue,
    op: u32,
    nodeid: u64,
    args: &[&[u8]],
    reply: u32,
) -> Result<Completion, berth_frontend::Error> {
    queue
        .call(&Request {
            opcode: op,
            nodeid,
            args,
            payload: &[],
            reply_capacity: Some(reply),
        })?
        .check()
}
