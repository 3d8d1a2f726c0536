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
//!   entry per guest range; the VMM holds one or two mappings for it (below).
//! - The table keeps a descriptor of each mapped file (shared by the pieces of a split
//!   mapping), so a remainder can be mapped again after the guest closed or forgot the file.
//!
//! # Ranges past the end of their file (reclaim)
//!
//! A host process that touches a page of a shared file mapping past the file's end gets
//! SIGBUS; for the VMM that is the whole VM lost. So no window page is ever left pointing past
//! its file's end: each table entry has a *file-backed* part (the pages the file reaches,
//! rounded up to a page) and a *placeholder* part, mapped from a sealed memfd of zeros (see
//! `placeholder.rs`). The guest reads zeros past the new end, as it would from a hole.
//!
//! - [`WindowManager::setup`] maps only the pages the file reaches at setup time; the rest of
//!   the range (the tail of a file's last 2 MiB granule, typically) is placeholder.
//! - [`WindowManager::resizing`]: a size change berth itself is about to make (SETATTR with a
//!   size, OPEN with O_TRUNC, FALLOCATE collapsing a range) re-points the pages past the new
//!   size *before* the change, so no VMM access can fault in between.
//! - [`WindowManager::resized`]: after any change of a mapped file's size (berth's own
//!   writes, truncations and allocations, or a host process's, seen by the caller's watcher),
//!   the parts are recomputed from `fstat` of the mapping's own descriptor: pages past the
//!   end go to the placeholder, pages the file reaches again go back to the file.
//!
//! What is left: a host process that shrinks a mapped file races with the watcher. Between
//! its truncation and berth's re-pointing (the time for the kernel to queue the event and
//! berth to read it and get an unmap and a map through the VMM, ~4 ms with QEMU under TCG),
//! a guest access through the window to a page past the new end faults in the VMM; a guest
//! that reads the file the whole time does hit it. Linux 6.14 and later raise a pre-content
//! permission event before a truncation (CAP_SYS_ADMIN, filesystems that allow it), which
//! could close the race; it is not used yet. Until then, host processes must not shrink
//! files a guest may have mapped, or the guest runs without DAX. Re-pointing itself is an
//! unmap followed by a map (the VMM refuses overlapping maps), so for that moment the range
//! is a hole in the window (the VMM keeps the region reserved; not measured with QEMU).
//!
//! # Memory
//!
//! One table entry is a `BTreeMap` slot of 56 bytes (start, length, inode, file offset,
//! file-backed length, access, a shared file reference) and a 16-byte (inode, start) key in
//! the index by inode, plus the trees' node overhead: at most [`MAX_BYTES_PER_RANGE`] bytes
//! (the unit tests fill a 64 GiB window and measure it). A 64 GiB window in 2 MiB ranges
//! (32 768 ranges) therefore costs at most 32 768 × 160 bytes = 5 MiB (141 bytes a range,
//! 4.4 MiB, measured on x86-64). Each distinct mapped file holds one descriptor while it has
//! a live range. The placeholder is sparse: host memory only for placeholder pages the guest
//! has touched (at most the window).

mod error;
mod metrics;
mod placeholder;
mod table;

pub use error::DaxError;
pub use metrics::Metrics;
pub use table::{Range, RangeTable};

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics::Counters;
use placeholder::Placeholder;

/// `FUSE_SETUPMAPPING_FLAG_WRITE`: the guest wants to write through the mapping.
pub const SETUPMAPPING_FLAG_WRITE: u64 = 1;
/// `FUSE_SETUPMAPPING_FLAG_READ`: the guest wants to read through the mapping.
pub const SETUPMAPPING_FLAG_READ: u64 = 2;
/// The granularity a Linux guest maps the window in (`FUSE_DAX_SZ`, 2 MiB).
pub const GUEST_MAPPING_GRANULE: u64 = 2 << 20;
/// The most heap memory one live range costs the window manager, in bytes (the table slot,
/// the inode index key and their share of the trees' nodes); measured by the unit tests.
pub const MAX_BYTES_PER_RANGE: usize = 160;

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
    /// Bytes from the range's start mapped from the file; the rest is mapped from the
    /// placeholder (the file does not reach it).
    file_backed: u64,
}

