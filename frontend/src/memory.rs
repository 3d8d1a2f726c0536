//! Guest RAM: one memfd-backed region mapped in this process and shared with the backend.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::Error;

/// Guest physical address where guest RAM starts, as in a typical x86 VM.
pub const GUEST_RAM_BASE: u64 = 0;

/// Guest memory backed by a memfd, with a lock-free bump allocator for guest addresses.
///
/// Allocations are never freed: the frontend carves out rings and per-request buffers once,
/// at setup, and reuses them for the lifetime of the connection.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    size: u64,
    next_free: AtomicU64,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM in a fresh memfd and maps it.
    pub fn new(size: usize) -> Result<Self, Error> {
        if size == 0 || size & 4095 != 0 {
            return Err(Error::InvalidConfig(format!(
                "guest memory size {size} must be a non-zero multiple of 4096"
            )));
        }
        let name = CString::new("berth-guest-ram").map_err(|_| Error::MemfdName)?;
        // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created by memfd_create and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).map_err(Error::Memfd)?;
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(GUEST_RAM_BASE),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| Error::MapMemory(e.to_string()))?;
        Ok(Self {
            memory,
            size: size as u64,
            next_free: AtomicU64::new(GUEST_RAM_BASE),
        })
    }

    /// The mapped guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Size of guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// First guest address past the end of guest RAM.
    pub fn end(&self) -> GuestAddress {
        GuestAddress(GUEST_RAM_BASE + self.size)
    }

    /// Reserves `len` bytes aligned to `align` (a power of two) and zeroes nothing: the memfd
    /// starts zeroed and allocations are never recycled.
    pub fn allocate(&self, len: u64, align: u64) -> Result<GuestAddress, Error> {
        debug_assert!(align.is_power_of_two());
        let mut current = self.next_free.load(Ordering::Relaxed);
        loop {
            let start = current
                .checked_add(align - 1)
                .map(|v| v & !(align - 1))
                .ok_or(Error::OutOfGuestMemory { requested: len })?;
            let end = start
                .checked_add(len)
                .filter(|end| *end <= GUEST_RAM_BASE + self.size)
                .ok_or(Error::OutOfGuestMemory { requested: len })?;
            match self.next_free.compare_exchange_weak(
                current,
                end,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(GuestAddress(start)),
                Err(actual) => current = actual,
            }
        }
    }

    /// Bytes not yet handed out by [`GuestRam::allocate`].
    pub fn remaining(&self) -> u64 {
        GUEST_RAM_BASE + self.size - self.next_free.load(Ordering::Relaxed)
    }

    /// The regions to announce with SET_MEM_TABLE.
    pub fn region_infos(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, Error> {
        self.memory
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region).map_err(Error::Vhost)
            })
            .collect()
    }

    /// Translates a guest address to this process's virtual address, which is what vhost-user
    /// expects in SET_VRING_ADDR.
    pub fn host_address(&self, addr: GuestAddress) -> Result<u64, Error> {
        self.memory
            .get_host_address(addr)
            .map(|ptr| ptr as u64)
            .map_err(|_| Error::AddressOutOfRange(addr.0))
    }

    /// Whether `[addr, addr + len)` lies inside guest RAM.
    pub fn contains(&self, addr: GuestAddress, len: u64) -> bool {
        self.memory.iter().any(|r| {
            addr.0 >= r.start_addr().0
                && addr
                    .0
                    .checked_add(len)
                    .is_some_and(|end| end <= r.start_addr().0 + r.len())
        })
    }
}
