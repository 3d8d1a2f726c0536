//! `berth volume` command line.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::cli::CommonArgs;
use crate::image::args::parse_size;

/// Where volumes keep their local state (log, cache) unless told otherwise.
pub const DEFAULT_VOLUME_DIR: &str = "/var/lib/berth/volumes";

/// `berth volume` subcommands. The bucket is reached with the same settings as the cache
/// engine's S3 backend: the bucket and prefix from the location, everything else
/// (endpoint, region, credentials) from the usual `AWS_*` environment variables.
#[derive(Debug, Clone, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume in a bucket, empty or holding a raw disk image.
    Create(CreateArgs),
    /// Keep the volume's latest manifest version in the bucket as a named snapshot.
    Snapshot(SnapshotArgs),
    /// Make a new volume from a snapshot, sharing its packs (nothing is copied).
    Clone(CloneArgs),
    /// Delete the packs and old manifest versions nothing refers to any more.
    Gc(GcArgs),
    /// Rewrite the live blocks of sparse packs into new ones and delete the old packs, for
    /// a volume no host is serving (a served volume does this by itself).
    Compact(CompactArgs),
    /// Show a volume's geometry, manifest version, packs, snapshots, clones and lease.
    Info(InfoArgs),
    /// Free the volume's lease whoever holds it (when its writer's host is gone for good).
    BreakLease(LocationArgs),
    /// Test hook: write a self-describing stream of blocks through the volume's block
    /// target, flushing every few writes and printing `acked N` once N writes are durable.
    #[command(hide = true)]
    Exercise(ExerciseArgs),
}

/// How long commands wait for an unreachable bucket, with the location.
#[derive(Debug, Clone, Args)]
pub struct BucketArgs {
    /// How long to keep retrying an unreachable bucket before giving up.
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
}

/// A volume's location and nothing else.
#[derive(Debug, Clone, Args)]
pub struct LocationArgs {
    /// The volume: s3://BUCKET/PREFIX (or file:///DIR/NAME).
    #[arg(value_name = "LOCATION")]
    pub location: String,
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth volume create` flags.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// Where the volume goes: s3://BUCKET/PREFIX (or file:///DIR/NAME).
    #[arg(value_name = "LOCATION")]
    pub location: String,

    /// Size of the volume (e.g. 20G) [default: the size of --from].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,

    /// A raw disk image whose non-zero blocks the volume starts with.
    #[arg(long, value_name = "IMAGE")]
    pub from: Option<PathBuf>,

    /// Logical block size of the volume.
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    pub block_size: u32,

    /// Print the new volume's configuration as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth volume snapshot` flags.
#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    /// The volume: s3://BUCKET/PREFIX.
    #[arg(value_name = "LOCATION")]
    pub location: String,

    /// The snapshot's name (letters, digits, `.`, `_`, `-`).
    #[arg(value_name = "NAME")]
    pub name: String,

    /// Delete the snapshot instead (refused while clones use it).
    #[arg(long)]
    pub delete: bool,

    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth volume clone` flags.
#[derive(Debug, Clone, Args)]
pub struct CloneArgs {
    /// The volume the snapshot belongs to.
    #[arg(value_name = "SOURCE")]
    pub source: String,

    /// The new volume, in the same bucket (it reads the source's packs).
    #[arg(value_name = "TARGET")]
    pub target: String,

    /// The snapshot of SOURCE the clone starts as.
    #[arg(long, value_name = "NAME")]
    pub snapshot: String,

    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth volume gc` flags.
#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// The volume: s3://BUCKET/PREFIX.
    #[arg(value_name = "LOCATION")]
    pub location: String,

    /// Superseded manifest versions younger than this are kept (for readers that loaded
    /// one); packs never depend on it.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub grace: u64,

    /// Count what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth volume compact` flags.
#[derive(Debug, Clone, Args)]
pub struct CompactArgs {
    /// The volume: s3://BUCKET/PREFIX.
    #[arg(value_name = "LOCATION")]
    pub location: String,

