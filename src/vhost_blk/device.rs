//! The vhost-user-blk device: virtqueues in, block engine requests ([`super::request`]),
//! status bytes out.
//!
//! Every queue is a request queue with a worker thread of its own from vhost-user-backend
//! (one bit per thread in `queues_per_thread`); requests are served inline on it, so queues
//! never wait for each other. A FLUSH waits until the thread has served what else it found
//! on the ring, and the FLUSHes gathered so are answered by one flush of the target (each
//! covers the writes completed before it was made, which all completed before that flush).
//! Nor does a request wait for the network on the queue's thread: a READ whose data the
//! target must fetch first (a lazily fetched image, a volume's bucket) and a flush that
//! waits for an upload are parked with the target's completion, the thread serves the rest
//! of the ring, and the completion's end wakes it (an event of its own) to answer them.
//! Before any frontend connects, each queue thread drops its
//! capabilities and installs the vhost-user-blk queue filter; the control thread installs
//! the control filter on its first message.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use berth_blockdev::{Completion, DeviceMetrics, Progress, SharedTarget, TargetInfo};
use berth_seccomp::{SeccompAction, ThreadRole};
use tracing::{error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringMutex, VringState, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_OK,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::atomic::GuestMemoryLoadGuard;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vring_events::{self, handle_queue_event, Drained, QueueConfinement, QueueThreads};

use super::request::{
    serve_chain_with, Answered, BlkMemory, RequestPolicy, Step, Waiting, MAX_RANGES,
    MAX_RANGE_SECTORS, SECTOR_SIZE,
};

/// Name of the thread vhost-user-backend runs the control messages on.
pub const CONTROL_THREAD_NAME: &str = "berth-vhost-blk";
/// How long the queue threads may take to install their seccomp filters at start-up.
/// Bytes of the virtio-blk configuration space berth fills (up to the secure-erase fields).
pub const CONFIG_SPACE_LEN: usize = 72;

type GuestMemory = GuestMemoryAtomic<BlkMemory>;
type Vring = VringMutex<GuestMemory>;

/// Options of the device, from the command line.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Request queues offered.
    pub queues: u16,
    /// Largest queue size the frontend may configure.
    pub max_queue_size: u16,
    /// Serial number GET_ID returns.
    pub serial: String,
    /// What the threads' seccomp filters do with a system call they do not allow.
    pub seccomp: SeccompAction,
    /// Where served requests are counted (transport `vhost-user`).
    pub metrics: Arc<DeviceMetrics>,
    /// Flushes of the target made for FLUSH requests (one answers every FLUSH gathered).
    pub flush_syncs: Arc<AtomicU64>,
}

/// At most this many other requests are served while a FLUSH waits for the ring to empty,
/// so that a guest that keeps the ring full still sees its FLUSHes answered.
const MAX_SERVED_BEHIND_FLUSH: usize = 256;

/// FLUSH chains taken off a queue and not answered yet, with when each was taken.
type PendingFlushes<M> = Vec<(DescriptorChain<M>, Instant)>;

/// A snapshot of guest memory, held by the requests taken from it.
type MemoryGuard = GuestMemoryLoadGuard<BlkMemory>;

/// How long stopping a queue waits for its parked requests before it abandons them.
const PARKED_PATIENCE: Duration = Duration::from_secs(10);

/// Requests of one queue waiting for their target (a READ for its data to be fetched, the
/// FLUSHes one flush answers for an upload), and the event that wakes the queue's thread
/// when one of them may go on. The thread serves the rest of the ring meanwhile.
struct ParkedRequests {
    wake: Arc<EventFd>,
    waiting: Mutex<Vec<Parked>>,
}

/// Chains answered together once `completion` finishes.
struct Parked {
    chains: PendingFlushes<MemoryGuard>,
    completion: Arc<Completion>,
    mem: MemoryGuard,
    vring: Vring,
}

/// berth's vhost-user-blk backend.
pub struct BlkBackend {
    target: SharedTarget,
    policy: RequestPolicy,
    options: BlkOptions,
    memory: RwLock<Option<GuestMemory>>,
    event_idx: AtomicBool,
    /// Per queue: requests served since the queue was last started (logged once).
    queue_started: Vec<AtomicBool>,
    /// Makes each queue thread drop its capabilities and install its filter.
    confinement: QueueConfinement,
    /// The consumer ends of the queue threads' exit events, which vhost-user-backend 0.24
    /// never closes.
    exit_consumers: Mutex<Vec<RawFd>>,
    /// Per queue: requests waiting for the target.
    parked: Vec<ParkedRequests>,
    /// The event id the queue threads' wake events are registered under (above the
    /// confinement event).
    wake_event_id: u16,
}

