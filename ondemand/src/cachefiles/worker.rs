//! The worker of a cachefiles server: runs the cache engine, and fills the kernel's
//! cache objects of data blobs.
//!
//! The kernel's cache object is the only copy of a blob kept on the host: the engine
//! opens each blob for delivery ([`CacheEngine::open_blob_delivering`]), so a chunk is
//! fetched, verified and written straight into the blob's open objects through their
//! anonymous descriptors, and never into a cache file of the engine's own. A READ is
//! served by having its chunks delivered, checking that the object holds them, and
//! completing the request. A chunk that cannot be fetched or fails its digest is not
//! written: completing without data makes the reader's read fail with EIO, never return
//! zeros. Chunks the engine brings in by itself (read-ahead of a sequential reader, the
//! prefetch list) are delivered the same way, so the kernel finds them without asking.
//! What an object already holds (written by an earlier worker, kept in the cachefiles
//! directory across restarts) is found with `SEEK_HOLE` and never fetched again.
//!
//! The worker holds no `/dev/cachefiles` descriptor: it dies with its supervisor
//! (`PR_SET_PDEATHSIG`), so the anonymous descriptors it holds close with it and a
//! restarted server can `restore` the requests.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock};

use berth_cache::{
    open_backend, BlobBackend, BlobHandle, CacheEngine, CacheError, LocalDirBackend, Manifest,
};

use super::aligned::{write_into_object, AlignedBuf};
use super::device::complete_read;
use super::protocol::{FromWorker, Prefetch, ToWorker};
use crate::error::{IoContext, OndemandError, Result};
use crate::image::manifest_path_of;
use crate::ipc;

/// Backends by object name: one engine serves the images of every backend.
#[derive(Debug, Default)]
pub struct RoutedBackend {
    routes: RwLock<HashMap<String, Arc<dyn BlobBackend>>>,
}

impl RoutedBackend {
    /// Reads of `object` go to `backend` from now on.
    pub fn route(&self, object: &str, backend: Arc<dyn BlobBackend>) {
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(object.to_string(), backend);
    }

    fn backend(&self, name: &str) -> berth_cache::Result<Arc<dyn BlobBackend>> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or(CacheError::Unsupported("objects of no registered image"))
    }
}

impl BlobBackend for RoutedBackend {
    fn read_range(&self, name: &str, range: Range<u64>) -> berth_cache::Result<Vec<u8>> {
        self.backend(name)?.read_range(name, range)
    }
    fn read_range_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> berth_cache::Result<()> {
        self.backend(name)?.read_range_into(name, offset, buf)
    }
    fn merge_limit(&self, name: &str) -> Option<u64> {
        self.backend(name).ok()?.merge_limit(name)
    }
    fn size(&self, name: &str) -> berth_cache::Result<u64> {
        self.backend(name)?.size(name)
    }
    fn put_file(&self, name: &str, path: &Path) -> berth_cache::Result<()> {
        self.backend(name)?.put_file(name, path)
    }
    fn put_bytes(&self, name: &str, data: &[u8]) -> berth_cache::Result<()> {
        self.backend(name)?.put_bytes(name, data)
    }
    fn describe(&self) -> String {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = routes.values().map(|b| b.describe()).collect();
        names.sort();
        names.dedup();
        names.join(", ")
    }
}

/// A kernel cache object of a blob: where its chunks are delivered.
#[derive(Debug)]
struct Sink {
    object_id: u32,
    fd: OwnedFd,
}

impl Sink {
    /// Whether the object holds every byte of `range` (no hole in it).
    fn holds(&self, range: &Range<u64>) -> bool {
        let (Ok(start), Ok(end)) = (i64::try_from(range.start), i64::try_from(range.end)) else {
            return false;
        };
        // SAFETY: lseek on a descriptor we own; SEEK_HOLE only reports (the object's
        // descriptor forwards it to its backing file).
        let hole = unsafe { libc::lseek(self.fd.as_raw_fd(), start, libc::SEEK_HOLE) };
        hole >= end
    }
}

/// The cache objects a blob is delivered to.
type Sinks = Arc<Mutex<Vec<Arc<Sink>>>>;

