//! READ and WRITE served straight between guest memory and the host file.
//!
//! These two opcodes carry a busy guest's data and most of its requests. The general path
//! builds fuse-backend-rs's `Reader` and `Writer` (two more walks of the descriptor chain and
//! several allocations per request) and dispatches through the library's server. Here the
//! chain, already walked once by [`ChainLayout::walk`], is used as it is: the request header
//! and arguments are copied out of guest memory, and the host file is read or written with one
//! `preadv`/`pwritev` over the guest's own buffers, through the same `PassthroughFs::read` /
//! `write` the general path ends in. Anything unusual — another opcode, a chain longer than
//! the layout holds, a buffer that crosses guest memory regions, sizes the library would
//! refuse — is left to the general path, so this one never answers differently.

use std::io;
use std::mem::size_of;

use arrayvec::ArrayVec;
use berth_passthrough::FsServer;
use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader, ReadIn, WriteIn, WriteOut};
use fuse_backend_rs::api::filesystem::{Context, FileSystem, ZeroCopyReader, ZeroCopyWriter};
use fuse_backend_rs::api::server::MAX_BUFFER_SIZE;
use fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Descriptors a chain may have for the fast path: a 1 MiB request in 4 KiB guest pages plus
/// its header and argument descriptors.
const MAX_DESCRIPTORS: usize = 264;

const OPCODE_READ: u32 = 15;
const OPCODE_WRITE: u32 = 16;
/// `ReadIn::read_flags`: `lock_owner` is valid.
const READ_LOCKOWNER: u32 = 1 << 1;
/// `WriteIn::write_flags`: delayed write from the page cache, and `lock_owner` is valid.
const WRITE_CACHE: u32 = 1 << 0;
const WRITE_LOCKOWNER: u32 = 1 << 1;

/// One descriptor of a chain.
#[derive(Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// The shape of a descriptor chain: its readable descriptors, then its writable ones, checked
/// the way the library's readers would silently cut short. Filled in place by
/// [`ChainLayout::walk`]: it is a few KiB, and moving it would cost more than serving a small
/// request.
pub struct ChainLayout {
    segments: ArrayVec<Segment, MAX_DESCRIPTORS>,
    /// Index in `segments` of the first writable descriptor.
    first_writable: usize,
    readable_bytes: usize,
    writable_bytes: usize,
    /// More descriptors than the layout holds: valid, but for the general path only.
    overflow: bool,
}

impl Default for ChainLayout {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainLayout {
    pub fn new() -> Self {
        ChainLayout {
            segments: ArrayVec::new(),
            first_writable: 0,
            readable_bytes: 0,
            writable_bytes: 0,
            overflow: false,
        }
    }

    fn readable(&self) -> &[Segment] {
        &self.segments[..self.first_writable]
    }

    fn writable(&self) -> &[Segment] {
        &self.segments[self.first_writable..]
    }

