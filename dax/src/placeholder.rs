//! The placeholder window ranges are re-pointed at when their file no longer reaches them.
//!
//! One sealed memfd as large as the window. A range past its file's end is mapped from the
//! placeholder at the placeholder offset equal to its window offset, so no two window ranges
//! ever share placeholder pages: bytes a guest writes through a re-pointed writable range
//! (QEMU 11.1 maps every range writable) are seen only at that window offset, and are punched
//! out when the range leaves the window, so the next file re-pointed there reads zeros again.
//! The memfd is sparse: it costs host memory only for pages the guest touches while they are
//! re-pointed.
//!
//! Seals: `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, so the VMM (which gets the descriptor
//! with each `SHMEM_MAP`) cannot truncate it under its own mappings. No `F_SEAL_WRITE` or
//! `F_SEAL_FUTURE_WRITE`: QEMU 11.1 maps every range shared and writable, which those seals
//! refuse.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};

/// A sparse, sealed memfd of zeros covering the whole window.
#[derive(Debug)]
pub(crate) struct Placeholder {
    file: File,
}

impl Placeholder {
    /// A placeholder for a window of `size` bytes.
    pub(crate) fn new(size: u64) -> io::Result<Self> {
        let name = c"berth-dax-placeholder";
        // SAFETY: memfd_create with a NUL-terminated name and flag constants; the result is
        // checked and owned right below.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created by memfd_create and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl F_ADD_SEALS on a descriptor this function owns, with seal constants.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Placeholder { file })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Forgets whatever a guest wrote at `[offset, offset + len)`: zeros again, no memory.
    pub(crate) fn punch(&self, offset: u64, len: u64) {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: fallocate on a descriptor this value owns; a failure only leaves pages.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) } < 0 {
            tracing::warn!(
                "Cannot punch placeholder range {offset:#x}+{len:#x}: {}",
                io::Error::last_os_error()
            );
        }
    }
}
