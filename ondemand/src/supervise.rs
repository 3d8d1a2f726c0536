//! A lazy mount that fails closed when its serving process dies.
//!
//! The kernel answers every pending pre-content event with "allow" and drops the mark
//! when the last descriptor of a fanotify group closes; reads of data not fetched yet
//! then return the holes of the sparse cache file as zeros. So the group must outlive
//! whatever can crash. Two processes share it:
//!
//! - the **supervisor** (the `berth mount` the operator started) owns the group, the
//!   mark and the mount. It is the only reader of the group: it answers events for
//!   chunks it knows are present at once and forwards the others to the worker over a
//!   socket. It holds no engine, backend client or network code, so it is small; it
//!   asks the kernel not to pick it for OOM kills.
//! - the **worker** (a child, re-executed from the same binary) runs the cache engine
//!   and fetches. If it dies, the supervisor keeps the group open (readers simply wait),
//!   starts a new worker on the same cache file descriptor (opened before the mark,
//!   so its writes raise no events) and the persistent chunk map, and sends it every
//!   event still unanswered. If no worker comes up within [`WORKER_GRACE`], waiting
//!   reads are denied with EIO until one does.
//!
//! If the supervisor dies instead, the worker (which holds a duplicate of the group)
//! takes over: it answers the events it was given directly, denies every other event
//! the supervisor had read (their descriptors were below the supervisor's file limit
//! of [`SUPERVISOR_FD_LIMIT`]), then reads the group itself and unmounts on SIGTERM.
//!
//! Residual risk: if both processes die, or the worker dies after taking over, the
//! group closes with the image still mounted and unfetched data reads as zeros. Run
//! `berth mount` under a service manager that restarts it, and do not kill both with
//! SIGKILL (for systemd: `KillMode=mixed`, and let the supervisor finish its unmount).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use berth_cache::{BlobHandle, CacheEngine, CacheError, Manifest};

use crate::error::{IoContext, OndemandError, Result};
use crate::image::manifest_path_of;
use crate::mount::{
    c_path, change_mark, check_bootstrap, last_os_error, mark_pre_access, mount_erofs_file,
    parse_events, pre_content_group, remove_mark_if_complete, EventHandler, FAN_DENY_EIO,
};

/// Descriptor numbers the worker receives.
pub const WORKER_SOCKET_FD: RawFd = 3;
pub const WORKER_GROUP_FD: RawFd = 4;
pub const WORKER_DATA_FD: RawFd = 5;

/// The supervisor keeps its descriptors below this, so a worker taking over knows
/// which event descriptors the supervisor may have left unanswered.
pub const SUPERVISOR_FD_LIMIT: u64 = 8192;
/// Events in the supervisor's hands at most (each holds a descriptor).
const MAX_PENDING: usize = 4096;
/// How long reads wait for a worker before they are denied.
pub const WORKER_GRACE: Duration = Duration::from_secs(10);

const MESSAGE_LEN: usize = 40;
const TAG_REQUEST: u8 = 1;
const TAG_STOP: u8 = 2;
const TAG_ACCESSED: u8 = 3;
const TAG_READY: u8 = 10;
const TAG_PRESENT: u8 = 11;
const TAG_REPLY: u8 = 12;

/// One message between supervisor and worker (fixed size, one datagram each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Message {
    /// Make `offset..offset + len` present; answer with `Reply { id }`. `event_fd` is
    /// the supervisor's descriptor number of the event, for a takeover.
    Request {
        id: u64,
        event_fd: i32,
        offset: u64,
        len: u64,
    },
    Stop,
    /// The supervisor let a read of present data through itself: for read-ahead.
    Accessed {
        offset: u64,
        len: u64,
    },
    /// The worker serves; the first one sends the cache file descriptor with it.
    Ready,
    /// This byte range of the blob is present.
    Present {
        start: u64,
        end: u64,
    },
    /// Request `id` is done: `errno` 0, or the error to deny the read with.
    Reply {
        id: u64,
        errno: i32,
    },
}

impl Message {
    fn encode(self) -> [u8; MESSAGE_LEN] {
        let mut out = [0u8; MESSAGE_LEN];
        let (tag, a, b, c, d) = match self {
            Message::Request {
                id,
                event_fd,
                offset,
                len,
            } => (TAG_REQUEST, id, offset, len, event_fd),
            Message::Stop => (TAG_STOP, 0, 0, 0, 0),
            Message::Accessed { offset, len } => (TAG_ACCESSED, offset, len, 0, 0),
            Message::Ready => (TAG_READY, 0, 0, 0, 0),
            Message::Present { start, end } => (TAG_PRESENT, start, end, 0, 0),
            Message::Reply { id, errno } => (TAG_REPLY, id, 0, 0, errno),
        };
        out[0] = tag;
        out[8..16].copy_from_slice(&a.to_le_bytes());
        out[16..24].copy_from_slice(&b.to_le_bytes());
        out[24..32].copy_from_slice(&c.to_le_bytes());
        out[32..36].copy_from_slice(&d.to_le_bytes());
        out
    }

