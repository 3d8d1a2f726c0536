//! [`VersionTable`]: one shared directory's table file, mapped `MAP_SHARED` by every berth
//! process serving that directory.
//!
//! Nothing in the mapping is ever locked. A slot is claimed by one compare-and-swap of its
//! index word from 0 to the key's hash, a version moves by one atomic add, a change record is
//! one atomic store: a process killed at any instruction leaves every word either old or new,
//! never torn. Slots are never given back within a generation, so a key maps to the same slot
//! in every process for as long as anyone may remember it; a new generation (which clears the
//! index) is only started by a process that finds itself alone on the table.
//!
//! Opening is serialised by open-file-description locks on the file itself: byte 0 is held
//! exclusively while a process opens (checks, builds or rebuilds), byte 1 is held shared by
//! every process attached to the table. A process that can take byte 1 exclusively is alone
//! and may rebuild; the conversion back to shared is atomic, so no opener slips in between.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::Error;
use crate::key::SlotKey;
use crate::layout::{self, Geometry, Header, HeaderProblem, HEADER_SIZE, MAX_SLOTS, MIN_SLOTS};

/// How many index positions a lookup tries before it gives up (the table counts as full for
/// that key). At the default half-full load the chance of needing more is negligible.
pub const MAX_PROBES: u64 = 64;
/// When a lone opener finds the index more than this full (per mille), it starts a new
/// generation with an empty index.
const RESET_LOAD_PER_MILLE: u64 = 500;
/// Default slot count: room for a million inodes at half load.
pub const DEFAULT_SLOTS: u64 = 2 << 20;

/// A slot number; [`Slot::NONE`] on the wire means "no slot".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub u32);

impl Slot {
    /// The wire value for an inode without a slot.
    pub const NONE: u32 = u32::MAX;
}

/// Who the table is for, and how big a new one is made.
#[derive(Debug, Clone)]
pub struct TableOptions {
    /// The table file.
    pub path: PathBuf,
    /// Slots of a table built by this process (an existing table keeps its size while other
    /// processes use it).
    pub slots: u64,
    /// Device and inode number of the shared directory: a table serves one directory.
    pub share_dev: u64,
    pub share_ino: u64,
}

/// What opening found, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenOutcome {
    /// A new table was built (there was none).
    Created,
    /// An existing table was attached to as it was.
    Attached,
    /// An existing table was used with a new generation (this process was alone and its index
    /// was filling up).
    NewGeneration,
    /// The file was refused and rebuilt; the reason says why.
    Rebuilt(String),
    /// The table exists with another slot count than asked for and is in use: it is used as
    /// it is.
    KeptSize(u64),
}

/// A mapped version table.
pub struct VersionTable {
    path: PathBuf,
    /// Holds the shared lock on byte 1 (attached) for as long as the table is open.
    file: File,
    map: *mut u8,
    geometry: Geometry,
    share_dev: u64,
    share_ino: u64,
}

// SAFETY: the mapping is shared memory accessed only through atomics (and immutable header
// fields written before any process maps the table); the pointer stays valid until Drop.
unsafe impl Send for VersionTable {}
// SAFETY: as above: every access through &self is atomic or to immutable bytes.
unsafe impl Sync for VersionTable {}

impl Drop for VersionTable {
    fn drop(&mut self) {
        // SAFETY: `map` came from mmap with this length and is unmapped once.
        unsafe { libc::munmap(self.map.cast(), self.geometry.file_size as usize) };
    }
}

fn io_err(path: &Path, what: &'static str, source: io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

/// An OFD lock request on one byte.
fn ofd_lock(file: &File, byte: i64, kind: i32, wait: bool) -> io::Result<bool> {
    // SAFETY: flock is plain data; all-zeroes is a valid value (l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: fcntl with a valid flock structure on an open descriptor.
        let ret = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &fl) };
        if ret == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) if !wait => return Ok(false),
            _ => return Err(err),
        }
    }
}

const BYTE_OPENING: i64 = 0;
const BYTE_ATTACHED: i64 = 1;

