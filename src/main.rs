//! berth: a host-side storage daemon for microVMs. This file only wires the pieces together:
//! command line ([`cli`]), logging, the open file limit, and one of the two transports ([`vhost_user`],
//! [`fusedev`]) around the passthrough filesystem, or the lazily fetched images ([`image`]).

mod block;
mod cli;
mod fuse_notify;
mod fuse_uring;
mod fusedev;
mod image;
mod logging;
mod metrics_file;
mod pool;
mod shared_cache;
mod shutdown;
mod vhost_blk;
mod vhost_user;
mod volume;
mod vring_events;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use berth_passthrough::{Config, FsServer, InodeFileHandles, PassthroughFs};
use berth_seccomp::{CapsNeeded, SandboxConfig, SandboxRoot, ThreadRole};
use clap::Parser;
use tracing::{info, warn};

use crate::cli::{Cli, FuseSettings, IsolationSettings, ListenerSource, Mode, VhostUserSettings};
use crate::shutdown::{signal_name, TerminationSignals};

/// Exit status for a command line that parsed but cannot be honoured (clap uses 2 as well).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mode = match cli.resolve() {
        Ok(mode) => mode,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let process = match &mode {
        Mode::PrintCapabilities => {
            println!("{}", cli::capabilities_json());
            return ExitCode::SUCCESS;
        }
        Mode::VhostUser(settings) => &settings.process,
        Mode::Fuse(settings) => &settings.process,
        Mode::ImageBuild(settings) => &settings.process,
        Mode::Mount(settings) => &settings.process,
        Mode::Block(_, process) => process,
        Mode::Volume(_, process) => process,
        Mode::Fscache(settings) => &settings.process,
        Mode::ImageInspect(settings) => &settings.process,
        Mode::ImageCheck(settings) => &settings.process,
    };
    let (log_level, rlimit_nofile) = (process.log_level, process.rlimit_nofile);

    // Before any thread exists, so that every thread inherits the blocked mask.
    let signals = match TerminationSignals::block() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("error: cannot block termination signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let logs_on_stderr = logging::init(log_level, process.syslog);
    for warning in &process.warnings {
        warn!("{warning}");
    }

    let result = berth_seccomp::set_rlimit_nofile(rlimit_nofile)
        .context("cannot set the open file limit (RLIMIT_NOFILE)")
        .and_then(|limit| {
            tracing::debug!("The open file limit is {limit}.");
            match mode {
                Mode::VhostUser(mut settings) => {
                    apply_guest_limits(&mut settings.fs, &settings.isolation, limit);
                    run_vhost_user(settings, signals)
                }
                Mode::Fuse(mut settings) => {
                    apply_guest_limits(&mut settings.fs, &settings.isolation, limit);
                    run_fuse(settings, signals)
                }
                Mode::ImageBuild(settings) => image::run_build(settings, signals),
                Mode::Mount(settings) => image::run_mount(settings, signals),
                Mode::Block(command, _) => block::run(command, signals),
                Mode::Volume(command, _) => signals
                    .restore_default()
                    .and_then(|()| volume::run(command)),
                Mode::Fscache(settings) => image::fscache::run_fscache(settings, signals),
                Mode::ImageInspect(settings) => signals
                    .restore_default()
                    .and_then(|()| image::run_inspect(settings)),
                Mode::ImageCheck(settings) => signals
                    .restore_default()
                    .and_then(|()| image::run_check(settings)),
                Mode::PrintCapabilities => Ok(()),
            }
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            if !logs_on_stderr || log_level == Some(cli::LogLevel::Off) {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn open_filesystem(cfg: Config) -> anyhow::Result<Arc<FsServer>> {
    if !cfg.root_dir.is_dir() {
        return Err(anyhow!(
            "the shared directory {} does not exist or is not a directory",
            cfg.root_dir.display()
        ));
    }
    let root = cfg.root_dir.clone();
    let fs = PassthroughFs::new(cfg)
        .with_context(|| format!("cannot share the directory {}", root.display()))?;
    Ok(Arc::new(FsServer::new(fs)))
}

/// Descriptors kept back from the guest's share of RLIMIT_NOFILE for the daemon itself
/// (sockets, eventfds and epoll sets per queue, guest memory regions, lock files, mounts).
fn reserved_fds(nofile: u64) -> u64 {
    (nofile / 4).min(1024)
}

/// Sets the inode and open-handle caps: as given, or derived from the descriptor limit so
/// that a guest hits ENFILE/EMFILE from berth before the process runs out of descriptors.
fn apply_guest_limits(cfg: &mut Config, isolation: &IsolationSettings, nofile: u64) {
    let share = nofile.saturating_sub(reserved_fds(nofile)) / 2;
    let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX).max(1);
    cfg.max_handles = clamp(isolation.max_handles.unwrap_or(share));
    cfg.max_inodes = match isolation.max_inodes {
        Some(n) => clamp(n),
        // Inodes held by descriptor cost one each.
        None if cfg.inode_file_handles == InodeFileHandles::Never => {
            cfg.max_inodes.min(clamp(share))
        }
        None => cfg.max_inodes,
    };
    let fd_bound = cfg.max_handles as u64
        + if cfg.inode_file_handles == InodeFileHandles::Never {
            cfg.max_inodes as u64
        } else {
            0
        };
    if fd_bound > nofile {
        warn!(
            "--max-handles {} (plus inodes held by descriptor) exceeds the descriptor limit \
             {nofile}: guests may exhaust it before berth's own limits apply.",
            cfg.max_handles
        );
    }
    tracing::debug!(
        "Guest limits: {} inodes, {} open handles.",
        cfg.max_inodes,
        cfg.max_handles
    );
}

fn sandbox_config(isolation: &IsolationSettings, shared_dir: &Path) -> SandboxConfig {
    SandboxConfig {
        mode: isolation.sandbox,
        root: SandboxRoot::Dir(shared_dir.to_owned()),
        keep_network: false,
        uid_map: isolation.uid_map.clone(),
        gid_map: isolation.gid_map.clone(),
        supervisor_seccomp: isolation.seccomp,
    }
}

/// Drops capabilities (when root) and installs the main thread's seccomp filter: every thread
/// started afterwards inherits it and narrows it to its role.
fn confine_main_thread(isolation: &IsolationSettings, file_handles: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        berth_seccomp::drop_capabilities(&CapsNeeded {
            file_handles,
            modcaps: isolation.modcaps.clone(),
        })
        .context("cannot drop capabilities")?;
    }
    berth_seccomp::install_filter(ThreadRole::Main, isolation.seccomp)
        .context("cannot install the seccomp filter")
}

/// Enters the sandbox, opens the shared directory (as it is seen from inside) and confines
/// the main thread: the order both modes need, since the filesystem's descriptors must be
/// opened after pivot_root and before the filters forbid opening them.
///
/// `in_sandbox` runs inside the sandbox while the process still has its capabilities (shared
/// caching sets up its host watcher there, FUSE passthrough its registrar thread).
fn confine_and_open(
    isolation: &IsolationSettings,
    mut fs: Config,
    in_sandbox: impl FnOnce(&mut Config) -> anyhow::Result<()>,
) -> anyhow::Result<Arc<FsServer>> {
    let outcome = berth_seccomp::enter_sandbox(&sandbox_config(isolation, &fs.root_dir))
        .context("cannot enter the sandbox")?;
    fs.root_dir = outcome.root_dir;
    fs.proc_self_fd = outcome.proc_self_fd.map(Arc::new);
    fs.proc_self_fdinfo = outcome.proc_self_fdinfo.map(Arc::new);
    in_sandbox(&mut fs)?;
    let file_handles = fs.inode_file_handles != InodeFileHandles::Never;
    let server = open_filesystem(fs)?;
    confine_main_thread(isolation, file_handles)?;
    Ok(server)
}

fn run_vhost_user(settings: VhostUserSettings, signals: TerminationSignals) -> anyhow::Result<()> {
    let host_locks = settings.fs.holds_host_locks();
    if !settings.fs.root_dir.is_dir() {
        return Err(anyhow!(
            "the shared directory {} does not exist or is not a directory",
            settings.fs.root_dir.display()
        ));
    }
    // The socket lives outside the shared directory: set it up before the sandbox hides it.
    let (listener, socket_file) = match &settings.listener {
        ListenerSource::Fd(fd) => (vhost_user::listener_from_fd(*fd)?, None),
        ListenerSource::Path { path, group } => {
            let (listener, file) = vhost_user::listener_at_path(path, group.as_deref())?;
            (listener, Some(Arc::new(file)))
        }
    };
    // So does the metrics file's directory.
    let metrics = settings
        .metrics
        .as_ref()
        .map(|(path, interval)| metrics_file::MetricsFile::open(path).map(|file| (file, *interval)))
        .transpose()?;
    // The version table lives outside the shared directory: open it before the sandbox.
    let shared = shared_cache::open_table(
        &settings.shared_cache,
        &settings.fs.root_dir,
        settings.fs.writeback,
    )?;
    let mut watcher = None;
    let server = confine_and_open(&settings.isolation, settings.fs, |fs| {
        if let Some(shared) = &shared {
            watcher = Some(shared.attach(fs, false)?);
        }
        Ok(())
    })?;
    if let Some(watcher) = watcher.take() {
        shared_cache::start_watcher(watcher, settings.isolation.seccomp)?;
    }
    let socket_for_signals = socket_file.clone();
    signals.spawn_handler(move |signal| {
        info!("Received {}; exiting.", signal_name(signal));
        if let Some(socket) = socket_for_signals {
            socket.remove();
        }
        std::process::exit(0);
    })?;
    if host_locks && settings.thread_pool_size <= 1 {
        warn!(
            "Host-side locks are on but requests are served on their queue's thread: a guest \
             process waiting for a lock holds up its whole request queue. Consider \
             --thread-pool-size 4 or more."
        );
    }
    if settings.thread_pool_size > 1 {
        info!(
            "Each request queue thread hands its requests to a pool of {} threads.",
            settings.thread_pool_size
        );
    }
    let result = vhost_user::serve(
        server,
        vhost_user::DeviceOptions {
            tag: settings.tag,
            max_request_queues: settings.max_request_queues,
            poll_us: settings.poll_us,
            thread_pool_size: settings.thread_pool_size,
            seccomp: settings.isolation.seccomp,
            dax_window: settings.dax_window,
            versions: shared.as_ref().map(|s| s.table().clone()),
            metrics,
        },
        listener,
    );
    if let Some(socket) = socket_file {
        socket.remove();
    }
    result
}

fn run_fuse(settings: FuseSettings, signals: TerminationSignals) -> anyhow::Result<()> {
    if !settings.fs.root_dir.is_dir() {
        return Err(anyhow!(
            "the shared directory {} does not exist or is not a directory",
            settings.fs.root_dir.display()
        ));
    }
    let mountpoint = settings.mountpoint.canonicalize().with_context(|| {
        format!(
            "cannot use {} as a mount point",
            settings.mountpoint.display()
        )
    })?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // The version table lives outside the shared directory: open it before the sandbox.
    let shared = shared_cache::open_table(
        &settings.shared_cache,
        &settings.fs.root_dir,
        settings.fs.writeback,
    )?;
    let passthrough = fusedev::passthrough_wanted(
        settings.passthrough,
        &settings.fs,
        settings.shared_cache.shared_cache,
    )?;
    // Whether to offer FUSE over io_uring, from sysfs (which the sandbox may hide).
    let host_locks = settings.fs.holds_host_locks();
    let uring_plan = fuse_uring::plan(settings.io_uring, settings.threads, host_locks)?;
    // The mount must be visible on the host: it is made before the sandbox (a new mount
    // namespace) exists, and only a guard left outside can take it down again.
    let session = fusedev::mount(&mountpoint, settings.fs.readonly)?;
    let (backing, mut registrar) = match passthrough {
        true => match fusedev::backing_files(&session, settings.passthrough, &settings.fs.root_dir)
        {
            Ok((backing, registrar)) => (Some(backing), Some(registrar)),
            Err(e) => {
                let mut session = std::mem::ManuallyDrop::into_inner(session);
                let _ = session.umount();
                return Err(e);
            }
        },
        false => (None, None),
    };
    let guard = match fusedev::UnmountGuard::spawn(&mountpoint, settings.isolation.seccomp, root) {
        Ok(guard) => guard,
        Err(e) => {
            let mut session = std::mem::ManuallyDrop::into_inner(session);
            let _ = session.umount();
            return Err(e);
        }
    };
    let mut watcher = None;
    let notifier_fuse = match (&shared, session.get_fuse_file()) {
        (Some(_), Some(file)) => Some(file.try_clone().context("cannot duplicate /dev/fuse")?),
        _ => None,
    };
    let seccomp = settings.isolation.seccomp;
    let mut rings = None;
    let prepared = confine_and_open(&settings.isolation, settings.fs, |fs| {
        if let Some(shared) = &shared {
            watcher = Some(shared.attach(fs, true)?);
        }
        // Made and restricted while io_uring_setup and io_uring_register are still allowed.
        if let Some(plan) = &uring_plan {
            match fusedev::Rings::create(&session, plan) {
                Ok(made) => rings = Some(made),
                Err(e) if plan.required => return Err(e.context("--io-uring always")),
                Err(e) => {
                    info!("FUSE transport: /dev/fuse read and write (io_uring is off: {e:#}).")
                }
            }
        }
        // Started while the process still holds CAP_SYS_ADMIN, which only it keeps.
        if let Some(registrar) = registrar.take() {
            fusedev::start_backing_registrar(registrar, seccomp)?;
        }
        Ok(())
    })
    .and_then(|server| {
        let seccomp = settings.isolation.seccomp;
        if let Some(watcher) = watcher.take() {
            shared_cache::start_watcher(watcher, seccomp)?;
        }
        if let Some(fuse) = notifier_fuse {
            fuse_notify::start(server.clone(), fuse, seccomp)?;
        }
        if let Some(backing) = backing {
            server.use_backing_files(backing);
        }
        if let (Some(plan), Some(_)) = (&uring_plan, &rings) {
            server.offer_io_uring(plan.required);
        }
        Ok(server)
    });
    let server = match prepared {
        Ok(server) => server,
        Err(e) => {
            guard.unmount();
            return Err(e);
        }
    };
    let served = fusedev::serve(
        server.clone(),
        session,
        &mountpoint,
        settings.threads,
        rings,
        settings.isolation.seccomp,
        guard,
        signals,
    );
    info!("FUSE requests served: {}.", server.request_counts());
    if let Some(backing) = server.backing_files() {
        info!("FUSE passthrough backing files: {}.", backing.summary());
    }
    served
}
