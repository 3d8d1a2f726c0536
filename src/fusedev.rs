//! `berth fuse`: the same filesystem mounted on the host through /dev/fuse.
//!
//! Start-up, in this order: [`mount`] in the host's namespaces (the mount must be visible on
//! the host), [`UnmountGuard::spawn`] a small process that stays outside the sandbox with the
//! privilege to unmount, then the binary enters the sandbox, drops capabilities and installs
//! the main seccomp filter, and [`serve`] starts the workers, each reading requests from its
//! own channel on the FUSE connection under the FUSE worker filter.
//!
//! The main thread then waits for one of two things: a termination signal, after which it
//! stops the workers and has the guard unmount, or a worker stopping by itself, which means
//! the filesystem was unmounted from outside (or the connection failed). If berth dies
//! instead, the guard sees its end of a pipe close and unmounts then.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use berth_passthrough::server::opcode;
use berth_passthrough::{
    BackingFiles, BackingRegistrar, Config as FsConfig, FsServer, IoSegment, IoUringInit,
    PassthroughMode, Served,
};
use berth_seccomp::{cloexec_pipe, close_all_but, SeccompAction, ThreadRole};
use fuse_backend_rs::transport::FuseSession;
use tracing::{debug, error, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::fuse_uring::{self, Gate, QueueRing, RingEnd, TransportCounts};
use crate::pool::{self, WorkerPool};
use crate::shutdown::{signal_name, TerminationSignals};

/// How long stopping workers may take before berth unmounts anyway (a worker can be stuck in
/// a slow host operation).
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long the workers may take to install their seccomp filters.
const WORKER_START_TIMEOUT: Duration = Duration::from_secs(10);

enum Event {
    Signal(libc::c_int),
    Started {
        index: usize,
        outcome: Result<(), String>,
    },
    WorkerStopped {
        index: usize,
        error: Option<String>,
    },
}

/// Mounts the FUSE filesystem on `mountpoint` (an absolute path) in the current namespaces.
///
/// The session never unmounts by itself (its `Drop` would, by path, from wherever the process
/// is confined to by then): the [`UnmountGuard`] does.
pub fn mount(mountpoint: &Path, readonly: bool) -> anyhow::Result<ManuallyDrop<FuseSession>> {
    let mut session = FuseSession::new(mountpoint, "berth", "berth", readonly)
        .map_err(|e| anyhow!("cannot use {} as a mount point: {e}", mountpoint.display()))?;
    let allow_other = allow_other_permitted();
    if !allow_other {
        warn!(
            "mounting for this user only: fusermount lets an unprivileged user give other users \
             access (allow_other) only when /etc/fuse.conf says user_allow_other"
        );
    }
    session.set_allow_other(allow_other);
    session
        .mount()
        .map_err(|e| anyhow!("cannot mount on {}: {e}", mountpoint.display()))?;
    Ok(ManuallyDrop::new(session))
}

/// Whether FUSE passthrough is to be set up for `mode`: never with `--writeback` (the kernel
/// refuses both on one connection) or shared caching (which must see every write), nor
/// without CAP_SYS_ADMIN in the initial user namespace; `always` makes each of those an error.
/// Whether the kernel offers it is known at FUSE_INIT.
pub fn passthrough_wanted(
    mode: PassthroughMode,
    fs: &FsConfig,
    shared_cache: bool,
) -> anyhow::Result<bool> {
    if mode == PassthroughMode::Never {
        return Ok(false);
    }
    let obstacle = if fs.writeback && !fs.readonly {
        Some("the kernel cannot combine it with the writeback cache (--writeback)")
    } else if shared_cache {
        Some("shared caching (--shared-cache) must see every write")
    } else if !berth_seccomp::can_register_fuse_backing_files() {
        Some(
            "registering backing files needs CAP_SYS_ADMIN in the initial user namespace \
             (run berth fuse as root)",
        )
    } else {
        None
    };
    match (obstacle, mode) {
        (None, _) => Ok(true),
        (Some(why), PassthroughMode::Always) => {
            bail!("--passthrough always cannot be honoured: {why}")
        }
        (Some(why), _) => {
            info!("FUSE passthrough is off: {why}.");
            Ok(false)
        }
    }
}

/// Starts the thread that registers backing files: it keeps CAP_SYS_ADMIN alone (the
/// kernel's condition for registering) and may make only the two backing ioctls. Call it
/// while the process still holds the capability, before the main thread drops it.
pub fn start_backing_registrar(
    registrar: BackingRegistrar,
    seccomp: SeccompAction,
) -> anyhow::Result<()> {
    let (ready, confined) = mpsc::channel();
    thread::Builder::new()
        .name("berth-backing".to_owned())
        .spawn(move || {
            let outcome = berth_seccomp::keep_only_thread_capabilities(&[
                berth_seccomp::Capability::CAP_SYS_ADMIN,
            ])
            .and_then(|()| berth_seccomp::install_filter(ThreadRole::FuseBackingRegistrar, seccomp))
            .map_err(|e| e.to_string());
            let serve = outcome.is_ok();
            let _ = ready.send(outcome);
            if serve {
                registrar.serve();
            }
        })
        .context("cannot start the FUSE backing-file registrar")?;
    match confined.recv_timeout(WORKER_START_TIMEOUT) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("the FUSE backing-file registrar cannot confine itself: {e}"),
        Err(_) => bail!("the FUSE backing-file registrar did not start"),
    }
}

