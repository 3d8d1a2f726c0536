//! Inodes held by file handle (`name_to_handle_at` / `open_by_handle_at`).
//!
//! A handle is a few bytes, so a million looked-up inodes cost memory, not descriptors.
//! Reopening needs CAP_DAC_READ_SEARCH and a descriptor on the same mount; [`MountFds`] keeps
//! one per mount id.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, RwLock};

use crate::util::{check_ret, errno, EMPTY_CSTR};

const MAX_HANDLE_SIZE: usize = 128;

#[repr(C)]
struct RawFileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SIZE],
}

/// An opaque kernel file handle and the mount it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileHandle {
    pub mnt_id: u64,
    handle_type: i32,
    bytes: Vec<u8>,
}

impl FileHandle {
    /// The handle of the inode `fd` refers to (an `O_PATH` descriptor is fine).
    pub fn from_fd(fd: BorrowedFd<'_>) -> io::Result<FileHandle> {
        let mut raw = RawFileHandle {
            handle_bytes: MAX_HANDLE_SIZE as u32,
            handle_type: 0,
            f_handle: [0; MAX_HANDLE_SIZE],
        };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `raw` has room for MAX_HANDLE_SIZE bytes, as handle_bytes says; the path is
        // empty and AT_EMPTY_PATH makes the call act on `fd`; the result is checked.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_name_to_handle_at,
                fd.as_raw_fd(),
                EMPTY_CSTR.as_ptr(),
                &mut raw as *mut RawFileHandle,
                &mut mount_id as *mut libc::c_int,
                libc::AT_EMPTY_PATH,
            )
        };
        check_ret(ret as libc::c_int)?;
        let len = (raw.handle_bytes as usize).min(MAX_HANDLE_SIZE);
        Ok(FileHandle {
            mnt_id: mount_id as u64,
            handle_type: raw.handle_type,
            bytes: raw.f_handle[..len].to_vec(),
        })
    }

    /// The handle as bytes another process can open it from: its type, then its bytes (the
    /// mount id is this process's own and left out).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.bytes.len());
        out.extend_from_slice(&self.handle_type.to_le_bytes());
        out.extend_from_slice(&self.bytes);
        out
    }

    /// A handle from [`to_bytes`](Self::to_bytes) output; `None` when malformed. Its mount id
    /// is unknown (0): open it with the descriptor of the mount it belongs to.
    pub fn from_bytes(bytes: &[u8]) -> Option<FileHandle> {
        if bytes.len() < 4 || bytes.len() - 4 > MAX_HANDLE_SIZE {
            return None;
        }
        let (kind, rest) = bytes.split_at(4);
        Some(FileHandle {
            mnt_id: 0,
            handle_type: i32::from_le_bytes([kind[0], kind[1], kind[2], kind[3]]),
            bytes: rest.to_vec(),
        })
    }

    /// A handle with the given bytes, for tests of the inode table.
    #[cfg(test)]
    pub fn for_test(mnt_id: u64, bytes: &[u8]) -> FileHandle {
        FileHandle {
            mnt_id,
            handle_type: 1,
            bytes: bytes.to_vec(),
        }
    }

    /// Opens the inode with `flags`, using `mount_fd` (any descriptor on the same mount).
    pub fn open(&self, mount_fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
        let mut raw = RawFileHandle {
            handle_bytes: self.bytes.len() as u32,
            handle_type: self.handle_type,
            f_handle: [0; MAX_HANDLE_SIZE],
        };
        raw.f_handle[..self.bytes.len()].copy_from_slice(&self.bytes);
        // SAFETY: `raw` is a well-formed file_handle; the result is checked and owned below.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                mount_fd.as_raw_fd(),
                &raw as *const RawFileHandle,
                flags | libc::O_CLOEXEC,
            )
        };
        let fd = check_ret(ret as libc::c_int)?;
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// One descriptor per mount that holds file-handle inodes.
#[derive(Default)]
pub struct MountFds {
    fds: RwLock<HashMap<u64, Arc<OwnedFd>>>,
}

impl MountFds {
    /// Makes sure mount `mnt_id` has a descriptor, opening one with `open` if not.
    ///
    /// `open_by_handle_at` refuses `O_PATH` descriptors as its mount argument, so `open`
    /// must produce a real open file (a directory, to avoid side effects of opening devices).
    pub fn ensure(
        &self,
        mnt_id: u64,
        open: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> io::Result<()> {
        if self.get(mnt_id).is_ok() {
            return Ok(());
        }
        let fd = open()?;
        let mut fds = self.fds.write().map_err(|_| errno(libc::EIO))?;
        fds.entry(mnt_id).or_insert_with(|| Arc::new(fd));
        Ok(())
    }

    /// The descriptor remembered for `mnt_id`.
    pub fn get(&self, mnt_id: u64) -> io::Result<Arc<OwnedFd>> {
        let fds = self.fds.read().map_err(|_| errno(libc::EIO))?;
        fds.get(&mnt_id).cloned().ok_or_else(|| errno(libc::ENOENT))
    }
}
