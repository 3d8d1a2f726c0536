//! `--metrics-file` of `berth block add` / `recover` and `berth block serve-vhost`: the
//! devices' counters (and their images' cache engines or volumes'), rewritten atomically
//! every interval and at exit, as one Prometheus text exposition.
//!
//! The file's directory is opened before the process enters a sandbox, and the file is
//! written relative to that descriptor (`openat` a temporary name, `renameat2` over the
//! file), so it lands in the host directory whatever the root is afterwards. serve-vhost
//! starts the writer thread after the main thread's filter, which allows both calls.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tracing::warn;

/// Where the metrics go: a directory opened before the sandbox and a name in it.
pub(crate) struct MetricsFile {
    dir: OwnedFd,
    name: CString,
    temporary: CString,
    shown: String,
}

impl MetricsFile {
    pub(crate) fn open(path: &Path) -> anyhow::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("--metrics-file {} names no file", path.display()))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parent_c = CString::new(parent.as_os_str().as_bytes())
            .map_err(|_| anyhow!("--metrics-file {} holds a NUL byte", path.display()))?;
        // SAFETY: open(2) of a NUL-terminated path we own; the result is checked.
        let fd = unsafe {
            libc::open(
                parent_c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).with_context(|| {
                format!(
                    "cannot open {}, the directory of --metrics-file",
                    parent.display()
                )
            });
        }
        // SAFETY: a descriptor open(2) just returned, owned by nobody else.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut temporary = name.as_bytes().to_vec();
        temporary.extend_from_slice(b".tmp");
        Ok(Self {
            dir,
            name: CString::new(name.as_bytes())
                .map_err(|_| anyhow!("--metrics-file {} holds a NUL byte", path.display()))?,
            temporary: CString::new(temporary)
                .map_err(|_| anyhow!("--metrics-file {} holds a NUL byte", path.display()))?,
            shown: path.display().to_string(),
        })
    }

    /// Replaces the file's contents with `text` (a reader sees the old or the new file).
    pub(crate) fn write(&self, text: &str) -> io::Result<()> {
        // SAFETY: openat(2) relative to our directory descriptor with a NUL-terminated
        // name; the result is checked.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                self.temporary.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor openat(2) just returned, owned by nobody else.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.write_all(text.as_bytes())?;
        drop(file);
        // The system call itself: glibc's wrapper turns flags 0 into renameat, which the
        // filters do not allow.
        // SAFETY: renameat2(2) within our directory descriptor, NUL-terminated names.
        let renamed = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                self.dir.as_raw_fd(),
                self.temporary.as_ptr(),
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
                0u32,
            )
        };
        if renamed < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_logged(&self, text: &str) {
        if let Err(e) = self.write(text) {
            warn!("Cannot write the metrics file {}: {e}.", self.shown);
        }
    }
}

