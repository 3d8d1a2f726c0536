//! `berth block serve-vhost`: the block engine (`berth_blockdev`) as a vhost-user-blk
//! backend, for QEMU's `vhost-user-blk-pci` and VMMs like it.
//!
//! [`request`] decodes and serves one virtio-blk request from a descriptor chain,
//! [`device`] is the vhost-user backend around it (features, configuration space, queue
//! threads), and this module opens the target, the socket, confines the process and serves
//! one frontend connection.
//!
//! Confinement: the socket, the metrics file and a file or block device target with its
//! overlay are opened first; the process then enters the `--sandbox` (by default new mount,
//! pid and network namespaces). A file's root is its directory. An image's or a volume's
//! root is a new, read-only one holding only what it opens by path, each at its own path:
//! an image's cache directory and overlay's directory (writable), its own directory and a
//! local backend's (read-only); a volume's local state directory and a `file://` bucket's
//! directory (writable). A remote backend or bucket (S3, HTTP) keeps the host's network and
//! gets the files name resolution and TLS read. Images and volumes are opened inside, as
//! they start threads at once, which the sandbox's fork would leave behind. Every queue
//! thread drops all capabilities and installs the vhost-user-blk queue filter (block I/O on
//! the target's descriptors and the cache's files, no sockets, no exec), the control thread
//! the
//! vhost-user control filter, and the main thread the main filter; the threads of an
//! image's engine or of a volume, started before the main filter, run with the default
//! capability set and no filter.

pub mod args;
pub mod device;
pub mod request;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use berth_seccomp::{
    SandboxConfig, SandboxMode, SandboxPath, SandboxRoot, SeccompAction, ThreadRole,
};
use tracing::info;

use crate::block::args::TargetArgs;
use crate::block::{is_image, manifest_path_of, open_target_from, Engines};
use crate::metrics_file::{merge_families, MetricsFile, MetricsWriter};
use crate::shutdown::{signal_name, TerminationSignals};
use crate::volume::{
    check_volume_served_writable, is_volume_spec, open_volume, VolumeServeSettings,
};
use args::ServeVhostArgs;
use berth_blockdev::{DeviceMetrics, SharedTarget};
use berth_volume::Volume;
use device::{BlkBackend, BlkOptions};
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

/// The target of a `serve-vhost`, open, with what its serial depends on.
struct OpenedTarget {
    target: SharedTarget,
    /// What the serial defaults to (its last path component).
    name: String,
    /// The cache engines an image target fetches through, kept for as long as it is served.
    engines: Engines,
    /// The target when it is a volume: closed at exit (what is left uploaded, the lease
    /// given back), since the signal thread keeps a reference to the target for ever.
    volume: Option<VolumeCloser>,
    /// The same volume, for its counters in the metrics file.
    volume_metrics: Option<Arc<Volume>>,
}

/// The target as far as it is opened before the sandbox.
enum Prepared {
    /// A file or block device, open, with the directory the sandbox is rooted at.
    Open(OpenedTarget, PathBuf),
    /// An image, opened inside the sandbox: its cache engine (and a remote backend) start
    /// threads at once, which the namespace sandbox's fork would leave behind.
    Image(ImagePlan),
    /// A volume, opened inside the sandbox for the same reason (its uploader, its store).
    Volume(VolumePlan),
}

/// Where a volume is and how it is served, for opening it inside the sandbox.
struct VolumePlan {
    /// `volume:LOCATION`, as given.
    spec: String,
    /// The serving settings, with the local state directory made and canonical.
    settings: VolumeServeSettings,
    /// The bucket's directory of a `file://` location (canonical), `None` for S3.
    bucket_dir: Option<PathBuf>,
}

