//! The skip convention of berth's integration tests: a test the machine cannot run (no root,
//! no /dev/fuse, no loop device…) prints why and returns; with `BERTH_TESTS_NO_SKIP=1` (CI
//! sets it, as root) it fails instead, with the same reason.
//!
//! Included with `#[path = "skip.rs"] mod skip;` from the other helpers in this directory (or
//! `#[path = "common/skip.rs"]` from a test file).

#![allow(dead_code)]

/// Set to `1` to turn every environmental skip into a failure.
pub const NO_SKIP_ENV: &str = "BERTH_TESTS_NO_SKIP";

/// Whether skips are forbidden in this run.
pub fn skips_forbidden() -> bool {
    std::env::var(NO_SKIP_ENV).is_ok_and(|value| value == "1")
}

/// The running test's name (libtest names each test's thread after it).
fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned()
}

/// Skips the running test because the machine lacks something it needs: prints `reason`, or
/// panics with it when `BERTH_TESTS_NO_SKIP=1`.
#[track_caller]
pub fn skip(reason: &str) {
    let test = current_test();
    if skips_forbidden() {
        panic!("{test} cannot run here ({reason}) and {NO_SKIP_ENV}=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// Skips the running test for a reason that is not about the machine (e.g. a berth-only
/// check while another daemon is under test): never a failure.
pub fn skip_by_design(reason: &str) {
    eprintln!("SKIPPED {}: {reason}", current_test());
}
