//! The vhost-user connection: feature negotiation, memory table and vring setup.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserHeaderFlag,
    VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

use crate::dirty_log::DirtyLog;
use crate::memory::GuestRam;
use crate::queue::{queue_memory_footprint, FsQueue, QueueConfig};
use crate::shmem::{serve_backend_requests, ShmemRegions, ShmemWindow};
use crate::Error;

/// VIRTIO_F_VERSION_1: the device speaks virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC: a descriptor may point at a table of descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX: notification suppression through event indices.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// VHOST_USER_F_PROTOCOL_FEATURES: protocol feature negotiation is available.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VHOST_F_LOG_ALL: the backend logs every guest page it writes in the dirty log.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// Index of the virtio-fs high-priority queue.
pub const HIPRIO_QUEUE: u16 = 0;

/// How the frontend sets up the device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceConfig {
    /// Size of guest RAM in bytes.
    pub memory_size: usize,
    /// Number of request queues (queues 1..=N); the hiprio queue 0 always exists.
    pub request_queues: u16,
    /// Settings of each queue, hiprio included.
    pub queue: QueueConfig,
    /// Timeout on every vhost-user message exchange, so a stuck backend cannot hang us.
    pub socket_timeout: Duration,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered, as Linux guests do, so kicks and
    /// calls are suppressed while the other side is busy.
    pub event_idx: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            memory_size: 256 << 20,
            request_queues: 1,
            queue: QueueConfig::default(),
            socket_timeout: Duration::from_secs(5),
            event_idx: false,
        }
    }
}

/// What the backend offered and what we acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    pub offered_features: u64,
    pub acked_features: u64,
    pub offered_protocol_features: VhostUserProtocolFeatures,
    pub acked_protocol_features: VhostUserProtocolFeatures,
    /// Queues the backend supports in total (GET_QUEUE_NUM), hiprio included.
    pub backend_queues: u64,
    /// Whether VIRTIO_RING_F_EVENT_IDX is in use on every queue.
    pub event_idx: bool,
}

/// A negotiated vhost-user-fs device with its queues ready to use.
pub struct VhostUserFs {
    frontend: Frontend,
    ram: Arc<GuestRam>,
    negotiated: Negotiated,
    config: DeviceConfig,
    queues: Vec<Option<FsQueue>>,
    /// Our end of the backend request channel (SET_BACKEND_REQ_FD), when the backend offers
    /// one, as QEMU sets it up: the backend sends its own requests (shared memory mappings)
    /// there.
    backend_requests: Option<UnixStream>,
    /// Shared memory region 0 (the DAX window), when the backend offers SHMEM and a non-empty
    /// region: a thread serves the backend's SHMEM_MAP / SHMEM_UNMAP into it.
    shmem: Option<Arc<ShmemWindow>>,
    /// Every non-empty shared memory region the backend asked for (region 0 included).
    shmem_regions: Vec<Arc<ShmemWindow>>,
}