impl VolumePlan {
    /// The sandbox's root: the local state directory and a `file://` bucket's directory
    /// (both writable), or for S3 the files a connection reads; and whether the network is
    /// kept (S3).
    fn sandbox_root(&self) -> (SandboxRoot, bool) {
        let mut paths = vec![SandboxPath {
            path: self.settings.volume_dir.clone(),
            writable: true,
        }];
        match &self.bucket_dir {
            Some(dir) => paths.push(SandboxPath {
                path: dir.clone(),
                writable: true,
            }),
            None => paths.extend(network_files()),
        }
        (SandboxRoot::Paths(paths), self.bucket_dir.is_none())
    }

    fn name(&self) -> String {
        self.spec.trim_end_matches('/').to_string()
    }

    /// Takes the volume's lease and replays its local write-ahead log, as `berth block
    /// add` does, and starts the thread that closes it.
    fn open(self) -> anyhow::Result<OpenedTarget> {
        let volume = open_volume(&self.spec, &self.settings)?;
        let closer = VolumeCloser::start(volume.clone())?;
        Ok(OpenedTarget {
            target: volume.clone(),
            name: self.name(),
            engines: Engines::default(),
            volume_metrics: Some(volume),
            volume: Some(closer),
        })
    }
}

/// The [`NETWORK_FILES`] (and those the [`NETWORK_FILE_VARIABLES`] name) this host has,
/// read-only.
fn network_files() -> Vec<SandboxPath> {
    let named = NETWORK_FILE_VARIABLES
        .iter()
        .filter_map(|name| std::env::var_os(name).map(PathBuf::from));
    NETWORK_FILES
        .iter()
        .map(PathBuf::from)
        .chain(named)
        .filter(|path| path.is_absolute() && path.exists())
        .map(|path| SandboxPath {
            path,
            writable: false,
        })
        .collect()
}

/// Where an image is and how it is served, for opening it inside the sandbox.
struct ImagePlan {
    /// The image (canonical).
    target: PathBuf,
    /// Its overlay (absolute, in an existing directory).
    overlay: Option<PathBuf>,
    read_only: bool,
    /// The cache and backend settings, with the cache directory made and canonical.
    settings: TargetArgs,
}

/// Host files a remote backend reads by path as it connects: name resolution and the
/// certificate authorities of TLS (the usual places on Debian, Fedora and their kin).
const NETWORK_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/ssl/certs",
    "/etc/ssl/cert.pem",
    "/etc/pki/tls/certs",
    "/etc/pki/tls/cert.pem",
    "/etc/pki/ca-trust/extracted",
    "/etc/ca-certificates",
    "/usr/share/ca-certificates",
    "/usr/local/share/ca-certificates",
];

/// Environment variables naming more files a remote backend reads (its certificate
/// authorities, a web identity token for S3 credentials).
const NETWORK_FILE_VARIABLES: &[&str] = &[
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
];

impl ImagePlan {
    /// The directory holding the image's manifest (and, with no `--backend`, its blob).
    fn image_dir(&self) -> PathBuf {
        manifest_path_of(&self.target)
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
    }

    /// The local directory `--backend` names, if it names one (else a remote store).
    fn local_backend_dir(spec: &str) -> Option<&str> {
        let remote = ["s3://", "http://", "https://"];
        (!remote.iter().any(|p| spec.starts_with(p)))
            .then(|| spec.strip_prefix("file://").unwrap_or(spec))
    }

    /// The sandbox's root: the cache directory (writable), the image's directory and a local
    /// backend's (read-only), the overlay's directory (writable), and for a remote backend
    /// the files it connects with; and whether the network is kept (a remote backend).
    fn sandbox_root(&self) -> anyhow::Result<(SandboxRoot, bool)> {
        let mut paths = vec![
            SandboxPath {
                path: self.settings.cache_dir.clone(),
                writable: true,
            },
            SandboxPath {
                path: self.image_dir(),
                writable: false,
            },
        ];
        if let Some(dir) = self.overlay.as_deref().and_then(Path::parent) {
            paths.push(SandboxPath {
                path: dir.to_path_buf(),
                writable: true,
            });
        }
        let mut remote = false;
        match self.settings.backend.as_deref() {
            None => {}
            Some(spec) => match Self::local_backend_dir(spec) {
                Some(dir) => paths.push(SandboxPath {
                    path: std::fs::canonicalize(dir)
                        .with_context(|| format!("cannot find the backend directory {dir}"))?,
                    writable: false,
                }),
                None => remote = true,
            },
        }
        if remote {
            paths.extend(network_files());
        }
        Ok((SandboxRoot::Paths(paths), remote))
    }