/// A live mapping as [`WindowManager::mappings`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingInfo {
    pub window_offset: u64,
    pub len: u64,
    pub inode: u64,
    pub file_offset: u64,
    pub writable: bool,
    /// Bytes from `window_offset` that show the file; the rest shows the placeholder's zeros.
    pub file_backed: u64,
}

/// One mapping the VMM holds for a table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    start: u64,
    len: u64,
    placeholder: bool,
}

/// The VMM's mappings for a range at `start` of `len` bytes whose first `file_backed` bytes
/// show the file: one or two.
fn pieces(start: u64, len: u64, file_backed: u64) -> impl Iterator<Item = Piece> {
    let file = (file_backed > 0).then_some(Piece {
        start,
        len: file_backed,
        placeholder: false,
    });
    let rest = (file_backed < len).then_some(Piece {
        start: start + file_backed,
        len: len - file_backed,
        placeholder: true,
    });
    file.into_iter().chain(rest)
}

/// The table and an index of it by inode (for resizes): (inode, start) pairs in one set,
/// which costs 16 bytes a range however the ranges spread over files.
#[derive(Debug, Default)]
struct State {
    table: RangeTable<Mapping>,
    by_inode: BTreeSet<(u64, u64)>,
}

impl State {
    fn insert(&mut self, range: Range<Mapping>) {
        let (inode, start) = (range.value.inode, range.start);
        if self.table.insert(range) {
            self.by_inode.insert((inode, start));
        }
    }

    fn remove(&mut self, start: u64) -> Option<Range<Mapping>> {
        let range = self.table.remove(start)?;
        self.by_inode.remove(&(range.value.inode, start));
        Some(range)
    }

    fn drain(&mut self) -> Vec<Range<Mapping>> {
        self.by_inode.clear();
        self.table.drain()
    }

    fn starts_of(&self, inode: u64) -> Vec<u64> {
        self.by_inode
            .range((inode, 0)..=(inode, u64::MAX))
            .map(|&(_, start)| start)
            .collect()
    }

    fn maps_inode(&self, inode: u64) -> bool {
        self.by_inode
            .range((inode, 0)..=(inode, u64::MAX))
            .next()
            .is_some()
    }
}

/// The mapping table of one window.
#[derive(Debug)]
pub struct WindowManager {
    config: WindowConfig,
    page_size: u64,
    state: Mutex<State>,
    placeholder: Placeholder,
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
        let placeholder = Placeholder::new(config.size).map_err(DaxError::Placeholder)?;
        Ok(WindowManager {
            config,
            page_size,
            state: Mutex::new(State::default()),
            placeholder,
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
            .table
            .iter()
            .map(|r| MappingInfo {
                window_offset: r.start,
                len: r.len,
                inode: r.value.inode,
                file_offset: r.value.file_offset,
                writable: r.value.writable,
                file_backed: r.value.file_backed,
            })
            .collect()
    }

    /// Whether `inode` has a live range (a cheap check before [`WindowManager::resized`]).
    pub fn maps_inode(&self, inode: u64) -> bool {
        self.lock().maps_inode(inode)
    }

    /// The placeholder's descriptor (the tests map it to check what the VMM was sent).
    pub fn placeholder_fd(&self) -> BorrowedFd<'_> {
        self.placeholder.fd()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, op: &str, error: DaxError) -> DaxError {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(reason = error.reason(), "Refusing {op}: {error}");
        error
    }

