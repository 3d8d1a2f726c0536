//! Changes made by host processes (anything but berth itself) reach the table here: a thread
//! reads fanotify or inotify events about the shared directory and bumps the slots of the
//! inodes they name.
//!
//! - **fanotify** (needs CAP_SYS_ADMIN): one mark on the shared directory's whole filesystem
//!   (`FAN_MARK_FILESYSTEM`), events reported as file handles (`FAN_REPORT_DFID_NAME`,
//!   `FAN_REPORT_FID`, `FAN_REPORT_TARGET_FID`), so an event names the changed inode and, for
//!   entry changes, its directory, whatever path or hard link the change went through; an
//!   unlimited queue, so no event is lost. Events caused by this berth process are skipped
//!   (it bumped its own changes already).
//! - **inotify** (any user): one watch per directory, added for the whole tree at start and
//!   for each directory created later. Its limits: `fs.inotify.max_user_watches` bounds the
//!   tree; a change made through a hard link outside the share, or a link count lowered by
//!   unlinking another name of a file, is not reported; a directory's own changes between its
//!   creation and its watch are caught by bumping it once watched. berth's own changes are
//!   reported too (one extra bump each).
//!
//! A queue overflow (inotify) or an unreadable event starts a new table generation: every
//! client then treats everything as changed, never as current.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Error;
use crate::key::SlotKey;
use crate::table::VersionTable;

/// Which mechanism watches the shared directory for host changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WatchMode {
    /// fanotify when permitted, inotify otherwise.
    #[default]
    Auto,
    Fanotify,
    Inotify,
    /// Nothing: only berth processes change the directory.
    Off,
}

impl std::str::FromStr for WatchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(WatchMode::Auto),
            "fanotify" => Ok(WatchMode::Fanotify),
            "inotify" => Ok(WatchMode::Inotify),
            "off" | "none" => Ok(WatchMode::Off),
            other => Err(format!(
                "unknown host watch mode '{other}'; expected auto, fanotify, inotify or off"
            )),
        }
    }
}

const FAN_CLOEXEC: u32 = 0x1;
const FAN_UNLIMITED_QUEUE: u32 = 0x10;
const FAN_REPORT_FID: u32 = 0x200;
const FAN_REPORT_DIR_FID: u32 = 0x400;
const FAN_REPORT_NAME: u32 = 0x800;
const FAN_REPORT_TARGET_FID: u32 = 0x1000;
const FAN_MARK_ADD: u32 = 0x1;
const FAN_MARK_FILESYSTEM: u32 = 0x100;
const FAN_MODIFY: u64 = 0x2;
const FAN_ATTRIB: u64 = 0x4;
const FAN_MOVED_FROM: u64 = 0x40;
const FAN_MOVED_TO: u64 = 0x80;
const FAN_CREATE: u64 = 0x100;
const FAN_DELETE: u64 = 0x200;
const FAN_DELETE_SELF: u64 = 0x400;
const FAN_MOVE_SELF: u64 = 0x800;
const FAN_Q_OVERFLOW: u64 = 0x4000;
const FAN_ONDIR: u64 = 0x4000_0000;
const ENTRY_EVENTS: u64 = FAN_MOVED_FROM | FAN_MOVED_TO | FAN_CREATE | FAN_DELETE;
const INFO_FID: u8 = 1;
const INFO_DFID_NAME: u8 = 2;
const INFO_DFID: u8 = 3;
const INFO_OLD_DFID_NAME: u8 = 10;
const INFO_NEW_DFID_NAME: u8 = 12;
const FANOTIFY_METADATA_VERSION: u8 = 3;

/// A host watcher, set up but not yet reading.
pub struct HostWatcher {
    kind: Kind,
    table: Arc<VersionTable>,
    /// Devices whose changes are seen; an inode elsewhere (a mount below the share) must not
    /// be cached for long.
    devices: Vec<u64>,
}

enum Kind {
    Fanotify(OwnedFd),
    Inotify(Inotify),
    Off,
}