/// A generation number no earlier table at this path is likely to have used (tables rebuilt
/// from scratch cannot read the old one's): the time in microseconds.
fn fresh_generation() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
        .max(1)
}

impl VersionTable {
    /// Opens the table at `opts.path`, building it when there is none and rebuilding it when it
    /// is damaged or of another size and no other process uses it. A file that is not a version
    /// table is never touched.
    pub fn open(opts: &TableOptions) -> Result<(VersionTable, OpenOutcome), Error> {
        if !(MIN_SLOTS..=MAX_SLOTS).contains(&opts.slots) {
            return Err(Error::SlotCount {
                requested: opts.slots,
                min: MIN_SLOTS,
                max: MAX_SLOTS,
            });
        }
        let path = &opts.path;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        // A table replaced by a rebuild while we waited for its lock is no longer the path's:
        // start over on the new file.
        for _ in 0..16 {
            let file = open_table_file(path)?;
            ofd_lock(&file, BYTE_OPENING, libc::F_WRLCK, true)
                .map_err(|e| io_err(path, "cannot lock it", e))?;
            if !still_at_path(&file, path) {
                continue;
            }
            check_owner(&file, path)?;
            let alone = ofd_lock(&file, BYTE_ATTACHED, libc::F_WRLCK, false)
                .map_err(|e| io_err(path, "cannot lock it", e))?;
            let (file, outcome) = Self::prepare(file, opts, alone)?;
            // Attached: shared on byte 1 (an atomic conversion when we held it exclusively),
            // then let the next opener in.
            ofd_lock(&file, BYTE_ATTACHED, libc::F_RDLCK, true)
                .map_err(|e| io_err(path, "cannot lock it", e))?;
            ofd_lock(&file, BYTE_OPENING, libc::F_UNLCK, true)
                .map_err(|e| io_err(path, "cannot unlock it", e))?;
            let table = Self::map(file, path)?;
            return Ok((table, outcome));
        }
        Err(io_err(
            path,
            "it keeps being replaced while berth opens it",
            io::Error::from_raw_os_error(libc::EAGAIN),
        ))
    }

    /// Checks the file and builds, rebuilds or resets it as needed; returns the file to map.
    fn prepare(file: File, opts: &TableOptions, alone: bool) -> Result<(File, OpenOutcome), Error> {
        let path = &opts.path;
        let size = file
            .metadata()
            .map_err(|e| io_err(path, "cannot stat it", e))?
            .len();
        if size == 0 {
            // New (or left empty by a builder that died): ours to build, we hold byte 0.
            build_in_place(&file, opts, fresh_generation())?;
            return Ok((file, OpenOutcome::Created));
        }
        let mut buf = vec![0u8; size.min(HEADER_SIZE) as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| io_err(path, "cannot read its header", e))?;
        let problem = match Header::decode(&buf, size) {
            Err(HeaderProblem::Foreign(reason)) => {
                return Err(Error::Foreign {
                    path: path.clone(),
                    reason,
                })
            }
            Err(HeaderProblem::Damaged(reason)) => reason,
            Ok(header)
                if (header.share_dev, header.share_ino) != (opts.share_dev, opts.share_ino) =>
            {
                if !alone {
                    return Err(Error::OtherDirectory {
                        path: path.clone(),
                        dev: header.share_dev,
                        ino: header.share_ino,
                    });
                }
                format!(
                    "it belonged to another shared directory (device {:#x}, inode {})",
                    header.share_dev, header.share_ino
                )
            }
            Ok(header) if header.geometry.slots != opts.slots => {
                if !alone {
                    return Ok((file, OpenOutcome::KeptSize(header.geometry.slots)));
                }
                format!(
                    "it had {} slots, {} were asked for",
                    header.geometry.slots, opts.slots
                )
            }
            Ok(header) => {
                if alone && needs_new_generation(&file, &header)? {
                    start_new_generation(&file, &header, path)?;
                    return Ok((file, OpenOutcome::NewGeneration));
                }
                return Ok((file, OpenOutcome::Attached));
            }
        };
        if !alone {
            return Err(Error::Corrupt {
                path: path.clone(),
                reason: problem,
            });
        }
        let generation = layout::generation_of(&buf)
            .wrapping_add(1)
            .max(fresh_generation());
        let file = rebuild(opts, generation)?;
        Ok((file, OpenOutcome::Rebuilt(problem)))
    }

