//! `berth fuse --shared-cache`: two mounts of one directory with long caching see each
//! other's changes, and a host process's, at their next access; the same checks fail with
//! long caching and no version table (`--cache always`), which proves they detect stale caches.
//!
//! Each check primes mount B's cache (stat, read, lookup), changes the directory through mount
//! A (or directly on the host) and looks again through B until it sees the change or `patience`
//! runs out (the notifier needs about a millisecond; the patience covers a loaded test machine;
//! `benches/shared-cache.sh` measures the real window).

#[path = "common/fuse_mount.rs"]
mod fuse_mount;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use fuse_mount::FuseMount;

/// How long a shared-caching mount may take to show a change (a loaded CI machine can delay
/// the watcher and notifier threads by a lot).
const PATIENCE: Duration = Duration::from_secs(10);
/// How long the control (day-long caching, no table) must keep showing the old state.
const CONTROL: Duration = Duration::from_millis(1500);

/// Looks through B until `seen` reports the change or `patience` runs out.
fn settle(
    patience: Duration,
    mut seen: impl FnMut() -> (bool, String),
) -> (bool, String, Duration) {
    let start = std::time::Instant::now();
    loop {
        let (fresh, detail) = seen();
        if fresh || start.elapsed() >= patience {
            return (fresh, detail, start.elapsed());
        }
        sleep(Duration::from_millis(10));
    }
}

/// What one check saw through mount B after the change.
struct Outcome {
    name: &'static str,
    fresh: bool,
    detail: String,
}

fn table_flags(table: &Path, watch: &str) -> Vec<String> {
    vec![
        "--shared-cache".into(),
        "--version-table".into(),
        table.display().to_string(),
        "--version-slots".into(),
        "65536".into(),
        "--watch-host".into(),
        watch.into(),
    ]
}

/// Two mounts of one directory with `flags`.
fn pair(flags: &[String]) -> Option<(FuseMount, FuseMount)> {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let a = FuseMount::start(&flags)?;
    let b = FuseMount::start_beside(&a, &flags)?;
    Some((a, b))
}

fn table_path(a: &FuseMount) -> PathBuf {
    a.shared().parent().unwrap().join("versions.table")
}

fn meta(p: &Path) -> Option<fs::Metadata> {
    fs::symlink_metadata(p).ok()
}

/// The change matrix: each entry changes something through `via_a` (a path maker for mount
/// A, or the host directory) after priming B.
fn run_matrix(
    a: &FuseMount,
    b: &FuseMount,
    through_host: bool,
    patience: Duration,
) -> Vec<Outcome> {
    let change = |rel: &str| -> PathBuf {
        if through_host {
            a.under(rel)
        } else {
            a.via(rel)
        }
    };
    let mut out = Vec::new();
    let prefix = if through_host { "host-" } else { "" };
    let p = |rel: &str| format!("{prefix}{rel}");
    let mut check = |name: &'static str, seen: &mut dyn FnMut() -> (bool, String)| {
        let (fresh, detail, took) = settle(patience, seen);
        out.push(Outcome {
            name,
            fresh,
            detail: format!("{detail} after {took:?}"),
        });
    };

    // create: B looks the name up (missing), A creates it.
    let name = p("created");
    assert!(meta(&b.via(&name)).is_none());
    fs::write(change(&name), b"new").unwrap();
    check("create", &mut || {
        let seen = meta(&b.via(&name));
        (
            seen.is_some(),
            format!("B sees {:?}", seen.map(|m| m.len())),
        )
    });

    // rename: B has both names looked up, A renames one over nothing.
    let (old, new) = (p("old"), p("renamed"));
    fs::write(a.under(&old), b"moving").unwrap();
    let ino = meta(&b.via(&old)).unwrap().ino();
    assert!(meta(&b.via(&new)).is_none());
    fs::rename(change(&old), change(&new)).unwrap();
    check("rename", &mut || {
        let (o, n) = (meta(&b.via(&old)), meta(&b.via(&new)));
        (
            o.is_none() && n.as_ref().map(|m| m.ino()) == Some(ino),
            format!("old {:?}, new {:?}", o.is_some(), n.map(|m| m.ino())),
        )
    });

    // chmod: B has the attributes cached.
    let f = p("modes");
    fs::write(a.under(&f), b"x").unwrap();
    fs::set_permissions(a.under(&f), fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(meta(&b.via(&f)).unwrap().mode() & 0o777, 0o644);
    fs::set_permissions(change(&f), fs::Permissions::from_mode(0o600)).unwrap();
    check("chmod", &mut || {
        let mode = meta(&b.via(&f)).unwrap().mode() & 0o777;
        (mode == 0o600, format!("B sees mode {mode:o}"))
    });

    // write + size change: B has read the data (page cache) and the size.
    let f = p("data");
    fs::write(a.under(&f), b"first").unwrap();
    assert_eq!(fs::read(b.via(&f)).unwrap(), b"first");
    fs::write(change(&f), b"second, longer").unwrap();
    check("write", &mut || {
        let data = fs::read(b.via(&f)).unwrap();
        let size = meta(&b.via(&f)).unwrap().len();
        (
            data == b"second, longer" && size == 14,
            format!("B reads {:?} (size {size})", String::from_utf8_lossy(&data)),
        )
    });

    // unlink: B has the name looked up.
    let f = p("doomed");
    fs::write(a.under(&f), b"x").unwrap();
    assert!(meta(&b.via(&f)).is_some());
    fs::remove_file(change(&f)).unwrap();
    check("unlink", &mut || {
        let seen = meta(&b.via(&f));
        (
            seen.is_none(),
            format!("B still sees it: {}", seen.is_some()),
        )
    });

    // mkdir, then a file in the new directory (an inotify watcher must watch it first).
    let (d, inner) = (p("newdir"), p("newdir/inner"));
    assert!(meta(&b.via(&d)).is_none());
    fs::create_dir(change(&d)).unwrap();
    fs::write(change(&inner), b"inside").unwrap();
    check("mkdir", &mut || {
        let seen = fs::read(b.via(&inner)).ok();
        (
            seen.as_deref() == Some(b"inside"),
            format!(
                "B reads {:?}",
                seen.map(|s| String::from_utf8_lossy(&s).into_owned())
            ),
        )
    });
    // ...and a change inside it after B cached it.
    fs::set_permissions(change(&inner), fs::Permissions::from_mode(0o640)).unwrap();
    check("chmod-in-new-dir", &mut || {
        let mode = meta(&b.via(&inner)).map(|m| m.mode() & 0o777);
        (mode == Some(0o640), format!("B sees mode {mode:?}"))
    });

    // hard link: B has the file (one link) and the missing second name looked up.
    let (f, l) = (p("linked"), p("second-name"));
    fs::write(a.under(&f), b"x").unwrap();
    assert_eq!(meta(&b.via(&f)).unwrap().nlink(), 1);
    assert!(meta(&b.via(&l)).is_none());
    fs::hard_link(change(&f), change(&l)).unwrap();
    check("link", &mut || {
        let nlink = meta(&b.via(&f)).unwrap().nlink();
        let second = meta(&b.via(&l));
        (
            nlink == 2 && second.is_some(),
            format!("B sees nlink {nlink}, second name {}", second.is_some()),
        )
    });
    out
}

