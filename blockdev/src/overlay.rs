//! The copy-on-write overlay: writes to a read-only base (an image, a raw file) land in
//! one local file, cluster by cluster; reads take each cluster from the overlay where it
//! was written and from the base elsewhere.
//!
//! # File layout
//! `[header: two 512-byte slots][committed map][live map][data clusters]`. A map holds
//! one little-endian u64 per cluster of the device: 0 = not written (read the base),
//! 1 = zeros, `n ≥ 2` = data in slot `n - 2` of the data area. Both maps are sparse.
//!
//! # Crash consistency
//! A kill -9 or a power cut never exposes stale or zero data for a written cluster:
//! - Allocating writes put their data in a *fresh* slot; only once the data is written is
//!   the cluster pointed at it, in memory and in the **live map** (a plain `pwrite`, so a
//!   killed process leaves every completed write behind in the page cache).
//! - A FLUSH (or a FUA write) `fdatasync`s the data first, then writes the changed entries
//!   into the **committed map** and syncs again: the committed map only ever points at
//!   durable data.
//! - A slot that stops being used (the cluster was discarded, zeroed or rewritten by a
//!   racing write) is reused only after a commit no longer refers to it, so no map,
//!   committed or live, can point a cluster at another cluster's data.
//! - On open, the header tells what happened: closed cleanly (both maps agree); the
//!   process died while the kernel kept running (same boot id: the live map is whole
//!   and is committed at once); or the machine went down (another boot id: the live map
//!   may have reached the disk before its data, so the committed map is used and the
//!   live map rewritten from it). Writes acknowledged but not flushed before a power cut
//!   are lost, as on any disk with a volatile write cache; nothing else is.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{BlockError, IoContext, Result};
use crate::raw::fallocate;
use crate::target::{
    push_extent, BlockTarget, Completion, Extent, Progress, SharedTarget, Source, TargetInfo,
    WriteTicket,
};

const MAGIC: &[u8; 8] = b"BERTHOVL";
const VERSION: u32 = 1;
const HEADER_SLOT: u64 = 512;
const HEADER_AREA: u64 = 4096;
const BASE_ID_LEN: usize = 160;
/// Entry values.
const UNWRITTEN: u64 = 0;
const ZEROS: u64 = 1;
const FIRST_SLOT: u64 = 2;

fn boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = hex
                .get(2 * i..2 * i + 2)
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .unwrap_or(0);
        }
    }
    id
}

/// What the header records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    cluster_shift: u32,
    size: u64,
    base_size: u64,
    base_id: String,
    in_use: bool,
    boot: [u8; 16],
    generation: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_SLOT as usize] {
        let mut out = [0u8; HEADER_SLOT as usize];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(MAGIC);
        put(&VERSION.to_le_bytes());
        put(&self.cluster_shift.to_le_bytes());
        put(&self.size.to_le_bytes());
        put(&self.base_size.to_le_bytes());
        let mut id = [0u8; BASE_ID_LEN];
        let bytes = self.base_id.as_bytes();
        let n = bytes.len().min(BASE_ID_LEN);
        id[..n].copy_from_slice(&bytes[..n]);
        put(&id);
        put(&u32::from(self.in_use).to_le_bytes());
        put(&self.boot);
        put(&self.generation.to_le_bytes());
        let digest = blake3::hash(&out[..HEADER_SLOT as usize - 32]);
        out[HEADER_SLOT as usize - 32..].copy_from_slice(digest.as_bytes());
        out
    }

    fn decode(slot: &[u8]) -> Option<Self> {
        let body = slot.get(..HEADER_SLOT as usize - 32)?;
        if blake3::hash(body).as_bytes() != slot.get(HEADER_SLOT as usize - 32..)? {
            return None;
        }
        if &slot[..8] != MAGIC {
            return None;
        }
        let u32_at = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().unwrap_or([0; 8]));
        if u32_at(8) != VERSION {
            return None;
        }
        let id = &slot[32..32 + BASE_ID_LEN];
        let id_len = id.iter().position(|&b| b == 0).unwrap_or(BASE_ID_LEN);
        let after = 32 + BASE_ID_LEN;
        let mut boot = [0u8; 16];
        boot.copy_from_slice(&slot[after + 4..after + 20]);
        Some(Header {
            cluster_shift: u32_at(12),
            size: u64_at(16),
            base_size: u64_at(24),
            base_id: String::from_utf8_lossy(&id[..id_len]).into_owned(),
            in_use: u32_at(after) != 0,
            boot,
            generation: u64_at(after + 20),
        })
    }
}