#[derive(Debug)]
struct OpenBlob {
    handle: Arc<BlobHandle>,
    /// Images using the blob.
    images: Vec<String>,
    sinks: Sinks,
    /// Prefetched once the blob's first object opens: before, there is nowhere to put it.
    prefetch: Vec<Range<u64>>,
}

thread_local! {
    /// Where a fetch thread pads a chunk that is not page-aligned in place.
    static SCRATCH: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Writes a verified chunk into every object of its blob; fails only if none took it
/// (an object that did not is found out, and refilled, when it is read).
fn deliver(sinks: &Sinks, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let sinks: Vec<Arc<Sink>> = sinks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut last_error = None;
    let mut written = 0;
    for sink in &sinks {
        let outcome = SCRATCH.with(|scratch| {
            write_into_object(sink.fd.as_raw_fd(), offset, data, &mut scratch.borrow_mut())
        });
        match outcome {
            Ok(()) => written += 1,
            Err(err) => {
                tracing::warn!(
                    object = sink.object_id,
                    offset,
                    "cannot write fetched data into the cache object: {err}"
                );
                last_error = Some(err);
            }
        }
    }
    match (written, last_error) {
        (0, Some(err)) => Err(err),
        (0, None) => Err(std::io::Error::other("no cache object of the blob is open")),
        _ => Ok(()),
    }
}

/// Tells the engine which chunks every object of the blob holds.
fn reconcile(handle: &BlobHandle, sinks: &Sinks) {
    let sinks: Vec<Arc<Sink>> = sinks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let outcome = handle
        .reconcile_delivered(|range| !sinks.is_empty() && sinks.iter().all(|s| s.holds(&range)));
    if let Err(err) = outcome {
        tracing::error!(blob = %handle.id(), "{err}");
    }
}

/// Descriptor number the worker receives its socket at.
pub const WORKER_SOCKET_FD: RawFd = 3;

struct Worker {
    engine: Arc<CacheEngine>,
    backends: Arc<RoutedBackend>,
    socket: Arc<OwnedFd>,
    blobs: Mutex<HashMap<String, OpenBlob>>,
    objects: Mutex<HashMap<u32, (String, Arc<Sink>)>>,
}

fn send(socket: &OwnedFd, message: &FromWorker) {
    if let Err(err) = ipc::send(socket.as_raw_fd(), message, None) {
        tracing::debug!("cannot report to the supervisor: {err}");
    }
}

impl Worker {
    fn add_image(
        &self,
        key: &str,
        manifest_path: &Path,
        backend: Option<&str>,
        prefetch: Prefetch,
    ) -> Result<()> {
        let manifest_path = manifest_path_of(manifest_path);
        let manifest = Manifest::load(&manifest_path)?;
        let image_dir = manifest_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let backend: Arc<dyn BlobBackend> = match backend {
            Some(spec) => open_backend(spec)?,
            None => Arc::new(LocalDirBackend::new(&image_dir)),
        };
        let mut blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = blobs.get_mut(&manifest.blob_id) {
            if open.handle.manifest() != &manifest {
                return Err(CacheError::InvalidManifest(format!(
                    "blob {} is already served with a different manifest",
                    manifest.blob_id
                ))
                .into());
            }
            if !open.images.iter().any(|k| k == key) {
                open.images.push(key.to_string());
            }
            return Ok(());
        }
        // A wrong backend would otherwise fail every read with EIO.
        manifest.check_stored_object(backend.as_ref())?;
        self.backends.route(&manifest.object, backend);
        let sinks: Sinks = Arc::default();
        let handle = {
            let sinks = sinks.clone();
            Arc::new(
                self.engine
                    .open_blob_delivering(&manifest, move |offset, data| {
                        deliver(&sinks, offset, data)
                    })?,
            )
        };
        let mut ranges: Vec<Range<u64>> = Vec::new();
        if prefetch != Prefetch::None {
            for entry in &manifest.prefetch {
                ranges.extend(entry.ranges.iter().map(|&[start, end]| start..end));
            }
        }
        if prefetch == Prefetch::All {
            ranges.push(0..manifest.blob_size);
        }
        tracing::info!(image = key, blob = %manifest.blob_id, "serving blob");
        blobs.insert(
            manifest.blob_id.clone(),
            OpenBlob {
                handle,
                images: vec![key.to_string()],
                sinks,
                prefetch: ranges,
            },
        );
        Ok(())
    }

    fn remove_image(&self, key: &str) {
        let mut blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        blobs.retain(|id, open| {
            open.images.retain(|k| k != key);
            let keep = !open.images.is_empty();
            if !keep {
                tracing::info!(blob = %id, "blob no longer served");
            }
            keep
        });
    }

    fn add_object(&self, object_id: u32, blob_id: &str, fd: OwnedFd) {
        let mut blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(open) = blobs.get_mut(blob_id) else {
            tracing::error!(
                object_id,
                blob = blob_id,
                "a cache object of a blob no image here has"
            );
            return;
        };
        let sink = Arc::new(Sink { object_id, fd });
        open.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sink.clone());
        // What the object holds already (cached before a restart) is not fetched again;
        // what only the blob's other objects hold is, when this one is read.
        reconcile(&open.handle, &open.sinks);
        let prefetch = std::mem::take(&mut open.prefetch);
        if !prefetch.is_empty() {
            open.handle.prefetch(&prefetch);
        }
        drop(blobs);
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(object_id, (blob_id.to_string(), sink));
    }

    fn drop_object(&self, object_id: u32) {
        let removed = self
            .objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&object_id);
        if let Some((blob_id, _)) = removed {
            if let Some(open) = self
                .blobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&blob_id)
            {
                open.sinks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|s| s.object_id != object_id);
            }
        }
    }

    /// Serves one READ; returns whether data was written.
    fn read(&self, msg_id: u32, object_id: u32, off: u64, len: u64) -> bool {
        let object = self
            .objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&object_id)
            .cloned();
        let Some((blob_id, sink)) = object else {
            tracing::error!(
                object_id,
                msg_id,
                "a READ of an object this worker was not given"
            );
            return false;
        };
        let open = self
            .blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&blob_id)
            .map(|open| (open.handle.clone(), open.sinks.clone()));
        let Some((handle, sinks)) = open else {
            let _ = complete_read(sink.fd.as_raw_fd(), msg_id);
            return false;
        };
        let size = handle.manifest().blob_size;
        let range = off.min(size)..off.saturating_add(len).min(size);
        // Whole chunks are delivered: the kernel then finds the rest of each without asking.
        let chunks = handle.manifest().chunks_of(range.clone());
        let whole = handle.manifest().chunk_range(chunks.start).start
            ..handle
                .manifest()
                .chunk_range(chunks.end.saturating_sub(1))
                .end;
        // A panic must still complete the request (with EIO), never leave it waiting.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // The engine counts a chunk delivered once any object took it: one this
            // object missed (it opened during the fetch, or its write failed) is
            // delivered again after a reconcile.
            for _ in 0..2 {
                handle
                    .ensure_present(range.clone())
                    .map_err(|e| e.to_string())?;
                if range.is_empty() || sink.holds(&whole) {
                    return Ok(());
                }
                reconcile(&handle, &sinks);
            }
            Err(format!(
                "cache object {object_id} still has a hole in {whole:?} after the delivery"
            ))
        }))
        .unwrap_or_else(|_| Err("internal error (panic) while serving".into()));
        let ok = match outcome {
            Ok(()) => true,
            Err(message) => {
                tracing::error!(blob = %blob_id, range = ?range, "failing a read of blob {blob_id} with EIO: {message}");
                false
            }
        };
        if let Err(err) = complete_read(sink.fd.as_raw_fd(), msg_id) {
            // Gone already (the reader was killed, or a restarted supervisor re-sent a
            // request the previous worker completed).
            tracing::debug!(msg_id, "completing a READ: {err}");
        }
        ok
    }
}

