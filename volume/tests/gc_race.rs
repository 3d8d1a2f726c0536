//! Garbage collection racing the writer, made deterministic: a bucket wrapper stops one
//! request (GC's listing, the uploader's manifest write, the snapshot's write) at a gate
//! while the test makes the other side take its step, then lets it go. Whatever the
//! interleaving, no pack that a published manifest, an upload about to publish one, or a
//! snapshot being taken references may be deleted.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use berth_blockdev::target::write_at;
use berth_cache::{open_backend, BlobBackend, ListedObject, ObjectVersion};
use berth_testkit::{pseudo_random, soak_seconds, xorshift};
use berth_volume::admin::{self, COMMAND_PATIENCE};
use berth_volume::{Location, Store, Volume, VolumeOptions};

mod common;
use common::{create, missing, missing_from_latest, read, MIB};

/// Far shorter than the stalls below: a GC that bets on time loses.
const GRACE: Duration = Duration::from_millis(100);
const STALL: Duration = Duration::from_millis(400);

#[derive(Default)]
struct GateState {
    armed: bool,
    reached: bool,
    released: bool,
}

/// Stops the first request of kind `operation` whose object name contains `name_part`,
/// once armed, until released.
struct Gate {
    operation: &'static str,
    name_part: String,
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    fn new(operation: &'static str, name_part: &str) -> Arc<Self> {
        Arc::new(Self {
            operation,
            name_part: name_part.to_string(),
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
        })
    }

    fn arm(&self) {
        self.state.lock().unwrap().armed = true;
    }

    fn pass(&self, operation: &str, name: &str) {
        if operation != self.operation || !name.contains(&self.name_part) {
            return;
        }
        let mut state = self.state.lock().unwrap();
        if !state.armed {
            return;
        }
        state.armed = false;
        state.reached = true;
        self.changed.notify_all();
        while !state.released {
            state = self.changed.wait(state).unwrap();
        }
    }

    fn wait_reached(&self) {
        let mut state = self.state.lock().unwrap();
        while !state.reached {
            let (next, timeout) = self
                .changed
                .wait_timeout(state, Duration::from_secs(30))
                .unwrap();
            state = next;
            assert!(
                !timeout.timed_out() || state.reached,
                "nothing reached the gate on {} of `{}`",
                self.operation,
                self.name_part
            );
        }
    }

    fn release(&self) {
        self.state.lock().unwrap().released = true;
        self.changed.notify_all();
    }
}

#[derive(Debug)]
struct GatedBucket {
    inner: Arc<dyn BlobBackend>,
    gate: Arc<Gate>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gate({} {})", self.operation, self.name_part)
    }
}

impl BlobBackend for GatedBucket {
    fn read_range(&self, name: &str, range: Range<u64>) -> berth_cache::Result<Vec<u8>> {
        self.inner.read_range(name, range)
    }
    fn size(&self, name: &str) -> berth_cache::Result<u64> {
        self.inner.size(name)
    }
    fn put_file(&self, name: &str, path: &Path) -> berth_cache::Result<()> {
        self.inner.put_file(name, path)
    }
    fn put_bytes(&self, name: &str, data: &[u8]) -> berth_cache::Result<()> {
        self.inner.put_bytes(name, data)
    }
    fn describe(&self) -> String {
        format!("gated {}", self.inner.describe())
    }
    fn get_versioned(&self, name: &str) -> berth_cache::Result<Option<(Vec<u8>, ObjectVersion)>> {
        self.inner.get_versioned(name)
    }
    fn put_if_absent(&self, name: &str, data: &[u8]) -> berth_cache::Result<Option<ObjectVersion>> {
        self.gate.pass("create", name);
        self.inner.put_if_absent(name, data)
    }
    fn put_if_version(
        &self,
        name: &str,
        data: &[u8],
        expected: &ObjectVersion,
    ) -> berth_cache::Result<Option<ObjectVersion>> {
        self.inner.put_if_version(name, data, expected)
    }
    fn delete(&self, name: &str) -> berth_cache::Result<()> {
        self.inner.delete(name)
    }
    fn list(&self, prefix: &str) -> berth_cache::Result<Vec<ListedObject>> {
        self.gate.pass("list", prefix);
        self.inner.list(prefix)
    }
}

fn gated_store(location: &Location, gate: &Arc<Gate>) -> Arc<Store> {
    let bucket = GatedBucket {
        inner: open_backend(&location.root).unwrap(),
        gate: gate.clone(),
    };
    Store::with_backend(location, Arc::new(bucket))
}

