//! [`FsServer`]: berth's FUSE request dispatcher, the same for every transport.
//!
//! A transport hands [`FsServer::handle`] a request as readable [`IoSegment`]s and room for the
//! reply as writable ones, and gets back what was written ([`Served`]). It knows nothing of
//! virtqueues or /dev/fuse: the virtio transport passes guest memory it has checked, `berth
//! fuse` its own buffers, and a FUSE-over-io_uring transport would pass its ring buffers.
//!
//! Inside, a request goes: [`buffers`] (the only code that touches request and reply memory,
//! with checked lengths) → [`request`] (header, arguments, names) → one handler per opcode
//! (`entries`, `files`, `dirs`, `xattrs`, `locks`, `session`, `dax`) calling [`PassthroughFs`]
//! → [`reply`] (the reply header and body). READ and WRITE data move between the host file and
//! the segments with one `preadv`/`pwritev`, never through a buffer of berth's.
//!
//! Requests are decoded as fuse-backend-rs 0.14's server decoded them and answered with the
//! same errnos; where it dropped a request it could not decode, berth answers EINVAL. A bug
//! in a handler (a panic) costs that request only: it is answered EIO.

mod abi;
mod backing;
mod buffers;
mod dax;
mod dirs;
mod entries;
mod files;
mod locks;
mod reply;
mod request;
mod session;
mod xattrs;

use std::fmt;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use fuse_backend_rs::abi::fuse_abi::InHeader;

pub(crate) use abi::{init_flags, SETXATTR_ACL_KILL_SGID, XATTR_LIST_MAX, XATTR_SIZE_MAX};
pub use abi::{opcode, RemoveMappingOne, SetupMappingIn, MAX_BUFFER_SIZE};
pub use backing::{
    BackingFiles, BackingRegistrar, PassthroughError, PassthroughMode, FUSE_DEV_IOC_BACKING_CLOSE,
    FUSE_DEV_IOC_BACKING_OPEN,
};
pub use buffers::IoSegment;
pub(crate) use buffers::IOV_BATCH;
pub use dax::DaxWindow;
pub(crate) use request::SecContext;

use crate::fs::PassthroughFs;
use crate::lock_wait::WaitOutcome as lock_wait_outcome;
use abi::BUFFER_HEADER_SIZE;
use buffers::Cursor;
use reply::{Answer, Reply};
use request::Request;

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// A reply of this many bytes is at the start of the reply segments.
    Replied(usize),
    /// The request takes no reply (FORGET, BATCH_FORGET, INTERRUPT).
    NoReply,
    /// No reply could be written.
    Dropped(DropReason),
    /// A SETLKW whose wait was parked when its queue stopped ([`FsServer::park_lock_waits`]):
    /// its chain must not be returned; the wait resumes when the queue starts again
    /// ([`FsServer::resume_lock_wait`]), here or on a migration destination.
    Parked,
}

impl Served {
    /// Reply bytes written (0 when there is no reply).
    pub fn reply_len(self) -> usize {
        match self {
            Served::Replied(len) => len,
            Served::NoReply | Served::Dropped(_) | Served::Parked => 0,
        }
    }
}

/// Why a request got no reply although it should have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The request is too short to hold the part of the header with its unique id: a reply
    /// could not say which request it answers.
    HeaderUnreadable,
    /// The reply room cannot hold even a reply header.
    NoRoomForHeader,
    /// A reply longer than the reply room (only while writing it; an error reply is sent
    /// instead when a header fits).
    ReplyTooLong,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::HeaderUnreadable => "it is too short to say which request it is",
            DropReason::NoRoomForHeader => "its reply buffer cannot hold a reply header",
            DropReason::ReplyTooLong => "its reply buffer is too small for the reply",
        })
    }
}

/// Bytes of the request header up to and including `unique`: enough to answer a request.
const UNIQUE_END: usize = 16;

