//! Running the comparison plan, the median summary and its table.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::daemon::{self, Backend, Daemon, DaemonCommand, ProcSample};
use crate::fileset::FileSet;
use crate::native;
use crate::stats::{self, set_medians, summarize_groups, HostFacts};
use crate::vhost::{self, FrontendOptions};
use crate::workload::{Case, RunResult, Workload};

/// What to run.
pub struct Plan {
    pub workloads: Vec<Workload>,
    pub queues: Vec<usize>,
    pub depths: Vec<u16>,
    pub duration: Duration,
    pub reps: usize,
    pub event_idx: bool,
    pub quick: bool,
}

/// The figures of one run, or the median of several.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: String,
    pub family: String,
    /// Request queues of the case (what berth got).
    pub queues: usize,
    /// Queue depth per queue of the case (0: native, synchronous).
    pub depth: u16,
    pub backend: Backend,
    pub rep: usize,
    /// Queues and depth this backend was actually driven with.
    pub served_queues: usize,
    pub served_depth: u16,
    pub ops_per_s: f64,
    pub mib_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Daemon CPU (user + system) during the measured window, seconds.
    pub cpu_s: f64,
    pub cpu_us_per_op: f64,
    pub hwm_mib: f64,
    pub idle_rss_mib: f64,
    pub fds: f64,
    pub kicks_per_request: f64,
    pub latency_samples: u64,
}

impl Row {
    pub fn from_run(
        workload: Workload,
        queues: usize,
        depth: u16,
        backend: Backend,
        rep: usize,
        run: &RunResult,
        idle: Option<ProcSample>,
    ) -> Row {
        let elapsed = run.elapsed.max(1e-9);
        let cpu_s = match (run.before, run.after) {
            (Some(before), Some(after)) => after.cpu_seconds - before.cpu_seconds,
            _ => 0.0,
        };
        let ops = run.ops as f64;
        Row {
            workload: workload.name(),
            family: workload.family().into(),
            queues,
            depth,
            backend,
            rep,
            served_queues: queues,
            served_depth: depth,
            ops_per_s: ops / elapsed,
            mib_per_s: run.bytes as f64 / elapsed / f64::from(1 << 20),
            p50_us: run.latency.quantile(0.5) as f64 / 1000.0,
            p99_us: run.latency.quantile(0.99) as f64 / 1000.0,
            cpu_s,
            cpu_us_per_op: if ops > 0.0 { cpu_s * 1e6 / ops } else { 0.0 },
            hwm_mib: run.after.map_or(0.0, |s| s.hwm_kib as f64 / 1024.0),
            idle_rss_mib: idle.map_or(0.0, |s| s.rss_kib as f64 / 1024.0),
            fds: run.after.map_or(0.0, |s| s.fds as f64),
            latency_samples: run.latency.count(),
            kicks_per_request: if run.requests > 0 {
                run.kicks as f64 / run.requests as f64
            } else {
                0.0
            },
        }
    }
}

/// File descriptors a daemon holds while the guest keeps many inodes looked up.
#[derive(Debug, Clone, Serialize)]
pub struct FdCheck {
    pub backend: Backend,
    pub inode_file_handles: String,
    pub lookups: usize,
    pub fds_before: u64,
    pub fds_held: u64,
    pub fds_after_forget: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    #[serde(flatten)]
    pub host: HostFacts,
    pub event_idx: bool,
    pub seconds_per_run: f64,
    pub reps: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub machine: Machine,
    pub runs: Vec<Row>,
    pub summary: Vec<Row>,
    pub fd_checks: Vec<FdCheck>,
    pub failures: Vec<String>,
}

fn machine(plan: &Plan) -> Machine {
    Machine {
        host: HostFacts::read(),
        event_idx: plan.event_idx,
        seconds_per_run: plan.duration.as_secs_f64(),
        reps: plan.reps,
    }
}

fn socket_path() -> Result<PathBuf> {
    Ok(stats::socket_path("berth-loadgen", "vhost.sock")?)
}

/// virtiofsd serves one request queue: a case of N queues at depth D runs on its single queue
/// at depth N x D, the same number of requests in flight.
fn served_shape(backend: Backend, queues: usize, depth: u16) -> (usize, u16) {
    match backend {
        Backend::Virtiofsd if queues > 1 => (1, depth.saturating_mul(queues as u16)),
        _ => (queues, depth),
    }
}

