//! The cache engine: blobs cached chunk by chunk in sparse local files.
//!
//! Durability order for every fetched chunk: `pwrite` the data, `fdatasync` the
//! cache file, then persist the chunk map (itself fdatasync'd). A crash between
//! the steps leaves a chunk whose data may be present but which is not marked
//! ready, never the reverse. With `verify_on_open`, ready chunks are re-hashed when
//! a blob is opened, so even a map from a misbehaving disk is not trusted blindly.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::BlobBackend;
use crate::chunkmap::{ChunkMap, MapLoad};
use crate::error::{CacheError, IoContext, Result};
use crate::manifest::{decompress_chunk, parse_digest, Manifest};
use crate::metrics::Metrics;

/// Tunables of a [`CacheEngine`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Directory holding `<blob id>.data` (sparse cache file) and `<blob id>.map`.
    pub cache_dir: PathBuf,
    /// Upper bound of cached bytes; blobs not in use are evicted, least recently
    /// used first, to stay below it. `None` means unbounded.
    pub capacity_bytes: Option<u64>,
    /// Backend reads in flight at once, all priorities together.
    pub max_concurrent_fetches: usize,
    /// Backend reads prefetch workers may have in flight (below on-demand reads,
    /// which also go first whenever any is waiting).
    pub max_prefetch_fetches: usize,
    /// Number of prefetch worker threads.
    pub prefetch_workers: usize,
    /// A miss is extended over following missing chunks until one backend read
    /// covers at least this many stored bytes.
    pub merge_min_bytes: u64,
    /// One backend read covers at most this many stored bytes.
    pub merge_max_bytes: u64,
    /// Attempts per backend read for transient errors.
    pub fetch_attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub retry_base_delay: Duration,
    /// Re-hash the chunks marked ready when a blob is opened.
    pub verify_on_open: bool,
}

impl CacheConfig {
    /// Defaults suited to 1 MiB chunks.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            capacity_bytes: None,
            max_concurrent_fetches: 8,
            max_prefetch_fetches: 2,
            prefetch_workers: 2,
            merge_min_bytes: 1 << 20,
            merge_max_bytes: 8 << 20,
            fetch_attempts: 4,
            retry_base_delay: Duration::from_millis(50),
            verify_on_open: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Missing,
    /// Being fetched by the holder of this ticket.
    Fetching(u64),
    Ready,
}

#[derive(Debug)]
struct ChunkStates {
    states: Vec<ChunkState>,
    /// Last failed fetch per chunk: its ticket and message, for the waiters of it.
    failures: HashMap<u64, (u64, String)>,
    next_ticket: u64,
}

#[derive(Debug)]
struct BlobCache {
    manifest: Manifest,
    digests: Vec<[u8; 32]>,
    data: File,
    data_path: PathBuf,
    map_path: PathBuf,
    map: Mutex<ChunkMap>,
    states: Mutex<ChunkStates>,
    changed: Condvar,
    handles: AtomicUsize,
    last_used: AtomicU64,
    evicted: AtomicBool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Priority {
    OnDemand,
    Prefetch,
}

#[derive(Debug)]
struct FetchPermits {
    state: Mutex<(usize, usize)>,
    freed: Condvar,
    max: usize,
    prefetch_max: usize,
}

struct Permit<'a>(&'a FetchPermits);

impl FetchPermits {
    fn acquire(&self, priority: Priority) -> Permit<'_> {
        let mut state = lock(&self.state);
        if priority == Priority::OnDemand {
            state.1 += 1;
            while state.0 >= self.max {
                state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.1 -= 1;
        } else {
            while state.0 >= self.prefetch_max || state.1 > 0 {
                state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        }
        state.0 += 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).0 -= 1;
        self.0.freed.notify_all();
    }
}

/// Locks a mutex, carrying on with the data if a panicking thread poisoned it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ticks() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[derive(Debug)]
struct EngineInner {
    config: CacheConfig,
    backend: Arc<dyn BlobBackend>,
    metrics: Arc<Metrics>,
    blobs: Mutex<HashMap<String, Arc<BlobCache>>>,
    /// Cache files found on disk and not opened: bytes used and last use.
    dormant: Mutex<HashMap<String, (u64, u64)>>,
    prefetch_queue: Mutex<VecDeque<(String, u64)>>,
    prefetch_ready: Condvar,
    shutdown: AtomicBool,
    permits: FetchPermits,
    /// Serializes evictions.
    evicting: Mutex<()>,
}

