//! The interface every block target implements, and the request semantics shared by all
//! transports.
//!
//! A target does not move data itself: it says *where* the bytes of a request live
//! ([`BlockTarget::map_read`], [`BlockTarget::map_write`]) as extents of host files, so
//! that each transport moves them its own way (io_uring with the kernel's registered
//! request buffer for ublk zero-copy, `preadv` into guest memory for vhost-user-blk,
//! plain `pread` here in [`read_at`]). Metadata work — fetching an image's chunks,
//! allocating overlay clusters, making writes durable — stays in the target.
//!
//! A target with a write path of its own (an object-storage volume) implements the same
//! trait: `map_write` hands out extents of its local log, `finish_write` records them,
//! `flush` makes them durable. Such a target may move data that a read mapped (a log
//! segment retired once uploaded, a cache block evicted): transports take reads through
//! [`BlockTarget::map_read_pinned`] and hold the returned [`ReadPin`] until the bytes have
//! moved. And its durable point may be slow (an upload): transports start FLUSH and FUA
//! writes with [`BlockTarget::start_flush`] and [`BlockTarget::start_finish_write`], which
//! may answer [`Progress::Pending`] with a [`Completion`] to wait on instead of blocking
//! the thread that serves every other request of the queue.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{BlockError, IoContext, Result};

/// What a target is, as the transports need to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    /// Device size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Logical block size: every request is aligned to it.
    pub block_size: u32,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// DISCARD is meaningful (it frees space); otherwise it is refused.
    pub discard: bool,
    /// WRITE_ZEROES is served.
    pub write_zeroes: bool,
    /// A short description for logs and `berth block list` (`raw:/path`, `image:<id>`, …).
    pub description: String,
}

/// Where a piece of a request's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `len` bytes of the file `fd` at `offset`. The descriptor stays valid as long as
    /// the target lives.
    File { fd: RawFd, offset: u64 },
    /// Reads as zeros; nothing to transfer.
    Zero,
}

/// One piece of a request, in request order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub source: Source,
}

/// A write in progress: what [`BlockTarget::map_write`] allocated, to be settled with
/// [`BlockTarget::finish_write`] once the data is written (or failed to be).
#[derive(Debug, Default)]
pub struct WriteTicket {
    /// Target-private description of what to record (e.g. new overlay clusters).
    pub(crate) allocations: Vec<(u64, u64)>,
}

impl WriteTicket {
    /// A write that allocates nothing (written in place).
    pub fn in_place() -> Self {
        Self::default()
    }

    /// A ticket carrying a target's own description of what it allocated, as pairs of
    /// numbers only that target interprets (targets outside this crate build theirs here).
    pub fn with_allocations(allocations: Vec<(u64, u64)>) -> Self {
        Self { allocations }
    }

    /// What [`Self::with_allocations`] was given.
    pub fn allocations(&self) -> &[(u64, u64)] {
        &self.allocations
    }
}

/// Keeps the bytes a read was mapped to where they are until it is dropped: a target
/// that moves data (retires a log segment, evicts a cache block) waits for the pins taken
/// before the move. Targets whose extents never move hand out [`ReadPin::none`].
#[derive(Default)]
pub struct ReadPin(Vec<Box<dyn Send>>);

impl std::fmt::Debug for ReadPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadPin({} held)", self.0.len())
    }
}

impl ReadPin {
    /// Nothing to hold.
    pub fn none() -> Self {
        Self::default()
    }

    /// Holds `guard` until the pin is dropped.
    pub fn new(guard: impl Send + 'static) -> Self {
        Self(vec![Box::new(guard)])
    }

    /// Holds what `other` holds too (a layered target pinning its base's extents).
    pub fn join(&mut self, other: ReadPin) {
        self.0.extend(other.0);
    }
}

/// A request a target finishes on another thread (a FLUSH waiting for an upload). The
/// transport waits until [`Completion::raw_fd`], an eventfd, becomes readable (for
/// example with an io_uring read of 8 bytes on it), or blocks in [`Completion::wait`],
/// and then takes the outcome with [`Completion::take`].
pub struct Completion {
    event: OwnedFd,
    state: Mutex<CompletionState>,
    done: Condvar,
}

/// Something to call once a [`Completion`] finishes (a transport's wake-up).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct CompletionState {
    finished: bool,
    /// The outcome, until taken.
    outcome: Option<Result<()>>,
    /// Called once when finished.
    wakers: Vec<Waker>,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("fd", &self.event.as_raw_fd())
            .field("finished", &self.is_complete())
            .finish_non_exhaustive()
    }
}

