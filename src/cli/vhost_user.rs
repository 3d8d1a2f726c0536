//! The vhost-user daemon's own flags (berth's default mode, virtiofsd's command line).

use std::os::unix::io::RawFd;
use std::path::PathBuf;

use berth_passthrough::{Config, DaxPolicy, MigrationConfig, MigrationMode, MigrationOnError};
use clap::Args;

use super::{
    parse_dax_policy, CliError, CommonArgs, FsArgs, IsolationArgs, IsolationSettings,
    ProcessSettings,
};

/// Longest tag the virtio-fs config space holds (virtio spec 5.11.4).
pub const MAX_TAG_LEN: usize = 36;

/// The request queue count is a bit in a 64-bit thread mask, and queue 0 is hiprio.
const MAX_REQUEST_QUEUES_LIMIT: u16 = 63;

/// `--dax-window`: a size in whole 2 MiB units (the granularity Linux guests map in).
fn parse_dax_window(s: &str) -> Result<u64, String> {
    let size = crate::image::args::parse_size(s)?;
    if !size.is_multiple_of(berth_dax::GUEST_MAPPING_GRANULE) {
        return Err(format!(
            "the DAX window must be a multiple of 2 MiB (examples: 0, 64M, 1G), '{s}' is not"
        ));
    }
    Ok(size)
}

fn parse_tag(tag: &str) -> Result<String, String> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        Err(format!(
            "the tag must be 1 to {MAX_TAG_LEN} bytes long (UTF-8), '{tag}' is {} bytes",
            tag.len()
        ))
    } else {
        Ok(tag.to_owned())
    }
}

/// The vhost-user daemon's flags (the default mode).
#[derive(Debug, Args)]
pub struct VhostUserArgs {
    /// vhost-user socket to create and listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// Deprecated spelling of --socket-path.
    #[arg(long, value_name = "PATH", hide = true, conflicts_with = "socket_path")]
    pub socket: Option<PathBuf>,

    /// An inherited, already listening vhost-user socket (Kata passes 3).
    #[arg(long, value_name = "FD", conflicts_with_all = ["socket_path", "socket"])]
    pub fd: Option<RawFd>,

    /// Group that owns the socket created by --socket-path (and may connect to it).
    #[arg(long, value_name = "GROUP", conflicts_with = "fd")]
    pub socket_group: Option<String>,

    /// Tag served in the virtio-fs config space (enables VHOST_USER_PROTOCOL_F_CONFIG).
    #[arg(long, value_parser = parse_tag)]
    pub tag: Option<String>,

    /// Above 1: each request queue thread hands requests to a shared pool of N threads
    /// (0 or 1: requests are served on their queue's thread, except lock requests that may
    /// wait, with --posix-lock or --flock).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub thread_pool_size: usize,

    /// Most request queues offered to the frontend (each one gets its own thread).
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_REQUEST_QUEUES_LIMIT)))]
    pub max_request_queues: u16,

    /// After serving requests, keep polling the queue this many microseconds before sleeping
    /// (trades CPU for latency where cores are spare; measured slower on a 2-core host).
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub poll_us: u32,

    /// Offer a DAX window of this size (shared memory region 0, e.g. 1G; 0: none): the guest
    /// maps file ranges from the host page cache (`mount -o dax=always`). Needs a VMM that
    /// honours vhost-user shared memory (protocol feature SHMEM), e.g. QEMU 11.1's
    /// vhost-user-test-device-pci with virtio-id=26; see the README.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_dax_window)]
    pub dax_window: u64,

    /// Which regular files a guest mounted with `-o dax=inode` maps through the DAX window:
    /// never, always, size:N (files of at least N bytes, K/M/G suffixes allowed) or xattr
    /// (files whose host attribute user.berth.dax is `1`). Default with a window: always.
    /// A `dax=always` mount maps every file regardless.
    #[arg(long, value_name = "POLICY", value_parser = parse_dax_policy)]
    pub dax_policy: Option<DaxPolicy>,

    /// Keep the daemon's metrics in this file (Prometheus text format, rewritten atomically):
    /// FUSE requests by opcode and, with a DAX window, the window's use and VMM round trips.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,

    /// How often the metrics file is rewritten.
    #[arg(long, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub metrics_interval: u64,

    /// Shared caching for virtio-fs guests (see --shared-cache's own help): the version table
    /// is offered as shared memory region 1 and a guest kernel with berth's shared-versions
    /// patches caches long, comparing versions itself. Unpatched guests keep the --cache
    /// mode's timeouts for untracked inodes and a day for tracked ones.
    #[command(flatten)]
    pub shared_cache: crate::shared_cache::SharedCacheArgs,

    /// Print the vhost-user backend capabilities (JSON) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// How inodes are described to a live-migration destination: find-paths (by path under
    /// the shared directory) or file-handles (same host filesystem only).
    #[arg(long, value_name = "MODE")]
    pub migration_mode: Option<String>,
    /// An inode that cannot be migrated: abort (the migration fails, the guest keeps running
    /// on the source) or guest-error (the guest gets EIO for it on the destination).
    #[arg(long, value_name = "MODE")]
    pub migration_on_error: Option<String>,
    /// find-paths: send file handles too and have the destination check it opened the very
    /// same inodes (same host filesystem only).
    #[arg(long)]
    pub migration_verify_handles: bool,
    /// find-paths: re-open every path on the source before sending it, to catch renames.
    #[arg(long)]
    pub migration_confirm_paths: bool,

    #[command(flatten)]
    pub isolation: IsolationArgs,

    #[command(flatten)]
    pub fs: FsArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Where the vhost-user listening socket comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerSource {
    /// Create a socket at this path, optionally owned by a group.
    Path {
        path: PathBuf,
        group: Option<String>,
    },
    /// Use an inherited, listening socket.
    Fd(RawFd),
}

