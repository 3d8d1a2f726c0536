//! Sequential read throughput of a lazily fetched image (cold and warm cache)
//! against the same erofs image mounted from a fully local blob (the limit) and
//! against raw backend range reads. Needs root. Usage:
//! `berth-image-bench [SIZE_MIB] [BACKEND]` (BACKEND as for `berth image build --backend`; a
//! temporary directory when absent).

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

/// Writes back dirty pages first: drop_caches keeps dirty pages, so without the sync a
/// pass right after a fill (or the build) would read partly from memory and partly race
/// with writeback.
fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
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

fn mount_local(bootstrap: &Path, blob: &Path, mountpoint: &Path) -> Result<()> {
    berth_ondemand::mount::mount_erofs_file(bootstrap, blob, mountpoint).context("mount")
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

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let size_mib: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let work = tempfile::tempdir()?;
    let backend_spec = match args.get(2) {
        Some(spec) => spec.clone(),
        None => format!("file://{}", work.path().join("store").display()),
    };
    let backend: Arc<dyn BlobBackend> = match args.get(2) {
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

    // Raw backend: sequential 4 MiB range reads of the whole object.
    let started = Instant::now();
    let mut offset = 0;
    while offset < report.stored_bytes {
        let end = (offset + (4 << 20)).min(report.stored_bytes);
        backend.read_range(&report.manifest.object, offset..end)?;
        offset = end;
    }
    let raw = report.stored_bytes as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64();

    // The limit: the same image with its blob fully local.
    mount_local(&report.bootstrap_path, &raw_blob, &mountpoint)?;
    drop_caches()?;
    let (local, bytes) = read_tree(&mountpoint)?;
    umount(&mountpoint)?;

    // Lazily fetched, cold, as before read-ahead existed: one chunk per miss.
    let cold_no_readahead = {
        let mut config = CacheConfig::new(work.path().join("cache-no-readahead"));
        config.readahead_max_bytes = 0;
        let engine = Arc::new(CacheEngine::new(config, backend.clone())?);
        let mount = mount_image(MountOptions {
            image: image.clone(),
            mountpoint: mountpoint.clone(),
            engine,
            handler_threads: 4,
        })?;
        drop_caches()?;
        let (cold, _) = read_tree(&mountpoint)?;
        let requests = mount
            .engine()
            .metrics()
            .backend_requests
            .load(std::sync::atomic::Ordering::Relaxed);
        mount.unmount()?;
        (cold, requests)
    };

    // Lazily fetched with the defaults: cold cache, then warm cache (page cache dropped).
    let engine = Arc::new(CacheEngine::new(
        CacheConfig::new(work.path().join("cache")),
        backend.clone(),
    )?);
    let mount = mount_image(MountOptions {
        image: image.clone(),
        mountpoint: mountpoint.clone(),
        engine,
        handler_threads: 4,
    })?;
    drop_caches()?;
    let (cold, _) = read_tree(&mountpoint)?;
    drop_caches()?;
    let (warm, _) = read_tree(&mountpoint)?;
    drop_caches()?;
    let (warm_again, _) = read_tree(&mountpoint)?;
    let requests = mount
        .engine()
        .metrics()
        .backend_requests
        .load(std::sync::atomic::Ordering::Relaxed);
    mount.unmount()?;

    // The same through `berth mount` (supervisor + worker process), if built.
    let supervised = match std::env::current_exe()?.parent().map(|d| d.join("berth")) {
        Some(berth) if berth.is_file() => Some(cold_through_berth_mount(
            &berth,
            &image,
            &mountpoint,
            &work.path().join("cache-berth"),
            &backend_spec,
        )?),
        _ => None,
    };

    println!(
        "image: {} MiB in {FILES} files, blob {} chunks of 1 MiB, backend {}",
        bytes >> 20,
        report.manifest.chunks.len(),
        backend.describe()
    );
    println!("{:<28} {:>10}", "sequential read", "MiB/s");
    println!("{:<28} {:>10.1}", "raw backend (4 MiB ranges)", raw);
    println!("{:<28} {:>10.1}", "erofs, local blob (limit)", local);
    println!(
        "{:<28} {:>10.1}  ({:.2} of limit, {:.2} of raw backend; {} backend reads)",
        "lazy, cold, no read-ahead",
        cold_no_readahead.0,
        cold_no_readahead.0 / local,
        cold_no_readahead.0 / raw,
        cold_no_readahead.1
    );
    println!(
        "{:<28} {:>10.1}  ({:.2} of limit, {:.2} of raw backend; {requests} backend reads)",
        "lazy, cold cache",
        cold,
        cold / local,
        cold / raw
    );
    if let Some(supervised) = supervised {
        println!(
            "{:<28} {:>10.1}  ({:.2} of limit, {:.2} of raw backend)",
            "berth mount, cold cache",
            supervised,
            supervised / local,
            supervised / raw
        );
    }
    println!(
        "{:<28} {:>10.1}  ({:.2} of limit)",
        "lazy, warm cache",
        warm,
        warm / local
    );
    println!(
        "{:<28} {:>10.1}  ({:.2} of limit)",
        "lazy, warm cache, again",
        warm_again,
        warm_again / local
    );
    Ok(())
}
