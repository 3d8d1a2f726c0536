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
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

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

/// A guest buffer as the server's segment.
fn segment<'m>(slice: &VolatileSlice<'m>) -> IoSegment<'m> {
    // SAFETY: the slice lies in a region of guest memory, which stays mapped for 'm (the
    // caller holds the memory); the guest may change the bytes at any time, which the server
    // allows for (it reads them with volatile copies and checks everything it reads). Writes
    // through it bypass dirty-page tracking: guest memory has none (`Bitmap = ()`).
    unsafe { IoSegment::from_raw_parts(slice.ptr_guard_mut().as_ptr(), slice.len()) }
}

/// A chain's buffers in host memory: the request, then the room for the reply.
#[derive(Default)]
pub(crate) struct ChainSegments<'m> {
    pub readable: Segments<'m>,
    pub writable: Segments<'m>,
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
        mem: &'m GuestMemoryMmap,
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
            let out = if writable {
                &mut self.writable
            } else {
                &mut self.readable
            };
            let len = desc.len() as usize;
            if len > 0 {
                // One region holds the buffer, nearly always; otherwise it is split at region
                // boundaries.
                match GuestMemoryBackend::get_slice(mem, desc.addr(), len) {
                    Ok(slice) => out.push(segment(&slice)),
                    Err(_) => {
                        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
                            let slice =
                                slice.map_err(|_| ChainError::OutsideMemory { writable })?;
                            out.push(segment(&slice));
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
}