/// Uploads only when asked (`sync_to_bucket`, close), no background GC.
fn options(cache_dir: &Path) -> VolumeOptions {
    VolumeOptions {
        cache_dir: cache_dir.to_path_buf(),
        upload_interval: Duration::from_secs(3600),
        gc_interval: None,
        gc_after_released_bytes: None,
        gc_grace: GRACE,
        open_timeout: Duration::from_secs(10),
        fetch_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(30),
        flush_timeout: Duration::from_secs(10),
        ..VolumeOptions::default()
    }
}

/// GC reads the latest manifest (its live set), then stalls; meanwhile the uploader puts
/// a new pack and publishes the next manifest version using it. GC goes on to list the
/// packs: the new one is in no manifest GC read, and its age is past the grace.
#[test]
fn gc_keeps_the_pack_of_a_manifest_published_during_its_pass() {
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"));
    let first = pseudo_random(11, MIB as usize);
    let second = pseudo_random(12, MIB as usize);
    let (volume, _) = Volume::open(&location, options(&dir.path().join("host1"))).unwrap();
    write_at(&volume, 0, &first, false).unwrap();
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    write_at(&volume, 4 * MIB, &second, false).unwrap();

    // GC's pass stops right after it read the manifests, before it looks at anything else.
    let gate = Gate::new("list", "/snapshots");
    gate.arm();
    let gc_store = gated_store(&location, &gate);
    let config = gc_store.load_config(COMMAND_PATIENCE).unwrap();
    let gc = std::thread::spawn(move || {
        admin::collect_garbage(&gc_store, &config, GRACE, false).unwrap()
    });
    gate.wait_reached();
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    std::thread::sleep(STALL);
    gate.release();
    let report = gc.join().unwrap();

    let lost = missing_from_latest(&location);
    assert!(
        lost.is_empty(),
        "GC deleted {lost:?}, used by the manifest published during its pass ({report:?})"
    );
    volume.close().unwrap();
    let (volume, _) = Volume::open(&location, options(&dir.path().join("host2"))).unwrap();
    assert!(read(&volume, 0, first.len()) == first);
    assert!(read(&volume, 4 * MIB, second.len()) == second);
}

/// The uploader has put its pack and stalls before the manifest that makes it live
/// (a slow or failing manifest write); a whole GC pass runs meanwhile, then the manifest
/// goes in.
#[test]
fn gc_keeps_the_pack_of_an_upload_whose_manifest_is_not_written_yet() {
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"));
    let data = pseudo_random(21, MIB as usize);
    let gate = Gate::new("create", "/manifests/");
    let (volume, _) = Volume::open_with_store(
        gated_store(&location, &gate),
        options(&dir.path().join("host1")),
    )
    .unwrap();
    let volume = Arc::new(volume);
    write_at(&*volume, 0, &data, false).unwrap();
    gate.arm();
    let syncing = {
        let volume = volume.clone();
        std::thread::spawn(move || volume.sync_to_bucket(Duration::from_secs(30)))
    };
    gate.wait_reached();
    std::thread::sleep(STALL);
    let report = admin::gc(&location, GRACE, false).unwrap();
    gate.release();
    syncing.join().unwrap().unwrap();

    let lost = missing_from_latest(&location);
    assert!(
        lost.is_empty(),
        "GC deleted {lost:?}, the pack of an upload in flight ({report:?})"
    );
    volume.close().unwrap();
    let (volume, _) = Volume::open(&location, options(&dir.path().join("host2"))).unwrap();
    assert!(read(&volume, 0, data.len()) == data);
}

