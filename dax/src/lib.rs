//! The virtio-fs DAX window manager.
//!
//! A virtio-fs device with a DAX window exposes one shared memory region (region 0) to the
//! guest; the guest asks, with FUSE_SETUPMAPPING, for a range of a file to appear at an offset
//! of that window and drops it with FUSE_REMOVEMAPPING. The VMM does the mapping (vhost-user
//! `SHMEM_MAP` / `SHMEM_UNMAP`, with the file's descriptor); this crate decides what is asked
//! of it. [`WindowManager`] keeps the table of what is mapped where, validates every request
//! before the VMM sees it, and keeps the VMM's view and its own equal:
//!
//! - The VMM unmaps only whole mappings, exactly as it mapped them. Removing part of a mapping
//!   unmaps the whole mapping and maps its remainders again; a setup over mapped ranges first
//!   does the same for whatever it overlaps, then maps the new range. The table holds one
//!   entry per mapping the VMM holds.
//! - The table keeps a descriptor of each mapped file (shared by the pieces of a split
//!   mapping), so a remainder can be mapped again after the guest closed or forgot the file.
//!
//! Memory: one table entry is a `BTreeMap` slot of 48 bytes (start, length, inode, file
//! offset, access, a shared file reference) plus the tree's node overhead, under 64 bytes in
//! all; a 64 GiB window in 2 MiB ranges (32 768 ranges) costs about 2 MiB. Each distinct mapped
//! file holds one descriptor while it has a live range.

mod error;
mod metrics;
mod table;

pub use error::DaxError;
pub use metrics::Metrics;
pub use table::{Range, RangeTable};

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics::Counters;

/// `FUSE_SETUPMAPPING_FLAG_WRITE`: the guest wants to write through the mapping.
pub const SETUPMAPPING_FLAG_WRITE: u64 = 1;
/// `FUSE_SETUPMAPPING_FLAG_READ`: the guest wants to read through the mapping.
pub const SETUPMAPPING_FLAG_READ: u64 = 2;
/// The granularity a Linux guest maps the window in (`FUSE_DAX_SZ`, 2 MiB).
pub const GUEST_MAPPING_GRANULE: u64 = 2 << 20;

/// Where mappings are carried out: the VMM, over the vhost-user backend request channel.
pub trait Frontend {
    /// Maps `len` bytes of `file` from `file_offset` at `window_offset` of the window
    /// (`SHMEM_MAP`), writable or read-only; the range is free in the VMM's view.
    fn map(
        &self,
        window_offset: u64,
        len: u64,
        file: BorrowedFd<'_>,
        file_offset: u64,
        writable: bool,
    ) -> io::Result<()>;

    /// Unmaps exactly one earlier mapping (`SHMEM_UNMAP`).
    fn unmap(&self, window_offset: u64, len: u64) -> io::Result<()>;
}

/// The shape of the window.
#[derive(Debug, Clone, Copy)]
pub struct WindowConfig {
    /// Bytes in the window (region 0).
    pub size: u64,
    /// Window offsets and lengths must be multiples of this ([`GUEST_MAPPING_GRANULE`]).
    pub granule: u64,
    /// The share is read-only: writable mappings are refused.
    pub read_only: bool,
}

/// A FUSE_SETUPMAPPING request, decoded.
#[derive(Debug, Clone, Copy)]
pub struct SetupRequest {
    pub inode: u64,
    pub window_offset: u64,
    pub len: u64,
    pub file_offset: u64,
    /// [`SETUPMAPPING_FLAG_READ`] and/or [`SETUPMAPPING_FLAG_WRITE`].
    pub flags: u64,
}

/// A file opened for mapping, as the filesystem hands it over.
#[derive(Debug, Clone)]
pub struct MappableFile {
    pub file: Arc<File>,
    /// The descriptor allows writing (opened read-write).
    pub writable: bool,
}

/// What one mapping holds.
#[derive(Debug, Clone)]
struct Mapping {
    inode: u64,
    file_offset: u64,
    writable: bool,
    file: Arc<File>,
}

/// A live mapping as [`WindowManager::mappings`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingInfo {
    pub window_offset: u64,
    pub len: u64,
    pub inode: u64,
    pub file_offset: u64,
    pub writable: bool,
}

