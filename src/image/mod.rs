//! `berth image build`, `inspect` and `check`, and `berth mount`: front ends of the
//! `berth_ondemand` image builder and lazy mounter, and of the cache's blob check. Their
//! flags live in [`args`].

pub mod args;
pub mod fscache;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use berth_cache::check::check_blob;
use berth_cache::{
    open_backend, BlobBackend, CacheConfig, CacheEngine, LocalDirBackend, Manifest, MetricsWriter,
};
use berth_ondemand::image::manifest_path_of;
use berth_ondemand::supervise::{
    run_worker, supervise, ShutdownSignal, SupervisorOptions, WorkerCommand, WorkerFds,
    WorkerOptions,
};
use berth_ondemand::{build_image, BuildOptions};
use clap::ValueEnum;
use tracing::{error, info};

use crate::image::args::{
    ImageBuildSettings, ImageCheckSettings, ImageInspectSettings, MountMode, MountSettings,
    PrefetchMode,
};
use crate::shutdown::{signal_name, TerminationSignals};

/// The backend named on the command line, or else the directory `default_dir`.
fn backend_or_directory(
    spec: Option<&str>,
    default_dir: &Path,
) -> berth_cache::Result<Arc<dyn BlobBackend>> {
    match spec {
        Some(spec) => open_backend(spec),
        None => Ok(Arc::new(LocalDirBackend::new(default_dir))),
    }
}

/// The directory of an image's manifest: where its bootstrap lies, and its default
/// backend.
fn image_dir_of(manifest_path: &Path) -> PathBuf {
    manifest_path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Builds the image and uploads its blob; prints a one-line summary on stdout.
pub fn run_build(settings: ImageBuildSettings, signals: TerminationSignals) -> anyhow::Result<()> {
    let out_dir = settings.out_dir.clone();
    // The termination signals are blocked in every thread, so without a handler a build
    // could not be interrupted.
    signals.spawn_handler(move |signal| {
        error!(
            "Received {}; the image in {} is incomplete.",
            signal_name(signal),
            out_dir.display()
        );
        std::process::exit(1);
    })?;
    if !settings.source.exists() {
        bail!("the source {} does not exist", settings.source.display());
    }
    let backend = backend_or_directory(settings.backend.as_deref(), &settings.out_dir)?;
    if let Some((fs, size)) = settings.block {
        return crate::block::run_block_build(&settings, fs, size, backend);
    }
    let mut options = BuildOptions::new(&settings.source, &settings.out_dir, backend.clone());
    options.chunk_size = settings.chunk_size;
    options.compression = settings.compression;
    options.keep_raw_blob = settings.keep_raw_blob;
    options.prefetch_list = settings.prefetch_list.clone();
    options.progress = std::io::stderr().is_terminal();
    let report = build_image(&options)
        .with_context(|| format!("cannot build an image from {}", settings.source.display()))?;
    let manifest = &report.manifest;
    println!(
        "Built {}: blob {} of {} bytes in {} chunks, {} bytes stored as {} in {}.",
        settings.out_dir.display(),
        manifest.blob_id,
        manifest.blob_size,
        manifest.chunks.len(),
        report.stored_bytes,
        manifest.object,
        backend.describe()
    );
    Ok(())
}

/// `berth image inspect`: the image's manifest in short, or per path the blob chunks
/// holding its data (tab-separated: path, chunk count, chunk ranges).
pub fn run_inspect(settings: ImageInspectSettings) -> anyhow::Result<()> {
    let manifest_path = manifest_path_of(&settings.image);
    let manifest = Manifest::load(&manifest_path)?;
    if settings.paths.is_empty() {
        println!("blob\t{}", manifest.blob_id);
        println!("object\t{}", manifest.object);
        println!("size\t{}", manifest.blob_size);
        println!("stored\t{}", manifest.stored_size());
        println!("chunk_size\t{}", manifest.chunk_size);
        println!("chunks\t{}", manifest.chunk_count());
        println!("compression\t{:?}", manifest.compression);
        println!("prefetch_entries\t{}", manifest.prefetch.len());
        return Ok(());
    }
    let bootstrap = image_dir_of(&manifest_path).join(&manifest.bootstrap);
    let erofs = berth_ondemand::erofs::ErofsImage::open(&bootstrap)?;
    for path in &settings.paths {
        let Some(ranges) = erofs.data_ranges(path)? else {
            bail!("{path} is not in the image");
        };
        let mut chunks: Vec<u64> = ranges
            .into_iter()
            .flat_map(|range| manifest.chunks_of(range))
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        let mut spans: Vec<String> = Vec::new();
        let mut at = 0;
        while at < chunks.len() {
            let start = chunks[at];
            let mut end = start;
            while at + 1 < chunks.len() && chunks[at + 1] == end + 1 {
                at += 1;
                end += 1;
            }
            spans.push(if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            });
            at += 1;
        }
        println!("{path}\t{}\t{}", chunks.len(), spans.join(","));
    }
    Ok(())
}