/// Connects to a backend socket at `path`, retrying until `timeout` passes (the daemon may
/// still be starting).
pub(crate) fn connect_retrying(path: &Path, timeout: Duration) -> Result<UnixStream, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(source) => {
                return Err(Error::Connect {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }
}

impl VhostUserFs {
    /// Connects to a backend listening on `path`, retrying until `connect_timeout` passes
    /// (the daemon may still be starting), then sets the device up.
    pub fn connect(
        path: impl AsRef<Path>,
        config: DeviceConfig,
        connect_timeout: Duration,
    ) -> Result<Self, Error> {
        let stream = connect_retrying(path.as_ref(), connect_timeout)?;
        Self::from_stream(stream, config)
    }

    /// Sets the device up over an already connected socket.
    pub fn from_stream(stream: UnixStream, config: DeviceConfig) -> Result<Self, Error> {
        Self::set_up(stream, config, None)
    }

    /// Connects to a migration destination backend on `path` as a VMM does once the guest's
    /// memory has moved: the same guest RAM as the source's device (`ram`), and no queue set
    /// up yet. Load the state, then start each queue the guest had where the source stopped
    /// it with [`VhostUserFs::restart_queue`]; the source's queue objects go on working with
    /// this backend.
    pub fn connect_migrated(
        path: impl AsRef<Path>,
        config: DeviceConfig,
        ram: Arc<GuestRam>,
        connect_timeout: Duration,
    ) -> Result<Self, Error> {
        let stream = connect_retrying(path.as_ref(), connect_timeout)?;
        Self::set_up(stream, config, Some(ram))
    }

    fn set_up(
        stream: UnixStream,
        config: DeviceConfig,
        migrated_ram: Option<Arc<GuestRam>>,
    ) -> Result<Self, Error> {
        stream
            .set_read_timeout(Some(config.socket_timeout))
            .and_then(|_| stream.set_write_timeout(Some(config.socket_timeout)))
            .map_err(Error::Socket)?;
        let total_queues = u64::from(config.request_queues) + 1;
        let needed = queue_memory_footprint(&config.queue) * total_queues;
        if needed > config.memory_size as u64 {
            return Err(Error::InvalidConfig(format!(
                "{total_queues} queues need {needed} bytes of guest memory but only {} are \
                 configured",
                config.memory_size
            )));
        }
        let migrated = migrated_ram.is_some();
        let ram = match migrated_ram {
            Some(ram) => ram,
            None => Arc::new(GuestRam::new(config.memory_size)?),
        };
        let mut frontend = Frontend::from_stream(stream, total_queues);
        let negotiated = negotiate(&mut frontend, total_queues, config.event_idx)?;
        let acked = negotiated.acked_protocol_features;
        // As QEMU: the regions are asked for once the features are settled.
        // Empty regions get no address space (QEMU gives them no BAR).
        let mut shmem_regions = Vec::new();
        if acked.contains(VhostUserProtocolFeatures::SHMEM) {
            let regions = frontend.get_shmem_config()?;
            for (id, &size) in regions
                .memory_sizes
                .iter()
                .enumerate()
                .take(regions.nregions as usize)
            {
                if size > 0 {
                    let id = u8::try_from(id)
                        .map_err(|_| Error::InvalidConfig(format!("shared memory region {id}")))?;
                    shmem_regions.push(Arc::new(ShmemWindow::with_id(id, size)?));
                }
            }
        }
        let shmem = shmem_regions.iter().find(|w| w.id() == 0).cloned();
        let backend_requests = if !acked.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            None
        } else if !shmem_regions.is_empty() {
            let theirs = serve_backend_requests(
                Arc::new(ShmemRegions(shmem_regions.clone())),
                acked.contains(VhostUserProtocolFeatures::REPLY_ACK),
            )?;
            frontend.set_backend_request_fd(&theirs)?;
            None
        } else {
            let (ours, theirs) = UnixStream::pair().map_err(Error::Socket)?;
            frontend.set_backend_request_fd(&theirs)?;
            Some(ours)
        };

        frontend.set_mem_table(&ram.region_infos()?)?;

        let mut queues = Vec::new();
        for index in 0..=config.request_queues {
            if migrated {
                // The guest's queues come from the source, started by the caller.
                queues.push(None);
                continue;
            }
            let mut queue = FsQueue::new(ram.clone(), index, config.queue)?;
            queue.virtqueue().set_event_idx(negotiated.event_idx);
            start_vring(&mut frontend, &queue)?;
            queues.push(Some(queue));
        }
        Ok(Self {
            frontend,
            ram,
            negotiated,
            config,
            queues,
            backend_requests,
            shmem,
            shmem_regions,
        })
    }

    /// Stops every queue with GET_VRING_BASE, as a VMM does when the guest resets the device,
    /// the VM is paused or it migrates; returns each queue's base (its next available index).
    /// The queues already handed out stay usable once started again with
    /// [`VhostUserFs::restart_queue`].
    pub fn stop_queues(&mut self) -> Result<Vec<u32>, Error> {
        (0..=usize::from(self.request_queue_count()))
            .map(|index| Ok(self.frontend.get_vring_base(index)?))
            .collect()
    }

    /// Starts `queue` again where it stopped (`base` from [`VhostUserFs::stop_queues`]), as a
    /// VMM resuming a paused guest does.
    pub fn restart_queue(&mut self, queue: &FsQueue, base: u32) -> Result<(), Error> {
        let base = u16::try_from(base)
            .map_err(|_| Error::InvalidConfig(format!("vring base {base} is out of range")))?;
        start_vring_at(&mut self.frontend, queue, base)
    }

    /// Sets up fresh queues (new rings, base 0) in place of the old ones, as a rebooted
    /// guest's driver does once the device was stopped or reset; take them again with
    /// [`VhostUserFs::take_queue`]. The old queues are dead from then on.
    pub fn start_fresh_queues(&mut self) -> Result<(), Error> {
        let mut queues = Vec::new();
        for index in 0..=self.config.request_queues {
            let mut queue = FsQueue::new(self.ram.clone(), index, self.config.queue)?;
            queue.virtqueue().set_event_idx(self.negotiated.event_idx);
            start_vring(&mut self.frontend, &queue)?;
            queues.push(Some(queue));
        }
        self.queues = queues;
        Ok(())
    }

    /// Starts dirty-page logging as a VMM does when a migration begins: hands the backend a
    /// log covering guest RAM (SET_LOG_BASE) and sets VHOST_F_LOG_ALL.
    pub fn start_dirty_log(&mut self) -> Result<DirtyLog, Error> {
        for (offered, name) in [
            (
                self.negotiated.offered_features & VHOST_F_LOG_ALL != 0,
                "VHOST_F_LOG_ALL",
            ),
            (
                self.negotiated
                    .acked_protocol_features
                    .contains(VhostUserProtocolFeatures::LOG_SHMFD),
                "VHOST_USER_PROTOCOL_F_LOG_SHMFD",
            ),
        ] {
            if !offered {
                return Err(Error::Negotiation(format!(
                    "the backend does not offer {name}"
                )));
            }
        }
        let log = DirtyLog::new(self.ram.size())?;
        self.frontend.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: log.len() as u64,
                mmap_offset: 0,
                mmap_handle: std::os::fd::AsRawFd::as_raw_fd(log.file()),
            }),
        )?;
        self.frontend
            .set_features(self.negotiated.acked_features | VHOST_F_LOG_ALL)?;
        Ok(log)
    }

    /// Ends dirty-page logging (VHOST_F_LOG_ALL cleared again), as after a failed migration.
    pub fn stop_dirty_log(&mut self) -> Result<(), Error> {
        self.frontend.set_features(self.negotiated.acked_features)?;
        Ok(())
    }

    /// Saves the backend's device state as a VMM does on the migration source, once the
    /// queues are stopped: SET_DEVICE_STATE_FD (save) with a pipe, read to the end, then
    /// CHECK_DEVICE_STATE. A backend that fails the check is an error even if bytes came.
    pub fn save_device_state(&mut self) -> Result<Vec<u8>, Error> {
        use std::io::Read;
        let (mut reader, writer) = pipe()?;
        let returned = self.frontend.set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            writer.into(),
        )?;
        if returned.is_some() {
            return Err(Error::Negotiation(
                "the backend returned its own state channel, which this frontend does not use"
                    .into(),
            ));
        }
        let mut state = Vec::new();
        reader.read_to_end(&mut state).map_err(Error::Socket)?;
        self.frontend.check_device_state()?;
        Ok(state)
    }

    /// Loads device state into the backend as a VMM does on the migration destination:
    /// SET_DEVICE_STATE_FD (load) with a pipe, the bytes written and the pipe closed, then
    /// CHECK_DEVICE_STATE.
    pub fn load_device_state(&mut self, state: &[u8]) -> Result<(), Error> {
        use std::io::Write;
        let (reader, mut writer) = pipe()?;
        let returned = self.frontend.set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            reader.into(),
        )?;
        if returned.is_some() {
            return Err(Error::Negotiation(
                "the backend returned its own state channel, which this frontend does not use"
                    .into(),
            ));
        }
        // A backend that gives up early closes its end: the rest of the write fails, and the
        // check below says why.
        let _ = writer.write_all(state);
        drop(writer);
        self.frontend.check_device_state()?;
        Ok(())
    }

    /// RESET_DEVICE (when the backend offers it), then the features again and fresh queues:
    /// a VMM resetting the device for a rebooting guest.
    pub fn reset_device(&mut self) -> Result<(), Error> {
        self.frontend.reset_device()?;
        self.frontend.set_features(self.negotiated.acked_features)?;
        self.start_fresh_queues()
    }

    /// Feature negotiation results.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// Guest memory shared by all queues.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The vhost-user channel, for tests that send messages of their own.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Our end of the backend request channel, if the backend took one.
    pub fn backend_requests(&self) -> Option<&UnixStream> {
        self.backend_requests.as_ref()
    }

    /// Shared memory region 0 (the DAX window), if the backend offered one.
    pub fn shmem_window(&self) -> Option<&Arc<ShmemWindow>> {
        self.shmem.as_ref()
    }

    /// Shared memory region `id`, when the backend offers it non-empty.
    pub fn shmem_region(&self, id: u8) -> Option<&Arc<ShmemWindow>> {
        self.shmem_regions.iter().find(|w| w.id() == id)
    }

    /// Number of request queues set up.
    pub fn request_queue_count(&self) -> u16 {
        u16::try_from(self.queues.len().saturating_sub(1)).unwrap_or(u16::MAX)
    }

    /// Hands out queue `index` (0 is hiprio) so a thread can own it; `None` if already taken.
    pub fn take_queue(&mut self, index: u16) -> Option<FsQueue> {
        self.queues
            .get_mut(usize::from(index))
            .and_then(Option::take)
    }

    /// Hands out request queue `n` (1-based, as virtio-fs numbers them).
    pub fn take_request_queue(&mut self, n: u16) -> Option<FsQueue> {
        if n == 0 {
            return None;
        }
        self.take_queue(n)
    }

    /// Hands out all request queues not yet taken.
    pub fn take_request_queues(&mut self) -> Vec<FsQueue> {
        self.queues
            .iter_mut()
            .skip(1)
            .filter_map(Option::take)
            .collect()
    }

    /// Closes the vhost-user connection (the queues stay mapped but are dead).
    pub fn disconnect(self) {
        drop(self);
    }
}

