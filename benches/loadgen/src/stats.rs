//! Latency histograms (log-linear buckets, ~3 % resolution) and medians.

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = 64 * SUB;

/// A latency histogram in nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

fn bucket_of(value: u64) -> usize {
    if value < SUB as u64 {
        return value as usize;
    }
    let magnitude = 63 - value.leading_zeros();
    let sub = (value >> (magnitude - SUB_BITS)) as usize & (SUB - 1);
    (magnitude - SUB_BITS + 1) as usize * SUB + sub
}

fn lower_bound(bucket: usize) -> u64 {
    if bucket < SUB {
        return bucket as u64;
    }
    let magnitude = (bucket / SUB) as u32 + SUB_BITS - 1;
    let sub = (bucket % SUB) as u64;
    (1u64 << magnitude) | (sub << (magnitude - SUB_BITS))
}

impl Histogram {
    pub fn record(&mut self, nanos: u64) {
        self.counts[bucket_of(nanos)] += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value below which `fraction` of the samples lie (bucket midpoint), 0 when empty.
    pub fn quantile(&self, fraction: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((self.total as f64 * fraction).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let low = lower_bound(bucket);
                let high = lower_bound(bucket + 1).max(low + 1);
                return low + (high - low) / 2;
            }
        }
        0
    }
}

/// Median of `values` (mean of the middle two for an even count); 0 for none.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Median of `field` over `rows`.
pub fn median_of<R>(rows: &[&R], field: impl Fn(&R) -> f64) -> f64 {
    median(&mut rows.iter().map(|r| field(r)).collect::<Vec<_>>())
}

/// Sets each named `f64` field of the row `$summary` to that field's median over `$rows`
/// (with [`median_of`]).
macro_rules! set_medians {
    ($summary:expr, $rows:expr; $($field:ident),+ $(,)?) => {
        $($summary.$field = $crate::stats::median_of($rows, |r| r.$field);)+
    };
}
pub(crate) use set_medians;

/// `runs` grouped by `key` (in key order), each group folded into one summary row by
/// `fold` (which takes the medians it wants with [`median_of`]).
pub fn summarize_groups<R, K: Ord>(
    runs: &[R],
    key: impl Fn(&R) -> K,
    fold: impl Fn(&[&R]) -> R,
) -> Vec<R> {
    let mut groups: std::collections::BTreeMap<K, Vec<&R>> = std::collections::BTreeMap::new();
    for row in runs {
        groups.entry(key(row)).or_default().push(row);
    }
    groups.values().map(|rows| fold(rows)).collect()
}

/// The machine a comparison ran on, as every report records it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostFacts {
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
}

impl HostFacts {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        Self {
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// A socket path in a directory of this process's own (`TAG-PID` under the temporary
/// directory), for a daemon under test to listen on.
pub fn socket_path(tag: &str, name: &str) -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_bucket_resolution() {
        let mut histogram = Histogram::default();
        for value in 1..=100_000u64 {
            histogram.record(value * 10);
        }
        for (fraction, exact) in [(0.5, 500_000.0), (0.99, 990_000.0)] {
            let got = histogram.quantile(fraction) as f64;
            assert!(
                (got - exact).abs() / exact < 0.04,
                "{fraction}: {got} vs {exact}"
            );
        }
        let mut other = Histogram::default();
        other.record(7);
        histogram.merge(&other);
        assert_eq!(histogram.count(), 100_001);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }

    #[test]
    fn buckets_are_monotonic() {
        let mut previous = 0;
        for value in (0..1_000_000u64).step_by(37) {
            let bucket = bucket_of(value);
            assert!(bucket >= previous);
            assert!(lower_bound(bucket) <= value && value < lower_bound(bucket + 1).max(value + 1));
            previous = bucket;
        }
    }

    #[test]
    fn groups_are_summarized_in_key_order_with_medians() {
        let runs = [("b", 1.0), ("a", 5.0), ("b", 3.0), ("a", 1.0), ("b", 2.0)];
        let summary =
            summarize_groups(&runs, |r| r.0, |rows| (rows[0].0, median_of(rows, |r| r.1)));
        assert_eq!(summary, vec![("a", 3.0), ("b", 2.0)]);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