impl HostWatcher {
    /// Sets up watching `share` (as this process sees it) with `mode`. fanotify must be set up
    /// while the process still has CAP_SYS_ADMIN; the inotify walk opens every directory.
    pub fn new(
        mode: WatchMode,
        share: &Path,
        table: Arc<VersionTable>,
    ) -> Result<HostWatcher, Error> {
        let dev = std::fs::metadata(share)
            .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
            .map_err(|source| Error::Watch {
                what: format!("cannot stat {}", share.display()),
                source,
            })?;
        let kind = match mode {
            WatchMode::Off => Kind::Off,
            WatchMode::Fanotify => Kind::Fanotify(fanotify_group(share)?),
            WatchMode::Inotify => Kind::Inotify(Inotify::new(share, dev)?),
            WatchMode::Auto => match fanotify_group(share) {
                Ok(fd) => Kind::Fanotify(fd),
                Err(e) => {
                    tracing::info!(
                        "fanotify is not available ({e}); watching host changes with inotify"
                    );
                    Kind::Inotify(Inotify::new(share, dev)?)
                }
            },
        };
        let devices = match kind {
            Kind::Off => Vec::new(),
            _ => vec![dev],
        };
        Ok(HostWatcher {
            kind,
            table,
            devices,
        })
    }

    /// `fanotify`, `inotify` or `off`.
    pub fn kind(&self) -> &'static str {
        match self.kind {
            Kind::Fanotify(_) => "fanotify",
            Kind::Inotify(_) => "inotify",
            Kind::Off => "off",
        }
    }

    /// Devices whose host changes are seen.
    pub fn devices(&self) -> &[u64] {
        &self.devices
    }

    /// Reads events and bumps slots until the process ends (or the descriptor fails). Run it
    /// on its own thread; `own_pid` is this process's pid as fanotify reports it.
    pub fn run(self) {
        let own_pid = std::process::id() as i32;
        match self.kind {
            Kind::Fanotify(fd) => run_fanotify(&fd, &self.table, own_pid),
            Kind::Inotify(mut inotify) => inotify.run(&self.table),
            Kind::Off => {}
        }
    }
}

fn fanotify_group(share: &Path) -> Result<OwnedFd, Error> {
    let flags = FAN_CLOEXEC
        | FAN_UNLIMITED_QUEUE
        | FAN_REPORT_FID
        | FAN_REPORT_DIR_FID
        | FAN_REPORT_NAME
        | FAN_REPORT_TARGET_FID;
    // SAFETY: fanotify_init with flag constants; the result is checked and owned below.
    let fd = unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_LARGEFILE) as u32) };
    if fd < 0 {
        return Err(Error::Watch {
            what: "fanotify_init with file handle reports failed".into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: just opened, owned by nothing else.
    let group = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = CString::new(share.as_os_str().as_bytes()).map_err(|_| Error::Watch {
        what: "the shared directory's path contains a NUL byte".into(),
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    let mask = FAN_MODIFY | FAN_ATTRIB | ENTRY_EVENTS | FAN_DELETE_SELF | FAN_MOVE_SELF | FAN_ONDIR;
    // SAFETY: a valid group descriptor and a NUL-terminated path; checked.
    let ret = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            FAN_MARK_ADD | FAN_MARK_FILESYSTEM,
            mask,
            libc::AT_FDCWD,
            path.as_ptr(),
        )
    };
    if ret != 0 {
        return Err(Error::Watch {
            what: format!("cannot mark the filesystem of {}", share.display()),
            source: io::Error::last_os_error(),
        });
    }
    Ok(group)
}

fn run_fanotify(group: &OwnedFd, table: &VersionTable, own_pid: i32) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: reading into a buffer of its full length; checked.
        let n = unsafe { libc::read(group.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::error!(
                "Reading fanotify events failed ({err}); host changes are no longer seen."
            );
            table.bump_generation();
            return;
        }
        let mut lost = false;
        for event in parse_fanotify(&buf[..n as usize]) {
            match event {
                Ok(ev) if ev.pid == own_pid && ev.mask & FAN_Q_OVERFLOW == 0 => {}
                Ok(ev) => {
                    if ev.mask & FAN_Q_OVERFLOW != 0 {
                        lost = true;
                    }
                    for key in ev.keys_to_bump() {
                        if let Some(slot) = table.find_slot(key) {
                            table.bump(slot);
                        }
                    }
                }
                Err(()) => lost = true,
            }
        }
        if lost {
            tracing::warn!("fanotify lost or garbled events; every client revalidates everything.");
            table.bump_generation();
        }
    }
}

/// One fanotify event, decoded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FanEvent {
    pub mask: u64,
    pub pid: i32,
    /// The object (FID, or TARGET_FID for entry events).
    pub object: Option<SlotKey>,
    /// The directory (or directories, for FAN_RENAME) whose entries the event changed, or the
    /// object's parent for other events.
    pub dirs: Vec<SlotKey>,
}

