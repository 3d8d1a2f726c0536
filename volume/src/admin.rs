//! Operations on a volume in its bucket that need no served device: create (empty or
//! imported from an image), snapshot, clone, garbage collection, info, breaking the
//! lease. Each works from any host with access to the bucket.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use berth_cache::Compression;
use serde::Serialize;

use crate::error::{Result, VolumeError};
use crate::format::{
    hex, now_ms, random_id, CloneRecord, CloneSource, LeaseRecord, Manifest, ManifestKind, PackLoc,
    VolumeConfig, VOLUME_FORMAT,
};
use crate::lease;
use crate::pack::PackBuilder;
use crate::store::{Created, Location, Patience, Store};

/// Where a snapshot being taken announces itself (see [`collect_garbage`]).
const SNAPSHOT_INTENTS: &str = "snapshot-intents";

/// How long commands wait for the bucket.
pub const COMMAND_PATIENCE: Patience = Patience::For(Duration::from_secs(60));

/// A snapshot intent older than this belongs to a snapshot command that died (its requests
/// each give up after [`COMMAND_PATIENCE`]); garbage collection removes it, since it would
/// otherwise hold back every pack deletion for ever.
pub const STALE_INTENT_AGE: Duration = Duration::from_secs(3600);

/// Geometry of a new volume.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Bytes (rounded up to the block size); `None`: the source's size.
    pub size: Option<u64>,
    pub block_size: u32,
    pub chunk_size: u32,
    pub compression: Compression,
    /// Raw bytes per pack while importing.
    pub pack_bytes: u64,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            size: None,
            block_size: 4096,
            chunk_size: 256 << 10,
            compression: Compression::Lz4,
            pack_bytes: 32 << 20,
        }
    }
}

/// Data a new volume starts with (a disk image).
pub trait ImportSource {
    /// Bytes of data.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset` (past the end: zeros).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    fn describe(&self) -> String;
}

/// A raw image file as a source.
pub struct FileSource {
    file: std::fs::File,
    len: u64,
    path: String,
}

impl FileSource {
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| VolumeError::Io {
            context: format!("opening {}", path.display()),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| VolumeError::Io {
                context: format!("reading {}", path.display()),
                source,
            })?
            .len();
        Ok(Self {
            file,
            len,
            path: path.display().to_string(),
        })
    }
}

impl ImportSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        if offset >= self.len {
            return Ok(());
        }
        let n = ((self.len - offset) as usize).min(buf.len());
        std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut buf[..n], offset)
    }
    fn describe(&self) -> String {
        self.path.clone()
    }
}

/// Creates a volume: `volume.json` (refused if one exists) and its first manifest,
/// holding the source's non-zero blocks.
pub fn create(
    location: &Location,
    options: &CreateOptions,
    source: Option<&mut dyn ImportSource>,
) -> Result<VolumeConfig> {
    create_in(&Store::open(location)?, options, source)
}