/// Dispatches FUSE requests to a [`PassthroughFs`].
pub struct FsServer {
    fs: Arc<PassthroughFs>,
    /// FUSE_INIT was answered and no DESTROY or reset came since.
    initialized: AtomicBool,
    /// Requests served per opcode (for the log at exit and the benchmarks); opcodes past the
    /// table (CUSE_INIT, garbage) are counted in `served_other`.
    served: [AtomicU64; SERVED_OPCODES],
    served_other: AtomicU64,
    /// FUSE passthrough's backing files, for a /dev/fuse transport that asked for it.
    backing: OnceLock<BackingFiles>,
    /// The transport offers the version table to the client (a virtio-fs device with
    /// shared-memory region 1): FUSE_INIT may negotiate the reply extension.
    versions_offered: AtomicBool,
    /// This session negotiated the version extension: replies with attributes carry it.
    versions_negotiated: AtomicBool,
    /// FUSE over io_uring as the transport asked for it ([`IO_URING_NOT_ASKED`] and co).
    io_uring_wanted: AtomicU8,
    /// What FUSE_INIT made of it ([`IoUringInit`] as a number).
    io_uring_init: AtomicU8,
}

/// `FUSE_OVER_IO_URING` in FUSE_INIT's 64-bit flags (`flags2` bit 9, Linux 6.14+): the
/// server fetches requests and commits replies through io_uring commands on /dev/fuse.
pub const INIT_OVER_IO_URING: u64 = 1 << 41;

const IO_URING_NOT_ASKED: u8 = 0;
const IO_URING_WANTED: u8 = 1;
const IO_URING_REQUIRED: u8 = 2;

/// What FUSE_INIT decided about FUSE over io_uring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoUringInit {
    /// No FUSE_INIT yet, or the transport did not ask for io_uring.
    Undecided,
    /// Negotiated: the client expects the server's ring entries.
    Enabled,
    /// The client did not offer `FUSE_OVER_IO_URING` (or `FUSE_INIT_EXT`).
    NotOffered,
}

/// The extension for what a request handed out of an inode (`own`) and of the directory it was
/// found in (`dir`); `current_generation` when neither says which generation they belong to.
fn version_ext_of(
    own: Option<crate::coherence::ReplyVersion>,
    dir: Option<crate::coherence::ReplyVersion>,
    current_generation: Option<u64>,
) -> berth_versions::wire::VersionExt {
    // The guest records one generation for the inode and the dentry: the older of the two,
    // so that anything read under an older generation counts as moved.
    let generation = match (own, dir) {
        (Some(o), Some(d)) => o.generation.min(d.generation),
        (Some(o), None) => o.generation,
        (None, Some(d)) => d.generation,
        (None, None) => current_generation.unwrap_or(0),
    };
    berth_versions::wire::VersionExt {
        slot: own.map_or(berth_versions::Slot::NONE, |o| o.slot.0),
        generation: generation as u32,
        version: own.map_or(0, |o| o.version),
        parent_version: dir.map_or(0, |d| d.version),
    }
}

/// Opcodes counted one by one: every FUSE opcode so far, with room to spare.
const SERVED_OPCODES: usize = 64;

impl FsServer {
    /// Serves `fs`.
    pub fn new(fs: PassthroughFs) -> Self {
        FsServer {
            fs: Arc::new(fs),
            initialized: AtomicBool::new(false),
            served: std::array::from_fn(|_| AtomicU64::new(0)),
            served_other: AtomicU64::new(0),
            backing: OnceLock::new(),
            versions_offered: AtomicBool::new(false),
            versions_negotiated: AtomicBool::new(false),
            io_uring_wanted: AtomicU8::new(IO_URING_NOT_ASKED),
            io_uring_init: AtomicU8::new(0),
        }
    }

    /// Lets FUSE_INIT negotiate FUSE over io_uring ([`INIT_OVER_IO_URING`]), for a /dev/fuse
    /// transport that will register ring entries once INIT is answered. `required`: refuse
    /// FUSE_INIT when the client does not offer it.
    pub fn offer_io_uring(&self, required: bool) {
        let wanted = if required {
            IO_URING_REQUIRED
        } else {
            IO_URING_WANTED
        };
        self.io_uring_wanted.store(wanted, Ordering::Release);
    }

    /// What the last FUSE_INIT decided about FUSE over io_uring.
    pub fn io_uring_init(&self) -> IoUringInit {
        match self.io_uring_init.load(Ordering::Acquire) {
            1 => IoUringInit::Enabled,
            2 => IoUringInit::NotOffered,
            _ => IoUringInit::Undecided,
        }
    }

