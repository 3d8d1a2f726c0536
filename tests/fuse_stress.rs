//! Scale tests of `berth fuse`: big directories, a 1 GiB file, concurrent writers, and the
//! daemon's descriptor use while 100 000 inodes are looked up.
//!
//! Needs root and /dev/fuse; each test skips with a printed reason otherwise. The 1 GiB and
//! 100 000-file tests are sized for a release build (`cargo test --release`).

#[path = "common/fuse_mount.rs"]
mod fuse_mount;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use fuse_mount::*;

/// The big tests take tens of seconds in a release build; a debug build is far slower.
const STRESS_LIMIT: Duration = Duration::from_secs(300);

fn many_name(i: usize) -> String {
    // Lengths from 6 to 205 bytes, so readdir replies break at ever-different places.
    format!("{i:05}{}", "n".repeat(i % 200))
}

fn ten_thousand_files(flags: &[&str]) {
    let Some(fs) = FuseMount::start_with_limit(flags, STRESS_LIMIT) else {
        return;
    };
    fs::create_dir(fs.via("big")).unwrap();
    let mut expected = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let name = many_name(i);
        // Half created through the mount, half underneath.
        let path = if i % 2 == 0 {
            fs.via("big")
        } else {
            fs.under("big")
        }
        .join(&name);
        fs::write(&path, b"").unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        expected.push(name.into_bytes());
    }
    expected.sort();
    let listed = list_names(&fs.via("big"));
    assert_eq!(
        listed.len(),
        10_000,
        "number of entries listed through the mount"
    );
    assert!(
        listed == expected,
        "names listed through the mount differ from those created"
    );
    let typed = read_dir_types(&fs.via("big")).unwrap();
    assert!(
        typed.iter().all(|(_, t)| *t == libc::DT_REG),
        "every entry is DT_REG"
    );
    fs.finish();
}

#[test]
fn ten_thousand_files_listed_completely() {
    ten_thousand_files(&[]);
}

#[test]
fn ten_thousand_files_listed_completely_without_readdirplus() {
    ten_thousand_files(&["--no-readdirplus"]);
}

fn sha256_of_reader(mut r: impl Read) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).expect("read while hashing");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.finalize().into()
}

#[test]
fn one_gib_file_round_trips_with_the_same_checksum() {
    let Some(fs) = FuseMount::start_with_limit(&[], STRESS_LIMIT) else {
        return;
    };
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 1024;
    let started = Instant::now();
    let fd = open(&fs.via("big.bin"), libc::O_CREAT | libc::O_WRONLY, 0o644).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    for i in 0..CHUNKS {
        fill_pattern(i as u64, &mut buf);
        hasher.update(&buf);
        fd.pwrite_all(&buf, (i * CHUNK) as i64)
            .unwrap_or_else(|e| panic!("write chunk {i} through the mount: {e}"));
    }
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::fsync(fd.raw()) }).expect("fsync");
    fd.close().expect("close");
    let written: [u8; 32] = hasher.finalize().into();
    let write_time = started.elapsed();
    assert_eq!(
        lstat(&fs.under("big.bin")).unwrap().st_size,
        (CHUNK * CHUNKS) as i64
    );
    assert_same_attrs("1 GiB file", &fs.via("big.bin"), &fs.under("big.bin"));
    let via = sha256_of_reader(fs::File::open(fs.via("big.bin")).unwrap());
    let under = sha256_of_reader(fs::File::open(fs.under("big.bin")).unwrap());
    eprintln!(
        "1 GiB: written in {write_time:?}, verified in {:?} total",
        started.elapsed()
    );
    assert!(
        under == written,
        "underlying file's sha256 differs from the data written"
    );
    assert!(
        via == written,
        "sha256 read back through the mount differs from the data written"
    );
    fs.finish();
}

#[test]
fn concurrent_writers_to_disjoint_regions() {
    concurrent_writers(&[], false);
}

/// The same with every write a round trip through berth (`--cache never`, direct I/O): the
/// opens allow parallel direct writes, so on a file already full size the writers' requests
/// run at once; one extending the file still goes alone.
#[test]
fn concurrent_direct_writers_through_berth_to_disjoint_regions() {
    concurrent_writers(&["--cache=never", "--passthrough=never"], true);
    concurrent_writers(&["--cache=never", "--passthrough=never"], false);
}

