//! `berth block`: ublk block devices over the block engine (`berth_blockdev`). This
//! module opens the targets the command line names, hands each to the ublk server on its
//! own thread, writes the metrics file and turns SIGTERM into a clean stop.

pub mod args;
mod commit;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use berth_blockdev::ublk::{
    self, DeviceConfig, DeviceStopper, QueueThreadSetup, ServeMode, Started, Transport,
    UblkCounters,
};
use berth_blockdev::{
    DeviceMetrics, ImageTarget, OverlayOptions, OverlayTarget, RawOptions, RawTarget, SharedTarget,
};
use berth_cache::{open_backend, BlobBackend, CacheConfig, CacheEngine, LocalDirBackend, Manifest};
use berth_seccomp::{SeccompAction, ThreadRole};
use serde_json::json;
use tracing::{error, info, warn};

use crate::metrics_file::{merge_families, MetricsFile, MetricsWriter};
use crate::shutdown::{signal_name, TerminationSignals};
use crate::volume::args::{
    DEFAULT_COMPACT_AFTER, DEFAULT_COMPACT_BELOW, DEFAULT_MAX_DIRTY, DEFAULT_UPLOAD_MEMORY,
    DEFAULT_UPLOAD_STREAMS,
};
use crate::volume::{
    check_volume_served_writable, is_volume_spec, open_volume, VolumeServeSettings,
};
pub use args::BlockCommand;
use args::{AddArgs, DelArgs, ListArgs, RecoverArgs, TransportArg};
use berth_volume::{Durability, Volume};

/// Everything needed to open a device's target again (stored with the device for
/// `berth block recover`).
#[derive(Debug, Clone, PartialEq)]
struct DeviceDescription {
    target: PathBuf,
    overlay: Option<PathBuf>,
    read_only: bool,
    cache_dir: PathBuf,
    backend: Option<String>,
    readahead: u64,
    block_size: u32,
    transport: Transport,
    queues: u16,
    depth: u16,
    max_io: u32,
    recovery: bool,
    force_registration_fallback: bool,
    /// How the target is served when it is a volume (`volume:LOCATION`).
    volume: Option<VolumeServeSettings>,
}

impl DeviceDescription {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "target": self.target,
            "overlay": self.overlay,
            "read_only": self.read_only,
            "cache_dir": self.cache_dir,
            "backend": self.backend,
            "readahead": self.readahead,
            "block_size": self.block_size,
            "transport": self.transport.name(),
            "queues": self.queues,
            "depth": self.depth,
            "max_io": self.max_io,
            "recovery": self.recovery,
            "force_registration_fallback": self.force_registration_fallback,
            "volume": self.volume.as_ref().map(|v| json!({
                "dir": v.volume_dir,
                "durability": v.durability.name(),
                "upload_interval": v.upload_interval.as_secs(),
                "upload_streams": v.upload_streams,
                "upload_memory": v.upload_memory,
                "max_dirty_bytes": v.max_dirty_bytes,
                "upload_rate": v.upload_rate,
                "cache_bytes": v.cache_bytes,
                "compact_below": v.compact_below,
                "compact_after_bytes": v.compact_after_bytes,
            })),
        })
    }

    fn from_json(value: &serde_json::Value) -> anyhow::Result<Self> {
        let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        let number = |key: &str| value.get(key).and_then(|v| v.as_u64());
        let flag = |key: &str| value.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
        let missing = |key: &str| anyhow!("the stored description lacks `{key}`");
        Ok(Self {
            target: text("target")
                .map(PathBuf::from)
                .ok_or_else(|| missing("target"))?,
            overlay: text("overlay").map(PathBuf::from),
            read_only: flag("read_only"),
            cache_dir: text("cache_dir")
                .map(PathBuf::from)
                .ok_or_else(|| missing("cache_dir"))?,
            backend: text("backend"),
            readahead: number("readahead").unwrap_or(4 << 20),
            block_size: number("block_size")
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(4096),
            transport: text("transport")
                .as_deref()
                .and_then(Transport::from_name)
                .ok_or_else(|| missing("transport"))?,
            queues: number("queues")
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| missing("queues"))?,
            depth: number("depth")
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| missing("depth"))?,
            max_io: number("max_io")
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| missing("max_io"))?,
            recovery: flag("recovery"),
            force_registration_fallback: flag("force_registration_fallback"),
            volume: match value.get("volume").filter(|v| !v.is_null()) {
                None => None,
                Some(volume) => Some(VolumeServeSettings {
                    volume_dir: volume
                        .get("dir")
                        .and_then(|v| v.as_str())
                        .map(PathBuf::from)
                        .ok_or_else(|| missing("volume.dir"))?,
                    durability: volume
                        .get("durability")
                        .and_then(|v| v.as_str())
                        .and_then(Durability::from_name)
                        .ok_or_else(|| missing("volume.durability"))?,
                    upload_interval: Duration::from_secs(
                        volume
                            .get("upload_interval")
                            .and_then(|v| v.as_u64())
                            .unwrap_or(5),
                    ),
                    upload_streams: volume
                        .get("upload_streams")
                        .and_then(|v| v.as_u64())
                        .map_or(usize::from(DEFAULT_UPLOAD_STREAMS), |n| {
                            n.clamp(1, 64) as usize
                        }),
                    // Devices stored before these settings existed get the defaults.
                    upload_memory: volume
                        .get("upload_memory")
                        .and_then(|v| v.as_u64())
                        .map_or(DEFAULT_UPLOAD_MEMORY, |n| n.max(1 << 20)),
                    max_dirty_bytes: volume
                        .get("max_dirty_bytes")
                        .and_then(|v| v.as_u64())
                        .map_or(DEFAULT_MAX_DIRTY, |n| n.max(1 << 20)),
                    upload_rate: volume
                        .get("upload_rate")
                        .and_then(|v| v.as_u64())
                        .map(|n| n.max(64 << 10)),
                    cache_bytes: volume.get("cache_bytes").and_then(|v| v.as_u64()),
                    // Null: stored with compaction off.
                    compact_below: match volume.get("compact_below") {
                        None => Some(DEFAULT_COMPACT_BELOW),
                        Some(v) => v.as_f64().filter(|f| *f > 0.0 && *f <= 1.0),
                    },
                    compact_after_bytes: volume
                        .get("compact_after_bytes")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(DEFAULT_COMPACT_AFTER),
                }),
            },
        })
    }
}