/// `berth image check`: every chunk of the image's blob read from its backend and checked
/// against its digest. Prints a one-line summary with the rate; each chunk that is not
/// intact is logged by name and fails the command.
pub fn run_check(settings: ImageCheckSettings) -> anyhow::Result<()> {
    let manifest_path = manifest_path_of(&settings.image);
    let manifest = Manifest::load(&manifest_path)?;
    let backend = backend_or_directory(settings.backend.as_deref(), &image_dir_of(&manifest_path))?;
    let description = backend.describe();
    let report = check_blob(&manifest, backend.as_ref(), settings.jobs).with_context(|| {
        format!(
            "cannot check the blob of {} in {description}",
            settings.image.display()
        )
    })?;
    for chunk in &report.bad {
        error!("{}", chunk.error);
    }
    if !report.bad.is_empty() {
        bail!(
            "{} of the {} chunks of blob {} in {description} are not intact",
            report.bad.len(),
            report.chunks,
            manifest.blob_id
        );
    }
    let seconds = report.elapsed.as_secs_f64();
    println!(
        "Checked blob {} in {description}: {} chunks, {} bytes ({} stored) in {} reads, \
         {seconds:.2} s ({:.1} MiB/s) with {} job{}; every chunk matches its digest.",
        manifest.blob_id,
        report.chunks,
        report.raw_bytes,
        report.stored_bytes,
        report.reads,
        report.raw_bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        settings.jobs,
        if settings.jobs == 1 { "" } else { "s" }
    );
    Ok(())
}

/// `berth mount`: the supervisor, which mounts the image and keeps it fail-closed while
/// a worker child process (this binary again, with `--internal-worker`) fetches the data;
/// see `berth_ondemand::supervise`.
pub fn run_mount(settings: MountSettings, signals: TerminationSignals) -> anyhow::Result<()> {
    if settings.internal_worker {
        return run_mount_worker(settings, signals);
    }
    let manifest_path = manifest_path_of(&settings.image);
    if !manifest_path.is_file() {
        bail!(
            "{} is not an image: {} does not exist",
            settings.image.display(),
            manifest_path.display()
        );
    }
    if !settings.mountpoint.is_dir() {
        bail!(
            "the mount point {} is not a directory",
            settings.mountpoint.display()
        );
    }
    match choose_mode(&settings) {
        MountMode::Fscache => fscache::run_mount_fscache(settings, signals),
        _ => run_mount_fanotify(settings, signals),
    }
}

/// The mode `--mode auto` stands for on this kernel, said in the log.
fn choose_mode(settings: &MountSettings) -> MountMode {
    if settings.mode != MountMode::Auto {
        return settings.mode;
    }
    let scratch = &settings.cache_dir;
    let fanotify = std::fs::create_dir_all(scratch)
        .map_err(|e| format!("cannot create {}: {e}", scratch.display()))
        .and_then(|()| berth_ondemand::mount::fanotify_available(scratch));
    match fanotify {
        Ok(()) => {
            info!("Mode fanotify: the kernel has fanotify pre-content events.");
            MountMode::Fanotify
        }
        Err(why) if berth_ondemand::cachefiles::device::available() => {
            info!("Mode fscache: {why}; the kernel has cachefiles.");
            MountMode::Fscache
        }
        Err(why) => {
            info!("Mode fanotify, although {why}: the kernel has no cachefiles either.");
            MountMode::Fanotify
        }
    }
}

/// `berth mount --mode fanotify`.
fn run_mount_fanotify(settings: MountSettings, signals: TerminationSignals) -> anyhow::Result<()> {
    let manifest_path = manifest_path_of(&settings.image);
    if !manifest_path.is_file() {
        bail!(
            "{} is not an image: {} does not exist",
            settings.image.display(),
            manifest_path.display()
        );
    }
    if !settings.mountpoint.is_dir() {
        bail!(
            "the mount point {} is not a directory",
            settings.mountpoint.display()
        );
    }
    Manifest::load(&manifest_path)?;
    let shutdown = ShutdownSignal::new()?;
    let trigger = shutdown.clone();
    signals.spawn_handler(move |signal| {
        // First: logging can fail (a closed stderr pipe makes tracing panic).
        trigger.trigger();
        info!("Received {}; unmounting.", signal_name(signal));
    })?;
    let program = std::env::current_exe().context("cannot find the berth executable")?;
    let mountpoint = settings.mountpoint.display().to_string();
    let options = SupervisorOptions {
        image: settings.image.clone(),
        mountpoint: settings.mountpoint.clone(),
        cache_dir: settings.cache_dir.clone(),
        kernel_readahead: settings.kernel_readahead,
        worker: WorkerCommand {
            program,
            args: worker_args(&settings),
        },
        shutdown,
    };
    supervise(options)
        .with_context(|| format!("cannot serve {} on {mountpoint}", settings.image.display()))?;
    info!("Unmounted {mountpoint}.");
    Ok(())
}

