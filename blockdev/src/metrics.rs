//! Per-device counters, rendered in the Prometheus text format like the cache engine's:
//! requests and bytes per operation, errors, a latency histogram, the transport in use,
//! and the target's own counters (cache hits and misses of an image).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::target::{BlockTarget, Op};

/// Upper bounds (seconds) of the request latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0,
];

const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

fn op_index(op: Op) -> usize {
    match op {
        Op::Read => 0,
        Op::Write { .. } => 1,
        Op::Flush => 2,
        Op::Discard => 3,
        Op::WriteZeroes => 4,
    }
}

/// Counters of one exported device. Cheap to update from every queue thread.
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    requests: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
    errors: [AtomicU64; 5],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_nanos: AtomicU64,
    transport: Mutex<String>,
}

impl DeviceMetrics {
    /// Counters for a device served through `transport` (`zero-copy`, `user-copy`, `copy`,
    /// `vhost-user`).
    pub fn new(transport: &str) -> Self {
        let metrics = Self::default();
        metrics.set_transport(transport);
        metrics
    }

    /// Changes the transport label (e.g. after a recovery chose another).
    pub fn set_transport(&self, transport: &str) {
        *self.transport.lock().unwrap_or_else(|e| e.into_inner()) = transport.to_string();
    }

    /// The transport label.
    pub fn transport(&self) -> String {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records one finished request.
    pub fn record(&self, op: Op, bytes: u64, ok: bool, elapsed: Duration) {
        let i = op_index(op);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        if ok {
            self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = LATENCY_BUCKETS.iter().position(|&b| seconds <= b) {
            self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Requests of `op` recorded so far.
    pub fn requests(&self, op: Op) -> u64 {
        self.requests[op_index(op)].load(Ordering::Relaxed)
    }

    /// Bytes moved by successful requests of `op`.
    pub fn bytes(&self, op: Op) -> u64 {
        self.bytes[op_index(op)].load(Ordering::Relaxed)
    }

    /// Failed requests of `op`.
    pub fn errors(&self, op: Op) -> u64 {
        self.errors[op_index(op)].load(Ordering::Relaxed)
    }

    /// Appends this device's metrics to `out`, labelled `device="<name>"`. `with_help`
    /// adds the HELP/TYPE lines (once per metric family in a file of several devices).
    pub fn render(
        &self,
        device: &str,
        target: &dyn BlockTarget,
        with_help: bool,
        out: &mut String,
    ) {
        let label = format!("device=\"{}\"", device.replace(['"', '\\', '\n'], "_"));
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            if with_help {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            }
        };
        family(
            out,
            "berth_block_requests_total",
            "counter",
            "Requests served, by operation.",
        );
        for (i, op) in OPS.iter().enumerate() {
            let _ = writeln!(
                out,
                "berth_block_requests_total{{{label},op=\"{op}\"}} {}",
                self.requests[i].load(Ordering::Relaxed)
            );
        }
        family(
            out,
            "berth_block_bytes_total",
            "counter",
            "Bytes moved by successful requests, by operation.",
        );
        for (i, op) in OPS.iter().enumerate() {
            let _ = writeln!(
                out,
                "berth_block_bytes_total{{{label},op=\"{op}\"}} {}",
                self.bytes[i].load(Ordering::Relaxed)
            );
        }
        family(
            out,
            "berth_block_errors_total",
            "counter",
            "Requests that failed, by operation.",
        );
        for (i, op) in OPS.iter().enumerate() {
            let _ = writeln!(
                out,
                "berth_block_errors_total{{{label},op=\"{op}\"}} {}",
                self.errors[i].load(Ordering::Relaxed)
            );
        }
        family(
            out,
            "berth_block_request_seconds",
            "histogram",
            "Request latency inside berth, from receipt to completion.",
        );
        let mut cumulative = 0;
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "berth_block_request_seconds_bucket{{{label},le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "berth_block_request_seconds_bucket{{{label},le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "berth_block_request_seconds_sum{{{label}}} {}",
            self.latency_sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "berth_block_request_seconds_count{{{label}}} {count}");
        family(
            out,
            "berth_block_info",
            "gauge",
            "The device: its transport, target and size.",
        );
        let info = target.info();
        let _ = writeln!(
            out,
            "berth_block_info{{{label},transport=\"{}\",target=\"{}\",size=\"{}\",read_only=\"{}\"}} 1",
            self.transport(),
            info.description.replace(['"', '\\', '\n'], "_"),
            info.size,
            info.read_only
        );
        for (name, help, value) in target.counters() {
            family(
                out,
                name,
                if name.ends_with("_total") {
                    "counter"
                } else {
                    "gauge"
                },
                help,
            );
            let _ = writeln!(out, "{name}{{{label}}} {value}");
        }
    }
}
