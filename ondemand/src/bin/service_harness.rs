//! berth-service-harness: runs a command the way systemd runs a `Type=notify` service
//! with `FileDescriptorStoreMax=` and `Restart=on-failure`, for tests (and hosts without
//! systemd): it listens on `NOTIFY_SOCKET`, keeps the descriptors the service stores
//! (`FDSTORE=1`, `FDNAME=`), and when the service dies from a signal or exits non-zero it
//! starts it again with them (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`). It exits
//! with the service's status once the service exits 0 (or after `--max-restarts`).
//! SIGTERM and SIGINT are passed on to the service.
//!
//! Usage: berth-service-harness [--max-restarts N] -- COMMAND [ARGS...]
//! Each start is announced on stderr as `harness: started pid N (start K)`.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use berth_ondemand::ipc;

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, signal) };
    }
}

fn datagram_socket(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zero is valid.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, &byte) in address.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *slot = byte as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.as_os_str().len() + 1;
    // SAFETY: binds our socket to a valid address of length `len`.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

/// Applies one notification to the store.
fn notification(text: &str, fd: Option<OwnedFd>, store: &mut BTreeMap<String, OwnedFd>) {
    let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let name = fields
        .get("FDNAME")
        .copied()
        .unwrap_or("stored")
        .to_string();
    if fields.get("FDSTORE") == Some(&"1") {
        if let Some(fd) = fd {
            eprintln!("harness: stored descriptor {name}");
            store.insert(name, fd);
        }
    } else if fields.get("FDSTOREREMOVE") == Some(&"1") {
        eprintln!("harness: removed descriptor {name}");
        store.remove(&name);
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut max_restarts = 10u32;
    if args.first().map(String::as_str) == Some("--max-restarts") && args.len() > 1 {
        max_restarts = args[1].parse().unwrap_or(10);
        args.drain(..2);
    }
    if args.first().map(String::as_str) == Some("--") {
        args.remove(0);
    }
    if args.is_empty() {
        eprintln!("usage: berth-service-harness [--max-restarts N] -- COMMAND [ARGS...]");
        return ExitCode::from(2);
    }
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(err) => {
            eprintln!("harness: {err}");
            return ExitCode::FAILURE;
        }
    };
    let path = dir.path().join("notify");
    let socket = match datagram_socket(&path) {
        Ok(socket) => socket,
        Err(err) => {
            eprintln!("harness: cannot create {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
    };
    ipc::set_nonblocking(socket.as_raw_fd(), true);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs an async-signal-safe handler.
        unsafe { libc::signal(signal, forward as *const () as libc::sighandler_t) };
    }
    let mut store: BTreeMap<String, OwnedFd> = BTreeMap::new();
    let mut starts = 0u32;
    loop {
        starts += 1;
        let names: Vec<String> = store.keys().cloned().collect();
        let fds: Vec<RawFd> = store.values().map(AsRawFd::as_raw_fd).collect();
        let mut command = Command::new("/bin/sh");
        // LISTEN_PID must be the service's own pid: the shell sets it and execs.
        command
            .arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"")
            .arg("sh")
            .args(&args)
            .env("NOTIFY_SOCKET", &path);
        if !fds.is_empty() {
            command
                .env("LISTEN_FDS", fds.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            let targets = fds.clone();
            // SAFETY: only fcntl and dup2 between fork and exec (async-signal-safe);
            // sources are moved above the targets first so none is overwritten.
            unsafe {
                command.pre_exec(move || {
                    let mut high = Vec::with_capacity(targets.len());
                    for &fd in &targets {
                        let moved = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                        if moved < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        high.push(moved);
                    }
                    for (i, &fd) in high.iter().enumerate() {
                        if libc::dup2(fd, 3 + i as RawFd) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        } else {
            command
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_FDNAMES");
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                eprintln!("harness: cannot start {}: {err}", args[0]);
                return ExitCode::FAILURE;
            }
        };
        CHILD.store(child.id() as i32, Ordering::SeqCst);
        eprintln!("harness: started pid {} (start {starts})", child.id());
        let status = loop {
            while let Ok(Some((bytes, fd))) = ipc::receive_bytes(socket.as_raw_fd()) {
                notification(&String::from_utf8_lossy(&bytes), fd, &mut store);
            }
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(err) => {
                    eprintln!("harness: {err}");
                    return ExitCode::FAILURE;
                }
            }
            ipc::wait_readable(socket.as_raw_fd(), 50);
        };
        while let Ok(Some((bytes, fd))) = ipc::receive_bytes(socket.as_raw_fd()) {
            notification(&String::from_utf8_lossy(&bytes), fd, &mut store);
        }
        CHILD.store(0, Ordering::SeqCst);
        eprintln!("harness: pid {} ended: {status}", child.id());
        if status.success() {
            return ExitCode::SUCCESS;
        }
        if starts > max_restarts {
            return ExitCode::from(
                status.code().unwrap_or(128 + status.signal().unwrap_or(0)) as u8
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