/// As [`create`], in a store the caller opened (tests reach their server this way).
pub fn create_in(
    store: &Arc<Store>,
    options: &CreateOptions,
    source: Option<&mut dyn ImportSource>,
) -> Result<VolumeConfig> {
    let store = store.clone();
    let bs = options.block_size;
    if !bs.is_power_of_two() || !(512..=4096).contains(&bs) {
        return Err(VolumeError::Invalid(format!(
            "block size {bs} is not 512, 1024, 2048 or 4096"
        )));
    }
    let source_len = source.as_ref().map_or(0, |s| s.len());
    let size = options
        .size
        .or(source.as_ref().map(|s| s.len()))
        .ok_or_else(|| VolumeError::Invalid("give --size (or --from an image)".into()))?;
    let size = size.div_ceil(u64::from(bs)) * u64::from(bs);
    if size == 0 {
        return Err(VolumeError::Invalid("the size must be more than 0".into()));
    }
    if source_len > size {
        return Err(VolumeError::Invalid(format!(
            "the source has {source_len} bytes, more than the {size} asked for"
        )));
    }
    let chunk = options.chunk_size.max(bs);
    let config = VolumeConfig {
        format: VOLUME_FORMAT,
        id: hex(&random_id()),
        size,
        block_size: bs,
        chunk_size: chunk,
        compression: options.compression,
        created_ms: now_ms(),
        parent: None,
    };
    // Checked by its own rules before anything is written.
    let encoded = serde_json::to_vec_pretty(&config).unwrap_or_default();
    let config = VolumeConfig::parse("volume.json", &encoded)?;
    if !store.list("", COMMAND_PATIENCE)?.is_empty() {
        return Err(VolumeError::VolumeExists(store.location.to_string()));
    }
    match store.create(&store.key("volume.json"), &encoded, COMMAND_PATIENCE)? {
        Created::Written => {}
        Created::Taken(_) => return Err(VolumeError::VolumeExists(store.location.to_string())),
    }
    let mut manifest = Manifest {
        kind: ManifestKind::Full,
        version: 1,
        base_version: 0,
        volume_id: config.id_bytes(),
        session: [0; 16],
        lease_generation: 0,
        wal_epoch: 0,
        wal_seq: 0,
        size,
        block_size: bs,
        next_pack_id: 1,
        written_ms: now_ms(),
        packs: Vec::new(),
        extents: Vec::new(),
    };
    if let Some(source) = source {
        import(&store, &config, options.pack_bytes, source, &mut manifest)?;
    }
    match store.create(&store.manifest_key(1), &manifest.encode(), COMMAND_PATIENCE)? {
        Created::Written => Ok(config),
        Created::Taken(_) => Err(VolumeError::VolumeExists(store.location.to_string())),
    }
}

fn import(
    store: &Store,
    config: &VolumeConfig,
    pack_bytes: u64,
    source: &mut dyn ImportSource,
    manifest: &mut Manifest,
) -> Result<()> {
    let bs = u64::from(config.block_size);
    let step = (pack_bytes.max(bs) / bs * bs).min(64 << 20);
    let mut buf = vec![0u8; step as usize];
    let mut builder = PackBuilder::new(config.block_size);
    let flush = |builder: &mut PackBuilder, manifest: &mut Manifest| -> Result<()> {
        if builder.is_empty() {
            return Ok(());
        }
        let id = manifest.next_pack_id;
        let key = store.key(&format!("packs/{id:016x}-import"));
        let finished = std::mem::replace(builder, PackBuilder::new(config.block_size)).finish(
            id,
            key.clone(),
            config.chunk_blocks(),
            config.compression,
        )?;
        store.put(&key, finished.object, COMMAND_PATIENCE)?;
        for &(lba, len, at) in &finished.extents {
            manifest.extents.push((
                lba,
                len,
                Some(PackLoc {
                    pack: id,
                    block: at,
                }),
            ));
        }
        manifest.packs.push(finished.info);
        manifest.next_pack_id = id + 1;
        Ok(())
    };
    let mut offset = 0u64;
    while offset < source.len() {
        let n = step.min(config.size - offset) as usize;
        source
            .read_at(offset, &mut buf[..n])
            .map_err(|e| VolumeError::Io {
                context: format!("reading {} at {offset}", source.describe()),
                source: e,
            })?;
        for (i, block) in buf[..n].chunks(bs as usize).enumerate() {
            if block.iter().any(|&b| b != 0) {
                let mut data = block.to_vec();
                data.resize(bs as usize, 0);
                builder.add(offset / bs + i as u64, &data);
            }
        }
        if builder.raw().len() as u64 >= pack_bytes {
            flush(&mut builder, manifest)?;
        }
        offset += n as u64;
    }
    flush(&mut builder, manifest)?;
    // Extents of one pack are in order; across packs too (the source is read in order).
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(VolumeError::Invalid(format!(
            "snapshot name `{name}`: use 1 to 64 letters, digits, `.`, `_` or `-`, not starting with `.`"
        )))
    }
}

