//! Background upkeep of a served volume: retired data is freed once no read uses it,
//! the cache is kept under its size limit (CLOCK over 1 MiB regions), the presence
//! bitmap is checkpointed, an idle log segment retires, unreferenced packs are collected,
//! and the lease is renewed (losing it fences the volume).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::error::VolumeError;
use crate::failpoint;
use crate::lease::{self, Renewal};
use crate::store::Patience;
use crate::upload::punch;
use crate::volume::Inner;

/// How often a lasting eviction failure is logged.
const EVICT_WARNING_EVERY: Duration = Duration::from_secs(30);

impl Inner {
    pub(crate) fn janitor(self: &Arc<Self>) {
        let mut last_persist = Instant::now();
        let mut last_gc = Instant::now();
        let mut released_at_last_gc = self.lock().map.released_bytes;
        let mut idle_since: Option<(Option<u32>, u64, Instant)> = None;
        let mut evict_warned: Option<Instant> = None;
        loop {
            {
                let state = self.lock();
                if state.stopping {
                    return;
                }
                drop(self.wait_changed(state, Duration::from_millis(200)));
            }
            self.pins.run_ready();
            self.reserve.refill();
            match self.evict() {
                // A failure that lasts (its regions are retried every pass) is logged once
                // every half minute.
                Err(err) if evict_warned.is_none_or(|at| at.elapsed() >= EVICT_WARNING_EVERY) => {
                    tracing::warn!(volume = %self.store.location, "evicting cache blocks: {}", err.describe());
                    evict_warned = Some(Instant::now());
                }
                Err(_) => {}
                Ok(()) => evict_warned = None,
            }
            if last_persist.elapsed() >= Duration::from_secs(5) {
                if let Err(err) = self.persist_presence() {
                    tracing::warn!(volume = %self.store.location, "checkpointing the cache map: {}", err.describe());
                }
                failpoint::hit("checkpoint.after_persist");
                last_persist = Instant::now();
            }
            // An active segment untouched for a while retires once all of it is applied.
            let now_active = {
                let state = self.lock();
                let active = state.active;
                let max_seq = active
                    .and_then(|n| state.segments.get(&n))
                    .map_or(0, |s| s.max_seq);
                (active, max_seq)
            };
            match idle_since {
                Some((active, seq, since)) if (active, seq) == now_active => {
                    let quiet = (self.options.upload_interval * 2).max(Duration::from_secs(2));
                    if active.is_some() && since.elapsed() >= quiet {
                        self.seal_idle();
                    }
                }
                _ => idle_since = Some((now_active.0, now_active.1, Instant::now())),
            }
            self.check_object_waiters();
            let released = self.lock().map.released_bytes;
            let period_over = self
                .options
                .gc_interval
                .is_some_and(|period| last_gc.elapsed() >= period);
            let garbage_piled_up = self
                .options
                .gc_after_released_bytes
                .is_some_and(|bytes| released.saturating_sub(released_at_last_gc) >= bytes);
            if period_over || garbage_piled_up {
                last_gc = Instant::now();
                released_at_last_gc = released;
                match crate::admin::collect_garbage(
                    &self.store,
                    &self.config,
                    self.options.gc_grace,
                    false,
                ) {
                    Ok(report) => {
                        self.metrics.gc_runs.fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .gc_packs_deleted
                            .fetch_add(report.packs_deleted, Ordering::Relaxed);
                        self.metrics
                            .gc_bytes_deleted
                            .fetch_add(report.bytes_deleted, Ordering::Relaxed);
                        self.metrics
                            .gc_manifests_deleted
                            .fetch_add(report.manifests_deleted, Ordering::Relaxed);
                    }
                    Err(err) => {
                        tracing::warn!(volume = %self.store.location, "garbage collection: {}", err.describe())
                    }
                }
            }
        }
    }