impl BlkBackend {
    pub fn new(target: SharedTarget, options: BlkOptions) -> anyhow::Result<Self> {
        let policy = RequestPolicy::for_target(target.as_ref(), &options.serial);
        let queues = usize::from(options.queues);
        let confinement = QueueConfinement::new(queues, queues)?;
        let parked = (0..queues)
            .map(|_| {
                Ok(ParkedRequests {
                    wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
                    waiting: Mutex::new(Vec::new()),
                })
            })
            .collect::<io::Result<Vec<_>>>()
            .context("cannot create the queue threads' wake events")?;
        let wake_event_id = confinement
            .event_id()
            .checked_add(1)
            .context("too many queues")?;
        Ok(Self {
            parked,
            wake_event_id,
            target,
            policy,
            memory: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            queue_started: (0..queues).map(|_| AtomicBool::new(false)).collect(),
            confinement,
            exit_consumers: Mutex::new(Vec::new()),
            options,
        })
    }

    fn info(&self) -> &TargetInfo {
        self.target.info()
    }

    /// Closes the exit-event descriptors the library leaks, once the daemon that used this
    /// backend is dropped (for processes that create daemon after daemon, like tests).
    #[allow(dead_code)]
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

    /// The virtio-blk configuration space (virtio 1.2, 5.2.4), little-endian.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let info = self.info();
        let mut config = [0u8; CONFIG_SPACE_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &(info.size / SECTOR_SIZE).to_le_bytes()); // capacity
                                                          // seg_max: a request's data descriptors, leaving room for header and status.
        let seg_max = u32::from(self.options.max_queue_size)
            .saturating_sub(2)
            .max(1);
        put(12, &seg_max.to_le_bytes());
        put(20, &info.block_size.to_le_bytes()); // blk_size
        put(34, &self.options.queues.to_le_bytes()); // num_queues
        let block_sectors = (u64::from(info.block_size) / SECTOR_SIZE) as u32;
        if self.policy.discard {
            put(36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
            put(40, &MAX_RANGES.to_le_bytes()); // max_discard_seg
            put(44, &block_sectors.to_le_bytes()); // discard_sector_alignment
        }
        if self.policy.write_zeroes {
            put(48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
            put(52, &MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
            put(56, &[u8::from(self.policy.discard)]); // write_zeroes_may_unmap
        }
        config
    }

    /// Has every queue thread of `daemon` drop its capabilities and install the queue filter
    /// before any frontend connects, and fails if one cannot.
    pub fn confine_queue_threads(
        &self,
        daemon: &VhostUserDaemon<Arc<BlkBackend>>,
    ) -> anyhow::Result<()> {
        self.confinement.confine_all(&daemon.get_epoll_handlers())
    }
}

impl QueueThreads for BlkBackend {
    type Vring = Vring;

    fn confinement(&self) -> &QueueConfinement {
        &self.confinement
    }

    fn confine_this_queue_thread(&self, thread: usize) {
        let seccomp = self.options.seccomp;
        self.confinement.on_event(thread, || {
            berth_seccomp::drop_thread_capabilities().map_err(|e| e.to_string())?;
            berth_seccomp::install_filter(ThreadRole::VhostBlkQueue, seccomp)
                .map_err(|e| e.to_string())
        });
    }

    /// Serves everything available on one queue, re-checking after re-enabling notifications
    /// so that a request added in between is not left waiting for a kick that never comes.
    fn serve_queue(&self, queue: usize, vring: &Vring) {
        let Some(mem) = self
            .memory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.memory())
        else {
            warn!(
                queue,
                "The frontend kicked a queue before sending the guest memory table; ignoring it."
            );
            return;
        };
        if !vring.get_ref().get_queue().ready() {
            return;
        }
        if let Some(started) = self.queue_started.get(queue) {
            if !started.swap(true, Ordering::Relaxed) {
                info!(queue, "The frontend started using queue {queue}.");
            }
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        // FLUSHes are gathered while the ring holds requests, and answered together by one
        // flush of the target once it is empty (or after MAX_SERVED_BEHIND_FLUSH others):
        // a FLUSH covers the writes completed before it was made, all of which completed
        // before it was taken off the ring, so before that one flush.
        let mut pending: PendingFlushes<_> = Vec::new();
        let mut served_behind = 0usize;
        vring_events::drain_queue(queue, vring, event_idx, || loop {
            let popped = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                queue
                    .ready()
                    .then(|| queue.pop_descriptor_chain(mem.clone()))
            };
            let chain = match popped {
                Some(Some(chain)) => chain,
                Some(None) | None => {
                    let ready = popped.is_some();
                    if !pending.is_empty() {
                        self.answer_flushes(queue, vring, &mem, &mut pending, event_idx);
                        served_behind = 0;
                        if ready {
                            // Requests made meanwhile are served, their FLUSHes gathered.
                            continue;
                        }
                    }
                    return if ready {
                        Drained::Empty
                    } else {
                        Drained::Stopped
                    };
                }
            };
            let head = chain.head_index();
            let started = Instant::now();
            let answered = serve_chain_with(
                self.target.as_ref(),
                &self.policy,
                &chain,
                &mem,
                Step::First,
            );
            match answered.deferred {
                Some(Waiting::Flush) => {
                    pending.push((chain, started));
                    continue;
                }
                Some(Waiting::Read(completion)) => {
                    self.park(queue, vring, &mem, vec![(chain, started)], completion);
                    continue;
                }
                None => {}
            }
            self.record(&answered, started);
            complete(
                queue,
                &mut vring.get_mut(),
                head,
                answered.used_len,
                event_idx,
            );
            if !pending.is_empty() {
                served_behind += 1;
                if served_behind >= MAX_SERVED_BEHIND_FLUSH {
                    self.answer_flushes(queue, vring, &mem, &mut pending, event_idx);
                    served_behind = 0;
                }
            }
        });
    }
}

impl BlkBackend {
    fn record(&self, answered: &Answered, started: Instant) {
        if let Some((op, bytes)) = answered.metered {
            let ok = answered.status == Some(VIRTIO_BLK_S_OK as u8);
            self.options
                .metrics
                .record(op, bytes, ok, started.elapsed());
        }
    }

