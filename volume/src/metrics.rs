//! A volume's counters, rendered in the Prometheus text format with a `volume` label:
//! dirty bytes, log size, cached bytes, uploads (bytes, objects, latency), flush latency,
//! manifest version, fetches, garbage collection, lease renewals.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms.
pub const BUCKETS: [f64; 14] = [
    0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// A latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let index = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The sum of the observed durations.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_us.load(Ordering::Relaxed))
    }

    fn render(&self, out: &mut String, name: &str, label: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{label},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{label},le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum{{{label}}} {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{label}}} {cumulative}");
    }
}

/// Counters and gauges of one volume.
#[derive(Debug, Default)]
pub struct VolumeMetrics {
    pub dirty_bytes: AtomicU64,
    pub wal_bytes: AtomicU64,
    pub cached_bytes: AtomicU64,
    pub manifest_version: AtomicU64,
    pub uploads: AtomicU64,
    /// Packs being built or PUT right now, and the most at once since the volume opened.
    pub uploads_in_flight: AtomicU64,
    pub uploads_in_flight_max: AtomicU64,
    /// Bytes the uploader holds for batches taken and not yet published (their data, and
    /// room for a compressed copy while packing), and the most since the volume opened.
    pub upload_memory: AtomicU64,
    pub upload_memory_max: AtomicU64,
    pub upload_bytes: AtomicU64,
    pub upload_raw_bytes: AtomicU64,
    pub manifests_written: AtomicU64,
    pub fetches: AtomicU64,
    pub fetch_bytes: AtomicU64,
    pub read_hits: AtomicU64,
    pub read_misses: AtomicU64,
    pub evicted_bytes: AtomicU64,
    /// Bytes of published or fetched data not written to the cache because the local disk
    /// was full (read from the bucket when needed).
    pub uncached_bytes: AtomicU64,
    /// Bytes of published batches written to the cache file with direct I/O.
    pub cache_direct_bytes: AtomicU64,
    pub gc_packs_deleted: AtomicU64,
    pub gc_bytes_deleted: AtomicU64,
    pub gc_manifests_deleted: AtomicU64,
    pub gc_runs: AtomicU64,
    /// Blocks in packs in use that no volume block maps any more, in bytes (what
    /// compaction and then garbage collection can free).
    pub pack_dead_bytes: AtomicU64,
    pub compactions: AtomicU64,
    pub compacted_bytes: AtomicU64,
    pub compacted_packs: AtomicU64,
    pub compact_fetch_bytes: AtomicU64,
    pub lease_renewals: AtomicU64,
    pub segments_created: AtomicU64,
    pub segments_retired: AtomicU64,
    pub flushes: AtomicU64,
    pub fenced: AtomicU64,
    pub upload_latency: Histogram,
    pub flush_latency: Histogram,
    pub fetch_latency: Histogram,
}

