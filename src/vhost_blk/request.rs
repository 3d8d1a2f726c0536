//! One virtio-blk request (virtio 1.2, 5.2.6) in one descriptor chain: the untrusted edge
//! of the vhost-user-blk device.
//!
//! A chain is a byte stream: a 16-byte header (type, reserved, sector) at the start of its
//! device-readable part, the data (device-readable for writes, device-writable for reads),
//! and a status byte at the very end of its device-writable part. How the guest cuts that
//! stream into descriptors is its business, so nothing here assumes one descriptor per
//! field. Every request is checked with [`target::validate`] before the target sees it;
//! data moves between the target's host files and guest memory with `preadv`/`pwritev`
//! straight into the guest's buffers. A malformed chain gets `VIRTIO_BLK_S_IOERR` in its
//! status byte when it has one this module can write, and is returned with nothing written
//! otherwise; nothing here panics on what the guest wrote.

use std::io;
use std::ops::Deref;
use std::os::fd::RawFd;
use std::sync::Arc;

use berth_blockdev::target::{self, Op};
use berth_blockdev::{BlockError, BlockTarget, Completion, Extent, ReadMapping, ReadPin, Source};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Guest memory as the device maps it (no dirty-page log: the device does not migrate).
pub type BlkMemory = GuestMemoryMmap<()>;

/// A guest buffer in host memory.
type GuestSlice<'m> = VolatileSlice<'m, ()>;

/// Sectors are 512 bytes whatever the block size (virtio 1.2, 5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a request header: type, reserved, sector.
const HEADER_LEN: usize = 16;
/// Bytes of one DISCARD / WRITE_ZEROES segment: sector, sector count, flags.
const RANGE_LEN: usize = 16;
/// The one flag a WRITE_ZEROES segment may carry (DISCARD none).
const RANGE_FLAG_UNMAP: u32 = 1;
/// Length of the serial number GET_ID returns.
pub const SERIAL_LEN: usize = 20;
/// At most this many segments per DISCARD / WRITE_ZEROES (advertised in the config space).
pub const MAX_RANGES: u32 = 32;
/// At most this many sectors per DISCARD / WRITE_ZEROES segment (advertised, 1 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// `preadv`/`pwritev` take at most IOV_MAX buffers per call.
const IOV_MAX: usize = 1024;

/// What the device does about a request, fixed at start-up.
#[derive(Debug, Clone)]
pub struct RequestPolicy {
    /// The serial number GET_ID returns, NUL-padded.
    pub serial: [u8; SERIAL_LEN],
    /// DISCARD is offered (VIRTIO_BLK_F_DISCARD).
    pub discard: bool,
    /// WRITE_ZEROES is offered (VIRTIO_BLK_F_WRITE_ZEROES).
    pub write_zeroes: bool,
}

impl RequestPolicy {
    /// The policy for `target`: DISCARD and WRITE_ZEROES as far as it serves them and is
    /// writable.
    pub fn for_target(target: &dyn BlockTarget, serial: &str) -> Self {
        let info = target.info();
        let mut bytes = [0u8; SERIAL_LEN];
        let len = serial.len().min(SERIAL_LEN);
        bytes[..len].copy_from_slice(&serial.as_bytes()[..len]);
        Self {
            serial: bytes,
            discard: info.discard && !info.read_only,
            write_zeroes: info.write_zeroes && !info.read_only,
        }
    }
}

/// How a chain was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// What goes in the used ring: bytes written into the chain's device-writable buffers.
    pub used_len: u32,
    /// The status byte written, or `None` when the chain had nowhere to put one.
    pub status: Option<u8>,
    /// The request type from the header, when the header could be read.
    pub request_type: Option<u32>,
    /// For the device's metrics: the block operation and the bytes it covered (`None` for
    /// GET_ID, unknown types and chains too malformed to have a type).
    pub metered: Option<(Op, u64)>,
    /// A well-formed request left for later ([`Step::First`]): nothing was written into
    /// the chain; serve it again with [`Step::Resumed`] once what it waits for is done.
    pub deferred: Option<Waiting>,
}

