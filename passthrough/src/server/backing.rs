//! FUSE passthrough (Linux 6.9+, `CONFIG_FUSE_PASSTHROUGH`) for a /dev/fuse transport: the
//! kernel reads, writes and maps an open file straight from a host file berth registered, so
//! file data never makes the round trip through berth.
//!
//! An open berth hands to the kernel this way registers the descriptor it opened on the host
//! (`FUSE_DEV_IOC_BACKING_OPEN`, which answers a backing id) and replies `FOPEN_PASSTHROUGH`
//! with that id; the id is closed again (`FUSE_DEV_IOC_BACKING_CLOSE`) when the last such open
//! of the inode is released, or when the session ends.
//!
//! The kernel lets only a holder of CAP_SYS_ADMIN register backing files. The threads that
//! parse requests do not hold it: a [`BackingRegistrar`], on a thread of its own that keeps
//! that one capability and may make only these two ioctls, registers and closes for them.
//! That hop costs thread wake-ups, so it is kept to one round trip per registration: the
//! table is not locked meanwhile (opens of other inodes, and releases, go on), and closes are
//! not sent one by one but gathered and made after a registration's answer, or at most
//! [`CLOSE_DELAY`] after the first of them.
//!
//! The kernel insists on one backing file per FUSE inode while any passthrough open of it
//! lives, and refuses (EIO to the opener) to mix a passthrough open with a cached one on the
//! same inode. So the table here is per inode: the first open decides, later opens of the same
//! inode follow it until every open is released (an open that could not be passed through
//! itself, while others of the inode are, is passed through anyway: the kernel accepts nothing
//! else).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::ByteValued;

/// `FUSE_PASSTHROUGH` in FUSE_INIT's 64-bit flags (`flags2` bit 5).
pub const INIT_PASSTHROUGH: u64 = 1 << 37;
/// `FOPEN_PASSTHROUGH`: the open is served from the backing file named in `backing_id`.
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// `struct fuse_backing_map` (include/uapi/linux/fuse.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}
// SAFETY: an i32, a u32 and a u64, no padding bytes; every bit pattern is a valid value.
unsafe impl ByteValued for BackingMap {}

/// `FUSE_DEV_IOC_BACKING_OPEN`: `_IOW(229, 1, struct fuse_backing_map)`.
pub const FUSE_DEV_IOC_BACKING_OPEN: u64 = 0x4010_e501;
/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
pub const FUSE_DEV_IOC_BACKING_CLOSE: u64 = 0x4004_e502;

/// Whether FUSE passthrough is used (`berth fuse --passthrough`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum PassthroughMode {
    /// Where the kernel offers it and berth holds the privilege it needs.
    #[default]
    Auto,
    /// Always; starting fails when it cannot be had.
    Always,
    /// Never: every data byte goes through berth.
    Never,
}

impl std::str::FromStr for PassthroughMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(PassthroughMode::Auto),
            "always" => Ok(PassthroughMode::Always),
            "never" => Ok(PassthroughMode::Never),
            other => Err(format!(
                "unknown passthrough mode '{other}'; expected auto, always or never"
            )),
        }
    }
}

/// Why FUSE_INIT could not give `--passthrough always` what it asks for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassthroughError {
    #[error(
        "the kernel does not offer FUSE passthrough (it needs Linux 6.9 or later built with \
         CONFIG_FUSE_PASSTHROUGH); use --passthrough auto or never"
    )]
    NotOffered,
    #[error(
        "FUSE passthrough cannot be combined with the writeback cache (the kernel refuses \
         both on one connection); leave out --writeback or use --passthrough auto or never"
    )]
    Writeback,
}

/// The opens of one inode berth has answered and not yet seen released.
#[derive(Debug, Default)]
struct InodeOpens {
    /// The backing id all passthrough opens of the inode share.
    backing_id: Option<u32>,
    passthrough: usize,
    classic: usize,
}

#[derive(Debug, Default)]
struct Table {
    inodes: HashMap<u64, InodeOpens>,
    /// (inode, handle) → whether that open was passed through.
    handles: HashMap<(u64, u64), bool>,
    /// Bumped by [`BackingFiles::close_all`]: a registration that began before the session
    /// ended must not add its id to the next session's table.
    generation: u64,
}

/// Counters for the log at exit, the tests and the benchmarks.
#[derive(Debug, Default)]
struct Stats {
    registered: AtomicU64,
    closed_on_release: AtomicU64,
    closed_at_end: AtomicU64,
    /// Counted by the registrar.
    close_failures: Arc<AtomicU64>,
    refused_by_kernel: AtomicU64,
    classic_opens: AtomicU64,
    passthrough_opens: AtomicU64,
}

