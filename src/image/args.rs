//! The `berth image build` and `berth mount` command lines: flags, their parsing and the
//! resolved settings the subcommands run with (see the parent module).

use std::path::PathBuf;
use std::time::Duration;

use berth_cache::manifest::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use berth_cache::Compression;
use clap::{Args, Subcommand, ValueEnum};

use crate::cli::{CliError, CommonArgs, ProcessSettings};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an erofs image from a directory or tar archive and upload its data blob.
    Build(ImageBuildArgs),
    /// Describe an image, or where the data of paths in it lies in its blob (chunks).
    Inspect(ImageInspectArgs),
    /// Read every chunk of an image's blob from its backend and check it against its
    /// digest, caching nothing; exits 1 naming each chunk that is not intact.
    Check(ImageCheckArgs),
}

/// Where the cache of `berth mount` lives unless --cache-dir says otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/berth/blobs";
/// Where the cachefiles cache of fscache mode lives unless --cachefiles-dir says otherwise.
pub const DEFAULT_CACHEFILES_DIR: &str = "/var/cache/berth/cachefiles";
/// The erofs domain of fscache mode unless --domain-id says otherwise.
pub const DEFAULT_DOMAIN_ID: &str = "berth";

/// How the chunks of an image's blob are stored in the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ChunkCompression {
    None,
    Zstd,
    Lz4,
}

impl From<ChunkCompression> for Compression {
    fn from(value: ChunkCompression) -> Self {
        match value {
            ChunkCompression::None => Compression::None,
            ChunkCompression::Zstd => Compression::Zstd,
            ChunkCompression::Lz4 => Compression::Lz4,
        }
    }
}

/// A byte count: plain, or with a binary suffix (K, M, G, optionally followed by `iB`).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => {
            return Err(format!(
                "'{s}' is not a size (examples: 4096, 64K, 1M, 2GiB)"
            ))
        }
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 4096, 64K, 1M, 2GiB)"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

pub(crate) fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let size = parse_size(s)?;
    match u32::try_from(size) {
        Ok(size) if size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) => {
            Ok(size)
        }
        _ => Err(format!(
            "the chunk size must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes"
        )),
    }
}

/// `berth image build` flags.
#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    /// The directory or tar archive (any compression tar detects) to build the image from.
    #[arg(value_name = "SOURCE")]
    pub source: PathBuf,

    /// Directory receiving the image: manifest.json and boot.img (the erofs metadata).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Where the data blob is uploaded: file://DIR (or a plain directory),
    /// s3://BUCKET[/PREFIX] (settings from the AWS_* environment variables) or
    /// http(s)://URL [default: the --out directory].
    #[arg(long, value_name = "LOCATION")]
    pub backend: Option<String>,

    /// Chunk size of the blob: the unit fetched, verified and cached (a power of two).
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = parse_chunk_size)]
    pub chunk_size: u32,

    /// How each chunk is stored in the backend.
    #[arg(long, value_name = "METHOD", value_enum, default_value_t = ChunkCompression::None)]
    pub compression: ChunkCompression,

    /// Also keep the uncompressed blob as blob.raw in the --out directory.
    #[arg(long)]
    pub keep_raw_blob: bool,

    /// File listing paths of the image to fetch in the background once it is mounted,
    /// one per line, most wanted first (a directory stands for every file below it).
    #[arg(long, value_name = "FILE")]
    pub prefetch_list: Option<PathBuf>,

    /// Build a block image for `berth block` instead: SOURCE is a filesystem or disk
    /// image used as it is, or a directory made into one (see --fs).
    #[arg(long, conflicts_with = "prefetch_list")]
    pub block: bool,

    /// With --block and a directory: the filesystem to make.
    #[arg(long = "fs", value_name = "FS", value_enum, default_value_t = BlockFs::Ext4, requires = "block")]
    pub block_fs: BlockFs,

    /// With --block, --fs ext4 and a directory: the image's size [default: the tree × 1.5
    /// plus 64M].
    #[arg(long, value_name = "BYTES", value_parser = parse_size, requires = "block")]
    pub size: Option<u64>,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Filesystems `berth image build --block` makes from a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BlockFs {
    Ext4,
    Erofs,
}