impl Completion {
    /// A completion not finished yet.
    pub fn new() -> Result<Arc<Self>> {
        // SAFETY: eventfd has no memory arguments; the descriptor it returns is owned here.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(BlockError::Io {
                context: "creating an eventfd for a pending request".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Arc::new(Self {
            // SAFETY: `fd` was just returned by eventfd and nothing else owns it.
            event: unsafe { OwnedFd::from_raw_fd(fd) },
            state: Mutex::new(CompletionState::default()),
            done: Condvar::new(),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CompletionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finishes the request with `outcome` (only the first call counts) and wakes the
    /// transport.
    pub fn complete(&self, outcome: Result<()>) {
        let mut state = self.state();
        if state.finished {
            return;
        }
        state.finished = true;
        state.outcome = Some(outcome);
        let wakers = std::mem::take(&mut state.wakers);
        drop(state);
        for wake in wakers {
            wake();
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from `one`, alive across the call, to our eventfd. It
        // cannot fail short of a counter overflow, which one write per completion rules out.
        unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        self.done.notify_all();
    }

    /// Calls `wake` once the request is finished: at once if it already is. For a
    /// transport that waits for many requests on one event of its own rather than on each
    /// request's eventfd.
    pub fn on_complete(&self, wake: Waker) {
        let mut state = self.state();
        if !state.finished {
            state.wakers.push(wake);
            return;
        }
        drop(state);
        wake();
    }

    /// A completion that finishes once every one of `parts` has: with the first error
    /// among them, or success. Takes the parts' outcomes.
    pub fn all_of(parts: Vec<Arc<Completion>>) -> Result<Arc<Self>> {
        let all = Self::new()?;
        // (parts not finished yet, the first error)
        let left = Arc::new(Mutex::new((parts.len(), None::<BlockError>)));
        if parts.is_empty() {
            all.complete(Ok(()));
        }
        for part in parts {
            let (all, left, this) = (all.clone(), left.clone(), part.clone());
            part.on_complete(Arc::new(move || {
                let outcome = this.take().unwrap_or(Ok(()));
                let mut left = left.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(err) = outcome {
                    left.1.get_or_insert(err);
                }
                left.0 -= 1;
                if left.0 == 0 {
                    let outcome = left.1.take().map_or(Ok(()), Err);
                    drop(left);
                    all.complete(outcome);
                }
            }));
        }
        Ok(all)
    }

    /// The eventfd that becomes readable once the request is finished.
    pub fn raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Whether [`Self::complete`] was called.
    pub fn is_complete(&self) -> bool {
        self.state().finished
    }

    /// The outcome, once finished (taken: a second call gets `None`).
    pub fn take(&self) -> Option<Result<()>> {
        self.state().outcome.take()
    }

    /// Blocks until the request is finished and returns its outcome (an error if it was
    /// already taken).
    pub fn wait(&self) -> Result<()> {
        let mut state = self.state();
        while !state.finished {
            state = self.done.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.outcome.take().unwrap_or_else(|| {
            Err(BlockError::UblkSetup(
                "the outcome of a pending request was taken twice".into(),
            ))
        })
    }
}

/// Where a lazily fetching target's fetch thread answers a read: a caller blocked on a
/// channel, or the completion of a read a transport started with
/// [`BlockTarget::start_read`]. `E` is the target's error type. Dropped unanswered (its
/// fetch threads gone), a pending reply still finishes its read, with `gone`; after an
/// answer that does nothing (only a completion's first outcome counts).
pub enum FetchReply<E> {
    Blocked(std::sync::mpsc::Sender<std::result::Result<(), E>>),
    Pending {
        completion: Arc<Completion>,
        into_block: fn(E) -> BlockError,
        gone: fn() -> BlockError,
    },
}

impl<E> FetchReply<E> {
    /// Answers the read with `outcome`.
    pub fn send(&self, outcome: std::result::Result<(), E>) {
        match self {
            FetchReply::Blocked(sender) => {
                let _ = sender.send(outcome);
            }
            FetchReply::Pending {
                completion,
                into_block,
                ..
            } => completion.complete(outcome.map_err(into_block)),
        }
    }
}

impl<E> Drop for FetchReply<E> {
    fn drop(&mut self) {
        if let FetchReply::Pending {
            completion, gone, ..
        } = self
        {
            completion.complete(Err(gone()));
        }
    }
}

/// Where a request a target may finish later stands.
#[derive(Debug)]
pub enum Progress {
    /// Finished on the spot.
    Done(Result<()>),
    /// Finished later: wait on the completion.
    Pending(Arc<Completion>),
}

impl Progress {
    /// Blocks until finished (for callers with no I/O loop of their own).
    pub fn wait(self) -> Result<()> {
        match self {
            Progress::Done(outcome) => outcome,
            Progress::Pending(completion) => completion.wait(),
        }
    }
}

/// What [`BlockTarget::map_read_or_fetch`] did with a read.
#[derive(Debug)]
pub enum ReadMapping {
    /// The data is local: its extents are mapped, valid while the pin is held.
    Mapped(ReadPin),
    /// Some of it is being fetched: map the read once this completes.
    Fetching(Arc<Completion>),
}

/// A block target: raw file or device, lazily fetched image, copy-on-write overlay.
pub trait BlockTarget: Send + Sync {
    /// Size, block size and capabilities.
    fn info(&self) -> &TargetInfo;

    /// Appends to `out` the extents holding `[offset, offset + len)`, making their data
    /// present first (a lazily fetched image fetches the missing chunks here). The
    /// extents stay valid as long as the target lives; a target that cannot promise that
    /// refuses here and serves [`Self::map_read_pinned`].
    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()>;

    /// [`Self::map_read`] for targets that move data: the extents stay valid while the
    /// returned pin is held. Transports read through this and drop the pin once the
    /// bytes have moved. Default: `map_read`, nothing to pin.
    fn map_read_pinned(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<ReadPin> {
        self.map_read(offset, len, out).map(|()| ReadPin::none())
    }

    /// Makes the data of `[offset, offset + len)` local without blocking the caller: a
    /// lazily fetched target with blocks missing hands them to its fetch threads and
    /// answers [`Progress::Pending`]; otherwise [`Progress::Done`]. Transports serving
    /// many requests on one thread call this before mapping a read, so that one read
    /// waiting for the network does not hold up the others. The mapping still fetches
    /// whatever went missing in between (eviction), blocking then. Default: nothing to
    /// fetch.
    fn start_read(&self, _offset: u64, _len: u64) -> Progress {
        Progress::Done(Ok(()))
    }

    /// A read's mapping when its data is local ([`ReadMapping::Mapped`], extents in
    /// `out`), otherwise its fetch started ([`ReadMapping::Fetching`], `out` untouched):
    /// after that completes the caller maps the read with [`Self::map_read_pinned`]. What
    /// transports call first for every read, so a target that finds both answers in one
    /// look overrides it. Default: [`Self::start_read`], then the mapping when done.
    fn map_read_or_fetch(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<ReadMapping> {
        match self.start_read(offset, len) {
            Progress::Done(outcome) => {
                outcome?;
                self.map_read_pinned(offset, len, out)
                    .map(ReadMapping::Mapped)
            }
            Progress::Pending(completion) => Ok(ReadMapping::Fetching(completion)),
        }
    }

    /// Appends to `out` the file extents the data of `[offset, offset + len)` is to be
    /// written to (all [`Source::File`]), allocating space where needed. The caller
    /// writes the data and then calls [`Self::finish_write`] with the ticket.
    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<WriteTicket>;

    /// Settles a write: on success makes the written data visible to later reads (the
    /// new location survives a crash of this process), on failure releases what was
    /// allocated. With `fua` the write is durable when this returns.
    fn finish_write(&self, ticket: WriteTicket, written: bool, fua: bool) -> Result<()>;

    /// [`Self::finish_write`] without blocking the caller on slow durability work: a
    /// target whose FUA means an upload answers [`Progress::Pending`]. Transports serving
    /// many requests on one thread settle writes through this. Default: `finish_write`
    /// on the spot.
    fn start_finish_write(&self, ticket: WriteTicket, written: bool, fua: bool) -> Progress {
        Progress::Done(self.finish_write(ticket, written, fua))
    }

    /// Makes every completed write durable on the backing store.
    fn flush(&self) -> Result<()>;

    /// [`Self::flush`] without blocking the caller: a target whose flush waits for other
    /// threads (a group commit, an upload) answers [`Progress::Pending`], so that the
    /// transport's I/O loop keeps serving the requests the flush may itself be waiting
    /// for. Default: `flush` on the spot.
    fn start_flush(&self) -> Progress {
        Progress::Done(self.flush())
    }

    /// The range's contents become unspecified and its space may be freed.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// The range reads as zeros afterwards.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Extra Prometheus lines for this target (cache hits and misses of an image), each
    /// metric name given, labels excluded: `(name, help, value)`.
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }
}

/// A request a transport received, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write { fua: bool },
    Flush,
    Discard,
    WriteZeroes,
}

impl Op {
    /// Name used in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
        }
    }
}

/// Checks a request against the target: inside the device, block aligned, allowed on
/// it. Every transport calls this before anything else, so no target sees a request
/// that fails it.
pub fn validate(info: &TargetInfo, op: Op, offset: u64, len: u64) -> Result<()> {
    if op == Op::Flush {
        return Ok(());
    }
    let end = offset.checked_add(len);
    if end.is_none_or(|end| end > info.size) {
        return Err(BlockError::OutOfRange {
            offset,
            len,
            size: info.size,
        });
    }
    let block = u64::from(info.block_size);
    if !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
        return Err(BlockError::Misaligned {
            offset,
            len,
            block_size: info.block_size,
        });
    }
    match op {
        Op::Read => Ok(()),
        _ if info.read_only => Err(BlockError::ReadOnly),
        Op::Discard if !info.discard => Err(BlockError::Unsupported("discard")),
        Op::WriteZeroes if !info.write_zeroes => Err(BlockError::Unsupported("write zeroes")),
        _ => Ok(()),
    }
}

pub(crate) fn file_of(fd: RawFd) -> std::mem::ManuallyDrop<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: the descriptor belongs to a target that outlives this call (extents are
    // only valid while their target lives); ManuallyDrop keeps it from being closed.
    std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// [`BlockTarget::map_read_or_fetch`], waiting for a fetch it starts and then mapping the
/// read: for callers with no I/O loop of their own.
pub fn map_read_waiting(
    target: &dyn BlockTarget,
    offset: u64,
    len: u64,
    out: &mut Vec<Extent>,
) -> Result<ReadPin> {
    match target.map_read_or_fetch(offset, len, out)? {
        ReadMapping::Mapped(pin) => Ok(pin),
        ReadMapping::Fetching(completion) => {
            completion.wait()?;
            target.map_read_pinned(offset, len, out)
        }
    }
}

/// Reads `buf.len()` bytes at `offset` through `target` with plain `pread`s.
pub fn read_at(target: &dyn BlockTarget, offset: u64, buf: &mut [u8]) -> Result<()> {
    validate(target.info(), Op::Read, offset, buf.len() as u64)?;
    let mut extents = Vec::new();
    let _pin = map_read_waiting(target, offset, buf.len() as u64, &mut extents)?;
    let mut at = 0usize;
    for extent in extents {
        let piece = buf
            .get_mut(at..at + extent.len as usize)
            .ok_or_else(|| BlockError::UblkSetup("the target mapped more than asked".into()))?;
        match extent.source {
            Source::Zero => piece.fill(0),
            Source::File { fd, offset } => {
                file_of(fd).read_exact_at(piece, offset).context(|| {
                    format!(
                        "reading {} bytes at {offset} of the backing file",
                        piece.len()
                    )
                })?
            }
        }
        at += extent.len as usize;
    }
    Ok(())
}

/// Writes `buf` at `offset` through `target` with plain `pwrite`s.
pub fn write_at(target: &dyn BlockTarget, offset: u64, buf: &[u8], fua: bool) -> Result<()> {
    validate(target.info(), Op::Write { fua }, offset, buf.len() as u64)?;
    let mut extents = Vec::new();
    let ticket = target.map_write(offset, buf.len() as u64, &mut extents)?;
    let mut at = 0usize;
    let mut outcome = Ok(());
    for extent in extents {
        let Some(piece) = buf.get(at..at + extent.len as usize) else {
            outcome = Err(BlockError::UblkSetup(
                "the target mapped more than asked".into(),
            ));
            break;
        };
        if let Source::File { fd, offset } = extent.source {
            outcome = file_of(fd).write_all_at(piece, offset).context(|| {
                format!(
                    "writing {} bytes at {offset} of the backing file",
                    piece.len()
                )
            });
            if outcome.is_err() {
                break;
            }
        }
        at += extent.len as usize;
    }
    let written = outcome.is_ok();
    let finished = target.start_finish_write(ticket, written, fua).wait();
    outcome.and(finished)
}

/// FLUSH through `target`, waiting for it to finish.
pub fn flush(target: &dyn BlockTarget) -> Result<()> {
    target.start_flush().wait()
}

/// DISCARD of `[offset, offset + len)` after validating it.
pub fn discard_at(target: &dyn BlockTarget, offset: u64, len: u64) -> Result<()> {
    validate(target.info(), Op::Discard, offset, len)?;
    target.discard(offset, len)
}

/// WRITE_ZEROES of `[offset, offset + len)` after validating it.
pub fn write_zeroes_at(target: &dyn BlockTarget, offset: u64, len: u64) -> Result<()> {
    validate(target.info(), Op::WriteZeroes, offset, len)?;
    target.write_zeroes(offset, len)
}

/// Shared handle to a target.
pub type SharedTarget = Arc<dyn BlockTarget>;

/// Appends `extent` to `out`, merging it with the last one when they are contiguous.
pub(crate) fn push_extent(out: &mut Vec<Extent>, extent: Extent) {
    if extent.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        match (&mut last.source, extent.source) {
            (Source::Zero, Source::Zero) => {
                last.len += extent.len;
                return;
            }
            (
                Source::File { fd, offset },
                Source::File {
                    fd: next_fd,
                    offset: next,
                },
            ) if *fd == next_fd && *offset + last.len == next => {
                last.len += extent.len;
                return;
            }
            _ => {}
        }
    }
    out.push(extent);
}
