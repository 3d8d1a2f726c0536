//! Thin, checked wrappers over the syscalls the filesystem makes.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use fuse_backend_rs::abi::fuse_abi::stat64;

/// The empty path, for `*at` calls that act on the descriptor itself.
pub const EMPTY_CSTR: &CStr = c"";

/// Turns a `-1` return into the thread's errno.
pub fn check_ret(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The errno `e` as an `io::Error`.
pub fn errno(e: libc::c_int) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// `openat(2)` returning an owned descriptor.
pub fn openat(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated and `dir` is a live descriptor; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            path.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    };
    let fd = check_ret(fd)?;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attributes of an inode plus the id of the mount it was reached through.
pub struct StatxResult {
    pub st: stat64,
    pub mnt_id: u64,
}

/// `statx(2)` of `path` relative to `dir` (or of `dir` itself for an empty path), never
/// following a final symlink.
pub fn statx(dir: BorrowedFd<'_>, path: &CStr) -> io::Result<StatxResult> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | libc::AT_STATX_SYNC_AS_STAT
        | if path.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: `stx` is a properly sized out-buffer and `path` is NUL-terminated.
    let ret = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            path.as_ptr(),
            flags,
            libc::STATX_BASIC_STATS | libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    };
    check_ret(ret)?;
    // SAFETY: statx succeeded, so the buffer is initialized.
    let stx = unsafe { stx.assume_init() };
    // SAFETY: stat64 is plain old data; all-zeroes is a valid value.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    st.st_dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    st.st_ino = stx.stx_ino;
    st.st_nlink = stx.stx_nlink as _;
    st.st_mode = stx.stx_mode as u32;
    st.st_uid = stx.stx_uid;
    st.st_gid = stx.stx_gid;
    st.st_rdev = libc::makedev(stx.stx_rdev_major, stx.stx_rdev_minor);
    st.st_size = stx.stx_size as i64;
    st.st_blksize = stx.stx_blksize as _;
    st.st_blocks = stx.stx_blocks as i64;
    st.st_atime = stx.stx_atime.tv_sec;
    st.st_atime_nsec = stx.stx_atime.tv_nsec as _;
    st.st_mtime = stx.stx_mtime.tv_sec;
    st.st_mtime_nsec = stx.stx_mtime.tv_nsec as _;
    st.st_ctime = stx.stx_ctime.tv_sec;
    st.st_ctime_nsec = stx.stx_ctime.tv_nsec as _;
    let mnt_id = if stx.stx_mask & libc::STATX_MNT_ID != 0 {
        stx.stx_mnt_id
    } else {
        0
    };
    Ok(StatxResult { st, mnt_id })
}

/// `fstat` of a descriptor opened for I/O.
pub fn fstat(fd: RawFd) -> io::Result<stat64> {
    let mut st = MaybeUninit::<stat64>::zeroed();
    // SAFETY: `st` is a properly sized out-buffer; the result is checked.
    check_ret(unsafe { libc::fstat64(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat64 succeeded, so the buffer is initialized.
    Ok(unsafe { st.assume_init() })
}

/// The decimal name of `fd` under /proc/self/fd.
pub fn fd_name(fd: RawFd) -> CString {
    // A decimal number never contains NUL.
    CString::new(fd.to_string()).unwrap_or_default()
}

/// Whether `name` is a single, non-special path component.
pub fn validate_name(name: &CStr) -> io::Result<()> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}

/// Sets this thread's filesystem uid and gid for the life of the guard.
///
/// fsuid/fsgid are per-thread in Linux, so this does not affect other worker threads. Only
/// effective when running as root; otherwise new files belong to the daemon's user.
pub struct CredentialsGuard {
    uid_changed: bool,
    gid_changed: bool,
}

impl CredentialsGuard {
    pub fn set(uid: libc::uid_t, gid: libc::gid_t, enabled: bool) -> io::Result<Self> {
        let mut guard = CredentialsGuard {
            uid_changed: false,
            gid_changed: false,
        };
        if !enabled {
            return Ok(guard);
        }
        if gid != 0 {
            // SAFETY: setfsgid only changes this thread's credentials.
            unsafe { libc::setfsgid(gid) };
            // setfsgid reports the previous id, never an error: read back to confirm.
            // SAFETY: as above; -1 is an invalid id so this only queries.
            if unsafe { libc::setfsgid(u32::MAX) } as u32 != gid {
                return Err(errno(libc::EPERM));
            }
            guard.gid_changed = true;
        }
        if uid != 0 {
            // SAFETY: setfsuid only changes this thread's credentials.
            unsafe { libc::setfsuid(uid) };
            // SAFETY: as above; -1 is an invalid id so this only queries.
            if unsafe { libc::setfsuid(u32::MAX) } as u32 != uid {
                return Err(errno(libc::EPERM));
            }
            guard.uid_changed = true;
        }
        Ok(guard)
    }
}

impl Drop for CredentialsGuard {
    fn drop(&mut self) {
        if self.uid_changed {
            // SAFETY: restores this thread's fsuid to root.
            unsafe { libc::setfsuid(0) };
        }
        if self.gid_changed {
            // SAFETY: restores this thread's fsgid to root.
            unsafe { libc::setfsgid(0) };
        }
    }
}
