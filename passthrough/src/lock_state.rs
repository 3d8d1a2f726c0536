//! The guest's file locks across a live migration.
//!
//! berth holds the guest's locks as host locks: a POSIX lock of lock owner `o` on inode `i`
//! is an OFD lock on the open file description berth keeps for `(i, o)`, and a flock lock is
//! a flock lock on the description of the guest's open handle. The kernel is the record of
//! which ranges are held: the source reads them back from `/proc/self/fdinfo` (only granted
//! locks are listed there, each with its type and range), and the destination takes them
//! again on the descriptions it rebuilds.
//!
//! On one host the source still holds its copies while the destination loads the state: it
//! lets go when it exits, after the migration completed. So the destination takes each lock
//! without waiting, and for a lock that conflicts the thread that loaded the state waits in
//! the kernel (F_OFD_SETLKW, flock without LOCK_NB) between its jobs, for a bounded time (see
//! [`FsServer::wait_for_migrated_locks`](crate::FsServer::wait_for_migrated_locks)): the
//! kernel wakes it as the source's exit frees the range, and only a host process asking in
//! the instant between that wake-up and the thread's retry could take the lock first.
//! Meanwhile the host kernel still refuses everyone else the range (the source holds it),
//! and the guest's own lock requests on that inode wait until every lock pending on it is
//! settled, so no other lock owner of the guest is granted a range in the instant between
//! the source letting go and the destination taking it. A lock that cannot be taken again
//! within the time (another host process took it) is lost: the loss is logged, the owner's
//! lock requests on that inode fail with EIO until it closes the file, and a flock handle
//! fails every request with EIO.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::fs::HandleData;
use crate::lock_wait::WakeTimer;
use crate::util::{check_ret, openat};

/// FUSE's "to the end of the file" lock end.
pub(crate) const LOCK_TO_EOF: u64 = i64::MAX as u64;
/// How long the destination retries a lock the source still holds, by default.
pub(crate) const DEFAULT_REACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a wait for a lock the destination could not take yet lasts before its thread
/// looks at its other work and the other such locks again.
pub const LOCK_RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// How much longer than the retry deadline a guest lock request waits for a settlement.
const SETTLE_SLACK: Duration = Duration::from_secs(1);

/// Which kind of host lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockClass {
    /// A POSIX lock, held as an OFD lock on the owner's description.
    Posix,
    /// A whole-file flock lock on a handle's description.
    Flock,
}

/// One held lock: its type and inclusive byte range (`end` [`LOCK_TO_EOF`] for "to the end").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeldRange {
    pub write: bool,
    pub start: u64,
    pub end: u64,
}

impl HeldRange {
    /// The whole file (a flock lock).
    pub(crate) fn whole(write: bool) -> Self {
        HeldRange {
            write,
            start: 0,
            end: LOCK_TO_EOF,
        }
    }

    pub(crate) fn describe(&self, class: LockClass) -> String {
        let kind = if self.write { "write" } else { "read" };
        match class {
            LockClass::Flock => format!("{kind} flock lock"),
            LockClass::Posix if self.end >= LOCK_TO_EOF => {
                format!("{kind} POSIX lock on bytes {}..EOF", self.start)
            }
            LockClass::Posix => {
                format!("{kind} POSIX lock on bytes {}..={}", self.start, self.end)
            }
        }
    }
}

