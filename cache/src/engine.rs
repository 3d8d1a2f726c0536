//! The cache engine: blobs cached chunk by chunk in sparse local files.
//!
//! Durability order for every fetched chunk: `pwrite` the data, `fdatasync` the
//! cache file, then persist the chunk map (itself fdatasync'd). A crash between
//! the steps leaves a chunk whose data may be present but which is not marked
//! ready, never the reverse. The two syncs are a group commit off the read path
//! ([`CacheConfig::sync_interval`]): a verified chunk is served from the page cache as
//! soon as it is written, and a sync thread makes every chunk written since its last
//! round durable, then marks them in the map, in one `fdatasync` each. The round waits
//! for a pause in the fetches (bounded in time and bytes), since writing back while a
//! reader streams a cold image competes with its fetches for the CPU and the disk. A
//! machine crash loses at most the marks of that window (those chunks are fetched
//! again), never trust in unsynced data; a killed process loses none, as every write
//! is also noted in the blob's pending record (`<blob id>.pending`), which the next
//! process of the same boot re-hashes and adopts. After a machine crash (see
//! [`VerifyOnOpen`]) the chunks marked ready are re-hashed when the blob is opened, so
//! even a disk that lost acknowledged writes is not trusted blindly.
//!
//! A blob may instead be opened for delivery ([`CacheEngine::open_blob_delivering`]):
//! each verified chunk is handed to the consumer, which keeps it (cachefiles mode writes
//! it into the kernel's cache object), and the engine writes nothing of it, so the host
//! holds one copy of the data, not two. Fetches, their deduplication, read-ahead and
//! prefetch work as for a cached blob.
//!
//! A chunk whose digest is that of all zeros (free space of a disk image, mostly) is
//! never fetched: its range of the cache file is punched out, which reads as zeros, and
//! it is marked ready like a fetched one.
//!
//! Fetches come in three priorities: on-demand reads (a reader is waiting), read-ahead
//! of a sequential reader, and the prefetch list. Background fetches (read-ahead and
//! prefetch) take a backend permit *before* they claim chunks, so a chunk is only
//! ever "being fetched" by someone who is actually fetching it: an on-demand reader
//! never waits behind background work that is itself waiting for a permit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::BlobBackend;
use crate::chunkmap::{ChunkMap, MapLoad};
use crate::error::{CacheError, IoContext, Result};
use crate::manifest::{parse_digest, Manifest};
use crate::metrics::Metrics;
use crate::pending::PendingRecord;

/// When the chunks a map marks ready are re-hashed as a blob is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOnOpen {
    /// Every time.
    Always,
    /// When the map was in use as the machine last went down (crash or power cut). A
    /// map closed cleanly, or left open by a process that died while the kernel kept
    /// running, is trusted: every ready chunk was synced before it was marked.
    AfterMachineCrash,
    /// Never (the durability order alone is trusted).
    Never,
}

/// The default bound on one backend read ([`CacheConfig::merge_max_bytes`]), also what
/// `berth image check` reads at a time.
pub const DEFAULT_MERGE_MAX_BYTES: u64 = 4 << 20;

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
    /// Backend reads read-ahead may have in flight.
    pub max_readahead_fetches: usize,
    /// Backend reads the prefetch list may have in flight.
    pub max_prefetch_fetches: usize,
    /// Threads serving read-ahead and the prefetch list.
    pub background_workers: usize,
    /// A miss is extended over following missing chunks until one backend read
    /// covers at least this many bytes of the blob (uncompressed: on a well
    /// compressed blob, stored bytes would pull in far more than was asked for).
    pub merge_min_bytes: u64,
    /// One backend read covers at most this many stored bytes (background reads are
    /// cut into pieces of this size), or fewer where the backend asks for shorter reads
    /// ([`crate::BlobBackend::merge_limit`]: a local directory is read a chunk at a time).
    pub merge_max_bytes: u64,
    /// How far ahead of a sequential reader chunks are fetched; the window starts at
    /// two chunks and doubles with each chunk the reader moves on, up to this. 0 turns
    /// read-ahead off.
    pub readahead_max_bytes: u64,
    /// Attempts per backend read for transient errors.
    pub fetch_attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub retry_base_delay: Duration,
    /// When ready chunks are re-hashed as a blob is opened.
    pub verify_on_open: VerifyOnOpen,
    /// How long the fetches must pause before the chunks fetched so far are synced and
    /// marked in the chunk map (a group commit); zero syncs each fetch before its
    /// readers go on.
    pub sync_interval: Duration,
    /// The longest a fetched chunk waits for its round while fetches go on without a
    /// pause.
    pub sync_max_delay: Duration,
    /// Unsynced bytes of one blob that start a round at once.
    pub sync_batch_bytes: u64,
}

impl CacheConfig {
    /// Defaults suited to 1 MiB chunks.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            capacity_bytes: None,
            max_concurrent_fetches: 8,
            max_readahead_fetches: 4,
            max_prefetch_fetches: 2,
            background_workers: 4,
            merge_min_bytes: 1 << 20,
            merge_max_bytes: DEFAULT_MERGE_MAX_BYTES,
            readahead_max_bytes: 64 << 20,
            fetch_attempts: 4,
            retry_base_delay: Duration::from_millis(50),
            verify_on_open: VerifyOnOpen::AfterMachineCrash,
            sync_interval: Duration::from_millis(100),
            sync_max_delay: Duration::from_secs(5),
            sync_batch_bytes: 1 << 30,
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
    /// Chunks in state `Ready`.
    ready: u64,
    /// Last failed fetch per chunk: its ticket and message, for the waiters of it.
    failures: HashMap<u64, (u64, String)>,
    next_ticket: u64,
}

/// Called with each byte range (chunk-aligned) that became present.
type ReadyCallback = Arc<dyn Fn(Range<u64>) + Send + Sync>;

struct ReadyListener(Option<ReadyCallback>);

impl std::fmt::Debug for ReadyListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// One sequential reader seen on a blob, in chunk indexes.
#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    start: u64,
    end: u64,
    /// Read-ahead window in chunks.
    window: u64,
    /// Read-ahead is queued up to here.
    frontier: u64,
    last_use: u64,
}

/// Sequential readers tracked per blob.
const STREAMS: usize = 4;

/// Takes each verified chunk of a delivered blob: its offset in the blob and its bytes.
type DeliverFn = dyn Fn(u64, &[u8]) -> std::io::Result<()> + Send + Sync;

struct Delivery(Arc<DeliverFn>);

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Delivery(..)")
    }
}

/// The engine's own copy of a blob: its cache file and chunk map.
#[derive(Debug)]
struct LocalCopy {
    /// The cache file; it also carries the blob's `flock`, so another process's engine
    /// neither opens nor evicts the blob while this one has it.
    data: File,
    data_path: PathBuf,
    map_path: PathBuf,
    map: Mutex<ChunkMap>,
    /// Chunks written (and verified) but not synced and marked in the map yet.
    unsynced: Mutex<Unsynced>,
}

/// Where a blob's verified chunks go.
#[derive(Debug)]
enum Store {
    Local(Box<LocalCopy>),
    /// Handed to the consumer that opened the blob, which keeps them (a kernel cache
    /// object, say): the engine fetches, verifies and deduplicates, and keeps no copy.
    /// `Ready` then means delivered.
    Delivered(Delivery),
}

#[derive(Debug)]
struct BlobCache {
    manifest: Manifest,
    digests: Vec<[u8; 32]>,
    /// Chunks whose content is all zeros: made present without a backend read.
    zero: Vec<bool>,
    store: Store,
    states: Mutex<ChunkStates>,
    changed: Condvar,
    handles: AtomicUsize,
    last_used: AtomicU64,
    evicted: AtomicBool,
    streams: Mutex<([Stream; STREAMS], u64)>,
    listener: Mutex<ReadyListener>,
    /// The most stored bytes one backend read of this blob covers: the configured bound,
    /// or the backend's own if lower.
    merge_max_bytes: u64,
}

