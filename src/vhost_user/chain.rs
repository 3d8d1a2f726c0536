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