/// How long a released backing id may wait for the registrar's next wake-up before it is
/// closed anyway. Until then the kernel keeps the backing file open (a deleted file's blocks
/// stay allocated that long); a new open of the inode registers a new id meanwhile.
pub const CLOSE_DELAY: Duration = Duration::from_millis(20);

/// What a worker asks of the [`BackingRegistrar`].
#[derive(Debug)]
enum RegistrarRequest {
    /// Register the descriptor (valid until the answer) and answer its backing id.
    Open {
        fd: i32,
        answer: mpsc::SyncSender<io::Result<u32>>,
    },
    /// Ids are waiting in [`Closes::pending`]: close them within [`CLOSE_DELAY`].
    CloseSoon,
    /// Close every pending id, then answer (once every request before this one is done).
    Sync(mpsc::SyncSender<()>),
}

/// Backing ids released and not yet closed, shared by the workers and the registrar.
#[derive(Debug, Default)]
struct Closes {
    pending: Mutex<Vec<u32>>,
    /// A [`RegistrarRequest::CloseSoon`] was sent and its delay has not run out: later
    /// releases only add their ids.
    armed: AtomicBool,
}

/// Registers and closes backing files on the connection's /dev/fuse for [`BackingFiles`], on
/// the thread that runs [`BackingRegistrar::serve`].
#[derive(Debug)]
pub struct BackingRegistrar {
    /// The connection's /dev/fuse descriptor (the ioctls go to it).
    device: File,
    requests: Receiver<RegistrarRequest>,
    closes: Arc<Closes>,
    close_failures: Arc<AtomicU64>,
}

impl BackingRegistrar {
    /// Serves requests until every [`BackingFiles`] sender is gone.
    pub fn serve(self) {
        // When the pending closes are due, while a CloseSoon's delay runs.
        let mut due: Option<Instant> = None;
        loop {
            let request = match due {
                None => match self.requests.recv() {
                    Ok(request) => Some(request),
                    Err(_) => break,
                },
                Some(due) => match self
                    .requests
                    .recv_timeout(due.saturating_duration_since(Instant::now()))
                {
                    Ok(request) => Some(request),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            match request {
                Some(RegistrarRequest::Open { fd, answer }) => {
                    let _ = answer.send(register(&self.device, fd));
                    // Awake anyway: the closes gathered so far cost no wake-up of their own.
                    self.close_pending();
                }
                Some(RegistrarRequest::CloseSoon) => {
                    due.get_or_insert_with(|| Instant::now() + CLOSE_DELAY);
                }
                Some(RegistrarRequest::Sync(answer)) => {
                    self.close_pending();
                    let _ = answer.send(());
                }
                None => {
                    due = None;
                    // Disarmed before the ids are taken: a release after this sends a new
                    // CloseSoon, and one before it left its id for the take below.
                    self.closes.armed.store(false, Ordering::SeqCst);
                    self.close_pending();
                }
            }
        }
        self.close_pending();
    }

    fn close_pending(&self) {
        let ids = match self.closes.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        for id in ids {
            if let Err(e) = close(&self.device, id) {
                self.close_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(id, "Cannot close a FUSE backing id: {e}.");
            }
        }
    }
}

/// Backing files registered on one FUSE connection.
#[derive(Debug)]
pub struct BackingFiles {
    requests: Sender<RegistrarRequest>,
    closes: Arc<Closes>,
    mode: PassthroughMode,
    /// Passed in FUSE_INIT: how deep filesystems may stack under the mount, the backing
    /// files' own filesystem included (the kernel refuses a deeper backing file with ELOOP).
    max_stack_depth: u32,
    /// FUSE_INIT enabled passthrough on this connection.
    active: AtomicBool,
    /// `--passthrough always` could not be honoured: the transport stops serving.
    failed: Mutex<Option<PassthroughError>>,
    table: Mutex<Table>,
    stats: Stats,
}

/// What to answer an open with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenPath {
    Classic,
    Passthrough(u32),
}

impl BackingFiles {
    /// Backing files for the connection `device` (a /dev/fuse descriptor), and the registrar
    /// to run on a thread holding CAP_SYS_ADMIN; `max_stack_depth` is 1 when the shared
    /// directory is on a plain filesystem, 2 on a stacked one (overlayfs).
    pub fn new(
        device: File,
        mode: PassthroughMode,
        max_stack_depth: u32,
    ) -> (Self, BackingRegistrar) {
        let (sender, requests) = mpsc::channel();
        let stats = Stats::default();
        let closes = Arc::new(Closes::default());
        let registrar = BackingRegistrar {
            device,
            requests,
            closes: closes.clone(),
            close_failures: stats.close_failures.clone(),
        };
        let backing = BackingFiles {
            requests: sender,
            closes,
            mode,
            max_stack_depth,
            active: AtomicBool::new(false),
            failed: Mutex::new(None),
            table: Mutex::new(Table::default()),
            stats,
        };
        (backing, registrar)
    }

