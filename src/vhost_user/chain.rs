//! Descriptor chains into request and reply segments: the untrusted edge of the virtio
//! transport.
//!
//! A chain is walked once. Each descriptor is checked (direction order, loops, indices, the
//! head's flags) and translated into host memory, split where it crosses guest memory
//! regions, so that the FUSE server gets the request as readable segments and the room for
//! its reply as writable ones. Nothing else in berth reads a descriptor or a guest address.

use std::fmt;
use std::ops::Deref;

use berth_passthrough::IoSegment;
use smallvec::SmallVec;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, VolatileSlice};

use super::LoggedMemory;

/// Segments kept inline per direction: a 4 KiB request or reply and its headers fit, a 1 MiB
/// one in 4 KiB pages spills to the heap (once per such request).
const INLINE_SEGMENTS: usize = 16;

/// Segments of one direction.
pub(crate) type Segments<'m> = SmallVec<[IoSegment<'m>; INLINE_SEGMENTS]>;

/// Why a chain is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChainError {
    IndirectWithNext,
    ReadableAfterWritable,
    HeadUnreadable,
    Unterminated,
    OutsideMemory { writable: bool },
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::IndirectWithNext => {
                f.write_str("its head refers to an indirect table and also has NEXT set")
            }
            ChainError::ReadableAfterWritable => {
                f.write_str("a device-readable descriptor follows a device-writable one")
            }
            ChainError::HeadUnreadable => f.write_str("its head descriptor cannot be read"),
            ChainError::Unterminated => f.write_str(
                "it does not end (a loop, a next index out of range or an unreadable descriptor)",
            ),
            ChainError::OutsideMemory { writable: false } => {
                f.write_str("a device-readable buffer lies outside guest memory")
            }
            ChainError::OutsideMemory { writable: true } => {
                f.write_str("a device-writable buffer lies outside guest memory")
            }
        }
    }
}

/// A guest buffer of the chain, with its region's dirty-page bitmap.
type GuestSlice<'m> = VolatileSlice<'m, BitmapMmapRegion>;

/// A guest buffer as the server's segment.
fn segment<'m>(slice: &GuestSlice<'m>) -> IoSegment<'m> {
    // SAFETY: the slice lies in a region of guest memory, which stays mapped for 'm (the
    // caller holds the memory); the guest may change the bytes at any time, which the server
    // allows for (it reads them with volatile copies and checks everything it reads). Writes
    // through the raw pointer (reply headers, `preadv` straight into guest memory) bypass the
    // dirty-page bitmap: [`ChainSegments::mark_written`] marks them once the reply is in.
    unsafe { IoSegment::from_raw_parts(slice.ptr_guard_mut().as_ptr(), slice.len()) }
}

/// A chain's buffers in host memory: the request, then the room for the reply.
#[derive(Default)]
pub(crate) struct ChainSegments<'m> {
    pub readable: Segments<'m>,
    pub writable: Segments<'m>,
    /// The guest slices behind `writable`, in the same order, for dirty-page logging.
    written: SmallVec<[GuestSlice<'m>; INLINE_SEGMENTS]>,
}

impl<'m> ChainSegments<'m> {
    /// Walks `chain` over `mem`. `head_flags` are the head descriptor's flags as the table
    /// holds them, when they could be read (the library's iterator hides an indirect head).
    ///
    /// On error the segments hold what was found before the fault, in order: enough, often,
    /// to answer the request with an error.
    pub(crate) fn walk<M>(
        &mut self,
        chain: &DescriptorChain<M>,
        mem: &'m LoggedMemory,
        head_flags: Option<u16>,
    ) -> Result<(), ChainError>
    where
        M: Deref + Clone,
        M::Target: vm_memory::GuestMemory,
    {
        const INDIRECT_AND_NEXT: u16 = (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT) as u16;
        if head_flags.is_some_and(|flags| flags & INDIRECT_AND_NEXT == INDIRECT_AND_NEXT) {
            return Err(ChainError::IndirectWithNext);
        }
        let mut descriptors = 0usize;
        let mut last_has_next = false;
        for desc in chain.clone() {
            descriptors += 1;
            let writable = desc.is_write_only();
            if !writable && !self.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            let len = desc.len() as usize;
            if len > 0 {
                // One region holds the buffer, nearly always; otherwise it is split at region
                // boundaries.
                match GuestMemoryBackend::get_slice(mem, desc.addr(), len) {
                    Ok(slice) => self.push(slice, writable),
                    Err(_) => {
                        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
                            let slice =
                                slice.map_err(|_| ChainError::OutsideMemory { writable })?;
                            self.push(slice, writable);
                        }
                    }
                }
            }
            last_has_next = desc.has_next();
        }
        if descriptors == 0 {
            return Err(ChainError::HeadUnreadable);
        }
        if last_has_next {
            return Err(ChainError::Unterminated);
        }
        Ok(())
    }

    fn push(&mut self, slice: GuestSlice<'m>, writable: bool) {
        if writable {
            self.writable.push(segment(&slice));
            self.written.push(slice);
        } else {
            self.readable.push(segment(&slice));
        }
    }

    /// Marks the pages of the first `len` bytes of the reply room dirty in the frontend's
    /// log (the server writes a reply front to back, so that is exactly what it wrote). Does
    /// nothing while no log is installed.
    pub(crate) fn mark_written(&self, len: usize) {
        let mut left = len;
        for slice in &self.written {
            if left == 0 {
                break;
            }
            let here = left.min(slice.len());
            slice.bitmap().mark_dirty(0, here);
            left -= here;
        }
    }
}

