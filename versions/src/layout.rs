//! The table file's layout: what each byte of the header means, where the arrays lie, and the
//! checks a header must pass before berth maps it.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "BERTHVT\0"
//! 8       4     layout version (1)
//! 12      4     header size (4096)
//! 16      8     file size
//! 24      8     slot count N
//! 32      8     versions offset (4096): N little-endian u64 versions, the part a guest maps
//! 40      8     index offset: N u64 key hashes (0 = free), slot i's key at index i
//! 48      8     ring offset: R u64 change records
//! 56      8     ring entries R (a power of two)
//! 64      8     device of the shared directory
//! 72      8     inode number of the shared directory
//! 80      8     XXH3-64 of bytes 0..80: the fields above never change once written
//! 128     8     generation (atomic): slot assignments are only valid within one generation
//! 192     8     ring head (atomic): sequence number of the next change record
//! 256     4     wake (atomic futex word): moves when a change is published to sleepers
//! 260     4     sleepers (atomic): 1 while a reader may be asleep on `wake`
//! 320     8     overflows (atomic): lookups that found no free slot
//! ```
//!
//! All values are native-endian (the table never leaves the host). Arrays start on page
//! boundaries so the versions can be mapped alone (read-only, into a guest).

use xxhash_rust::xxh3::xxh3_64;

pub const MAGIC: [u8; 8] = *b"BERTHVT\0";
pub const LAYOUT_VERSION: u32 = 1;
pub const HEADER_SIZE: u64 = 4096;
pub const PAGE: u64 = 4096;

pub const OFF_MAGIC: usize = 0;
pub const OFF_LAYOUT: usize = 8;
pub const OFF_HEADER_SIZE: usize = 12;
pub const OFF_FILE_SIZE: usize = 16;
pub const OFF_SLOTS: usize = 24;
pub const OFF_VERSIONS: usize = 32;
pub const OFF_INDEX: usize = 40;
pub const OFF_RING: usize = 48;
pub const OFF_RING_ENTRIES: usize = 56;
pub const OFF_SHARE_DEV: usize = 64;
pub const OFF_SHARE_INO: usize = 72;
pub const OFF_CHECK: usize = 80;
pub const OFF_GENERATION: usize = 128;
pub const OFF_RING_HEAD: usize = 192;
pub const OFF_WAKE: usize = 256;
pub const OFF_SLEEPERS: usize = 260;
pub const OFF_OVERFLOWS: usize = 320;

/// Fewest slots a table may have (a test table); most that a 32-bit slot number can name,
/// below the "no slot" marker.
pub const MIN_SLOTS: u64 = 64;
pub const MAX_SLOTS: u64 = 1 << 30;
/// Change records kept for readers that fall behind (512 KiB).
pub const RING_ENTRIES: u64 = 1 << 16;

/// Where everything lies in a table of `slots` slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub slots: u64,
    pub versions_offset: u64,
    pub index_offset: u64,
    pub ring_offset: u64,
    pub ring_entries: u64,
    pub file_size: u64,
}

fn page_up(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

impl Geometry {
    /// The layout of a table with `slots` slots (checked against the limits by the caller).
    pub fn for_slots(slots: u64) -> Geometry {
        let versions_offset = HEADER_SIZE;
        let index_offset = versions_offset + page_up(slots * 8);
        let ring_offset = index_offset + page_up(slots * 8);
        let ring_entries = RING_ENTRIES;
        Geometry {
            slots,
            versions_offset,
            index_offset,
            ring_offset,
            ring_entries,
            file_size: ring_offset + ring_entries * 8,
        }
    }

    /// Bytes a guest maps: the header and the versions, nothing of the index.
    pub fn guest_visible_len(&self) -> u64 {
        self.index_offset
    }
}

/// The immutable header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub geometry: Geometry,
    pub share_dev: u64,
    pub share_ino: u64,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    /// Not a berth version table at all.
    Foreign(String),
    /// A berth version table, damaged or of another layout.
    Damaged(String),
}

fn read_u32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_ne_bytes(b)
}

fn read_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_ne_bytes(b)
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

impl Header {
    /// The header page of a new table; `generation` is its first generation.
    pub fn encode(&self, generation: u64) -> Vec<u8> {
        let g = &self.geometry;
        let mut buf = vec![0u8; HEADER_SIZE as usize];
        buf[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut buf, OFF_LAYOUT, LAYOUT_VERSION);
        put_u32(&mut buf, OFF_HEADER_SIZE, HEADER_SIZE as u32);
        put_u64(&mut buf, OFF_FILE_SIZE, g.file_size);
        put_u64(&mut buf, OFF_SLOTS, g.slots);
        put_u64(&mut buf, OFF_VERSIONS, g.versions_offset);
        put_u64(&mut buf, OFF_INDEX, g.index_offset);
        put_u64(&mut buf, OFF_RING, g.ring_offset);
        put_u64(&mut buf, OFF_RING_ENTRIES, g.ring_entries);
        put_u64(&mut buf, OFF_SHARE_DEV, self.share_dev);
        put_u64(&mut buf, OFF_SHARE_INO, self.share_ino);
        let check = xxh3_64(&buf[..OFF_CHECK]);
        put_u64(&mut buf, OFF_CHECK, check);
        put_u64(&mut buf, OFF_GENERATION, generation);
        buf
    }