    /// FUSE_INIT: whether passthrough is on, given what the kernel `offered` and whether the
    /// writeback cache was enabled. An error (for `--passthrough always` only) is also kept
    /// for [`BackingFiles::failure`].
    pub(crate) fn negotiate(
        &self,
        offered: u64,
        writeback: bool,
    ) -> Result<bool, PassthroughError> {
        let refusal = if offered & INIT_PASSTHROUGH == 0 {
            Some(PassthroughError::NotOffered)
        } else if writeback {
            Some(PassthroughError::Writeback)
        } else {
            None
        };
        let on = refusal.is_none();
        self.active.store(on, Ordering::Release);
        match refusal {
            None => {
                tracing::info!(
                    "FUSE passthrough is on: the kernel reads and writes open files directly."
                );
                Ok(true)
            }
            Some(e) if self.mode == PassthroughMode::Always => {
                if let Ok(mut failed) = self.failed.lock() {
                    *failed = Some(e.clone());
                }
                Err(e)
            }
            Some(e) => {
                tracing::info!("FUSE passthrough is off: {e}.");
                Ok(false)
            }
        }
    }

    /// The `max_stack_depth` to answer FUSE_INIT with.
    pub(crate) fn max_stack_depth(&self) -> u32 {
        self.max_stack_depth
    }

    /// Why `--passthrough always` could not be honoured, once FUSE_INIT found out.
    pub fn failure(&self) -> Option<PassthroughError> {
        self.failed.lock().ok().and_then(|failed| failed.clone())
    }

    /// Whether FUSE_INIT turned passthrough on.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Decides how the open `handle` of `inode` on the host descriptor `file` is served:
    /// `refusal` says why this open should not be passed through, if it should not.
    pub(crate) fn open(
        &self,
        inode: u64,
        handle: u64,
        file: BorrowedFd<'_>,
        refusal: Option<&'static str>,
    ) -> OpenPath {
        if !self.is_active() {
            return OpenPath::Classic;
        }
        let generation = {
            let Ok(mut table) = self.table.lock() else {
                return OpenPath::Classic;
            };
            let generation = table.generation;
            let opens = table.inodes.entry(inode).or_default();
            let decided = match (opens.backing_id, opens.classic, refusal) {
                (Some(id), _, why) => {
                    if let Some(why) = why {
                        tracing::debug!(
                            inode,
                            "Passing through an open that would not be on its own ({why}): \
                             other opens of the inode are, and the kernel takes nothing else."
                        );
                    }
                    Some(OpenPath::Passthrough(id))
                }
                (None, classic, _) if classic > 0 => Some(OpenPath::Classic),
                (None, _, Some(why)) => {
                    tracing::debug!(inode, "Not passing this open through: {why}.");
                    Some(OpenPath::Classic)
                }
                (None, _, None) => None,
            };
            if let Some(path) = decided {
                self.account(&mut table, inode, handle, path);
                return path;
            }
            generation
        };
        // Registered without the table locked; another open of the inode may have decided
        // meanwhile, and then its choice stands.
        let registered = self.register(file);
        let mut table = self.table.lock().ok();
        // None: the table is unusable, or the session ended meanwhile (close_all bumped the
        // generation) and nothing of this open is kept.
        let path = table
            .as_mut()
            .filter(|table| table.generation == generation)
            .map(|table| {
                let opens = table.inodes.entry(inode).or_default();
                match (opens.backing_id, opens.classic, &registered) {
                    (Some(id), _, _) => OpenPath::Passthrough(id),
                    (None, classic, _) if classic > 0 => OpenPath::Classic,
                    (None, _, Ok(id)) => {
                        opens.backing_id = Some(*id);
                        self.stats.registered.fetch_add(1, Ordering::Relaxed);
                        OpenPath::Passthrough(*id)
                    }
                    (None, _, Err(e)) => {
                        self.stats.refused_by_kernel.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            inode,
                            "The kernel refused the backing file ({e}); serving this open \
                             through berth."
                        );
                        OpenPath::Classic
                    }
                }
            });
        // An id registered here and not kept goes again.
        if let Ok(id) = registered {
            if path != Some(OpenPath::Passthrough(id)) {
                self.close(id);
            }
        }
        let (Some(table), Some(path)) = (table.as_mut(), path) else {
            return OpenPath::Classic;
        };
        self.account(table, inode, handle, path);
        path
    }