/// Where things are in the file.
#[derive(Debug, Clone, Copy)]
struct Layout {
    cluster: u64,
    clusters: u64,
    committed: u64,
    live: u64,
    data: u64,
}

impl Layout {
    fn new(size: u64, cluster_shift: u32) -> Self {
        let cluster = 1u64 << cluster_shift;
        let clusters = size.div_ceil(cluster);
        let region = (clusters * 8).div_ceil(HEADER_AREA) * HEADER_AREA;
        let committed = HEADER_AREA;
        let live = committed + region;
        // The data area starts on a 1 MiB boundary, so slots stay aligned for O_DIRECT.
        let data = (live + region).div_ceil(1 << 20) << 20;
        Self {
            cluster,
            clusters,
            committed,
            live,
            data,
        }
    }

    fn slot_offset(&self, slot: u64) -> u64 {
        self.data + slot * self.cluster
    }
}

/// In-memory state of the maps.
#[derive(Debug, Default)]
struct MapState {
    /// Cluster → entry, for every cluster that is not [`UNWRITTEN`].
    entries: HashMap<u64, u64>,
    /// Clusters whose entry changed since the last commit.
    dirty: BTreeSet<u64>,
    /// Slots handed out so far (the data area's high-water mark).
    next_slot: u64,
    /// Slots free for reuse now.
    free: BTreeSet<u64>,
    /// Slots freed since the last commit: the committed map may still point at them.
    pending_free: Vec<u64>,
}

impl MapState {
    fn entry(&self, cluster: u64) -> u64 {
        self.entries.get(&cluster).copied().unwrap_or(UNWRITTEN)
    }

    fn set(&mut self, cluster: u64, value: u64) -> u64 {
        let old = if value == UNWRITTEN {
            self.entries.remove(&cluster)
        } else {
            self.entries.insert(cluster, value)
        };
        self.dirty.insert(cluster);
        old.unwrap_or(UNWRITTEN)
    }

    /// `count` contiguous slots, or one reused slot when `count` is 1.
    fn allocate(&mut self, count: u64) -> u64 {
        if count == 1 {
            if let Some(slot) = self.free.pop_first() {
                return slot;
            }
        }
        let first = self.next_slot;
        self.next_slot += count;
        first
    }
}

/// Options for creating an overlay.
#[derive(Debug, Clone, Default)]
pub struct OverlayOptions {
    /// Device size; at least the base's (the part past the base reads as zeros). `None`:
    /// the base's size.
    pub size: Option<u64>,
}

/// A writable device made of a read-only base and an overlay file.
pub struct OverlayTarget {
    base: SharedTarget,
    file: File,
    path: PathBuf,
    info: TargetInfo,
    layout: Layout,
    header: Mutex<Header>,
    state: RwLock<MapState>,
    commit_lock: Mutex<()>,
    /// Opened with [`OverlayTarget::open_read_only`]: the file is never written.
    read_only: bool,
}

/// What an overlay file's header records, read without opening it for serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayDescription {
    /// Size of the device it makes.
    pub size: u64,
    /// Cluster size, which is the block size of the base it was made over.
    pub block_size: u32,
    /// Size of that base.
    pub base_size: u64,
    /// How that base is identified (`image:<blob id>` for an image).
    pub base_id: String,
    /// A server has the overlay open now.
    pub in_use: bool,
}

/// Reads the newest valid header of the overlay file `file` (at `path`).
fn read_header(file: &File, path: &Path) -> Result<Header> {
    let invalid = |problem: String| BlockError::InvalidOverlay {
        path: path.display().to_string(),
        problem,
    };
    let mut slots = [0u8; 2 * HEADER_SLOT as usize];
    file.read_exact_at(&mut slots, 0)
        .map_err(|e| invalid(format!("its header cannot be read: {e}")))?;
    [
        Header::decode(&slots[..HEADER_SLOT as usize]),
        Header::decode(&slots[HEADER_SLOT as usize..]),
    ]
    .into_iter()
    .flatten()
    .max_by_key(|h| h.generation)
    .ok_or_else(|| invalid("no valid header (not an overlay, or damaged)".into()))
}

