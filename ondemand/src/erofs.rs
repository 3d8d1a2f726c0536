//! Just enough of the erofs on-disk format to find where a file's data lies in the
//! data blob of an image built with `mkfs.erofs --chunksize --blobdev`: path lookup
//! through directories, and the chunk indexes of chunk-based regular files. The image
//! builder uses it to turn a prefetch list of paths into blob ranges.
//!
//! Layout (little endian; see the kernel's `fs/erofs/erofs_fs.h`): the superblock at
//! byte 1024; inodes at `meta_blkaddr * block_size + nid * 32`, 32-byte compact or
//! 64-byte extended, followed by their inline xattrs; directories are blocks of
//! 12-byte dirents (`nid`, `nameoff`, `file_type`) followed by the names; a
//! chunk-based file has one 8-byte chunk index (`advise`, `device_id`, `blkaddr`) or
//! 4-byte block address per chunk after its xattrs.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{IoContext, OndemandError, Result};

const SUPERBLOCK_OFFSET: u64 = 1024;
const MAGIC: u32 = 0xE0F5_E1E2;
const DIRENT_SIZE: usize = 12;
const DEVICE_SLOT_SIZE: u64 = 128;
const NULL_ADDR: u32 = u32::MAX;

const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;
const LAYOUT_CHUNK_BASED: u16 = 4;
const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;
const CHUNK_FORMAT_INDEXES: u16 = 0x20;

const FILE_TYPE_REGULAR: u8 = 1;
const FILE_TYPE_DIRECTORY: u8 = 2;

/// Deepest directory nesting and most inodes walked for one path.
const MAX_DEPTH: usize = 256;
const MAX_WALKED: usize = 4_000_000;

/// An erofs bootstrap opened for lookups.
#[derive(Debug)]
pub struct ErofsImage {
    file: File,
    name: String,
    block_bits: u32,
    meta_base: u64,
    root_nid: u64,
    dir_block_bits: u32,
    device_id_mask: u16,
    /// Where the first extra device (the blob) is mapped in the flat block address
    /// space, if it is: `[start, end)` in bytes.
    blob_mapped: Option<Range<u64>>,
}

#[derive(Debug, Clone, Copy)]
struct Inode {
    nid: u64,
    layout: u16,
    size: u64,
    raw: u32,
    /// Byte position of the inode.
    at: u64,
    /// Bytes of the inode plus its inline xattrs.
    header_len: u64,
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    buf.get(at..at + 2)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    buf.get(at..at + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    buf.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

impl ErofsImage {
    /// Opens `path` and checks its superblock.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).context(|| format!("opening {}", path.display()))?;
        let name = path.display().to_string();
        let mut sb = [0u8; 128];
        file.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
            .context(|| format!("reading the superblock of {name}"))?;
        let bad = |why: &str| OndemandError::InvalidImage(format!("{name}: {why}"));
        if u32_at(&sb, 0) != MAGIC {
            return Err(bad("not an erofs image (bad magic)"));
        }
        let block_bits = u32::from(sb[12]);
        if !(9..=16).contains(&block_bits) {
            return Err(bad("unsupported block size"));
        }
        let meta_base = u64::from(u32_at(&sb, 40)) << block_bits;
        let root_nid = u64::from(u16_at(&sb, 14));
        let extra_devices = u16_at(&sb, 86);
        let device_slot_offset = u64::from(u16_at(&sb, 88)) * DEVICE_SLOT_SIZE;
        let dir_block_bits = u32::from(sb[90]);
        if block_bits + dir_block_bits > 20 {
            return Err(bad("unsupported directory block size"));
        }
        let device_id_mask = (u32::from(extra_devices) + 1).next_power_of_two() as u16 - 1;
        let mut blob_mapped = None;
        if extra_devices > 0 {
            let mut slot = [0u8; 128];
            file.read_exact_at(&mut slot, device_slot_offset)
                .context(|| format!("reading the device table of {name}"))?;
            let blocks = u64::from(u32_at(&slot, 64));
            let mapped = u64::from(u32_at(&slot, 68));
            if mapped != 0 {
                blob_mapped = Some(mapped << block_bits..(mapped + blocks) << block_bits);
            }
        }
        Ok(Self {
            file,
            name,
            block_bits,
            meta_base,
            root_nid,
            dir_block_bits,
            device_id_mask,
            blob_mapped,
        })
    }

    fn bad(&self, why: String) -> OndemandError {
        OndemandError::InvalidImage(format!("{}: {why}", self.name))
    }

    fn read_at(&self, at: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, at)
            .context(|| format!("reading {len} bytes at {at} of {}", self.name))?;
        Ok(buf)
    }

