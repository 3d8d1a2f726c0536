//! Reads that miss: the blocks around them (read-ahead) that are mapped to a pack and
//! not cached are fetched by range, checked chunk by chunk against their digests, and
//! written into the cache file. A block is marked present only if its mapping is still
//! the one fetched when the data lands, so an upload applied meanwhile always wins.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{IoContext, Result, VolumeError};
use crate::extent_map::Advance;
use crate::failpoint;
use crate::format::{PackInfo, PackLoc};
use crate::local::{free_bytes, short_of_space, READ_HEADROOM};
use crate::pack::decode_chunks;
use crate::store::Patience;
use crate::volume::Inner;

/// Most chunks fetched in one request.
const MAX_CHUNKS_PER_GET: usize = 64;

impl Inner {
    /// Makes the blocks of `ranges` (and their read-ahead window) present.
    pub(crate) fn fetch(self: &Arc<Self>, ranges: &[(u64, u64)]) -> Result<()> {
        let started = Instant::now();
        let window = (self.options.readahead_bytes / self.block_size).max(1);
        let blocks = self.config.blocks();
        let mut wanted: Vec<(u64, u64)> = ranges
            .iter()
            .map(|&(start, len)| {
                let from = start - start % window;
                let to = (start + len)
                    .div_ceil(window)
                    .saturating_mul(window)
                    .min(blocks);
                (from, to)
            })
            .collect();
        wanted.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (from, to) in wanted {
            match merged.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        // What is mapped and missing, per pack.
        let mut needs: Vec<(u64, u64, PackLoc)> = Vec::new();
        let mut packs: BTreeMap<u64, Arc<PackInfo>> = BTreeMap::new();
        {
            let state = self.lock();
            for &(from, to) in &merged {
                for piece in state.map.map.pieces(from, to - from) {
                    let Some(loc) = piece.value else { continue };
                    for (run, len, set) in state.presence.runs(piece.start, piece.len) {
                        if !set {
                            needs.push((run, len, loc.advance(run - piece.start)));
                        }
                    }
                    if let Some(pack) = state.map.packs.get(&loc.pack) {
                        packs.insert(loc.pack, pack.clone());
                    }
                }
            }
        }
        if needs.is_empty() {
            return Ok(());
        }
        // The chunks each pack must give, fetched in runs of neighbouring chunks.
        let mut raw: BTreeMap<(u64, usize), Arc<Vec<u8>>> = BTreeMap::new();
        for (&pack_id, pack) in &packs {
            let chunks = needs
                .iter()
                .filter(|n| n.2.pack == pack_id)
                .flat_map(|&(_, len, loc)| pack.chunks_of(loc.block, len));
            for (first, count) in chunk_runs(chunks) {
                let data = match self.read_chunks(pack, first, count) {
                    Ok((data, stored)) => {
                        self.metrics.fetches.fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .fetch_bytes
                            .fetch_add(stored, Ordering::Relaxed);
                        data
                    }
                    // Rewritten by compaction (or overwritten) and collected since the
                    // blocks were looked up: the read looks them up again.
                    Err(_) if !self.lock().map.packs.contains_key(&pack_id) => break,
                    Err(err) => return Err(err),
                };
                let chunk_bytes = u64::from(pack.chunk_blocks) * self.block_size;
                for k in 0..count {
                    let start = k as u64 * chunk_bytes;
                    let end = (start + chunk_bytes).min(data.len() as u64);
                    raw.insert(
                        (pack_id, first + k),
                        Arc::new(data[start as usize..end as usize].to_vec()),
                    );
                }
            }
        }
        if let Err(err) = self.install(&needs, &packs, &raw) {
            if !err.is_no_space() {
                return Err(err);
            }
            // The local disk is full: once the janitor has evicted (it is asked to), the
            // fetched data goes in; else the read fails with ENOSPC.
            self.wait_for_room(Duration::from_secs(2));
            self.install(&needs, &packs, &raw)?;
        }
        self.metrics.fetch_latency.observe(started.elapsed());
        Ok(())
    }

    /// Chunks `first..first + count` of `pack` from the bucket, each checked against its
    /// digest: their raw bytes, and how many stored bytes were read.
    pub(crate) fn read_chunks(
        &self,
        pack: &PackInfo,
        first: usize,
        count: usize,
    ) -> Result<(Vec<u8>, u64)> {
        let corrupt = || VolumeError::Corrupt {
            object: pack.key.clone(),
            problem: format!("chunks {first}..{} are not in the pack", first + count),
        };
        let from = pack.chunks.get(first).ok_or_else(corrupt)?.offset;
        let last = pack
            .chunks
            .get(first + count.max(1) - 1)
            .ok_or_else(corrupt)?;
        let to = last.offset + u64::from(last.stored_len);
        let stored = self.store.read_range(
            &pack.key,
            from..to,
            Patience::For(self.options.fetch_timeout),
        )?;
        let data = decode_chunks(
            pack,
            first,
            count,
            &stored,
            self.config.compression,
            self.config.block_size,
        )?;
        Ok((data, stored.len() as u64))
    }

    /// Writes fetched blocks into the cache and marks those still mapped as fetched.
    fn install(
        &self,
        needs: &[(u64, u64, PackLoc)],
        packs: &BTreeMap<u64, Arc<PackInfo>>,
        raw: &BTreeMap<(u64, usize), Arc<Vec<u8>>>,
    ) -> Result<()> {
        let bs = self.block_size;
        let _writing = self.cache_write.lock().unwrap_or_else(|e| e.into_inner());
        // Only blocks still mapped to what was fetched and still missing.
        let mut runs: Vec<(u64, u64, PackLoc)> = Vec::new();
        {
            let state = self.lock();
            for &(lba, len, loc) in needs {
                for piece in state.map.map.pieces(lba, len) {
                    if piece.value != Some(loc.advance(piece.start - lba)) {
                        continue;
                    }
                    for (run, n, set) in state.presence.runs(piece.start, piece.len) {
                        if !set {
                            runs.push((run, n, loc.advance(run - lba)));
                        }
                    }
                }
            }
        }
        // A read may use the disk's headroom but its last part (the meta file's rewrite
        // needs it); short of that, the read waits for eviction.
        let wanted: u64 = runs.iter().map(|r| r.1).sum::<u64>() * bs;
        if let Some(free) = free_bytes(&self.cache) {
            if free < wanted + READ_HEADROOM {
                let mut state = self.lock();
                let missing: Vec<(u64, u64)> = runs.iter().map(|r| (r.0, r.1)).collect();
                self.note_cache_space(&mut state, &missing);
                return Err(short_of_space(format!(
                    "caching {wanted} fetched bytes: the local disk has {free} bytes free"
                )));
            }
        }
        let mut written = Vec::new();
        for &(lba, len, loc) in &runs {
            let Some(pack) = packs.get(&loc.pack) else {
                continue;
            };
            let per = u64::from(pack.chunk_blocks);
            let mut i = 0;
            while i < len {
                let block = loc.block + i;
                let chunk = (block / per) as usize;
                let n = (len - i).min(per - block % per);
                let Some(data) = raw.get(&(loc.pack, chunk)) else {
                    i += n;
                    continue;
                };
                let within = ((block % per) * bs) as usize;
                let Some(bytes) = data.get(within..within + (n * bs) as usize) else {
                    i += n;
                    continue;
                };
                if let Err(err) = self
                    .cache
                    .write_all_at(bytes, (lba + i) * bs)
                    .context(|| "writing fetched data into the cache file".to_string())
                {
                    // What was written is kept; with the disk full the janitor evicts and
                    // the caller tries again.
                    let mut state = self.lock();
                    self.mark_fetched(&mut state, written);
                    if err.is_no_space() {
                        self.note_cache_space(&mut state, &[(lba + i, len - i)]);
                    }
                    return Err(err);
                }
                written.push((lba + i, n, loc.advance(i)));
                i += n;
            }
        }
        let mut state = self.lock();
        self.mark_fetched(&mut state, written);
        drop(state);
        failpoint::hit("fetch.after_install");
        Ok(())
    }

    /// Marks blocks written into the cache as present where they are still mapped to what
    /// was fetched.
    fn mark_fetched(&self, state: &mut crate::volume::State, written: Vec<(u64, u64, PackLoc)>) {
        for (lba, n, loc) in written {
            for piece in state.map.map.pieces(lba, n) {
                if piece.value == Some(loc.advance(piece.start - lba)) {
                    state.presence.set_range(piece.start, piece.len, true);
                }
            }
        }
        self.metrics
            .cached_bytes
            .store(state.presence.count() * self.block_size, Ordering::Relaxed);
    }
}

/// Chunk indexes (any order, repeats allowed) as runs of neighbouring chunks, each at most
/// [`MAX_CHUNKS_PER_GET`] long: `(first, count)`, in order.
pub(crate) fn chunk_runs(chunks: impl IntoIterator<Item = usize>) -> Vec<(usize, usize)> {
    let mut chunks: Vec<usize> = chunks.into_iter().collect();
    chunks.sort_unstable();
    chunks.dedup();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for chunk in chunks {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == chunk && *count < MAX_CHUNKS_PER_GET => {
                *count += 1
            }
            _ => runs.push((chunk, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_runs_join_neighbours_up_to_the_request_limit() {
        assert_eq!(chunk_runs([5, 1, 2, 2, 9, 3]), vec![(1, 3), (5, 1), (9, 1)]);
        assert_eq!(chunk_runs([]), vec![]);
        let long = chunk_runs(0..MAX_CHUNKS_PER_GET + 3);
        assert_eq!(long, vec![(0, MAX_CHUNKS_PER_GET), (MAX_CHUNKS_PER_GET, 3)]);
    }
}
