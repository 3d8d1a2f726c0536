//! The version table across processes: concurrent bumps, a process killed mid-update, damaged,
//! foreign and too-small files, overflow, and slot reuse only after a new generation.
//!
//! Other processes are this test binary run again with `BERTH_VT_HELPER` set: the
//! `helper_process` test then does the helper's work instead of testing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::{fork_guard, spawn_guarded};
use berth_versions::{Changes, Error, OpenOutcome, Slot, SlotKey, TableOptions, VersionTable};

const SLOTS: u64 = 4096;

fn options(path: &Path, slots: u64) -> TableOptions {
    TableOptions {
        path: path.to_owned(),
        slots,
        share_dev: 0x801,
        share_ino: 2,
    }
}

fn key(n: u64) -> SlotKey {
    SlotKey::Inode { dev: 7, ino: n }
}

fn open_table(opts: &TableOptions) -> Result<(VersionTable, OpenOutcome), Error> {
    let _guard = fork_guard();
    VersionTable::open(opts)
}

fn helper(mode: &str, path: &Path, arg: u64) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "helper_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "BERTH_VT_HELPER",
            format!("{mode}:{}:{arg}", path.display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    spawn_guarded(&mut command).unwrap()
}

/// Does a helper's work when run as one; otherwise there is nothing to test here.
#[test]
fn helper_process() {
    let Ok(spec) = std::env::var("BERTH_VT_HELPER") else {
        return;
    };
    let mut parts = spec.splitn(3, ':');
    let mode = parts.next().unwrap().to_owned();
    let path = PathBuf::from(parts.next().unwrap());
    let arg: u64 = parts.next().unwrap().parse().unwrap();
    let (table, _) = open_table(&options(&path, SLOTS)).unwrap();
    match mode.as_str() {
        // Claim the slots of keys 0..64 (reporting them) and bump each `arg` times.
        "bump" => {
            let slots: Vec<Slot> = (0..64).map(|n| table.slot_for(&key(n)).unwrap()).collect();
            let report = slots
                .iter()
                .map(|s| s.0.to_string())
                .collect::<Vec<_>>()
                .join(",");
            std::fs::write(
                format!("{}.slots-{}", path.display(), std::process::id()),
                report,
            )
            .unwrap();
            for i in 0..arg {
                table.bump(slots[(i % 64) as usize]);
            }
        }
        // Claim and bump as fast as possible until killed.
        "forever" => {
            std::fs::write(format!("{}.ready", path.display()), b"").unwrap();
            let mut n = 1000u64;
            loop {
                if let Some(slot) = table.slot_for(&key(n % 3000)) {
                    table.bump(slot);
                }
                n += 1;
            }
        }
        // Stay attached for `arg` milliseconds.
        "hold" => {
            std::fs::write(format!("{}.ready", path.display()), b"").unwrap();
            std::thread::sleep(Duration::from_millis(arg));
        }
        other => panic!("unknown helper mode {other}"),
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn concurrent_bumps_from_several_processes_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    let (table, outcome) = open_table(&options(&path, SLOTS)).unwrap();
    assert_eq!(outcome, OpenOutcome::Created);
    let mut feed = table.feed();
    let per_process = 64 * 1600u64;
    let children: Vec<Child> = (0..4).map(|_| helper("bump", &path, per_process)).collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a helper failed");
    }
    // Every process found the same slot for each key.
    let reports: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".slots-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert_eq!(reports.len(), 4);
    assert!(
        reports.iter().all(|r| r == &reports[0]),
        "processes disagree on slots: {reports:?}"
    );
    let slots: Vec<Slot> = (0..64).map(|n| table.slot_for(&key(n)).unwrap()).collect();
    let mine = slots
        .iter()
        .map(|s| s.0.to_string())
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(mine, reports[0]);
    let total: u64 = slots.iter().map(|&s| table.version(s)).sum();
    assert_eq!(total, 4 * per_process, "an update was lost");
    for &s in &slots {
        assert_eq!(table.version(s), 4 * per_process / 64);
    }
    // 409 600 records through a 65 536-entry ring: this reader fell behind and is told so.
    assert_eq!(feed.poll(), Changes::Everything);
    assert_eq!(feed.poll(), Changes::None);
}

