//! Feeds one FUSE request, as a guest would place it in a virtqueue descriptor chain, through
//! berth's own request path (`serve_request` in src/vhost_user/queue.rs: the descriptor chain
//! walk into segments, berth's FUSE dispatcher `FsServer`, the passthrough filesystem with
//! xattrs on) over a scratch directory.
//!
//! Input: a control byte, then the request bytes. The control byte's two low bits spread the
//! request over 1 to 3 device-readable descriptors; its upper bits bend the chain out of
//! shape the way a hostile guest could (see [`Shape`]).

use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use berth_passthrough::{Config, FsServer, PassthroughFs};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};

/// Where the request buffers go in guest memory (the queue's rings live below).
const DATA_START: u64 = 0x10_0000;
/// Each readable descriptor holds at most this much.
const MAX_PART: usize = 0x10_0000;
const MAX_READABLE: usize = 3;
/// The device-writable reply buffer.
const REPLY_LEN: u32 = 0x10_0000;
const MEMORY_SIZE: usize = 0x80_0000;
const QUEUE_SIZE: u16 = 16;
/// Dirty-page logging stays off: no frontend installs a log here.
static LOGGING: AtomicBool = AtomicBool::new(false);

/// Ways the upper bits of the control byte bend the descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape(u8);

impl Shape {
    /// The reply descriptor is device-readable.
    pub const REPLY_READABLE: u8 = 0x04;
    /// The reply descriptor comes first, before the request.
    pub const REPLY_FIRST: u8 = 0x08;
    /// The reply descriptor lies beyond guest memory.
    pub const REPLY_OUTSIDE_MEMORY: u8 = 0x10;
    /// The last descriptor links back to the head.
    pub const LOOP: u8 = 0x20;
    /// The last descriptor links to an index past the table.
    pub const NEXT_OUT_OF_RANGE: u8 = 0x40;
    /// The reply buffer is shorter than a reply header.
    pub const SHORT_REPLY: u8 = 0x80;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

struct Harness {
    server: FsServer,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        limit_file_sizes();
        let dir = tempfile::tempdir().expect("scratch directory");
        // Some content for lookups and reads to find.
        std::fs::write(dir.path().join("file"), b"hello fuzzer\n").expect("fixture file");
        std::fs::create_dir(dir.path().join("dir")).expect("fixture dir");
        std::fs::write(dir.path().join("dir/inner"), vec![7u8; 8192]).expect("fixture file");
        let fs = PassthroughFs::new(Config {
            root_dir: dir.path().to_owned(),
            xattr: true,
            ..Default::default()
        })
        .expect("passthrough filesystem");
        Harness {
            server: FsServer::new(fs),
            _dir: dir,
        }
    })
}

/// Guest requests may fallocate or write at huge offsets: keep the scratch files small.
fn limit_file_sizes() {
    let limit = libc::rlimit {
        rlim_cur: 64 << 20,
        rlim_max: 64 << 20,
    };
    // SAFETY: plain resource-limit and signal-disposition calls with valid arguments; with
    // SIGXFSZ ignored, going past the limit fails with EFBIG instead of killing the process.
    unsafe {
        libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Splits `data` the way the fuzz input encodes it: the control byte's low bits pick how many
/// readable descriptors (1 to 3) the rest is spread over, in equal parts; its upper bits the
/// chain's [`Shape`].
pub fn split_input(data: &[u8]) -> (Shape, Vec<&[u8]>) {
    let Some((&control, body)) = data.split_first() else {
        return (Shape(0), vec![&[]]);
    };
    let parts = 1 + usize::from(control & 0x03) % MAX_READABLE;
    let size = body.len().div_ceil(parts).max(1);
    let mut chunks: Vec<&[u8]> = body.chunks(size).take(parts).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    (Shape(control & !0x03), chunks)
}

/// Serves one request; returns the number of reply bytes the device reported (0 when the
/// chain was dropped), or `None` if the input does not fit the harness.
pub fn serve(data: &[u8]) -> Option<u32> {
    let (shape, parts) = split_input(data);
    if parts.iter().any(|p| p.len() > MAX_PART) {
        return None;
    }
    let mem: GuestMemoryMmap<BitmapMmapRegion> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).expect("guest memory");
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let mut descriptors = Vec::new();
    for (index, part) in parts.iter().enumerate() {
        let addr = DATA_START + (index * MAX_PART) as u64;
        mem.write_slice(part, GuestAddress(addr))
            .expect("request fits");
        descriptors.push((addr, part.len() as u32, 0u16));
    }
    let reply_addr = if shape.has(Shape::REPLY_OUTSIDE_MEMORY) {
        MEMORY_SIZE as u64 + 0x1000
    } else {
        DATA_START + (MAX_READABLE * MAX_PART) as u64
    };
    let reply_len = if shape.has(Shape::SHORT_REPLY) {
        8
    } else {
        REPLY_LEN
    };
    let reply_flags = if shape.has(Shape::REPLY_READABLE) {
        0
    } else {
        VRING_DESC_F_WRITE as u16
    };
    let reply = (reply_addr, reply_len, reply_flags);
    if shape.has(Shape::REPLY_FIRST) {
        descriptors.insert(0, reply);
    } else {
        descriptors.push(reply);
    }
    let last = descriptors.len() - 1;
    for (index, &(addr, len, flags)) in descriptors.iter().enumerate() {
        let (flags, next) = if index < last {
            (flags | VRING_DESC_F_NEXT as u16, index as u16 + 1)
        } else if shape.has(Shape::LOOP) {
            (flags | VRING_DESC_F_NEXT as u16, 0)
        } else if shape.has(Shape::NEXT_OUT_OF_RANGE) {
            (flags | VRING_DESC_F_NEXT as u16, QUEUE_SIZE + 3)
        } else {
            (flags, 0)
        };
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        mock.desc_table().store(index as u16, desc).ok()?;
    }
    // Publish the chain at head 0, as a guest driver does.
    let avail = mock.avail_addr();
    mem.write_obj(0u16, avail.unchecked_add(4)).ok()?;
    mem.write_obj(1u16, avail.unchecked_add(2)).ok()?;

    let atomic = GuestMemoryAtomic::new(mem.clone());
    let guard = atomic.memory();
    let mut queue: Queue = mock.create_queue().ok()?;
    let desc_table = queue.desc_table();
    let chain = queue.pop_descriptor_chain(guard.clone())?;
    // As the daemon's queue loop does: the head's flags as the table holds them.
    let head_flags = crate::device::head_descriptor_flags(&guard, desc_table, chain.head_index());
    Some(crate::device::serve_request(
        &harness().server,
        1,
        &guard,
        &chain,
        head_flags,
        None,
        &LOGGING,
    ))
}
