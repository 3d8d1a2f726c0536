//! The uploader: completed log records, a batch at a time, become a pack and then part of
//! the next manifest version in the bucket (batches whose packs are in by then share one);
//! then each batch is applied locally (cache rewritten, dirty entries dropped) and log
//! segments that hold nothing needed any more retire.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::buffer::LargeBuffer;
use crate::compact::Compaction;
use crate::error::{IoContext, Result, VolumeError};
use crate::extent_map::{Advance, ExtentMap};
use crate::failpoint;
use crate::format::{hex, Manifest, ManifestKind, PackInfo, PackLoc};
use crate::local::{free_bytes, DISK_HEADROOM};
use crate::pack::pack_blocks;
use crate::store::{Created, Patience};
use crate::volume::{DirtyLoc, Inner, State};
use crate::wal::{self, Record, RecordKind};

/// Where a block of a batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchLoc {
    /// Block `at` of the batch's data.
    Data {
        at: u64,
    },
    Zero,
}

impl Advance for BatchLoc {
    fn advance(&self, blocks: u64) -> Self {
        match *self {
            BatchLoc::Data { at } => BatchLoc::Data { at: at + blocks },
            BatchLoc::Zero => BatchLoc::Zero,
        }
    }
}

/// Where a block of a record read back from the log lands (before its place in the
/// batch's data is known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecordLoc {
    /// Block `block` of the data of record `seq`.
    Data {
        seq: u64,
        block: u64,
    },
    Zero,
}

impl Advance for RecordLoc {
    fn advance(&self, blocks: u64) -> Self {
        match *self {
            RecordLoc::Data { seq, block } => RecordLoc::Data {
                seq,
                block: block + blocks,
            },
            RecordLoc::Zero => RecordLoc::Zero,
        }
    }
}

/// Records read back from the log, checked, and folded into the final state of every
/// block they touch.
pub(crate) struct Batch {
    pub last_seq: u64,
    pub epoch: u32,
    pub view: ExtentMap<BatchLoc>,
    /// Every block the batch writes data to, in volume block order, once: the raw bytes
    /// of its pack, and what the local apply writes to the cache file.
    pub data: bytes::Bytes,
}

impl Batch {
    fn bytes_of(&self, at: u64, blocks: u64, block_size: u64) -> &[u8] {
        let start = (at * block_size) as usize;
        let end = ((at + blocks) * block_size) as usize;
        self.data.get(start..end).unwrap_or_default()
    }
}

/// A token bucket for `--upload-rate`.
pub(crate) struct RateLimit {
    rate: Option<u64>,
    allowance: f64,
    last: Instant,
}

impl RateLimit {
    pub(crate) fn wait_for(&mut self, bytes: u64) {
        let Some(rate) = self.rate.filter(|&r| r > 0) else {
            return;
        };
        let now = Instant::now();
        self.allowance = (self.allowance
            + now.duration_since(self.last).as_secs_f64() * rate as f64)
            .min(rate as f64);
        self.last = now;
        self.allowance -= bytes as f64;
        if self.allowance < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.allowance / rate as f64));
        }
    }
}

/// A batch handed to a stream thread, which packs it and PUTs the pack; batches are
/// published (manifest version, local apply) in the order they were taken.
struct InFlight {
    bytes: u64,
    /// Memory its pack holds beyond the batch's data: the batch's size until the pack is
    /// built (a compressed copy may be as large), then the pack's own buffer, or nothing
    /// where the pack is the batch's data itself (no chunk compressed).
    pack_copy: Arc<AtomicU64>,
    packed: Receiver<Result<Packed>>,
    /// The stream's outcome once it has finished (the batch then waits for its turn to
    /// be published and no longer holds a stream).
    outcome: Option<Result<Packed>>,
    thread: Option<JoinHandle<()>>,
}

impl InFlight {
    /// Takes the stream's outcome if it has finished.
    fn poll(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        match self.packed.try_recv() {
            Ok(outcome) => self.outcome = Some(outcome),
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => {
                self.outcome = Some(Err(VolumeError::Wal(
                    "a pack upload thread ended without a result".into(),
                )))
            }
        }
    }
}

/// The uploader's streams: batches taken and not yet published, oldest first (those
/// still packing or uploading hold a stream), the last record handed to a stream, the
/// next pack id to hand out, and the channel every stream signals when it finishes.
struct Streams {
    in_flight: VecDeque<InFlight>,
    taken_seq: u64,
    next_pack_id: u64,
    finished: Receiver<()>,
    finished_sender: SyncSender<()>,
}