/// What a request left for later waits for.
#[derive(Debug, Clone)]
pub enum Waiting {
    /// A FLUSH: a flush of the target started after it was taken off the ring.
    Flush,
    /// A READ: the target fetching its missing data (`BlockTarget::start_read`).
    Read(Arc<Completion>),
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Waiting::Flush, Waiting::Flush) => true,
            (Waiting::Read(a), Waiting::Read(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Waiting {}

/// Which time [`serve_chain_with`] sees a chain.
#[derive(Debug, Clone, Copy)]
pub enum Step<'r> {
    /// Taken off the ring: a well-formed FLUSH, and a READ whose data the target must
    /// fetch first, are answered as `deferred` (malformed ones get their error at once).
    First,
    /// What the deferred request waited for finished with this outcome: a FLUSH is
    /// answered with it; a READ is served, or gets the error.
    Resumed(&'r Result<(), String>),
}

/// The block operation of a virtio-blk request type, for metrics.
fn metered_op(request_type: u32) -> Option<Op> {
    match request_type {
        VIRTIO_BLK_T_IN => Some(Op::Read),
        VIRTIO_BLK_T_OUT => Some(Op::Write { fua: false }),
        VIRTIO_BLK_T_FLUSH => Some(Op::Flush),
        VIRTIO_BLK_T_DISCARD => Some(Op::Discard),
        VIRTIO_BLK_T_WRITE_ZEROES => Some(Op::WriteZeroes),
        _ => None,
    }
}

/// Why a request failed, as the status byte says it.
#[derive(Debug)]
enum Failure {
    /// VIRTIO_BLK_S_IOERR, with why (for the log).
    Io(String),
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupported(String),
}

impl Failure {
    fn status(&self) -> u8 {
        match self {
            Failure::Io(_) => VIRTIO_BLK_S_IOERR as u8,
            Failure::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }

    fn describe(&self) -> &str {
        match self {
            Failure::Io(why) | Failure::Unsupported(why) => why,
        }
    }
}

impl From<BlockError> for Failure {
    fn from(err: BlockError) -> Self {
        let why = format!("{err:#}");
        match err {
            BlockError::Unsupported(_) => Failure::Unsupported(why),
            _ => Failure::Io(why),
        }
    }
}

/// A chain's buffers in host memory, in order, split by direction.
#[derive(Default)]
struct Buffers<'m> {
    readable: Vec<GuestSlice<'m>>,
    writable: Vec<GuestSlice<'m>>,
    readable_len: u64,
    writable_len: u64,
    /// Why the chain is malformed, if it is.
    fault: Option<&'static str>,
    /// The last non-empty device-writable buffer could not be mapped: the status byte,
    /// which ends it, has nowhere to go.
    last_writable_lost: bool,
}

impl<'m> Buffers<'m> {
    fn walk<M>(chain: &DescriptorChain<M>, mem: &'m BlkMemory) -> Self
    where
        M: Deref + Clone,
        M::Target: vm_memory::GuestMemory,
    {
        let mut buffers = Buffers::default();
        let mut descriptors = 0usize;
        let mut last_has_next = false;
        for desc in chain.clone() {
            descriptors += 1;
            let writable = desc.is_write_only();
            if !writable && !buffers.writable.is_empty() {
                buffers
                    .fault
                    .get_or_insert("a device-readable buffer follows a device-writable one");
                continue;
            }
            last_has_next = desc.has_next();
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            let mut pieces = Vec::new();
            let mut mapped = true;
            for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
                match slice {
                    Ok(slice) => pieces.push(slice),
                    Err(_) => {
                        mapped = false;
                        break;
                    }
                }
            }
            if !mapped {
                buffers
                    .fault
                    .get_or_insert("a buffer lies outside guest memory");
                if writable {
                    buffers.last_writable_lost = true;
                }
                continue;
            }
            if writable {
                buffers.last_writable_lost = false;
                buffers.writable_len += len as u64;
                buffers.writable.extend(pieces);
            } else {
                buffers.readable_len += len as u64;
                buffers.readable.extend(pieces);
            }
        }
        if descriptors == 0 {
            buffers.fault.get_or_insert("its head cannot be read");
        } else if last_has_next {
            buffers.fault.get_or_insert(
                "it does not end (a loop, a next index out of range or an unreadable descriptor)",
            );
        }
        buffers
    }

    /// Writes `status` into the last byte of the device-writable part, if there is one.
    fn write_status(&self, status: u8) -> bool {
        if self.last_writable_lost {
            return false;
        }
        let Some(last) = self.writable.iter().rev().find(|s| !s.is_empty()) else {
            return false;
        };
        match last.subslice(last.len() - 1, 1) {
            Ok(byte) => {
                byte.copy_from(&[status]);
                true
            }
            Err(_) => false,
        }
    }
}

/// The slices covering bytes `[start, start + len)` of `slices` taken as one stream.
fn sub_slices<'m>(
    slices: &[GuestSlice<'m>],
    start: u64,
    len: u64,
) -> Result<Vec<GuestSlice<'m>>, Failure> {
    let mut out = Vec::new();
    let mut skip = start;
    let mut left = len;
    for slice in slices {
        if left == 0 {
            break;
        }
        let here = slice.len() as u64;
        if skip >= here {
            skip -= here;
            continue;
        }
        let take = (here - skip).min(left);
        let piece = slice
            .subslice(skip as usize, take as usize)
            .map_err(|e| Failure::Io(format!("cannot address a guest buffer: {e}")))?;
        out.push(piece);
        left -= take;
        skip = 0;
    }
    if left > 0 {
        return Err(Failure::Io("the chain is shorter than its request".into()));
    }
    Ok(out)
}

/// Copies the first `buf.len()` bytes of the stream `slices` into `buf`.
fn read_stream(slices: &[GuestSlice<'_>], start: u64, buf: &mut [u8]) -> Result<(), Failure> {
    let mut at = 0usize;
    for piece in sub_slices(slices, start, buf.len() as u64)? {
        let end = at + piece.len();
        piece.copy_to(&mut buf[at..end]);
        at = end;
    }
    Ok(())
}

/// Moves all bytes between `fd` at `offset` and `slices` (read: file into guest memory).
fn transfer(fd: RawFd, slices: &[GuestSlice<'_>], offset: u64, read: bool) -> io::Result<()> {
    let mut iovecs: Vec<libc::iovec> = slices
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect();
    let mut first = 0usize;
    let mut offset = offset;
    while first < iovecs.len() {
        let batch = &iovecs[first..iovecs.len().min(first + IOV_MAX)];
        let file_offset = i64::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        // SAFETY: every iovec describes a slice of mapped guest memory that stays mapped while
        // the caller holds the memory guard; the guest may change it concurrently, which only
        // changes the data moved. `batch` holds at most IOV_MAX entries.
        let done = unsafe {
            if read {
                libc::preadv(fd, batch.as_ptr(), batch.len() as i32, file_offset)
            } else {
                libc::pwritev(fd, batch.as_ptr(), batch.len() as i32, file_offset)
            }
        };
        if done < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if done == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the backing file ended early",
            ));
        }
        let mut done = done as usize;
        offset += done as u64;
        while done > 0 && first < iovecs.len() {
            let iov = &mut iovecs[first];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: `done` is less than the buffer's length: the pointer stays inside it.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

/// Fills `slices` with zeros.
fn zero_fill(slices: &[GuestSlice<'_>]) {
    const ZEROS: [u8; 4096] = [0; 4096];
    for slice in slices {
        let mut at = 0;
        while at < slice.len() {
            let n = (slice.len() - at).min(ZEROS.len());
            if let Ok(piece) = slice.subslice(at, n) {
                piece.copy_from(&ZEROS[..n]);
            }
            at += n;
        }
    }
}

/// The byte offset of `sector`, if it has one.
fn sector_offset(sector: u64) -> Result<u64, Failure> {
    sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| Failure::Io(format!("sector {sector} is beyond any device")))
}

/// Serves the request in `chain` against `target` and writes its status byte, a FLUSH as
/// `flush` says. Never panics on what the guest put in the chain.
pub fn serve_chain_with<M>(
    target: &dyn BlockTarget,
    policy: &RequestPolicy,
    chain: &DescriptorChain<M>,
    mem: &BlkMemory,
    step: Step<'_>,
) -> Answered
where
    M: Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let buffers = Buffers::walk(chain, mem);
    let mut header = [0u8; HEADER_LEN];
    let request_type = if buffers.readable_len >= HEADER_LEN as u64 {
        read_stream(&buffers.readable, 0, &mut header)
            .ok()
            .map(|()| u32::from_le_bytes([header[0], header[1], header[2], header[3]]))
    } else {
        None
    };
    // A READ whose fetch failed gets that error.
    let failed_fetch = match step {
        Step::Resumed(Err(why)) => Some(why),
        _ => None,
    };
    let outcome = match (buffers.fault, request_type) {
        (Some(fault), _) => Err(Failure::Io(format!("malformed descriptor chain: {fault}"))),
        (None, None) => Err(Failure::Io(
            "the chain has no 16-byte request header".into(),
        )),
        (None, Some(_)) if buffers.writable_len == 0 => Err(Failure::Io(
            "the chain has no device-writable status byte".into(),
        )),
        (None, Some(VIRTIO_BLK_T_FLUSH)) => match step {
            Step::First => return Answered::deferred(request_type, Waiting::Flush),
            Step::Resumed(outcome) => outcome
                .as_ref()
                .map(|()| (0, 0))
                .map_err(|e| Failure::Io(e.clone())),
        },
        (None, Some(VIRTIO_BLK_T_IN)) if failed_fetch.is_some() => {
            Err(Failure::Io(failed_fetch.cloned().unwrap_or_default()))
        }
        (None, Some(request_type)) => {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&header[8..16]);
            let sector = u64::from_le_bytes(sector);
            if request_type == VIRTIO_BLK_T_IN && matches!(step, Step::First) {
                match map_or_fetch(target, &buffers, sector) {
                    Ok(ReadStart::Fetching(completion)) => {
                        return Answered::deferred(Some(request_type), Waiting::Read(completion))
                    }
                    Ok(ReadStart::Serve(mapped)) => {
                        serve(target, policy, &buffers, request_type, sector, mapped)
                    }
                    Err(failure) => Err(failure),
                }
            } else {
                serve(target, policy, &buffers, request_type, sector, None)
            }
        }
    };
    let op = request_type.and_then(metered_op);
    let (status, written, covered) = match outcome {
        Ok((written, covered)) => (VIRTIO_BLK_S_OK as u8, written, covered),
        Err(failure) => {
            tracing::debug!(
                request_type,
                "Answering a virtio-blk request with status {}: {}.",
                failure.status(),
                failure.describe()
            );
            // Reads may have filled part of their buffers: report them as written.
            let written = match request_type {
                Some(VIRTIO_BLK_T_IN) => buffers.writable_len.saturating_sub(1),
                _ => 0,
            };
            (failure.status(), written, 0)
        }
    };
    let metered = op.map(|op| (op, covered));
    if buffers.write_status(status) {
        Answered {
            used_len: u32::try_from(written + 1).unwrap_or(u32::MAX),
            status: Some(status),
            request_type,
            metered,
            deferred: None,
        }
    } else {
        tracing::warn!(
            request_type,
            "Returning a virtio-blk descriptor chain with no room for a status byte."
        );
        Answered {
            used_len: 0,
            status: None,
            request_type,
            metered,
            deferred: None,
        }
    }
}

impl Answered {
    /// A request left for later: nothing written, nothing on the used ring yet.
    fn deferred(request_type: Option<u32>, waiting: Waiting) -> Self {
        Answered {
            used_len: 0,
            status: None,
            request_type,
            metered: None,
            deferred: Some(waiting),
        }
    }
}

/// A READ's mapping, taken before it is served: its extents and the pin that keeps them.
type MappedRead = (ReadPin, Vec<Extent>);

/// What a READ's first look at the target found.
enum ReadStart {
    /// Serve it now, with its mapping when the target gave one.
    Serve(Option<MappedRead>),
    /// The target is fetching its data: serve it once this completes.
    Fetching(Arc<Completion>),
}

/// Has the target map a READ whose data is local, or start fetching it without blocking.
/// A READ the device would refuse gets its error from [`serve`], as any other.
fn map_or_fetch(
    target: &dyn BlockTarget,
    buffers: &Buffers<'_>,
    sector: u64,
) -> Result<ReadStart, Failure> {
    let room = buffers.writable_len - 1;
    let Ok(offset) = sector_offset(sector) else {
        return Ok(ReadStart::Serve(None));
    };
    if room == 0 || target::validate(target.info(), Op::Read, offset, room).is_err() {
        return Ok(ReadStart::Serve(None));
    }
    let mut extents = Vec::new();
    match target.map_read_or_fetch(offset, room, &mut extents)? {
        ReadMapping::Mapped(pin) => Ok(ReadStart::Serve(Some((pin, extents)))),
        ReadMapping::Fetching(completion) => Ok(ReadStart::Fetching(completion)),
    }
}

/// Serves a well-formed chain; returns the data bytes written into the guest's buffers
/// (before the status byte) and the bytes of the device the request covered.
fn serve(
    target: &dyn BlockTarget,
    policy: &RequestPolicy,
    buffers: &Buffers<'_>,
    request_type: u32,
    sector: u64,
    mapped: Option<MappedRead>,
) -> Result<(u64, u64), Failure> {
    let info = target.info();
    // The status byte is the last writable one; what precedes it is room for data.
    let room = buffers.writable_len - 1;
    let payload = buffers.readable_len - HEADER_LEN as u64;
    match request_type {
        VIRTIO_BLK_T_IN => {
            let offset = sector_offset(sector)?;
            target::validate(info, Op::Read, offset, room)?;
            let slices = sub_slices(&buffers.writable, 0, room)?;
            read_into(target, offset, room, &slices, mapped)?;
            Ok((room, room))
        }
        VIRTIO_BLK_T_OUT => {
            if info.read_only {
                return Err(Failure::Io("the device is read-only".into()));
            }
            let offset = sector_offset(sector)?;
            target::validate(info, Op::Write { fua: false }, offset, payload)?;
            let slices = sub_slices(&buffers.readable, HEADER_LEN as u64, payload)?;
            write_from(target, offset, payload, &slices)?;
            Ok((0, payload))
        }
        VIRTIO_BLK_T_GET_ID => {
            let len = room.min(SERIAL_LEN as u64);
            let slices = sub_slices(&buffers.writable, 0, len)?;
            let mut at = 0usize;
            for slice in &slices {
                slice.copy_from(&policy.serial[at..at + slice.len()]);
                at += slice.len();
            }
            Ok((len, 0))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            let offered = if discard {
                policy.discard
            } else {
                policy.write_zeroes
            };
            if !offered {
                return Err(Failure::Unsupported(format!(
                    "{} is not offered on this device",
                    if discard { "DISCARD" } else { "WRITE_ZEROES" }
                )));
            }
            let covered = serve_ranges(target, buffers, payload, discard)?;
            Ok((0, covered))
        }
        other => Err(Failure::Unsupported(format!(
            "request type {other} is not supported"
        ))),
    }
}

/// Reads `[offset, offset + len)` of the target into `slices` (which hold `len` bytes),
/// through `mapped` when the READ was mapped at its first look, otherwise mapping it now.
fn read_into(
    target: &dyn BlockTarget,
    offset: u64,
    len: u64,
    slices: &[GuestSlice<'_>],
    mapped: Option<MappedRead>,
) -> Result<(), Failure> {
    if len == 0 {
        return Ok(());
    }
    let (_pin, extents) = match mapped {
        Some(mapped) => mapped,
        None => {
            let mut extents = Vec::new();
            let pin = target.map_read_pinned(offset, len, &mut extents)?;
            (pin, extents)
        }
    };
    let mut at = 0u64;
    for extent in extents {
        let pieces = sub_slices(slices, at, extent.len)
            .map_err(|_| Failure::Io("the target mapped more than was asked".into()))?;
        match extent.source {
            Source::Zero => zero_fill(&pieces),
            Source::File { fd, offset } => transfer(fd, &pieces, offset, true).map_err(|e| {
                Failure::Io(format!(
                    "reading {} bytes at {offset} of the backing file: {e}",
                    extent.len
                ))
            })?,
        }
        at += extent.len;
    }
    Ok(())
}

/// Writes `len` bytes from `slices` at `offset` of the target and settles the write.
fn write_from(
    target: &dyn BlockTarget,
    offset: u64,
    len: u64,
    slices: &[GuestSlice<'_>],
) -> Result<(), Failure> {
    if len == 0 {
        return Ok(());
    }
    let mut extents = Vec::new();
    let ticket = target.map_write(offset, len, &mut extents)?;
    let mut at = 0u64;
    let mut outcome = Ok(());
    for extent in extents {
        let pieces = match sub_slices(slices, at, extent.len) {
            Ok(pieces) => pieces,
            Err(_) => {
                outcome = Err(Failure::Io("the target mapped more than was asked".into()));
                break;
            }
        };
        if let Source::File { fd, offset } = extent.source {
            if let Err(e) = transfer(fd, &pieces, offset, false) {
                outcome = Err(Failure::Io(format!(
                    "writing {} bytes at {offset} of the backing file: {e}",
                    extent.len
                )));
                break;
            }
        }
        at += extent.len;
    }
    let written = outcome.is_ok();
    let settled = target
        .start_finish_write(ticket, written, false)
        .wait()
        .map_err(Failure::from);
    outcome.and(settled)
}

/// DISCARD or WRITE_ZEROES: a table of segments after the header.
fn serve_ranges(
    target: &dyn BlockTarget,
    buffers: &Buffers<'_>,
    payload: u64,
    discard: bool,
) -> Result<u64, Failure> {
    if payload == 0 || !payload.is_multiple_of(RANGE_LEN as u64) {
        return Err(Failure::Io(format!(
            "a segment table of {payload} bytes is not whole 16-byte segments"
        )));
    }
    let count = payload / RANGE_LEN as u64;
    if count > u64::from(MAX_RANGES) {
        return Err(Failure::Io(format!(
            "{count} segments exceed the {MAX_RANGES} advertised"
        )));
    }
    let mut table = vec![0u8; payload as usize];
    read_stream(&buffers.readable, HEADER_LEN as u64, &mut table)?;
    // All segments are checked before any is applied.
    let mut ranges = Vec::with_capacity(count as usize);
    for segment in table.chunks_exact(RANGE_LEN) {
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&segment[0..8]);
        let sector = u64::from_le_bytes(sector);
        let sectors = u32::from_le_bytes([segment[8], segment[9], segment[10], segment[11]]);
        let flags = u32::from_le_bytes([segment[12], segment[13], segment[14], segment[15]]);
        let allowed = if discard { 0 } else { RANGE_FLAG_UNMAP };
        if flags & !allowed != 0 {
            return Err(Failure::Unsupported(format!(
                "segment flags {flags:#x} are not supported"
            )));
        }
        if sectors > MAX_RANGE_SECTORS {
            return Err(Failure::Io(format!(
                "a segment of {sectors} sectors exceeds the {MAX_RANGE_SECTORS} advertised"
            )));
        }
        let offset = sector_offset(sector)?;
        let len = u64::from(sectors) * SECTOR_SIZE;
        let op = if discard {
            Op::Discard
        } else {
            Op::WriteZeroes
        };
        target::validate(target.info(), op, offset, len)?;
        ranges.push((offset, len));
    }
    let mut covered = 0u64;
    for (offset, len) in ranges {
        if len == 0 {
            continue;
        }
        if discard {
            target.discard(offset, len)?;
        } else {
            target.write_zeroes(offset, len)?;
        }
        covered += len;
    }
    Ok(covered)
}