/// The chunks of a blob waiting for the sync thread's next round.
#[derive(Debug, Default)]
struct Unsynced {
    chunks: Vec<u64>,
    /// The same chunks as a file, so that a process killed before the round does not
    /// lose them (see [`crate::pending`]); `None` when syncs are not deferred or the
    /// file could not be written.
    record: Option<PendingRecord>,
}

impl Unsynced {
    /// Adds `chunks`, just written; returns how many are waiting now.
    fn add(&mut self, blob: &str, chunks: &[u64]) -> usize {
        self.chunks.extend_from_slice(chunks);
        self.note(blob, chunks, true);
        self.chunks.len()
    }

    /// Notes `chunks` in the record as written or as no longer pending. The record only
    /// saves fetches: one that cannot be written is dropped, with a warning.
    fn note(&mut self, blob: &str, chunks: &[u64], written: bool) {
        if let Some(record) = &mut self.record {
            if let Err(err) = record.set(chunks, written) {
                tracing::warn!(
                    blob,
                    "chunks not yet synced will be fetched again if this process dies: {err}"
                );
                self.record = None;
            }
        }
    }
}

impl BlobCache {
    fn local(&self) -> Option<&LocalCopy> {
        match &self.store {
            Store::Local(local) => Some(local),
            Store::Delivered(_) => None,
        }
    }

    fn local_or_err(&self) -> Result<&LocalCopy> {
        self.local()
            .ok_or_else(|| CacheError::NoLocalCopy(self.manifest.blob_id.clone()))
    }
}

impl Drop for BlobCache {
    fn drop(&mut self) {
        let Store::Local(local) = &self.store else {
            return;
        };
        if self.evicted.load(Ordering::SeqCst) {
            return;
        }
        // Nothing writes any more: sync, mark what was waiting for it and record a clean
        // close, so the next open trusts the map without re-hashing.
        let (unsynced, record) = {
            let mut unsynced = lock(&local.unsynced);
            (std::mem::take(&mut unsynced.chunks), unsynced.record.take())
        };
        let closed = local
            .data
            .sync_data()
            .context(|| format!("syncing {}", local.data_path.display()))
            .and_then(|()| {
                let mut map = lock(&local.map);
                map.mark_ready(&unsynced)?;
                map.mark_clean()
            });
        match closed {
            Ok(()) => {
                if let Some(record) = record {
                    let _ = fs::remove_file(record.path());
                }
            }
            Err(err) => {
                tracing::warn!(blob = %self.manifest.blob_id, "cannot record a clean close: {err}")
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Priority {
    OnDemand = 0,
    ReadAhead = 1,
    Prefetch = 2,
}

#[derive(Debug, Default)]
struct PermitState {
    total: usize,
    in_flight: [usize; 3],
    waiting: [usize; 3],
}

#[derive(Debug)]
struct FetchPermits {
    state: Mutex<PermitState>,
    freed: Condvar,
    max: usize,
    class_max: [usize; 3],
}

/// Fetches waiting for the sync thread's next round.
#[derive(Debug, Default)]
struct SyncClock {
    /// A round is wanted now (a blob has `sync_batch_bytes` waiting).
    due: bool,
    /// When the first chunk waiting was fetched.
    oldest: Option<Instant>,
    /// When the latest was.
    latest: Option<Instant>,
}

struct Permit<'a> {
    permits: &'a FetchPermits,
    priority: Priority,
}

impl FetchPermits {
    fn new(config: &CacheConfig) -> Self {
        let max = config.max_concurrent_fetches.max(1);
        Self {
            state: Mutex::new(PermitState::default()),
            freed: Condvar::new(),
            max,
            class_max: [
                max,
                config.max_readahead_fetches.clamp(1, max),
                config.max_prefetch_fetches.clamp(1, max),
            ],
        }
    }

    /// Waits for a backend slot: a priority class gets one only while no higher
    /// class is waiting, and below its own bound.
    fn acquire(&self, priority: Priority) -> Permit<'_> {
        let class = priority as usize;
        let mut state = lock(&self.state);
        state.waiting[class] += 1;
        while state.total >= self.max
            || state.in_flight[class] >= self.class_max[class]
            || state.waiting[..class].iter().any(|&w| w > 0)
        {
            state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.waiting[class] -= 1;
        state.in_flight[class] += 1;
        state.total += 1;
        Permit {
            permits: self,
            priority,
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.permits.state);
        state.total -= 1;
        state.in_flight[self.priority as usize] -= 1;
        drop(state);
        self.permits.freed.notify_all();
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

fn mtime_ticks(meta: &fs::Metadata) -> u64 {
    (meta.mtime().max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec().max(0) as u64)
}

/// Takes the blob's exclusive `flock` without waiting; `Ok(false)` if another open
/// file description holds it.
fn try_lock_blob(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own; the result is checked.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Work for the background workers.
#[derive(Debug)]
struct BackgroundItem {
    blob_id: String,
    chunks: Range<u64>,
}

#[derive(Debug, Default)]
struct BackgroundQueues {
    readahead: VecDeque<BackgroundItem>,
    prefetch: VecDeque<BackgroundItem>,
    /// Items taken by a worker and not finished yet.
    active: usize,
}

/// Read-ahead items queued at most; beyond that new (farther) ones are dropped.
const MAX_READAHEAD_ITEMS: usize = 256;

#[derive(Debug)]
struct EngineInner {
    config: CacheConfig,
    backend: Arc<dyn BlobBackend>,
    metrics: Arc<Metrics>,
    blobs: Mutex<HashMap<String, Arc<BlobCache>>>,
    /// Cache files found on disk and not opened: bytes used and last use.
    dormant: Mutex<HashMap<String, (u64, u64)>>,
    background: Mutex<BackgroundQueues>,
    background_changed: Condvar,
    shutdown: AtomicBool,
    permits: FetchPermits,
    /// Serializes evictions.
    evicting: Mutex<()>,
    /// When the next sync round is due.
    sync_clock: Mutex<SyncClock>,
    sync_changed: Condvar,
    /// Fetch buffers kept for the next backend reads (at most one per fetch permit).
    buffers: Mutex<Vec<Vec<u8>>>,
}

/// Fetch buffers larger than this are not kept for reuse.
const MAX_POOLED_BUFFER: usize = 16 << 20;

/// Fetch buffers start on a page boundary, so a backend may read into them with
/// direct I/O.
const BUFFER_ALIGN: usize = 4096;

/// A buffer a backend read lands in, from the engine's pool and back to it when
/// dropped: a reused buffer is neither allocated nor zeroed again.
struct FetchBuffer<'a> {
    /// `BUFFER_ALIGN` bytes longer than the longest read it may take, for alignment.
    data: Vec<u8>,
    start: usize,
    len: usize,
    pool: &'a Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl<'a> FetchBuffer<'a> {
    fn take(pool: &'a Mutex<Vec<Vec<u8>>>, len: usize, keep: usize) -> Self {
        let pooled = {
            let mut pool = lock(pool);
            let fits = pool.iter().position(|b| b.len() >= len + BUFFER_ALIGN);
            fits.map(|at| pool.swap_remove(at))
        };
        let data = match pooled {
            Some(data) => data,
            None if len == 0 => Vec::new(),
            None => vec![0u8; len + BUFFER_ALIGN],
        };
        // The allocation never moves while the buffer owns it.
        let start = data.as_ptr().align_offset(BUFFER_ALIGN).min(data.len());
        Self {
            data,
            start,
            len,
            pool,
            keep,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.start + self.len]
    }
}

impl std::ops::Deref for FetchBuffer<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }
}

impl Drop for FetchBuffer<'_> {
    fn drop(&mut self) {
        if self.data.is_empty() || self.data.len() > MAX_POOLED_BUFFER {
            return;
        }
        let mut pool = lock(self.pool);
        if pool.len() < self.keep {
            pool.push(std::mem::take(&mut self.data));
        }
    }
}

/// The engine. Cheap to share behind an `Arc`; background workers stop when dropped.
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
#[derive(Debug, Clone)]
struct Run {
    chunks: Range<u64>,
    ticket: u64,
}

/// Runs claimed by one caller. Whatever is not settled when it is dropped (an early
/// return, a panic) goes back to `Missing` with a failure for its waiters, so no
/// chunk is left "being fetched" by nobody.
struct Claim<'a> {
    blob: &'a BlobCache,
    current: Option<Run>,
    remaining: VecDeque<Run>,
}

impl<'a> Claim<'a> {
    fn new(blob: &'a BlobCache, runs: Vec<Run>) -> Self {
        Self {
            blob,
            current: None,
            remaining: runs.into(),
        }
    }