    /// Negotiates FUSE over io_uring for a client that offered `capable`: the flags to enable,
    /// or an error when it is required and not offered.
    fn negotiate_io_uring(&self, capable: u64) -> io::Result<u64> {
        let wanted = self.io_uring_wanted.load(Ordering::Acquire);
        if wanted == IO_URING_NOT_ASKED {
            return Ok(0);
        }
        let offered = capable & INIT_OVER_IO_URING != 0 && capable & abi::init_flags::INIT_EXT != 0;
        let (state, enabled) = match offered {
            true => (
                IoUringInit::Enabled,
                INIT_OVER_IO_URING | abi::init_flags::INIT_EXT,
            ),
            false => (IoUringInit::NotOffered, 0),
        };
        self.io_uring_init.store(
            match state {
                IoUringInit::Enabled => 1,
                _ => 2,
            },
            Ordering::Release,
        );
        if !offered && wanted == IO_URING_REQUIRED {
            tracing::error!(
                "Refusing FUSE_INIT: --io-uring always, but the kernel did not offer \
                 FUSE_OVER_IO_URING."
            );
            return Err(io::Error::from_raw_os_error(libc::EPROTO));
        }
        Ok(enabled)
    }

    /// Lets FUSE_INIT negotiate the version-table reply extension
    /// ([`berth_versions::wire::INIT_SHARED_VERSIONS`]): for a transport that gives the client
    /// the table (virtio-fs shared-memory region 1). `false` when the filesystem has no table.
    pub fn offer_shared_versions(&self) -> bool {
        let has_table = self.fs.version_table().is_some();
        self.versions_offered.store(has_table, Ordering::Release);
        has_table
    }

    /// Whether the current session negotiated the version-table reply extension.
    pub fn shared_versions_negotiated(&self) -> bool {
        self.versions_negotiated.load(Ordering::Acquire)
    }

    /// The reply extension for a reply about node `node` (0 for a negative entry), created in
    /// directory `parent` for replies that make a dentry; `None` unless negotiated.
    fn version_ext(
        &self,
        node: u64,
        parent: Option<u64>,
    ) -> Option<berth_versions::wire::VersionExt> {
        if !self.versions_negotiated.load(Ordering::Acquire) {
            return None;
        }
        let own = (node != 0).then(|| self.fs.reply_version(node)).flatten();
        let dir = parent.and_then(|p| self.fs.reply_version(p));
        Some(version_ext_of(
            own,
            dir,
            self.fs.version_table().map(|t| t.generation()),
        ))
    }

    /// Requests served so far, as `total=N NAME=count…` over the opcodes seen (by number,
    /// `opN=count`, where berth has no name for one; `other=count` past the table).
    pub fn request_counts(&self) -> String {
        let counts = self.requests_by_opcode();
        let total: u64 = counts.iter().map(|(_, n)| n).sum();
        let parts: Vec<String> = counts
            .iter()
            .map(|(name, n)| format!("{name}={n}"))
            .collect();
        format!("total={total} {}", parts.join(" "))
    }

    /// Requests served so far per opcode (its name, `opN` for one berth has no name for,
    /// `other` past the table), leaving out those never seen.
    pub fn requests_by_opcode(&self) -> Vec<(String, u64)> {
        let mut counts = Vec::new();
        for (op, count) in self.served.iter().enumerate() {
            let n = count.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            match u32::try_from(op).ok().and_then(opcode::name) {
                Some(name) => counts.push((name.to_string(), n)),
                None => counts.push((format!("op{op}"), n)),
            }
        }
        let other = self.served_other.load(Ordering::Relaxed);
        if other > 0 {
            counts.push(("other".to_string(), other));
        }
        counts
    }

    /// Tells the filesystem that the reply to the request this thread served last has reached
    /// the client (written to guest memory, or to /dev/fuse): shared caching settles what that
    /// reply handed out. A transport calls it once after every [`FsServer::handle`].
    pub fn reply_sent(&self) {
        self.fs.reply_sent();
    }

    /// Serves opens through FUSE passthrough where FUSE_INIT allows (a /dev/fuse transport
    /// only, before it starts serving); `false` if backing files were set up already.
    pub fn use_backing_files(&self, backing: BackingFiles) -> bool {
        self.backing.set(backing).is_ok()
    }

    /// The FUSE passthrough backing files, when the transport set them up.
    pub fn backing_files(&self) -> Option<&BackingFiles> {
        self.backing.get()
    }

