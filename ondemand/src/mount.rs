//! Mounting an image: the erofs bootstrap is mounted file-backed with its data
//! device being the blob's sparse cache file, and reads of missing ranges of that
//! file are held by fanotify pre-content events until the engine has filled them.
//!
//! Order matters and is relied on:
//! 1. the engine opens the cache file (its descriptor predates the mark, so the
//!    kernel gives it no pre-content events: the engine's own writes never recurse);
//! 2. the fanotify group marks the cache file with `FAN_PRE_ACCESS`;
//! 3. handler threads start, then erofs is mounted (it opens the device after the
//!    mark, so its reads raise events).
//!
//! On shutdown the filesystem is unmounted before the group is closed, because a
//! closed group lets pending and future accesses through (fail-open) and the
//! reader would see the holes of the sparse file as zeros.

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use berth_cache::{BlobBackend, BlobHandle, CacheConfig, CacheEngine, CacheError, Manifest};

use crate::error::{IoContext, OndemandError, Result};
use crate::image::manifest_path_of;
use crate::readahead::{mount_with_readahead, DEFAULT_KERNEL_READAHEAD};

/// `FAN_PRE_ACCESS` (Linux 6.14): permission to access a file range before it is read or written.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// Info record type carrying the accessed range of a pre-content event.
pub(crate) const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
const FANOTIFY_METADATA_VERSION: u8 = 3;
const EVENT_METADATA_LEN: usize = 24;
const RANGE_RECORD_LEN: usize = 24;
/// `FAN_DENY_ERRNO(EIO)`: deny with the errno the reader should see (Linux 6.14).
pub(crate) const FAN_DENY_EIO: u32 = libc::FAN_DENY | ((libc::EIO as u32 & 0xff) << 24);

/// What to mount and how.
pub struct MountOptions {
    /// The image directory (holding `manifest.json`) or the manifest file itself.
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    /// The engine to serve the blob from (see [`MountOptions::new`] to make one).
    pub engine: Arc<CacheEngine>,
    /// Threads answering fanotify events.
    pub handler_threads: usize,
    /// The kernel's read-ahead window on the mount, in bytes (see [`crate::readahead`]).
    pub kernel_readahead: u64,
}

impl MountOptions {
    /// Options with a new engine on `cache_dir` and `backend`, and 4 handler threads.
    pub fn new(
        image: impl Into<PathBuf>,
        mountpoint: impl Into<PathBuf>,
        cache_dir: impl Into<PathBuf>,
        backend: Arc<dyn BlobBackend>,
    ) -> Result<Self> {
        let engine = CacheEngine::new(CacheConfig::new(cache_dir), backend)?;
        Ok(Self {
            image: image.into(),
            mountpoint: mountpoint.into(),
            engine: Arc::new(engine),
            handler_threads: 4,
            kernel_readahead: DEFAULT_KERNEL_READAHEAD,
        })
    }
}

/// A mounted image. Dropping it unmounts; if the unmount fails the fanotify group
/// is deliberately leaked so reads keep failing closed instead of returning zeros.
pub struct MountHandle {
    mountpoint: PathBuf,
    engine: Arc<CacheEngine>,
    blob: Arc<BlobHandle>,
    group: Option<Arc<OwnedFd>>,
    wake: Option<OwnedFd>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    mounted: bool,
}

pub(crate) fn last_os_error(operation: &'static str) -> OndemandError {
    OndemandError::Kernel {
        operation,
        source: io::Error::last_os_error(),
    }
}

