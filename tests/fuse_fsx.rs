//! A third-party data-integrity exerciser on `berth fuse` mounts: fsx (the Rust port, 0.3.2)
//! runs a long random sequence of reads, writes, mapped reads and writes, truncations,
//! fallocate, hole punching, sendfile, copy_file_range, fsync and reopenings on one file, and
//! checks every byte it reads (by syscall or through a mapping) against its own model of the
//! file. The sequence is fixed by the seed, so a failure replays.
//!
//! Runs in each of the host suites' passes (passthrough, classic, io_uring) like the other
//! `fuse_*` tests. The binary comes from `BERTH_FSX`, or the cache directory
//! `tests/run-all.sh` installs it into (`cargo install fsx --version 0.3.2`); without it,
//! and without root and /dev/fuse, the tests skip and say why.

#[path = "common/fuse_mount.rs"]
mod fuse_mount;
#[path = "common/tools.rs"]
mod tools;

use std::path::Path;
use std::time::Duration;

use fuse_mount::*;

/// Operations per run: a few seconds on an idle host mount.
const OPERATIONS: &str = "10000";

/// Runs fsx with `seed` on a file of a fresh `berth fuse` mount started with `flags`.
fn exerciser_agrees(flags: &[&str], seed: u32) {
    let Some(binary) = tools::installed_tool("BERTH_FSX", "fsx-0.3.2", "fsx") else {
        skip(
            "fsx 0.3.2 is not installed (tests/run-all.sh installs it with cargo install; or \
             point BERTH_FSX at a binary)",
        );
        return;
    };
    let Some(fs) = FuseMount::start_with_limit(flags, Duration::from_secs(300)) else {
        return;
    };
    // fsx's dumps of a failure go beside the mount, not into it.
    let artifacts = fs.mnt().parent().expect("mount point's parent").join("fsx");
    std::fs::create_dir_all(&artifacts).expect("create fsx's artifact directory");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fsx/berth.toml");
    let seed_text = seed.to_string();
    let file = fs.via("exercised");
    let args = [
        "-f".as_ref(),
        config.as_os_str(),
        "-N".as_ref(),
        OPERATIONS.as_ref(),
        "-S".as_ref(),
        seed_text.as_ref(),
        "-P".as_ref(),
        artifacts.as_os_str(),
        file.as_os_str(),
    ];
    let (status, text) = tools::run(&binary, args);
    assert!(
        status.success() && text.contains("All operations completed A-OK!"),
        "fsx -S {seed} on berth fuse {flags:?} failed ({}); its output ends:\n{}\nberth's log:\n{}",
        status,
        tools::last_lines(&text, 40),
        fs.log()
    );
    // What fsx wrote is what the host file holds.
    assert_eq!(
        std::fs::read(&file).expect("read through the mount"),
        std::fs::read(fs.under("exercised")).expect("read the host file"),
        "the mount and the host file differ after fsx"
    );
    eprintln!("fsx -S {seed} -N {OPERATIONS} on berth fuse {flags:?}: A-OK");
    fs.finish();
}

#[test]
fn fsx_agrees_with_the_default_cache() {
    exerciser_agrees(&[], 1);
}

// With `--cache never` and without passthrough, files are opened for direct I/O, which the
// kernel maps only with --allow-mmap (FUSE_DIRECT_IO_ALLOW_MMAP): fsx maps them.
#[test]
fn fsx_agrees_with_cache_never() {
    exerciser_agrees(&["--cache", "never", "--allow-mmap"], 2);
}

#[test]
fn fsx_agrees_with_cache_always_and_writeback() {
    exerciser_agrees(&["--cache", "always", "--writeback"], 3);
}

#[test]
fn fsx_agrees_with_direct_io() {
    exerciser_agrees(
        &["--cache", "never", "--allow-direct-io", "--allow-mmap"],
        4,
    );
}

#[test]
fn fsx_agrees_with_shared_caching() {
    exerciser_agrees(&["--shared-cache"], 5);
}
