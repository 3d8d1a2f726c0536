//! A FUSE client over one virtio-fs queue: request slots, submission, completion, typed ops.
//!
//! Each [`FsQueue`] owns its virtqueue and buffers and is meant to be driven by one thread;
//! queues share nothing but the (lock-free) guest memory mapping.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Address, ByteValued, Bytes, GuestAddress};

use crate::fuse::{
    self, opcode, parse_struct, AttrOut, BatchForgetIn, CreateIn, DirEntry, DirEntryPlus, ForgetIn,
    ForgetOne, GetattrIn, InHeader, InitIn, InitIn2, InitOut, LinkIn, MkdirIn, MknodIn, OpenIn,
    OpenOut, OutHeader, ReadIn, ReleaseIn, Rename2In, RenameIn, SetattrIn, WriteIn, WriteOut,
    IN_HEADER_SIZE, OUT_HEADER_SIZE,
};
use crate::memory::GuestRam;
use crate::virtqueue::{Buffer, RawDescriptor, SplitQueue, UsedElement};
use crate::Error;

pub use crate::abi::EntryOut;

/// Bytes reserved per slot for the request header and arguments (names included).
pub const REQUEST_AREA_SIZE: u32 = 4096;
/// Bytes reserved per slot for the reply header and small reply bodies.
pub const REPLY_AREA_SIZE: u32 = 4096;

/// Descriptors a request chain uses at most: header+args, payload, reply header, reply body.
pub const MAX_DESCRIPTORS_PER_REQUEST: u16 = 4;

/// Buffers of one outstanding request, carved out of guest memory once.
#[derive(Debug, Clone, Copy)]
struct Slot {
    request_area: GuestAddress,
    reply_area: GuestAddress,
    data_area: GuestAddress,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    slot: u16,
    unique: u64,
    opcode: u32,
    reply_body: Option<Buffer>,
    expects_reply: bool,
}

/// Identifies a submitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub unique: u64,
    pub head: u16,
}

/// A request to send: header fields plus the argument bytes that follow the header.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub opcode: u32,
    pub nodeid: u64,
    /// Concatenated after the header in one device-readable buffer (structs, names with NUL).
    pub args: &'a [&'a [u8]],
    /// Bulk data in its own device-readable buffer (WRITE payload), like a Linux guest does.
    pub payload: &'a [u8],
    /// Reply body capacity after the out header; `None` for requests without a reply (FORGET).
    pub reply_capacity: Option<u32>,
}

/// A reply the device returned.
#[derive(Debug, Clone)]
pub struct Completion {
    pub unique: u64,
    pub opcode: u32,
    /// The reply header; `None` for requests that have no reply.
    pub header: Option<OutHeader>,
    /// Reply body bytes (without the out header).
    pub body: Vec<u8>,
    /// Bytes the device reported in the used ring.
    pub used_len: u32,
}

impl Completion {
    /// Converts a FUSE error reply into [`Error::Fuse`].
    pub fn check(self) -> Result<Self, Error> {
        match self.header {
            Some(header) if header.error != 0 => Err(Error::Fuse {
                opcode: fuse::opcode_name(self.opcode),
                errno: -header.error,
            }),
            _ => Ok(self),
        }
    }
}

/// Per-queue settings.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Descriptor table entries (power of two).
    pub size: u16,
    /// Requests that may be outstanding at once (bounded by size / 4).
    pub depth: u16,
    /// Largest READ/WRITE/READDIR payload per request.
    pub max_data: u32,
    /// How long to wait for a reply before giving up.
    pub timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            size: 256,
            depth: 64,
            max_data: 128 * 1024,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Guest memory one queue needs for its rings and request slots (upper bound).
pub fn queue_memory_footprint(config: &QueueConfig) -> u64 {
    let rings = 3 * 4096 + 16 * u64::from(config.size) + 8 * u64::from(config.size);
    let slot =
        u64::from(REQUEST_AREA_SIZE) + u64::from(REPLY_AREA_SIZE) + page_align(config.max_data);
    rings + slot * u64::from(config.depth)
}

fn page_align(len: u32) -> u64 {
    (u64::from(len) + 4095) & !4095
}

/// A FUSE client over one virtio-fs queue.
pub struct FsQueue {
    vq: SplitQueue,
    ram: Arc<GuestRam>,
    config: QueueConfig,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    /// Indexed by head descriptor.
    pending: Vec<Option<Pending>>,
    next_unique: u64,
    ready: VecDeque<Completion>,
    raw_ready: VecDeque<UsedElement>,
    scratch: Vec<u8>,
    /// uid and gid put in the header of every request from now on (the guest caller).
    caller: (u32, u32),
}