/// Mounts the erofs `bootstrap` file itself (mount(2) on the file, no loop device) read-only
/// on `mountpoint`, its data blob being the cache file `blob`, with a kernel read-ahead
/// window of `readahead` bytes (see [`crate::readahead`]; 0: the kernel's default).
pub fn mount_erofs_file(
    bootstrap: &Path,
    blob: &Path,
    mountpoint: &Path,
    readahead: u64,
) -> Result<()> {
    let source = c_path(bootstrap)?;
    let target = c_path(mountpoint)?;
    let data =
        CString::new(format!("device={}", blob.display())).map_err(|_| OndemandError::Io {
            context: "building mount options".into(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
    mount_erofs_readonly(&source, &target, &data, mountpoint, readahead).map_err(|source| {
        OndemandError::Kernel {
            operation: "mount(erofs)",
            source,
        }
    })
}

/// mount(2) of erofs, read-only, from `source` on `target` (which is `mountpoint`) with
/// `options`, then the kernel read-ahead window of [`crate::readahead`]: what the
/// fanotify and the fscache mounts share.
pub(crate) fn mount_erofs_readonly(
    source: &CStr,
    target: &CStr,
    options: &CStr,
    mountpoint: &Path,
    readahead: u64,
) -> io::Result<()> {
    mount_with_readahead(readahead, mountpoint, || {
        // SAFETY: all pointers are NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                c"erofs".as_ptr(),
                libc::MS_RDONLY,
                options.as_ptr().cast(),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    })
}

pub(crate) fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| OndemandError::Io {
        context: format!("using path {}", path.display()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// Creates a pre-content fanotify group (non-blocking, close-on-exec).
pub(crate) fn pre_content_group() -> Result<OwnedFd> {
    // SAFETY: plain syscall with constant flags; the result is checked.
    let fd = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_PRE_CONTENT | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK,
            (libc::O_RDWR | libc::O_LARGEFILE) as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(last_os_error("fanotify_init(FAN_CLASS_PRE_CONTENT)"));
    }
    // SAFETY: fanotify_init returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn mark_pre_access(group: &OwnedFd, path: &Path) -> Result<()> {
    change_mark(group, path, libc::FAN_MARK_ADD)
}

pub(crate) fn change_mark(group: &OwnedFd, path: &Path, flags: libc::c_uint) -> Result<()> {
    let path = c_path(path)?;
    // SAFETY: `group` is a live fanotify descriptor and `path` a NUL-terminated string.
    let rc = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            FAN_PRE_ACCESS,
            libc::AT_FDCWD,
            path.as_ptr(),
        )
    };
    if rc < 0 {
        return Err(last_os_error("fanotify_mark(FAN_PRE_ACCESS)"));
    }
    Ok(())
}

/// Whether this kernel gives this process fanotify pre-content events (Linux 6.14+,
/// root): a probe file in the writable directory `scratch` is marked. `Err` says why not.
pub fn fanotify_available(scratch: &Path) -> std::result::Result<(), String> {
    let probe = scratch.join(format!(".fanotify-probe-{}", std::process::id()));
    fs::write(&probe, b"").map_err(|e| format!("cannot write {}: {e}", probe.display()))?;
    let outcome = pre_content_group().and_then(|group| mark_pre_access(&group, &probe));
    let _ = fs::remove_file(&probe);
    outcome.map_err(|e| format!("fanotify pre-content events are unavailable: {e}"))
}

/// Checks that this process can build and mount erofs images through fanotify
/// pre-content events here; `Err` says why not. `scratch` must be a writable directory.
pub fn check_support(scratch: &Path) -> std::result::Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("erofs"))
    {
        return Err("the kernel has no erofs support".into());
    }
    fanotify_available(scratch)?;
    let mkfs = std::process::Command::new("mkfs.erofs")
        .arg("--help")
        .output();
    if mkfs.is_err() {
        return Err("mkfs.erofs (erofs-utils) is not installed".into());
    }
    Ok(())
}

/// Checks the bootstrap against the digest the manifest records for it (if any): a
/// bootstrap from another build would read another image's chunks as its files.
pub fn check_bootstrap(manifest: &Manifest, bootstrap: &Path) -> Result<()> {
    let Some(expected) = &manifest.bootstrap_digest else {
        return Ok(());
    };
    let actual = crate::image::file_digest(bootstrap)?;
    if &actual != expected {
        return Err(OndemandError::InvalidImage(format!(
            "{} has digest {actual}, but the manifest expects {expected}: it belongs to another image",
            bootstrap.display()
        )));
    }
    Ok(())
}

