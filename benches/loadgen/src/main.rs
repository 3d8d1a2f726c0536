//! berth-loadgen: a vhost-user-fs load generator without a VM.
//!
//! `compare` starts berth and virtiofsd in turn on the same file set, drives each through its
//! vhost-user socket with N request queues at a fixed queue depth, checks every reply, runs the
//! same operations as direct syscalls for the native limit, and prints medians.
//! `run` drives one workload against a daemon that is already listening (for profiling).
//! `blk-compare` does the same for vhost-user-blk: berth's `block serve-vhost` against
//! qemu-storage-daemon's vhost-user-blk export on the same raw file and, with `--volume`,
//! against berth serving that data as a volume on an S3 server; `blk-run` drives one block
//! workload against a backend already listening. `vol-flush` times a volume's upload of
//! dirty data against raw PUTs of the same bytes to the same server.

mod blk;
mod blkcompare;
mod daemon;
mod fileset;
mod native;
mod pattern;
mod report;
mod stats;
mod vhost;
mod volflush;
mod volume;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use daemon::{Backend, DaemonCommand};
use fileset::{FileSet, Layout};
use workload::{Case, Workload};

#[derive(Parser)]
#[command(about = "vhost-user-fs load generator: berth vs virtiofsd vs native syscalls")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every workload against berth, virtiofsd and the native syscalls, alternating.
    Compare(CompareArgs),
    /// Run one workload against a daemon already listening on --socket.
    Run(RunArgs),
    /// Run every block workload against berth and qemu-storage-daemon, alternating.
    BlkCompare(BlkCompareArgs),
    /// Run one block workload against a vhost-user-blk backend already listening on --socket.
    BlkRun(BlkRunArgs),
    /// Time a volume's upload of N MiB of dirty data against raw PUTs of as many bytes.
    VolFlush(volflush::VolFlushArgs),
}

/// What every comparison (`compare`, `blk-compare`) takes beside its peers.
#[derive(clap::Args)]
struct PlanArgs {
    /// Smoke mode: a small data set, one short run per case, pass/fail exit code.
    #[arg(long)]
    quick: bool,
    /// Seconds per run.
    #[arg(long)]
    seconds: Option<f64>,
    /// Repetitions of every case (medians are reported).
    #[arg(long)]
    reps: Option<usize>,
    /// Comma-separated workload names (default: all).
    #[arg(long)]
    workloads: Option<String>,
    /// Write every run's figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BlkCompareArgs {
    /// The berth binary.
    #[arg(long)]
    berth: PathBuf,
    /// The qemu-storage-daemon binary; without it only berth runs.
    #[arg(long)]
    qsd: Option<PathBuf>,
    /// qemu-storage-daemon's aio mode for the file (io_uring, its fastest here, or threads).
    #[arg(long, default_value = "io_uring")]
    qsd_aio: String,
    /// Also serve the image's data as a volume (`berth block serve-vhost volume:s3://...`)
    /// on an S3 server (moto) started here, and compare it with berth on the raw file.
    #[arg(long)]
    volume: bool,
    /// The raw image both backends serve (made, with the read pattern, unless it is ready).
    #[arg(long)]
    image: PathBuf,
    /// Image size (K, M, G suffixes) [default: 1G, --quick 64M].
    #[arg(long)]
    size: Option<String>,
    #[command(flatten)]
    plan: PlanArgs,
    /// Comma-separated request queue counts [default: 1,2; --quick 2].
    #[arg(long)]
    queues: Option<String>,
    /// Comma-separated queue depths (requests in flight per queue) [default: 1,32; --quick 8].
    #[arg(long)]
    depths: Option<String>,
    /// Data descriptors are cut to at most this many bytes.
    #[arg(long, default_value = "64K")]
    segment: String,
    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,
}