impl Streams {
    /// Batches still being packed or uploaded.
    fn busy(&self) -> usize {
        self.in_flight
            .iter()
            .filter(|f| f.outcome.is_none())
            .count()
    }

    /// Bytes of memory held for the batches in flight and `publishing` bytes of batches
    /// out of the queue and not yet published: each batch's data, and while it is packed
    /// and PUT its pack's copy ([`InFlight::pack_copy`]).
    fn held(&self, publishing: u64) -> u64 {
        publishing
            + self
                .in_flight
                .iter()
                .map(|f| {
                    if f.outcome.is_none() {
                        f.bytes + f.pack_copy.load(Ordering::Relaxed)
                    } else {
                        f.bytes
                    }
                })
                .sum::<u64>()
    }

    /// Collects the outcomes of finished streams; answers whether the oldest batch's is in.
    fn front_finished(&mut self) -> bool {
        self.in_flight.iter_mut().for_each(InFlight::poll);
        self.in_flight
            .front()
            .is_some_and(|front| front.outcome.is_some())
    }
}

/// Where a manifest extent's blocks are: a pack's, or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeltaLoc(Option<PackLoc>);

impl Advance for DeltaLoc {
    fn advance(&self, blocks: u64) -> Self {
        DeltaLoc(self.0.map(|loc| loc.advance(blocks)))
    }
}

/// At most this many batches whose packs are in the bucket share one manifest version.
const MAX_BATCHES_PER_MANIFEST: usize = 16;

/// A batch whose pack (if it has data) is in the bucket.
struct Packed {
    batch: Batch,
    started: Instant,
    extents: Vec<(u64, u64, Option<PackLoc>)>,
    pack: Option<PackInfo>,
}

impl Inner {
    /// The uploader thread. Up to `upload_streams` batches are packed and PUT at once,
    /// each on a thread of its own; they are published in the order they were taken, a
    /// manifest version at a time, each version covering the oldest batch and every later
    /// one already in the bucket (a manifest is a delta over the previous one, and the log
    /// is trimmed only behind what is published). Pack ids are handed out
    /// when a batch is taken, upwards from the latest manifest's next pack id, so a pack
    /// in the bucket whose manifest is not yet is numbered at or past every published
    /// manifest's next pack id and garbage collection keeps it.
    pub(crate) fn uploader(self: &Arc<Self>) {
        let limit = Arc::new(Mutex::new(RateLimit {
            rate: self.options.upload_rate,
            allowance: 0.0,
            last: Instant::now(),
        }));
        let streams = self.options.upload_streams.max(1);
        let (finished_sender, finished) = sync_channel(streams * 2 + 1);
        let mut streams_state = Streams {
            in_flight: VecDeque::new(),
            taken_seq: 0,
            next_pack_id: 0,
            finished,
            finished_sender,
        };
        let mut compaction = Compaction::new();
        loop {
            // A compaction step runs alone: no batch is taken until those in flight are
            // published (it moves blocks only where the latest version still has them).
            let compacting = self.compaction_due(&mut compaction);
            let stop = if compacting {
                false
            } else {
                self.top_up(&mut streams_state, streams, 0, &limit, true)
            };
            if streams_state.in_flight.is_empty() {
                if stop {
                    return;
                }
                if compacting {
                    let pack_id = streams_state.next_pack_id.max(self.lock().map.next_pack_id);
                    streams_state.next_pack_id = pack_id + 1;
                    match self.compact(&mut compaction, pack_id, &limit) {
                        None => {}
                        Some(VolumeError::Fenced(holder)) => self.fence(holder),
                        Some(_) => return,
                    }
                }
                continue;
            }
            // Any stream finishing wakes this thread: a finished stream takes the next
            // batch at once, even while an earlier batch is still uploading.
            if !streams_state.front_finished() {
                let _ = streams_state
                    .finished
                    .recv_timeout(Duration::from_millis(100));
                if !streams_state.front_finished() {
                    continue;
                }
            }
            let Some(mut front) = streams_state.in_flight.pop_front() else {
                continue;
            };
            if let Some(thread) = front.thread.take() {
                let _ = thread.join();
            }
            let packed = front.outcome.take().unwrap_or_else(|| {
                Err(VolumeError::Wal(
                    "a pack upload ended without a result".into(),
                ))
            });
            let outcome = packed.and_then(|first| {
                // Later batches already in the bucket are published with this one: one
                // manifest write (a round trip to a bucket busy with the other packs)
                // for all of them.
                let mut ready = vec![first];
                let mut publishing = front.bytes;
                while ready.len() < MAX_BATCHES_PER_MANIFEST
                    && streams_state
                        .in_flight
                        .front()
                        .is_some_and(|next| matches!(next.outcome, Some(Ok(_))))
                {
                    let Some(mut next) = streams_state.in_flight.pop_front() else {
                        break;
                    };
                    if let Some(thread) = next.thread.take() {
                        let _ = thread.join();
                    }
                    if let Some(Ok(packed)) = next.outcome.take() {
                        publishing += next.bytes;
                        ready.push(packed);
                    }
                }
                // The next batches start before these are published: the manifest write
                // and the local apply (a cache write and sync) overlap the uploads.
                if !compacting {
                    self.top_up(&mut streams_state, streams, publishing, &limit, false);
                }
                self.publish(ready)
            });
            let Err(err) = outcome else {
                continue;
            };
            // Whatever follows this batch is not published: wait for its threads, drop
            // their packs (garbage once a later manifest passes their ids) and take its
            // records again if uploading goes on.
            for mut later in streams_state.in_flight.drain(..) {
                if let Some(thread) = later.thread.take() {
                    let _ = thread.join();
                }
            }
            streams_state.taken_seq = self.lock().uploaded_seq;
            match err {
                VolumeError::Fenced(holder) => self.fence(holder),
                VolumeError::StoreGaveUp { .. } if self.store.is_stopped() => return,
                VolumeError::ShuttingDown => return,
                other => {
                    // Reading the log back failed its checksum, or the disk failed:
                    // uploading what is there could spread damage. Stop.
                    self.fail(format!("uploading: {}", other.describe()));
                }
            }
        }
    }