/// Bytes of a split-ring descriptor: address, length, flags, next.
const DESCRIPTOR_LEN: u64 = 16;
/// Bytes of the FUSE request header a parked request's chain is checked against (length,
/// opcode, unique).
pub(crate) const REQUEST_HEADER_CHECK: usize = 16;

/// One descriptor as the table holds it.
struct RawDescriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_descriptor(mem: &LoggedMemory, table: u64, index: u64) -> Option<RawDescriptor> {
    let at = table.checked_add(index.checked_mul(DESCRIPTOR_LEN)?)?;
    let mut bytes = [0u8; DESCRIPTOR_LEN as usize];
    GuestMemoryBackend::get_slice(mem, vm_memory::GuestAddress(at), bytes.len())
        .ok()?
        .copy_to(&mut bytes);
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&bytes[..8]);
    Some(RawDescriptor {
        addr: u64::from_le_bytes(addr),
        len: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        flags: u16_at(12),
        next: u16_at(14),
    })
}

impl<'m> ChainSegments<'m> {
    /// Walks the chain at `head` of the descriptor table at `desc_table` (`queue_size`
    /// entries) straight from guest memory: for a request taken off the ring earlier (by this
    /// daemon before a stop, or by a migration source), which the library's chain type cannot
    /// be rebuilt for. The same checks as [`walk`](Self::walk): direction order, loops, indices,
    /// an indirect table only at the head and never nested. Returns the first
    /// [`REQUEST_HEADER_CHECK`] bytes of the request (fewer if it is shorter).
    pub(crate) fn walk_table(
        &mut self,
        mem: &'m LoggedMemory,
        desc_table: u64,
        queue_size: u16,
        head: u16,
    ) -> Result<SmallVec<[u8; REQUEST_HEADER_CHECK]>, ChainError> {
        const NEXT: u16 = VRING_DESC_F_NEXT as u16;
        const WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
        if head >= queue_size {
            return Err(ChainError::HeadUnreadable);
        }
        let first =
            read_descriptor(mem, desc_table, u64::from(head)).ok_or(ChainError::HeadUnreadable)?;
        // Where the chain's descriptors are: the queue's table, or the head's indirect one.
        let (table, entries, mut index) = if first.flags & INDIRECT != 0 {
            if first.flags & NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            let entries = u64::from(first.len) / DESCRIPTOR_LEN;
            if first.len == 0 || u64::from(first.len) % DESCRIPTOR_LEN != 0 || entries > 65536 {
                return Err(ChainError::Unterminated);
            }
            (first.addr, entries, 0u64)
        } else {
            (desc_table, u64::from(queue_size), u64::from(head))
        };
        let mut header = SmallVec::new();
        // Each descriptor at most once: a longer chain loops.
        for _ in 0..entries {
            let desc = read_descriptor(mem, table, index).ok_or(ChainError::Unterminated)?;
            if desc.flags & INDIRECT != 0 {
                return Err(ChainError::Unterminated);
            }
            let writable = desc.flags & WRITE != 0;
            if !writable && !self.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            let len = desc.len as usize;
            if len > 0 {
                let addr = vm_memory::GuestAddress(desc.addr);
                for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
                    let slice = slice.map_err(|_| ChainError::OutsideMemory { writable })?;
                    if !writable && header.len() < REQUEST_HEADER_CHECK {
                        let take = (REQUEST_HEADER_CHECK - header.len()).min(slice.len());
                        let mut bytes = [0u8; REQUEST_HEADER_CHECK];
                        slice
                            .subslice(0, take)
                            .map_err(|_| ChainError::OutsideMemory { writable })?
                            .copy_to(&mut bytes[..take]);
                        header.extend_from_slice(&bytes[..take]);
                    }
                    self.push(slice, writable);
                }
            }
            if desc.flags & NEXT == 0 {
                return Ok(header);
            }
            index = u64::from(desc.next);
            if index >= entries {
                return Err(ChainError::Unterminated);
            }
        }
        Err(ChainError::Unterminated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const TABLE: u64 = 0x1000;
    const SIZE: u16 = 8;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn memory() -> LoggedMemory {
        LoggedMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn put(
        mem: &LoggedMemory,
        table: u64,
        index: u64,
        (addr, len, flags, next): (u64, u32, u16, u16),
    ) {
        let at = GuestAddress(table + index * DESCRIPTOR_LEN);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    fn walk(mem: &LoggedMemory, head: u16) -> Result<(usize, usize, Vec<u8>), ChainError> {
        let mut segments = ChainSegments::default();
        let header = segments.walk_table(mem, TABLE, SIZE, head)?;
        Ok((
            segments.readable.len(),
            segments.writable.len(),
            header.to_vec(),
        ))
    }

    #[test]
    fn a_chain_is_found_again_from_its_head() {
        let mem = memory();
        mem.write_slice(&[7u8; 64], GuestAddress(0x10000)).unwrap();
        put(&mem, TABLE, 2, (0x10000, 64, NEXT, 5));
        put(&mem, TABLE, 5, (0x20000, 32, WRITE, 0));
        assert_eq!(walk(&mem, 2), Ok((1, 1, vec![7u8; REQUEST_HEADER_CHECK])));
        // Through an indirect table at the head.
        put(&mem, TABLE, 3, (0x3000, 32, INDIRECT, 0));
        put(&mem, 0x3000, 0, (0x10000, 8, NEXT, 1));
        put(&mem, 0x3000, 1, (0x20000, 32, WRITE, 0));
        assert_eq!(walk(&mem, 3), Ok((1, 1, vec![7u8; 8])));
    }

    #[test]
    fn hostile_chains_are_refused() {
        let mem = memory();
        // A loop, a next index past the table, a head past the queue.
        put(&mem, TABLE, 0, (0x10000, 16, NEXT, 1));
        put(&mem, TABLE, 1, (0x10000, 16, NEXT, 0));
        assert_eq!(walk(&mem, 0), Err(ChainError::Unterminated));
        put(&mem, TABLE, 1, (0x10000, 16, NEXT, 9));
        assert_eq!(walk(&mem, 0), Err(ChainError::Unterminated));
        assert_eq!(walk(&mem, SIZE), Err(ChainError::HeadUnreadable));
        // Indirect with NEXT, a nested indirect table, an empty or ragged one.
        put(&mem, TABLE, 2, (0x3000, 32, INDIRECT | NEXT, 3));
        assert_eq!(walk(&mem, 2), Err(ChainError::IndirectWithNext));
        put(&mem, TABLE, 2, (0x3000, 32, INDIRECT, 0));
        put(&mem, 0x3000, 0, (0x3000, 32, INDIRECT, 0));
        assert_eq!(walk(&mem, 2), Err(ChainError::Unterminated));
        put(&mem, TABLE, 2, (0x3000, 0, INDIRECT, 0));
        assert_eq!(walk(&mem, 2), Err(ChainError::Unterminated));
        put(&mem, TABLE, 2, (0x3000, 20, INDIRECT, 0));
        assert_eq!(walk(&mem, 2), Err(ChainError::Unterminated));
        // A loop inside an indirect table.
        put(&mem, TABLE, 2, (0x3000, 32, INDIRECT, 0));
        put(&mem, 0x3000, 0, (0x10000, 8, NEXT, 1));
        put(&mem, 0x3000, 1, (0x10000, 8, NEXT, 0));
        assert_eq!(walk(&mem, 2), Err(ChainError::Unterminated));
        // Readable after writable; buffers and tables outside guest memory.
        put(&mem, TABLE, 4, (0x20000, 16, WRITE | NEXT, 5));
        put(&mem, TABLE, 5, (0x10000, 16, 0, 0));
        assert_eq!(walk(&mem, 4), Err(ChainError::ReadableAfterWritable));
        put(&mem, TABLE, 6, (u64::MAX - 8, 64, WRITE, 0));
        assert_eq!(
            walk(&mem, 6),
            Err(ChainError::OutsideMemory { writable: true })
        );
        put(&mem, TABLE, 7, (1 << 30, 16, INDIRECT, 0));
        assert_eq!(walk(&mem, 7), Err(ChainError::Unterminated));
        let mut segments = ChainSegments::default();
        assert_eq!(
            segments.walk_table(&mem, u64::MAX - 16, SIZE, 3),
            Err(ChainError::HeadUnreadable)
        );
    }
}
