//! The persistent per-chunk state map kept beside each cache file.
//!
//! On-disk format (all integers little endian): two slots of `slot_size` bytes
//! (a multiple of 4096), each
//! `magic "BRTHCMAP" | u32 version | u32 chunk_size | u64 blob_size | u64 generation |
//!  [u8; 32] blob id | u64 bitmap_len | u64 flags | [u8; 16] boot id |
//!  [u8; 32] blake3(header[0..96] ++ bitmap) | bitmap`.
//! Bit `i` of the bitmap (byte `i / 8`, bit `i % 8`) says chunk `i` is present and
//! durable in the cache file. An update writes the whole map into the slot of the
//! next generation and fdatasyncs it, so a torn write leaves the other slot intact;
//! on open the valid slot of the highest generation wins, and if neither is valid
//! (or it describes another blob) the map starts empty.
//!
//! `flags` bit 0 says the map was closed cleanly (its cache file synced, nothing open
//! it); while a blob is in use its map says "in use" and carries the kernel's boot id.
//! A map found in use from an earlier boot went through a machine crash or power cut,
//! and [`ChunkMap::needs_verification`] says its chunks deserve a re-hash; a map left
//! in use by a process that died in this boot does not (the page cache survived it and
//! every ready chunk was synced before it was marked).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

const MAGIC: &[u8; 8] = b"BRTHCMAP";
const VERSION: u32 = 2;
const HEADER_LEN: usize = 96;
const FLAG_CLEAN: u64 = 1;
const CHECKSUM_LEN: usize = 32;
const SLOT_ALIGN: usize = 4096;

/// What [`ChunkMap::open`] found on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapLoad {
    /// No map file existed.
    Created,
    /// A valid map was loaded.
    Loaded,
    /// A map of an older format was found: it starts empty.
    Outdated,
    /// A map existed but no slot was valid for this blob: it starts empty.
    Discarded,
}

/// Which chunks of one blob are present in its cache file.
#[derive(Debug)]
pub struct ChunkMap {
    file: File,
    path: PathBuf,
    blob_id: [u8; 32],
    chunk_size: u32,
    blob_size: u64,
    chunk_count: u64,
    bits: Vec<u8>,
    generation: u64,
    slot_size: usize,
    /// What the loaded slot said: closed cleanly, and the boot it was last used in.
    loaded_clean: bool,
    loaded_boot: [u8; 16],
    /// What the next persist writes.
    clean: bool,
}

/// Opens `path` for reading and writing, creating it empty if missing.
pub fn open_or_create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// The kernel's boot id (zeros if unavailable, which never matches a real one).
pub(crate) fn boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        for (i, byte) in id.iter_mut().enumerate() {
            let pair = hex
                .get(2 * i..2 * i + 2)
                .and_then(|p| std::str::from_utf8(p).ok());
            *byte = pair
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .unwrap_or(0);
        }
    }
    id
}

/// The byte of a bitmap holding chunk `index`'s bit, and that bit (byte `i / 8`, bit
/// `i % 8`: the layout of the chunk map and of the pending record).
pub(crate) fn bit_of(index: u64) -> (usize, u8) {
    ((index / 8) as usize, 1u8 << (index % 8))
}

/// Whether chunk `index`'s bit is set in `bits` (false past its end).
pub(crate) fn bit_is_set(bits: &[u8], index: u64) -> bool {
    let (byte, bit) = bit_of(index);
    bits.get(byte).is_some_and(|b| b & bit != 0)
}

impl ChunkMap {
    /// Opens (or creates) the map at `path` for the given blob geometry.
    pub fn open(
        path: &Path,
        blob_id: [u8; 32],
        chunk_size: u32,
        blob_size: u64,
    ) -> Result<(Self, MapLoad)> {
        let chunk_count = blob_size.div_ceil(u64::from(chunk_size));
        let bitmap_len = chunk_count.div_ceil(8) as usize;
        let slot_size = (HEADER_LEN + CHECKSUM_LEN + bitmap_len).div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
        let existed = path.exists();
        let file =
            open_or_create(path).context(|| format!("opening chunk map {}", path.display()))?;
        let mut map = ChunkMap {
            file,
            path: path.to_path_buf(),
            blob_id,
            chunk_size,
            blob_size,
            chunk_count,
            bits: vec![0; bitmap_len],
            generation: 0,
            slot_size,
            loaded_clean: false,
            loaded_boot: [0; 16],
            clean: true,
        };
        let mut best: Option<Slot> = None;
        let mut outdated = false;
        for slot in 0..2u64 {
            match map.read_slot(slot) {
                SlotRead::Valid(found) => {
                    if best
                        .as_ref()
                        .is_none_or(|b| found.generation > b.generation)
                    {
                        best = Some(found);
                    }
                }
                SlotRead::Outdated => outdated = true,
                SlotRead::Invalid => {}
            }
        }
        let outcome = match best {
            Some(slot) => {
                map.generation = slot.generation;
                map.bits = slot.bits;
                map.loaded_clean = slot.flags & FLAG_CLEAN != 0;
                map.loaded_boot = slot.boot;
                map.clean = map.loaded_clean;
                MapLoad::Loaded
            }
            None if outdated => MapLoad::Outdated,
            None if existed => MapLoad::Discarded,
            None => MapLoad::Created,
        };
        if outcome != MapLoad::Loaded {
            if outcome == MapLoad::Outdated {
                tracing::info!(
                    "chunk map {} has an older format; starting empty",
                    path.display()
                );
            }
            // Persist the empty state so an old, foreign map cannot resurface.
            map.persist()?;
        }
        Ok((map, outcome))
    }