    /// Hands every batch that is due to a stream while fewer than `streams` are busy;
    /// `publishing` bytes (a batch out of the queue, not yet published) count as in flight.
    /// With `may_wait` and nothing in flight or due, waits a little for writes. Answers
    /// whether the volume is stopping.
    fn top_up(
        self: &Arc<Self>,
        streams_state: &mut Streams,
        streams: usize,
        publishing: u64,
        limit: &Arc<Mutex<RateLimit>>,
        may_wait: bool,
    ) -> bool {
        // Finished batches waiting to be published hold memory, not a stream: at most as
        // many again as there are streams may wait.
        while streams_state.busy() < streams && streams_state.in_flight.len() < 2 * streams {
            streams_state.in_flight.iter_mut().for_each(InFlight::poll);
            let held = streams_state.held(publishing);
            self.metrics.upload_memory.store(held, Ordering::Relaxed);
            let Some(max_bytes) = self.batch_room(held) else {
                // Over the memory budget: a stream finishing or a publish frees some.
                return false;
            };
            let in_flight_bytes: u64 =
                publishing + streams_state.in_flight.iter().map(|f| f.bytes).sum::<u64>();
            let mut state = self.lock();
            let Some((records, bytes)) = self.take_batch(
                &mut state,
                streams_state.taken_seq,
                in_flight_bytes,
                max_bytes,
                held == 0,
            ) else {
                let stop = state.stopping;
                if may_wait && streams_state.in_flight.is_empty() && !stop {
                    drop(self.wait_changed(state, Duration::from_millis(100)));
                }
                return stop;
            };
            let pack_id = streams_state.next_pack_id.max(state.map.next_pack_id);
            drop(state);
            streams_state.next_pack_id = pack_id + 1;
            let held = held + 2 * bytes;
            self.metrics.upload_memory.store(held, Ordering::Relaxed);
            self.metrics
                .upload_memory_max
                .fetch_max(held, Ordering::Relaxed);
            streams_state.taken_seq = records.last().map_or(streams_state.taken_seq, |r| r.seq);
            streams_state.in_flight.push_back(self.start_pack(
                records,
                bytes,
                pack_id,
                limit.clone(),
                streams_state.finished_sender.clone(),
            ));
        }
        false
    }

    /// The most data the next batch may hold with `held` bytes already held under the
    /// upload memory budget (it needs twice its size until its pack is built); None
    /// to wait for memory. A batch is not cut below a quarter of a pack while others are
    /// in flight (many small PUTs would cost more than waiting); with nothing held, a
    /// batch goes whatever the budget (it takes at least one record).
    fn batch_room(&self, held: u64) -> Option<u64> {
        let pack_bytes = self.options.pack_bytes.max(self.block_size);
        let room = self.options.upload_memory.saturating_sub(held) / 2;
        if held == 0 {
            return Some(pack_bytes.min(room).max(self.block_size));
        }
        (room >= (pack_bytes / 4).max(self.block_size)).then(|| room.min(pack_bytes))
    }