/// The engine. Cheap to share behind an `Arc`; prefetch workers stop when dropped.
#[derive(Debug)]
pub struct CacheEngine {
    inner: Arc<EngineInner>,
    workers: Vec<JoinHandle<()>>,
}

/// An open blob. While any handle exists the blob is in use and never evicted.
#[derive(Debug)]
pub struct BlobHandle {
    engine: Arc<EngineInner>,
    blob: Arc<BlobCache>,
}

/// A claimed run of adjacent chunks, fetched with one backend read.
struct Run {
    chunks: Range<u64>,
    ticket: u64,
}

impl CacheEngine {
    /// Creates the engine over `backend`, with its cache directory (created if
    /// needed) and prefetch workers.
    pub fn new(config: CacheConfig, backend: Arc<dyn BlobBackend>) -> Result<Self> {
        fs::create_dir_all(&config.cache_dir)
            .context(|| format!("creating {}", config.cache_dir.display()))?;
        let mut dormant = HashMap::new();
        let entries = fs::read_dir(&config.cache_dir)
            .context(|| format!("listing {}", config.cache_dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let (Some(id), Ok(meta)) = (name.strip_suffix(".data"), entry.metadata()) {
                let last_used = meta.mtime().max(0) as u64 * 1_000_000_000;
                dormant.insert(id.to_string(), (meta.blocks() * 512, last_used));
            }
        }
        let inner = Arc::new(EngineInner {
            permits: FetchPermits {
                state: Mutex::new((0, 0)),
                freed: Condvar::new(),
                max: config.max_concurrent_fetches.max(1),
                prefetch_max: config
                    .max_prefetch_fetches
                    .clamp(1, config.max_concurrent_fetches.max(1)),
            },
            config,
            backend,
            metrics: Arc::new(Metrics::default()),
            blobs: Mutex::new(HashMap::new()),
            dormant: Mutex::new(dormant),
            prefetch_queue: Mutex::new(VecDeque::new()),
            prefetch_ready: Condvar::new(),
            shutdown: AtomicBool::new(false),
            evicting: Mutex::new(()),
        });
        let mut workers = Vec::new();
        for index in 0..inner.config.prefetch_workers {
            let worker_inner = inner.clone();
            let worker = std::thread::Builder::new()
                .name(format!("berth-prefetch-{index}"))
                .spawn(move || worker_inner.prefetch_loop())
                .context(|| "starting a prefetch worker".to_string())?;
            workers.push(worker);
        }
        Ok(Self { inner, workers })
    }

    /// The engine's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// The counters in the Prometheus text format.
    pub fn render_prometheus(&self) -> String {
        self.inner.metrics.render_prometheus()
    }

    /// The backend blobs are fetched from.
    pub fn backend(&self) -> Arc<dyn BlobBackend> {
        self.inner.backend.clone()
    }

    /// Opens the blob described by `manifest`: creates its full-size sparse cache
    /// file and chunk map if needed (trusting the map only as far as it checks out).
    pub fn open_blob(&self, manifest: &Manifest) -> Result<BlobHandle> {
        self.inner.open_blob(manifest)
    }

    /// Reads up to `buf.len()` bytes of `blob_id` at `offset`, fetching what is
    /// missing. Returns the bytes read (0 at or past the end); errors rather than
    /// returning data it could not fetch and verify.
    pub fn read(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let blob = self.inner.blob(blob_id)?;
        self.inner.read(&blob, offset, buf)
    }

    /// Makes `range` of `blob_id` present in its cache file.
    pub fn ensure_present(&self, blob_id: &str, range: Range<u64>) -> Result<()> {
        let blob = self.inner.blob(blob_id)?;
        self.inner.ensure_present(&blob, range, Priority::OnDemand)
    }

    /// Queues `ranges` of `blob_id` for background fetching below on-demand reads.
    pub fn prefetch(&self, blob_id: &str, ranges: &[Range<u64>]) -> Result<()> {
        let blob = self.inner.blob(blob_id)?;
        self.inner.queue_prefetch(&blob, ranges);
        Ok(())
    }

    /// Path of the cache file of an open blob.
    pub fn cache_file_path(&self, blob_id: &str) -> Result<PathBuf> {
        Ok(self.inner.blob(blob_id)?.data_path.clone())
    }

    /// Number of chunks of `blob_id` present in the cache.
    pub fn ready_chunks(&self, blob_id: &str) -> Result<u64> {
        Ok(lock(&self.inner.blob(blob_id)?.map).ready_count())
    }

    /// Bytes currently cached (open and dormant blobs).
    pub fn cached_bytes(&self) -> u64 {
        self.inner.total_cached_bytes()
    }

    /// Blocks until the prefetch queue is empty (in-flight prefetches may still run).
    pub fn wait_prefetch_queue_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if lock(&self.inner.prefetch_queue).is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for CacheEngine {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.inner.prefetch_ready.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl BlobHandle {
    /// The blob id (hex blake3 of the blob).
    pub fn id(&self) -> &str {
        &self.blob.manifest.blob_id
    }

    /// The manifest the blob was opened with.
    pub fn manifest(&self) -> &Manifest {
        &self.blob.manifest
    }

    /// Path of the sparse cache file.
    pub fn cache_path(&self) -> &Path {
        &self.blob.data_path
    }

    /// The engine's own descriptor of the cache file. It was opened before any
    /// fanotify mark a mounter adds, so accesses through it raise no events.
    pub fn cache_fd(&self) -> BorrowedFd<'_> {
        self.blob.data.as_fd()
    }

    /// Raw form of [`Self::cache_fd`].
    pub fn cache_raw_fd(&self) -> RawFd {
        self.blob.data.as_raw_fd()
    }

    /// Whether every chunk of the blob is present.
    pub fn is_complete(&self) -> bool {
        let map = lock(&self.blob.map);
        map.ready_count() == map.chunk_count()
    }

    /// See [`CacheEngine::read`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.engine.read(&self.blob, offset, buf)
    }

    /// See [`CacheEngine::ensure_present`].
    pub fn ensure_present(&self, range: Range<u64>) -> Result<()> {
        self.engine
            .ensure_present(&self.blob, range, Priority::OnDemand)
    }

    /// See [`CacheEngine::prefetch`].
    pub fn prefetch(&self, ranges: &[Range<u64>]) {
        self.engine.queue_prefetch(&self.blob, ranges);
    }
}

impl Drop for BlobHandle {
    fn drop(&mut self) {
        self.blob.last_used.store(now_ticks(), Ordering::Relaxed);
        self.blob.handles.fetch_sub(1, Ordering::SeqCst);
        self.engine.evict_if_needed();
    }
}

impl EngineInner {
    fn blob(&self, blob_id: &str) -> Result<Arc<BlobCache>> {
        let blob = lock(&self.blobs)
            .get(blob_id)
            .cloned()
            .ok_or_else(|| CacheError::UnknownBlob(blob_id.to_string()))?;
        blob.last_used.store(now_ticks(), Ordering::Relaxed);
        Ok(blob)
    }