fn run_daemon(
    files: &FileSet,
    spec: &DaemonCommand,
    case: &Case,
    plan: &Plan,
) -> Result<(RunResult, Option<ProcSample>)> {
    let socket = socket_path()?;
    let daemon = Daemon::spawn(spec, &socket, &files.root)?;
    let pid = daemon.serving_pid();
    let idle = Mutex::new(None);
    let options = FrontendOptions {
        event_idx: plan.event_idx,
        timeout: Duration::from_secs(20),
    };
    let sampler = move || daemon::sample(daemon::serving_pid(pid)).ok();
    let result = vhost::run(&socket, files, case, options, &sampler, &|| {
        if let Ok(mut idle) = idle.lock() {
            *idle = daemon::sample(daemon::serving_pid(pid)).ok();
        }
    })?;
    verify_side_effects(files, case, &result)?;
    daemon.finish()?;
    let idle = idle.lock().ok().and_then(|i| *i);
    Ok((result, idle))
}

fn verify_side_effects(files: &FileSet, case: &Case, result: &RunResult) -> Result<()> {
    for &(file, offset, len) in &result.written {
        files.verify_written(file, case.generation, offset, len)?;
    }
    if case.workload == Workload::CreateUnlink {
        files.verify_churn_empty()?;
    }
    if matches!(case.workload, Workload::Write { .. })
        && result.ops > 0
        && result.written.is_empty()
    {
        anyhow::bail!("writes completed but none was recorded for checking");
    }
    if result.ops == 0 {
        anyhow::bail!("no operation completed");
    }
    Ok(())
}

pub fn run_plan(files: &FileSet, daemons: &[DaemonCommand], plan: &Plan) -> Result<Outcome> {
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    let mut generation = 0u64;
    let mut next_generation = || {
        generation = generation % 4000 + 1;
        generation
    };
    let mut flip = false;
    for rep in 0..plan.reps {
        for &workload in &plan.workloads {
            for &queues in &plan.queues {
                for (depth_index, &depth) in plan.depths.iter().enumerate() {
                    flip = !flip;
                    let mut order: Vec<&DaemonCommand> = daemons.iter().collect();
                    if flip {
                        order.reverse();
                    }
                    for spec in order {
                        let (served_queues, served_depth) =
                            served_shape(spec.backend, queues, depth);
                        let case = Case {
                            workload,
                            threads: served_queues,
                            depth: served_depth,
                            files: queues.min(crate::fileset::FILES),
                            duration: plan.duration,
                            generation: next_generation(),
                        };
                        match run_daemon(files, spec, &case, plan) {
                            Ok((result, idle)) => {
                                let mut row = Row::from_run(
                                    workload,
                                    queues,
                                    depth,
                                    spec.backend,
                                    rep,
                                    &result,
                                    idle,
                                );
                                row.served_queues = served_queues;
                                row.served_depth = served_depth;
                                if !plan.quick {
                                    eprintln!(
                                        "rep {} {} q{queues} qd{depth} {}: {:.0} ops/s, p50 {:.1} us",
                                        rep + 1,
                                        workload.name(),
                                        spec.backend.name(),
                                        row.ops_per_s,
                                        row.p50_us
                                    );
                                }
                                runs.push(row);
                            }
                            Err(err) => failures.push(format!(
                                "{} {} q{queues} qd{depth}: {err:#}",
                                workload.name(),
                                spec.backend.name()
                            )),
                        }
                    }
                    if depth_index == 0 {
                        let case = Case {
                            workload,
                            threads: queues,
                            depth: 1,
                            files: queues.min(crate::fileset::FILES),
                            duration: plan.duration,
                            generation: next_generation(),
                        };
                        match native::run(files, &case).and_then(|result| {
                            verify_side_effects(files, &case, &result).map(|_| result)
                        }) {
                            Ok(result) => runs.push(Row::from_run(
                                workload,
                                queues,
                                0,
                                Backend::Native,
                                rep,
                                &result,
                                None,
                            )),
                            Err(err) => failures
                                .push(format!("{} native q{queues}: {err:#}", workload.name())),
                        }
                    }
                }
            }
        }
    }
    let mut fd_checks = Vec::new();
    let tree = files.layout.tree_dirs * files.layout.files_per_dir;
    for spec in daemons {
        for handles in ["prefer", "never"] {
            if plan.quick && handles == "never" {
                continue;
            }
            // With file handles, 10 000 lookups show that descriptors do not grow. Holding
            // one descriptor per inode (`never`), berth caps held inodes at half of what the
            // descriptor limit leaves (ENFILE beyond): stay below that on hosts whose hard
            // limit is 20 000.
            let lookups = tree.min(if handles == "never" { 4_000 } else { 10_000 });
            let mut spec = spec.clone();
            spec.extra_args = vec![format!("--inode-file-handles={handles}")];
            match fd_check(files, &spec, lookups) {
                Ok((before, held, after)) => {
                    // With file handles berth must not pin a descriptor per looked-up inode
                    // (a target of the benchmark): allow a little slack for lazily opened
                    // mount descriptors, nothing near one per lookup.
                    if spec.backend == Backend::Berth
                        && handles == "prefer"
                        && held > before + (lookups as u64 / 100).max(16)
                    {
                        failures.push(format!(
                            "fd check berth prefer: descriptors grew from {before} to {held} \
                             while holding {lookups} lookups"
                        ));
                    }
                    fd_checks.push(FdCheck {
                        backend: spec.backend,
                        inode_file_handles: handles.into(),
                        lookups,
                        fds_before: before,
                        fds_held: held,
                        fds_after_forget: after,
                    })
                }
                Err(err) => failures.push(format!(
                    "fd check {} {handles}: {err:#}",
                    spec.backend.name()
                )),
            }
        }
    }
    Ok(Outcome {
        machine: machine(plan),
        summary: summarize(&runs),
        runs,
        fd_checks,
        failures,
    })
}

