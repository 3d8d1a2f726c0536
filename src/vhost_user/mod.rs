//! The vhost-user-fs device: virtqueues in, FUSE requests to [`FsServer`], replies out.
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT); queues 1..=N are request queues. The
//! backend offers `1 + max_request_queues` queues and the frontend enables as many as it was
//! configured with (QEMU's `num-request-queues`). Every queue gets its own worker thread from
//! vhost-user-backend (one bit per thread in `queues_per_thread`), so requests on different
//! queues never wait for each other. With `--thread-pool-size` above 1 the queue threads hand
//! each request to a shared pool instead of serving it inline, so that one slow or blocking
//! request (a slow disk) does not hold up the rest of its queue. Lock requests that may wait
//! (with `--posix-lock` or `--flock`) go to threads of their own in any case: the request
//! that lets go of the lock may be behind them on the queue, or in the pool's backlog.
//!
//! [`queue`] serves a queue, [`chain`] turns a descriptor chain into the byte segments the
//! FUSE server reads requests from and writes replies into, [`socket`] sets up the listening
//! socket, [`dax`] connects the DAX window (`--dax-window`) to the backend request channel.
//!
//! A device reset (GET_VRING_BASE on every queue, then the queues started again, as QEMU does
//! when a guest reboots) keeps the guest's inodes and open files: a paused VM (`stop`/`cont`)
//! or a failed migration stops and restarts the queues the same way and must find them. The
//! rebooted guest's new FUSE_INIT is what drops them (see the server's session handling);
//! RESET_DEVICE drops them at once.

mod chain;
mod dax;
mod dax_watch;
mod metrics;
mod parked;
mod queue;
mod socket;
mod state;
mod versions;

