//! The local write-ahead log: numbered segments, each a preallocated data file the
//! transports write guest data straight into, and an index file of fixed 64-byte
//! records appended as writes complete.
//!
//! A record names an epoch and a sequence number, the volume blocks it covers, where its
//! data is in the segment's data file, and the CRC32C of that data; its own CRC32C covers
//! the rest. Sequence numbers follow completion order (they are handed out under the
//! lock that also updates the in-memory map), so replaying records in sequence order
//! rebuilds exactly what readers saw. On open, each epoch's records are replayed from the
//! epoch's first sequence number for as long as they are contiguous and their data checks
//! out: after a power cut the volume holds every flushed write and a prefix of the later
//! ones, never a write without the ones completed before it. The next epoch starts where
//! that prefix ended, so records of the abandoned tail are never picked up later.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

pub const RECORD_LEN: usize = 64;
const MAGIC: u32 = u32::from_le_bytes(*b"BWAL");

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The blocks' data is in the data file.
    Data,
    /// The blocks read as zeros (DISCARD, WRITE_ZEROES).
    Zero,
}

/// One completed write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub epoch: u32,
    pub seq: u64,
    /// First volume block.
    pub lba: u64,
    pub blocks: u32,
    pub kind: RecordKind,
    /// Segment number.
    pub segment: u32,
    /// Offset of the data in the segment's data file, in blocks.
    pub data_block: u64,
    /// CRC32C of the data (0 for zeros).
    pub crc: u32,
}

