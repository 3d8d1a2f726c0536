//! The vhost-user-fs device: virtqueues in, FUSE requests to [`FsServer`], replies out.
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT); queues 1..=N are request queues. The
//! backend offers `1 + max_request_queues` queues and the frontend enables as many as it was
//! configured with (QEMU's `num-request-queues`). Every queue gets its own worker thread from
//! vhost-user-backend (one bit per thread in `queues_per_thread`), so requests on different
//! queues never wait for each other. With `--thread-pool-size` above 1 the queue threads hand
//! each request to a shared pool instead of serving it inline, so that one slow or blocking
//! request (a waiting lock, a slow disk) does not hold up the rest of its queue.

use std::io;
use std::num::Wrapping;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::io::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use berth_passthrough::FsServer;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringMutex, VringState, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap, Le32,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cli::MAX_TAG_LEN;
use crate::fast_io::{self, ChainLayout};
use crate::pool::WorkerPool;
use berth_seccomp::{SeccompAction, ThreadRole};

/// Largest queue the frontend may configure (virtiofsd offers the same).
const MAX_QUEUE_SIZE: usize = 32768;
/// Index of the high-priority queue.
const HIPRIO_QUEUE: usize = 0;
/// Name of the thread vhost-user-backend runs the control messages on.
const CONTROL_THREAD_NAME: &str = "berth-vhost-user";
/// How long the queue threads may take to install their seccomp filters at start-up.
const CONFINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Jobs that may wait for a free pool thread, per pool thread.
const POOL_BACKLOG_PER_THREAD: usize = 16;

type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
type MemoryGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;
type Vring = VringMutex<GuestMemory>;

/// The virtio-fs device configuration space (virtio spec 5.11.4).
#[repr(C)]
#[derive(Clone, Copy)]
struct VirtioFsConfig {
    tag: [u8; MAX_TAG_LEN],
    num_request_queues: Le32,
}

// SAFETY: plain old data with no padding (36 bytes + a 4-byte little-endian integer).
unsafe impl ByteValued for VirtioFsConfig {}

/// Options of the device, from the command line.
pub struct DeviceOptions {
    pub tag: Option<String>,
    pub max_request_queues: u16,
    pub thread_pool_size: usize,
    /// Busy-poll window after a batch of requests, in microseconds (0: sleep at once).
    pub poll_us: u32,
    /// What the queue threads' seccomp filters do with a system call they do not allow.
    pub seccomp: SeccompAction,
}

/// berth's vhost-user-fs backend.
pub struct FsBackend {
    server: Arc<FsServer>,
    tag: Option<String>,
    num_request_queues: usize,
    memory: RwLock<Option<GuestMemory>>,
    event_idx: AtomicBool,
    /// The backend-to-frontend channel, kept for DAX window mappings (not served yet).
    #[allow(dead_code)]
    backend_req: Mutex<Option<Backend>>,
    pool: Option<WorkerPool>,
    poll: Duration,
    seccomp: SeccompAction,
    /// Per queue: whether its first request has been logged.
    queue_seen: Vec<AtomicBool>,
    /// Per queue thread: an eventfd that, once written, makes the thread install its seccomp
    /// filter (the library starts the threads, so this is the first thing they run of ours).
    confine_events: Vec<EventFd>,
    /// Where the queue threads report how installing their filter went.
    confine_reports: Mutex<Option<mpsc::Sender<Result<(), String>>>>,
    /// The consumer ends of the queue threads' exit events: vhost-user-backend 0.22 takes
    /// them as raw descriptors into its epoll sets and never closes them.
    exit_consumers: Mutex<Vec<RawFd>>,
}