/// The backing-file table of `session`'s connection. The kernel refuses a backing file on a
/// filesystem stacked deeper than FUSE_INIT said: one level (the shared directory's own
/// filesystem), or two where that is itself stacked (overlayfs).
pub fn backing_files(
    session: &FuseSession,
    mode: PassthroughMode,
    shared_dir: &Path,
) -> anyhow::Result<(BackingFiles, BackingRegistrar)> {
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    let device = session
        .get_fuse_file()
        .ok_or_else(|| anyhow!("the FUSE session has no /dev/fuse descriptor"))?
        .try_clone()
        .context("cannot duplicate /dev/fuse")?;
    let path = CString::new(shared_dir.as_os_str().as_bytes())
        .map_err(|_| anyhow!("the shared directory's path contains a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs64>::zeroed();
    // SAFETY: `path` is NUL-terminated and `st` a properly sized out-buffer.
    let stacked = unsafe { libc::statfs64(path.as_ptr(), st.as_mut_ptr()) } == 0 && {
        // SAFETY: statfs64 succeeded and filled the buffer.
        let st = unsafe { st.assume_init() };
        // f_type's width differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        let magic = st.f_type as i64;
        magic == OVERLAYFS_SUPER_MAGIC
    };
    Ok(BackingFiles::new(device, mode, if stacked { 2 } else { 1 }))
}

/// Whether the mount may be opened to other users: always for root, and for anyone else
/// only where /etc/fuse.conf allows it (fusermount refuses `allow_other` otherwise, and the
/// whole mount would fail).
fn allow_other_permitted() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    std::fs::read_to_string("/etc/fuse.conf")
        .map(|conf| conf.lines().any(|line| line.trim() == "user_allow_other"))
        .unwrap_or(false)
}

/// A process outside the sandbox that unmounts the mount point when asked to, or when berth
/// is gone (its end of the request pipe closed), whatever confinement berth is in.
pub struct UnmountGuard {
    /// Written (one byte) to ask for the unmount; closed when berth exits.
    request: OwnedFd,
    /// Read (one byte) once the unmount happened.
    done: OwnedFd,
}

impl UnmountGuard {
    /// Forks the guard (detached: it is nobody's child but init's). Call it while the process
    /// is single-threaded, before the sandbox and before capabilities are dropped: the guard
    /// keeps the process's capabilities to unmount, and installs `seccomp` (when root; an
    /// unprivileged guard needs fusermount, an exec no filter allows).
    pub fn spawn(mountpoint: &Path, seccomp: SeccompAction, root: bool) -> anyhow::Result<Self> {
        let path = CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| anyhow!("the mount point contains a NUL byte"))?;
        let (request_read, request_write) =
            cloexec_pipe().context("cannot create the unmount pipe")?;
        let (done_read, done_write) = cloexec_pipe().context("cannot create the unmount pipe")?;
        // SAFETY: the process is single-threaded (documented precondition); the child only
        // makes plain system calls (and fusermount, unprivileged) before exiting.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(anyhow!(
                "cannot start the unmount guard: {}",
                io::Error::last_os_error()
            ));
        }
        if pid == 0 {
            // SAFETY: as above; the grandchild is the guard, reparented once this child exits.
            if unsafe { libc::fork() } != 0 {
                // SAFETY: _exit skips the parent's atexit handlers and buffers.
                unsafe { libc::_exit(0) };
            }
            run_guard(&path, &request_read, &done_write, seccomp, root);
        }
        let mut status = 0;
        // SAFETY: reaping the intermediate child, which exits at once.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        drop((request_read, done_write));
        Ok(UnmountGuard {
            request: request_write,
            done: done_read,
        })
    }

    /// Has the guard unmount now and waits until it has.
    pub fn unmount(self) {
        let byte = [1u8];
        // SAFETY: writing one byte from a valid buffer to our pipe end.
        let written = unsafe { libc::write(self.request.as_raw_fd(), byte.as_ptr().cast(), 1) };
        if written != 1 {
            error!(
                "Cannot ask for the unmount: {}.",
                io::Error::last_os_error()
            );
            return;
        }
        let mut ack = [0u8];
        // SAFETY: reading one byte into a valid buffer; EOF (0) means the guard is gone.
        let read = unsafe { libc::read(self.done.as_raw_fd(), ack.as_mut_ptr().cast(), 1) };
        if read != 1 {
            error!("The unmount guard is gone; the mount point may still be mounted.");
        }
    }
}