    fn open_blob(self: &Arc<Self>, manifest: &Manifest) -> Result<BlobHandle> {
        manifest.validate()?;
        let mut blobs = lock(&self.blobs);
        if let Some(blob) = blobs.get(&manifest.blob_id) {
            if blob.manifest != *manifest {
                return Err(CacheError::InvalidManifest(format!(
                    "blob {} is already open with a different manifest",
                    manifest.blob_id
                )));
            }
            blob.handles.fetch_add(1, Ordering::SeqCst);
            return Ok(BlobHandle {
                engine: self.clone(),
                blob: blob.clone(),
            });
        }
        let id = &manifest.blob_id;
        let blob_digest =
            parse_digest(id).ok_or_else(|| CacheError::InvalidManifest("bad blob id".into()))?;
        let mut digests = Vec::with_capacity(manifest.chunks.len());
        for chunk in &manifest.chunks {
            digests.push(
                parse_digest(&chunk.digest)
                    .ok_or_else(|| CacheError::InvalidManifest("bad digest".into()))?,
            );
        }
        let data_path = self.config.cache_dir.join(format!("{id}.data"));
        let map_path = self.config.cache_dir.join(format!("{id}.map"));
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .context(|| format!("opening cache file {}", data_path.display()))?;
        let current_len = data
            .metadata()
            .context(|| format!("reading {}", data_path.display()))?
            .len();
        let size_was_wrong = current_len != manifest.blob_size;
        if size_was_wrong {
            // A file of the wrong size holds nothing we can trust: start as all holes.
            data.set_len(0)
                .and_then(|()| data.set_len(manifest.blob_size))
                .context(|| format!("sizing cache file {}", data_path.display()))?;
        }
        let (mut map, outcome) = ChunkMap::open(
            &map_path,
            blob_digest,
            manifest.chunk_size,
            manifest.blob_size,
        )?;
        if size_was_wrong && map.ready_count() > 0 {
            let all: Vec<u64> = (0..map.chunk_count()).collect();
            map.clear(&all)?;
        }
        if outcome == MapLoad::Discarded {
            tracing::warn!(blob = %id, "chunk map was invalid; starting with an empty cache");
        }
        if self.config.verify_on_open && map.ready_count() > 0 {
            let mut bad = Vec::new();
            let mut buffer = vec![0u8; manifest.chunk_size as usize];
            for index in (0..map.chunk_count()).filter(|&i| map.is_ready(i)) {
                let range = manifest.chunk_range(index);
                let chunk = &mut buffer[..(range.end - range.start) as usize];
                let intact = data.read_exact_at(chunk, range.start).is_ok()
                    && blake3::hash(chunk).as_bytes() == &digests[index as usize];
                if !intact {
                    bad.push(index);
                }
            }
            if !bad.is_empty() {
                tracing::warn!(blob = %id, chunks = ?bad, "cached chunks failed verification on open; refetching them");
                map.clear(&bad)?;
            }
        }
        let states = (0..map.chunk_count())
            .map(|i| {
                if map.is_ready(i) {
                    ChunkState::Ready
                } else {
                    ChunkState::Missing
                }
            })
            .collect();
        let ready_bytes: u64 = (0..map.chunk_count())
            .filter(|&i| map.is_ready(i))
            .map(|i| manifest.chunk_range(i).end - manifest.chunk_range(i).start)
            .sum();
        tracing::info!(blob = %id, ready_chunks = map.ready_count(), chunks = map.chunk_count(), "opened blob cache");
        let blob = Arc::new(BlobCache {
            manifest: manifest.clone(),
            digests,
            data,
            data_path,
            map_path,
            map: Mutex::new(map),
            states: Mutex::new(ChunkStates {
                states,
                failures: HashMap::new(),
                next_ticket: 1,
            }),
            changed: Condvar::new(),
            handles: AtomicUsize::new(1),
            last_used: AtomicU64::new(now_ticks()),
            evicted: AtomicBool::new(false),
        });
        lock(&self.dormant).remove(id);
        self.metrics
            .cached_bytes
            .fetch_add(ready_bytes, Ordering::Relaxed);
        blobs.insert(id.clone(), blob.clone());
        Ok(BlobHandle {
            engine: self.clone(),
            blob,
        })
    }