#[test]
fn a_process_killed_mid_update_leaves_a_consistent_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    let (table, _) = open_table(&options(&path, SLOTS)).unwrap();
    for round in 0..5 {
        let _ = std::fs::remove_file(format!("{}.ready", path.display()));
        let mut child = helper("forever", &path, 0);
        wait_for(Path::new(&format!("{}.ready", path.display())));
        std::thread::sleep(Duration::from_millis(20 + 13 * round));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // Every key the killed processes claimed resolves to one slot, which this process finds
    // again; versions only moved forwards; nothing is half-written.
    let mut seen = std::collections::HashMap::new();
    for n in 1000..4000u64 {
        if let Some(slot) = table.find_slot(&key(n % 3000)) {
            let previous = seen.insert(n % 3000, slot);
            assert!(previous.is_none() || previous == Some(slot));
            assert_eq!(table.slot_for(&key(n % 3000)), Some(slot));
        }
    }
    assert!(!seen.is_empty(), "the helpers claimed nothing");
    // A new process attaches to the table as it is.
    let (again, outcome) = open_table(&options(&path, SLOTS)).unwrap();
    assert_eq!(outcome, OpenOutcome::Attached);
    for (k, slot) in &seen {
        assert_eq!(again.find_slot(&key(*k)), Some(*slot));
    }
    // A writer killed between claiming a change record and writing it leaves a hole: readers
    // wait for it briefly, then fall back to comparing everything rather than miss a change.
    let mut feed = table.feed();
    table.debug_claim_record();
    let slot = table.slot_for(&key(1)).unwrap();
    table.bump(slot);
    assert_eq!(feed.poll(), Changes::None, "the hole is waited for first");
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(feed.poll(), Changes::Everything);
    assert_eq!(feed.poll(), Changes::Slots(vec![slot]));
}

#[test]
fn a_table_cut_short_while_being_built_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    drop(open_table(&options(&path, SLOTS)).unwrap());
    // As a builder killed after sizing the file and before its header was complete leaves it.
    let header = std::fs::read(&path).unwrap()[..4096].to_vec();
    let mut cut = header.clone();
    cut[80..88].fill(0); // the checksum, written with the rest but not yet there
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &cut, 0).unwrap();
    drop(f);
    let (table, outcome) = open_table(&options(&path, SLOTS)).unwrap();
    assert!(
        matches!(&outcome, OpenOutcome::Rebuilt(reason) if reason.contains("checksum")),
        "{outcome:?}"
    );
    assert!(table.slot_for(&key(1)).is_some());
}

#[test]
fn damaged_foreign_and_too_small_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();

    // Not a table at all: refused, and never overwritten.
    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, b"precious data that is not a version table\n").unwrap();
    let err = open_table(&options(&foreign, SLOTS)).err().unwrap();
    assert!(matches!(err, Error::Foreign { .. }), "{err}");
    assert!(
        err.to_string().contains("not a berth version table"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&foreign).unwrap(),
        b"precious data that is not a version table\n"
    );

    // A directory or a symlink at the path: refused.
    let as_dir = dir.path().join("dir");
    std::fs::create_dir(&as_dir).unwrap();
    assert!(open_table(&options(&as_dir, SLOTS)).is_err());
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&foreign, &link).unwrap();
    let err = open_table(&options(&link, SLOTS)).err().unwrap();
    assert!(matches!(err, Error::Io { .. }), "{err}");

    // Too small (a table's beginning, truncated): refused while in use, rebuilt when alone.
    let path = dir.path().join("table");
    let (holder, _) = open_table(&options(&path, SLOTS)).unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(1000).unwrap();
    let err = open_table(&options(&path, SLOTS)).err().unwrap();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("shorter than"), "{err}");
    f.set_len(size).unwrap();
    drop(holder);
    f.set_len(1000).unwrap();
    let (table, outcome) = open_table(&options(&path, SLOTS)).unwrap();
    assert!(matches!(outcome, OpenOutcome::Rebuilt(_)), "{outcome:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
    drop(table);

    // Damaged header (a flipped byte): refused while in use.
    let (holder, _) = open_table(&options(&path, SLOTS)).unwrap();
    // The rebuild replaced the file: write to the new one.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[30] ^= 1;
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes[..4096], 0).unwrap();
    let err = open_table(&options(&path, SLOTS)).err().unwrap();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    drop(holder);
    let (_, outcome) = open_table(&options(&path, SLOTS)).unwrap();
    assert!(matches!(outcome, OpenOutcome::Rebuilt(_)));

    // Another directory's table: refused while that directory is served.
    let (holder, _) = open_table(&options(&path, SLOTS)).unwrap();
    let mut other = options(&path, SLOTS);
    other.share_ino = 99;
    let err = open_table(&other).err().unwrap();
    assert!(matches!(err, Error::OtherDirectory { ino: 2, .. }), "{err}");
    drop(holder);
    let (t, outcome) = open_table(&other).unwrap();
    assert!(matches!(outcome, OpenOutcome::Rebuilt(_)));
    assert_eq!(t.share(), (0x801, 99));
    drop(t);

    // Another size than asked for: kept while in use.
    let (holder, _) = open_table(&other).unwrap();
    let (t, outcome) = open_table(&options_with(&other, 8192)).unwrap();
    assert_eq!(outcome, OpenOutcome::KeptSize(SLOTS));
    assert_eq!(t.slots(), SLOTS);
    drop((t, holder));

    // Out-of-range sizes are refused before anything is touched.
    assert!(matches!(
        open_table(&options(&dir.path().join("tiny"), 3)),
        Err(Error::SlotCount { .. })
    ));
    assert!(!dir.path().join("tiny").exists());
}

