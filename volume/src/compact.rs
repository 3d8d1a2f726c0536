//! Compaction. A pack is deleted only once no volume block uses it, so overwrites that
//! leave a few live blocks in many packs keep those packs, dead blocks and all, in the
//! bucket. The uploader rewrites the live blocks of the sparsest packs of this volume
//! into one new pack and publishes a version that moves only the blocks still mapped
//! where they were read from (writes published meanwhile win); the old packs then fall
//! out of use and garbage collection deletes them.
//!
//! The blocks are read from the bucket and checked against their digests, not taken from
//! the local cache: damage on the local disk never spreads into a new pack. Packs a
//! snapshot holds are left alone (rewriting them would free nothing), as are a clone's
//! packs under its source's prefix.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::buffer::LargeBuffer;
use crate::error::{Result, VolumeError};
use crate::extent_map::Advance;
use crate::fetch::chunk_runs;
use crate::format::{Manifest, ManifestKind, PackInfo, PackLoc};
use crate::mapping::BlockMap;
use crate::store::Patience;
use crate::upload::RateLimit;
use crate::volume::Inner;

/// After a step that failed, the next one waits this long.
const BACKOFF: Duration = Duration::from_secs(60);

/// The snapshots' pack list is read again before a step, and trusted for deciding whether
/// one is due only this long (a deleted snapshot frees its packs for compaction).
const SNAPSHOTS_TRUSTED_FOR: Duration = Duration::from_secs(600);

/// How long a step waits for the bucket to list and read snapshots.
const SNAPSHOT_PATIENCE: Duration = Duration::from_secs(30);

/// The uploader's compaction state.
pub(crate) struct Compaction {
    /// Keys of the packs any snapshot references, per snapshot object (snapshots never
    /// change, so each is read once), and when the list was last read.
    snapshot_packs: HashMap<String, Vec<String>>,
    held: HashSet<String>,
    read_at: Option<Instant>,
    /// Packs a step found damaged (a chunk failing its digest): left as they are, so that
    /// reads of their blocks keep failing rather than a new pack carrying wrong data, and
    /// the other sparse packs still get compacted.
    damaged: HashSet<String>,
    /// No step starts before this.
    not_before: Instant,
    checked_at: Option<Instant>,
    /// A step is due: the uploader takes no batch until it has run.
    due: bool,
}

impl Compaction {
    pub(crate) fn new() -> Self {
        Self {
            snapshot_packs: HashMap::new(),
            held: HashSet::new(),
            read_at: None,
            damaged: HashSet::new(),
            not_before: Instant::now(),
            checked_at: None,
            due: false,
        }
    }
}

/// What compaction last found (see [`crate::Volume::wait_compacted`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct CompactionStatus {
    /// Looks at the packs so far (a step that found nothing to move, or failed, counts).
    pub looks: u64,
    /// The last look found no step due.
    pub settled: bool,
    /// Why the last step failed, if it did (damaged packs are not failures).
    pub error: Option<String>,
}

/// A pack worth rewriting: its id, live blocks and blocks.
#[derive(Debug, Clone, Copy)]
struct Sparse {
    id: u64,
    live: u64,
    raw: u64,
}

/// A run of volume blocks to move: `blocks` blocks from `lba` on, now at `from`, going to
/// block `at` of the new pack.
#[derive(Debug, Clone, Copy)]
struct Move {
    lba: u64,
    blocks: u64,
    from: PackLoc,
    at: u64,
}

/// What one step did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Compacted {
    pub packs: u64,
    pub bytes: u64,
    pub version: u64,
}

