//! Host memory for benchmarks in a VM: a balloon device with free page reporting hands
//! the pages a process frees back to the hypervisor within seconds, and touching them
//! again costs a host fault per page. Which method of a benchmark runs on such pages
//! decides its figure more than the method does, so benchmarks pause reporting for their
//! run and touch free memory once before it.

use std::time::Instant;

/// The kernel's free page reporting threshold (pages of this order and above that are free
/// get reported to the hypervisor), where a balloon driver offers reporting.
const PAGE_REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
/// What the kernel has reported so far, in KiB.
const PAGE_REPORTING_REPORTED: &str = "/sys/module/page_reporting/parameters/reported_kib";
/// Past the largest buddy order: no free block is ever large enough to be reported.
const NO_REPORTING_ORDER: &str = "11";

/// Free page reporting paused for as long as this lives; the old threshold is put back
/// when it is dropped.
pub struct PageReportingPause {
    previous: String,
}

impl PageReportingPause {
    /// Pauses reporting where the kernel has it; `None` (and why, printed) where it cannot.
    pub fn start() -> Option<Self> {
        let previous = std::fs::read_to_string(PAGE_REPORTING_ORDER).ok()?;
        let previous = previous.trim().to_string();
        match std::fs::write(PAGE_REPORTING_ORDER, NO_REPORTING_ORDER) {
            Ok(()) => {
                println!(
                    "free page reporting paused for the run (page_reporting_order {previous} -> \
                     {NO_REPORTING_ORDER}; restored at exit)"
                );
                Some(PageReportingPause { previous })
            }
            Err(err) => {
                println!("free page reporting stays on (cannot pause it: {err})");
                None
            }
        }
    }
}

impl Drop for PageReportingPause {
    fn drop(&mut self) {
        if let Err(err) = std::fs::write(PAGE_REPORTING_ORDER, &self.previous) {
            eprintln!(
                "cannot restore page_reporting_order {} ({err}); set it back by hand in {PAGE_REPORTING_ORDER}",
                self.previous
            );
        }
    }
}

/// Touches up to 4 GiB (half of what is available) once and frees it, so that free pages
/// the hypervisor took back before reporting was paused are backed again before the passes.
pub fn touch_free_memory() {
    let available_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemAvailable:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let bytes = (available_kib * 1024 / 2).min(4 << 30) as usize;
    let started = Instant::now();
    let mut memory: Vec<u8> = Vec::new();
    if memory.try_reserve_exact(bytes).is_ok() {
        memory.resize(bytes, 1);
    }
    // Kept from being optimised away: the point is the page faults.
    let touched = std::hint::black_box(&memory).len();
    drop(memory);
    println!(
        "touched {} MiB of free memory once in {:.1} s",
        touched >> 20,
        started.elapsed().as_secs_f64()
    );
}

/// KiB of free memory the kernel has reported to the hypervisor so far (0 without reporting).
pub fn reported_kib() -> u64 {
    std::fs::read_to_string(PAGE_REPORTING_REPORTED)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}