/// The guard's life: wait for a request or for berth's end, unmount, report, exit.
fn run_guard(
    path: &CString,
    request: &OwnedFd,
    done: &OwnedFd,
    seccomp: SeccompAction,
    root: bool,
) -> ! {
    // It must not keep /dev/fuse (the connection would outlive berth) or anything else open.
    close_all_but(&[request.as_raw_fd(), done.as_raw_fd()]);
    if root {
        if let Err(e) = berth_seccomp::install_filter(ThreadRole::Supervisor, seccomp) {
            eprintln!("error: the unmount guard: {e}");
            // SAFETY: _exit only ends this process.
            unsafe { libc::_exit(1) };
        }
    }
    let mut byte = [0u8];
    let asked = loop {
        // SAFETY: reading one byte into a valid buffer.
        let n = unsafe { libc::read(request.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break n == 1;
    };
    unmount_path(path, !root);
    if asked {
        // SAFETY: writing one byte from a valid buffer to our pipe end.
        unsafe { libc::write(done.as_raw_fd(), byte.as_ptr().cast(), 1) };
    }
    // SAFETY: _exit only ends this process.
    unsafe { libc::_exit(0) }
}

/// Lazily unmounts `path`; already unmounted (from outside) is fine.
fn unmount_path(path: &CString, with_helper: bool) {
    // SAFETY: `path` is NUL-terminated.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
        return;
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => return,
        Some(libc::EPERM) if with_helper => {
            let path = std::ffi::OsStr::from_bytes(path.as_bytes());
            for helper in ["fusermount3", "fusermount"] {
                let unmounted = std::process::Command::new(helper)
                    .arg("-u")
                    .arg("-z")
                    .arg(path)
                    .status()
                    .is_ok_and(|s| s.success());
                if unmounted {
                    return;
                }
            }
        }
        _ => {}
    }
    eprintln!(
        "error: cannot unmount {}: {error}",
        String::from_utf8_lossy(path.as_bytes())
    );
}

/// The rings of FUSE over io_uring, made before the seccomp filter ([`Rings::create`]).
pub struct Rings {
    queues: Vec<QueueRing>,
    stop: Arc<EventFd>,
    required: bool,
}

impl Rings {
    /// A restricted ring per queue of `plan` on `session`'s /dev/fuse.
    pub fn create(session: &FuseSession, plan: &fuse_uring::Plan) -> anyhow::Result<Self> {
        let fuse = session
            .get_fuse_file()
            .ok_or_else(|| anyhow!("the FUSE session has no /dev/fuse descriptor"))?;
        let stop =
            Arc::new(EventFd::new(EFD_NONBLOCK).context("cannot create the workers' stop event")?);
        let queues = fuse_uring::create_rings(plan, fuse, &stop)
            .context("cannot set up the io_uring rings for FUSE over io_uring")?;
        Ok(Rings {
            queues,
            stop,
            required: plan.required,
        })
    }
}

/// What the workers share about the transport.
struct Transport {
    /// The ring threads' start signal (FUSE_INIT answered).
    gate: Gate,
    counts: TransportCounts,
    /// Ring queues, when io_uring is offered, and rings over all queues.
    queues: usize,
    rings: usize,
    /// `--io-uring always`.
    required: bool,
    payload_len: usize,
    /// With host locks: where lock requests that may wait (FUSE_SETLKW) wait.
    lock_waiters: Option<LockWaiters>,
}

/// Threads that wait for host locks for the kernel's FUSE_SETLKW requests read from
/// /dev/fuse, so that the workers go on reading: a worker that waited would not read the
/// request that lets go of the lock, and waits as many as the workers would stop the mount.
struct LockWaiters {
    pool: WorkerPool,
    /// A descriptor of the connection's device, to reply on (the kernel finds a reply's
    /// request by its unique id in the device's processing list, which every duplicate of
    /// the session's descriptor shares).
    device: Arc<File>,
}

impl LockWaiters {
    fn start(session: &FuseSession, seccomp: SeccompAction) -> anyhow::Result<Self> {
        let device = session
            .get_fuse_file()
            .context("the FUSE session has no device")?
            .try_clone()
            .context("cannot duplicate the FUSE device for the lock waiters")?;
        let pool = WorkerPool::start(pool::LOCK_WAITERS, move || {
            berth_seccomp::install_filter(ThreadRole::FuseWorker, seccomp)
                .map_err(|e| e.to_string())
        })
        .context("cannot start the lock waiting threads")?;
        Ok(LockWaiters {
            pool,
            device: Arc::new(device),
        })
    }

    /// Serves `request` (a SETLKW) on a lock waiter, which replies when the wait ends.
    fn wait(&self, server: &Arc<FsServer>, request: &[u8]) {
        let mut request = request.to_vec();
        let server = server.clone();
        let device = self.device.clone();
        self.pool.execute(Box::new(move || {
            // A lock reply is a bare header.
            let mut reply = [0u8; 64];
            let served = server.handle(
                &[IoSegment::from_mut_slice(&mut request)],
                &[IoSegment::from_mut_slice(&mut reply)],
                None,
            );
            if let Served::Replied(len) = served {
                match write_reply(&device, &reply[..len]) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        debug!("The kernel dropped an interrupted lock request.");
                    }
                    Err(e) => warn!("Cannot send a FUSE lock reply: {e}."),
                }
            }
            server.reply_sent();
        }));
    }
}