    /// The next batch of records after `after_seq` (at most `max_bytes`), with its size,
    /// if one is due. A record larger than `max_bytes` goes alone, and only when the
    /// uploader holds nothing else (`alone`); otherwise it waits for memory.
    fn take_batch(
        &self,
        state: &mut State,
        after_seq: u64,
        in_flight_bytes: u64,
        max_bytes: u64,
        alone: bool,
    ) -> Option<(Vec<Record>, u64)> {
        let blocked = state.fenced.is_some() || state.failed.is_some();
        let untaken = state.pending.back().is_some_and(|r| r.seq > after_seq);
        if state.pending.is_empty() {
            state.upload_now = false;
        }
        let due = untaken
            && !blocked
            && (state.pending_bytes.saturating_sub(in_flight_bytes) >= self.options.pack_bytes
                || state.upload_now
                || state.stopping
                || state
                    .oldest_pending
                    .is_some_and(|t| t.elapsed() >= self.options.upload_interval));
        if !due {
            return None;
        }
        let mut taken = Vec::new();
        let mut bytes = 0u64;
        let mut all = true;
        for record in state.pending.iter().filter(|r| r.seq > after_seq) {
            let size = record_bytes(record, self.block_size);
            if bytes + size > max_bytes && !(taken.is_empty() && alone) {
                all = false;
                break;
            }
            bytes += size;
            taken.push(*record);
        }
        if taken.is_empty() {
            return None;
        }
        if all {
            state.upload_now = false;
        }
        Some((taken, bytes))
    }

    /// Starts packing and uploading a batch on a thread of its own (inline if no thread
    /// can be started).
    fn start_pack(
        self: &Arc<Self>,
        records: Vec<Record>,
        bytes: u64,
        pack_id: u64,
        limit: Arc<Mutex<RateLimit>>,
        finished: SyncSender<()>,
    ) -> InFlight {
        let (send, packed) = sync_channel(1);
        let pack_copy = Arc::new(AtomicU64::new(bytes));
        // Once the pack is built the memory it does not need (all of the reservation for a
        // pack that is the batch's data itself) may go to the next batch: wake the
        // uploader to take it.
        let built = {
            let (pack_copy, finished) = (pack_copy.clone(), finished.clone());
            move |copy: u64| {
                pack_copy.store(copy, Ordering::Relaxed);
                if copy < bytes {
                    let _ = finished.try_send(());
                }
            }
        };
        let spawned = {
            let (inner, records, limit, send, finished, built) = (
                self.clone(),
                records.clone(),
                limit.clone(),
                send.clone(),
                finished.clone(),
                built.clone(),
            );
            std::thread::Builder::new()
                .name("berth-vol-pack".into())
                .spawn(move || {
                    let _ = send.send(inner.pack_and_put(&records, pack_id, &limit, &built));
                    let _ = finished.try_send(());
                })
        };
        let thread = match spawned {
            Ok(thread) => Some(thread),
            Err(err) => {
                tracing::warn!("cannot start a pack upload thread, uploading inline: {err}");
                let _ = send.send(self.pack_and_put(&records, pack_id, &limit, &built));
                let _ = finished.try_send(());
                None
            }
        };
        InFlight {
            bytes,
            pack_copy,
            packed,
            outcome: None,
            thread,
        }
    }