/// Mounts the image described by `options`, served by threads of this process.
///
/// The kernel lets pending and later reads through when the fanotify group closes, so
/// if this process dies (SIGKILL, OOM, abort) with the image still mounted, reads of
/// data not fetched yet return the sparse cache file's zeros. `berth mount` therefore
/// uses [`crate::supervise`], which survives the death of the serving process; this
/// in-process form is for tests, benchmarks and embedders that manage that risk.
pub fn mount_image(options: MountOptions) -> Result<MountHandle> {
    let manifest_path = manifest_path_of(&options.image);
    let manifest = Manifest::load(&manifest_path)?;
    let image_dir = manifest_path
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let bootstrap = image_dir.join(&manifest.bootstrap);
    if !bootstrap.is_file() {
        return Err(CacheError::InvalidManifest(format!(
            "bootstrap {} is missing",
            bootstrap.display()
        ))
        .into());
    }
    check_bootstrap(&manifest, &bootstrap)?;
    // 1. The engine's descriptor of the cache file is opened before the mark.
    let blob = Arc::new(options.engine.open_blob(&manifest)?);
    let cache_path = blob.cache_path()?;
    let cache_path =
        fs::canonicalize(cache_path).context(|| format!("resolving {}", cache_path.display()))?;
    let cache_meta =
        fs::metadata(&cache_path).context(|| format!("reading {}", cache_path.display()))?;
    // 2. Mark.
    let group = Arc::new(pre_content_group()?);
    mark_pre_access(&group, &cache_path)?;
    // 3. Handlers, then the mount.
    // SAFETY: plain syscall; the result is checked.
    let wake_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if wake_fd < 0 {
        return Err(last_os_error("eventfd"));
    }
    // SAFETY: eventfd returned a new descriptor that nothing else owns.
    let wake = unsafe { OwnedFd::from_raw_fd(wake_fd) };
    let stop = Arc::new(AtomicBool::new(false));
    let complete = Arc::new(AtomicBool::new(false));
    let mut handle = MountHandle {
        mountpoint: options.mountpoint.clone(),
        engine: options.engine.clone(),
        blob: blob.clone(),
        group: Some(group.clone()),
        wake: None,
        stop: stop.clone(),
        threads: Vec::new(),
        mounted: false,
    };
    for index in 0..options.handler_threads.max(1) {
        let handler = EventHandler {
            group: group.clone(),
            wake: wake.as_raw_fd(),
            stop: stop.clone(),
            blob: blob.clone(),
            file_identity: (cache_meta.dev(), cache_meta.ino()),
            cache_path: cache_path.clone(),
            complete: complete.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("berth-fanotify-{index}"))
            .spawn(move || handler.run())
            .context(|| "starting a fanotify handler".to_string())?;
        handle.threads.push(thread);
    }
    handle.wake = Some(wake);
    // On failure nothing is mounted: stopping the handlers and closing the group is safe.
    mount_erofs_file(
        &bootstrap,
        &cache_path,
        &options.mountpoint,
        options.kernel_readahead,
    )?;
    handle.mounted = true;
    remove_mark_if_complete(&group, &blob, &cache_path, &complete);
    tracing::info!(mountpoint = %options.mountpoint.display(), blob = %manifest.blob_id, "mounted image");
    Ok(handle)
}

impl MountHandle {
    /// The engine serving this mount.
    pub fn engine(&self) -> &Arc<CacheEngine> {
        &self.engine
    }