    /// Whether the ready chunks should be re-hashed before they are trusted: the map
    /// was in use when the machine last went down (see the module documentation).
    pub fn needs_verification(&self) -> bool {
        self.ready_count() > 0 && !self.loaded_clean && self.loaded_boot != boot_id()
    }

    /// Whether the loaded map had been closed cleanly.
    pub fn was_closed_cleanly(&self) -> bool {
        self.loaded_clean
    }

    /// Records durably that the blob is in use (call before changing the cache file).
    pub fn begin_use(&mut self) -> Result<()> {
        self.clean = false;
        self.persist()
    }

    /// Records durably that the map is closed cleanly. Call only once the cache file
    /// is synced and nothing writes to it any more.
    pub fn mark_clean(&mut self) -> Result<()> {
        self.clean = true;
        self.persist()
    }

    fn encode(&self, generation: u64, boot: [u8; 16]) -> Vec<u8> {
        let mut slot = Vec::with_capacity(self.slot_size);
        slot.extend_from_slice(MAGIC);
        slot.extend_from_slice(&VERSION.to_le_bytes());
        slot.extend_from_slice(&self.chunk_size.to_le_bytes());
        slot.extend_from_slice(&self.blob_size.to_le_bytes());
        slot.extend_from_slice(&generation.to_le_bytes());
        slot.extend_from_slice(&self.blob_id);
        slot.extend_from_slice(&(self.bits.len() as u64).to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        slot.extend_from_slice(&flags.to_le_bytes());
        slot.extend_from_slice(&boot);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&slot[..HEADER_LEN]);
        hasher.update(&self.bits);
        slot.extend_from_slice(hasher.finalize().as_bytes());
        slot.extend_from_slice(&self.bits);
        slot.resize(self.slot_size, 0);
        slot
    }

    fn read_slot(&self, slot: u64) -> SlotRead {
        let mut buf = vec![0u8; self.slot_size];
        if self
            .file
            .read_exact_at(&mut buf, slot * self.slot_size as u64)
            .is_err()
        {
            return SlotRead::Invalid;
        }
        let header = &buf[..HEADER_LEN];
        let field = |at: usize| -> u64 {
            header
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(u64::MAX, u64::from_le_bytes)
        };
        if &header[..8] != MAGIC {
            return SlotRead::Invalid;
        }
        if header[8..12] != VERSION.to_le_bytes() {
            return SlotRead::Outdated;
        }
        if header[12..16] != self.chunk_size.to_le_bytes()
            || field(16) != self.blob_size
            || header[32..64] != self.blob_id
            || field(64) != self.bits.len() as u64
        {
            return SlotRead::Invalid;
        }
        let stored_sum = &buf[HEADER_LEN..HEADER_LEN + CHECKSUM_LEN];
        let bits =
            buf[HEADER_LEN + CHECKSUM_LEN..HEADER_LEN + CHECKSUM_LEN + self.bits.len()].to_vec();
        let mut hasher = blake3::Hasher::new();
        hasher.update(header);
        hasher.update(&bits);
        if hasher.finalize().as_bytes() != stored_sum {
            return SlotRead::Invalid;
        }
        let mut boot = [0u8; 16];
        boot.copy_from_slice(&header[80..96]);
        SlotRead::Valid(Slot {
            generation: field(24),
            flags: field(72),
            boot,
            bits,
        })
    }

    /// Writes the in-memory state into the next generation's slot, durably.
    fn persist(&mut self) -> Result<()> {
        let generation = self.generation + 1;
        let slot = self.encode(generation, boot_id());
        let offset = (generation % 2) * self.slot_size as u64;
        self.file
            .write_all_at(&slot, offset)
            .and_then(|()| self.file.sync_data())
            .context(|| format!("writing chunk map {}", self.path.display()))?;
        self.generation = generation;
        Ok(())
    }

    /// Number of chunks in the blob.
    pub fn chunk_count(&self) -> u64 {
        self.chunk_count
    }

    /// Whether chunk `index` is present and durable.
    pub fn is_ready(&self, index: u64) -> bool {
        index < self.chunk_count && bit_is_set(&self.bits, index)
    }

    /// Number of ready chunks.
    pub fn ready_count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    fn set(&mut self, indices: &[u64], ready: bool) -> Result<()> {
        let before = self.bits.clone();
        for &index in indices.iter().filter(|&&i| i < self.chunk_count) {
            let (byte, bit) = bit_of(index);
            if ready {
                self.bits[byte] |= bit;
            } else {
                self.bits[byte] &= !bit;
            }
        }
        if self.bits == before {
            return Ok(());
        }
        self.persist().inspect_err(|_| self.bits = before)
    }