    fn map(file: File, path: &Path) -> Result<VersionTable, Error> {
        let mut buf = vec![0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| io_err(path, "cannot read its header", e))?;
        let size = file
            .metadata()
            .map_err(|e| io_err(path, "cannot stat it", e))?
            .len();
        let header = Header::decode(&buf, size).map_err(|p| Error::Corrupt {
            path: path.to_owned(),
            reason: match p {
                HeaderProblem::Foreign(r) | HeaderProblem::Damaged(r) => r,
            },
        })?;
        let len = header.geometry.file_size as usize;
        // SAFETY: mapping `len` bytes of our open file shared; the result is checked. The file
        // is at least `len` long (checked by decode) and never shrinks while attached (a
        // rebuild replaces the file instead of truncating it).
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io_err(path, "cannot map it", io::Error::last_os_error()));
        }
        Ok(VersionTable {
            path: path.to_owned(),
            file,
            map: map.cast(),
            geometry: header.geometry,
            share_dev: header.share_dev,
            share_ino: header.share_ino,
        })
    }

    fn atomic_u64(&self, offset: u64) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= self.geometry.file_size);
        // SAFETY: every caller passes an 8-aligned offset inside the mapping (slot and ring
        // indexes are reduced modulo their array lengths); AtomicU64 has u64's layout, and the
        // mapping outlives the returned reference (tied to &self).
        unsafe { &*(self.map.add(offset as usize) as *const AtomicU64) }
    }

    fn atomic_u32(&self, offset: u64) -> &AtomicU32 {
        debug_assert!(offset.is_multiple_of(4) && offset + 4 <= self.geometry.file_size);
        // SAFETY: as for atomic_u64, with 4-byte alignment.
        unsafe { &*(self.map.add(offset as usize) as *const AtomicU32) }
    }

    fn version_cell(&self, slot: Slot) -> &AtomicU64 {
        let i = u64::from(slot.0) % self.geometry.slots;
        self.atomic_u64(self.geometry.versions_offset + i * 8)
    }

    fn index_cell(&self, position: u64) -> &AtomicU64 {
        self.atomic_u64(self.geometry.index_offset + (position % self.geometry.slots) * 8)
    }

    fn ring_cell(&self, seq: u64) -> &AtomicU64 {
        let i = seq & (self.geometry.ring_entries - 1);
        self.atomic_u64(self.geometry.ring_offset + i * 8)
    }

    fn generation_cell(&self) -> &AtomicU64 {
        self.atomic_u64(layout::OFF_GENERATION as u64)
    }

    fn ring_head(&self) -> &AtomicU64 {
        self.atomic_u64(layout::OFF_RING_HEAD as u64)
    }

    fn wake_word(&self) -> &AtomicU32 {
        self.atomic_u32(layout::OFF_WAKE as u64)
    }

    fn sleepers(&self) -> &AtomicU32 {
        self.atomic_u32(layout::OFF_SLEEPERS as u64)
    }

    fn overflow_cell(&self) -> &AtomicU64 {
        self.atomic_u64(layout::OFF_OVERFLOWS as u64)
    }

    /// The table file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open table file (for offering it to a guest as shared memory).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The table's layout.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Device and inode number of the shared directory this table serves.
    pub fn share(&self) -> (u64, u64) {
        (self.share_dev, self.share_ino)
    }

    /// Number of slots.
    pub fn slots(&self) -> u64 {
        self.geometry.slots
    }

    /// The current generation: slot numbers learnt in another generation mean nothing.
    pub fn generation(&self) -> u64 {
        self.generation_cell().load(Ordering::SeqCst)
    }

    /// Lookups that found no slot since the table's generation began.
    pub fn overflows(&self) -> u64 {
        self.overflow_cell().load(Ordering::Relaxed)
    }

    /// Slots taken in the index (a scan; for tests, sizing reports and the lone-opener check).
    pub fn slots_in_use(&self) -> u64 {
        (0..self.geometry.slots)
            .filter(|&i| self.index_cell(i).load(Ordering::Relaxed) != 0)
            .count() as u64
    }

    /// The slot of `key`, claiming a free one when it has none; `None` when its probe sequence
    /// is full (the inode then goes without shared caching).
    pub fn slot_for(&self, key: &SlotKey) -> Option<Slot> {
        self.probe(key.hash(), true)
    }

    /// The slot of `key` if it has one (a change to an inode nobody holds needs no bump: whoever
    /// looks it up later claims its slot before reading its version and its attributes).
    pub fn find_slot(&self, key: &SlotKey) -> Option<Slot> {
        self.probe(key.hash(), false)
    }

    fn probe(&self, hash: u64, claim: bool) -> Option<Slot> {
        let n = self.geometry.slots;
        let start = hash % n;
        for i in 0..MAX_PROBES.min(n) {
            let position = (start + i) % n;
            let cell = self.index_cell(position);
            match cell.load(Ordering::SeqCst) {
                h if h == hash => return Some(Slot(position as u32)),
                0 if !claim => return None,
                0 => match cell.compare_exchange(0, hash, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => return Some(Slot(position as u32)),
                    Err(h) if h == hash => return Some(Slot(position as u32)),
                    Err(_) => continue,
                },
                _ => continue,
            }
        }
        if claim {
            self.overflow_cell().fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// The version of `slot` now.
    pub fn version(&self, slot: Slot) -> u64 {
        self.version_cell(slot).load(Ordering::SeqCst)
    }

    /// Moves the version of `slot` (after a change to its inode is done in the host
    /// filesystem) and tells readers; returns the version it had.
    pub fn bump(&self, slot: Slot) -> u64 {
        // The record's sequence number is claimed first: if this process dies before it writes
        // the record, readers find the hole and rescan everything, so no move goes unseen.
        let seq = self.ring_head().fetch_add(1, Ordering::SeqCst);
        let old = self.version_cell(slot).fetch_add(1, Ordering::SeqCst);
        self.ring_cell(seq)
            .store(record(seq, slot), Ordering::SeqCst);
        self.wake_sleepers();
        old
    }

    /// Tells every reader that every slot may have moved (a host watcher lost events, or the
    /// table's users must forget their slots): starts a new generation without clearing the
    /// index, so the slots themselves stay where they are.
    pub fn bump_generation(&self) {
        self.generation_cell().fetch_add(1, Ordering::SeqCst);
        self.wake_sleepers();
    }

    fn wake_sleepers(&self) {
        if self.sleepers().swap(0, Ordering::SeqCst) != 0 {
            self.wake_word().fetch_add(1, Ordering::SeqCst);
            futex_wake(self.wake_word());
        }
    }

    /// A reader of the changes published from now on.
    pub fn feed(&self) -> ChangeFeed<'_> {
        ChangeFeed {
            table: self,
            next: self.ring_head().load(Ordering::SeqCst),
            generation: self.generation(),
            hole_since: None,
        }
    }

    /// Writes a raw word into the index (tests of damaged and adversarial tables only).
    #[doc(hidden)]
    pub fn debug_store_index(&self, position: u64, value: u64) {
        self.index_cell(position).store(value, Ordering::SeqCst);
    }

    /// Claims a change record's sequence number without writing it, as a process killed
    /// between the two steps of [`bump`](Self::bump) leaves it (tests only).
    #[doc(hidden)]
    pub fn debug_claim_record(&self) -> u64 {
        self.ring_head().fetch_add(1, Ordering::SeqCst)
    }
}