/// The latest version and the full state there.
fn latest_state(store: &Store, config: &VolumeConfig) -> Result<(u64, Manifest)> {
    let versions = store.manifest_versions(COMMAND_PATIENCE)?;
    let latest = *versions.last().ok_or_else(|| VolumeError::Corrupt {
        object: store.key("manifests/"),
        problem: "the volume has no manifest".into(),
    })?;
    let (state, _) = store.load_state(config, latest, COMMAND_PATIENCE)?;
    let header = store.load_manifest(latest, COMMAND_PATIENCE)?;
    Ok((latest, state.to_full(&header)))
}

/// Keeps the volume's latest manifest version (what the bucket holds now) as snapshot
/// `name`; returns that version.
pub fn snapshot(location: &Location, name: &str) -> Result<u64> {
    snapshot_in(&Store::open(location)?, name)
}

/// As [`snapshot`], in a store the caller opened (tests wrap its backend).
///
/// The snapshot announces itself first with an object under `snapshot-intents/`, kept
/// until the snapshot is written: garbage collection deletes no pack meanwhile, so the
/// packs of the version read here stay even if newer versions stop using them.
pub fn snapshot_in(store: &Arc<Store>, name: &str) -> Result<u64> {
    check_name(name)?;
    let config = store.load_config(COMMAND_PATIENCE)?;
    let intent = store.key(&format!("{SNAPSHOT_INTENTS}/{}", hex(&random_id())));
    store.create(&intent, name.as_bytes(), COMMAND_PATIENCE)?;
    let taken = latest_state(store, &config).and_then(|(version, full)| {
        match store.create(&store.snapshot_key(name), &full.encode(), COMMAND_PATIENCE)? {
            Created::Written => Ok(version),
            Created::Taken(_) => Err(VolumeError::SnapshotExists(name.to_string())),
        }
    });
    // A command stopped past STALE_INTENT_AGE finds its intent removed: garbage collection
    // may then have deleted packs of the version it read, so the snapshot stands only if
    // every pack it names is still there.
    if let Ok(version) = taken {
        if store.get(&intent, COMMAND_PATIENCE)?.is_none() {
            verify_snapshot_packs(store, name, version)?;
        }
    }
    // Left behind, the intent only holds garbage collection back until it is stale.
    if let Err(err) = store.delete(&intent, COMMAND_PATIENCE) {
        tracing::warn!(object = %intent, "removing the snapshot intent: {err}");
    }
    taken
}

/// Checks that every pack snapshot `name` (of manifest `version`) names is in the bucket;
/// if one is gone, removes the snapshot and says so.
fn verify_snapshot_packs(store: &Arc<Store>, name: &str, version: u64) -> Result<()> {
    let key = store.snapshot_key(name);
    let Some((data, _)) = store.get(&key, COMMAND_PATIENCE)? else {
        return Err(VolumeError::SnapshotLost(name.to_string(), version));
    };
    let manifest = Manifest::decode(&key, &data)?;
    let present: HashSet<String> = store
        .list("packs", COMMAND_PATIENCE)?
        .into_iter()
        .map(|object| object.name)
        .collect();
    if manifest
        .packs
        .iter()
        .all(|pack| present.contains(&pack.key))
    {
        return Ok(());
    }
    store.delete(&key, COMMAND_PATIENCE)?;
    Err(VolumeError::SnapshotLost(name.to_string(), version))
}

/// The clones made from snapshot `name` whose volume still exists.
fn live_clones(store: &Arc<Store>, name: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for object in store.list("clones", COMMAND_PATIENCE)? {
        let Some((data, _)) = store.get(&object.name, COMMAND_PATIENCE)? else {
            continue;
        };
        let Ok(record) = serde_json::from_slice::<CloneRecord>(&data) else {
            continue;
        };
        if record.snapshot != name {
            continue;
        }
        let clone = store.sibling(&record.prefix);
        if clone
            .get(&clone.key("volume.json"), COMMAND_PATIENCE)?
            .is_some()
        {
            out.push(record.prefix);
        }
    }
    Ok(out)
}