/// The manifest of `image`: the file itself, or `manifest.json` inside the directory.
pub(crate) fn manifest_path_of(image: &Path) -> PathBuf {
    if image.is_dir() {
        image.join("manifest.json")
    } else {
        image.to_path_buf()
    }
}

/// Whether `path` names an image (a directory with a manifest, or a manifest).
pub(crate) fn is_image(path: &Path) -> bool {
    manifest_path_of(path).is_file()
        && (path.is_dir() || path.extension().is_some_and(|e| e == "json"))
}

/// Cache engines of this process, one per cache directory and backend.
#[derive(Default)]
pub(crate) struct Engines(Mutex<HashMap<(PathBuf, String), Arc<CacheEngine>>>);

impl Engines {
    fn get(
        &self,
        cache_dir: &Path,
        backend: Arc<dyn BlobBackend>,
        key: String,
        readahead: u64,
    ) -> anyhow::Result<Arc<CacheEngine>> {
        let mut engines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(engine) = engines.get(&(cache_dir.to_path_buf(), key.clone())) {
            return Ok(engine.clone());
        }
        let mut config = CacheConfig::new(cache_dir);
        config.readahead_max_bytes = readahead;
        // Disk images are mostly free space, stored as tiny compressed zero chunks: merging
        // a miss until a backend read covers 1 MiB *stored* would pull in (and write out)
        // hundreds of MiB of zeros for one block. Fetch what is read, plus read-ahead.
        config.merge_min_bytes = 0;
        let engine = Arc::new(
            CacheEngine::new(config, backend)
                .with_context(|| format!("cannot open the cache in {}", cache_dir.display()))?,
        );
        engines.insert((cache_dir.to_path_buf(), key), engine.clone());
        Ok(engine)
    }

