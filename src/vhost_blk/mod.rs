//! `berth block serve-vhost`: the block engine (`berth_blockdev`) as a vhost-user-blk
//! backend, for QEMU's `vhost-user-blk-pci` and VMMs like it.
//!
//! [`request`] decodes and serves one virtio-blk request from a descriptor chain,
//! [`device`] is the vhost-user backend around it (features, configuration space, queue
//! threads), and this module opens the target, the socket, confines the process and serves
//! one frontend connection.
//!
//! Confinement: the target, its overlay and the socket are opened first; a file or block
//! device target then enters the `--sandbox` (by default new mount, pid and network
//! namespaces with the target's directory as the root), which an image skips (it opens its
//! cache's chunk files by path as it fetches, maybe over the network), and so does a volume
//! (`volume:LOCATION`: its bucket and its local write-ahead log and cache). Every queue thread
//! drops all capabilities and installs the vhost-user-blk queue filter (block I/O on the
//! target's descriptors and the cache's files, no sockets, no exec), the control thread the
//! vhost-user control filter, and the main thread the main filter.

pub mod args;
pub mod device;
mod metrics;
pub mod request;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use berth_seccomp::{SandboxConfig, SandboxMode, SeccompAction, ThreadRole};
use tracing::info;

use crate::block::{is_image, open_target_from, Engines};
use crate::shutdown::{signal_name, TerminationSignals};
use crate::volume::{
    check_volume_served_writable, is_volume_spec, open_volume, VolumeServeSettings,
};
use args::ServeVhostArgs;
use berth_blockdev::{DeviceMetrics, SharedTarget};
use berth_volume::Volume;
use device::{BlkBackend, BlkOptions};
use metrics::{MetricsFile, MetricsWriter};
use std::sync::mpsc;

/// An absolute path for `path`, whose directory must exist (the file need not).
fn absolute_in_existing_dir(path: &Path) -> anyhow::Result<PathBuf> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("cannot find the directory of {}", path.display()))?;
    Ok(dir.join(
        path.file_name()
            .ok_or_else(|| anyhow!("{} is not a file name", path.display()))?,
    ))
}

/// The serial number a target gets unless `--serial` names one: its file name, cut to fit.
fn default_serial(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "berth".into());
    let mut serial = String::new();
    for c in name.chars() {
        if serial.len() + c.len_utf8() > request::SERIAL_LEN {
            break;
        }
        serial.push(c);
    }
    serial
}

/// The target of a `serve-vhost`, open, with what its serial and confinement depend on.
struct OpenedTarget {
    target: SharedTarget,
    /// What the serial defaults to (its last path component).
    name: String,
    /// The directory the sandbox is rooted at, or why the target is served without one.
    sandbox_root: Result<PathBuf, String>,
    /// The cache engines an image target fetches through, kept for as long as it is served.
    engines: Engines,
    /// The target when it is a volume: closed at exit (what is left uploaded, the lease
    /// given back), since the signal thread keeps a reference to the target for ever.
    volume: Option<VolumeCloser>,
    /// The same volume, for its counters in the metrics file.
    volume_metrics: Option<Arc<Volume>>,
}

/// Closes a volume from a thread started before any seccomp filter: closing records the
/// volume's local state (directories made, files renamed into place), which the main
/// thread's filter does not allow, as the volume's own threads do unconfined.
#[derive(Clone)]
struct VolumeCloser {
    requests: mpsc::Sender<CloseReply>,
}

/// Where the closing thread answers one request.
type CloseReply = mpsc::Sender<Result<(), String>>;

impl VolumeCloser {
    fn start(volume: Arc<Volume>) -> anyhow::Result<Self> {
        let (requests, received) = mpsc::channel::<CloseReply>();
        std::thread::Builder::new()
            .name("berth-vol-close".into())
            .spawn(move || {
                while let Ok(reply) = received.recv() {
                    let _ = reply.send(volume.close().map_err(|e| format!("{e:#}")));
                }
            })
            .context("cannot start the volume's closing thread")?;
        Ok(Self { requests })
    }