    /// The mounted blob.
    pub fn blob(&self) -> &BlobHandle {
        &self.blob
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn umount_filesystem(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        let target = c_path(&self.mountpoint)?;
        let mut attempts = 0;
        loop {
            // SAFETY: `target` is a NUL-terminated path.
            let rc = unsafe { libc::umount2(target.as_ptr(), 0) };
            if rc == 0 {
                self.mounted = false;
                return Ok(());
            }
            let err = io::Error::last_os_error();
            attempts += 1;
            if err.raw_os_error() != Some(libc::EBUSY) || attempts >= 20 {
                return Err(OndemandError::Kernel {
                    operation: "umount",
                    source: err,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_handlers(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(wake) = &self.wake {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.group = None;
        self.wake = None;
    }

    /// Unmounts, then stops the handlers and closes the fanotify group.
    pub fn unmount(mut self) -> Result<()> {
        self.try_unmount()
    }

    /// Like [`MountHandle::unmount`], but when the unmount fails (say with `EBUSY`
    /// because files are still open) the mount keeps being served and the call
    /// can be repeated later.
    pub fn try_unmount(&mut self) -> Result<()> {
        self.umount_filesystem()?;
        self.stop_handlers();
        Ok(())
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        match self.umount_filesystem() {
            Ok(()) => self.stop_handlers(),
            Err(err) => {
                tracing::error!(
                    "cannot unmount {}: {err}; keeping the fanotify group open so reads fail closed",
                    self.mountpoint.display()
                );
                // Leaking the group and its handlers keeps accesses gated.
                if let Some(group) = self.group.take() {
                    std::mem::forget(group);
                }
                if let Some(wake) = self.wake.take() {
                    std::mem::forget(wake);
                }
                self.threads.clear();
            }
        }
    }
}

/// Once every chunk is present, events only cost time: drop the mark. The blob is
/// in use while mounted, so it cannot be evicted and its chunks stay present.
pub(crate) fn remove_mark_if_complete(
    group: &OwnedFd,
    blob: &BlobHandle,
    cache_path: &Path,
    complete: &AtomicBool,
) {
    if complete.load(Ordering::SeqCst) || !blob.is_complete() {
        return;
    }
    if !complete.swap(true, Ordering::SeqCst) {
        match change_mark(group, cache_path, libc::FAN_MARK_REMOVE) {
            Ok(()) => {
                tracing::info!(blob = %blob.id(), "all chunks present; fanotify mark removed")
            }
            Err(err) => tracing::warn!("cannot remove the fanotify mark: {err}"),
        }
    }
}

pub(crate) struct EventHandler {
    pub(crate) cache_path: PathBuf,
    pub(crate) complete: Arc<AtomicBool>,
    pub(crate) group: Arc<OwnedFd>,
    pub(crate) wake: RawFd,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) blob: Arc<BlobHandle>,
    pub(crate) file_identity: (u64, u64),
}

/// One parsed pre-content event.
pub(crate) struct Event {
    pub(crate) fd: Option<OwnedFd>,
    pub(crate) range: Option<Range<u64>>,
}

/// Parses the events in `buf`; malformed trailing bytes are ignored.
pub(crate) fn parse_events(buf: &[u8]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut at = 0;
    while buf.len() - at >= EVENT_METADATA_LEN {
        let field_u32 = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let event_len = field_u32(at) as usize;
        let version = buf[at + 4];
        let metadata_len = u16::from_ne_bytes([buf[at + 6], buf[at + 7]]) as usize;
        if event_len < EVENT_METADATA_LEN || at + event_len > buf.len() || metadata_len > event_len
        {
            break;
        }
        let raw_fd = field_u32(at + 16) as i32;
        let fd = (raw_fd >= 0).then(|| {
            // SAFETY: the kernel installed this descriptor for us with the event.
            unsafe { OwnedFd::from_raw_fd(raw_fd) }
        });
        if version != FANOTIFY_METADATA_VERSION {
            tracing::error!(version, "unexpected fanotify metadata version");
        }
        let mut range = None;
        let mut info = at + metadata_len;
        let end = at + event_len;
        while end - info >= 4 {
            let kind = buf[info];
            let len = u16::from_ne_bytes([buf[info + 2], buf[info + 3]]) as usize;
            if len < 4 || info + len > end {
                break;
            }
            if kind == FAN_EVENT_INFO_TYPE_RANGE && len >= RANGE_RECORD_LEN {
                let u64_at =
                    |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap_or([0; 8]));
                let offset = u64_at(info + 8);
                let count = u64_at(info + 16);
                range = Some(offset..offset.saturating_add(count));
            }
            info += len;
        }
        events.push(Event { fd, range });
        at += event_len;
    }
    events
}

/// Token of the fanotify group in a handler's epoll set.
const GROUP_TOKEN: u64 = 0;

/// An epoll set of its own for one handler thread: the group, added exclusively (one
/// queued event wakes one waiting handler, not all of them), and the wake-up eventfd
/// (which wakes every handler to see the stop flag).
fn exclusive_waiter(group: RawFd, wake: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: epoll_create1 returned a new descriptor that nothing else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
    for (target, events, token) in [
        (group, libc::EPOLLIN | libc::EPOLLEXCLUSIVE, GROUP_TOKEN),
        (wake, libc::EPOLLIN, GROUP_TOKEN + 1),
    ] {
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: both descriptors are live; the kernel copies the event it is given.
        if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, target, &mut event) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(epoll)
}

/// The device and inode of open file `fd`.
fn identity(fd: &OwnedFd) -> Option<(u64, u64)> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills our buffer from a live descriptor; the result is checked.
    if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: a successful fstat initialised the whole structure.
    let stat = unsafe { stat.assume_init() };
    Some((stat.st_dev, stat.st_ino))
}

impl EventHandler {
    /// Waits up to a second for the group to have events; `true` when it has.
    fn wait(&self, epoll: Option<&OwnedFd>) -> bool {
        if let Some(epoll) = epoll {
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
            // SAFETY: the kernel writes at most two events into our array.
            let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), 2, 1000) };
            let ready = &events[..n.max(0) as usize];
            return ready.iter().any(|e| {
                let token = e.u64;
                token == GROUP_TOKEN
            });
        }
        let mut fds = [
            libc::pollfd {
                fd: self.group.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        rc > 0 && fds[0].revents & libc::POLLIN != 0
    }

    pub(crate) fn run(self) {
        let mut buf = [0u8; 256];
        // Without an epoll set of its own (out of descriptors), the handler polls.
        let epoll = exclusive_waiter(self.group.as_raw_fd(), self.wake)
            .inspect_err(|err| tracing::warn!("fanotify handler without epoll: {err}"))
            .ok();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if !self.wait(epoll.as_ref()) {
                continue;
            }
            // SAFETY: reads into our own buffer of the given length.
            let n =
                unsafe { libc::read(self.group.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            for event in parse_events(&buf[..n as usize]) {
                self.answer(event);
            }
        }
    }

    fn answer(&self, event: Event) {
        let Some(fd) = event.fd else {
            tracing::warn!("fanotify queue overflowed");
            return;
        };
        let ours = identity(&fd) == Some(self.file_identity);
        let size = self.blob.manifest().blob_size;
        let range = event.range.clone().unwrap_or(0..size);
        let outcome = if ours {
            // A panic anywhere below must still deny the read, never leave it hanging.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.blob.ensure_present(range.clone())
            }))
            .unwrap_or_else(|_| {
                Err(CacheError::FetchFailed {
                    blob: self.blob.id().to_string(),
                    chunk: range.start / u64::from(self.blob.manifest().chunk_size),
                    message: "internal error (panic) while fetching".into(),
                })
            })
        } else {
            Err(CacheError::UnknownBlob("an unmarked file".into()))
        };
        let response = match &outcome {
            Ok(()) => {
                remove_mark_if_complete(&self.group, &self.blob, &self.cache_path, &self.complete);
                libc::FAN_ALLOW
            }
            Err(err) => {
                tracing::error!(range = ?range, "denying read of {}: {err}", self.blob.id());
                FAN_DENY_EIO
            }
        };
        if self.respond(&fd, response).is_err() && response != libc::FAN_ALLOW {
            // Kernels without FAN_DENY_ERRNO reject it: deny plainly (EPERM).
            if let Err(err) = self.respond(&fd, libc::FAN_DENY) {
                tracing::error!("cannot answer a fanotify event: {err}");
            }
        }
    }

    pub(crate) fn respond(&self, fd: &OwnedFd, response: u32) -> io::Result<()> {
        let answer = libc::fanotify_response {
            fd: fd.as_raw_fd(),
            response,
        };
        let len = std::mem::size_of::<libc::fanotify_response>();
        // SAFETY: writes the bytes of a live fanotify_response to the group descriptor.
        let n = unsafe {
            libc::write(
                self.group.as_raw_fd(),
                (&answer as *const libc::fanotify_response).cast(),
                len,
            )
        };
        if n as usize == len {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