impl Inner {
    /// The sparse packs of `map` (see [`crate::VolumeOptions::compact_below`]), sparsest
    /// first, leaving out packs in `skip` and outside this volume's prefix; and the
    /// blocks no longer in use in all packs of the map (for the gauge).
    fn sparse_packs(
        &self,
        map: &BlockMap,
        below: f64,
        skip: &[&HashSet<String>],
    ) -> (Vec<Sparse>, u64) {
        let own = self.store.key("packs/");
        let mut sparse = Vec::new();
        let mut dead = 0;
        for (&id, pack) in &map.packs {
            let live = map.live.get(&id).copied().unwrap_or(0);
            let raw = pack.raw_blocks.max(1);
            dead += raw.saturating_sub(live);
            if (live as f64) < below * raw as f64
                && pack.key.starts_with(&own)
                && !skip.iter().any(|keys| keys.contains(&pack.key))
            {
                sparse.push(Sparse { id, live, raw });
            }
        }
        // live / raw ascending, without floating point.
        sparse.sort_by(|a, b| {
            (u128::from(a.live) * u128::from(b.raw)).cmp(&(u128::from(b.live) * u128::from(a.raw)))
        });
        (sparse, dead)
    }

    /// Whether sparse packs hold enough dead blocks for a step now; keeps the dead-bytes
    /// gauge. The uploader asks every round; the packs are looked at every
    /// [`crate::VolumeOptions::compact_check_interval`] (a pass over the packs in use, under
    /// the volume's lock: not on every round of a busy uploader).
    pub(crate) fn compaction_due(&self, compaction: &mut Compaction) -> bool {
        let Some(below) = self.options.compact_below else {
            return false;
        };
        let now = Instant::now();
        if compaction.due {
            // Still due unless the volume stopped taking writes meanwhile.
            let refused = self.lock().refuse_writes();
            compaction.due = refused.is_none();
            if let Some(err) = refused {
                self.note_look(true, Some(err.to_string()));
            }
            return compaction.due;
        }
        if now < compaction.not_before
            || compaction
                .checked_at
                .is_some_and(|at| now.duration_since(at) < self.options.compact_check_interval)
        {
            return false;
        }
        compaction.checked_at = Some(now);
        let state = self.lock();
        let unknown = HashSet::new();
        let held = match compaction.read_at {
            Some(at) if at.elapsed() < SNAPSHOTS_TRUSTED_FOR => &compaction.held,
            _ => &unknown,
        };
        let (sparse, dead) = self.sparse_packs(&state.map, below, &[held, &compaction.damaged]);
        self.metrics
            .pack_dead_bytes
            .store(dead * self.block_size, Ordering::Relaxed);
        let refused = state.refuse_writes();
        drop(state);
        if let Some(err) = refused {
            self.note_look(true, Some(err.to_string()));
            return false;
        }
        let sparse_dead: u64 = sparse.iter().map(|s| s.raw - s.live).sum();
        compaction.due =
            sparse_dead * self.block_size >= self.options.compact_after_dead_bytes.max(1);
        self.note_look(!compaction.due, None);
        compaction.due
    }

    fn note_look(&self, settled: bool, error: Option<String>) {
        let mut status = self
            .compaction_status
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        status.looks += 1;
        status.settled = settled;
        status.error = error;
    }

    /// Runs a compaction step with new pack `pack_id`. Errors the uploader must act on
    /// (fenced, shutting down) are returned; any other failure is logged and the next step
    /// waits (the old packs stay, nothing is lost).
    pub(crate) fn compact(
        self: &Arc<Self>,
        compaction: &mut Compaction,
        pack_id: u64,
        limit: &Mutex<RateLimit>,
    ) -> Option<VolumeError> {
        let started = Instant::now();
        compaction.due = false;
        match self.compact_step(compaction, pack_id, limit) {
            Ok(Some(done)) => {
                tracing::debug!(
                    volume = %self.store.location,
                    packs = done.packs,
                    bytes = done.bytes,
                    version = done.version,
                    "Compacted sparse packs."
                );
                // Uploads get as much time again before the next step: a backlog of
                // sparse packs never holds writes back for long.
                compaction.not_before = Instant::now() + started.elapsed();
                // A backlog goes on without waiting for the next once-a-second look.
                compaction.checked_at = None;
                None
            }
            Ok(None) => {
                // Nothing could move because every block still live in the sparse packs
                // has a write pending (as the packs a step just emptied keep, until those
                // writes are uploaded), or was overwritten during the step. The next
                // upload changes that: look again after it, not a minute later, or
                // compaction would stall under the writes that make packs sparse.
                self.note_look(true, None);
                compaction.not_before = Instant::now()
                    + self
                        .options
                        .upload_interval
                        .max(self.options.compact_check_interval);
                None
            }
            Err(err @ (VolumeError::Fenced(_) | VolumeError::ShuttingDown)) => Some(err),
            Err(err @ VolumeError::StoreGaveUp { .. }) if self.store.is_stopped() => Some(err),
            Err(err)
                if matches!(&err, VolumeError::Corrupt { object, .. }
                    if compaction.damaged.contains(object)) =>
            {
                // Reads of its blocks fail the same way (EIO, never wrong data); the other
                // sparse packs go on being compacted.
                tracing::error!(
                    volume = %self.store.location,
                    "compaction leaves a damaged pack as it is: {}",
                    err.describe()
                );
                None
            }
            Err(err) => {
                tracing::warn!(
                    volume = %self.store.location,
                    "compacting sparse packs (tried again in {} s): {}",
                    BACKOFF.as_secs(),
                    err.describe()
                );
                self.note_look(true, Some(err.describe()));
                compaction.not_before = Instant::now() + BACKOFF;
                None
            }
        }
    }