    pub(crate) fn all(&self) -> Vec<Arc<CacheEngine>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Opens the target a description names.
fn open_target(desc: &DeviceDescription, engines: &Engines) -> anyhow::Result<SharedTarget> {
    let settings = args::TargetArgs {
        cache_dir: desc.cache_dir.clone(),
        backend: desc.backend.clone(),
        readahead: desc.readahead,
        block_size: desc.block_size,
        // Not read: a volume description is opened with open_volume, never here.
        volume: Default::default(),
    };
    open_target_from(
        &desc.target,
        desc.overlay.as_deref(),
        desc.read_only,
        &settings,
        engines,
    )
}

/// Opens `target` (an image or a file / block device) with `overlay` over it, as the block
/// engine serves it to every transport.
pub(crate) fn open_target_from(
    target: &Path,
    overlay: Option<&Path>,
    read_only: bool,
    settings: &args::TargetArgs,
    engines: &Engines,
) -> anyhow::Result<SharedTarget> {
    let base = open_base_target(target, read_only || overlay.is_some(), settings, engines)?;
    match overlay {
        Some(path) => {
            let (overlay, recovery) =
                OverlayTarget::open(path, base, &OverlayOptions::default())
                    .with_context(|| format!("cannot open the overlay {}", path.display()))?;
            info!(overlay = %path.display(), ?recovery, "Opened the overlay.");
            Ok(Arc::new(overlay))
        }
        None => Ok(base),
    }
}

/// Opens `target` (an image or a file / block device) alone, as the block engine serves
/// it (an image is always read-only).
pub(crate) fn open_base_target(
    target: &Path,
    read_only: bool,
    settings: &args::TargetArgs,
    engines: &Engines,
) -> anyhow::Result<SharedTarget> {
    let base: SharedTarget = if is_image(target) {
        let manifest_path = manifest_path_of(target);
        let manifest = Manifest::load(&manifest_path)
            .with_context(|| format!("cannot load the image {}", target.display()))?;
        let image_dir = manifest_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let (backend, key): (Arc<dyn BlobBackend>, String) = match &settings.backend {
            Some(spec) => (open_backend(spec)?, spec.clone()),
            None => (
                Arc::new(LocalDirBackend::new(&image_dir)),
                image_dir.display().to_string(),
            ),
        };
        let engine = engines.get(&settings.cache_dir, backend, key, settings.readahead)?;
        let blob = engine
            .open_blob(&manifest)
            .with_context(|| format!("cannot open the blob of {}", target.display()))?;
        Arc::new(ImageTarget::new(blob, settings.block_size))
    } else {
        Arc::new(
            RawTarget::open(
                target,
                &RawOptions {
                    read_only,
                    block_size: settings.block_size,
                    direct: false,
                },
            )
            .with_context(|| format!("cannot open {}", target.display()))?,
        )
    };
    Ok(base)
}

/// One device being served.
struct Served {
    name: Mutex<String>,
    target: SharedTarget,
    /// The same target when it is a volume (for its own metrics).
    volume: Option<Arc<Volume>>,
    metrics: Arc<DeviceMetrics>,
    counters: Arc<UblkCounters>,
}

/// Every device's, volume's and engine's metrics, as one exposition.
fn render_metrics(devices: &[Arc<Served>], engines: &Engines) -> String {
    let mut text = String::new();
    for (i, device) in devices.iter().enumerate() {
        let name = device
            .name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        device
            .metrics
            .render(&name, &*device.target, i == 0, &mut text);
        let manual = device
            .counters
            .manual_registrations
            .load(std::sync::atomic::Ordering::Relaxed);
        if i == 0 {
            text.push_str("# HELP berth_block_ublk_manual_registrations_total Zero-copy requests whose buffer berth registered itself (UBLK_IO_F_NEED_REG_BUF).\n# TYPE berth_block_ublk_manual_registrations_total counter\n");
        }
        text.push_str(&format!(
            "berth_block_ublk_manual_registrations_total{{device=\"{name}\"}} {manual}\n"
        ));
        if let Some(volume) = &device.volume {
            volume.render_metrics(&name, true, &mut text);
        }
    }
    for engine in engines.all() {
        text.push_str(&engine.render_prometheus());
    }
    merge_families(&text)
}

fn transport_for(arg: TransportArg) -> anyhow::Result<Transport> {
    let features = ublk::driver_features().ok_or_else(|| {
        anyhow!("the ublk driver does not answer (is the ublk_drv module loaded? `modprobe ublk_drv`; Linux 6.0 or later)")
    })?;
    let wanted = match arg {
        TransportArg::Auto => None,
        TransportArg::ZeroCopy => Some(Transport::ZeroCopy),
        TransportArg::UserCopy => Some(Transport::UserCopy),
        TransportArg::Copy => Some(Transport::Copy),
    };
    let transport = ublk::choose_transport(wanted, features)?;
    info!(
        features = format!("{features:#x}"),
        transport = transport.name(),
        "The ublk driver answered."
    );
    Ok(transport)
}

/// Serves `devices` (description, mode, id) until every one of them is gone; SIGTERM and
/// SIGINT stop them all.
fn serve_devices(
    devices: Vec<(DeviceDescription, ServeMode, i32)>,
    metrics_file: Option<PathBuf>,
    metrics_interval: Duration,
    seccomp: SeccompAction,
    signals: TerminationSignals,
) -> anyhow::Result<()> {
    let metrics_file = metrics_file.as_deref().map(MetricsFile::open).transpose()?;
    // Queue threads keep no capabilities and only their role's system calls.
    let confine = QueueThreadSetup(Arc::new(move |_queue| {
        berth_seccomp::drop_thread_capabilities().map_err(|e| e.to_string())?;
        berth_seccomp::install_filter(ThreadRole::UblkQueue, seccomp).map_err(|e| e.to_string())
    }));
    let engines = Arc::new(Engines::default());
    // Each started device's control handle, opened by its control thread: the signal
    // thread stops them through a control ring of its own set up before it confines itself.
    let stoppers: Arc<Mutex<Vec<DeviceStopper>>> = Arc::default();
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stoppers = stoppers.clone();
        let stopping = stopping.clone();
        let confine_signals = move || match ublk::prepare_control_ring() {
            Ok(()) => {
                if let Err(err) = berth_seccomp::install_filter(ThreadRole::UblkSignals, seccomp) {
                    warn!("The signal thread runs unconfined: {err}.");
                }
            }
            // Left unconfined, it can still set up a ring when it must stop the devices.
            Err(err) => warn!("The signal thread runs unconfined: {err}."),
        };
        signals.spawn_handler_after(confine_signals, move |signal| {
            stopping.store(true, std::sync::atomic::Ordering::SeqCst);
            let stoppers = stoppers.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<u32> = stoppers.iter().map(DeviceStopper::id).collect();
            info!(
                "Received {}; stopping devices {ids:?}.",
                signal_name(signal)
            );
            for stopper in stoppers.iter() {
                if let Err(err) = stopper.stop() {
                    warn!("Cannot stop ublk device {}: {err}.", stopper.id());
                }
            }
        })?;
    }
    let mut served = Vec::new();
    let mut threads = Vec::new();
    for (desc, mode, id) in devices {
        let opened = {
            let (desc, engines) = (desc.clone(), engines.clone());
            open_on_engine_thread(seccomp, &stopping, move || match &desc.volume {
                Some(settings) => {
                    let volume = open_volume(&desc.target.to_string_lossy(), settings)?;
                    Ok((volume.clone() as SharedTarget, Some(volume)))
                }
                None => Ok((open_target(&desc, &engines)?, None)),
            })?
        };
        let Some((target, volume)) = opened else {
            info!(
                "Stopping before {} was open; serving no more devices.",
                desc.target.display()
            );
            break;
        };
        let device = Arc::new(Served {
            name: Mutex::new(format!("ublk{id}")),
            target: target.clone(),
            volume,
            metrics: Arc::new(DeviceMetrics::new(desc.transport.name())),
            counters: Arc::default(),
        });
        served.push(device.clone());
        let config = DeviceConfig {
            id,
            queues: desc.queues,
            depth: desc.depth,
            max_io_bytes: desc.max_io,
            transport: desc.transport,
            recovery: desc.recovery,
            description: desc.to_json(),
            force_registration_fallback: desc.force_registration_fallback,
            queue_thread_setup: Some(confine.clone()),
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Started, String>>();
        let failed_tx = ready_tx.clone();
        let stoppers = stoppers.clone();
        let name_slot = device.clone();
        let thread = std::thread::Builder::new()
            .name("berth-ublk-ctrl".into())
            .spawn(move || {
                let on_started = move |started: &Started| {
                    // Opened before this thread's filter forbids opening anything.
                    match DeviceStopper::open(started.id) {
                        Ok(stopper) => stoppers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(stopper),
                        Err(err) => warn!(
                            "SIGTERM will not stop ublk device {} (delete it with `berth block \
                             del`): {err}.",
                            started.id
                        ),
                    }
                    // From here on this thread only waits for the queues and then stops
                    // and deletes the device on the control ring it already has.
                    if let Err(err) =
                        berth_seccomp::install_filter(ThreadRole::UblkControl, seccomp)
                    {
                        warn!(
                            "The control thread of ublk device {} runs unconfined: {err}.",
                            started.id
                        );
                    }
                    *name_slot.name.lock().unwrap_or_else(|e| e.into_inner()) =
                        format!("ublkb{}", started.id);
                    let _ = ready_tx.send(Ok(started.clone()));
                };
                ublk::serve(
                    &config,
                    mode,
                    target,
                    device.metrics.clone(),
                    device.counters.clone(),
                    on_started,
                )
                .map_err(|err| {
                    let message = format!("{:#}", anyhow::Error::from(err));
                    let _ = failed_tx.send(Err(message.clone()));
                    anyhow!(message)
                })
            })
            .context("cannot start a device thread")?;
        match ready_rx.recv() {
            Ok(Ok(started)) => {
                println!(
                    "ublk device {} {} transport={} target={}",
                    started.id,
                    started.block_device,
                    started.transport.name(),
                    served
                        .last()
                        .map(|d| d.target.info().description.clone())
                        .unwrap_or_default()
                );
                info!(id = started.id, device = %started.block_device, transport = started.transport.name(), "Serving.");
            }
            Ok(Err(message)) => {
                let _ = thread.join();
                bail!("cannot serve {}: {message}", desc.target.display());
            }
            Err(_) => {
                let outcome = thread.join();
                bail!(
                    "the device thread for {} ended early: {outcome:?}",
                    desc.target.display()
                );
            }
        }
        threads.push(thread);
    }
    // Every device is started: what is left here is waiting, the metrics file, and closing
    // the targets (an overlay's last writes, a volume's uploads), all the engine's calls.
    berth_seccomp::install_filter(ThreadRole::BlockEngine, seccomp)
        .context("cannot confine the main thread")?;
    let metrics_writer = match metrics_file {
        Some(file) => {
            let served = served.clone();
            let engines = engines.clone();
            Some(MetricsWriter::start(file, metrics_interval, move || {
                render_metrics(&served, &engines)
            })?)
        }
        None => None,
    };
    let mut failures = 0;
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                error!("{err}");
                failures += 1;
            }
            Err(_) => failures += 1,
        }
    }
    // The last write of the metrics file, with every request counted.
    drop(metrics_writer);
    // Overlays commit and close cleanly as their targets drop here.
    drop(served);
    if failures > 0 {
        bail!("{failures} device(s) failed");
    }
    Ok(())
}