    fn next_run(&mut self) -> Option<Run> {
        let run = self.remaining.pop_front()?;
        self.current = Some(run.clone());
        Some(run)
    }

    /// Records the outcome of the current run; returns the first error of a chunk in
    /// `wanted`.
    fn settle(&mut self, outcome: Vec<Result<()>>, wanted: &Range<u64>) -> Option<CacheError> {
        let run = self.current.take()?;
        let mut states = lock(&self.blob.states);
        let mut failure = None;
        for (index, result) in run.chunks.clone().zip(outcome) {
            match result {
                Ok(()) => {
                    if states.states[index as usize] != ChunkState::Ready {
                        states.ready += 1;
                    }
                    states.states[index as usize] = ChunkState::Ready
                }
                Err(err) => {
                    states.states[index as usize] = ChunkState::Missing;
                    states.failures.insert(index, (run.ticket, err.to_string()));
                    if wanted.contains(&index) && failure.is_none() {
                        failure = Some(err);
                    }
                }
            }
        }
        drop(states);
        self.blob.changed.notify_all();
        failure
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let abandoned: Vec<Run> = self
            .current
            .take()
            .into_iter()
            .chain(self.remaining.drain(..))
            .collect();
        if abandoned.is_empty() {
            return;
        }
        let mut states = lock(&self.blob.states);
        for run in abandoned {
            for index in run.chunks {
                if states.states[index as usize] == ChunkState::Fetching(run.ticket) {
                    states.states[index as usize] = ChunkState::Missing;
                    states
                        .failures
                        .insert(index, (run.ticket, "the fetch was abandoned".to_string()));
                }
            }
        }
        drop(states);
        self.blob.changed.notify_all();
    }
}

/// Which chunks of `manifest` hold only zeros, by their digests.
fn zero_chunks(manifest: &Manifest, digests: &[[u8; 32]]) -> Vec<bool> {
    let mut zero_digests: HashMap<u64, [u8; 32]> = HashMap::new();
    (0..manifest.chunk_count())
        .map(|index| {
            let range = manifest.chunk_range(index);
            let len = range.end - range.start;
            let zero = zero_digests
                .entry(len)
                .or_insert_with(|| *blake3::hash(&vec![0u8; len as usize]).as_bytes());
            digests.get(index as usize) == Some(zero)
        })
        .collect()
}

/// Makes `range` of `file` read as zeros: a punched hole (no space used), or zeros
/// written where the filesystem cannot punch.
fn punch_zeros(file: &File, range: Range<u64>) -> std::io::Result<()> {
    let len = range.end - range.start;
    // SAFETY: fallocate on a descriptor we own; the arguments are plain integers.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            range.start as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    file.write_all_at(&vec![0u8; len as usize], range.start)
}

/// Whether chunk `index` of the cache file `data` hashes to its digest (`buffer` holds at
/// least a chunk).
fn chunk_intact(
    data: &File,
    manifest: &Manifest,
    digests: &[[u8; 32]],
    index: u64,
    buffer: &mut [u8],
) -> bool {
    let range = manifest.chunk_range(index);
    let chunk = &mut buffer[..(range.end - range.start) as usize];
    data.read_exact_at(chunk, range.start).is_ok()
        && blake3::hash(chunk).as_bytes() == &digests[index as usize]
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl CacheEngine {
    /// Creates the engine over `backend`, with its cache directory (created if
    /// needed) and background workers.
    pub fn new(config: CacheConfig, backend: Arc<dyn BlobBackend>) -> Result<Self> {
        fs::create_dir_all(&config.cache_dir)
            .context(|| format!("creating {}", config.cache_dir.display()))?;
        let mut dormant = HashMap::new();
        let entries = fs::read_dir(&config.cache_dir)
            .context(|| format!("listing {}", config.cache_dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let (Some(id), Ok(meta)) = (name.strip_suffix(".data"), entry.metadata()) {
                // The map is rewritten at every open, fetch and close: its mtime is the
                // blob's last use (the data file's is only its last fetch).
                let map = config.cache_dir.join(format!("{id}.map"));
                let last_used =
                    fs::metadata(&map).map_or_else(|_| mtime_ticks(&meta), |m| mtime_ticks(&m));
                dormant.insert(id.to_string(), (meta.blocks() * 512, last_used));
            }
        }
        let inner = Arc::new(EngineInner {
            permits: FetchPermits::new(&config),
            config,
            backend,
            metrics: Arc::new(Metrics::default()),
            blobs: Mutex::new(HashMap::new()),
            dormant: Mutex::new(dormant),
            background: Mutex::new(BackgroundQueues::default()),
            background_changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
            evicting: Mutex::new(()),
            sync_clock: Mutex::new(SyncClock::default()),
            sync_changed: Condvar::new(),
            buffers: Mutex::new(Vec::new()),
        });
        let mut workers = Vec::new();
        for index in 0..inner.config.background_workers {
            let worker_inner = inner.clone();
            let worker = std::thread::Builder::new()
                .name(format!("berth-fetch-bg-{index}"))
                .spawn(move || worker_inner.background_loop())
                .context(|| "starting a background fetch worker".to_string())?;
            workers.push(worker);
        }
        if !inner.config.sync_interval.is_zero() {
            let sync_inner = inner.clone();
            let syncer = std::thread::Builder::new()
                .name("berth-cache-sync".into())
                .spawn(move || sync_inner.sync_loop())
                .context(|| "starting the cache sync thread".to_string())?;
            workers.push(syncer);
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

    /// The configuration the engine runs with.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Opens the blob described by `manifest`: creates its full-size sparse cache
    /// file and chunk map if needed (trusting the map only as far as it checks out).
    /// Fails with [`CacheError::BlobBusy`] if another process has the blob open.
    pub fn open_blob(&self, manifest: &Manifest) -> Result<BlobHandle> {
        self.inner.open_blob(manifest, None, None)
    }

    /// Opens the blob described by `manifest` without a copy of the engine's own: each
    /// chunk, once fetched and verified, is handed to `deliver` (its offset in the blob
    /// and its bytes) and nothing is written to the cache directory. For a consumer that
    /// keeps the data itself, such as a cachefiles object. Fetches are still shared
    /// (one per chunk however many wait for it), read ahead and prefetched; a chunk
    /// `deliver` fails for is not delivered, and its readers get the error. The blob
    /// cannot be [`read`](Self::read) from the engine.
    pub fn open_blob_delivering(
        &self,
        manifest: &Manifest,
        deliver: impl Fn(u64, &[u8]) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Result<BlobHandle> {
        self.inner
            .open_blob(manifest, None, Some(Delivery(Arc::new(deliver))))
    }

    /// Like [`CacheEngine::open_blob`], but uses `data` as the cache file: an already
    /// open descriptor of `<cache dir>/<blob id>.data` of the right size (for example one
    /// opened before a fanotify mark was placed, whose accesses raise no events).
    pub fn open_blob_with_file(&self, manifest: &Manifest, data: File) -> Result<BlobHandle> {
        self.inner.open_blob(manifest, Some(data), None)
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
        self.inner
            .queue_background(&blob, ranges, Priority::Prefetch);
        Ok(())
    }

    /// Path of the cache file of an open blob.
    pub fn cache_file_path(&self, blob_id: &str) -> Result<PathBuf> {
        Ok(self.inner.blob(blob_id)?.local_or_err()?.data_path.clone())
    }

    /// Number of chunks of `blob_id` present in the cache file (some may still wait for
    /// the sync that makes them durable).
    pub fn ready_chunks(&self, blob_id: &str) -> Result<u64> {
        Ok(lock(&self.inner.blob(blob_id)?.states).ready)
    }

    /// Makes every chunk fetched so far durable and marked in its chunk map now.
    pub fn sync(&self) {
        self.inner.sync_round();
    }

    /// Bytes currently cached (open and dormant blobs).
    pub fn cached_bytes(&self) -> u64 {
        self.inner.total_cached_bytes()
    }

    /// Blocks until no background work is queued or running, or `timeout` passes;
    /// returns whether it went idle.
    pub fn wait_background_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut queues = lock(&self.inner.background);
        loop {
            if queues.readahead.is_empty() && queues.prefetch.is_empty() && queues.active == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            queues = self
                .inner
                .background_changed
                .wait_timeout(queues, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Blocks until the prefetch queue is empty (in-flight prefetches may still run).
    pub fn wait_prefetch_queue_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if lock(&self.inner.background).prefetch.is_empty() {
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
        self.inner.background_changed.notify_all();
        // Under the clock's lock, so the sync thread cannot miss it between its check
        // and its wait.
        lock(&self.inner.sync_clock).due = true;
        self.inner.sync_changed.notify_all();
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

    /// Path of the sparse cache file; an error for a blob opened with
    /// [`CacheEngine::open_blob_delivering`].
    pub fn cache_path(&self) -> Result<&Path> {
        Ok(&self.blob.local_or_err()?.data_path)
    }

    /// The engine's own descriptor of the cache file. It was opened before any
    /// fanotify mark a mounter adds, so accesses through it raise no events.
    pub fn cache_fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.blob.local_or_err()?.data.as_fd())
    }

    /// Raw form of [`Self::cache_fd`].
    pub fn cache_raw_fd(&self) -> Result<RawFd> {
        Ok(self.blob.local_or_err()?.data.as_raw_fd())
    }

    /// For a delivered blob (see [`CacheEngine::open_blob_delivering`]): sets which
    /// chunks the consumer holds, by asking `holds` about each chunk's byte range, for
    /// example after the consumer gained a new place to deliver to, or found one of its
    /// own copies gone. Chunks being fetched are left alone: their delivery is still to
    /// come. Chunks it no longer holds are fetched again when next wanted.
    pub fn reconcile_delivered(&self, holds: impl Fn(Range<u64>) -> bool) -> Result<()> {
        let Store::Delivered(_) = &self.blob.store else {
            return Err(CacheError::Io {
                context: format!("reconciling blob {}", self.id()),
                source: std::io::Error::other("the engine keeps this blob's chunks itself"),
            });
        };
        let manifest = &self.blob.manifest;
        let mut states = lock(&self.blob.states);
        let mut ready = 0;
        for (index, state) in states.states.iter_mut().enumerate() {
            if let ChunkState::Fetching(_) = state {
                continue;
            }
            *state = if holds(manifest.chunk_range(index as u64)) {
                ready += 1;
                ChunkState::Ready
            } else {
                ChunkState::Missing
            };
        }
        states.ready = ready;
        Ok(())
    }

    /// Whether every chunk of the blob is present.
    pub fn is_complete(&self) -> bool {
        let states = lock(&self.blob.states);
        states.ready == states.states.len() as u64
    }

    /// Whether every byte of `range` is present in the cache file, without fetching
    /// (an empty range, or one past the end, is present).
    pub fn is_present(&self, range: Range<u64>) -> bool {
        let chunks = self.blob.manifest.chunks_of(range);
        let states = lock(&self.blob.states);
        chunks
            .clone()
            .all(|i| states.states[i as usize] == ChunkState::Ready)
    }

    /// The present parts of the blob, as chunk-aligned byte ranges in order.
    pub fn present_ranges(&self) -> Vec<Range<u64>> {
        let manifest = &self.blob.manifest;
        let states = lock(&self.blob.states);
        let mut out: Vec<Range<u64>> = Vec::new();
        for (index, state) in states.states.iter().enumerate() {
            if *state != ChunkState::Ready {
                continue;
            }
            let range = manifest.chunk_range(index as u64);
            match out.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => out.push(range),
            }
        }
        out
    }

    /// Calls `listener` with every chunk-aligned byte range that becomes present from
    /// now on (after it is durable), whichever fetch brought it in.
    pub fn set_ready_listener(&self, listener: impl Fn(Range<u64>) + Send + Sync + 'static) {
        lock(&self.blob.listener).0 = Some(Arc::new(listener));
    }

    /// Tells the engine that `range` was read from the cache file without going
    /// through it (a consumer that answers hits itself), so sequential readers are
    /// still followed and read ahead of.
    pub fn note_read(&self, range: Range<u64>) {
        let chunks = self.blob.manifest.chunks_of(range);
        if !chunks.is_empty() {
            self.engine.note_access(&self.blob, &chunks);
        }
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

    /// See [`CacheEngine::prefetch`]: the ranges are fetched in order, below
    /// on-demand reads and read-ahead.
    pub fn prefetch(&self, ranges: &[Range<u64>]) {
        self.engine
            .queue_background(&self.blob, ranges, Priority::Prefetch);
    }
}

impl Drop for BlobHandle {
    fn drop(&mut self) {
        self.blob.last_used.store(now_ticks(), Ordering::Relaxed);
        if self.blob.local().is_none() {
            // A delivered blob holds nothing once its consumer is gone (its deliveries
            // would go nowhere): it is closed, so that the blob can be opened again.
            let mut blobs = lock(&self.engine.blobs);
            if self.blob.handles.fetch_sub(1, Ordering::SeqCst) == 1 {
                let id = &self.blob.manifest.blob_id;
                if blobs.get(id).is_some_and(|b| Arc::ptr_eq(b, &self.blob)) {
                    blobs.remove(id);
                }
            }
            return;
        }
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

    /// Opens the cache file of `id` by path and takes its lock, making sure the lock
    /// is on the file the path names (an evictor may unlink it in between).
    fn open_locked_data_file(&self, id: &str, data_path: &Path) -> Result<File> {
        for _ in 0..8 {
            let data = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(data_path)
                .context(|| format!("opening cache file {}", data_path.display()))?;
            if !try_lock_blob(&data).context(|| format!("locking {}", data_path.display()))? {
                return Err(CacheError::BlobBusy {
                    blob: id.to_string(),
                    path: data_path.to_path_buf(),
                });
            }
            let ours = data
                .metadata()
                .context(|| format!("reading {}", data_path.display()))?;
            match fs::metadata(data_path) {
                Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => return Ok(data),
                _ => continue,
            }
        }
        Err(CacheError::Io {
            context: format!("opening cache file {}", data_path.display()),
            source: std::io::Error::other("the file keeps being replaced"),
        })
    }

    fn open_blob(
        self: &Arc<Self>,
        manifest: &Manifest,
        given: Option<File>,
        delivery: Option<Delivery>,
    ) -> Result<BlobHandle> {
        manifest.validate()?;
        // Held throughout: an eviction cannot pick this blob while it is being opened.
        let mut blobs = lock(&self.blobs);
        if let Some(blob) = blobs.get(&manifest.blob_id) {
            if blob.manifest != *manifest {
                return Err(CacheError::InvalidManifest(format!(
                    "blob {} is already open with a different manifest",
                    manifest.blob_id
                )));
            }
            // A second consumer of a delivered blob would never see the chunks
            // delivered to the first.
            if delivery.is_some() || blob.local().is_none() {
                return Err(CacheError::Io {
                    context: format!("opening blob {}", manifest.blob_id),
                    source: std::io::Error::other(
                        "it is open already, and one of the two opens delivers its chunks",
                    ),
                });
            }
            blob.handles.fetch_add(1, Ordering::SeqCst);
            return Ok(BlobHandle {
                engine: self.clone(),
                blob: blob.clone(),
            });
        }
        let id = &manifest.blob_id;
        let blob_digest = parse_digest(id)
            .ok_or_else(|| CacheError::InvalidManifest("field `blob_id`: not a digest".into()))?;
        let digests = manifest.chunk_digests()?;
        let zero = zero_chunks(manifest, &digests);
        let (store, states, ready_bytes, adopted) = match delivery {
            Some(delivery) => {
                tracing::info!(blob = %id, chunks = manifest.chunk_count(), "opened blob for delivery");
                let states = vec![ChunkState::Missing; manifest.chunk_count() as usize];
                (Store::Delivered(delivery), states, 0, 0)
            }
            None => self.open_local_copy(manifest, blob_digest, &digests, given)?,
        };
        let blob = Arc::new(BlobCache {
            manifest: manifest.clone(),
            digests,
            zero,
            store,
            states: Mutex::new(ChunkStates {
                ready: states.iter().filter(|s| **s == ChunkState::Ready).count() as u64,
                states,
                failures: HashMap::new(),
                next_ticket: 1,
            }),
            changed: Condvar::new(),
            handles: AtomicUsize::new(1),
            last_used: AtomicU64::new(now_ticks()),
            evicted: AtomicBool::new(false),
            streams: Mutex::new(([Stream::default(); STREAMS], 0)),
            listener: Mutex::new(ReadyListener(None)),
            merge_max_bytes: self.config.merge_max_bytes.min(
                self.backend
                    .merge_limit(&manifest.object)
                    .unwrap_or(u64::MAX),
            ),
        });
        lock(&self.dormant).remove(id);
        self.metrics
            .cached_bytes
            .fetch_add(ready_bytes, Ordering::Relaxed);
        blobs.insert(id.clone(), blob.clone());
        if adopted > 0 {
            self.sync_later(adopted * u64::from(manifest.chunk_size));
        }
        Ok(BlobHandle {
            engine: self.clone(),
            blob,
        })
    }

    /// Opens (or creates) the blob's cache file and chunk map, trusting the map as far
    /// as it checks out and adopting what an earlier process left unsynced. Returns the
    /// store, the chunks' states, the bytes ready and how many chunks were adopted.
    fn open_local_copy(
        &self,
        manifest: &Manifest,
        blob_digest: [u8; 32],
        digests: &[[u8; 32]],
        given: Option<File>,
    ) -> Result<(Store, Vec<ChunkState>, u64, u64)> {
        let id = &manifest.blob_id;
        let data_path = self.config.cache_dir.join(format!("{id}.data"));
        let map_path = self.config.cache_dir.join(format!("{id}.map"));
        let (data, size_was_wrong) = match given {
            Some(data) => {
                let (ours, named) = (
                    data.metadata()
                        .context(|| format!("reading {}", data_path.display()))?,
                    fs::metadata(&data_path)
                        .context(|| format!("reading {}", data_path.display()))?,
                );
                if (ours.dev(), ours.ino()) != (named.dev(), named.ino())
                    || ours.len() != manifest.blob_size
                {
                    return Err(CacheError::Io {
                        context: format!("using the given cache file for {}", data_path.display()),
                        source: std::io::Error::other(
                            "it is not that file, or not of the blob's size",
                        ),
                    });
                }
                if !try_lock_blob(&data).context(|| format!("locking {}", data_path.display()))? {
                    return Err(CacheError::BlobBusy {
                        blob: id.clone(),
                        path: data_path,
                    });
                }
                (data, false)
            }
            None => {
                let data = self.open_locked_data_file(id, &data_path)?;
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
                (data, size_was_wrong)
            }
        };
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
        let verify = match self.config.verify_on_open {
            VerifyOnOpen::Always => map.ready_count() > 0,
            VerifyOnOpen::AfterMachineCrash => map.needs_verification(),
            VerifyOnOpen::Never => false,
        };
        if verify {
            let started = Instant::now();
            let mut bad = Vec::new();
            let mut buffer = vec![0u8; manifest.chunk_size as usize];
            for index in (0..map.chunk_count()).filter(|&i| map.is_ready(i)) {
                if !chunk_intact(&data, manifest, digests, index, &mut buffer) {
                    bad.push(index);
                }
            }
            tracing::info!(blob = %id, chunks = map.ready_count(), elapsed = ?started.elapsed(), "re-hashed the cached chunks");
            if !bad.is_empty() {
                tracing::warn!(blob = %id, chunks = ?bad, "cached chunks failed verification on open; refetching them");
                map.clear(&bad)?;
            }
        }
        // Chunks an earlier process of this boot wrote but did not live to sync: adopted
        // if they hash right (their data is in the page cache, or on disk).
        let mut unsynced = Unsynced::default();
        if !self.config.sync_interval.is_zero() {
            let record_path = self.config.cache_dir.join(format!("{id}.pending"));
            match PendingRecord::open(&record_path, blob_digest, map.chunk_count()) {
                Ok((record, noted)) => {
                    unsynced.record = Some(record);
                    let mut buffer = vec![0u8; manifest.chunk_size as usize];
                    let adopted: Vec<u64> = noted
                        .into_iter()
                        .filter(|&index| !size_was_wrong && !map.is_ready(index))
                        .filter(|&index| chunk_intact(&data, manifest, digests, index, &mut buffer))
                        .collect();
                    if !adopted.is_empty() {
                        tracing::info!(blob = %id, chunks = adopted.len(), "adopted chunks an earlier process wrote but had not synced");
                        unsynced.add(id, &adopted);
                    }
                }
                Err(err) => {
                    tracing::warn!(blob = %id, "chunks not yet synced will be fetched again if this process dies: {err}")
                }
            }
        }
        // From here on the cache file may change: a crash now is not a clean close.
        map.begin_use()?;
        let mut states: Vec<ChunkState> = (0..map.chunk_count())
            .map(|i| {
                if map.is_ready(i) {
                    ChunkState::Ready
                } else {
                    ChunkState::Missing
                }
            })
            .collect();
        for &index in &unsynced.chunks {
            states[index as usize] = ChunkState::Ready;
        }
        let ready_bytes: u64 = (0..map.chunk_count())
            .filter(|&i| states[i as usize] == ChunkState::Ready)
            .map(|i| manifest.chunk_range(i).end - manifest.chunk_range(i).start)
            .sum();
        let adopted = unsynced.chunks.len() as u64;
        tracing::info!(blob = %id, ready_chunks = map.ready_count() + adopted, chunks = map.chunk_count(), verified = verify, "opened blob cache");
        let local = LocalCopy {
            data,
            data_path,
            map_path,
            map: Mutex::new(map),
            unsynced: Mutex::new(unsynced),
        };
        Ok((Store::Local(Box::new(local)), states, ready_bytes, adopted))
    }

    fn read(&self, blob: &BlobCache, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = blob.manifest.blob_size;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(size - offset) as usize;
        let local = blob.local_or_err()?;
        self.ensure_present(blob, offset..offset + len as u64, Priority::OnDemand)?;
        local
            .data
            .read_exact_at(&mut buf[..len], offset)
            .context(|| format!("reading cache file {}", local.data_path.display()))?;
        self.metrics
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(len)
    }

    /// Follows sequential readers of `blob` and queues read-ahead in front of them.
    fn note_access(&self, blob: &BlobCache, wanted: &Range<u64>) {
        let chunk_size = u64::from(blob.manifest.chunk_size);
        let max_window = self.config.readahead_max_bytes / chunk_size;
        if max_window == 0 {
            return;
        }
        let chunk_count = blob.manifest.chunk_count();
        let queue = {
            let mut guard = lock(&blob.streams);
            let (streams, clock) = &mut *guard;
            *clock += 1;
            let now = *clock;
            let found = streams
                .iter()
                .position(|s| s.last_use != 0 && s.start <= wanted.start && wanted.start <= s.end);
            let Some(index) = found else {
                // A new reader (or a jump): remember it, no read-ahead yet.
                let oldest = (0..STREAMS)
                    .min_by_key(|&i| streams[i].last_use)
                    .unwrap_or(0);
                streams[oldest] = Stream {
                    start: wanted.start,
                    end: wanted.end,
                    window: 0,
                    frontier: wanted.end,
                    last_use: now,
                };
                return;
            };
            let stream = &mut streams[index];
            stream.last_use = now;
            if wanted.end > stream.end {
                stream.window = (stream.window * 2).clamp(2, max_window);
            }
            stream.start = stream.start.max(wanted.start);
            stream.end = stream.end.max(wanted.end);
            // Like the kernel's asynchronous readahead: top the window up only once the
            // reader has used half of what is ahead of it, so each top-up is large
            // enough to merge into big backend reads.
            let lead = stream.frontier.saturating_sub(stream.end);
            if lead * 2 > stream.window {
                return;
            }
            let target = stream.end.saturating_add(stream.window).min(chunk_count);
            let from = stream.frontier.max(stream.end);
            stream.frontier = stream.frontier.max(target);
            from..target
        };
        if !queue.is_empty() {
            self.queue_chunks(blob, queue, Priority::ReadAhead);
        }
    }

    fn ensure_present(
        &self,
        blob: &BlobCache,
        range: Range<u64>,
        priority: Priority,
    ) -> Result<()> {
        let manifest = &blob.manifest;
        let wanted = manifest.chunks_of(range);
        if wanted.is_empty() {
            return Ok(());
        }
        if priority == Priority::OnDemand {
            self.note_access(blob, &wanted);
        }
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
                if misses > 0 {
                    tracing::trace!(blob = %manifest.blob_id, chunks = ?wanted, hits, misses, "on-demand miss");
                }
            }
            first_pass = false;
            let runs = self.claim_runs(blob, &mut states, wanted.clone(), true);
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
            let mut claim = Claim::new(blob, runs);
            while let Some(run) = claim.next_run() {
                let outcome = self.fetch_run_guarded(blob, run.chunks.clone(), priority, None);
                if let Some(err) = claim.settle(outcome, &wanted) {
                    // Dropping the claim hands back the runs not attempted.
                    return Err(err);
                }
            }
        }
    }

    /// [`Self::fetch_run`], with a panic turned into an error for every chunk.
    fn fetch_run_guarded(
        &self,
        blob: &BlobCache,
        chunks: Range<u64>,
        priority: Priority,
        permit: Option<&Permit<'_>>,
    ) -> Vec<Result<()>> {
        match catch_unwind(AssertUnwindSafe(|| {
            self.fetch_run(blob, chunks.clone(), priority, permit)
        })) {
            Ok(outcome) => outcome,
            Err(payload) => {
                let message = format!("internal error: {}", panic_message(payload.as_ref()));
                tracing::error!(blob = %blob.manifest.blob_id, chunks = ?chunks, "fetch failed: {message}");
                chunks
                    .map(|chunk| {
                        Err(CacheError::FetchFailed {
                            blob: blob.manifest.blob_id.clone(),
                            chunk,
                            message: message.clone(),
                        })
                    })
                    .collect()
            }
        }
    }

    /// Marks the missing chunks of `wanted` as being fetched by us, grouped into
    /// runs of adjacent chunks of at most the blob's `merge_max_bytes`; with `extend`, a short
    /// last run grows over following missing chunks to reach `merge_min_bytes`.
    fn claim_runs(
        &self,
        blob: &BlobCache,
        states: &mut ChunkStates,
        wanted: Range<u64>,
        extend: bool,
    ) -> Vec<Run> {
        let manifest = &blob.manifest;
        let chunks = &manifest.chunks;
        let stored_bytes = |run: &Range<u64>, with: u64| {
            let last = &chunks[with as usize];
            (last.offset + last.stored_size).saturating_sub(chunks[run.start as usize].offset)
        };
        let raw_bytes = |run: &Range<u64>, with: u64| {
            manifest.chunk_range(with).end - manifest.chunk_range(run.start).start
        };
        let mut runs: Vec<Run> = Vec::new();
        // A run is all zero chunks (no backend read) or none: one zero chunk inside a
        // run of data would be fetched for nothing.
        let claim =
            |states: &mut ChunkStates, runs: &mut Vec<Run>, index: u64, may_start: bool| -> bool {
                if states.states[index as usize] != ChunkState::Missing {
                    return false;
                }
                if let Some(run) = runs.last_mut() {
                    if run.chunks.end == index
                        && blob.zero[index as usize] == blob.zero[run.chunks.start as usize]
                        && stored_bytes(&run.chunks, index) <= blob.merge_max_bytes
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
        if !extend {
            return runs;
        }
        // A short run ending at the end of the request grows over the following
        // missing chunks until one backend read is worth it.
        let mut index = wanted.end;
        while (index as usize) < chunks.len() {
            let Some(run) = runs.last() else { break };
            if run.chunks.end != index
                || raw_bytes(&run.chunks, index - 1) >= self.config.merge_min_bytes
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
    /// makes the good ones durable and ready. Returns one outcome per chunk. Takes a
    /// backend permit unless the caller holds one.
    fn fetch_run(
        &self,
        blob: &BlobCache,
        chunks: Range<u64>,
        priority: Priority,
        permit: Option<&Permit<'_>>,
    ) -> Vec<Result<()>> {
        let manifest = &blob.manifest;
        let id = &manifest.blob_id;
        let first = &manifest.chunks[chunks.start as usize];
        let last = &manifest.chunks[chunks.end as usize - 1];
        let stored = first.offset..last.offset + last.stored_size;
        let expected_len = stored.end - stored.start;
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
        let fetch_started = Instant::now();
        // A run of zero chunks (claim_runs never mixes them with data) needs no backend.
        let zero_run = blob.zero[chunks.start as usize];
        let keep = self.config.max_concurrent_fetches.max(1);
        let data = if zero_run {
            FetchBuffer::take(&self.buffers, 0, keep)
        } else {
            let Ok(len) = usize::try_from(expected_len) else {
                return fail_all(format!("a backend read of {expected_len} bytes"));
            };
            let mut buffer = FetchBuffer::take(&self.buffers, len, keep);
            let _own_permit = match permit {
                Some(_) => None,
                None => Some(self.permits.acquire(priority)),
            };
            let mut attempt = 0;
            loop {
                attempt += 1;
                self.metrics
                    .backend_requests
                    .fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                // The reply's length is the buffer's: `read_range_into` fills it exactly
                // or fails.
                let reply = self.backend.read_range_into(
                    &manifest.object,
                    stored.start,
                    buffer.as_mut_slice(),
                );
                match reply {
                    Ok(()) => {
                        self.metrics.observe_fetch_latency(started.elapsed());
                        self.metrics
                            .backend_bytes
                            .fetch_add(expected_len, Ordering::Relaxed);
                        break buffer;
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
        let backend_latency = fetch_started.elapsed();
        let mut outcomes: Vec<Result<()>> = Vec::with_capacity(count);
        let mut good = Vec::with_capacity(count);
        let mut good_bytes = 0;
        for index in chunks.clone() {
            let entry = &manifest.chunks[index as usize];
            // In bounds: the manifest's chunks are contiguous from `stored.start` and
            // the reply length was checked against the run.
            let at = (entry.offset - stored.start) as usize;
            let stored_chunk = data.get(at..at + entry.stored_size as usize).unwrap_or(&[]);
            let raw_range = manifest.chunk_range(index);
            let raw_len = (raw_range.end - raw_range.start) as usize;
            if zero_run {
                let outcome = match &blob.store {
                    Store::Local(local) => {
                        punch_zeros(&local.data, raw_range.clone()).context(|| {
                            format!("zeroing chunk {index} of {}", local.data_path.display())
                        })
                    }
                    Store::Delivered(Delivery(deliver)) => {
                        deliver(raw_range.start, &vec![0u8; raw_len])
                            .context(|| format!("delivering chunk {index} of blob {id}"))
                    }
                };
                let outcome = outcome.map(|()| {
                    self.metrics.zero_chunks.fetch_add(1, Ordering::Relaxed);
                    good.push(index);
                    good_bytes += raw_len as u64;
                });
                outcomes.push(outcome);
                continue;
            }
            // Stored uncompressed: verified and written from the backend's buffer itself.
            let outcome = match manifest.restore_chunk(
                index,
                &blob.digests[index as usize],
                stored_chunk,
            ) {
                Err(err) => {
                    self.metrics
                        .verification_failures
                        .fetch_add(1, Ordering::Relaxed);
                    match &err {
                        CacheError::Decompression { message, .. } => {
                            tracing::error!(blob = %id, chunk = index, "chunk {index} of blob {id} cannot be decompressed: {message}")
                        }
                        _ => {
                            tracing::error!(blob = %id, chunk = index, "chunk {index} of blob {id} failed verification")
                        }
                    }
                    Err(err)
                }
                Ok(raw) => {
                    let stored = match &blob.store {
                        Store::Local(local) => {
                            local.data.write_all_at(&raw, raw_range.start).context(|| {
                                format!("writing chunk {index} to {}", local.data_path.display())
                            })
                        }
                        Store::Delivered(Delivery(deliver)) => deliver(raw_range.start, &raw)
                            .context(|| format!("delivering chunk {index} of blob {id}")),
                    };
                    stored.map(|()| {
                        good.push(index);
                        good_bytes += raw_len as u64;
                    })
                }
            };
            outcomes.push(outcome);
        }
        if good.is_empty() {
            return outcomes;
        }
        // Data first, durably; only then the map: at once, or by the sync thread's next
        // round (the readers go on from the page cache meanwhile).
        if let Some(local) = blob.local() {
            if self.config.sync_interval.is_zero() {
                let durable = local
                    .data
                    .sync_data()
                    .context(|| format!("syncing {}", local.data_path.display()))
                    .and_then(|()| lock(&local.map).mark_ready(&good));
                if let Err(err) = durable {
                    let message = err.to_string();
                    return fail_all(message);
                }
            } else {
                let waiting = lock(&local.unsynced).add(id, &good);
                self.sync_later(waiting as u64 * u64::from(manifest.chunk_size));
            }
        }
        self.metrics
            .chunks_fetched
            .fetch_add(good.len() as u64, Ordering::Relaxed);
        let counter = match priority {
            Priority::OnDemand => None,
            Priority::ReadAhead => Some(&self.metrics.chunks_read_ahead),
            Priority::Prefetch => Some(&self.metrics.chunks_prefetched),
        };
        if let Some(counter) = counter {
            counter.fetch_add(good.len() as u64, Ordering::Relaxed);
        }
        if blob.local().is_some() && !blob.evicted.load(Ordering::SeqCst) {
            self.metrics
                .cached_bytes
                .fetch_add(good_bytes, Ordering::Relaxed);
        }
        tracing::debug!(
            blob = %id,
            chunks = ?chunks,
            priority = ?priority,
            bytes = expected_len,
            backend_ms = backend_latency.as_secs_f64() * 1e3,
            total_ms = fetch_started.elapsed().as_secs_f64() * 1e3,
            "fetched"
        );
        let listener = lock(&blob.listener).0.clone();
        if let Some(listener) = listener {
            let mut start = good[0];
            for (i, &index) in good.iter().enumerate() {
                let next = good.get(i + 1).copied();
                if next != Some(index + 1) {
                    listener(manifest.chunk_range(start).start..manifest.chunk_range(index).end);
                    if let Some(next) = next {
                        start = next;
                    }
                }
            }
        }
        self.evict_if_needed();
        outcomes
    }

    /// Queues the chunks overlapping `ranges` for background fetching, in pieces of
    /// at most `merge_max_bytes`.
    fn queue_background(&self, blob: &BlobCache, ranges: &[Range<u64>], priority: Priority) {
        for range in ranges {
            let chunks = blob.manifest.chunks_of(range.clone());
            if !chunks.is_empty() {
                self.queue_chunks(blob, chunks, priority);
            }
        }
    }

    fn queue_chunks(&self, blob: &BlobCache, chunks: Range<u64>, priority: Priority) {
        let manifest = &blob.manifest;
        let mut items = Vec::new();
        {
            let states = lock(&blob.states);
            let mut current: Option<Range<u64>> = None;
            for index in chunks {
                if states.states[index as usize] != ChunkState::Missing {
                    items.extend(current.take());
                    continue;
                }
                let entry = &manifest.chunks[index as usize];
                match &mut current {
                    Some(run)
                        if entry.offset + entry.stored_size
                            - manifest.chunks[run.start as usize].offset
                            <= blob.merge_max_bytes =>
                    {
                        run.end = index + 1
                    }
                    _ => {
                        items.extend(current.take());
                        current = Some(index..index + 1);
                    }
                }
            }
            items.extend(current);
        }
        if items.is_empty() {
            return;
        }
        let mut queues = lock(&self.background);
        for chunks in items {
            let item = BackgroundItem {
                blob_id: manifest.blob_id.clone(),
                chunks,
            };
            match priority {
                Priority::Prefetch => queues.prefetch.push_back(item),
                // Full: the farthest read-ahead is the least useful, so it is what goes.
                _ if queues.readahead.len() >= MAX_READAHEAD_ITEMS => {}
                _ => queues.readahead.push_back(item),
            }
        }
        drop(queues);
        self.background_changed.notify_all();
    }

    fn background_loop(&self) {
        loop {
            let (item, priority) = {
                let mut queues = lock(&self.background);
                loop {
                    if self.shutdown.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(item) = queues.readahead.pop_front() {
                        queues.active += 1;
                        break (item, Priority::ReadAhead);
                    }
                    if let Some(item) = queues.prefetch.pop_front() {
                        queues.active += 1;
                        break (item, Priority::Prefetch);
                    }
                    queues = self
                        .background_changed
                        .wait_timeout(queues, Duration::from_millis(500))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            if let Ok(blob) = self.blob(&item.blob_id) {
                // A blob nobody holds may be evicted any moment: not worth fetching for.
                if blob.handles.load(Ordering::SeqCst) > 0 {
                    self.background_fetch(&blob, item.chunks, priority);
                }
            }
            lock(&self.background).active -= 1;
            self.background_changed.notify_all();
        }
    }

    /// Fetches the missing chunks of `chunks` in the background: the permit first,
    /// then the claim (see the module documentation).
    fn background_fetch(&self, blob: &BlobCache, chunks: Range<u64>, priority: Priority) {
        {
            let states = lock(&blob.states);
            if chunks
                .clone()
                .all(|i| states.states[i as usize] != ChunkState::Missing)
            {
                return;
            }
        }
        let permit = self.permits.acquire(priority);
        if self.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let runs = {
            let mut states = lock(&blob.states);
            self.claim_runs(blob, &mut states, chunks.clone(), false)
        };
        let mut claim = Claim::new(blob, runs);
        while let Some(run) = claim.next_run() {
            let outcome = self.fetch_run_guarded(blob, run.chunks.clone(), priority, Some(&permit));
            if let Some(err) = claim.settle(outcome, &run.chunks) {
                tracing::warn!(blob = %blob.manifest.blob_id, chunks = ?run.chunks, "background fetch ({priority:?}) failed: {err}");
            }
        }
    }

    fn total_cached_bytes(&self) -> u64 {
        let dormant: u64 = lock(&self.dormant).values().map(|(bytes, _)| *bytes).sum();
        dormant + self.metrics.cached_bytes.load(Ordering::Relaxed)
    }

    /// One round of the group commit: for every open blob with chunks written since the
    /// last round, sync its cache file once, then mark those chunks in its map. Chunks
    /// whose sync failed are treated as never fetched.
    fn sync_round(&self) {
        let blobs: Vec<Arc<BlobCache>> = lock(&self.blobs).values().cloned().collect();
        for blob in blobs {
            let Some(local) = blob.local() else { continue };
            let pending = std::mem::take(&mut lock(&local.unsynced).chunks);
            if pending.is_empty() || blob.evicted.load(Ordering::SeqCst) {
                continue;
            }
            let durable = local
                .data
                .sync_data()
                .context(|| format!("syncing {}", local.data_path.display()))
                .and_then(|()| lock(&local.map).mark_ready(&pending));
            // Marked, or not to be trusted: no longer pending either way.
            lock(&local.unsynced).note(&blob.manifest.blob_id, &pending, false);
            if let Err(err) = durable {
                tracing::error!(blob = %blob.manifest.blob_id, chunks = pending.len(), "cannot make fetched chunks durable; they will be fetched again: {err}");
                let mut states = lock(&blob.states);
                for &index in &pending {
                    if states.states[index as usize] == ChunkState::Ready {
                        states.states[index as usize] = ChunkState::Missing;
                        states.ready -= 1;
                    }
                }
            }
        }
    }

    /// Tells the sync thread that chunks were written, `waiting_bytes` of their blob's
    /// in all. Call after they are added to the blob's unsynced list, so a round that
    /// clears the clock before this takes them too, or a later round does.
    fn sync_later(&self, waiting_bytes: u64) {
        let wake = {
            let now = Instant::now();
            let mut clock = lock(&self.sync_clock);
            let first = clock.oldest.is_none();
            clock.oldest.get_or_insert(now);
            clock.latest = Some(now);
            let full = waiting_bytes >= self.config.sync_batch_bytes && !clock.due;
            clock.due |= full;
            first || full
        };
        if wake {
            self.sync_changed.notify_all();
        }
    }

    fn sync_loop(&self) {
        let quiet = self.config.sync_interval.max(Duration::from_millis(1));
        let max_delay = self.config.sync_max_delay.max(Duration::from_millis(1));
        loop {
            let stop = {
                let mut clock = lock(&self.sync_clock);
                loop {
                    if clock.due || self.shutdown.load(Ordering::SeqCst) {
                        break;
                    }
                    let wait = match (clock.oldest, clock.latest) {
                        (Some(oldest), Some(latest)) => {
                            let due_at = (latest + quiet).min(oldest + max_delay);
                            let now = Instant::now();
                            if now >= due_at {
                                break;
                            }
                            due_at - now
                        }
                        // Nothing waits: the next fetch wakes this thread.
                        _ => Duration::from_secs(3600),
                    };
                    clock = self
                        .sync_changed
                        .wait_timeout(clock, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                *clock = SyncClock::default();
                self.shutdown.load(Ordering::SeqCst)
            };
            self.sync_round();
            if stop {
                return;
            }
        }
    }

    /// Evicts blobs not in use, least recently used first, until under capacity.
    fn evict_if_needed(&self) {
        let Some(capacity) = self.config.capacity_bytes else {
            return;
        };
        let _serial = lock(&self.evicting);
        // Blobs another process holds (their lock is taken): skipped this round.
        let mut busy: HashSet<String> = HashSet::new();
        while self.total_cached_bytes() > capacity {
            // Held while choosing and deleting, so the blob cannot be opened meanwhile.
            let mut blobs = lock(&self.blobs);
            let mut candidates: Vec<(u64, String, bool)> = lock(&self.dormant)
                .iter()
                .filter(|(id, _)| !busy.contains(*id) && !blobs.contains_key(*id))
                .map(|(id, (_, used))| (*used, id.clone(), false))
                .collect();
            candidates.extend(
                blobs
                    .iter()
                    // A delivered blob takes no room here.
                    .filter(|(_, b)| b.handles.load(Ordering::SeqCst) == 0 && b.local().is_some())
                    .map(|(id, b)| (b.last_used.load(Ordering::Relaxed), id.clone(), true)),
            );
            candidates.sort();
            let Some((_, id, open)) = candidates.into_iter().next() else {
                tracing::debug!("cache over capacity but every blob is in use");
                return;
            };
            let data_path = self.config.cache_dir.join(format!("{id}.data"));
            let map_path = self.config.cache_dir.join(format!("{id}.map"));
            let pending_path = self.config.cache_dir.join(format!("{id}.pending"));
            if open {
                let Some(blob) = blobs.get(&id).cloned() else {
                    continue;
                };
                let Some(local) = blob.local() else {
                    continue;
                };
                if blob.handles.load(Ordering::SeqCst) != 0 {
                    continue;
                }
                blobs.remove(&id);
                blob.evicted.store(true, Ordering::SeqCst);
                // What the counter holds for it: every chunk written, synced or not.
                let ready_bytes: u64 = {
                    let states = lock(&blob.states);
                    (0..states.states.len() as u64)
                        .filter(|&i| states.states[i as usize] == ChunkState::Ready)
                        .map(|i| {
                            blob.manifest.chunk_range(i).end - blob.manifest.chunk_range(i).start
                        })
                        .sum()
                };
                self.metrics.cached_bytes.fetch_sub(
                    ready_bytes.min(self.metrics.cached_bytes.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                // We hold the blob's lock through `local.data`.
                let _ = fs::remove_file(&local.map_path);
                let _ = fs::remove_file(&pending_path);
                let _ = fs::remove_file(&local.data_path);
            } else {
                // Another process may use the blob: only delete it under its lock.
                let file = match OpenOptions::new().read(true).write(true).open(&data_path) {
                    Ok(file) => file,
                    Err(err) => {
                        if err.kind() == std::io::ErrorKind::NotFound {
                            lock(&self.dormant).remove(&id);
                        } else {
                            tracing::warn!(
                                "cannot open {} to evict it: {err}",
                                data_path.display()
                            );
                            busy.insert(id);
                        }
                        continue;
                    }
                };
                match try_lock_blob(&file) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(blob = %id, "not evicting a blob another process has open");
                        busy.insert(id);
                        continue;
                    }
                    Err(err) => {
                        tracing::warn!("cannot lock {} to evict it: {err}", data_path.display());
                        busy.insert(id);
                        continue;
                    }
                }
                if lock(&self.dormant).remove(&id).is_none() {
                    continue;
                }
                let _ = fs::remove_file(&map_path);
                let _ = fs::remove_file(&pending_path);
                if let Err(err) = fs::remove_file(&data_path) {
                    tracing::warn!("cannot remove {}: {err}", data_path.display());
                }
                drop(file);
            }
            drop(blobs);
            self.metrics.evictions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(blob = %id, "evicted blob from the cache");
        }
    }
}