fn fd_check(files: &FileSet, spec: &DaemonCommand, lookups: usize) -> Result<(u64, u64, u64)> {
    let socket = socket_path()?;
    let daemon = Daemon::spawn(spec, &socket, &files.root)?;
    let pid = daemon.serving_pid();
    let counts = vhost::hold_lookups(&socket, files, lookups, &|| {
        daemon::sample(daemon::serving_pid(pid))
            .map(|s| s.fds)
            .unwrap_or(0)
    })?;
    daemon.finish()?;
    Ok(counts)
}

fn summarize(runs: &[Row]) -> Vec<Row> {
    summarize_groups(
        runs,
        |row| (row.workload.clone(), row.queues, row.depth, row.backend),
        |rows| {
            let mut summary = rows[0].clone();
            summary.rep = rows.len();
            set_medians!(
                summary, rows;
                ops_per_s, mib_per_s, p50_us, p99_us, cpu_s, cpu_us_per_op,
                hwm_mib, idle_rss_mib, fds, kicks_per_request,
            );
            summary
        },
    )
}

fn find<'a>(
    outcome: &'a Outcome,
    workload: &str,
    queues: usize,
    depth: u16,
    backend: Backend,
) -> Option<&'a Row> {
    outcome.summary.iter().find(|r| {
        r.workload == workload && r.queues == queues && r.depth == depth && r.backend == backend
    })
}

fn format_row(row: &Row, ratio: &str) -> String {
    let daemon_figures = if row.backend == Backend::Native {
        format!("{:>7} {:>7} {:>8} {:>6}", "-", "-", "-", "-")
    } else {
        format!(
            "{:>7.2} {:>7.1} {:>8.1} {:>6.0}",
            row.cpu_s, row.cpu_us_per_op, row.hwm_mib, row.fds
        )
    };
    let shape = if row.backend == Backend::Native {
        format!("{}t sync", row.served_queues)
    } else {
        format!("{}q qd{}", row.served_queues, row.served_depth)
    };
    format!(
        "{:<10} {:<10} {:>10.0} {:>8.1} {:>8.1} {:>8.1} {daemon_figures} {ratio:>8}",
        row.backend.name(),
        shape,
        row.ops_per_s,
        row.mib_per_s,
        row.p50_us,
        row.p99_us
    )
}

