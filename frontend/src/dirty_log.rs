//! The dirty-page log a VMM hands the backend while it migrates a guest (SET_LOG_BASE with
//! protocol feature LOG_SHMFD, then VHOST_F_LOG_ALL): one bit per 4 KiB page of guest memory,
//! set by the backend for every page it writes.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::Error;

/// Bytes of guest memory one bit of the log stands for (VHOST_LOG_PAGE).
pub const LOG_PAGE_SIZE: u64 = 4096;

/// A shared-memory dirty log covering guest RAM, mapped in this process.
pub struct DirtyLog {
    file: File,
    map: NonNull<AtomicU8>,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomic bytes, and the pointer is owned here.
unsafe impl Send for DirtyLog {}
// SAFETY: as above; shared access goes through atomics only.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// A zeroed log for `memory_size` bytes of guest memory starting at guest address 0.
    pub fn new(memory_size: u64) -> Result<Self, Error> {
        let pages = memory_size.div_ceil(LOG_PAGE_SIZE);
        // Whole 8-byte words, as QEMU sizes it.
        let len = usize::try_from(pages.div_ceil(64) * 8)
            .map_err(|_| Error::InvalidConfig("the dirty log is too large".into()))?;
        let name = CString::new("berth-dirty-log").map_err(|_| Error::MemfdName)?;
        // SAFETY: `name` is a valid NUL-terminated string; the result is checked below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(Error::Memfd)?;
        // SAFETY: a fresh shared mapping of the whole file; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Error::MapMemory(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        let map = NonNull::new(addr.cast::<AtomicU8>())
            .ok_or_else(|| Error::MapMemory("mmap returned a null address".into()))?;
        Ok(DirtyLog { file, map, len })
    }

    /// The memfd the backend maps.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size of the log in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the log covers no page at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn byte(&self, index: usize) -> &AtomicU8 {
        debug_assert!(index < self.len);
        // SAFETY: `index` is below `len`, the mapping's size, and the mapping lives as long
        // as `self`.
        unsafe { &*self.map.as_ptr().add(index) }
    }

    /// Page numbers (guest address / 4096) whose bit is set.
    pub fn dirty_pages(&self) -> BTreeSet<u64> {
        let mut pages = BTreeSet::new();
        for index in 0..self.len {
            let bits = self.byte(index).load(Ordering::Acquire);
            for bit in 0..8 {
                if bits & (1 << bit) != 0 {
                    pages.insert(index as u64 * 8 + bit);
                }
            }
        }
        pages
    }

    /// Clears every bit, as a VMM does after copying the dirty pages.
    pub fn clear(&self) {
        for index in 0..self.len {
            self.byte(index).store(0, Ordering::Release);
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `new`, which nothing refers to any more.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.len) };
    }
}

/// The pages `[addr, addr + len)` touches.
pub fn pages_of(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = addr / LOG_PAGE_SIZE;
    let end = if len == 0 {
        first
    } else {
        (addr + len - 1) / LOG_PAGE_SIZE + 1
    };
    first..end
}