    fn inode(&self, nid: u64) -> Result<Inode> {
        let at = nid
            .checked_mul(32)
            .and_then(|o| o.checked_add(self.meta_base))
            .ok_or_else(|| self.bad(format!("inode {nid} is out of range")))?;
        let raw = self.read_at(at, 64).or_else(|_| self.read_at(at, 32))?;
        let format = u16_at(&raw, 0);
        let extended = format & 1 == 1;
        let layout = (format >> 1) & 0x7;
        let xattr_count = u64::from(u16_at(&raw, 2));
        let (size, inode_len) = if extended {
            if raw.len() < 64 {
                return Err(self.bad(format!("inode {nid} is truncated")));
            }
            (u64_at(&raw, 8), 64)
        } else {
            (u64::from(u32_at(&raw, 8)), 32)
        };
        let xattr_len = if xattr_count == 0 {
            0
        } else {
            12 + (xattr_count - 1) * 4
        };
        Ok(Inode {
            nid,
            layout,
            size,
            raw: u32_at(&raw, 16),
            at,
            header_len: inode_len + xattr_len,
        })
    }

    /// The whole content of a flat (non-chunked) inode, i.e. a directory.
    fn flat_data(&self, inode: &Inode) -> Result<Vec<u8>> {
        if inode.size > 1 << 30 {
            return Err(self.bad(format!("directory inode {} is too large", inode.nid)));
        }
        let size = inode.size as usize;
        let block = 1usize << self.block_bits;
        let base = u64::from(inode.raw) << self.block_bits;
        match inode.layout {
            LAYOUT_FLAT_PLAIN => self.read_at(base, size),
            LAYOUT_FLAT_INLINE => {
                let blocks = size.div_ceil(block);
                let full = blocks.saturating_sub(1) * block;
                let mut data = if full > 0 {
                    self.read_at(base, full)?
                } else {
                    Vec::new()
                };
                data.extend(self.read_at(inode.at + inode.header_len, size - full)?);
                Ok(data)
            }
            other => Err(self.bad(format!(
                "directory inode {} has unsupported layout {other}",
                inode.nid
            ))),
        }
    }

    /// Entries of a directory: (name, nid, file type), without `.` and `..`.
    fn entries(&self, dir: &Inode) -> Result<Vec<(Vec<u8>, u64, u8)>> {
        let data = self.flat_data(dir)?;
        let block = 1usize << (self.block_bits + self.dir_block_bits);
        let mut out = Vec::new();
        for chunk in data.chunks(block) {
            let first_name = usize::from(u16_at(chunk, 8));
            if first_name < DIRENT_SIZE || first_name > chunk.len() || first_name % DIRENT_SIZE != 0
            {
                return Err(self.bad(format!("directory inode {} is corrupt", dir.nid)));
            }
            let count = first_name / DIRENT_SIZE;
            for i in 0..count {
                let at = i * DIRENT_SIZE;
                let start = usize::from(u16_at(chunk, at + 8));
                let end = if i + 1 < count {
                    usize::from(u16_at(chunk, at + DIRENT_SIZE + 8))
                } else {
                    chunk.len()
                };
                let Some(name) = chunk.get(start..end.max(start)) else {
                    return Err(self.bad(format!("directory inode {} is corrupt", dir.nid)));
                };
                let name = match name.iter().position(|&b| b == 0) {
                    Some(nul) => &name[..nul],
                    None => name,
                };
                if name == b"." || name == b".." || name.is_empty() {
                    continue;
                }
                out.push((name.to_vec(), u64_at(chunk, at), chunk[at + 10]));
            }
        }
        Ok(out)
    }