fn record(seq: u64, slot: Slot) -> u64 {
    (seq & 0xffff_ffff) << 32 | u64::from(slot.0)
}

/// What a [`ChangeFeed`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Nothing new.
    None,
    /// These slots moved (possibly more than once, possibly listed twice).
    Slots(Vec<Slot>),
    /// Anything may have moved: the generation changed, the reader fell behind the ring, or a
    /// writer died before recording its change. Compare everything.
    Everything,
}

/// How long a claimed but unwritten change record is waited for before the reader assumes its
/// writer died and rescans.
const HOLE_PATIENCE: Duration = Duration::from_millis(20);

/// One reader's position in the table's change records.
pub struct ChangeFeed<'a> {
    table: &'a VersionTable,
    next: u64,
    generation: u64,
    hole_since: Option<std::time::Instant>,
}

impl ChangeFeed<'_> {
    /// The changes published since the last call.
    pub fn poll(&mut self) -> Changes {
        let t = self.table;
        let generation = t.generation();
        let head = t.ring_head().load(Ordering::SeqCst);
        if generation != self.generation {
            self.generation = generation;
            self.next = head;
            self.hole_since = None;
            return Changes::Everything;
        }
        if head.wrapping_sub(self.next) > t.geometry.ring_entries {
            self.next = head;
            self.hole_since = None;
            return Changes::Everything;
        }
        let mut slots = Vec::new();
        while self.next != head {
            let entry = t.ring_cell(self.next).load(Ordering::SeqCst);
            let tag = (entry >> 32) as u32;
            let want = self.next as u32;
            if tag == want {
                slots.push(Slot(entry as u32));
                self.next = self.next.wrapping_add(1);
                self.hole_since = None;
                continue;
            }
            if (tag.wrapping_sub(want) as i32) > 0 {
                // Overwritten by a later lap: this reader fell behind.
                self.next = head;
                self.hole_since = None;
                return Changes::Everything;
            }
            // Claimed, not written yet: a writer between its two steps, or one that died there.
            let since = *self.hole_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= HOLE_PATIENCE {
                self.next = self.next.wrapping_add(1);
                self.hole_since = None;
                return Changes::Everything;
            }
            break;
        }
        if slots.is_empty() {
            Changes::None
        } else {
            Changes::Slots(slots)
        }
    }

    /// Sleeps until something is published or `timeout` passes (returns at once when changes
    /// are waiting).
    pub fn wait(&self, timeout: Duration) {
        let t = self.table;
        let seen = t.wake_word().load(Ordering::SeqCst);
        t.sleepers().store(1, Ordering::SeqCst);
        if t.ring_head().load(Ordering::SeqCst) != self.next || t.generation() != self.generation {
            if self.hole_since.is_some() {
                // A writer is between its steps: give it a moment rather than spin.
                std::thread::sleep(Duration::from_micros(200));
            }
            return;
        }
        futex_wait(t.wake_word(), seen, timeout);
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32 in a shared mapping (not private: sleepers
    // live in other processes); no memory is written by the kernel.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

fn futex_wait(word: &AtomicU32, seen: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 with a valid relative timeout; it only sleeps
    // (EAGAIN when the word moved already, ETIMEDOUT, EINTR: all fine for the caller, who
    // polls again).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            seen,
            &ts as *const libc::timespec,
        );
    }
}