impl FsBackend {
    pub fn new(server: Arc<FsServer>, options: DeviceOptions) -> anyhow::Result<Self> {
        let num_request_queues = usize::from(options.max_request_queues);
        let seccomp = options.seccomp;
        let pool = if options.thread_pool_size > 1 {
            Some(
                WorkerPool::new(
                    options.thread_pool_size,
                    options.thread_pool_size * POOL_BACKLOG_PER_THREAD,
                    move || {
                        berth_seccomp::install_filter(ThreadRole::ThreadPool, seccomp)
                            .map_err(|e| e.to_string())
                    },
                )
                .context("cannot start the request thread pool")?,
            )
        } else {
            None
        };
        let confine_events = (0..=num_request_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .context("cannot create the queue threads' start-up events")?;
        Ok(FsBackend {
            server,
            tag: options.tag,
            num_request_queues,
            memory: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            backend_req: Mutex::new(None),
            pool,
            poll: Duration::from_micros(u64::from(options.poll_us)),
            seccomp: options.seccomp,
            queue_seen: (0..=num_request_queues)
                .map(|_| AtomicBool::new(false))
                .collect(),
            confine_events,
            confine_reports: Mutex::new(None),
            exit_consumers: Mutex::new(Vec::new()),
        })
    }

    /// Closes the exit-event descriptors the library leaks, once the daemon that used this
    /// backend is dropped (its queue threads joined). berth serves one connection per process
    /// and never needs this; a process that creates daemon after daemon (the fuzzer) would run
    /// out of descriptors without it, and then start queue threads that cannot be stopped.
    #[allow(dead_code)] // Used by the fuzz harness, which builds this file as a library.
    pub fn reclaim_exit_events(&self) {
        let mut fds = self
            .exit_consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for fd in fds.drain(..) {
            // SAFETY: the library converted these descriptors into raw numbers it never
            // closes; with its threads joined nothing refers to them any more.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// The event id that tells a queue thread to confine itself: above the queues and the
    /// library's exit event (`num_queues()`), as `register_listener` requires.
    fn confine_event_id(&self) -> u16 {
        (self.num_queues() + 1) as u16
    }

    /// Has every queue thread of `daemon` install the queue worker filter before any frontend
    /// connects, and fails if one cannot.
    fn confine_queue_threads(
        &self,
        daemon: &VhostUserDaemon<Arc<FsBackend>>,
    ) -> anyhow::Result<()> {
        if self.seccomp == SeccompAction::None {
            return Ok(());
        }
        let (reports, received) = mpsc::channel();
        *self
            .confine_reports
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(reports);
        let handlers = daemon.get_epoll_handlers();
        for (thread, handler) in handlers.iter().enumerate() {
            let event = self
                .confine_events
                .get(thread)
                .ok_or_else(|| anyhow!("queue thread {thread} has no start-up event"))?;
            handler
                .register_listener(
                    event.as_raw_fd(),
                    EventSet::IN,
                    u64::from(self.confine_event_id()),
                )
                .with_context(|| format!("cannot reach queue thread {thread}"))?;
            event
                .write(1)
                .with_context(|| format!("cannot wake queue thread {thread}"))?;
        }
        for _ in &handlers {
            match received.recv_timeout(CONFINE_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(anyhow!(e)),
                Err(_) => {
                    return Err(anyhow!(
                        "the queue threads did not install their seccomp filters within \
                         {CONFINE_TIMEOUT:?}"
                    ))
                }
            }
        }
        Ok(())
    }

    /// Runs on a queue thread when its start-up event fires.
    fn confine_this_queue_thread(&self, thread: usize) {
        if let Some(event) = self.confine_events.get(thread) {
            // Level-triggered: drain it, or the thread would be woken again and again.
            let _ = event.read();
        }
        let outcome = berth_seccomp::install_filter(ThreadRole::QueueWorker, self.seccomp)
            .map_err(|e| format!("queue thread {thread}: {e}"));
        let reports = self
            .confine_reports
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(reports) = reports.as_ref() {
            let _ = reports.send(outcome);
        }
    }

    fn config_space(&self) -> VirtioFsConfig {
        let mut config = VirtioFsConfig {
            tag: [0; MAX_TAG_LEN],
            num_request_queues: Le32::from(self.num_request_queues as u32),
        };
        if let Some(tag) = &self.tag {
            // The command line checked the length; never overrun the field regardless.
            let len = tag.len().min(MAX_TAG_LEN);
            config.tag[..len].copy_from_slice(&tag.as_bytes()[..len]);
        }
        config
    }

    fn guest_memory(&self) -> Option<MemoryGuard> {
        let memory = self.memory.read().unwrap_or_else(|e| e.into_inner());
        memory.as_ref().map(|m| m.memory())
    }

    /// Serves everything available on one queue, re-checking after re-enabling notifications
    /// so that a request added in between is not left waiting for a kick that never comes.
    fn serve_queue(&self, queue: usize, vring: &Vring) {
        let Some(mem) = self.guest_memory() else {
            warn!(
                queue,
                "The frontend kicked a queue before sending the guest memory table; ignoring it."
            );
            return;
        };
        if !self.queue_seen[queue].swap(true, Ordering::Relaxed) {
            let kind = if queue == HIPRIO_QUEUE {
                "high-priority"
            } else {
                "request"
            };
            info!(queue, "The frontend started using {kind} queue {queue}.");
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut handled = 0usize;
        loop {
            let before = handled;
            self.serve_until_empty(queue, vring, &mem, event_idx, &mut handled);
            // A guest that just got a reply often sends the next request within microseconds:
            // waiting briefly here saves both sides a sleep and a wake-up.
            if handled == before || self.poll.is_zero() || !self.poll_for_work(vring, &mem) {
                break;
            }
        }
        if handled > 0 {
            debug!(queue, handled, "served requests");
        }
    }

    /// Spins up to the poll window; true when the guest made a new request available.
    fn poll_for_work(&self, vring: &Vring, mem: &MemoryGuard) -> bool {
        let deadline = Instant::now() + self.poll;
        loop {
            let pending = {
                let state = vring.get_mut();
                let queue = state.get_queue();
                queue
                    .avail_idx(&**mem, Ordering::Acquire)
                    .map(|avail| avail != Wrapping(queue.next_avail()))
                    .unwrap_or(false)
            };
            if pending {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn serve_until_empty(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &MemoryGuard,
        event_idx: bool,
        handled: &mut usize,
    ) {
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    warn!(queue, "Cannot disable queue notifications: {e}.");
                }
            }
            *handled += self.drain_queue(queue, vring, mem, event_idx);
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(queue, "Cannot re-enable queue notifications: {e}.");
                    break;
                }
            }
        }
    }

    fn drain_queue(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &MemoryGuard,
        event_idx: bool,
    ) -> usize {
        let mut handled = 0;
        loop {
            let (chain, desc_table) = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                let desc_table = queue.desc_table();
                (queue.pop_descriptor_chain(mem.clone()), desc_table)
            };
            let Some(chain) = chain else {
                return handled;
            };
            handled += 1;
            let head_flags = head_descriptor_flags(mem, desc_table, chain.head_index());
            match &self.pool {
                Some(pool) => {
                    let server = self.server.clone();
                    let vring = vring.clone();
                    let mem = mem.clone();
                    pool.execute(Box::new(move || {
                        let head = chain.head_index();
                        let used = serve_request(&server, queue, &mem, chain, head_flags);
                        complete_request(queue, &mut vring.get_mut(), head, used, event_idx);
                    }));
                }
                None => {
                    let head = chain.head_index();
                    let used = serve_request(&self.server, queue, mem, chain, head_flags);
                    complete_request(queue, &mut vring.get_mut(), head, used, event_idx);
                }
            }
        }
    }
}

thread_local! {
    static CONTROL_FILTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs the control thread's filter the first time the library calls into the backend
/// from it (GET_FEATURES opens every session); the library starts that thread itself. Under
/// `--seccomp kill` a filter that cannot be installed ends the daemon: serving the VMM with a
/// wider filter than promised is not an option.
fn confine_control_thread(action: SeccompAction) {
    if action == SeccompAction::None || std::thread::current().name() != Some(CONTROL_THREAD_NAME) {
        return;
    }
    CONTROL_FILTERED.with(|done| {
        if done.replace(true) {
            return;
        }
        if let Err(e) = berth_seccomp::install_filter(ThreadRole::VhostUserControl, action) {
            if action == SeccompAction::Kill {
                error!("{e}; exiting.");
                std::process::exit(1);
            }
            warn!("{e}; the control thread keeps the main thread's filter.");
        }
    });
}

/// Runs one FUSE request and returns the number of reply bytes written into the chain. A chain
/// that cannot be decoded is returned with nothing written: there is nowhere to put a reply.
pub(crate) fn serve_request(
    server: &FsServer,
    queue: usize,
    mem: &MemoryGuard,
    chain: DescriptorChain<MemoryGuard>,
    head_flags: Option<u16>,
) -> u32 {
    let head = chain.head_index();
    let mut layout = ChainLayout::new();
    match layout.walk(&chain, head_flags) {
        Ok(()) => {}
        Err(reason) => {
            warn!(
                queue,
                head, "Dropping a malformed descriptor chain: {reason}."
            );
            return 0;
        }
    }
    // A bug in request decoding must cost one request, not the queue's thread.
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        if let Some(written) = fast_io::try_serve(server, mem, &layout) {
            return Ok(Some(written as usize));
        }
        let reader = match Reader::from_descriptor_chain(&**mem, chain.clone()) {
            Ok(reader) => reader,
            Err(e) => {
                warn!(
                    queue,
                    head, "Dropping a request whose readable descriptors are invalid: {e}."
                );
                return Ok(None);
            }
        };
        let writer = match VirtioFsWriter::new(&**mem, chain) {
            Ok(writer) => writer,
            Err(e) => {
                warn!(
                    queue,
                    head, "Dropping a request whose writable descriptors are invalid: {e}."
                );
                return Ok(None);
            }
        };
        server.handle_message(reader, writer.into(), None).map(Some)
    }));
    match result {
        Ok(Ok(written)) => written.and_then(|w| u32::try_from(w).ok()).unwrap_or(0),
        Ok(Err(e)) => {
            warn!(queue, head, "Could not serve a request: {e}.");
            0
        }
        Err(_) => {
            error!(
                queue,
                head, "Serving a request panicked; the request was dropped."
            );
            0
        }
    }
}