impl std::fmt::Debug for OverlayTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayTarget")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the base is identified in the header: images by their blob id, anything else by
/// its size alone (a raw file may be moved or renamed).
fn base_identity(base: &TargetInfo) -> String {
    if base.description.starts_with("image:") {
        base.description.clone()
    } else {
        format!("size:{}", base.size)
    }
}

/// What [`OverlayTarget::open`] found, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayRecovery {
    /// A new overlay file was created.
    Created,
    /// The overlay had been closed cleanly.
    Clean,
    /// The serving process had died while the machine kept running: the live map was
    /// taken and committed.
    AfterProcessCrash,
    /// The machine had gone down: the committed map was taken.
    AfterMachineCrash,
}

impl OverlayTarget {
    /// Opens the overlay at `path` over `base`, creating it if it does not exist.
    pub fn open(
        path: &Path,
        base: SharedTarget,
        options: &OverlayOptions,
    ) -> Result<(Self, OverlayRecovery)> {
        Self::open_mode(path, base, options, false)
    }

    /// Opens the existing overlay at `path` over `base` to read the device it makes,
    /// without writing anything to the file (not even its header): the writes a killed
    /// server left are read as a writable open would recover them, and left as they are.
    /// Refused while a server has the overlay open.
    pub fn open_read_only(path: &Path, base: SharedTarget) -> Result<(Self, OverlayRecovery)> {
        Self::open_mode(path, base, &OverlayOptions::default(), true)
    }

    /// What the header of the overlay file at `path` records.
    pub fn describe(path: &Path) -> Result<OverlayDescription> {
        let file = File::open(path).context(|| format!("opening overlay {}", path.display()))?;
        let header = read_header(&file, path)?;
        // SAFETY: flock on a descriptor we own; the result is checked. The shared lock,
        // if taken, is released when `file` closes below.
        let in_use = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0;
        Ok(OverlayDescription {
            size: header.size,
            block_size: 1u32 << header.cluster_shift.min(31),
            base_size: header.base_size,
            base_id: header.base_id,
            in_use,
        })
    }