fn options_with(base: &TableOptions, slots: u64) -> TableOptions {
    TableOptions {
        slots,
        ..base.clone()
    }
}

#[test]
fn a_table_of_another_user_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP a_table_of_another_user_is_refused: needs root to chown");
        assert!(
            std::env::var_os("BERTH_TESTS_NO_SKIP").is_none(),
            "skipped under BERTH_TESTS_NO_SKIP"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    drop(open_table(&options(&path, SLOTS)).unwrap());
    std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = open_table(&options(&path, SLOTS)).err().unwrap();
    assert!(matches!(err, Error::NotOwned { owner: 65534, .. }), "{err}");
}

#[test]
fn a_full_table_overflows_to_no_slot_and_keeps_the_slots_it_gave() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    let (table, _) = open_table(&options(&path, 64)).unwrap();
    let given: Vec<Option<Slot>> = (0..200).map(|n| table.slot_for(&key(n))).collect();
    let with_slot = given.iter().filter(|s| s.is_some()).count();
    assert_eq!(with_slot, 64, "every slot is used before any key overflows");
    assert!(table.overflows() >= 136);
    // Keys that got a slot keep it; keys that did not still get none (no wrong slot).
    for (n, slot) in given.iter().enumerate() {
        assert_eq!(table.slot_for(&key(n as u64)), *slot);
        assert_eq!(table.find_slot(&key(n as u64)), *slot);
    }
}

#[test]
fn slots_are_reused_only_after_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    let (table, _) = open_table(&options(&path, 64)).unwrap();
    let first_generation = table.generation();
    let before: Vec<Option<Slot>> = (0..48).map(|n| table.slot_for(&key(n))).collect();
    let slot0 = before[0].unwrap();
    table.bump(slot0);
    let version0 = table.version(slot0);

    // Another process attaching (while this one holds the table) changes nothing.
    let (second, outcome) = open_table(&options(&path, 64)).unwrap();
    assert_eq!(outcome, OpenOutcome::Attached);
    assert_eq!(second.generation(), first_generation);
    let seen: Vec<Option<Slot>> = (0..48).map(|n| second.find_slot(&key(n))).collect();
    assert_eq!(seen, before);
    drop(second);
    drop(table);

    // Alone with a three-quarters-full index: a new generation and an empty index. Keys may
    // now land on other keys' old slots, which is why clients forget slots of older
    // generations; versions keep counting up.
    let (table, outcome) = open_table(&options(&path, 64)).unwrap();
    assert_eq!(outcome, OpenOutcome::NewGeneration);
    assert!(table.generation() > first_generation);
    assert_eq!(table.slots_in_use(), 0);
    assert_eq!(table.version(slot0), version0);
    let reused = (1000..1064)
        .filter_map(|n| table.slot_for(&key(n)))
        .any(|s| s == slot0);
    assert!(reused, "a new key got the slot of an old one");
}

#[test]
fn a_reader_sleeping_on_the_table_wakes_for_another_process_bump() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    let (table, _) = open_table(&options(&path, SLOTS)).unwrap();
    let mut feed = table.feed();
    assert_eq!(feed.poll(), Changes::None);
    let mut child = helper("bump", &path, 1);
    // The helper bumps key 0's slot once; this reader sleeps until it does.
    let deadline = Instant::now() + Duration::from_secs(30);
    let slot = loop {
        feed.wait(Duration::from_secs(5));
        if let Changes::Slots(slots) = feed.poll() {
            break slots;
        }
        assert!(Instant::now() < deadline, "the bump was never seen");
    };
    assert!(child.wait().unwrap().success());
    assert_eq!(slot, vec![table.slot_for(&key(0)).unwrap()]);
    // A new generation reaches readers as "everything".
    table.bump_generation();
    assert_eq!(feed.poll(), Changes::Everything);
}