    /// Reads `records` back from the log (checking each against its checksum) and folds
    /// them into a batch. The blocks that stay (a later record of the batch may overwrite
    /// an earlier one) are laid out in volume block order in one buffer, and a record whose
    /// blocks all stay, the usual case, is read straight into its place there: no copy
    /// between the log and the pack. A record wholly overwritten within the batch is not
    /// read at all.
    pub(crate) fn read_batch(&self, records: &[Record]) -> Result<Batch> {
        let segments: HashMap<u32, Arc<wal::SegmentFiles>> = {
            let state = self.lock();
            state
                .segments
                .iter()
                .map(|(&n, s)| (n, s.files.clone()))
                .collect()
        };
        let mut latest = ExtentMap::new();
        for record in records {
            let loc = match record.kind {
                RecordKind::Zero => RecordLoc::Zero,
                RecordKind::Data => RecordLoc::Data {
                    seq: record.seq,
                    block: 0,
                },
            };
            latest.insert(record.lba, u64::from(record.blocks), loc);
        }
        // Each record's surviving pieces: (block in the record, blocks, block in the data).
        let mut view = ExtentMap::new();
        let mut pieces: HashMap<u64, Vec<(u64, u64, u64)>> = HashMap::new();
        let mut data_blocks = 0u64;
        for (lba, len, loc) in latest.iter() {
            match loc {
                RecordLoc::Zero => view.insert(lba, len, BatchLoc::Zero),
                RecordLoc::Data { seq, block } => {
                    view.insert(lba, len, BatchLoc::Data { at: data_blocks });
                    pieces
                        .entry(seq)
                        .or_default()
                        .push((block, len, data_blocks));
                    data_blocks += len;
                }
            }
        }
        let bs = self.block_size;
        let mut buffer = LargeBuffer::zeroed((data_blocks * bs) as usize)?;
        let data = buffer.as_mut_slice();
        let mut scratch = Vec::new();
        for record in records.iter().filter(|r| r.kind == RecordKind::Data) {
            let Some(kept) = pieces.get(&record.seq) else {
                continue;
            };
            let blocks = u64::from(record.blocks);
            let files = segments.get(&record.segment).ok_or_else(|| {
                VolumeError::Wal(format!(
                    "log segment {} of record {} is gone",
                    record.segment, record.seq
                ))
            })?;
            // Whole and in order: its pieces follow each other in the record and in the data.
            let first_at = kept.first().map_or(0, |p| p.2);
            let whole = kept.iter().try_fold(0u64, |next, &(block, len, at)| {
                (block == next && at == first_at + next).then_some(next + len)
            }) == Some(blocks);
            let range = |at: u64, len: u64| (at * bs) as usize..((at + len) * bs) as usize;
            let bytes: &mut [u8] = if whole {
                &mut data[range(first_at, blocks)]
            } else {
                scratch.clear();
                scratch.resize((blocks * bs) as usize, 0);
                &mut scratch
            };
            files
                .data
                .read_exact_at(bytes, record.data_block * bs)
                .context(|| format!("reading log segment {}", record.segment))?;
            if crc32c::crc32c(bytes) != record.crc {
                return Err(VolumeError::Wal(format!(
                    "the data of record {} (blocks {}..{}) in segment {} no longer matches its checksum: the local disk corrupted it",
                    record.seq,
                    record.lba,
                    record.lba + blocks,
                    record.segment
                )));
            }
            if !whole {
                for &(block, len, at) in kept {
                    data[range(at, len)].copy_from_slice(&scratch[range(block, len)]);
                }
            }
        }
        Ok(Batch {
            last_seq: records.last().map_or(0, |r| r.seq),
            epoch: records.last().map_or(0, |r| r.epoch),
            view,
            data: buffer.freeze(),
        })
    }

    /// Reads a batch back from the log, builds its pack (numbered `pack_id`) and PUTs it.
    fn pack_and_put(
        &self,
        records: &[Record],
        pack_id: u64,
        limit: &Mutex<RateLimit>,
        built: &dyn Fn(u64),
    ) -> Result<Packed> {
        let busy = self
            .metrics
            .uploads_in_flight
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        self.metrics
            .uploads_in_flight_max
            .fetch_max(busy, Ordering::Relaxed);
        let packed = self.build_and_put(records, pack_id, limit, built);
        self.metrics
            .uploads_in_flight
            .fetch_sub(1, Ordering::Relaxed);
        packed
    }

    fn build_and_put(
        &self,
        records: &[Record],
        pack_id: u64,
        limit: &Mutex<RateLimit>,
        built: &dyn Fn(u64),
    ) -> Result<Packed> {
        let started = Instant::now();
        let batch = self.read_batch(records)?;
        failpoint::hit("upload.after_pack_read");
        let extents: Vec<_> = batch
            .view
            .iter()
            .map(|(lba, len, loc)| match loc {
                BatchLoc::Zero => (lba, len, None),
                BatchLoc::Data { at } => (
                    lba,
                    len,
                    Some(PackLoc {
                        pack: pack_id,
                        block: at,
                    }),
                ),
            })
            .collect();
        let mut pack = None;
        if !batch.data.is_empty() {
            // The batch's data is the pack's raw bytes, shared, not copied.
            pack = Some(self.put_pack(
                batch.data.clone(),
                pack_id,
                limit,
                built,
                "upload.after_pack_put",
            )?);
        }
        Ok(Packed {
            batch,
            started,
            extents,
            pack,
        })
    }

