//! The guest side's view of the table: the FUSE extension that tells a virtio-fs guest each
//! inode's slot, in one place for the FUSE server and the tests (the Linux patches under
//! `guest-images/kernel/shared-versions/` implement the other end; its design note spells the
//! same layout out).
//!
//! - FUSE_INIT: the guest offers [`INIT_SHARED_VERSIONS`] in `flags2` (bit 62 of the 64-bit
//!   flags) only when it found shared-memory region [`SHMEM_REGION_ID`] with a valid table
//!   header; the server echoes it when it serves a table. Nothing changes without it.
//! - With it, replies that carry attributes end with a [`VersionExt`]: LOOKUP, MKNOD, MKDIR,
//!   SYMLINK, LINK, TMPFILE (after `fuse_entry_out`), CREATE (after `fuse_open_out`), GETATTR
//!   and SETATTR (after `fuse_attr_out`), and every READDIRPLUS entry (between its
//!   `fuse_entry_out` and its `fuse_dirent`, the record padded to 8 bytes as before).
//! - Region 1 is the table file's first [`crate::Geometry::guest_visible_len`] bytes,
//!   read-only: the header page, then the versions. Slot `s`'s version is the little-endian
//!   u64 at `versions_offset + 8 * s`.

/// FUSE_INIT flag (64-bit flags; `flags2` bit 30) the guest sets when it can use the table.
pub const INIT_SHARED_VERSIONS: u64 = 1 << 62;

/// The virtio shared-memory region id of the table (region 0 is the DAX window).
pub const SHMEM_REGION_ID: u8 = 1;

/// Size of [`VersionExt`] on the wire.
pub const VERSION_EXT_SIZE: usize = 24;

/// What a reply tells the guest about one inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionExt {
    /// The inode's slot, [`crate::Slot::NONE`] when it has none (the reply's timeouts then
    /// apply as they are).
    pub slot: u32,
    /// The low 32 bits of the table generation the slot belongs to.
    pub generation: u32,
    /// The slot's version read before the attributes in the reply were: the guest's cache is
    /// good while the slot still holds it.
    pub version: u64,
    /// For replies that create a directory entry (LOOKUP, READDIRPLUS, MKNOD, MKDIR, SYMLINK,
    /// LINK, CREATE): the parent directory's version read before the entry was looked up; the
    /// dentry is good while the parent's slot still holds it. 0 otherwise.
    pub parent_version: u64,
}

impl VersionExt {
    /// The wire bytes (little-endian, as the guest reads them).
    pub fn encode(&self) -> [u8; VERSION_EXT_SIZE] {
        let mut out = [0u8; VERSION_EXT_SIZE];
        out[0..4].copy_from_slice(&self.slot.to_le_bytes());
        out[4..8].copy_from_slice(&self.generation.to_le_bytes());
        out[8..16].copy_from_slice(&self.version.to_le_bytes());
        out[16..24].copy_from_slice(&self.parent_version.to_le_bytes());
        out
    }

    /// Parses the wire bytes (for tests and the frontend's checks).
    pub fn decode(bytes: &[u8]) -> Option<VersionExt> {
        let b: &[u8; VERSION_EXT_SIZE] = bytes.get(..VERSION_EXT_SIZE)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Some(VersionExt {
            slot: u32_at(0),
            generation: u32_at(4),
            version: u64_at(8),
            parent_version: u64_at(16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_round_trips_and_is_little_endian() {
        let ext = VersionExt {
            slot: 5,
            generation: 0x0102_0304,
            version: 9,
            parent_version: 11,
        };
        let bytes = ext.encode();
        assert_eq!(&bytes[0..4], &[5, 0, 0, 0]);
        assert_eq!(&bytes[4..8], &[4, 3, 2, 1]);
        assert_eq!(VersionExt::decode(&bytes), Some(ext));
        assert_eq!(VersionExt::decode(&bytes[..23]), None);
    }
}