/// Deletes snapshot `name` (refused while clones use it).
pub fn delete_snapshot(location: &Location, name: &str) -> Result<()> {
    check_name(name)?;
    let store = Store::open(location)?;
    let key = store.snapshot_key(name);
    if store.get(&key, COMMAND_PATIENCE)?.is_none() {
        return Err(VolumeError::NoSnapshot(name.to_string()));
    }
    let clones = live_clones(&store, name)?;
    if !clones.is_empty() {
        return Err(VolumeError::SnapshotInUse {
            snapshot: name.to_string(),
            clones: clones.join(", "),
        });
    }
    store.delete(&key, COMMAND_PATIENCE)
}

/// Makes `target` a new volume starting as snapshot `snapshot` of `source`, sharing its
/// packs (nothing is copied). Both must be in the same bucket.
pub fn clone_volume(source: &Location, snapshot: &str, target: &Location) -> Result<VolumeConfig> {
    check_name(snapshot)?;
    if source.root != target.root {
        return Err(VolumeError::Invalid(format!(
            "a clone shares its source's packs, so it must be in the same bucket ({} is not in {})",
            target, source.root
        )));
    }
    if source.prefix == target.prefix
        || target.prefix.starts_with(&format!("{}/", source.prefix))
        || source.prefix.starts_with(&format!("{}/", target.prefix))
    {
        return Err(VolumeError::Invalid(
            "the clone's prefix must be apart from its source's".into(),
        ));
    }
    let store = Store::open(source)?;
    let config = store.load_config(COMMAND_PATIENCE)?;
    let mut manifest = store.load_snapshot(&config, snapshot, COMMAND_PATIENCE)?;
    let target_store = store.sibling(&target.prefix);
    if !target_store.list("", COMMAND_PATIENCE)?.is_empty() {
        return Err(VolumeError::VolumeExists(target.to_string()));
    }
    let clone_config = VolumeConfig {
        id: hex(&random_id()),
        created_ms: now_ms(),
        parent: Some(CloneSource {
            prefix: source.prefix.clone(),
            snapshot: snapshot.to_string(),
        }),
        ..config
    };
    // Registered with the source first, so that the snapshot cannot go meanwhile.
    let record = CloneRecord {
        prefix: target.prefix.clone(),
        snapshot: snapshot.to_string(),
        created_ms: now_ms(),
    };
    let registration = store.key(&format!("clones/{}", clone_config.id));
    store.create(
        &registration,
        &serde_json::to_vec_pretty(&record).unwrap_or_default(),
        COMMAND_PATIENCE,
    )?;
    if store
        .get(&store.snapshot_key(snapshot), COMMAND_PATIENCE)?
        .is_none()
    {
        store.delete(&registration, COMMAND_PATIENCE)?;
        return Err(VolumeError::NoSnapshot(snapshot.to_string()));
    }
    let encoded = serde_json::to_vec_pretty(&clone_config).unwrap_or_default();
    match target_store.create(&target_store.key("volume.json"), &encoded, COMMAND_PATIENCE)? {
        Created::Written => {}
        Created::Taken(_) => {
            store.delete(&registration, COMMAND_PATIENCE)?;
            return Err(VolumeError::VolumeExists(target.to_string()));
        }
    }
    manifest.kind = ManifestKind::Full;
    manifest.version = 1;
    manifest.base_version = 0;
    manifest.volume_id = clone_config.id_bytes();
    manifest.session = [0; 16];
    manifest.lease_generation = 0;
    manifest.wal_epoch = 0;
    manifest.wal_seq = 0;
    manifest.written_ms = now_ms();
    target_store.create(
        &target_store.manifest_key(1),
        &manifest.encode(),
        COMMAND_PATIENCE,
    )?;
    Ok(clone_config)
}

/// What a garbage collection pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub live_packs: u64,
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
    /// Unreferenced packs numbered at or past the latest manifest's next pack id: an
    /// upload whose manifest is not written yet (or never will be) made them.
    pub packs_kept_in_flight: u64,
    /// Unreferenced packs kept because a snapshot was being taken.
    pub packs_kept_for_snapshots: u64,
    pub snapshots_in_progress: u64,
    /// Intents of snapshot commands that died, older than [`STALE_INTENT_AGE`], removed.
    pub stale_intents_removed: u64,
    pub manifests_deleted: u64,
    pub dry_run: bool,
}

