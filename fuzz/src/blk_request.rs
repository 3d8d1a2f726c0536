//! Feeds one virtio-blk request, as a guest would place it in a descriptor chain, through
//! berth's vhost-user-blk request path (`serve_chain_with` in src/vhost_blk/request.rs, a FLUSH
//! deferred and answered after a flush of the target, as the device does) against a
//! 1 MiB raw file (or the same file read-only).
//!
//! Input: a control byte, two bytes of device-writable room (little-endian, in 512-byte
//! units), then the device-readable bytes (header and payload). The control byte's two low
//! bits spread the readable bytes over 1 to 3 descriptors; its upper bits bend the chain
//! (see [`Shape`]).

use std::sync::OnceLock;

use berth_blockdev::{RawOptions, RawTarget, SharedTarget};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use crate::vhost_blk_request::{serve_chain_with, Answered, BlkMemory, RequestPolicy, Step};

/// Where the buffers go in guest memory (the queue's rings live below).
const DATA_START: u64 = 0x10_0000;
/// Each readable descriptor holds at most this much.
const MAX_PART: usize = 0x4_0000;
const MAX_READABLE: usize = 3;
/// The device-writable data room is at most this much (the whole device).
const MAX_ROOM: u64 = 1 << 20;
const MEMORY_SIZE: usize = 0x80_0000;
const QUEUE_SIZE: u16 = 16;
/// The backing file's size.
const DEVICE_SIZE: u64 = 1 << 20;

/// Ways the upper bits of the control byte bend the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape(u8);

impl Shape {
    /// The device-writable room is split over two descriptors.
    pub const SPLIT_ROOM: u8 = 0x04;
    /// No status descriptor after the room.
    pub const NO_STATUS: u8 = 0x08;
    /// The status byte lies beyond guest memory.
    pub const STATUS_OUTSIDE_MEMORY: u8 = 0x10;
    /// A readable descriptor comes after the writable ones.
    pub const READABLE_LAST: u8 = 0x20;
    /// The last descriptor links back to the head.
    pub const LOOP: u8 = 0x40;
    /// The device is read-only.
    pub const READ_ONLY: u8 = 0x80;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

struct Harness {
    writable: SharedTarget,
    read_only: SharedTarget,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("scratch directory");
        let path = dir.path().join("disk.raw");
        let content: Vec<u8> = (0..DEVICE_SIZE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, content).expect("backing file");
        let open = |read_only| -> SharedTarget {
            std::sync::Arc::new(
                RawTarget::open(
                    &path,
                    &RawOptions {
                        read_only,
                        block_size: 512,
                        direct: false,
                    },
                )
                .expect("raw target"),
            )
        };
        Harness {
            writable: open(false),
            read_only: open(true),
            _dir: dir,
        }
    })
}

/// Serves one request; `None` if the input does not fit the harness.
pub fn serve(data: &[u8]) -> Option<Answered> {
    let (&control, rest) = data.split_first()?;
    let shape = Shape(control & !0x03);
    let room_bytes = rest.get(..2)?;
    let room = (u64::from(u16::from_le_bytes([room_bytes[0], room_bytes[1]])) * 512).min(MAX_ROOM);
    let body = &rest[2..];
    let parts_wanted = 1 + usize::from(control & 0x03) % MAX_READABLE;
    let size = body.len().div_ceil(parts_wanted).max(1);
    let mut parts: Vec<&[u8]> = body.chunks(size).take(parts_wanted).collect();
    if parts.is_empty() {
        parts.push(&[]);
    }
    if parts.iter().any(|p| p.len() > MAX_PART) {
        return None;
    }
    let mem = BlkMemory::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).expect("guest memory");
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let mut descriptors = Vec::new();
    for (index, part) in parts.iter().enumerate() {
        let addr = DATA_START + (index * MAX_PART) as u64;
        mem.write_slice(part, GuestAddress(addr)).ok()?;
        descriptors.push((addr, part.len() as u32, 0u16));
    }
    let writable = VRING_DESC_F_WRITE as u16;
    let room_at = DATA_START + (MAX_READABLE * MAX_PART) as u64;
    if room > 0 {
        if shape.has(Shape::SPLIT_ROOM) && room > 512 {
            let first = (room / 2) & !511;
            descriptors.push((room_at, first as u32, writable));
            descriptors.push((room_at + first, (room - first) as u32, writable));
        } else {
            descriptors.push((room_at, room as u32, writable));
        }
    }
    if !shape.has(Shape::NO_STATUS) {
        let status_at = if shape.has(Shape::STATUS_OUTSIDE_MEMORY) {
            MEMORY_SIZE as u64 + 0x1000
        } else {
            room_at + MAX_ROOM
        };
        descriptors.push((status_at, 1, writable));
    }
    if shape.has(Shape::READABLE_LAST) {
        descriptors.push((DATA_START, 16, 0));
    }
    let last = descriptors.len() - 1;
    for (index, &(addr, len, flags)) in descriptors.iter().enumerate() {
        let (flags, next) = if index < last {
            (flags | VRING_DESC_F_NEXT as u16, index as u16 + 1)
        } else if shape.has(Shape::LOOP) {
            (flags | VRING_DESC_F_NEXT as u16, 0)
        } else {
            (flags, 0)
        };
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        mock.desc_table().store(index as u16, desc).ok()?;
    }
    let avail = mock.avail_addr();
    mem.write_obj(0u16, avail.unchecked_add(4)).ok()?;
    mem.write_obj(1u16, avail.unchecked_add(2)).ok()?;

    let atomic = GuestMemoryAtomic::new(mem.clone());
    let guard = atomic.memory();
    let mut queue: Queue = mock.create_queue().ok()?;
    let chain = queue.pop_descriptor_chain(guard.clone())?;
    let target = if shape.has(Shape::READ_ONLY) {
        &harness().read_only
    } else {
        &harness().writable
    };
    let policy = RequestPolicy::for_target(target.as_ref(), "fuzz");
    let target = target.as_ref();
    let answered = serve_chain_with(target, &policy, &chain, &guard, Step::First);
    if answered.deferred.is_none() {
        return Some(answered);
    }
    let flushed = berth_blockdev::target::flush(target).map_err(|e| e.to_string());
    Some(serve_chain_with(
        target,
        &policy,
        &chain,
        &guard,
        Step::Resumed(&flushed),
    ))
}