/// Eight threads write their own odd-sized region of one file in scrambled chunks, half
/// through one shared open file, half through their own; `full_size`: the file is first
/// extended to its final size.
fn concurrent_writers(flags: &[&str], full_size: bool) {
    let Some(fs) = FuseMount::start_with_limit(flags, STRESS_LIMIT) else {
        return;
    };
    const THREADS: usize = 8;
    const REGION: usize = 512 * 1024 + 3;
    let shared_fd = Arc::new(open(&fs.via("c.bin"), libc::O_CREAT | libc::O_RDWR, 0o644).unwrap());
    if full_size {
        // SAFETY: ftruncate on an open descriptor; result checked.
        let rc = unsafe { libc::ftruncate(shared_fd.raw(), (THREADS * REGION) as libc::off_t) };
        assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
    }
    let path = fs.via("c.bin");
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let shared_fd = shared_fd.clone();
            let path = path.clone();
            std::thread::spawn(move || {
                // Odd threads use their own open file, even ones the shared one.
                let own = open(&path, libc::O_RDWR, 0).unwrap();
                let fd = if t % 2 == 1 { &own } else { &*shared_fd };
                let data = pattern(100 + t as u64, REGION);
                let base = t * REGION;
                // Odd-sized chunks in a scrambled order.
                let chunks: Vec<(usize, usize)> = (0..REGION)
                    .step_by(4099)
                    .map(|o| (o, (o + 4099).min(REGION)))
                    .collect();
                for k in 0..chunks.len() {
                    let (a, b) = chunks[(k * 7) % chunks.len()];
                    fd.pwrite_all(&data[a..b], (base + a) as i64).unwrap();
                }
                own.close().unwrap();
            })
        })
        .collect();
    let mut expected = Vec::with_capacity(THREADS * REGION);
    for (t, h) in handles.into_iter().enumerate() {
        h.join().expect("writer thread");
        expected.extend_from_slice(&pattern(100 + t as u64, REGION));
    }
    let fd = Arc::try_unwrap(shared_fd).expect("all threads done");
    fd.close().unwrap();
    // The chunk order is a permutation only if 7 is coprime with the chunk count.
    let chunk_count = REGION.div_ceil(4099);
    assert_ne!(
        chunk_count % 7,
        0,
        "test setup: chunk order must be a permutation"
    );
    assert!(
        read_all(&fs.under("c.bin")) == expected,
        "underlying content after concurrent writes"
    );
    assert!(
        read_all(&fs.via("c.bin")) == expected,
        "content through the mount"
    );
    fs.finish();
}

fn create_files(dir: &Path, dirs: usize, per_dir: usize) {
    for d in 0..dirs {
        let sub = dir.join(format!("d{d}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..per_dir {
            fs::File::create(sub.join(format!("f{f}"))).unwrap();
        }
    }
}

/// Stats every file through the mount; returns the largest daemon fd count seen.
fn stat_all(fs: &FuseMount, dirs: usize, per_dir: usize) -> usize {
    let mut max_fds = fs.daemon_fd_count();
    for d in 0..dirs {
        for f in 0..per_dir {
            let rel = format!("files/d{d}/f{f}");
            lstat(&fs.via(&rel)).unwrap_or_else(|e| {
                panic!(
                    "lstat {rel} through the mount: {e} (daemon fds: {})",
                    fs.daemon_fd_count()
                )
            });
        }
        max_fds = max_fds.max(fs.daemon_fd_count());
    }
    max_fds
}

#[test]
fn daemon_fds_stay_bounded_over_100k_lookups_with_file_handles() {
    let Some(fs) = FuseMount::start_with_limit(
        &["--inode-file-handles", "mandatory", "--cache", "never"],
        STRESS_LIMIT,
    ) else {
        return;
    };
    let started = Instant::now();
    create_files(&fs.under("files"), 100, 1000);
    let baseline = fs.daemon_fd_count();
    let max_fds = stat_all(&fs, 100, 1000);
    eprintln!(
        "100 000 lookups with file handles: fds {baseline} -> max {max_fds}, {:?}",
        started.elapsed()
    );
    assert!(
        max_fds < 1000,
        "the daemon held {max_fds} fds while 100 000 inodes were looked up (baseline {baseline})"
    );
    fs.finish();
}

#[test]
fn never_file_handles_pin_one_fd_per_inode_until_forget() {
    let Some(fs) = FuseMount::start_with_limit(
        &["--inode-file-handles", "never", "--cache", "never"],
        STRESS_LIMIT,
    ) else {
        return;
    };
    const DIRS: usize = 3;
    const PER_DIR: usize = 1000;
    create_files(&fs.under("files"), DIRS, PER_DIR);
    let baseline = fs.daemon_fd_count();
    let max_fds = stat_all(&fs, DIRS, PER_DIR);
    eprintln!("3 000 lookups without file handles: fds {baseline} -> {max_fds}");
    assert!(
        max_fds >= baseline + DIRS * PER_DIR,
        "expected one O_PATH fd per looked-up inode: {baseline} -> {max_fds}"
    );
    // Evicting the inodes sends FORGETs, which must release those descriptors.
    drop_dentry_caches();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = fs.daemon_fd_count();
        if now <= baseline + 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after FORGET the daemon still holds {now} fds (baseline {baseline}, peak {max_fds})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    fs.finish();
}
