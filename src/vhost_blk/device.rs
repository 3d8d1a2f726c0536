//! The vhost-user-blk device: virtqueues in, block engine requests ([`super::request`]),
//! status bytes out.
//!
//! Every queue is a request queue with a worker thread of its own from vhost-user-backend
//! (one bit per thread in `queues_per_thread`); requests are served inline on it, so queues
//! never wait for each other. A FLUSH waits until the thread has served what else it found
//! on the ring, and the FLUSHes gathered so are answered by one flush of the target (each
//! covers the writes completed before it was made, which all completed before that flush).
//! Before any frontend connects, each queue thread drops its
//! capabilities and installs the vhost-user-blk queue filter; the control thread installs
//! the control filter on its first message.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use anyhow::{anyhow, Context};
use berth_blockdev::{DeviceMetrics, SharedTarget, TargetInfo};
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
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::vring_events::{self, handle_queue_event, Drained, QueueConfinement, QueueThreads};

use super::request::{
    serve_chain_with, Answered, BlkMemory, FlushMode, RequestPolicy, MAX_RANGES, MAX_RANGE_SECTORS,
    SECTOR_SIZE,
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
}

impl BlkBackend {
    pub fn new(target: SharedTarget, options: BlkOptions) -> anyhow::Result<Self> {
        let policy = RequestPolicy::for_target(target.as_ref(), &options.serial);
        let queues = usize::from(options.queues);
        let confinement = QueueConfinement::new(queues, queues)?;
        Ok(Self {
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
                FlushMode::Defer,
            );
            if answered.deferred {
                pending.push((chain, started));
                continue;
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

    /// Flushes the target once and answers every FLUSH in `pending` with its outcome.
    fn answer_flushes<M>(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &M,
        pending: &mut PendingFlushes<M>,
        event_idx: bool,
    ) where
        M: std::ops::Deref<Target = BlkMemory> + Clone,
    {
        let outcome =
            berth_blockdev::target::flush(self.target.as_ref()).map_err(|e| format!("{e:#}"));
        self.options.flush_syncs.fetch_add(1, Ordering::Relaxed);
        for (chain, started) in pending.drain(..) {
            let answered = serve_chain_with(
                self.target.as_ref(),
                &self.policy,
                &chain,
                mem,
                FlushMode::Done(&outcome),
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
        // Requests are served inline on the queue's thread, which the library holds off
        // while it takes the queue back: nothing is left in flight here.
        if let Some(started) = self.queue_started.get(queue_index as usize) {
            started.store(false, Ordering::Relaxed);
        }
        Ok(())
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