pub fn print(outcome: &Outcome, plan: &Plan) {
    let m = &outcome.machine;
    if plan.quick {
        for workload in &plan.workloads {
            let name = workload.name();
            let mut parts = Vec::new();
            for row in outcome.summary.iter().filter(|r| r.workload == name) {
                parts.push(format!("{} {:.0} ops/s", row.backend.name(), row.ops_per_s));
            }
            let failed = outcome
                .failures
                .iter()
                .any(|f| f.starts_with(&format!("{name} ")));
            println!(
                "{} {:<15} {}",
                if failed { "FAIL" } else { "ok  " },
                name,
                parts.join(", ")
            );
        }
        for check in &outcome.fd_checks {
            let failed = outcome.failures.iter().any(|f| {
                f.starts_with(&format!(
                    "fd check {} {}",
                    check.backend.name(),
                    check.inode_file_handles
                ))
            });
            println!(
                "{} fd-check        {} held {} lookups: {} fds (idle {}, after forget {})",
                if failed { "FAIL" } else { "ok  " },
                check.backend.name(),
                check.lookups,
                check.fds_held,
                check.fds_before,
                check.fds_after_forget
            );
        }
    } else {
        println!(
            "\n{} x {} cpus, kernel {}, {} s per run, median of {}, EVENT_IDX {}",
            m.host.cpu_model,
            m.host.cpus,
            m.host.kernel,
            m.seconds_per_run,
            m.reps,
            if m.event_idx { "on" } else { "off" }
        );
        println!(
            "{:<15} {:<10} {:<10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>6} {:>8}",
            "workload",
            "backend",
            "shape",
            "ops/s",
            "MiB/s",
            "p50 us",
            "p99 us",
            "cpu s",
            "cpu/op",
            "HWM MiB",
            "fds",
            "ratio"
        );
        for workload in &plan.workloads {
            let name = workload.name();
            for &queues in &plan.queues {
                for &depth in &plan.depths {
                    let berth = find(outcome, &name, queues, depth, Backend::Berth);
                    let virtiofsd = find(outcome, &name, queues, depth, Backend::Virtiofsd);
                    let native = find(outcome, &name, queues, 0, Backend::Native);
                    let label = format!("{name} q{queues} qd{depth}");
                    let mut first = true;
                    let mut line = |row: &Row, ratio: String| {
                        println!(
                            "{:<15} {}",
                            if first { label.as_str() } else { "" },
                            format_row(row, &ratio)
                        );
                        first = false;
                    };
                    if let Some(b) = berth {
                        let ratio = virtiofsd
                            .filter(|v| v.ops_per_s > 0.0)
                            .map_or(String::new(), |v| {
                                format!("{:.2}x", b.ops_per_s / v.ops_per_s)
                            });
                        line(b, ratio);
                    }
                    if let Some(v) = virtiofsd {
                        line(v, String::new());
                    }
                    if let Some(n) = native {
                        let ratio = berth
                            .filter(|b| b.ops_per_s > 0.0)
                            .map_or(String::new(), |b| {
                                format!("{:.1}x", n.ops_per_s / b.ops_per_s)
                            });
                        line(n, ratio);
                    }
                }
            }
        }
        println!("ratio: berth/virtiofsd ops on the berth row; native/berth ops (berth's cost over the syscalls) on the native row");
        println!(
            "virtiofsd serves one request queue: its 4-queue cases run 1 queue at 4x the depth"
        );
        for check in &outcome.fd_checks {
            println!(
                "fds of {} (--inode-file-handles={}): idle {}, holding {} lookups {}, after FORGET {}",
                check.backend.name(),
                check.inode_file_handles,
                check.fds_before,
                check.lookups,
                check.fds_held,
                check.fds_after_forget
            );
        }
        for row in outcome
            .summary
            .iter()
            .filter(|r| r.backend != Backend::Native)
        {
            if row.workload == "read-4k-rand"
                && row.queues == plan.queues[0]
                && row.depth == plan.depths[0]
            {
                println!(
                    "idle RSS of {}: {:.1} MiB",
                    row.backend.name(),
                    row.idle_rss_mib
                );
            }
        }
    }
    for failure in &outcome.failures {
        println!("FAIL {failure}");
    }
    let daemons = outcome
        .summary
        .iter()
        .filter(|r| r.backend != Backend::Native)
        .count();
    if outcome.failures.is_empty() {
        println!(
            "PASS: {} workloads, {} backend cases, every reply checked",
            plan.workloads.len(),
            daemons
        );
    } else {
        println!("FAILED: {} run(s) failed", outcome.failures.len());
    }
}
