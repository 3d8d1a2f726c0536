//! `blk-compare`: berth's vhost-user-blk backend against qemu-storage-daemon's
//! vhost-user-blk export on the same raw file and, with `--volume`, berth serving the same
//! data as a volume on an S3 server, alternating per case, and the table of medians with
//! the berth/qsd and volume/berth ratios.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::blk::{self, BlkCase, BlkWorkload, DiskLayout};
use crate::daemon;
use crate::stats::{self, set_medians, summarize_groups, HostFacts};
use crate::volume::{self, BenchVolume};

/// Which vhost-user-blk backend a run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlkBackend {
    /// berth on the raw file.
    Berth,
    Qsd,
    /// berth on a volume (`volume:s3://...`) made from the raw file.
    Volume,
}

impl BlkBackend {
    pub fn name(self) -> &'static str {
        match self {
            BlkBackend::Berth => "berth",
            BlkBackend::Qsd => "qsd",
            BlkBackend::Volume => "volume",
        }
    }

    /// The backend the ratio column compares this one with: berth on the raw file with
    /// qsd, the volume with berth on the raw file.
    pub fn reference(self) -> Option<BlkBackend> {
        match self {
            BlkBackend::Berth => Some(BlkBackend::Qsd),
            BlkBackend::Qsd => None,
            BlkBackend::Volume => Some(BlkBackend::Berth),
        }
    }
}

/// How to start a backend.
#[derive(Debug, Clone)]
pub struct BlkDaemonCommand {
    pub backend: BlkBackend,
    pub binary: PathBuf,
    /// qemu-storage-daemon's `aio=` of the file node.
    pub qsd_aio: String,
    /// The volume berth serves instead of the image ([`BlkBackend::Volume`]).
    pub volume: Option<Arc<BenchVolume>>,
}

impl BlkDaemonCommand {
    fn command(&self, socket: &Path, image: &Path, queues: usize) -> Command {
        let mut command = Command::new(&self.binary);
        match self.backend {
            BlkBackend::Berth | BlkBackend::Volume => {
                // Default confinement (namespace sandbox, seccomp kill), as a host runs it
                // (a volume is served without the sandbox: it reaches its bucket).
                command
                    .args(["block", "serve-vhost", "--socket-path"])
                    .arg(socket)
                    .arg(format!("--queues={queues}"))
                    .args(["--log-level", "warn"]);
                match &self.volume {
                    Some(volume) if self.backend == BlkBackend::Volume => {
                        command
                            .arg("--volume-dir")
                            .arg(&volume.volume_dir)
                            .arg(format!("volume:{}", volume.location))
                            .envs(volume.env.iter().map(|(k, v)| (k, v)));
                    }
                    _ => {
                        command.arg(image);
                    }
                }
            }
            BlkBackend::Qsd => {
                let image = image.display().to_string().replace(',', ",,");
                let socket = socket.display().to_string().replace(',', ",,");
                command
                    .arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=file0,filename={image},cache.direct=off,aio={}",
                        self.qsd_aio
                    ))
                    .arg("--blockdev")
                    .arg("driver=raw,node-name=disk0,file=file0")
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\
                         addr.path={socket},writable=on,logical-block-size=4096,\
                         num-queues={queues}"
                    ));
            }
        }
        command
    }
}

/// A running backend; killed when dropped.
struct BlkDaemon {
    child: Child,
    socket: PathBuf,
    backend: BlkBackend,
}

impl BlkDaemon {
    fn spawn(spec: &BlkDaemonCommand, socket: &Path, image: &Path, queues: usize) -> Result<Self> {
        let child =
            daemon::start_listening(spec.command(socket, image, queues), socket, &spec.binary)?;
        Ok(Self {
            child,
            socket: socket.to_owned(),
            backend: spec.backend,
        })
    }

    fn serving_pid(&self) -> u32 {
        daemon::serving_pid(self.child.id())
    }

