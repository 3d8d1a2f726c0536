//! Large buffers of the upload path (a batch's data, a pack object being built) in
//! anonymous mappings of their own, so their memory goes back to the system the moment
//! they are dropped. Through malloc, a buffer of tens of MiB freed by a pack thread raises
//! glibc's mmap threshold to its size, and the next ones land in per-thread arenas that
//! keep their pages: a volume under sustained writes then held several times its upload
//! memory budget.

use bytes::Bytes;
use memmap2::MmapMut;

use crate::error::{Result, VolumeError};

/// A zero-filled buffer of fixed capacity, filled from the front or in place, then frozen
/// into shared [`Bytes`] without a copy.
pub(crate) struct LargeBuffer {
    map: Option<MmapMut>,
    len: usize,
}

impl LargeBuffer {
    /// `capacity` bytes of zeros, none of them used yet (pages are taken as they are
    /// first written).
    pub(crate) fn with_capacity(capacity: usize) -> Result<Self> {
        let map = if capacity == 0 {
            None
        } else {
            Some(
                MmapMut::map_anon(capacity).map_err(|source| VolumeError::Io {
                    context: format!("mapping a {capacity}-byte upload buffer"),
                    source,
                })?,
            )
        };
        Ok(Self { map, len: 0 })
    }

    /// `len` bytes of zeros, all in use.
    pub(crate) fn zeroed(len: usize) -> Result<Self> {
        let mut buffer = Self::with_capacity(len)?;
        buffer.len = len;
        Ok(buffer)
    }

    /// The bytes in use.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        match self.map.as_mut() {
            Some(map) => &mut map[..self.len],
            None => &mut [],
        }
    }

    /// Appends `bytes`; false (and nothing appended) if they do not fit.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> bool {
        let Some(map) = self.map.as_mut() else {
            return bytes.is_empty();
        };
        let Some(end) = self
            .len
            .checked_add(bytes.len())
            .filter(|&e| e <= map.len())
        else {
            return false;
        };
        map[self.len..end].copy_from_slice(bytes);
        self.len = end;
        true
    }

    /// The bytes in use, shared; the mapping goes when the last clone is dropped.
    pub(crate) fn freeze(self) -> Bytes {
        match self.map {
            Some(map) => Bytes::from_owner(map).slice(..self.len),
            None => Bytes::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_in_place_and_frozen_without_losing_bytes() {
        let mut buffer = LargeBuffer::zeroed(8192).unwrap();
        buffer.as_mut_slice()[4096..4100].copy_from_slice(b"pack");
        let frozen = buffer.freeze();
        assert_eq!(frozen.len(), 8192);
        assert_eq!(&frozen[4096..4100], b"pack");
        assert!(frozen[..4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn appends_stop_at_the_capacity() {
        let mut buffer = LargeBuffer::with_capacity(6).unwrap();
        assert!(buffer.push(b"abc"));
        assert!(buffer.push(b"de"));
        assert!(!buffer.push(b"fg"), "7 bytes do not fit in 6");
        assert_eq!(&buffer.freeze()[..], b"abcde");
    }

    #[test]
    fn an_empty_buffer_needs_no_mapping() {
        let mut buffer = LargeBuffer::with_capacity(0).unwrap();
        assert!(buffer.push(b""));
        assert!(!buffer.push(b"x"));
        assert!(buffer.freeze().is_empty());
    }
}
