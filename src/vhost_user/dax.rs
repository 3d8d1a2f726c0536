//! The DAX window of the vhost-user device: FUSE_SETUPMAPPING / FUSE_REMOVEMAPPING checked by
//! berth's window manager ([`berth_dax`]) and carried out by the VMM as `SHMEM_MAP` /
//! `SHMEM_UNMAP` on the backend request channel (region 0), each acknowledged (REPLY_ACK)
//! before the guest gets its reply.
//!
//! Requests to the VMM go from the thread serving the FUSE request (a queue or pool thread),
//! never from the control thread: the VMM handles backend requests in its main loop, which is
//! blocked while it waits for the control thread's reply to one of its own messages. So a
//! device reset does not unmap anything itself; the guest's next FUSE_INIT (or DESTROY) does,
//! before it can map anything new.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, Weak};

use super::dax_watch::FileWatch;
use berth_dax::{
    DaxError, Frontend, MappableFile, Metrics, SetupRequest, WindowConfig, WindowManager,
    GUEST_MAPPING_GRANULE,
};
use berth_passthrough::{DaxWindow, PassthroughFs, RemoveMappingOne, SetupMappingIn};
use berth_seccomp::{SeccompAction, ThreadRole};
use fuse_backend_rs::api::filesystem::Context;
use tracing::{info, warn};
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// The shared memory region the window is (virtio-fs: the cache region, id 0).
const WINDOW_REGION: u8 = 0;
/// The handle a Linux guest sends with SETUPMAPPING: none.
const NO_HANDLE: u64 = u64::MAX;

/// The backend request channel as the window manager's frontend.
struct Channel<'a>(&'a Backend);

impl Frontend for Channel<'_> {
    fn map(
        &self,
        window_offset: u64,
        len: u64,
        file: BorrowedFd<'_>,
        file_offset: u64,
        writable: bool,
    ) -> io::Result<()> {
        let flags = if writable {
            VhostUserMMapFlags::WRITABLE
        } else {
            VhostUserMMapFlags::default()
        };
        let request = VhostUserMMap {
            shmid: WINDOW_REGION,
            fd_offset: file_offset,
            shm_offset: window_offset,
            len,
            flags: flags.bits(),
            ..Default::default()
        };
        self.0.shmem_map(&request, &file.as_raw_fd()).map(drop)
    }

    fn unmap(&self, window_offset: u64, len: u64) -> io::Result<()> {
        let request = VhostUserMMap {
            shmid: WINDOW_REGION,
            shm_offset: window_offset,
            len,
            ..Default::default()
        };
        self.0.shmem_unmap(&request).map(drop)
    }
}

/// The device's DAX window.
pub struct VhostDax {
    manager: WindowManager,
    fs: Arc<PassthroughFs>,
    channel: Mutex<Option<Backend>>,
    /// Files opened for mappings without a handle, per (inode, writable): every range of one
    /// file shares one descriptor, so a full window holds one per file, not one per range.
    files: Mutex<HashMap<(u64, bool), Weak<File>>>,
    /// Marks every mapped file for host processes' size changes (none if fanotify is not
    /// available: then only berth's own truncations are seen).
    watch: Option<Arc<FileWatch>>,
}

impl VhostDax {
    /// A window of `size` bytes over `fs`.
    pub fn new(size: u64, fs: Arc<PassthroughFs>) -> Result<Self, DaxError> {
        let manager = WindowManager::new(WindowConfig {
            size,
            granule: GUEST_MAPPING_GRANULE,
            read_only: fs.is_read_only(),
        })?;
        let watch = match FileWatch::new() {
            Ok(watch) => Some(Arc::new(watch)),
            Err(e) => {
                warn!(
                    "Cannot watch DAX-mapped files for host truncation (fanotify: {e}); a host \
                     process that shrinks a mapped file may crash the VMM."
                );
                None
            }
        };
        Ok(VhostDax {
            manager,
            fs,
            channel: Mutex::new(None),
            files: Mutex::new(HashMap::new()),
            watch,
        })
    }

    /// Starts the reclaim thread: when a host process changes a mapped file, the window's
    /// ranges follow its new size (see the dax_watch module).
    pub fn start_watcher(self: &Arc<Self>, seccomp: SeccompAction) -> io::Result<()> {
        let Some(watch) = self.watch.clone() else {
            return Ok(());
        };
        let window = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("dax-reclaim".to_owned())
            .spawn(move || {
                if let Err(e) = berth_seccomp::install_filter(ThreadRole::DaxWatcher, seccomp) {
                    warn!("The DAX reclaim thread cannot confine itself ({e}); it stops.");
                    return;
                }
                let e = watch.run(|| {
                    if let Some(window) = window.upgrade() {
                        window.recheck_all();
                    }
                });
                warn!("The DAX reclaim thread stops: reading its file watch failed ({e}).");
            })
            .map(drop)
    }

