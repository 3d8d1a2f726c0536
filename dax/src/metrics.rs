//! Counters of the window: what is mapped now and what happened so far.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, updated by the window manager.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub mapped_bytes: AtomicU64,
    pub live_ranges: AtomicU64,
    pub maps: AtomicU64,
    pub unmaps: AtomicU64,
    pub refused: AtomicU64,
    pub frontend_errors: AtomicU64,
    pub map_nanos: AtomicU64,
    pub unmap_nanos: AtomicU64,
    pub placeholder_bytes: AtomicU64,
    pub repoints: AtomicU64,
    pub restores: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Metrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Metrics {
            mapped_bytes: get(&self.mapped_bytes),
            live_ranges: get(&self.live_ranges),
            maps: get(&self.maps),
            unmaps: get(&self.unmaps),
            refused: get(&self.refused),
            frontend_errors: get(&self.frontend_errors),
            map_nanos: get(&self.map_nanos),
            unmap_nanos: get(&self.unmap_nanos),
            placeholder_bytes: get(&self.placeholder_bytes),
            repoints: get(&self.repoints),
            restores: get(&self.restores),
        }
    }
}

/// A snapshot of the window's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Bytes of the window mapped now.
    pub mapped_bytes: u64,
    /// Mappings live now (as the VMM sees them: one SHMEM_MAP each).
    pub live_ranges: u64,
    /// SHMEM_MAP requests the VMM carried out (remainders of split ranges included).
    pub maps: u64,
    /// SHMEM_UNMAP requests the VMM carried out.
    pub unmaps: u64,
    /// SETUPMAPPING / REMOVEMAPPING requests refused before reaching the VMM.
    pub refused: u64,
    /// Requests the VMM failed or that could not reach it.
    pub frontend_errors: u64,
    /// Time spent waiting for the VMM's SHMEM_MAP acknowledgements, in nanoseconds.
    pub map_nanos: u64,
    /// Time spent waiting for the VMM's SHMEM_UNMAP acknowledgements, in nanoseconds.
    pub unmap_nanos: u64,
    /// Bytes of live ranges shown from the placeholder (past their file's end) now.
    pub placeholder_bytes: u64,
    /// Ranges re-pointed because their file shrank (berth's own request or a host process).
    pub repoints: u64,
    /// Ranges mapped back to their file because it grew again.
    pub restores: u64,
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let average = |nanos: u64, count: u64| nanos.checked_div(count).unwrap_or(0) / 1000;
        write!(
            f,
            "mapped_bytes={} live_ranges={} maps={} unmaps={} refused={} frontend_errors={} \
             map_avg_us={} unmap_avg_us={} placeholder_bytes={} repoints={} restores={}",
            self.mapped_bytes,
            self.live_ranges,
            self.maps,
            self.unmaps,
            self.refused,
            self.frontend_errors,
            average(self.map_nanos, self.maps),
            average(self.unmap_nanos, self.unmaps),
            self.placeholder_bytes,
            self.repoints,
            self.restores,
        )
    }
}
