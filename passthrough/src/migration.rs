//! Live migration of the filesystem's state: what the guest holds (inodes with their lookup
//! counts, open files and directories, what FUSE_INIT negotiated) serialized on the source
//! and rebuilt on the destination, so the guest carries on with the same node ids and handles.
//!
//! The stream is `magic, version, reserved, payload length, CRC-32C of the payload`, then the
//! payload. Every field is little-endian; every count is checked against the bytes left
//! before anything is allocated, so a truncated or hostile stream is refused, never trusted.
//! Inodes are described by their path under the shared directory (`find-paths`) or by their
//! file handle (`file-handles`); the destination resolves a path one component at a time
//! from its shared directory without following symlinks, so a stream cannot lead it outside.
//! A file handle cannot be confined that way: `file-handles` mode trusts the source as much
//! as the host filesystem it shares with it.
//!
//! Format 2 adds the guest's locks after the handles (see [`crate::lock_state`]): each
//! handle's flock lock, and each lock owner's POSIX ranges per inode. A source writes format 1
//! when the guest holds no lock, so a destination that predates lock records still takes it.
//!
//! Format 3 adds, after the locks, the guest's SETLKW requests still waiting when the queues
//! stopped (see [`crate::lock_wait`]): where each one's descriptor chain is and what it asked
//! for, so that the destination waits again and answers it in the same chain. It is written
//! only when such a request exists.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuse_backend_rs::abi::fuse_abi::ROOT_ID;

use crate::config::{MigrationMode, MigrationOnError};
use crate::file_handle::FileHandle;
use crate::fs::{HandleData, PassthroughFs};
use crate::inode_store::{InodeData, InodeFile, InodeKey};
use crate::lock_state::{
    held_by, try_take, HeldRange, LockClass, Pending, Target, DEFAULT_REACQUIRE_TIMEOUT,
    LOCK_TO_EOF,
};
use crate::lock_wait::{QueueOrigin, WaitingLock};
use crate::util::{errno, fd_name, openat, statx, EMPTY_CSTR};

/// First bytes of a berth state stream.
pub const STATE_MAGIC: [u8; 8] = *b"BERTHFS\x01";
/// The newest format this build writes and reads.
pub const STATE_FORMAT_VERSION: u32 = 3;
/// The first format with lock records.
const LOCKS_VERSION: u32 = 2;
/// The first format with waiting lock requests.
const WAITS_VERSION: u32 = 3;
/// Bytes of one waiting lock request.
const WAIT_RECORD_LEN: usize = 4 + 4 + 4 + 8 + 4 + 8 * 6 + 4 * 3;
/// Largest virtqueue a waiting request may come from (the virtio split ring limit).
const MAX_QUEUE_SIZE: u32 = 32768;
/// Magic, version, reserved word, payload length, checksum.
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4;
/// Largest path or file handle a stream may carry for one inode.
const MAX_NAME_BYTES: usize = libc::PATH_MAX as usize;

const KIND_PATH: u8 = 0;
const KIND_HANDLE: u8 = 1;
const KIND_LOST: u8 = 2;

/// How the source describes one inode: its kind, its path or file handle, and (find-paths
/// with `--migration-verify-handles`) its file handle for the destination to check.
type Description = (u8, Vec<u8>, Option<Vec<u8>>);

/// Why state could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("Cannot describe inode {id} to the destination: {reason}.")]
    Undescribable { id: u64, reason: String },
    #[error("Cannot find inode {id} ({what}) again: {reason}.")]
    NotFound {
        id: u64,
        what: String,
        reason: String,
    },
    #[error("The state stream is not berth's (wrong magic bytes).")]
    BadMagic,
    #[error(
        "The state stream has format version {found}, newer than this berth reads ({supported}); \
         migrate to a berth at least as new as the source."
    )]
    NewerFormat { found: u32, supported: u32 },
    #[error("The state stream is truncated: {0}.")]
    Truncated(String),
    #[error("The state stream is corrupt: {0}.")]
    Corrupt(String),
    #[error(
        "The state stream was saved from another shared directory ({theirs}); this daemon \
         shares {ours}."
    )]
    ForeignShare { theirs: String, ours: String },
    #[error("Cannot read the locks the guest holds on the host: {0}.")]
    LocksUnreadable(String),
    #[error("Cannot take the guest's {what} again: {reason}.")]
    LockNotRestored { what: String, reason: String },
    #[error("Host I/O failed while {what}: {source}.")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> MigrationError {
    move |source| MigrationError::Io { what, source }
}

/// The FUSE session flags FUSE_INIT negotiated, one bit each.
const SESSION_FLAGS: usize = 7;

