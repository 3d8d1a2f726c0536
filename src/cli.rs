//! berth's command line: a drop-in for virtiofsd 1.14's flags (as QEMU, libvirt and Kata pass
//! them), berth's own additions, the `fuse` subcommand for serving on a host mount point, and
//! the `image build` and `mount` subcommands for lazily fetched erofs images.
//!
//! Parsing happens in two steps: clap turns argv into [`Cli`], then [`Cli::resolve`] merges the
//! legacy `-o key=value` options, applies virtiofsd's implications (e.g. `--posix-acl` turns on
//! xattrs) and rejects what berth does not support. Every rejection is a [`CliError`], which the
//! binary reports with exit status 2, like clap's own usage errors.

use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use berth_passthrough::{
    CachePolicy, Config, DaxPolicy, InodeFileHandles, MigrationConfig, MigrationMode,
    MigrationOnError, Negotiation as FsNegotiation, XattrMap, XattrMapError,
};
use berth_seccomp::{IdMap, ModCaps, SandboxMode, SeccompAction};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::image::args::{
    FscacheArgs, FscacheSettings, ImageBuildSettings, ImageCommand, ImageInspectSettings,
    MountArgs, MountSettings,
};

/// Longest tag the virtio-fs config space holds (virtio spec 5.11.4).
pub const MAX_TAG_LEN: usize = 36;

/// The request queue count is a bit in a 64-bit thread mask, and queue 0 is hiprio.
const MAX_REQUEST_QUEUES_LIMIT: u16 = 63;

/// A command line that parsed but cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("--shared-dir (or -o source=DIR) is required")]
    MissingSharedDir,
    #[error("one of --socket-path or --fd is required")]
    MissingSocket,
    #[error("invalid value '{value}' for --{flag}; expected one of {expected}")]
    InvalidChoice {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("invalid --modcaps: {0}")]
    BadModcaps(String),
    #[error("{0} is not supported by berth")]
    UnsupportedFlag(&'static str),
    #[error("invalid compat option '-o {0}'")]
    UnknownCompatOption(String),
    #[error("invalid value '{value}' for '-o {key}': {reason}")]
    BadCompatValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("conflicting options: {0}")]
    Conflict(String),
    #[error("invalid --xattrmap: {0}")]
    BadXattrMap(XattrMapError),
    #[error("{0}")]
    BadIdMaps(String),
}

/// How loudly berth logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn from_compat(value: &str) -> Option<LogLevel> {
        match value {
            "off" => Some(LogLevel::Off),
            "err" | "error" => Some(LogLevel::Error),
            "warn" | "warning" => Some(LogLevel::Warn),
            "info" => Some(LogLevel::Info),
            "debug" => Some(LogLevel::Debug),
            "trace" => Some(LogLevel::Trace),
            _ => None,
        }
    }
}

/// virtiofsd's three-way switch for features the guest must also support: `auto` carries on
/// without the feature when the guest lacks it, `always` fails FUSE_INIT then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Negotiation {
    Never,
    Auto,
    Always,
}

impl From<Negotiation> for FsNegotiation {
    fn from(mode: Negotiation) -> Self {
        match mode {
            Negotiation::Never => FsNegotiation::Never,
            Negotiation::Auto => FsNegotiation::Auto,
            Negotiation::Always => FsNegotiation::Always,
        }
    }
}

/// A `never|auto|always` flag merged with its `-o name` / `-o no_name` counterpart (which mean
/// `always` and `never`, as in virtiofsd); the two disagreeing on whether the feature is on
/// is a conflict.
fn merge_negotiation(
    what: &str,
    flag: Option<Negotiation>,
    compat: Option<bool>,
) -> Result<FsNegotiation, CliError> {
    let compat = compat.map(|on| {
        if on {
            FsNegotiation::Always
        } else {
            FsNegotiation::Never
        }
    });
    match (flag.map(FsNegotiation::from), compat) {
        (Some(f), Some(c)) if f.wanted() != c.wanted() => Err(CliError::Conflict(format!(
            "{what} is set to {f:?} by a flag and to {c:?} by -o"
        ))),
        (Some(f), _) => Ok(f),
        (None, c) => Ok(c.unwrap_or_default()),
    }
}

/// `--inode-file-handles` values, including virtiofsd's deprecated `fallback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InodeFileHandlesArg {
    mode: InodeFileHandles,
    deprecated_fallback: bool,
}

impl FromStr for InodeFileHandlesArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "fallback" {
            return Ok(InodeFileHandlesArg {
                mode: InodeFileHandles::Prefer,
                deprecated_fallback: true,
            });
        }
        Ok(InodeFileHandlesArg {
            mode: s.parse()?,
            deprecated_fallback: false,
        })
    }
}

fn parse_cache(s: &str) -> Result<CachePolicy, String> {
    s.parse()
}

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

fn parse_dax_policy(s: &str) -> Result<DaxPolicy, String> {
    s.parse()
        .map_err(|e: berth_passthrough::DaxPolicyError| e.to_string())
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

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "virtio-fs over vhost-user (a virtiofsd drop-in), or the same filesystem on a host FUSE mount",
    override_usage = "berth --shared-dir <DIR> (--socket-path <PATH> | --fd <FD>) [OPTIONS]\n       \
                      berth fuse --shared-dir <DIR> --mountpoint <DIR> [OPTIONS]\n       \
                      berth image build <SOURCE> --out <DIR> [OPTIONS]\n       \
                      berth mount <IMAGE> <MOUNTPOINT> [OPTIONS]\n       \
                      berth fscache [OPTIONS]",
    args_override_self = true,
    args_conflicts_with_subcommands = true,
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: VhostUserArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the shared directory on a host mount point through /dev/fuse.
    Fuse(Box<FuseArgs>),
    /// Build images whose data is fetched lazily (see `berth mount`).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Mount an image read-only, fetching its data on first access, until SIGINT or SIGTERM.
    Mount(MountArgs),
    /// Block devices: ublk exports of images and files.
    #[command(subcommand)]
    Block(crate::block::BlockCommand),
    /// Writable volumes on object storage: create, snapshot, clone, gc, info (served with
    /// `berth block add volume:s3://BUCKET/PREFIX`).
    #[command(subcommand)]
    Volume(crate::volume::VolumeCommand),
    /// Serve erofs images over cachefiles on-demand mode (the host's one fscache daemon;
    /// `berth mount --mode fscache` starts one when none runs).
    Fscache(FscacheArgs),
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
    /// (0 or 1: requests are served on their queue's thread).
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

/// `berth fuse --io-uring`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoUringMode {
    /// io_uring where the kernel allows it, /dev/fuse read and write otherwise.
    Auto,
    /// io_uring or refuse to start.
    Always,
    /// /dev/fuse read and write only.
    Never,
}

/// `berth fuse` flags.
#[derive(Debug, Args)]
pub struct FuseArgs {
    /// Where to mount the filesystem on the host.
    #[arg(long, value_name = "DIR", required = true)]
    pub mountpoint: Option<PathBuf>,

    /// Worker threads reading /dev/fuse; with FUSE over io_uring also the ring threads,
    /// spread over the CPUs' queues (at least two per queue).
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,

    /// FUSE passthrough: the kernel reads, writes and maps open files straight from the host
    /// file (Linux 6.9+, CONFIG_FUSE_PASSTHROUGH, CAP_SYS_ADMIN). `auto` uses it where the
    /// kernel and berth's privileges allow, `always` fails to start otherwise.
    #[arg(long, value_name = "auto|always|never", default_value = "auto")]
    pub passthrough: berth_passthrough::PassthroughMode,

    /// FUSE over io_uring: requests and replies move through a ring per CPU instead of
    /// read and write on /dev/fuse (Linux 6.14+, CONFIG_FUSE_IO_URING, the fuse module's
    /// enable_uring parameter set to Y). `auto` uses it where the kernel allows, `always`
    /// fails to start otherwise.
    #[arg(
        long = "io-uring",
        value_name = "auto|always|never",
        default_value = "auto"
    )]
    pub io_uring: IoUringMode,

    #[command(flatten)]
    pub shared_cache: crate::shared_cache::SharedCacheArgs,

    #[command(flatten)]
    pub isolation: IsolationArgs,

    #[command(flatten)]
    pub fs: FsArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// How the serving process confines itself, shared by both modes (virtiofsd's flags).
