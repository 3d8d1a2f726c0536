//! Starting a vhost-user-fs daemon and reading its resource use from /proc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Which backend a run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Berth,
    Virtiofsd,
    Native,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Berth => "berth",
            Backend::Virtiofsd => "virtiofsd",
            Backend::Native => "native",
        }
    }
}

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct DaemonCommand {
    pub backend: Backend,
    pub binary: PathBuf,
    pub thread_pool_size: usize,
    pub extra_args: Vec<String>,
}

impl DaemonCommand {
    fn command(&self, socket: &Path, shared: &Path) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--cache", "auto"])
            .arg(format!("--thread-pool-size={}", self.thread_pool_size));
        // Both daemons keep their default confinement (namespace sandbox, seccomp kill), as a
        // host runs them; the serving process is then the sandbox's child (`serving_pid`).
        if self.backend == Backend::Virtiofsd {
            command.args(["--log-level", "error"]);
        } else {
            command.args(["--log-level", "warn"]);
        }
        if !self
            .extra_args
            .iter()
            .any(|a| a.starts_with("--inode-file-handles"))
        {
            command.arg("--inode-file-handles=prefer");
        }
        command.args(&self.extra_args);
        command
    }
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn spawn(spec: &DaemonCommand, socket: &Path, shared: &Path) -> Result<Self> {
        let child = start_listening(spec.command(socket, shared), socket, &spec.binary)?;
        Ok(Self {
            child,
            socket: socket.to_owned(),
        })
    }

    /// The process that serves requests: with a namespace sandbox both berth and virtiofsd
    /// fork, and the started process only waits for its child; without one it serves itself.
    /// Resolved at every call, since the child appears only once the sandbox is set up.
    pub fn serving_pid(&self) -> u32 {
        serving_pid(self.child.id())
    }

    /// Waits for the daemon to exit on its own (it should once the frontend disconnects),
    /// then kills it.
    pub fn finish(mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The first child of `pid`, or `pid` itself when it has none.
/// Waits (10 s at most) for a just started daemon to create its socket; fails if it exits
/// first.
/// Starts a daemon that listens on `socket` (a stale one removed first), stdin and stdout
/// closed, and waits for the socket to appear. If it does not, the daemon is killed and the
/// socket removed, as dropping a started daemon does.
pub fn start_listening(mut command: Command, socket: &Path, binary: &Path) -> Result<Child> {
    let _ = std::fs::remove_file(socket);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    if let Err(err) = wait_for_socket(&mut child, socket, binary) {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(socket);
        return Err(err);
    }
    Ok(child)
}

fn wait_for_socket(child: &mut Child, socket: &Path, binary: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("{} exited at start: {status}", binary.display());
        }
        if Instant::now() > deadline {
            bail!("{} did not create its socket", binary.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

pub fn serving_pid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|children| children.split_whitespace().next()?.parse().ok())
        .unwrap_or(pid)
}

/// Resource figures of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// utime + stime of all threads, in seconds.
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub fds: u64,
}

pub fn sample(pid: u32) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields are counted after its closing parenthesis.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/<pid>/stat")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(ProcSample {
        cpu_seconds: ticks as f64 / hz,
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        fds,
    })
}