#[derive(clap::Args)]
struct BlkRunArgs {
    #[arg(long)]
    socket: PathBuf,
    /// Size of the image the backend serves, prepared by `blk-compare` (K, M, G suffixes).
    #[arg(long)]
    size: String,
    #[arg(long)]
    workload: String,
    #[arg(long, default_value_t = 1)]
    queues: usize,
    #[arg(long, default_value_t = 1)]
    depth: u16,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value = "64K")]
    segment: String,
    #[arg(long)]
    no_event_idx: bool,
    /// Pid of the backend, to report its CPU time.
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(clap::Args)]
struct CompareArgs {
    /// The berth binary.
    #[arg(long)]
    berth: PathBuf,
    /// The virtiofsd binary; without it only berth and native run.
    #[arg(long)]
    virtiofsd: Option<PathBuf>,
    /// Directory for the file set (created; reused when complete).
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    plan: PlanArgs,
    /// Comma-separated request queue counts.
    #[arg(long, default_value = "1,4")]
    queues: String,
    /// Comma-separated queue depths.
    #[arg(long, default_value = "1,64")]
    depths: String,
    /// --thread-pool-size given to both daemons.
    #[arg(long, default_value_t = 0)]
    thread_pool_size: usize,
    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX (kick and call on every request).
    #[arg(long)]
    no_event_idx: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long)]
    socket: PathBuf,
    /// The directory the daemon shares, holding a file set made by `compare`.
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    workload: String,
    #[arg(long, default_value_t = 1)]
    queues: usize,
    #[arg(long, default_value_t = 1)]
    depth: u16,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// The file set was made with --quick.
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    no_event_idx: bool,
    /// Pid of the daemon, to report its CPU time and memory.
    #[arg(long)]
    pid: Option<u32>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compare(args) => compare(args),
        Command::Run(args) => run_one(args),
        Command::BlkCompare(args) => blk_compare(args),
        Command::BlkRun(args) => blk_run(args),
        Command::VolFlush(args) => volflush::run(args),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(err) => {
            eprintln!("loadgen: error: {err:#}");
            std::process::exit(2);
        }
    }
}

fn list<T: std::str::FromStr>(text: &str, what: &str) -> Result<Vec<T>> {
    text.split(',')
        .map(|part| {
            part.trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("bad {what} '{part}'"))
        })
        .collect()
}

fn workloads(filter: Option<&str>) -> Result<Vec<Workload>> {
    match filter {
        None => Ok(Workload::all()),
        Some(names) => names
            .split(',')
            .map(|name| {
                Workload::parse(name.trim()).with_context(|| format!("unknown workload '{name}'"))
            })
            .collect(),
    }
}