    /// Counts the open `handle` of `inode`, answered with `path`.
    fn account(&self, table: &mut Table, inode: u64, handle: u64, path: OpenPath) {
        let opens = table.inodes.entry(inode).or_default();
        match path {
            OpenPath::Passthrough(_) => {
                opens.passthrough += 1;
                self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            }
            OpenPath::Classic => {
                opens.classic += 1;
                self.stats.classic_opens.fetch_add(1, Ordering::Relaxed);
            }
        }
        table
            .handles
            .insert((inode, handle), matches!(path, OpenPath::Passthrough(_)));
    }

    /// RELEASE of `handle`: the inode's backing id is closed with its last passthrough open.
    pub(crate) fn release(&self, inode: u64, handle: u64) {
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        let Some(passthrough) = table.handles.remove(&(inode, handle)) else {
            return;
        };
        let Some(opens) = table.inodes.get_mut(&inode) else {
            return;
        };
        if passthrough {
            opens.passthrough = opens.passthrough.saturating_sub(1);
        } else {
            opens.classic = opens.classic.saturating_sub(1);
        }
        if opens.passthrough == 0 {
            if let Some(id) = opens.backing_id.take() {
                self.close(id);
                self.stats.closed_on_release.fetch_add(1, Ordering::Relaxed);
            }
        }
        if opens.passthrough == 0 && opens.classic == 0 {
            table.inodes.remove(&inode);
        }
    }

    /// The session ended (DESTROY, a new INIT, an unmount): every id still registered is
    /// closed and the table emptied.
    pub fn close_all(&self) {
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        for opens in table.inodes.values_mut() {
            if let Some(id) = opens.backing_id.take() {
                self.close(id);
                self.stats.closed_at_end.fetch_add(1, Ordering::Relaxed);
            }
        }
        table.inodes.clear();
        table.handles.clear();
        table.generation += 1;
        // Closed before the caller goes on (to unmount, say): Sync closes every pending id.
        let (answer, done) = mpsc::sync_channel(1);
        if self.send(RegistrarRequest::Sync(answer)) {
            let _ = done.recv();
        }
    }

    /// Backing ids registered and not closed yet.
    pub fn registered_now(&self) -> usize {
        self.table
            .lock()
            .map(|t| t.inodes.values().filter(|o| o.backing_id.is_some()).count())
            .unwrap_or(0)
    }

    /// `registered=N closed_on_release=N closed_at_end=N close_failures=N refused=N
    /// passthrough_opens=N classic_opens=N`, for the log at exit.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "registered={} closed_on_release={} closed_at_end={} close_failures={} refused={} \
             passthrough_opens={} classic_opens={}",
            n(&s.registered),
            n(&s.closed_on_release),
            n(&s.closed_at_end),
            n(&s.close_failures),
            n(&s.refused_by_kernel),
            n(&s.passthrough_opens),
            n(&s.classic_opens),
        )
    }

    fn register(&self, file: BorrowedFd<'_>) -> io::Result<u32> {
        let (answer, id) = mpsc::sync_channel(1);
        let request = RegistrarRequest::Open {
            fd: file.as_raw_fd(),
            answer,
        };
        if !self.send(request) {
            return Err(io::Error::from_raw_os_error(libc::ENOTCONN));
        }
        // The descriptor stays open meanwhile: the caller holds the open file.
        id.recv()
            .unwrap_or_else(|_| Err(io::Error::from_raw_os_error(libc::ENOTCONN)))
    }

    /// Leaves `id` for the registrar to close with its next registration, or within
    /// [`CLOSE_DELAY`].
    fn close(&self, id: u32) {
        match self.closes.pending.lock() {
            Ok(mut pending) => pending.push(id),
            Err(_) => {
                self.stats.close_failures.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if !self.closes.armed.swap(true, Ordering::SeqCst)
            && !self.send(RegistrarRequest::CloseSoon)
        {
            self.stats.close_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands `request` to the registrar; `false` when it is gone.
    fn send(&self, request: RegistrarRequest) -> bool {
        self.requests.send(request).is_ok()
    }
}

/// `FUSE_DEV_IOC_BACKING_OPEN` of `fd` on `device`: the new backing id.
fn register(device: &File, fd: i32) -> io::Result<u32> {
    let map = BackingMap {
        fd,
        ..Default::default()
    };
    // SAFETY: the ioctl reads one `fuse_backing_map` from a valid, live struct; the descriptor
    // is the connection's /dev/fuse, which the request is defined for.
    let id = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            FUSE_DEV_IOC_BACKING_OPEN as libc::c_ulong,
            map.as_slice().as_ptr(),
        )
    };
    if id < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(id).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// `FUSE_DEV_IOC_BACKING_CLOSE` of `id` on `device`.
fn close(device: &File, id: u32) -> io::Result<()> {
    // SAFETY: the ioctl reads one u32 from a valid local; the descriptor is the connection's
    // /dev/fuse.
    let rc = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            FUSE_DEV_IOC_BACKING_CLOSE as libc::c_ulong,
            &id as *const u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