#[derive(Debug, Args)]
pub struct IsolationArgs {
    /// Process isolation: `namespace` (new mount, pid and net namespaces, the shared directory
    /// as root), `chroot` (chroot into the shared directory) or `none` [default: namespace].
    #[arg(long, value_name = "namespace|chroot|none")]
    pub sandbox: Option<String>,

    /// Seccomp filter action for a system call outside each thread's allow-list:
    /// `kill` the process, `log` it, raise SIGSYS (`trap`), or no filter (`none`).
    #[arg(long, value_name = "none|kill|log|trap", default_value = "kill")]
    pub seccomp: String,

    /// Capability changes, virtiofsd's syntax: a `:`-separated list of capabilities, each
    /// preceded by `+` (keep it too) or `-` (drop it), e.g. `+sys_admin:-chown:-mknod`.
    #[arg(long, value_name = "CAPS")]
    pub modcaps: Option<String>,

    /// User namespace uid mapping when not started as root (namespace sandbox), virtiofsd's
    /// syntax `:namespace_uid:host_uid:count:`; give it several times for several ranges.
    /// Anything but the user's own uid with count 1 is written by newuidmap, within the ranges
    /// /etc/subuid grants the user [default: :0:<euid>:1:].
    #[arg(long, value_name = ":NS_UID:HOST_UID:COUNT:", value_parser = parse_id_map)]
    pub uid_map: Vec<IdMap>,

    /// User namespace gid mapping, like --uid-map (newgidmap, /etc/subgid)
    /// [default: :0:<egid>:1:].
    #[arg(long, value_name = ":NS_GID:HOST_GID:COUNT:", value_parser = parse_id_map)]
    pub gid_map: Vec<IdMap>,

    /// Most inodes the guest may hold (looked up and not yet forgotten); further lookups fail
    /// with ENFILE [default: 4194304; with --inode-file-handles never, where each costs a
    /// descriptor, half of what RLIMIT_NOFILE leaves after a reserve].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..))]
    pub max_inodes: Option<u64>,

    /// Most files and directories the guest may have open at once; further opens fail with
    /// EMFILE [default: half of what RLIMIT_NOFILE leaves after a reserve].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_handles: Option<u64>,
}

fn parse_id_map(s: &str) -> Result<IdMap, String> {
    s.parse::<IdMap>().map_err(|e| e.to_string())
}

/// Flags that shape the filesystem, shared by both modes.
#[derive(Debug, Args)]
pub struct FsArgs {
    /// The host directory to share.
    #[arg(long, value_name = "DIR")]
    pub shared_dir: Option<PathBuf>,

    /// Caching mode: never, metadata, auto or always [default: auto].
    #[arg(long, value_name = "never|metadata|auto|always", value_parser = parse_cache)]
    pub cache: Option<CachePolicy>,

    /// Serve extended attributes.
    #[arg(long)]
    pub xattr: bool,

    /// Serve POSIX ACLs (implies --xattr); the bare flag means `always`.
    #[arg(long, value_name = "never|auto|always", require_equals = true, num_args = 0..=1,
          default_missing_value = "always")]
    pub posix_acl: Option<Negotiation>,

    /// Store the security label the guest passes on create (implies --xattr).
    #[arg(long, value_name = "never|auto|always", require_equals = true, num_args = 0..=1,
          default_missing_value = "always")]
    pub security_label: Option<Negotiation>,

    /// Let the guest use writeback caching.
    #[arg(long)]
    pub writeback: bool,

    /// Honour O_DIRECT from the guest.
    #[arg(long)]
    pub allow_direct_io: bool,

    /// Tell the guest which directories are mount points [default].
    #[arg(long, conflicts_with = "no_announce_submounts")]
    pub announce_submounts: bool,

    /// Do not tell the guest which directories are mount points.
    #[arg(long)]
    pub no_announce_submounts: bool,

    /// Refuse every modification of the shared directory.
    #[arg(long)]
    pub readonly: bool,

    /// Do not offer READDIRPLUS (never offered with --cache never).
    #[arg(long)]
    pub no_readdirplus: bool,

    /// Hold inodes by file handle: never, prefer or mandatory [default: prefer].
    #[arg(long, value_name = "never|prefer|mandatory")]
    pub inode_file_handles: Option<InodeFileHandlesArg>,

    /// Offer FUSE_HANDLE_KILLPRIV_V2.
    #[arg(long, conflicts_with = "no_killpriv_v2")]
    pub killpriv_v2: bool,

    /// Do not offer FUSE_HANDLE_KILLPRIV_V2 [default].
    #[arg(long)]
    pub no_killpriv_v2: bool,

    /// Keep O_NOATIME on opens instead of dropping it where it is not permitted.
    #[arg(long)]
    pub preserve_noatime: bool,

    /// Take POSIX record locks on the host (otherwise the guest keeps them locally).
    #[arg(long)]
    pub posix_lock: bool,

    /// Take flock(2) locks on the host (otherwise the guest keeps them locally).
    #[arg(long)]
    pub flock: bool,

    /// Legacy comma-separated options, e.g. `-o source=/dir,cache=auto,xattr`.
    #[arg(short = 'o', value_name = "OPTIONS", action = ArgAction::Append)]
    pub compat_options: Vec<String>,

    /// With --cache never or metadata, still let the guest mmap files (only safe when the
    /// guest has the shared directory to itself).
    #[arg(long)]
    pub allow_mmap: bool,

    /// Rename extended attributes between guest and host with virtiofsd's rules
    /// (`:type:scope:key:prepend:` or `:map:key:prepend:`); implies --xattr.
    // Appended rather than overridden: a repeat with other rules is a conflict, not a pick.
    #[arg(long, value_name = "RULES", action = ArgAction::Append)]
    pub xattrmap: Vec<String>,

    /// virtiofsd flags berth does not implement; refused with a message.
    #[arg(long, value_name = "MAP", hide = true)]
    pub translate_uid: Vec<String>,
    #[arg(long, value_name = "MAP", hide = true)]
    pub translate_gid: Vec<String>,
}

/// Logging and process limits, shared by both modes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Log level [default: info, or RUST_LOG's filter when that is set].
    #[arg(long, value_name = "LEVEL", value_enum)]
    pub log_level: Option<LogLevel>,

    /// Log to syslog instead of stderr.
    #[arg(long)]
    pub syslog: bool,

    /// RLIMIT_NOFILE to set (0 leaves it unchanged) [default: raise towards 1000000].
    #[arg(long, value_name = "N")]
    pub rlimit_nofile: Option<u64>,

    /// Deprecated: same as --log-level debug.
    #[arg(short = 'd', hide = true)]
    pub compat_debug: bool,

    /// Deprecated no-op (berth always runs in the foreground).
    #[arg(short = 'f', hide = true)]
    pub compat_foreground: bool,
}

