//! `berth block` command line.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::cli::CommonArgs;
use crate::image::args::{parse_chunk_size, parse_size, ChunkCompression, DEFAULT_CACHE_DIR};

/// `berth block` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum BlockCommand {
    /// Create ublk devices (/dev/ublkbN) for images or files and serve them until SIGTERM.
    Add(AddArgs),
    /// List the ublk devices with their state and what berth serves on them.
    List(ListArgs),
    /// Stop and delete a ublk device.
    Del(DelArgs),
    /// Serve again the ublk devices whose server died; their held requests complete.
    Recover(RecoverArgs),
    /// Serve an image or file to a VMM as a vhost-user-blk device (QEMU's
    /// vhost-user-blk-pci) until the frontend disconnects.
    ServeVhost(crate::vhost_blk::args::ServeVhostArgs),
    /// Fold a copy-on-write overlay into a new block image that holds, byte for byte,
    /// what the image with the overlay reads; the image and the overlay are left as they
    /// are.
    Commit(CommitArgs),
}

/// The ublk transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// The best the driver offers: zero-copy, then user-copy, then copy.
    Auto,
    ZeroCopy,
    UserCopy,
    Copy,
}

/// What a device serves and how, shared by `add` (and kept for `recover`).
#[derive(Debug, Args, Clone)]
pub struct TargetArgs {
    /// Local cache of an image's fetched chunks.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,

    /// Where an image's blob is fetched from (`file://DIR`, `s3://BUCKET/PREFIX`,
    /// `http(s)://URL`) [default: the image's directory].
    #[arg(long, value_name = "LOCATION")]
    pub backend: Option<String>,

    /// How far ahead of a sequential reader an image is fetched (0: no read-ahead).
    #[arg(long, value_name = "BYTES", default_value = "4M", value_parser = parse_size)]
    pub readahead: u64,

    /// Logical block size of the devices (a volume has its own).
    #[arg(long, value_name = "BYTES", default_value_t = 4096, value_parser = parse_block_size)]
    pub block_size: u32,

    /// How `volume:` targets are served.
    #[command(flatten)]
    pub volume: crate::volume::args::VolumeServeArgs,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (512 | 1024 | 2048 | 4096)) => Ok(n),
        _ => Err(format!("`{s}` is not 512, 1024, 2048 or 4096")),
    }
}

/// `berth block add` flags.
#[derive(Debug, Clone, Args)]
pub struct AddArgs {
    /// Images (a directory holding manifest.json, or the manifest), files / block devices,
    /// or volumes (`volume:s3://BUCKET/PREFIX`, see `berth volume`) to export, one device
    /// each.
    #[arg(value_name = "IMAGE|FILE|volume:LOCATION", required = true)]
    pub targets: Vec<PathBuf>,

    /// Copy-on-write overlay file for writes (created if missing), one per target in
    /// order; a read-only image becomes a writable device.
    #[arg(long, value_name = "FILE")]
    pub overlay: Vec<PathBuf>,

    /// Export read-only.
    #[arg(long)]
    pub readonly: bool,

    /// Hardware queues per device, each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,

    /// Requests in flight per queue.
    #[arg(long, value_name = "D", default_value_t = 128,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub depth: u16,

    /// Largest request, in bytes.
    #[arg(long, value_name = "BYTES", default_value = "512K", value_parser = parse_size)]
    pub max_io: u64,

    /// How request data moves (see `berth block --help` in the README).
    #[arg(long = "ublk-transport", value_name = "TRANSPORT", value_enum, default_value_t = TransportArg::Auto)]
    pub transport: TransportArg,

    /// Device id to ask for (only with one target) [default: the next free].
    #[arg(long, value_name = "N")]
    pub id: Option<u32>,

    /// Each target is exported this many times (read-only targets only; for density
    /// measurements).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub count: u32,

    /// Create the devices without USER_RECOVERY: when berth dies they fail instead of
    /// waiting for `berth block recover`.
    #[arg(long)]
    pub no_recovery: bool,

    /// Keep the devices' metrics in this file (Prometheus text format).
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,

    /// How often the metrics file is rewritten.
    #[arg(long, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub metrics_interval: u64,

    /// What a queue thread's system call outside its allow-list does: `kill` the process,
    /// `log` it to the audit log and let it through, `trap` (SIGSYS), or `none` (no filter).
    #[arg(long, value_name = "ACTION", default_value = "kill", value_parser = parse_seccomp)]
    pub seccomp: berth_seccomp::SeccompAction,

    /// Test hook: make the kernel's automatic buffer registration fail for every other
    /// request, so that berth's own registration (UBLK_IO_F_NEED_REG_BUF) is exercised.
    #[arg(long, hide = true)]
    pub force_registration_fallback: bool,

    #[command(flatten)]
    pub target: TargetArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth block commit` flags.
#[derive(Debug, Clone, Args)]
pub struct CommitArgs {
    /// The block image the overlay was made over (a directory holding manifest.json, or
    /// the manifest).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// The overlay file to fold in (not in use by a running device).
    #[arg(long, value_name = "FILE")]
    pub overlay: PathBuf,

    /// Directory receiving the new image (absent or empty, outside the image's).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Where the image's blob is fetched from (`file://DIR`, `s3://BUCKET/PREFIX`,
    /// `http(s)://URL`) [default: the image's directory].
    #[arg(long, value_name = "LOCATION")]
    pub backend: Option<String>,

    /// Where the new image's blob is uploaded (as for `berth image build --backend`)
    /// [default: the --out directory].
    #[arg(long, value_name = "LOCATION")]
    pub store: Option<String>,

    /// Local cache of the image's fetched chunks.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,

    /// Chunk size of the new blob [default: the image's].
    #[arg(long, value_name = "BYTES", value_parser = parse_chunk_size)]
    pub chunk_size: Option<u32>,

    /// How each chunk of the new blob is stored [default: as in the image].
    #[arg(long, value_name = "METHOD", value_enum)]
    pub compression: Option<ChunkCompression>,

    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth block list` flags.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth block del` flags.
#[derive(Debug, Clone, Args)]
pub struct DelArgs {
    /// Device ids (N of /dev/ublkbN).
    #[arg(value_name = "ID", required = true)]
    pub ids: Vec<u32>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth block recover` flags.
#[derive(Debug, Clone, Args)]
pub struct RecoverArgs {
    /// Device ids (N of /dev/ublkbN) whose server died.
    #[arg(value_name = "ID", required = true)]
    pub ids: Vec<u32>,

    /// Keep the devices' metrics in this file (Prometheus text format).
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,

    /// How often the metrics file is rewritten.
    #[arg(long, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub metrics_interval: u64,

    /// As for `berth block add`.
    #[arg(long, value_name = "ACTION", default_value = "kill", value_parser = parse_seccomp)]
    pub seccomp: berth_seccomp::SeccompAction,

    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_seccomp(s: &str) -> Result<berth_seccomp::SeccompAction, String> {
    s.parse().map_err(|e: berth_seccomp::Error| e.to_string())
}

impl BlockCommand {
    /// The process-wide flags of whichever subcommand it is.
    pub fn common(&self) -> &CommonArgs {
        match self {
            BlockCommand::Add(a) => &a.common,
            BlockCommand::List(a) => &a.common,
            BlockCommand::Del(a) => &a.common,
            BlockCommand::Recover(a) => &a.common,
            BlockCommand::ServeVhost(a) => &a.common,
            BlockCommand::Commit(a) => &a.common,
        }
    }
}