impl VolumeMetrics {
    /// Prometheus text for volume `name`; the HELP/TYPE lines only when `with_help`.
    pub fn render(&self, name: &str, with_help: bool, out: &mut String) {
        let label = format!("volume=\"{}\"", name.replace(['"', '\\', '\n'], "_"));
        let family = |out: &mut String, metric: &str, kind: &str, help: &str| {
            if with_help {
                let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
            }
        };
        let plain: [(&str, &str, &AtomicU64); 32] = [
            (
                "berth_volume_dirty_bytes",
                "Bytes written and acknowledged but not in the bucket yet.",
                &self.dirty_bytes,
            ),
            (
                "berth_volume_wal_bytes",
                "Bytes of write-ahead log on local disk.",
                &self.wal_bytes,
            ),
            (
                "berth_volume_cached_bytes",
                "Bytes of bucket data cached locally.",
                &self.cached_bytes,
            ),
            (
                "berth_volume_manifest_version",
                "The manifest version in the bucket.",
                &self.manifest_version,
            ),
            (
                "berth_volume_uploads_total",
                "Packs uploaded.",
                &self.uploads,
            ),
            (
                "berth_volume_uploads_in_flight",
                "Packs being built or uploaded now.",
                &self.uploads_in_flight,
            ),
            (
                "berth_volume_uploads_in_flight_max",
                "The most packs built or uploaded at once since the volume opened.",
                &self.uploads_in_flight_max,
            ),
            (
                "berth_volume_uncached_bytes_total",
                "Bytes not written to the local cache because the local disk was full.",
                &self.uncached_bytes,
            ),
            (
                "berth_volume_cache_direct_bytes_total",
                "Bytes of uploaded batches written to the local cache with direct I/O.",
                &self.cache_direct_bytes,
            ),
            (
                "berth_volume_upload_memory_bytes",
                "Bytes of memory the uploader holds for batches not yet published.",
                &self.upload_memory,
            ),
            (
                "berth_volume_upload_memory_max_bytes",
                "The most bytes of memory the uploader held at once since the volume opened.",
                &self.upload_memory_max,
            ),
            (
                "berth_volume_upload_bytes_total",
                "Bytes of packs uploaded (as stored).",
                &self.upload_bytes,
            ),
            (
                "berth_volume_upload_raw_bytes_total",
                "Bytes of blocks uploaded (before compression).",
                &self.upload_raw_bytes,
            ),
            (
                "berth_volume_manifests_written_total",
                "Manifest versions written.",
                &self.manifests_written,
            ),
            (
                "berth_volume_fetches_total",
                "Pack ranges fetched for reads.",
                &self.fetches,
            ),
            (
                "berth_volume_fetch_bytes_total",
                "Bytes fetched for reads.",
                &self.fetch_bytes,
            ),
            (
                "berth_volume_read_hits_total",
                "Reads served from local data only.",
                &self.read_hits,
            ),
            (
                "berth_volume_read_misses_total",
                "Reads that waited for a fetch.",
                &self.read_misses,
            ),
            (
                "berth_volume_evicted_bytes_total",
                "Cached bytes evicted.",
                &self.evicted_bytes,
            ),
            (
                "berth_volume_gc_runs_total",
                "Garbage collection passes.",
                &self.gc_runs,
            ),
            (
                "berth_volume_gc_packs_deleted_total",
                "Packs deleted by garbage collection.",
                &self.gc_packs_deleted,
            ),
            (
                "berth_volume_gc_bytes_deleted_total",
                "Bytes of packs deleted by garbage collection.",
                &self.gc_bytes_deleted,
            ),
            (
                "berth_volume_gc_manifests_deleted_total",
                "Old manifest versions deleted.",
                &self.gc_manifests_deleted,
            ),
            (
                "berth_volume_pack_dead_bytes",
                "Bytes of blocks in packs in use that no volume block uses any more.",
                &self.pack_dead_bytes,
            ),
            (
                "berth_volume_compactions_total",
                "Compaction steps (sparse packs rewritten into a new one).",
                &self.compactions,
            ),
            (
                "berth_volume_compacted_bytes_total",
                "Bytes of live blocks compaction moved into new packs.",
                &self.compacted_bytes,
            ),
            (
                "berth_volume_compacted_packs_total",
                "Packs whose live blocks compaction moved into new packs.",
                &self.compacted_packs,
            ),
            (
                "berth_volume_compact_fetch_bytes_total",
                "Bytes compaction read from the bucket.",
                &self.compact_fetch_bytes,
            ),
            (
                "berth_volume_lease_renewals_total",
                "Lease renewals.",
                &self.lease_renewals,
            ),
            (
                "berth_volume_segments_created_total",
                "Log segments created.",
                &self.segments_created,
            ),
            (
                "berth_volume_segments_retired_total",
                "Log segments deleted once uploaded.",
                &self.segments_retired,
            ),
            (
                "berth_volume_fenced",
                "1 once another writer took the volume over.",
                &self.fenced,
            ),
        ];
        for (metric, help, value) in plain {
            let kind = if metric.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            family(out, metric, kind, help);
            let _ = writeln!(out, "{metric}{{{label}}} {}", value.load(Ordering::Relaxed));
        }
        for (metric, help, histogram) in [
            (
                "berth_volume_upload_seconds",
                "Time to upload a pack and write its manifest.",
                &self.upload_latency,
            ),
            (
                "berth_volume_flush_seconds",
                "Time a FLUSH took to be durable.",
                &self.flush_latency,
            ),
            (
                "berth_volume_fetch_seconds",
                "Time to fetch and check a pack range.",
                &self.fetch_latency,
            ),
        ] {
            family(out, metric, "histogram", help);
            histogram.render(out, metric, &label);
        }
    }
}