    /// Byte ranges of the blob holding a chunk-based file's data, in file order.
    fn file_ranges(&self, inode: &Inode) -> Result<Vec<Range<u64>>> {
        if inode.layout != LAYOUT_CHUNK_BASED || inode.size == 0 {
            // Flat files keep their data in the bootstrap itself: nothing to fetch.
            return Ok(Vec::new());
        }
        let format = (inode.raw & 0xffff) as u16;
        let chunk_bits = self.block_bits + u32::from(format & CHUNK_FORMAT_BLKBITS_MASK);
        if chunk_bits > 40 {
            return Err(self.bad(format!("inode {} has an absurd chunk size", inode.nid)));
        }
        let chunk_size = 1u64 << chunk_bits;
        let chunks = inode.size.div_ceil(chunk_size);
        let indexes = format & CHUNK_FORMAT_INDEXES != 0;
        let unit: u64 = if indexes { 8 } else { 4 };
        if chunks > 1 << 24 {
            return Err(self.bad(format!("inode {} has too many chunks", inode.nid)));
        }
        let table_at = (inode.at + inode.header_len).div_ceil(unit) * unit;
        let table = self.read_at(table_at, (chunks * unit) as usize)?;
        let block = 1u64 << self.block_bits;
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for index in 0..chunks {
            let entry = (index * unit) as usize;
            let (device, address) = if indexes {
                (
                    u16_at(&table, entry + 2) & self.device_id_mask,
                    u32_at(&table, entry + 4),
                )
            } else {
                (0, u32_at(&table, entry))
            };
            if address == NULL_ADDR {
                continue;
            }
            let logical = index << chunk_bits;
            let len = chunk_size.min((inode.size - logical).div_ceil(block) * block);
            let physical = u64::from(address) << self.block_bits;
            let in_blob = match (device, &self.blob_mapped) {
                (1, _) => Some(physical),
                (0, Some(mapped)) if mapped.contains(&physical) => Some(physical - mapped.start),
                _ => None,
            };
            let Some(start) = in_blob else { continue };
            match ranges.last_mut() {
                Some(last) if last.end == start => last.end = start + len,
                _ => ranges.push(start..start + len),
            }
        }
        Ok(ranges)
    }

    fn lookup(&self, path: &str) -> Result<Option<(Inode, u8)>> {
        let mut current = (self.inode(self.root_nid)?, FILE_TYPE_DIRECTORY);
        for component in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if current.1 != FILE_TYPE_DIRECTORY {
                return Ok(None);
            }
            let found = self
                .entries(&current.0)?
                .into_iter()
                .find(|(name, _, _)| name == component.as_bytes());
            let Some((_, nid, kind)) = found else {
                return Ok(None);
            };
            current = (self.inode(nid)?, kind);
        }
        Ok(Some(current))
    }

    /// The blob byte ranges holding the data of `path` (a regular file, or every
    /// regular file below a directory, in directory order), or `None` if the image has
    /// no such path. Ranges are block-aligned and may extend past a file's last byte.
    pub fn data_ranges(&self, path: &str) -> Result<Option<Vec<Range<u64>>>> {
        let Some((inode, kind)) = self.lookup(path)? else {
            return Ok(None);
        };
        let mut ranges = Vec::new();
        let mut walked = 0usize;
        self.collect(&inode, kind, 0, &mut walked, &mut ranges)?;
        Ok(Some(ranges))
    }

    fn collect(
        &self,
        inode: &Inode,
        kind: u8,
        depth: usize,
        walked: &mut usize,
        out: &mut Vec<Range<u64>>,
    ) -> Result<()> {
        *walked += 1;
        if depth > MAX_DEPTH || *walked > MAX_WALKED {
            return Err(self.bad("the directory tree is too deep or too large".into()));
        }
        match kind {
            FILE_TYPE_REGULAR => out.extend(self.file_ranges(inode)?),
            FILE_TYPE_DIRECTORY => {
                for (_, nid, kind) in self.entries(inode)? {
                    let child = self.inode(nid)?;
                    self.collect(&child, kind, depth + 1, walked, out)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}