impl FanEvent {
    /// The keys whose versions the event moves: the object; for entry changes the
    /// directories too (also when the object is unknown).
    pub fn keys_to_bump(&self) -> Vec<&SlotKey> {
        let mut keys: Vec<&SlotKey> = self.object.iter().collect();
        if self.mask & ENTRY_EVENTS != 0 || self.object.is_none() {
            keys.extend(self.dirs.iter());
        }
        keys
    }
}

/// Splits a read of a fanotify group (with FID reports) into events. A malformed event yields
/// `Err(())`, and parsing stops there.
pub fn parse_fanotify(buf: &[u8]) -> Vec<Result<FanEvent, ()>> {
    let mut events = Vec::new();
    let mut pos = 0usize;
    while buf.len() - pos >= 24 {
        let rd32 =
            |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let event_len = rd32(buf, pos) as usize;
        let version = buf[pos + 4];
        let metadata_len = u16::from_ne_bytes([buf[pos + 6], buf[pos + 7]]) as usize;
        if version != FANOTIFY_METADATA_VERSION
            || event_len < 24
            || metadata_len < 24
            || metadata_len > event_len
            || pos + event_len > buf.len()
        {
            events.push(Err(()));
            return events;
        }
        let ev = &buf[pos..pos + event_len];
        let mut mask_bytes = [0u8; 8];
        mask_bytes.copy_from_slice(&ev[8..16]);
        let mut event = FanEvent {
            mask: u64::from_ne_bytes(mask_bytes),
            pid: rd32(ev, 20) as i32,
            ..Default::default()
        };
        let mut at = metadata_len;
        let mut ok = true;
        while at + 4 <= ev.len() {
            let info_type = ev[at];
            let len = u16::from_ne_bytes([ev[at + 2], ev[at + 3]]) as usize;
            if len < 4 || at + len > ev.len() {
                ok = false;
                break;
            }
            let rec = &ev[at..at + len];
            if matches!(
                info_type,
                INFO_FID | INFO_DFID | INFO_DFID_NAME | INFO_OLD_DFID_NAME | INFO_NEW_DFID_NAME
            ) {
                // header (4), fsid (8), file_handle { u32 bytes; i32 type; bytes }
                if rec.len() < 20 {
                    ok = false;
                    break;
                }
                let hbytes = rd32(rec, 12) as usize;
                let htype = rd32(rec, 16) as i32;
                if 20 + hbytes > rec.len() {
                    ok = false;
                    break;
                }
                let key = SlotKey::handle(htype, &rec[20..20 + hbytes]);
                if info_type == INFO_FID {
                    event.object = Some(key);
                } else {
                    event.dirs.push(key);
                }
            }
            at += len;
        }
        if !ok {
            events.push(Err(()));
            return events;
        }
        events.push(Ok(event));
        pos += event_len;
    }
    events
}

/// The inotify fallback: a watch per directory.
struct Inotify {
    fd: OwnedFd,
    /// Watch descriptor → (directory path, its key).
    dirs: HashMap<i32, (PathBuf, SlotKey)>,
    dev: u64,
}

const IN_MASK: u32 = libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW;

