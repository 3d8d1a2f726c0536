//! `berth fscache` (the host's cachefiles on-demand server: supervisor, and the worker
//! it re-executes with `--internal-worker`) and `berth mount --mode fscache` (a client
//! that hands its image to that server, starting one when none runs); see
//! `berth_ondemand::cachefiles`.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use berth_cache::{CacheConfig, CacheEngine, Manifest, MetricsWriter};
use berth_ondemand::cachefiles::client::{absolute, mount_until_stopped};
use berth_ondemand::cachefiles::server::{serve, valid_key, ServerOptions};
use berth_ondemand::cachefiles::worker::{
    inherited_socket, run_worker, RoutedBackend, WorkerOptions,
};
use berth_ondemand::cachefiles::{ImageSpec, Prefetch};
use berth_ondemand::image::manifest_path_of;
use berth_ondemand::supervise::{ShutdownSignal, WorkerCommand};
use clap::ValueEnum;
use tracing::info;

use crate::cli::ProcessSettings;
use crate::image::args::{EngineSettings, FscacheSettings, MountSettings, PrefetchMode};
use crate::shutdown::{signal_name, TerminationSignals};

/// `berth fscache` arguments that start the same engine (for the worker, or for a
/// server `berth mount` starts).
fn fscache_args(
    cachefiles_dir: &Path,
    engine: &EngineSettings,
    process: &ProcessSettings,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "fscache".into(),
        "--cachefiles-dir".into(),
        cachefiles_dir.into(),
        "--cache-dir".into(),
        engine.cache_dir.clone().into(),
        format!("--threads={}", engine.threads).into(),
        format!("--readahead={}", engine.readahead).into(),
        format!("--metrics-interval={}", engine.metrics_interval.as_secs()).into(),
    ];
    if let Some(capacity) = engine.cache_capacity {
        args.push(format!("--cache-capacity={capacity}").into());
    }
    if let Some(path) = &engine.metrics_file {
        args.push("--metrics-file".into());
        args.push(path.clone().into());
    }
    if let Some(value) = process.log_level.and_then(|l| l.to_possible_value()) {
        args.push(format!("--log-level={}", value.get_name()).into());
    }
    if process.syslog {
        args.push("--syslog".into());
    }
    args
}

fn berth_executable() -> anyhow::Result<std::path::PathBuf> {
    std::env::current_exe().context("cannot find the berth executable")
}

/// `berth fscache`: the server, or (with `--internal-worker`) its worker.
pub fn run_fscache(settings: FscacheSettings, signals: TerminationSignals) -> anyhow::Result<()> {
    if settings.internal_worker {
        return run_worker_process(settings, signals);
    }
    let shutdown = ShutdownSignal::new()?;
    let trigger = shutdown.clone();
    signals.spawn_handler(move |signal| {
        trigger.trigger();
        info!(
            "Received {}; unmounting every image served.",
            signal_name(signal)
        );
    })?;
    let mut args = fscache_args(
        &settings.cachefiles_dir,
        &settings.engine,
        &settings.process,
    );
    args.push("--internal-worker".into());
    let dir = settings.cachefiles_dir.display().to_string();
    serve(ServerOptions {
        cachefiles_dir: settings.cachefiles_dir.clone(),
        worker: WorkerCommand {
            program: berth_executable()?,
            args,
        },
        shutdown,
        exit_when_idle: settings.exit_when_idle,
    })
    .with_context(|| format!("cannot serve images over cachefiles in {dir}"))
}

fn run_worker_process(
    settings: FscacheSettings,
    signals: TerminationSignals,
) -> anyhow::Result<()> {
    // SAFETY: first thing in a process the supervisor started with its socket at fd 3;
    // nothing here has opened files yet.
    let socket = unsafe { inherited_socket() }?;
    // The supervisor coordinates shutdown; a signal stops the worker.
    signals.spawn_handler(|_| std::process::exit(0))?;
    let engine = &settings.engine;
    let mut config = CacheConfig::new(&engine.cache_dir);
    config.capacity_bytes = engine.cache_capacity;
    config.readahead_max_bytes = engine.readahead;
    let backends = Arc::new(RoutedBackend::default());
    let cache = Arc::new(
        CacheEngine::new(config, backends.clone())
            .with_context(|| format!("cannot open the cache in {}", engine.cache_dir.display()))?,
    );
    let metrics = MetricsWriter::start_logging(
        cache.metrics(),
        engine.metrics_file.clone(),
        engine.metrics_interval,
    );
    run_worker(
        WorkerOptions {
            engine: cache,
            backends,
            threads: engine.threads,
        },
        socket,
    )?;
    drop(metrics);
    Ok(())
}

/// `berth mount --mode fscache`.
pub fn run_mount_fscache(
    settings: MountSettings,
    signals: TerminationSignals,
) -> anyhow::Result<()> {
    let manifest_path = manifest_path_of(&settings.image);
    Manifest::load(&manifest_path)?;
    for (what, key) in [
        ("--fsid", settings.fsid.as_ref()),
        ("--domain-id", settings.domain_id.as_ref()),
    ] {
        if let Some(key) = key {
            if !valid_key(key) {
                bail!("{what} `{key}` is not usable: 1 to 128 letters, digits, `-`, `_` or `.`");
            }
        }
    }
    let shutdown = ShutdownSignal::new()?;
    let trigger = shutdown.clone();
    signals.spawn_handler(move |signal| {
        trigger.trigger();
        info!("Received {}; unmounting.", signal_name(signal));
    })?;
    let mut args = fscache_args(
        &settings.cachefiles_dir,
        &settings.engine(),
        &settings.process,
    );
    args.push("--exit-when-idle".into());
    let server = WorkerCommand {
        program: berth_executable()?,
        args,
    };
    let spec = ImageSpec {
        image: absolute(&settings.image)?,
        mountpoint: absolute(&settings.mountpoint)?,
        backend: settings.backend.clone(),
        prefetch: match settings.prefetch {
            PrefetchMode::None => Prefetch::None,
            PrefetchMode::List => Prefetch::List,
            PrefetchMode::All => Prefetch::All,
        },
        fsid: settings.fsid.clone(),
        domain_id: settings.domain_id.clone(),
        kernel_readahead: settings.kernel_readahead,
    };
    let mountpoint = settings.mountpoint.display().to_string();
    mount_until_stopped(&settings.cachefiles_dir, &server, spec, &shutdown)
        .with_context(|| format!("cannot serve {} on {mountpoint}", settings.image.display()))?;
    info!("Unmounted {mountpoint}.");
    Ok(())
}
