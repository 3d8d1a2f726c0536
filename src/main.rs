//! berth: a host-side storage daemon for microVMs. This file only wires the pieces together:
//! command line ([`cli`]), logging, the open file limit, and one of the two transports ([`vhost_user`],
//! [`fusedev`]) around the passthrough filesystem, or the lazily fetched images ([`image`]).

mod cli;
mod fast_io;
mod fusedev;
mod image;
mod logging;
mod pool;
mod shutdown;
mod vhost_user;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use berth_passthrough::{Config, FsServer, InodeFileHandles, PassthroughFs};
use berth_seccomp::{CapsNeeded, SandboxConfig, ThreadRole};
use clap::Parser;
use tracing::{info, warn};

use crate::cli::{Cli, FuseSettings, ListenerSource, Mode, VhostUserSettings};
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
                Mode::VhostUser(settings) => run_vhost_user(settings, signals),
                Mode::Fuse(settings) => run_fuse(settings, signals),
                Mode::ImageBuild(settings) => image::run_build(settings, signals),
                Mode::Mount(settings) => image::run_mount(settings, signals),
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

fn run_vhost_user(
    mut settings: VhostUserSettings,
    signals: TerminationSignals,
) -> anyhow::Result<()> {
    let host_locks = settings.fs.posix_lock || settings.fs.flock;
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
    let outcome = berth_seccomp::enter_sandbox(&SandboxConfig {
        mode: settings.sandbox,
        shared_dir: settings.fs.root_dir.clone(),
        uid_map: None,
        gid_map: None,
    })
    .context("cannot enter the sandbox")?;
    settings.fs.root_dir = outcome.root_dir;
    settings.fs.proc_self_fd = outcome.proc_self_fd.map(Arc::new);
    let file_handles = settings.fs.inode_file_handles != InodeFileHandles::Never;
    let server = open_filesystem(settings.fs)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        berth_seccomp::drop_capabilities(&CapsNeeded {
            file_handles,
            modcaps: settings.modcaps,
        })
        .context("cannot drop capabilities")?;
    }
    // Every thread started from here on inherits the main filter; queue workers narrow it.
    berth_seccomp::install_filter(ThreadRole::Main, settings.seccomp)
        .context("cannot install the seccomp filter")?;
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
            seccomp: settings.seccomp,
        },
        listener,
    );
    if let Some(socket) = socket_file {
        socket.remove();
    }
    result
}

fn run_fuse(settings: FuseSettings, signals: TerminationSignals) -> anyhow::Result<()> {
    let readonly = settings.fs.readonly;
    let server = open_filesystem(settings.fs)?;
    fusedev::serve(
        server,
        &settings.mountpoint,
        settings.threads,
        readonly,
        signals,
    )
}
