//! `vol-flush`: how fast a volume gets dirty data into its bucket, as a fraction of how
//! fast the same S3 server takes raw PUTs of the same bytes.
//!
//! One process does both, alternating per repetition, against one moto server on
//! loopback through the same S3 client (object_store, via berth's cache backend):
//!
//! - volume: a new volume (`--durability object`, `--pack` bytes per pack) is opened in
//!   this process; N MiB of incompressible data are written to it as 1 MiB writes, then a
//!   FLUSH, which with object durability completes once everything is in the bucket (packs
//!   and manifest versions). Throughput is N MiB over the time from the first write to the
//!   FLUSH's completion. Afterwards the volume is opened again from an empty local
//!   directory (everything comes from the bucket) and read back in full.
//! - raw PUT: the same N MiB cut into objects of the pack size, PUT by S streams.
//!
//! The fraction is the volume's MiB/s over the best raw PUT MiB/s of the repetition.
//!
//! Then, per repetition, what compaction costs: a volume is written and FLUSHed, three MiB
//! of every four are overwritten and FLUSHed (so the first packs keep a quarter of their
//! blocks), and the volume is opened again with compaction on. The figure is the live
//! bytes compaction moved into new packs per second, from that open until compaction has
//! nothing left to do, against a raw GET (1 MiB ranges) and PUT (objects of the pack size,
//! one stream) of the same bytes, as a compaction step reads and writes them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use berth_blockdev::target::{flush, read_at, write_at};
use berth_cache::BlobBackend;
use berth_testkit::memory::{reported_kib, touch_free_memory, PageReportingPause};
use berth_volume::admin::{self, CreateOptions};
use berth_volume::{Durability, Location, Store, Volume, VolumeOptions};
use serde::Serialize;

use crate::blk::parse_size;
use crate::stats::{median, HostFacts};
use crate::volume::S3Server;
use crate::workload::Rng;

#[derive(clap::Args)]
pub struct VolFlushArgs {
    /// Directory for the volumes' local state (emptied first, removed after).
    #[arg(long)]
    dir: PathBuf,
    /// Smoke mode: 16 MiB, 4 MiB packs, one repetition, pass/fail exit code.
    #[arg(long)]
    quick: bool,
    /// MiB of dirty data per measurement [default: 256; --quick 16].
    #[arg(long)]
    mib: Option<u64>,
    /// Pack size: the volume's upload batch and the raw PUTs' object size (K, M suffixes)
    /// [default: 32M, the volume default; --quick 4M].
    #[arg(long)]
    pack: Option<String>,
    /// Comma-separated numbers of parallel raw PUT streams [default: 1,4; --quick 1,2].
    #[arg(long)]
    streams: Option<String>,
    /// Comma-separated numbers of packs the volume uploads at once, one volume method
    /// each; the fraction is taken for the last [default: 1,4; --quick 1,2].
    #[arg(long)]
    upload_streams: Option<String>,
    /// Repetitions (medians are reported) [default: 3; --quick 1].
    #[arg(long)]
    reps: Option<usize>,
    /// Untimed repetitions of every method first [default: 1; --quick 0]: a process's
    /// first pass over fresh memory can cost several times a later one (a VM whose memory
    /// the hypervisor maps on first touch), which would count against whichever method
    /// runs first.
    #[arg(long)]
    warm_up_reps: Option<usize>,
    /// Write every run's figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct FlushRow {
    /// `volume-U` (U packs uploaded at once) or `put-S` (S parallel streams).
    pub method: String,
    pub rep: usize,
    pub mib_per_s: f64,
    pub seconds: f64,
    /// Volume: seconds from the last write's completion to the FLUSH's.
    pub drain_seconds: f64,
    /// Objects written (volume: packs; manifests not counted).
    pub objects: u64,
    /// Bytes sent as objects (volume: packs as stored).
    pub object_bytes: u64,
    /// Volume: manifest versions written.
    pub manifests: u64,
    /// Volume: seconds its batches spent from being taken to being applied (pack, PUT,
    /// manifest, local apply), summed: more than the wall time when packs overlap.
    pub upload_busy_seconds: f64,
    /// Volume: the most packs built or PUT at once.
    pub uploads_at_once: u64,
}