fn open_table_file(path: &Path) -> Result<File, Error> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io_err(
            path,
            "the path contains a NUL byte",
            io::Error::from_raw_os_error(libc::EINVAL),
        )
    })?;
    // SAFETY: a NUL-terminated path; the result is checked and owned below.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o600,
        )
    };
    if fd < 0 {
        return Err(io_err(path, "cannot open it", io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let meta = file
        .metadata()
        .map_err(|e| io_err(path, "cannot stat it", e))?;
    if !meta.file_type().is_file() {
        return Err(Error::Foreign {
            path: path.to_owned(),
            reason: "it is not a regular file".into(),
        });
    }
    Ok(file)
}

fn check_owner(file: &File, path: &Path) -> Result<(), Error> {
    let meta = file
        .metadata()
        .map_err(|e| io_err(path, "cannot stat it", e))?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(Error::NotOwned {
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    Ok(())
}

/// Whether `file` is still the file at `path` (a rebuild renames a new file over it).
fn still_at_path(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Sizes `file` and writes a header with `generation`; the checksum makes a header cut short
/// by a crash read as damaged, so the next opener rebuilds it.
fn build_in_place(file: &File, opts: &TableOptions, generation: u64) -> Result<(), Error> {
    let path = &opts.path;
    let header = Header {
        geometry: Geometry::for_slots(opts.slots),
        share_dev: opts.share_dev,
        share_ino: opts.share_ino,
    };
    file.set_len(header.geometry.file_size)
        .map_err(|e| io_err(path, "cannot size it", e))?;
    file.write_all_at(&header.encode(generation), 0)
        .map_err(|e| io_err(path, "cannot write its header", e))?;
    Ok(())
}

/// Builds a new table beside `opts.path` and renames it over the old file: processes that
/// still map the old file keep a valid (if abandoned) mapping, never a truncated one.
fn rebuild(opts: &TableOptions, generation: u64) -> Result<File, Error> {
    let path = &opts.path;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".new-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let file = open_table_file(&tmp)?;
    // The new file is locked before it becomes visible, so openers that find it at the path
    // wait for us like on the old one.
    ofd_lock(&file, BYTE_OPENING, libc::F_WRLCK, true)
        .map_err(|e| io_err(&tmp, "cannot lock it", e))?;
    ofd_lock(&file, BYTE_ATTACHED, libc::F_WRLCK, true)
        .map_err(|e| io_err(&tmp, "cannot lock it", e))?;
    if let Err(e) = build_in_place(&file, opts, generation) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, "cannot replace it", e))?;
    Ok(file)
}

fn needs_new_generation(file: &File, header: &Header) -> Result<bool, Error> {
    let g = header.geometry;
    let mut overflow = [0u8; 8];
    let _ = file.read_exact_at(&mut overflow, layout::OFF_OVERFLOWS as u64);
    if u64::from_ne_bytes(overflow) != 0 {
        return Ok(true);
    }
    // Count taken index words by reading the index in chunks.
    let mut used = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut offset = 0u64;
    let len = g.slots * 8;
    while offset < len {
        let n = (len - offset).min(buf.len() as u64) as usize;
        if file
            .read_exact_at(&mut buf[..n], g.index_offset + offset)
            .is_err()
        {
            return Ok(true);
        }
        used += buf[..n]
            .chunks_exact(8)
            .filter(|w| w.iter().any(|&b| b != 0))
            .count() as u64;
        offset += n as u64;
    }
    Ok(used * 1000 > g.slots * RESET_LOAD_PER_MILLE)
}

/// Clears the index and moves the generation, so every slot can be handed out anew. Only for a
/// process alone on the table; versions keep counting up, so no (slot, version) pair repeats.
fn start_new_generation(file: &File, header: &Header, path: &Path) -> Result<(), Error> {
    let g = header.geometry;
    let zeros = vec![0u8; 1 << 16];
    let mut offset = 0u64;
    let len = g.slots * 8;
    while offset < len {
        let n = (len - offset).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], g.index_offset + offset)
            .map_err(|e| io_err(path, "cannot clear its index", e))?;
        offset += n as u64;
    }
    file.write_all_at(&0u64.to_ne_bytes(), layout::OFF_OVERFLOWS as u64)
        .map_err(|e| io_err(path, "cannot reset its counters", e))?;
    let mut buf = [0u8; 8];
    file.read_exact_at(&mut buf, layout::OFF_GENERATION as u64)
        .map_err(|e| io_err(path, "cannot read its generation", e))?;
    let next = u64::from_ne_bytes(buf).wrapping_add(1);
    file.write_all_at(&next.to_ne_bytes(), layout::OFF_GENERATION as u64)
        .map_err(|e| io_err(path, "cannot write its generation", e))?;
    Ok(())
}