/// `berth volume snapshot` has read the latest manifest and stalls before it writes the
/// snapshot; meanwhile the volume overwrites everything that manifest's pack held, and
/// a whole GC pass runs. Then the snapshot goes in, naming that pack.
#[test]
fn gc_keeps_the_packs_of_a_snapshot_being_taken() {
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"));
    let old = pseudo_random(31, MIB as usize);
    let new = pseudo_random(32, MIB as usize);
    let (volume, _) = Volume::open(&location, options(&dir.path().join("host1"))).unwrap();
    write_at(&volume, 0, &old, false).unwrap();
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();

    let gate = Gate::new("create", "/snapshots/");
    gate.arm();
    let snapshot_store = gated_store(&location, &gate);
    let snapshotting =
        std::thread::spawn(move || admin::snapshot_in(&snapshot_store, "racing").unwrap());
    gate.wait_reached();
    write_at(&volume, 0, &new, false).unwrap();
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    std::thread::sleep(STALL);
    let report = admin::gc(&location, GRACE, false).unwrap();
    gate.release();
    snapshotting.join().unwrap();

    let store = Store::open(&location).unwrap();
    let config = store.load_config(COMMAND_PATIENCE).unwrap();
    let snapshot = store
        .load_snapshot(&config, "racing", COMMAND_PATIENCE)
        .unwrap();
    let lost = missing(&store, snapshot.packs.iter().map(|p| p.key.clone()));
    assert!(
        lost.is_empty(),
        "GC deleted {lost:?}, used by the snapshot being taken ({report:?})"
    );
    volume.close().unwrap();
    let clone = location.sibling("clone");
    admin::clone_volume(&location, "racing", &clone).unwrap();
    let (volume, _) = Volume::open(&clone, options(&dir.path().join("host2"))).unwrap();
    assert!(read(&volume, 0, old.len()) == old);
}

/// Files under `dir` whose path contains `part`.
fn files_containing(dir: &Path, part: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.to_string_lossy().contains(part) {
                found.push(path);
            }
        }
    }
    found
}

/// Makes the bucket's snapshot intents look older than the stale age.
fn age_intents(bucket: &Path) -> usize {
    let old = std::time::SystemTime::now() - admin::STALE_INTENT_AGE - Duration::from_secs(60);
    let intents = files_containing(bucket, "snapshot-intents/");
    for path in &intents {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    intents.len()
}

#[test]
fn a_stale_snapshot_intent_is_removed_and_no_longer_holds_gc_back() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    let location = create(&bucket);
    let (volume, _) = Volume::open(&location, options(&dir.path().join("host1"))).unwrap();
    write_at(&volume, 0, &pseudo_random(41, MIB as usize), false).unwrap();
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    let new = pseudo_random(42, MIB as usize);
    write_at(&volume, 0, &new, false).unwrap();
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();

    // What a snapshot command killed between its intent and its snapshot leaves.
    let store = Store::open(&location).unwrap();
    let backend = open_backend(&location.root).unwrap();
    backend
        .put_bytes(&store.key("snapshot-intents/0123abcd"), b"killed")
        .unwrap();
    let fresh = admin::gc(&location, GRACE, false).unwrap();
    assert_eq!(
        (
            fresh.snapshots_in_progress,
            fresh.packs_deleted,
            fresh.stale_intents_removed
        ),
        (1, 0, 0),
        "a recent intent holds deletion back: {fresh:?}"
    );
    assert!(fresh.packs_kept_for_snapshots >= 1, "{fresh:?}");

    assert_eq!(age_intents(&bucket), 1);
    let dry = admin::gc(&location, GRACE, true).unwrap();
    assert_eq!(dry.stale_intents_removed, 1, "{dry:?}");
    assert_eq!(files_containing(&bucket, "snapshot-intents/").len(), 1);
    let stale = admin::gc(&location, GRACE, false).unwrap();
    assert_eq!(
        (stale.snapshots_in_progress, stale.stale_intents_removed),
        (0, 1),
        "{stale:?}"
    );
    assert!(stale.packs_deleted >= 1, "{stale:?}");
    assert!(files_containing(&bucket, "snapshot-intents/").is_empty());
    assert!(missing_from_latest(&location).is_empty());
    assert!(read(&volume, 0, new.len()) == new);
    volume.close().unwrap();
}

#[test]
fn a_snapshot_stopped_past_the_stale_age_is_refused_rather_than_kept_without_its_packs() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    let location = create(&bucket);
    let (volume, _) = Volume::open(&location, options(&dir.path().join("host1"))).unwrap();
    write_at(&volume, 0, &pseudo_random(51, MIB as usize), false).unwrap();
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();

    // The snapshot reads the version above and stops before writing its object ...
    let gate = Gate::new("create", "/snapshots/");
    gate.arm();
    let snapshot_store = gated_store(&location, &gate);
    let snapshotting = std::thread::spawn(move || admin::snapshot_in(&snapshot_store, "stopped"));
    gate.wait_reached();
    // ... for longer than the stale age: a newer version drops the old pack, and GC takes
    // the intent for a dead command's and deletes that pack.
    write_at(&volume, 0, &pseudo_random(52, MIB as usize), false).unwrap();
    volume.sync_to_bucket(Duration::from_secs(30)).unwrap();
    assert_eq!(age_intents(&bucket), 1);
    let report = admin::gc(&location, GRACE, false).unwrap();
    assert_eq!(report.stale_intents_removed, 1, "{report:?}");
    assert!(report.packs_deleted >= 1, "{report:?}");
    gate.release();

    let outcome = snapshotting.join().unwrap();
    match outcome {
        Err(err) => assert!(
            err.to_string().contains("was not kept") && err.to_string().contains("again"),
            "{err}"
        ),
        Ok(version) => panic!("a snapshot of version {version} kept without its packs"),
    }
    let store = Store::open(&location).unwrap();
    let config = store.load_config(COMMAND_PATIENCE).unwrap();
    assert!(
        store
            .load_snapshot(&config, "stopped", COMMAND_PATIENCE)
            .is_err(),
        "the snapshot object is removed"
    );
    // A new snapshot now works.
    admin::snapshot(&location, "stopped").unwrap();
    volume.close().unwrap();
}