    fn read(&self, blob: &BlobCache, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = blob.manifest.blob_size;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(size - offset) as usize;
        self.ensure_present(blob, offset..offset + len as u64, Priority::OnDemand)?;
        blob.data
            .read_exact_at(&mut buf[..len], offset)
            .context(|| format!("reading cache file {}", blob.data_path.display()))?;
        self.metrics
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(len)
    }

    fn ensure_present(
        &self,
        blob: &BlobCache,
        range: Range<u64>,
        priority: Priority,
    ) -> Result<()> {
        let manifest = &blob.manifest;
        let end = range.end.min(manifest.blob_size);
        if range.start >= end {
            return Ok(());
        }
        let chunk_size = u64::from(manifest.chunk_size);
        let wanted = range.start / chunk_size..(end - 1) / chunk_size + 1;
        let mut watched: HashMap<u64, u64> = HashMap::new();
        let mut first_pass = true;
        loop {
            let mut states = lock(&blob.states);
            let mut pending = false;
            for index in wanted.clone() {
                match states.states[index as usize] {
                    ChunkState::Ready => {}
                    ChunkState::Fetching(ticket) => {
                        watched.entry(index).or_insert(ticket);
                        pending = true;
                    }
                    ChunkState::Missing => {
                        if let Some(ticket) = watched.get(&index) {
                            if let Some((failed, message)) = states.failures.get(&index) {
                                if failed == ticket {
                                    return Err(CacheError::FetchFailed {
                                        blob: manifest.blob_id.clone(),
                                        chunk: index,
                                        message: message.clone(),
                                    });
                                }
                            }
                        }
                    }
                }
            }
            if first_pass && priority == Priority::OnDemand {
                let (mut hits, mut misses) = (0, 0);
                for index in wanted.clone() {
                    if states.states[index as usize] == ChunkState::Ready {
                        hits += 1;
                    } else {
                        misses += 1;
                    }
                }
                self.metrics.chunk_hits.fetch_add(hits, Ordering::Relaxed);
                self.metrics
                    .chunk_misses
                    .fetch_add(misses, Ordering::Relaxed);
            }
            first_pass = false;
            let runs = self.claim_runs(blob, &mut states, wanted.clone());
            if runs.is_empty() {
                if !pending {
                    return Ok(());
                }
                // Someone else is fetching what we need: wait for their outcome.
                let _unused = blob
                    .changed
                    .wait_timeout(states, Duration::from_millis(500))
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            }
            drop(states);
            let mut remaining = runs.into_iter();
            while let Some(run) = remaining.next() {
                let outcome = self.fetch_run(blob, run.chunks.clone(), priority);
                let mut states = lock(&blob.states);
                let mut failure = None;
                for (index, result) in run.chunks.clone().zip(outcome) {
                    match result {
                        Ok(()) => states.states[index as usize] = ChunkState::Ready,
                        Err(err) => {
                            states.states[index as usize] = ChunkState::Missing;
                            states.failures.insert(index, (run.ticket, err.to_string()));
                            if wanted.contains(&index) && failure.is_none() {
                                failure = Some(err);
                            }
                        }
                    }
                }
                if let Some(err) = failure {
                    // Hand back the runs not attempted, so their waiters claim them.
                    for later in remaining {
                        for index in later.chunks {
                            states.states[index as usize] = ChunkState::Missing;
                        }
                    }
                    drop(states);
                    blob.changed.notify_all();
                    return Err(err);
                }
                drop(states);
                blob.changed.notify_all();
            }
        }
    }