/// `berth image inspect` arguments.
#[derive(Debug, Args)]
pub struct ImageInspectArgs {
    /// The image directory (holding manifest.json), or the manifest file itself.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// Paths inside the image: print, tab-separated, each path, the number of blob
    /// chunks holding its data and those chunks (`3-5,9`; a directory stands for every
    /// file below it).
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug)]
pub struct ImageInspectSettings {
    pub image: PathBuf,
    pub paths: Vec<String>,
    pub process: ProcessSettings,
}

impl ImageInspectArgs {
    pub(crate) fn resolve(&self) -> Result<ImageInspectSettings, CliError> {
        Ok(ImageInspectSettings {
            image: self.image.clone(),
            paths: self.paths.clone(),
            process: self.common.resolve(None, Vec::new())?,
        })
    }
}

/// `berth image check` arguments.
#[derive(Debug, Args)]
pub struct ImageCheckArgs {
    /// The image directory (holding manifest.json), or the manifest file itself.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// Where the data blob is read from, as for `berth image build --backend`
    /// [default: the image's directory].
    #[arg(long, value_name = "LOCATION")]
    pub backend: Option<String>,

    /// Backend reads (each read, then restored and hashed) in flight at once
    /// [default: the number of CPUs].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: Option<u16>,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug)]
pub struct ImageCheckSettings {
    pub image: PathBuf,
    pub backend: Option<String>,
    pub jobs: usize,
    pub process: ProcessSettings,
}

impl ImageCheckArgs {
    pub(crate) fn resolve(&self) -> Result<ImageCheckSettings, CliError> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(ImageCheckSettings {
            image: self.image.clone(),
            backend: self.backend.clone(),
            jobs: self.jobs.map_or(cpus, usize::from),
            process: self.common.resolve(None, Vec::new())?,
        })
    }
}

/// What `berth mount` fetches in the background, below on-demand reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrefetchMode {
    /// Nothing.
    None,
    /// The image's prefetch list (`berth image build --prefetch-list`).
    List,
    /// The prefetch list, then the whole blob.
    All,
}

/// `berth mount` flags.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The image directory (holding manifest.json), or the manifest file itself.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// Where to mount the image on the host.
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,

    /// Where the data blob is fetched from, as for `berth image build --backend`
    /// [default: the image's directory].
    #[arg(long, value_name = "LOCATION")]
    pub backend: Option<String>,

    /// What to fetch in the background after mounting.
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = PrefetchMode::List)]
    pub prefetch: PrefetchMode,

    /// How the kernel asks for missing data: `fanotify` pre-content events (Linux 6.14+),
    /// `fscache` (cachefiles on-demand mode, Linux 5.19 to 7.1), or `auto`: fanotify
    /// where the kernel has it, fscache otherwise.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = MountMode::Auto)]
    pub mode: MountMode,

    /// fscache mode: the cachefiles cache directory (not on tmpfs), shared by every
    /// image of the host; its server listens on a socket inside it.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHEFILES_DIR)]
    pub cachefiles_dir: PathBuf,

    /// fscache mode: the erofs fsid (the bootstrap's cache key) [default: derived from
    /// the image and the mount point].
    #[arg(long, value_name = "ID")]
    pub fsid: Option<String>,

    /// fscache mode: the erofs domain; images of one domain share the cached data of
    /// identical blobs. Empty: no domain.
    #[arg(long, value_name = "ID", default_value = DEFAULT_DOMAIN_ID)]
    pub domain_id: String,

    /// The kernel's read-ahead window on the erofs mount (`read_ahead_kb` of its
    /// backing device; the kernel's default is 128K). Each window is one round trip down
    /// to the cache, so a wide one serves sequential readers faster. 0: the kernel's.
    #[arg(long, value_name = "BYTES", default_value = "4M", value_parser = parse_size)]
    pub kernel_readahead: u64,

    /// Internal: run as the serving worker of a supervising `berth mount`.
    #[arg(long, hide = true)]
    pub internal_worker: bool,

    #[command(flatten)]
    pub engine: EngineArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// The cache engine's flags (`berth mount`, `berth fscache`).
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Directory of the local cache of fetched chunks (fanotify mode; in fscache mode
    /// the chunks are kept in the cachefiles directory only, and this one stays empty).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,

    /// Most bytes the cache keeps; blobs not in use are evicted beyond it [default: no
    /// limit]. fanotify mode; in fscache mode the kernel culls the cachefiles directory.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub cache_capacity: Option<u64>,

    /// Keep the cache metrics in this file (Prometheus text format).
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,

    /// How often the metrics file is rewritten.
    #[arg(long, value_name = "SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub metrics_interval: u64,

    /// Threads answering the kernel's requests for missing data.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,

    /// How far ahead of a sequential reader to fetch (0: no read-ahead).
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    pub readahead: u64,
}