    /// Builds pack `pack_id` of `raw` (whole blocks) and PUTs it within the upload rate;
    /// `built` is told, before the PUT, how many bytes the pack holds beyond `raw` (0 when
    /// no chunk compressed and the pack is `raw` itself); `crash_point` is passed once it
    /// is in the bucket.
    pub(crate) fn put_pack(
        &self,
        raw: bytes::Bytes,
        pack_id: u64,
        limit: &Mutex<RateLimit>,
        built: &dyn Fn(u64),
        crash_point: &'static str,
    ) -> Result<PackInfo> {
        let key = self
            .store
            .key(&format!("packs/{pack_id:016x}-{}", &self.session_hex[..12]));
        let raw_len = raw.len() as u64;
        let (object, info) = pack_blocks(
            raw,
            self.config.block_size,
            pack_id,
            key.clone(),
            self.config.chunk_blocks(),
            self.config.compression,
        )?;
        let object_len = object.len() as u64;
        built(if info.chunks.iter().any(|chunk| chunk.compressed) {
            object_len
        } else {
            0
        });
        limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wait_for(object_len);
        self.store.put(&key, object, Patience::Forever)?;
        failpoint::hit(crash_point);
        self.metrics.uploads.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .upload_bytes
            .fetch_add(object_len, Ordering::Relaxed);
        self.metrics
            .upload_raw_bytes
            .fetch_add(raw_len, Ordering::Relaxed);
        Ok(info)
    }

    /// Publishes packed batches, in the order they were taken: the next manifest version
    /// (one for all of them), then their local apply.
    fn publish(self: &Arc<Self>, ready: Vec<Packed>) -> Result<()> {
        let mut batches = Vec::with_capacity(ready.len());
        // A manifest's extents are in block order and do not overlap: the batches' extents
        // are laid over each other in the order the batches were taken.
        let mut merged: ExtentMap<DeltaLoc> = ExtentMap::new();
        let mut packs = Vec::new();
        for packed in ready {
            for (start, len, loc) in packed.extents {
                merged.insert(start, len, DeltaLoc(loc));
            }
            packs.extend(packed.pack);
            batches.push((packed.batch, packed.started));
        }
        let extents: Vec<_> = merged
            .iter()
            .map(|(start, len, DeltaLoc(loc))| (start, len, loc))
            .collect();
        let Some((last, _)) = batches.last() else {
            return Ok(());
        };
        let (epoch, last_seq) = (last.epoch, last.last_seq);
        let mut delta = self.manifest_template(ManifestKind::Delta);
        delta.wal_epoch = epoch;
        delta.wal_seq = last_seq;
        delta.extents = extents;
        delta.packs = packs;
        // However long this takes, garbage collection keeps the packs: their ids are at or
        // past the next pack id of every manifest in the bucket until this one is.
        let version = self.write_version(delta, "upload.after_manifest_put", |state| {
            state.uploaded_seq = state.uploaded_seq.max(last_seq);
        })?;
        self.check_object_waiters();
        for (_, started) in &batches {
            self.metrics.upload_latency.observe(started.elapsed());
        }
        let published: Vec<&Batch> = batches.iter().map(|(batch, _)| batch).collect();
        self.apply_batches(&published, version)
    }

    /// Writes `delta` (a [`Inner::manifest_template`] with its packs, extents and log
    /// position) as the next manifest version, a full one when one is due, and applies it
    /// to the block map; `applied` runs under the same lock. Only the uploader thread
    /// changes the map, so the version it was made over is still the latest here. Answers
    /// the version written; `crash_point` is passed once it is in the bucket.
    pub(crate) fn write_version(
        &self,
        mut delta: Manifest,
        crash_point: &'static str,
        applied: impl FnOnce(&mut State),
    ) -> Result<u64> {
        let (kind, version) = {
            let state = self.lock();
            let version = state.map.version + 1;
            let kind = if version.saturating_sub(state.last_full_version) >= self.options.full_every
            {
                ManifestKind::Full
            } else {
                ManifestKind::Delta
            };
            (kind, version)
        };
        delta.version = version;
        delta.base_version = version - 1;
        for info in &delta.packs {
            delta.next_pack_id = delta.next_pack_id.max(info.id + 1);
        }
        let manifest = match kind {
            ManifestKind::Delta => delta,
            ManifestKind::Full => {
                let mut full_map = self.lock().map.clone();
                full_map.apply("(the next version)", &delta)?;
                full_map.to_full(&delta)
            }
        };
        let manifest_key = self.store.manifest_key(version);
        let created = self
            .store
            .create(&manifest_key, &manifest.encode(), Patience::Forever)?;
        if let Created::Taken(theirs) = created {
            let who = Manifest::decode(&manifest_key, &theirs)
                .map(|m| format!("session {}", hex(&m.session)))
                .unwrap_or_else(|_| "an unreadable object".into());
            return Err(VolumeError::Fenced(format!(
                "manifest version {version} was written by {who}"
            )));
        }
        failpoint::hit(crash_point);
        self.metrics
            .manifests_written
            .fetch_add(1, Ordering::Relaxed);
        {
            let mut state = self.lock();
            state.map.apply(&manifest_key, &manifest)?;
            if kind == ManifestKind::Full {
                state.last_full_version = version;
            }
            applied(&mut state);
            self.metrics
                .manifest_version
                .store(version, Ordering::Relaxed);
        }
        self.changed.notify_all();
        Ok(version)
    }

