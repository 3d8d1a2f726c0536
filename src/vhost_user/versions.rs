//! The version table offered to a virtio-fs guest (`--shared-cache`): shared-memory region 1
//! in GET_SHMEM_CONFIG, with the table file's guest-visible part (header page and versions,
//! never the index) mapped into it by a `SHMEM_MAP` on the backend request channel.
//!
//! The guest looks for a valid table header in region 1 when it mounts, before its first
//! FUSE request, so the mapping is made as soon as the device starts, not when the guest first
//! asks for something. QEMU 11.1 can only take a `SHMEM_MAP` once the device has started (it
//! crashes on one sent before: the device is not attached to its vhost state until then), and
//! a started device is the first to get a memory table (SET_MEM_TABLE), so that is the cue;
//! the guest driver starts the device at probe time, well before anything mounts. A device
//! reset makes QEMU drop every mapping, so the next start maps again. The request is sent
//! from a thread of its own: the VMM serves backend requests in its main loop, which is
//! blocked while it waits for the control thread's answer to SET_MEM_TABLE.
//!
//! Read-only: the map request asks for a read-only mapping, but QEMU 11.1 maps every
//! `SHMEM_MAP` descriptor shared and writable whatever the request's flags (and refuses a
//! read-only descriptor), so the table's read-write descriptor is sent and a guest could write
//! to the versions. The patched guest kernel never does; a hostile guest could only make
//! clients of the same table refetch needlessly or keep stale metadata of this share, which it
//! can change anyway. See the README's "Shared caching for virtio-fs guests".

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use anyhow::Context;
use berth_seccomp::{SeccompAction, ThreadRole};
use berth_versions::wire::SHMEM_REGION_ID;
use berth_versions::VersionTable;
use tracing::{error, info, warn};
use vhost::vhost_user::message::VhostUserMMap;
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// The version table as region 1 of the device.
pub struct VersionsRegion {
    table: Arc<VersionTable>,
    /// Bytes mapped: the header page and the versions.
    mapped_len: u64,
    /// Bytes of the region: `mapped_len` rounded up to a power of two (a PCI BAR's size).
    region_len: u64,
    /// The mapper thread's work: a channel to map the table through.
    jobs: Mutex<mpsc::Sender<Backend>>,
    /// The backend request channel the VMM handed over (SET_BACKEND_REQ_FD).
    channel: Mutex<Option<Backend>>,
    /// A map request went out since the channel was set or the device was reset.
    mapped: AtomicBool,
}

impl VersionsRegion {
    /// Starts the mapper thread (from the main thread, which may still create threads).
    pub fn start(table: Arc<VersionTable>, seccomp: SeccompAction) -> anyhow::Result<Self> {
        let mapped_len = table.geometry().guest_visible_len();
        let region_len = mapped_len
            .checked_next_power_of_two()
            .context("the version table is too large for a shared memory region")?;
        let (jobs, received) = mpsc::channel::<Backend>();
        let mapped_table = table.clone();
        std::thread::Builder::new()
            .name("berth-versions-map".into())
            .spawn(move || {
                if let Err(e) = berth_seccomp::install_filter(ThreadRole::VersionsMapper, seccomp) {
                    error!("{e}; the version table is not offered to the guest.");
                    return;
                }
                for backend in received {
                    map_table(&backend, &mapped_table, mapped_len);
                }
            })
            .context("cannot start the version table mapper thread")?;
        Ok(VersionsRegion {
            table,
            mapped_len,
            region_len,
            jobs: Mutex::new(jobs),
            channel: Mutex::new(None),
            mapped: AtomicBool::new(false),
        })
    }

    /// Bytes of shared-memory region 1.
    pub fn region_len(&self) -> u64 {
        self.region_len
    }

    /// The VMM handed over a backend request channel: the table is mapped through it when
    /// the device starts.
    pub fn set_channel(&self, backend: Backend) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
        self.mapped.store(false, Ordering::SeqCst);
    }

    /// The device started (the VMM sent a memory table): maps the table unless it is mapped
    /// already.
    pub fn device_started(&self) {
        let channel = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(channel) = channel else {
            warn!(
                "The VMM set up no backend request channel; the guest does not get the version                  table."
            );
            return;
        };
        if self.mapped.swap(true, Ordering::SeqCst) {
            return;
        }
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(channel);
        if sent.is_err() {
            warn!("The version table mapper is not running; the guest does not get the table.");
        }
    }

    /// The device was reset: the VMM dropped the mapping, the next start maps again.
    pub fn device_reset(&self) {
        self.mapped.store(false, Ordering::SeqCst);
    }

    /// For the exit log.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} of {} bytes mapped, generation {})",
            self.table.path().display(),
            self.mapped_len,
            self.region_len,
            self.table.generation()
        )
    }
}

/// Maps the table's guest-visible part at offset 0 of region 1.
fn map_table(backend: &Backend, table: &VersionTable, len: u64) {
    let request = VhostUserMMap {
        shmid: SHMEM_REGION_ID,
        fd_offset: 0,
        shm_offset: 0,
        len,
        // Read-only asked for (no WRITABLE flag); see the module's note on QEMU 11.1.
        flags: 0,
        ..Default::default()
    };
    match backend.shmem_map(&request, &table.file().as_raw_fd()) {
        Ok(_) => info!(
            "Mapped the version table {} ({len} bytes) into shared memory region {SHMEM_REGION_ID}.",
            table.path().display()
        ),
        Err(e) => error!(
            "The VMM refused to map the version table into shared memory region \
             {SHMEM_REGION_ID} ({e}); the guest caches with timeouts only."
        ),
    }
}