    /// Packs less than this fraction of which the volume still uses are rewritten (above 0,
    /// at most 1).
    #[arg(long, value_name = "FRACTION", default_value_t = DEFAULT_COMPACT_BELOW,
          value_parser = parse_fraction)]
    pub below: f64,

    /// Where the volume's local state goes while the command holds it (as for serving).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_VOLUME_DIR)]
    pub volume_dir: PathBuf,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth volume info` flags.
#[derive(Debug, Clone, Args)]
pub struct InfoArgs {
    /// The volume: s3://BUCKET/PREFIX.
    #[arg(value_name = "LOCATION")]
    pub location: String,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// When a FLUSH of a served volume completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    /// Synced to the write-ahead log on local disk; the bucket follows within the upload
    /// interval.
    Local,
    /// Uploaded to the bucket with a new manifest version.
    Object,
}

/// How a volume is served (`berth block add volume:…`, and kept for `recover`).
#[derive(Debug, Clone, Args)]
pub struct VolumeServeArgs {
    /// Local state of served volumes (write-ahead log, cache), one directory per volume.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_VOLUME_DIR)]
    pub volume_dir: PathBuf,

    /// When a FLUSH of a volume completes: `local` (in the write-ahead log on local disk)
    /// or `object` (in the bucket).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = DurabilityArg::Local)]
    pub durability: DurabilityArg,

    /// Acknowledged writes of a volume reach the bucket within this time (the recovery
    /// point when the local disk is lost).
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_UPLOAD_INTERVAL_SECS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub upload_interval: u64,

    /// Packs a volume builds and uploads at once (their manifest versions are still
    /// written in order), within --upload-memory.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_UPLOAD_STREAMS,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub upload_streams: u16,

    /// Most memory a volume's uploader holds at once (K, M, G suffixes): the data of the
    /// packs being built, uploaded or waiting to be published, and their compressed
    /// copies. Packs shrink below 32 MiB to fit.
    #[arg(long, value_name = "BYTES", default_value = "128M", value_parser = parse_upload_memory)]
    pub upload_memory: u64,

    /// Acknowledged bytes not yet in the bucket before writes wait for the uploader (K, M,
    /// G suffixes): bounds the write-ahead log on local disk (and, with the bucket away,
    /// how much a lost local disk could lose beyond the last manifest).
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_max_dirty)]
    pub max_dirty: u64,

    /// Most bytes per second a volume uploads to its bucket (K, M, G suffixes; packs as
    /// stored, after compression) [default: unlimited].
    #[arg(long, value_name = "BYTES", value_parser = parse_upload_rate)]
    pub upload_rate: Option<u64>,

    /// Most bytes of bucket data a volume keeps cached on local disk (K, M, G suffixes);
    /// the least recently used 1 MiB regions are evicted beyond it [default: the whole
    /// volume, as far as the disk allows].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub volume_cache_size: Option<u64>,

    /// Compaction: a pack less than this fraction of which the volume still uses is
    /// rewritten (its live blocks copied into a new pack, the old one then collected) once
    /// such packs hold --compact-after bytes no longer in use; 0 turns compaction off.
    #[arg(long, value_name = "FRACTION", default_value_t = DEFAULT_COMPACT_BELOW,
          value_parser = parse_fraction)]
    pub compact_below: f64,

    /// Bytes of blocks no longer in use that sparse packs must hold together before they
    /// are compacted (K, M, G suffixes): less is not worth the reads and the upload.
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    pub compact_after: u64,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("`{s}` is not a fraction from 0 to 1 (0.5: half)")),
    }
}

fn parse_upload_rate(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s)?;
    if bytes < 64 << 10 {
        return Err("the upload rate must be at least 64K (bytes per second)".into());
    }
    Ok(bytes)
}

fn parse_upload_memory(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s)?;
    if bytes < 1 << 20 {
        return Err("the upload memory must be at least 1M".into());
    }
    Ok(bytes)
}

fn parse_max_dirty(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s)?;
    if bytes < 1 << 20 {
        return Err("the dirty limit must be at least 1M".into());
    }
    Ok(bytes)
}

/// `--upload-streams`' default: on an S3 server over a LAN four PUT streams carry about
/// twice what one does (docs/benchmarks.md, "Flush throughput against raw PUT").
pub const DEFAULT_UPLOAD_STREAMS: u16 = 4;

/// `--upload-memory`'s and `--max-dirty`'s defaults (as the flags spell them: "128M",
/// "1G"), the volume library's own.
pub const DEFAULT_UPLOAD_MEMORY: u64 = 128 << 20;
pub const DEFAULT_MAX_DIRTY: u64 = 1 << 30;

/// `--compact-below`'s and `--compact-after`'s defaults (as the flag spells it: "64M"), the
/// volume library's own.
pub const DEFAULT_COMPACT_BELOW: f64 = 0.5;
pub const DEFAULT_COMPACT_AFTER: u64 = 64 << 20;

/// `--upload-interval`'s default.
const DEFAULT_UPLOAD_INTERVAL_SECS: u64 = 5;

impl Default for VolumeServeArgs {
    /// The flags' defaults (for a target that is not a volume).
    fn default() -> Self {
        Self {
            volume_dir: DEFAULT_VOLUME_DIR.into(),
            durability: DurabilityArg::Local,
            upload_interval: DEFAULT_UPLOAD_INTERVAL_SECS,
            upload_streams: DEFAULT_UPLOAD_STREAMS,
            upload_memory: DEFAULT_UPLOAD_MEMORY,
            max_dirty: DEFAULT_MAX_DIRTY,
            upload_rate: None,
            volume_cache_size: None,
            compact_below: DEFAULT_COMPACT_BELOW,
            compact_after: DEFAULT_COMPACT_AFTER,
        }
    }
}

/// `berth volume exercise` flags (test hook).
#[derive(Debug, Clone, Args)]
pub struct ExerciseArgs {
    /// The volume (created beforehand).
    #[arg(value_name = "LOCATION")]
    pub location: String,

    /// Writes in the stream.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub writes: u64,

    /// Blocks the stream spreads over (from block 0).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub blocks: u64,

    /// A FLUSH after every this many writes.
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub flush_every: u64,

    /// Pause after each write, to give a test time to kill the process mid-stream.
    #[arg(long, value_name = "MILLISECONDS", default_value_t = 0)]
    pub pause_ms: u64,

    #[command(flatten)]
    pub serve: VolumeServeArgs,
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl VolumeCommand {
    /// The process-wide flags of whichever subcommand it is.
    pub fn common(&self) -> &CommonArgs {
        match self {
            VolumeCommand::Create(a) => &a.common,
            VolumeCommand::Snapshot(a) => &a.common,
            VolumeCommand::Clone(a) => &a.common,
            VolumeCommand::Gc(a) => &a.common,
            VolumeCommand::Compact(a) => &a.common,
            VolumeCommand::Info(a) => &a.common,
            VolumeCommand::BreakLease(a) => &a.common,
            VolumeCommand::Exercise(a) => &a.common,
        }
    }
}