    /// Makes the local copy follow batches that are in the bucket (one manifest version's,
    /// in the order they were taken): the cache blocks they change are invalidated on disk,
    /// rewritten, synced and marked present again; their dirty entries go; log segments
    /// with nothing left to upload retire. The batches of one version share each step, so
    /// the syncs are paid once for all of them.
    pub(crate) fn apply_batches(self: &Arc<Self>, batches: &[&Batch], version: u64) -> Result<()> {
        let Some(last_seq) = batches.iter().map(|batch| batch.last_seq).max() else {
            return Ok(());
        };
        // Per batch, in order: a later batch's blocks overwrite an earlier one's.
        let ranges: Vec<Vec<(u64, u64, BatchLoc)>> = batches
            .iter()
            .map(|batch| batch.view.iter().collect())
            .collect();
        let all_ranges = || ranges.iter().flatten();
        {
            let mut state = self.lock();
            for &(lba, len, _) in all_ranges() {
                state.presence.set_range(lba, len, false);
            }
            state.uploaded_seq = state.uploaded_seq.max(last_seq);
        }
        self.persist_presence()?;
        failpoint::hit("apply.after_clear");
        // Reads that mapped these cache blocks before they were invalidated finish first.
        self.pins.wait_older();
        // With the local disk full, data ranges stay out of the cache (they are in the
        // bucket now; a read fetches them) rather than stop the volume.
        let mut uncached: Vec<(u64, u64)> = Vec::new();
        {
            let _writing = self.cache_write.lock().unwrap_or_else(|e| e.into_inner());
            // What the cache may still take without eating into the disk's headroom
            // (counted as if every write needed new space).
            let mut room = free_bytes(&self.cache).map(|free| free.saturating_sub(DISK_HEADROOM));
            for (batch, batch_ranges) in batches.iter().zip(&ranges) {
                for &(lba, len, loc) in batch_ranges {
                    let offset = lba * self.block_size;
                    match loc {
                        BatchLoc::Data { at } => {
                            let bytes = batch.bytes_of(at, len, self.block_size);
                            let fits = room.is_none_or(|room| room >= bytes.len() as u64);
                            let written = fits
                                && match self
                                    .write_cache(bytes, offset)
                                    .context(|| "writing the cache file".to_string())
                                {
                                    Ok(()) => true,
                                    Err(err) if err.is_no_space() => false,
                                    Err(err) => return Err(err),
                                };
                            if written {
                                room = room.map(|room| room - bytes.len() as u64);
                            } else {
                                // Left out: older cached blocks of these addresses go too
                                // (their presence is clear), giving their space back.
                                punch(&self.cache, offset, len * self.block_size)
                                    .context(|| "punching the cache file".to_string())?;
                                uncached.push((lba, len));
                            }
                        }
                        BatchLoc::Zero => punch(&self.cache, offset, len * self.block_size)
                            .context(|| "punching the cache file".to_string())?,
                    }
                }
            }
            failpoint::hit("apply.after_cache_write");
            match self
                .cache
                .sync_data()
                .context(|| "syncing the cache file".to_string())
            {
                Ok(()) => {}
                Err(err) if err.is_no_space() => {
                    // Which writes did not make it is unknown: none of them is trusted.
                    uncached = all_ranges()
                        .filter(|r| matches!(r.2, BatchLoc::Data { .. }))
                        .map(|&(lba, len, _)| (lba, len))
                        .collect();
                }
                Err(err) => return Err(err),
            }
            failpoint::hit("apply.after_cache_sync");
            let mut state = self.lock();
            for &(lba, len, loc) in all_ranges() {
                if let BatchLoc::Data { .. } = loc {
                    for piece in state.map.map.pieces(lba, len) {
                        if piece.value.is_some() {
                            state.presence.set_range(piece.start, piece.len, true);
                        }
                    }
                }
            }
            for &(lba, len) in &uncached {
                state.presence.set_range(lba, len, false);
            }
            self.metrics
                .cached_bytes
                .store(state.presence.count() * self.block_size, Ordering::Relaxed);
            self.note_cache_space(&mut state, &uncached);
        }
        self.persist_presence()?;
        failpoint::hit("apply.after_set");
        {
            let mut state = self.lock();
            for (batch, batch_ranges) in batches.iter().zip(&ranges) {
                let last = batch.last_seq;
                for &(lba, len, _) in batch_ranges {
                    state
                        .dirty
                        .remove_where(lba, len, |loc: &DirtyLoc| loc.seq() <= last);
                }
            }
            while state.pending.front().is_some_and(|r| r.seq <= last_seq) {
                if let Some(record) = state.pending.pop_front() {
                    state.pending_bytes = state
                        .pending_bytes
                        .saturating_sub(record_bytes(&record, self.block_size));
                }
            }
            state.oldest_pending = if state.pending.is_empty() {
                None
            } else {
                Some(state.oldest_pending.unwrap_or_else(Instant::now))
            };
            self.metrics
                .dirty_bytes
                .store(state.pending_bytes, Ordering::Relaxed);
        }
        self.changed.notify_all();
        let applied = |m: &mut crate::local::LocalMeta| {
            m.applied_version = m.applied_version.max(version);
            m.applied_seq = m.applied_seq.max(last_seq);
        };
        if let Err(err) = self.write_meta(applied) {
            if !err.is_no_space() {
                return Err(err);
            }
            // The meta file is rewritten whole: with the disk full, once eviction freed
            // some of the cache.
            self.wait_for_room(Duration::from_secs(5));
            self.write_meta(applied)?;
        }
        failpoint::hit("apply.after_meta");
        self.trim_segments(false);
        Ok(())
    }

