//! A third-party POSIX suite on `berth fuse` mounts: pjdfstest (the Rust port, 0.2.2), about
//! 400 tests of chmod, chown, link, mkdir, mkfifo, mknod, open, rename, rmdir, symlink,
//! truncate, unlink and utimensat: error codes, permission checks as other users, and which
//! timestamps each call changes. Every test must pass; the only skips allowed are the ones
//! the suite reports for its own configuration (no remount, see `tests/pjdfstest/berth.toml`).
//!
//! Runs in each of the host suites' passes (passthrough, classic, io_uring) like the other
//! `fuse_*` tests. The binary comes from `BERTH_PJDFSTEST`, or the cache directory
//! `tests/run-all.sh` installs it into (`cargo install pjdfstest --version 0.2.2`); without
//! it, and without root and /dev/fuse, the tests skip and say why.

#[path = "common/fuse_mount.rs"]
mod fuse_mount;
#[path = "common/tools.rs"]
mod tools;

use std::path::Path;
use std::time::Duration;

use fuse_mount::*;

/// The counts of the suite's closing line, `Summary: F failed, S skipped, P passed, …`.
#[derive(Debug, PartialEq)]
struct Summary {
    failed: u32,
    skipped: u32,
    passed: u32,
}

fn parse_summary(output: &str) -> Option<Summary> {
    let line = output
        .lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix("Summary:"))?;
    let count = |label: &str| -> Option<u32> {
        line.split(',')
            .map(str::trim)
            .find_map(|part| part.strip_suffix(label)?.trim().parse().ok())
    };
    Some(Summary {
        failed: count(" failed")?,
        skipped: count(" skipped")?,
        passed: count(" passed")?,
    })
}

/// The suite's own reasons for skipping a test in this configuration: remounting is off,
/// and FUSE does not report LINK_MAX (pathconf knows no limit for it).
const EXPECTED_SKIP_REASONS: [&str; 2] = [
    "Remounts (allow_remount) are not allowed",
    "Cannot get value for LINK_MAX",
];

/// Runs the whole suite on a fresh `berth fuse` mount started with `flags`.
fn suite_passes(flags: &[&str]) {
    let Some(binary) = tools::installed_tool("BERTH_PJDFSTEST", "pjdfstest-0.2.2", "pjdfstest")
    else {
        skip(
            "pjdfstest 0.2.2 is not installed (tests/run-all.sh installs it with cargo install; \
             or point BERTH_PJDFSTEST at a binary)",
        );
        return;
    };
    let Some(fs) = FuseMount::start_with_limit(flags, Duration::from_secs(300)) else {
        return;
    };
    let work = fs.via("pjdfstest");
    std::fs::create_dir(&work).expect("create the suite's directory on the mount");
    // A second filesystem for the EXDEV cases: the directory holding the mount point.
    let second = fs
        .mnt()
        .parent()
        .expect("mount point's parent")
        .join("second");
    std::fs::create_dir_all(&second).expect("create the second filesystem's directory");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pjdfstest/berth.toml");
    let args = [
        "-c".as_ref(),
        config.as_os_str(),
        "-p".as_ref(),
        work.as_os_str(),
        "-s".as_ref(),
        second.as_os_str(),
    ];
    let (status, text) = tools::run(&binary, args);
    let failures: Vec<&str> = text
        .lines()
        .filter(|line| line.trim_end().ends_with("FAILED"))
        .collect();
    let summary = parse_summary(&text).unwrap_or_else(|| {
        panic!(
            "pjdfstest {flags:?} printed no summary (exit {}); its output ends:\n{}\nberth's log:\n{}",
            status,
            tools::last_lines(&text, 40),
            fs.log()
        )
    });
    assert_eq!(
        summary.failed,
        0,
        "pjdfstest on berth fuse {flags:?}: {summary:?}; failed:\n{}\n\nfull output:\n{text}\nberth's log:\n{}",
        failures.join("\n"),
        fs.log()
    );
    assert!(
        status.success(),
        "pjdfstest exited with {} although it reported no failure:\n{text}",
        status
    );
    // A suite that ran next to nothing would also report no failure.
    assert!(
        summary.passed >= 380,
        "only {} pjdfstest tests passed ({summary:?}):\n{text}",
        summary.passed
    );
    let unexplained: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with('\t') && !line.trim().is_empty())
        .filter(|line| !EXPECTED_SKIP_REASONS.iter().any(|r| line.contains(r)))
        .collect();
    assert!(
        unexplained.is_empty(),
        "pjdfstest skipped tests for reasons other than its configuration: {unexplained:?}\n{text}"
    );
    eprintln!("pjdfstest on berth fuse {flags:?}: {summary:?}");
    std::fs::remove_dir_all(&work).expect("remove the suite's directory");
    fs.finish();
}

#[test]
fn summary_line_is_read() {
    let text = "chown::eloop_final_comp   ok\n\nSummary: 2 failed, 16 skipped, 380 passed, 0 expected failures, 398 total\n";
    assert_eq!(
        parse_summary(text),
        Some(Summary {
            failed: 2,
            skipped: 16,
            passed: 380
        })
    );
    assert_eq!(parse_summary("no summary here"), None);
}

#[test]
fn pjdfstest_passes_with_the_default_cache() {
    suite_passes(&[]);
}

#[test]
fn pjdfstest_passes_with_cache_never() {
    suite_passes(&["--cache", "never"]);
}

#[test]
fn pjdfstest_passes_with_cache_always_and_writeback() {
    suite_passes(&["--cache", "always", "--writeback"]);
}

#[test]
fn pjdfstest_passes_with_a_descriptor_per_inode() {
    suite_passes(&["--inode-file-handles", "never"]);
}