    /// Marks chunks ready. Call only after their data is durable in the cache file.
    pub fn mark_ready(&mut self, indices: &[u64]) -> Result<()> {
        self.set(indices, true)
    }

    /// Marks chunks missing (e.g. after their data failed verification).
    pub fn clear(&mut self, indices: &[u64]) -> Result<()> {
        self.set(indices, false)
    }
}

struct Slot {
    generation: u64,
    flags: u64,
    boot: [u8; 16],
    bits: Vec<u8>,
}

enum SlotRead {
    Valid(Slot),
    /// A map slot of another format version.
    Outdated,
    Invalid,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; 32] = [7; 32];

    #[test]
    fn ready_bits_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let (mut map, outcome) = ChunkMap::open(&path, ID, 4096, 10 * 4096 + 1).unwrap();
        assert_eq!(outcome, MapLoad::Created);
        assert_eq!(map.chunk_count(), 11);
        map.mark_ready(&[0, 3, 10]).unwrap();
        map.mark_ready(&[4]).unwrap();
        map.clear(&[3]).unwrap();
        drop(map);
        let (map, outcome) = ChunkMap::open(&path, ID, 4096, 10 * 4096 + 1).unwrap();
        assert_eq!(outcome, MapLoad::Loaded);
        let ready: Vec<u64> = (0..11).filter(|&i| map.is_ready(i)).collect();
        assert_eq!(ready, vec![0, 4, 10]);
    }

    #[test]
    fn torn_newest_slot_falls_back_to_previous_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let (mut map, _) = ChunkMap::open(&path, ID, 4096, 64 * 4096).unwrap();
        map.mark_ready(&[1]).unwrap();
        map.mark_ready(&[2]).unwrap();
        let newest_slot = map.generation % 2;
        let slot_size = map.slot_size as u64;
        drop(map);
        // Corrupt the bitmap of the newest slot, as a torn write would.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(
            &[0xff],
            newest_slot * slot_size + (HEADER_LEN + CHECKSUM_LEN) as u64,
        )
        .unwrap();
        let (map, outcome) = ChunkMap::open(&path, ID, 4096, 64 * 4096).unwrap();
        assert_eq!(outcome, MapLoad::Loaded);
        assert!(map.is_ready(1));
        assert!(!map.is_ready(2), "the torn update must not be trusted");
        assert!(!map.is_ready(0));
    }

    #[test]
    fn corrupt_or_foreign_map_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let (mut map, _) = ChunkMap::open(&path, ID, 4096, 64 * 4096).unwrap();
        map.mark_ready(&[5]).unwrap();
        drop(map);
        let (map, outcome) = ChunkMap::open(&path, [8; 32], 4096, 64 * 4096).unwrap();
        assert_eq!(outcome, MapLoad::Discarded);
        assert_eq!(map.ready_count(), 0);
        drop(map);
        std::fs::write(&path, vec![0xa5u8; 3 * 4096]).unwrap();
        let (map, outcome) = ChunkMap::open(&path, ID, 4096, 64 * 4096).unwrap();
        assert_eq!(outcome, MapLoad::Discarded);
        assert_eq!(map.ready_count(), 0);
    }

    #[test]
    fn clean_close_and_crash_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let (mut map, _) = ChunkMap::open(&path, ID, 4096, 64 * 4096).unwrap();
        map.begin_use().unwrap();
        map.mark_ready(&[1, 2]).unwrap();
        drop(map);
        // Left in use by a process of this boot: not clean, but no re-hash needed.
        let (mut map, outcome) = ChunkMap::open(&path, ID, 4096, 64 * 4096).unwrap();
        assert_eq!(outcome, MapLoad::Loaded);
        assert!(!map.was_closed_cleanly());
        assert!(!map.needs_verification());
        map.mark_clean().unwrap();
        drop(map);
        let (mut map, _) = ChunkMap::open(&path, ID, 4096, 64 * 4096).unwrap();
        assert!(map.was_closed_cleanly() && !map.needs_verification());
        // In use during an earlier boot (a machine crash): re-hash before trusting.
        map.clean = false;
        let generation = map.generation + 1;
        let slot = map.encode(generation, [0xab; 16]);
        map.file
            .write_all_at(&slot, (generation % 2) * map.slot_size as u64)
            .unwrap();
        drop(map);
        let (map, _) = ChunkMap::open(&path, ID, 4096, 64 * 4096).unwrap();
        assert_eq!(map.ready_count(), 2);
        assert!(map.needs_verification());
    }

    #[test]
    fn older_format_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let (mut map, _) = ChunkMap::open(&path, ID, 4096, 64 * 4096).unwrap();
        map.mark_ready(&[3]).unwrap();
        drop(map);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        for slot in 0..2u64 {
            file.write_all_at(&1u32.to_le_bytes(), slot * 4096 + 8)
                .unwrap();
        }
        let (map, outcome) = ChunkMap::open(&path, ID, 4096, 64 * 4096).unwrap();
        assert_eq!(outcome, MapLoad::Outdated);
        assert_eq!(map.ready_count(), 0);
    }
}