impl Record {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.epoch.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.lba.to_le_bytes());
        out[24..28].copy_from_slice(&self.blocks.to_le_bytes());
        out[28] = match self.kind {
            RecordKind::Data => 1,
            RecordKind::Zero => 2,
        };
        out[32..36].copy_from_slice(&self.segment.to_le_bytes());
        out[36..44].copy_from_slice(&self.data_block.to_le_bytes());
        out[44..48].copy_from_slice(&self.crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// The record in `slot`, if it is one (its checksum holds).
    pub fn decode(slot: &[u8]) -> Option<Self> {
        let slot: &[u8; RECORD_LEN] = slot.try_into().ok()?;
        let u32_at =
            |at: usize| u32::from_le_bytes([slot[at], slot[at + 1], slot[at + 2], slot[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&slot[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if u32_at(0) != MAGIC || u32_at(60) != crc32c::crc32c(&slot[..60]) {
            return None;
        }
        let kind = match slot[28] {
            1 => RecordKind::Data,
            2 => RecordKind::Zero,
            _ => return None,
        };
        Some(Self {
            epoch: u32_at(4),
            seq: u64_at(8),
            lba: u64_at(16),
            blocks: u32_at(24),
            kind,
            segment: u32_at(32),
            data_block: u64_at(36),
            crc: u32_at(44),
        })
    }
}

/// Paths of segment `number` under `dir`.
pub fn segment_paths(dir: &Path, number: u32) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{number:08x}.data")),
        dir.join(format!("{number:08x}.idx")),
    )
}

/// Segment numbers present under `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".idx") {
            if let Ok(n) = u32::from_str_radix(hex, 16) {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The two open files of a segment.
#[derive(Debug)]
pub struct SegmentFiles {
    pub number: u32,
    pub data: File,
    pub index: File,
    /// Capacity of the data file in blocks, and of the index in records.
    pub data_blocks: u64,
    pub slots: u64,
}

pub(crate) fn preallocate(file: &File, len: u64, path: &Path) -> Result<()> {
    // SAFETY: fallocate on a descriptor we own; plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
            0,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // A filesystem without preallocation: the space comes when written.
        return file
            .set_len(len)
            .context(|| format!("sizing {}", path.display()));
    }
    Err(err).context(|| format!("preallocating {} bytes for {}", len, path.display()))
}

impl SegmentFiles {
    /// Creates segment `number` with room for `data_blocks` blocks of `block_size`. Files
    /// of that number already there are refused, unless `take_over`: the caller's own
    /// earlier attempt left them when it could not preallocate them (the disk was full),
    /// they hold nothing, and they are emptied and used rather than unlinked (which
    /// request threads may not do).
    pub fn create(
        dir: &Path,
        number: u32,
        data_blocks: u64,
        block_size: u32,
        take_over: bool,
    ) -> Result<Self> {
        let (data_path, index_path) = segment_paths(dir, number);
        let open = |path: &Path| {
            let mut options = OpenOptions::new();
            options.read(true).write(true);
            if take_over {
                options.create(true).truncate(true);
            } else {
                options.create_new(true);
            }
            options
                .open(path)
                .context(|| format!("creating {}", path.display()))
        };
        let data = open(&data_path)?;
        let index = open(&index_path)?;
        preallocate(&data, data_blocks * u64::from(block_size), &data_path)?;
        preallocate(&index, data_blocks * RECORD_LEN as u64, &index_path)?;
        Ok(Self {
            number,
            data,
            index,
            data_blocks,
            slots: data_blocks,
        })
    }

    /// Opens an existing segment.
    pub fn open(dir: &Path, number: u32, block_size: u32) -> Result<Self> {
        let (data_path, index_path) = segment_paths(dir, number);
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .context(|| format!("opening {}", path.display()))
        };
        let data = open(&data_path)?;
        let index = open(&index_path)?;
        let data_len = data
            .metadata()
            .context(|| format!("reading {}", data_path.display()))?
            .len();
        let index_len = index
            .metadata()
            .context(|| format!("reading {}", index_path.display()))?
            .len();
        Ok(Self {
            number,
            data,
            index,
            data_blocks: data_len / u64::from(block_size),
            slots: index_len / RECORD_LEN as u64,
        })
    }

    /// Every valid record in the index, in slot order, with the slot count used (one past
    /// the last valid record).
    pub fn scan(&self) -> Result<(Vec<Record>, u64)> {
        let mut records = Vec::new();
        let mut used = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        let mut slot = 0u64;
        while slot < self.slots {
            let n = ((self.slots - slot) as usize * RECORD_LEN).min(buf.len());
            let got = read_full_at(&self.index, &mut buf[..n], slot * RECORD_LEN as u64)
                .context(|| format!("reading the log index of segment {}", self.number))?;
            if got == 0 {
                break;
            }
            for (i, raw) in buf[..got].chunks_exact(RECORD_LEN).enumerate() {
                if let Some(record) = Record::decode(raw) {
                    if record.segment == self.number {
                        records.push(record);
                        used = slot + i as u64 + 1;
                    }
                }
            }
            slot += (got / RECORD_LEN) as u64;
        }
        Ok((records, used))
    }
}

/// Reads as much of `buf` as the file has at `offset`.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// CRC32C of `len` bytes of `file` at `offset`, read through `buf`.
pub fn crc_of(file: &File, offset: u64, len: u64, buf: &mut Vec<u8>) -> std::io::Result<u32> {
    if buf.len() < (1 << 20) {
        buf.resize(1 << 20, 0);
    }
    let mut crc = 0u32;
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + at)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
    }
    Ok(crc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_any_flipped_bit_is_refused() {
        let record = Record {
            epoch: 3,
            seq: 99,
            lba: 12345,
            blocks: 16,
            kind: RecordKind::Data,
            segment: 7,
            data_block: 400,
            crc: 0xdead_beef,
        };
        let raw = record.encode();
        assert_eq!(Record::decode(&raw), Some(record));
        for byte in 0..RECORD_LEN {
            let mut bad = raw;
            bad[byte] ^= 0x10;
            assert_eq!(Record::decode(&bad), None, "byte {byte}");
        }
        assert_eq!(Record::decode(&[0u8; RECORD_LEN]), None);
    }

    #[test]
    fn a_segment_scan_finds_the_records_written_and_skips_holes() {
        let dir = tempfile::tempdir().unwrap();
        let seg = SegmentFiles::create(dir.path(), 5, 64, 4096, false).unwrap();
        let mk = |seq| Record {
            epoch: 1,
            seq,
            lba: seq * 2,
            blocks: 1,
            kind: RecordKind::Zero,
            segment: 5,
            data_block: 0,
            crc: 0,
        };
        seg.index.write_all_at(&mk(1).encode(), 0).unwrap();
        seg.index
            .write_all_at(&mk(3).encode(), 2 * RECORD_LEN as u64)
            .unwrap();
        let (records, used) = SegmentFiles::open(dir.path(), 5, 4096)
            .unwrap()
            .scan()
            .unwrap();
        assert_eq!(records, vec![mk(1), mk(3)]);
        assert_eq!(used, 3);
        assert_eq!(list_segments(dir.path()).unwrap(), vec![5]);
        assert!(
            SegmentFiles::create(dir.path(), 5, 64, 4096, false).is_err(),
            "never reused"
        );
    }
}