#[derive(Debug)]
pub struct VhostUserSettings {
    pub listener: ListenerSource,
    pub tag: Option<String>,
    pub thread_pool_size: usize,
    pub max_request_queues: u16,
    pub poll_us: u32,
    /// Bytes in the DAX window (0: none).
    pub dax_window: u64,
    /// `--metrics-file` and how often it is rewritten.
    pub metrics: Option<(PathBuf, std::time::Duration)>,
    pub shared_cache: crate::shared_cache::SharedCacheArgs,
    pub isolation: IsolationSettings,
    pub fs: Config,
    pub process: ProcessSettings,
}

impl VhostUserArgs {
    pub(super) fn resolve(&self) -> Result<VhostUserSettings, CliError> {
        let isolation = self.isolation.resolve(&self.fs.compat_options)?;
        let mut warnings = Vec::new();
        let (mut fs, compat_level) = self.fs.resolve(&mut warnings)?;
        fs.dax_policy = match (self.dax_window, self.dax_policy) {
            (0, None) => DaxPolicy::Never,
            (0, Some(_)) => {
                warnings.push(
                    "--dax-policy has no effect without a DAX window (--dax-window)".to_owned(),
                );
                DaxPolicy::Never
            }
            (_, policy) => policy.unwrap_or(DaxPolicy::Always),
        };
        if self.shared_cache.shared_cache && self.dax_window > 0 {
            // A guest writing through a DAX mapping changes the file without a request, so no
            // version would move: other clients would keep stale data.
            return Err(CliError::Conflict(
                "--shared-cache cannot be combined with --dax-window yet: writes through the                  window would not move the file's version"
                    .into(),
            ));
        }
        fs.migration = MigrationConfig {
            mode: match &self.migration_mode {
                Some(mode) => mode.parse().map_err(|_| CliError::InvalidChoice {
                    flag: "migration-mode",
                    value: mode.clone(),
                    expected: "find-paths, file-handles",
                })?,
                None => MigrationMode::default(),
            },
            on_error: match &self.migration_on_error {
                Some(mode) => mode.parse().map_err(|_| CliError::InvalidChoice {
                    flag: "migration-on-error",
                    value: mode.clone(),
                    expected: "abort, guest-error",
                })?,
                None => MigrationOnError::default(),
            },
            verify_handles: self.migration_verify_handles,
            confirm_paths: self.migration_confirm_paths,
            // The sandbox makes the shared directory the root: remember the host's name for it
            // now, for the destination's check that state comes from the same share.
            share_path: Some(
                fs.root_dir
                    .canonicalize()
                    .unwrap_or_else(|_| fs.root_dir.clone()),
            ),
            lock_reacquire_timeout: None,
        };

        let listener = match (&self.fd, &self.socket_path, &self.socket) {
            (Some(fd), _, _) => ListenerSource::Fd(*fd),
            (None, Some(path), _) => ListenerSource::Path {
                path: path.clone(),
                group: self.socket_group.clone(),
            },
            (None, None, Some(path)) => {
                warnings.push("--socket is deprecated; use --socket-path".to_owned());
                ListenerSource::Path {
                    path: path.clone(),
                    group: self.socket_group.clone(),
                }
            }
            (None, None, None) => return Err(CliError::MissingSocket),
        };

        Ok(VhostUserSettings {
            listener,
            tag: self.tag.clone(),
            thread_pool_size: self.thread_pool_size,
            max_request_queues: self.max_request_queues,
            poll_us: self.poll_us,
            dax_window: self.dax_window,
            metrics: self
                .metrics_file
                .clone()
                .map(|path| (path, std::time::Duration::from_secs(self.metrics_interval))),
            shared_cache: self.shared_cache.clone(),
            isolation,
            fs,
            process: self.common.resolve(compat_level, warnings)?,
        })
    }
}