/// What the worker runs with.
pub struct WorkerOptions {
    pub engine: Arc<CacheEngine>,
    pub backends: Arc<RoutedBackend>,
    pub threads: usize,
}

/// Takes the supervisor's socket from [`WORKER_SOCKET_FD`] and asks to die with the
/// supervisor.
///
/// # Safety
/// Call once, first thing in a worker process started by the supervisor.
pub unsafe fn inherited_socket() -> Result<OwnedFd> {
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // SAFETY (caller): the supervisor installed the socket at this number for us.
    if unsafe { libc::fcntl(WORKER_SOCKET_FD, libc::F_GETFD) } < 0 {
        return Err(OndemandError::Io {
            context: "taking the supervisor's socket (run `berth fscache`, not the worker)".into(),
            source: std::io::Error::from_raw_os_error(libc::EBADF),
        });
    }
    // SAFETY: marks our own descriptor close-on-exec.
    unsafe { libc::fcntl(WORKER_SOCKET_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    // The supervisor may already be gone (before PDEATHSIG was armed).
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        std::process::exit(1);
    }
    // SAFETY: an open descriptor the supervisor gave to this process alone.
    Ok(unsafe { OwnedFd::from_raw_fd(WORKER_SOCKET_FD) })
}

/// Serves the supervisor on `socket` until it says stop or goes away.
pub fn run_worker(options: WorkerOptions, socket: OwnedFd) -> Result<()> {
    let socket = Arc::new(socket);
    let worker = Arc::new(Worker {
        engine: options.engine,
        backends: options.backends,
        socket: socket.clone(),
        blobs: Mutex::new(HashMap::new()),
        objects: Mutex::new(HashMap::new()),
    });
    let (sender, receiver) = mpsc::channel::<(u32, u32, u64, u64)>();
    let receiver = Arc::new(Mutex::new(receiver));
    let mut pool = Vec::new();
    for index in 0..options.threads.max(1) {
        let (worker, receiver) = (worker.clone(), receiver.clone());
        pool.push(
            std::thread::Builder::new()
                .name(format!("berth-fscache-{index}"))
                .spawn(move || loop {
                    let next = receiver.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((msg_id, object_id, off, len)) = next else {
                        return;
                    };
                    let ok = worker.read(msg_id, object_id, off, len);
                    send(&worker.socket, &FromWorker::ReadDone { msg_id, ok });
                })
                .context(|| "starting a worker thread".into())?,
        );
    }
    send(&socket, &FromWorker::Ready);
    loop {
        let message = match ipc::receive::<ToWorker>(socket.as_raw_fd()) {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
            Err(err) => {
                tracing::error!("the supervisor's socket failed: {err}");
                break;
            }
        };
        match message {
            (
                ToWorker::AddImage {
                    key,
                    manifest,
                    backend,
                    prefetch,
                },
                _,
            ) => {
                let error = worker
                    .add_image(&key, &manifest, backend.as_deref(), prefetch)
                    .err()
                    .map(|e| e.to_string());
                if let Some(error) = &error {
                    tracing::error!(image = %key, "cannot serve the image: {error}");
                }
                send(&socket, &FromWorker::ImageAdded { key, error });
            }
            (ToWorker::RemoveImage { key }, _) => worker.remove_image(&key),
            (ToWorker::Object { object_id, blob_id }, Some(fd)) => {
                worker.add_object(object_id, &blob_id, fd)
            }
            (ToWorker::Object { object_id, .. }, None) => {
                tracing::error!(object_id, "a cache object came without its descriptor")
            }
            (ToWorker::DropObject { object_id }, _) => worker.drop_object(object_id),
            (
                ToWorker::Read {
                    msg_id,
                    object_id,
                    off,
                    len,
                },
                _,
            ) => {
                let _ = sender.send((msg_id, object_id, off, len));
            }
            (ToWorker::Stop, _) => break,
        }
    }
    drop(sender);
    for thread in pool {
        let _ = thread.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_backend_reads_each_object_from_its_own_backend() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalDirBackend::new(dir.path().join("a"));
        let b = LocalDirBackend::new(dir.path().join("b"));
        a.put_bytes("blobs/x", b"from a").unwrap();
        b.put_bytes("blobs/y", b"from b").unwrap();
        let routed = RoutedBackend::default();
        routed.route("blobs/x", Arc::new(a));
        routed.route("blobs/y", Arc::new(b));
        assert_eq!(routed.read_range("blobs/x", 0..6).unwrap(), b"from a");
        assert_eq!(routed.read_range("blobs/y", 5..6).unwrap(), b"b");
        assert!(routed.read_range("blobs/z", 0..1).is_err());
        assert_eq!(routed.size("blobs/y").unwrap(), 6);
    }
}