/// `berth fscache` flags.
#[derive(Debug, Args)]
pub struct FscacheArgs {
    /// The cachefiles cache directory (not on tmpfs: ext4, xfs…).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHEFILES_DIR)]
    pub cachefiles_dir: PathBuf,

    /// Exit once no image is mounted and no `berth mount` is connected (how `berth
    /// mount` starts a server when none runs).
    #[arg(long)]
    pub exit_when_idle: bool,

    /// Internal: run as the serving worker of a supervising `berth fscache`.
    #[arg(long, hide = true)]
    pub internal_worker: bool,

    #[command(flatten)]
    pub engine: EngineArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// How `berth mount` learns about reads of missing data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MountMode {
    Auto,
    Fanotify,
    Fscache,
}

#[derive(Debug)]
pub struct ImageBuildSettings {
    pub source: PathBuf,
    pub out_dir: PathBuf,
    /// `None`: the output directory.
    pub backend: Option<String>,
    pub chunk_size: u32,
    pub compression: Compression,
    pub keep_raw_blob: bool,
    pub prefetch_list: Option<PathBuf>,
    /// `Some`: a block image with this filesystem (for a directory source) and size.
    pub block: Option<(BlockFs, Option<u64>)>,
    pub process: ProcessSettings,
}

#[derive(Debug)]
pub struct MountSettings {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub cache_capacity: Option<u64>,
    /// `None`: the image's directory.
    pub backend: Option<String>,
    pub metrics_file: Option<PathBuf>,
    pub metrics_interval: Duration,
    pub threads: usize,
    pub prefetch: PrefetchMode,
    pub readahead: u64,
    pub kernel_readahead: u64,
    pub mode: MountMode,
    pub cachefiles_dir: PathBuf,
    pub fsid: Option<String>,
    /// `None`: no domain.
    pub domain_id: Option<String>,
    /// Run as the worker of a supervisor (see `src/image/mod.rs`).
    pub internal_worker: bool,
    pub process: ProcessSettings,
}

/// The engine part of `berth fscache` (also what `berth mount` starts one with).
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub cache_dir: PathBuf,
    pub cache_capacity: Option<u64>,
    pub metrics_file: Option<PathBuf>,
    pub metrics_interval: Duration,
    pub threads: usize,
    pub readahead: u64,
}

#[derive(Debug)]
pub struct FscacheSettings {
    pub cachefiles_dir: PathBuf,
    pub exit_when_idle: bool,
    pub internal_worker: bool,
    pub engine: EngineSettings,
    pub process: ProcessSettings,
}

impl EngineArgs {
    fn resolve(&self) -> EngineSettings {
        EngineSettings {
            cache_dir: self.cache_dir.clone(),
            cache_capacity: self.cache_capacity,
            metrics_file: self.metrics_file.clone(),
            metrics_interval: Duration::from_secs(self.metrics_interval),
            threads: usize::from(self.threads),
            readahead: self.readahead,
        }
    }
}

impl MountSettings {
    /// The engine settings, as a server for this mount is started with.
    pub fn engine(&self) -> EngineSettings {
        EngineSettings {
            cache_dir: self.cache_dir.clone(),
            cache_capacity: self.cache_capacity,
            metrics_file: self.metrics_file.clone(),
            metrics_interval: self.metrics_interval,
            threads: self.threads,
            readahead: self.readahead,
        }
    }
}

impl FscacheArgs {
    pub(crate) fn resolve(&self) -> Result<FscacheSettings, CliError> {
        Ok(FscacheSettings {
            cachefiles_dir: self.cachefiles_dir.clone(),
            exit_when_idle: self.exit_when_idle,
            internal_worker: self.internal_worker,
            engine: self.engine.resolve(),
            process: self.common.resolve(None, Vec::new())?,
        })
    }
}

impl ImageBuildArgs {
    pub(crate) fn resolve(&self) -> Result<ImageBuildSettings, CliError> {
        Ok(ImageBuildSettings {
            source: self.source.clone(),
            out_dir: self.out.clone(),
            backend: self.backend.clone(),
            chunk_size: self.chunk_size,
            compression: self.compression.into(),
            keep_raw_blob: self.keep_raw_blob,
            prefetch_list: self.prefetch_list.clone(),
            block: self.block.then_some((self.block_fs, self.size)),
            process: self.common.resolve(None, Vec::new())?,
        })
    }
}

