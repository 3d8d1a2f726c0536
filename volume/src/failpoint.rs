//! Named crash points for the kill -9 tests. With the `failpoints` feature, setting
//! `BERTH_VOLUME_FAILPOINT=NAME:N` makes the process kill itself with SIGKILL the N-th
//! time it passes `NAME` (a list separated by commas arms several). Without the feature
//! [`hit`] compiles to nothing.
//!
//! Error points, for the tests of error paths that real faults (an I/O error) reach too
//! rarely: with the feature, a test in the same process turns `NAME` on and off with
//! [`set_failing`], and [`error`] answers whether it is on. Without the feature it is always
//! false.

/// Every crash point, in the order a write meets them (for the tests to walk through).
pub const ALL: &[&str] = &[
    "write.after_alloc",
    "write.after_data",
    "write.after_record",
    "flush.before_sync",
    "flush.after_data_sync",
    "flush.after_sync",
    "rotate.after_create",
    "upload.after_pack_read",
    "upload.after_pack_put",
    "upload.after_manifest_put",
    "apply.after_clear",
    "apply.after_cache_write",
    "apply.after_cache_sync",
    "apply.after_set",
    "apply.after_meta",
    "compact.after_pack_put",
    "compact.after_manifest_put",
    "trim.before_unlink",
    "trim.after_unlink",
    "evict.after_clear",
    "evict.after_punch",
    "fetch.after_install",
    "checkpoint.after_persist",
    "open.after_replay",
    "open.after_meta",
    "open.after_fence",
    "lease.after_renew",
    "close.after_drain",
];

#[cfg(feature = "failpoints")]
mod armed {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    fn table() -> &'static HashMap<String, (u64, AtomicU64)> {
        static TABLE: OnceLock<HashMap<String, (u64, AtomicU64)>> = OnceLock::new();
        TABLE.get_or_init(|| {
            let mut table = HashMap::new();
            if let Ok(spec) = std::env::var("BERTH_VOLUME_FAILPOINT") {
                for item in spec.split(',') {
                    if let Some((name, n)) = item.split_once(':') {
                        if let Ok(n) = n.trim().parse::<u64>() {
                            table.insert(name.trim().to_string(), (n.max(1), AtomicU64::new(0)));
                        }
                    }
                }
            }
            table
        })
    }

    fn failing() -> &'static std::sync::Mutex<Vec<String>> {
        static FAILING: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
        FAILING.get_or_init(Default::default)
    }

    pub fn set_failing(name: &str, on: bool) {
        let mut failing = failing().lock().unwrap_or_else(|e| e.into_inner());
        failing.retain(|n| n != name);
        if on {
            failing.push(name.to_string());
        }
    }

    pub fn error(name: &str) -> bool {
        failing()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|n| n == name)
    }

    pub fn hit(name: &str) {
        if let Some((at, seen)) = table().get(name) {
            if seen.fetch_add(1, Ordering::SeqCst) + 1 == *at {
                eprintln!("failpoint {name} hit {at} times: killing the process");
                // SAFETY: sends SIGKILL to this process; no memory involved.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        }
    }
}

/// Passes crash point `name`.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    armed::hit(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Turns error point `name` on or off (tests only; needs the `failpoints` feature).
#[cfg(feature = "failpoints")]
pub fn set_failing(name: &str, on: bool) {
    armed::set_failing(name, on);
}

/// Whether error point `name` fails this pass (see the module's documentation).
#[inline]
pub fn error(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    return armed::error(name);
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}