    /// Marks the missing chunks of `wanted` as being fetched by us, grouped into
    /// runs of adjacent chunks; a short last run is extended over following missing
    /// chunks to reach `merge_min_bytes`.
    fn claim_runs(
        &self,
        blob: &BlobCache,
        states: &mut ChunkStates,
        wanted: Range<u64>,
    ) -> Vec<Run> {
        let chunks = &blob.manifest.chunks;
        let run_bytes = |run: &Range<u64>, with: u64| {
            let last = &chunks[with as usize];
            last.offset + last.stored_size - chunks[run.start as usize].offset
        };
        let mut runs: Vec<Run> = Vec::new();
        let claim =
            |states: &mut ChunkStates, runs: &mut Vec<Run>, index: u64, may_start: bool| -> bool {
                if states.states[index as usize] != ChunkState::Missing {
                    return false;
                }
                if let Some(run) = runs.last_mut() {
                    if run.chunks.end == index
                        && run_bytes(&run.chunks, index) <= self.config.merge_max_bytes
                    {
                        run.chunks.end = index + 1;
                        states.states[index as usize] = ChunkState::Fetching(run.ticket);
                        return true;
                    }
                }
                if !may_start {
                    return false;
                }
                let ticket = states.next_ticket;
                states.next_ticket += 1;
                states.states[index as usize] = ChunkState::Fetching(ticket);
                runs.push(Run {
                    chunks: index..index + 1,
                    ticket,
                });
                true
            };
        for index in wanted.clone() {
            claim(states, &mut runs, index, true);
        }
        // Read ahead: a short run ending at the end of the request grows over the
        // following missing chunks until one backend read is worth it.
        let mut index = wanted.end;
        while (index as usize) < chunks.len() {
            let Some(run) = runs.last() else { break };
            if run.chunks.end != index
                || run_bytes(&run.chunks, index - 1) >= self.config.merge_min_bytes
            {
                break;
            }
            if !claim(states, &mut runs, index, false) {
                break;
            }
            index += 1;
        }
        runs
    }

