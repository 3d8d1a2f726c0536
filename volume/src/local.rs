//! A volume's state on this host, under `CACHE_DIR/<volume id>/`:
//!
//! ```text
//! lock       flock: one process serves a volume's local state at a time
//! meta       JSON, replaced atomically: which manifest version the cache reflects,
//!            the log epochs, the session that served last
//! cache      sparse file the size of the volume: clean blocks (as in the bucket)
//! present    which blocks of `cache` hold the current bucket data (bitmap)
//! wal/       the write-ahead log (see `wal`)
//! ```
//!
//! The presence bitmap obeys two rules, so that after any crash a set bit means the
//! cache block holds the current data: a bit reaches the disk only after its block's data
//! did (the cache file is synced before bits are written), and a bit is cleared on disk
//! before its block is overwritten or punched.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, Result, VolumeError};

/// The lock on a local state directory.
#[derive(Debug)]
pub struct LocalDir {
    pub path: PathBuf,
    _lock: File,
}

impl LocalDir {
    /// Creates (if needed) and locks `path`. The new directories' entries are synced, so
    /// that a power cut cannot take the state directory (with a log that FLUSHes made
    /// durable) away from its parent.
    pub fn lock(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path.join("wal"))
            .context(|| format!("creating {}", path.display()))?;
        sync_dir(path)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        let lock_path = path.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .context(|| format!("opening {}", lock_path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(VolumeError::LocalBusy(path.display().to_string()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// Records `session` as the one starting to serve from this state (synced) and
    /// returns the one recorded before, if any.
    pub fn swap_starting_session(&self, session: &str) -> Result<Option<String>> {
        let path = self.path.join("starting-session");
        let earlier = std::fs::read_to_string(&path)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let staged = self.path.join("starting-session.new");
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&staged)?;
            std::io::Write::write_all(&mut file, session.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&staged, &path)?;
            File::open(&self.path)?.sync_all()
        };
        write().context(|| format!("recording the starting session in {}", path.display()))?;
        Ok(earlier)
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.path.join("wal")
    }

    pub fn meta_path(&self) -> PathBuf {
        self.path.join("meta")
    }

    pub fn read_meta(&self) -> Result<Option<LocalMeta>> {
        let path = self.meta_path();
        match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data).map(Some).map_err(|e| {
                VolumeError::ForeignLocalState {
                    path: path.display().to_string(),
                    problem: format!("its meta file is unreadable: {e}"),
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context(|| format!("reading {}", path.display())),
        }
    }

    /// Replaces the meta file atomically and durably.
    pub fn write_meta(&self, meta: &LocalMeta) -> Result<()> {
        let path = self.meta_path();
        let staged = self.path.join("meta.new");
        let data = serde_json::to_vec_pretty(meta).unwrap_or_default();
        let file = File::create(&staged).context(|| format!("creating {}", staged.display()))?;
        file.write_all_at(&data, 0)
            .and_then(|()| file.sync_all())
            .context(|| format!("writing {}", staged.display()))?;
        std::fs::rename(&staged, &path).context(|| format!("renaming {}", staged.display()))?;
        sync_dir(&self.path)
    }

    /// Moves the log aside (it holds writes the bucket will never take), keeping it for
    /// the operator; returns where it went.
    pub fn quarantine_wal(&self, why: &str) -> Result<Option<PathBuf>> {
        let wal = self.wal_dir();
        let has_files = std::fs::read_dir(&wal)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if !has_files {
            return Ok(None);
        }
        let target = self
            .path
            .join(format!("orphaned-wal-{}", crate::format::now_ms()));
        std::fs::rename(&wal, &target).context(|| format!("moving {} aside", wal.display()))?;
        std::fs::write(target.join("WHY"), format!("{why}\n"))
            .context(|| format!("writing {}", target.display()))?;
        std::fs::create_dir_all(&wal).context(|| format!("creating {}", wal.display()))?;
        sync_dir(&self.path)?;
        Ok(Some(target))
    }

    /// Forgets the cached blocks (another writer changed the volume).
    pub fn reset_cache(&self) -> Result<()> {
        for name in ["cache", "present"] {
            let path = self.path.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).context(|| format!("removing {}", path.display())),
            }
        }
        sync_dir(&self.path)
    }

    /// The cache file, sized to the volume, and a descriptor for direct writes to it
    /// where the file system allows them for `block_size` blocks.
    pub fn open_cache(&self, size: u64, block_size: u64) -> Result<(File, Option<DirectWrites>)> {
        let path = self.path.join("cache");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .context(|| format!("opening {}", path.display()))?;
        file.set_len(size)
            .context(|| format!("sizing {}", path.display()))?;
        let direct = DirectWrites::open(&path, &file, block_size);
        Ok((file, direct))
    }
}

/// A second descriptor of the cache file, opened with `O_DIRECT`, for the uploader's
/// writes of published batches: they go from the batch's buffer to the disk without a
/// copy into the page cache. The cache file's readers are block devices whose guests keep
/// their own page cache, so a host copy of every byte uploaded is memory spent twice; the
/// apply also skips a copy per page and the file system's per-page write-back work, and
/// takes no fresh page cache (on a VM host that hands free pages back to its hypervisor,
/// each costs a fault). A write that is not aligned as the file system asks goes through
/// the ordinary descriptor, as do all of them once the file system refused one.
#[derive(Debug)]
pub struct DirectWrites {
    file: File,
    memory_align: usize,
    offset_align: u64,
    refused: AtomicBool,
}

impl DirectWrites {
    /// Opens `path` (the cache file behind `cache`) for direct writes, when the file
    /// system reports direct I/O alignments that `block_size` blocks meet; `None` otherwise.
    pub fn open(path: &Path, cache: &File, block_size: u64) -> Option<Self> {
        let (memory_align, offset_align) = direct_io_alignment(cache)?;
        if memory_align == 0
            || offset_align == 0
            || !block_size.is_multiple_of(u64::from(memory_align))
            || !block_size.is_multiple_of(u64::from(offset_align))
        {
            return None;
        }
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        Some(Self {
            file,
            memory_align: memory_align as usize,
            offset_align: u64::from(offset_align),
            refused: AtomicBool::new(false),
        })
    }