    /// Uploads what is left (for at most the volume's drain timeout), gives the lease back
    /// and stops the volume's threads; a second call does nothing.
    fn close(&self) -> anyhow::Result<()> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .send(reply)
            .map_err(|_| anyhow!("the volume's closing thread is gone"))?;
        answer
            .recv()
            .map_err(|_| anyhow!("the volume's closing thread is gone"))?
            .map_err(|e| anyhow!("closing the volume failed: {e}"))
    }
}

/// Opens an image, or a file or block device, with its overlay.
fn open_path_target(target: &Path, args: &ServeVhostArgs) -> anyhow::Result<OpenedTarget> {
    let target = std::fs::canonicalize(target)
        .with_context(|| format!("cannot find {}", target.display()))?;
    let overlay = args
        .overlay
        .as_deref()
        .map(absolute_in_existing_dir)
        .transpose()?;
    if args.readonly && overlay.is_some() {
        return Err(anyhow!(
            "--overlay makes the device writable: leave out --readonly or the overlay"
        ));
    }
    let image = is_image(&target);
    if image && overlay.is_none() && !args.readonly {
        info!(
            "{} is an image: exported read-only (give --overlay to write).",
            target.display()
        );
    }
    let read_only = args.readonly || (image && overlay.is_none());
    let engines = Engines::default();
    let block_target = open_target_from(
        &target,
        overlay.as_deref(),
        read_only,
        &args.target_options,
        &engines,
    )?;
    let sandbox_root = if image {
        Err(format!(
            "{} is an image: served without a sandbox (its chunks are fetched and cached by path).",
            target.display()
        ))
    } else {
        Ok(target.parent().unwrap_or(Path::new("/")).to_path_buf())
    };
    Ok(OpenedTarget {
        target: block_target,
        name: target.display().to_string(),
        sandbox_root,
        engines,
        volume_metrics: None,
        volume: None,
    })
}

/// Opens a volume (`volume:LOCATION`) for writing: takes its lease and replays its local
/// write-ahead log first, as `berth block add` does.
fn open_volume_target(spec: &str, args: &ServeVhostArgs) -> anyhow::Result<OpenedTarget> {
    check_volume_served_writable(spec, args.readonly, args.overlay.is_some())?;
    let volume = open_volume(
        spec,
        &VolumeServeSettings::from(&args.target_options.volume),
    )?;
    let closer = VolumeCloser::start(volume.clone())?;
    Ok(OpenedTarget {
        target: volume.clone(),
        name: spec.trim_end_matches('/').to_string(),
        sandbox_root: Err(format!(
            "{spec} is a volume: served without a sandbox (it reaches its bucket and keeps its local state by path)."
        )),
        engines: Engines::default(),
        volume_metrics: Some(volume.clone()),
        volume: Some(closer),
    })
}