/// What the source wrote about the guest's session.
pub(crate) struct SessionState {
    pub initialized: bool,
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], MigrationError> {
        if self.rest.len() < n {
            return Err(MigrationError::Corrupt(format!(
                "{what} runs past the end of the payload"
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, MigrationError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, MigrationError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, MigrationError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self, what: &str) -> Result<&'a [u8], MigrationError> {
        let len = self.u32(what)? as usize;
        if len > MAX_NAME_BYTES {
            return Err(MigrationError::Corrupt(format!(
                "{what} is {len} bytes long, more than {MAX_NAME_BYTES}"
            )));
        }
        self.take(len, what)
    }
    /// A count of entries at least `entry_len` bytes each, checked against what is left.
    fn count(&mut self, entry_len: usize, what: &str) -> Result<usize, MigrationError> {
        let count = self.u64(what)?;
        match usize::try_from(count) {
            Ok(n) if n.saturating_mul(entry_len) <= self.rest.len() => Ok(n),
            _ => Err(MigrationError::Corrupt(format!(
                "{count} {what} cannot fit in the {} bytes left",
                self.rest.len()
            ))),
        }
    }
}

/// Wraps `payload`, in format `version`, in the header.
fn seal(payload: Vec<u8>, version: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Checks the header and returns the format version and the payload.
fn open_sealed(stream: &[u8]) -> Result<(u32, &[u8]), MigrationError> {
    if stream.len() < STATE_MAGIC.len() {
        return Err(MigrationError::Truncated(format!(
            "{} bytes, not even the magic",
            stream.len()
        )));
    }
    if stream[..8] != STATE_MAGIC {
        return Err(MigrationError::BadMagic);
    }
    if stream.len() < HEADER_LEN {
        return Err(MigrationError::Truncated(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            stream.len()
        )));
    }
    let mut header = Reader {
        rest: &stream[8..HEADER_LEN],
    };
    let version = header.u32("version")?;
    if version > STATE_FORMAT_VERSION {
        return Err(MigrationError::NewerFormat {
            found: version,
            supported: STATE_FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(MigrationError::Corrupt("format version 0".into()));
    }
    let _reserved = header.u32("reserved word")?;
    let len = header.u64("payload length")?;
    let checksum = header.u32("checksum")?;
    let payload = &stream[HEADER_LEN..];
    match usize::try_from(len) {
        Ok(len) if len == payload.len() => {}
        Ok(len) if len > payload.len() => {
            return Err(MigrationError::Truncated(format!(
                "the header announces {len} payload bytes, {} arrived",
                payload.len()
            )))
        }
        _ => {
            return Err(MigrationError::Corrupt(format!(
                "the header announces {len} payload bytes, {} arrived",
                payload.len()
            )))
        }
    }
    if crc32c::crc32c(payload) != checksum {
        return Err(MigrationError::Corrupt(
            "the payload checksum does not match".into(),
        ));
    }
    Ok((version, payload))
}

/// The guest's locks as the source describes them.
#[derive(Default)]
struct LockRecords {
    /// (handle, write) for each handle holding a flock lock.
    flocks: Vec<(u64, bool)>,
    /// (inode, lock owner, ranges) for each owner holding POSIX locks on an inode.
    owners: Vec<(u64, u64, Vec<HeldRange>)>,
}

impl LockRecords {
    fn is_empty(&self) -> bool {
        self.flocks.is_empty() && self.owners.is_empty()
    }

    fn write(&self, w: &mut Writer) {
        w.u64(self.flocks.len() as u64);
        for &(fh, write) in &self.flocks {
            w.u64(fh);
            w.u8(u8::from(write));
        }
        w.u64(self.owners.len() as u64);
        for (inode, owner, ranges) in &self.owners {
            w.u64(*inode);
            w.u64(*owner);
            w.u64(ranges.len() as u64);
            for range in ranges {
                w.u8(u8::from(range.write));
                w.u64(range.start);
                w.u64(range.end);
            }
        }
    }

    /// Reads the records, checking each against the handles (`fh` to inode) and inodes the
    /// stream holds.
    fn read(
        r: &mut Reader<'_>,
        handles: &std::collections::HashMap<u64, u64>,
        inodes: &std::collections::HashSet<u64>,
    ) -> Result<Self, MigrationError> {
        let lock_type = |r: &mut Reader<'_>, what: &str| match r.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(MigrationError::Corrupt(format!("{what} {other}"))),
        };
        let mut records = LockRecords::default();
        let count = r.count(8 + 1, "flock locks")?;
        let mut seen = std::collections::HashSet::with_capacity(count);
        for _ in 0..count {
            let fh = r.u64("flock handle")?;
            let write = lock_type(r, "flock lock type")?;
            if !handles.contains_key(&fh) || !seen.insert(fh) {
                return Err(MigrationError::Corrupt(format!(
                    "a flock lock names handle {fh}, which the stream does not hold or \
                     names twice"
                )));
            }
            records.flocks.push((fh, write));
        }
        let count = r.count(8 + 8 + 8, "lock owners")?;
        let mut seen = std::collections::HashSet::with_capacity(count);
        for _ in 0..count {
            let inode = r.u64("lock inode")?;
            let owner = r.u64("lock owner")?;
            if !inodes.contains(&inode) || !seen.insert((inode, owner)) {
                return Err(MigrationError::Corrupt(format!(
                    "POSIX locks of owner {owner:#x} name inode {inode}, which the stream \
                     does not hold, or name it twice"
                )));
            }
            let ranges = r.count(1 + 8 + 8, "lock ranges")?;
            let mut held = Vec::with_capacity(ranges);
            for _ in 0..ranges {
                let write = lock_type(r, "POSIX lock type")?;
                let start = r.u64("lock start")?;
                let end = r.u64("lock end")?;
                if start > end || end > LOCK_TO_EOF {
                    return Err(MigrationError::Corrupt(format!(
                        "a POSIX lock of owner {owner:#x} on inode {inode} spans {start}..={end}"
                    )));
                }
                held.push(HeldRange { write, start, end });
            }
            records.owners.push((inode, owner, held));
        }
        Ok(records)
    }
}

fn write_waits(w: &mut Writer, waits: &[WaitingLock]) {
    w.u64(waits.len() as u64);
    for wait in waits {
        w.u32(u32::from(wait.origin.queue));
        w.u32(u32::from(wait.origin.head));
        w.u32(u32::from(wait.origin.queue_size));
        w.u64(wait.origin.desc_table);
        w.u32(u32::from(wait.avail));
        w.u64(wait.unique);
        w.u64(wait.nodeid);
        w.u64(wait.fh);
        w.u64(wait.owner);
        w.u64(wait.start);
        w.u64(wait.end);
        w.u32(wait.lock_type);
        w.u32(wait.pid);
        w.u32(wait.lk_flags);
    }
}

/// Reads the waiting lock requests, checking each against the handles (`fh` to inode) the
/// stream holds and, when known, the number of queues of this device.
fn read_waits(
    r: &mut Reader<'_>,
    handles: &std::collections::HashMap<u64, u64>,
    queues: Option<usize>,
) -> Result<Vec<WaitingLock>, MigrationError> {
    let count = r.count(WAIT_RECORD_LEN, "waiting lock requests")?;
    let mut waits = Vec::with_capacity(count);
    let mut seen = std::collections::HashSet::with_capacity(count);
    let corrupt = |queue: u32, head: u32, why: String| {
        MigrationError::Corrupt(format!(
            "the lock request waiting in descriptor chain {head} of queue {queue} {why}"
        ))
    };
    for _ in 0..count {
        let queue = r.u32("waiting request queue")?;
        let head = r.u32("waiting request head")?;
        let queue_size = r.u32("waiting request queue size")?;
        let desc_table = r.u64("waiting request descriptor table")?;
        let avail = r.u32("waiting request vring base")?;
        let unique = r.u64("waiting request unique")?;
        let nodeid = r.u64("waiting request node")?;
        let fh = r.u64("waiting request handle")?;
        let owner = r.u64("waiting request lock owner")?;
        let start = r.u64("waiting request lock start")?;
        let end = r.u64("waiting request lock end")?;
        let lock_type = r.u32("waiting request lock type")?;
        let pid = r.u32("waiting request lock pid")?;
        let lk_flags = r.u32("waiting request lock flags")?;
        if queues.is_some_and(|queues| queue as usize >= queues) {
            let queues = queues.unwrap_or(0);
            return Err(corrupt(
                queue,
                head,
                format!("names a queue this device does not have ({queues} queues)"),
            ));
        }
        if queue > u32::from(u16::MAX) {
            return Err(corrupt(queue, head, "names a queue out of range".into()));
        }
        if queue_size == 0 || queue_size > MAX_QUEUE_SIZE || !queue_size.is_power_of_two() {
            return Err(corrupt(
                queue,
                head,
                format!("has a queue size of {queue_size}"),
            ));
        }
        if head >= queue_size {
            return Err(corrupt(
                queue,
                head,
                format!("has a head index out of range (the queue has {queue_size} entries)"),
            ));
        }
        if avail > u32::from(u16::MAX) || desc_table % 16 != 0 {
            return Err(corrupt(
                queue,
                head,
                format!("has vring base {avail} and descriptor table {desc_table:#x}"),
            ));
        }
        if unique == 0 || !seen.insert((queue, head)) {
            return Err(corrupt(
                queue,
                head,
                "has unique id 0 or is listed twice".into(),
            ));
        }
        if handles.get(&fh) != Some(&nodeid) {
            return Err(corrupt(
                queue,
                head,
                format!("names handle {fh} of node {nodeid}, which the stream does not hold"),
            ));
        }
        let known_type = [libc::F_RDLCK, libc::F_WRLCK]
            .iter()
            .any(|&t| t as u32 == lock_type);
        if !known_type || start > end || end > LOCK_TO_EOF || lk_flags & !FUSE_LK_FLOCK != 0 {
            return Err(corrupt(
                queue,
                head,
                format!(
                    "asks for lock type {lock_type} on {start}..={end} with flags {lk_flags:#x}"
                ),
            ));
        }
        waits.push(WaitingLock {
            origin: QueueOrigin {
                queue: queue as u16,
                head: head as u16,
                queue_size: queue_size as u16,
                desc_table,
            },
            avail: avail as u16,
            unique,
            nodeid,
            fh,
            owner,
            start,
            end,
            lock_type,
            pid,
            lk_flags,
        });
    }
    Ok(waits)
}

/// FUSE_LK_FLOCK: a SETLKW for a flock lock.
const FUSE_LK_FLOCK: u32 = 1;

/// Reads the target of `/proc/self/fd/<fd>`.
fn fd_path(proc_self_fd: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let name = fd_name(fd.as_raw_fd());
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `name` is NUL-terminated, `buf` has room for the length passed; result checked.
    let len = unsafe {
        libc::readlinkat(
            proc_self_fd.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// `path` (as the kernel names the inode) relative to `root`, if it lies under it.
fn relative_to<'p>(path: &'p [u8], root: &[u8]) -> Option<&'p [u8]> {
    if root == b"/" {
        return path.strip_prefix(b"/");
    }
    let rest = path.strip_prefix(root)?;
    if rest.is_empty() {
        return Some(rest);
    }
    rest.strip_prefix(b"/")
}

/// Opens `relative` beneath `root` one component at a time, never following a symlink and
/// refusing `.`, `..` and empty components.
fn open_beneath(root: BorrowedFd<'_>, relative: &[u8]) -> io::Result<OwnedFd> {
    let mut current: Option<OwnedFd> = None;
    for component in relative.split(|&b| b == b'/') {
        if component.is_empty() || component == b"." || component == b".." {
            return Err(errno(libc::EINVAL));
        }
        let name = CString::new(component).map_err(|_| errno(libc::EINVAL))?;
        let dir = current.as_ref().map_or(root, |fd| fd.as_fd());
        current = Some(openat(dir, &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?);
    }
    current.ok_or_else(|| errno(libc::EINVAL))
}

fn display(bytes: &[u8]) -> String {
    Path::new(OsStr::from_bytes(bytes)).display().to_string()
}

impl PassthroughFs {
    /// The per-session flags FUSE_INIT negotiated, in the bit order the
    /// state stream uses; one list so saving and loading cannot disagree.
    fn session_flag_cells(&self) -> [&AtomicBool; SESSION_FLAGS] {
        [
            &self.writeback,
            &self.announce_submounts,
            &self.killpriv_v2,
            &self.posix_acl,
            &self.setxattr_ext,
            &self.security_ctx,
            // Added last: a stream from before per-file DAX reads as "not negotiated".
            &self.inode_dax,
        ]
    }

    fn session_flags(&self) -> u8 {
        self.session_flag_cells()
            .iter()
            .enumerate()
            .fold(0u8, |bits, (i, flag)| {
                bits | (u8::from(flag.load(Ordering::Relaxed)) << i)
            })
    }

    fn set_session_flags(&self, bits: u8) {
        for (i, flag) in self.session_flag_cells().iter().enumerate() {
            flag.store(bits & (1 << i) != 0, Ordering::Relaxed);
        }
    }

    /// The shared directory as the host names it, for the foreign-share check.
    fn share_name(&self) -> Vec<u8> {
        self.cfg
            .migration
            .share_path
            .as_ref()
            .unwrap_or(&self.cfg.root_dir)
            .as_os_str()
            .as_bytes()
            .to_vec()
    }

    fn root_inode(&self) -> Result<std::sync::Arc<InodeData>, MigrationError> {
        self.inodes
            .get(ROOT_ID)
            .map_err(io_error("finding the root inode"))
    }

    /// How the source describes `data`: (kind, path or handle bytes, handle for
    /// verification), or why it cannot.
    fn describe(
        &self,
        data: &InodeData,
        root_path: &[u8],
        root_fd: BorrowedFd<'_>,
    ) -> Result<Description, String> {
        let migration = &self.cfg.migration;
        if matches!(data.file, InodeFile::Lost) {
            return Err("it was lost in an earlier migration".into());
        }
        let fd = self.inode_fd(data).map_err(|e| {
            if e.raw_os_error() == Some(libc::ESTALE) {
                "it was deleted on the host (its file handle is stale)".to_owned()
            } else {
                format!("cannot open it ({e})")
            }
        })?;
        let handle_bytes = || {
            FileHandle::from_fd(fd.as_fd())
                .map(|h| h.to_bytes())
                .map_err(|e| format!("it has no file handle ({e})"))
        };
        match migration.mode {
            MigrationMode::FileHandles => Ok((KIND_HANDLE, handle_bytes()?, None)),
            MigrationMode::FindPaths => {
                let sx = statx(fd.as_fd(), EMPTY_CSTR).map_err(|e| format!("stat fails ({e})"))?;
                if sx.st.st_nlink == 0 && !data.is_dir() {
                    return Err("it was deleted on the host".into());
                }
                let path = fd_path(self.proc_self_fd.as_fd(), fd.as_fd())
                    .map_err(|e| format!("its path cannot be read ({e})"))?;
                if path.ends_with(b" (deleted)") {
                    return Err("it was deleted on the host".into());
                }
                let relative = relative_to(&path, root_path).ok_or_else(|| {
                    format!(
                        "it is now at {}, outside the shared directory (renamed away?)",
                        display(&path)
                    )
                })?;
                if relative.is_empty() {
                    return Err("its path names the shared directory itself".into());
                }
                if migration.confirm_paths {
                    let again = open_beneath(root_fd, relative).map_err(|e| {
                        format!("its path {} cannot be opened ({e})", display(relative))
                    })?;
                    let found = statx(again.as_fd(), EMPTY_CSTR)
                        .map_err(|e| format!("stat of {} fails ({e})", display(relative)))?;
                    if found.st.st_ino != sx.st.st_ino || found.st.st_dev != sx.st.st_dev {
                        return Err(format!(
                            "its path {} now leads to another inode (renamed meanwhile)",
                            display(relative)
                        ));
                    }
                }
                let verify = if migration.verify_handles {
                    Some(handle_bytes()?)
                } else {
                    None
                };
                Ok((KIND_PATH, relative.to_vec(), verify))
            }
        }
    }

    /// Serializes what the guest holds. With `--migration-on-error abort` an inode that cannot
    /// be described fails the save; with `guest-error` it is sent as lost.
    pub(crate) fn save_state(&self, session: &SessionState) -> Result<Vec<u8>, MigrationError> {
        let root = self.root_inode()?;
        let root_fd = self.inode_fd(&root).map_err(io_error("opening the root"))?;
        let root_path = fd_path(self.proc_self_fd.as_fd(), root_fd.as_fd())
            .map_err(io_error("reading the shared directory's path"))?;
        let mut w = Writer(Vec::new());
        w.bytes(&self.share_name());
        w.u64(root.key.dev);
        w.u64(root.key.ino);
        w.u8(u8::from(session.initialized));
        w.u8(self.session_flags());
        w.u64(self.inodes.next_id());
        w.u64(self.handles.next_id());

        let inodes = self.inodes.snapshot();
        w.u64(inodes.len() as u64);
        for data in &inodes {
            w.u64(data.id);
            w.u64(data.lookups());
            w.u32(data.file_type);
            if data.id == ROOT_ID {
                w.u8(KIND_PATH);
                w.bytes(b"");
                w.u8(0);
                continue;
            }
            match self.describe(data, &root_path, root_fd.as_fd()) {
                Ok((kind, bytes, verify)) => {
                    w.u8(kind);
                    w.bytes(&bytes);
                    match verify {
                        Some(handle) => {
                            w.u8(1);
                            w.bytes(&handle);
                        }
                        None => w.u8(0),
                    }
                }
                Err(reason) => match self.cfg.migration.on_error {
                    MigrationOnError::Abort => {
                        return Err(MigrationError::Undescribable {
                            id: data.id,
                            reason,
                        })
                    }
                    MigrationOnError::GuestError => {
                        tracing::warn!(
                            "Cannot describe inode {} to the destination: {reason}; the guest \
                             gets EIO for it after the migration (--migration-on-error \
                             guest-error).",
                            data.id
                        );
                        w.u8(KIND_LOST);
                        w.bytes(b"");
                        w.u8(0);
                    }
                },
            }
        }

        let handles = self.handles.snapshot();
        w.u64(handles.len() as u64);
        for (fh, handle) in &handles {
            let fd = handle.file.as_raw_fd();
            // SAFETY: F_GETFL on a descriptor this handle owns; the result is checked.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            if flags < 0 {
                return Err(MigrationError::Io {
                    what: "reading an open file's flags",
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: lseek on an owned descriptor; only a directory's position matters.
            let position = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
            w.u64(*fh);
            w.u64(handle.inode);
            w.u32(flags as u32);
            w.u64(position.max(0) as u64);
        }
        let locks = self.describe_locks(&handles)?;
        let waits = self.lock_waits.parked();
        if locks.is_empty() && waits.is_empty() {
            // Nothing format 2 adds: a destination that predates lock records reads it too.
            return Ok(seal(w.0, 1));
        }
        locks.write(&mut w);
        if waits.is_empty() {
            return Ok(seal(w.0, LOCKS_VERSION));
        }
        write_waits(&mut w, &waits);
        Ok(seal(w.0, WAITS_VERSION))
    }

    /// The locks the guest holds, read back from the kernel. A description whose locks
    /// cannot be read fails the save with `--migration-on-error abort`; with `guest-error`
    /// its locks are left behind (logged).
    fn describe_locks(
        &self,
        handles: &[(u64, Arc<HandleData>)],
    ) -> Result<LockRecords, MigrationError> {
        let mut records = LockRecords::default();
        let owner_files: Vec<((u64, u64), Arc<File>)> = match self.lock_files.lock() {
            Ok(files) => files.iter().map(|(k, f)| (*k, f.clone())).collect(),
            Err(_) => Vec::new(),
        };
        if owner_files.is_empty() && (!self.cfg.flock || handles.is_empty()) {
            return Ok(records);
        }
        let unreadable = |what: String, reason: String| -> Result<(), MigrationError> {
            match self.cfg.migration.on_error {
                MigrationOnError::Abort => {
                    Err(MigrationError::LocksUnreadable(format!("{what}: {reason}")))
                }
                MigrationOnError::GuestError => {
                    tracing::warn!(
                        "Cannot read the locks of {what} ({reason}); they do not move to the \
                         destination (--migration-on-error guest-error)."
                    );
                    Ok(())
                }
            }
        };
        let Some(fdinfo) = &self.proc_self_fdinfo else {
            unreadable(
                "any open file".into(),
                "/proc/self/fdinfo is out of reach in this sandbox".into(),
            )?;
            return Ok(records);
        };
        if self.cfg.flock {
            for (fh, handle) in handles {
                match held_by(fdinfo.as_fd(), handle.file.as_raw_fd(), LockClass::Flock) {
                    Ok(held) => {
                        if let Some(lock) = held.first() {
                            records.flocks.push((*fh, lock.write));
                        }
                    }
                    Err(e) => unreadable(format!("handle {fh}"), e.to_string())?,
                }
            }
        }
        for ((inode, owner), file) in owner_files {
            if self.inodes.get(inode).is_err() {
                continue;
            }
            match held_by(fdinfo.as_fd(), file.as_raw_fd(), LockClass::Posix) {
                Ok(held) if held.is_empty() => {}
                Ok(held) => records.owners.push((inode, owner, held)),
                Err(e) => unreadable(
                    format!("lock owner {owner:#x} on inode {inode}"),
                    e.to_string(),
                )?,
            }
        }
        Ok(records)
    }

    /// Takes a migrated lock on `fd`: held elsewhere, it is retried later (`pending`); refused
    /// for another reason, it fails the load (`abort`) or is lost (`guest-error`).
    fn take_migrated(
        &self,
        fd: std::os::fd::RawFd,
        lock: Pending,
        pending: &mut Vec<Pending>,
    ) -> Result<(), MigrationError> {
        let class = match lock.target {
            Target::Owner { .. } => LockClass::Posix,
            Target::Handle { .. } => LockClass::Flock,
        };
        match try_take(fd, class, lock.range) {
            Ok(true) => Ok(()),
            Ok(false) => {
                pending.push(lock);
                Ok(())
            }
            Err(e) => self.lock_not_restored(&lock, e.to_string()),
        }
    }

    fn lock_not_restored(&self, lock: &Pending, reason: String) -> Result<(), MigrationError> {
        match self.cfg.migration.on_error {
            MigrationOnError::Abort => {
                self.reset();
                Err(MigrationError::LockNotRestored {
                    what: lock.what(),
                    reason,
                })
            }
            MigrationOnError::GuestError => {
                self.lock_restore.lose_now(lock, &reason);
                Ok(())
            }
        }
    }

    /// A description of `data` for an owner's POSIX locks: writable for write locks, readable
    /// for read locks (read-write when it can be).
    fn open_lock_file(&self, data: &InodeData, ranges: &[HeldRange]) -> io::Result<File> {
        let flags = libc::O_NONBLOCK | libc::O_NOCTTY;
        self.open_inode(data, libc::O_RDWR | flags).or_else(|e| {
            let reads = ranges.iter().any(|r| !r.write);
            let writes = ranges.iter().any(|r| r.write);
            match (reads, writes) {
                (true, false) => self.open_inode(data, libc::O_RDONLY | flags),
                (false, true) => self.open_inode(data, libc::O_WRONLY | flags),
                _ => Err(e),
            }
        })
    }

    /// Takes the guest's locks again on the rebuilt handles and owner descriptions.
    fn restore_locks(
        &self,
        locks: LockRecords,
        handle_inodes: &std::collections::HashMap<u64, u64>,
    ) -> Result<(), MigrationError> {
        let mut pending = Vec::new();
        for (fh, write) in locks.flocks {
            let Some(&inode) = handle_inodes.get(&fh) else {
                continue;
            };
            // A handle that was not rebuilt already fails with EBADF.
            let Ok(handle) = self.handles.get(inode, fh) else {
                continue;
            };
            let lock = Pending {
                inode,
                target: Target::Handle {
                    fh,
                    handle: Arc::downgrade(&handle),
                },
                range: HeldRange::whole(write),
            };
            self.take_migrated(handle.file.as_raw_fd(), lock, &mut pending)?;
        }
        for (inode, owner, ranges) in locks.owners {
            let data = match self.inodes.get(inode) {
                Ok(data) if !matches!(data.file, InodeFile::Lost) => data,
                // The inode itself fails with EIO.
                _ => continue,
            };
            let file = match self.open_lock_file(&data, &ranges) {
                Ok(file) => Arc::new(file),
                Err(e) => {
                    for range in ranges {
                        let lock = Pending {
                            inode,
                            target: Target::Owner {
                                owner,
                                file: std::sync::Weak::new(),
                            },
                            range,
                        };
                        self.lock_not_restored(&lock, format!("the file cannot be opened ({e})"))?;
                    }
                    continue;
                }
            };
            if let Ok(mut files) = self.lock_files.lock() {
                files.insert((inode, owner), file.clone());
            }
            for range in ranges {
                let lock = Pending {
                    inode,
                    target: Target::Owner {
                        owner,
                        file: Arc::downgrade(&file),
                    },
                    range,
                };
                self.take_migrated(file.as_raw_fd(), lock, &mut pending)?;
            }
        }
        let timeout = self
            .cfg
            .migration
            .lock_reacquire_timeout
            .unwrap_or(DEFAULT_REACQUIRE_TIMEOUT);
        self.lock_restore.start(pending, timeout);
        Ok(())
    }

    /// Rebuilds what the guest held from a stream [`save_state`](Self::save_state) wrote,
    /// after checking all of it; returns the guest's session state. Whatever the guest held
    /// on this daemon before is dropped first.
    #[cfg(test)]
    pub(crate) fn load_state(&self, stream: &[u8]) -> Result<SessionState, MigrationError> {
        self.load_state_for(stream, None)
    }

    /// [`load_state`](Self::load_state) for a device with `queues` queues (when known): a
    /// waiting lock request must come from one of them.
    pub(crate) fn load_state_for(
        &self,
        stream: &[u8],
        queues: Option<usize>,
    ) -> Result<SessionState, MigrationError> {
        let (version, payload) = open_sealed(stream)?;
        let mut r = Reader { rest: payload };
        let share = r.bytes("share path")?.to_vec();
        let root_dev = r.u64("share device")?;
        let root_ino = r.u64("share inode")?;
        let root = self.root_inode()?;
        let ours = self.share_name();
        if share != ours && (root_dev, root_ino) != (root.key.dev, root.key.ino) {
            return Err(MigrationError::ForeignShare {
                theirs: display(&share),
                ours: display(&ours),
            });
        }
        let initialized = r.u8("session state")? != 0;
        let flags = r.u8("session flags")?;
        if flags >> SESSION_FLAGS != 0 {
            return Err(MigrationError::Corrupt(format!(
                "unknown session flags {flags:#x}"
            )));
        }
        let next_inode = r.u64("next inode id")?;
        let next_handle = r.u64("next handle")?;

        struct Inode {
            id: u64,
            lookups: u64,
            file_type: u32,
            kind: u8,
            bytes: Vec<u8>,
            verify: Option<Vec<u8>>,
        }
        let count = r.count(8 + 8 + 4 + 1 + 4 + 1, "inodes")?;
        let mut inodes = Vec::with_capacity(count);
        let mut seen = std::collections::HashSet::with_capacity(count);
        for _ in 0..count {
            let id = r.u64("inode id")?;
            let lookups = r.u64("lookup count")?;
            let file_type = r.u32("file type")?;
            let kind = r.u8("inode kind")?;
            let bytes = r.bytes("inode path or handle")?.to_vec();
            let verify = match r.u8("handle flag")? {
                0 => None,
                1 => Some(r.bytes("verification handle")?.to_vec()),
                other => {
                    return Err(MigrationError::Corrupt(format!(
                        "handle flag {other} of inode {id}"
                    )))
                }
            };
            if id == 0 || !seen.insert(id) {
                return Err(MigrationError::Corrupt(format!(
                    "inode id {id} is zero or repeated"
                )));
            }
            if kind > KIND_LOST || file_type & !libc::S_IFMT != 0 {
                return Err(MigrationError::Corrupt(format!(
                    "inode {id} has kind {kind} and type {file_type:#o}"
                )));
            }
            inodes.push(Inode {
                id,
                lookups,
                file_type,
                kind,
                bytes,
                verify,
            });
        }
        if !seen.contains(&ROOT_ID) {
            return Err(MigrationError::Corrupt("the root inode is missing".into()));
        }
        let handle_count = r.count(8 + 8 + 4 + 8, "open handles")?;
        let mut handles = Vec::with_capacity(handle_count);
        let mut handle_inodes = std::collections::HashMap::with_capacity(handle_count);
        for _ in 0..handle_count {
            let fh = r.u64("handle number")?;
            let inode = r.u64("handle inode")?;
            let flags = r.u32("open flags")?;
            let position = r.u64("directory position")?;
            if fh == 0 || !seen.contains(&inode) {
                return Err(MigrationError::Corrupt(format!(
                    "handle {fh} refers to inode {inode}, which the stream does not hold"
                )));
            }
            handles.push((fh, inode, flags, position));
            handle_inodes.insert(fh, inode);
        }
        let locks = if version >= LOCKS_VERSION {
            LockRecords::read(&mut r, &handle_inodes, &seen)?
        } else {
            LockRecords::default()
        };
        let waits = if version >= WAITS_VERSION {
            read_waits(&mut r, &handle_inodes, queues)?
        } else {
            Vec::new()
        };
        if !r.rest.is_empty() {
            return Err(MigrationError::Corrupt(format!(
                "{} bytes follow the last entry",
                r.rest.len()
            )));
        }

        // Everything parsed: rebuild.
        self.reset();
        let root_fd = self.inode_fd(&root).map_err(io_error("opening the root"))?;
        let mount_fd = self.mount_fds.get(root.key.mnt_id).ok();
        for inode in &inodes {
            if inode.id == ROOT_ID {
                root.set_lookups(inode.lookups.max(1));
                continue;
            }
            let found = if inode.kind == KIND_LOST {
                // The source already chose EIO for it (its own --migration-on-error).
                Err(None)
            } else {
                self.find_again(
                    inode.kind,
                    &inode.bytes,
                    inode.verify.as_deref(),
                    inode.file_type,
                    root_fd.as_fd(),
                    mount_fd.as_deref(),
                )
                .map_err(Some)
            };
            let file = match found {
                Ok(found) => Some(found),
                Err(None) => None,
                Err(Some(reason)) => {
                    let what = match inode.kind {
                        KIND_PATH => format!("path {}", display(&inode.bytes)),
                        _ => "by file handle".to_owned(),
                    };
                    match self.cfg.migration.on_error {
                        MigrationOnError::Abort => {
                            self.reset();
                            return Err(MigrationError::NotFound {
                                id: inode.id,
                                what,
                                reason,
                            });
                        }
                        MigrationOnError::GuestError => {
                            tracing::warn!(
                                "Cannot find inode {} ({what}) again: {reason}; the guest gets \
                                 EIO for it (--migration-on-error guest-error).",
                                inode.id
                            );
                            None
                        }
                    }
                }
            };
            let data = match file {
                Some((fd, key)) => {
                    let mut data = InodeData::new(key, InodeFile::Fd(fd), inode.file_type);
                    data.id = inode.id;
                    data
                }
                None => {
                    let key = InodeKey {
                        ino: 0,
                        dev: 0,
                        mnt_id: 0,
                    };
                    let mut data = InodeData::new(key, InodeFile::Lost, inode.file_type);
                    data.id = inode.id;
                    data
                }
            };
            data.set_lookups(inode.lookups.max(1));
            self.inodes
                .restore(data, next_inode)
                .map_err(io_error("rebuilding the inode table"))?;
        }

        for (fh, inode, flags, position) in handles {
            let data = match self.inodes.get(inode) {
                Ok(data) if !matches!(data.file, InodeFile::Lost) => data,
                // The guest's calls on it fail as its inode's do.
                _ => continue,
            };
            let flags = (flags as libc::c_int)
                & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY);
            let file = match self.open_inode(&data, flags) {
                Ok(file) => file,
                Err(e) => {
                    if self.cfg.migration.on_error == MigrationOnError::Abort {
                        self.reset();
                        return Err(MigrationError::NotFound {
                            id: inode,
                            what: format!("open handle {fh}"),
                            reason: e.to_string(),
                        });
                    }
                    tracing::warn!(
                        "Cannot reopen handle {fh} of inode {inode}: {e}; the guest gets \
                         EBADF for it."
                    );
                    continue;
                }
            };
            if data.is_dir() && position > 0 {
                // SAFETY: lseek on the directory just opened; a failure leaves it at 0.
                unsafe { libc::lseek(file.as_raw_fd(), position as libc::off_t, libc::SEEK_SET) };
            }
            let handle = HandleData {
                inode,
                file,
                dir_cursor: Mutex::new(()),
                locks_lost: AtomicBool::new(false),
            };
            if let Err(e) = self.handles.restore(fh, handle, next_handle) {
                self.reset();
                return Err(MigrationError::Corrupt(format!(
                    "handle {fh} cannot be restored ({e})"
                )));
            }
        }
        self.restore_locks(locks, &handle_inodes)?;
        self.set_session_flags(flags);
        self.lock_waits.set_parked(waits);
        Ok(SessionState { initialized })
    }

    /// Opens the inode a stream entry describes; the descriptor and its key, or why not.
    fn find_again(
        &self,
        kind: u8,
        bytes: &[u8],
        verify: Option<&[u8]>,
        file_type: u32,
        root_fd: BorrowedFd<'_>,
        mount_fd: Option<&OwnedFd>,
    ) -> Result<(OwnedFd, InodeKey), String> {
        let fd = match kind {
            KIND_PATH => open_beneath(root_fd, bytes).map_err(|e| e.to_string())?,
            KIND_HANDLE => {
                let handle = FileHandle::from_bytes(bytes)
                    .ok_or_else(|| "the file handle is malformed".to_owned())?;
                let mount_fd =
                    mount_fd.ok_or_else(|| "file handles are not usable here".to_owned())?;
                handle
                    .open(mount_fd.as_fd(), libc::O_PATH)
                    .map_err(|e| e.to_string())?
            }
            _ => return Err("the source could not describe it".into()),
        };
        let sx = statx(fd.as_fd(), EMPTY_CSTR).map_err(|e| e.to_string())?;
        if sx.st.st_mode & libc::S_IFMT != file_type {
            return Err(format!(
                "it is of type {:#o} here, {file_type:#o} on the source",
                sx.st.st_mode & libc::S_IFMT
            ));
        }
        if let Some(expected) = verify {
            let here = FileHandle::from_fd(fd.as_fd())
                .map_err(|e| format!("its file handle cannot be read ({e})"))?;
            if here.to_bytes() != expected {
                return Err("it is not the inode the source had (file handles differ)".into());
            }
        }
        let key = InodeKey {
            ino: sx.st.st_ino,
            dev: sx.st.st_dev,
            mnt_id: sx.mnt_id,
        };
        Ok((fd, key))
    }
}

/// Reads a whole state stream from `file` (a pipe from the VMM), up to `limit` bytes.
pub fn read_stream(file: &mut File, limit: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    file.take(limit as u64 + 1).read_to_end(&mut out)?;
    if out.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the state stream is larger than {limit} bytes"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_payload_opens_and_damage_is_named() {
        let sealed = seal(b"payload".to_vec(), STATE_FORMAT_VERSION);
        assert_eq!(
            open_sealed(&sealed).unwrap(),
            (STATE_FORMAT_VERSION, &b"payload"[..])
        );
        assert!(matches!(
            open_sealed(&sealed[..sealed.len() - 1]),
            Err(MigrationError::Truncated(_))
        ));
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(matches!(
            open_sealed(&longer),
            Err(MigrationError::Corrupt(_))
        ));
        let mut flipped = sealed.clone();
        flipped[HEADER_LEN] ^= 1;
        assert!(matches!(
            open_sealed(&flipped),
            Err(MigrationError::Corrupt(_))
        ));
        let mut newer = sealed.clone();
        newer[8..12].copy_from_slice(&(STATE_FORMAT_VERSION + 1).to_le_bytes());
        assert!(matches!(
            open_sealed(&newer),
            Err(MigrationError::NewerFormat { .. })
        ));
        assert!(matches!(
            open_sealed(b"NOTBERTH and more"),
            Err(MigrationError::BadMagic)
        ));
    }

    #[test]
    fn counts_larger_than_the_stream_are_refused_before_allocating() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut reader = Reader { rest: &payload };
        assert!(reader.count(8, "inodes").is_err());
    }

    #[test]
    fn paths_are_relative_to_the_share_only() {
        assert_eq!(
            relative_to(b"/srv/share/a/b", b"/srv/share"),
            Some(&b"a/b"[..])
        );
        assert_eq!(relative_to(b"/srv/shared/a", b"/srv/share"), None);
        assert_eq!(relative_to(b"/a/b", b"/"), Some(&b"a/b"[..]));
        assert_eq!(relative_to(b"/other", b"/srv/share"), None);
    }

    #[test]
    fn per_file_dax_travels_with_the_session() {
        let dir = std::env::temp_dir().join(format!("berth-mig-dax-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = || crate::Config {
            root_dir: dir.clone(),
            dax_policy: crate::DaxPolicy::Always,
            ..Default::default()
        };
        let source = PassthroughFs::new(config()).unwrap();
        source.inode_dax.store(true, Ordering::Relaxed);
        let stream = source
            .save_state(&SessionState { initialized: true })
            .unwrap();
        let destination = PassthroughFs::new(config()).unwrap();
        assert!(!destination.inode_dax.load(Ordering::Relaxed));
        destination.load_state(&stream).unwrap();
        assert!(
            destination.inode_dax.load(Ordering::Relaxed),
            "FUSE_HAS_INODE_DAX negotiated on the source holds on the destination"
        );
        drop((source, destination));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    mod locks {
        use super::*;
        use crate::lock_wait::WaitOutcome;
        use crate::MigrationConfig;
        use fuse_backend_rs::api::filesystem::{Context, FileLock, FileSystem};
        use std::path::PathBuf;
        use std::time::{Duration, Instant};

        const FLOCK: u32 = 1;

        struct Share(PathBuf);

        impl Share {
            fn new(name: &str) -> Self {
                let dir = std::env::temp_dir()
                    .join(format!("berth-miglock-{name}-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("f"), vec![7u8; 4096]).unwrap();
                Share(dir)
            }

            fn fs(&self, on_error: MigrationOnError, timeout: Duration) -> PassthroughFs {
                PassthroughFs::new(crate::Config {
                    root_dir: self.0.clone(),
                    posix_lock: true,
                    flock: true,
                    migration: MigrationConfig {
                        on_error,
                        lock_reacquire_timeout: Some(timeout),
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .unwrap()
            }

            /// A host process's own description of the shared file.
            fn host_file(&self) -> File {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(self.0.join("f"))
                    .unwrap()
            }

            /// Whether a host description is refused `range` (and lets go of it if not).
            fn host_conflicts(&self, class: LockClass, range: HeldRange) -> bool {
                !try_take(self.host_file().as_raw_fd(), class, range).unwrap()
            }
        }

        impl Drop for Share {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }

        fn lock(kind: libc::c_int, start: u64, end: u64) -> FileLock {
            FileLock {
                start,
                end,
                lock_type: kind as u32,
                pid: 0,
            }
        }

        fn range(write: bool, start: u64, end: u64) -> HeldRange {
            HeldRange { write, start, end }
        }

        /// The guest's view: the file looked up and opened read-write.
        fn open_f(fs: &PassthroughFs) -> (u64, u64) {
            let ctx = Context::default();
            let entry = fs.lookup(&ctx, ROOT_ID, c"f").unwrap();
            let (fh, _, _) = fs.open(&ctx, entry.inode, libc::O_RDWR as u32, 0).unwrap();
            (entry.inode, fh.unwrap())
        }

        /// Takes the pending locks again, as the migration thread does, until none is left.
        fn wait_settled(fs: &PassthroughFs) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while fs.lock_restore.wait_round(crate::LOCK_RETRY_INTERVAL) {
                assert!(Instant::now() < deadline, "the pending locks never settled");
            }
            assert_eq!(fs.lock_restore.pending_count(), 0);
        }

        fn version_of(stream: &[u8]) -> u32 {
            open_sealed(stream).unwrap().0
        }

        /// The source of the tests below: owner 7 holds a write lock on bytes 10..=19 and a
        /// read lock from 100 on, and the handle holds an exclusive flock lock.
        fn locked_source(share: &Share) -> (PassthroughFs, u64, u64, Vec<u8>) {
            let source = share.fs(MigrationOnError::Abort, Duration::from_secs(10));
            let ctx = Context::default();
            let (inode, fh) = open_f(&source);
            let unlocked = source
                .save_state(&SessionState { initialized: true })
                .unwrap();
            assert_eq!(version_of(&unlocked), 1, "no lock: the older format");
            source
                .setlk(&ctx, inode, fh, 7, lock(libc::F_WRLCK, 10, 19), 0)
                .unwrap();
            source
                .setlk(&ctx, inode, fh, 7, lock(libc::F_RDLCK, 100, LOCK_TO_EOF), 0)
                .unwrap();
            source
                .setlk(
                    &ctx,
                    inode,
                    fh,
                    7,
                    lock(libc::F_WRLCK, 0, LOCK_TO_EOF),
                    FLOCK,
                )
                .unwrap();
            let stream = source
                .save_state(&SessionState { initialized: true })
                .unwrap();
            assert_eq!(version_of(&stream), LOCKS_VERSION);
            (source, inode, fh, stream)
        }

        #[test]
        fn locks_move_and_the_destination_waits_for_the_source_to_let_go() {
            let share = Share::new("move");
            let (source, inode, fh, stream) = locked_source(&share);
            let destination = share.fs(MigrationOnError::Abort, Duration::from_secs(10));
            destination.load_state(&stream).unwrap();
            // The read range is shared with the source's copy; the write range and the
            // exclusive flock wait for the source.
            let mut pending = destination.lock_restore.pending_classes();
            pending.sort_by_key(|c| *c == LockClass::Flock);
            assert_eq!(pending, vec![LockClass::Posix, LockClass::Flock]);
            let ctx = Context::default();
            std::thread::scope(|s| {
                // Another guest lock owner asks for the write range meanwhile: it must not be
                // granted in the instant between the source letting go and the destination
                // taking it again.
                let other = s.spawn(|| {
                    destination.setlk(&ctx, inode, fh, 8, lock(libc::F_WRLCK, 12, 12), 0)
                });
                std::thread::sleep(Duration::from_millis(200));
                // Still held by the source: retrying changes nothing.
                assert!(destination.lock_restore.retry_round());
                assert!(
                    !other.is_finished(),
                    "lock requests wait while locks are pending"
                );
                drop(source);
                s.spawn(|| wait_settled(&destination));
                let answer = other.join().unwrap();
                assert_eq!(
                    answer.err().and_then(|e| e.raw_os_error()),
                    Some(libc::EAGAIN),
                    "the migrated write lock refuses another owner"
                );
            });
            wait_settled(&destination);
            // Held on the host by the destination now.
            assert!(share.host_conflicts(LockClass::Posix, range(true, 15, 15)));
            assert!(share.host_conflicts(LockClass::Posix, range(true, 200, 300)));
            assert!(!share.host_conflicts(LockClass::Posix, range(false, 200, 300)));
            assert!(!share.host_conflicts(LockClass::Posix, range(true, 20, 99)));
            assert!(share.host_conflicts(LockClass::Flock, HeldRange::whole(false)));
            // GETLK of another owner sees the migrated lock.
            let seen = destination
                .getlk(&ctx, inode, fh, 9, lock(libc::F_WRLCK, 0, 15), 0)
                .unwrap();
            assert_eq!(
                (seen.lock_type, seen.start, seen.end),
                (libc::F_WRLCK as u32, 10, 19)
            );
            // The guest unlocks and locks again.
            destination
                .setlk(&ctx, inode, fh, 7, lock(libc::F_UNLCK, 10, 19), 0)
                .unwrap();
            assert!(!share.host_conflicts(LockClass::Posix, range(true, 15, 15)));
            destination
                .setlk(&ctx, inode, fh, 7, lock(libc::F_WRLCK, 10, 19), 0)
                .unwrap();
            assert!(share.host_conflicts(LockClass::Posix, range(true, 15, 15)));
            destination
                .setlk(
                    &ctx,
                    inode,
                    fh,
                    7,
                    lock(libc::F_UNLCK, 0, LOCK_TO_EOF),
                    FLOCK,
                )
                .unwrap();
            assert!(!share.host_conflicts(LockClass::Flock, HeldRange::whole(true)));
            destination
                .setlk(
                    &ctx,
                    inode,
                    fh,
                    7,
                    lock(libc::F_RDLCK, 0, LOCK_TO_EOF),
                    FLOCK,
                )
                .unwrap();
            assert!(share.host_conflicts(LockClass::Flock, HeldRange::whole(true)));
            // Closing drops the owner's POSIX locks.
            destination.flush(&ctx, inode, fh, 7).unwrap();
            assert!(!share.host_conflicts(LockClass::Posix, range(true, 0, LOCK_TO_EOF)));
        }

        #[test]
        fn a_lock_the_source_lets_go_of_is_taken_at_once_not_at_the_next_try() {
            let share = Share::new("at-once");
            let (source, _, _, stream) = locked_source(&share);
            let destination = share.fs(MigrationOnError::Abort, Duration::from_secs(20));
            destination.load_state(&stream).unwrap();
            assert_eq!(destination.lock_restore.pending_count(), 2);
            // Rounds far longer than the test: only the kernel's wake-up can end the wait.
            let tick = Duration::from_secs(30);
            std::thread::scope(|s| {
                let waiter = s.spawn(|| while destination.lock_restore.wait_round(tick) {});
                std::thread::sleep(Duration::from_millis(200));
                assert!(!waiter.is_finished(), "the source still holds both locks");
                let released = Instant::now();
                drop(source);
                while !waiter.is_finished() {
                    assert!(
                        released.elapsed() < Duration::from_secs(5),
                        "the locks were not taken once the source let go (left: {})",
                        destination.lock_restore.pending_count()
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            assert_eq!(destination.lock_restore.pending_count(), 0);
            assert!(share.host_conflicts(LockClass::Posix, range(false, 15, 15)));
            assert!(share.host_conflicts(LockClass::Flock, HeldRange::whole(false)));
        }

        #[test]
        fn a_lock_another_host_process_took_is_lost_and_reported() {
            let share = Share::new("lost");
            let (source, inode, fh, stream) = locked_source(&share);
            drop(source);
            // A host process takes the write range and the flock before the destination.
            let thief = share.host_file();
            assert!(try_take(thief.as_raw_fd(), LockClass::Posix, range(true, 15, 15)).unwrap());
            assert!(
                try_take(thief.as_raw_fd(), LockClass::Flock, HeldRange::whole(false)).unwrap()
            );
            let destination = share.fs(MigrationOnError::GuestError, Duration::from_millis(300));
            destination.load_state(&stream).unwrap();
            wait_settled(&destination);
            let ctx = Context::default();
            let errno_of = |r: io::Result<()>| r.err().and_then(|e| e.raw_os_error());
            // Owner 7's lock requests on the file fail; another owner's do not.
            assert_eq!(
                errno_of(destination.setlk(&ctx, inode, fh, 7, lock(libc::F_UNLCK, 0, 5), 0)),
                Some(libc::EIO)
            );
            // The flock handle fails every request.
            assert_eq!(
                errno_of(destination.setlk(
                    &ctx,
                    inode,
                    fh,
                    7,
                    lock(libc::F_UNLCK, 0, LOCK_TO_EOF),
                    FLOCK
                )),
                Some(libc::EIO)
            );
            assert_eq!(
                errno_of(destination.flush(&ctx, inode, fh, 7)),
                Some(libc::EIO),
                "close reports the lost flock"
            );
            // The flush dropped owner 7's locks: it starts afresh.
            let (_, fh2) = open_f(&destination);
            assert_eq!(
                errno_of(destination.setlk(&ctx, inode, fh2, 7, lock(libc::F_WRLCK, 30, 40), 0)),
                None
            );
            // The read range that did not conflict was taken again, then dropped by the flush.
            assert!(!share.host_conflicts(LockClass::Posix, range(true, 200, 300)));
        }

        /// A SETLKW of owner 8 parked in chain 5 of queue 1.
        fn parked_request(inode: u64, fh: u64) -> WaitingLock {
            WaitingLock {
                origin: QueueOrigin {
                    queue: 1,
                    head: 5,
                    queue_size: 64,
                    desc_table: 0x10_0000,
                },
                avail: 9,
                unique: 42,
                nodeid: inode,
                fh,
                owner: 8,
                start: 10,
                end: 19,
                lock_type: libc::F_WRLCK as u32,
                pid: 1234,
                lk_flags: 0,
            }
        }

        #[test]
        fn a_wait_is_parked_when_its_queue_stops_and_resumed_when_it_starts() {
            let share = Share::new("park");
            let fs = share.fs(MigrationOnError::Abort, Duration::from_secs(1));
            let ctx = Context::default();
            let (inode, fh) = open_f(&fs);
            fs.setlk(&ctx, inode, fh, 7, lock(libc::F_WRLCK, 0, 99), 0)
                .unwrap();
            let request = parked_request(inode, fh);
            std::thread::scope(|scope| {
                let waiter = scope.spawn(|| fs.setlk_wait_parkable(request, false));
                std::thread::sleep(Duration::from_millis(200));
                assert!(
                    !waiter.is_finished(),
                    "the request waits for owner 7's lock"
                );
                assert_eq!(fs.lock_waits.park_queue(1, 11), 1);
                assert!(matches!(waiter.join().unwrap(), WaitOutcome::Parked));
            });
            let parked = fs.lock_waits.parked();
            assert_eq!(
                parked,
                vec![WaitingLock {
                    avail: 11,
                    ..request
                }]
            );
            // A request of the stopped queue served after the stop parks at once.
            let late = WaitingLock {
                origin: QueueOrigin {
                    head: 6,
                    ..request.origin
                },
                unique: 44,
                ..request
            };
            assert!(matches!(
                fs.setlk_wait_parkable(late, false),
                WaitOutcome::Parked
            ));
            assert!(fs
                .lock_waits
                .parked()
                .contains(&WaitingLock { avail: 11, ..late }));
            // Nothing is resumed while the queue is stopped; then each one once.
            assert!(fs.lock_waits.to_resume(|_| true).is_empty());
            fs.lock_waits.queue_started(1);
            let resumed = fs.lock_waits.to_resume(|_| true);
            assert_eq!(resumed.len(), 2);
            assert!(fs.lock_waits.to_resume(|_| true).is_empty());
            // Still listed for a save until taken up.
            assert_eq!(fs.lock_waits.parked().len(), 2);
            fs.setlk(&ctx, inode, fh, 7, lock(libc::F_UNLCK, 0, 99), 0)
                .unwrap();
            assert!(matches!(
                fs.setlk_wait_parkable(resumed[0], true),
                WaitOutcome::Answered(Ok(()))
            ));
            assert!(share.host_conflicts(LockClass::Posix, range(true, 15, 15)));
            // A new session drops what is left.
            fs.reset();
            assert!(matches!(
                fs.setlk_wait_parkable(resumed[1], true),
                WaitOutcome::Gone
            ));
        }

        #[test]
        fn waiting_requests_round_trip_in_format_3_only_when_there_is_one() {
            let share = Share::new("waits");
            let source = share.fs(MigrationOnError::Abort, Duration::from_secs(1));
            let (inode, fh) = open_f(&source);
            let session = SessionState { initialized: true };
            let parked = vec![
                parked_request(inode, fh),
                WaitingLock {
                    origin: QueueOrigin {
                        head: 0,
                        ..parked_request(inode, fh).origin
                    },
                    unique: 43,
                    lk_flags: FLOCK,
                    end: LOCK_TO_EOF,
                    ..parked_request(inode, fh)
                },
            ];
            source.lock_waits.set_parked(parked.clone());
            let stream = source.save_state(&session).unwrap();
            assert_eq!(version_of(&stream), WAITS_VERSION);
            let destination = share.fs(MigrationOnError::Abort, Duration::from_secs(1));
            destination.load_state_for(&stream, Some(2)).unwrap();
            assert_eq!(destination.lock_waits.parked(), parked);
            // A device without queue 1 refuses it.
            match destination.load_state_for(&stream, Some(1)) {
                Err(e @ MigrationError::Corrupt(_)) => {
                    assert!(
                        e.to_string().contains("queue this device does not have"),
                        "{e}"
                    )
                }
                other => panic!("expected a refusal, got {:?}", other.err()),
            }
            // Without one, the older formats.
            source.lock_waits.set_parked(Vec::new());
            assert_eq!(version_of(&source.save_state(&session).unwrap()), 1);
            // A destination that predates format 3 refuses it as newer.
            let mut newer = stream.clone();
            newer[8..12].copy_from_slice(&(WAITS_VERSION + 1).to_le_bytes());
            assert!(matches!(
                destination.load_state(&newer),
                Err(MigrationError::NewerFormat { .. })
            ));
        }

        #[test]
        fn damaged_waiting_requests_are_refused_with_the_reason() {
            let share = Share::new("badwaits");
            let source = share.fs(MigrationOnError::Abort, Duration::from_secs(1));
            let (inode, fh) = open_f(&source);
            source
                .lock_waits
                .set_parked(vec![parked_request(inode, fh)]);
            let stream = source
                .save_state(&SessionState { initialized: true })
                .unwrap();
            let (_, payload) = open_sealed(&stream).unwrap();
            let at = payload.len() - WAIT_RECORD_LEN;
            assert_eq!(&payload[at - 8..at], &1u64.to_le_bytes());
            let destination = share.fs(MigrationOnError::Abort, Duration::from_secs(1));
            let refused = |payload: &[u8], version: u32| -> String {
                match destination.load_state_for(&seal(payload.to_vec(), version), Some(2)) {
                    Err(e @ MigrationError::Corrupt(_)) => e.to_string(),
                    other => panic!("expected a corrupt-stream refusal, got {:?}", other.err()),
                }
            };
            let patched = |offset: usize, bytes: &[u8]| {
                let mut p = payload.to_vec();
                p[at + offset..at + offset + bytes.len()].copy_from_slice(bytes);
                p
            };
            for (what, damaged, reason) in [
                ("queue", patched(0, &7u32.to_le_bytes()), "does not have"),
                (
                    "head",
                    patched(4, &64u32.to_le_bytes()),
                    "head index out of range",
                ),
                ("queue size", patched(8, &48u32.to_le_bytes()), "queue size"),
                (
                    "vring base",
                    patched(20, &65536u32.to_le_bytes()),
                    "vring base",
                ),
                ("unique", patched(24, &0u64.to_le_bytes()), "unique id 0"),
                ("node", patched(32, &4242u64.to_le_bytes()), "does not hold"),
                (
                    "handle",
                    patched(40, &999u64.to_le_bytes()),
                    "does not hold",
                ),
                (
                    "range",
                    patched(56, &20u64.to_le_bytes()),
                    "asks for lock type",
                ),
                (
                    "type",
                    patched(72, &2u32.to_le_bytes()),
                    "asks for lock type",
                ),
                (
                    "flags",
                    patched(80, &2u32.to_le_bytes()),
                    "asks for lock type",
                ),
            ] {
                let refusal = refused(&damaged, WAITS_VERSION);
                assert!(refusal.contains(reason), "{what}: {refusal}");
            }
            let twice = {
                let mut p = payload[..at - 8].to_vec();
                p.extend_from_slice(&2u64.to_le_bytes());
                p.extend_from_slice(&payload[at..]);
                p.extend_from_slice(&payload[at..]);
                p
            };
            assert!(refused(&twice, WAITS_VERSION).contains("listed twice"));
            let cut = refused(&payload[..payload.len() - 1], WAITS_VERSION);
            assert!(cut.contains("waiting lock requests cannot fit"), "{cut}");
            // Read as format 2, the record is bytes that should not be there.
            assert!(refused(payload, LOCKS_VERSION).contains("follow the last entry"));
            for len in 0..payload.len() {
                assert!(destination
                    .load_state_for(&seal(payload[..len].to_vec(), WAITS_VERSION), Some(2))
                    .is_err());
            }
            assert!(destination.load_state_for(&stream, Some(2)).is_ok());
        }

        #[test]
        fn damaged_lock_records_are_refused_with_the_reason() {
            let share = Share::new("corrupt");
            let (source, _inode, fh, stream) = locked_source(&share);
            drop(source);
            let (_, payload) = open_sealed(&stream).unwrap();
            // The lock section ends the payload: one flock record, one owner with two ranges.
            let section = 8 + (8 + 1) + 8 + (8 + 8 + 8) + 2 * (1 + 8 + 8);
            let at = payload.len() - section;
            assert_eq!(&payload[at..at + 8], &1u64.to_le_bytes());
            assert_eq!(&payload[at + 8..at + 16], &fh.to_le_bytes());
            let destination = share.fs(MigrationOnError::Abort, Duration::from_secs(1));
            let refused = |payload: &[u8], version: u32| -> String {
                match destination.load_state(&seal(payload.to_vec(), version)) {
                    Err(e @ MigrationError::Corrupt(_)) => e.to_string(),
                    other => panic!("expected a corrupt-stream refusal, got {:?}", other.err()),
                }
            };
            let patched = |offset: usize, bytes: &[u8]| {
                let mut p = payload.to_vec();
                p[offset..offset + bytes.len()].copy_from_slice(bytes);
                p
            };
            let ranges_at = at + 17 + 8 + 24;
            for (what, damaged) in [
                (
                    "unknown flock handle",
                    patched(at + 8, &999u64.to_le_bytes()),
                ),
                ("flock type", patched(at + 16, &[2])),
                ("owner count", patched(at + 17, &u64::MAX.to_le_bytes())),
                ("unknown inode", patched(at + 25, &4242u64.to_le_bytes())),
                ("range count", patched(ranges_at - 8, &3u64.to_le_bytes())),
                ("range type", patched(ranges_at, &[9])),
                (
                    "start after end",
                    patched(ranges_at + 1, &20u64.to_le_bytes()),
                ),
                (
                    "end past EOF",
                    patched(ranges_at + 9, &u64::MAX.to_le_bytes()),
                ),
            ] {
                let reason = refused(&damaged, LOCKS_VERSION);
                assert!(reason.contains("lock"), "{what}: {reason}");
            }
            let cut = refused(&payload[..payload.len() - 1], LOCKS_VERSION);
            assert!(cut.contains("lock ranges cannot fit"), "{cut}");
            // Read as format 1, the lock section is bytes that should not be there.
            assert!(refused(payload, 1).contains("follow the last entry"));
            // Every truncation is refused, none panics.
            for len in 0..payload.len() {
                assert!(destination
                    .load_state(&seal(payload[..len].to_vec(), LOCKS_VERSION))
                    .is_err());
            }
            assert!(share
                .fs(MigrationOnError::Abort, Duration::from_secs(1))
                .load_state(&stream)
                .is_ok());
        }
    }

    #[test]
    fn a_stream_path_cannot_leave_the_share() {
        let dir = std::env::temp_dir().join(format!("berth-mig-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inside")).unwrap();
        std::fs::write(dir.join("inside/file"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("escape")).unwrap_or(());
        let root = File::open(&dir).unwrap();
        assert!(open_beneath(root.as_fd(), b"inside/file").is_ok());
        for hostile in [
            &b"../etc/passwd"[..],
            b"inside/../../etc",
            b"escape/passwd",
            b"",
            b"/etc",
        ] {
            assert!(
                open_beneath(root.as_fd(), hostile).is_err(),
                "{} must be refused",
                String::from_utf8_lossy(hostile)
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