    /// Walks the chain once, catching loops, next indices out of range, unreadable or
    /// nested-indirect descriptors (each ends the walk on a descriptor that still has NEXT set)
    /// and readable descriptors placed after writable ones (virtio 2.7.4.2 puts all
    /// device-writable descriptors last). `head_flags` are the head descriptor's flags as the
    /// table holds them, when they could be read.
    pub fn walk<M>(
        &mut self,
        chain: &DescriptorChain<M>,
        head_flags: Option<u16>,
    ) -> Result<(), &'static str>
    where
        M: std::ops::Deref + Clone,
        M::Target: GuestMemory,
    {
        const INDIRECT_AND_NEXT: u16 = (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT) as u16;
        if head_flags.is_some_and(|flags| flags & INDIRECT_AND_NEXT == INDIRECT_AND_NEXT) {
            return Err("its head refers to an indirect table and also has NEXT set");
        }
        let mut descriptors = 0usize;
        let mut last_has_next = false;
        let mut writable_seen = false;
        for desc in chain.clone() {
            descriptors += 1;
            if desc.is_write_only() {
                writable_seen = true;
                self.writable_bytes = self.writable_bytes.saturating_add(desc.len() as usize);
            } else if writable_seen {
                return Err("a device-readable descriptor follows a device-writable one");
            } else {
                self.readable_bytes = self.readable_bytes.saturating_add(desc.len() as usize);
                self.first_writable = self.segments.len() + 1;
            }
            let segment = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if self.segments.try_push(segment).is_err() {
                self.overflow = true;
            }
            last_has_next = desc.has_next();
        }
        if descriptors == 0 {
            return Err("its head descriptor cannot be read");
        }
        if last_has_next {
            return Err(
                "it does not end (a loop, a next index out of range or an unreadable descriptor)",
            );
        }
        Ok(())
    }
}

/// Serves the request in `layout` if it is a READ or WRITE the fast path handles, returning
/// the number of reply bytes written; `None` leaves it, untouched, to the general path.
pub fn try_serve(server: &FsServer, mem: &GuestMemoryMmap, layout: &ChainLayout) -> Option<u32> {
    if layout.overflow {
        return None;
    }
    let mut request = [0u8; size_of::<InHeader>() + size_of::<ReadIn>()];
    const _: () = assert!(size_of::<ReadIn>() == size_of::<WriteIn>());
    if layout.readable_bytes < request.len()
        || copy_from_guest(mem, layout.readable(), &mut request).is_err()
    {
        return None;
    }
    let header = InHeader::from_slice(&request[..size_of::<InHeader>()])?;
    if header.len > MAX_BUFFER_SIZE + 0x1000 {
        return None;
    }
    let args = &request[size_of::<InHeader>()..];
    let ctx = Context {
        uid: header.uid,
        gid: header.gid,
        pid: header.pid as libc::pid_t,
    };
    let fs = &**server.fs();
    match header.opcode {
        OPCODE_READ => {
            let read = ReadIn::from_slice(args)?;
            // The library answers a reply buffer smaller than the read with an error; leave
            // that (never sent by a Linux guest) to it.
            if read.size > MAX_BUFFER_SIZE
                || layout.writable_bytes < size_of::<OutHeader>() + read.size as usize
            {
                return None;
            }
            let mut buffers = GuestBuffers::new();
            buffers.fill(
                mem,
                layout.writable(),
                size_of::<OutHeader>(),
                read.size as usize,
            )?;
            let owner = (read.read_flags & READ_LOCKOWNER != 0).then_some(read.lock_owner);
            let result = fs.read(
                &ctx,
                header.nodeid,
                read.fh,
                &mut buffers,
                read.size,
                read.offset,
                owner,
                read.flags,
            );
            let (error, count) = match result {
                Ok(count) => (0, count),
                Err(e) => (errno_of(&e), 0),
            };
            reply(mem, layout, header, error, &[], count)
        }
        OPCODE_WRITE => {
            let write = WriteIn::from_slice(args)?;
            let reply_len = size_of::<OutHeader>() + size_of::<WriteOut>();
            if write.size > MAX_BUFFER_SIZE
                || layout.readable_bytes - request.len() < write.size as usize
                || layout.writable_bytes < reply_len
            {
                return None;
            }
            let mut buffers = GuestBuffers::new();
            buffers.fill(mem, layout.readable(), request.len(), write.size as usize)?;
            let owner = (write.fuse_flags & WRITE_LOCKOWNER != 0).then_some(write.lock_owner);
            let result = fs.write(
                &ctx,
                header.nodeid,
                write.fh,
                &mut buffers,
                write.size,
                write.offset,
                owner,
                write.fuse_flags & WRITE_CACHE != 0,
                write.flags,
                write.fuse_flags,
            );
            match result {
                Ok(count) => {
                    let out = WriteOut {
                        size: count as u32,
                        ..Default::default()
                    };
                    reply(mem, layout, header, 0, out.as_slice(), 0)
                }
                Err(e) => reply(mem, layout, header, errno_of(&e), &[], 0),
            }
        }
        _ => None,
    }
}

/// The errno a reply carries for `e`, as the library's server encodes it.
fn errno_of(e: &io::Error) -> i32 {
    -e.raw_os_error()
        .unwrap_or_else(|| fuse_backend_rs::encode_io_error_kind(e.kind()))
}

/// Writes the reply header (and `body`) at the start of the writable descriptors; `data_len`
/// bytes of data already sit after the header. Returns the reply's length.
fn reply(
    mem: &GuestMemoryMmap,
    layout: &ChainLayout,
    header: &InHeader,
    error: i32,
    body: &[u8],
    data_len: usize,
) -> Option<u32> {
    let (body, data_len) = if error == 0 {
        (body, data_len)
    } else {
        (&[][..], 0)
    };
    let len = size_of::<OutHeader>() + body.len() + data_len;
    let out = OutHeader {
        len: u32::try_from(len).ok()?,
        error,
        unique: header.unique,
    };
    let mut bytes = [0u8; size_of::<OutHeader>() + size_of::<WriteOut>()];
    let head = size_of::<OutHeader>() + body.len();
    bytes[..size_of::<OutHeader>()].copy_from_slice(out.as_slice());
    bytes[size_of::<OutHeader>()..head].copy_from_slice(body);
    // The checks before serving guarantee the room; a failure here means guest memory went
    // away under the request, and the general path would not do better.
    copy_to_guest(mem, layout.writable(), &bytes[..head]).ok()?;
    Some(out.len)
}

/// Copies the first `out.len()` bytes of the segments into `out`.
fn copy_from_guest(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    out: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for segment in segments {
        if done == out.len() {
            break;
        }
        let n = (segment.len as usize).min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], segment.addr)?;
        done += n;
    }
    Ok(())
}

