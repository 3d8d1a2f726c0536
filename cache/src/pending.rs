//! The record of chunks written into a cache file but not synced yet: it outlives the
//! process, not the machine.
//!
//! The engine syncs fetched chunks and marks them in the chunk map in rounds that wait
//! for a pause in the fetches (up to seconds while a reader streams). A process killed
//! meanwhile would lose those marks and fetch the chunks again, although their data
//! sits in the page cache. So every write is also noted here, with a plain `pwrite`
//! and no sync: the note lives in the page cache beside the data it describes. A later
//! process of the same boot re-hashes the noted chunks and adopts the good ones. After
//! a reboot the record is ignored: the data it describes may never have reached the
//! disk.
//!
//! Format (little endian): `magic "BRTHPEND" | u32 version | u32 reserved |
//! [u8; 32] blob id | [u8; 16] boot id | u64 bitmap_len | bitmap`, bit `i` (byte
//! `i / 8`, bit `i % 8`) for chunk `i`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunkmap::{bit_is_set, bit_of, boot_id, open_or_create};
use crate::error::{IoContext, Result};

const MAGIC: &[u8; 8] = b"BRTHPEND";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 72;

/// Chunks of one blob written since its last sync round, as a file.
#[derive(Debug)]
pub(crate) struct PendingRecord {
    file: File,
    path: PathBuf,
    bits: Vec<u8>,
}

impl PendingRecord {
    /// Opens the record of blob `blob_id` at `path` (created if missing). Returns it
    /// with no chunk noted, and the chunks a process of this boot had noted (unchecked:
    /// the caller re-hashes them before trusting any).
    pub(crate) fn open(
        path: &Path,
        blob_id: [u8; 32],
        chunk_count: u64,
    ) -> Result<(Self, Vec<u64>)> {
        let file = open_or_create(path).context(|| format!("opening {}", path.display()))?;
        let bitmap_len = chunk_count.div_ceil(8) as usize;
        let mut found = vec![0u8; HEADER_LEN + bitmap_len];
        let noted = match file.read_exact_at(&mut found, 0) {
            Ok(()) if Self::header(blob_id, bitmap_len) == found[..HEADER_LEN] => (0..chunk_count)
                .filter(|&i| bit_is_set(&found[HEADER_LEN..], i))
                .collect(),
            // Missing, short, another blob's, or written in an earlier boot.
            _ => Vec::new(),
        };
        let mut fresh = Self::header(blob_id, bitmap_len);
        fresh.resize(HEADER_LEN + bitmap_len, 0);
        file.set_len(fresh.len() as u64)
            .and_then(|()| file.write_all_at(&fresh, 0))
            .context(|| format!("writing {}", path.display()))?;
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
                bits: vec![0u8; bitmap_len],
            },
            noted,
        ))
    }

    fn header(blob_id: [u8; 32], bitmap_len: usize) -> Vec<u8> {
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&blob_id);
        header.extend_from_slice(&boot_id());
        header.extend_from_slice(&(bitmap_len as u64).to_le_bytes());
        header
    }

    /// Notes `chunks` as written (`true`) or no longer pending (`false`), writing the
    /// bytes of the bitmap that changed.
    pub(crate) fn set(&mut self, chunks: &[u64], written: bool) -> Result<()> {
        let mut changed: Option<(usize, usize)> = None;
        for &index in chunks {
            let (byte, bit) = bit_of(index);
            let Some(slot) = self.bits.get_mut(byte) else {
                continue;
            };
            let before = *slot;
            if written {
                *slot |= bit;
            } else {
                *slot &= !bit;
            }
            if *slot != before {
                changed =
                    Some(changed.map_or((byte, byte), |(lo, hi)| (lo.min(byte), hi.max(byte))));
            }
        }
        let Some((lo, hi)) = changed else {
            return Ok(());
        };
        self.file
            .write_all_at(&self.bits[lo..=hi], (HEADER_LEN + lo) as u64)
            .context(|| format!("writing {}", self.path.display()))
    }

    /// Where the record lives.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noted_chunks_are_found_by_the_next_open_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.pending");
        let (mut record, noted) = PendingRecord::open(&path, [7; 32], 20).unwrap();
        assert!(noted.is_empty());
        record.set(&[0, 3, 9, 19], true).unwrap();
        record.set(&[3], false).unwrap();
        drop(record);
        let (_, noted) = PendingRecord::open(&path, [7; 32], 20).unwrap();
        assert_eq!(noted, vec![0, 9, 19]);
        // Opening starts a fresh record: what was noted is the caller's now.
        let (_, noted) = PendingRecord::open(&path, [7; 32], 20).unwrap();
        assert!(noted.is_empty());
    }

    #[test]
    fn a_record_of_another_blob_or_boot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.pending");
        let (mut record, _) = PendingRecord::open(&path, [7; 32], 20).unwrap();
        record.set(&[1, 2], true).unwrap();
        drop(record);
        let (_, noted) = PendingRecord::open(&path, [8; 32], 20).unwrap();
        assert!(noted.is_empty(), "another blob's record");

        let (mut record, _) = PendingRecord::open(&path, [7; 32], 20).unwrap();
        record.set(&[1, 2], true).unwrap();
        drop(record);
        // The same record as an earlier boot left it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[48..64].copy_from_slice(&[0xee; 16]);
        std::fs::write(&path, &bytes).unwrap();
        let (_, noted) = PendingRecord::open(&path, [7; 32], 20).unwrap();
        assert!(noted.is_empty(), "a record from an earlier boot");

        // Short or garbage files are ignored too.
        std::fs::write(&path, b"BRTHPEND").unwrap();
        let (_, noted) = PendingRecord::open(&path, [7; 32], 20).unwrap();
        assert!(noted.is_empty());
    }
}