impl Inotify {
    fn new(share: &Path, dev: u64) -> Result<Inotify, Error> {
        // SAFETY: inotify_init1 with a flag constant; checked and owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Watch {
                what: "inotify_init1 failed".into(),
                source: io::Error::last_os_error(),
            });
        }
        let mut inotify = Inotify {
            // SAFETY: just opened, owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            dirs: HashMap::new(),
            dev,
        };
        inotify.watch_tree(share).map_err(|source| Error::Watch {
            what: format!(
                "cannot watch every directory under {} with inotify (raise \
                 fs.inotify.max_user_watches, or run as root for fanotify)",
                share.display()
            ),
            source,
        })?;
        tracing::info!("inotify watches {} directories.", inotify.dirs.len());
        Ok(inotify)
    }

    /// Watches `root` and every directory below it on the share's device.
    fn watch_tree(&mut self, root: &Path) -> io::Result<()> {
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            match self.watch_dir(&dir) {
                Ok(()) => {}
                // Gone or replaced meanwhile: its parent's event covers it.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    continue
                }
                Err(e) => return Err(e),
            }
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            };
            for entry in entries.flatten() {
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                let same_dev = entry
                    .metadata()
                    .map(|m| std::os::unix::fs::MetadataExt::dev(&m) == self.dev)
                    .unwrap_or(false);
                if is_dir && same_dev {
                    pending.push(entry.path());
                }
            }
        }
        Ok(())
    }

    fn watch_dir(&mut self, dir: &Path) -> io::Result<()> {
        let cpath = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid inotify descriptor and a NUL-terminated path; checked.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), cpath.as_ptr(), IN_MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        let key = SlotKey::of(cwd(), &cpath)?;
        self.dirs.insert(wd, (dir.to_path_buf(), key));
        Ok(())
    }

    fn run(&mut self, table: &VersionTable) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reading into a buffer of its full length; checked.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                tracing::error!(
                    "Reading inotify events failed ({err}); host changes are no longer seen."
                );
                table.bump_generation();
                return;
            }
            let mut pos = 0usize;
            let n = n as usize;
            while pos + 16 <= n {
                let rd = |at: usize| {
                    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
                };
                let wd = rd(pos) as i32;
                let mask = rd(pos + 4);
                let len = rd(pos + 12) as usize;
                let name_bytes = &buf[(pos + 16).min(n)..(pos + 16 + len).min(n)];
                let name_end = name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_bytes.len());
                let name = name_bytes[..name_end].to_vec();
                pos += 16 + len;
                self.handle_event(table, wd, mask, &name);
            }
        }
    }

    fn handle_event(&mut self, table: &VersionTable, wd: i32, mask: u32, name: &[u8]) {
        let bump = |key: &SlotKey| {
            if let Some(slot) = table.find_slot(key) {
                table.bump(slot);
            }
        };
        if mask & libc::IN_Q_OVERFLOW != 0 {
            tracing::warn!("inotify lost events; every client revalidates everything.");
            table.bump_generation();
            return;
        }
        if mask & libc::IN_IGNORED != 0 {
            self.dirs.remove(&wd);
            return;
        }
        let Some((dir, dir_key)) = self.dirs.get(&wd).cloned() else {
            return;
        };
        if name.is_empty() {
            bump(&dir_key);
            return;
        }
        let child = dir.join(std::ffi::OsStr::from_bytes(name));
        let entry_change = mask
            & (libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO)
            != 0;
        if let Ok(cpath) = CString::new(child.as_os_str().as_bytes()) {
            if let Ok(key) = SlotKey::of(cwd(), &cpath) {
                bump(&key);
            }
        }
        if entry_change {
            bump(&dir_key);
        }
        if mask & libc::IN_MOVED_FROM != 0 && mask & libc::IN_ISDIR != 0 {
            // Paths below a moved directory are stale: forget their watches' paths (the
            // MOVED_TO side re-adds the subtree under its new path).
            let prefix = child.clone();
            self.dirs.retain(|_, (path, _)| !path.starts_with(&prefix));
        }
        if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 && mask & libc::IN_ISDIR != 0 {
            // Watch the new directory (and what a move brought along), then bump what is in
            // it: changes made before the watch existed were not reported.
            if let Err(e) = self.watch_tree(&child) {
                tracing::error!(
                    "Cannot watch the new directory {} ({e}); every client revalidates \
                     everything.",
                    child.display()
                );
                table.bump_generation();
                return;
            }
            bump_tree(table, &child, self.dev);
        }
    }
}