    /// Checks the first bytes of a table file of `file_size` bytes.
    pub fn decode(buf: &[u8], file_size: u64) -> Result<Header, HeaderProblem> {
        let magic_len = buf.len().min(MAGIC.len());
        if buf[..magic_len] != MAGIC[..magic_len] {
            return Err(HeaderProblem::Foreign(
                "its first bytes are not the table's magic number".into(),
            ));
        }
        if buf.len() < HEADER_SIZE as usize || file_size < HEADER_SIZE {
            return Err(HeaderProblem::Damaged(format!(
                "it is {file_size} bytes long, shorter than its {HEADER_SIZE}-byte header"
            )));
        }
        let layout = read_u32(buf, OFF_LAYOUT);
        if layout != LAYOUT_VERSION {
            return Err(HeaderProblem::Damaged(format!(
                "layout version {layout}, this berth reads {LAYOUT_VERSION}"
            )));
        }
        if read_u64(buf, OFF_CHECK) != xxh3_64(&buf[..OFF_CHECK]) {
            return Err(HeaderProblem::Damaged(
                "its header checksum does not match".into(),
            ));
        }
        let slots = read_u64(buf, OFF_SLOTS);
        if !(MIN_SLOTS..=MAX_SLOTS).contains(&slots) {
            return Err(HeaderProblem::Damaged(format!(
                "{slots} slots, outside {MIN_SLOTS}..={MAX_SLOTS}"
            )));
        }
        let expected = Geometry::for_slots(slots);
        let found = Geometry {
            slots,
            versions_offset: read_u64(buf, OFF_VERSIONS),
            index_offset: read_u64(buf, OFF_INDEX),
            ring_offset: read_u64(buf, OFF_RING),
            ring_entries: read_u64(buf, OFF_RING_ENTRIES),
            file_size: read_u64(buf, OFF_FILE_SIZE),
        };
        if found != expected || read_u32(buf, OFF_HEADER_SIZE) as u64 != HEADER_SIZE {
            return Err(HeaderProblem::Damaged(
                "its array offsets do not match its slot count".into(),
            ));
        }
        if file_size < expected.file_size {
            return Err(HeaderProblem::Damaged(format!(
                "it is {file_size} bytes long, its header says {}",
                expected.file_size
            )));
        }
        Ok(Header {
            geometry: expected,
            share_dev: read_u64(buf, OFF_SHARE_DEV),
            share_ino: read_u64(buf, OFF_SHARE_INO),
        })
    }
}

/// The generation a header page records (only meaningful once it decoded).
pub fn generation_of(buf: &[u8]) -> u64 {
    if buf.len() < OFF_GENERATION + 8 {
        return 0;
    }
    read_u64(buf, OFF_GENERATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            geometry: Geometry::for_slots(1024),
            share_dev: 0x803,
            share_ino: 2,
        }
    }

    #[test]
    fn a_header_decodes_to_what_was_encoded() {
        let h = header();
        let buf = h.encode(7);
        assert_eq!(Header::decode(&buf, h.geometry.file_size), Ok(h));
        assert_eq!(generation_of(&buf), 7);
    }

    #[test]
    fn every_flipped_byte_of_the_fixed_fields_is_detected() {
        let h = header();
        let good = h.encode(1);
        for i in 0..OFF_CHECK + 8 {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(
                Header::decode(&bad, h.geometry.file_size).is_err(),
                "byte {i} flipped went unnoticed"
            );
        }
    }

    #[test]
    fn a_short_file_or_other_content_is_refused() {
        let h = header();
        let buf = h.encode(1);
        assert!(matches!(
            Header::decode(&buf[..100], 100),
            Err(HeaderProblem::Damaged(_))
        ));
        assert!(matches!(
            Header::decode(&buf, h.geometry.file_size - 1),
            Err(HeaderProblem::Damaged(_))
        ));
        assert!(matches!(
            Header::decode(b"root:x:0:0:root:/root:/bin/bash\n", 32),
            Err(HeaderProblem::Foreign(_))
        ));
    }

    #[test]
    fn arrays_start_on_pages_and_the_guest_part_excludes_the_index() {
        let g = Geometry::for_slots(1000);
        assert_eq!(g.versions_offset % PAGE, 0);
        assert_eq!(g.index_offset % PAGE, 0);
        assert_eq!(g.ring_offset % PAGE, 0);
        assert!(g.index_offset >= g.versions_offset + 8000);
        assert_eq!(g.guest_visible_len(), g.index_offset);
    }
}