/// The locks of `class` listed in the text of a `/proc/<pid>/fdinfo/<fd>` file. A line reads
/// `lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:1234 10 14` (or `... 100 EOF`); a lock whose
/// line cannot be read is an error, never skipped.
pub(crate) fn parse_fdinfo(text: &str, class: LockClass) -> Result<Vec<HeldRange>, String> {
    let mut held = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("lock:") else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // id, kind, advisory/mandatory, type, pid, device:inode, start, end.
        let [_id, kind, _mode, kind_of_access, _pid, _key, start, end] = fields[..] else {
            return Err(format!("unexpected lock line {line:?}"));
        };
        let wanted = match class {
            LockClass::Posix => kind == "OFDLCK",
            LockClass::Flock => kind == "FLOCK",
        };
        if !wanted {
            continue;
        }
        let write = match kind_of_access {
            "WRITE" => true,
            "READ" => false,
            _ => return Err(format!("unexpected lock type in {line:?}")),
        };
        let start: u64 = start
            .parse()
            .map_err(|_| format!("unexpected lock start in {line:?}"))?;
        let end: u64 = if end == "EOF" {
            LOCK_TO_EOF
        } else {
            end.parse()
                .map_err(|_| format!("unexpected lock end in {line:?}"))?
        };
        if start > end {
            return Err(format!("lock range ends before it starts in {line:?}"));
        }
        held.push(if class == LockClass::Flock {
            HeldRange::whole(write)
        } else {
            HeldRange { write, start, end }
        });
    }
    Ok(held)
}

