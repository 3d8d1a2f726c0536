//! A VIRTIO shared memory region (the virtio-fs DAX window) as a VMM keeps it: address space
//! reserved up front, file ranges mapped into it on the backend's `SHMEM_MAP` and replaced by
//! inaccessible memory again on `SHMEM_UNMAP`, as QEMU does. Like QEMU, a map must land on
//! free space and an unmap must name exactly one earlier mapping.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{FrontendReqHandler, HandlerResult, VhostUserFrontendReqHandler};

use crate::Error;

/// One mapping the backend asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmemMapping {
    pub offset: u64,
    pub len: u64,
    pub file_offset: u64,
    pub writable: bool,
    /// The descriptor passed was open for writing (QEMU 11.1 needs one for every mapping).
    pub descriptor_writable: bool,
}

/// A shared memory region of `size` bytes and what is mapped in it.
pub struct ShmemWindow {
    /// The region's id (virtio-fs: 0 the DAX window, 1 berth's version table).
    id: u8,
    base: usize,
    size: u64,
    mappings: Mutex<BTreeMap<u64, ShmemMapping>>,
    /// Every message the backend sent, in order: (map?, offset, len).
    log: Mutex<Vec<(bool, u64, u64)>>,
}

// SAFETY: `base` is an address range this object owns for its lifetime; every access to the
// memory goes through methods that check it against the mapping table under its lock.
unsafe impl Send for ShmemWindow {}
// SAFETY: as above.
unsafe impl Sync for ShmemWindow {}

impl ShmemWindow {
    /// Reserves `size` bytes of inaccessible address space for region 0.
    pub fn new(size: u64) -> Result<Self, Error> {
        Self::with_id(0, size)
    }

    /// Reserves `size` bytes of inaccessible address space for region `id`.
    pub fn with_id(id: u8, size: u64) -> Result<Self, Error> {
        let len = usize::try_from(size)
            .map_err(|_| Error::InvalidConfig(format!("window of {size} bytes")))?;
        // SAFETY: a fresh anonymous reservation; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::MapMemory(io::Error::last_os_error().to_string()));
        }
        Ok(ShmemWindow {
            id,
            base: base as usize,
            size,
            mappings: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
        })
    }

    /// The region's id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Bytes in the region.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The live mappings, in order.
    pub fn mappings(&self) -> Vec<ShmemMapping> {
        self.lock().values().copied().collect()
    }

    /// Every SHMEM_MAP (true) and SHMEM_UNMAP (false) received so far: (offset, len).
    pub fn messages(&self) -> Vec<(bool, u64, u64)> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ShmemMapping>> {
        self.mappings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `[offset, offset + len)` lies entirely in mapped ranges (writable ones if
    /// `write`).
    fn covered(mappings: &BTreeMap<u64, ShmemMapping>, offset: u64, len: u64, write: bool) -> bool {
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let Some((_, m)) = mappings.range(..=at).next_back() else {
                return false;
            };
            if m.offset + m.len <= at || (write && !m.writable) {
                return false;
            }
            at = m.offset + m.len;
        }
        true
    }

    /// Copies bytes out of the window (as the guest reading its DAX mapping); fails where
    /// nothing is mapped rather than faulting.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mappings = self.lock();
        if !Self::covered(&mappings, offset, buf.len() as u64, false) {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        // SAFETY: the range is inside live mappings of this window (checked under the lock,
        // held while copying); the file behind them is not truncated by the tests.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base + offset as usize) as *const u8,
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    /// Copies bytes into the window (as the guest writing through its DAX mapping); fails
    /// where nothing writable is mapped.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mappings = self.lock();
        if !Self::covered(&mappings, offset, data.len() as u64, true) {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        // SAFETY: as in `read`, and the mappings are writable.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.base + offset as usize) as *mut u8,
                data.len(),
            );
        }
        Ok(())
    }

    /// Puts inaccessible memory back over `[offset, offset + len)`.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: replaces pages inside this window's own reservation (MAP_FIXED there).
        let at = unsafe {
            libc::mmap(
                (self.base + offset as usize) as *mut libc::c_void,
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for ShmemWindow {
    fn drop(&mut self) {
        // SAFETY: the reservation made in `new`; nothing refers to it any more.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.size as usize);
        }
    }
}

impl VhostUserFrontendReqHandler for ShmemWindow {
    fn shmem_map(&self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        let (offset, len, file_offset, flags) = (req.shm_offset, req.len, req.fd_offset, req.flags);
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((true, offset, len));
        let mut mappings = self.lock();
        let end = offset.checked_add(len).filter(|&end| end <= self.size);
        let Some(end) = end else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        if req.shmid != self.id
            || mappings
                .values()
                .any(|m| m.offset < end && offset < m.offset + m.len)
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let writable = flags & VhostUserMMapFlags::WRITABLE.bits() != 0;
        // SAFETY: F_GETFL only reads the flags of the descriptor the message carried.
        let access = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) } & libc::O_ACCMODE;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: maps the backend's file over pages of this window's own reservation.
        let at = unsafe {
            libc::mmap(
                (self.base + offset as usize) as *mut libc::c_void,
                len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                file_offset as libc::off_t,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        mappings.insert(
            offset,
            ShmemMapping {
                offset,
                len,
                file_offset,
                writable,
                descriptor_writable: access == libc::O_RDWR,
            },
        );
        Ok(0)
    }

    fn shmem_unmap(&self, req: &VhostUserMMap) -> HandlerResult<u64> {
        let (offset, len) = (req.shm_offset, req.len);
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((false, offset, len));
        let mut mappings = self.lock();
        match mappings.get(&offset) {
            Some(m) if m.len == len && req.shmid == self.id => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
        self.reserve(offset, len)?;
        mappings.remove(&offset);
        Ok(0)
    }
}

/// The shared memory regions of a device, by id: the backend's requests go to the region they
/// name (a request for a region the device does not have is refused, EINVAL, as QEMU does).
pub struct ShmemRegions(pub Vec<Arc<ShmemWindow>>);

impl ShmemRegions {
    fn region(&self, id: u8) -> HandlerResult<&Arc<ShmemWindow>> {
        self.0
            .iter()
            .find(|w| w.id == id)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

impl VhostUserFrontendReqHandler for ShmemRegions {
    fn shmem_map(&self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        self.region(req.shmid)?.shmem_map(req, fd)
    }

    fn shmem_unmap(&self, req: &VhostUserMMap) -> HandlerResult<u64> {
        self.region(req.shmid)?.shmem_unmap(req)
    }
}

/// Serves the backend request channel until the backend hangs up; returns the descriptor to
/// hand the backend (SET_BACKEND_REQ_FD).
pub(crate) fn serve_backend_requests(
    regions: Arc<ShmemRegions>,
    reply_ack: bool,
) -> Result<UnixStream, Error> {
    let mut handler = FrontendReqHandler::new(regions).map_err(vhost::Error::from)?;
    handler.set_reply_ack_flag(reply_ack);
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor of the handler's end, owned by us.
    let theirs = unsafe { libc::fcntl(handler.get_tx_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if theirs < 0 {
        return Err(Error::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `theirs` is a fresh descriptor nothing else owns.
    let theirs = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(theirs) };
    std::thread::Builder::new()
        .name("shmem-requests".to_owned())
        .spawn(move || loop {
            match handler.handle_request() {
                Ok(_) | Err(vhost::vhost_user::Error::ReqHandlerError(_)) => {}
                Err(_) => return,
            }
        })
        .map_err(Error::Socket)?;
    Ok(theirs)
}