    /// Every range follows its file's size now.
    fn recheck_all(&self) {
        let channel = self.channel();
        let frontend = channel.as_ref().map(Channel);
        let changed = self
            .manager
            .recheck_all(frontend.as_ref().map(|f| f as &dyn Frontend));
        if changed > 0 {
            info!("A host process resized DAX-mapped files: re-pointed {changed} window ranges.");
        }
    }

    fn watch(&self, file: &File) {
        if let Some(watch) = &self.watch {
            watch.mark(file);
        }
    }

    /// The window's size in bytes.
    pub fn size(&self) -> u64 {
        self.manager.config().size
    }

    /// The window's counters.
    pub fn metrics(&self) -> Metrics {
        self.manager.metrics()
    }

    /// The VMM's backend request channel (SET_BACKEND_REQ_FD).
    pub fn set_channel(&self, backend: Backend) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    fn channel(&self) -> Option<Backend> {
        self.channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn open(&self, inode: u64, handle: u64, writable: bool) -> io::Result<MappableFile> {
        if handle != NO_HANDLE {
            let (file, writable) = self.fs.open_for_mapping(inode, Some(handle), writable)?;
            self.watch(&file);
            return Ok(MappableFile {
                file: Arc::new(file),
                writable,
            });
        }
        // QEMU 11.1 maps every SHMEM_MAP descriptor shared and writable, whatever the
        // request's flags, and fails (EACCES) on a read-only descriptor: on a writable share
        // read mappings get a read-write descriptor too, when the host allows one.
        let read_write = writable || !self.fs.is_read_only();
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        for descriptor_writable in [read_write, false] {
            if let Some(file) = files
                .get(&(inode, descriptor_writable))
                .and_then(Weak::upgrade)
            {
                return Ok(MappableFile {
                    file,
                    writable: descriptor_writable,
                });
            }
        }
        let opened = match self.fs.open_for_mapping(inode, None, read_write) {
            Err(e) if !writable && read_write && refused_writing(&e) => {
                self.fs.open_for_mapping(inode, None, false)
            }
            other => other,
        };
        let (file, writable) = opened?;
        self.watch(&file);
        let file = Arc::new(file);
        if files.len() >= 1024 {
            files.retain(|_, file| file.strong_count() > 0);
        }
        files.insert((inode, writable), Arc::downgrade(&file));
        Ok(MappableFile { file, writable })
    }
}

/// Whether opening for writing failed only because writing is not allowed.
fn refused_writing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::ETXTBSY)
    )
}

impl DaxWindow for VhostDax {
    fn setup_mapping(
        &self,
        _ctx: &Context,
        nodeid: u64,
        mapping: &SetupMappingIn,
    ) -> io::Result<()> {
        let channel = self.channel();
        let frontend = channel.as_ref().map(Channel);
        let request = SetupRequest {
            inode: nodeid,
            window_offset: mapping.moffset,
            len: mapping.len,
            file_offset: mapping.foffset,
            flags: mapping.flags,
        };
        self.manager
            .setup(
                frontend.as_ref().map(|f| f as &dyn Frontend),
                &request,
                |writable| self.open(nodeid, mapping.fh, writable),
            )
            .map_err(io::Error::from)
    }

    fn remove_mappings(
        &self,
        _ctx: &Context,
        _nodeid: u64,
        ranges: &[RemoveMappingOne],
    ) -> io::Result<()> {
        let channel = self.channel();
        let frontend = channel.as_ref().map(Channel);
        let ranges: Vec<(u64, u64)> = ranges.iter().map(|r| (r.moffset, r.len)).collect();
        self.manager
            .remove(frontend.as_ref().map(|f| f as &dyn Frontend), &ranges)
            .map_err(io::Error::from)
    }

    fn resizing(&self, nodeid: u64, new_size: u64) {
        if !self.manager.maps_inode(nodeid) {
            return;
        }
        let channel = self.channel();
        let frontend = channel.as_ref().map(Channel);
        self.manager.resizing(
            frontend.as_ref().map(|f| f as &dyn Frontend),
            nodeid,
            new_size,
        );
    }

    fn resized(&self, nodeid: u64) {
        if !self.manager.maps_inode(nodeid) {
            return;
        }
        let channel = self.channel();
        let frontend = channel.as_ref().map(Channel);
        self.manager
            .resized(frontend.as_ref().map(|f| f as &dyn Frontend), nodeid);
    }

    fn end_session(&self) {
        let channel = self.channel();
        let frontend = channel.as_ref().map(Channel);
        let dropped = self
            .manager
            .clear(frontend.as_ref().map(|f| f as &dyn Frontend));
        if dropped > 0 {
            info!("The FUSE session ended or started over: unmapped {dropped} DAX window ranges.");
        }
    }
}