    fn open_mode(
        path: &Path,
        base: SharedTarget,
        options: &OverlayOptions,
        read_only: bool,
    ) -> Result<(Self, OverlayRecovery)> {
        let invalid = |problem: String| BlockError::InvalidOverlay {
            path: path.display().to_string(),
            problem,
        };
        let base_info = base.info().clone();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .create(!read_only)
            .truncate(false)
            .open(path)
            .context(|| format!("opening overlay {}", path.display()))?;
        // A reader shares the lock with other readers, never with a server.
        let mode = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; the result is checked.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
            return Err(BlockError::OverlayBusy {
                path: path.display().to_string(),
            });
        }
        let len = file
            .metadata()
            .context(|| format!("reading {}", path.display()))?
            .len();
        let block = base_info.block_size;
        if len == 0 && read_only {
            return Err(invalid(
                "the file is empty (no write was ever made through it)".into(),
            ));
        }
        let (header, recovery) = if len == 0 {
            let size = options.size.unwrap_or(base_info.size).max(base_info.size);
            let size = size.div_ceil(u64::from(block)) * u64::from(block);
            let header = Header {
                cluster_shift: block.trailing_zeros(),
                size,
                base_size: base_info.size,
                base_id: base_identity(&base_info),
                in_use: false,
                boot: [0; 16],
                generation: 0,
            };
            let layout = Layout::new(size, header.cluster_shift);
            file.set_len(layout.data)
                .context(|| format!("sizing overlay {}", path.display()))?;
            (header, OverlayRecovery::Created)
        } else {
            let header = read_header(&file, path)?;
            if header.cluster_shift != block.trailing_zeros() {
                return Err(invalid(format!(
                    "its clusters are {} bytes, the base's blocks {block}",
                    1u64 << header.cluster_shift.min(40)
                )));
            }
            let identity = base_identity(&base_info);
            if header.base_id != identity || header.base_size != base_info.size {
                return Err(BlockError::OverlayBaseMismatch {
                    path: path.display().to_string(),
                    expected: header.base_id.clone(),
                    actual: identity,
                });
            }
            if let Some(size) = options.size {
                if size > header.size {
                    tracing::warn!(overlay = %path.display(), "the overlay keeps its size of {} bytes ({size} asked)", header.size);
                }
            }
            let recovery = if !header.in_use {
                OverlayRecovery::Clean
            } else if header.boot == boot_id() {
                OverlayRecovery::AfterProcessCrash
            } else {
                OverlayRecovery::AfterMachineCrash
            };
            (header, recovery)
        };
        let layout = Layout::new(header.size, header.cluster_shift);
        let size = header.size;
        let target = OverlayTarget {
            info: TargetInfo {
                size,
                block_size: block,
                read_only,
                discard: !read_only,
                write_zeroes: !read_only,
                description: format!("overlay:{} on {}", path.display(), base_info.description),
            },
            base,
            file,
            path: path.to_path_buf(),
            layout,
            header: Mutex::new(header),
            state: RwLock::new(MapState::default()),
            commit_lock: Mutex::new(()),
            read_only,
        };
        target.load(recovery)?;
        if !read_only {
            target.write_header(true)?;
        }
        tracing::info!(overlay = %path.display(), ?recovery, clusters = target.read_state().entries.len(), "opened overlay");
        Ok((target, recovery))
    }

    fn read_state(&self) -> RwLockReadGuard<'_, MapState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, MapState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the header (into the slot the previous generation did not use) and syncs.
    fn write_header(&self, in_use: bool) -> Result<()> {
        let mut header = lock(&self.header);
        header.in_use = in_use;
        header.boot = boot_id();
        header.generation += 1;
        let offset = (header.generation % 2) * HEADER_SLOT;
        self.file
            .write_all_at(&header.encode(), offset)
            .and_then(|()| self.file.sync_data())
            .context(|| format!("writing the header of overlay {}", self.path.display()))
    }

    /// Reads the non-zero entries of the map region at `start`; with `check`, an entry
    /// pointing past the data area is an error (without, the region is only being
    /// compared before it is rewritten).
    fn read_region(&self, start: u64, check: bool) -> Result<HashMap<u64, u64>> {
        let invalid = |problem: String| BlockError::InvalidOverlay {
            path: self.path.display().to_string(),
            problem,
        };
        let end = start + self.layout.clusters * 8;
        let file_len = self
            .file
            .metadata()
            .context(|| format!("reading {}", self.path.display()))?
            .len();
        let max_slot = file_len.saturating_sub(self.layout.data) / self.layout.cluster;
        let mut entries = HashMap::new();
        let mut at = start;
        let mut buf = vec![0u8; 1 << 20];
        while at < end {
            // Skip holes: a fresh overlay's maps are all hole.
            // SAFETY: lseek on a descriptor we own.
            let data = unsafe { libc::lseek(self.file.as_raw_fd(), at as i64, libc::SEEK_DATA) };
            if data < 0 || data as u64 >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(self.file.as_raw_fd(), data, libc::SEEK_HOLE) };
            let run_end = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            let mut pos = (data as u64 - start) / 8 * 8 + start;
            while pos < run_end {
                let n = ((run_end - pos).min(buf.len() as u64) / 8 * 8).max(8) as usize;
                self.file
                    .read_exact_at(&mut buf[..n], pos)
                    .context(|| format!("reading the map of overlay {}", self.path.display()))?;
                for (i, raw) in buf[..n].chunks_exact(8).enumerate() {
                    let value = u64::from_le_bytes(raw.try_into().unwrap_or([0; 8]));
                    if value == UNWRITTEN {
                        continue;
                    }
                    let cluster = (pos - start) / 8 + i as u64;
                    if check && value >= FIRST_SLOT && value - FIRST_SLOT >= max_slot {
                        return Err(invalid(format!(
                            "cluster {cluster} points at slot {} past the end of the file",
                            value - FIRST_SLOT
                        )));
                    }
                    entries.insert(cluster, value);
                }
                pos += n as u64;
            }
            at = run_end;
        }
        Ok(entries)
    }

    /// Loads the maps as `recovery` says, and makes both regions agree.
    fn load(&self, recovery: OverlayRecovery) -> Result<()> {
        if recovery == OverlayRecovery::Created {
            return Ok(());
        }
        // The map that is taken is checked; the other is only compared and rewritten (after
        // a machine crash the live map may hold anything).
        let machine_crash = recovery == OverlayRecovery::AfterMachineCrash;
        let committed = self.read_region(self.layout.committed, machine_crash)?;
        let live = self.read_region(self.layout.live, !machine_crash)?;
        let (chosen, stale_region, stale) = match recovery {
            OverlayRecovery::AfterMachineCrash => (committed, self.layout.live, live),
            _ => (live, self.layout.committed, committed),
        };
        // No two clusters may share a slot.
        let mut used = BTreeSet::new();
        for (&cluster, &value) in &chosen {
            if value >= FIRST_SLOT && !used.insert(value - FIRST_SLOT) {
                return Err(BlockError::InvalidOverlay {
                    path: self.path.display().to_string(),
                    problem: format!(
                        "cluster {cluster} shares slot {} with another",
                        value - FIRST_SLOT
                    ),
                });
            }
        }
        let next_slot = used.last().map_or(0, |s| s + 1);
        let differing: Vec<u64> = chosen
            .keys()
            .chain(stale.keys())
            .copied()
            .filter(|c| chosen.get(c) != stale.get(c))
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .collect();
        {
            let mut state = self.write_state();
            state.free = (0..next_slot).filter(|s| !used.contains(s)).collect();
            state.next_slot = next_slot;
            state.entries = chosen;
        }
        if !differing.is_empty() && self.read_only {
            tracing::info!(overlay = %self.path.display(), clusters = differing.len(), ?recovery, "reading the overlay as a server would recover it, without recovering it");
        } else if !differing.is_empty() {
            if recovery == OverlayRecovery::AfterMachineCrash {
                tracing::warn!(overlay = %self.path.display(), clusters = differing.len(), "the machine went down with unflushed writes; they are dropped");
            } else {
                tracing::info!(overlay = %self.path.display(), clusters = differing.len(), "committing the writes of the process that died");
            }
            // Data first (after a process crash it is in the page cache), then the region.
            self.file
                .sync_data()
                .context(|| format!("syncing overlay {}", self.path.display()))?;
            let state = self.read_state();
            let values: Vec<(u64, u64)> = differing.iter().map(|&c| (c, state.entry(c))).collect();
            drop(state);
            self.write_entries(stale_region, &values)?;
            self.file
                .sync_data()
                .context(|| format!("syncing overlay {}", self.path.display()))?;
        }
        Ok(())
    }

    /// Writes `(cluster, value)` pairs (sorted by cluster) into the region at `region`,
    /// one `pwrite` per run of adjacent clusters.
    fn write_entries(&self, region: u64, values: &[(u64, u64)]) -> Result<()> {
        let mut i = 0;
        let mut buf = Vec::new();
        while i < values.len() {
            let first = values[i].0;
            buf.clear();
            let mut j = i;
            while j < values.len() && values[j].0 == first + (j - i) as u64 {
                buf.extend_from_slice(&values[j].1.to_le_bytes());
                j += 1;
            }
            self.file
                .write_all_at(&buf, region + first * 8)
                .context(|| format!("writing the map of overlay {}", self.path.display()))?;
            i = j;
        }
        Ok(())
    }

    /// Commits: data durable, then the changed entries into the committed map, durable.
    fn commit(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _serial = lock(&self.commit_lock);
        let (values, frees) = {
            let mut state = self.write_state();
            let dirty = std::mem::take(&mut state.dirty);
            let values: Vec<(u64, u64)> = dirty.iter().map(|&c| (c, state.entry(c))).collect();
            (values, std::mem::take(&mut state.pending_free))
        };
        let result = self
            .file
            .sync_data()
            .context(|| format!("syncing overlay {}", self.path.display()))
            .and_then(|()| {
                if values.is_empty() {
                    return Ok(());
                }
                self.write_entries(self.layout.committed, &values)?;
                self.file
                    .sync_data()
                    .context(|| format!("syncing overlay {}", self.path.display()))
            });
        let mut state = self.write_state();
        match result {
            Ok(()) => {
                state.free.extend(frees);
                Ok(())
            }
            Err(err) => {
                state.dirty.extend(values.iter().map(|(c, _)| *c));
                state.pending_free.extend(frees);
                Err(err)
            }
        }
    }

    /// Test support: ends the overlay the way a killed process does (no commit, no clean
    /// header; the descriptor closes, releasing the lock).
    #[doc(hidden)]
    pub fn abandon_as_if_killed(self) {
        let mut this = std::mem::ManuallyDrop::new(self);
        // SAFETY: each field is dropped exactly once here and `this` is never used again
        // (ManuallyDrop keeps Drop::drop, which would commit, from running).
        unsafe {
            std::ptr::drop_in_place(&mut this.base);
            std::ptr::drop_in_place(&mut this.file);
            std::ptr::drop_in_place(&mut this.path);
            std::ptr::drop_in_place(&mut this.info);
            std::ptr::drop_in_place(&mut this.header);
            std::ptr::drop_in_place(&mut this.state);
            std::ptr::drop_in_place(&mut this.commit_lock);
        }
    }

    /// Test support: makes the overlay at `path` look as if the machine went down while it
    /// was in use (its header names another boot).
    #[doc(hidden)]
    pub fn mark_used_in_another_boot(path: &Path) -> Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .context(|| format!("opening {}", path.display()))?;
        let mut slots = [0u8; 2 * HEADER_SLOT as usize];
        file.read_exact_at(&mut slots, 0)
            .context(|| format!("reading {}", path.display()))?;
        let mut header = [
            Header::decode(&slots[..HEADER_SLOT as usize]),
            Header::decode(&slots[HEADER_SLOT as usize..]),
        ]
        .into_iter()
        .flatten()
        .max_by_key(|h| h.generation)
        .ok_or_else(|| BlockError::InvalidOverlay {
            path: path.display().to_string(),
            problem: "no valid header".into(),
        })?;
        header.in_use = true;
        header.boot = [0xee; 16];
        header.generation += 1;
        file.write_all_at(&header.encode(), (header.generation % 2) * HEADER_SLOT)
            .and_then(|()| file.sync_data())
            .context(|| format!("writing {}", path.display()))
    }

    /// Clusters written to the overlay (data or zeros).
    pub fn written_clusters(&self) -> u64 {
        self.read_state().entries.len() as u64
    }

    /// The overlay file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Frees `slot` once the next commit no longer refers to it.
    fn release(state: &mut MapState, old: u64) {
        if old >= FIRST_SLOT {
            state.pending_free.push(old - FIRST_SLOT);
        }
    }

    /// Points every cluster of `[offset, offset + len)` at `value` (zeros or unwritten),
    /// recording it in the live map; the slots they leave are punched out.
    fn set_range(&self, offset: u64, len: u64, value: u64) -> Result<()> {
        let cluster = self.layout.cluster;
        let first = offset / cluster;
        let last = (offset + len).div_ceil(cluster);
        let mut punched = Vec::new();
        let mut state = self.write_state();
        for c in first..last {
            let old = state.set(c, value);
            if old >= FIRST_SLOT {
                punched.push(old - FIRST_SLOT);
            }
            Self::release(&mut state, old);
        }
        let values: Vec<(u64, u64)> = (first..last).map(|c| (c, value)).collect();
        self.write_entries(self.layout.live, &values)?;
        drop(state);
        for slot in punched {
            // Only a hint to save space: the slot is not reused before the next commit.
            let _ = fallocate(
                &self.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                self.layout.slot_offset(slot),
                cluster,
            );
        }
        Ok(())
    }
}

