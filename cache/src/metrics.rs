//! Engine counters, rendered in the Prometheus text exposition format.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Upper bounds (seconds) of the fetch latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Counters of one engine. All are monotonic except `cached_bytes`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Chunks requested that were already present.
    pub chunk_hits: AtomicU64,
    /// Chunks requested that had to be fetched (or waited for).
    pub chunk_misses: AtomicU64,
    /// Chunks made present in cache files (fetched on demand or in the background, or
    /// all-zero chunks punched out without a backend read).
    pub chunks_fetched: AtomicU64,
    /// Of those, all-zero chunks: no backend read, no space used.
    pub zero_chunks: AtomicU64,
    /// Chunks fetched for the prefetch list.
    pub chunks_prefetched: AtomicU64,
    /// Chunks fetched ahead of a sequential reader.
    pub chunks_read_ahead: AtomicU64,
    /// Range reads sent to the backend (including retries).
    pub backend_requests: AtomicU64,
    /// Bytes received from the backend.
    pub backend_bytes: AtomicU64,
    /// Backend requests that failed.
    pub backend_errors: AtomicU64,
    /// Chunks whose digest did not match the manifest.
    pub verification_failures: AtomicU64,
    /// Bytes returned by `read`.
    pub bytes_read: AtomicU64,
    /// Blobs evicted to stay under the capacity.
    pub evictions: AtomicU64,
    /// Bytes of ready chunks currently in the cache.
    pub cached_bytes: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl Metrics {
    /// Records the duration of one successful backend fetch.
    pub fn observe_fetch_latency(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The main counters, in a fixed order: hits, misses, fetched, prefetched, read
    /// ahead, backend requests, backend bytes, backend errors, verification failures.
    pub fn summary(&self) -> [u64; 9] {
        [
            &self.chunk_hits,
            &self.chunk_misses,
            &self.chunks_fetched,
            &self.chunks_prefetched,
            &self.chunks_read_ahead,
            &self.backend_requests,
            &self.backend_bytes,
            &self.backend_errors,
            &self.verification_failures,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }

    /// Logs the counters and the mean fetch latency (debug level).
    pub fn log_summary(&self) {
        let [hits, misses, fetched, prefetched, read_ahead, requests, bytes, errors, bad] =
            self.summary();
        let count = self.latency_count.load(Ordering::Relaxed);
        let mean_ms = if count == 0 {
            0.0
        } else {
            self.latency_sum_micros.load(Ordering::Relaxed) as f64 / count as f64 / 1e3
        };
        tracing::debug!(
            target: "berth_cache::metrics",
            hits, misses, fetched, prefetched, read_ahead, requests, bytes, errors,
            verification_failures = bad,
            cached_bytes = self.cached_bytes.load(Ordering::Relaxed),
            mean_fetch_ms = mean_ms,
            "cache metrics"
        );
    }

    /// Number of fetch latencies recorded.
    pub fn fetch_count(&self) -> u64 {
        self.latency_count.load(Ordering::Relaxed)
    }

    /// The metrics in the Prometheus text format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64, &str); 13] = [
            (
                "berth_cache_chunk_hits_total",
                "Chunks requested that were already cached.",
                &self.chunk_hits,
                "counter",
            ),
            (
                "berth_cache_chunk_misses_total",
                "Chunks requested that were not cached.",
                &self.chunk_misses,
                "counter",
            ),
            (
                "berth_cache_chunks_fetched_total",
                "Chunks made present in the cache (fetched, or all-zero chunks punched out).",
                &self.chunks_fetched,
                "counter",
            ),
            (
                "berth_cache_zero_chunks_total",
                "All-zero chunks made present without a backend read.",
                &self.zero_chunks,
                "counter",
            ),
            (
                "berth_cache_chunks_prefetched_total",
                "Chunks fetched for the prefetch list.",
                &self.chunks_prefetched,
                "counter",
            ),
            (
                "berth_cache_chunks_read_ahead_total",
                "Chunks fetched ahead of sequential readers.",
                &self.chunks_read_ahead,
                "counter",
            ),
            (
                "berth_cache_backend_requests_total",
                "Range reads sent to the backend.",
                &self.backend_requests,
                "counter",
            ),
            (
                "berth_cache_backend_bytes_total",
                "Bytes received from the backend.",
                &self.backend_bytes,
                "counter",
            ),
            (
                "berth_cache_backend_errors_total",
                "Backend reads that failed.",
                &self.backend_errors,
                "counter",
            ),
            (
                "berth_cache_verification_failures_total",
                "Chunks whose digest did not match.",
                &self.verification_failures,
                "counter",
            ),
            (
                "berth_cache_read_bytes_total",
                "Bytes returned by reads through the engine.",
                &self.bytes_read,
                "counter",
            ),
            (
                "berth_cache_evictions_total",
                "Blobs evicted to respect the capacity.",
                &self.evictions,
                "counter",
            ),
            (
                "berth_cache_cached_bytes",
                "Bytes of ready chunks held in the cache.",
                &self.cached_bytes,
                "gauge",
            ),
        ];
        for (name, help, value, kind) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let name = "berth_cache_fetch_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Latency of backend range reads.\n# TYPE {name} histogram"
        );
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
        );
        out
    }
}

/// Writes the metrics to a file at a fixed interval until dropped.
pub struct MetricsWriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsWriter {
    /// Starts a thread that replaces `path` with the rendered metrics every
    /// `interval` (through a temporary file and a rename, so readers never see a
    /// partial file), and once more when dropped so the file ends with the final
    /// counts.
    pub fn start(metrics: Arc<Metrics>, path: PathBuf, interval: Duration) -> Self {
        Self::start_logging(metrics, Some(path), interval)
    }

    /// Like [`MetricsWriter::start`] with an optional file; in addition, every
    /// `interval` in which anything changed, the counters are logged through `tracing`
    /// (at debug level, target `berth_cache::metrics`).
    pub fn start_logging(metrics: Arc<Metrics>, path: Option<PathBuf>, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("berth-cache-metrics".into())
            .spawn(move || {
                let mut last_logged = None;
                loop {
                    if let Some(path) = &path {
                        if let Err(err) = crate::manifest::write_atomically(
                            path,
                            metrics.render_prometheus().as_bytes(),
                        ) {
                            tracing::warn!("cannot write metrics: {err}");
                        }
                    }
                    let snapshot = metrics.summary();
                    if last_logged.as_ref() != Some(&snapshot) {
                        metrics.log_summary();
                        last_logged = Some(snapshot);
                    }
                    if stop_flag.load(Ordering::Relaxed) {
                        return;
                    }
                    let mut waited = Duration::ZERO;
                    while waited < interval {
                        if stop_flag.load(Ordering::Relaxed) {
                            break;
                        }
                        let step = Duration::from_millis(100).min(interval - waited);
                        std::thread::sleep(step);
                        waited += step;
                    }
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for MetricsWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