/// One compaction measurement.
#[derive(Debug, Clone, Serialize)]
pub struct CompactRow {
    pub rep: usize,
    /// Live bytes compaction wrote into new packs.
    pub moved_bytes: u64,
    /// Bytes it fetched from the old packs.
    pub fetched_bytes: u64,
    /// Compaction steps (one new pack each).
    pub steps: u64,
    pub seconds: f64,
    pub mib_per_s: f64,
    /// The same bytes fetched by raw GETs and stored by raw PUTs, one stream.
    pub raw_seconds: f64,
    pub raw_mib_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlushOutcome {
    #[serde(flatten)]
    pub host: HostFacts,
    pub server: String,
    pub mib: u64,
    pub pack_bytes: u64,
    pub reps: usize,
    /// Untimed rounds of every method before the timed ones.
    pub warm_up_reps: usize,
    pub runs: Vec<FlushRow>,
    /// Packs the volume uploaded at once in the method the fractions are taken for.
    pub upload_streams: usize,
    /// Volume MiB/s (the last upload-streams setting) over the best raw PUT MiB/s, per
    /// repetition.
    pub fractions: Vec<f64>,
    pub fraction_median: f64,
    pub compaction: Vec<CompactRow>,
    /// Compaction's MiB/s over raw GET+PUT MiB/s of the same bytes, median.
    pub compaction_fraction_median: f64,
    pub failures: Vec<String>,
}

struct Plan {
    dir: PathBuf,
    bytes: u64,
    pack: u64,
    streams: Vec<usize>,
    upload_streams: Vec<usize>,
    reps: usize,
    warm_up_reps: usize,
}

/// What one measurement does.
#[derive(Clone, Copy)]
enum Method {
    /// Writes and FLUSHes a volume that uploads this many packs at once.
    Volume(usize),
    /// PUTs the same bytes this many streams at a time.
    Put(usize),
}

impl Method {
    fn name(self) -> String {
        match self {
            Method::Volume(n) => format!("volume-{n}"),
            Method::Put(n) => format!("put-{n}"),
        }
    }
}

fn parse_counts(list: &str, what: &str) -> Result<Vec<usize>> {
    let counts: Vec<usize> = list
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| anyhow!("bad {what} count '{s}'"))
        })
        .collect::<Result<_>>()?;
    if counts.is_empty() || counts.contains(&0) {
        bail!("{what} counts start at 1");
    }
    Ok(counts)
}

pub fn run(args: VolFlushArgs) -> Result<bool> {
    let (mib, pack, streams, upload_streams, reps) = if args.quick {
        (16, "4M", "1,2", "1,2", 1)
    } else {
        (256, "32M", "1,4", "1,4", 3)
    };
    let mib = args.mib.unwrap_or(mib);
    let pack = parse_size(args.pack.as_deref().unwrap_or(pack))?;
    if mib == 0 || pack < 1 << 20 || !pack.is_multiple_of(1 << 20) {
        bail!("--mib must be at least 1 and --pack a multiple of 1 MiB");
    }
    let streams = parse_counts(args.streams.as_deref().unwrap_or(streams), "stream")?;
    let upload_streams = parse_counts(
        args.upload_streams.as_deref().unwrap_or(upload_streams),
        "upload stream",
    )?;
    let plan = Plan {
        dir: args.dir.clone(),
        bytes: mib << 20,
        pack,
        streams,
        upload_streams,
        reps: args.reps.unwrap_or(reps).max(1),
        warm_up_reps: args.warm_up_reps.unwrap_or(usize::from(!args.quick)),
    };
    let _ = std::fs::remove_dir_all(&plan.dir);
    std::fs::create_dir_all(&plan.dir)
        .with_context(|| format!("cannot create {}", plan.dir.display()))?;
    let server = S3Server::start("berth-flush")?;
    let backend = server.backend()?;
    // Incompressible, so that packs are as large as the raw objects (LZ4 keeps a chunk
    // that does not shrink as it is).
    let mut data = vec![0u8; plan.bytes as usize];
    let mut rng = Rng::new(0xf1a5);
    for word in data.chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next().to_le_bytes());
    }
    // Free pages handed back to the hypervisor between methods would make whichever
    // method touches them pay host faults (see berth_testkit::memory): paused for the
    // timed runs, not for the smoke run.
    let reporting_paused = if args.quick {
        None
    } else {
        let paused = PageReportingPause::start();
        touch_free_memory();
        paused
    };
    let reported_at_start = reported_kib();
    let outcome = measure(&plan, &server, &backend, &data);
    let reported_mib = reported_kib().saturating_sub(reported_at_start) >> 10;
    drop(reporting_paused);
    if reported_mib > 0 {
        println!(
            "free page reporting handed {reported_mib} MiB back to the hypervisor during the run"
        );
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&plan.dir);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&outcome)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    print(&outcome, &plan);
    Ok(outcome.failures.is_empty())
}

