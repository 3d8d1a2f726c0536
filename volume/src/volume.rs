//! The volume engine: a [`Volume`] serves one volume as a block target.
//!
//! # Write path
//! `map_write` allocates room in the active log segment and hands it to the transport,
//! which writes the guest's data straight into the segment's data file (io_uring,
//! zero-copy where it can). `finish_write` checksums that data, appends the log record,
//! and points the blocks at it in the *dirty* map. FLUSH syncs the log (`--durability
//! local`), or also waits until the bucket has everything completed before it (`object`);
//! either way the flush is finished by the flusher thread and the transport waits on a
//! [`Completion`], never blocking its queue.
//!
//! # Upload
//! The uploader takes the completed records in sequence order, a batch at a time (by
//! size, by age, or at once for an `object` flush), packs the latest data of every block
//! they touch into a pack, uploads it, and writes the next manifest version, create-only.
//! Then it *applies* the batch: the blocks' cache copies are invalidated (on disk first),
//! rewritten from the batch and marked present again, and the log records are dropped
//! from the dirty map; a segment whose records are all applied is deleted once no read
//! still uses it.
//!
//! # Read path
//! A block is read from the dirty map's log record if it has one, else from the cache
//! file if present, else fetched from its pack (checked against the chunk digest) into the
//! cache first. Nothing that a read mapped moves before the read's pin is released.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use berth_blockdev::{
    BlockError, BlockTarget, Completion, Extent, FetchReply, Progress, ReadMapping, ReadPin,
    Source, TargetInfo, WriteTicket,
};

use crate::error::{IoContext, Result, VolumeError};
use crate::extent_map::{Advance, ExtentMap};
use crate::failpoint;
use crate::format::{hex, now_ms, random_id, Manifest, ManifestKind, VolumeConfig};
use crate::lease::{self, Lease, Takeover};
use crate::local::{
    short_of_space, DirectWrites, LocalDir, LocalMeta, Presence, PresenceFile, Reserve,
    DISK_HEADROOM,
};
use crate::mapping::BlockMap;
use crate::metrics::VolumeMetrics;
use crate::pins::Pins;
use crate::store::{Created, Location, Patience, Store};
use crate::wal::{self, Record, RecordKind, SegmentFiles};

/// When a FLUSH counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// In the log on local disk (synced). The bucket follows within the upload interval.
    Local,
    /// In the bucket: the flush waits for the upload and manifest.
    Object,
}

impl Durability {
    pub fn name(self) -> &'static str {
        match self {
            Durability::Local => "local",
            Durability::Object => "object",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "local" => Some(Durability::Local),
            "object" => Some(Durability::Object),
            _ => None,
        }
    }
}

/// `VolumeOptions::upload_memory`'s default: four 16 MiB batches packing at once, or
/// two full 32 MiB packs of compressible data (three and a 16 MiB one of data that does
/// not compress, whose packs are the batches' data itself). Small enough for a 1 GiB machine,
/// enough to keep four PUT streams busy against an S3 server on a LAN.
pub const DEFAULT_UPLOAD_MEMORY: u64 = 128 << 20;

/// How long a write waits for local disk space for its log segment before it fails with
/// ENOSPC.
const ROOM_WAIT: Duration = Duration::from_secs(10);

/// `VolumeOptions::max_dirty_bytes`' default.
pub const DEFAULT_MAX_DIRTY_BYTES: u64 = 1 << 30;

/// `VolumeOptions::gc_after_released_bytes`' default: eight default packs.
pub const DEFAULT_GC_AFTER_RELEASED_BYTES: u64 = 256 << 20;

/// `VolumeOptions::compact_below`'s default: a pack less than half of which is still in
/// use is rewritten (its live half into a new pack), so the bucket holds at most about
/// twice what the volume uses once compaction has run.
pub const DEFAULT_COMPACT_BELOW: f64 = 0.5;

/// `VolumeOptions::compact_after_dead_bytes`' default: two default packs' worth of dead
/// blocks (less is not worth the GETs and the PUT).
pub const DEFAULT_COMPACT_AFTER_DEAD_BYTES: u64 = 64 << 20;

/// How to serve a volume.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// Local state goes to `cache_dir/<volume id>/`.
    pub cache_dir: PathBuf,
    pub durability: Durability,
    /// Size of a log segment's data file.
    pub segment_bytes: u64,
    /// Most raw bytes in one pack (one upload).
    pub pack_bytes: u64,
    /// Completed writes are uploaded within this time.
    pub upload_interval: Duration,
    /// Writes wait while this many acknowledged bytes are not in the bucket yet.
    pub max_dirty_bytes: u64,
    /// Cached bucket data is evicted beyond this (None: keep everything).
    pub cache_bytes: Option<u64>,
    /// An `object` FLUSH fails with EIO after this long without reaching the bucket.
    pub flush_timeout: Duration,
    pub lease_ttl: Duration,
    /// Threads fetching pack data for reads.
    pub fetch_threads: usize,
    /// A read that misses fetches at least this much around it.
    pub readahead_bytes: u64,
    /// Upload bandwidth limit in bytes per second (None: unlimited).
    pub upload_rate: Option<u64>,
    /// Packs built and PUT at once (their manifest versions are still written in order).
    /// A batch whose pack is in the bucket waits for its turn to be published without
    /// holding a stream, and as many batches again as there are streams may wait.
    pub upload_streams: usize,
    /// Most bytes of memory the uploader holds at once: the data of every batch taken and
    /// not yet published, and while a batch is packed and PUT its compressed copy (as much
    /// again until the pack is built and its size known; nothing for a pack of data that
    /// does not compress, which is the batch's data itself). Batches shrink below `pack_bytes` to fit (never below a quarter of
    /// it while others are in flight); a single write larger than the budget still goes,
    /// alone.
    pub upload_memory: u64,
    /// A full manifest every this many versions (deltas in between).
    pub full_every: u64,
    /// Background garbage collection period (None: only `berth volume gc`, or
    /// `gc_after_released_bytes`).
    pub gc_interval: Option<Duration>,
    /// Background garbage collection also runs as soon as packs of this many stored bytes
    /// have fallen out of use since its last pass (None: only by the period): under
    /// sustained overwrites the bucket would otherwise hold a whole period's writes.
    pub gc_after_released_bytes: Option<u64>,
    /// Compaction: a pack of this volume whose live blocks are fewer than this fraction of
    /// its blocks (and that no snapshot holds) is sparse; once sparse packs hold
    /// `compact_after_dead_bytes` of blocks no longer in use, the uploader copies their
    /// live blocks into a new pack and garbage collection then deletes them (None: never).
    pub compact_below: Option<f64>,
    pub compact_after_dead_bytes: u64,
    /// How often the uploader looks for sparse packs while none is due.
    pub compact_check_interval: Duration,
    /// Manifest versions a newer full version supersedes are kept this long, for readers
    /// that loaded an older version. Packs never depend on it (see
    /// [`crate::admin::collect_garbage`]).
    pub gc_grace: Duration,
    /// How long opening waits for the bucket.
    pub open_timeout: Duration,
    /// How long a read waits for a fetch, and a close for the last upload.
    pub fetch_timeout: Duration,
    pub drain_timeout: Duration,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        Self {
            cache_dir: PathBuf::from("/var/lib/berth/volumes"),
            durability: Durability::Local,
            segment_bytes: 32 << 20,
            pack_bytes: 32 << 20,
            upload_interval: Duration::from_secs(5),
            max_dirty_bytes: DEFAULT_MAX_DIRTY_BYTES,
            cache_bytes: None,
            flush_timeout: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(60),
            fetch_threads: 4,
            readahead_bytes: 1 << 20,
            upload_rate: None,
            upload_streams: 4,
            upload_memory: DEFAULT_UPLOAD_MEMORY,
            full_every: 32,
            gc_interval: Some(Duration::from_secs(600)),
            gc_after_released_bytes: Some(DEFAULT_GC_AFTER_RELEASED_BYTES),
            compact_below: Some(DEFAULT_COMPACT_BELOW),
            compact_after_dead_bytes: DEFAULT_COMPACT_AFTER_DEAD_BYTES,
            compact_check_interval: Duration::from_secs(1),
            gc_grace: Duration::from_secs(3600),
            open_timeout: Duration::from_secs(60),
            fetch_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(60),
        }
    }
}

