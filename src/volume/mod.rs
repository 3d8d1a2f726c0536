//! `berth volume`: writable volumes on object storage (`berth_volume`). The bucket
//! operations (create, snapshot, clone, gc, info, break-lease) run here and exit; serving a
//! volume goes through `berth block add volume:…`, which takes its target from
//! [`open_volume`] (an `Arc<Volume>` is a `SharedTarget`).

pub mod args;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use berth_volume::admin::{self, CreateOptions, FileSource, ImportSource, VolumeInfo};
use berth_volume::format::now_ms;
use berth_volume::store::Patience;
use berth_volume::{Durability, Location, Store, Volume, VolumeOptions};
use tracing::info;

pub use args::VolumeCommand;
use args::{
    BucketArgs, CloneArgs, CompactArgs, CreateArgs, DurabilityArg, ExerciseArgs, GcArgs, InfoArgs,
    LocationArgs, SnapshotArgs, VolumeServeArgs,
};

/// The prefix a block target spec starts with when it names a volume.
pub const VOLUME_SPEC_PREFIX: &str = "volume:";

/// Whether a block target spec (`volume:s3://BUCKET/PREFIX`) names a volume.
pub fn is_volume_spec(spec: &str) -> bool {
    spec.starts_with(VOLUME_SPEC_PREFIX)
}

/// Refuses `--readonly` and `--overlay` for a volume target: a volume is one writer's
/// disk, served writable, and a separate copy is a clone of a snapshot.
pub fn check_volume_served_writable(
    spec: &str,
    readonly: bool,
    overlay: bool,
) -> anyhow::Result<()> {
    if readonly || overlay {
        anyhow::bail!(
            "{spec} is a volume: it is served writable, without --readonly or --overlay (clone a snapshot for a separate copy)"
        );
    }
    Ok(())
}

/// How a served volume behaves: the settings `berth block add` stores with the device.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeServeSettings {
    pub volume_dir: std::path::PathBuf,
    pub durability: Durability,
    pub upload_interval: Duration,
    pub upload_streams: usize,
    pub upload_memory: u64,
    pub max_dirty_bytes: u64,
    pub upload_rate: Option<u64>,
    pub cache_bytes: Option<u64>,
    /// None: no compaction.
    pub compact_below: Option<f64>,
    pub compact_after_bytes: u64,
}

impl From<&VolumeServeArgs> for VolumeServeSettings {
    fn from(args: &VolumeServeArgs) -> Self {
        Self {
            volume_dir: args.volume_dir.clone(),
            durability: match args.durability {
                DurabilityArg::Local => Durability::Local,
                DurabilityArg::Object => Durability::Object,
            },
            upload_interval: Duration::from_secs(args.upload_interval),
            upload_streams: usize::from(args.upload_streams),
            upload_memory: args.upload_memory,
            max_dirty_bytes: args.max_dirty,
            upload_rate: args.upload_rate,
            cache_bytes: args.volume_cache_size,
            compact_below: (args.compact_below > 0.0).then_some(args.compact_below),
            compact_after_bytes: args.compact_after,
        }
    }
}

/// Opens the volume a `volume:LOCATION` spec names, for writing, as a block target that
/// any transport (ublk, vhost-user-blk) serves: READ, WRITE, FLUSH (durable as
/// `settings.durability` says), DISCARD and WRITE_ZEROES map onto the volume. Takes the
/// volume's lease; recovers its local state (replays the write-ahead log) first.
pub fn open_volume(spec: &str, settings: &VolumeServeSettings) -> anyhow::Result<Arc<Volume>> {
    let location = Location::parse(spec)?;
    let options = VolumeOptions {
        cache_dir: settings.volume_dir.clone(),
        durability: settings.durability,
        upload_interval: settings.upload_interval,
        upload_streams: settings.upload_streams,
        upload_memory: settings.upload_memory,
        max_dirty_bytes: settings.max_dirty_bytes,
        upload_rate: settings.upload_rate,
        cache_bytes: settings.cache_bytes,
        compact_below: settings.compact_below,
        compact_after_dead_bytes: settings.compact_after_bytes,
        ..VolumeOptions::default()
    };
    let (volume, report) = Volume::open(&location, options)
        .with_context(|| format!("cannot open the volume {location}"))?;
    info!(
        volume = %location,
        manifest_version = report.manifest_version,
        replayed = report.replayed,
        reapplied = report.reapplied,
        reset_local = report.reset_local,
        lost_tail = report.lost_tail,
        durability = settings.durability.name(),
        "Opened the volume."
    );
    if let Some(path) = &report.quarantined {
        tracing::warn!(
            "Local state of another writer was set aside in {}.",
            path.display()
        );
    }
    Ok(Arc::new(volume))
}