/// Runs `berth block serve-vhost`.
pub fn run(args: ServeVhostArgs, signals: TerminationSignals) -> anyhow::Result<()> {
    if args.print_capabilities {
        println!("{}", args::capabilities_json());
        return Ok(());
    }
    let target = args
        .target_path()
        .ok_or_else(|| anyhow!("give the image, file or volume to export"))?;
    let opened = match target.to_str().filter(|spec| is_volume_spec(spec)) {
        Some(spec) => open_volume_target(spec, &args)?,
        None => open_path_target(target, &args)?,
    };
    let block_target = opened.target.clone();
    let info = block_target.info().clone();
    info!(
        target = %info.description,
        size = info.size,
        block_size = info.block_size,
        read_only = info.read_only,
        "Opened the target."
    );

    let (listener, socket_file) = match (&args.socket_path, args.fd) {
        (_, Some(fd)) => (crate::vhost_user::listener_from_fd(fd)?, None),
        (Some(path), None) => {
            let (listener, file) = crate::vhost_user::listener_at_path(path, None)?;
            (listener, Some(Arc::new(file)))
        }
        (None, None) => return Err(anyhow!("one of --socket-path or --fd is required")),
    };
    let serial = args
        .serial
        .clone()
        .unwrap_or_else(|| default_serial(Path::new(&opened.name)));
    let seccomp = args.seccomp;
    let metrics_file = args
        .metrics_file
        .as_deref()
        .map(MetricsFile::open)
        .transpose()?;
    // Everything is open and, but for a volume's own (which then has no sandbox), no thread
    // exists yet, as the namespaces need.
    if args.sandbox != SandboxMode::None {
        match &opened.sandbox_root {
            Err(why) => info!("{why}"),
            Ok(root) => {
                berth_seccomp::enter_sandbox(&SandboxConfig {
                    mode: args.sandbox,
                    shared_dir: root.clone(),
                    uid_map: Vec::new(),
                    gid_map: Vec::new(),
                    supervisor_seccomp: seccomp,
                })
                .context("cannot enter the sandbox")?;
            }
        }
    }
    let device_metrics = Arc::new(DeviceMetrics::new("vhost-user"));
    let backend = Arc::new(BlkBackend::new(
        block_target.clone(),
        BlkOptions {
            queues: args.queues,
            max_queue_size: args.queue_size,
            serial,
            seccomp,
            metrics: device_metrics.clone(),
        },
    )?);
    let render = {
        let target = block_target.clone();
        let name = opened.name.clone();
        let engines = opened.engines.all();
        let volume = opened.volume_metrics.clone();
        move || {
            let mut text = String::new();
            device_metrics.render(&name, target.as_ref(), true, &mut text);
            if let Some(volume) = &volume {
                volume.render_metrics(&name, true, &mut text);
            }
            for engine in &engines {
                text.push_str(&engine.render_prometheus());
            }
            text
        }
    };
    let metrics_interval = Duration::from_secs(args.metrics_interval);
    let metrics_writer = Arc::new(Mutex::new(None));
    let metrics_slot = metrics_writer.clone();
    let socket_for_signals = socket_file.clone();
    let target_for_signals = block_target.clone();
    let volume_for_signals = opened.volume.clone();
    let result = device::serve(backend, listener, move || {
        confine_main_thread(seccomp)?;
        // Started after the main filter, which allows its openat and renameat2.
        if let Some(file) = metrics_file {
            let writer = MetricsWriter::start(file, metrics_interval, render)?;
            *metrics_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(writer);
        }
        // Started after the main filter, so the signal thread inherits it.
        signals.spawn_handler(move |signal| {
            info!("Received {}; flushing and exiting.", signal_name(signal));
            let mut code = match berth_blockdev::target::flush(target_for_signals.as_ref()) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("The final flush failed: {e:#}.");
                    1
                }
            };
            if let Some(volume) = &volume_for_signals {
                if let Err(e) = volume.close() {
                    tracing::error!("{e:#}.");
                    code = 1;
                }
            }
            if let Some(socket) = &socket_for_signals {
                socket.remove();
            }
            std::process::exit(code);
        })?;
        Ok(())
    });
    if let Some(socket) = socket_file {
        socket.remove();
    }
    // The last write of the metrics file, with every request counted.
    drop(
        metrics_writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(),
    );
    // What the guest wrote is made durable before the process ends (an overlay also
    // records its map when the target drops).
    let flushed = berth_blockdev::target::flush(block_target.as_ref())
        .map_err(|e| anyhow!("the final flush failed: {e:#}"));
    let closed = match &opened.volume {
        Some(volume) => volume.close(),
        None => Ok(()),
    };
    result.and(flushed).and(closed)
}

/// Drops the capabilities of a root process and installs the main thread's filter.
fn confine_main_thread(seccomp: SeccompAction) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        berth_seccomp::drop_capabilities(&berth_seccomp::CapsNeeded::default())
            .context("cannot drop capabilities")?;
    }
    berth_seccomp::install_filter(ThreadRole::Main, seccomp)
        .context("cannot install the seccomp filter")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_serial_is_the_file_name_cut_to_twenty_bytes() {
        assert_eq!(default_serial(Path::new("/srv/disk.img")), "disk.img");
        assert_eq!(
            default_serial(Path::new("/srv/a-rather-long-image-name.raw")),
            "a-rather-long-image-"
        );
        // Never cut inside a character.
        assert_eq!(default_serial(Path::new("/x/ééééééééééé")), "éééééééééé");
        assert_eq!(default_serial(Path::new("/")), "berth");
    }
}