    fn name(&self) -> String {
        self.target.display().to_string()
    }

    /// Opens the image (its cache engine, its backend) and the overlay.
    fn open(self) -> anyhow::Result<OpenedTarget> {
        let engines = Engines::default();
        let target = open_target_from(
            &self.target,
            self.overlay.as_deref(),
            self.read_only,
            &self.settings,
            &engines,
        )?;
        Ok(OpenedTarget {
            target,
            name: self.name(),
            engines,
            volume: None,
            volume_metrics: None,
        })
    }
}

impl Prepared {
    fn name(&self) -> String {
        match self {
            Prepared::Open(opened, _) => opened.name.clone(),
            Prepared::Image(plan) => plan.name(),
            Prepared::Volume(plan) => plan.name(),
        }
    }
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

/// Opens a file or block device with its overlay, or plans an image's opening.
fn prepare_path_target(target: &Path, args: &ServeVhostArgs) -> anyhow::Result<Prepared> {
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
    if is_image(&target) {
        if overlay.is_none() && !args.readonly {
            info!(
                "{} is an image: exported read-only (give --overlay to write).",
                target.display()
            );
        }
        // The sandbox mounts the cache directory where the engine looks for it, so it
        // must exist, by the path it will have inside.
        let cache_dir = &args.target_options.cache_dir;
        std::fs::create_dir_all(cache_dir).with_context(|| {
            format!("cannot create the cache directory {}", cache_dir.display())
        })?;
        let settings = TargetArgs {
            cache_dir: std::fs::canonicalize(cache_dir)
                .with_context(|| format!("cannot find {}", cache_dir.display()))?,
            ..args.target_options.clone()
        };
        return Ok(Prepared::Image(ImagePlan {
            read_only: args.readonly || overlay.is_none(),
            target,
            overlay,
            settings,
        }));
    }
    let engines = Engines::default();
    let block_target = open_target_from(
        &target,
        overlay.as_deref(),
        args.readonly,
        &args.target_options,
        &engines,
    )?;
    let root = target.parent().unwrap_or(Path::new("/")).to_path_buf();
    Ok(Prepared::Open(
        OpenedTarget {
            target: block_target,
            name: target.display().to_string(),
            engines,
            volume_metrics: None,
            volume: None,
        },
        root,
    ))
}

/// Checks a volume (`volume:LOCATION`) target and plans its opening: its local state
/// directory is made, so that the sandbox can hold it.
fn prepare_volume_target(spec: &str, args: &ServeVhostArgs) -> anyhow::Result<Prepared> {
    check_volume_served_writable(spec, args.readonly, args.overlay.is_some())?;
    let mut settings = VolumeServeSettings::from(&args.target_options.volume);
    let dir = &settings.volume_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the volume directory {}", dir.display()))?;
    settings.volume_dir =
        std::fs::canonicalize(dir).with_context(|| format!("cannot find {}", dir.display()))?;
    let location = berth_volume::Location::parse(spec)?;
    let bucket_dir = match location.root.strip_prefix("file://") {
        Some(dir) => Some(
            std::fs::canonicalize(dir)
                .with_context(|| format!("cannot find the bucket directory {dir}"))?,
        ),
        None => None,
    };
    Ok(Prepared::Volume(VolumePlan {
        spec: spec.to_string(),
        settings,
        bucket_dir,
    }))
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
    let prepared = match target.to_str().filter(|spec| is_volume_spec(spec)) {
        Some(spec) => prepare_volume_target(spec, &args)?,
        None => prepare_path_target(target, &args)?,
    };

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
        .unwrap_or_else(|| default_serial(Path::new(&prepared.name())));
    let seccomp = args.seccomp;
    let metrics_file = args
        .metrics_file
        .as_deref()
        .map(MetricsFile::open)
        .transpose()?;
    // Everything is open but an image or a volume, and no thread exists yet, as the
    // namespaces need.
    if args.sandbox != SandboxMode::None {
        let (root, keep_network) = match &prepared {
            Prepared::Open(_, dir) => (SandboxRoot::Dir(dir.clone()), false),
            Prepared::Image(plan) => plan.sandbox_root()?,
            Prepared::Volume(plan) => plan.sandbox_root(),
        };
        berth_seccomp::enter_sandbox(&SandboxConfig {
            mode: args.sandbox,
            root,
            keep_network,
            uid_map: Vec::new(),
            gid_map: Vec::new(),
            supervisor_seccomp: seccomp,
        })
        .context("cannot enter the sandbox")?;
    }
    let opened = match prepared {
        Prepared::Open(opened, _) => opened,
        later @ (Prepared::Image(_) | Prepared::Volume(_)) => {
            // The engine's or the volume's threads start as it opens and keep what they
            // start with: the main thread's capabilities, which are cut to the default set
            // first, and the block engine's filter, which every later thread inherits too
            // and narrows with its own.
            let open = |later| match later {
                Prepared::Image(plan) => plan.open(),
                Prepared::Volume(plan) => plan.open(),
                Prepared::Open(opened, _) => Ok(opened),
            };
            let confined = drop_capabilities_of_root().and_then(|()| {
                berth_seccomp::install_filter(ThreadRole::BlockEngine, seccomp)
                    .context("cannot install the block engine's seccomp filter")
            });
            // A volume's bucket or an image's backend that does not answer keeps the open
            // retrying for a while: a termination signal meanwhile ends the process now.
            let socket_for_start = socket_file.clone();
            let on_signal = move |signal| {
                info!(
                    "Received {} while opening the target; exiting without serving.",
                    signal_name(signal)
                );
                if let Some(socket) = &socket_for_start {
                    socket.remove();
                }
                std::process::exit(0);
            };
            let opened = confined.and_then(|()| signals.watch_during(on_signal, || open(later)));
            match opened {
                Ok(opened) => opened,
                Err(e) => {
                    // Nothing will listen on the socket made for it.
                    if let Some(socket) = &socket_file {
                        socket.remove();
                    }
                    return Err(e);
                }
            }
        }
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
    let device_metrics = Arc::new(DeviceMetrics::new("vhost-user"));
    let flush_syncs = Arc::new(AtomicU64::new(0));
    let backend = Arc::new(BlkBackend::new(
        block_target.clone(),
        BlkOptions {
            queues: args.queues,
            max_queue_size: args.queue_size,
            serial,
            seccomp,
            metrics: device_metrics.clone(),
            flush_syncs: flush_syncs.clone(),
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
            text.push_str(&format!(
                "# HELP berth_block_flush_syncs_total Flushes of the target made for FLUSH requests (one answers every FLUSH gathered from a queue).\n\
                 # TYPE berth_block_flush_syncs_total counter\n\
                 berth_block_flush_syncs_total{{device=\"{}\"}} {}\n",
                name.replace(['"', '\\', '\n'], "_"),
                flush_syncs.load(Ordering::Relaxed)
            ));
            if let Some(volume) = &volume {
                volume.render_metrics(&name, true, &mut text);
            }
            for engine in &engines {
                text.push_str(&engine.render_prometheus());
            }
            merge_families(&text)
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

/// Cuts the calling thread's capabilities to the default set when the process is root (and
/// empties its bounding set); the threads it starts afterwards inherit that.
fn drop_capabilities_of_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        berth_seccomp::drop_capabilities(&berth_seccomp::CapsNeeded::default())
            .context("cannot drop capabilities")?;
    }
    Ok(())
}

/// Drops the capabilities of a root process and installs the main thread's filter.
fn confine_main_thread(seccomp: SeccompAction) -> anyhow::Result<()> {
    drop_capabilities_of_root()?;
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