fn report(outcomes: &[Outcome]) -> String {
    outcomes
        .iter()
        .map(|o| {
            format!(
                "{}: {} ({})",
                o.name,
                if o.fresh { "fresh" } else { "STALE" },
                o.detail
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn finish(a: FuseMount, b: FuseMount) {
    b.finish();
    a.finish();
}

#[test]
fn two_mounts_with_shared_caching_see_each_others_changes() {
    let Some(probe) = FuseMount::start(&[]) else {
        return;
    };
    let table = table_path(&probe);
    drop(probe);
    let Some((a, b)) = pair(&table_flags(&table, "fanotify")) else {
        return;
    };
    let outcomes = run_matrix(&a, &b, false, PATIENCE);
    eprintln!("through mount A: {}", report(&outcomes));
    assert!(
        outcomes.iter().all(|o| o.fresh),
        "mount B kept stale entries: {}",
        report(&outcomes)
    );
    // And B's cache is really on: unchanged things cost no request (checked by the logs'
    // request counts in the benchmarks); here, B's own changes reach A the same way.
    let f = b.via("from-b");
    fs::write(&f, b"b wrote this").unwrap();
    assert!(
        meta(&a.via("from-b")).is_none() || fs::read(a.via("from-b")).unwrap() == b"b wrote this"
    );
    finish(a, b);
}

#[test]
fn host_process_changes_reach_shared_caching_mounts_through_fanotify() {
    host_changes("fanotify");
}

#[test]
fn host_process_changes_reach_shared_caching_mounts_through_inotify() {
    host_changes("inotify");
}

fn host_changes(watch: &str) {
    let Some(probe) = FuseMount::start(&[]) else {
        return;
    };
    let table = table_path(&probe);
    drop(probe);
    let Some((a, b)) = pair(&table_flags(&table, watch)) else {
        return;
    };
    // The watcher is set up right after the mount appears.
    let wanted = format!("seen through {watch}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !b.log().contains(&wanted) && std::time::Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }
    assert!(
        b.log().contains(&wanted),
        "the daemon did not use {watch}: {}",
        b.log()
    );
    let outcomes = run_matrix(&a, &b, true, PATIENCE);
    eprintln!("through the host ({watch}): {}", report(&outcomes));
    assert!(
        outcomes.iter().all(|o| o.fresh),
        "a host change stayed unseen through {watch}: {}",
        report(&outcomes)
    );
    finish(a, b);
}

#[test]
fn without_the_table_long_caching_keeps_stale_entries() {
    // The control: the same matrix with day-long timeouts and no version table must find
    // stale caches, or the checks above prove nothing.
    let Some((a, b)) = pair(&["--cache".into(), "always".into()]) else {
        return;
    };
    let outcomes = run_matrix(&a, &b, false, CONTROL);
    // (create is visible either way: missing names are not cached without the table; a link
    // refreshes the file's attributes through the lookup of its new name.)
    for stale in ["rename", "chmod", "unlink"] {
        let o = outcomes.iter().find(|o| o.name == stale).unwrap();
        assert!(
            !o.fresh,
            "{stale} was fresh without the table: the check cannot detect staleness ({})",
            report(&outcomes)
        );
    }
    finish(a, b);
}

#[test]
fn shared_caching_refuses_writeback_and_foreign_tables() {
    let Some(probe) = FuseMount::start(&[]) else {
        return;
    };
    let foreign = probe.shared().parent().unwrap().join("not-a-table");
    fs::write(&foreign, b"someone's notes\n").unwrap();
    let shared = probe.shared().to_path_buf();
    let run = |extra: &[&str]| {
        let mnt = tempfile::tempdir().unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("fuse")
            .arg("--shared-dir")
            .arg(&shared)
            .arg("--mountpoint")
            .arg(mnt.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--shared-cache", "--writeback"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--writeback"));
    let out = run(&[
        "--shared-cache",
        "--version-table",
        foreign.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a berth version table"), "{stderr}");
    assert_eq!(fs::read(&foreign).unwrap(), b"someone's notes\n");
    probe.finish();
}