/// What berth was asked to do, with every option resolved.
#[derive(Debug)]
pub enum Mode {
    PrintCapabilities,
    VhostUser(VhostUserSettings),
    Fuse(FuseSettings),
    ImageBuild(ImageBuildSettings),
    ImageInspect(ImageInspectSettings),
    Mount(MountSettings),
    Block(crate::block::BlockCommand, ProcessSettings),
    Volume(crate::volume::VolumeCommand, ProcessSettings),
    Fscache(FscacheSettings),
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

/// The resolved isolation flags.
#[derive(Debug, Clone)]
pub struct IsolationSettings {
    pub sandbox: SandboxMode,
    pub seccomp: SeccompAction,
    pub modcaps: ModCaps,
    pub uid_map: Vec<IdMap>,
    pub gid_map: Vec<IdMap>,
    /// `None`: derived from the descriptor limit at start-up.
    pub max_inodes: Option<u64>,
    pub max_handles: Option<u64>,
}

#[derive(Debug)]
pub struct FuseSettings {
    pub mountpoint: PathBuf,
    pub threads: usize,
    pub passthrough: berth_passthrough::PassthroughMode,
    pub io_uring: IoUringMode,
    pub shared_cache: crate::shared_cache::SharedCacheArgs,
    pub isolation: IsolationSettings,
    pub fs: Config,
    pub process: ProcessSettings,
}

/// Logging and limits, plus the deprecation warnings to log once logging is up.
#[derive(Debug)]
pub struct ProcessSettings {
    /// None: not given; RUST_LOG or `info` applies.
    pub log_level: Option<LogLevel>,
    pub syslog: bool,
    pub rlimit_nofile: Option<u64>,
    pub warnings: Vec<String>,
}

/// Options given through `-o`, kept apart so they can be checked against the flags.
#[derive(Debug, Default)]
struct CompatOptions {
    source: Option<PathBuf>,
    cache: Option<CachePolicy>,
    log_level: Option<LogLevel>,
    timeout: Option<Duration>,
    xattr: Option<bool>,
    readdirplus: Option<bool>,
    writeback: Option<bool>,
    allow_direct_io: Option<bool>,
    announce_submounts: Option<bool>,
    killpriv_v2: Option<bool>,
    posix_acl: Option<bool>,
    security_label: Option<bool>,
    posix_lock: Option<bool>,
    flock: Option<bool>,
    xattrmap: Option<XattrMap>,
}

impl CompatOptions {
    fn parse(lines: &[String]) -> Result<CompatOptions, CliError> {
        let mut opts = CompatOptions::default();
        for option in lines.iter().flat_map(|line| line.split(',')) {
            if option.is_empty() {
                continue;
            }
            match option.split_once('=') {
                Some((key, value)) => opts.parse_pair(key, value)?,
                None => opts.parse_switch(option)?,
            }
        }
        Ok(opts)
    }

    fn parse_pair(&mut self, key: &str, value: &str) -> Result<(), CliError> {
        let bad = |reason: &str| CliError::BadCompatValue {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        match key {
            "source" => {
                if value.is_empty() {
                    return Err(bad("the source directory may not be empty"));
                }
                self.source = Some(PathBuf::from(value));
            }
            "cache" => self.cache = Some(value.parse::<CachePolicy>().map_err(|e| bad(&e))?),
            "log_level" | "loglevel" => {
                self.log_level = Some(
                    LogLevel::from_compat(value)
                        .ok_or_else(|| bad("expected error, warn, info, debug or trace"))?,
                )
            }
            "timeout" => {
                let seconds: f64 = value
                    .parse()
                    .map_err(|_| bad("expected a number of seconds"))?;
                let timeout = Duration::try_from_secs_f64(seconds)
                    .map_err(|_| bad("expected a non-negative number of seconds"))?;
                self.timeout = Some(timeout);
            }
            // Resolved with the isolation flags (IsolationArgs).
            "sandbox" | "modcaps" => {}
            "xattrmap" => {
                let map = value.parse::<XattrMap>().map_err(|e| bad(&e.to_string()))?;
                if self
                    .xattrmap
                    .as_ref()
                    .is_some_and(|earlier| *earlier != map)
                {
                    return Err(CliError::Conflict(
                        "-o xattrmap is given twice with different rules".into(),
                    ));
                }
                self.xattrmap = Some(map);
            }
            _ => return Err(CliError::UnknownCompatOption(format!("{key}={value}"))),
        }
        Ok(())
    }

    fn parse_switch(&mut self, option: &str) -> Result<(), CliError> {
        let (name, on) = match option.strip_prefix("no_") {
            Some(name) => (name, false),
            None => (option, true),
        };
        let slot = match name {
            "xattr" => &mut self.xattr,
            "readdirplus" => &mut self.readdirplus,
            "writeback" => &mut self.writeback,
            "allow_direct_io" => &mut self.allow_direct_io,
            "announce_submounts" => &mut self.announce_submounts,
            "killpriv_v2" => &mut self.killpriv_v2,
            "posix_acl" => &mut self.posix_acl,
            "security_label" => &mut self.security_label,
            "posix_lock" => &mut self.posix_lock,
            "flock" => &mut self.flock,
            _ => return Err(CliError::UnknownCompatOption(option.to_owned())),
        };
        *slot = Some(on);
        Ok(())
    }
}

/// Combines a flag (None when not given) with its `-o` counterpart; both given and different
/// is a conflict rather than a silent pick.
fn merge<T: PartialEq + std::fmt::Debug>(
    what: &str,
    flag: Option<T>,
    compat: Option<T>,
) -> Result<Option<T>, CliError> {
    match (flag, compat) {
        (Some(f), Some(c)) if f != c => Err(CliError::Conflict(format!(
            "{what} is set to {f:?} by a flag and to {c:?} by -o"
        ))),
        (Some(f), _) => Ok(Some(f)),
        (None, c) => Ok(c),
    }
}

/// `true` from a switch flag means "given"; `false` means "not given".
fn given(flag: bool) -> Option<bool> {
    flag.then_some(true)
}

fn merge_switch(what: &str, flag: Option<bool>, compat: Option<bool>) -> Result<bool, CliError> {
    Ok(merge(what, flag, compat)?.unwrap_or(false))
}

impl FsArgs {
    /// Builds the filesystem configuration; also returns the `-o` log level, if any.
    fn resolve(&self, warnings: &mut Vec<String>) -> Result<(Config, Option<LogLevel>), CliError> {
        self.reject_unsupported()?;
        let compat = CompatOptions::parse(&self.compat_options)?;
        if !self.compat_options.is_empty() {
            warnings.push(
                "the -o option format is deprecated; prefer the separate flags \
                 (e.g. --cache auto instead of -o cache=auto)"
                    .to_owned(),
            );
        }

        let root_dir = merge(
            "the shared directory",
            self.shared_dir.clone(),
            compat.source,
        )?
        .ok_or(CliError::MissingSharedDir)?;
        let cache = merge("the cache mode", self.cache, compat.cache)?.unwrap_or_default();

        let posix_acl = merge_negotiation("posix ACL support", self.posix_acl, compat.posix_acl)?;
        let security_label = merge_negotiation(
            "security label support",
            self.security_label,
            compat.security_label,
        )?;
        let mut xattrmap_flag: Option<XattrMap> = None;
        for rules in &self.xattrmap {
            let map = XattrMap::parse(rules).map_err(CliError::BadXattrMap)?;
            if xattrmap_flag
                .as_ref()
                .is_some_and(|earlier| *earlier != map)
            {
                return Err(CliError::Conflict(
                    "--xattrmap is given twice with different rules".into(),
                ));
            }
            xattrmap_flag = Some(map);
        }
        if let (Some(flag), Some(compat)) = (&xattrmap_flag, &compat.xattrmap) {
            if flag != compat {
                return Err(CliError::Conflict(
                    "--xattrmap and -o xattrmap give different rules".into(),
                ));
            }
        }
        let xattrmap = xattrmap_flag.or(compat.xattrmap);
        let xattr = merge_switch("xattr support", given(self.xattr), compat.xattr)?;
        if compat.xattr == Some(false)
            && (posix_acl.wanted() || security_label.wanted() || xattrmap.is_some())
        {
            return Err(CliError::Conflict(
                "-o no_xattr turns off xattrs, which posix ACLs, security labels and \
                 --xattrmap need"
                    .into(),
            ));
        }

        let announce_flag = if self.no_announce_submounts {
            Some(false)
        } else {
            given(self.announce_submounts)
        };
        let announce_submounts = merge(
            "submount announcement",
            announce_flag,
            compat.announce_submounts,
        )?
        .unwrap_or(true);
        let killpriv_flag = if self.no_killpriv_v2 {
            Some(false)
        } else {
            given(self.killpriv_v2)
        };
        let killpriv_v2 = merge("KILLPRIV_V2", killpriv_flag, compat.killpriv_v2)?.unwrap_or(false);
        let readdirplus_flag = self.no_readdirplus.then_some(false);
        let readdirplus =
            merge("READDIRPLUS", readdirplus_flag, compat.readdirplus)?.unwrap_or(true);

        let inode_file_handles = match self.inode_file_handles {
            Some(arg) => {
                if arg.deprecated_fallback {
                    warnings
                        .push("--inode-file-handles=fallback is deprecated; use prefer".to_owned());
                }
                arg.mode
            }
            None => InodeFileHandles::Prefer,
        };

        let cfg = Config {
            root_dir,
            cache,
            entry_timeout: compat.timeout,
            attr_timeout: compat.timeout,
            writeback: merge_switch("writeback caching", given(self.writeback), compat.writeback)?,
            xattr: xattr || posix_acl.wanted() || security_label.wanted() || xattrmap.is_some(),
            posix_acl,
            security_label,
            xattrmap,
            allow_mmap: self.allow_mmap,
            allow_direct_io: merge_switch(
                "direct I/O",
                given(self.allow_direct_io),
                compat.allow_direct_io,
            )?,
            announce_submounts,
            readonly: self.readonly,
            // As virtiofsd: with nothing cached, READDIRPLUS only costs lookups.
            readdirplus: readdirplus && cache != CachePolicy::Never,
            inode_file_handles,
            killpriv_v2,
            preserve_noatime: self.preserve_noatime,
            posix_lock: merge_switch("POSIX locks", given(self.posix_lock), compat.posix_lock)?,
            flock: merge_switch("flock locks", given(self.flock), compat.flock)?,
            ..Config::default()
        };
        Ok((cfg, compat.log_level))
    }

