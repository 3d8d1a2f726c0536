//! The service manager's file descriptor store (systemd's `sd_notify` protocol), which
//! keeps `/dev/cachefiles` open while the server restarts.
//!
//! cachefiles recovers from a daemon crash only as long as the device stays open
//! (`restore` re-queues what the dead daemon had read). So, when `NOTIFY_SOCKET` is set,
//! the server hands a duplicate of the device to the service manager (`FDSTORE=1`,
//! `FDNAME=cachefiles`); a restarted server finds it in `LISTEN_FDS`/`LISTEN_FDNAMES`
//! (systemd: `FileDescriptorStoreMax=1`, `Restart=always`). A clean shutdown removes it
//! (`FDSTOREREMOVE=1`), so the next start binds afresh.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// The name the device is stored under.
pub const DEVICE_FD_NAME: &str = "cachefiles";

fn notify_socket() -> Option<std::ffi::OsString> {
    std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())
}

/// Whether a service manager listens for notifications.
pub fn enabled() -> bool {
    notify_socket().is_some()
}

/// Sends `state` to the service manager, with `fd` attached if given. Without
/// `NOTIFY_SOCKET` it does nothing.
pub fn notify(state: &str, fd: Option<RawFd>) -> io::Result<()> {
    let Some(path) = notify_socket() else {
        return Ok(());
    };
    // SAFETY: plain syscall; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let mut bytes = path.as_bytes().to_vec();
    // An abstract socket is written with a leading '@'.
    if bytes.first() == Some(&b'@') {
        bytes[0] = 0;
    }
    if bytes.len() >= address.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is too long",
        ));
    }
    for (slot, &byte) in address.sun_path.iter_mut().zip(&bytes) {
        *slot = byte as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len()) as libc::socklen_t;
    // SAFETY: connect to a valid sockaddr_un of length `len`.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            (&address as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    crate::ipc::send_bytes(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        state.as_bytes(),
        fd,
    )
}

/// Stores `fd` (the device) in the service manager under [`DEVICE_FD_NAME`].
pub fn store_device(fd: RawFd) -> io::Result<()> {
    notify(&format!("FDSTORE=1\nFDNAME={DEVICE_FD_NAME}"), Some(fd))
}

/// Drops the stored device from the service manager.
pub fn remove_device() -> io::Result<()> {
    notify(&format!("FDSTOREREMOVE=1\nFDNAME={DEVICE_FD_NAME}"), None)
}

/// The descriptors passed to this process (`LISTEN_FDS` from fd 3 on, named by
/// `LISTEN_FDNAMES`), when `LISTEN_PID` is this process. The variables are removed so
/// children do not see them.
pub fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Vec::new();
    }
    let Some(count) = count.and_then(|c| c.parse::<i32>().ok()) else {
        return Vec::new();
    };
    let names: Vec<&str> = names.split(':').collect();
    (0..count.clamp(0, 1024))
        .filter_map(|i| {
            let fd = 3 + i;
            // SAFETY: F_GETFD only checks that the descriptor is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return None;
            }
            // SAFETY: marks an inherited descriptor close-on-exec.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            let name = names
                .get(i as usize)
                .copied()
                .unwrap_or("unknown")
                .to_string();
            // SAFETY: the service manager passed this descriptor to us alone.
            Some((name, unsafe { OwnedFd::from_raw_fd(fd) }))
        })
        .collect()
}