impl Drop for OverlayTarget {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        let closed = self.commit().and_then(|()| self.write_header(false));
        if let Err(err) = closed {
            tracing::error!(overlay = %self.path.display(), "cannot close the overlay cleanly: {err}");
        }
    }
}

impl OverlayTarget {
    /// Where `[offset, offset + len)` is, taken under the lock: `(offset, len, entry)` runs,
    /// one per written cluster and one per stretch of unwritten ones. Read the base after
    /// it, without the lock: a base read may wait for a fetch.
    fn read_plan(&self, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let cluster = self.layout.cluster;
        let end = offset + len;
        let mut plan: Vec<(u64, u64, u64)> = Vec::new();
        let state = self.read_state();
        let mut at = offset;
        while at < end {
            let c = at / cluster;
            let piece = ((c + 1) * cluster).min(end) - at;
            let value = state.entry(c);
            match plan.last_mut() {
                Some(last) if last.2 == UNWRITTEN && value == UNWRITTEN => last.1 += piece,
                _ => plan.push((at, piece, value)),
            }
            at += piece;
        }
        plan
    }
}

impl BlockTarget for OverlayTarget {
    fn info(&self) -> &TargetInfo {
        &self.info
    }

    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let cluster = self.layout.cluster;
        let base_size = self.base.info().size;
        for (at, piece, value) in self.read_plan(offset, len) {
            match value {
                UNWRITTEN => {
                    let in_base = base_size.saturating_sub(at).min(piece);
                    if in_base > 0 {
                        self.base.map_read(at, in_base, out)?;
                    }
                    push_extent(
                        out,
                        Extent {
                            len: piece - in_base,
                            source: Source::Zero,
                        },
                    );
                }
                ZEROS => push_extent(
                    out,
                    Extent {
                        len: piece,
                        source: Source::Zero,
                    },
                ),
                slot => push_extent(
                    out,
                    Extent {
                        len: piece,
                        source: Source::File {
                            fd: self.file.as_raw_fd(),
                            offset: self.layout.slot_offset(slot - FIRST_SLOT) + at % cluster,
                        },
                    },
                ),
            }
        }
        Ok(())
    }

    fn start_read(&self, offset: u64, len: u64) -> Progress {
        // The base's part of the range: the unwritten clusters below its end.
        let base_size = self.base.info().size;
        let mut waiting = Vec::new();
        for (at, piece, value) in self.read_plan(offset, len) {
            let in_base = base_size.saturating_sub(at).min(piece);
            if value != UNWRITTEN || in_base == 0 {
                continue;
            }
            match self.base.start_read(at, in_base) {
                Progress::Done(Ok(())) => {}
                Progress::Done(Err(err)) => return Progress::Done(Err(err)),
                Progress::Pending(completion) => waiting.push(completion),
            }
        }
        match waiting.len() {
            0 => Progress::Done(Ok(())),
            1 => Progress::Pending(waiting.remove(0)),
            _ => match Completion::all_of(waiting) {
                Ok(all) => Progress::Pending(all),
                Err(err) => Progress::Done(Err(err)),
            },
        }
    }

    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<WriteTicket> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let cluster = self.layout.cluster;
        if !offset.is_multiple_of(cluster) || !len.is_multiple_of(cluster) {
            return Err(BlockError::Misaligned {
                offset,
                len,
                block_size: cluster as u32,
            });
        }
        let first = offset / cluster;
        let last = (offset + len) / cluster;
        let mut ticket = WriteTicket::default();
        let mut state = self.write_state();
        let mut c = first;
        while c < last {
            let value = state.entry(c);
            if value >= FIRST_SLOT {
                // Written before: in place.
                push_extent(
                    out,
                    Extent {
                        len: cluster,
                        source: Source::File {
                            fd: self.file.as_raw_fd(),
                            offset: self.layout.slot_offset(value - FIRST_SLOT),
                        },
                    },
                );
                c += 1;
                continue;
            }
            // A run of clusters without a slot gets fresh, contiguous slots.
            let mut run = 1;
            while c + run < last && state.entry(c + run) < FIRST_SLOT {
                run += 1;
            }
            let slot = state.allocate(run);
            for k in 0..run {
                ticket.allocations.push((c + k, slot + k));
            }
            push_extent(
                out,
                Extent {
                    len: run * cluster,
                    source: Source::File {
                        fd: self.file.as_raw_fd(),
                        offset: self.layout.slot_offset(slot),
                    },
                },
            );
            c += run;
        }
        Ok(ticket)
    }

    fn finish_write(&self, ticket: WriteTicket, written: bool, fua: bool) -> Result<()> {
        if !ticket.allocations.is_empty() {
            let mut state = self.write_state();
            if !written {
                // Nothing refers to the slots yet: free at once.
                state
                    .free
                    .extend(ticket.allocations.iter().map(|&(_, slot)| slot));
                return Ok(());
            }
            let values: Vec<(u64, u64)> = ticket
                .allocations
                .iter()
                .map(|&(c, slot)| (c, slot + FIRST_SLOT))
                .collect();
            // The live map first: if it cannot be written the write fails as a whole.
            if let Err(err) = self.write_entries(self.layout.live, &values) {
                state
                    .free
                    .extend(ticket.allocations.iter().map(|&(_, slot)| slot));
                return Err(err);
            }
            for &(c, value) in &values {
                let old = state.set(c, value);
                // A racing write to the same cluster got there first: its slot goes.
                Self::release(&mut state, old);
            }
        }
        if written && fua {
            self.commit()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.commit()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        // Discarded clusters read as zeros (not as the base: the guest let them go).
        self.set_range(offset, len, ZEROS)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.set_range(offset, len, ZEROS)
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut counters = self.base.counters();
        counters.push((
            "berth_block_overlay_clusters",
            "Clusters written to the overlay (data or zeros).",
            self.written_clusters(),
        ));
        counters
    }
}