    fn reject_unsupported(&self) -> Result<(), CliError> {
        let unsupported = [
            (!self.translate_uid.is_empty(), "--translate-uid"),
            (!self.translate_gid.is_empty(), "--translate-gid"),
        ];
        match unsupported.iter().find(|(present, _)| *present) {
            Some((_, flag)) => Err(CliError::UnsupportedFlag(flag)),
            None => Ok(()),
        }
    }
}

impl CommonArgs {
    pub(crate) fn resolve(
        &self,
        compat_level: Option<LogLevel>,
        mut warnings: Vec<String>,
    ) -> Result<ProcessSettings, CliError> {
        if self.compat_debug {
            warnings.push("-d is deprecated; use --log-level debug".to_owned());
        }
        if self.compat_foreground {
            warnings.push("-f is deprecated and has no effect; please remove it".to_owned());
        }
        let debug_flag = self.compat_debug.then_some(LogLevel::Debug);
        let flag_level = merge("the log level", self.log_level, debug_flag)?;
        let log_level = merge("the log level", flag_level, compat_level)?;
        Ok(ProcessSettings {
            log_level,
            syslog: self.syslog,
            rlimit_nofile: self.rlimit_nofile,
            warnings,
        })
    }
}

/// The last value of `key` among `-o key=value,...` options.
fn compat_value(options: &[String], key: &str) -> Option<String> {
    options
        .iter()
        .flat_map(|o| o.split(','))
        .filter_map(|item| item.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
        .next_back()
}

impl IsolationArgs {
    /// Merges the flags with their `-o sandbox=` / `-o modcaps=` counterparts; a flag and an
    /// option that disagree are an error, never one silently winning.
    fn resolve(&self, compat_options: &[String]) -> Result<IsolationSettings, CliError> {
        let parse_sandbox = |value: &str| {
            value
                .parse::<SandboxMode>()
                .map_err(|_| CliError::InvalidChoice {
                    flag: "sandbox",
                    value: value.to_owned(),
                    expected: "namespace, chroot, none",
                })
        };
        let flag_sandbox = self.sandbox.as_deref().map(parse_sandbox).transpose()?;
        let compat_sandbox = compat_value(compat_options, "sandbox");
        let compat_mode = compat_sandbox.as_deref().map(parse_sandbox).transpose()?;
        let sandbox = match (flag_sandbox, compat_mode) {
            (Some(flag), Some(compat)) if flag != compat => {
                return Err(CliError::Conflict(format!(
                    "--sandbox {} contradicts -o sandbox={}",
                    self.sandbox.as_deref().unwrap_or_default(),
                    compat_sandbox.as_deref().unwrap_or_default()
                )))
            }
            (Some(mode), _) | (None, Some(mode)) => mode,
            (None, None) => SandboxMode::Namespace,
        };
        let seccomp: SeccompAction = self.seccomp.parse().map_err(|_| CliError::InvalidChoice {
            flag: "seccomp",
            value: self.seccomp.clone(),
            expected: "none, kill, log, trap",
        })?;
        let compat_modcaps = compat_value(compat_options, "modcaps");
        let modcaps_spec = match (&self.modcaps, compat_modcaps) {
            (Some(flag), Some(compat)) if *flag != compat => {
                return Err(CliError::Conflict(format!(
                    "--modcaps {flag} contradicts -o modcaps={compat}"
                )))
            }
            (Some(spec), _) => Some(spec.clone()),
            (None, compat) => compat,
        };
        let modcaps: ModCaps = match &modcaps_spec {
            Some(spec) => spec
                .parse()
                .map_err(|e: berth_seccomp::Error| CliError::BadModcaps(e.to_string()))?,
            None => ModCaps::default(),
        };
        if (!self.uid_map.is_empty() || !self.gid_map.is_empty())
            && sandbox != SandboxMode::Namespace
        {
            return Err(CliError::Conflict(
                "--uid-map and --gid-map need the namespace sandbox (--sandbox namespace)".into(),
            ));
        }
        berth_seccomp::check_id_maps(&self.uid_map, "--uid-map")
            .and_then(|()| berth_seccomp::check_id_maps(&self.gid_map, "--gid-map"))
            .map_err(|e| CliError::BadIdMaps(e.to_string()))?;
        Ok(IsolationSettings {
            sandbox,
            seccomp,
            modcaps,
            uid_map: self.uid_map.clone(),
            gid_map: self.gid_map.clone(),
            max_inodes: self.max_inodes,
            max_handles: self.max_handles,
        })
    }
}

impl VhostUserArgs {
    fn resolve(&self) -> Result<VhostUserSettings, CliError> {
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

impl FuseArgs {
    fn resolve(&self) -> Result<FuseSettings, CliError> {
        let mut warnings = Vec::new();
        let (fs, compat_level) = self.fs.resolve(&mut warnings)?;
        let mut isolation = self.isolation.resolve(&self.fs.compat_options)?;
        // SAFETY: geteuid and getegid have no preconditions.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        fuse_id_maps(&mut isolation, euid, egid)?;
        Ok(FuseSettings {
            // clap enforces `required`; the Option only lets the struct be flattened.
            mountpoint: self.mountpoint.clone().unwrap_or_default(),
            threads: usize::from(self.threads),
            passthrough: self.passthrough,
            io_uring: self.io_uring,
            shared_cache: self.shared_cache.clone(),
            isolation,
            fs,
            process: self.common.resolve(compat_level, warnings)?,
        })
    }
}

/// The kernel hands a FUSE server the callers' host ids (and takes the ids in its replies as
/// host ids), which berth's user namespace would read as its own. So an unprivileged `berth
/// fuse` maps only its own ids, each to itself: inside the namespace it is then the same user
/// as outside, creates files as itself and reports host ids unchanged (as it does without a
/// sandbox). A range, another id, or its own id under another number would put files under
/// the wrong owners and show root-owned files as the caller's or the reverse. Ranges are for the
/// vhost-user daemon, whose ids come from the guest. (Root gets maps refused by the sandbox,
/// with its own reason.)
fn fuse_id_maps(isolation: &mut IsolationSettings, euid: u32, egid: u32) -> Result<(), CliError> {
    if euid == 0 {
        return Ok(());
    }
    for (maps, own, option) in [
        (&mut isolation.uid_map, euid, "--uid-map"),
        (&mut isolation.gid_map, egid, "--gid-map"),
    ] {
        let identity = IdMap {
            inside: own,
            outside: own,
            count: 1,
        };
        if maps.is_empty() {
            if isolation.sandbox == SandboxMode::Namespace {
                maps.push(identity);
            }
            continue;
        }
        if maps.as_slice() != [identity] {
            let given: Vec<String> = maps.iter().map(ToString::to_string).collect();
            return Err(CliError::BadIdMaps(format!(
                "berth fuse cannot use {option} {}: FUSE requests carry the callers' host ids, \
                 which a user namespace mapping ranges, other ids or your own id under another \
                 number would read as other users, so files would land under the wrong owners; \
                 leave it out (berth fuse maps your own id {own} to itself) or serve the ranges \
                 through vhost-user",
                given.join(" ")
            )));
        }
    }
    Ok(())
}

impl Cli {
    /// Checks and completes the parsed command line.
    pub fn resolve(&self) -> Result<Mode, CliError> {
        match &self.command {
            Some(Command::Fuse(args)) => Ok(Mode::Fuse(args.resolve()?)),
            Some(Command::Image(ImageCommand::Build(args))) => {
                Ok(Mode::ImageBuild(args.resolve()?))
            }
            Some(Command::Image(ImageCommand::Inspect(args))) => {
                Ok(Mode::ImageInspect(args.resolve()?))
            }
            Some(Command::Mount(args)) => Ok(Mode::Mount(args.resolve()?)),
            Some(Command::Block(command)) => {
                let process = command.common().resolve(None, Vec::new())?;
                Ok(Mode::Block(command.clone(), process))
            }
            Some(Command::Volume(command)) => {
                let process = command.common().resolve(None, Vec::new())?;
                Ok(Mode::Volume(command.clone(), process))
            }
            Some(Command::Fscache(args)) => Ok(Mode::Fscache(args.resolve()?)),
            None if self.serve.print_capabilities => Ok(Mode::PrintCapabilities),
            None => Ok(Mode::VhostUser(self.serve.resolve()?)),
        }
    }
}

/// QEMU's vhost-user backend description (docs/interop/vhost-user.json) for `--print-capabilities`.
pub fn capabilities_json() -> String {
    let features = [
        "posix-acl-negotiation-mode",
        "security-label-negotiation-mode",
        "separate-options",
        "migrate-precopy",
        // berth's own: a DAX window (`--dax-window`) and per-file DAX (`--dax-policy`).
        "dax-window",
        "dax-policy",
    ];
    serde_json::json!({ "type": "fs", "features": features }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied()))
    }

    fn resolve(args: &[&str]) -> Result<Mode, CliError> {
        parse(args)
            .unwrap_or_else(|e| panic!("{args:?} should parse: {e}"))
            .resolve()
    }

    fn vhost_user(args: &[&str]) -> VhostUserSettings {
        match resolve(args) {
            Ok(Mode::VhostUser(s)) => s,
            other => panic!("{args:?} should select vhost-user mode, got {other:?}"),
        }
    }

    fn isolation(sandbox: SandboxMode, uid_map: Vec<IdMap>) -> IsolationSettings {
        IsolationSettings {
            sandbox,
            seccomp: SeccompAction::Kill,
            modcaps: ModCaps::default(),
            uid_map,
            gid_map: Vec::new(),
            max_inodes: None,
            max_handles: None,
        }
    }

    #[test]
    fn unprivileged_fuse_maps_its_own_ids_to_themselves() {
        let own = |id| IdMap {
            inside: id,
            outside: id,
            count: 1,
        };
        // No map given: the namespace sandbox gets the identity of the caller's ids.
        let mut i = isolation(SandboxMode::Namespace, Vec::new());
        fuse_id_maps(&mut i, 1000, 1001).unwrap();
        assert_eq!(i.uid_map, [own(1000)]);
        assert_eq!(i.gid_map, [own(1001)]);
        // The same map given explicitly is fine; without a namespace nothing is added.
        let mut i = isolation(SandboxMode::Namespace, vec![own(1000)]);
        fuse_id_maps(&mut i, 1000, 1001).unwrap();
        let mut i = isolation(SandboxMode::Chroot, Vec::new());
        fuse_id_maps(&mut i, 1000, 1001).unwrap();
        assert!(i.uid_map.is_empty());
        // Root is left to the sandbox's own checks.
        let mut i = isolation(SandboxMode::Namespace, Vec::new());
        fuse_id_maps(&mut i, 0, 0).unwrap();
        assert!(i.uid_map.is_empty());
        // The own id under another number (the vhost-user default), another id, or a range:
        // FUSE's host ids would be read as other users.
        for bad in [
            IdMap {
                inside: 0,
                outside: 1000,
                count: 1,
            },
            own(1234),
            IdMap {
                inside: 1000,
                outside: 1000,
                count: 10,
            },
        ] {
            let mut i = isolation(SandboxMode::Namespace, vec![bad]);
            let err = fuse_id_maps(&mut i, 1000, 1001).unwrap_err().to_string();
            assert!(
                err.contains("--uid-map") && err.contains("host ids"),
                "{err}"
            );
        }
    }

    #[test]
    fn kata_go_invocation() {
        let s = vhost_user(&[
            "--syslog",
            "--cache=auto",
            "--shared-dir=/run/kata/shared",
            "--fd=3",
            "--thread-pool-size=1",
            "--announce-submounts",
        ]);
        assert_eq!(s.listener, ListenerSource::Fd(3));
        assert!(s.process.syslog);
        assert_eq!(s.fs.root_dir, PathBuf::from("/run/kata/shared"));
        assert_eq!(s.fs.cache, CachePolicy::Auto);
        assert!(s.fs.announce_submounts);
        assert_eq!(s.thread_pool_size, 1);
        assert!(!s.fs.xattr);
        assert!(s.process.warnings.is_empty());
    }

    #[test]
    fn kata_runtime_rs_invocation() {
        let s = vhost_user(&[
            "--socket-path",
            "/run/kata/vfs.sock",
            "--shared-dir",
            "/run/kata/shared",
            "--cache",
            "auto",
            "--thread-pool-size=1",
            "-o",
            "announce_submounts",
            "--xattr",
        ]);
        assert_eq!(
            s.listener,
            ListenerSource::Path {
                path: "/run/kata/vfs.sock".into(),
                group: None
            }
        );
        assert!(s.fs.xattr);
        assert!(s.fs.announce_submounts);
        assert_eq!(s.process.log_level, None);
        assert_eq!(s.process.warnings.len(), 1, "the -o deprecation warning");
    }

    #[test]
    fn defaults_match_virtiofsd() {
        let s = vhost_user(&["--shared-dir", "/d", "--socket-path", "/s"]);
        assert_eq!(s.fs.cache, CachePolicy::Auto);
        assert_eq!(s.fs.inode_file_handles, InodeFileHandles::Prefer);
        assert!(s.fs.announce_submounts);
        assert!(s.fs.readdirplus);
        assert!(!s.fs.killpriv_v2 && !s.fs.posix_lock && !s.fs.flock && !s.fs.readonly);
        assert_eq!(s.max_request_queues, 16);
        assert_eq!(s.thread_pool_size, 0);
        assert_eq!(s.tag, None);
        assert_eq!(s.dax_window, 0);
    }

    #[test]
    fn dax_policy_defaults_to_always_with_a_window_and_never_without() {
        let base = ["--shared-dir", "/d", "--socket-path", "/s"];
        let no_window = vhost_user(&base);
        assert_eq!(no_window.fs.dax_policy, DaxPolicy::Never);
        assert!(no_window.process.warnings.is_empty());
        let window = vhost_user(&[&base[..], &["--dax-window", "64M"]].concat());
        assert_eq!(window.fs.dax_policy, DaxPolicy::Always);
        let sized = vhost_user(
            &[
                &base[..],
                &["--dax-window", "64M", "--dax-policy", "size:2M"],
            ]
            .concat(),
        );
        assert_eq!(sized.fs.dax_policy, DaxPolicy::MinSize(2 << 20));
        let idle = vhost_user(&[&base[..], &["--dax-policy", "xattr"]].concat());
        assert_eq!(idle.fs.dax_policy, DaxPolicy::Never);
        assert!(
            idle.process
                .warnings
                .iter()
                .any(|w| w.contains("--dax-policy")),
            "a policy without a window is reported: {:?}",
            idle.process.warnings
        );
        let bad = parse(&[&base[..], &["--dax-policy", "size:lots"]].concat())
            .expect_err("size:lots refused");
        assert_eq!(bad.kind(), ErrorKind::ValueValidation);
        assert!(bad.to_string().contains("needs a size in bytes"), "{bad}");
    }

    #[test]
    fn dax_window_takes_whole_2mib_units() {
        let base = ["--shared-dir", "/d", "--socket-path", "/s", "--dax-window"];
        let with = |size: &str| {
            let mut args = base.to_vec();
            args.push(size);
            parse(&args)
        };
        assert_eq!(
            vhost_user(&[&base[..], &["1G"]].concat()).dax_window,
            1 << 30
        );
        assert_eq!(
            vhost_user(&[&base[..], &["64M"]].concat()).dax_window,
            64 << 20
        );
        assert_eq!(vhost_user(&[&base[..], &["0"]].concat()).dax_window, 0);
        for bad in ["3M", "4097", "1T", "2x"] {
            let err = with(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
        }
    }

    #[test]
    fn legacy_options_map_to_config() {
        let s = vhost_user(&[
            "--fd=4",
            "-o",
            "source=/srv,cache=always,xattr,no_readdirplus,writeback,posix_lock,flock",
            "-o",
            "killpriv_v2,allow_direct_io,no_announce_submounts,log_level=debug,timeout=2.5",
        ]);
        assert_eq!(s.fs.root_dir, PathBuf::from("/srv"));
        assert_eq!(s.fs.cache, CachePolicy::Always);
        assert!(s.fs.xattr && s.fs.writeback && s.fs.posix_lock && s.fs.flock);
        assert!(s.fs.killpriv_v2 && s.fs.allow_direct_io);
        assert!(!s.fs.readdirplus && !s.fs.announce_submounts);
        assert_eq!(s.process.log_level, Some(LogLevel::Debug));
        assert_eq!(s.fs.entry_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(s.fs.attr_timeout, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn legacy_virtiofsd_spellings() {
        let s = vhost_user(&[
            "--fd=4",
            "-o",
            "source=/srv,cache=none,loglevel=err,no_posix_lock,no_flock,sandbox=none",
        ]);
        assert_eq!(s.fs.cache, CachePolicy::Never);
        assert!(!s.fs.readdirplus, "cache=none turns READDIRPLUS off");
        assert_eq!(s.process.log_level, Some(LogLevel::Error));
        assert!(!s.fs.posix_lock && !s.fs.flock);
    }

    #[test]
    fn unknown_or_bad_legacy_options_are_errors() {
        let base = ["--fd=3", "--shared-dir=/d", "-o"];
        let run = |opt: &str| {
            let mut args = base.to_vec();
            args.push(opt);
            resolve(&args).err()
        };
        assert_eq!(
            run("frobnicate"),
            Some(CliError::UnknownCompatOption("frobnicate".into()))
        );
        assert_eq!(
            run("color=blue"),
            Some(CliError::UnknownCompatOption("color=blue".into()))
        );
        assert!(matches!(
            run("cache=sometimes"),
            Some(CliError::BadCompatValue { .. })
        ));
        assert!(matches!(
            run("timeout=-1"),
            Some(CliError::BadCompatValue { .. })
        ));
        assert!(matches!(
            run("log_level=loud"),
            Some(CliError::BadCompatValue { .. })
        ));
        assert_eq!(run("sandbox=chroot"), None);
        assert_eq!(run("modcaps=+sys_admin"), None);
        assert!(matches!(
            run("sandbox=jail"),
            Some(CliError::InvalidChoice {
                flag: "sandbox",
                ..
            })
        ));
        assert!(matches!(
            run("modcaps=+nonsense"),
            Some(CliError::BadModcaps(_))
        ));
    }

    #[test]
    fn flag_and_legacy_option_disagreeing_is_a_conflict() {
        let err = resolve(&["--fd=3", "--shared-dir=/a", "-o", "source=/b"]).unwrap_err();
        assert!(matches!(err, CliError::Conflict(_)), "{err}");
        let err = resolve(&[
            "--fd=3",
            "--shared-dir=/a",
            "--cache=never",
            "-o",
            "cache=always",
        ])
        .unwrap_err();
        assert!(matches!(err, CliError::Conflict(_)), "{err}");
        let err = resolve(&["--fd=3", "--shared-dir=/a", "--xattr", "-o", "no_xattr"]).unwrap_err();
        assert!(matches!(err, CliError::Conflict(_)), "{err}");
        // Agreement is fine.
        let s = vhost_user(&[
            "--fd=3",
            "--shared-dir=/a",
            "-o",
            "source=/a,announce_submounts",
        ]);
        assert_eq!(s.fs.root_dir, PathBuf::from("/a"));
    }

    #[test]
    fn isolation_flags_and_legacy_options_must_agree() {
        let conflict = |args: &[&str]| match resolve(args) {
            Err(CliError::Conflict(message)) => message,
            other => panic!("{args:?} should be a conflict, got {other:?}"),
        };
        let message = conflict(&[
            "--fd=3",
            "--shared-dir=/d",
            "--sandbox=namespace",
            "-o",
            "sandbox=chroot",
        ]);
        assert!(message.contains("--sandbox namespace"), "{message}");
        assert!(message.contains("sandbox=chroot"), "{message}");
        conflict(&[
            "--fd=3",
            "--shared-dir=/d",
            "--sandbox=none",
            "-o",
            "sandbox=namespace",
        ]);
        let message = conflict(&[
            "--fd=3",
            "--shared-dir=/d",
            "--modcaps=+sys_admin",
            "-o",
            "modcaps=-mknod",
        ]);
        assert!(message.contains("modcaps"), "{message}");
        // Agreement, or only one of the two, is fine.
        let s = vhost_user(&[
            "--fd=3",
            "--shared-dir=/d",
            "--sandbox=chroot",
            "-o",
            "sandbox=chroot",
        ]);
        assert_eq!(s.isolation.sandbox, SandboxMode::Chroot);
        let s = vhost_user(&["--fd=3", "--shared-dir=/d", "-o", "sandbox=none"]);
        assert_eq!(s.isolation.sandbox, SandboxMode::None);
        let s = vhost_user(&["--fd=3", "--shared-dir=/d"]);
        assert_eq!(s.isolation.sandbox, SandboxMode::Namespace);
        let s = vhost_user(&[
            "--fd=3",
            "--shared-dir=/d",
            "--modcaps=+sys_admin",
            "-o",
            "modcaps=+sys_admin",
        ]);
        assert_eq!(s.isolation.modcaps.add.len(), 1);
        let s = vhost_user(&["--fd=3", "--shared-dir=/d", "-o", "modcaps=+sys_admin"]);
        assert_eq!(s.isolation.modcaps.add.len(), 1);
    }

    #[test]
    fn negotiated_features_keep_their_mode() {
        let s = vhost_user(&[
            "--fd=3",
            "--shared-dir=/d",
            "-o",
            "posix_acl,security_label",
        ]);
        assert_eq!(s.fs.posix_acl, FsNegotiation::Always);
        assert_eq!(s.fs.security_label, FsNegotiation::Always);
        let s = vhost_user(&[
            "--fd=3",
            "--shared-dir=/d",
            "--posix-acl=auto",
            "-o",
            "posix_acl",
        ]);
        assert_eq!(
            s.fs.posix_acl,
            FsNegotiation::Auto,
            "the flag's mode wins when both agree"
        );
        let err = resolve(&[
            "--fd=3",
            "--shared-dir=/d",
            "--posix-acl=always",
            "-o",
            "no_posix_acl",
        ])
        .unwrap_err();
        assert!(matches!(err, CliError::Conflict(_)), "{err}");
        let s = vhost_user(&["--fd=3", "--shared-dir=/d", "--allow-mmap", "--cache=never"]);
        assert!(s.fs.allow_mmap);
        assert!(!vhost_user(&["--fd=3", "--shared-dir=/d"]).fs.allow_mmap);
    }

    #[test]
    fn conflicting_socket_flags_are_usage_errors() {
        let err = parse(&["--fd=3", "--socket-path=/s", "--shared-dir=/d"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["--fd=3", "--socket-group=kvm", "--shared-dir=/d"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["--fd=3", "--shared-dir=/d", "--cache=sometimes"][..],
            &["--fd=3", "--shared-dir=/d", "--inode-file-handles=often"],
            &["--fd=3", "--shared-dir=/d", "--log-level=loud"],
            &["--fd=x", "--shared-dir=/d"],
            &["--fd=3", "--shared-dir=/d", "--max-request-queues=0"],
            &["--fd=3", "--shared-dir=/d", "--max-request-queues=64"],
            &["--fd=3", "--shared-dir=/d", "--tag="],
            &[
                "--fd=3",
                "--shared-dir=/d",
                "--tag=0123456789012345678901234567890123456",
            ],
            &["--fd=3", "--shared-dir=/d", "--no-such-flag"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?} must be rejected"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn missing_shared_dir_or_socket() {
        assert_eq!(
            resolve(&["--socket-path=/s"]).unwrap_err(),
            CliError::MissingSharedDir
        );
        assert_eq!(
            resolve(&["--shared-dir=/d"]).unwrap_err(),
            CliError::MissingSocket
        );
    }

    #[test]
    fn isolation_flags_parse_as_virtiofsd_spells_them() {
        let base = ["--fd=3", "--shared-dir=/d"];
        let with = |extra: &str| {
            let mut args = base.to_vec();
            args.push(extra);
            resolve(&args)
        };
        let settings = |extra: &str| match with(extra) {
            Ok(Mode::VhostUser(s)) => s,
            other => panic!("{extra}: {other:?}"),
        };
        assert_eq!(
            settings("--sandbox=none").isolation.sandbox,
            SandboxMode::None
        );
        assert_eq!(
            settings("--sandbox=namespace").isolation.sandbox,
            SandboxMode::Namespace
        );
        assert_eq!(
            settings("--sandbox=chroot").isolation.sandbox,
            SandboxMode::Chroot
        );
        assert_eq!(
            settings("--seccomp=kill").isolation.seccomp,
            SeccompAction::Kill
        );
        assert_eq!(
            settings("--seccomp=log").isolation.seccomp,
            SeccompAction::Log
        );
        assert!(
            settings("--modcaps=+sys_admin:-chown")
                .isolation
                .modcaps
                .add
                .len()
                == 1
        );
        assert!(matches!(
            with("--sandbox=jail").unwrap_err(),
            CliError::InvalidChoice {
                flag: "sandbox",
                ..
            }
        ));
        assert!(matches!(
            with("--seccomp=maybe").unwrap_err(),
            CliError::InvalidChoice {
                flag: "seccomp",
                ..
            }
        ));
        assert!(matches!(
            with("--modcaps=+no_such_cap").unwrap_err(),
            CliError::BadModcaps(_)
        ));
        assert!(matches!(
            with("--migration-mode=by-magic").unwrap_err(),
            CliError::InvalidChoice {
                flag: "migration-mode",
                ..
            }
        ));
        assert!(matches!(
            with("--migration-on-error=ignore").unwrap_err(),
            CliError::InvalidChoice {
                flag: "migration-on-error",
                ..
            }
        ));
    }

    #[test]
    fn migration_flags_take_virtiofsd_values() {
        let s = vhost_user(&[
            "--fd=3",
            "--shared-dir=/d",
            "--migration-mode=file-handles",
            "--migration-on-error=guest-error",
            "--migration-verify-handles",
            "--migration-confirm-paths",
        ]);
        assert_eq!(s.fs.migration.mode, MigrationMode::FileHandles);
        assert_eq!(s.fs.migration.on_error, MigrationOnError::GuestError);
        assert!(s.fs.migration.verify_handles && s.fs.migration.confirm_paths);
        let s = vhost_user(&["--fd=3", "--shared-dir=/d"]);
        assert_eq!(s.fs.migration.mode, MigrationMode::FindPaths);
        assert_eq!(s.fs.migration.on_error, MigrationOnError::Abort);
        assert!(capabilities_json().contains("migrate-precopy"));
    }

    #[test]
    fn guest_limits_and_id_maps_parse() {
        let s = vhost_user(&[
            "--fd=3",
            "--shared-dir=/d",
            "--max-inodes=1000",
            "--max-handles=10",
            "--uid-map=:0:1000:1:",
            "--uid-map=:1:200000:65536:",
            "--gid-map=/5/1000/1/",
        ]);
        assert_eq!(s.isolation.max_inodes, Some(1000));
        assert_eq!(s.isolation.max_handles, Some(10));
        assert_eq!(
            s.isolation.uid_map,
            [
                IdMap {
                    inside: 0,
                    outside: 1000,
                    count: 1
                },
                IdMap {
                    inside: 1,
                    outside: 200000,
                    count: 65536
                }
            ]
        );
        assert_eq!(
            s.isolation
                .gid_map
                .iter()
                .map(|m| m.inside)
                .collect::<Vec<_>>(),
            [5]
        );
        // Overlapping ranges are refused before anything starts, naming the option.
        let err = resolve(&[
            "--fd=3",
            "--shared-dir=/d",
            "--gid-map=:0:1000:1:",
            "--gid-map=:0:200000:10:",
        ])
        .unwrap_err();
        assert!(
            matches!(&err, CliError::BadIdMaps(m) if m.contains("--gid-map") && m.contains("overlaps")),
            "{err}"
        );
        for bad in [
            "--max-inodes=1",
            "--max-handles=0",
            "--max-handles=lots",
            "--uid-map=0:1000:1",
            "--gid-map=:0:1000:0:",
        ] {
            let err = parse(&["--fd=3", "--shared-dir=/d", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
        match resolve(&[
            "fuse",
            "--shared-dir=/d",
            "--mountpoint=/m",
            "--seccomp=log",
            "-o",
            "sandbox=chroot,modcaps=-mknod",
        ]) {
            Ok(Mode::Fuse(s)) => {
                assert_eq!(s.isolation.sandbox, SandboxMode::Chroot);
                assert_eq!(s.isolation.seccomp, SeccompAction::Log);
                assert_eq!(s.isolation.modcaps.remove.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            resolve(&[
                "--fd=3",
                "--shared-dir=/d",
                "--sandbox=none",
                "--uid-map=:0:1:1:"
            ]),
            Err(CliError::Conflict(_))
        ));
    }

    #[test]
    fn virtiofsd_value_forms() {
        let s = vhost_user(&[
            "--fd=3",
            "--shared-dir=/d",
            "--inode-file-handles=mandatory",
            "--posix-acl",
            "--security-label=auto",
            "--no-announce-submounts",
            "--killpriv-v2",
            "--log-level=trace",
            "--rlimit-nofile=4096",
            "--tag=myfs",
            "--max-request-queues=4",
        ]);
        assert_eq!(s.fs.inode_file_handles, InodeFileHandles::Mandatory);
        assert_eq!(s.fs.posix_acl, FsNegotiation::Always);
        assert_eq!(s.fs.security_label, FsNegotiation::Auto);
        assert!(s.fs.xattr);
        assert!(!s.fs.announce_submounts && s.fs.killpriv_v2);
        assert_eq!(s.process.log_level, Some(LogLevel::Trace));
        assert_eq!(s.process.rlimit_nofile, Some(4096));
        assert_eq!(s.tag.as_deref(), Some("myfs"));
        assert_eq!(s.max_request_queues, 4);

        let s = vhost_user(&[
            "--fd=3",
            "--shared-dir=/d",
            "--inode-file-handles",
            "fallback",
        ]);
        assert_eq!(s.fs.inode_file_handles, InodeFileHandles::Prefer);
        assert_eq!(s.process.warnings.len(), 1);

        let s = vhost_user(&["--fd=3", "--shared-dir=/d", "--posix-acl=never", "-d", "-f"]);
        assert!(s.fs.posix_acl == FsNegotiation::Never && !s.fs.xattr);
        assert_eq!(s.process.log_level, Some(LogLevel::Debug));
        assert_eq!(s.process.warnings.len(), 2);
    }

    #[test]
    fn contradicting_flag_pairs_are_usage_errors() {
        for pair in [
            ["--no-announce-submounts", "--announce-submounts"],
            ["--killpriv-v2", "--no-killpriv-v2"],
        ] {
            let err = parse(&["--fd=3", "--shared-dir=/d", pair[0], pair[1]]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ArgumentConflict, "{pair:?}");
        }
        // Repeating a flag is not a contradiction: the last value wins.
        let s = vhost_user(&[
            "--fd=3",
            "--shared-dir=/d",
            "--cache=never",
            "--cache=always",
        ]);
        assert_eq!(s.fs.cache, CachePolicy::Always);
    }

    #[test]
    fn deprecated_socket_alias() {
        let s = vhost_user(&["--socket=/s", "--shared-dir=/d", "--socket-group=kvm"]);
        assert_eq!(
            s.listener,
            ListenerSource::Path {
                path: "/s".into(),
                group: Some("kvm".into())
            }
        );
        assert_eq!(s.process.warnings.len(), 1);
    }

    #[test]
    fn xattrmap_flag_and_legacy_option() {
        let base = ["--fd=3", "--shared-dir=/d"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            resolve(&args)
        };
        let settings = |extra: &[&str]| match with(extra) {
            Ok(Mode::VhostUser(s)) => s,
            other => panic!("{extra:?}: expected vhost-user mode, got {other:?}"),
        };
        let expected = XattrMap::parse(":map::user.virtiofs.:").unwrap();
        // Both spellings, and the map implies --xattr (as virtiofsd).
        for extra in [
            &["--xattrmap=:map::user.virtiofs.:"][..],
            &["--xattrmap", ":map::user.virtiofs.:"],
            &["-o", "xattrmap=:map::user.virtiofs.:"],
            &["-o", "xattrmap=:map::user.virtiofs.:,cache=auto"],
        ] {
            let s = settings(extra);
            assert_eq!(s.fs.xattrmap.as_ref(), Some(&expected), "{extra:?}");
            assert!(s.fs.xattr, "{extra:?} turns xattrs on");
        }
        assert!(settings(&[]).fs.xattrmap.is_none());
        // Rules with whitespace and newlines between them, and `=` inside a -o value.
        let s = settings(&[
            "--xattrmap",
            "/prefix/all/a=b./user.x./
  /ok/all///",
        ]);
        assert_eq!(s.fs.xattrmap.unwrap().rules().len(), 2);
        let s = settings(&["-o", "xattrmap=/prefix/all/a=b./user.x./ /ok/all///"]);
        assert_eq!(s.fs.xattrmap.unwrap().rules().len(), 2);
        // The same rules twice agree; different rules conflict.
        let same = settings(&[
            "--xattrmap=:map::user.virtiofs.:",
            "-o",
            "xattrmap=/map//user.virtiofs./",
        ]);
        assert_eq!(same.fs.xattrmap, Some(expected));
        for extra in [
            &["--xattrmap=:map::user.a.:", "-o", "xattrmap=:map::user.b.:"][..],
            &[
                "-o",
                "xattrmap=:map::user.a.:",
                "-o",
                "xattrmap=:map::user.b.:",
            ],
            &["--xattrmap=:ok:all:::", "-o", "no_xattr"],
        ] {
            let err = with(extra).unwrap_err();
            assert!(matches!(err, CliError::Conflict(_)), "{extra:?}: {err}");
        }
        assert!(
            settings(&["--xattrmap=:ok:all:::", "--xattrmap=/ok/all///"])
                .fs
                .xattrmap
                .is_some()
        );
        let err = with(&["--xattrmap=:ok:all:::", "--xattrmap=:bad:all:::"]).unwrap_err();
        assert!(matches!(err, CliError::Conflict(_)), "{err}");
        // Malformed rules name the rule and what is wrong with it.
        let err = with(&["--xattrmap=:ok:all::: :prefix:client:trusted."]).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, CliError::BadXattrMap(_)), "{message}");
        assert!(
            message.starts_with("invalid --xattrmap: xattr map rule 2"),
            "{message}"
        );
        assert!(message.contains(":prefix:client:trusted."), "{message}");
        let err = with(&["-o", "xattrmap=:nonsense:all:::"]).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, CliError::BadCompatValue { .. }), "{message}");
        assert!(message.contains("unknown type 'nonsense'"), "{message}");
        assert_eq!(
            with(&["--xattrmap= \n "]).unwrap_err(),
            CliError::BadXattrMap(XattrMapError::NoRules)
        );
        // The fuse subcommand takes it too.
        match resolve(&[
            "fuse",
            "--shared-dir=/d",
            "--mountpoint=/m",
            "--xattrmap=:ok:all:::",
        ]) {
            Ok(Mode::Fuse(s)) => assert!(s.fs.xattrmap.is_some() && s.fs.xattr),
            other => panic!("expected fuse mode, got {other:?}"),
        }
    }

    #[test]
    fn print_capabilities_needs_nothing_else() {
        assert!(matches!(
            resolve(&["--print-capabilities"]),
            Ok(Mode::PrintCapabilities)
        ));
        let json: serde_json::Value = serde_json::from_str(&capabilities_json()).unwrap();
        assert_eq!(json["type"], "fs");
        assert!(json["features"].is_array());
    }

    #[test]
    fn fuse_subcommand() {
        match resolve(&[
            "fuse",
            "--shared-dir=/d",
            "--mountpoint=/m",
            "--threads=2",
            "--readonly",
            "-o",
            "xattr",
        ]) {
            Ok(Mode::Fuse(s)) => {
                assert_eq!(s.mountpoint, PathBuf::from("/m"));
                assert_eq!(s.threads, 2);
                assert!(s.fs.readonly && s.fs.xattr);
            }
            other => panic!("expected fuse mode, got {other:?}"),
        }
        let err = parse(&["fuse", "--shared-dir=/d"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        let err = parse(&["fuse", "--shared-dir=/d", "--mountpoint=/m", "--fd=3"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        // Serve flags before the subcommand are not silently dropped.
        let err = parse(&["--fd=3", "fuse", "--shared-dir=/d", "--mountpoint=/m"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn fuse_passthrough_modes() {
        use berth_passthrough::PassthroughMode;
        let mode = |extra: &[&str]| {
            let mut args = vec!["fuse", "--shared-dir=/d", "--mountpoint=/m"];
            args.extend_from_slice(extra);
            match resolve(&args) {
                Ok(Mode::Fuse(s)) => s.passthrough,
                other => panic!("expected fuse mode, got {other:?}"),
            }
        };
        assert_eq!(mode(&[]), PassthroughMode::Auto);
        assert_eq!(mode(&["--passthrough=never"]), PassthroughMode::Never);
        assert_eq!(mode(&["--passthrough", "always"]), PassthroughMode::Always);
        let err = parse(&[
            "fuse",
            "--shared-dir=/d",
            "--mountpoint=/m",
            "--passthrough=on",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("expected auto, always or never"), "{err}");
        // vhost-user mode has no such flag.
        assert!(parse(&["--socket-path=/s", "--shared-dir=/d", "--passthrough=never"]).is_err());
    }

    #[test]
    fn fuse_io_uring_modes() {
        let mode = |extra: &[&str]| {
            let mut args = vec!["fuse", "--shared-dir=/d", "--mountpoint=/m"];
            args.extend_from_slice(extra);
            match resolve(&args) {
                Ok(Mode::Fuse(s)) => s.io_uring,
                other => panic!("expected fuse mode, got {other:?}"),
            }
        };
        assert_eq!(mode(&[]), IoUringMode::Auto);
        assert_eq!(mode(&["--io-uring=never"]), IoUringMode::Never);
        assert_eq!(mode(&["--io-uring", "always"]), IoUringMode::Always);
        assert!(parse(&[
            "fuse",
            "--shared-dir=/d",
            "--mountpoint=/m",
            "--io-uring=on"
        ])
        .is_err());
        // vhost-user mode has no such flag.
        assert!(parse(&["--socket-path=/s", "--shared-dir=/d", "--io-uring=always"]).is_err());
    }
}