    /// Bytes of a range of `len` bytes from `file_offset` that a file of `size` bytes
    /// reaches, counted in whole pages (the page holding the end reads zeros past it).
    fn backed_len(&self, size: u64, file_offset: u64, len: u64) -> u64 {
        let reach = size.div_ceil(self.page_size).saturating_mul(self.page_size);
        reach.saturating_sub(file_offset).min(len)
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
    /// descriptor when the mapping is writable), replacing whatever was mapped there. Pages
    /// past the file's end are mapped from the placeholder.
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
        let mut state = self.lock();
        // The size is read under the lock, so a concurrent resize of this file (which takes
        // the lock after changing the size) sees this range.
        let size = file
            .file
            .metadata()
            .map_err(|e| self.refuse("SETUPMAPPING", DaxError::File(e)))?
            .len();
        let start = req.window_offset;
        let end = start + req.len;
        self.carve(&mut state, frontend, start, end)?;
        let mapping = Mapping {
            inode: req.inode,
            file_offset: req.file_offset,
            writable,
            file: file.file,
            file_backed: self.backed_len(size, req.file_offset, req.len),
        };
        self.map(&mut state, frontend, start, req.len, mapping)
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
        let mut state = self.lock();
        for &(offset, len) in ranges {
            let end = offset + len;
            if state.table.overlapping(offset, end).is_empty() {
                continue;
            }
            let Some(frontend) = frontend else {
                return Err(self.refuse("REMOVEMAPPING", DaxError::NoChannel));
            };
            self.carve(&mut state, frontend, offset, end)?;
        }
        Ok(())
    }

    /// Drops every mapping: unmapped through `frontend` when there is one (a new or ended FUSE
    /// session), only forgotten when the VMM is gone. Returns how many there were.
    pub fn clear(&self, frontend: Option<&dyn Frontend>) -> usize {
        let ranges = self.lock().drain();
        for range in &ranges {
            self.forget(range);
            let unmapped = match frontend {
                Some(frontend) => self.unmap(frontend, range),
                None => {
                    self.punch_placeholder(range);
                    Ok(())
                }
            };
            if let Err(e) = unmapped {
                tracing::warn!(
                    "Cannot unmap window range {:#x}+{:#x} while dropping every mapping: {e}",
                    range.start,
                    range.len
                );
            }
        }
        ranges.len()
    }

    /// `inode` is about to be cut to `new_size` bytes (berth's own SETATTR, O_TRUNC open or
    /// collapsing FALLOCATE): its ranges' pages past that size are re-pointed at the
    /// placeholder now, before the file shrinks. Nothing is mapped back (if the change then
    /// fails, [`WindowManager::resized`] does that). Returns how many ranges were re-pointed.
    pub fn resizing(&self, frontend: Option<&dyn Frontend>, inode: u64, new_size: u64) -> usize {
        let mut state = self.lock();
        let mut repointed = 0;
        for start in state.starts_of(inode) {
            let Some((len, file_offset, file_backed)) = state
                .table
                .find(start)
                .map(|r| (r.len, r.value.file_offset, r.value.file_backed))
            else {
                continue;
            };
            let target = self.backed_len(new_size, file_offset, len).min(file_backed);
            if target != file_backed && self.repoint(&mut state, frontend, start, target) {
                repointed += 1;
            }
        }
        repointed
    }

    /// `inode`'s size may have changed: each of its ranges shows the file for exactly the
    /// pages the file reaches now (read with `fstat` on the range's own descriptor) and the
    /// placeholder past them. Returns how many ranges changed.
    pub fn resized(&self, frontend: Option<&dyn Frontend>, inode: u64) -> usize {
        let mut state = self.lock();
        let starts = state.starts_of(inode);
        self.reconcile(&mut state, frontend, starts)
    }

    /// [`WindowManager::resized`] for every mapped file (a host watcher that cannot tell which
    /// file changed, or lost events). Returns how many ranges changed.
    pub fn recheck_all(&self, frontend: Option<&dyn Frontend>) -> usize {
        let mut state = self.lock();
        let starts: Vec<u64> = state.table.iter().map(|r| r.start).collect();
        self.reconcile(&mut state, frontend, starts)
    }