fn measure(
    plan: &Plan,
    server: &S3Server,
    backend: &Arc<dyn BlobBackend>,
    data: &[u8],
) -> FlushOutcome {
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    let mut fractions = Vec::new();
    // The first requests to a new server are slow (its request paths warm up, the client
    // opens its connections): they would count against whichever method runs first.
    if let Err(err) = warm_up(plan, backend, data) {
        failures.push(format!("warming the server up: {err:#}"));
    }
    // Untimed rounds of every method, numbered after the timed ones.
    for warm in 0..plan.warm_up_reps {
        let rep = plan.reps + warm;
        for &uploads in &plan.upload_streams {
            if let Err(err) = volume_flush(plan, server, backend, data, rep, uploads) {
                failures.push(format!("warm-up volume-{uploads}: {err:#}"));
            }
        }
        for &streams in &plan.streams {
            if let Err(err) = raw_puts(plan, backend, data, rep, streams) {
                failures.push(format!("warm-up put-{streams}: {err:#}"));
            }
        }
    }
    for rep in 0..plan.reps {
        let mut methods: Vec<Method> = plan
            .upload_streams
            .iter()
            .map(|&u| Method::Volume(u))
            .chain(plan.streams.iter().map(|&s| Method::Put(s)))
            .collect();
        if rep % 2 == 1 {
            methods.reverse();
        }
        let mut volume_rate = None;
        let mut best_put: Option<f64> = None;
        for method in methods {
            settle();
            let outcome = match method {
                Method::Volume(uploads) => volume_flush(plan, server, backend, data, rep, uploads),
                Method::Put(streams) => raw_puts(plan, backend, data, rep, streams),
            };
            match outcome {
                Ok(row) => {
                    eprintln!(
                        "rep {} {}: {:.1} MiB/s ({:.2} s)",
                        rep + 1,
                        row.method,
                        row.mib_per_s,
                        row.seconds
                    );
                    match method {
                        Method::Volume(uploads) => {
                            if Some(&uploads) == plan.upload_streams.last() {
                                volume_rate = Some(row.mib_per_s)
                            }
                        }
                        Method::Put(_) => {
                            best_put =
                                Some(best_put.map_or(row.mib_per_s, |b| b.max(row.mib_per_s)))
                        }
                    }
                    runs.push(row);
                }
                Err(err) => failures.push(format!("rep {} {}: {err:#}", rep + 1, method.name())),
            }
        }
        if let (Some(volume), Some(put)) = (volume_rate, best_put) {
            if put > 0.0 {
                fractions.push(volume / put);
            }
        }
    }
    let mut compaction = Vec::new();
    for rep in 0..plan.reps {
        match volume_compact(plan, server, backend, data, rep) {
            Ok(row) => {
                eprintln!(
                    "rep {} compact: {:.1} MiB/s ({:.1} MiB in {:.2} s, {} steps); raw GET+PUT {:.1} MiB/s",
                    rep + 1,
                    row.mib_per_s,
                    row.moved_bytes as f64 / f64::from(1 << 20),
                    row.seconds,
                    row.steps,
                    row.raw_mib_per_s
                );
                compaction.push(row);
            }
            Err(err) => failures.push(format!("rep {} compact: {err:#}", rep + 1)),
        }
    }
    let compaction_fraction_median = median(
        &mut compaction
            .iter()
            .map(|r| r.mib_per_s / r.raw_mib_per_s)
            .collect::<Vec<_>>(),
    );
    FlushOutcome {
        compaction,
        compaction_fraction_median,
        host: HostFacts::read(),
        server: format!("moto on loopback ({})", server.endpoint()),
        mib: plan.bytes >> 20,
        pack_bytes: plan.pack,
        reps: plan.reps,
        warm_up_reps: plan.warm_up_reps,
        upload_streams: plan.upload_streams.last().copied().unwrap_or(1),
        fraction_median: median(&mut fractions.clone()),
        fractions,
        runs,
        failures,
    }
}