fn negotiate(
    frontend: &mut Frontend,
    total_queues: u64,
    want_event_idx: bool,
) -> Result<Negotiated, Error> {
    frontend.set_owner()?;
    let offered_features = frontend.get_features()?;
    for (bit, name) in [
        (VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
        (
            VHOST_USER_F_PROTOCOL_FEATURES,
            "VHOST_USER_F_PROTOCOL_FEATURES",
        ),
    ] {
        if offered_features & bit == 0 {
            return Err(Error::Negotiation(format!(
                "backend does not offer {name} (features {offered_features:#x})"
            )));
        }
    }
    // Indirect descriptors are acknowledged as a Linux guest does (only raw chains use them);
    // event indices only on request.
    let event_idx = want_event_idx && offered_features & VIRTIO_RING_F_EVENT_IDX != 0;
    let mut acked_features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
    if event_idx {
        acked_features |= VIRTIO_RING_F_EVENT_IDX;
    }
    acked_features |= offered_features & VIRTIO_RING_F_INDIRECT_DESC;

    let offered_protocol_features = frontend.get_protocol_features()?;
    // As QEMU: a backend request channel whenever the backend offers one.
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::SHMEM
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE;
    let acked_protocol_features = offered_protocol_features & wanted;
    frontend.set_protocol_features(acked_protocol_features)?;

    let backend_queues = if acked_protocol_features.contains(VhostUserProtocolFeatures::MQ) {
        frontend.get_queue_num()?
    } else {
        // Without MQ a virtio-fs backend has hiprio plus one request queue.
        2
    };
    if backend_queues < total_queues {
        return Err(Error::NotEnoughQueues {
            wanted: total_queues,
            offered: backend_queues,
        });
    }
    frontend.set_features(acked_features)?;
    // From here on every message without a reply of its own is acknowledged, so a backend
    // that rejects it is noticed at once rather than later as a hang.
    if acked_protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    Ok(Negotiated {
        offered_features,
        acked_features,
        offered_protocol_features,
        acked_protocol_features,
        backend_queues,
        event_idx,
    })
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> Result<(std::fs::File, std::fs::File), Error> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these descriptors and nothing else owns them.
    unsafe {
        Ok((
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        ))
    }
}

fn start_vring(frontend: &mut Frontend, queue: &FsQueue) -> Result<(), Error> {
    start_vring_at(frontend, queue, 0)
}

fn start_vring_at(frontend: &mut Frontend, queue: &FsQueue, base: u16) -> Result<(), Error> {
    let index = usize::from(queue.index());
    let vq = queue.virtqueue_ref();
    frontend.set_vring_num(index, vq.size())?;
    frontend.set_vring_addr(index, &vq.config_data()?)?;
    frontend.set_vring_base(index, base)?;
    frontend.set_vring_call(index, vq.call_fd())?;
    frontend.set_vring_kick(index, vq.kick_fd())?;
    frontend.set_vring_enable(index, true)?;
    Ok(())
}