/// The locks of `class` the description `fd` holds, as the kernel lists them in `fdinfo`
/// (this process's `/proc/self/fdinfo`).
pub(crate) fn held_by(
    fdinfo: BorrowedFd<'_>,
    fd: RawFd,
    class: LockClass,
) -> io::Result<Vec<HeldRange>> {
    let name = CString::new(fd.to_string()).map_err(io::Error::other)?;
    let mut text = String::new();
    File::from(openat(fdinfo, &name, libc::O_RDONLY, 0)?).read_to_string(&mut text)?;
    parse_fdinfo(&text, class).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Takes `range` on `fd` without waiting: `Ok(false)` when another description holds a
/// conflicting lock.
pub(crate) fn try_take(fd: RawFd, class: LockClass, range: HeldRange) -> io::Result<bool> {
    match lock_call(fd, class, range, false) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Takes `range` on `fd`, waiting for it in the kernel: `Ok(false)` when a signal (the
/// [`WakeTimer`]'s) interrupted the wait.
fn take_waiting(fd: RawFd, class: LockClass, range: HeldRange) -> io::Result<bool> {
    match lock_call(fd, class, range, true) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The host lock call taking `range` on `fd`, blocking or not.
fn lock_call(fd: RawFd, class: LockClass, range: HeldRange, wait: bool) -> io::Result<()> {
    let result = match class {
        LockClass::Flock => {
            let op = if range.write {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            };
            let op = if wait { op } else { op | libc::LOCK_NB };
            // SAFETY: flock on an open descriptor; the result is checked.
            check_ret(unsafe { libc::flock(fd, op) })
        }
        LockClass::Posix => {
            // SAFETY: flock is plain old data; all-zeroes is valid.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = if range.write {
                libc::F_WRLCK
            } else {
                libc::F_RDLCK
            } as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = range.start.min(LOCK_TO_EOF) as i64;
            fl.l_len = if range.end >= LOCK_TO_EOF {
                0
            } else {
                (range.end - range.start + 1) as i64
            };
            let cmd = if wait {
                libc::F_OFD_SETLKW
            } else {
                libc::F_OFD_SETLK
            };
            // SAFETY: fcntl with a valid flock struct (l_pid 0, as OFD locks need); checked.
            check_ret(unsafe { libc::fcntl(fd, cmd, &mut fl) })
        }
    };
    result.map(drop)
}

/// Where a pending lock is to be taken.
#[derive(Clone)]
pub(crate) enum Target {
    /// The description carrying owner `owner`'s POSIX locks (gone when the owner closes).
    Owner { owner: u64, file: Weak<File> },
    /// The guest's open handle `fh` (gone when the guest releases it).
    Handle { fh: u64, handle: Weak<HandleData> },
}

/// A lock the destination could not take yet.
#[derive(Clone)]
pub(crate) struct Pending {
    pub inode: u64,
    pub target: Target,
    pub range: HeldRange,
}

impl Pending {
    fn class(&self) -> LockClass {
        match self.target {
            Target::Owner { .. } => LockClass::Posix,
            Target::Handle { .. } => LockClass::Flock,
        }
    }

    pub(crate) fn what(&self) -> String {
        match &self.target {
            Target::Owner { owner, .. } => format!(
                "{} of lock owner {owner:#x} on inode {}",
                self.range.describe(self.class()),
                self.inode
            ),
            Target::Handle { fh, .. } => format!(
                "{} of handle {fh} on inode {}",
                self.range.describe(self.class()),
                self.inode
            ),
        }
    }

    /// The description the lock is to be taken on, kept open while a thread waits for it;
    /// `None` once the guest let go of it.
    fn description(&self) -> Option<Description> {
        match &self.target {
            Target::Owner { file, .. } => file.upgrade().map(Description::Owner),
            Target::Handle { handle, .. } => handle.upgrade().map(Description::Handle),
        }
    }

    /// Whether `self` is the pending lock `other` was taken from.
    fn same(&self, other: &Pending) -> bool {
        let same_target = match (&self.target, &other.target) {
            (Target::Owner { file: a, .. }, Target::Owner { file: b, .. }) => Weak::ptr_eq(a, b),
            (Target::Handle { handle: a, .. }, Target::Handle { handle: b, .. }) => {
                Weak::ptr_eq(a, b)
            }
            _ => false,
        };
        same_target && self.inode == other.inode && self.range == other.range
    }

    /// One try: `Some(Ok(()))` taken, `Some(Err)` failed for good, `None` still held
    /// elsewhere. A target the guest let go of is settled (`Some(Ok(()))`).
    fn try_once(&self) -> Option<io::Result<()>> {
        let taken = match &self.target {
            Target::Owner { file, .. } => match file.upgrade() {
                Some(file) => try_take(file.as_raw_fd(), LockClass::Posix, self.range),
                None => return Some(Ok(())),
            },
            Target::Handle { handle, .. } => match handle.upgrade() {
                Some(handle) => try_take(handle.file.as_raw_fd(), LockClass::Flock, self.range),
                None => return Some(Ok(())),
            },
        };
        match taken {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// An open description a pending lock is taken on.
enum Description {
    Owner(Arc<File>),
    Handle(Arc<HandleData>),
}

impl Description {
    fn fd(&self) -> RawFd {
        match self {
            Description::Owner(file) => file.as_raw_fd(),
            Description::Handle(handle) => handle.file.as_raw_fd(),
        }
    }
}

#[derive(Default)]
struct Restore {
    pending: Vec<Pending>,
    deadline: Option<Instant>,
    /// (inode, owner) pairs whose POSIX locks were lost in the migration.
    lost_owners: HashSet<(u64, u64)>,
}

/// The locks the destination is still taking again, and those it lost.
#[derive(Default)]
pub(crate) struct LockRestore {
    inner: Mutex<Restore>,
    settled: Condvar,
}

impl LockRestore {
    fn state(&self) -> std::sync::MutexGuard<'_, Restore> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets everything (a new session, a device reset or a new state load).
    pub(crate) fn clear(&self) {
        let mut state = self.state();
        state.pending.clear();
        state.lost_owners.clear();
        state.deadline = None;
        self.settled.notify_all();
    }

    /// Records a lock lost for good: logged, and the guest gets EIO for it.
    fn lose(state: &mut Restore, pending: &Pending, reason: &str) {
        tracing::error!(
            "Lost the guest's {} in the migration: {reason}. The guest gets EIO for it.",
            pending.what()
        );
        match &pending.target {
            Target::Owner { owner, .. } => {
                state.lost_owners.insert((pending.inode, *owner));
            }
            Target::Handle { handle, .. } => {
                if let Some(handle) = handle.upgrade() {
                    handle.locks_lost.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Marks a lock lost right at load time (`--migration-on-error guest-error`).
    pub(crate) fn lose_now(&self, pending: &Pending, reason: &str) {
        Self::lose(&mut self.state(), pending, reason);
    }

    /// Keeps `pending` for [`retry_round`](Self::retry_round) until each is taken, its owner
    /// or handle is closed, or `timeout` passes (then it is lost).
    pub(crate) fn start(&self, pending: Vec<Pending>, timeout: Duration) {
        if pending.is_empty() {
            return;
        }
        let mut state = self.state();
        for p in &pending {
            tracing::info!(
                "The guest's {} is held elsewhere (by the migration source until it exits?); \
                 retrying for up to {timeout:?}.",
                p.what()
            );
        }
        state.pending.extend(pending);
        state.deadline = Some(Instant::now() + timeout);
    }

    /// Whether some lock is still to be taken again.
    pub(crate) fn has_pending(&self) -> bool {
        !self.state().pending.is_empty()
    }

    /// Tries every pending lock once; false when none is left.
    pub(crate) fn retry_round(&self) -> bool {
        let mut state = self.state();
        let expired = state.deadline.is_none_or(|d| Instant::now() >= d);
        let pending = std::mem::take(&mut state.pending);
        let mut left = Vec::new();
        for p in pending {
            match p.try_once() {
                Some(Ok(())) => {
                    tracing::info!("Took the guest's {} again.", p.what());
                }
                Some(Err(e)) => Self::lose(&mut state, &p, &format!("the host refuses it ({e})")),
                None if expired => Self::lose(
                    &mut state,
                    &p,
                    "a conflicting lock is still held on the host after the retry time (by \
                     another host process?); the guest has moved already, so even \
                     --migration-on-error abort cannot refuse the migration any more",
                ),
                None => left.push(p),
            }
        }
        state.pending = left;
        self.settled.notify_all();
        !state.pending.is_empty()
    }

    /// One round of taking the pending locks again: each is tried at once ([`retry_round`]
    /// (Self::retry_round)), then the thread waits in the kernel for the first one still
    /// held, until it is granted or `tick` has passed (a timer signal ends the wait). A lock
    /// the source lets go of is so taken the moment the kernel frees it, not at the next try:
    /// a host process asking for it in between could take it. False when none is left.
    pub(crate) fn wait_round(&self, tick: Duration) -> bool {
        if !self.retry_round() {
            return false;
        }
        let (first, description) = {
            let state = self.state();
            let Some(first) = state.pending.first() else {
                return false;
            };
            let Some(description) = first.description() else {
                // The guest let go of it meanwhile: the next round settles it.
                return true;
            };
            (first.clone(), description)
        };
        let taken = match WakeTimer::arm(tick) {
            Ok(_timer) => take_waiting(description.fd(), first.class(), first.range),
            Err(e) => {
                tracing::warn!(
                    "Cannot bound a wait for a migrated lock ({e}); trying again in {tick:?}."
                );
                std::thread::sleep(tick);
                return true;
            }
        };
        let mut state = self.state();
        match taken {
            Ok(true) => {
                // Still wanted: the guest may have let go of it while the thread waited (then
                // the description closes with the last reference, and the lock with it).
                if let Some(at) = state.pending.iter().position(|p| p.same(&first)) {
                    let done = state.pending.remove(at);
                    tracing::info!("Took the guest's {} again.", done.what());
                    self.settled.notify_all();
                }
            }
            // The timer's signal: the next round looks again.
            Ok(false) => {}
            Err(e) => {
                if let Some(at) = state.pending.iter().position(|p| p.same(&first)) {
                    let lost = state.pending.remove(at);
                    Self::lose(&mut state, &lost, &format!("the host refuses it ({e})"));
                    self.settled.notify_all();
                }
            }
        }
        drop(state);
        drop(description);
        true
    }

    /// Waits until no lock is pending on `inode` any more (bounded by the retry deadline).
    pub(crate) fn wait_settled(&self, inode: u64) {
        let mut state = self.state();
        while state.pending.iter().any(|p| p.inode == inode) {
            let Some(deadline) = state.deadline else {
                break;
            };
            let now = Instant::now();
            let until = deadline + SETTLE_SLACK;
            if now >= until {
                break;
            }
            state = self
                .settled
                .wait_timeout(state, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether `owner`'s POSIX locks on `inode` were lost in the migration.
    pub(crate) fn owner_lost(&self, inode: u64, owner: u64) -> bool {
        let state = self.state();
        !state.lost_owners.is_empty() && state.lost_owners.contains(&(inode, owner))
    }

    /// `owner` closed `inode`: its POSIX locks are gone, pending or lost.
    pub(crate) fn forget_owner(&self, inode: u64, owner: u64) {
        let mut state = self.state();
        state.lost_owners.remove(&(inode, owner));
        let before = state.pending.len();
        state.pending.retain(|p| {
            !(p.inode == inode && matches!(p.target, Target::Owner { owner: o, .. } if o == owner))
        });
        if state.pending.len() != before {
            self.settled.notify_all();
        }
    }

    /// How many locks are still pending.
    #[cfg(test)]
    pub(crate) fn pending_count(&self) -> usize {
        self.state().pending.len()
    }

    /// The class of each pending lock (for tests).
    #[cfg(test)]
    pub(crate) fn pending_classes(&self) -> Vec<LockClass> {
        self.state().pending.iter().map(Pending::class).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_lock_lines_are_read_and_filtered() {
        let text = "pos:\t0\nflags:\t02100002\nmnt_id:\t27\nino:\t10011021\n\
                    lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10011021 10 14\n\
                    lock:\t2: OFDLCK ADVISORY  READ -1 fe:00:10011021 100 EOF\n\
                    lock:\t3: FLOCK  ADVISORY  READ 17629 fe:00:10011021 0 EOF\n";
        assert_eq!(
            parse_fdinfo(text, LockClass::Posix).unwrap(),
            vec![
                HeldRange {
                    write: true,
                    start: 10,
                    end: 14
                },
                HeldRange {
                    write: false,
                    start: 100,
                    end: LOCK_TO_EOF
                }
            ]
        );
        assert_eq!(
            parse_fdinfo(text, LockClass::Flock).unwrap(),
            vec![HeldRange::whole(false)]
        );
        assert!(parse_fdinfo("pos:\t0\n", LockClass::Posix)
            .unwrap()
            .is_empty());
        for bad in [
            "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:1 10\n",
            "lock:\t1: OFDLCK ADVISORY  SHARED -1 fe:00:1 10 14\n",
            "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:1 x 14\n",
            "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:1 20 14\n",
        ] {
            assert!(parse_fdinfo(bad, LockClass::Posix).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_kernel_lists_the_locks_a_description_holds() {
        let path = std::env::temp_dir().join(format!("berth-lockinfo-{}", std::process::id()));
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        let (a, b) = (open(), open());
        let fdinfo = File::open("/proc/self/fdinfo").unwrap();
        let range = HeldRange {
            write: true,
            start: 5,
            end: 9,
        };
        assert!(try_take(a.as_raw_fd(), LockClass::Posix, range).unwrap());
        assert!(try_take(a.as_raw_fd(), LockClass::Flock, HeldRange::whole(false)).unwrap());
        use std::os::fd::AsFd;
        assert_eq!(
            held_by(fdinfo.as_fd(), a.as_raw_fd(), LockClass::Posix).unwrap(),
            vec![range]
        );
        assert_eq!(
            held_by(fdinfo.as_fd(), a.as_raw_fd(), LockClass::Flock).unwrap(),
            vec![HeldRange::whole(false)]
        );
        // Another description conflicts on the write range and the shared flock is shared.
        assert!(!try_take(b.as_raw_fd(), LockClass::Posix, range).unwrap());
        assert!(try_take(
            b.as_raw_fd(),
            LockClass::Posix,
            HeldRange {
                write: true,
                start: 10,
                end: 20
            }
        )
        .unwrap());
        assert!(!try_take(b.as_raw_fd(), LockClass::Flock, HeldRange::whole(true)).unwrap());
        assert!(held_by(fdinfo.as_fd(), b.as_raw_fd(), LockClass::Flock)
            .unwrap()
            .is_empty());
        std::fs::remove_file(&path).unwrap();
    }
}
