//! berth-loadgen: a vhost-user-fs load generator without a VM.
//!
//! `compare` starts berth and virtiofsd in turn on the same file set, drives each through its
//! vhost-user socket with N request queues at a fixed queue depth, checks every reply, runs the
//! same operations as direct syscalls for the native limit, and prints medians.
//! `run` drives one workload against a daemon that is already listening (for profiling).

mod daemon;
mod fileset;
mod native;
mod pattern;
mod report;
mod stats;
mod vhost;
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
    /// Smoke mode: small file set, one short run per workload, pass/fail exit code.
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
    /// Write every run's figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
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
    let layout = if args.quick {
        Layout::quick()
    } else {
        Layout::full()
    };
    let files = FileSet::prepare(&args.dir, layout)?;
    let (default_seconds, default_reps, queues, depths) = if args.quick {
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
        workloads: workloads(args.workloads.as_deref())?,
        queues,
        depths,
        duration: Duration::from_secs_f64(args.seconds.unwrap_or(default_seconds)),
        reps: args.reps.unwrap_or(default_reps).max(1),
        event_idx: !args.no_event_idx,
        quick: args.quick,
    };
    let outcome = report::run_plan(&files, &daemons, &plan)?;
    if let Some(path) = &args.json {
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
