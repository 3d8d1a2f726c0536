//! The version table offered to a virtio-fs guest (`--shared-cache`): shared-memory region 1
//! in GET_SHMEM_CONFIG, with the table file's guest-visible part (header page and versions,
//! never the index) mapped into it by a `SHMEM_MAP` on the backend request channel.
//!
//! The guest looks for a valid table header in region 1 when it mounts, before its first
//! FUSE request, so the mapping is made as soon as the VMM hands over the channel
//! (SET_BACKEND_REQ_FD), not when the guest first asks for something. It is sent from a
//! thread of its own: the VMM serves backend requests in its main loop, which is blocked while
//! it waits for the control thread's answer to SET_BACKEND_REQ_FD.
//!
//! Read-only: the map request asks for a read-only mapping, but QEMU 11.1 maps every
//! `SHMEM_MAP` descriptor shared and writable whatever the request's flags (and refuses a
//! read-only descriptor), so the table's read-write descriptor is sent and a guest could write
//! to the versions. The patched guest kernel never does; a hostile guest could only make
//! clients of the same table refetch needlessly or keep stale metadata of this share, which it
//! can change anyway. See the README's "Shared caching for virtio-fs guests".

use std::os::fd::AsRawFd;
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
    channels: Mutex<mpsc::Sender<Backend>>,
}

impl VersionsRegion {
    /// Starts the mapper thread (from the main thread, which may still create threads).
    pub fn start(table: Arc<VersionTable>, seccomp: SeccompAction) -> anyhow::Result<Self> {
        let mapped_len = table.geometry().guest_visible_len();
        let region_len = mapped_len
            .checked_next_power_of_two()
            .context("the version table is too large for a shared memory region")?;
        let (channels, received) = mpsc::channel::<Backend>();
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
            channels: Mutex::new(channels),
        })
    }

    /// Bytes of shared-memory region 1.
    pub fn region_len(&self) -> u64 {
        self.region_len
    }

    /// The VMM handed over a backend request channel: the table is mapped through it.
    pub fn set_channel(&self, backend: Backend) {
        let sent = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(backend);
        if sent.is_err() {
            warn!("The version table mapper is not running; the guest does not get the table.");
        }
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