    /// Whether writes still go direct (the file system has not refused one).
    pub fn active(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// Writes `bytes` at `offset` of the cache file: directly when they are aligned,
    /// through `cache` (the ordinary descriptor) otherwise. Answers whether the write went
    /// direct.
    pub fn write_all_at(&self, cache: &File, bytes: &[u8], offset: u64) -> std::io::Result<bool> {
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(self.memory_align)
            && offset.is_multiple_of(self.offset_align)
            && (bytes.len() as u64).is_multiple_of(self.offset_align);
        if aligned && self.active() {
            match self.file.write_all_at(bytes, offset) {
                Ok(()) => return Ok(true),
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                    self.refused.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        "the file system refused a direct write to the volume's cache file ({err}): its writes go through the page cache from now on"
                    );
                }
                Err(err) => return Err(err),
            }
        }
        cache.write_all_at(bytes, offset).map(|()| false)
    }
}

/// The memory and file-offset alignments direct I/O on `file` needs, as statx(2) reports
/// them (Linux 6.1+; `None` where the file system does not support direct I/O).
fn direct_io_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is a plain C struct of integers, for which all zeros is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the call's length, the empty path with
    // AT_EMPTY_PATH names it, and `stx` is a valid, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

pub fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .context(|| format!("syncing the directory {}", path.display()))
}

/// What `meta` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalMeta {
    pub volume_id: String,
    pub location: String,
    pub size: u64,
    pub block_size: u32,
    /// The session that served last from this directory.
    pub session: String,
    /// The manifest version the cache and `present` reflect.
    pub applied_version: u64,
    /// Everything of the log up to this sequence number is in that version.
    pub applied_seq: u64,
    /// Log epochs: (epoch, its first sequence number), ascending.
    pub epochs: Vec<(u32, u64)>,
    /// The next segment number to create.
    pub next_segment: u32,
}

impl LocalMeta {
    /// The epoch a record of sequence number `seq` must carry to count.
    pub fn epoch_of(&self, seq: u64) -> Option<u32> {
        self.epochs
            .iter()
            .rev()
            .find(|&&(_, start)| start <= seq)
            .map(|&(epoch, _)| epoch)
    }
}

const PRESENT_MAGIC: &[u8; 8] = b"BERTHPRS";
const PRESENT_HEADER: u64 = 4096;
const PAGE_WORDS: usize = 512;