/// The mapping table of one window.
#[derive(Debug)]
pub struct WindowManager {
    config: WindowConfig,
    page_size: u64,
    table: Mutex<RangeTable<Mapping>>,
    counters: Counters,
}

impl WindowManager {
    /// A window of `config.size` bytes with nothing mapped.
    pub fn new(config: WindowConfig) -> Result<Self, DaxError> {
        // SAFETY: sysconf only reads a system constant.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            size if size > 0 => size as u64,
            _ => 4096,
        };
        let granule_ok = config.granule.is_power_of_two() && config.granule >= page_size;
        if !granule_ok || config.size == 0 || !config.size.is_multiple_of(config.granule) {
            return Err(DaxError::BadWindowSize {
                size: config.size,
                granule: config.granule,
            });
        }
        Ok(WindowManager {
            config,
            page_size,
            table: Mutex::new(RangeTable::default()),
            counters: Counters::default(),
        })
    }

    /// The window's shape.
    pub fn config(&self) -> WindowConfig {
        self.config
    }

    /// The counters now.
    pub fn metrics(&self) -> Metrics {
        self.counters.snapshot()
    }

    /// Every live mapping, in window order.
    pub fn mappings(&self) -> Vec<MappingInfo> {
        self.lock()
            .iter()
            .map(|r| MappingInfo {
                window_offset: r.start,
                len: r.len,
                inode: r.value.inode,
                file_offset: r.value.file_offset,
                writable: r.value.writable,
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RangeTable<Mapping>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, op: &str, error: DaxError) -> DaxError {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(reason = error.reason(), "Refusing {op}: {error}");
        error
    }

    /// Checks that `[offset, offset + len)` is a whole number of granules inside the window.
    fn check_window_range(&self, offset: u64, len: u64) -> Result<(), DaxError> {
        let granule = self.config.granule;
        if len == 0 || !offset.is_multiple_of(granule) || !len.is_multiple_of(granule) {
            return Err(DaxError::Granularity {
                offset,
                len,
                granule,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.config.size => Ok(()),
            _ => Err(DaxError::OutOfWindow {
                offset,
                len,
                size: self.config.size,
            }),
        }
    }

    /// Whether a setup is acceptable before the file is opened; says whether it is writable.
    fn check_setup(&self, req: &SetupRequest) -> Result<bool, DaxError> {
        let known = SETUPMAPPING_FLAG_READ | SETUPMAPPING_FLAG_WRITE;
        if req.flags & !known != 0 || req.flags & known == 0 {
            return Err(DaxError::BadFlags { flags: req.flags });
        }
        self.check_window_range(req.window_offset, req.len)?;
        // mmap takes a signed file offset.
        let file_end = req.file_offset.checked_add(req.len);
        if !req.file_offset.is_multiple_of(self.page_size)
            || file_end.is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(DaxError::FileOffset {
                offset: req.file_offset,
            });
        }
        let writable = req.flags & SETUPMAPPING_FLAG_WRITE != 0;
        if writable && self.config.read_only {
            return Err(DaxError::ReadOnlyShare);
        }
        Ok(writable)
    }

    /// FUSE_SETUPMAPPING: maps `req`'s range of the file `open` yields (asked for a writable
    /// descriptor when the mapping is writable), replacing whatever was mapped there.
    pub fn setup(
        &self,
        frontend: Option<&dyn Frontend>,
        req: &SetupRequest,
        open: impl FnOnce(bool) -> io::Result<MappableFile>,
    ) -> Result<(), DaxError> {
        let writable = self
            .check_setup(req)
            .map_err(|e| self.refuse("SETUPMAPPING", e))?;
        let Some(frontend) = frontend else {
            return Err(self.refuse("SETUPMAPPING", DaxError::NoChannel));
        };
        let file = open(writable).map_err(|e| self.refuse("SETUPMAPPING", DaxError::File(e)))?;
        if writable && !file.writable {
            return Err(self.refuse("SETUPMAPPING", DaxError::NotWritable));
        }
        let mut table = self.lock();
        let start = req.window_offset;
        let end = start + req.len;
        self.carve(&mut table, frontend, start, end)?;
        let mapping = Mapping {
            inode: req.inode,
            file_offset: req.file_offset,
            writable,
            file: file.file,
        };
        self.map(&mut table, frontend, start, req.len, mapping)
    }

    /// FUSE_REMOVEMAPPING: unmaps each of `ranges` (window offset, length). Every range is
    /// checked before any is unmapped; parts of the window with nothing mapped are fine.
    pub fn remove(
        &self,
        frontend: Option<&dyn Frontend>,
        ranges: &[(u64, u64)],
    ) -> Result<(), DaxError> {
        for &(offset, len) in ranges {
            self.check_window_range(offset, len)
                .map_err(|e| self.refuse("REMOVEMAPPING", e))?;
        }
        let mut table = self.lock();
        for &(offset, len) in ranges {
            let end = offset + len;
            if table.overlapping(offset, end).is_empty() {
                continue;
            }
            let Some(frontend) = frontend else {
                return Err(self.refuse("REMOVEMAPPING", DaxError::NoChannel));
            };
            self.carve(&mut table, frontend, offset, end)?;
        }
        Ok(())
    }

    /// Drops every mapping: unmapped through `frontend` when there is one (a new or ended FUSE
    /// session), only forgotten when the VMM is gone. Returns how many there were.
    pub fn clear(&self, frontend: Option<&dyn Frontend>) -> usize {
        let ranges = self.lock().drain();
        for range in &ranges {
            self.forget(range);
            if let Some(frontend) = frontend {
                if let Err(e) = self.unmap(frontend, range.start, range.len) {
                    tracing::warn!(
                        "Cannot unmap window range {:#x}+{:#x} while dropping every mapping: {e}",
                        range.start,
                        range.len
                    );
                }
            }
        }
        ranges.len()
    }

    /// Frees `[start, end)`: every mapping meeting it is unmapped whole and what lies outside
    /// the span mapped again.
    fn carve(
        &self,
        table: &mut RangeTable<Mapping>,
        frontend: &dyn Frontend,
        start: u64,
        end: u64,
    ) -> Result<(), DaxError> {
        for old_start in table.overlapping(start, end) {
            let Some(old) = table.remove(old_start) else {
                continue;
            };
            self.forget(&old);
            self.unmap(frontend, old.start, old.len)?;
            if old.start < start {
                let len = start - old.start;
                self.map(table, frontend, old.start, len, old.value.clone())?;
            }
            if old.end() > end {
                let mut rest = old.value.clone();
                rest.file_offset += end - old.start;
                self.map(table, frontend, end, old.end() - end, rest)?;
            }
        }
        Ok(())
    }

    /// Maps a free range through the VMM and records it.
    fn map(
        &self,
        table: &mut RangeTable<Mapping>,
        frontend: &dyn Frontend,
        start: u64,
        len: u64,
        mapping: Mapping,
    ) -> Result<(), DaxError> {
        let began = Instant::now();
        let done = frontend.map(
            start,
            len,
            mapping.file.as_fd(),
            mapping.file_offset,
            mapping.writable,
        );
        self.counters
            .map_nanos
            .fetch_add(began.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Err(e) = done {
            self.counters
                .frontend_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!("The VMM did not map window range {start:#x}+{len:#x}: {e}");
            return Err(DaxError::Frontend(e));
        }
        self.counters.maps.fetch_add(1, Ordering::Relaxed);
        self.counters.live_ranges.fetch_add(1, Ordering::Relaxed);
        self.counters.mapped_bytes.fetch_add(len, Ordering::Relaxed);
        table.insert(Range {
            start,
            len,
            value: mapping,
        });
        Ok(())
    }

    fn unmap(&self, frontend: &dyn Frontend, start: u64, len: u64) -> Result<(), DaxError> {
        let began = Instant::now();
        let done = frontend.unmap(start, len);
        self.counters
            .unmap_nanos
            .fetch_add(began.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match done {
            Ok(()) => {
                self.counters.unmaps.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.counters
                    .frontend_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("The VMM did not unmap window range {start:#x}+{len:#x}: {e}");
                Err(DaxError::Frontend(e))
            }
        }
    }

    /// Takes a range out of the live counters (it left the table).
    fn forget(&self, range: &Range<Mapping>) {
        self.counters.live_ranges.fetch_sub(1, Ordering::Relaxed);
        self.counters
            .mapped_bytes
            .fetch_sub(range.len, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