/// Parses the location and checks that its bucket answers within `--timeout`; returns
/// whether a volume is there. Commands then run with the volume engine's own patience.
fn reach(location: &str, bucket: &BucketArgs) -> anyhow::Result<(Location, bool)> {
    let location = Location::parse(location)?;
    let store = Store::open(&location)?;
    // A listing first: a read in a missing bucket looks like a missing object. Of a
    // folder that is empty but while a snapshot is being taken, so it costs little.
    let probe = |patience| store.list("snapshot-intents", patience);
    let hint = if location.root.starts_with("s3://") {
        " (its endpoint and credentials come from the AWS_* environment variables)"
    } else {
        ""
    };
    if let Err(err) = probe(Patience::For(Duration::ZERO)) {
        // S3 answers a missing bucket with 404 NoSuchBucket, which the backend cannot
        // tell from a passing failure: retrying it would only delay the answer.
        if format!("{:#}", anyhow::Error::from(err)).contains("NoSuchBucket") {
            bail!("the bucket of {location} does not exist (create it first){hint}");
        }
        probe(Patience::For(Duration::from_secs(bucket.timeout)))
            .with_context(|| format!("cannot reach the bucket of {location}{hint}"))?;
    }
    let config = store.key("volume.json");
    let found = store
        .get(&config, Patience::For(Duration::from_secs(bucket.timeout)))
        .with_context(|| format!("cannot reach the bucket of {location}"))?;
    Ok((location, found.is_some()))
}

/// As [`reach`], and fails unless a volume is there.
fn reach_volume(location: &str, bucket: &BucketArgs) -> anyhow::Result<Location> {
    let (location, found) = reach(location, bucket)?;
    if !found {
        bail!(berth_volume::VolumeError::NoVolume(location.to_string()));
    }
    Ok(location)
}