impl FsQueue {
    /// Allocates the ring and `config.depth` request slots in guest memory.
    pub fn new(ram: Arc<GuestRam>, index: u16, config: QueueConfig) -> Result<Self, Error> {
        let most_outstanding = config.size / MAX_DESCRIPTORS_PER_REQUEST;
        if config.depth == 0 || config.depth > most_outstanding {
            return Err(Error::InvalidConfig(format!(
                "queue depth {} must be between 1 and {most_outstanding} for a queue of {} \
                 descriptors",
                config.depth, config.size
            )));
        }
        let vq = SplitQueue::new(ram.clone(), index, config.size)?;
        let mut slots = Vec::with_capacity(usize::from(config.depth));
        for _ in 0..config.depth {
            slots.push(Slot {
                request_area: ram.allocate(u64::from(REQUEST_AREA_SIZE), 4096)?,
                reply_area: ram.allocate(u64::from(REPLY_AREA_SIZE), 4096)?,
                data_area: ram.allocate(page_align(config.max_data).max(4096), 4096)?,
            });
        }
        Ok(Self {
            vq,
            ram,
            config,
            slots,
            free_slots: (0..config.depth).rev().collect(),
            pending: vec![None; usize::from(config.size)],
            // Like Linux, keep uniques even; tag them with the queue so they are unique
            // across queues without shared state.
            next_unique: (u64::from(index) << 48) + 2,
            ready: VecDeque::new(),
            raw_ready: VecDeque::new(),
            scratch: Vec::with_capacity(REQUEST_AREA_SIZE as usize),
            caller: (0, 0),
        })
    }

    /// Sends the requests submitted from now on as guest user `uid`, group `gid` (root, 0/0,
    /// until changed), the way a guest kernel fills `fuse_in_header` for its calling process.
    pub fn set_caller(&mut self, uid: u32, gid: u32) {
        self.caller = (uid, gid);
    }

    /// The uid and gid requests are sent as.
    pub fn caller(&self) -> (u32, u32) {
        self.caller
    }

    /// The vhost-user queue index (0 is hiprio, 1.. are request queues).
    pub fn index(&self) -> u16 {
        self.vq.index()
    }

    /// The underlying virtqueue driver (for raw tests).
    pub fn virtqueue(&mut self) -> &mut SplitQueue {
        &mut self.vq
    }

    /// The underlying virtqueue driver, read-only.
    pub fn virtqueue_ref(&self) -> &SplitQueue {
        &self.vq
    }