/// Serves the mounted `session` with `threads` workers (and a ring thread per queue of
/// `rings`) until a termination signal or an external unmount, then has `guard` unmount
/// `mountpoint`.
#[allow(clippy::too_many_arguments)]
pub fn serve(
    server: Arc<FsServer>,
    session: ManuallyDrop<FuseSession>,
    mountpoint: &Path,
    threads: usize,
    rings: Option<Rings>,
    seccomp: SeccompAction,
    guard: UnmountGuard,
    signals: TerminationSignals,
) -> anyhow::Result<()> {
    let queues = rings
        .as_ref()
        .and_then(|r| r.queues.iter().map(|q| q.qid() + 1).max())
        .unwrap_or(0);
    let transport = Arc::new(Transport {
        gate: Gate::new(),
        counts: TransportCounts::new(queues),
        queues,
        rings: rings.as_ref().map_or(0, |r| r.queues.len()),
        required: rings.as_ref().is_some_and(|r| r.required),
        payload_len: session
            .bufsize()
            .max(berth_passthrough::server::MAX_BUFFER_SIZE as usize),
        lock_waiters: if server.fs().holds_host_locks() {
            Some(LockWaiters::start(&session, seccomp)?)
        } else {
            None
        },
    });
    let outcome = run(
        &server, &session, mountpoint, threads, rings, &transport, seccomp, signals,
    );
    info!(
        "FUSE requests by transport: {}.",
        transport.counts.summary()
    );
    // The workers are stopped: nothing registers backing files any more.
    if let Some(backing) = server.backing_files() {
        backing.close_all();
    }
    guard.unmount();
    match &outcome {
        Ok(()) => info!("Unmounted {}.", mountpoint.display()),
        Err(_) => info!("Unmounted {} after an error.", mountpoint.display()),
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
fn run(
    server: &Arc<FsServer>,
    session: &FuseSession,
    mountpoint: &Path,
    threads: usize,
    rings: Option<Rings>,
    transport: &Arc<Transport>,
    seccomp: SeccompAction,
    signals: TerminationSignals,
) -> anyhow::Result<()> {
    info!(
        "Mounted the shared directory on {} with {threads} worker threads.",
        mountpoint.display()
    );
    let (events, event_receiver) = mpsc::channel();
    let signal_events = events.clone();
    signals.spawn_handler(move |signal| {
        let _ = signal_events.send(Event::Signal(signal));
    })?;

    let (stop, queues, required) = match rings {
        Some(rings) => (rings.stop, rings.queues, rings.required),
        None => (
            Arc::new(EventFd::new(EFD_NONBLOCK).context("cannot create the workers' stop event")?),
            Vec::new(),
            false,
        ),
    };
    let stop = Stopper {
        event: stop,
        transport: transport.clone(),
    };
    let mut running = 0;
    let wanted = threads + queues.len();
    // The ring threads first: each pins itself to its queue's CPU, confines itself and waits
    // for FUSE_INIT, which a classic worker answers.
    for (ring_index, queue) in queues.into_iter().enumerate() {
        let qid = queue.qid();
        let slot = queue.slot();
        let index = threads + ring_index;
        let server = server.clone();
        let events = events.clone();
        let transport = transport.clone();
        let spawned = thread::Builder::new()
            .name(format!("berth-uring-{qid}.{slot}"))
            .spawn(move || {
                fuse_uring::pin_to_cpu(qid);
                let outcome = berth_seccomp::install_filter(ThreadRole::FuseRing, seccomp)
                    .map_err(|e| e.to_string());
                let ready = outcome.is_ok();
                let _ = events.send(Event::Started { index, outcome });
                if !ready {
                    let _ = events.send(Event::WorkerStopped { index, error: None });
                    return;
                }
                let served = fuse_uring::serve_queue(
                    queue,
                    &server,
                    &transport.gate,
                    required,
                    transport.payload_len,
                    &transport.counts,
                );
                match served {
                    Ok(RingEnd::Done) => {
                        let _ = events.send(Event::WorkerStopped { index, error: None });
                    }
                    Ok(RingEnd::NotUsed) => {
                        let _ = events.send(Event::WorkerStopped { index, error: None });
                    }
                    Err(e) => {
                        let _ = events.send(Event::WorkerStopped {
                            index,
                            error: Some(e),
                        });
                    }
                }
            });
        match spawned {
            Ok(_) => running += 1,
            Err(e) => {
                error!("Cannot start FUSE ring thread {qid}: {e}.");
                stop_workers(&stop, &event_receiver, running);
                bail!("could not start the FUSE ring threads");
            }
        }
    }
    for index in 0..threads {
        let channel = match Channel::new(session, &stop.event, transport.rings > 0) {
            Ok(channel) => channel,
            Err(e) => {
                error!("Cannot open a channel on the FUSE connection: {e}.");
                break;
            }
        };
        let server = server.clone();
        let events = events.clone();
        let transport = transport.clone();
        let spawned = thread::Builder::new()
            .name(format!("berth-fuse-{index}"))
            .spawn(move || {
                let outcome = berth_seccomp::install_filter(ThreadRole::FuseWorker, seccomp)
                    .map_err(|e| e.to_string());
                let ready = outcome.is_ok();
                let _ = events.send(Event::Started { index, outcome });
                let error = if ready {
                    run_worker(index, channel, &server, &transport).err()
                } else {
                    None
                };
                let _ = events.send(Event::WorkerStopped { index, error });
            });
        match spawned {
            Ok(_) => running += 1,
            Err(e) => {
                error!("Cannot start FUSE worker thread {index}: {e}.");
                break;
            }
        }
    }
    if running < wanted {
        stop_workers(&stop, &event_receiver, running);
        bail!("could not start the FUSE worker threads");
    }
    // Until every worker has confined itself a missing report is an error; a worker that could
    // not install its filter ends the daemon (it would serve unconfined otherwise). The
    // filesystem may already be unmounted from outside meanwhile: that ends it cleanly.
    let start_deadline = Instant::now() + WORKER_START_TIMEOUT;
    let mut confined = 0;
    loop {
        let event = if confined < running {
            let timeout = start_deadline.saturating_duration_since(Instant::now());
            match event_receiver.recv_timeout(timeout) {
                Ok(event) => Ok(event),
                Err(RecvTimeoutError::Timeout) => {
                    stop_workers(&stop, &event_receiver, running);
                    bail!("the FUSE workers did not install their seccomp filters in time");
                }
                Err(RecvTimeoutError::Disconnected) => Err(mpsc::RecvError),
            }
        } else {
            event_receiver.recv()
        };
        return match event {
            Ok(Event::Started {
                outcome: Ok(()), ..
            }) => {
                confined += 1;
                continue;
            }
            Ok(Event::Started {
                index,
                outcome: Err(e),
            }) => {
                stop_workers(&stop, &event_receiver, running);
                Err(anyhow!("FUSE worker {index} cannot confine itself: {e}"))
            }
            Ok(Event::Signal(signal)) => {
                info!("Received {}; unmounting.", signal_name(signal));
                stop_workers(&stop, &event_receiver, running);
                Ok(())
            }
            Ok(Event::WorkerStopped { index, error }) => {
                let lost = connection_lost(session);
                stop_workers(&stop, &event_receiver, running - 1);
                // The kernel may drop the connection after a refused FUSE_INIT: still an error.
                if let Some(e) = server.backing_files().and_then(BackingFiles::failure) {
                    return Err(anyhow!("--passthrough always cannot be honoured: {e}"));
                }
                if required && server.io_uring_init() == IoUringInit::NotOffered {
                    return Err(anyhow!(
                        "--io-uring always: the kernel did not offer FUSE_OVER_IO_URING at \
                         FUSE_INIT"
                    ));
                }
                match error {
                    _ if lost => {
                        info!("The filesystem was unmounted; shutting down.");
                        Ok(())
                    }
                    None => {
                        info!("The FUSE connection was closed; shutting down.");
                        Ok(())
                    }
                    Some(e) => Err(anyhow!("FUSE worker {index} failed: {e}")),
                }
            }
            Err(mpsc::RecvError) => Err(anyhow!("lost track of the FUSE worker threads")),
        };
    }
}

/// One worker's connection to /dev/fuse: its own descriptor on the session, an epoll set
/// with the workers' shared stop event, and buffers for one request and its reply.
struct Channel {
    file: File,
    epoll: Epoll,
    request: Vec<u8>,
    reply: Vec<u8>,
}

/// Epoll data of the FUSE descriptor and of the stop event.
const FUSE_READABLE: u64 = 0;
const STOP: u64 = 1;

impl Channel {
    /// `exclusive`: the session has io_uring rings (see below).
    fn new(session: &FuseSession, stop: &EventFd, exclusive: bool) -> io::Result<Self> {
        let file = session
            .get_fuse_file()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTCONN))?
            .try_clone()?;
        let epoll = Epoll::new()?;
        // Level-triggered: a request another worker does not take wakes this one again, and
        // the stop event (never read) wakes every worker. With rings, /dev/fuse carries only
        // FORGET, BATCH_FORGET and INTERRUPT: one idle worker is woken per request
        // (exclusive), instead of every worker running to find it taken (EAGAIN), which cost
        // an unlink storm over io_uring 15 % of its rate. Without rings every worker stays
        // woken: exclusive wake-ups made 1-worker create storms 25 % slower there.
        let events = if exclusive {
            EventSet::IN | EventSet::EXCLUSIVE
        } else {
            EventSet::IN
        };
        epoll.ctl(
            ControlOperation::Add,
            file.as_raw_fd(),
            EpollEvent::new(events, FUSE_READABLE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        Ok(Channel {
            file,
            epoll,
            request: vec![0u8; session.bufsize()],
            reply: vec![0u8; session.bufsize()],
        })
    }

    /// Waits for the next request and reads it into the request buffer; `None` when the
    /// workers are stopped or the filesystem was unmounted.
    fn next_request(&mut self) -> io::Result<Option<usize>> {
        let mut events = [EpollEvent::default(); 2];
        loop {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if events[..ready].iter().any(|e| e.data() == STOP) {
                return Ok(None);
            }
            if ready == 0 {
                continue;
            }
            // SAFETY: reading into our own buffer, for its full length.
            let n = unsafe {
                libc::read(
                    self.file.as_raw_fd(),
                    self.request.as_mut_ptr().cast(),
                    self.request.len(),
                )
            };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                // Interrupted before it was read, taken by another worker, or a signal.
                Some(libc::ENOENT) | Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                // Unmounted.
                Some(libc::ENODEV) => return Ok(None),
                _ => return Err(error),
            }
        }
    }

    /// Writes the reply (one write: the kernel takes each write as a whole reply).
    fn send_reply(&self, len: usize) -> io::Result<()> {
        write_reply(&self.file, &self.reply[..len])
    }
}

/// Writes one reply to the FUSE device (a single write: the kernel takes a reply whole).
fn write_reply(device: &File, reply: &[u8]) -> io::Result<()> {
    // SAFETY: writing from a buffer we hold, for its length.
    let n = unsafe { libc::write(device.as_raw_fd(), reply.as_ptr().cast(), reply.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn run_worker(
    index: usize,
    mut channel: Channel,
    server: &Arc<FsServer>,
    transport: &Transport,
) -> Result<(), String> {
    loop {
        let len = match channel.next_request() {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("cannot read a request from /dev/fuse: {e}")),
        };
        let op = request_opcode(&channel.request[..len]);
        transport.counts.device.fetch_add(1, Ordering::Relaxed);
        if matches!(
            op,
            Some(opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT)
        ) {
            transport
                .counts
                .device_no_reply
                .fetch_add(1, Ordering::Relaxed);
        }
        if op == Some(opcode::SETLKW) {
            if let Some(waiters) = &transport.lock_waiters {
                waiters.wait(server, &channel.request[..len]);
                continue;
            }
        }
        let served = {
            let Channel { request, reply, .. } = &mut channel;
            server.handle(
                &[IoSegment::from_mut_slice(&mut request[..len])],
                &[IoSegment::from_mut_slice(reply)],
                None,
            )
        };
        match served {
            Served::Replied(len) => match channel.send_reply(len) {
                Ok(()) => {}
                // The kernel forgets interrupted requests; a reply to one fails with ENOENT.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    debug!(worker = index, "The kernel dropped an interrupted request.");
                }
                Err(e) => warn!(worker = index, "Cannot send a FUSE reply: {e}."),
            },
            // Only a virtqueue request is ever parked.
            Served::NoReply | Served::Parked => {}
            Served::Dropped(why) => {
                warn!(worker = index, "Dropping a FUSE request: {why}.")
            }
        }
        // The reply reached the kernel (or never will): shared caching settles what it
        // handed out.
        server.reply_sent();
        if op == Some(opcode::INIT) {
            if let Some(e) = server.backing_files().and_then(BackingFiles::failure) {
                return Err(format!("--passthrough always cannot be honoured: {e}"));
            }
            if transport.queues > 0 {
                match server.io_uring_init() {
                    IoUringInit::Enabled => {
                        fuse_uring::log_transport(
                            transport.queues,
                            transport.rings,
                            transport.payload_len,
                        );
                        transport.gate.open();
                    }
                    IoUringInit::NotOffered if transport.required => {
                        return Err("--io-uring always: the kernel did not offer \
                                    FUSE_OVER_IO_URING at FUSE_INIT"
                            .to_owned());
                    }
                    IoUringInit::NotOffered => {
                        info!(
                            "FUSE transport: /dev/fuse read and write (io_uring is off: the \
                             kernel did not offer FUSE_OVER_IO_URING at FUSE_INIT)."
                        );
                        transport.gate.close();
                    }
                    IoUringInit::Undecided => transport.gate.close(),
                }
            }
        }
    }
}

/// The opcode of the request in `request` (after its 4-byte length), if it is that long.
fn request_opcode(request: &[u8]) -> Option<u32> {
    let bytes = request.get(4..8)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

/// The workers' stop event, and the ring threads' gate (a ring thread that never got to
/// register waits there).
struct Stopper {
    event: Arc<EventFd>,
    transport: Arc<Transport>,
}

/// Wakes every worker and waits (bounded) for `running` of them to report that they stopped.
fn stop_workers(stop: &Stopper, events: &mpsc::Receiver<Event>, mut running: usize) {
    stop.transport.gate.stop();
    if let Err(e) = stop.event.write(1) {
        warn!("Cannot wake the FUSE worker threads: {e}.");
    }
    let deadline = Instant::now() + WORKER_STOP_GRACE;
    while running > 0 {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(timeout) {
            Ok(Event::WorkerStopped { index, error }) => {
                running -= 1;
                if let Some(e) = error {
                    debug!(worker = index, "FUSE worker stopped: {e}.");
                }
            }
            Ok(Event::Signal(_)) | Ok(Event::Started { .. }) => {}
            Err(RecvTimeoutError::Timeout) => {
                warn!("{running} FUSE worker threads are still busy; unmounting anyway.");
                return;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Whether the kernel side of the FUSE connection is gone (unmounted or aborted).
fn connection_lost(session: &FuseSession) -> bool {
    let Some(file) = session.get_fuse_file() else {
        return true;
    };
    let mut pollfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut pollfd, 1, 0) };
    rc > 0 && pollfd.revents & libc::POLLERR != 0
}
