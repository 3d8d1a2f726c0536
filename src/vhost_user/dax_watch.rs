//! Watching mapped files for size changes made by host processes (the DAX reclaim worker).
//!
//! A host process that truncates a file under a live window range would make the VMM fault
//! on its next access to the pages past the new end. berth sees its own truncations as it
//! serves them; for everyone else's, each file that gets a window range is marked in a
//! fanotify group for `FAN_MODIFY` (which truncation raises, as writes do), by its descriptor,
//! and a thread re-reads the mapped files' sizes when an event comes and re-points what the
//! files no longer reach (`WindowManager::recheck_all`).
//!
//! Why fanotify with file-handle reports and inode marks: that combination works without
//! privileges (Linux 5.13 and later), so it survives the capability drop, the sandbox and a
//! user namespace; marks are added by descriptor (no path, which the sandbox may not reach)
//! and are evictable, so a file the window let go of is not pinned in the inode cache.
//! Events of berth's own process are skipped: it re-points for its own requests while
//! serving them. An overflowed queue rechecks everything.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{debug, warn};

const FAN_CLOEXEC: u32 = 0x1;
const FAN_CLASS_NOTIF: u32 = 0x0;
const FAN_REPORT_FID: u32 = 0x200;
const FAN_MARK_ADD: u32 = 0x1;
/// The mark does not keep the inode in memory (Linux 5.19).
const FAN_MARK_EVICTABLE: u32 = 0x200;
const FAN_MODIFY: u64 = 0x2;
const FAN_Q_OVERFLOW: u64 = 0x4000;
/// `struct fanotify_event_metadata`: event_len u32, vers u8, reserved u8, metadata_len u16,
/// mask u64, fd i32, pid i32.
const METADATA_LEN: usize = 24;

/// A fanotify group marking the window's files.
pub struct FileWatch {
    group: OwnedFd,
    mark_failed: AtomicBool,
}

impl FileWatch {
    /// A group for inode marks with file-handle reports (allowed without privileges).
    pub fn new() -> io::Result<Self> {
        // SAFETY: fanotify_init with flag constants; the result is checked and owned below.
        let fd = unsafe {
            libc::fanotify_init(
                FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_REPORT_FID,
                (libc::O_RDONLY | libc::O_LARGEFILE) as u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileWatch {
            // SAFETY: fd was just returned by fanotify_init and nothing else owns it.
            group: unsafe { OwnedFd::from_raw_fd(fd) },
            mark_failed: AtomicBool::new(false),
        })
    }

    /// Marks `file`'s inode for size changes (idempotent for an inode already marked).
    pub fn mark(&self, file: &File) {
        // SAFETY: fanotify_mark on our group with a null path: the object marked is the one
        // `file`'s descriptor refers to; both descriptors stay open for the call.
        let done = unsafe {
            libc::fanotify_mark(
                self.group.as_raw_fd(),
                FAN_MARK_ADD | FAN_MARK_EVICTABLE,
                FAN_MODIFY,
                file.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if done < 0 && !self.mark_failed.swap(true, Ordering::Relaxed) {
            warn!(
                "Cannot watch a DAX-mapped file for host truncation ({}); a host process that \
                 shrinks it may crash the VMM.",
                io::Error::last_os_error()
            );
        }
    }

    /// Waits for events; calls `changed` once per read that holds a change by another
    /// process (or an overflow). Returns only if reading fails.
    pub fn run(&self, mut changed: impl FnMut()) -> io::Error {
        // SAFETY: getpid has no preconditions.
        let own_pid = unsafe { libc::getpid() };
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // SAFETY: reading into a buffer this function owns, no longer than it.
            let n =
                unsafe { libc::read(self.group.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return e;
            }
            let (foreign, overflow) = scan_events(&buf[..n as usize], own_pid);
            if overflow {
                debug!("The DAX file watch overflowed; rechecking every mapped file.");
            }
            if foreign || overflow {
                changed();
            }
        }
    }
}

/// Whether a read of the group holds an event of another process than `own_pid`, and whether
/// it holds an overflow. A malformed record counts as an overflow (everything is rechecked).
fn scan_events(mut buf: &[u8], own_pid: i32) -> (bool, bool) {
    let (mut foreign, mut overflow) = (false, false);
    while buf.len() >= METADATA_LEN {
        let word = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let event_len = word(0) as usize;
        let mask = u64::from(word(8)) | (u64::from(word(12)) << 32);
        let pid = word(20) as i32;
        if event_len < METADATA_LEN || event_len > buf.len() {
            return (foreign, true);
        }
        if mask & FAN_Q_OVERFLOW != 0 {
            overflow = true;
        } else if pid != own_pid {
            foreign = true;
        }
        buf = &buf[event_len..];
    }
    (foreign, overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(mask: u64, pid: i32, extra: usize) -> Vec<u8> {
        let len = (METADATA_LEN + extra) as u32;
        let mut e = Vec::new();
        e.extend_from_slice(&len.to_ne_bytes());
        e.extend_from_slice(&[3, 0]);
        e.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        e.extend_from_slice(&mask.to_ne_bytes());
        e.extend_from_slice(&(-1i32).to_ne_bytes());
        e.extend_from_slice(&pid.to_ne_bytes());
        e.resize(len as usize, 0xaa);
        e
    }

    #[test]
    fn own_events_are_skipped_and_overflow_or_garbage_recheck() {
        let mut own = event(FAN_MODIFY, 7, 20);
        own.extend(event(FAN_MODIFY, 7, 0));
        assert_eq!(scan_events(&own, 7), (false, false));
        own.extend(event(FAN_MODIFY, 8, 12));
        assert_eq!(scan_events(&own, 7), (true, false));
        assert_eq!(scan_events(&event(FAN_Q_OVERFLOW, 7, 0), 7), (false, true));
        let mut short = event(FAN_MODIFY, 8, 0);
        short[0] = 4;
        assert_eq!(scan_events(&short, 7), (false, true));
    }

    /// Truncation by another process is reported on a file marked by descriptor, without
    /// privileges beyond reading the file.
    #[test]
    fn a_marked_file_reports_truncation_by_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapped");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let watch = match FileWatch::new() {
            Ok(watch) => watch,
            Err(e) => {
                eprintln!("skipping: fanotify is not available here ({e})");
                return;
            }
        };
        let file = File::open(&path).unwrap();
        watch.mark(&file);
        assert!(!watch.mark_failed.load(Ordering::Relaxed));
        let status = std::process::Command::new("truncate")
            .args(["-s", "100"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let mut buf = vec![0u8; 4096];
        // SAFETY: reading into a buffer this test owns, no longer than it.
        let n = unsafe { libc::read(watch.group.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n > 0, "{}", io::Error::last_os_error());
        // SAFETY: getpid has no preconditions.
        let own_pid = unsafe { libc::getpid() };
        assert_eq!(scan_events(&buf[..n as usize], own_pid), (true, false));
    }
}