/// Which cache blocks hold the bucket's current data.
#[derive(Debug)]
pub struct Presence {
    words: Vec<u64>,
    blocks: u64,
    /// Pages (of PAGE_WORDS words) changed since the last persist.
    dirty_pages: std::collections::BTreeSet<usize>,
    count: u64,
}

impl Presence {
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks set.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn get(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn put(&mut self, block: u64, value: bool) {
        let word = (block / 64) as usize;
        let bit = 1u64 << (block % 64);
        let was = self.words[word] & bit != 0;
        if was == value {
            return;
        }
        if value {
            self.words[word] |= bit;
            self.count += 1;
        } else {
            self.words[word] &= !bit;
            self.count -= 1;
        }
        self.dirty_pages.insert(word / PAGE_WORDS);
    }

    pub fn set_range(&mut self, start: u64, len: u64, value: bool) {
        let end = (start + len).min(self.blocks);
        for block in start..end {
            self.put(block, value);
        }
    }

    /// Runs of `[start, start + len)`: (first block, length, set).
    pub fn runs(&self, start: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for block in start..start + len {
            let set = self.get(block);
            match out.last_mut() {
                Some(last) if last.2 == set => last.1 += 1,
                _ => out.push((block, 1, set)),
            }
        }
        out
    }

    pub fn clear_all(&mut self) {
        for (i, w) in self.words.iter_mut().enumerate() {
            if *w != 0 {
                *w = 0;
                self.dirty_pages.insert(i / PAGE_WORDS);
            }
        }
        self.count = 0;
    }

    /// The changed pages, to persist: (file offset, bytes). Clears the change set.
    pub fn take_dirty(&mut self) -> Vec<(u64, Vec<u8>)> {
        let pages = std::mem::take(&mut self.dirty_pages);
        pages
            .into_iter()
            .map(|page| {
                let from = page * PAGE_WORDS;
                let to = (from + PAGE_WORDS).min(self.words.len());
                let bytes: Vec<u8> = self.words[from..to]
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect();
                (PRESENT_HEADER + (from * 8) as u64, bytes)
            })
            .collect()
    }

    /// Marks pages [`Self::take_dirty`] gave out as changed again (their write failed).
    pub fn requeue(&mut self, pages: &[(u64, Vec<u8>)]) {
        for (offset, _) in pages {
            let word = ((offset - PRESENT_HEADER) / 8) as usize;
            self.dirty_pages.insert(word / PAGE_WORDS);
        }
    }

    pub fn has_changes(&self) -> bool {
        !self.dirty_pages.is_empty()
    }
}

/// Local disk space the log and the cache leave free, for the small files the volume
/// rewrites (meta, presence checkpoints) and the reserve: a log segment is not created, and
/// data is not cached, into the last few MiB.
pub const DISK_HEADROOM: u64 = 4 << 20;

/// What a read's fetch leaves free: reads may use most of the headroom, writes may not.
pub const READ_HEADROOM: u64 = 1 << 20;

/// Bytes free for an unprivileged writer on the file system holding `file` (None if the
/// kernel does not say).
pub fn free_bytes(file: &File) -> Option<u64> {
    statfs(file).map(|stat| stat.f_bavail.saturating_mul(stat.f_bsize as u64))
}

/// The size of the file system holding `file`, in bytes (None if the kernel does not say).
pub fn total_bytes(file: &File) -> Option<u64> {
    statfs(file).map(|stat| stat.f_blocks.saturating_mul(stat.f_bsize as u64))
}

fn statfs(file: &File) -> Option<libc::statfs> {
    use std::os::fd::AsRawFd;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs fills the statfs it is given; the descriptor is open for the call.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatfs succeeded, so it initialised the structure.
    Some(unsafe { stat.assume_init() })
}

/// An ENOSPC error for `what`, when the local disk keeps less than the headroom free.
pub fn short_of_space(what: String) -> crate::error::VolumeError {
    crate::error::VolumeError::Io {
        context: what,
        source: std::io::Error::from_raw_os_error(libc::ENOSPC),
    }
}

/// Opens `path` for reading and writing, creating it empty if it is missing.
fn open_or_create(path: &Path) -> Result<File> {
    berth_cache::chunkmap::open_or_create(path).context(|| format!("opening {}", path.display()))
}

/// Space kept aside on the local disk for the small file the volume rewrites whole (its
/// meta file, written anew and renamed over the old one): with the disk full that rewrite
/// would fail and stop the volume, so the reserve is given back for it, and taken again
/// once there is room.
#[derive(Debug)]
pub struct Reserve {
    file: File,
    path: PathBuf,
    held: std::sync::atomic::AtomicBool,
}

impl Reserve {
    /// Bytes kept aside.
    pub const BYTES: u64 = 1 << 20;