/// Opens a device's target on a thread of its own under the block engine's filter, so that
/// the threads an image's cache engine or a volume starts inherit it, while this thread
/// watches `stopping`: a termination signal during a slow open (a bucket that does not
/// answer) answers `None` at once instead of after the open (the thread is left to the
/// process's exit).
fn open_on_engine_thread<T: Send + 'static>(
    seccomp: SeccompAction,
    stopping: &std::sync::atomic::AtomicBool,
    open: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<Option<T>> {
    let (opened_tx, opened) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("berth-blk-open".into())
        .spawn(move || {
            let outcome = berth_seccomp::install_filter(ThreadRole::BlockEngine, seccomp)
                .context("cannot confine the thread opening the target")
                .and_then(|()| open());
            let _ = opened_tx.send(outcome);
        })
        .context("cannot start a thread to open the target")?;
    loop {
        if stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        match opened.recv_timeout(Duration::from_millis(100)) {
            Ok(outcome) => return outcome.map(Some),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the thread opening the target ended without an answer")
            }
        }
    }
}

fn run_add(args: AddArgs, signals: TerminationSignals) -> anyhow::Result<()> {
    if !args.overlay.is_empty() && args.overlay.len() != args.targets.len() {
        bail!(
            "give one --overlay per target ({} targets, {} overlays)",
            args.targets.len(),
            args.overlay.len()
        );
    }
    if args.id.is_some() && (args.targets.len() != 1 || args.count != 1) {
        bail!("--id needs exactly one target and --count 1");
    }
    if args.count > 1 && (!args.readonly || !args.overlay.is_empty()) {
        bail!("--count exports a target several times: only with --readonly and without --overlay");
    }
    let max_io = u32::try_from(args.max_io)
        .ok()
        .filter(|n| n.is_power_of_two() && (4096..=(1 << 20)).contains(n))
        .ok_or_else(|| anyhow!("--max-io must be a power of two from 4K to 1M"))?;
    let transport = transport_for(args.transport)?;
    let features = ublk::driver_features().unwrap_or(0);
    let recovery = !args.no_recovery && ublk::supports_recovery(features);
    if !args.no_recovery && !recovery {
        warn!("The ublk driver cannot recover devices (no UBLK_F_USER_RECOVERY_REISSUE): they fail if berth dies.");
    }
    let mut devices = Vec::new();
    for (i, target) in args.targets.iter().enumerate() {
        if is_volume_spec(&target.to_string_lossy()) {
            check_volume_served_writable(
                &target.to_string_lossy(),
                args.readonly,
                args.overlay.get(i).is_some(),
            )?;
            // Checked now, so that a typo fails before any device is created.
            berth_volume::Location::parse(&target.to_string_lossy())?;
            let desc = DeviceDescription {
                target: target.clone(),
                overlay: None,
                read_only: false,
                cache_dir: args.target.cache_dir.clone(),
                backend: None,
                readahead: args.target.readahead,
                block_size: args.target.block_size,
                transport,
                queues: args.queues,
                depth: args.depth,
                max_io,
                recovery,
                force_registration_fallback: args.force_registration_fallback,
                volume: Some(VolumeServeSettings::from(&args.target.volume)),
            };
            devices.push((desc, ServeMode::Add, args.id.map_or(-1, |id| id as i32)));
            continue;
        }
        let target = std::fs::canonicalize(target)
            .with_context(|| format!("cannot find {}", target.display()))?;
        let overlay = match args.overlay.get(i) {
            Some(path) => {
                // An absolute path, so that `recover` finds it from anywhere.
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let dir = std::fs::canonicalize(dir)
                    .with_context(|| format!("cannot find the directory of {}", path.display()))?;
                Some(
                    dir.join(
                        path.file_name()
                            .ok_or_else(|| anyhow!("{} is not a file name", path.display()))?,
                    ),
                )
            }
            None => None,
        };
        if is_image(&target) && overlay.is_none() && !args.readonly {
            info!(
                "{} is an image: exported read-only (give --overlay to write).",
                target.display()
            );
        }
        let desc = DeviceDescription {
            read_only: args.readonly || (is_image(&target) && overlay.is_none()),
            target,
            overlay,
            cache_dir: args.target.cache_dir.clone(),
            backend: args.target.backend.clone(),
            readahead: args.target.readahead,
            block_size: args.target.block_size,
            transport,
            queues: args.queues,
            depth: args.depth,
            max_io,
            recovery,
            force_registration_fallback: args.force_registration_fallback,
            volume: None,
        };
        for _ in 0..args.count {
            devices.push((
                desc.clone(),
                ServeMode::Add,
                args.id.map_or(-1, |id| id as i32),
            ));
        }
    }
    serve_devices(
        devices,
        args.metrics_file,
        Duration::from_secs(args.metrics_interval),
        args.seccomp,
        signals,
    )
}