    fn decode(buf: &[u8]) -> Option<Self> {
        if buf.len() != MESSAGE_LEN {
            return None;
        }
        let u = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap_or([0; 8]));
        let d = i32::from_le_bytes(buf[32..36].try_into().unwrap_or([0; 4]));
        Some(match buf[0] {
            TAG_REQUEST => Message::Request {
                id: u(8),
                offset: u(16),
                len: u(24),
                event_fd: d,
            },
            TAG_STOP => Message::Stop,
            TAG_ACCESSED => Message::Accessed {
                offset: u(8),
                len: u(16),
            },
            TAG_READY => Message::Ready,
            TAG_PRESENT => Message::Present {
                start: u(8),
                end: u(16),
            },
            TAG_REPLY => Message::Reply { id: u(8), errno: d },
            _ => return None,
        })
    }
}

/// Sends one message, with `fd` attached if given.
fn send(socket: RawFd, message: Message, fd: Option<RawFd>) -> io::Result<()> {
    let bytes = message.encode();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one descriptor, aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space;
        // SAFETY: the control buffer is large enough for one cmsghdr with one fd, and
        // CMSG_FIRSTHDR/CMSG_DATA point inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `header` describes valid buffers; MSG_NOSIGNAL turns a dead peer into EPIPE.
    let n = unsafe { libc::sendmsg(socket, &header, libc::MSG_NOSIGNAL) };
    if n as usize == bytes.len() {
        Ok(())
    } else if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Err(io::Error::other("short send"))
    }
}

/// Receives one message and any descriptor sent with it; `Ok(None)` when the peer is
/// gone.
fn receive(socket: RawFd) -> io::Result<Option<(Message, Option<OwnedFd>)>> {
    let mut bytes = [0u8; MESSAGE_LEN + 8];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: as in `send`.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: the buffers are ours and large enough; the kernel installs received
    // descriptors close-on-exec.
    let n = unsafe { libc::recvmsg(socket, &mut header, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ECONNRESET) => Ok(None),
            _ => Err(err),
        };
    }
    if n == 0 {
        return Ok(None);
    }
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into our buffer.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    let message = Message::decode(&bytes[..n as usize])
        .ok_or_else(|| io::Error::other("malformed message"))?;
    Ok(Some((message, fd)))
}

/// An eventfd that a signal handler thread triggers to stop a supervisor or worker.
#[derive(Debug, Clone)]
pub struct ShutdownSignal(Arc<OwnedFd>);