    /// How to answer the open `fh` of `inode` (opened with `flags`, answered with
    /// `open_flags` so far): through passthrough where it is on and this open allows it,
    /// which replaces the page-cache flags with `FOPEN_PASSTHROUGH` and gives a backing id.
    /// A direct-I/O open lets writes that do not extend the file run in parallel: each is
    /// a `pwrite` at its own offset here, which the host file system orders as it would
    /// two local writers (the kernel still serializes appends and extending writes).
    fn open_path(&self, inode: u64, fh: u64, flags: u32, open_flags: u32) -> (u32, Option<u32>) {
        let direct = fuse_backend_rs::abi::fuse_abi::OpenOptions::DIRECT_IO.bits();
        let open_flags = if open_flags & direct != 0 {
            open_flags | abi::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            open_flags
        };
        let Some(backing) = self.backing.get().filter(|b| b.is_active()) else {
            return (open_flags, None);
        };
        let Some(handle) = self.fs.open_handle(inode, fh) else {
            return (open_flags, None);
        };
        let refusal = self.fs.passthrough_refusal(flags, &handle.file);
        match backing.open(inode, fh, std::os::fd::AsFd::as_fd(&handle.file), refusal) {
            backing::OpenPath::Passthrough(id) => {
                // FOPEN_DIRECT_IO would take precedence over passthrough in the kernel, and
                // the page cache to keep is the host file's own.
                let cache_flags = (fuse_backend_rs::abi::fuse_abi::OpenOptions::DIRECT_IO
                    | fuse_backend_rs::abi::fuse_abi::OpenOptions::KEEP_CACHE)
                    .bits()
                    | abi::FOPEN_PARALLEL_DIRECT_WRITES;
                (
                    (open_flags & !cache_flags) | backing::FOPEN_PASSTHROUGH,
                    Some(id),
                )
            }
            backing::OpenPath::Classic => (open_flags, None),
        }
    }

    /// The filesystem being served.
    pub fn fs(&self) -> &Arc<PassthroughFs> {
        &self.fs
    }