/// Where a block's newest data is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirtyLoc {
    Data { segment: u32, block: u64, seq: u64 },
    Zero { seq: u64 },
}

impl DirtyLoc {
    pub(crate) fn seq(&self) -> u64 {
        match *self {
            DirtyLoc::Data { seq, .. } | DirtyLoc::Zero { seq } => seq,
        }
    }
}

impl Advance for DirtyLoc {
    fn advance(&self, blocks: u64) -> Self {
        match *self {
            DirtyLoc::Data {
                segment,
                block,
                seq,
            } => DirtyLoc::Data {
                segment,
                block: block + blocks,
                seq,
            },
            zero => zero,
        }
    }
}

/// An open log segment.
#[derive(Debug)]
pub(crate) struct Segment {
    pub files: Arc<SegmentFiles>,
    /// Next free data block, and next free index slot.
    pub next_block: u64,
    pub next_slot: u64,
    /// Writes allocated here and not finished yet.
    pub outstanding: u32,
    /// No more allocations (a newer segment is active).
    pub sealed: bool,
    /// Highest sequence number recorded here (0: none).
    pub max_seq: u64,
    /// Written since the last sync.
    pub needs_sync: bool,
}

/// A FLUSH waiting.
pub(crate) struct FlushRequest {
    pub target: u64,
    pub completion: Arc<Completion>,
    pub started: Instant,
}

/// Everything behind the volume's lock.
pub(crate) struct State {
    pub epoch: u32,
    pub next_seq: u64,
    pub segments: BTreeMap<u32, Segment>,
    pub active: Option<u32>,
    pub next_segment: u32,
    pub dirty: ExtentMap<DirtyLoc>,
    /// Completed records not in the bucket yet, in sequence order.
    pub pending: VecDeque<Record>,
    pub pending_bytes: u64,
    pub oldest_pending: Option<Instant>,
    /// The bucket holds every record up to this one.
    pub uploaded_seq: u64,
    /// The local log is synced up to this record.
    pub synced_seq: u64,
    pub dir_needs_sync: bool,
    pub map: BlockMap,
    pub last_full_version: u64,
    pub presence: Presence,
    /// Reference bits of cache regions, for eviction (CLOCK).
    pub region_refs: Vec<bool>,
    pub clock_hand: usize,
    pub failed: Option<String>,
    pub fenced: Option<String>,
    pub stopping: bool,
    pub upload_now: bool,
    /// The local disk ran out of space (a log segment, a cache write): the janitor evicts
    /// cached blocks to make room.
    pub room_wanted: bool,
    /// A segment number whose files an attempt that found the disk full left behind: the
    /// next attempt takes them over.
    pub unfinished_segment: Option<u32>,
    /// Eviction rounds run for `room_wanted` (their blocks punched), for waiters.
    pub room_made: u64,
    /// Regions an eviction round cleared whose map it could not persist: not punched yet
    /// (the map on disk may still call their blocks cached), so the next round does.
    pub unpunched: Vec<(u64, u64)>,
    /// The last apply left data out of the cache for want of space (logged once per spell).
    pub cache_short_of_space: bool,
    pub sync_requests: Vec<FlushRequest>,
    pub object_waiters: Vec<FlushRequest>,
}

impl State {
    pub(crate) fn refuse_writes(&self) -> Option<VolumeError> {
        if let Some(holder) = &self.fenced {
            return Some(VolumeError::Fenced(holder.clone()));
        }
        if let Some(why) = &self.failed {
            return Some(VolumeError::Failed(why.clone()));
        }
        if self.stopping {
            return Some(VolumeError::ShuttingDown);
        }
        None
    }
}

/// A fetch handed to the fetch threads: block ranges to make present, and where to
/// answer.
pub(crate) type FetchJob = (Vec<(u64, u64)>, FetchReply<VolumeError>);

/// The shared core of a volume.
pub(crate) struct Inner {
    pub config: VolumeConfig,
    pub options: VolumeOptions,
    pub store: Arc<Store>,
    pub local: LocalDir,
    pub session: [u8; 16],
    pub session_hex: String,
    pub block_size: u64,
    pub state: Mutex<State>,
    /// Signalled on every change the threads wait for.
    pub changed: Condvar,
    pub cache: File,
    /// Direct writes to the cache file, where the file system allows them.
    pub cache_direct: Option<DirectWrites>,
    /// Held while writing or punching the cache file.
    pub cache_write: Mutex<()>,
    pub presence_file: PresenceFile,
    /// Local disk space kept for rewriting the meta file when the disk is full.
    pub reserve: Reserve,
    /// Orders presence persists (snapshot and write as one).
    pub persist_lock: Mutex<()>,
    pub pins: Arc<Pins>,
    pub metrics: Arc<VolumeMetrics>,
    pub lease: Mutex<Option<Lease>>,
    pub fetch_jobs: Mutex<Option<Sender<FetchJob>>>,
    /// What the uploader's compaction last found, for [`Volume::wait_compacted`].
    pub compaction_status: Mutex<crate::compact::CompactionStatus>,
    pub meta: Mutex<LocalMeta>,
    /// Blocks per eviction region.
    pub region_blocks: u64,
}

/// A volume served from this process.
pub struct Volume {
    pub(crate) inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    info: TargetInfo,
    closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("location", &self.inner.store.location.to_string())
            .finish_non_exhaustive()
    }
}

/// What opening found and did, for the log.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub manifest_version: u64,
    /// Log records replayed (not in the bucket yet).
    pub replayed: u64,
    /// Records that were in the bucket but not applied locally yet.
    pub reapplied: u64,
    /// The local state was from another writer and was set aside.
    pub reset_local: bool,
    pub quarantined: Option<PathBuf>,
    /// The bucket held log records the local log had lost (unflushed writes uploaded
    /// before a power cut of the local disk): the volume continued from the bucket.
    pub lost_tail: bool,
}