/// Copies `bytes` to the start of the segments.
fn copy_to_guest(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    bytes: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for segment in segments {
        if done == bytes.len() {
            break;
        }
        let n = (segment.len as usize).min(bytes.len() - done);
        mem.write_slice(&bytes[done..done + n], segment.addr)?;
        done += n;
    }
    Ok(())
}

/// Guest buffers as one vector for `preadv`/`pwritev`: the segments' bytes from `skip` on, at
/// most `limit` of them. Consumed front to back, as the library's readers and writers are:
/// `slices[next..]` always hold exactly the bytes not consumed yet.
struct GuestBuffers<'a> {
    slices: ArrayVec<FileVolatileSlice<'a>, MAX_DESCRIPTORS>,
    next: usize,
    remaining: usize,
}

impl<'a> GuestBuffers<'a> {
    fn new() -> Self {
        GuestBuffers {
            slices: ArrayVec::new(),
            next: 0,
            remaining: 0,
        }
    }

    /// `None` when a segment is not inside one guest memory region (the general path splits
    /// such buffers).
    fn fill(
        &mut self,
        mem: &'a GuestMemoryMmap,
        segments: &[Segment],
        skip: usize,
        limit: usize,
    ) -> Option<()> {
        let mut skip = skip;
        for segment in segments {
            if self.remaining == limit {
                break;
            }
            let len = segment.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let take = (len - skip).min(limit - self.remaining);
            let addr = GuestAddress(segment.addr.0.checked_add(skip as u64)?);
            let slice = mem.get_slice(addr, take).ok()?;
            self.slices
                .try_push(FileVolatileSlice::from_volatile_slice(&slice))
                .ok()?;
            self.remaining += take;
            skip = 0;
        }
        Some(())
    }

    /// Runs `f` on the unconsumed bytes, at most `count` of them, then consumes what `f` says
    /// it used.
    fn consume_with(
        &mut self,
        count: usize,
        f: impl FnOnce(&[FileVolatileSlice<'a>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        if count == 0 || self.remaining == 0 {
            return Ok(0);
        }
        let used = if count >= self.remaining {
            // The usual case: everything left, handed over as it is.
            f(&self.slices[self.next..])?
        } else {
            let mut prefix: ArrayVec<FileVolatileSlice<'a>, MAX_DESCRIPTORS> = ArrayVec::new();
            let mut left = count;
            for slice in &self.slices[self.next..] {
                if left == 0 {
                    break;
                }
                let take = slice.len().min(left);
                let part = slice
                    .as_volatile_slice()
                    .subslice(0, take)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                prefix.push(FileVolatileSlice::from_volatile_slice(&part));
                left -= take;
            }
            f(&prefix)?
        };
        self.consume(used);
        Ok(used)
    }

    fn consume(&mut self, count: usize) {
        let mut count = count.min(self.remaining);
        self.remaining -= count;
        while count > 0 && self.next < self.slices.len() {
            let here = self.slices[self.next].len();
            if count < here {
                if let Ok(rest) = self.slices[self.next].offset(count) {
                    self.slices[self.next] = rest;
                }
                return;
            }
            count -= here;
            self.next += 1;
        }
    }
}

impl ZeroCopyWriter for GuestBuffers<'_> {
    fn write_from(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        self.consume_with(count, |bufs| f.read_vectored_at_volatile(bufs, off))
    }