    /// Serves one request. `request` holds the request's bytes, `reply` the room for its
    /// reply; `dax` the transport's DAX window, if it has one (FUSE_SETUPMAPPING and
    /// FUSE_REMOVEMAPPING are ENOSYS without). Never panics.
    pub fn handle(
        &self,
        request: &[IoSegment<'_>],
        reply: &[IoSegment<'_>],
        dax: Option<&dyn DaxWindow>,
    ) -> Served {
        self.handle_from(request, reply, dax, None)
    }

    /// [`handle`](Self::handle) for a request on a virtqueue at `origin`: a SETLKW from there
    /// may be parked ([`Served::Parked`]) when the queue stops while it waits.
    pub fn handle_from(
        &self,
        request: &[IoSegment<'_>],
        reply: &[IoSegment<'_>],
        dax: Option<&dyn DaxWindow>,
        origin: Option<crate::QueueOrigin>,
    ) -> Served {
        let Some(mut req) = Request::new(Cursor::new(request)) else {
            return self.refuse(request, reply, libc::EINVAL);
        };
        req.origin = origin;
        let unique = req.header.unique;
        let opcode = req.header.opcode;
        match self.served.get(opcode as usize) {
            Some(count) => count.fetch_add(1, Ordering::Relaxed),
            None => self.served_other.fetch_add(1, Ordering::Relaxed),
        };
        self.fs.begin_request();
        let mut out = Reply::new(reply);
        if !out.has_room()
            && !matches!(
                opcode,
                opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT
            )
        {
            // Nowhere to say what became of it: leave it undone.
            return Served::Dropped(DropReason::NoRoomForHeader);
        }
        // A bug in a handler must cost one request, not the thread serving the queue.
        let answer =
            panic::catch_unwind(AssertUnwindSafe(|| self.dispatch(&mut req, &mut out, dax)))
                .unwrap_or_else(|_| {
                    tracing::error!(opcode, unique, "Serving a request panicked; answering EIO.");
                    Err(io::Error::from_raw_os_error(libc::EIO))
                });
        tracing::trace!(opcode, unique, nodeid = req.header.nodeid, answer = ?answer, "served");
        reply::finish(reply, unique, answer, out.written())
    }

    /// Answers a request that cannot be served (a malformed descriptor chain, say) with
    /// `errno`, if its unique id can be read and a reply header fits.
    pub fn refuse(&self, request: &[IoSegment<'_>], reply: &[IoSegment<'_>], errno: i32) -> Served {
        let mut head = [0u8; UNIQUE_END];
        if Cursor::new(request).read_exact(&mut head).is_err() {
            return Served::Dropped(DropReason::HeaderUnreadable);
        }
        let mut header = InHeader::default();
        vm_memory::ByteValued::as_mut_slice(&mut header)[..UNIQUE_END].copy_from_slice(&head);
        if matches!(
            header.opcode,
            opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT
        ) {
            // Nothing waits for a reply to these.
            return Served::NoReply;
        }
        reply::error(reply, header.unique, errno)
    }

    /// Forgets everything the guest had: inodes, open files and directories, locks, the
    /// negotiated protocol. For a device reset, or a guest that starts over without unmounting.
    pub fn reset_session(&self) {
        if let Some(backing) = self.backing.get() {
            backing.close_all();
        }
        self.fs.reset();
        self.versions_negotiated.store(false, Ordering::Release);
        self.initialized
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Serializes the guest's session for a live migration (the queues are stopped).
    pub fn save_state(&self) -> Result<Vec<u8>, crate::MigrationError> {
        self.fs.save_state(&crate::migration::SessionState {
            initialized: self.initialized.load(std::sync::atomic::Ordering::Acquire),
        })
    }

    /// Rebuilds the guest's session from a migration source's state; on error nothing the
    /// guest held before is kept (it had nothing: the destination loads before it runs).
    /// `queues` is the device's number of queues, when the transport has them.
    pub fn load_state(
        &self,
        stream: &[u8],
        queues: Option<usize>,
    ) -> Result<(), crate::MigrationError> {
        let session = self.fs.load_state_for(stream, queues)?;
        self.initialized
            .store(session.initialized, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Whether locks a loaded state brought are still to be taken again (the source still
    /// held them): the thread that loaded the state calls [`wait_for_migrated_locks`]
    /// (Self::wait_for_migrated_locks) meanwhile.
    pub fn migrated_locks_pending(&self) -> bool {
        self.fs.lock_restore.has_pending()
    }

    /// Tries once more to take the locks a loaded state brought that are still held elsewhere,
    /// then waits in the kernel for up to `tick` for the first still held; those whose time
    /// ran out are lost. True while some are left. A blocking host lock call has no timeout:
    /// a timer signals the calling thread after `tick`.
    pub fn wait_for_migrated_locks(&self, tick: std::time::Duration) -> bool {
        self.fs.lock_restore.wait_round(tick)
    }

    /// The frontend stopped `queue` with `avail` as its vring base: SETLKW waits from it are
    /// parked (their threads stop waiting without answering). Returns how many it holds.
    pub fn park_lock_waits(&self, queue: u16, avail: u16) -> usize {
        self.fs.lock_waits.park_queue(queue, avail)
    }

    /// `queue` started again: SETLKW requests from it wait as usual again.
    pub fn lock_queue_started(&self, queue: u16) {
        self.fs.lock_waits.queue_started(queue);
    }

    /// The parked waits to resume that `select` picks, among those of queues not stopped and
    /// not being resumed already. Each stays parked (and is saved with the state) until
    /// [`resume_lock_wait`](Self::resume_lock_wait) takes it up.
    pub fn parked_lock_waits_to_resume(
        &self,
        select: impl Fn(&crate::WaitingLock) -> bool,
    ) -> Vec<crate::WaitingLock> {
        self.fs.lock_waits.to_resume(select)
    }

    /// Drops a parked wait that cannot be answered any more (its chain is gone).
    pub fn drop_parked_lock_wait(&self, lock: &crate::WaitingLock) {
        self.fs.lock_waits.drop_parked(lock);
    }

    /// The current FUSE session, for [`resume_lock_wait`](Self::resume_lock_wait).
    pub fn session_epoch(&self) -> u64 {
        self.fs.lock_waits.epoch()
    }

    /// Waits again for a parked SETLKW's lock (blocking). `Some(errno)` (0 when granted) is
    /// the reply to write into its chain; `None` when it was parked again (its queue stopped)
    /// or the guest's session changed since `epoch`, when nothing must be written.
    pub fn resume_lock_wait(&self, lock: crate::WaitingLock, epoch: u64) -> Option<i32> {
        if self.fs.lock_waits.epoch() != epoch {
            return None;
        }
        match self.fs.setlk_wait_parkable(lock, true) {
            lock_wait_outcome::Parked | lock_wait_outcome::Gone => None,
            lock_wait_outcome::Answered(result) => {
                if self.fs.lock_waits.epoch() != epoch {
                    return None;
                }
                Some(result.err().map_or(0, |e| reply::errno_of(&e)))
            }
        }
    }

    /// Writes a bare reply header (`errno` 0: success) for request `unique` into `reply`.
    pub fn answer(&self, reply: &[IoSegment<'_>], unique: u64, errno: i32) -> Served {
        reply::error(reply, unique, errno)
    }

    fn dispatch(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
        dax: Option<&dyn DaxWindow>,
    ) -> io::Result<Answer> {
        if req.header.len > abi::MAX_BUFFER_SIZE + BUFFER_HEADER_SIZE {
            return match req.header.opcode {
                opcode::FORGET | opcode::BATCH_FORGET => Ok(Answer::NoReply),
                _ => Err(io::Error::from_raw_os_error(libc::ENOMEM)),
            };
        }
        match req.header.opcode {
            opcode::LOOKUP => self.lookup(req, out),
            opcode::FORGET => self.forget(req),
            opcode::GETATTR => self.getattr(req, out),
            opcode::SETATTR => self.setattr(req, out, dax),
            opcode::READLINK => self.readlink(req, out),
            opcode::SYMLINK => self.symlink(req, out),
            opcode::MKNOD => self.mknod(req, out),
            opcode::MKDIR => self.mkdir(req, out),
            opcode::UNLINK => self.unlink(req),
            opcode::RMDIR => self.rmdir(req),
            opcode::RENAME => self.rename(req),
            opcode::LINK => self.link(req, out),
            opcode::OPEN => self.open(req, out, dax),
            opcode::READ => self.read(req, out),
            opcode::WRITE => self.write(req, out, dax),
            opcode::STATFS => self.statfs(req, out),
            opcode::RELEASE => self.release(req),
            opcode::FSYNC => self.fsync(req),
            opcode::SETXATTR => self.setxattr(req),
            opcode::GETXATTR => self.getxattr(req, out),
            opcode::LISTXATTR => self.listxattr(req, out),
            opcode::REMOVEXATTR => self.removexattr(req),
            opcode::FLUSH => self.flush(req),
            opcode::INIT => {
                if let Some(window) = dax {
                    window.end_session();
                }
                self.init(req, out)
            }
            opcode::OPENDIR => self.opendir(req, out),
            opcode::READDIR => self.readdir(req, out, false),
            opcode::RELEASEDIR => self.releasedir(req),
            opcode::FSYNCDIR => self.fsyncdir(req),
            opcode::GETLK => self.getlk(req, out),
            opcode::SETLK => self.setlk(req),
            opcode::SETLKW => self.setlkw(req),
            opcode::ACCESS => self.access(req),
            opcode::CREATE => self.create(req, out, dax),
            opcode::INTERRUPT => self.interrupt(req),
            opcode::BMAP => self.bmap(req, out),
            opcode::DESTROY => {
                if let Some(window) = dax {
                    window.end_session();
                }
                self.destroy()
            }
            opcode::IOCTL => self.ioctl(req, out),
            opcode::POLL => self.poll(req, out),
            opcode::NOTIFY_REPLY => self.notify_reply(),
            opcode::BATCH_FORGET => self.batch_forget(req),
            opcode::FALLOCATE => self.fallocate(req, dax),
            opcode::READDIRPLUS => self.readdir(req, out, true),
            opcode::RENAME2 => self.rename2(req),
            opcode::LSEEK => self.lseek(req, out),
            opcode::COPY_FILE_RANGE => self.copy_file_range(req, out, dax),
            opcode::SETUPMAPPING => self.setupmapping(req, dax),
            opcode::REMOVEMAPPING => self.removemapping(req, dax),
            opcode::SYNCFS => self.syncfs(req),
            opcode::TMPFILE => self.tmpfile(req, out),
            _ => Err(io::Error::from_raw_os_error(libc::ENOSYS)),
        }
    }
}

#[cfg(test)]
mod tests;