    /// Opens (or creates) the reserve file in `dir` and fills it if there is room.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("reserve");
        let file = open_or_create(&path)?;
        let reserve = Self {
            file,
            path,
            held: std::sync::atomic::AtomicBool::new(false),
        };
        reserve.refill();
        Ok(reserve)
    }

    /// Takes the space again if it was given back; answers whether it is held.
    pub fn refill(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.held.load(Ordering::Relaxed) {
            return true;
        }
        let filled = crate::wal::preallocate(&self.file, Self::BYTES, &self.path).is_ok();
        self.held.store(filled, Ordering::Relaxed);
        filled
    }

    /// Gives the space back to the file system.
    pub fn release(&self) -> Result<()> {
        self.held.store(false, std::sync::atomic::Ordering::Relaxed);
        self.file
            .set_len(0)
            .context(|| format!("emptying {}", self.path.display()))
    }
}

/// The `present` file.
#[derive(Debug)]
pub struct PresenceFile {
    file: File,
    path: PathBuf,
}

impl PresenceFile {
    /// Opens (or creates, all clear) the bitmap of a volume of `blocks` blocks.
    pub fn open(dir: &Path, volume_id: &[u8; 16], blocks: u64) -> Result<(Self, Presence)> {
        let path = dir.join("present");
        let file = open_or_create(&path)?;
        let words = blocks.div_ceil(64) as usize;
        let mut header = [0u8; 64];
        let got = crate::wal::read_full_at(&file, &mut header, 0)
            .context(|| format!("reading {}", path.display()))?;
        let mut header_ok = got == 64
            && &header[..8] == PRESENT_MAGIC
            && header[8..24] == volume_id[..]
            && u64::from_le_bytes(header[24..32].try_into().unwrap_or_default()) == blocks;
        let mut presence = Presence {
            words: vec![0; words],
            blocks,
            dirty_pages: Default::default(),
            count: 0,
        };
        if header_ok {
            let mut raw = vec![0u8; words * 8];
            let got = crate::wal::read_full_at(&file, &mut raw, PRESENT_HEADER)
                .context(|| format!("reading {}", path.display()))?;
            if got == raw.len() {
                for (w, bytes) in presence.words.iter_mut().zip(raw.chunks_exact(8)) {
                    *w = u64::from_le_bytes(bytes.try_into().unwrap_or_default());
                }
                // Bits past the end would be garbage: keep them clear.
                if !blocks.is_multiple_of(64) {
                    if let Some(last) = presence.words.last_mut() {
                        *last &= (1u64 << (blocks % 64)) - 1;
                    }
                }
                presence.count = presence
                    .words
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum();
            } else {
                header_ok = false;
            }
        }
        if !header_ok {
            let mut fresh = [0u8; 64];
            fresh[..8].copy_from_slice(PRESENT_MAGIC);
            fresh[8..24].copy_from_slice(volume_id);
            fresh[24..32].copy_from_slice(&blocks.to_le_bytes());
            file.set_len(0)
                .and_then(|()| file.set_len(PRESENT_HEADER + words as u64 * 8))
                .and_then(|()| file.write_all_at(&fresh, 0))
                .and_then(|()| file.sync_all())
                .context(|| format!("initialising {}", path.display()))?;
        }
        // Allocated whole, so that writing its pages never needs space: with the disk
        // full, marking evicted blocks absent must still work (it is what frees space).
        if let Err(err) = crate::wal::preallocate(&file, PRESENT_HEADER + words as u64 * 8, &path) {
            tracing::warn!(
                "Cannot allocate {} in full ({}); with the local disk full, evicting cached \
                 blocks may fail.",
                path.display(),
                err.describe()
            );
        }
        Ok((Self { file, path }, presence))
    }