/// The flags of the chain's head descriptor in the queue's descriptor table (`None` when the
/// table cannot be read there).
pub(crate) fn head_descriptor_flags(mem: &MemoryGuard, desc_table: u64, head: u16) -> Option<u16> {
    // A split-ring descriptor is 16 bytes: address, length, then the 16-bit flags.
    let addr = desc_table.checked_add(u64::from(head) * 16 + 12)?;
    vm_memory::Bytes::read_obj::<u16>(&**mem, vm_memory::GuestAddress(addr)).ok()
}

/// Puts a served chain on the used ring and tells the guest if it asked to be told.
fn complete_request(
    queue: usize,
    vring: &mut VringState<GuestMemory>,
    head: u16,
    used: u32,
    event_idx: bool,
) {
    if let Err(e) = vring.add_used(head, used) {
        warn!(
            queue,
            head, "Cannot return a descriptor chain to the used ring: {e}."
        );
        return;
    }
    let notify = !event_idx
        || vring.needs_notification().unwrap_or_else(|e| {
            warn!(
                queue,
                "Cannot tell whether the guest wants a notification ({e}); sending one."
            );
            true
        });
    if notify {
        if let Err(e) = vring.signal_used_queue() {
            warn!(queue, "Cannot notify the guest of used descriptors: {e}.");
        }
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        1 + self.num_request_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        confine_control_thread(self.seccomp);
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        confine_control_thread(self.seccomp);
        let mut features = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::BACKEND_SEND_FD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.tag.is_some() {
            features |= VhostUserProtocolFeatures::CONFIG;
        }
        features
    }

    fn acked_features(&self, _features: u64) {
        confine_control_thread(self.seccomp);
    }

    fn set_event_idx(&self, enabled: bool) {
        confine_control_thread(self.seccomp);
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        confine_control_thread(self.seccomp);
        let config = self.config_space();
        let mut bytes: Vec<u8> = config
            .as_slice()
            .iter()
            .skip(offset as usize)
            .take(size as usize)
            .copied()
            .collect();
        bytes.resize(size as usize, 0);
        bytes
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the virtio-fs configuration space is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        confine_control_thread(self.seccomp);
        *self.memory.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        confine_control_thread(self.seccomp);
        *self.backend_req.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|queue| 1u64 << queue).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                self.exit_consumers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(pair.0.as_raw_fd());
                Some(pair)
            }
            Err(e) => {
                error!("Cannot create a queue thread's exit event: {e}.");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned from here stop the queue's thread, so problems are logged instead.
        if evset != EventSet::IN {
            warn!(
                queue = thread_id,
                "Ignoring an unexpected queue event {evset:?}."
            );
            return Ok(());
        }
        if device_event == self.confine_event_id() {
            self.confine_this_queue_thread(thread_id);
            return Ok(());
        }
        // One queue per thread: the thread index is the queue index, the event its only vring.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.serve_queue(thread_id, vring),
            None => warn!(
                queue = thread_id,
                "Ignoring an event for unknown vring {device_event}."
            ),
        }
        Ok(())
    }
}