    /// Starts one flush of the target for every FLUSH in `pending`: answers them with its
    /// outcome, or parks them until a flush that waits for other threads (an upload)
    /// finishes, so that the queue goes on serving meanwhile.
    fn answer_flushes(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &MemoryGuard,
        pending: &mut PendingFlushes<MemoryGuard>,
        event_idx: bool,
    ) {
        self.options.flush_syncs.fetch_add(1, Ordering::Relaxed);
        let outcome = match self.target.start_flush() {
            Progress::Done(outcome) => outcome.map_err(|e| format!("{e:#}")),
            Progress::Pending(completion) => {
                self.park(queue, vring, mem, std::mem::take(pending), completion);
                return;
            }
        };
        for (chain, started) in pending.drain(..) {
            self.answer(queue, vring, &chain, mem, started, &outcome, event_idx);
        }
    }

    /// Serves a chain whose wait is over (`outcome`) and puts it on the used ring.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        queue: usize,
        vring: &Vring,
        chain: &DescriptorChain<MemoryGuard>,
        mem: &MemoryGuard,
        started: Instant,
        outcome: &Result<(), String>,
        event_idx: bool,
    ) {
        let answered = serve_chain_with(
            self.target.as_ref(),
            &self.policy,
            chain,
            mem,
            Step::Resumed(outcome),
        );
        self.record(&answered, started);
        complete(
            queue,
            &mut vring.get_mut(),
            chain.head_index(),
            answered.used_len,
            event_idx,
        );
    }