/// The worker's command line: the same mount settings, plus the internal flag.
fn worker_args(settings: &MountSettings) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "mount".into(),
        settings.image.clone().into(),
        settings.mountpoint.clone().into(),
        "--internal-worker".into(),
        "--cache-dir".into(),
        settings.cache_dir.clone().into(),
        format!("--threads={}", settings.threads).into(),
        format!("--readahead={}", settings.readahead).into(),
        format!(
            "--prefetch={}",
            match settings.prefetch {
                PrefetchMode::None => "none",
                PrefetchMode::List => "list",
                PrefetchMode::All => "all",
            }
        )
        .into(),
        format!("--metrics-interval={}", settings.metrics_interval.as_secs()).into(),
    ];
    if let Some(capacity) = settings.cache_capacity {
        args.push(format!("--cache-capacity={capacity}").into());
    }
    if let Some(backend) = &settings.backend {
        args.push(format!("--backend={backend}").into());
    }
    if let Some(path) = &settings.metrics_file {
        args.push("--metrics-file".into());
        args.push(path.clone().into());
    }
    if let Some(level) = settings.process.log_level {
        if let Some(value) = level.to_possible_value() {
            args.push(format!("--log-level={}", value.get_name()).into());
        }
    }
    if settings.process.syslog {
        args.push("--syslog".into());
    }
    args
}

/// The mount worker: opens the cache and serves the supervisor's requests.
fn run_mount_worker(settings: MountSettings, signals: TerminationSignals) -> anyhow::Result<()> {
    // SAFETY: first thing in a process started by the supervisor, which installed
    // descriptors 3 to 5 for it; nothing in this process has opened files yet that
    // could hold those numbers.
    let fds = unsafe { WorkerFds::inherited() };
    let first = fds.data.is_none();
    let manifest_path = manifest_path_of(&settings.image);
    let backend = backend_or_directory(settings.backend.as_deref(), &image_dir_of(&manifest_path))?;
    let description = backend.describe();
    let manifest = Manifest::load(&manifest_path)?;
    if first {
        // A wrong --backend would otherwise mount fine and fail every read with EIO.
        manifest
            .check_stored_object(backend.as_ref())
            .with_context(|| {
                format!(
                    "the blob of {} is not available from {description} as the image describes it",
                    settings.image.display()
                )
            })?;
    }
    // The supervisor coordinates shutdown; a signal only matters after a takeover.
    let shutdown = ShutdownSignal::new()?;
    let trigger = shutdown.clone();
    signals.spawn_handler(move |_| trigger.trigger())?;
    let mut config = CacheConfig::new(&settings.cache_dir);
    config.capacity_bytes = settings.cache_capacity;
    config.readahead_max_bytes = settings.readahead;
    let engine =
        Arc::new(CacheEngine::new(config, backend).with_context(|| {
            format!("cannot open the cache in {}", settings.cache_dir.display())
        })?);
    let metrics = MetricsWriter::start_logging(
        engine.metrics(),
        settings.metrics_file.clone(),
        settings.metrics_interval,
    );
    let mut prefetch: Vec<std::ops::Range<u64>> = Vec::new();
    if settings.prefetch != PrefetchMode::None {
        for entry in &manifest.prefetch {
            prefetch.extend(entry.ranges.iter().map(|&[start, end]| start..end));
        }
    }
    if settings.prefetch == PrefetchMode::All {
        prefetch.push(0..manifest.blob_size);
    }
    run_worker(
        WorkerOptions {
            image: settings.image.clone(),
            mountpoint: settings.mountpoint.clone(),
            engine,
            threads: settings.threads,
            prefetch,
            shutdown,
        },
        fds,
    )
    .with_context(|| format!("cannot serve {}", settings.image.display()))?;
    // Last, so the file ends with the final counts.
    drop(metrics);
    Ok(())
}