    fn reconcile(
        &self,
        state: &mut State,
        frontend: Option<&dyn Frontend>,
        starts: Vec<u64>,
    ) -> usize {
        // One fstat per descriptor, however many ranges share it.
        let mut sizes: Vec<(*const File, u64)> = Vec::new();
        let mut changed = 0;
        for start in starts {
            let Some((len, file_offset, file_backed, inode, file)) =
                state.table.find(start).map(|r| {
                    (
                        r.len,
                        r.value.file_offset,
                        r.value.file_backed,
                        r.value.inode,
                        r.value.file.clone(),
                    )
                })
            else {
                continue;
            };
            let key = Arc::as_ptr(&file);
            let size = match sizes.iter().find(|(k, _)| *k == key) {
                Some(&(_, size)) => size,
                None => match file.metadata() {
                    Ok(metadata) => {
                        sizes.push((key, metadata.len()));
                        metadata.len()
                    }
                    Err(e) => {
                        tracing::warn!("Cannot read the size of inode {inode}'s mapped file: {e}");
                        continue;
                    }
                },
            };
            let target = self.backed_len(size, file_offset, len);
            if target != file_backed && self.repoint(state, frontend, start, target) {
                changed += 1;
            }
        }
        changed
    }

    /// Maps the range at `start` again with `file_backed` bytes of file: unmaps its pieces,
    /// maps the new ones. Says whether it was done.
    fn repoint(
        &self,
        state: &mut State,
        frontend: Option<&dyn Frontend>,
        start: u64,
        file_backed: u64,
    ) -> bool {
        let Some(frontend) = frontend else {
            tracing::warn!(
                "Cannot re-point window range {start:#x}: the VMM has no channel for it."
            );
            return false;
        };
        let Some(old) = state.remove(start) else {
            return false;
        };
        self.forget(&old);
        if self.unmap(frontend, &old).is_err() {
            return false;
        }
        let shrinking = file_backed < old.value.file_backed;
        let mut mapping = old.value;
        mapping.file_backed = file_backed;
        let inode = mapping.inode;
        if self
            .map(state, frontend, old.start, old.len, mapping.clone())
            .is_err()
        {
            // QEMU 11.1 refuses a mapping that reaches past the file's end even inside its
            // last page: keep the range mapped, without the page holding the end (which then
            // reads as zeros), rather than leave a hole in the window.
            if file_backed == 0 {
                return false;
            }
            mapping.file_backed = file_backed - self.page_size;
            if self
                .map(state, frontend, old.start, old.len, mapping)
                .is_err()
            {
                return false;
            }
            tracing::warn!(
                "The VMM refused the page holding the end of inode {inode}'s file at window \
                 offset {:#x}: it reads as zeros until the range is mapped again.",
                start + file_backed - self.page_size
            );
        }
        let counter = if shrinking {
            &self.counters.repoints
        } else {
            &self.counters.restores
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            "Window range {start:#x}+{:#x} now shows {file_backed:#x} bytes of its file.",
            old.len
        );
        true
    }

    /// Frees `[start, end)`: every mapping meeting it is unmapped whole and what lies outside
    /// the span mapped again.
    fn carve(
        &self,
        state: &mut State,
        frontend: &dyn Frontend,
        start: u64,
        end: u64,
    ) -> Result<(), DaxError> {
        for old_start in state.table.overlapping(start, end) {
            let Some(old) = state.remove(old_start) else {
                continue;
            };
            self.forget(&old);
            self.unmap(frontend, &old)?;
            if old.start < start {
                let len = start - old.start;
                let mut head = old.value.clone();
                head.file_backed = head.file_backed.min(len);
                self.map(state, frontend, old.start, len, head)?;
            }
            if old.end() > end {
                let cut = end - old.start;
                let mut rest = old.value.clone();
                rest.file_offset += cut;
                rest.file_backed = rest.file_backed.saturating_sub(cut);
                self.map(state, frontend, end, old.end() - end, rest)?;
            }
        }
        Ok(())
    }