    /// Leaves `chains` waiting for `completion`; its end wakes the queue's thread, which
    /// then answers them ([`Self::answer_parked`]).
    fn park(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &MemoryGuard,
        chains: PendingFlushes<MemoryGuard>,
        completion: Arc<Completion>,
    ) {
        let Some(parked) = self.parked.get(queue) else {
            // Cannot happen (one entry per queue); answer with the wait over rather than
            // lose the requests.
            let outcome = completion.wait().map_err(|e| format!("{e:#}"));
            let event_idx = self.event_idx.load(Ordering::Relaxed);
            for (chain, started) in chains {
                self.answer(queue, vring, &chain, mem, started, &outcome, event_idx);
            }
            return;
        };
        parked
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Parked {
                chains,
                completion: completion.clone(),
                mem: mem.clone(),
                vring: vring.clone(),
            });
        let wake = parked.wake.clone();
        completion.on_complete(Arc::new(move || {
            if let Err(e) = wake.write(1) {
                warn!("Cannot wake a queue thread for a finished request: {e}.");
            }
        }));
    }

    /// On queue `queue`'s thread, when its wake event fires: answers the parked requests
    /// whose wait is over.
    fn answer_parked(&self, queue: usize) {
        let Some(parked) = self.parked.get(queue) else {
            return;
        };
        // Level-triggered: drain it, or the thread would be woken again and again.
        let _ = parked.wake.read();
        // Held while answering: a device reset, which drops what is parked, waits for the
        // answers under way and none starts after it.
        let mut waiting = parked.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let (finished, still): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut *waiting)
            .into_iter()
            .partition(|p| p.completion.is_complete());
        *waiting = still;
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        for parked in finished {
            let outcome = parked
                .completion
                .take()
                .unwrap_or(Ok(()))
                .map_err(|e| format!("{e:#}"));
            for (chain, started) in &parked.chains {
                self.answer(
                    queue,
                    &parked.vring,
                    chain,
                    &parked.mem,
                    *started,
                    &outcome,
                    event_idx,
                );
            }
        }
    }

    /// Has the wake events of the queue threads of `daemon` delivered to them.
    pub fn listen_for_wakes(
        &self,
        daemon: &VhostUserDaemon<Arc<BlkBackend>>,
    ) -> anyhow::Result<()> {
        for (thread, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            let parked = self
                .parked
                .get(thread)
                .ok_or_else(|| anyhow!("queue thread {thread} has no wake event"))?;
            handler
                .register_listener(
                    parked.wake.as_raw_fd(),
                    EventSet::IN,
                    u64::from(self.wake_event_id),
                )
                .with_context(|| format!("cannot reach queue thread {thread}"))?;
        }
        Ok(())
    }

    /// Waits (a while) for the parked requests of `queue` to be answered by its thread,
    /// so that they reach the used ring before the frontend takes the queue back; what is
    /// still waiting after that is abandoned, with a warning.
    fn settle_parked(&self, queue: usize) {
        let Some(parked) = self.parked.get(queue) else {
            return;
        };
        let started = Instant::now();
        loop {
            let mut waiting = parked.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.is_empty() {
                return;
            }
            if started.elapsed() >= PARKED_PATIENCE {
                let chains: usize = waiting.iter().map(|p| p.chains.len()).sum();
                warn!(
                    queue,
                    "Queue {queue} stops with {chains} request(s) still waiting for the target after {PARKED_PATIENCE:?}; they are abandoned unanswered."
                );
                waiting.clear();
                return;
            }
            drop(waiting);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Puts a served chain on the used ring and tells the guest if it asked to be told.
fn complete(
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
    let notify = !event_idx || vring.needs_notification().unwrap_or(true);
    if notify {
        if let Err(e) = vring.signal_used_queue() {
            warn!(queue, "Cannot notify the guest of used descriptors: {e}.");
        }
    }
}

thread_local! {
    static CONTROL_FILTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs the control thread's filter the first time the library calls into the backend
/// from it (GET_FEATURES opens every session). Under `--seccomp kill` a filter that cannot be
/// installed ends the daemon rather than serve the VMM wider than promised.
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

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.options.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.options.max_queue_size)
    }

    fn features(&self) -> u64 {
        confine_control_thread(self.options.seccomp);
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.info().read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.policy.discard {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if self.policy.write_zeroes {
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        confine_control_thread(self.options.seccomp);
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        confine_control_thread(self.options.seccomp);
        for started in &self.queue_started {
            started.store(false, Ordering::Relaxed);
        }
        // Requests still waiting for the target belong to the rings being reset: they are
        // never answered (the guest's driver has given them up).
        let abandoned: usize = self
            .parked
            .iter()
            .map(|parked| {
                let mut waiting = parked.waiting.lock().unwrap_or_else(|e| e.into_inner());
                let chains = waiting.iter().map(|p| p.chains.len()).sum::<usize>();
                waiting.clear();
                chains
            })
            .sum();
        if abandoned > 0 {
            warn!("The frontend reset the device with {abandoned} request(s) still waiting for the target; they are dropped.");
        }
        info!("The frontend reset the device.");
    }

    fn set_event_idx(&self, enabled: bool) {
        confine_control_thread(self.options.seccomp);
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        confine_control_thread(self.options.seccomp);
        let config = self.config_space();
        let mut bytes: Vec<u8> = config
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
            "the virtio-blk configuration space is read-only (no VIRTIO_BLK_F_CONFIG_WCE)",
        ))
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        confine_control_thread(self.options.seccomp);
        *self.memory.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
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

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        confine_control_thread(self.options.seccomp);
        if let Some(started) = self.queue_started.get(queue_index as usize) {
            started.store(false, Ordering::Relaxed);
        }
        // Requests waiting for the target are answered by the queue's thread as they finish.
        self.settle_parked(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if device_event == self.wake_event_id {
            self.answer_parked(thread_id);
            return Ok(());
        }
        handle_queue_event(self, device_event, evset, vrings, thread_id)
    }
}

/// Serves one frontend connection on `listener` until it disconnects. `before_accept` runs
/// once the queue threads are confined and before the frontend is accepted (the main
/// thread confines itself there).
pub fn serve(
    backend: Arc<BlkBackend>,
    mut listener: Listener,
    before_accept: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut daemon = VhostUserDaemon::new(
        CONTROL_THREAD_NAME.to_owned(),
        backend.clone(),
        GuestMemoryAtomic::new(BlkMemory::new()),
    )
    .map_err(|e| anyhow!("cannot set up the vhost-user-blk device: {e}"))?;
    backend
        .listen_for_wakes(&daemon)
        .context("cannot set up the queue threads' wake events")?;
    if backend.options.seccomp != SeccompAction::None {
        backend
            .confine_queue_threads(&daemon)
            .context("cannot confine the queue threads")?;
    }
    before_accept()?;
    info!(
        "Waiting for the vhost-user frontend to connect (offering {} queues).",
        backend.options.queues
    );
    daemon
        .start(&mut listener)
        .map_err(|e| anyhow!("cannot accept the vhost-user frontend connection: {e}"))?;
    info!("The frontend connected; serving requests.");
    let result = daemon.wait();
    // The queue threads end with the daemon; a request blocked in a slow fetch would hold up
    // the join, and the process exits right after this anyway.
    std::mem::forget(daemon);
    match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
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
    use berth_blockdev::{RawOptions, RawTarget};

    fn backend(read_only: bool, queues: u16) -> (BlkBackend, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let target = RawTarget::open(
            &path,
            &RawOptions {
                read_only,
                block_size: 4096,
                direct: false,
            },
        )
        .unwrap();
        let backend = BlkBackend::new(
            Arc::new(target),
            BlkOptions {
                queues,
                max_queue_size: 256,
                serial: "s".into(),
                seccomp: SeccompAction::None,
                metrics: Arc::new(DeviceMetrics::new("vhost-user")),
                flush_syncs: Arc::default(),
            },
        )
        .unwrap();
        (backend, dir)
    }

    fn u32_at(config: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(config[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn the_config_space_describes_the_target() {
        let (b, _dir) = backend(false, 4);
        let config = b.get_config(0, CONFIG_SPACE_LEN as u32);
        assert_eq!(&config[0..8], &2048u64.to_le_bytes(), "capacity in sectors");
        assert_eq!(u32_at(&config, 12), 254, "seg_max");
        assert_eq!(u32_at(&config, 20), 4096, "blk_size");
        assert_eq!(&config[34..36], &4u16.to_le_bytes(), "num_queues");
        assert_eq!(u32_at(&config, 40), MAX_RANGES, "max_discard_seg");
        assert_eq!(u32_at(&config, 44), 8, "discard_sector_alignment");
        assert_eq!(u32_at(&config, 52), MAX_RANGES, "max_write_zeroes_seg");
        // Reads past the end are padded, never panic.
        assert_eq!(b.get_config(70, 8), vec![0; 8]);
        assert_eq!(b.get_config(u32::MAX, 4), vec![0; 4]);
        assert!(b.set_config(0, &[1]).is_err());
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4, 8]);
        let features = b.features();
        for bit in [
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(features & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    }

    #[test]
    fn a_read_only_target_offers_ro_and_no_discard() {
        let (b, _dir) = backend(true, 1);
        let features = b.features();
        assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            features & ((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)),
            0
        );
        let config = b.config_space();
        assert!(config[36..60].iter().all(|&b| b == 0), "no discard limits");
    }
}