/// The id a pack's object name starts with (`packs/<id in hex>-<writer>`).
fn pack_id_of(key: &str) -> Option<u64> {
    let name = key.rsplit('/').next()?;
    let (id, _) = name.split_once('-')?;
    u64::from_str_radix(id, 16).ok()
}

/// Deletes the packs of this volume that neither the current state nor any snapshot
/// uses and that no manifest can come to use, and manifest versions older than the last
/// full one (those when older than `grace`, for readers that loaded an older version).
///
/// Pack deletion bets nothing on time. A pass reads the latest manifest `L` first, and
/// keeps every pack `L` or a snapshot uses, and every pack numbered at or past `L`'s
/// next pack id: a manifest published after `L` (while this pass runs, or by an upload
/// whose pack is in the bucket but whose manifest is not) only adds packs with such ids,
/// because the writer numbers its packs from the id its latest manifest carries. A
/// snapshot being taken announces itself with an intent object first; the pass lists
/// intents after reading `L` and before listing snapshots, and deletes no pack while one
/// exists. A snapshot announced later reads a manifest at least as new as `L`, whose
/// packs are all kept by the rules above.
pub fn collect_garbage(
    store: &Arc<Store>,
    config: &VolumeConfig,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport> {
    let patience = COMMAND_PATIENCE;
    let versions = store.manifest_versions(patience)?;
    let Some(&latest) = versions.last() else {
        return Ok(GcReport::default());
    };
    let (state, full_version) = store.load_state(config, latest, patience)?;
    let first_unpublished = state.next_pack_id;
    let mut live: HashSet<String> = state.packs.values().map(|p| p.key.clone()).collect();
    // Intents before snapshots: a snapshot whose intent is gone by now is listed below.
    let stale_before = now_ms() - STALE_INTENT_AGE.as_millis() as i64;
    let mut intents = 0;
    let mut stale_intents_removed = 0;
    for intent in store.list(SNAPSHOT_INTENTS, patience)? {
        if intent.modified_ms > stale_before {
            intents += 1;
            continue;
        }
        tracing::warn!(
            object = %intent.name,
            "removing a snapshot intent older than {} s: its snapshot command is gone",
            STALE_INTENT_AGE.as_secs()
        );
        if !dry_run {
            store.delete(&intent.name, patience)?;
        }
        stale_intents_removed += 1;
    }
    for object in store.list("snapshots", patience)? {
        let Some((data, _)) = store.get(&object.name, patience)? else {
            continue;
        };
        let manifest = Manifest::decode(&object.name, &data)?;
        live.extend(manifest.packs.iter().map(|p| p.key.clone()));
    }
    let mut report = GcReport {
        live_packs: live.len() as u64,
        snapshots_in_progress: intents,
        stale_intents_removed,
        dry_run,
        ..GcReport::default()
    };
    for object in store.list("packs", patience)? {
        if live.contains(&object.name) {
            continue;
        }
        // Unparseable names are not ours to judge.
        if pack_id_of(&object.name).is_none_or(|id| id >= first_unpublished) {
            report.packs_kept_in_flight += 1;
            continue;
        }
        if intents > 0 {
            report.packs_kept_for_snapshots += 1;
            continue;
        }
        if !dry_run {
            store.delete(&object.name, patience)?;
        }
        report.packs_deleted += 1;
        report.bytes_deleted += object.size;
    }
    if intents > 0 {
        tracing::warn!(
            volume = %store.location,
            intents,
            "garbage collection kept unreferenced packs: a snapshot is being taken"
        );
    }
    let cutoff = now_ms() - grace.as_millis() as i64;
    for object in store.list("manifests", patience)? {
        let Some(version) = object
            .name
            .rsplit('/')
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        if version < full_version && object.modified_ms <= cutoff {
            if !dry_run {
                store.delete(&object.name, patience)?;
            }
            report.manifests_deleted += 1;
        }
    }
    Ok(report)
}

/// [`collect_garbage`] by location.
pub fn gc(location: &Location, grace: Duration, dry_run: bool) -> Result<GcReport> {
    let store = Store::open(location)?;
    let config = store.load_config(COMMAND_PATIENCE)?;
    collect_garbage(&store, &config, grace, dry_run)
}

/// One snapshot, as `info` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub version: u64,
    pub mapped_bytes: u64,
}

