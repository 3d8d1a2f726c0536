//! Feeds one FUSE request, as a guest would place it in a virtqueue descriptor chain, to the
//! passthrough filesystem server over a scratch directory.

use std::sync::OnceLock;

use berth_passthrough::{Config, FsServer, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the request buffers go in guest memory (the queue's rings live below).
const DATA_START: u64 = 0x10_0000;
/// Each readable descriptor holds at most this much.
const MAX_PART: usize = 0x10_0000;
const MAX_READABLE: usize = 3;
/// The device-writable reply buffer.
const REPLY_LEN: u32 = 0x10_0000;
const MEMORY_SIZE: usize = 0x80_0000;

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

/// Splits `data` the way the fuzz input encodes it: the first byte picks how many readable
/// descriptors (1 to 3) the rest is spread over, in equal parts.
pub fn split_input(data: &[u8]) -> Vec<&[u8]> {
    let Some((&control, body)) = data.split_first() else {
        return vec![&[]];
    };
    let parts = 1 + usize::from(control) % MAX_READABLE;
    let size = body.len().div_ceil(parts).max(1);
    let mut chunks: Vec<&[u8]> = body.chunks(size).take(parts).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    chunks
}

/// Serves one request; returns the reply length, or `None` if the request was refused.
pub fn serve(data: &[u8]) -> Option<usize> {
    let parts = split_input(data);
    if parts.iter().any(|p| p.len() > MAX_PART) {
        return None;
    }
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).expect("guest memory");
    let queue = MockSplitQueue::new(&mem, 16);
    let mut descriptors = Vec::new();
    for (index, part) in parts.iter().enumerate() {
        let addr = DATA_START + (index * MAX_PART) as u64;
        mem.write_slice(part, GuestAddress(addr))
            .expect("request fits");
        descriptors.push(RawDescriptor::from(SplitDescriptor::new(
            addr,
            part.len() as u32,
            0,
            0,
        )));
    }
    let reply_addr = DATA_START + (MAX_READABLE * MAX_PART) as u64;
    descriptors.push(RawDescriptor::from(SplitDescriptor::new(
        reply_addr,
        REPLY_LEN,
        VRING_DESC_F_WRITE as u16,
        0,
    )));
    let chain = queue
        .build_desc_chain(&descriptors)
        .expect("descriptor chain");
    let reader = Reader::from_descriptor_chain(&mem, chain.clone()).ok()?;
    let writer = VirtioFsWriter::new(&mem, chain).ok()?;
    harness()
        .server
        .handle_message(reader, writer.into(), None)
        .ok()
}