/// Bumps every inode under `root` (a directory that was not watched until now).
fn bump_tree(table: &VersionTable, root: &Path, dev: u64) {
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        if let Ok(c) = CString::new(dir.as_os_str().as_bytes()) {
            if let Some(slot) = SlotKey::of(cwd(), &c)
                .ok()
                .and_then(|k| table.find_slot(&k))
            {
                table.bump(slot);
            }
        }
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
                if let Some(slot) = SlotKey::of(cwd(), &c)
                    .ok()
                    .and_then(|k| table.find_slot(&k))
                {
                    table.bump(slot);
                }
            }
            let dir_here = entry.file_type().map(|t| t.is_dir()).unwrap_or(false)
                && entry
                    .metadata()
                    .map(|m| std::os::unix::fs::MetadataExt::dev(&m) == dev)
                    .unwrap_or(false);
            if dir_here {
                pending.push(path);
            }
        }
    }
}

fn cwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a valid directory argument for the *at calls and is never closed.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fid_record(info_type: u8, htype: i32, handle: &[u8], name: &[u8]) -> Vec<u8> {
        let mut rec = vec![info_type, 0, 0, 0];
        rec.extend_from_slice(&[7u8; 8]); // fsid
        rec.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        rec.extend_from_slice(&htype.to_ne_bytes());
        rec.extend_from_slice(handle);
        rec.extend_from_slice(name);
        while rec.len() % 4 != 0 {
            rec.push(0);
        }
        let len = rec.len() as u16;
        rec[2..4].copy_from_slice(&len.to_ne_bytes());
        rec
    }

    fn event(mask: u64, pid: i32, records: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = records.concat();
        let mut ev = Vec::new();
        ev.extend_from_slice(&((24 + body.len()) as u32).to_ne_bytes());
        ev.push(FANOTIFY_METADATA_VERSION);
        ev.push(0);
        ev.extend_from_slice(&24u16.to_ne_bytes());
        ev.extend_from_slice(&mask.to_ne_bytes());
        ev.extend_from_slice(&(-1i32).to_ne_bytes());
        ev.extend_from_slice(&pid.to_ne_bytes());
        ev.extend_from_slice(&body);
        ev
    }

    #[test]
    fn an_entry_event_bumps_the_directory_and_the_child() {
        let buf = [
            event(
                FAN_CREATE,
                42,
                &[
                    fid_record(INFO_DFID_NAME, 1, &[1, 2], b"new\0"),
                    fid_record(INFO_FID, 1, &[3, 4], b""),
                ],
            ),
            event(
                FAN_ATTRIB,
                43,
                &[
                    fid_record(INFO_DFID_NAME, 1, &[1, 2], b"f\0"),
                    fid_record(INFO_FID, 1, &[5, 6], b""),
                ],
            ),
        ]
        .concat();
        let events = parse_fanotify(&buf);
        assert_eq!(events.len(), 2);
        let create = events[0].as_ref().unwrap();
        assert_eq!(create.pid, 42);
        assert_eq!(
            create.keys_to_bump(),
            vec![&SlotKey::handle(1, &[3, 4]), &SlotKey::handle(1, &[1, 2])]
        );
        // An attribute change moves the object only, not its directory.
        let attrib = events[1].as_ref().unwrap();
        assert_eq!(attrib.keys_to_bump(), vec![&SlotKey::handle(1, &[5, 6])]);
    }

    #[test]
    fn malformed_events_are_reported_not_trusted() {
        let good = event(FAN_MODIFY, 1, &[fid_record(INFO_FID, 1, &[9], b"")]);
        let mut bad_len = good.clone();
        bad_len[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(parse_fanotify(&bad_len), vec![Err(())]);
        let mut bad_handle = good.clone();
        // handle_bytes far beyond the record
        bad_handle[24 + 12..24 + 16].copy_from_slice(&500u32.to_ne_bytes());
        assert_eq!(parse_fanotify(&bad_handle), vec![Err(())]);
        let mut bad_version = good;
        bad_version[4] = 2;
        assert_eq!(parse_fanotify(&bad_version), vec![Err(())]);
        assert!(parse_fanotify(&[0u8; 10]).is_empty());
    }
}
