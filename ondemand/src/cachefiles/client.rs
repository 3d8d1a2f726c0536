//! `berth mount --mode fscache`: hands an image to the host's cachefiles server (started
//! here if none runs), keeps it mounted until told to stop, then unmounts it.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::protocol::{ClientRequest, ImageSpec, ServerReply};
use super::server::SOCKET_NAME;
use crate::error::{IoContext, OndemandError, Result};
use crate::ipc;
use crate::supervise::{ShutdownSignal, WorkerCommand};

/// The log of a server `berth mount` started, inside the cachefiles directory.
pub const SERVER_LOG_NAME: &str = "berth-fscache.log";

fn protocol_error(message: impl Into<String>) -> OndemandError {
    OndemandError::Io {
        context: message.into(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    }
}

/// Connects to the server of `cachefiles_dir`.
pub fn connect(cachefiles_dir: &Path) -> std::io::Result<OwnedFd> {
    ipc::connect(&cachefiles_dir.join(SOCKET_NAME))
}

/// Sends `request` and waits for the answer.
pub fn call(socket: &OwnedFd, request: &ClientRequest) -> Result<ServerReply> {
    ipc::send(socket.as_raw_fd(), request, None)
        .context(|| "talking to the cachefiles server".into())?;
    match ipc::receive::<ServerReply>(socket.as_raw_fd())
        .context(|| "talking to the cachefiles server".into())?
    {
        Some((reply, _)) => Ok(reply),
        None => Err(protocol_error(
            "talking to the cachefiles server (it went away)",
        )),
    }
}

/// Connects to the server of `cachefiles_dir`, starting `server` (in its own session,
/// logging to [`SERVER_LOG_NAME`] in that directory) when none answers.
pub fn connect_or_start(cachefiles_dir: &Path, server: &WorkerCommand) -> Result<OwnedFd> {
    if let Ok(socket) = connect(cachefiles_dir) {
        return Ok(socket);
    }
    std::fs::create_dir_all(cachefiles_dir)
        .context(|| format!("creating {}", cachefiles_dir.display()))?;
    let log_path = cachefiles_dir.join(SERVER_LOG_NAME);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .context(|| format!("opening {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .context(|| format!("opening {}", log_path.display()))?;
    let mut command = Command::new(&server.program);
    command
        .args(&server.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // The server serves every image of the host: it must not get this process's
        // service-manager notifications or terminal signals.
        .env_remove("NOTIFY_SOCKET")
        .process_group(0);
    let mut child = command.spawn().map_err(|e| OndemandError::Command {
        command: format!("{} fscache", server.program.display()),
        message: e.to_string(),
    })?;
    tracing::info!(pid = child.id(), log = %log_path.display(), "started a cachefiles server");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(socket) = connect(cachefiles_dir) {
            // Reaped by init once we exit; the server outlives this process.
            std::mem::forget(child);
            return Ok(socket);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(OndemandError::Command {
                command: format!("{} fscache", server.program.display()),
                message: format!("the server exited ({status}): {}", tail.join(" | ")),
            });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(protocol_error(format!(
                "waiting for the cachefiles server to listen on {}",
                cachefiles_dir.join(SOCKET_NAME).display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Mounts `spec` through the server and keeps it until `shutdown` fires; then unmounts
/// it (retrying while it is busy). Returns the fsid it was mounted with.
pub fn mount_until_stopped(
    cachefiles_dir: &Path,
    server: &WorkerCommand,
    spec: ImageSpec,
    shutdown: &ShutdownSignal,
) -> Result<String> {
    let socket = connect_or_start(cachefiles_dir, server)?;
    let fsid = match call(&socket, &ClientRequest::Mount(spec.clone()))? {
        ServerReply::Mounted { fsid, already } => {
            tracing::info!(
                fsid = %fsid,
                "{} {} on {} (cachefiles on-demand mode)",
                if already { "already serving" } else { "mounted" },
                spec.image.display(),
                spec.mountpoint.display()
            );
            fsid
        }
        ServerReply::Error(message) => {
            return Err(OndemandError::Command {
                command: "berth fscache (mount)".into(),
                message,
            })
        }
        other => return Err(protocol_error(format!("unexpected answer {other:?}"))),
    };
    let mut socket = Some(socket);
    // Serve until told to stop; the server keeps the image if this process dies.
    loop {
        if ipc::wait_readable(shutdown.raw(), 500) && shutdown.triggered() {
            break;
        }
        if let Some(s) = &socket {
            if ipc::wait_readable(s.as_raw_fd(), 0) {
                tracing::warn!("the cachefiles server went away; the image stays mounted as long as it is served");
                socket = None;
            }
        }
    }
    let mut told_busy = false;
    loop {
        let connected = match socket.take() {
            Some(s) => Some(s),
            None => connect(cachefiles_dir).ok(),
        };
        let reply = match &connected {
            Some(s) => call(
                s,
                &ClientRequest::Unmount {
                    mountpoint: spec.mountpoint.clone(),
                },
            ),
            None => Err(protocol_error("no cachefiles server answers")),
        };
        socket = connected;
        match reply {
            Ok(ServerReply::Unmounted) => return Ok(fsid),
            Ok(ServerReply::Busy) => {
                if !told_busy {
                    tracing::warn!(
                        "{} is busy; it stays mounted and served until the files open in it are closed",
                        spec.mountpoint.display()
                    );
                    told_busy = true;
                }
            }
            Ok(ServerReply::Error(message)) => {
                return Err(OndemandError::Command {
                    command: "berth fscache (unmount)".into(),
                    message,
                })
            }
            Ok(other) => return Err(protocol_error(format!("unexpected answer {other:?}"))),
            Err(err) => {
                tracing::warn!("cannot ask for the unmount yet: {err}");
                socket = None;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The absolute form of `path` (for requests to a server with another working
/// directory).
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).context(|| format!("resolving {}", path.display()))
}