    /// Writes a published batch's blocks to the cache file, directly where it can.
    fn write_cache(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        let direct = match &self.cache_direct {
            Some(direct) => direct.write_all_at(&self.cache, bytes, offset)?,
            None => {
                self.cache.write_all_at(bytes, offset)?;
                false
            }
        };
        if direct {
            self.metrics
                .cache_direct_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Retires the log segments that hold nothing not yet applied: they leave the
    /// segment table now and their files go once no read uses them.
    pub(crate) fn trim_segments(self: &Arc<Self>, now: bool) {
        let applied = self
            .meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .applied_seq;
        let retired: Vec<Arc<wal::SegmentFiles>> = {
            let mut state = self.lock();
            let active = state.active;
            let doomed: Vec<u32> = state
                .segments
                .iter()
                .filter(|(&n, s)| Some(n) != active && s.outstanding == 0 && s.max_seq <= applied)
                .map(|(&n, _)| n)
                .collect();
            let retired = doomed
                .iter()
                .filter_map(|n| state.segments.remove(n))
                .map(|s| s.files)
                .collect();
            self.update_wal_gauge(&state);
            retired
        };
        if retired.is_empty() {
            return;
        }
        let dir = self.local.wal_dir();
        let metrics = self.metrics.clone();
        let remove = move || {
            for files in retired {
                let number = files.number;
                drop(files);
                failpoint::hit("trim.before_unlink");
                let (data, index) = wal::segment_paths(&dir, number);
                // The index first: a data file without its index holds no records.
                let _ = std::fs::remove_file(index);
                let _ = std::fs::remove_file(data);
                metrics.segments_retired.fetch_add(1, Ordering::Relaxed);
                failpoint::hit("trim.after_unlink");
            }
            let _ = crate::local::sync_dir(&dir);
        };
        if now {
            remove();
        } else {
            self.pins.defer(remove);
        }
    }

    /// Seals the active segment when everything in it is applied and nothing is in
    /// flight, so that it can retire while the volume is idle.
    pub(crate) fn seal_idle(self: &Arc<Self>) {
        let applied = self
            .meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .applied_seq;
        {
            let mut state = self.lock();
            let Some(number) = state.active else { return };
            let idle = state.pending.is_empty()
                && state
                    .segments
                    .get(&number)
                    .is_some_and(|s| s.outstanding == 0 && s.max_seq <= applied);
            if !idle {
                return;
            }
            if let Some(seg) = state.segments.get_mut(&number) {
                seg.sealed = true;
            }
            state.active = None;
        }
        self.trim_segments(false);
    }
}

fn record_bytes(record: &Record, block_size: u64) -> u64 {
    match record.kind {
        RecordKind::Data => u64::from(record.blocks) * block_size,
        RecordKind::Zero => 1,
    }
}

/// Frees `[offset, offset + len)` of `file` (reads back as zeros).
pub(crate) fn punch(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(file),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // No holes here: write zeros.
        let zeros = vec![0u8; (len as usize).min(1 << 20)];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], offset + at)?;
            at += n as u64;
        }
        return Ok(());
    }
    Err(err)
}