fn compare(args: CompareArgs) -> Result<bool> {
    let layout = if args.plan.quick {
        Layout::quick()
    } else {
        Layout::full()
    };
    let files = FileSet::prepare(&args.dir, layout)?;
    let (default_seconds, default_reps, queues, depths) = if args.plan.quick {
        (0.25, 1, vec![2usize], vec![8u16])
    } else {
        (
            1.0,
            3,
            list(&args.queues, "queue count")?,
            list(&args.depths, "depth")?,
        )
    };
    let mut daemons = vec![DaemonCommand {
        backend: Backend::Berth,
        binary: args.berth.clone(),
        thread_pool_size: args.thread_pool_size,
        extra_args: Vec::new(),
    }];
    match &args.virtiofsd {
        Some(path) if path.exists() => daemons.push(DaemonCommand {
            backend: Backend::Virtiofsd,
            binary: path.clone(),
            thread_pool_size: args.thread_pool_size,
            extra_args: Vec::new(),
        }),
        Some(path) => println!(
            "virtiofsd not found at {}: comparing berth with native only",
            path.display()
        ),
        None => println!("no virtiofsd given: comparing berth with native only"),
    }
    let plan = report::Plan {
        workloads: workloads(args.plan.workloads.as_deref())?,
        queues,
        depths,
        duration: Duration::from_secs_f64(args.plan.seconds.unwrap_or(default_seconds)),
        reps: args.plan.reps.unwrap_or(default_reps).max(1),
        event_idx: !args.no_event_idx,
        quick: args.plan.quick,
    };
    let outcome = report::run_plan(&files, &daemons, &plan)?;
    if let Some(path) = &args.plan.json {
        std::fs::write(path, serde_json::to_string_pretty(&outcome)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    report::print(&outcome, &plan);
    Ok(outcome.failures.is_empty())
}

fn run_one(args: RunArgs) -> Result<bool> {
    let layout = if args.quick {
        Layout::quick()
    } else {
        Layout::full()
    };
    let files = FileSet::prepare(&args.dir, layout)?;
    let Some(workload) = Workload::parse(&args.workload) else {
        bail!("unknown workload '{}'", args.workload);
    };
    let case = Case {
        workload,
        threads: args.queues,
        depth: args.depth,
        files: args.queues.min(fileset::FILES),
        duration: Duration::from_secs_f64(args.seconds),
        generation: 1,
    };
    let pid = args.pid;
    let sampler = move || pid.and_then(|p| daemon::sample(p).ok());
    let options = vhost::FrontendOptions {
        event_idx: !args.no_event_idx,
        timeout: Duration::from_secs(30),
    };
    let result = vhost::run(&args.socket, &files, &case, options, &sampler, &|| {})?;
    let line = report::Row::from_run(
        workload,
        args.queues,
        args.depth,
        Backend::Berth,
        0,
        &result,
        None,
    );
    println!(
        "{} q{} qd{}: {:.0} ops/s, {:.1} MiB/s, p50 {:.1} us, p99 {:.1} us, daemon cpu {:.2} s, {:.2} kicks/request",
        workload.name(),
        args.queues,
        args.depth,
        line.ops_per_s,
        line.mib_per_s,
        line.p50_us,
        line.p99_us,
        line.cpu_s,
        line.kicks_per_request
    );
    Ok(true)
}

fn blk_workloads(filter: Option<&str>) -> Result<Vec<blk::BlkWorkload>> {
    match filter {
        None => Ok(blk::BlkWorkload::all()),
        Some(names) => names
            .split(',')
            .map(|name| {
                blk::BlkWorkload::parse(name.trim())
                    .with_context(|| format!("unknown block workload '{name}'"))
            })
            .collect(),
    }
}

fn segment_size(text: &str) -> Result<u32> {
    let bytes = blk::parse_size(text)?;
    match u32::try_from(bytes) {
        Ok(bytes) if (512..=1 << 20).contains(&bytes) && bytes.is_multiple_of(512) => Ok(bytes),
        _ => bail!("the segment size must be a multiple of 512 from 512 to 1M, not {text}"),
    }
}

fn blk_compare(args: BlkCompareArgs) -> Result<bool> {
    let (size, seconds, reps, queues, depths) = if args.plan.quick {
        ("64M", 0.3, 1, "2", "8")
    } else {
        ("1G", 2.0, 3, "1,2", "1,32")
    };
    let size = blk::parse_size(args.size.as_deref().unwrap_or(size))?;
    let layout = blk::DiskLayout::new(size)?;
    blk::prepare_image(&args.image, layout)?;
    let mut daemons = vec![blkcompare::BlkDaemonCommand {
        backend: blkcompare::BlkBackend::Berth,
        binary: args.berth.clone(),
        qsd_aio: args.qsd_aio.clone(),
        volume: None,
    }];
    match &args.qsd {
        Some(path) if path.exists() => daemons.push(blkcompare::BlkDaemonCommand {
            backend: blkcompare::BlkBackend::Qsd,
            binary: path.clone(),
            qsd_aio: args.qsd_aio.clone(),
            volume: None,
        }),
        Some(path) => println!(
            "qemu-storage-daemon not found at {}: running berth only",
            path.display()
        ),
        None => println!("no qemu-storage-daemon given: running berth only"),
    }
    // The volume's server and local state live as long as the runs (the state is this
    // process's: its bucket goes with it).
    let volume_dir = args
        .image
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(format!("volumes-{}", std::process::id()));
    let server = if args.volume {
        let server = volume::S3Server::start("berth-bench")?;
        let started = std::time::Instant::now();
        let bench = volume::BenchVolume::prepare(&server, "blk", &args.image, layout, &volume_dir)?;
        println!(
            "volume {} made from the image on {} and its read region read once ({:.1} s)",
            bench.location,
            server.endpoint(),
            started.elapsed().as_secs_f64()
        );
        daemons.push(blkcompare::BlkDaemonCommand {
            backend: blkcompare::BlkBackend::Volume,
            binary: args.berth.clone(),
            qsd_aio: args.qsd_aio.clone(),
            volume: Some(std::sync::Arc::new(bench)),
        });
        Some(server)
    } else {
        None
    };
    let plan = blkcompare::BlkPlan {
        image: args.image.clone(),
        layout,
        workloads: blk_workloads(args.plan.workloads.as_deref())?,
        queues: list(args.queues.as_deref().unwrap_or(queues), "queue count")?,
        depths: list(args.depths.as_deref().unwrap_or(depths), "depth")?,
        duration: Duration::from_secs_f64(args.plan.seconds.unwrap_or(seconds)),
        reps: args.plan.reps.unwrap_or(reps).max(1),
        segment: segment_size(&args.segment)?,
        event_idx: !args.no_event_idx,
        quick: args.plan.quick,
        qsd_aio: args.qsd_aio.clone(),
        volume: args.volume,
    };
    if plan.queues.contains(&0) || plan.depths.contains(&0) {
        bail!("queue counts and depths start at 1");
    }
    let outcome = blkcompare::run_plan(&daemons, &plan);
    drop(daemons);
    if let Some(server) = server {
        drop(server);
        let _ = std::fs::remove_dir_all(&volume_dir);
    }
    if let Some(path) = &args.plan.json {
        std::fs::write(path, serde_json::to_string_pretty(&outcome)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    blkcompare::print(&outcome, &plan);
    Ok(outcome.failures.is_empty())
}

fn blk_run(args: BlkRunArgs) -> Result<bool> {
    let layout = blk::DiskLayout::new(blk::parse_size(&args.size)?)?;
    let Some(workload) = blk::BlkWorkload::parse(&args.workload) else {
        bail!("unknown block workload '{}'", args.workload);
    };
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() % 4000 + 4001);
    let case = blk::BlkCase {
        workload,
        queues: args.queues,
        depth: args.depth,
        duration: Duration::from_secs_f64(args.seconds),
        generation,
        segment: segment_size(&args.segment)?,
        event_idx: !args.no_event_idx,
    };
    let pid = args.pid;
    let sampler = move || pid.and_then(|p| daemon::sample(p).ok());
    let run = blk::run(&args.socket, layout, &case, &sampler)?;
    let result = &run.result;
    let elapsed = result.elapsed.max(1e-9);
    let cpu = match (result.before, result.after) {
        (Some(before), Some(after)) => after.cpu_seconds - before.cpu_seconds,
        _ => 0.0,
    };
    println!(
        "{} q{} qd{}: {:.0} IOPS, {:.1} MiB/s, p50 {:.1} us, p99 {:.1} us, backend cpu {:.2} s, {:.2} kicks/request, {} writes read back",
        workload.name(),
        args.queues,
        args.depth,
        result.ops as f64 / elapsed,
        result.bytes as f64 / elapsed / f64::from(1 << 20),
        result.latency.quantile(0.5) as f64 / 1000.0,
        result.latency.quantile(0.99) as f64 / 1000.0,
        cpu,
        result.kicks as f64 / result.requests.max(1) as f64,
        run.read_back
    );
    Ok(true)
}