    /// Maps a free range through the VMM (its file part and its placeholder part) and
    /// records it.
    fn map(
        &self,
        state: &mut State,
        frontend: &dyn Frontend,
        start: u64,
        len: u64,
        mapping: Mapping,
    ) -> Result<(), DaxError> {
        let mut done: Vec<Piece> = Vec::with_capacity(2);
        for piece in pieces(start, len, mapping.file_backed) {
            let began = Instant::now();
            let result = if piece.placeholder {
                frontend.map(
                    piece.start,
                    piece.len,
                    self.placeholder.fd(),
                    piece.start,
                    mapping.writable,
                )
            } else {
                frontend.map(
                    piece.start,
                    piece.len,
                    mapping.file.as_fd(),
                    mapping.file_offset,
                    mapping.writable,
                )
            };
            self.counters
                .map_nanos
                .fetch_add(began.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if let Err(e) = result {
                self.counters
                    .frontend_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "The VMM did not map window range {:#x}+{:#x}: {e}",
                    piece.start,
                    piece.len
                );
                // Leave the VMM as the table says: nothing at this range.
                for earlier in done {
                    let _ = self.unmap_piece(frontend, earlier);
                }
                return Err(DaxError::Frontend(e));
            }
            self.counters.maps.fetch_add(1, Ordering::Relaxed);
            done.push(piece);
        }
        self.counters.live_ranges.fetch_add(1, Ordering::Relaxed);
        self.counters.mapped_bytes.fetch_add(len, Ordering::Relaxed);
        self.counters
            .placeholder_bytes
            .fetch_add(len - mapping.file_backed, Ordering::Relaxed);
        state.insert(Range {
            start,
            len,
            value: mapping,
        });
        Ok(())
    }

    /// Unmaps every piece of a range that left the table.
    fn unmap(&self, frontend: &dyn Frontend, range: &Range<Mapping>) -> Result<(), DaxError> {
        let mut result = Ok(());
        for piece in pieces(range.start, range.len, range.value.file_backed) {
            if let Err(e) = self.unmap_piece(frontend, piece) {
                result = Err(e);
            }
        }
        result
    }

    fn unmap_piece(&self, frontend: &dyn Frontend, piece: Piece) -> Result<(), DaxError> {
        let began = Instant::now();
        let done = frontend.unmap(piece.start, piece.len);
        self.counters
            .unmap_nanos
            .fetch_add(began.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match done {
            Ok(()) => {
                self.counters.unmaps.fetch_add(1, Ordering::Relaxed);
                if piece.placeholder {
                    self.placeholder.punch(piece.start, piece.len);
                }
                Ok(())
            }
            Err(e) => {
                self.counters
                    .frontend_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "The VMM did not unmap window range {:#x}+{:#x}: {e}",
                    piece.start,
                    piece.len
                );
                Err(DaxError::Frontend(e))
            }
        }
    }

    /// Zeros the placeholder part of a range the VMM no longer has (it went away).
    fn punch_placeholder(&self, range: &Range<Mapping>) {
        for piece in pieces(range.start, range.len, range.value.file_backed) {
            if piece.placeholder {
                self.placeholder.punch(piece.start, piece.len);
            }
        }
    }

    /// Takes a range out of the live counters (it left the table).
    fn forget(&self, range: &Range<Mapping>) {
        self.counters.live_ranges.fetch_sub(1, Ordering::Relaxed);
        self.counters
            .mapped_bytes
            .fetch_sub(range.len, Ordering::Relaxed);
        self.counters
            .placeholder_bytes
            .fetch_sub(range.len - range.value.file_backed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