impl ShutdownSignal {
    pub fn new() -> Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(last_os_error("eventfd"));
        }
        // SAFETY: eventfd returned a new descriptor that nothing else owns.
        Ok(Self(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Asks for the shutdown (callable from any thread, any number of times).
    pub fn trigger(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub(crate) fn triggered(&self) -> bool {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
        let n = unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        n == 8
    }
}

fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) -> usize {
    // SAFETY: `fds` is a valid array for the duration of the call.
    let rc = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    rc.max(0) as usize
}

/// Writes a response for event descriptor number `fd` on `group`.
fn respond(group: RawFd, fd: RawFd, response: u32) -> io::Result<()> {
    let answer = libc::fanotify_response { fd, response };
    let len = std::mem::size_of::<libc::fanotify_response>();
    // SAFETY: writes the bytes of a live fanotify_response to the group descriptor.
    let n = unsafe {
        libc::write(
            group,
            (&answer as *const libc::fanotify_response).cast(),
            len,
        )
    };
    if n as usize == len {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Denies event `fd`, with EIO where the kernel supports choosing the errno.
fn deny(group: RawFd, fd: RawFd) -> io::Result<()> {
    respond(group, fd, FAN_DENY_EIO).or_else(|err| {
        if err.raw_os_error() == Some(libc::EINVAL) {
            respond(group, fd, libc::FAN_DENY)
        } else {
            Err(err)
        }
    })
}

fn unmount(mountpoint: &Path) -> io::Result<()> {
    let target = c_path(mountpoint).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `target` is a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How to start a worker: the program and its arguments. The worker gets the socket
/// at [`WORKER_SOCKET_FD`], the group at [`WORKER_GROUP_FD`] and, after the first, the
/// cache file at [`WORKER_DATA_FD`].
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
}

/// What the supervisor mounts.
#[derive(Debug)]
pub struct SupervisorOptions {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    /// The kernel's read-ahead window on the mount, in bytes (see [`crate::readahead`]).
    pub kernel_readahead: u64,
    pub worker: WorkerCommand,
    pub shutdown: ShutdownSignal,
}

struct PendingEvent {
    fd: OwnedFd,
    range: Range<u64>,
    sent: bool,
    since: Instant,
}

enum WorkerState {
    Starting(Child),
    Ready(Child),
    /// None running; the next start is due at this time.
    Down(Instant),
}

struct Supervisor {
    manifest: Manifest,
    group: OwnedFd,
    socket: Option<OwnedFd>,
    data: Option<OwnedFd>,
    present: Vec<bool>,
    present_count: usize,
    pending: HashMap<u64, PendingEvent>,
    next_id: u64,
    worker: WorkerState,
    failures: u32,
    down_since: Option<Instant>,
    command: WorkerCommand,
    identity: (u64, u64),
    cache_path: PathBuf,
    mark_removed: bool,
    /// Chunks of the last read answered here and reported to the worker.
    last_accessed: Range<u64>,
}

/// Lowers this process's soft file limit so event descriptors stay below
/// [`SUPERVISOR_FD_LIMIT`].
fn limit_descriptors() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_cur.min(SUPERVISOR_FD_LIMIT as libc::rlim_t);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The OOM killer should take the worker, never the supervisor holding the group.
fn protect_from_oom() {
    if let Err(err) = std::fs::write("/proc/self/oom_score_adj", "-999") {
        tracing::debug!("cannot lower the supervisor's OOM score: {err}");
    }
}

impl Supervisor {
    fn spawn_worker(&mut self) -> Result<()> {
        let (ours, theirs) = socket_pair()?;
        let group = self.group.as_raw_fd();
        let data = self.data.as_ref().map(AsRawFd::as_raw_fd);
        let socket = theirs.as_raw_fd();
        let mut command = Command::new(&self.command.program);
        command.args(&self.command.args).stdin(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // fcntl and dup2, which are async-signal-safe. Sources are first moved above the
        // target numbers so that no dup2 overwrites a source still needed.
        unsafe {
            command.pre_exec(move || {
                let mut moved = [-1; 3];
                for (slot, fd) in [Some(socket), Some(group), data].into_iter().enumerate() {
                    if let Some(fd) = fd {
                        let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 16);
                        if high < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        moved[slot] = high;
                    }
                }
                for (slot, target) in [WORKER_SOCKET_FD, WORKER_GROUP_FD, WORKER_DATA_FD]
                    .into_iter()
                    .enumerate()
                {
                    if moved[slot] >= 0 && libc::dup2(moved[slot], target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| OndemandError::Command {
            command: format!("{} (mount worker)", self.command.program.display()),
            message: e.to_string(),
        })?;
        drop(theirs);
        set_nonblocking(ours.as_raw_fd());
        tracing::info!(pid = child.id(), "started the mount worker");
        self.socket = Some(ours);
        self.worker = WorkerState::Starting(child);
        Ok(())
    }

    fn worker_ready(&self) -> bool {
        matches!(self.worker, WorkerState::Ready(_))
    }

    fn chunks_present(&self, range: &Range<u64>) -> bool {
        let chunks = self.manifest.chunks_of(range.clone());
        chunks.clone().all(|i| self.present[i as usize])
    }

    fn mark_present(&mut self, range: Range<u64>) {
        for index in self.manifest.chunks_of(range) {
            if !self.present[index as usize] {
                self.present[index as usize] = true;
                self.present_count += 1;
            }
        }
    }

    fn maybe_remove_mark(&mut self) {
        if self.mark_removed || self.present_count < self.present.len() {
            return;
        }
        self.mark_removed = true;
        match change_mark(&self.group, &self.cache_path, libc::FAN_MARK_REMOVE) {
            Ok(()) => {
                tracing::info!(blob = %self.manifest.blob_id, "all chunks present; fanotify mark removed")
            }
            Err(err) => tracing::warn!("cannot remove the fanotify mark: {err}"),
        }
    }

    /// Lets the worker follow sequential readers whose reads were answered here (once
    /// per chunk range, not per event).
    fn report_access(&mut self, range: &Range<u64>) {
        let chunks = self.manifest.chunks_of(range.clone());
        if chunks == self.last_accessed || !self.worker_ready() {
            return;
        }
        self.last_accessed = chunks;
        if let Some(socket) = &self.socket {
            let message = Message::Accessed {
                offset: range.start,
                len: range.end - range.start,
            };
            let _ = send(socket.as_raw_fd(), message, None);
        }
    }

    /// Sends every unsent event to a ready worker.
    fn dispatch(&mut self) {
        if !self.worker_ready() {
            return;
        }
        let Some(socket) = self.socket.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        for (id, event) in self.pending.iter_mut().filter(|(_, e)| !e.sent) {
            let message = Message::Request {
                id: *id,
                event_fd: event.fd.as_raw_fd(),
                offset: event.range.start,
                len: event.range.end - event.range.start,
            };
            if send(socket, message, None).is_err() {
                // The socket is full (retried on the next round) or the worker is gone
                // (noticed on the socket).
                return;
            }
            event.sent = true;
        }
    }

    fn answer(&mut self, id: u64, errno: i32) {
        let Some(event) = self.pending.remove(&id) else {
            return;
        };
        let group = self.group.as_raw_fd();
        let result = if errno == 0 {
            self.mark_present(event.range.clone());
            respond(group, event.fd.as_raw_fd(), libc::FAN_ALLOW)
        } else {
            deny(group, event.fd.as_raw_fd())
        };
        if let Err(err) = result {
            tracing::error!("cannot answer a fanotify event: {err}");
        }
    }

    fn read_events(&mut self) {
        let mut buf = [0u8; 4096];
        // SAFETY: reads into our own buffer of the given length.
        let n = unsafe { libc::read(self.group.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        let size = self.manifest.blob_size;
        for event in parse_events(&buf[..n as usize]) {
            let Some(fd) = event.fd else {
                tracing::warn!("fanotify queue overflowed");
                continue;
            };
            let ours = File::from(fd.try_clone().unwrap_or_else(|_| null_fd()))
                .metadata()
                .map(|m| (m.dev(), m.ino()) == self.identity)
                .unwrap_or(false);
            let range = event.range.unwrap_or(0..size);
            let group = self.group.as_raw_fd();
            if !ours {
                let _ = deny(group, fd.as_raw_fd());
                continue;
            }
            if self.chunks_present(&range) {
                if let Err(err) = respond(group, fd.as_raw_fd(), libc::FAN_ALLOW) {
                    tracing::error!("cannot answer a fanotify event: {err}");
                }
                self.report_access(&range);
                continue;
            }
            if self
                .down_since
                .is_some_and(|since| since.elapsed() > WORKER_GRACE)
            {
                tracing::error!(range = ?range, "denying a read of {}: no mount worker is running", self.manifest.blob_id);
                let _ = deny(group, fd.as_raw_fd());
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.pending.insert(
                id,
                PendingEvent {
                    fd,
                    range,
                    sent: false,
                    since: Instant::now(),
                },
            );
        }
        self.dispatch();
    }

    /// Handles what the worker sent; returns false when it is gone.
    fn read_worker(&mut self) -> bool {
        let Some(socket) = self.socket.as_ref().map(AsRawFd::as_raw_fd) else {
            return false;
        };
        loop {
            match receive(socket) {
                Ok(Some((message, fd))) => match message {
                    Message::Ready => {
                        if let Some(fd) = fd {
                            self.data.get_or_insert(fd);
                        }
                        if let WorkerState::Starting(child) =
                            std::mem::replace(&mut self.worker, WorkerState::Down(Instant::now()))
                        {
                            tracing::info!(pid = child.id(), "the mount worker is serving");
                            self.worker = WorkerState::Ready(child);
                        }
                        self.failures = 0;
                        self.down_since = None;
                        self.dispatch();
                    }
                    Message::Present { start, end } => {
                        self.mark_present(start..end);
                        self.maybe_remove_mark();
                    }
                    Message::Reply { id, errno } => {
                        self.answer(id, errno);
                        self.maybe_remove_mark();
                    }
                    _ => {}
                },
                Ok(None) => return false,
                Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => return true,
                Err(err) => {
                    tracing::error!("the mount worker's socket failed: {err}");
                    return false;
                }
            }
        }
    }

    /// The worker exited or its socket closed: reap it and schedule a new one.
    fn worker_lost(&mut self) {
        self.socket = None;
        let state = std::mem::replace(&mut self.worker, WorkerState::Down(Instant::now()));
        let mut child = match state {
            WorkerState::Starting(child) | WorkerState::Ready(child) => child,
            WorkerState::Down(at) => {
                self.worker = WorkerState::Down(at);
                return;
            }
        };
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        self.failures += 1;
        let delay = Duration::from_millis(100 * 2u64.pow(self.failures.min(6)));
        tracing::error!(
            pid = child.id(),
            "the mount worker died ({status}); {} pending reads wait for a new one in {delay:?}",
            self.pending.len()
        );
        for event in self.pending.values_mut() {
            event.sent = false;
        }
        self.down_since.get_or_insert_with(Instant::now);
        self.worker = WorkerState::Down(Instant::now() + delay);
    }

    /// Denies the events that waited longer than the grace period for a worker.
    fn deny_overdue(&mut self) {
        let Some(since) = self.down_since else { return };
        if since.elapsed() <= WORKER_GRACE {
            return;
        }
        let group = self.group.as_raw_fd();
        let overdue: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, e)| e.since.elapsed() > WORKER_GRACE)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some(event) = self.pending.remove(&id) {
                tracing::error!(range = ?event.range, "denying a read of {}: no mount worker came up", self.manifest.blob_id);
                let _ = deny(group, event.fd.as_raw_fd());
            }
        }
    }

    fn poll_once(&mut self, shutdown: &ShutdownSignal, timeout: Duration) -> bool {
        let mut fds = vec![libc::pollfd {
            fd: shutdown.raw(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let group_slot = (self.pending.len() < MAX_PENDING).then(|| {
            fds.push(libc::pollfd {
                fd: self.group.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.len() - 1
        });
        let socket_slot = self.socket.as_ref().map(|s| {
            fds.push(libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.len() - 1
        });
        poll_fds(&mut fds, timeout);
        if let Some(slot) = socket_slot {
            if fds[slot].revents != 0 && !self.read_worker() {
                self.worker_lost();
            }
        }
        if let Some(slot) = group_slot {
            if fds[slot].revents & libc::POLLIN != 0 {
                self.read_events();
            }
        }
        // A worker that exited without closing its socket first.
        let exited = match &mut self.worker {
            WorkerState::Starting(child) | WorkerState::Ready(child) => {
                matches!(child.try_wait(), Ok(Some(_)))
            }
            WorkerState::Down(_) => false,
        };
        if exited {
            self.worker_lost();
        }
        self.deny_overdue();
        // Requests a full socket refused earlier.
        self.dispatch();
        fds[0].revents & libc::POLLIN != 0 && shutdown.triggered()
    }
}

fn null_fd() -> OwnedFd {
    File::open("/dev/null")
        .map(OwnedFd::from)
        .unwrap_or_else(|_| std::process::abort())
}

fn socket_pair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: socketpair writes two descriptors into `fds`; the result is checked.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(last_os_error("socketpair"));
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// Mounts the image and serves it through workers until `options.shutdown` fires and
/// the unmount succeeds. Returns an error if the first worker cannot start serving
/// (its own error is on stderr) or the mount fails.
pub fn supervise(options: SupervisorOptions) -> Result<()> {
    limit_descriptors();
    protect_from_oom();
    let manifest_path = manifest_path_of(&options.image);
    let manifest = Manifest::load(&manifest_path)?;
    let image_dir = manifest_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let bootstrap = image_dir.join(&manifest.bootstrap);
    check_bootstrap(&manifest, &bootstrap)?;
    let group = pre_content_group()?;
    let chunk_count = manifest.chunks.len();
    let mut supervisor = Supervisor {
        cache_path: options.cache_dir.join(format!("{}.data", manifest.blob_id)),
        manifest,
        group,
        socket: None,
        data: None,
        present: vec![false; chunk_count],
        present_count: 0,
        pending: HashMap::new(),
        next_id: 1,
        worker: WorkerState::Down(Instant::now()),
        failures: 0,
        down_since: None,
        command: options.worker.clone(),
        identity: (0, 0),
        mark_removed: false,
        last_accessed: 0..0,
    };
    // 1. The first worker opens the blob (before the mark) and sends its descriptor.
    supervisor.spawn_worker()?;
    let started = Instant::now();
    while !supervisor.worker_ready() {
        let alive =
            supervisor.socket.is_some() && matches!(supervisor.worker, WorkerState::Starting(_));
        if !alive || started.elapsed() > Duration::from_secs(600) {
            if let WorkerState::Starting(child) = &mut supervisor.worker {
                // Let it finish reporting its error before making sure it is gone.
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(OndemandError::Command {
                command: "berth mount (worker)".into(),
                message: "the mount worker did not start serving; see its error above".into(),
            });
        }
        if let Some(socket) = &supervisor.socket {
            let mut fds = [libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            poll_fds(&mut fds, Duration::from_millis(200));
            if fds[0].revents != 0 && !supervisor.read_worker() {
                supervisor.socket = None;
            }
            if let WorkerState::Starting(child) = &mut supervisor.worker {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    supervisor.socket = None;
                }
            }
        }
        if options.shutdown.triggered() {
            tracing::info!("stopping before the image was mounted");
            if let WorkerState::Starting(child) = &mut supervisor.worker {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Ok(());
        }
    }
    let Some(data) = supervisor.data.as_ref() else {
        return Err(OndemandError::Command {
            command: "berth mount (worker)".into(),
            message: "the worker did not hand over the cache file".into(),
        });
    };
    let meta = File::from(
        data.try_clone()
            .context(|| "duplicating the cache file".into())?,
    )
    .metadata()
    .context(|| "reading the cache file".into())?;
    supervisor.identity = (meta.dev(), meta.ino());
    let cache_path = std::fs::canonicalize(&supervisor.cache_path)
        .context(|| format!("resolving {}", supervisor.cache_path.display()))?;
    supervisor.cache_path = cache_path.clone();
    // 2. Mark, then 3. mount (erofs opens the device after the mark).
    mark_pre_access(&supervisor.group, &cache_path)?;
    if let Err(err) = mount_erofs_file(
        &bootstrap,
        &cache_path,
        &options.mountpoint,
        options.kernel_readahead,
    ) {
        stop_worker(&mut supervisor);
        return Err(err);
    }
    supervisor.maybe_remove_mark();
    tracing::info!(mountpoint = %options.mountpoint.display(), blob = %supervisor.manifest.blob_id, "mounted image");

    // Serve until asked to stop, then until the unmount succeeds.
    let mut stopping = false;
    let mut told_busy = false;
    let mut next_unmount = Instant::now();
    loop {
        if let WorkerState::Down(at) = supervisor.worker {
            if Instant::now() >= at {
                if let Err(err) = supervisor.spawn_worker() {
                    tracing::error!("cannot start a mount worker: {err}");
                    supervisor.failures += 1;
                    supervisor.worker = WorkerState::Down(Instant::now() + Duration::from_secs(5));
                }
            }
        }
        if supervisor.poll_once(&options.shutdown, Duration::from_millis(100)) && !stopping {
            stopping = true;
            tracing::info!("unmounting {}", options.mountpoint.display());
        }
        if stopping && Instant::now() >= next_unmount {
            match unmount(&options.mountpoint) {
                Ok(()) => break,
                // Unmounted by someone else: nothing is left to guard.
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => break,
                Err(err) => {
                    // Never close the group while mounted: serve on and retry.
                    if !told_busy {
                        if err.raw_os_error() == Some(libc::EBUSY) {
                            tracing::warn!(
                                "{} is busy; it stays mounted and served until the files open in it are closed",
                                options.mountpoint.display()
                            );
                        } else {
                            tracing::error!(
                                "cannot unmount {}: {err}; it stays mounted and served, retrying",
                                options.mountpoint.display()
                            );
                        }
                        told_busy = true;
                    }
                    next_unmount = Instant::now() + Duration::from_millis(200);
                }
            }
        }
    }
    // Unmounted: nothing can raise events any more. Stop the worker, then close the
    // group (dropping `supervisor`).
    stop_worker(&mut supervisor);
    tracing::info!("unmounted {}", options.mountpoint.display());
    Ok(())
}

fn stop_worker(supervisor: &mut Supervisor) {
    let state = std::mem::replace(&mut supervisor.worker, WorkerState::Down(Instant::now()));
    let mut child = match state {
        WorkerState::Starting(child) | WorkerState::Ready(child) => child,
        WorkerState::Down(_) => return,
    };
    if let Some(socket) = &supervisor.socket {
        let _ = send(socket.as_raw_fd(), Message::Stop, None);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!("the mount worker did not stop; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// The descriptors a worker inherits.
#[derive(Debug)]
pub struct WorkerFds {
    pub socket: OwnedFd,
    pub group: OwnedFd,
    /// The cache file, for every worker after the first.
    pub data: Option<OwnedFd>,
}

impl WorkerFds {
    /// Takes over the descriptors at the fixed numbers.
    ///
    /// # Safety
    /// Call once, in a worker started by [`supervise`], before anything else could
    /// have claimed descriptors 3 to 5.
    pub unsafe fn inherited() -> Self {
        // SAFETY (caller): the supervisor installed these numbers for us.
        let take = |fd: RawFd| {
            // SAFETY: F_GETFD only checks that the descriptor is open.
            let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
            // SAFETY: an open descriptor the supervisor gave to this process alone.
            open.then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let socket = take(WORKER_SOCKET_FD).unwrap_or_else(null_fd);
        let group = take(WORKER_GROUP_FD).unwrap_or_else(null_fd);
        let data = take(WORKER_DATA_FD);
        for fd in [&socket, &group].into_iter().chain(data.as_ref()) {
            // SAFETY: marks our own descriptors close-on-exec.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        Self {
            socket,
            group,
            data,
        }
    }
}

/// What a worker serves.
pub struct WorkerOptions {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub engine: Arc<CacheEngine>,
    pub threads: usize,
    /// Byte ranges to prefetch once serving.
    pub prefetch: Vec<Range<u64>>,
    pub shutdown: ShutdownSignal,
}

/// Serves a supervisor (see the module documentation): opens the blob, reports what is
/// present, answers requests, and takes over the group if the supervisor dies.
pub fn run_worker(options: WorkerOptions, fds: WorkerFds) -> Result<()> {
    let manifest = Manifest::load(&manifest_path_of(&options.image))?;
    let blob = Arc::new(match fds.data {
        Some(data) => options
            .engine
            .open_blob_with_file(&manifest, File::from(data))?,
        None => options.engine.open_blob(&manifest)?,
    });
    let socket = Arc::new(fds.socket);
    let group = Arc::new(fds.group);
    {
        let socket = socket.clone();
        blob.set_ready_listener(move |range| {
            let _ = send(
                socket.as_raw_fd(),
                Message::Present {
                    start: range.start,
                    end: range.end,
                },
                None,
            );
        });
    }
    for range in blob.present_ranges() {
        send(
            socket.as_raw_fd(),
            Message::Present {
                start: range.start,
                end: range.end,
            },
            None,
        )
        .context(|| "reporting to the supervisor".into())?;
    }
    send(
        socket.as_raw_fd(),
        Message::Ready,
        Some(blob.cache_raw_fd()?),
    )
    .context(|| "reporting to the supervisor".into())?;
    if !options.prefetch.is_empty() {
        blob.prefetch(&options.prefetch);
    }

    // Requests go to a pool; each answer goes to the supervisor, or straight to the
    // group once the supervisor is gone.
    let (sender, receiver) = mpsc::channel::<(u64, i32, Range<u64>)>();
    let receiver = Arc::new(Mutex::new(receiver));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let supervisor_gone = Arc::new(AtomicBool::new(false));
    let mut pool = Vec::new();
    for index in 0..options.threads.max(1) {
        let (receiver, blob, socket, group) = (
            receiver.clone(),
            blob.clone(),
            socket.clone(),
            group.clone(),
        );
        let (in_flight, gone) = (in_flight.clone(), supervisor_gone.clone());
        let thread = std::thread::Builder::new()
            .name(format!("berth-worker-{index}"))
            .spawn(move || loop {
                let next = receiver.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((id, event_fd, range)) = next else {
                    return;
                };
                // A panic must still answer the read (with a denial).
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    blob.ensure_present(range.clone())
                }))
                .unwrap_or_else(|_| {
                    Err(CacheError::FetchFailed {
                        blob: blob.id().to_string(),
                        chunk: range.start / u64::from(blob.manifest().chunk_size),
                        message: "internal error (panic) while fetching".into(),
                    })
                });
                let errno = match &outcome {
                    Ok(()) => 0,
                    Err(err) => {
                        tracing::error!(range = ?range, "denying read of {}: {err}", blob.id());
                        libc::EIO
                    }
                };
                let sent = !gone.load(Ordering::SeqCst)
                    && send(socket.as_raw_fd(), Message::Reply { id, errno }, None).is_ok();
                if !sent {
                    // The supervisor is gone: the event waits in the group under its
                    // descriptor number; answer it ourselves.
                    let answer = if errno == 0 {
                        respond(group.as_raw_fd(), event_fd, libc::FAN_ALLOW)
                    } else {
                        deny(group.as_raw_fd(), event_fd)
                    };
                    if let Err(err) = answer {
                        tracing::debug!("answering an orphaned event: {err}");
                    }
                }
                in_flight.fetch_sub(1, Ordering::SeqCst);
            })
            .context(|| "starting a worker thread".into())?;
        pool.push(thread);
    }
    loop {
        match receive(socket.as_raw_fd()) {
            Ok(Some((
                Message::Request {
                    id,
                    event_fd,
                    offset,
                    len,
                },
                _,
            ))) => {
                in_flight.fetch_add(1, Ordering::SeqCst);
                let _ = sender.send((id, event_fd, offset..offset.saturating_add(len)));
            }
            Ok(Some((Message::Accessed { offset, len }, _))) => {
                blob.note_read(offset..offset.saturating_add(len));
            }
            Ok(Some((Message::Stop, _))) => {
                drop(sender);
                for thread in pool {
                    let _ = thread.join();
                }
                return Ok(());
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
            Err(err) => {
                tracing::error!("the supervisor's socket failed: {err}");
                break;
            }
        }
    }
    take_over(
        options,
        blob,
        group,
        supervisor_gone,
        in_flight,
        sender,
        pool,
    )
}

/// The supervisor died with the image mounted: become the reader of the group.
fn take_over(
    options: WorkerOptions,
    blob: Arc<BlobHandle>,
    group: Arc<OwnedFd>,
    supervisor_gone: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    sender: mpsc::Sender<(u64, i32, Range<u64>)>,
    pool: Vec<std::thread::JoinHandle<()>>,
) -> Result<()> {
    tracing::error!(
        "the mount supervisor died; this worker takes over serving {}",
        options.mountpoint.display()
    );
    supervisor_gone.store(true, Ordering::SeqCst);
    // Finish (and answer) what we were given before reading new events: their
    // descriptor numbers are the supervisor's and must not meet ours.
    drop(sender);
    for thread in pool {
        let _ = thread.join();
    }
    debug_assert_eq!(in_flight.load(Ordering::SeqCst), 0);
    // Whatever else the supervisor had read is unanswered: deny it so no reader hangs.
    let mut denied = 0;
    for fd in 0..SUPERVISOR_FD_LIMIT as RawFd {
        if deny(group.as_raw_fd(), fd).is_ok() {
            denied += 1;
        }
    }
    if denied > 0 {
        tracing::warn!("denied {denied} reads the supervisor had not answered");
    }
    let cache_path = blob.cache_path()?;
    let cache_path = std::fs::canonicalize(cache_path)
        .context(|| format!("resolving {}", cache_path.display()))?;
    let meta =
        std::fs::metadata(&cache_path).context(|| format!("reading {}", cache_path.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let wake = ShutdownSignal::new()?;
    let complete = Arc::new(AtomicBool::new(false));
    let mut handlers = Vec::new();
    for index in 0..options.threads.max(1) {
        let handler = EventHandler {
            cache_path: cache_path.clone(),
            complete: complete.clone(),
            group: group.clone(),
            wake: wake.raw(),
            stop: stop.clone(),
            blob: blob.clone(),
            file_identity: (meta.dev(), meta.ino()),
        };
        handlers.push(
            std::thread::Builder::new()
                .name(format!("berth-fanotify-{index}"))
                .spawn(move || handler.run())
                .context(|| "starting a fanotify handler".into())?,
        );
    }
    remove_mark_if_complete(&group, &blob, &cache_path, &complete);
    // Until asked to stop; then until unmounted (never close the group before).
    loop {
        let mut fds = [libc::pollfd {
            fd: options.shutdown.raw(),
            events: libc::POLLIN,
            revents: 0,
        }];
        poll_fds(&mut fds, Duration::from_secs(1));
        if fds[0].revents & libc::POLLIN != 0 && options.shutdown.triggered() {
            break;
        }
    }
    loop {
        match unmount(&options.mountpoint) {
            Ok(()) => break,
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            // Not mounted any more (the supervisor got that far): nothing to guard.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => break,
            Err(err) => {
                tracing::error!(
                    "cannot unmount {}: {err}; still serving",
                    options.mountpoint.display()
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    wake.trigger();
    for handler in handlers {
        let _ = handler.join();
    }
    tracing::info!("unmounted {}", options.mountpoint.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let messages = [
            Message::Request {
                id: u64::MAX,
                event_fd: 4095,
                offset: 1 << 40,
                len: 131_072,
            },
            Message::Stop,
            Message::Accessed { offset: 7, len: 9 },
            Message::Ready,
            Message::Present {
                start: 0,
                end: 1 << 20,
            },
            Message::Reply {
                id: 3,
                errno: libc::EIO,
            },
        ];
        for message in messages {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
        assert_eq!(Message::decode(&[0u8; MESSAGE_LEN]), None);
        assert_eq!(Message::decode(&[TAG_READY; 12]), None);
    }

    #[test]
    fn descriptors_pass_over_the_socket() {
        let (a, b) = socket_pair().unwrap();
        let file = File::open("/proc/self/exe").unwrap();
        send(a.as_raw_fd(), Message::Ready, Some(file.as_raw_fd())).unwrap();
        let (message, fd) = receive(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!(message, Message::Ready);
        let received = File::from(fd.expect("a descriptor"));
        let (x, y) = (file.metadata().unwrap(), received.metadata().unwrap());
        assert_eq!((x.dev(), x.ino()), (y.dev(), y.ino()));
        drop(a);
        assert!(
            receive(b.as_raw_fd()).unwrap().is_none(),
            "a closed peer reads as gone"
        );
    }
}