#[allow(unused_imports)] // The fuzz harness builds this module and drives requests directly.
pub(crate) use queue::{head_descriptor_flags, serve_request};
pub use socket::{listener_at_path, listener_from_fd};

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use berth_passthrough::FsServer;
use tracing::{error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserShMemConfig, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, Error as VhostUserError, Listener};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringMutex, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{
    ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap, Le32,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::cli::MAX_TAG_LEN;
use crate::metrics_file::{MetricsFile, MetricsWriter};
use crate::pool::{self, WorkerPool};
use crate::vring_events::{handle_queue_event, QueueConfinement, QueueThreads};
use berth_seccomp::{SeccompAction, ThreadRole};
use dax::VhostDax;
use versions::VersionsRegion;

/// Largest queue the frontend may configure (virtiofsd offers the same).
const MAX_QUEUE_SIZE: usize = 32768;
/// Index of the high-priority queue.
const HIPRIO_QUEUE: usize = 0;
/// Name of the thread vhost-user-backend runs the control messages on.
const CONTROL_THREAD_NAME: &str = "berth-vhost-user";
/// How long GET_VRING_BASE waits for a queue's requests still being served (one may be
/// waiting for a lock indefinitely).
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Guest memory with a dirty-page bitmap per region: while the frontend has installed a log
/// (SET_LOG_BASE, during migration) every write through it is marked there.
pub(crate) type LoggedMemory = GuestMemoryMmap<BitmapMmapRegion>;
type GuestMemory = GuestMemoryAtomic<LoggedMemory>;
type MemoryGuard = GuestMemoryLoadGuard<LoggedMemory>;
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

/// Requests taken from one queue and not yet returned to it.
#[derive(Default, Clone)]
struct InFlight(Arc<AtomicUsize>);

/// One request in flight; returned when dropped.
struct InFlightRequest(Arc<AtomicUsize>);

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InFlight {
    fn start(&self) -> InFlightRequest {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightRequest(self.0.clone())
    }

    /// Waits until none is left, up to `timeout`; returns how many are left.
    fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.0.load(Ordering::Acquire);
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Options of the device, from the command line.
pub struct DeviceOptions {
    pub tag: Option<String>,
    pub max_request_queues: u16,
    pub thread_pool_size: usize,
    /// Busy-poll window after a batch of requests, in microseconds (0: sleep at once).
    pub poll_us: u32,
    /// What the queue threads' seccomp filters do with a system call they do not allow.
    pub seccomp: SeccompAction,
    /// Bytes in the DAX window (shared memory region 0); 0: no window.
    pub dax_window: u64,
    /// The shared version table offered to the guest as shared memory region 1
    /// (`--shared-cache`).
    pub versions: Option<Arc<berth_versions::VersionTable>>,
    /// `--metrics-file` (opened before the sandbox) and how often it is rewritten.
    pub(crate) metrics: Option<(MetricsFile, Duration)>,
}

/// berth's vhost-user-fs backend.
pub struct FsBackend {
    server: Arc<FsServer>,
    tag: Option<String>,
    num_request_queues: usize,
    memory: Arc<RwLock<Option<GuestMemory>>>,
    event_idx: Arc<AtomicBool>,
    /// Each queue's vring, as its thread first saw it: for answering a parked lock request,
    /// whose wait does not run on the queue's thread.
    vrings: Arc<Vec<OnceLock<Vring>>>,
    /// The DAX window, when `--dax-window` asks for one; it holds the backend request
    /// channel its mappings go through.
    dax: Option<Arc<VhostDax>>,
    /// The version table as shared memory region 1, with `--shared-cache`.
    versions: Option<VersionsRegion>,
    /// The frontend acknowledged VHOST_F_LOG_ALL: it is migrating the guest and wants every
    /// page berth writes marked in the dirty log. Read after a reply is written, so a reply
    /// written before logging started is covered by the migration's first full copy.
    logging: Arc<AtomicBool>,
    pool: Option<WorkerPool>,
    /// With host locks (`--posix-lock`, `--flock`): the threads SETLKW requests wait on, so
    /// that a waiting one holds up neither its queue nor the pool.
    lock_waiters: Option<WorkerPool>,
    poll: Duration,
    seccomp: SeccompAction,
    /// The queue threads' seccomp role (with the backend request channel when DAX is on).
    queue_role: ThreadRole,
    /// Per queue: started (its first request logged) and not stopped since.
    queue_started: Vec<AtomicBool>,
    /// Per queue: requests being served (resumed lock requests included).
    in_flight: Vec<InFlight>,
    /// Makes each queue thread install its seccomp filter (the library starts the threads,
    /// so this is the first thing they run of ours).
    confinement: QueueConfinement,
    /// Saves and loads the filesystem's state for live migration.
    state: state::StateTransfer,
    /// The consumer ends of the queue threads' exit events: vhost-user-backend 0.24 takes
    /// them as raw descriptors into its epoll sets and never closes them.
    exit_consumers: Mutex<Vec<RawFd>>,
}

impl FsBackend {
    /// A guest with ranges of the DAX window mapped cannot move: the destination's window
    /// would not have them, and the guest's next load from one would fault in the VMM. The
    /// save is refused, so the frontend cancels the migration and the guest runs on here.
    /// (No VMM migrates a device with a DAX window yet: QEMU 11.1's generic vhost-user
    /// device blocks migration ("non-migratable device"), its vhost-user-fs device has no window.)
    fn refuse_to_save_dax_mappings(&self) -> io::Result<()> {
        let live = self.dax.as_ref().map_or(0, |dax| dax.metrics().live_ranges);
        if live == 0 {
            return Ok(());
        }
        let reason = format!(
            "Refusing to save the device state: the guest has {live} ranges of the DAX window \
             mapped, and berth cannot carry DAX mappings to another VMM's window. Unmount the \
             share (or mount it with dax=never) before migrating this guest."
        );
        warn!("{reason}");
        Err(io::Error::new(io::ErrorKind::Unsupported, reason))
    }

    pub fn new(server: Arc<FsServer>, options: DeviceOptions) -> anyhow::Result<Self> {
        let num_request_queues = usize::from(options.max_request_queues);
        let seccomp = options.seccomp;
        let dax = match options.dax_window {
            0 => None,
            size => Some(Arc::new(
                VhostDax::new(size, server.fs().clone())
                    .map_err(|e| anyhow!("cannot set up the DAX window: {e}"))?,
            )),
        };
        if let Some(dax) = &dax {
            dax.start_watcher(seccomp)
                .context("cannot start the DAX reclaim thread")?;
        }
        if dax.is_some() && server.fs().is_read_only() {
            warn!(
                "The DAX window of a --readonly share only holds read-only descriptors, which \
                 QEMU 11.1 cannot map (it maps every window range writable): its guests need \
                 mounts without dax."
            );
        }
        let (queue_role, pool_role) = if dax.is_some() {
            (ThreadRole::DaxQueueWorker, ThreadRole::DaxThreadPool)
        } else {
            (ThreadRole::QueueWorker, ThreadRole::ThreadPool)
        };
        let start_pool = |size: usize| {
            WorkerPool::start(size, move || {
                berth_seccomp::install_filter(pool_role, seccomp).map_err(|e| e.to_string())
            })
        };
        let pool = if options.thread_pool_size > 1 {
            Some(
                start_pool(options.thread_pool_size)
                    .context("cannot start the request thread pool")?,
            )
        } else {
            None
        };
        let lock_waiters = if server.fs().holds_host_locks() {
            Some(start_pool(pool::LOCK_WAITERS).context("cannot start the lock waiting threads")?)
        } else {
            None
        };
        let confinement = QueueConfinement::new(num_request_queues + 1, num_request_queues + 1)?;
        let state = state::StateTransfer::start(server.clone(), seccomp, num_request_queues + 1)?;
        let versions = match options.versions {
            Some(table) => {
                let region = VersionsRegion::start(table, seccomp)?;
                if !server.offer_shared_versions() {
                    return Err(anyhow!(
                        "the version table is offered to the guest but the filesystem does not use it"
                    ));
                }
                Some(region)
            }
            None => None,
        };
        Ok(FsBackend {
            versions,
            state,
            server,
            tag: options.tag,
            num_request_queues,
            memory: Arc::new(RwLock::new(None)),
            event_idx: Arc::new(AtomicBool::new(false)),
            vrings: Arc::new((0..=num_request_queues).map(|_| OnceLock::new()).collect()),
            dax,
            queue_role,
            logging: Arc::new(AtomicBool::new(false)),
            pool,
            lock_waiters,
            poll: Duration::from_micros(u64::from(options.poll_us)),
            seccomp: options.seccomp,
            queue_started: (0..=num_request_queues)
                .map(|_| AtomicBool::new(false))
                .collect(),
            in_flight: (0..=num_request_queues)
                .map(|_| InFlight::default())
                .collect(),
            confinement,
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

    /// Has every queue thread of `daemon` install the queue worker filter before any frontend
    /// connects, and fails if one cannot.
    fn confine_queue_threads(
        &self,
        daemon: &VhostUserDaemon<Arc<FsBackend>>,
    ) -> anyhow::Result<()> {
        // Without filters the start-up event still runs: it shows each thread its vring.
        self.confinement.confine_all(&daemon.get_epoll_handlers())
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

impl FsBackend {
    /// Parks the lock waits of `queue`'s requests, waits for the rest to be returned and
    /// marks it stopped; says so once every queue that was started is stopped.
    fn stop_queue(&self, queue: usize) {
        let (Some(in_flight), Some(started)) =
            (self.in_flight.get(queue), self.queue_started.get(queue))
        else {
            return;
        };
        // A SETLKW still waiting is neither answered after the stop nor waited for: its wait
        // is parked, to resume where the queue starts again (here, or on a migration
        // destination through the saved state).
        let base = self
            .vrings
            .get(queue)
            .and_then(OnceLock::get)
            .map_or(0, |vring| vring.get_ref().get_queue().next_avail());
        if let Ok(index) = u16::try_from(queue) {
            let parked = self.server.park_lock_waits(index, base);
            if parked > 0 {
                info!(
                    queue,
                    "{parked} lock requests of queue {queue} are waiting for their lock; they \
                     are answered once the queue starts again (or on the migration \
                     destination)."
                );
            }
        }
        let left = in_flight.wait_idle(STOP_TIMEOUT);
        if left > 0 {
            warn!(
                queue,
                "The frontend stopped queue {queue} while {left} of its requests were still \
                 being served (waited {STOP_TIMEOUT:?}); their replies may land after the stop."
            );
        }
        if started.swap(false, Ordering::AcqRel)
            && self
                .queue_started
                .iter()
                .all(|started| !started.load(Ordering::Acquire))
        {
            info!(
                "The frontend stopped every queue (a reset, pause or migration); the guest's \
                 files stay open until it starts a new FUSE session."
            );
        }
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = BitmapMmapRegion;
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
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        confine_control_thread(self.seccomp);
        let mut features = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::BACKEND_SEND_FD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::DEVICE_STATE;
        if self.tag.is_some() {
            features |= VhostUserProtocolFeatures::CONFIG;
        }
        if self.dax.is_some() || self.versions.is_some() {
            features |= VhostUserProtocolFeatures::SHMEM;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        confine_control_thread(self.seccomp);
        let logging = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if self.logging.swap(logging, Ordering::SeqCst) != logging {
            if logging {
                info!("The frontend started dirty-page logging (a migration is under way).");
            } else {
                info!("The frontend stopped dirty-page logging.");
            }
        }
    }

    /// RESET_DEVICE: the guest's session is over; the queues are disabled by the library.
    fn reset_device(&self) {
        confine_control_thread(self.seccomp);
        for queue in 0..self.num_queues() {
            self.stop_queue(queue);
        }
        info!("The frontend reset the device; dropping the guest's inodes, open files and locks.");
        if let Some(dax) = &self.dax {
            // Unmapped by the guest's next INIT: the VMM cannot take our requests while it
            // waits on this thread (see the dax module).
            let live = dax.metrics().live_ranges;
            if live > 0 {
                info!("{live} DAX window ranges stay mapped until the guest's next FUSE_INIT.");
            }
        }
        self.server.reset_session();
        if let Some(versions) = &self.versions {
            versions.device_reset();
        }
    }

    /// GET_VRING_BASE: the queue is stopped (unregistered, no longer ready). Requests still
    /// being served from it are waited for, so that none lands on its rings once the frontend
    /// has taken them back.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        confine_control_thread(self.seccomp);
        self.stop_queue(queue_index as usize);
        Ok(())
    }

    /// SET_DEVICE_STATE_FD: the transfer runs on the migration thread; the frontend reads or
    /// writes `file` after this returns and asks for the outcome with CHECK_DEVICE_STATE.
    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: std::fs::File,
    ) -> io::Result<Option<std::fs::File>> {
        confine_control_thread(self.seccomp);
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "berth transfers its state only with the device stopped",
            ));
        }
        if direction == VhostTransferStateDirection::SAVE {
            self.refuse_to_save_dax_mappings()?;
        }
        self.state.begin(direction, file)?;
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        confine_control_thread(self.seccomp);
        self.state.check()?;
        // A loaded state's waiting lock requests wait again at once (the queues they came
        // from are not stopped here); after a save they stay parked, their queues stopped.
        self.resume_parked_waits(None);
        Ok(())
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
        if let Some(versions) = &self.versions {
            versions.device_started();
        }
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        confine_control_thread(self.seccomp);
        if let Some(versions) = &self.versions {
            versions.set_channel(backend.clone());
        }
        if let Some(dax) = &self.dax {
            dax.set_channel(backend);
        }
    }

    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        confine_control_thread(self.seccomp);
        let window = self.dax.as_ref().map_or(0, |dax| dax.size());
        Ok(match &self.versions {
            // Region 0 stays the DAX window, empty without one.
            Some(versions) => VhostUserShMemConfig::new(2, &[window, versions.region_len()]),
            None if window > 0 => VhostUserShMemConfig::new(1, &[window]),
            None => VhostUserShMemConfig::default(),
        })
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
        handle_queue_event(self, device_event, evset, vrings, thread_id)
    }
}

impl QueueThreads for FsBackend {
    type Vring = Vring;

    fn confinement(&self) -> &QueueConfinement {
        &self.confinement
    }

    /// Keeps each queue's vring (from its thread's start-up event, before any frontend).
    fn saw_vrings(&self, thread: usize, vrings: &[Vring]) {
        // One queue per thread: the thread's only vring is its queue's.
        if let (Some(slot), Some(vring)) = (self.vrings.get(thread), vrings.first()) {
            slot.get_or_init(|| vring.clone());
        }
    }

    /// Runs on a queue thread when its start-up event fires.
    fn confine_this_queue_thread(&self, thread: usize) {
        self.confinement.on_event(thread, || {
            berth_seccomp::install_filter(self.queue_role, self.seccomp).map_err(|e| e.to_string())
        });
    }

    fn serve_queue(&self, queue: usize, vring: &Vring) {
        self.serve_kicked_queue(queue, vring);
    }
}

/// Serves one frontend connection on `listener` until it disconnects.
pub fn serve(
    server: Arc<FsServer>,
    mut options: DeviceOptions,
    mut listener: Listener,
) -> anyhow::Result<()> {
    let queues = options.max_request_queues;
    let metrics = options.metrics.take();
    let backend = Arc::new(FsBackend::new(server, options)?);
    // Started here, under the main thread's filter, which allows what the writer does
    // (openat and renameat2 relative to the file's directory).
    let metrics_writer = match metrics {
        Some((file, interval)) => {
            let backend = backend.clone();
            Some(MetricsWriter::start(file, interval, move || {
                metrics::render(&backend.server, backend.dax.as_deref())
            })?)
        }
        None => None,
    };
    let mut daemon = VhostUserDaemon::new(
        CONTROL_THREAD_NAME.to_owned(),
        backend.clone(),
        GuestMemoryAtomic::new(LoggedMemory::new()),
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
    // Its last write counts every request.
    drop(metrics_writer);
    info!("FUSE requests served: {}.", backend.server.request_counts());
    if let Some(dax) = &backend.dax {
        info!("DAX window at exit: {}.", dax.metrics());
    }
    if let Some(versions) = &backend.versions {
        info!("Version table at exit: {}.", versions.describe());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use berth_passthrough::{Config, PassthroughFs};

    fn backend(tag: Option<&str>, queues: u16) -> FsBackend {
        backend_with_window(tag, queues, 0)
    }

    fn backend_with_window(tag: Option<&str>, queues: u16, dax_window: u64) -> FsBackend {
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
                dax_window,
                versions: None,
                metrics: None,
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
    fn shared_memory_only_with_a_window() {
        let without = backend(Some("fs"), 1);
        assert!(!without
            .protocol_features()
            .contains(VhostUserProtocolFeatures::SHMEM));
        assert_eq!(without.get_shmem_config().unwrap().nregions, 0);
        let with = backend_with_window(Some("fs"), 1, 1 << 30);
        assert!(with
            .protocol_features()
            .contains(VhostUserProtocolFeatures::SHMEM));
        let config = with.get_shmem_config().unwrap();
        assert_eq!(config.nregions, 1);
        assert_eq!(config.memory_sizes[0], 1 << 30);
        assert_eq!(config.memory_sizes[1], 0);
        // A size the window manager refuses fails the device, not the first request.
        let fs = PassthroughFs::new(Config {
            root_dir: std::env::temp_dir(),
            ..Config::default()
        })
        .unwrap();
        let bad = FsBackend::new(
            Arc::new(FsServer::new(fs)),
            DeviceOptions {
                tag: None,
                max_request_queues: 1,
                thread_pool_size: 0,
                poll_us: 0,
                seccomp: SeccompAction::None,
                dax_window: 3 << 20,
                versions: None,
                metrics: None,
            },
        );
        assert!(bad.is_err());
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
}
