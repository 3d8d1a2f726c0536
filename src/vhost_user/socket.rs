//! The vhost-user socket: created at `--socket-path` (and removed again at exit) or
//! inherited as a listening descriptor (`--fd`, as Kata's Go runtime passes it).

use std::io;

use anyhow::{anyhow, Context};
use tracing::warn;
use vhost::vhost_user::Listener;

/// A listening socket inherited from the parent (Kata's `--fd=3`), checked before use.
pub fn listener_from_fd(fd: i32) -> anyhow::Result<Listener> {
    // SAFETY: libc::stat is plain old data; all-zero bytes are a valid value.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes into `stat`; an invalid descriptor yields EBADF.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(anyhow!(
            "--fd {fd} is not an open file descriptor: {}",
            io::Error::last_os_error()
        ));
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(anyhow!("--fd {fd} is not a socket"));
    }
    let int_option = |level, name| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` describe a valid c_int buffer for getsockopt.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    let domain = int_option(libc::SOL_SOCKET, libc::SO_DOMAIN)
        .with_context(|| format!("cannot inspect the socket --fd {fd}"))?;
    if domain != libc::AF_UNIX {
        return Err(anyhow!("--fd {fd} is not a unix domain socket"));
    }
    let listening = int_option(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
        .with_context(|| format!("cannot inspect the socket --fd {fd}"))?;
    if listening == 0 {
        return Err(anyhow!("--fd {fd} is a socket but is not listening"));
    }
    // The vhost crate's accept loop spins on EAGAIN, so the socket must block; and the
    // descriptor should not leak into anything berth runs (e.g. fusermount).
    // SAFETY: plain fcntl calls on a descriptor checked above.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(anyhow!(
                "cannot make --fd {fd} blocking: {}",
                io::Error::last_os_error()
            ));
        }
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: the descriptor is an open listening unix socket that nothing else in this
    // process owns; the Listener takes ownership of it.
    Ok(unsafe { <Listener as std::os::unix::io::FromRawFd>::from_raw_fd(fd) })
}

/// The socket file berth created at `--socket-path`, removed when berth exits.
///
/// Inside the sandbox the path no longer names it (the shared directory is the root by then,
/// and the same path there may be a guest's file), so a descriptor on its directory is kept
/// and only the socket with the inode berth bound is unlinked.
pub struct SocketFile {
    dir: std::os::fd::OwnedFd,
    name: std::ffi::CString,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn new(path: &std::path::Path) -> anyhow::Result<SocketFile> {
        use std::os::unix::ffi::OsStrExt;
        let parent = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => parent.to_owned(),
            None => std::path::PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("the socket path {} names no file", path.display()))?;
        let name = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| anyhow!("the socket path {} contains a NUL byte", path.display()))?;
        let dir = std::os::unix::fs::OpenOptionsExt::custom_flags(
            std::fs::OpenOptions::new().read(true),
            libc::O_PATH | libc::O_DIRECTORY,
        )
        .open(&parent)
        .with_context(|| format!("cannot open the socket's directory {}", parent.display()))?;
        let metadata = std::fs::symlink_metadata(path)
            .with_context(|| format!("cannot inspect the socket {}", path.display()))?;
        Ok(SocketFile {
            dir: dir.into(),
            name,
            dev: std::os::unix::fs::MetadataExt::dev(&metadata),
            ino: std::os::unix::fs::MetadataExt::ino(&metadata),
        })
    }

    /// Unlinks the socket if it is still the one berth created (not a file or a newer
    /// daemon's socket put there since).
    pub fn remove(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: libc::stat is plain old data; all-zero bytes are a valid value.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `name` is NUL-terminated, `stat` a valid out-buffer; the result is checked.
        let found = unsafe {
            libc::fstatat(
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
                &mut stat,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        } == 0;
        if found
            && stat.st_mode & libc::S_IFMT == libc::S_IFSOCK
            && stat.st_dev == self.dev
            && stat.st_ino == self.ino
        {
            // SAFETY: as above; removing the socket berth bound.
            if unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } != 0 {
                warn!(
                    "Cannot remove the socket file: {}.",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

/// Creates the vhost-user socket at `path`: replaces a stale socket file, but refuses one that
/// a live process is listening on. The socket is accessible to its owner (and `group`) only.
/// The returned [`SocketFile`] removes it again; the listener itself never touches the path.
pub fn listener_at_path(
    path: &std::path::Path,
    group: Option<&str>,
) -> anyhow::Result<(Listener, SocketFile)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(anyhow!(
                "cannot create the socket {}: {} is not a directory",
                path.display(),
                parent.display()
            ));
        }
    }
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()) {
            return Err(anyhow!(
                "cannot create the socket {}: a file that is not a socket is in the way",
                path.display()
            ));
        }
    }
    if socket_is_listening(path) {
        return Err(anyhow!(
            "the socket {} is in use by another process",
            path.display()
        ));
    }
    let gid = group.map(lookup_group).transpose()?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(anyhow!(
                "cannot replace the stale socket {}: {e}",
                path.display()
            ))
        }
    }
    let mask = if gid.is_some() { 0o007 } else { 0o077 };
    // The socket is bound under a temporary name and renamed into place once it listens and
    // has its final owner: a VMM (or libvirt) that connects as soon as the path appears must
    // never find a socket that is bound but not yet listening (ECONNREFUSED).
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("the socket path {} names no file", path.display()))?;
    let staging = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    // SAFETY: umask has no memory effects; it is restored right after the bind.
    let old_mask = unsafe { libc::umask(mask) };
    let bound = std::os::unix::net::UnixListener::bind(&staging);
    // SAFETY: as above.
    unsafe { libc::umask(old_mask) };
    let listener =
        bound.map_err(|e| anyhow!("cannot create the socket {}: {e}", path.display()))?;
    let placed = gid
        .map(|gid| {
            std::os::unix::fs::chown(&staging, None, Some(gid)).with_context(|| {
                format!("cannot give the socket {} to group {gid}", path.display())
            })
        })
        .transpose()
        .and_then(|_| {
            std::fs::rename(&staging, path)
                .with_context(|| format!("cannot create the socket {}", path.display()))
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    let socket_file = SocketFile::new(path)?;
    // Built from the socket itself, the Listener has no path to remove when dropped (its own
    // removal would resolve the path inside the sandbox): `socket_file` removes it.
    Ok((Listener::from(listener), socket_file))
}

fn lookup_group(name: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(name)
        .map_err(|_| anyhow!("the socket group name '{name}' contains a NUL byte"))?;
    // SAFETY: libc::group is plain old data; all-zero bytes (null pointers) are a valid value.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: all pointers are valid for the sizes given; getgrnam_r fills `group`/`result`.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Ok(group.gr_gid);
    }
    name.parse::<u32>()
        .map_err(|_| anyhow!("the socket group '{name}' does not exist"))
}

/// Whether a process is listening on the unix socket at `path` (per /proc/net/unix), found
/// without connecting: a connection would be taken as a frontend by a vhost-user daemon.
fn socket_is_listening(path: &std::path::Path) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if !std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()) {
        return false;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(flags), Some(bound)) = (fields.get(3), fields.get(7)) else {
            return false;
        };
        let listening = u32::from_str_radix(flags, 16).is_ok_and(|f| f & SO_ACCEPTCON != 0);
        listening && std::path::Path::new(bound) == absolute
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vfs.sock");
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = listener_at_path(&path, None)
            .err()
            .expect("a live socket is refused");
        assert!(err.to_string().contains("in use"), "{err}");
        drop(live); // the file stays behind: a stale socket
        assert!(path.exists());
        let (listener, socket_file) =
            listener_at_path(&path, None).expect("a stale socket is replaced");
        let not_socket = dir.path().join("precious");
        std::fs::write(&not_socket, b"data").unwrap();
        assert!(listener_at_path(&not_socket, None).is_err());
        assert_eq!(std::fs::read(&not_socket).unwrap(), b"data");
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        // It appears listening, under its name, with no staging file left behind.
        std::os::unix::net::UnixStream::connect(&path).expect("the socket listens");
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["precious", "vfs.sock"]);
        drop(listener);
        assert!(path.exists(), "dropping the listener leaves the path alone");
        // Only the socket berth bound is removed: not a file that took its place.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        socket_file.remove();
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
        std::fs::remove_file(&path).unwrap();
        let (_listener, socket_file) = listener_at_path(&path, None).unwrap();
        socket_file.remove();
        assert!(!path.exists(), "berth's own socket is removed");
    }

    #[test]
    fn a_socket_group_owns_the_socket_and_may_connect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grouped.sock");
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let (listener, _socket_file) =
            listener_at_path(&path, Some(&gid.to_string())).expect("the socket");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o770
        );
        drop(listener);
    }

    #[test]
    fn inherited_fd_must_be_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("plain")).unwrap();
        let err = listener_from_fd(std::os::unix::io::AsRawFd::as_raw_fd(&file))
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a socket"), "{err}");
        let err = listener_from_fd(-1).err().unwrap();
        assert!(
            err.to_string().contains("not an open file descriptor"),
            "{err}"
        );
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = listener_from_fd(std::os::unix::io::AsRawFd::as_raw_fd(&a))
            .err()
            .unwrap();
        assert!(err.to_string().contains("not listening"), "{err}");
    }
}