    /// Keeps the cache under its limit (down to 90 % of it) and, when the local disk ran
    /// out of space (`room_wanted`), frees a tenth of what is cached, at least two log
    /// segments' worth: clears the presence of the least recently used regions (on disk
    /// first), then punches them once no read uses them.
    pub(crate) fn evict(self: &Arc<Self>) -> crate::error::Result<()> {
        let bs = self.block_size;
        let mut victims;
        let room_wanted;
        {
            let mut state = self.lock();
            room_wanted = std::mem::take(&mut state.room_wanted);
            victims = std::mem::take(&mut state.unpunched);
            // Regions a failed round cleared are retried alone: clearing more while the map
            // cannot be persisted would drop the cache without freeing a byte.
            let retrying = !victims.is_empty();
            let used = state.presence.count() * bs;
            let mut target = match self.options.cache_bytes {
                Some(limit) if used > limit => limit / 10 * 9,
                _ => used,
            };
            if room_wanted {
                let room = (used / 10).max(2 * self.options.segment_bytes);
                target = target.min(used.saturating_sub(room));
            }
            let regions = state.region_refs.len();
            let mut freed = 0u64;
            let mut steps = 0;
            while !retrying && used.saturating_sub(freed) > target && steps < 2 * regions {
                let r = state.clock_hand;
                state.clock_hand = (r + 1) % regions.max(1);
                steps += 1;
                if state.region_refs[r] {
                    state.region_refs[r] = false;
                    continue;
                }
                let start = r as u64 * self.region_blocks;
                let len = self.region_blocks.min(self.config.blocks() - start);
                let present: u64 = state
                    .presence
                    .runs(start, len)
                    .iter()
                    .filter(|r| r.2)
                    .map(|r| r.1)
                    .sum();
                if present > 0 {
                    state.presence.set_range(start, len, false);
                    freed += present * bs;
                    victims.push((start, len));
                }
            }
            self.metrics
                .cached_bytes
                .store(state.presence.count() * bs, Ordering::Relaxed);
            self.metrics
                .evicted_bytes
                .fetch_add(freed, Ordering::Relaxed);
            if victims.is_empty() {
                if room_wanted {
                    // Nothing cached to give back: whoever waits for room stops waiting.
                    state.room_made += 1;
                    self.changed.notify_all();
                }
                return Ok(());
            }
        }
        let persisted = if failpoint::error("evict.persist") {
            Err(VolumeError::Failed(
                "injected: the cache map could not be persisted (error point evict.persist)".into(),
            ))
        } else {
            self.persist_presence()
        };
        if let Err(err) = persisted {
            let mut state = self.lock();
            state.unpunched.extend(victims);
            if room_wanted {
                // Whoever waits for room keeps waiting (within its timeout) for the next
                // round, which tries to persist these regions again.
                state.room_wanted = true;
            }
            return Err(err);
        }
        failpoint::hit("evict.after_clear");
        let weak: Weak<Inner> = Arc::downgrade(self);
        self.pins.defer(move || {
            let Some(inner) = weak.upgrade() else { return };
            {
                let _writing = inner.cache_write.lock().unwrap_or_else(|e| e.into_inner());
                // Blocks fetched again since are left alone.
                let runs: Vec<(u64, u64)> = {
                    let state = inner.lock();
                    victims
                        .iter()
                        .flat_map(|&(start, len)| state.presence.runs(start, len))
                        .filter(|r| !r.2)
                        .map(|r| (r.0, r.1))
                        .collect()
                };
                for (start, len) in runs {
                    if let Err(err) = punch(&inner.cache, start * bs, len * bs) {
                        tracing::warn!("punching evicted cache blocks: {err}");
                    }
                }
            }
            if room_wanted {
                inner.lock().room_made += 1;
                inner.changed.notify_all();
            }
            failpoint::hit("evict.after_punch");
        });
        if room_wanted {
            // Room is wanted now, not at the next round.
            self.pins.run_ready();
        }
        Ok(())
    }

    /// Renews the lease every third of its time to live; a lease another session took
    /// fences the volume.
    pub(crate) fn lease_keeper(self: &Arc<Self>) {
        let period = self.options.lease_ttl / 3;
        loop {
            let deadline = Instant::now() + period;
            while Instant::now() < deadline {
                if self.lock().stopping {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let Some(mut lease) = self.lease.lock().unwrap_or_else(|e| e.into_inner()).clone()
            else {
                return;
            };
            match lease::renew(&self.store, &mut lease, Patience::For(period)) {
                Ok(Renewal::Renewed) => {
                    *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
                    self.metrics.lease_renewals.fetch_add(1, Ordering::Relaxed);
                    failpoint::hit("lease.after_renew");
                }
                Ok(Renewal::Lost(holder)) => {
                    self.fence(format!("the lease is now held by {holder}"));
                    return;
                }
                Err(err) => {
                    if self.lock().stopping {
                        return;
                    }
                    let expired = lease.record.expires_ms() < crate::format::now_ms();
                    tracing::warn!(
                        volume = %self.store.location,
                        expired,
                        "cannot renew the lease: {err}"
                    );
                }
            }
        }
    }
}