fn run_recover(args: RecoverArgs, signals: TerminationSignals) -> anyhow::Result<()> {
    let mut devices = Vec::new();
    for id in &args.ids {
        let stored = ublk::stored_description(*id)?;
        let desc = DeviceDescription::from_json(&stored)
            .with_context(|| format!("cannot recover ublk device {id}"))?;
        let (state, pid) = ublk::device_state(*id)?;
        if state != "quiesced" {
            warn!(
                id,
                state,
                pid,
                "The device is not waiting for a new server; trying to recover it anyway."
            );
        }
        devices.push((desc, ServeMode::Recover, *id as i32));
    }
    serve_devices(
        devices,
        args.metrics_file,
        Duration::from_secs(args.metrics_interval),
        args.seccomp,
        signals,
    )
}

fn run_list(args: ListArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for id in ublk::device_ids() {
        let (state, pid) = ublk::device_state(id).unwrap_or_else(|_| ("unknown".into(), 0));
        let desc = ublk::stored_description(id).ok();
        rows.push(json!({
            "id": id,
            "device": format!("/dev/ublkb{id}"),
            "state": state,
            "pid": pid,
            "berth": desc,
        }));
    }
    if args.json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<4} {:<14} {:<10} {:<8} {:<10} TARGET",
        "ID", "DEVICE", "STATE", "PID", "TRANSPORT"
    );
    for row in rows {
        let berth = &row["berth"];
        let mut target = berth["target"]
            .as_str()
            .unwrap_or("(not berth)")
            .to_string();
        if let Some(overlay) = berth["overlay"].as_str() {
            target.push_str(&format!(" + overlay {overlay}"));
        }
        println!(
            "{:<4} {:<14} {:<10} {:<8} {:<10} {}",
            row["id"],
            row["device"].as_str().unwrap_or(""),
            row["state"].as_str().unwrap_or(""),
            row["pid"],
            berth["transport"].as_str().unwrap_or("-"),
            target
        );
    }
    Ok(())
}

