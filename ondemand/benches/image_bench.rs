//! Sequential read throughput of a lazily fetched image (cold and warm cache)
//! against the same erofs image mounted from a fully local blob (the limit) and
//! against raw backend range reads. Needs root. Usage:
//! `berth-image-bench [SIZE_MIB] [BACKEND] [--rounds=N] [--kernel-readahead=BYTES]` (BACKEND as
//! for `berth image build
//! --backend`; a temporary directory when absent). The raw, limit and cold passes are repeated
//! `N` times (default 3), interleaved, and reported as medians; ratios are taken against the
//! best raw backend and limit passes, so that load on the machine never flatters them.
//!
//! In a VM with free page reporting (virtio-balloon), the pages `drop_caches` frees go back
//! to the hypervisor within seconds, and the next pass pays a host fault for every page it
//! touches again: the limit pass then reads at a fraction of its speed, depending on how long
//! after the drop it starts, and the lazy passes, which touch more fresh memory per byte
//! (page cache, cache file, fetch buffers), lose more. So reporting is paused for the run
//! (`page_reporting_order` set past the largest order, restored at exit) and memory that
//! was reported before is touched once (up to 4 GiB, half of what is available), unless
//! `--keep-page-reporting` is given; what was reported during the run is printed.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use berth_cache::{open_backend, BlobBackend, CacheConfig, CacheEngine, LocalDirBackend};
use berth_ondemand::{build_image, mount_image, BuildOptions, MountOptions};

const FILES: usize = 4;

