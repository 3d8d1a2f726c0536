//! `berth image build` and `berth mount`: front ends of the `berth_cache` image builder and
//! lazy mounter.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use anyhow::{anyhow, bail, Context};
use berth_cache::image::manifest_path_of;
use berth_cache::{
    build_image, mount_image, open_backend, BlobBackend, BuildOptions, CacheConfig, CacheEngine,
    CacheError, LocalDirBackend, Manifest, MetricsWriter, MountOptions,
};
use tracing::{error, info, warn};

use crate::cli::{ImageBuildSettings, MountSettings};
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
    let mut options = BuildOptions::new(&settings.source, &settings.out_dir, backend.clone());
    options.chunk_size = settings.chunk_size;
    options.compression = settings.compression;
    options.keep_raw_blob = settings.keep_raw_blob;
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

/// Mounts the image and serves it until a termination signal, then unmounts.
pub fn run_mount(settings: MountSettings, signals: TerminationSignals) -> anyhow::Result<()> {
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
    let image_dir = manifest_path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let backend = backend_or_directory(settings.backend.as_deref(), &image_dir)?;
    let description = backend.describe();
    // A wrong --backend would otherwise mount fine and fail every read with EIO.
    let manifest = Manifest::load(&manifest_path)?;
    let stored_size = backend.size(&manifest.object).with_context(|| {
        format!(
            "the blob of {} is not available from {description}",
            settings.image.display()
        )
    })?;
    let expected_size: u64 = manifest.chunks.iter().map(|c| c.stored_size).sum();
    if stored_size != expected_size {
        bail!(
            "the blob {} in {description} holds {stored_size} bytes, but the image expects \
             {expected_size}",
            manifest.object
        );
    }

    let (signal_sender, received_signal) = mpsc::channel();
    signals.spawn_handler(move |signal| {
        let _ = signal_sender.send(signal);
    })?;

    let mut config = CacheConfig::new(&settings.cache_dir);
    config.capacity_bytes = settings.cache_capacity;
    let engine =
        Arc::new(CacheEngine::new(config, backend).with_context(|| {
            format!("cannot open the cache in {}", settings.cache_dir.display())
        })?);
    let metrics = settings
        .metrics_file
        .map(|path| MetricsWriter::start(engine.metrics(), path, settings.metrics_interval));
    let mountpoint = settings.mountpoint.display();
    let mut handle = mount_image(MountOptions {
        image: settings.image.clone(),
        mountpoint: settings.mountpoint.clone(),
        engine,
        handler_threads: settings.threads,
    })
    .with_context(|| format!("cannot mount {} on {mountpoint}", settings.image.display()))?;
    info!(
        "Mounted {} on {mountpoint}, fetching its data from {description}; stop with SIGINT or SIGTERM.",
        settings.image.display()
    );

    let signal = received_signal
        .recv()
        .map_err(|_| anyhow!("waiting for termination signals failed"))?;
    info!("Received {}; unmounting {mountpoint}.", signal_name(signal));
    // Until the unmount succeeds the fanotify group must stay open: closing it would let
    // reads of missing data through as zeros. So a busy mount is served on and retried.
    let mut told_busy = false;
    loop {
        match handle.try_unmount() {
            Ok(()) => break,
            Err(CacheError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) =>
            {
                if !told_busy {
                    warn!(
                        "{mountpoint} is busy; it stays mounted and served until the files \
                         open in it are closed."
                    );
                    told_busy = true;
                }
            }
            Err(err) => return Err(err).with_context(|| format!("cannot unmount {mountpoint}")),
        }
    }
    drop(handle);
    // Last, so the file ends with the final counts.
    drop(metrics);
    info!("Unmounted {mountpoint}.");
    Ok(())
}