    /// Reads which packs the snapshots hold (each snapshot object once).
    fn read_snapshot_packs(&self, compaction: &mut Compaction) -> Result<()> {
        let patience = Patience::For(SNAPSHOT_PATIENCE);
        let listed = self.store.list("snapshots", patience)?;
        let names: HashSet<&str> = listed.iter().map(|o| o.name.as_str()).collect();
        compaction
            .snapshot_packs
            .retain(|name, _| names.contains(name.as_str()));
        for object in &listed {
            if compaction.snapshot_packs.contains_key(&object.name) {
                continue;
            }
            // Deleted since it was listed: it holds nothing.
            let Some((data, _)) = self.store.get(&object.name, patience)? else {
                continue;
            };
            let manifest = Manifest::decode(&object.name, &data)?;
            let keys = manifest.packs.into_iter().map(|p| p.key).collect();
            compaction.snapshot_packs.insert(object.name.clone(), keys);
        }
        compaction.held = compaction
            .snapshot_packs
            .values()
            .flatten()
            .cloned()
            .collect();
        compaction.read_at = Some(Instant::now());
        Ok(())
    }

    /// One step: the sparsest packs whose live blocks fit in one pack are rewritten into
    /// pack `pack_id` and a version moving their blocks is written. None when there was
    /// nothing to move.
    fn compact_step(
        self: &Arc<Self>,
        compaction: &mut Compaction,
        pack_id: u64,
        limit: &Mutex<RateLimit>,
    ) -> Result<Option<Compacted>> {
        let Some(below) = self.options.compact_below else {
            return Ok(None);
        };
        self.read_snapshot_packs(compaction)?;
        let bs = self.block_size;
        // One pack's worth, within the uploader's memory budget (the step holds the live
        // blocks and, while packing, a compressed copy).
        let room = (self.options.pack_bytes.min(self.options.upload_memory / 2) / bs).max(1);
        // What moves, from the state now. Blocks with a write not yet uploaded are left:
        // that upload moves them anyway.
        let (moves, packs) = {
            let state = self.lock();
            let (sparse, _) =
                self.sparse_packs(&state.map, below, &[&compaction.held, &compaction.damaged]);
            let mut chosen: HashMap<u64, Arc<PackInfo>> = HashMap::new();
            let mut live = 0;
            for pack in sparse {
                if !chosen.is_empty() && live + pack.live > room {
                    break;
                }
                live += pack.live;
                if let Some(info) = state.map.packs.get(&pack.id) {
                    chosen.insert(pack.id, info.clone());
                }
            }
            let mut moves = Vec::new();
            let mut at = 0;
            for (lba, len, loc) in state.map.map.iter() {
                if !chosen.contains_key(&loc.pack) {
                    continue;
                }
                state.dirty.for_each_piece(lba, len, |piece| {
                    if piece.value.is_none() {
                        moves.push(Move {
                            lba: piece.start,
                            blocks: piece.len,
                            from: loc.advance(piece.start - lba),
                            at,
                        });
                        at += piece.len;
                    }
                });
            }
            (moves, chosen)
        };
        let blocks: u64 = moves.iter().map(|m| m.blocks).sum();
        if blocks == 0 {
            return Ok(None);
        }

        // The live blocks, in volume block order, fetched a pack at a time.
        let mut buffer = LargeBuffer::zeroed((blocks * bs) as usize)?;
        let data = buffer.as_mut_slice();
        for (&id, pack) in &packs {
            let mine: Vec<&Move> = moves.iter().filter(|m| m.from.pack == id).collect();
            let chunks = mine
                .iter()
                .flat_map(|m| pack.chunks_of(m.from.block, m.blocks));
            let per = u64::from(pack.chunk_blocks.max(1));
            for (first, count) in chunk_runs(chunks) {
                let (raw, stored) = match self.read_chunks(pack, first, count) {
                    Ok(read) => read,
                    Err(err @ VolumeError::Corrupt { .. }) => {
                        compaction.damaged.insert(pack.key.clone());
                        return Err(err);
                    }
                    Err(err) => return Err(err),
                };
                self.metrics
                    .compact_fetch_bytes
                    .fetch_add(stored, Ordering::Relaxed);
                let run = first as u64 * per..(first + count) as u64 * per;
                for m in &mine {
                    let from = m.from.block.max(run.start);
                    let to = (m.from.block + m.blocks).min(run.end);
                    if from >= to {
                        continue;
                    }
                    let src = ((from - run.start) * bs) as usize..((to - run.start) * bs) as usize;
                    let dst_block = m.at + (from - m.from.block);
                    let dst = (dst_block * bs) as usize..((dst_block + to - from) * bs) as usize;
                    let bytes = raw.get(src).ok_or_else(|| VolumeError::Corrupt {
                        object: pack.key.clone(),
                        problem: format!("chunks {first}..{} are short", first + count),
                    })?;
                    data[dst].copy_from_slice(bytes);
                }
            }
        }
        // Garbage collection keeps it until a version uses it: its id is past every
        // published version's next pack id.
        let info = self.put_pack(
            buffer.freeze(),
            pack_id,
            limit,
            &|_| {},
            "compact.after_pack_put",
        )?;

        // Only blocks still where they were read from move; the map changes on this
        // thread only, so what is computed here is what the version applies to.
        let (extents, template) = {
            let state = self.lock();
            let mut extents = Vec::new();
            for m in &moves {
                for piece in state.map.map.pieces(m.lba, m.blocks) {
                    let offset = piece.start - m.lba;
                    if piece.value == Some(m.from.advance(offset)) {
                        extents.push((
                            piece.start,
                            piece.len,
                            Some(PackLoc {
                                pack: pack_id,
                                block: m.at + offset,
                            }),
                        ));
                    }
                }
            }
            extents.sort_unstable_by_key(|e| e.0);
            let (epoch, seq) = (state.map.wal_epoch, state.map.wal_seq);
            drop(state);
            let mut template = self.manifest_template(ManifestKind::Delta);
            // Nothing of the log moves: the version names the same log position.
            template.wal_epoch = epoch;
            template.wal_seq = seq;
            (extents, template)
        };
        if extents.is_empty() {
            // All overwritten meanwhile; the pack is garbage once a version passes its id.
            return Ok(None);
        }
        let moved: u64 = extents.iter().map(|e| e.1).sum();
        let mut delta = template;
        delta.extents = extents;
        delta.packs = vec![info];
        // Packs whose blocks moved (one whose other blocks have writes pending falls out of
        // use once those are uploaded).
        let emptied = packs.len() as u64;
        let version = self.write_version(delta, "compact.after_manifest_put", |_| {})?;
        self.write_meta(|m| m.applied_version = m.applied_version.max(version))?;
        self.metrics.compactions.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .compacted_bytes
            .fetch_add(moved * bs, Ordering::Relaxed);
        self.metrics
            .compacted_packs
            .fetch_add(emptied, Ordering::Relaxed);
        Ok(Some(Compacted {
            packs: emptied,
            bytes: moved * bs,
            version,
        }))
    }
}