/// What `berth volume info` shows.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub location: String,
    pub config: VolumeConfig,
    pub manifest_version: u64,
    pub manifest_versions_kept: u64,
    pub last_written_by: String,
    /// Bytes of the volume mapped to pack data (the rest reads as zeros).
    pub mapped_bytes: u64,
    pub packs_in_use: u64,
    /// Bytes of blocks in the packs in use that no volume block maps any more (raw, before
    /// compression): what compaction, then garbage collection, can give back.
    pub dead_bytes_in_use: u64,
    pub pack_objects: u64,
    pub pack_bytes_stored: u64,
    pub snapshots: Vec<SnapshotInfo>,
    pub clones: Vec<CloneRecord>,
    pub lease: Option<LeaseRecord>,
    pub lease_expired: bool,
}

pub fn info(location: &Location) -> Result<VolumeInfo> {
    let store = Store::open(location)?;
    let config = store.load_config(COMMAND_PATIENCE)?;
    let versions = store.manifest_versions(COMMAND_PATIENCE)?;
    let latest = versions.last().copied().unwrap_or(0);
    let (state, _) = store.load_state(&config, latest, COMMAND_PATIENCE)?;
    let header = store.load_manifest(latest, COMMAND_PATIENCE)?;
    let packs = store.list("packs", COMMAND_PATIENCE)?;
    let mut snapshots = Vec::new();
    for object in store.list("snapshots", COMMAND_PATIENCE)? {
        if let Some((data, _)) = store.get(&object.name, COMMAND_PATIENCE)? {
            let manifest = Manifest::decode(&object.name, &data)?;
            snapshots.push(SnapshotInfo {
                name: object
                    .name
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                version: manifest.version,
                mapped_bytes: manifest.extents.iter().map(|e| e.1).sum::<u64>()
                    * u64::from(config.block_size),
            });
        }
    }
    snapshots.sort_by(|a, b| a.name.cmp(&b.name));
    let mut clones = Vec::new();
    for object in store.list("clones", COMMAND_PATIENCE)? {
        if let Some((data, _)) = store.get(&object.name, COMMAND_PATIENCE)? {
            if let Ok(record) = serde_json::from_slice::<CloneRecord>(&data) {
                clones.push(record);
            }
        }
    }
    let lease = lease::read(&store, COMMAND_PATIENCE)?;
    let lease_expired = lease
        .as_ref()
        .is_some_and(|l| !l.is_free() && l.expires_ms() < now_ms());
    Ok(VolumeInfo {
        location: location.to_string(),
        manifest_version: latest,
        manifest_versions_kept: versions.len() as u64,
        last_written_by: if header.session == [0; 16] {
            "berth volume create/clone".into()
        } else {
            format!("session {}", hex(&header.session))
        },
        mapped_bytes: state.mapped_blocks() * u64::from(config.block_size),
        packs_in_use: state.packs.len() as u64,
        dead_bytes_in_use: state.pack_blocks().saturating_sub(state.mapped_blocks())
            * u64::from(config.block_size),
        pack_objects: packs.len() as u64,
        pack_bytes_stored: packs.iter().map(|p| p.size).sum(),
        snapshots,
        clones,
        lease,
        lease_expired,
        config,
    })
}

/// Frees the lease whoever holds it; returns what it found. The holder, if it still
/// runs, is fenced at its next renewal or upload; its writes not yet in the bucket are
/// set aside on its host.
pub fn break_lease(location: &Location) -> Result<Option<LeaseRecord>> {
    let store = Store::open(location)?;
    store.load_config(COMMAND_PATIENCE)?;
    lease::break_lease(&store, COMMAND_PATIENCE)
}