    /// berth exits on its own once the frontend disconnects (with status 0, checked);
    /// qemu-storage-daemon keeps listening and is stopped with SIGTERM.
    fn finish(mut self) -> Result<()> {
        if self.backend == BlkBackend::Qsd {
            // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        // A volume's berth uploads what is left of its log before it exits.
        let wait = match self.backend {
            BlkBackend::Volume => volume::exit_timeout(),
            _ => Duration::from_secs(5),
        };
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if self.backend != BlkBackend::Qsd && !status.success() {
                    bail!("berth exited with {status} after the frontend disconnected");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("{} did not exit", self.backend.name())
    }
}

impl Drop for BlkDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// What to run.
pub struct BlkPlan {
    pub image: PathBuf,
    pub layout: DiskLayout,
    pub workloads: Vec<BlkWorkload>,
    pub queues: Vec<usize>,
    pub depths: Vec<u16>,
    pub duration: Duration,
    pub reps: usize,
    pub segment: u32,
    pub event_idx: bool,
    pub quick: bool,
    pub qsd_aio: String,
    /// A volume backend runs too.
    pub volume: bool,
}

/// The figures of one run, or the median of several.
#[derive(Debug, Clone, Serialize)]
pub struct BlkRow {
    pub workload: String,
    pub queues: usize,
    pub depth: u16,
    pub backend: BlkBackend,
    pub rep: usize,
    pub ops_per_s: f64,
    pub mib_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Backend CPU (user + system) during the measured window, seconds.
    pub cpu_s: f64,
    pub cpu_us_per_op: f64,
    pub latency_samples: u64,
    pub writes_checked: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlkMachine {
    #[serde(flatten)]
    pub host: HostFacts,
    pub image_bytes: u64,
    pub caching: String,
    pub seconds_per_run: f64,
    pub reps: usize,
    pub segment_bytes: u32,
    pub event_idx: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlkOutcome {
    pub machine: BlkMachine,
    pub runs: Vec<BlkRow>,
    pub summary: Vec<BlkRow>,
    pub failures: Vec<String>,
}

/// The caching mode the backends run in, as printed and recorded.
pub fn caching(plan: &BlkPlan) -> String {
    let mut text = format!(
        "host page cache on both (berth: buffered preadv/pwritev; qsd: cache.direct=off, \
         aio={}, writeback), FLUSH = fdatasync on both",
        plan.qsd_aio
    );
    if plan.volume {
        text.push_str(
            "; volume: made from the image on a moto S3 server on loopback, its read region \
             read once beforehand (in the local cache), durability local (writes appended to \
             the write-ahead log through the page cache, FLUSH = fdatasync of the log), \
             uploads in the background during the runs",
        );
    }
    text
}

fn machine(plan: &BlkPlan) -> BlkMachine {
    BlkMachine {
        host: HostFacts::read(),
        image_bytes: plan.layout.size,
        caching: caching(plan),
        seconds_per_run: plan.duration.as_secs_f64(),
        reps: plan.reps,
        segment_bytes: plan.segment,
        event_idx: plan.event_idx,
    }
}

fn socket_path() -> Result<PathBuf> {
    Ok(stats::socket_path("berth-loadgen-blk", "vhost-blk.sock")?)
}

fn run_backend(spec: &BlkDaemonCommand, case: &BlkCase, plan: &BlkPlan) -> Result<BlkRow> {
    let socket = socket_path()?;
    let daemon = BlkDaemon::spawn(spec, &socket, &plan.image, case.queues)?;
    let pid = daemon.serving_pid();
    let sampler = move || daemon::sample(daemon::serving_pid(pid)).ok();
    let run = blk::run(&socket, plan.layout, case, &sampler)?;
    daemon.finish()?;
    // With the backend gone, what it acknowledged must be in the file, or in the volume
    // when it is opened next.
    match (&spec.volume, spec.backend) {
        (Some(volume), BlkBackend::Volume) => {
            if !run.written.is_empty() {
                volume
                    .verify(case.generation, &run.written)
                    .context("checking the written data through a new open of the volume")?;
            }
        }
        _ => blk::verify_on_host(&plan.image, case.generation, &run.written)
            .context("checking the written data in the host file")?,
    }
    if case.workload.writes() && spec.backend != BlkBackend::Volume {
        // The next run must not pay for this one's dirty pages (its first FLUSH would).
        sync_image(&plan.image)?;
    }
    let result = &run.result;
    let elapsed = result.elapsed.max(1e-9);
    let cpu_s = match (result.before, result.after) {
        (Some(before), Some(after)) => after.cpu_seconds - before.cpu_seconds,
        _ => 0.0,
    };
    let ops = result.ops as f64;
    Ok(BlkRow {
        workload: case.workload.name(),
        queues: case.queues,
        depth: case.depth,
        backend: spec.backend,
        rep: 0,
        ops_per_s: ops / elapsed,
        mib_per_s: result.bytes as f64 / elapsed / f64::from(1 << 20),
        p50_us: result.latency.quantile(0.5) as f64 / 1000.0,
        p99_us: result.latency.quantile(0.99) as f64 / 1000.0,
        cpu_s,
        cpu_us_per_op: if ops > 0.0 { cpu_s * 1e6 / ops } else { 0.0 },
        latency_samples: result.latency.count(),
        writes_checked: run.read_back,
    })
}

/// Writes the image's dirty pages back, outside any measured window.
fn sync_image(image: &Path) -> Result<()> {
    std::fs::File::open(image)
        .and_then(|file| file.sync_data())
        .with_context(|| format!("cannot sync {}", image.display()))
}

pub fn run_plan(daemons: &[BlkDaemonCommand], plan: &BlkPlan) -> BlkOutcome {
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    if let Err(err) = sync_image(&plan.image) {
        failures.push(format!("{err:#}"));
    }
    let mut generation = 0u64;
    let mut flip = false;
    for rep in 0..plan.reps {
        for &workload in &plan.workloads {
            for &queues in &plan.queues {
                for &depth in &plan.depths {
                    flip = !flip;
                    let mut order: Vec<&BlkDaemonCommand> = daemons.iter().collect();
                    if flip {
                        order.reverse();
                    }
                    for spec in order {
                        generation = generation % 4000 + 1;
                        let case = BlkCase {
                            workload,
                            queues,
                            depth,
                            duration: plan.duration,
                            generation,
                            segment: plan.segment,
                            event_idx: plan.event_idx,
                        };
                        match run_backend(spec, &case, plan) {
                            Ok(mut row) => {
                                row.rep = rep;
                                if !plan.quick {
                                    eprintln!(
                                        "rep {} {} q{queues} qd{depth} {}: {:.0} ops/s, {:.1} MiB/s, p50 {:.1} us",
                                        rep + 1,
                                        workload.name(),
                                        spec.backend.name(),
                                        row.ops_per_s,
                                        row.mib_per_s,
                                        row.p50_us
                                    );
                                }
                                runs.push(row);
                            }
                            Err(err) => failures.push(format!(
                                "{} q{queues} qd{depth} {}: {err:#}",
                                workload.name(),
                                spec.backend.name()
                            )),
                        }
                    }
                }
            }
        }
    }
    BlkOutcome {
        machine: machine(plan),
        summary: summarize(&runs),
        runs,
        failures,
    }
}

fn summarize(runs: &[BlkRow]) -> Vec<BlkRow> {
    summarize_groups(
        runs,
        |row| (row.workload.clone(), row.queues, row.depth, row.backend),
        |rows| {
            let mut summary = rows[0].clone();
            summary.rep = rows.len();
            set_medians!(summary, rows; ops_per_s, mib_per_s, p50_us, p99_us, cpu_s, cpu_us_per_op);
            summary.writes_checked = rows.iter().map(|r| r.writes_checked).sum();
            summary
        },
    )
}

pub fn ratio(berth: Option<&BlkRow>, qsd: Option<&BlkRow>) -> Option<f64> {
    match (berth, qsd) {
        (Some(b), Some(q)) if q.ops_per_s > 0.0 => Some(b.ops_per_s / q.ops_per_s),
        _ => None,
    }
}

pub fn print(outcome: &BlkOutcome, plan: &BlkPlan) {
    let find = |name: &str, queues: usize, depth: u16, backend: BlkBackend| {
        outcome.summary.iter().find(|r| {
            r.workload == name && r.queues == queues && r.depth == depth && r.backend == backend
        })
    };
    let m = &outcome.machine;
    println!(
        "\n{} x {} cpus, kernel {}, image {} MiB, {} s per run, median of {}, EVENT_IDX {}, \
         data segments of {} KiB",
        m.host.cpu_model,
        m.host.cpus,
        m.host.kernel,
        m.image_bytes >> 20,
        m.seconds_per_run,
        m.reps,
        if m.event_idx { "on" } else { "off" },
        m.segment_bytes >> 10
    );
    println!("caching: {}", m.caching);
    println!(
        "{:<17} {:<6} {:<8} {:>9} {:>8} {:>8} {:>8} {:>6} {:>7} {:>7}",
        "workload",
        "backend",
        "shape",
        "IOPS",
        "MiB/s",
        "p50 us",
        "p99 us",
        "cpu s",
        "cpu/op",
        "ratio"
    );
    for workload in &plan.workloads {
        let name = workload.name();
        for &queues in &plan.queues {
            for &depth in &plan.depths {
                let mut first = true;
                for backend in [BlkBackend::Berth, BlkBackend::Qsd, BlkBackend::Volume] {
                    let Some(row) = find(&name, queues, depth, backend) else {
                        continue;
                    };
                    let reference = backend
                        .reference()
                        .and_then(|other| find(&name, queues, depth, other));
                    let ratio =
                        ratio(Some(row), reference).map_or(String::new(), |r| format!("{r:.2}x"));
                    println!(
                        "{:<17} {:<6} {:<8} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>6.2} {:>7.1} {:>7}",
                        if first { name.as_str() } else { "" },
                        row.backend.name(),
                        format!("{queues}q qd{depth}"),
                        row.ops_per_s,
                        row.mib_per_s,
                        row.p50_us,
                        row.p99_us,
                        row.cpu_s,
                        row.cpu_us_per_op,
                        ratio
                    );
                    first = false;
                }
            }
        }
    }
    println!(
        "ratio: IOPS of berth/qsd on the berth rows, of volume/berth (the raw file) on the \
         volume rows; cpu: the backend's user+system seconds in the window and microseconds \
         per operation"
    );
    for failure in &outcome.failures {
        println!("FAIL {failure}");
    }
    let checked: usize = outcome.summary.iter().map(|r| r.writes_checked).sum();
    if outcome.failures.is_empty() {
        println!(
            "PASS: {} backend cases, every status and read checked, {checked} written ranges \
             read back through the device and from the host file (the volume: through a new \
             open of it)",
            outcome.summary.len()
        );
    } else {
        println!("FAILED: {} run(s) failed", outcome.failures.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(backend: BlkBackend, ops: f64) -> BlkRow {
        BlkRow {
            workload: "read-4k-rand".into(),
            queues: 1,
            depth: 1,
            backend,
            rep: 0,
            ops_per_s: ops,
            mib_per_s: 0.0,
            p50_us: 0.0,
            p99_us: 0.0,
            cpu_s: 0.0,
            cpu_us_per_op: 0.0,
            latency_samples: 0,
            writes_checked: 1,
        }
    }

    #[test]
    fn medians_per_backend_and_the_ratio() {
        let runs = vec![
            row(BlkBackend::Berth, 300.0),
            row(BlkBackend::Qsd, 100.0),
            row(BlkBackend::Berth, 100.0),
            row(BlkBackend::Qsd, 200.0),
            row(BlkBackend::Berth, 200.0),
            row(BlkBackend::Qsd, 300.0),
        ];
        let summary = summarize(&runs);
        assert_eq!(summary.len(), 2);
        let berth = summary.iter().find(|r| r.backend == BlkBackend::Berth);
        let qsd = summary.iter().find(|r| r.backend == BlkBackend::Qsd);
        assert_eq!(
            berth.map(|r| (r.ops_per_s, r.rep, r.writes_checked)),
            Some((200.0, 3, 3))
        );
        assert_eq!(ratio(berth, qsd), Some(1.0));
        assert_eq!(ratio(berth, None), None);
        assert_eq!(ratio(berth, Some(&row(BlkBackend::Qsd, 0.0))), None);
    }

    /// The arguments `command` runs with, as text.
    fn args_of(command: &Command) -> Vec<String> {
        command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// Asserts that `args` start berth's vhost-user block server on `socket`.
    fn assert_serves_vhost_on(args: &[String], socket: &str) {
        assert_eq!(args[..4], ["block", "serve-vhost", "--socket-path", socket]);
    }

    #[test]
    fn qsd_gets_the_same_file_queues_and_page_cache_mode() {
        let spec = BlkDaemonCommand {
            backend: BlkBackend::Qsd,
            binary: "qemu-storage-daemon".into(),
            qsd_aio: "threads".into(),
            volume: None,
        };
        let args = args_of(&spec.command(Path::new("/s,ock"), Path::new("/img"), 2));
        assert!(args[1].contains("filename=/img,cache.direct=off,aio=threads"));
        assert!(args[5].contains("addr.path=/s,,ock,"));
        assert!(args[5].contains("num-queues=2"));
        let berth = BlkDaemonCommand {
            backend: BlkBackend::Berth,
            binary: "berth".into(),
            qsd_aio: String::new(),
            volume: None,
        };
        let args = args_of(&berth.command(Path::new("/sock"), Path::new("/img"), 4));
        assert_serves_vhost_on(&args, "/sock");
        assert!(args.contains(&"--queues=4".to_string()));
        assert_eq!(args.last().map(String::as_str), Some("/img"));
    }

    #[test]
    fn the_volume_backend_serves_its_location_with_the_bucket_environment() {
        let volume = BenchVolume {
            location: "s3://bench/blk".into(),
            volume_dir: "/vols".into(),
            env: vec![("AWS_ENDPOINT".into(), "http://127.0.0.1:9".into())],
            backend: Arc::new(berth_cache::LocalDirBackend::new("/nowhere")),
        };
        let spec = BlkDaemonCommand {
            backend: BlkBackend::Volume,
            binary: "berth".into(),
            qsd_aio: String::new(),
            volume: Some(Arc::new(volume)),
        };
        let command = spec.command(Path::new("/sock"), Path::new("/img"), 2);
        let args = args_of(&command);
        assert_serves_vhost_on(&args, "/sock");
        assert!(!args.contains(&"/img".to_string()), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["--volume-dir", "/vols"]));
        assert_eq!(
            args.last().map(String::as_str),
            Some("volume:s3://bench/blk")
        );
        let env: Vec<_> = command.get_envs().collect();
        assert_eq!(
            env,
            [(
                std::ffi::OsStr::new("AWS_ENDPOINT"),
                Some(std::ffi::OsStr::new("http://127.0.0.1:9"))
            )]
        );
        assert_eq!(BlkBackend::Volume.reference(), Some(BlkBackend::Berth));
        assert_eq!(BlkBackend::Berth.reference(), Some(BlkBackend::Qsd));
        assert_eq!(BlkBackend::Qsd.reference(), None);
    }
}