    /// The settings this queue was built with.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Guest memory shared by all queues.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Requests submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        usize::from(self.config.depth) - self.free_slots.len()
    }

    /// Whether another request can be submitted without waiting.
    pub fn has_room(&self) -> bool {
        !self.free_slots.is_empty()
    }

    /// Overrides the reply timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.config.timeout = timeout;
    }

    /// Writes a request into a free slot and publishes it, without kicking the device.
    pub fn submit(&mut self, request: &Request<'_>) -> Result<Ticket, Error> {
        self.submit_with_extlen(request, 0)
    }

    /// Like [`FsQueue::submit`], with the header's `total_extlen` (extension bytes / 8 at the
    /// end of the arguments) set.
    fn submit_with_extlen(
        &mut self,
        request: &Request<'_>,
        total_extlen: u16,
    ) -> Result<Ticket, Error> {
        let args_len: usize = request.args.iter().map(|a| a.len()).sum();
        let in_len = IN_HEADER_SIZE + args_len;
        if in_len > REQUEST_AREA_SIZE as usize {
            return Err(Error::InvalidRequest(format!(
                "{} arguments of {args_len} bytes exceed the {REQUEST_AREA_SIZE}-byte request area",
                fuse::opcode_name(request.opcode)
            )));
        }
        let payload_len = u32::try_from(request.payload.len())
            .ok()
            .filter(|len| *len <= self.config.max_data)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "payload of {} bytes exceeds max_data {}",
                    request.payload.len(),
                    self.config.max_data
                ))
            })?;
        let small_reply_room = REPLY_AREA_SIZE - OUT_HEADER_SIZE as u32;
        if let Some(capacity) = request.reply_capacity {
            let fits_small = capacity <= small_reply_room;
            let fits_data = capacity <= self.config.max_data && request.payload.is_empty();
            if !fits_small && !fits_data {
                return Err(Error::InvalidRequest(format!(
                    "reply capacity {capacity} does not fit the slot buffers"
                )));
            }
        }
        let slot_index = self.free_slots.pop().ok_or(Error::QueueFull {
            queue: self.index(),
            needed: 1,
            free: 0,
        })?;
        match self.write_and_publish(slot_index, request, in_len, payload_len, total_extlen) {
            Ok(ticket) => Ok(ticket),
            Err(err) => {
                self.free_slots.push(slot_index);
                Err(err)
            }
        }
    }

    fn write_and_publish(
        &mut self,
        slot_index: u16,
        request: &Request<'_>,
        in_len: usize,
        payload_len: u32,
        total_extlen: u16,
    ) -> Result<Ticket, Error> {
        let slot = self.slots[usize::from(slot_index)];
        let unique = self.next_unique;
        let total_len = u32::try_from(in_len)
            .unwrap_or(u32::MAX)
            .saturating_add(payload_len);
        let header = InHeader {
            len: total_len,
            opcode: request.opcode,
            unique,
            nodeid: request.nodeid,
            uid: self.caller.0,
            gid: self.caller.1,
            pid: std::process::id(),
            // Since FUSE 7.36 the low half is `total_extlen`.
            padding: u32::from(total_extlen),
        };
        self.scratch.clear();
        self.scratch.extend_from_slice(header.as_slice());
        for arg in request.args {
            self.scratch.extend_from_slice(arg);
        }
        let mem = self.ram.memory();
        mem.write_slice(&self.scratch, slot.request_area)?;
        let in_len = u32::try_from(in_len).unwrap_or(u32::MAX);
        let mut readable = [Buffer {
            addr: slot.request_area,
            len: in_len,
        }; 2];
        let mut readable_count = 1;
        if payload_len > 0 {
            mem.write_slice(request.payload, slot.data_area)?;
            readable[1] = Buffer {
                addr: slot.data_area,
                len: payload_len,
            };
            readable_count = 2;
        }
        let mut writable = [Buffer {
            addr: slot.reply_area,
            len: OUT_HEADER_SIZE as u32,
        }; 2];
        let mut writable_count = 0;
        let mut reply_body = None;
        if let Some(capacity) = request.reply_capacity {
            writable_count = 1;
            if capacity > 0 {
                let body_addr = if capacity <= REPLY_AREA_SIZE - OUT_HEADER_SIZE as u32 {
                    slot.reply_area.unchecked_add(OUT_HEADER_SIZE as u64)
                } else {
                    slot.data_area
                };
                let body = Buffer {
                    addr: body_addr,
                    len: capacity,
                };
                writable[1] = body;
                writable_count = 2;
                reply_body = Some(body);
            }
        }
        let head = self
            .vq
            .add_chain(&readable[..readable_count], &writable[..writable_count])?;
        self.pending[usize::from(head)] = Some(Pending {
            slot: slot_index,
            unique,
            opcode: request.opcode,
            reply_body,
            expects_reply: request.reply_capacity.is_some(),
        });
        self.next_unique += 2;
        Ok(Ticket { unique, head })
    }

    /// Kicks the device so it processes everything submitted so far.
    pub fn notify(&self) -> Result<(), Error> {
        self.vq.notify()
    }

    /// Returns the next completed request, waiting up to the queue timeout.
    pub fn next_completion(&mut self) -> Result<Completion, Error> {
        if let Some(done) = self.ready.pop_front() {
            return Ok(done);
        }
        loop {
            let used = self.vq.wait_used(self.config.timeout)?;
            if let Some(done) = self.complete(used)? {
                return Ok(done);
            }
        }
    }

    /// Like [`FsQueue::next_completion`], but fills `out` and reuses its body buffer, so a
    /// load generator does not allocate per request.
    pub fn next_completion_into(&mut self, out: &mut Completion) -> Result<(), Error> {
        if let Some(done) = self.ready.pop_front() {
            *out = done;
            return Ok(());
        }
        loop {
            let used = self.vq.wait_used(self.config.timeout)?;
            if self.complete_into(used, out)? {
                return Ok(());
            }
        }
    }

    /// Waits for the completion of one particular request; others are kept for later.
    pub fn wait_for(&mut self, ticket: Ticket) -> Result<Completion, Error> {
        if let Some(position) = self.ready.iter().position(|c| c.unique == ticket.unique) {
            if let Some(done) = self.ready.remove(position) {
                return Ok(done);
            }
        }
        loop {
            let used = self.vq.wait_used(self.config.timeout)?;
            if let Some(done) = self.complete(used)? {
                if done.unique == ticket.unique {
                    return Ok(done);
                }
                self.ready.push_back(done);
            }
        }
    }

    /// Submits, kicks and waits for one request.
    pub fn call(&mut self, request: &Request<'_>) -> Result<Completion, Error> {
        let ticket = self.submit(request)?;
        self.notify()?;
        self.wait_for(ticket)
    }

    /// Like [`FsQueue::call`], with request extensions (FUSE 7.36: e.g. a security context)
    /// after the arguments, announced in the header's `total_extlen`. `extensions` must be a
    /// multiple of 8 bytes long.
    pub fn call_with_extensions(
        &mut self,
        request: &Request<'_>,
        extensions: &[u8],
    ) -> Result<Completion, Error> {
        let units = u16::try_from(extensions.len() / 8)
            .ok()
            .filter(|_| extensions.len().is_multiple_of(8))
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "extensions of {} bytes are not a multiple of 8 below 512 KiB",
                    extensions.len()
                ))
            })?;
        let mut args: Vec<&[u8]> = request.args.to_vec();
        args.push(extensions);
        let extended = Request {
            args: &args,
            ..*request
        };
        let ticket = self.submit_with_extlen(&extended, units)?;
        self.notify()?;
        self.wait_for(ticket)
    }

    /// Sends any request and parses its reply body as a `T` (for opcodes without a typed
    /// method here).
    pub fn request_struct<T: ByteValued + Default>(
        &mut self,
        request: &Request<'_>,
    ) -> Result<T, Error> {
        self.reply_struct(request, fuse::opcode_name(request.opcode))
    }

    /// Sends any request whose reply has no body; a FUSE error becomes [`Error::Fuse`].
    pub fn request_empty(&mut self, request: &Request<'_>) -> Result<(), Error> {
        self.reply_empty(request)
    }

    /// Turns a used element into a completion; raw chains are queued for [`FsQueue::wait_raw`].
    fn complete(&mut self, used: UsedElement) -> Result<Option<Completion>, Error> {
        let mut out = Completion {
            unique: 0,
            opcode: 0,
            header: None,
            body: Vec::new(),
            used_len: 0,
        };
        Ok(self.complete_into(used, &mut out)?.then_some(out))
    }

    /// Fills `out` from a used element (reusing `out.body`); `false` for raw chains.
    fn complete_into(&mut self, used: UsedElement, out: &mut Completion) -> Result<bool, Error> {
        let Some(pending) = self
            .pending
            .get_mut(usize::from(used.head))
            .and_then(Option::take)
        else {
            self.raw_ready.push_back(used);
            return Ok(false);
        };
        self.free_slots.push(pending.slot);
        let slot = self.slots[usize::from(pending.slot)];
        out.unique = pending.unique;
        out.opcode = pending.opcode;
        out.header = None;
        out.body.clear();
        out.used_len = used.len;
        if !pending.expects_reply {
            return Ok(true);
        }
        if (used.len as usize) < OUT_HEADER_SIZE {
            return Err(Error::ShortReply {
                opcode: fuse::opcode_name(pending.opcode),
                unique: pending.unique,
                len: used.len,
            });
        }
        let mem = self.ram.memory();
        let header: OutHeader = mem.read_obj(slot.reply_area)?;
        if header.unique != pending.unique {
            return Err(Error::ReplyMismatch(format!(
                "{} reply carries unique {:#x}, expected {:#x}",
                fuse::opcode_name(pending.opcode),
                header.unique,
                pending.unique
            )));
        }
        if header.len != used.len {
            return Err(Error::ReplyMismatch(format!(
                "{} reply header says {} bytes but the used ring says {}",
                fuse::opcode_name(pending.opcode),
                header.len,
                used.len
            )));
        }
        let body_len = used.len as usize - OUT_HEADER_SIZE;
        if body_len > 0 {
            let Some(buffer) = pending.reply_body.filter(|b| b.len as usize >= body_len) else {
                return Err(Error::ReplyMismatch(format!(
                    "{} reply of {body_len} body bytes exceeds the buffer offered",
                    fuse::opcode_name(pending.opcode)
                )));
            };
            out.body.resize(body_len, 0);
            mem.read_slice(&mut out.body, buffer.addr)?;
        }
        out.header = Some(header);
        Ok(true)
    }

    // ----- raw API, for malformed-input tests -----

    /// Publishes a hand-crafted descriptor chain and kicks the device. Returns its head.
    pub fn submit_raw(&mut self, chain: &[RawDescriptor]) -> Result<u16, Error> {
        let head = self.vq.add_raw_chain(chain)?;
        self.vq.notify()?;
        Ok(head)
    }

    /// Waits up to `timeout` for the device to return the raw chain with head `head`.
    /// `Ok(None)` means the device did not return it in time (dropped, or still pending).
    pub fn wait_raw(&mut self, head: u16, timeout: Duration) -> Result<Option<UsedElement>, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(position) = self.raw_ready.iter().position(|u| u.head == head) {
                return Ok(self.raw_ready.remove(position));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.vq.wait_used(left) {
                Ok(used) => {
                    if let Some(done) = self.complete(used)? {
                        self.ready.push_back(done);
                    }
                }
                Err(Error::Timeout { .. }) => return Ok(None),
                Err(err) => return Err(err),
            }
        }
    }

    /// Allocates a scratch guest buffer for raw chains (never freed).
    pub fn allocate_raw_buffer(&self, len: u32) -> Result<GuestAddress, Error> {
        self.ram.allocate(u64::from(len.max(1)), 4096)
    }

    /// Writes a FUSE request header plus arguments at `addr` (for raw chains).
    pub fn write_request_bytes(
        &mut self,
        addr: GuestAddress,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
    ) -> Result<(u64, u32), Error> {
        let args_len: usize = args.iter().map(|a| a.len()).sum();
        let len = u32::try_from(IN_HEADER_SIZE + args_len).unwrap_or(u32::MAX);
        let unique = self.next_unique;
        self.next_unique += 2;
        let header = InHeader {
            len,
            opcode,
            unique,
            nodeid,
            uid: self.caller.0,
            gid: self.caller.1,
            pid: std::process::id(),
            padding: 0,
        };
        let mut bytes = header.as_slice().to_vec();
        for arg in args {
            bytes.extend_from_slice(arg);
        }
        self.ram.memory().write_slice(&bytes, addr)?;
        Ok((unique, len))
    }

    // ----- typed FUSE operations -----

    fn reply_struct<T: ByteValued + Default>(
        &mut self,
        request: &Request<'_>,
        what: &'static str,
    ) -> Result<T, Error> {
        let done = self.call(request)?.check()?;
        parse_struct(&done.body, false, what)
    }

    fn reply_empty(&mut self, request: &Request<'_>) -> Result<(), Error> {
        self.call(request)?.check().map(|_| ())
    }

    /// FUSE_INIT with the given flags; returns the daemon's answer.
    pub fn init(&mut self, flags: u64, max_readahead: u32) -> Result<InitOut, Error> {
        let init = InitIn {
            major: fuse::FUSE_KERNEL_VERSION,
            minor: fuse::FUSE_KERNEL_MINOR_VERSION,
            max_readahead,
            flags: flags as u32,
        };
        let init2 = InitIn2 {
            flags2: (flags >> 32) as u32,
            unused: [0; 11],
        };
        let request = Request {
            opcode: opcode::INIT,
            nodeid: 0,
            args: &[init.as_slice(), init2.as_slice()],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<InitOut>() as u32),
        };
        let done = self.call(&request)?.check()?;
        // Older daemons answer with a shorter InitOut; the tail then reads as zero.
        let reply: InitOut = parse_struct(&done.body, true, "INIT")?;
        if done.body.len() < 8 {
            return Err(Error::MalformedReply(format!(
                "INIT reply has {} bytes, too short for a version",
                done.body.len()
            )));
        }
        Ok(reply)
    }

    /// FUSE_INIT with [`fuse::init_flags::DEFAULT`].
    pub fn init_default(&mut self) -> Result<InitOut, Error> {
        self.init(fuse::init_flags::DEFAULT, 128 * 1024)
    }

    /// Looks up `name` in directory `parent`.
    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<EntryOut, Error> {
        let request = Request {
            opcode: opcode::LOOKUP,
            nodeid: parent,
            args: &[name, b"\0"],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<EntryOut>() as u32),
        };
        self.reply_struct(&request, "LOOKUP")
    }

    /// Drops `nlookup` references to `nodeid` (no reply; waits for the chain to come back).
    pub fn forget(&mut self, nodeid: u64, nlookup: u64) -> Result<(), Error> {
        let forget = ForgetIn { nlookup };
        let request = Request {
            opcode: opcode::FORGET,
            nodeid,
            args: &[forget.as_slice()],
            payload: &[],
            reply_capacity: None,
        };
        self.call(&request).map(|_| ())
    }

    /// Drops lookup references to many inodes in one BATCH_FORGET (no reply). `forgets` holds
    /// `(nodeid, nlookup)` pairs; at most [`FsQueue::MAX_BATCH_FORGET`] fit one request.
    pub fn batch_forget(&mut self, forgets: &[(u64, u64)]) -> Result<(), Error> {
        let request_bytes = Self::batch_forget_args(forgets)?;
        let request = Request {
            opcode: opcode::BATCH_FORGET,
            nodeid: 0,
            args: &[&request_bytes],
            payload: &[],
            reply_capacity: None,
        };
        self.call(&request).map(|_| ())
    }

    /// Most `(nodeid, nlookup)` pairs one BATCH_FORGET request carries here.
    pub const MAX_BATCH_FORGET: usize =
        (REQUEST_AREA_SIZE as usize - IN_HEADER_SIZE - 8) / std::mem::size_of::<ForgetOne>();

    /// The argument bytes of a BATCH_FORGET request (for pipelined use with `submit`).
    pub fn batch_forget_args(forgets: &[(u64, u64)]) -> Result<Vec<u8>, Error> {
        if forgets.len() > Self::MAX_BATCH_FORGET {
            return Err(Error::InvalidRequest(format!(
                "{} forgets exceed the {} one BATCH_FORGET carries",
                forgets.len(),
                Self::MAX_BATCH_FORGET
            )));
        }
        let header = BatchForgetIn {
            count: forgets.len() as u32,
            dummy: 0,
        };
        let mut bytes = header.as_slice().to_vec();
        for &(nodeid, nlookup) in forgets {
            bytes.extend_from_slice(ForgetOne { nodeid, nlookup }.as_slice());
        }
        Ok(bytes)
    }

    /// Attributes of `nodeid`.
    pub fn getattr(&mut self, nodeid: u64) -> Result<AttrOut, Error> {
        let getattr = GetattrIn::default();
        let request = Request {
            opcode: opcode::GETATTR,
            nodeid,
            args: &[getattr.as_slice()],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<AttrOut>() as u32),
        };
        self.reply_struct(&request, "GETATTR")
    }

    fn open_like(&mut self, op: u32, nodeid: u64, flags: u32) -> Result<OpenOut, Error> {
        let open = OpenIn {
            flags,
            fuse_flags: 0,
        };
        let request = Request {
            opcode: op,
            nodeid,
            args: &[open.as_slice()],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<OpenOut>() as u32),
        };
        self.reply_struct(&request, fuse::opcode_name(op))
    }

    /// Opens file `nodeid` with open(2) `flags`.
    pub fn open(&mut self, nodeid: u64, flags: u32) -> Result<OpenOut, Error> {
        self.open_like(opcode::OPEN, nodeid, flags)
    }

    /// Creates and opens `name` in `parent` with every CREATE field given.
    pub fn create_with(
        &mut self,
        parent: u64,
        name: &[u8],
        create: CreateIn,
    ) -> Result<(EntryOut, OpenOut), Error> {
        let entry_size = std::mem::size_of::<EntryOut>();
        let request = Request {
            opcode: opcode::CREATE,
            nodeid: parent,
            args: &[create.as_slice(), name, b"\0"],
            payload: &[],
            reply_capacity: Some((entry_size + std::mem::size_of::<OpenOut>()) as u32),
        };
        let done = self.call(&request)?.check()?;
        let entry: EntryOut = parse_struct(&done.body, false, "CREATE entry")?;
        let open: OpenOut = parse_struct(
            done.body.get(entry_size..).unwrap_or(&[]),
            false,
            "CREATE open",
        )?;
        Ok((entry, open))
    }

    /// Opens directory `nodeid`.
    pub fn opendir(&mut self, nodeid: u64) -> Result<OpenOut, Error> {
        self.open_like(opcode::OPENDIR, nodeid, libc::O_RDONLY as u32)
    }

    /// Creates and opens `name` in `parent`.
    pub fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: u32,
    ) -> Result<(EntryOut, OpenOut), Error> {
        self.create_with(
            parent,
            name,
            CreateIn {
                flags,
                mode,
                umask: 0,
                fuse_flags: 0,
            },
        )
    }

    /// Creates directory `name` in `parent`.
    pub fn mkdir(&mut self, parent: u64, name: &[u8], mode: u32) -> Result<EntryOut, Error> {
        let mkdir = MkdirIn { mode, umask: 0 };
        let request = Request {
            opcode: opcode::MKDIR,
            nodeid: parent,
            args: &[mkdir.as_slice(), name, b"\0"],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<EntryOut>() as u32),
        };
        self.reply_struct(&request, "MKDIR")
    }

    /// Removes file `name` from `parent`.
    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> Result<(), Error> {
        self.reply_empty(&Request {
            opcode: opcode::UNLINK,
            nodeid: parent,
            args: &[name, b"\0"],
            payload: &[],
            reply_capacity: Some(0),
        })
    }

    /// Removes directory `name` from `parent`.
    pub fn rmdir(&mut self, parent: u64, name: &[u8]) -> Result<(), Error> {
        self.reply_empty(&Request {
            opcode: opcode::RMDIR,
            nodeid: parent,
            args: &[name, b"\0"],
            payload: &[],
            reply_capacity: Some(0),
        })
    }

    /// Builds a READ request (for pipelined use with [`FsQueue::submit`]).
    pub fn read_in(fh: u64, offset: u64, size: u32) -> ReadIn {
        ReadIn {
            fh,
            offset,
            size,
            read_flags: 0,
            lock_owner: 0,
            flags: 0,
            padding: 0,
        }
    }

    /// Reads up to `size` bytes at `offset` from open file `fh` of `nodeid`.
    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Error> {
        let read = Self::read_in(fh, offset, size);
        let request = Request {
            opcode: opcode::READ,
            nodeid,
            args: &[read.as_slice()],
            payload: &[],
            reply_capacity: Some(size),
        };
        Ok(self.call(&request)?.check()?.body)
    }

    /// Writes `data` at `offset` to open file `fh` of `nodeid`; returns bytes written.
    pub fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Error> {
        self.write_with(nodeid, fh, offset, data, 0)
    }

    fn release_like(&mut self, op: u32, nodeid: u64, fh: u64, flags: u32) -> Result<(), Error> {
        let release = ReleaseIn {
            fh,
            flags,
            release_flags: 0,
            lock_owner: 0,
        };
        self.reply_empty(&Request {
            opcode: op,
            nodeid,
            args: &[release.as_slice()],
            payload: &[],
            reply_capacity: Some(0),
        })
    }

    /// Closes open file `fh`.
    pub fn release(&mut self, nodeid: u64, fh: u64, flags: u32) -> Result<(), Error> {
        self.release_like(opcode::RELEASE, nodeid, fh, flags)
    }

    /// FUSE_SETUPMAPPING: maps `len` bytes of `nodeid`'s file from `file_offset` at
    /// `window_offset` of the DAX window; `fh` is an open file, or `u64::MAX` for none (as a
    /// Linux guest sends); `flags` FUSE_SETUPMAPPING_FLAG_WRITE (1) and/or _READ (2).
    pub fn setupmapping(
        &mut self,
        nodeid: u64,
        fh: u64,
        file_offset: u64,
        len: u64,
        flags: u64,
        window_offset: u64,
    ) -> Result<(), Error> {
        let mut args = Vec::with_capacity(40);
        for field in [fh, file_offset, len, flags, window_offset] {
            args.extend_from_slice(&field.to_le_bytes());
        }
        self.reply_empty(&Request {
            opcode: opcode::SETUPMAPPING,
            nodeid,
            args: &[&args],
            payload: &[],
            reply_capacity: Some(0),
        })
    }

    /// FUSE_REMOVEMAPPING of `ranges` (window offset, length) of the DAX window.
    pub fn removemapping(&mut self, nodeid: u64, ranges: &[(u64, u64)]) -> Result<(), Error> {
        let mut args = Vec::with_capacity(8 + 16 * ranges.len());
        args.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        // fuse_removemapping_in is one u32; the ranges follow at once.
        for &(offset, len) in ranges {
            args.extend_from_slice(&offset.to_le_bytes());
            args.extend_from_slice(&len.to_le_bytes());
        }
        self.reply_empty(&Request {
            opcode: opcode::REMOVEMAPPING,
            nodeid,
            args: &[&args],
            payload: &[],
            reply_capacity: Some(0),
        })
    }

    /// FUSE_DESTROY: the guest unmounts.
    pub fn destroy(&mut self) -> Result<(), Error> {
        self.reply_empty(&Request {
            opcode: opcode::DESTROY,
            nodeid: 0,
            args: &[],
            payload: &[],
            reply_capacity: Some(0),
        })
    }

    /// Closes open directory `fh`.
    pub fn releasedir(&mut self, nodeid: u64, fh: u64) -> Result<(), Error> {
        self.release_like(opcode::RELEASEDIR, nodeid, fh, libc::O_RDONLY as u32)
    }

    /// One READDIRPLUS call: entries after `offset`, at most `size` reply bytes.
    pub fn readdirplus(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<DirEntryPlus>, Error> {
        let read = Self::read_in(fh, offset, size);
        let request = Request {
            opcode: opcode::READDIRPLUS,
            nodeid,
            args: &[read.as_slice()],
            payload: &[],
            reply_capacity: Some(size),
        };
        fuse::parse_direntplus(&self.call(&request)?.check()?.body)
    }

    /// One READDIR call: entries after `offset`, at most `size` reply bytes.
    pub fn readdir(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<DirEntry>, Error> {
        let read = Self::read_in(fh, offset, size);
        let request = Request {
            opcode: opcode::READDIR,
            nodeid,
            args: &[read.as_slice()],
            payload: &[],
            reply_capacity: Some(size),
        };
        fuse::parse_dirent(&self.call(&request)?.check()?.body)
    }

    /// Changes attributes of `nodeid` as `setattr` describes (its `valid` bits say which).
    pub fn setattr(&mut self, nodeid: u64, setattr: &SetattrIn) -> Result<AttrOut, Error> {
        let request = Request {
            opcode: opcode::SETATTR,
            nodeid,
            args: &[setattr.as_slice()],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<AttrOut>() as u32),
        };
        self.reply_struct(&request, "SETATTR")
    }

    /// The target of symlink `nodeid`.
    pub fn readlink(&mut self, nodeid: u64) -> Result<Vec<u8>, Error> {
        let request = Request {
            opcode: opcode::READLINK,
            nodeid,
            args: &[],
            payload: &[],
            reply_capacity: Some(REPLY_AREA_SIZE - OUT_HEADER_SIZE as u32),
        };
        Ok(self.call(&request)?.check()?.body)
    }

    /// Creates symlink `name` in `parent` pointing to `target`.
    pub fn symlink(&mut self, parent: u64, name: &[u8], target: &[u8]) -> Result<EntryOut, Error> {
        let request = Request {
            opcode: opcode::SYMLINK,
            nodeid: parent,
            args: &[name, b"\0", target, b"\0"],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<EntryOut>() as u32),
        };
        self.reply_struct(&request, "SYMLINK")
    }

    /// Creates node `name` in `parent` (`mode` carries the file type, `rdev` the device).
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> Result<EntryOut, Error> {
        let mknod = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        let request = Request {
            opcode: opcode::MKNOD,
            nodeid: parent,
            args: &[mknod.as_slice(), name, b"\0"],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<EntryOut>() as u32),
        };
        self.reply_struct(&request, "MKNOD")
    }

    /// Renames `oldname` in `olddir` to `newname` in `newdir` (FUSE_RENAME).
    pub fn rename(
        &mut self,
        olddir: u64,
        oldname: &[u8],
        newdir: u64,
        newname: &[u8],
    ) -> Result<(), Error> {
        let rename = RenameIn { newdir };
        self.reply_empty(&Request {
            opcode: opcode::RENAME,
            nodeid: olddir,
            args: &[rename.as_slice(), oldname, b"\0", newname, b"\0"],
            payload: &[],
            reply_capacity: Some(0),
        })
    }

    /// Like [`FsQueue::rename`] with renameat2 `flags` (FUSE_RENAME2).
    pub fn rename2(
        &mut self,
        olddir: u64,
        oldname: &[u8],
        newdir: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<(), Error> {
        let rename = Rename2In {
            newdir,
            flags,
            padding: 0,
        };
        self.reply_empty(&Request {
            opcode: opcode::RENAME2,
            nodeid: olddir,
            args: &[rename.as_slice(), oldname, b"\0", newname, b"\0"],
            payload: &[],
            reply_capacity: Some(0),
        })
    }

    /// Creates hard link `newname` in `newparent` to the inode `nodeid`.
    pub fn link(&mut self, nodeid: u64, newparent: u64, newname: &[u8]) -> Result<EntryOut, Error> {
        let link = LinkIn { oldnodeid: nodeid };
        let request = Request {
            opcode: opcode::LINK,
            nodeid: newparent,
            args: &[link.as_slice(), newname, b"\0"],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<EntryOut>() as u32),
        };
        self.reply_struct(&request, "LINK")
    }

    /// Opens `nodeid` with open(2) `flags` and FUSE open flags (e.g.
    /// [`fuse::kill_priv::OPEN_KILL_SUIDGID`]).
    pub fn open_with(
        &mut self,
        nodeid: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> Result<OpenOut, Error> {
        let open = OpenIn { flags, fuse_flags };
        let request = Request {
            opcode: opcode::OPEN,
            nodeid,
            args: &[open.as_slice()],
            payload: &[],
            reply_capacity: Some(std::mem::size_of::<OpenOut>() as u32),
        };
        self.reply_struct(&request, "OPEN")
    }

    /// Like [`FsQueue::write`] with FUSE write flags (e.g.
    /// [`fuse::kill_priv::WRITE_KILL_SUIDGID`]).
    pub fn write_with(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        write_flags: u32,
    ) -> Result<u32, Error> {
        let size = u32::try_from(data.len())
            .map_err(|_| Error::InvalidRequest("write payload exceeds 4 GiB".into()))?;
        let write = WriteIn {
            fh,
            offset,
            size,
            fuse_flags: write_flags,
            lock_owner: 0,
            flags: 0,
            padding: 0,
        };
        let request = Request {
            opcode: opcode::WRITE,
            nodeid,
            args: &[write.as_slice()],
            payload: data,
            reply_capacity: Some(std::mem::size_of::<WriteOut>() as u32),
        };
        let out: WriteOut = self.reply_struct(&request, "WRITE")?;
        Ok(out.size)
    }

    /// Lists a whole directory with OPENDIR + READDIRPLUS (until empty) + RELEASEDIR.
    pub fn list_dir_plus(&mut self, nodeid: u64) -> Result<Vec<DirEntryPlus>, Error> {
        let dir = self.opendir(nodeid)?;
        let mut all = Vec::new();
        let mut offset = 0;
        let chunk = self.config.max_data.min(64 * 1024);
        let result = loop {
            match self.readdirplus(nodeid, dir.fh, offset, chunk) {
                Ok(batch) if batch.is_empty() => break Ok(()),
                Ok(batch) => {
                    offset = batch.last().map(|e| e.offset).unwrap_or(offset);
                    all.extend(batch);
                }
                Err(err) => break Err(err),
            }
        };
        let released = self.releasedir(nodeid, dir.fh);
        result?;
        released?;
        Ok(all)
    }
}