fn run_create(args: CreateArgs) -> anyhow::Result<()> {
    let (location, found) = reach(&args.location, &args.bucket)?;
    if found {
        bail!(berth_volume::VolumeError::VolumeExists(
            location.to_string()
        ));
    }
    let options = CreateOptions {
        size: args.size,
        block_size: args.block_size,
        ..CreateOptions::default()
    };
    let mut source = match &args.from {
        Some(path) => Some(
            FileSource::open(path)
                .with_context(|| format!("cannot read the image {}", path.display()))?,
        ),
        None => None,
    };
    let config = admin::create(
        &location,
        &options,
        source.as_mut().map(|s| s as &mut dyn ImportSource),
    )
    .with_context(|| format!("cannot create the volume {location}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&config)?);
    } else {
        println!(
            "Created volume {location}: {} bytes, block size {}, id {}{}.",
            config.size,
            config.block_size,
            config.id,
            args.from
                .as_ref()
                .map(|p| format!(", from {}", p.display()))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn run_snapshot(args: SnapshotArgs) -> anyhow::Result<()> {
    let location = reach_volume(&args.location, &args.bucket)?;
    if args.delete {
        admin::delete_snapshot(&location, &args.name)
            .with_context(|| format!("cannot delete snapshot `{}` of {location}", args.name))?;
        println!("Deleted snapshot `{}` of {location}.", args.name);
        return Ok(());
    }
    let version = admin::snapshot(&location, &args.name)
        .with_context(|| format!("cannot snapshot {location}"))?;
    println!(
        "Snapshot `{}` of {location} is manifest version {version}.",
        args.name
    );
    Ok(())
}

fn run_clone(args: CloneArgs) -> anyhow::Result<()> {
    let source = reach_volume(&args.source, &args.bucket)?;
    let target = Location::parse(&args.target)?;
    let config = admin::clone_volume(&source, &args.snapshot, &target).with_context(|| {
        format!(
            "cannot clone snapshot `{}` of {source} to {target}",
            args.snapshot
        )
    })?;
    println!(
        "Cloned snapshot `{}` of {source} to {target} (id {}); it shares the source's packs.",
        args.snapshot, config.id
    );
    Ok(())
}

fn run_gc(args: GcArgs) -> anyhow::Result<()> {
    let location = reach_volume(&args.location, &args.bucket)?;
    let report = admin::gc(&location, Duration::from_secs(args.grace), args.dry_run)
        .with_context(|| format!("cannot collect the garbage of {location}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let verb = if report.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    println!(
        "{location}: {verb} {} packs ({} bytes) and {} manifest versions; {} packs live, {} kept for uploads in flight, {} kept for snapshots being taken.",
        report.packs_deleted,
        report.bytes_deleted,
        report.manifests_deleted,
        report.live_packs,
        report.packs_kept_in_flight,
        report.packs_kept_for_snapshots
    );
    if report.stale_intents_removed > 0 {
        println!(
            "{location}: {} the intents of {} snapshot commands that died (older than {} s).",
            if report.dry_run {
                "would remove"
            } else {
                "removed"
            },
            report.stale_intents_removed,
            admin::STALE_INTENT_AGE.as_secs()
        );
    }
    Ok(())
}

/// How long `berth volume compact` lets compaction run.
const COMPACT_FOR_AT_MOST: Duration = Duration::from_secs(6 * 3600);

/// Takes the volume's lease (as serving it would), lets its uploader compact every sparse
/// pack, gives the lease back, then collects the packs that fell out of use.
fn run_compact(args: CompactArgs) -> anyhow::Result<()> {
    let location = reach_volume(&args.location, &args.bucket)?;
    if args.below <= 0.0 {
        bail!("--below must be above 0 (0.5: packs less than half used are rewritten)");
    }
    let before =
        admin::info(&location).with_context(|| format!("cannot read the volume {location}"))?;
    let options = VolumeOptions {
        cache_dir: args.volume_dir.clone(),
        compact_below: Some(args.below),
        // Every dead block of a sparse pack counts: nothing else is going on.
        compact_after_dead_bytes: 1,
        compact_check_interval: Duration::from_millis(50),
        ..VolumeOptions::default()
    };
    let (volume, _) = Volume::open(&location, options)
        .with_context(|| format!("cannot open the volume {location}"))?;
    let compacted = volume.wait_compacted(COMPACT_FOR_AT_MOST);
    let metrics = volume.metrics();
    let steps = metrics
        .compactions
        .load(std::sync::atomic::Ordering::Relaxed);
    let moved = metrics
        .compacted_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let packs = metrics
        .compacted_packs
        .load(std::sync::atomic::Ordering::Relaxed);
    volume
        .close()
        .with_context(|| format!("cannot close the volume {location}"))?;
    compacted.with_context(|| format!("cannot compact the volume {location}"))?;
    let gc = admin::gc(&location, Duration::from_secs(3600), false)
        .with_context(|| format!("cannot collect the garbage of {location}"))?;
    let after =
        admin::info(&location).with_context(|| format!("cannot read the volume {location}"))?;
    if args.json {
        let report = serde_json::json!({
            "steps": steps,
            "moved_bytes": moved,
            "packs_compacted": packs,
            "gc": gc,
            "dead_bytes_before": before.dead_bytes_in_use,
            "dead_bytes_after": after.dead_bytes_in_use,
            "pack_bytes_before": before.pack_bytes_stored,
            "pack_bytes_after": after.pack_bytes_stored,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{location}: {steps} compaction steps moved {moved} bytes out of {packs} sparse packs; \
         garbage collection deleted {} packs ({} bytes). Blocks no longer used in the packs in \
         use: {} bytes before, {} after; pack objects: {} bytes before, {} after.",
        gc.packs_deleted,
        gc.bytes_deleted,
        before.dead_bytes_in_use,
        after.dead_bytes_in_use,
        before.pack_bytes_stored,
        after.pack_bytes_stored
    );
    Ok(())
}

/// `info` as text.
fn render_info(info: &VolumeInfo) -> String {
    let mut out = String::new();
    let config = &info.config;
    let mut line = |key: &str, value: String| out.push_str(&format!("{key:<10} {value}\n"));
    line("volume", info.location.clone());
    line("id", config.id.clone());
    line(
        "size",
        format!(
            "{} bytes, block size {}, chunk size {}, compression {:?}",
            config.size, config.block_size, config.chunk_size, config.compression
        ),
    );
    if let Some(parent) = &config.parent {
        line(
            "parent",
            format!("{} (snapshot `{}`)", parent.prefix, parent.snapshot),
        );
    }
    line(
        "manifest",
        format!(
            "version {} ({} versions kept), last written by {}",
            info.manifest_version, info.manifest_versions_kept, info.last_written_by
        ),
    );
    line(
        "data",
        format!(
            "{} bytes mapped in {} packs ({} bytes of their blocks no longer used); {} pack objects of this volume ({} bytes)",
            info.mapped_bytes,
            info.packs_in_use,
            info.dead_bytes_in_use,
            info.pack_objects,
            info.pack_bytes_stored
        ),
    );
    if info.snapshots.is_empty() {
        line("snapshots", "none".into());
    }
    for snapshot in &info.snapshots {
        line(
            "snapshot",
            format!(
                "{} (manifest version {}, {} bytes mapped)",
                snapshot.name, snapshot.version, snapshot.mapped_bytes
            ),
        );
    }
    for clone in &info.clones {
        line(
            "clone",
            format!("{} (from snapshot `{}`)", clone.prefix, clone.snapshot),
        );
    }
    let lease = match &info.lease {
        Some(lease) if !lease.is_free() => {
            let left = (lease.expires_ms() - now_ms()) / 1000;
            if info.lease_expired {
                format!(
                    "expired: held by {}, not renewed for {} s",
                    lease.holder(),
                    -left
                )
            } else {
                format!("held by {}, expires in {left} s", lease.holder())
            }
        }
        Some(lease) if !lease.note.is_empty() => format!("free ({})", lease.note),
        _ => "free".into(),
    };
    line("lease", lease);
    out
}

fn run_info(args: InfoArgs) -> anyhow::Result<()> {
    let location = reach_volume(&args.location, &args.bucket)?;
    let info = admin::info(&location).with_context(|| format!("cannot read {location}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", render_info(&info));
    }
    Ok(())
}

fn run_break_lease(args: LocationArgs) -> anyhow::Result<()> {
    let location = reach_volume(&args.location, &args.bucket)?;
    match admin::break_lease(&location)
        .with_context(|| format!("cannot break the lease of {location}"))?
    {
        Some(lease) if !lease.is_free() => println!(
            "Broke the lease of {location} held by {}; that writer is fenced at its next upload.",
            lease.holder()
        ),
        _ => println!("The lease of {location} was free."),
    }
    Ok(())
}

/// Block `block`'s content at `generation` in the `exercise` stream: a header naming both
/// (so a reader can tell which write it sees) and a body derived from them.
pub fn exercise_block(block: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(len);
    data.extend_from_slice(b"BERTHEX1");
    data.extend_from_slice(&block.to_le_bytes());
    data.extend_from_slice(&generation.to_le_bytes());
    // splitmix64: cheap and fully determined by (block, generation).
    let mut state = block.rotate_left(32) ^ generation;
    while data.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        data.extend_from_slice(&z.to_le_bytes());
    }
    data.truncate(len);
    data
}

/// The block write `index` of the `exercise` stream goes to (it revisits blocks, so that
/// overwrites are exercised too).
pub fn exercise_block_of(index: u64, blocks: u64) -> u64 {
    index.wrapping_mul(0x9e37_79b1) % blocks.max(1)
}

fn run_exercise(args: ExerciseArgs) -> anyhow::Result<()> {
    let spec = format!("{VOLUME_SPEC_PREFIX}{}", args.location);
    reach_volume(&args.location, &args.bucket)?;
    let volume = open_volume(&spec, &VolumeServeSettings::from(&args.serve))?;
    let block_size = u64::from(volume.config().block_size);
    if args.blocks == 0 || args.blocks * block_size > volume.config().size {
        bail!(
            "--blocks must be from 1 to {} for this volume",
            volume.config().size / block_size
        );
    }
    let target: &dyn berth_blockdev::BlockTarget = &*volume;
    let mut stdout = std::io::stdout();
    for index in 0..args.writes {
        let block = exercise_block_of(index, args.blocks);
        let data = exercise_block(block, index + 1, block_size as usize);
        berth_blockdev::target::write_at(target, block * block_size, &data, false)
            .with_context(|| format!("write {index} (block {block})"))?;
        if (index + 1) % args.flush_every == 0 || index + 1 == args.writes {
            berth_blockdev::target::flush(target).with_context(|| "FLUSH")?;
            writeln!(stdout, "acked {}", index + 1)?;
            stdout.flush()?;
        }
        if args.pause_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.pause_ms));
        }
    }
    volume.close()?;
    writeln!(stdout, "done")?;
    Ok(())
}

/// Runs a `berth volume` subcommand.
pub fn run(command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create(args) => run_create(args),
        VolumeCommand::Snapshot(args) => run_snapshot(args),
        VolumeCommand::Clone(args) => run_clone(args),
        VolumeCommand::Gc(args) => run_gc(args),
        VolumeCommand::Compact(args) => run_compact(args),
        VolumeCommand::Info(args) => run_info(args),
        VolumeCommand::BreakLease(args) => run_break_lease(args),
        VolumeCommand::Exercise(args) => run_exercise(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exercise_blocks_name_their_block_and_generation_and_differ() {
        let a = exercise_block(7, 1, 4096);
        let b = exercise_block(7, 2, 4096);
        assert_eq!(a.len(), 4096);
        assert_eq!(&a[..8], b"BERTHEX1");
        assert_eq!(u64::from_le_bytes(a[8..16].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 2);
        assert_ne!(a[24..], b[24..], "bodies of two generations differ");
        assert_eq!(
            a,
            exercise_block(7, 1, 4096),
            "the content is deterministic"
        );
    }

    #[test]
    fn the_serving_flags_default_to_the_volume_librarys_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: VolumeServeArgs,
        }
        let parsed = Cli::parse_from(["berth"]).serve;
        let settings = VolumeServeSettings::from(&parsed);
        let library = VolumeOptions::default();
        assert_eq!(settings.upload_memory, library.upload_memory);
        assert_eq!(settings.max_dirty_bytes, library.max_dirty_bytes);
        assert_eq!(settings.upload_streams, library.upload_streams);
        let defaults = VolumeServeSettings::from(&VolumeServeArgs::default());
        assert_eq!(defaults, settings, "Default and the flags' defaults agree");
        assert_eq!(settings.upload_rate, library.upload_rate);
        assert_eq!(settings.cache_bytes, library.cache_bytes);
        assert_eq!(settings.compact_below, library.compact_below);
        assert_eq!(
            settings.compact_after_bytes,
            library.compact_after_dead_bytes
        );
        let small = Cli::parse_from([
            "berth",
            "--upload-memory",
            "48M",
            "--max-dirty",
            "256M",
            "--upload-rate",
            "10M",
            "--volume-cache-size",
            "2G",
        ]);
        assert_eq!(small.serve.upload_memory, 48 << 20);
        assert_eq!(small.serve.max_dirty, 256 << 20);
        assert_eq!(small.serve.upload_rate, Some(10 << 20));
        assert_eq!(small.serve.volume_cache_size, Some(2 << 30));
        assert!(Cli::try_parse_from(["berth", "--upload-memory", "512K"]).is_err());
        let off = Cli::parse_from(["berth", "--compact-below", "0"]).serve;
        assert_eq!(VolumeServeSettings::from(&off).compact_below, None);
        let sparse = Cli::parse_from(["berth", "--compact-below", "0.25"]).serve;
        assert_eq!(VolumeServeSettings::from(&sparse).compact_below, Some(0.25));
        let eager = Cli::parse_from(["berth", "--compact-after", "1M"]).serve;
        assert_eq!(
            VolumeServeSettings::from(&eager).compact_after_bytes,
            1 << 20
        );
        assert!(Cli::try_parse_from(["berth", "--compact-below", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["berth", "--compact-below", "half"]).is_err());
    }

    #[test]
    fn the_exercise_stream_revisits_blocks_within_range() {
        let blocks: Vec<u64> = (0..64).map(|i| exercise_block_of(i, 16)).collect();
        assert!(blocks.iter().all(|&b| b < 16));
        let distinct: std::collections::HashSet<_> = blocks.iter().collect();
        assert!(distinct.len() > 8, "the stream spreads over the blocks");
        assert!(distinct.len() < 64, "and writes some of them again");
    }
}