    /// Fetches chunks `chunks` with one backend read (retried), verifies each and
    /// makes the good ones durable and ready. Returns one outcome per chunk.
    fn fetch_run(
        &self,
        blob: &BlobCache,
        chunks: Range<u64>,
        priority: Priority,
    ) -> Vec<Result<()>> {
        let manifest = &blob.manifest;
        let id = &manifest.blob_id;
        let first = &manifest.chunks[chunks.start as usize];
        let last = &manifest.chunks[chunks.end as usize - 1];
        let stored = first.offset..last.offset + last.stored_size;
        let count = (chunks.end - chunks.start) as usize;
        let fail_all = |message: String| -> Vec<Result<()>> {
            chunks
                .clone()
                .map(|chunk| {
                    Err(CacheError::FetchFailed {
                        blob: id.clone(),
                        chunk,
                        message: message.clone(),
                    })
                })
                .collect()
        };
        let data = {
            let _permit = self.permits.acquire(priority);
            let mut attempt = 0;
            loop {
                attempt += 1;
                self.metrics
                    .backend_requests
                    .fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                match self.backend.read_range(&manifest.object, stored.clone()) {
                    Ok(data) => {
                        self.metrics.observe_fetch_latency(started.elapsed());
                        self.metrics
                            .backend_bytes
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        break data;
                    }
                    Err(err) => {
                        self.metrics.backend_errors.fetch_add(1, Ordering::Relaxed);
                        let retry =
                            err.is_transient() && attempt < self.config.fetch_attempts.max(1);
                        tracing::warn!(blob = %id, chunks = ?chunks, attempt, retry, "backend read failed: {err}");
                        if !retry || self.shutdown.load(Ordering::Relaxed) {
                            return fail_all(err.to_string());
                        }
                        std::thread::sleep(
                            self.config.retry_base_delay * 2u32.saturating_pow(attempt - 1),
                        );
                    }
                }
            }
        };
        let mut outcomes: Vec<Result<()>> = Vec::with_capacity(count);
        let mut good = Vec::with_capacity(count);
        let mut good_bytes = 0;
        for index in chunks.clone() {
            let entry = &manifest.chunks[index as usize];
            let at = (entry.offset - stored.start) as usize;
            let raw_range = manifest.chunk_range(index);
            let raw_len = (raw_range.end - raw_range.start) as usize;
            let outcome = match decompress_chunk(
                manifest.compression,
                &data[at..at + entry.stored_size as usize],
                raw_len,
            ) {
                Err(message) => {
                    self.metrics
                        .verification_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(blob = %id, chunk = index, "chunk {index} of blob {id} cannot be decompressed: {message}");
                    Err(CacheError::Decompression {
                        blob: id.clone(),
                        chunk: index,
                        message,
                    })
                }
                Ok(raw) => {
                    let actual = blake3::hash(&raw);
                    if actual.as_bytes() != &blob.digests[index as usize] {
                        self.metrics
                            .verification_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::error!(blob = %id, chunk = index, "chunk {index} of blob {id} failed verification");
                        Err(CacheError::Verification {
                            blob: id.clone(),
                            chunk: index,
                            expected: entry.digest.clone(),
                            actual: actual.to_hex().to_string(),
                        })
                    } else {
                        blob.data
                            .write_all_at(&raw, raw_range.start)
                            .context(|| {
                                format!("writing chunk {index} to {}", blob.data_path.display())
                            })
                            .map(|()| {
                                good.push(index);
                                good_bytes += raw_len as u64;
                            })
                    }
                }
            };
            outcomes.push(outcome);
        }
        if good.is_empty() {
            return outcomes;
        }
        // Data first, durably; only then the map.
        let durable = blob
            .data
            .sync_data()
            .context(|| format!("syncing {}", blob.data_path.display()))
            .and_then(|()| lock(&blob.map).mark_ready(&good));
        if let Err(err) = durable {
            let message = err.to_string();
            return fail_all(message);
        }
        self.metrics
            .chunks_fetched
            .fetch_add(good.len() as u64, Ordering::Relaxed);
        if priority == Priority::Prefetch {
            self.metrics
                .chunks_prefetched
                .fetch_add(good.len() as u64, Ordering::Relaxed);
        }
        if !blob.evicted.load(Ordering::SeqCst) {
            self.metrics
                .cached_bytes
                .fetch_add(good_bytes, Ordering::Relaxed);
        }
        self.evict_if_needed();
        outcomes
    }