/// Rewrites the metrics file every `interval` until dropped, and once more then.
pub(crate) struct MetricsWriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsWriter {
    pub(crate) fn start(
        file: MetricsFile,
        interval: Duration,
        render: impl Fn() -> String + Send + 'static,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("berth-metrics".into())
            .spawn(move || {
                let step = Duration::from_millis(100);
                let mut waited = interval;
                while !stopped.load(Ordering::SeqCst) {
                    if waited >= interval {
                        file.write_logged(&render());
                        waited = Duration::ZERO;
                    }
                    std::thread::sleep(step);
                    waited += step;
                }
                file.write_logged(&render());
            })
            .context("cannot start the metrics thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Merges the Prometheus text of several renderers (one per device, volume and cache
/// engine) into one valid exposition: each metric family once, its HELP and TYPE lines
/// first and then every sample of it, families in the order they first appear. The format
/// wants a family's lines together and its TYPE at most once; rendered device by device,
/// a second device's samples would follow the first device's other families.
pub(crate) fn merge_families(text: &str) -> String {
    #[derive(Default)]
    struct Family<'a> {
        help: Option<&'a str>,
        kind: Option<&'a str>,
        histogram: bool,
        samples: Vec<&'a str>,
    }
    fn family<'a, 'b>(
        families: &'b mut HashMap<&'a str, Family<'a>>,
        order: &mut Vec<&'a str>,
        name: &'a str,
    ) -> &'b mut Family<'a> {
        families.entry(name).or_insert_with(|| {
            order.push(name);
            Family::default()
        })
    }
    let mut order = Vec::new();
    let mut families = HashMap::new();
    // Declarations first, so that a histogram's _bucket/_sum/_count samples find their
    // family wherever its TYPE line is.
    for line in text.lines() {
        let mut words = line.splitn(4, ' ');
        if let (Some("#"), Some(keyword @ ("HELP" | "TYPE")), Some(name)) =
            (words.next(), words.next(), words.next())
        {
            let entry = family(&mut families, &mut order, name);
            if keyword == "HELP" {
                entry.help.get_or_insert(line);
            } else {
                entry.kind.get_or_insert(line);
                entry.histogram |= matches!(words.next(), Some("histogram" | "summary"));
            }
        }
    }
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or(line);
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| families.get(base).is_some_and(|f: &Family| f.histogram));
        family(&mut families, &mut order, base.unwrap_or(name))
            .samples
            .push(line);
    }
    let mut out = String::with_capacity(text.len());
    for name in order {
        let entry = &families[name];
        for line in entry.help.iter().chain(&entry.kind).chain(&entry.samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::merge_families;

    #[test]
    fn families_of_several_devices_come_out_together_with_one_type_line() {
        let text = "\
# HELP berth_block_requests_total Requests.
# TYPE berth_block_requests_total counter
berth_block_requests_total{device=\"a\",op=\"read\"} 1
# HELP berth_block_request_seconds Latency.
# TYPE berth_block_request_seconds histogram
berth_block_request_seconds_bucket{device=\"a\",le=\"+Inf\"} 1
berth_block_request_seconds_sum{device=\"a\"} 0.5
berth_block_request_seconds_count{device=\"a\"} 1
berth_block_requests_total{device=\"b\",op=\"read\"} 2
berth_block_request_seconds_bucket{device=\"b\",le=\"+Inf\"} 2
berth_block_request_seconds_sum{device=\"b\"} 1
berth_block_request_seconds_count{device=\"b\"} 2
# HELP berth_cache_hits_total Hits.
# TYPE berth_cache_hits_total counter
berth_cache_hits_total{image=\"x\"} 3
# HELP berth_cache_hits_total Hits.
# TYPE berth_cache_hits_total counter
berth_cache_hits_total{image=\"y\"} 4
berth_undeclared 7
";
        let merged = merge_families(text);
        let expected = "\
# HELP berth_block_requests_total Requests.
# TYPE berth_block_requests_total counter
berth_block_requests_total{device=\"a\",op=\"read\"} 1
berth_block_requests_total{device=\"b\",op=\"read\"} 2
# HELP berth_block_request_seconds Latency.
# TYPE berth_block_request_seconds histogram
berth_block_request_seconds_bucket{device=\"a\",le=\"+Inf\"} 1
berth_block_request_seconds_sum{device=\"a\"} 0.5
berth_block_request_seconds_count{device=\"a\"} 1
berth_block_request_seconds_bucket{device=\"b\",le=\"+Inf\"} 2
berth_block_request_seconds_sum{device=\"b\"} 1
berth_block_request_seconds_count{device=\"b\"} 2
# HELP berth_cache_hits_total Hits.
# TYPE berth_cache_hits_total counter
berth_cache_hits_total{image=\"x\"} 3
berth_cache_hits_total{image=\"y\"} 4
berth_undeclared 7
";
        assert_eq!(merged, expected);
    }

    #[test]
    fn a_counter_named_like_a_histogram_part_keeps_its_own_family() {
        // `_count` of a counter family is not folded into a family of the base name.
        let text = "\
# TYPE berth_fetch counter
berth_fetch 1
# TYPE berth_fetch_count counter
berth_fetch_count 2
";
        assert_eq!(merge_families(text), text);
    }
}