/// Bounded soak of the same races left to chance: random overwrites uploaded every few
/// milliseconds, the volume's own GC every 20 ms and compaction of every sparse pack, and
/// snapshots taken (each checked whole, then most deleted) all along from another thread.
/// Afterwards the volume reads back its model from the bucket alone, and the snapshots kept
/// have all their packs. `BERTH_VOLUME_SOAK_SECONDS` lengthens it (default 8).
#[test]
fn constant_gc_under_writes_and_snapshots_loses_nothing() {
    let seconds = soak_seconds(8);
    // Small, so that whole packs are overwritten and become garbage.
    const SPAN: u64 = 2 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"));
    let busy = |cache: &str| VolumeOptions {
        segment_bytes: 256 << 10,
        pack_bytes: 256 << 10,
        upload_interval: Duration::from_millis(5),
        full_every: 4,
        // Writers wait for the uploads: packs are superseded while the soak runs.
        max_dirty_bytes: 2 * MIB,
        gc_interval: Some(Duration::from_millis(20)),
        // Compaction all along too: every pack with a dead block is rewritten, unless a
        // snapshot holds it.
        compact_below: Some(0.99),
        compact_after_dead_bytes: 4096,
        // Packs never go by it; it only keeps superseded manifest versions a moment for
        // a snapshot that is loading one (it would fail, cleanly, without).
        gc_grace: Duration::from_secs(2),
        ..options(&dir.path().join(cache))
    };
    let (volume, _) = Volume::open(&location, busy("host1")).unwrap();
    let volume = Arc::new(volume);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let snapshots = {
        let (location, stop) = (location.clone(), stop.clone());
        std::thread::spawn(move || {
            let store = Store::open(&location).unwrap();
            let config = store.load_config(COMMAND_PATIENCE).unwrap();
            let mut taken = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let name = format!("soak-{taken}");
                admin::snapshot(&location, &name).unwrap();
                taken += 1;
                std::thread::sleep(Duration::from_millis(300));
                // Checked, then dropped: what only it held becomes garbage for GC.
                let snapshot = store
                    .load_snapshot(&config, &name, COMMAND_PATIENCE)
                    .unwrap();
                let lost = missing(&store, snapshot.packs.iter().map(|p| p.key.clone()));
                assert!(lost.is_empty(), "GC deleted {lost:?} of snapshot {name}");
                if taken % 4 != 0 {
                    admin::delete_snapshot(&location, &name).unwrap();
                }
            }
            taken
        })
    };
    let mut model = vec![0u8; SPAN as usize];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    let mut step = 0u64;
    while std::time::Instant::now() < deadline {
        let block = xorshift(&mut state) % (SPAN / 4096);
        let blocks = 1 + xorshift(&mut state) % 16.min(SPAN / 4096 - block);
        let (offset, len) = (block * 4096, (blocks * 4096) as usize);
        let data = pseudo_random(1000 + step, len);
        write_at(&*volume, offset, &data, false).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        step += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let taken = snapshots.join().unwrap();
    volume.sync_to_bucket(Duration::from_secs(60)).unwrap();
    let metrics = volume.metrics();
    let (runs, deleted) = (
        metrics.gc_runs.load(std::sync::atomic::Ordering::Relaxed),
        metrics
            .gc_packs_deleted
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    assert!(
        runs >= 10 && deleted > 0,
        "GC ran all along ({runs} passes, {deleted} packs deleted, {step} writes)"
    );
    let compactions = metrics
        .compactions
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(compactions > 0, "compaction ran during the soak");
    eprintln!("soak: {step} writes, {runs} GC passes, {deleted} packs deleted, {compactions} compaction steps, {taken} snapshots");
    volume.close().unwrap();
    drop(volume);

    let lost = missing_from_latest(&location);
    assert!(lost.is_empty(), "GC deleted live packs {lost:?}");
    let store = Store::open(&location).unwrap();
    let config = store.load_config(COMMAND_PATIENCE).unwrap();
    assert!(taken >= 4, "snapshots were taken ({taken})");
    // Every fourth snapshot stays: still whole after the last GC passes.
    for object in store.list("snapshots", COMMAND_PATIENCE).unwrap() {
        let name = object.name.rsplit('/').next().unwrap();
        let snapshot = store
            .load_snapshot(&config, name, COMMAND_PATIENCE)
            .unwrap();
        let lost = missing(&store, snapshot.packs.iter().map(|p| p.key.clone()));
        assert!(lost.is_empty(), "GC deleted {lost:?} of snapshot {name}");
    }
    let (volume, _) = Volume::open(&location, options(&dir.path().join("host2"))).unwrap();
    let got = read(&volume, 0, SPAN as usize);
    if let Some(at) = got.iter().zip(&model).position(|(a, b)| a != b) {
        panic!(
            "after {step} writes, byte {at} reads {:#x} from the bucket, expected {:#x}",
            got[at], model[at]
        );
    }
}

/// Sustained overwrites do not wait for the period: the volume collects its garbage as
/// soon as packs of `gc_after_released_bytes` fell out of use, so the bucket holds about
/// what the volume uses, not everything written since the last periodic pass.
#[test]
fn released_packs_start_garbage_collection_before_the_period() {
    const SLOT: u64 = 64 << 10;
    const SLOTS: u64 = 16;
    const ROUNDS: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let location = create(&dir.path().join("bucket"));
    let (volume, _) = Volume::open(
        &location,
        VolumeOptions {
            segment_bytes: 256 << 10,
            pack_bytes: 256 << 10,
            upload_interval: Duration::from_millis(5),
            max_dirty_bytes: 2 * MIB,
            // The period never comes in this test.
            gc_interval: Some(Duration::from_secs(3600)),
            gc_after_released_bytes: Some(2 * MIB),
            ..options(&dir.path().join("host1"))
        },
    )
    .unwrap();
    let store = Store::open(&location).unwrap();
    let pack_bytes = || -> u64 {
        store
            .list("packs", COMMAND_PATIENCE)
            .unwrap()
            .iter()
            .map(|o| o.size)
            .sum()
    };
    // 64 MiB written over the same 1 MiB: every round leaves the last one's packs dead.
    let mut model = vec![0u8; (SLOT * SLOTS) as usize];
    let mut most_held = 0;
    for round in 0..ROUNDS {
        for slot in 0..SLOTS {
            let data = pseudo_random(round * SLOTS + slot, SLOT as usize);
            write_at(&volume, slot * SLOT, &data, false).unwrap();
            model[(slot * SLOT) as usize..((slot + 1) * SLOT) as usize].copy_from_slice(&data);
        }
        most_held = most_held.max(pack_bytes());
    }
    volume.sync_to_bucket(Duration::from_secs(60)).unwrap();
    let written = ROUNDS * SLOTS * SLOT;
    let metrics = volume.metrics();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut held = pack_bytes();
    while held > 8 * MIB && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        held = pack_bytes();
    }
    let runs = metrics.gc_runs.load(std::sync::atomic::Ordering::Relaxed);
    let deleted = metrics
        .gc_packs_deleted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        runs > 0 && deleted > 0,
        "no garbage collection before the period: {runs} passes, {deleted} packs deleted"
    );
    assert!(
        held <= 8 * MIB,
        "the bucket holds {held} bytes of packs for a volume using 1 MiB ({written} written, \
         {runs} GC passes, {deleted} packs deleted)"
    );
    assert!(
        most_held < written / 2,
        "the bucket held up to {most_held} bytes of packs while {written} were written"
    );
    assert_eq!(
        read(&volume, 0, model.len()),
        model,
        "data after the collections"
    );
    eprintln!(
        "{written} bytes written over 1 MiB: {runs} GC passes, {deleted} packs deleted, at most \
         {most_held} bytes of packs held, {held} at the end"
    );
    volume.close().unwrap();
    assert!(
        missing_from_latest(&location).is_empty(),
        "GC deleted live packs"
    );
}