/// Writes back what the last method left dirty (a volume's local files, the server's
/// spooled objects) and waits until the disks have nothing in flight (the file system's
/// discards of deleted files among it), so that the previous method's disk work does not
/// land in the next method's clock.
fn settle() {
    let started = Instant::now();
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    let mut quiet = 0;
    while quiet < 5 && started.elapsed() < SETTLE_LIMIT {
        std::thread::sleep(Duration::from_millis(100));
        if disk_requests_in_flight() == 0 {
            quiet += 1;
        } else {
            quiet = 0;
        }
    }
}

/// The longest [`settle`] waits for the disks to go quiet.
const SETTLE_LIMIT: Duration = Duration::from_secs(20);

/// Requests in flight on every disk, from /proc/diskstats (the ninth statistic of each line;
/// 0 where the file cannot be read).
fn disk_requests_in_flight() -> u64 {
    std::fs::read_to_string("/proc/diskstats")
        .map(|text| {
            text.lines()
                .filter_map(|line| line.split_whitespace().nth(11)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

fn store(server: &S3Server, backend: &Arc<dyn BlobBackend>, prefix: &str) -> Result<Arc<Store>> {
    let location = Location::parse(&server.location(prefix))?;
    Ok(Store::with_backend(&location, backend.clone()))
}

fn volume_options(dir: &Path, plan: &Plan, upload_streams: usize) -> VolumeOptions {
    VolumeOptions {
        cache_dir: dir.to_path_buf(),
        durability: Durability::Object,
        pack_bytes: plan.pack,
        upload_streams,
        // Room for a slow, shared machine: a timeout here is a failure, not a figure.
        flush_timeout: Duration::from_secs(600),
        drain_timeout: Duration::from_secs(600),
        gc_interval: None,
        ..VolumeOptions::default()
    }
}

/// A new volume of the plan's size under `prefix` in the bucket.
fn new_volume(
    plan: &Plan,
    server: &S3Server,
    backend: &Arc<dyn BlobBackend>,
    prefix: &str,
) -> Result<Arc<Store>> {
    let store = store(server, backend, prefix)?;
    admin::create_in(
        &store,
        &CreateOptions {
            size: Some(plan.bytes),
            ..CreateOptions::default()
        },
        None,
    )
    .context("creating the volume")?;
    Ok(store)
}

/// Opens the volume from the empty local directory `reader` (everything comes from the
/// bucket) and checks it reads back as `expected`, MiB by MiB.
fn read_back_from_bucket(
    plan: &Plan,
    store: Arc<Store>,
    reader: &Path,
    expected: &[u8],
) -> Result<()> {
    let (volume, _) = Volume::open_with_store(store, volume_options(reader, plan, 1))
        .context("opening the volume again from an empty local directory")?;
    let chunk = 1usize << 20;
    let mut buffer = vec![0u8; chunk];
    for (index, piece) in expected.chunks(chunk).enumerate() {
        let buffer = &mut buffer[..piece.len()];
        read_at(&volume, (index * chunk) as u64, buffer)
            .with_context(|| format!("reading MiB {index} back"))?;
        if buffer != piece {
            bail!("MiB {index} of the volume reads back wrong from the bucket");
        }
    }
    volume.close().context("closing the reader")?;
    let _ = std::fs::remove_dir_all(reader);
    Ok(())
}

/// Writes `data` to a new volume and FLUSHes it into the bucket; then reads it all back
/// through a second open from an empty local directory.
fn volume_flush(
    plan: &Plan,
    server: &S3Server,
    backend: &Arc<dyn BlobBackend>,
    data: &[u8],
    rep: usize,
    upload_streams: usize,
) -> Result<FlushRow> {
    let store = new_volume(
        plan,
        server,
        backend,
        &format!("flush-{rep}-{upload_streams}"),
    )?;
    let local = plan.dir.join(format!("writer-{rep}-{upload_streams}"));
    let (volume, _) =
        Volume::open_with_store(store.clone(), volume_options(&local, plan, upload_streams))
            .context("opening the volume")?;
    let chunk = 1usize << 20;
    let started = Instant::now();
    for (index, piece) in data.chunks(chunk).enumerate() {
        write_at(&volume, (index * chunk) as u64, piece, false)
            .with_context(|| format!("writing MiB {index}"))?;
    }
    let written = Instant::now();
    flush(&volume).context("FLUSH (object durability)")?;
    let done = Instant::now();
    let metrics = volume.metrics();
    let row = FlushRow {
        method: Method::Volume(upload_streams).name(),
        rep,
        mib_per_s: plan.bytes as f64 / f64::from(1 << 20) / (done - started).as_secs_f64(),
        seconds: (done - started).as_secs_f64(),
        drain_seconds: (done - written).as_secs_f64(),
        objects: metrics.uploads.load(Ordering::Relaxed),
        object_bytes: metrics.upload_bytes.load(Ordering::Relaxed),
        manifests: metrics.manifests_written.load(Ordering::Relaxed),
        upload_busy_seconds: metrics.upload_latency.sum().as_secs_f64(),
        uploads_at_once: metrics.uploads_in_flight_max.load(Ordering::Relaxed),
    };
    volume.close().context("closing the volume")?;
    drop(volume);
    if row.object_bytes < plan.bytes {
        bail!(
            "the volume uploaded {} bytes of packs for {} bytes of incompressible data",
            row.object_bytes,
            plan.bytes
        );
    }
    let reader = plan.dir.join(format!("reader-{rep}-{upload_streams}"));
    read_back_from_bucket(plan, store, &reader, data)?;
    let _ = std::fs::remove_dir_all(&local);
    Ok(row)
}

/// Leaves a volume whose first packs are a quarter live, then times compaction (see the
/// module documentation), checks the volume reads back from the bucket alone, and times
/// raw GETs and PUTs of as many bytes.
fn volume_compact(
    plan: &Plan,
    server: &S3Server,
    backend: &Arc<dyn BlobBackend>,
    data: &[u8],
    rep: usize,
) -> Result<CompactRow> {
    let store = new_volume(plan, server, backend, &format!("compact-{rep}"))?;
    let local = plan.dir.join(format!("compact-{rep}"));
    let quiet = VolumeOptions {
        compact_below: None,
        ..volume_options(&local, plan, 4)
    };
    let (volume, _) =
        Volume::open_with_store(store.clone(), quiet).context("opening the volume")?;
    let chunk = 1usize << 20;
    let mut model = data.to_vec();
    for (index, piece) in data.chunks(chunk).enumerate() {
        write_at(&volume, (index * chunk) as u64, piece, false)
            .with_context(|| format!("writing MiB {index}"))?;
    }
    flush(&volume).context("FLUSH after the first pass")?;
    // Three MiB of every four again, with other bytes (the data shifted by half).
    let half = data.len() / 2;
    for index in (0..data.len() / chunk).filter(|i| i % 4 != 3) {
        let at = index * chunk;
        let from = (at + half) % data.len();
        let piece = data[from..from + chunk].to_vec();
        write_at(&volume, at as u64, &piece, false)
            .with_context(|| format!("overwriting MiB {index}"))?;
        model[at..at + chunk].copy_from_slice(&piece);
    }
    flush(&volume).context("FLUSH after the overwrites")?;
    volume.close().context("closing the volume")?;
    drop(volume);
    let compacting = VolumeOptions {
        compact_after_dead_bytes: 1,
        compact_check_interval: Duration::from_millis(10),
        ..volume_options(&local, plan, 4)
    };
    let (volume, _) = Volume::open_with_store(store.clone(), compacting)
        .context("opening the volume to compact it")?;
    let started = Instant::now();
    volume
        .wait_compacted(Duration::from_secs(600))
        .context("compacting")?;
    let seconds = started.elapsed().as_secs_f64();
    let metrics = volume.metrics();
    let moved = metrics.compacted_bytes.load(Ordering::Relaxed);
    let fetched = metrics.compact_fetch_bytes.load(Ordering::Relaxed);
    let steps = metrics.compactions.load(Ordering::Relaxed);
    volume.close().context("closing the compacted volume")?;
    drop(volume);
    if moved == 0 {
        bail!("compaction moved nothing from packs a quarter live");
    }
    let reader = plan.dir.join(format!("compact-reader-{rep}"));
    read_back_from_bucket(plan, store, &reader, &model).context("after compaction")?;
    let _ = std::fs::remove_dir_all(&local);
    let raw_seconds = raw_get_put(plan, backend, data, fetched, moved, rep)?;
    let mib = moved as f64 / f64::from(1 << 20);
    Ok(CompactRow {
        rep,
        moved_bytes: moved,
        fetched_bytes: fetched,
        steps,
        seconds,
        mib_per_s: mib / seconds,
        raw_seconds,
        raw_mib_per_s: mib / raw_seconds,
    })
}

/// Seconds to GET `get` bytes in 1 MiB ranges and PUT `put` bytes as objects of the pack
/// size, one request at a time (the objects to GET are PUT before the clock starts).
fn raw_get_put(
    plan: &Plan,
    backend: &Arc<dyn BlobBackend>,
    data: &[u8],
    get: u64,
    put: u64,
    rep: usize,
) -> Result<f64> {
    let objects = |bytes: u64| -> Vec<bytes::Bytes> {
        let shared = bytes::Bytes::copy_from_slice(&data[..(bytes as usize).min(data.len())]);
        (0..shared.len())
            .step_by(plan.pack as usize)
            .map(|at| shared.slice(at..(at + plan.pack as usize).min(shared.len())))
            .collect()
    };
    let sources = objects(get);
    for (index, object) in sources.iter().enumerate() {
        backend.put_shared(&format!("raw-get/{rep}/{index:06}"), object.clone())?;
    }
    let targets = objects(put);
    let range = 1u64 << 20;
    let started = Instant::now();
    for (index, object) in sources.iter().enumerate() {
        let name = format!("raw-get/{rep}/{index:06}");
        let len = object.len() as u64;
        for at in (0..len).step_by(range as usize) {
            backend
                .read_range(&name, at..(at + range).min(len))
                .with_context(|| format!("GET {name}"))?;
        }
    }
    for (index, object) in targets.iter().enumerate() {
        let name = format!("raw-put/{rep}/{index:06}");
        backend
            .put_shared(&name, object.clone())
            .with_context(|| format!("PUT {name}"))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    for index in 0..sources.len() {
        let _ = backend.delete(&format!("raw-get/{rep}/{index:06}"));
    }
    for index in 0..targets.len() {
        let _ = backend.delete(&format!("raw-put/{rep}/{index:06}"));
    }
    Ok(seconds)
}

/// A few untimed requests of each kind the measurements make.
fn warm_up(plan: &Plan, backend: &Arc<dyn BlobBackend>, data: &[u8]) -> Result<()> {
    let object = &data[..(plan.pack as usize).min(data.len())];
    for index in 0..2 {
        let name = format!("warm-up/{index}");
        backend.put_bytes(&name, object)?;
        backend.put_if_absent(&format!("warm-up/small-{index}"), b"warm")?;
        backend.size(&name)?;
    }
    for index in 0..2 {
        backend.delete(&format!("warm-up/{index}"))?;
        backend.delete(&format!("warm-up/small-{index}"))?;
    }
    Ok(())
}

/// PUTs `data` cut into objects of the pack size, `streams` at a time.
fn raw_puts(
    plan: &Plan,
    backend: &Arc<dyn BlobBackend>,
    data: &[u8],
    rep: usize,
    streams: usize,
) -> Result<FlushRow> {
    // One shared copy, made before the clock starts; each object is a slice of it, sent
    // without a copy as the volume sends its packs.
    let shared = bytes::Bytes::copy_from_slice(data);
    let objects: Vec<bytes::Bytes> = (0..data.len())
        .step_by(plan.pack as usize)
        .map(|at| shared.slice(at..(at + plan.pack as usize).min(data.len())))
        .collect();
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..streams)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(object) = objects.get(index) else {
                            return Ok(());
                        };
                        let name = format!("raw/{rep}-{streams}/{index:06}");
                        backend
                            .put_shared(&name, object.clone())
                            .with_context(|| format!("PUT {name}"))?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| anyhow!("a PUT thread panicked"))?)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    // Read one back: the server took the bytes, not just the requests.
    let last = objects.len() - 1;
    let name = format!("raw/{rep}-{streams}/{last:06}");
    let stored = backend
        .size(&name)
        .with_context(|| format!("HEAD {name}"))?;
    if stored != objects[last].len() as u64 {
        bail!(
            "{name} holds {stored} bytes, {} were PUT",
            objects[last].len()
        );
    }
    for index in 0..objects.len() {
        let _ = backend.delete(&format!("raw/{rep}-{streams}/{index:06}"));
    }
    Ok(FlushRow {
        method: format!("put-{streams}"),
        rep,
        mib_per_s: plan.bytes as f64 / f64::from(1 << 20) / seconds,
        seconds,
        drain_seconds: 0.0,
        objects: objects.len() as u64,
        object_bytes: plan.bytes,
        manifests: 0,
        upload_busy_seconds: 0.0,
        uploads_at_once: 0,
    })
}

fn print(outcome: &FlushOutcome, plan: &Plan) {
    println!(
        "\n{} x {} cpus, kernel {}; {}; {} MiB per measurement, packs / objects of {} MiB, \
         median of {} after {} untimed",
        outcome.host.cpu_model,
        outcome.host.cpus,
        outcome.host.kernel,
        outcome.server,
        outcome.mib,
        outcome.pack_bytes >> 20,
        outcome.reps,
        outcome.warm_up_reps
    );
    println!(
        "{:<9} {:>8} {:>13} {:>8} {:>8} {:>9} {:>9} {:>8} {:>7}",
        "method",
        "MiB/s",
        "min..max",
        "seconds",
        "drain s",
        "objects",
        "manifests",
        "busy s",
        "at once"
    );
    let methods = plan
        .upload_streams
        .iter()
        .map(|&u| Method::Volume(u).name())
        .chain(plan.streams.iter().map(|&s| Method::Put(s).name()));
    for method in methods {
        let rows: Vec<&FlushRow> = outcome.runs.iter().filter(|r| r.method == method).collect();
        if rows.is_empty() {
            continue;
        }
        let pick =
            |f: fn(&FlushRow) -> f64| median(&mut rows.iter().map(|r| f(r)).collect::<Vec<_>>());
        let rates: Vec<f64> = rows.iter().map(|r| r.mib_per_s).collect();
        let low = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let high = rates.iter().copied().fold(0.0, f64::max);
        println!(
            "{:<9} {:>8.1} {:>13} {:>8.2} {:>8.2} {:>9.0} {:>9.0} {:>8.2} {:>7.0}",
            method,
            pick(|r| r.mib_per_s),
            format!("{low:.1}..{high:.1}"),
            pick(|r| r.seconds),
            pick(|r| r.drain_seconds),
            pick(|r| r.objects as f64),
            pick(|r| r.manifests as f64),
            pick(|r| r.upload_busy_seconds),
            pick(|r| r.uploads_at_once as f64)
        );
    }
    for row in &outcome.compaction {
        println!(
            "compact   rep {}: {:.1} MiB of live blocks moved in {:.2} s ({:.1} MiB/s, {} steps, \
             {:.1} MiB fetched); raw GET+PUT of the same bytes, one stream: {:.2} s ({:.1} MiB/s)",
            row.rep + 1,
            row.moved_bytes as f64 / f64::from(1 << 20),
            row.seconds,
            row.mib_per_s,
            row.steps,
            row.fetched_bytes as f64 / f64::from(1 << 20),
            row.raw_seconds,
            row.raw_mib_per_s
        );
    }
    if !outcome.compaction.is_empty() {
        println!(
            "compaction / raw GET+PUT of the same bytes: {:.2} (median)",
            outcome.compaction_fraction_median
        );
    }
    let fractions: Vec<String> = outcome
        .fractions
        .iter()
        .map(|f| format!("{f:.2}"))
        .collect();
    println!(
        "volume flush ({} packs at once) / best raw PUT: {:.2} (median; per repetition: {}; \
         goal >= 0.8)",
        outcome.upload_streams,
        outcome.fraction_median,
        fractions.join(", ")
    );
    for failure in &outcome.failures {
        println!("FAIL {failure}");
    }
    if outcome.failures.is_empty() {
        println!(
            "PASS: every volume flush and compaction completed and read back in full from the \
             bucket alone; every raw PUT stored"
        );
    } else {
        println!("FAILED: {} measurement(s) failed", outcome.failures.len());
    }
}