    fn queue_prefetch(&self, blob: &BlobCache, ranges: &[Range<u64>]) {
        let chunk_size = u64::from(blob.manifest.chunk_size);
        let states = lock(&blob.states);
        let mut queue = lock(&self.prefetch_queue);
        for range in ranges {
            let end = range.end.min(blob.manifest.blob_size);
            if range.start >= end {
                continue;
            }
            for index in range.start / chunk_size..(end - 1) / chunk_size + 1 {
                if states.states[index as usize] == ChunkState::Missing {
                    queue.push_back((blob.manifest.blob_id.clone(), index));
                }
            }
        }
        drop(queue);
        self.prefetch_ready.notify_all();
    }

    fn prefetch_loop(&self) {
        loop {
            let next = {
                let mut queue = lock(&self.prefetch_queue);
                loop {
                    if self.shutdown.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(item) = queue.pop_front() {
                        break item;
                    }
                    queue = self
                        .prefetch_ready
                        .wait_timeout(queue, Duration::from_millis(500))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            let (blob_id, index) = next;
            let Ok(blob) = self.blob(&blob_id) else {
                continue;
            };
            let range = blob.manifest.chunk_range(index);
            if let Err(err) = self.ensure_present(&blob, range, Priority::Prefetch) {
                tracing::warn!(blob = %blob_id, chunk = index, "prefetch failed: {err}");
            }
        }
    }

    fn total_cached_bytes(&self) -> u64 {
        let dormant: u64 = lock(&self.dormant).values().map(|(bytes, _)| *bytes).sum();
        dormant + self.metrics.cached_bytes.load(Ordering::Relaxed)
    }

    /// Evicts blobs not in use, least recently used first, until under capacity.
    fn evict_if_needed(&self) {
        let Some(capacity) = self.config.capacity_bytes else {
            return;
        };
        let _serial = lock(&self.evicting);
        while self.total_cached_bytes() > capacity {
            let mut candidates: Vec<(u64, String, bool)> = lock(&self.dormant)
                .iter()
                .map(|(id, (_, used))| (*used, id.clone(), false))
                .collect();
            candidates.extend(
                lock(&self.blobs)
                    .iter()
                    .filter(|(_, b)| b.handles.load(Ordering::SeqCst) == 0)
                    .map(|(id, b)| (b.last_used.load(Ordering::Relaxed), id.clone(), true)),
            );
            candidates.sort();
            let Some((_, id, open)) = candidates.into_iter().next() else {
                tracing::debug!("cache over capacity but every blob is in use");
                return;
            };
            let data_path = self.config.cache_dir.join(format!("{id}.data"));
            let map_path = self.config.cache_dir.join(format!("{id}.map"));
            if open {
                let mut blobs = lock(&self.blobs);
                let Some(blob) = blobs.get(&id).cloned() else {
                    continue;
                };
                if blob.handles.load(Ordering::SeqCst) != 0 {
                    continue;
                }
                blobs.remove(&id);
                blob.evicted.store(true, Ordering::SeqCst);
                let ready_bytes: u64 = {
                    let map = lock(&blob.map);
                    (0..map.chunk_count())
                        .filter(|&i| map.is_ready(i))
                        .map(|i| {
                            blob.manifest.chunk_range(i).end - blob.manifest.chunk_range(i).start
                        })
                        .sum()
                };
                self.metrics.cached_bytes.fetch_sub(
                    ready_bytes.min(self.metrics.cached_bytes.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                let _ = fs::remove_file(&blob.map_path);
                let _ = fs::remove_file(&blob.data_path);
            } else {
                lock(&self.dormant).remove(&id);
                let _ = fs::remove_file(&map_path);
                let _ = fs::remove_file(&data_path);
            }
            self.metrics.evictions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(blob = %id, "evicted blob from the cache");
        }
    }
}