    /// Writes changed pages and syncs. The caller has synced the cache file first when
    /// any of these pages sets bits.
    pub fn write(&self, pages: &[(u64, Vec<u8>)]) -> Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        for (offset, bytes) in pages {
            self.file
                .write_all_at(bytes, *offset)
                .context(|| format!("writing {}", self.path.display()))?;
        }
        self.file
            .sync_data()
            .context(|| format!("syncing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` zeros in a new temporary directory, with its direct writer when the
    /// file system offers direct I/O for 4 KiB blocks.
    fn cache_file(len: u64) -> (tempfile::TempDir, File, Option<DirectWrites>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        let direct = DirectWrites::open(&path, &file, 4096);
        (dir, file, direct)
    }

    /// A page-aligned buffer of `len` bytes of `fill` (as batches are, in mappings of
    /// their own).
    fn aligned(len: usize, fill: u8) -> memmap2::MmapMut {
        let mut map = memmap2::MmapMut::map_anon(len).unwrap();
        map.fill(fill);
        map
    }

    fn read_back(file: &File, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn aligned_writes_go_direct_and_the_page_cache_sees_them() {
        let (_dir, file, direct) = cache_file(1 << 20);
        let Some(direct) = direct else {
            berth_testkit::skip(
                "the temporary directory's file system offers no direct I/O for 4 KiB blocks",
            );
            return;
        };
        // Cached first: the direct write must replace what the page cache holds.
        assert_eq!(read_back(&file, 8192, 16384), vec![0u8; 16384]);
        let data = aligned(16384, 0xa5);
        assert!(
            direct.write_all_at(&file, &data, 8192).unwrap(),
            "an aligned write went through the page cache"
        );
        assert_eq!(read_back(&file, 8192, 16384), vec![0xa5u8; 16384]);
        assert_eq!(
            read_back(&file, 0, 8192),
            vec![0u8; 8192],
            "the write spilled before its offset"
        );
        assert_eq!(
            read_back(&file, 24576, 4096),
            vec![0u8; 4096],
            "the write spilled past its end"
        );
        assert!(direct.active());
    }

    #[test]
    fn unaligned_writes_go_through_the_page_cache_and_land_the_same() {
        let (_dir, file, direct) = cache_file(1 << 20);
        let Some(direct) = direct else {
            berth_testkit::skip(
                "the temporary directory's file system offers no direct I/O for 4 KiB blocks",
            );
            return;
        };
        let data = aligned(8192, 0x3c);
        // An offset, a length and a buffer address that direct I/O would refuse.
        assert!(!direct.write_all_at(&file, &data, 4097).unwrap());
        assert!(!direct.write_all_at(&file, &data[..4000], 65536).unwrap());
        assert!(!direct.write_all_at(&file, &data[1..4097], 131072).unwrap());
        assert_eq!(read_back(&file, 4097, 8192), vec![0x3cu8; 8192]);
        assert_eq!(read_back(&file, 65536, 4000), vec![0x3cu8; 4000]);
        assert_eq!(read_back(&file, 131072, 4096), vec![0x3cu8; 4096]);
        // Still direct for the next aligned write: the page cache path was chosen, not forced.
        assert!(direct.active());
        assert!(direct.write_all_at(&file, &data, 262144).unwrap());
        assert_eq!(read_back(&file, 262144, 8192), vec![0x3cu8; 8192]);
    }

    #[test]
    fn blocks_smaller_than_the_file_systems_direct_alignment_get_no_direct_writer() {
        let (dir, file, direct) = cache_file(1 << 20);
        if direct.is_none() {
            berth_testkit::skip(
                "the temporary directory's file system offers no direct I/O for 4 KiB blocks",
            );
            return;
        }
        let (memory, offset) = direct_io_alignment(&file).unwrap();
        let alignment = u64::from(memory.max(offset));
        if alignment < 2 {
            berth_testkit::skip(&format!(
                "this file system aligns direct I/O to {alignment} byte: no block size is below it"
            ));
            return;
        }
        let path = dir.path().join("cache");
        assert!(
            DirectWrites::open(&path, &file, alignment / 2).is_none(),
            "a {}-byte block size under an alignment of {memory} (memory) and {offset} (offset) got a direct writer",
            alignment / 2
        );
    }
}