impl MountArgs {
    pub(crate) fn resolve(&self) -> Result<MountSettings, CliError> {
        Ok(MountSettings {
            image: self.image.clone(),
            mountpoint: self.mountpoint.clone(),
            cache_dir: self.engine.cache_dir.clone(),
            cache_capacity: self.engine.cache_capacity,
            backend: self.backend.clone(),
            metrics_file: self.engine.metrics_file.clone(),
            metrics_interval: Duration::from_secs(self.engine.metrics_interval),
            threads: usize::from(self.engine.threads),
            prefetch: self.prefetch,
            readahead: self.engine.readahead,
            kernel_readahead: self.kernel_readahead,
            mode: self.mode,
            cachefiles_dir: self.cachefiles_dir.clone(),
            fsid: self.fsid.clone(),
            domain_id: Some(self.domain_id.clone()).filter(|d| !d.is_empty()),
            internal_worker: self.internal_worker,
            process: self.common.resolve(None, Vec::new())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, LogLevel, Mode};
    use clap::error::ErrorKind;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied()))
    }

    fn resolve(args: &[&str]) -> Result<Mode, CliError> {
        parse(args)
            .unwrap_or_else(|e| panic!("{args:?} should parse: {e}"))
            .resolve()
    }

    #[test]
    fn image_check_subcommand() {
        match resolve(&["image", "check", "/img"]) {
            Ok(Mode::ImageCheck(s)) => {
                assert_eq!(s.image, PathBuf::from("/img"));
                assert_eq!(s.backend, None);
                let cpus = std::thread::available_parallelism().map_or(1, usize::from);
                assert_eq!(s.jobs, cpus);
            }
            other => panic!("expected image check, got {other:?}"),
        }
        match resolve(&["image", "check", "/img", "--jobs=5", "--backend=s3://b/p"]) {
            Ok(Mode::ImageCheck(s)) => {
                assert_eq!(s.jobs, 5);
                assert_eq!(s.backend.as_deref(), Some("s3://b/p"));
            }
            other => panic!("expected image check, got {other:?}"),
        }
        for jobs in ["--jobs=0", "--jobs=257", "--jobs=x"] {
            let err = parse(&["image", "check", "/img", jobs]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{jobs}: {err}");
        }
    }

    #[test]
    fn image_build_subcommand() {
        match resolve(&["image", "build", "/src.tar", "--out", "/img"]) {
            Ok(Mode::ImageBuild(s)) => {
                assert_eq!(s.source, PathBuf::from("/src.tar"));
                assert_eq!(s.out_dir, PathBuf::from("/img"));
                assert_eq!(s.backend, None);
                assert_eq!(s.chunk_size, 1 << 20);
                assert_eq!(s.compression, Compression::None);
                assert!(!s.keep_raw_blob);
            }
            other => panic!("expected image build, got {other:?}"),
        }
        match resolve(&[
            "image",
            "build",
            "/src",
            "--out=/img",
            "--backend=s3://bucket/images",
            "--chunk-size=64K",
            "--compression=zstd",
            "--keep-raw-blob",
            "--log-level=debug",
        ]) {
            Ok(Mode::ImageBuild(s)) => {
                assert_eq!(s.backend.as_deref(), Some("s3://bucket/images"));
                assert_eq!(s.chunk_size, 64 << 10);
                assert_eq!(s.compression, Compression::Zstd);
                assert!(s.keep_raw_blob);
                assert_eq!(s.process.log_level, Some(LogLevel::Debug));
            }
            other => panic!("expected image build, got {other:?}"),
        }
        assert_eq!(
            parse(&["image", "build", "/src"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        for bad in [
            &["image", "build", "/s", "--out=/o", "--chunk-size=3000"][..],
            &["image", "build", "/s", "--out=/o", "--chunk-size=1K"],
            &["image", "build", "/s", "--out=/o", "--chunk-size=128M"],
            &["image", "build", "/s", "--out=/o", "--chunk-size=1X"],
            &["image", "build", "/s", "--out=/o", "--compression=gzip"],
            &["image", "/s", "--out=/o"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?} should be a usage error");
        }
    }

    #[test]
    fn mount_subcommand() {
        match resolve(&["mount", "/img", "/mnt"]) {
            Ok(Mode::Mount(s)) => {
                assert_eq!(s.image, PathBuf::from("/img"));
                assert_eq!(s.mountpoint, PathBuf::from("/mnt"));
                assert_eq!(s.cache_dir, PathBuf::from(DEFAULT_CACHE_DIR));
                assert_eq!(s.cache_capacity, None);
                assert_eq!(s.backend, None);
                assert_eq!(s.metrics_file, None);
                assert_eq!(s.threads, 4);
            }
            other => panic!("expected mount, got {other:?}"),
        }
        match resolve(&[
            "mount",
            "/img/manifest.json",
            "/mnt",
            "--cache-dir=/c",
            "--cache-capacity=2GiB",
            "--backend",
            "http://127.0.0.1:8000/images",
            "--metrics-file=/run/berth.prom",
            "--metrics-interval=30",
            "--threads=8",
        ]) {
            Ok(Mode::Mount(s)) => {
                assert_eq!(s.cache_dir, PathBuf::from("/c"));
                assert_eq!(s.cache_capacity, Some(2 << 30));
                assert_eq!(s.backend.as_deref(), Some("http://127.0.0.1:8000/images"));
                assert_eq!(s.metrics_file, Some(PathBuf::from("/run/berth.prom")));
                assert_eq!(s.metrics_interval, Duration::from_secs(30));
                assert_eq!(s.threads, 8);
            }
            other => panic!("expected mount, got {other:?}"),
        }
        for bad in [
            &["mount", "/img"][..],
            &["mount", "/img", "/mnt", "--threads=0"],
            &["mount", "/img", "/mnt", "--cache-capacity=lots"],
            &["mount", "/img", "/mnt", "--metrics-interval=0"],
            &["--fd=3", "mount", "/img", "/mnt"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?} should be a usage error");
        }
    }

    #[test]
    fn mount_modes_and_fscache_flags() {
        match resolve(&["mount", "/img", "/mnt"]) {
            Ok(Mode::Mount(s)) => {
                assert_eq!(s.mode, MountMode::Auto);
                assert_eq!(s.cachefiles_dir, PathBuf::from(DEFAULT_CACHEFILES_DIR));
                assert_eq!(s.domain_id.as_deref(), Some(DEFAULT_DOMAIN_ID));
                assert_eq!(s.fsid, None);
            }
            other => panic!("expected mount, got {other:?}"),
        }
        match resolve(&[
            "mount",
            "/img",
            "/mnt",
            "--mode=fscache",
            "--cachefiles-dir=/var/cf",
            "--fsid=app-1",
            "--domain-id=",
        ]) {
            Ok(Mode::Mount(s)) => {
                assert_eq!(s.mode, MountMode::Fscache);
                assert_eq!(s.cachefiles_dir, PathBuf::from("/var/cf"));
                assert_eq!(s.fsid.as_deref(), Some("app-1"));
                assert_eq!(s.domain_id, None, "an empty domain means none");
            }
            other => panic!("expected mount, got {other:?}"),
        }
        assert_eq!(
            parse(&["mount", "/img", "/mnt", "--mode=nbd"])
                .unwrap_err()
                .exit_code(),
            2
        );
        match resolve(&[
            "fscache",
            "--cachefiles-dir=/var/cf",
            "--exit-when-idle",
            "--cache-dir=/c",
            "--readahead=0",
            "--threads=2",
        ]) {
            Ok(Mode::Fscache(s)) => {
                assert_eq!(s.cachefiles_dir, PathBuf::from("/var/cf"));
                assert!(s.exit_when_idle && !s.internal_worker);
                assert_eq!(s.engine.cache_dir, PathBuf::from("/c"));
                assert_eq!(s.engine.readahead, 0);
                assert_eq!(s.engine.threads, 2);
            }
            other => panic!("expected fscache, got {other:?}"),
        }
        match resolve(&["image", "inspect", "/img", "a/b", "c"]) {
            Ok(Mode::ImageInspect(s)) => {
                assert_eq!(s.image, PathBuf::from("/img"));
                assert_eq!(s.paths, ["a/b", "c"]);
            }
            other => panic!("expected image inspect, got {other:?}"),
        }
        assert_eq!(parse(&["fscache", "/extra"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("3G"), Ok(3 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("1.5M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("18446744073709551615G").is_err());
    }
}