    fn available_bytes(&self) -> usize {
        self.remaining
    }
}

impl io::Write for GuestBuffers<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.consume_with(buf.len(), |bufs| {
            let mut done = 0;
            for slice in bufs {
                done += slice
                    .as_volatile_slice()
                    .write(&buf[done..done + slice.len()], 0)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            Ok(done)
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyReader for GuestBuffers<'_> {
    fn read_to(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        self.consume_with(count, |bufs| f.write_vectored_at_volatile(bufs, off))
    }
}

impl io::Read for GuestBuffers<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.consume_with(buf.len(), |bufs| {
            let mut done = 0;
            for slice in bufs {
                done += slice
                    .as_volatile_slice()
                    .read(&mut buf[done..done + slice.len()], 0)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            Ok(done)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_passthrough::{Config, PassthroughFs};
    use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
    use std::ffi::CString;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const MEMORY: usize = 8 << 20;
    /// Request headers and arguments live here; data buffers from `DATA`.
    const REQUEST: u64 = 0x10_0000;
    const REPLY_HEADER: u64 = 0x11_0000;
    const DATA: u64 = 0x20_0000;
    const FILE_LEN: usize = 3 << 20;

    struct Harness {
        _dir: tempfile::TempDir,
        server: FsServer,
        nodeid: u64,
        fh: u64,
        content: Vec<u8>,
    }

    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..FILE_LEN).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(dir.path().join("data"), &content).unwrap();
        let fs = PassthroughFs::new(Config {
            root_dir: dir.path().to_owned(),
            ..Config::default()
        })
        .unwrap();
        let ctx = Context::new();
        let name = CString::new("data").unwrap();
        let nodeid = fs.lookup(&ctx, 1, &name).unwrap().inode;
        let (fh, _, _) = fs.open(&ctx, nodeid, libc::O_RDWR as u32, 0).unwrap();
        Harness {
            _dir: dir,
            server: FsServer::new(fs),
            nodeid,
            fh: fh.unwrap(),
            content,
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap()
    }

    fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn in_header(opcode: u32, nodeid: u64, body: usize) -> InHeader {
        InHeader {
            len: (size_of::<InHeader>() + body) as u32,
            opcode,
            unique: 77,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            ..Default::default()
        }
    }

    /// Puts the request in guest memory as an InHeader descriptor and an argument descriptor.
    fn request_descs(mem: &GuestMemoryMmap, header: InHeader, args: &[u8]) -> Vec<RawDescriptor> {
        mem.write_slice(header.as_slice(), GuestAddress(REQUEST))
            .unwrap();
        let args_at = REQUEST + 0x100;
        mem.write_slice(args, GuestAddress(args_at)).unwrap();
        vec![
            desc(REQUEST, size_of::<InHeader>() as u32, false),
            desc(args_at, args.len() as u32, false),
        ]
    }

    fn read_request(
        h: &Harness,
        mem: &GuestMemoryMmap,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Vec<RawDescriptor> {
        let args = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        request_descs(
            mem,
            in_header(OPCODE_READ, h.nodeid, size_of::<ReadIn>()),
            args.as_slice(),
        )
    }

    /// `count` writable 4 KiB pages, scattered backwards through memory like a guest's pinned
    /// user pages, after a 16-byte reply header descriptor.
    fn scattered_reply(count: usize) -> Vec<RawDescriptor> {
        let mut descs = vec![desc(REPLY_HEADER, size_of::<OutHeader>() as u32, true)];
        for page in (0..count).rev() {
            descs.push(desc(DATA + (page as u64) * 2 * 4096, 4096, true));
        }
        descs
    }

    /// The reply bytes the chain's writable descriptors hold, in order.
    fn reply_bytes(mem: &GuestMemoryMmap, descs: &[RawDescriptor], len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for d in descs.iter().map(|d| SplitDescriptor::from(*d)) {
            if d.flags() & VRING_DESC_F_WRITE as u16 == 0 || out.len() >= len {
                continue;
            }
            let n = (d.len() as usize).min(len - out.len());
            let mut buf = vec![0u8; n];
            mem.read_slice(&mut buf, d.addr()).unwrap();
            out.extend_from_slice(&buf);
        }
        out
    }

    fn clear_writable(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) {
        for d in descs.iter().map(|d| SplitDescriptor::from(*d)) {
            if d.flags() & VRING_DESC_F_WRITE as u16 != 0 {
                mem.write_slice(&vec![0u8; d.len() as usize], d.addr())
                    .unwrap();
            }
        }
    }

    /// Serves `descs` through the fast path and then through the general one; returns both
    /// replies (length and bytes). `None` for the fast path when it declined.
    fn serve_both(
        h: &Harness,
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> (Option<Vec<u8>>, Vec<u8>) {
        let queue = MockSplitQueue::new(mem, 512);
        let chain = queue.build_desc_chain(descs).unwrap();
        let mut layout = ChainLayout::new();
        layout.walk(&chain, None).unwrap();
        clear_writable(mem, descs);
        let fast =
            try_serve(&h.server, mem, &layout).map(|len| reply_bytes(mem, descs, len as usize));
        clear_writable(mem, descs);
        let reader = Reader::from_descriptor_chain(mem, chain.clone()).unwrap();
        let writer = VirtioFsWriter::new(mem, chain).unwrap();
        let len = h
            .server
            .handle_message(reader, writer.into(), None)
            .unwrap();
        (fast, reply_bytes(mem, descs, len))
    }

    fn out_header(reply: &[u8]) -> OutHeader {
        *OutHeader::from_slice(&reply[..size_of::<OutHeader>()]).unwrap()
    }

    #[test]
    fn read_into_scattered_pages_answers_as_the_general_path() {
        let h = harness();
        let mem = memory();
        for (offset, pages) in [(8192u64, 1usize), (5000, 3), (0, 256)] {
            let size = (pages * 4096) as u32;
            let mut descs = read_request(&h, &mem, h.fh, offset, size);
            descs.extend(scattered_reply(pages));
            let (fast, general) = serve_both(&h, &mem, &descs);
            let fast = fast.expect("the fast path serves a READ of up to 1 MiB");
            assert_eq!(fast, general, "READ of {size} bytes at {offset}");
            let header = out_header(&fast);
            assert_eq!((header.error, header.unique), (0, 77));
            assert_eq!(header.len as usize, size_of::<OutHeader>() + size as usize);
            let start = offset as usize;
            assert_eq!(
                &fast[size_of::<OutHeader>()..],
                &h.content[start..start + size as usize]
            );
        }
    }

    #[test]
    fn short_reads_and_errors_answer_as_the_general_path() {
        let h = harness();
        let mem = memory();
        // Past the end of the file: a short read, then an empty one.
        for offset in [(FILE_LEN - 100) as u64, FILE_LEN as u64 + 4096] {
            let mut descs = read_request(&h, &mem, h.fh, offset, 4096);
            descs.extend(scattered_reply(1));
            let (fast, general) = serve_both(&h, &mem, &descs);
            assert_eq!(fast.as_ref(), Some(&general));
        }
        // A reply buffer smaller than the request is the general path's to refuse.
        let mut descs = read_request(&h, &mem, h.fh, 0, 3 * 4096);
        descs.extend(scattered_reply(2));
        let (fast, general) = serve_both(&h, &mem, &descs);
        assert!(fast.is_none());
        assert_ne!(out_header(&general).error, 0);
        // A handle that does not exist.
        let mut descs = read_request(&h, &mem, h.fh + 1000, 0, 4096);
        descs.extend(scattered_reply(1));
        let (fast, general) = serve_both(&h, &mem, &descs);
        assert_eq!(fast.as_ref(), Some(&general));
        assert_eq!(out_header(&general).error, -libc::EBADF);
    }

    #[test]
    fn write_from_split_buffers_answers_as_the_general_path() {
        let h = harness();
        let mem = memory();
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let args = WriteIn {
            fh: h.fh,
            offset: 4096 * 3 + 17,
            size: payload.len() as u32,
            ..Default::default()
        };
        let header = in_header(OPCODE_WRITE, h.nodeid, size_of::<WriteIn>() + payload.len());
        let mut descs = request_descs(&mem, header, args.as_slice());
        // The payload in three pieces of uneven size.
        let mut at = 0;
        for (i, len) in [1000usize, 4096, 4904].into_iter().enumerate() {
            let addr = DATA + (i as u64) * 0x2000;
            mem.write_slice(&payload[at..at + len], GuestAddress(addr))
                .unwrap();
            descs.push(desc(addr, len as u32, false));
            at += len;
        }
        descs.push(desc(REPLY_HEADER, 64, true));
        let (fast, general) = serve_both(&h, &mem, &descs);
        let fast = fast.expect("the fast path serves a WRITE");
        assert_eq!(fast, general);
        assert_eq!(
            out_header(&fast).len as usize,
            size_of::<OutHeader>() + size_of::<WriteOut>()
        );
        let out = WriteOut::from_slice(&fast[size_of::<OutHeader>()..]).unwrap();
        assert_eq!(out.size as usize, payload.len());
        let on_disk = std::fs::read(h._dir.path().join("data")).unwrap();
        let start = args.offset as usize;
        assert_eq!(&on_disk[start..start + payload.len()], &payload[..]);
    }

    #[test]
    fn unusual_chains_are_left_to_the_general_path() {
        let h = harness();
        let mem = memory();
        // More descriptors than the layout holds.
        let mut descs = read_request(&h, &mem, h.fh, 0, 300 * 512);
        descs.push(desc(REPLY_HEADER, size_of::<OutHeader>() as u32, true));
        for i in 0..300u64 {
            descs.push(desc(DATA + i * 1024, 512, true));
        }
        let (fast, general) = serve_both(&h, &mem, &descs);
        assert!(
            fast.is_none(),
            "an overlong chain is not served by the fast path"
        );
        assert_eq!(&general[size_of::<OutHeader>()..], &h.content[..300 * 512]);
        // WRITE claiming more data than the chain carries.
        let args = WriteIn {
            fh: h.fh,
            size: 8192,
            ..Default::default()
        };
        let header = in_header(OPCODE_WRITE, h.nodeid, size_of::<WriteIn>() + 8192);
        let mut descs = request_descs(&mem, header, args.as_slice());
        descs.push(desc(DATA, 4096, false));
        descs.push(desc(REPLY_HEADER, 64, true));
        let (fast, _) = serve_both(&h, &mem, &descs);
        assert!(
            fast.is_none(),
            "a WRITE short of its data goes the general way"
        );
        // Other opcodes (GETATTR).
        let header = in_header(3, h.nodeid, 16);
        let mut descs = request_descs(&mem, header, &[0u8; 16]);
        descs.push(desc(REPLY_HEADER, 256, true));
        let (fast, general) = serve_both(&h, &mem, &descs);
        assert!(fast.is_none());
        assert_eq!(out_header(&general).error, 0);
    }

    #[test]
    fn a_buffer_across_guest_memory_regions_is_not_served() {
        let h = harness();
        // Two regions meeting at 4 MiB; a reply page straddles the boundary.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 4 << 20),
            (GuestAddress(4 << 20), 4 << 20),
        ])
        .unwrap();
        let mut descs = read_request(&h, &mem, h.fh, 0, 4096);
        descs.push(desc(REPLY_HEADER, size_of::<OutHeader>() as u32, true));
        descs.push(desc((4 << 20) - 2048, 4096, true));
        let queue = MockSplitQueue::new(&mem, 16);
        let chain = queue.build_desc_chain(&descs).unwrap();
        let mut layout = ChainLayout::new();
        layout.walk(&chain, None).unwrap();
        assert!(try_serve(&h.server, &mem, &layout).is_none());
        // The general path's writer refuses it too, and the request is dropped, as before.
        assert!(VirtioFsWriter::new(&mem, chain).is_err());
    }

    #[test]
    fn malformed_chains_are_refused_by_the_walk() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 16);
        // A readable descriptor after a writable one.
        let chain = queue
            .build_desc_chain(&[
                desc(REQUEST, 64, false),
                desc(DATA, 64, true),
                desc(DATA + 4096, 64, false),
            ])
            .unwrap();
        let mut layout = ChainLayout::new();
        assert!(layout.walk(&chain, None).is_err());
        // A head marked INDIRECT and NEXT.
        let chain = queue.build_desc_chain(&[desc(REQUEST, 64, false)]).unwrap();
        let flags = (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT) as u16;
        assert!(ChainLayout::new().walk(&chain, Some(flags)).is_err());
    }
}