/// Serves one frontend connection on `listener` until it disconnects.
pub fn serve(
    server: Arc<FsServer>,
    options: DeviceOptions,
    mut listener: Listener,
) -> anyhow::Result<()> {
    let queues = options.max_request_queues;
    let backend = Arc::new(FsBackend::new(server, options)?);
    let mut daemon = VhostUserDaemon::new(
        CONTROL_THREAD_NAME.to_owned(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| anyhow!("cannot set up the vhost-user device: {e}"))?;
    backend
        .confine_queue_threads(&daemon)
        .context("cannot confine the queue threads")?;

    info!(
        "Waiting for the vhost-user frontend to connect (offering up to {queues} request queues)."
    );
    daemon
        .start(&mut listener)
        .map_err(|e| anyhow!("cannot accept the vhost-user frontend connection: {e}"))?;
    info!("The frontend connected; serving requests.");

    let result = daemon.wait();
    // Dropping the daemon joins the queue threads, and one may be blocked in a host call (a
    // lock wait) indefinitely; the process exits right after this, so skip the join.
    std::mem::forget(daemon);
    match result {
        Ok(()) => {
            info!("The frontend disconnected; shutting down.");
            Ok(())
        }
        Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => {
            info!("The frontend disconnected; shutting down.");
            Ok(())
        }
        Err(e) => Err(anyhow!("the vhost-user connection failed: {e}")),
    }
}

/// A listening socket inherited from the parent (Kata's `--fd=3`), checked before use.
pub fn listener_from_fd(fd: i32) -> anyhow::Result<Listener> {
    // SAFETY: libc::stat is plain old data; all-zero bytes are a valid value.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes into `stat`; an invalid descriptor yields EBADF.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(anyhow!(
            "--fd {fd} is not an open file descriptor: {}",
            io::Error::last_os_error()
        ));
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(anyhow!("--fd {fd} is not a socket"));
    }
    let int_option = |level, name| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` describe a valid c_int buffer for getsockopt.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    let domain = int_option(libc::SOL_SOCKET, libc::SO_DOMAIN)
        .with_context(|| format!("cannot inspect the socket --fd {fd}"))?;
    if domain != libc::AF_UNIX {
        return Err(anyhow!("--fd {fd} is not a unix domain socket"));
    }
    let listening = int_option(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
        .with_context(|| format!("cannot inspect the socket --fd {fd}"))?;
    if listening == 0 {
        return Err(anyhow!("--fd {fd} is a socket but is not listening"));
    }
    // The vhost crate's accept loop spins on EAGAIN, so the socket must block; and the
    // descriptor should not leak into anything berth runs (e.g. fusermount).
    // SAFETY: plain fcntl calls on a descriptor checked above.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(anyhow!(
                "cannot make --fd {fd} blocking: {}",
                io::Error::last_os_error()
            ));
        }
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: the descriptor is an open listening unix socket that nothing else in this
    // process owns; the Listener takes ownership of it.
    Ok(unsafe { <Listener as std::os::unix::io::FromRawFd>::from_raw_fd(fd) })
}

/// The socket file berth created at `--socket-path`, removed when berth exits.
///
/// Inside the sandbox the path no longer names it (the shared directory is the root by then,
/// and the same path there may be a guest's file), so a descriptor on its directory is kept
/// and only the socket with the inode berth bound is unlinked.
pub struct SocketFile {
    dir: std::os::fd::OwnedFd,
    name: std::ffi::CString,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn new(path: &std::path::Path) -> anyhow::Result<SocketFile> {
        use std::os::unix::ffi::OsStrExt;
        let parent = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => parent.to_owned(),
            None => std::path::PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("the socket path {} names no file", path.display()))?;
        let name = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| anyhow!("the socket path {} contains a NUL byte", path.display()))?;
        let dir = std::os::unix::fs::OpenOptionsExt::custom_flags(
            std::fs::OpenOptions::new().read(true),
            libc::O_PATH | libc::O_DIRECTORY,
        )
        .open(&parent)
        .with_context(|| format!("cannot open the socket's directory {}", parent.display()))?;
        let metadata = std::fs::symlink_metadata(path)
            .with_context(|| format!("cannot inspect the socket {}", path.display()))?;
        Ok(SocketFile {
            dir: dir.into(),
            name,
            dev: std::os::unix::fs::MetadataExt::dev(&metadata),
            ino: std::os::unix::fs::MetadataExt::ino(&metadata),
        })
    }

    /// Unlinks the socket if it is still the one berth created (not a file or a newer
    /// daemon's socket put there since).
    pub fn remove(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: libc::stat is plain old data; all-zero bytes are a valid value.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `name` is NUL-terminated, `stat` a valid out-buffer; the result is checked.
        let found = unsafe {
            libc::fstatat(
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
                &mut stat,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        } == 0;
        if found
            && stat.st_mode & libc::S_IFMT == libc::S_IFSOCK
            && stat.st_dev == self.dev
            && stat.st_ino == self.ino
        {
            // SAFETY: as above; removing the socket berth bound.
            if unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } != 0 {
                warn!(
                    "Cannot remove the socket file: {}.",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

/// Creates the vhost-user socket at `path`: replaces a stale socket file, but refuses one that
/// a live process is listening on. The socket is accessible to its owner (and `group`) only.
/// The returned [`SocketFile`] removes it again; the listener itself never touches the path.
pub fn listener_at_path(
    path: &std::path::Path,
    group: Option<&str>,
) -> anyhow::Result<(Listener, SocketFile)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(anyhow!(
                "cannot create the socket {}: {} is not a directory",
                path.display(),
                parent.display()
            ));
        }
    }
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()) {
            return Err(anyhow!(
                "cannot create the socket {}: a file that is not a socket is in the way",
                path.display()
            ));
        }
    }
    if socket_is_listening(path) {
        return Err(anyhow!(
            "the socket {} is in use by another process",
            path.display()
        ));
    }
    let gid = group.map(lookup_group).transpose()?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(anyhow!(
                "cannot replace the stale socket {}: {e}",
                path.display()
            ))
        }
    }
    let mask = if gid.is_some() { 0o007 } else { 0o077 };
    // The socket is bound under a temporary name and renamed into place once it listens and
    // has its final owner: a VMM (or libvirt) that connects as soon as the path appears must
    // never find a socket that is bound but not yet listening (ECONNREFUSED).
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("the socket path {} names no file", path.display()))?;
    let staging = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    // SAFETY: umask has no memory effects; it is restored right after the bind.
    let old_mask = unsafe { libc::umask(mask) };
    let bound = std::os::unix::net::UnixListener::bind(&staging);
    // SAFETY: as above.
    unsafe { libc::umask(old_mask) };
    let listener =
        bound.map_err(|e| anyhow!("cannot create the socket {}: {e}", path.display()))?;
    let placed = gid
        .map(|gid| {
            std::os::unix::fs::chown(&staging, None, Some(gid)).with_context(|| {
                format!("cannot give the socket {} to group {gid}", path.display())
            })
        })
        .transpose()
        .and_then(|_| {
            std::fs::rename(&staging, path)
                .with_context(|| format!("cannot create the socket {}", path.display()))
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    let socket_file = SocketFile::new(path)?;
    // Built from the socket itself, the Listener has no path to remove when dropped (its own
    // removal would resolve the path inside the sandbox): `socket_file` removes it.
    Ok((Listener::from(listener), socket_file))
}

fn lookup_group(name: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(name)
        .map_err(|_| anyhow!("the socket group name '{name}' contains a NUL byte"))?;
    // SAFETY: libc::group is plain old data; all-zero bytes (null pointers) are a valid value.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: all pointers are valid for the sizes given; getgrnam_r fills `group`/`result`.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Ok(group.gr_gid);
    }
    name.parse::<u32>()
        .map_err(|_| anyhow!("the socket group '{name}' does not exist"))
}

/// Whether a process is listening on the unix socket at `path` (per /proc/net/unix), found
/// without connecting: a connection would be taken as a frontend by a vhost-user daemon.
fn socket_is_listening(path: &std::path::Path) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if !std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()) {
        return false;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(flags), Some(bound)) = (fields.get(3), fields.get(7)) else {
            return false;
        };
        let listening = u32::from_str_radix(flags, 16).is_ok_and(|f| f & SO_ACCEPTCON != 0);
        listening && std::path::Path::new(bound) == absolute
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_passthrough::{Config, PassthroughFs};
    use std::fs::File;

    fn backend(tag: Option<&str>, queues: u16) -> FsBackend {
        let fs = PassthroughFs::new(Config {
            root_dir: std::env::temp_dir(),
            ..Config::default()
        })
        .expect("the filesystem opens the temp dir");
        FsBackend::new(
            Arc::new(FsServer::new(fs)),
            DeviceOptions {
                tag: tag.map(str::to_owned),
                max_request_queues: queues,
                thread_pool_size: 0,
                poll_us: 0,
                seccomp: SeccompAction::None,
            },
        )
        .unwrap()
    }

    #[test]
    fn one_thread_per_queue() {
        let b = backend(None, 3);
        assert_eq!(b.num_queues(), 4);
        assert_eq!(b.queues_per_thread(), vec![0b1, 0b10, 0b100, 0b1000]);
    }

    #[test]
    fn config_space_holds_tag_and_queue_count() {
        let b = backend(Some("myfs"), 5);
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
        let config = b.get_config(0, 40);
        assert_eq!(&config[..4], b"myfs");
        assert!(config[4..36].iter().all(|&b| b == 0));
        assert_eq!(&config[36..40], &5u32.to_le_bytes());
        // Partial and out-of-range reads are padded, never panic.
        assert_eq!(b.get_config(36, 4), 5u32.to_le_bytes().to_vec());
        assert_eq!(b.get_config(38, 8), vec![0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.get_config(u32::MAX, 2), vec![0, 0]);
    }

    #[test]
    fn config_feature_only_with_tag() {
        let b = backend(None, 1);
        let features = b.protocol_features();
        assert!(!features.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(features.contains(
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::BACKEND_SEND_FD
        ));
        let virtio = b.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(virtio & (1 << bit), 0, "feature bit {bit}");
        }
        assert_ne!(
            virtio & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
    }

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vfs.sock");
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = listener_at_path(&path, None)
            .err()
            .expect("a live socket is refused");
        assert!(err.to_string().contains("in use"), "{err}");
        drop(live); // the file stays behind: a stale socket
        assert!(path.exists());
        let (listener, socket_file) =
            listener_at_path(&path, None).expect("a stale socket is replaced");
        let not_socket = dir.path().join("precious");
        std::fs::write(&not_socket, b"data").unwrap();
        assert!(listener_at_path(&not_socket, None).is_err());
        assert_eq!(std::fs::read(&not_socket).unwrap(), b"data");
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        // It appears listening, under its name, with no staging file left behind.
        std::os::unix::net::UnixStream::connect(&path).expect("the socket listens");
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["precious", "vfs.sock"]);
        drop(listener);
        assert!(path.exists(), "dropping the listener leaves the path alone");
        // Only the socket berth bound is removed: not a file that took its place.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        socket_file.remove();
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
        std::fs::remove_file(&path).unwrap();
        let (_listener, socket_file) = listener_at_path(&path, None).unwrap();
        socket_file.remove();
        assert!(!path.exists(), "berth's own socket is removed");
    }

    #[test]
    fn a_socket_group_owns_the_socket_and_may_connect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grouped.sock");
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let (listener, _socket_file) =
            listener_at_path(&path, Some(&gid.to_string())).expect("the socket");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o770
        );
        drop(listener);
    }

    #[test]
    fn inherited_fd_must_be_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("plain")).unwrap();
        let err = listener_from_fd(std::os::unix::io::AsRawFd::as_raw_fd(&file))
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a socket"), "{err}");
        let err = listener_from_fd(-1).err().unwrap();
        assert!(
            err.to_string().contains("not an open file descriptor"),
            "{err}"
        );
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = listener_from_fd(std::os::unix::io::AsRawFd::as_raw_fd(&a))
            .err()
            .unwrap();
        assert!(err.to_string().contains("not listening"), "{err}");
    }
}
