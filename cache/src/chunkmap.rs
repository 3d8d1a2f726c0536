//! The persistent per-chunk state map kept beside each cache file.
//!
//! On-disk format (all integers little endian): two slots of `slot_size` bytes
//! (a multiple of 4096), each
//! `magic "BRTHCMAP" | u32 version | u32 chunk_size | u64 blob_size | u64 generation |
//!  [u8; 32] blob id | u64 bitmap_len | [u8; 32] blake3(header[0..72] ++ bitmap) | bitmap`.
//! Bit `i` of the bitmap (byte `i / 8`, bit `i % 8`) says chunk `i` is present and
//! durable in the cache file. An update writes the whole map into the slot of the
//! next generation and fdatasyncs it, so a torn write leaves the other slot intact;
//! on open the valid slot of the highest generation wins, and if neither is valid
//! (or it describes another blob) the map starts empty.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

const MAGIC: &[u8; 8] = b"BRTHCMAP";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 72;
const CHECKSUM_LEN: usize = 32;
const SLOT_ALIGN: usize = 4096;

/// What [`ChunkMap::open`] found on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapLoad {
    /// No map file existed.
    Created,
    /// A valid map was loaded.
    Loaded,
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .context(|| format!("opening chunk map {}", path.display()))?;
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
        };
        let mut best: Option<(u64, Vec<u8>)> = None;
        for slot in 0..2u64 {
            if let Some((generation, bits)) = map.read_slot(slot) {
                if best.as_ref().is_none_or(|(g, _)| generation > *g) {
                    best = Some((generation, bits));
                }
            }
        }
        let outcome = match best {
            Some((generation, bits)) => {
                map.generation = generation;
                map.bits = bits;
                MapLoad::Loaded
            }
            None if existed => MapLoad::Discarded,
            None => MapLoad::Created,
        };
        if outcome != MapLoad::Loaded {
            // Persist the empty state so an old, foreign map cannot resurface.
            map.persist()?;
        }
        Ok((map, outcome))
    }

    fn encode(&self, generation: u64) -> Vec<u8> {
        let mut slot = Vec::with_capacity(self.slot_size);
        slot.extend_from_slice(MAGIC);
        slot.extend_from_slice(&VERSION.to_le_bytes());
        slot.extend_from_slice(&self.chunk_size.to_le_bytes());
        slot.extend_from_slice(&self.blob_size.to_le_bytes());
        slot.extend_from_slice(&generation.to_le_bytes());
        slot.extend_from_slice(&self.blob_id);
        slot.extend_from_slice(&(self.bits.len() as u64).to_le_bytes());
        let mut hasher = blake3::Hasher::new();
        hasher.update(&slot[..HEADER_LEN]);
        hasher.update(&self.bits);
        slot.extend_from_slice(hasher.finalize().as_bytes());
        slot.extend_from_slice(&self.bits);
        slot.resize(self.slot_size, 0);
        slot
    }

    fn read_slot(&self, slot: u64) -> Option<(u64, Vec<u8>)> {
        let mut buf = vec![0u8; self.slot_size];
        self.file
            .read_exact_at(&mut buf, slot * self.slot_size as u64)
            .ok()?;
        let header = &buf[..HEADER_LEN];
        let field = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(header.get(at..at + 8)?.try_into().ok()?))
        };
        if &header[..8] != MAGIC
            || header[8..12] != VERSION.to_le_bytes()
            || header[12..16] != self.chunk_size.to_le_bytes()
            || field(16)? != self.blob_size
            || header[32..64] != self.blob_id
            || field(64)? != self.bits.len() as u64
        {
            return None;
        }
        let generation = field(24)?;
        let stored_sum = &buf[HEADER_LEN..HEADER_LEN + CHECKSUM_LEN];
        let bits =
            buf[HEADER_LEN + CHECKSUM_LEN..HEADER_LEN + CHECKSUM_LEN + self.bits.len()].to_vec();
        let mut hasher = blake3::Hasher::new();
        hasher.update(header);
        hasher.update(&bits);
        (hasher.finalize().as_bytes() == stored_sum).then_some((generation, bits))
    }

    /// Writes the in-memory state into the next generation's slot, durably.
    fn persist(&mut self) -> Result<()> {
        let generation = self.generation + 1;
        let slot = self.encode(generation);
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
        index < self.chunk_count && self.bits[(index / 8) as usize] & (1 << (index % 8)) != 0
    }

    /// Number of ready chunks.
    pub fn ready_count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    fn set(&mut self, indices: &[u64], ready: bool) -> Result<()> {
        let before = self.bits.clone();
        for &index in indices.iter().filter(|&&i| i < self.chunk_count) {
            let (byte, bit) = ((index / 8) as usize, 1u8 << (index % 8));
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
}