const USAGE: &str = "usage: berth-image-bench [SIZE_MIB] [BACKEND] [--rounds=N] \
                     [--kernel-readahead=BYTES] [--keep-page-reporting]
  SIZE_MIB   image data in MiB (default 256)
  BACKEND    a backend as for `berth image build --backend` (default: a temporary directory)
  --rounds=N                 raw, limit and cold passes, interleaved (default 3; medians)
  --kernel-readahead=BYTES   read-ahead window of every erofs mount (default berth's, 4 MiB)
  --keep-page-reporting      leave virtio-balloon free page reporting on
Needs root.";

/// Writes back dirty pages first: drop_caches keeps dirty pages, so without the sync a
/// pass right after a fill (or the build) would read partly from memory and partly race
/// with writeback.
fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

/// CPU time used by this process so far (all threads), in seconds.
fn process_cpu_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into our own timespec; the clock id is a constant the kernel knows.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

/// Reads every file under `root` sequentially in 1 MiB reads; returns MiB/s.
fn read_tree(root: &Path) -> Result<(f64, u64)> {
    let started = Instant::now();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for index in 0..FILES {
        let mut file = std::fs::File::open(root.join(format!("f{index}")))?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok((
        total as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64(),
        total,
    ))
}

fn mount_local(bootstrap: &Path, blob: &Path, mountpoint: &Path, readahead: u64) -> Result<()> {
    berth_ondemand::mount::mount_erofs_file(bootstrap, blob, mountpoint, readahead).context("mount")
}

fn umount(mountpoint: &Path) -> Result<()> {
    let target = CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        bail!("umount: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A cold pass through `berth mount` run as an operator would (a separate process).
fn cold_through_berth_mount(
    berth: &Path,
    image: &Path,
    mountpoint: &Path,
    cache: &Path,
    backend: &str,
) -> Result<f64> {
    let mut child = std::process::Command::new(berth)
        .arg("mount")
        .arg(image)
        .arg(mountpoint)
        .arg("--cache-dir")
        .arg(cache)
        .arg(format!("--backend={backend}"))
        .arg("--log-level=warn")
        .spawn()
        .context("starting berth mount")?;
    let wanted = mountpoint.to_string_lossy().into_owned();
    let started = Instant::now();
    while !std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
    {
        if child.try_wait()?.is_some() || started.elapsed().as_secs() > 60 {
            bail!("berth mount did not mount");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop_caches()?;
    let (cold, _) = read_tree(mountpoint)?;
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    child.wait()?;
    Ok(cold)
}

/// One pass: MiB/s and the CPU seconds this process spent in it (readers, fanotify
/// handlers, fetch workers; not kernel writeback threads).
#[derive(Debug, Clone, Copy)]
struct Pass {
    mib_s: f64,
    cpu_s: f64,
}

fn timed(pass: impl FnOnce() -> Result<f64>) -> Result<Pass> {
    let cpu = process_cpu_seconds();
    let mib_s = pass()?;
    Ok(Pass {
        mib_s,
        cpu_s: process_cpu_seconds() - cpu,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Median MiB/s, median CPU seconds and the range of MiB/s of `passes`.
fn summary(passes: &[Pass]) -> String {
    let speeds: Vec<f64> = passes.iter().map(|p| p.mib_s).collect();
    let low = speeds.iter().copied().fold(f64::INFINITY, f64::min);
    let high = speeds.iter().copied().fold(0.0, f64::max);
    format!(
        "{:>10.1} {:>7.3}  [{low:.0}–{high:.0}]",
        median(speeds.clone()),
        median(passes.iter().map(|p| p.cpu_s).collect()),
    )
}

fn best(passes: &[Pass]) -> f64 {
    passes.iter().map(|p| p.mib_s).fold(0.0, f64::max)
}

/// The median of `passes` against the best of `against`: a reference pass slowed down
/// by the machine's other load does not flatter the ratio.
fn ratio(passes: &[Pass], against: &[Pass]) -> f64 {
    median(passes.iter().map(|p| p.mib_s).collect()) / best(against)
}

/// The median of `passes` against the lesser of the best raw backend and the best
/// limit pass (the goal's base).
fn goal_ratio(passes: &[Pass], raw: &[Pass], local: &[Pass]) -> f64 {
    median(passes.iter().map(|p| p.mib_s).collect()) / best(raw).min(best(local))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut rounds = 3usize;
    // The limit's mount and the lazy ones get the same window: berth's default.
    let mut kernel_readahead = berth_ondemand::readahead::DEFAULT_KERNEL_READAHEAD;
    let mut keep_page_reporting = false;
    let mut positional = Vec::new();
    for arg in std::env::args().skip(1) {
        if arg == "-h" || arg == "--help" {
            println!("{USAGE}");
            return Ok(());
        }
        if arg == "--keep-page-reporting" {
            keep_page_reporting = true;
            continue;
        }
        if let Some(bytes) = arg.strip_prefix("--kernel-readahead=") {
            kernel_readahead = bytes.parse().context("--kernel-readahead (bytes)")?;
            continue;
        }
        match arg.strip_prefix("--rounds=") {
            Some(n) => rounds = n.parse::<usize>().context("--rounds")?.max(1),
            None if arg.starts_with('-') => bail!("unknown option {arg}\n{USAGE}"),
            None => positional.push(arg),
        }
    }
    let size_mib: usize = positional
        .first()
        .map(|s| s.parse())
        .transpose()
        .with_context(|| format!("SIZE_MIB is a whole number of MiB\n{USAGE}"))?
        .unwrap_or(256);
    let reporting_paused = if keep_page_reporting {
        None
    } else {
        berth_testkit::memory::PageReportingPause::start()
    };
    if reporting_paused.is_some() {
        berth_testkit::memory::touch_free_memory();
    }
    let reported_at_start = berth_testkit::memory::reported_kib();
    let work = tempfile::tempdir()?;
    let backend_spec = match positional.get(1) {
        Some(spec) => spec.clone(),
        None => format!("file://{}", work.path().join("store").display()),
    };
    let backend: Arc<dyn BlobBackend> = match positional.get(1) {
        Some(spec) => open_backend(spec)?,
        None => Arc::new(LocalDirBackend::new(work.path().join("store"))),
    };
    let source = work.path().join("src");
    std::fs::create_dir_all(&source)?;
    let per_file = size_mib * (1 << 20) / FILES;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for index in 0..FILES {
        let mut data = Vec::with_capacity(per_file);
        while data.len() < per_file {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            data.extend_from_slice(&state.to_le_bytes());
        }
        std::fs::write(source.join(format!("f{index}")), &data)?;
    }
    let image = work.path().join("image");
    let report = build_image(&BuildOptions::new(&source, &image, backend.clone()))?;
    let raw_blob: PathBuf = report.raw_blob_path.clone().context("raw blob kept")?;
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir_all(&mountpoint)?;
    let berth = std::env::current_exe()?
        .parent()
        .map(|d| d.join("berth"))
        .filter(|berth| berth.is_file());

    let (mut raw, mut local, mut cold_no_readahead, mut cold, mut supervised) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut requests_no_readahead, mut requests, mut misses) = (0, 0, 0);
    let mut bytes = 0;
    let mut warm_mount = None;
    for round in 0..rounds {
        // The limit: the same image with its blob fully local.
        mount_local(
            &report.bootstrap_path,
            &raw_blob,
            &mountpoint,
            kernel_readahead,
        )?;
        drop_caches()?;
        local.push(timed(|| {
            let (speed, read) = read_tree(&mountpoint)?;
            bytes = read;
            Ok(speed)
        })?);
        umount(&mountpoint)?;

        // Raw backend: sequential 4 MiB range reads of the whole object, as cold as the
        // lazy passes find it.
        drop_caches()?;
        raw.push(timed(|| {
            let started = Instant::now();
            let mut offset = 0;
            while offset < report.stored_bytes {
                let end = (offset + (4 << 20)).min(report.stored_bytes);
                backend.read_range(&report.manifest.object, offset..end)?;
                offset = end;
            }
            Ok(report.stored_bytes as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64())
        })?);

        // A fanotify mount of the image on `mountpoint`, fetching through `engine`, with
        // the page cache dropped.
        let mount_cold = |engine: Arc<CacheEngine>| -> Result<_> {
            let mount = mount_image(MountOptions {
                image: image.clone(),
                mountpoint: mountpoint.clone(),
                engine,
                handler_threads: 4,
                kernel_readahead,
            })?;
            drop_caches()?;
            Ok(mount)
        };
        // Lazily fetched, cold, as before read-ahead existed: one chunk per miss.
        let cache_dir = work.path().join("cache-no-readahead");
        let mut config = CacheConfig::new(&cache_dir);
        config.readahead_max_bytes = 0;
        let engine = Arc::new(CacheEngine::new(config, backend.clone())?);
        let mount = mount_cold(engine)?;
        cold_no_readahead.push(timed(|| Ok(read_tree(&mountpoint)?.0))?);
        requests_no_readahead = mount
            .engine()
            .metrics()
            .backend_requests
            .load(std::sync::atomic::Ordering::Relaxed);
        mount.unmount()?;
        std::fs::remove_dir_all(&cache_dir)?;

        // Lazily fetched with the defaults, cold cache.
        let cache_dir = work.path().join("cache");
        if cache_dir.exists() {
            std::fs::remove_dir_all(&cache_dir)?;
        }
        let engine = Arc::new(CacheEngine::new(
            CacheConfig::new(&cache_dir),
            backend.clone(),
        )?);
        let mount = mount_cold(engine)?;
        cold.push(timed(|| Ok(read_tree(&mountpoint)?.0))?);
        let metrics = mount.engine().metrics();
        requests = metrics
            .backend_requests
            .load(std::sync::atomic::Ordering::Relaxed);
        // Chunks a reader found missing (being fetched, or fetched by the reader itself):
        // the read-ahead did not keep ahead of it there.
        misses = metrics
            .chunk_misses
            .load(std::sync::atomic::Ordering::Relaxed);
        if round + 1 == rounds {
            warm_mount = Some(mount);
        } else {
            mount.unmount()?;
        }

        eprintln!(
            "round {round}: raw {:.0}, limit {:.0} ({:.3} CPU s), cold without read-ahead {:.0}, cold {:.0} ({:.3} CPU s) MiB/s",
            raw[round].mib_s,
            local[round].mib_s,
            local[round].cpu_s,
            cold_no_readahead[round].mib_s,
            cold[round].mib_s,
            cold[round].cpu_s
        );
        // The same through `berth mount` (supervisor + worker process), if built.
        if let Some(berth) = &berth {
            let cache_dir = work.path().join("cache-berth");
            match cold_through_berth_mount(berth, &image, &mountpoint, &cache_dir, &backend_spec) {
                Ok(speed) => supervised.push(speed),
                Err(err) => eprintln!("round {round}: the berth mount pass failed: {err:#}"),
            }
            if cache_dir.exists() {
                std::fs::remove_dir_all(&cache_dir)?;
            }
        }
    }

    // Warm: the last round's in-process mount, page cache dropped, twice.
    let mount = warm_mount.context("no round ran")?;
    drop_caches()?;
    let warm = timed(|| Ok(read_tree(&mountpoint)?.0))?;
    drop_caches()?;
    let warm_again = timed(|| Ok(read_tree(&mountpoint)?.0))?;
    mount.unmount()?;

    println!(
        "image: {} MiB in {FILES} files, blob {} chunks of 1 MiB, backend {}; {rounds} rounds; \
         kernel read-ahead {} KiB on every erofs mount",
        bytes >> 20,
        report.manifest.chunks.len(),
        backend.describe(),
        kernel_readahead / 1024
    );
    println!(
        "{:<28} {:>10} {:>7}  [range]",
        "sequential read (median)", "MiB/s", "CPU s"
    );
    println!("{:<28} {}", "raw backend (4 MiB ranges)", summary(&raw));
    println!("{:<28} {}", "erofs, local blob (limit)", summary(&local));
    println!(
        "{:<28} {}  {:.2} of limit, {:.2} of raw, {:.2} of goal base; {requests_no_readahead} backend reads",
        "lazy, cold, no read-ahead",
        summary(&cold_no_readahead),
        ratio(&cold_no_readahead, &local),
        ratio(&cold_no_readahead, &raw),
        goal_ratio(&cold_no_readahead, &raw, &local),
    );
    println!(
        "{:<28} {}  {:.2} of limit, {:.2} of raw, {:.2} of goal base; {requests} backend reads, {misses} chunks missed",
        "lazy, cold cache",
        summary(&cold),
        ratio(&cold, &local),
        ratio(&cold, &raw),
        goal_ratio(&cold, &raw, &local),
    );
    if !supervised.is_empty() {
        let supervised: Vec<Pass> = supervised
            .into_iter()
            .map(|mib_s| Pass {
                mib_s,
                cpu_s: f64::NAN,
            })
            .collect();
        println!(
            "{:<28} {}  {:.2} of limit, {:.2} of raw, {:.2} of goal base",
            "berth mount, cold cache",
            summary(&supervised),
            ratio(&supervised, &local),
            ratio(&supervised, &raw),
            goal_ratio(&supervised, &raw, &local),
        );
    }
    println!(
        "{:<28} {:>10.1} {:>7.3}  {:.2} of limit",
        "lazy, warm cache",
        warm.mib_s,
        warm.cpu_s,
        warm.mib_s / best(&local)
    );
    println!(
        "{:<28} {:>10.1} {:>7.3}  {:.2} of limit",
        "lazy, warm cache, again",
        warm_again.mib_s,
        warm_again.cpu_s,
        warm_again.mib_s / best(&local)
    );
    println!(
        "(ratios: median against the best raw backend and limit passes; goal base: the lesser of those two)"
    );
    println!(
        "free memory reported to the hypervisor during the run: {} MiB",
        berth_testkit::memory::reported_kib().saturating_sub(reported_at_start) >> 10
    );
    Ok(())
}