thread_local! {
    static CRC_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on `changed` with `state` for at most `timeout`; the loops around it re-check
    /// what they wait for.
    pub(crate) fn wait_changed<'a>(
        &self,
        state: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(state, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    fn blocks(&self) -> u64 {
        self.config.blocks()
    }

    /// Marks the volume failed (a local disk error): writes and flushes fail from now on.
    pub(crate) fn fail(&self, why: String) {
        tracing::error!(volume = %self.store.location, "the volume stops taking writes: {why}");
        let mut state = self.lock();
        if state.failed.is_none() {
            state.failed = Some(why);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Another writer took over: stop writing to the bucket.
    pub(crate) fn fence(&self, holder: String) {
        tracing::error!(volume = %self.store.location, "fenced: {holder}");
        self.metrics.fenced.store(1, Ordering::Relaxed);
        let mut state = self.lock();
        if state.fenced.is_none() {
            state.fenced = Some(holder);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Creates a new active segment (sealing the old one) with room for at least
    /// `min_blocks` data blocks. With the local disk short of space for a whole segment,
    /// a smaller one (down to 1 MiB, or the write) will do.
    fn rotate(&self, state: &mut State, min_blocks: u64) -> Result<()> {
        let number = state.next_segment;
        let floor = min_blocks.max((1 << 20) / self.block_size).max(16);
        let mut data_blocks = (self.options.segment_bytes / self.block_size)
            .max(16)
            .max(min_blocks);
        let free = crate::local::free_bytes(&self.cache);
        let files = loop {
            let needs = data_blocks * (self.block_size + wal::RECORD_LEN as u64);
            let made = match free {
                Some(free) if free < needs + DISK_HEADROOM => Err(short_of_space(format!(
                    "creating log segment {number} of {needs} bytes: the local disk has {free} bytes free"
                ))),
                _ => SegmentFiles::create(
                    &self.local.wal_dir(),
                    number,
                    data_blocks,
                    self.config.block_size,
                    state.unfinished_segment == Some(number),
                ),
            };
            match made {
                Ok(files) => break files,
                Err(err) if err.is_no_space() && data_blocks / 2 >= floor => {
                    state.unfinished_segment = Some(number);
                    data_blocks /= 2;
                }
                Err(err) => {
                    if err.is_no_space() {
                        state.unfinished_segment = Some(number);
                    }
                    return Err(err);
                }
            }
        };
        failpoint::hit("rotate.after_create");
        state.next_segment = number + 1;
        if let Some(active) = state.active.and_then(|a| state.segments.get_mut(&a)) {
            active.sealed = true;
        }
        state.segments.insert(
            number,
            Segment {
                files: Arc::new(files),
                next_block: 0,
                next_slot: 0,
                outstanding: 0,
                sealed: false,
                max_seq: 0,
                needs_sync: true,
            },
        );
        state.active = Some(number);
        state.dir_needs_sync = true;
        self.metrics
            .segments_created
            .fetch_add(1, Ordering::Relaxed);
        self.update_wal_gauge(state);
        Ok(())
    }

    /// Records ranges left out of the cache for want of local disk space (none: an apply
    /// found room): counted, logged once per spell, and the janitor asked to evict.
    pub(crate) fn note_cache_space(&self, state: &mut State, uncached: &[(u64, u64)]) {
        if uncached.is_empty() {
            if state.cache_short_of_space {
                state.cache_short_of_space = false;
                tracing::info!(volume = %self.store.location, "The local disk has room for the cache again.");
            }
            return;
        }
        let bytes = uncached.iter().map(|r| r.1).sum::<u64>() * self.block_size;
        self.metrics
            .uncached_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        state.room_wanted = true;
        if !state.cache_short_of_space {
            state.cache_short_of_space = true;
            tracing::warn!(
                volume = %self.store.location,
                "The local disk is full: {bytes} bytes the bucket holds were not written to the \
                 local cache (reads fetch them again); evicting cached blocks to make room."
            );
        }
        self.changed.notify_all();
    }

    /// Waits (at most `timeout`) for the janitor's next eviction round made for want of
    /// space to have freed its blocks. (A round the failed attempt itself asked for, through
    /// `note_cache_space`, may have run already; waiting for one more costs another tenth of
    /// the cache, where a round that ran before the attempt failed would have cost the
    /// attempt its wait: the next one is the one known to come after the failure.)
    pub(crate) fn wait_for_room(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        let since = state.room_made;
        state.room_wanted = true;
        self.changed.notify_all();
        while state.room_made == since && !state.stopping {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = self.wait_changed(state, left);
        }
    }

    pub(crate) fn update_wal_gauge(&self, state: &State) {
        let bytes: u64 = state
            .segments
            .values()
            .map(|s| s.files.data_blocks * self.block_size + s.files.slots * wal::RECORD_LEN as u64)
            .sum();
        self.metrics.wal_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The active segment with room for `blocks` data blocks and one record.
    fn room(&self, state: &mut State, blocks: u64) -> Result<u32> {
        for attempt in 0..2 {
            if let Some(number) = state.active {
                if let Some(seg) = state.segments.get(&number) {
                    let slots_left = seg.files.slots - seg.next_slot - u64::from(seg.outstanding);
                    if seg.next_block + blocks <= seg.files.data_blocks && slots_left >= 1 {
                        return Ok(number);
                    }
                }
            }
            if attempt == 0 {
                self.rotate(state, blocks)?;
            }
        }
        Err(VolumeError::Invalid(format!(
            "a write of {blocks} blocks does not fit in a log segment"
        )))
    }

    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<WriteTicket> {
        let lba = offset / self.block_size;
        let blocks = len / self.block_size;
        let mut state = self.lock();
        // Back-pressure: writes wait while too much is not in the bucket yet. Uploads
        // never wait for a request, so this always drains unless the bucket is away.
        while state.pending_bytes + len > self.options.max_dirty_bytes
            && state.pending_bytes > 0
            && state.refuse_writes().is_none()
        {
            state.upload_now = true;
            self.changed.notify_all();
            state = self.wait_changed(state, Duration::from_millis(100));
        }
        if let Some(err) = state.refuse_writes() {
            return Err(err);
        }
        // With the local disk too full for a log segment, the write waits (as for the
        // dirty limit) while cached blocks are evicted and applied segments retire; it
        // fails with ENOSPC only if no room comes.
        let room_deadline = Instant::now() + ROOM_WAIT;
        let number = loop {
            match self.room(&mut state, blocks) {
                Ok(number) => break number,
                Err(err) if err.is_no_space() && Instant::now() < room_deadline => {
                    state.room_wanted = true;
                    self.changed.notify_all();
                    state = self.wait_changed(state, Duration::from_millis(50));
                    if let Some(err) = state.refuse_writes() {
                        return Err(err);
                    }
                }
                Err(err) => {
                    if err.is_no_space() {
                        state.room_wanted = true;
                        drop(state);
                        self.changed.notify_all();
                    }
                    return Err(err);
                }
            }
        };
        let seg = state
            .segments
            .get_mut(&number)
            .ok_or_else(|| VolumeError::Wal("the active segment vanished".into()))?;
        let block = seg.next_block;
        seg.next_block += blocks;
        seg.outstanding += 1;
        seg.needs_sync = true;
        let fd = seg.files.data.as_raw_fd();
        drop(state);
        failpoint::hit("write.after_alloc");
        out.push(Extent {
            len,
            source: Source::File {
                fd,
                offset: block * self.block_size,
            },
        });
        Ok(WriteTicket::with_allocations(vec![
            (u64::from(number), block),
            (lba, blocks),
        ]))
    }

    fn finish_write(&self, ticket: &WriteTicket, written: bool) -> Result<()> {
        let (&(number, block), &(lba, blocks)) = match ticket.allocations() {
            [a, b] => (a, b),
            _ => {
                return Err(VolumeError::Invalid(
                    "a write ticket of another target".into(),
                ))
            }
        };
        let number = number as u32;
        let files = {
            let state = self.lock();
            state
                .segments
                .get(&number)
                .map(|s| s.files.clone())
                .ok_or_else(|| VolumeError::Wal(format!("segment {number} is gone")))?
        };
        let release = |state: &mut State| {
            if let Some(seg) = state.segments.get_mut(&number) {
                seg.outstanding = seg.outstanding.saturating_sub(1);
            }
        };
        if !written {
            let mut state = self.lock();
            release(&mut state);
            drop(state);
            self.changed.notify_all();
            return Ok(());
        }
        failpoint::hit("write.after_data");
        let len = blocks * self.block_size;
        let crc = CRC_BUF.with(|buf| {
            wal::crc_of(
                &files.data,
                block * self.block_size,
                len,
                &mut buf.borrow_mut(),
            )
        });
        let mut state = self.lock();
        let crc = match crc {
            Ok(crc) => crc,
            Err(err) => {
                release(&mut state);
                return Err(VolumeError::Io {
                    context: format!("reading back a write from log segment {number}"),
                    source: err,
                });
            }
        };
        if let Some(err) = state.refuse_writes() {
            release(&mut state);
            return Err(err);
        }
        let seq = state.next_seq;
        let record = Record {
            epoch: state.epoch,
            seq,
            lba,
            blocks: blocks as u32,
            kind: RecordKind::Data,
            segment: number,
            data_block: block,
            crc,
        };
        self.append_record(&mut state, record)?;
        state.dirty.insert(
            lba,
            blocks,
            DirtyLoc::Data {
                segment: number,
                block,
                seq,
            },
        );
        release(&mut state);
        let wake = state.pending_bytes >= self.options.pack_bytes;
        drop(state);
        failpoint::hit("write.after_record");
        if wake {
            self.changed.notify_all();
        }
        Ok(())
    }

    /// Writes `record` into its segment's index (under the lock: sequence order is
    /// completion order) and queues it for upload.
    fn append_record(&self, state: &mut State, record: Record) -> Result<()> {
        let seg = state
            .segments
            .get_mut(&record.segment)
            .ok_or_else(|| VolumeError::Wal(format!("segment {} is gone", record.segment)))?;
        let slot = seg.next_slot;
        if let Err(err) = seg
            .files
            .index
            .write_all_at(&record.encode(), slot * wal::RECORD_LEN as u64)
        {
            // The sequence number is not used, so the log stays contiguous; but a disk that
            // fails writes cannot be trusted with more.
            let why = format!("writing the log index of segment {}: {err}", record.segment);
            drop(err);
            state.failed.get_or_insert(why.clone());
            self.changed.notify_all();
            return Err(VolumeError::Failed(why));
        }
        seg.next_slot += 1;
        seg.max_seq = record.seq;
        seg.needs_sync = true;
        state.next_seq = record.seq + 1;
        let bytes = match record.kind {
            RecordKind::Data => u64::from(record.blocks) * self.block_size,
            RecordKind::Zero => 0,
        };
        state.pending_bytes += bytes.max(1);
        if state.oldest_pending.is_none() {
            state.oldest_pending = Some(Instant::now());
        }
        state.pending.push_back(record);
        self.metrics
            .dirty_bytes
            .store(state.pending_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// DISCARD and WRITE_ZEROES: the blocks read as zeros from now on.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let mut lba = offset / self.block_size;
        let mut left = len / self.block_size;
        let mut state = self.lock();
        if let Some(err) = state.refuse_writes() {
            return Err(err);
        }
        while left > 0 {
            let blocks = left.min(u64::from(u32::MAX));
            let number = self.room(&mut state, 0)?;
            let seq = state.next_seq;
            let record = Record {
                epoch: state.epoch,
                seq,
                lba,
                blocks: blocks as u32,
                kind: RecordKind::Zero,
                segment: number,
                data_block: 0,
                crc: 0,
            };
            self.append_record(&mut state, record)?;
            state.dirty.insert(lba, blocks, DirtyLoc::Zero { seq });
            lba += blocks;
            left -= blocks;
        }
        Ok(())
    }

    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<ReadPin> {
        let start = offset / self.block_size;
        let blocks = len / self.block_size;
        let pin = self.pins.pin();
        let mut missed = false;
        for _ in 0..8 {
            let mut extents = Vec::new();
            let mut missing: Vec<(u64, u64)> = Vec::new();
            {
                let mut state = self.lock();
                self.resolve(&mut state, start, blocks, &mut extents, &mut missing);
                if missing.is_empty() {
                    self.mark_regions_read(&mut state, start, blocks);
                    drop(state);
                    for e in extents {
                        push_extent(out, e);
                    }
                    // Hits and misses are counted by `map_read_or_fetch`, which every
                    // transport calls first; a read counts again only if its blocks went
                    // missing in between and it had to fetch here.
                    if missed {
                        self.metrics.read_misses.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(ReadPin::new(pin));
                }
            }
            missed = true;
            self.fetch_and_wait(missing)?;
        }
        Err(VolumeError::Failed(format!(
            "blocks around {start} kept being evicted while being read (is --cache-size too small?)"
        )))
    }

    /// Marks the cache regions a read found its blocks in as recently used (for eviction).
    fn mark_regions_read(&self, state: &mut State, start: u64, blocks: u64) {
        let first = (start / self.region_blocks) as usize;
        let last = ((start + blocks.max(1) - 1) / self.region_blocks) as usize;
        for r in first..=last.min(state.region_refs.len().saturating_sub(1)) {
            state.region_refs[r] = true;
        }
    }

    /// Where `[start, start + blocks)` is now: log, cache, zeros; the blocks that are in
    /// no local file go to `missing`.
    fn resolve(
        &self,
        state: &mut State,
        start: u64,
        blocks: u64,
        out: &mut Vec<Extent>,
        missing: &mut Vec<(u64, u64)>,
    ) {
        let bs = self.block_size;
        let cache_fd = self.cache.as_raw_fd();
        state
            .dirty
            .for_each_piece(start, blocks, |piece| match piece.value {
                Some(DirtyLoc::Data { segment, block, .. }) => {
                    let fd = state
                        .segments
                        .get(&segment)
                        .map(|s| s.files.data.as_raw_fd());
                    match fd {
                        Some(fd) => out.push(Extent {
                            len: piece.len * bs,
                            source: Source::File {
                                fd,
                                offset: block * bs,
                            },
                        }),
                        // Cannot happen (segments outlive their dirty entries); refuse
                        // rather than guess.
                        None => missing.push((piece.start, piece.len)),
                    }
                }
                Some(DirtyLoc::Zero { .. }) => out.push(Extent {
                    len: piece.len * bs,
                    source: Source::Zero,
                }),
                None => {
                    state
                        .map
                        .map
                        .for_each_piece(piece.start, piece.len, |mapped| {
                            if mapped.value.is_none() {
                                out.push(Extent {
                                    len: mapped.len * bs,
                                    source: Source::Zero,
                                });
                                return;
                            }
                            for (run, len, set) in state.presence.runs(mapped.start, mapped.len) {
                                if set {
                                    out.push(Extent {
                                        len: len * bs,
                                        source: Source::File {
                                            fd: cache_fd,
                                            offset: run * bs,
                                        },
                                    });
                                } else {
                                    missing.push((run, len));
                                }
                            }
                        });
                }
            });
    }

    fn fetch_and_wait(&self, missing: Vec<(u64, u64)>) -> Result<()> {
        let (reply, answer) = channel();
        self.send_fetch(missing, FetchReply::Blocked(reply))?;
        answer.recv().map_err(|_| VolumeError::ShuttingDown)?
    }

    fn send_fetch(&self, missing: Vec<(u64, u64)>, reply: FetchReply<VolumeError>) -> Result<()> {
        let sent = self
            .fetch_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|jobs| jobs.send((missing, reply)).is_ok());
        if sent {
            Ok(())
        } else {
            Err(VolumeError::ShuttingDown)
        }
    }

    /// Hands the blocks of `[offset, offset + len)` that are in no local file to the fetch
    /// threads (Pending), or answers Done when none is missing. Counts the read as a hit or
    /// a miss.
    fn start_read(&self, offset: u64, len: u64) -> Result<Progress> {
        let start = offset / self.block_size;
        let blocks = len / self.block_size;
        let mut extents = Vec::new();
        let mut missing: Vec<(u64, u64)> = Vec::new();
        self.resolve(&mut self.lock(), start, blocks, &mut extents, &mut missing);
        if missing.is_empty() {
            self.metrics.read_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Progress::Done(Ok(())));
        }
        self.fetch_missing(missing).map(Progress::Pending)
    }

    /// One look at a read: when every block is local its extents go to `out` (valid while
    /// the returned pin is held), otherwise the missing blocks go to the fetch threads.
    /// Counts the read as a hit or a miss.
    fn map_read_or_fetch(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<ReadMapping> {
        let start = offset / self.block_size;
        let blocks = len / self.block_size;
        // Pinned before the blocks are resolved, as in `map_read`.
        let pin = self.pins.pin();
        let mut extents = Vec::new();
        let mut missing: Vec<(u64, u64)> = Vec::new();
        {
            let mut state = self.lock();
            self.resolve(&mut state, start, blocks, &mut extents, &mut missing);
            if missing.is_empty() {
                self.mark_regions_read(&mut state, start, blocks);
                drop(state);
                self.metrics.read_hits.fetch_add(1, Ordering::Relaxed);
                for e in extents {
                    push_extent(out, e);
                }
                return Ok(ReadMapping::Mapped(ReadPin::new(pin)));
            }
        }
        drop(pin);
        self.fetch_missing(missing).map(ReadMapping::Fetching)
    }

    /// Counts a read miss and hands its missing blocks to the fetch threads; the
    /// completion finishes once they are local.
    fn fetch_missing(&self, missing: Vec<(u64, u64)>) -> Result<Arc<Completion>> {
        self.metrics.read_misses.fetch_add(1, Ordering::Relaxed);
        let completion = Completion::new().map_err(|e| VolumeError::Failed(e.to_string()))?;
        let reply = FetchReply::Pending {
            completion: completion.clone(),
            into_block: VolumeError::into_block,
            gone: || VolumeError::ShuttingDown.into_block(),
        };
        self.send_fetch(missing, reply)?;
        Ok(completion)
    }

    /// Queues a FLUSH; finished by the flusher thread.
    fn start_flush(&self) -> Result<Progress> {
        let mut state = self.lock();
        if let Some(err) = state.refuse_writes() {
            // A failed or fenced volume cannot promise durability; a volume shutting down
            // still syncs what it has.
            if !matches!(err, VolumeError::ShuttingDown) {
                return Err(err);
            }
        }
        let target = state.next_seq - 1;
        let done_locally = target <= state.synced_seq;
        let done = match self.options.durability {
            Durability::Local => done_locally,
            Durability::Object => target <= state.uploaded_seq,
        };
        if done {
            return Ok(Progress::Done(Ok(())));
        }
        let completion = Completion::new().map_err(|e| VolumeError::Failed(e.to_string()))?;
        let request = FlushRequest {
            target,
            completion: completion.clone(),
            started: Instant::now(),
        };
        if self.options.durability == Durability::Object {
            state.upload_now = true;
        }
        state.sync_requests.push(request);
        drop(state);
        self.changed.notify_all();
        Ok(Progress::Pending(completion))
    }

    /// Flusher: syncs the log for waiting FLUSHes (all of them at once), then finishes
    /// them, or (object durability) hands them to wait for the bucket.
    ///
    /// FLUSHes waiting for the bucket are finished by the uploader as it publishes; here
    /// they are only timed out, so with nothing to sync this thread sleeps between checks
    /// whether or not any wait (it once spun, taking a CPU from the uploads it waited for).
    fn flusher(self: &Arc<Self>) {
        loop {
            let mut state = self.lock();
            while state.sync_requests.is_empty() {
                if state.stopping && state.object_waiters.is_empty() {
                    return;
                }
                let waiting = !state.object_waiters.is_empty();
                state = self.wait_changed(state, Duration::from_millis(200));
                if waiting && state.sync_requests.is_empty() {
                    break;
                }
            }
            if !state.sync_requests.is_empty() {
                let requests = std::mem::take(&mut state.sync_requests);
                let outcome = self.sync_log(state);
                let mut state = self.lock();
                for request in requests {
                    match (&outcome, self.options.durability) {
                        (Err(err), _) => {
                            let why = err.to_string();
                            self.finish_flush(request, Err(VolumeError::Failed(why)));
                        }
                        (Ok(()), Durability::Local) => self.finish_flush(request, Ok(())),
                        (Ok(()), Durability::Object) => state.object_waiters.push(request),
                    }
                }
                drop(state);
            } else {
                drop(state);
            }
            self.check_object_waiters();
        }
    }

    fn finish_flush(&self, request: FlushRequest, outcome: Result<()>) {
        self.metrics
            .flush_latency
            .observe(request.started.elapsed());
        request
            .completion
            .complete(outcome.map_err(|e| e.into_block()));
    }

    /// Finishes the object-durability flushes the bucket now covers, and fails those that
    /// waited too long.
    pub(crate) fn check_object_waiters(&self) {
        let mut state = self.lock();
        if state.object_waiters.is_empty() {
            return;
        }
        let uploaded = state.uploaded_seq;
        let refusal = state
            .fenced
            .clone()
            .map(VolumeError::Fenced)
            .or_else(|| state.failed.clone().map(VolumeError::Failed));
        let waiters = std::mem::take(&mut state.object_waiters);
        let mut kept = Vec::new();
        for request in waiters {
            if request.target <= uploaded {
                self.finish_flush(request, Ok(()));
            } else if let Some(err) = &refusal {
                let err = match err {
                    VolumeError::Fenced(h) => VolumeError::Fenced(h.clone()),
                    other => VolumeError::Failed(other.to_string()),
                };
                self.finish_flush(request, Err(err));
            } else if request.started.elapsed() >= self.options.flush_timeout {
                let secs = self.options.flush_timeout.as_secs();
                self.finish_flush(request, Err(VolumeError::FlushTimeout(secs)));
            } else {
                kept.push(request);
            }
        }
        state.object_waiters = kept;
        if !state.object_waiters.is_empty() {
            state.upload_now = true;
        }
    }

    /// Syncs every segment written since the last sync (and the log directory after a
    /// new segment); takes the lock in and gives it back released.
    pub(crate) fn sync_log(&self, mut state: MutexGuard<'_, State>) -> Result<()> {
        let target = state.next_seq - 1;
        let files: Vec<Arc<SegmentFiles>> = state
            .segments
            .values_mut()
            .filter(|s| s.needs_sync)
            .map(|s| {
                s.needs_sync = false;
                s.files.clone()
            })
            .collect();
        let dir = std::mem::take(&mut state.dir_needs_sync);
        drop(state);
        failpoint::hit("flush.before_sync");
        let outcome = (|| -> Result<()> {
            for files in &files {
                files
                    .data
                    .sync_data()
                    .context(|| format!("syncing log segment {}", files.number))?;
            }
            failpoint::hit("flush.after_data_sync");
            for files in &files {
                files
                    .index
                    .sync_data()
                    .context(|| format!("syncing the index of log segment {}", files.number))?;
            }
            if dir {
                crate::local::sync_dir(&self.local.wal_dir())?;
            }
            Ok(())
        })();
        failpoint::hit("flush.after_sync");
        let mut state = self.lock();
        match &outcome {
            Ok(()) => state.synced_seq = state.synced_seq.max(target),
            Err(err) => {
                // A failed fsync may have dropped the data: nothing written can be promised.
                let why = err.to_string();
                state.failed.get_or_insert(why);
                for number in files.iter().map(|f| f.number) {
                    if let Some(seg) = state.segments.get_mut(&number) {
                        seg.needs_sync = true;
                    }
                }
            }
        }
        drop(state);
        self.changed.notify_all();
        outcome
    }

    /// Writes the presence bitmap's changed pages: the cache file is synced first, so
    /// that no bit reaches the disk before its block's data.
    pub(crate) fn persist_presence(&self) -> Result<()> {
        let _order = self.persist_lock.lock().unwrap_or_else(|e| e.into_inner());
        let pages = self.lock().presence.take_dirty();
        if pages.is_empty() {
            return Ok(());
        }
        let outcome = self
            .cache
            .sync_data()
            .context(|| "syncing the cache file".to_string())
            .and_then(|()| self.presence_file.write(&pages));
        if outcome.is_err() {
            // Written again next time.
            self.lock().presence.requeue(&pages);
        }
        outcome
    }

    pub(crate) fn write_meta(&self, change: impl FnOnce(&mut LocalMeta)) -> Result<()> {
        let mut meta = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = meta.clone();
        change(&mut next);
        match self.local.write_meta(&next) {
            Err(err) if err.is_no_space() => {
                // The disk is full: the reserve makes room for this one rewrite (the
                // janitor takes it again later).
                self.reserve.release()?;
                self.local.write_meta(&next)?;
            }
            other => other?,
        }
        *meta = next;
        Ok(())
    }
}

impl Volume {
    /// Opens the volume at `location` for writing: takes its lease, recovers the local
    /// state (replays the log, re-applies what was uploaded but not applied), writes a
    /// fencing manifest version, and starts the background threads.
    pub fn open(location: &Location, options: VolumeOptions) -> Result<(Self, OpenReport)> {
        let store = Store::open(location)?;
        Self::open_with_store(store, options)
    }

    /// As [`Self::open`], on a store the caller made (tests wrap its backend).
    pub fn open_with_store(
        store: Arc<Store>,
        options: VolumeOptions,
    ) -> Result<(Self, OpenReport)> {
        let patience = Patience::For(options.open_timeout);
        let config = store.load_config(patience)?;
        let local = LocalDir::lock(&options.cache_dir.join(&config.id))?;
        let old_meta = local.read_meta()?;
        if let Some(meta) = &old_meta {
            if meta.volume_id != config.id
                || meta.block_size != config.block_size
                || meta.size != config.size
            {
                return Err(VolumeError::ForeignLocalState {
                    path: local.path.display().to_string(),
                    problem: format!("it is for volume {} ({} bytes)", meta.volume_id, meta.size),
                });
            }
        }
        let session = random_id();
        let session_hex = hex(&session);
        // The session about to take the lease is recorded first: a process killed
        // between taking the lease and writing its meta file must not lock this host
        // out of its own volume until the lease expires.
        let started = local.swap_starting_session(&session_hex)?;
        let mut previous: Vec<&str> = started.iter().map(String::as_str).collect();
        if let Some(meta) = &old_meta {
            previous.push(&meta.session);
        }
        let _ = Takeover::Successor;
        let lease = lease::acquire(
            &store,
            &session_hex,
            &previous,
            options.lease_ttl.as_millis() as i64,
            patience,
        )?;
        let mut report = OpenReport::default();
        let versions = store.manifest_versions(patience)?;
        let latest = *versions.last().ok_or_else(|| VolumeError::Corrupt {
            object: store.key("manifests/"),
            problem: "the volume has no manifest".into(),
        })?;
        let (map, last_full_version) = store.load_state(&config, latest, patience)?;
        report.manifest_version = latest;

        // Is the local state ours to continue?
        let mut keep_local = false;
        if let Some(meta) = &old_meta {
            if latest < meta.applied_version {
                return Err(VolumeError::ForeignLocalState {
                    path: local.path.display().to_string(),
                    problem: format!(
                        "it has applied manifest version {}, but the bucket only has up to {latest} (was the bucket restored from an older copy?)",
                        meta.applied_version
                    ),
                });
            }
            keep_local = true;
            for version in meta.applied_version + 1..=latest {
                let manifest = store.load_manifest(version, patience)?;
                if hex(&manifest.session) != meta.session {
                    keep_local = false;
                    break;
                }
            }
        }
        if !keep_local {
            let why = match &old_meta {
                Some(meta) => format!(
                    "manifest versions after {} were written by another writer; these log records were never uploaded",
                    meta.applied_version
                ),
                None => "no meta file: not known which volume state these records belong to".into(),
            };
            report.quarantined = local.quarantine_wal(&why)?;
            if old_meta.is_some() {
                report.reset_local = true;
                tracing::warn!(
                    volume = %store.location,
                    "the volume was written from elsewhere since this host last served it: its local cache is dropped{}",
                    report.quarantined.as_ref().map(|p| format!(" and its unuploaded log kept in {}", p.display())).unwrap_or_default()
                );
            }
            local.reset_cache()?;
        }
        let (cache, cache_direct) = local.open_cache(config.size, u64::from(config.block_size))?;
        tracing::debug!(
            volume = %store.location,
            "uploaded batches are written to the cache file {}",
            if cache_direct.is_some() { "directly (O_DIRECT)" } else { "through the page cache (the file system offers no direct I/O for these blocks)" }
        );
        let (presence_file, presence) =
            PresenceFile::open(&local.path, &config.id_bytes(), config.blocks())?;
        let reserve = Reserve::open(&local.path)?;
        // A local disk smaller than what the log may take: writes will keep waiting for
        // room (and the cache gets little). Said once, at open, with what to change.
        let log_may_take =
            options.max_dirty_bytes + 2 * options.segment_bytes + DISK_HEADROOM + Reserve::BYTES;
        if let Some(total) = crate::local::total_bytes(&cache) {
            if total < log_may_take {
                tracing::warn!(
                    volume = %store.location,
                    "The local disk holding {} ({} MiB) is smaller than the write-ahead log may \
                     grow ({} MiB: --max-dirty, two log segments and headroom): writes will wait \
                     for room and may fail with ENOSPC. Lower --max-dirty or use a larger disk.",
                    local.path.display(),
                    total >> 20,
                    log_may_take >> 20
                );
            }
        }

        let mut meta = match (&old_meta, keep_local) {
            (Some(meta), true) => meta.clone(),
            _ => LocalMeta {
                volume_id: config.id.clone(),
                location: store.location.to_string(),
                size: config.size,
                block_size: config.block_size,
                session: String::new(),
                applied_version: latest,
                applied_seq: 0,
                epochs: Vec::new(),
                next_segment: 0,
            },
        };
        let region_blocks = (1u64 << 20) / u64::from(config.block_size);
        let regions = config.blocks().div_ceil(region_blocks) as usize;
        let inner = Arc::new(Inner {
            block_size: u64::from(config.block_size),
            store: store.clone(),
            session,
            session_hex: session_hex.clone(),
            state: Mutex::new(State {
                epoch: 0,
                next_seq: 1,
                segments: BTreeMap::new(),
                active: None,
                next_segment: meta.next_segment,
                dirty: ExtentMap::new(),
                pending: VecDeque::new(),
                pending_bytes: 0,
                oldest_pending: None,
                uploaded_seq: 0,
                synced_seq: 0,
                dir_needs_sync: false,
                map,
                last_full_version,
                presence,
                region_refs: vec![false; regions],
                clock_hand: 0,
                failed: None,
                fenced: None,
                stopping: false,
                upload_now: false,
                room_wanted: false,
                room_made: 0,
                unpunched: Vec::new(),
                unfinished_segment: None,
                cache_short_of_space: false,
                sync_requests: Vec::new(),
                object_waiters: Vec::new(),
            }),
            changed: Condvar::new(),
            cache,
            cache_direct,
            cache_write: Mutex::new(()),
            presence_file,
            reserve,
            persist_lock: Mutex::new(()),
            pins: Arc::new(Pins::default()),
            metrics: Arc::new(VolumeMetrics::default()),
            lease: Mutex::new(Some(lease)),
            fetch_jobs: Mutex::new(None),
            compaction_status: Mutex::new(Default::default()),
            meta: Mutex::new(meta.clone()),
            region_blocks,
            local,
            config: config.clone(),
            options: options.clone(),
        });
        inner.recover(&mut meta, latest, keep_local, &mut report)?;
        failpoint::hit("open.after_replay");

        // A new epoch for this process's records, recorded before any of them exists.
        {
            let mut state = inner.lock();
            let epoch = meta
                .epochs
                .last()
                .map_or(1, |&(e, _)| e + 1)
                .max(state.epoch + 1);
            state.epoch = epoch;
            meta.epochs
                .retain(|&(_, start)| start > meta.applied_seq || start == 0);
            meta.epochs.push((epoch, state.next_seq));
            meta.session = session_hex.clone();
            meta.next_segment = state.next_segment;
        }
        inner.write_meta(|m| *m = meta.clone())?;
        failpoint::hit("open.after_meta");

        // Fence: a manifest version of our own, so that a writer that lost the lease
        // cannot write the next one.
        inner.write_fence_manifest()?;
        failpoint::hit("open.after_fence");
        {
            let state = inner.lock();
            inner
                .metrics
                .manifest_version
                .store(state.map.version, Ordering::Relaxed);
            inner
                .metrics
                .cached_bytes
                .store(state.presence.count() * inner.block_size, Ordering::Relaxed);
            inner.update_wal_gauge(&state);
        }
        let info = TargetInfo {
            size: config.size,
            block_size: config.block_size,
            read_only: false,
            discard: true,
            write_zeroes: true,
            description: format!("volume:{}", store.location),
        };
        let volume = Volume {
            inner: inner.clone(),
            threads: Mutex::new(Vec::new()),
            info,
            closed: std::sync::atomic::AtomicBool::new(false),
        };
        volume.start_threads()?;
        tracing::info!(
            volume = %store.location,
            version = report.manifest_version,
            replayed = report.replayed,
            reapplied = report.reapplied,
            durability = options.durability.name(),
            "Opened the volume."
        );
        Ok((volume, report))
    }

    fn start_threads(&self) -> Result<()> {
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .context(|| "starting a volume thread".to_string())
        };
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let inner = self.inner.clone();
        threads.push(spawn(
            "berth-vol-upload".into(),
            Box::new(move || inner.uploader()),
        )?);
        let inner = self.inner.clone();
        threads.push(spawn(
            "berth-vol-flush".into(),
            Box::new(move || inner.flusher()),
        )?);
        let inner = self.inner.clone();
        threads.push(spawn(
            "berth-vol-janitor".into(),
            Box::new(move || inner.janitor()),
        )?);
        let inner = self.inner.clone();
        threads.push(spawn(
            "berth-vol-lease".into(),
            Box::new(move || inner.lease_keeper()),
        )?);
        let (jobs, receiver) = channel::<FetchJob>();
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..self.inner.options.fetch_threads.max(1) {
            let inner = self.inner.clone();
            let receiver = receiver.clone();
            threads.push(spawn(
                format!("berth-vol-fetch-{i}"),
                Box::new(move || loop {
                    let job = receiver.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((ranges, reply)) = job else { return };
                    let fetched = inner.fetch(&ranges);
                    if let Err(err) = &fetched {
                        // The read fails with it: say why here, where the cause is known.
                        tracing::warn!(
                            volume = %inner.store.location,
                            "A read's fetch failed: {}",
                            err.describe()
                        );
                    }
                    reply.send(fetched);
                }),
            )?);
        }
        *self
            .inner
            .fetch_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(jobs);
        Ok(())
    }

    /// The volume's metrics in the Prometheus text format.
    pub fn render_metrics(&self, name: &str, with_help: bool, out: &mut String) {
        self.inner.metrics.render(name, with_help, out);
    }

    pub fn metrics(&self) -> &VolumeMetrics {
        &self.inner.metrics
    }

    pub fn config(&self) -> &VolumeConfig {
        &self.inner.config
    }

    pub fn location(&self) -> &Location {
        &self.inner.store.location
    }

    /// The manifest version in the bucket now.
    pub fn manifest_version(&self) -> u64 {
        self.inner.lock().map.version
    }

    /// Acknowledged bytes not in the bucket yet.
    pub fn dirty_bytes(&self) -> u64 {
        self.inner.lock().pending_bytes
    }

    /// Waits (at most `timeout`) until compaction has nothing left to do: a look at the
    /// packs made after this call found no step due (or a step found nothing to move).
    /// Fails with the last step's error if compaction stopped on one.
    pub fn wait_compacted(&self, timeout: Duration) -> Result<()> {
        let status = || {
            self.inner
                .compaction_status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        if self.inner.options.compact_below.is_none() {
            return Ok(());
        }
        let since = status().looks;
        let deadline = Instant::now() + timeout;
        loop {
            let now = status();
            if now.looks > since && now.settled {
                return match now.error {
                    Some(error) => Err(VolumeError::Failed(format!("compaction: {error}"))),
                    None => Ok(()),
                };
            }
            if Instant::now() >= deadline {
                return Err(VolumeError::Failed(format!(
                    "compaction did not finish within {} s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks for everything completed so far to be uploaded, and waits (at most
    /// `timeout`) until it is.
    pub fn sync_to_bucket(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut state = self.inner.lock();
        let target = state.next_seq - 1;
        while state.uploaded_seq < target {
            if let Some(err) = state.refuse_writes() {
                if !matches!(err, VolumeError::ShuttingDown) {
                    return Err(err);
                }
            }
            if Instant::now() >= deadline {
                return Err(VolumeError::FlushTimeout(timeout.as_secs()));
            }
            state.upload_now = true;
            self.inner.changed.notify_all();
            state = self.inner.wait_changed(state, Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops serving: uploads what is left (for at most the drain timeout), releases the
    /// lease, stops the threads. Later requests fail. Also done on drop.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let inner = &self.inner;
        let drained = self.sync_to_bucket(inner.options.drain_timeout);
        if let Err(err) = &drained {
            tracing::warn!(volume = %inner.store.location, "closing with writes not in the bucket (they stay in the local log and are uploaded when the volume is opened again): {}", err.describe());
        }
        failpoint::hit("close.after_drain");
        {
            let mut state = inner.lock();
            state.stopping = true;
        }
        inner.changed.notify_all();
        inner.store.stop();
        *inner.fetch_jobs.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let threads: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
        // Everything left, synced and recorded.
        let sync = inner.sync_log(inner.lock());
        let persisted = inner.persist_presence();
        inner.pins.run_ready();
        let fenced = inner.lock().fenced.is_some();
        if drained.is_ok() && !fenced {
            if let Some(lease) = inner.lease.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let patience = Patience::For(Duration::from_secs(10));
                let store = Store::with_backend_of(&inner.store);
                if let Err(err) = lease::release(&store, &lease, patience) {
                    tracing::warn!(
                        "cannot release the lease (it expires by itself): {}",
                        err.describe()
                    );
                }
            }
        }
        sync.and(persisted).and(drained.map(|_| ()).or(Ok(())))
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Err(err) = self.close() {
            tracing::warn!("closing the volume: {}", err.describe());
        }
    }
}

impl BlockTarget for Volume {
    fn info(&self) -> &TargetInfo {
        &self.info
    }

    fn map_read(
        &self,
        _offset: u64,
        _len: u64,
        _out: &mut Vec<Extent>,
    ) -> berth_blockdev::Result<()> {
        // A volume's blocks move (log segments retire, cache blocks are evicted): only
        // pinned reads are safe.
        Err(BlockError::Unsupported("reads without a pin on a volume"))
    }

    fn map_read_pinned(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> berth_blockdev::Result<ReadPin> {
        self.inner
            .map_read(offset, len, out)
            .map_err(VolumeError::into_block)
    }

    fn start_read(&self, offset: u64, len: u64) -> Progress {
        match self.inner.start_read(offset, len) {
            Ok(progress) => progress,
            Err(err) => Progress::Done(Err(err.into_block())),
        }
    }

    fn map_read_or_fetch(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> berth_blockdev::Result<ReadMapping> {
        self.inner
            .map_read_or_fetch(offset, len, out)
            .map_err(VolumeError::into_block)
    }

    fn map_write(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> berth_blockdev::Result<WriteTicket> {
        self.inner
            .map_write(offset, len, out)
            .map_err(VolumeError::into_block)
    }

    fn finish_write(
        &self,
        ticket: WriteTicket,
        written: bool,
        fua: bool,
    ) -> berth_blockdev::Result<()> {
        self.inner
            .finish_write(&ticket, written)
            .map_err(VolumeError::into_block)?;
        if written && fua {
            return self.start_flush().wait();
        }
        Ok(())
    }

    fn start_finish_write(&self, ticket: WriteTicket, written: bool, fua: bool) -> Progress {
        if let Err(err) = self.inner.finish_write(&ticket, written) {
            return Progress::Done(Err(err.into_block()));
        }
        if written && fua {
            return self.start_flush();
        }
        Progress::Done(Ok(()))
    }

    fn flush(&self) -> berth_blockdev::Result<()> {
        self.start_flush().wait()
    }

    fn start_flush(&self) -> Progress {
        match self.inner.start_flush() {
            Ok(progress) => progress,
            Err(err) => Progress::Done(Err(err.into_block())),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> berth_blockdev::Result<()> {
        self.inner
            .zero_range(offset, len)
            .map_err(VolumeError::into_block)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> berth_blockdev::Result<()> {
        self.inner
            .zero_range(offset, len)
            .map_err(VolumeError::into_block)
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let m = &self.inner.metrics;
        vec![
            (
                "berth_block_volume_dirty_bytes",
                "Acknowledged bytes not in the bucket yet.",
                m.dirty_bytes.load(Ordering::Relaxed),
            ),
            (
                "berth_block_volume_manifest_version",
                "The volume's manifest version in the bucket.",
                m.manifest_version.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// Recovery, run once at open before anything is served.
impl Inner {
    fn recover(
        self: &Arc<Self>,
        meta: &mut LocalMeta,
        latest: u64,
        keep_local: bool,
        report: &mut OpenReport,
    ) -> Result<()> {
        let wal_dir = self.local.wal_dir();
        let numbers = wal::list_segments(&wal_dir)?;
        let (bucket_session, bucket_wal_seq) = {
            let state = self.lock();
            (hex(&state.map.session), state.map.wal_seq)
        };
        // The bucket's log position counts only if it is ours (this local state's).
        let uploaded = if keep_local && bucket_session == meta.session {
            bucket_wal_seq.max(meta.applied_seq)
        } else {
            meta.applied_seq
        };
        let mut records: Vec<Record> = Vec::new();
        let mut segments = BTreeMap::new();
        let mut max_number = None;
        for number in numbers {
            max_number = Some(number);
            let files = SegmentFiles::open(&wal_dir, number, self.config.block_size)?;
            let (found, used) = files.scan()?;
            records.extend(found.iter().copied());
            let data_used = found
                .iter()
                .filter(|r| r.kind == RecordKind::Data)
                .map(|r| r.data_block + u64::from(r.blocks))
                .max()
                .unwrap_or(0);
            segments.insert(
                number,
                Segment {
                    files: Arc::new(files),
                    next_block: data_used,
                    next_slot: used,
                    outstanding: 0,
                    sealed: true,
                    max_seq: found.iter().map(|r| r.seq).max().unwrap_or(0),
                    needs_sync: false,
                },
            );
        }
        // The valid prefix: from the first record not applied yet, contiguous, each of
        // the epoch that owns its sequence number, each with intact data.
        records.retain(|r| r.seq > meta.applied_seq && meta.epoch_of(r.seq) == Some(r.epoch));
        records.sort_by_key(|r| r.seq);
        records.dedup_by_key(|r| r.seq);
        let mut valid = Vec::new();
        let mut buf = Vec::new();
        for (expected, record) in (meta.applied_seq + 1..).zip(records) {
            if record.seq != expected {
                break;
            }
            let Some(seg) = segments.get(&record.segment) else {
                break;
            };
            if record.kind == RecordKind::Data {
                let end = record.data_block + u64::from(record.blocks);
                if end > seg.files.data_blocks
                    || record.lba + u64::from(record.blocks) > self.blocks()
                {
                    break;
                }
                let crc = wal::crc_of(
                    &seg.files.data,
                    record.data_block * self.block_size,
                    u64::from(record.blocks) * self.block_size,
                    &mut buf,
                )
                .context(|| format!("reading log segment {}", record.segment))?;
                if crc != record.crc {
                    tracing::warn!(
                        seq = record.seq,
                        "a log record's data does not match its checksum (torn by a power cut): the log ends before it"
                    );
                    break;
                }
            }
            valid.push(record);
        }
        let mut last_seq = valid.last().map_or(meta.applied_seq, |r| r.seq);
        if uploaded > last_seq {
            // The bucket is ahead of the log: records uploaded before they were flushed
            // were lost here (a power cut of the local disk before the batch was
            // applied). The bucket's version is the volume now. The log's records are all
            // in it, some overwritten by the lost ones, and cache blocks those changed
            // may still be marked present: none of the log is replayed and the whole
            // cache is dropped (on disk before anything reads it).
            tracing::warn!(
                volume = %self.store.location,
                local = last_seq,
                bucket = uploaded,
                "the local log ends before what the bucket holds (unflushed writes lost by a power cut): the volume continues from the bucket and drops its local cache"
            );
            report.lost_tail = true;
            valid.clear();
            last_seq = uploaded;
            self.lock().presence.clear_all();
            self.persist_presence()?;
        }
        {
            let mut state = self.lock();
            state.segments = segments;
            state.next_segment = meta.next_segment.max(max_number.map_or(0, |n| n + 1));
            state.next_seq = last_seq + 1;
            state.epoch = valid.last().map_or(0, |r| r.epoch);
            state.uploaded_seq = uploaded.min(last_seq).max(meta.applied_seq);
            state.synced_seq = last_seq;
            for record in &valid {
                let loc = match record.kind {
                    RecordKind::Data => DirtyLoc::Data {
                        segment: record.segment,
                        block: record.data_block,
                        seq: record.seq,
                    },
                    RecordKind::Zero => DirtyLoc::Zero { seq: record.seq },
                };
                state
                    .dirty
                    .insert(record.lba, u64::from(record.blocks), loc);
            }
        }
        // Uploaded but not applied: apply from the log now. The rest waits for upload.
        let (to_apply, to_upload): (Vec<Record>, Vec<Record>) =
            valid.into_iter().partition(|r| r.seq <= uploaded);
        report.reapplied = to_apply.len() as u64;
        report.replayed = to_upload.len() as u64;
        if !to_apply.is_empty() {
            let batch = self.read_batch(&to_apply)?;
            self.apply_batches(&[&batch], latest)?;
        } else {
            let mut state = self.lock();
            state.uploaded_seq = state.uploaded_seq.max(meta.applied_seq);
        }
        {
            let mut state = self.lock();
            for record in to_upload {
                let bytes = match record.kind {
                    RecordKind::Data => u64::from(record.blocks) * self.block_size,
                    RecordKind::Zero => 0,
                };
                state.pending_bytes += bytes.max(1);
                state.pending.push_back(record);
            }
            if !state.pending.is_empty() {
                state.oldest_pending = Some(Instant::now());
            }
            self.metrics
                .dirty_bytes
                .store(state.pending_bytes, Ordering::Relaxed);
        }
        meta.applied_version = latest;
        meta.applied_seq = self.lock().uploaded_seq;
        // Segments holding nothing needed any more go now (nothing is pinned yet).
        self.trim_segments(true);
        Ok(())
    }

    /// Writes an empty delta as the next version, with our session: from now on a
    /// writer that lost the lease cannot write a version.
    fn write_fence_manifest(&self) -> Result<()> {
        let template = self.manifest_template(ManifestKind::Delta);
        let key = self.store.manifest_key(template.version);
        match self.store.create(
            &key,
            &template.encode(),
            Patience::For(self.options.open_timeout),
        )? {
            Created::Written => {}
            Created::Taken(_) => {
                return Err(VolumeError::Fenced(format!(
                    "another writer wrote manifest version {} while this one opened the volume",
                    template.version
                )))
            }
        }
        let mut state = self.lock();
        state.map.version = template.version;
        state.map.session = self.session;
        drop(state);
        self.write_meta(|m| m.applied_version = template.version)?;
        Ok(())
    }

    /// A manifest of `kind` for the next version, with no packs or extents yet.
    pub(crate) fn manifest_template(&self, kind: ManifestKind) -> Manifest {
        let state = self.lock();
        let lease_generation = self
            .lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |l| l.record.generation);
        Manifest {
            kind,
            version: state.map.version + 1,
            base_version: if kind == ManifestKind::Delta {
                state.map.version
            } else {
                0
            },
            volume_id: self.config.id_bytes(),
            session: self.session,
            lease_generation,
            wal_epoch: state.epoch,
            wal_seq: state.uploaded_seq,
            size: self.config.size,
            block_size: self.config.block_size,
            next_pack_id: state.map.next_pack_id,
            written_ms: now_ms(),
            packs: Vec::new(),
            extents: Vec::new(),
        }
    }
}

impl Store {
    /// Another handle on the same bucket and prefix (not stopped).
    pub(crate) fn with_backend_of(other: &Arc<Store>) -> Arc<Store> {
        other.sibling(&other.location.prefix)
    }
}

/// Appends `extent` to `out`, merged with the last one when they continue each other.
fn push_extent(out: &mut Vec<Extent>, extent: Extent) {
    if extent.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        match (&mut last.source, extent.source) {
            (Source::Zero, Source::Zero) => {
                last.len += extent.len;
                return;
            }
            (
                Source::File { fd, offset },
                Source::File {
                    fd: next_fd,
                    offset: next,
                },
            ) if *fd == next_fd && *offset + last.len == next => {
                last.len += extent.len;
                return;
            }
            _ => {}
        }
    }
    out.push(extent);
}