fn run_del(args: DelArgs) -> anyhow::Result<()> {
    for id in args.ids {
        ublk::delete_device(id).with_context(|| format!("cannot delete ublk device {id}"))?;
        println!("deleted ublk device {id}");
    }
    Ok(())
}

/// `berth image build --block`: a block image through the shared blob writer.
pub fn run_block_build(
    settings: &crate::image::args::ImageBuildSettings,
    fs: crate::image::args::BlockFs,
    size: Option<u64>,
    backend: Arc<dyn BlobBackend>,
) -> anyhow::Result<()> {
    use berth_blockdev::build::{build_block_image, BlockBuildOptions, Filesystem};
    let options = BlockBuildOptions {
        source: settings.source.clone(),
        out_dir: settings.out_dir.clone(),
        filesystem: match fs {
            crate::image::args::BlockFs::Ext4 => Filesystem::Ext4,
            crate::image::args::BlockFs::Erofs => Filesystem::Erofs,
        },
        size,
        layout: berth_cache::BlobLayout {
            chunk_size: settings.chunk_size,
            compression: settings.compression,
        },
        backend: backend.clone(),
        object_prefix: "blobs".into(),
        keep_disk_image: settings.keep_raw_blob,
    };
    let report = build_block_image(&options).with_context(|| {
        format!(
            "cannot build a block image from {}",
            settings.source.display()
        )
    })?;
    let manifest = &report.manifest;
    println!(
        "Built block image {}: blob {} of {} bytes in {} chunks, {} bytes stored as {} in {}.",
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

/// Runs a `berth block` subcommand.
pub fn run(command: BlockCommand, signals: TerminationSignals) -> anyhow::Result<()> {
    match command {
        BlockCommand::Add(args) => run_add(args, signals),
        BlockCommand::Recover(args) => run_recover(args, signals),
        BlockCommand::List(args) => signals.restore_default().and_then(|()| run_list(args)),
        BlockCommand::Del(args) => signals.restore_default().and_then(|()| run_del(args)),
        BlockCommand::ServeVhost(args) => crate::vhost_blk::run(args, signals),
        BlockCommand::Commit(args) => commit::run(args, signals),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_survives_its_json_round_trip() {
        let desc = DeviceDescription {
            target: "/srv/img".into(),
            overlay: Some("/srv/ov".into()),
            read_only: false,
            cache_dir: "/var/cache/berth".into(),
            backend: Some("s3://b/p".into()),
            readahead: 123,
            block_size: 512,
            transport: Transport::UserCopy,
            queues: 4,
            depth: 64,
            max_io: 1 << 19,
            recovery: true,
            force_registration_fallback: false,
            volume: None,
        };
        assert_eq!(DeviceDescription::from_json(&desc.to_json()).unwrap(), desc);
        let volume = DeviceDescription {
            target: "volume:s3://bucket/vol".into(),
            overlay: None,
            volume: Some(VolumeServeSettings {
                volume_dir: "/var/lib/berth/volumes".into(),
                durability: Durability::Object,
                upload_interval: Duration::from_secs(7),
                upload_streams: 3,
                upload_memory: 48 << 20,
                max_dirty_bytes: 256 << 20,
                upload_rate: Some(8 << 20),
                cache_bytes: Some(1 << 30),
                compact_below: Some(0.25),
                compact_after_bytes: 8 << 20,
            }),
            ..desc.clone()
        };
        assert_eq!(
            DeviceDescription::from_json(&volume.to_json()).unwrap(),
            volume,
            "a volume device keeps how it is served, for `recover`"
        );
        let mut uncompacted = volume.clone();
        if let Some(settings) = uncompacted.volume.as_mut() {
            settings.compact_below = None;
        }
        assert_eq!(
            DeviceDescription::from_json(&uncompacted.to_json()).unwrap(),
            uncompacted,
            "compaction turned off stays off"
        );
        let err = DeviceDescription::from_json(&json!({"target": "/x"})).unwrap_err();
        assert!(err.to_string().contains("cache_dir"), "{err}");
    }
}
