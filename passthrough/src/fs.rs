//! [`PassthroughFs`]: FUSE operations turned into syscalls on the shared directory.
//!
//! Every path the guest names is resolved one component at a time with `*at` calls from a
//! descriptor (or file handle) of its parent, never following a final symlink, so a guest
//! cannot walk out of the shared directory through `..` or symlinks.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_versions::{Changes, SlotKey, VersionTable};
use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CopyFileRangeIn, CreateIn, FsOptions, OpenOptions, SetattrValid,
    FUSE_ATTR_DAX, ROOT_ID,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};

use crate::coherence::{Coherence, Invalidation, Ticket};
use crate::config::{CachePolicy, Config, DaxPolicy, InodeFileHandles, Negotiation, DAX_XATTR};
use crate::error::Error;
use crate::file_handle::{FileHandle, MountFds};
use crate::handle_table::{HandleTable, OwnedBy};
use crate::host_file::HostFile;
use crate::inode_store::{InodeData, InodeFile, InodeKey, InodeStore};
use crate::lock_state::LockRestore;
use crate::lock_wait::{install_wake_handler, LockWaits, WaitOutcome, WaitingLock};
use crate::server::{
    init_flags, SecContext, SETXATTR_ACL_KILL_SGID, XATTR_LIST_MAX, XATTR_SIZE_MAX,
};
use crate::util::{
    check_ret, errno, fd_name, fstat, openat, statx, validate_name, CredentialsGuard, EMPTY_CSTR,
};
use crate::xattr_map::{ClientName, ServerName};

const FUSE_ATTR_SUBMOUNT: u32 = 1;
const FUSE_LK_FLOCK: u32 = 1;
const FUSE_WRITE_KILL_PRIV: u32 = 4;
const FUSE_OPEN_KILL_SUIDGID: u32 = 1;
/// FUSE's "to the end of the file" lock end.
const OFFSET_MAX: u64 = i64::MAX as u64;
const POSIX_ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const POSIX_ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
/// Largest read or write one request carries (fuse-backend-rs's MAX_BUFFER_SIZE).
const MAX_IO_SIZE: usize = 1 << 20;
/// Memory alignment that satisfies O_DIRECT on every Linux filesystem.
const DIRECT_IO_MEMORY_ALIGN: usize = 4096;

/// An open file or directory the client refers to by handle number.
pub(crate) struct HandleData {
    pub(crate) inode: u64,
    pub(crate) file: File,
    /// Serialises seek + getdents on directory handles.
    pub(crate) dir_cursor: Mutex<()>,
    /// Its flock lock was lost in a live migration: every request on it fails with EIO.
    pub(crate) locks_lost: AtomicBool,
}

impl OwnedBy for HandleData {
    fn inode(&self) -> u64 {
        self.inode
    }
}

/// A descriptor on an inode: borrowed from the store, or opened from a file handle.
pub(crate) enum InodeFd<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(OwnedFd),
    /// A handle-held directory's descriptor from the inode store's cache.
    Shared(Arc<OwnedFd>),
}

impl AsFd for InodeFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            InodeFd::Borrowed(fd) => *fd,
            InodeFd::Owned(fd) => fd.as_fd(),
            InodeFd::Shared(fd) => fd.as_fd(),
        }
    }
}

/// The shared host directory as a FUSE filesystem.
pub struct PassthroughFs {
    pub(crate) cfg: Config,
    pub(crate) inodes: InodeStore,
    pub(crate) handles: HandleTable<HandleData>,
    pub(crate) mount_fds: MountFds,
    /// Per (inode, lock owner) descriptions carrying POSIX locks; see `owner_lock_file`.
    pub(crate) lock_files: Mutex<HashMap<(u64, u64), Arc<File>>>,
    /// Locks a live migration brought that are still being taken again, or were lost.
    pub(crate) lock_restore: LockRestore,
    /// SETLKW requests waiting on the host, and those parked when their queue stopped.
    pub(crate) lock_waits: LockWaits,
    pub(crate) proc_self_fd: OwnedFd,
    /// This process's /proc/self/fdinfo, if reachable: where migration reads the held locks.
    pub(crate) proc_self_fdinfo: Option<OwnedFd>,
    pub(crate) file_handles: InodeFileHandles,
    entry_timeout: Duration,
    attr_timeout: Duration,
    /// Root can act as the caller (fsuid/fsgid); anyone else creates files as itself.
    switch_credentials: bool,
    pub(crate) writeback: AtomicBool,
    pub(crate) announce_submounts: AtomicBool,
    pub(crate) killpriv_v2: AtomicBool,
    /// POSIX ACLs were negotiated (POSIX_ACL, DONT_MASK and SETXATTR_EXT).
    pub(crate) posix_acl: AtomicBool,
    /// SETXATTR requests carry the extended header (FUSE_SETXATTR_EXT).
    pub(crate) setxattr_ext: AtomicBool,
    /// New nodes come with the guest's security context (FUSE_SECURITY_CTX).
    pub(crate) security_ctx: AtomicBool,
    /// The guest decides DAX per file from FUSE_ATTR_DAX (FUSE_HAS_INODE_DAX negotiated).
    pub(crate) inode_dax: AtomicBool,
    /// The host name of `security.capability` when the xattr map renames it: the host kernel
    /// no longer drops it on write, truncation and chown, so berth does.
    remapped_capability: Option<CString>,
    /// A name no xattr map rule matched was reported already (reported once, not per request).
    reported_unmatched_name: AtomicBool,
    /// Shared caching through the version table, when enabled.
    coherence: Option<Coherence>,
}

/// Which request a guest xattr name came with: refusals differ per operation, as in
/// virtiofsd.
#[derive(Clone, Copy, PartialEq, Eq)]
enum XattrOp {
    Get,
    /// SETXATTR, REMOVEXATTR and security labels.
    Change,
}

thread_local! {
    /// Whether this thread has its own umask (unshare(CLONE_FS)), so setting it per request
    /// does not race with other workers.
    static OWN_FS_STRUCT: Cell<bool> = const { Cell::new(false) };
}

impl PassthroughFs {
    /// Opens the shared directory named in `cfg`.
    pub fn new(mut cfg: Config) -> Result<Self, Error> {
        if cfg.holds_host_locks() {
            install_wake_handler();
        }
        // ACLs, security labels and renamed names are extended attributes.
        cfg.xattr |=
            cfg.posix_acl.wanted() || cfg.security_label.wanted() || cfg.xattrmap.is_some();
        let remapped_capability = cfg.xattrmap.as_ref().and_then(|m| m.remapped_capability());
        if let Some(map) = &cfg.xattrmap {
            let (client, server) = map.is_terminated();
            if !client {
                tracing::warn!(
                    "no --xattrmap rule matches every name from the guest: a name no rule \
                     matches is refused (EPERM, ENODATA for getxattr)"
                );
            }
            if !server {
                tracing::warn!(
                    "no --xattrmap rule matches every name on the host: a name no rule \
                     matches is left out of listings"
                );
            }
        }
        let root_path = CString::new(cfg.root_dir.as_os_str().as_bytes()).map_err(|_| {
            Error::OpenSharedDir {
                path: cfg.root_dir.clone(),
                source: errno(libc::EINVAL),
            }
        })?;
        // SAFETY: AT_FDCWD is a valid directory argument for openat.
        let cwd_fd = unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) };
        let root_fd =
            openat(cwd_fd, &root_path, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(|source| {
                if source.raw_os_error() == Some(libc::ENOTDIR) {
                    Error::NotADirectory(cfg.root_dir.clone())
                } else {
                    Error::OpenSharedDir {
                        path: cfg.root_dir.clone(),
                        source,
                    }
                }
            })?;
        // Inside a sandbox /proc is out of reach by path: the caller hands over a descriptor.
        let proc_self_fd = match &cfg.proc_self_fd {
            Some(fd) => fd.try_clone().map_err(Error::OpenProcSelfFd)?,
            None => openat(
                cwd_fd,
                c"/proc/self/fd",
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )
            .map_err(Error::OpenProcSelfFd)?,
        };
        // Only live migration reads it (the locks each descriptor holds): without it a save
        // that has locks to describe fails with the reason.
        let proc_self_fdinfo = match (&cfg.proc_self_fdinfo, &cfg.proc_self_fd) {
            (Some(fd), _) => fd.try_clone().ok(),
            (None, Some(_)) => None,
            (None, None) => openat(
                cwd_fd,
                c"/proc/self/fdinfo",
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )
            .ok(),
        };
        let root_stat = statx(root_fd.as_fd(), EMPTY_CSTR).map_err(Error::StatSharedDir)?;

        let mount_fds = MountFds::default();
        let file_handles = match cfg.inode_file_handles {
            InodeFileHandles::Never => InodeFileHandles::Never,
            mode => match probe_file_handles(&root_fd, &proc_self_fd) {
                Ok(mount_fd) => {
                    mount_fds
                        .ensure(root_stat.mnt_id, || Ok(mount_fd))
                        .map_err(Error::StatSharedDir)?;
                    mode
                }
                Err(e) if mode == InodeFileHandles::Mandatory => {
                    return Err(Error::FileHandlesUnsupported(e))
                }
                Err(e) => {
                    tracing::info!(
                        "file handles are not usable on the shared directory ({e}); holding \
                         inodes by descriptor"
                    );
                    InodeFileHandles::Never
                }
            },
        };
        let (entry_default, attr_default) = cfg.cache.timeouts();
        let fs = PassthroughFs {
            entry_timeout: cfg.entry_timeout.unwrap_or(entry_default),
            attr_timeout: cfg.attr_timeout.unwrap_or(attr_default),
            // SAFETY: geteuid has no preconditions.
            switch_credentials: unsafe { libc::geteuid() } == 0,
            inodes: InodeStore::new(ROOT_ID, cfg.max_inodes),
            handles: HandleTable::new(),
            mount_fds,
            lock_files: Mutex::new(HashMap::new()),
            lock_restore: LockRestore::default(),
            lock_waits: LockWaits::default(),
            proc_self_fd,
            proc_self_fdinfo,
            file_handles,
            writeback: AtomicBool::new(false),
            announce_submounts: AtomicBool::new(false),
            killpriv_v2: AtomicBool::new(false),
            posix_acl: AtomicBool::new(false),
            setxattr_ext: AtomicBool::new(false),
            security_ctx: AtomicBool::new(false),
            inode_dax: AtomicBool::new(false),
            remapped_capability,
            reported_unmatched_name: AtomicBool::new(false),
            coherence: cfg.shared_cache.clone().map(Coherence::new),
            cfg,
        };
        let key = InodeKey {
            ino: root_stat.st.st_ino,
            dev: root_stat.st.st_dev,
            mnt_id: root_stat.mnt_id,
        };
        let root_ticket = match &fs.coherence {
            Some(c) => Some(
                c.claim(&SlotKey::of(root_fd.as_fd(), EMPTY_CSTR).map_err(Error::StatSharedDir)?),
            ),
            None => None,
        };
        // The root is always held by descriptor: it must survive any handle trouble.
        let root = fs.inodes.get_or_insert(key, None, || {
            let mut data = InodeData::new(key, InodeFile::Fd(root_fd), libc::S_IFDIR);
            fs.attach_slot(&mut data, root_ticket, key.dev);
            Ok(data)
        });
        let root = root.map_err(Error::StatSharedDir)?;
        if let Some(c) = &fs.coherence {
            c.register(&root);
        }
        Ok(fs)
    }

    /// Forgets everything the client held: open files and directories (closing them drops
    /// their flock locks), the descriptions carrying its POSIX locks, every inode but the
    /// root, and what FUSE_INIT negotiated. For FUSE_DESTROY, a device reset, and a guest
    /// that starts a new session without ending the last.
    pub(crate) fn reset(&self) {
        self.lock_waits.end_session();
        self.handles.clear();
        self.lock_restore.clear();
        if let Ok(mut locks) = self.lock_files.lock() {
            locks.clear();
        }
        self.inodes.clear_except(ROOT_ID);
        for negotiated in [
            &self.writeback,
            &self.announce_submounts,
            &self.killpriv_v2,
            &self.posix_acl,
            &self.setxattr_ext,
            &self.security_ctx,
        ] {
            negotiated.store(false, Ordering::Relaxed);
        }
    }

    /// Number of inodes the client holds (for metrics and tests).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Number of open file and directory handles.
    pub fn handle_count(&self) -> usize {
        self.handles.len()
    }

    /// The version table, when shared caching is on.
    pub fn version_table(&self) -> Option<&Arc<VersionTable>> {
        self.coherence.as_ref().map(|c| &c.cfg.table)
    }

    /// What the client must drop after `changes` were published in the version table (a
    /// `berth fuse` mount's notifier sends these to its kernel).
    pub fn stale_cache(&self, changes: Changes) -> Vec<Invalidation> {
        match &self.coherence {
            Some(c) => c.stale(changes, &self.inodes),
            None => Vec::new(),
        }
    }

    /// Invalidations handed out so far (for tests and metrics).
    pub fn invalidations_sent(&self) -> u64 {
        self.coherence
            .as_ref()
            .map(|c| c.sent.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// A new request starts on this thread: forgets the versions the last one handed out.
    pub fn begin_request(&self) {
        if self.coherence.is_some() {
            crate::coherence::begin_reply();
        }
    }

    /// What the current request on this thread handed out of node `id`: its slot, the table
    /// generation and the version its reply is at least as new as; `None` when the inode is
    /// not tracked by the version table (or shared caching is off).
    pub fn reply_version(&self, id: u64) -> Option<crate::coherence::ReplyVersion> {
        self.coherence.as_ref()?;
        crate::coherence::reply_version(id)
    }

    /// Called once the reply to this thread's request has reached the client.
    pub fn reply_sent(&self) {
        if let Some(c) = &self.coherence {
            c.reply_sent(&self.inodes);
        }
    }

    fn forget_inode(&self, id: u64, count: u64) {
        if let Some(released) = self.inodes.forget(id, count) {
            if let Some(c) = &self.coherence {
                c.released(&released);
            }
        }
    }

    fn attach_slot(&self, data: &mut InodeData, ticket: Option<Ticket>, dev: u64) {
        if let (Some(c), Some(ticket)) = (&self.coherence, ticket) {
            data.slot = ticket.slot();
            data.tracked = c.tracked(ticket, dev);
        }
    }

    /// The version of `data` before this request reads or changes it on the host.
    fn before(&self, data: &InodeData) -> Option<Ticket> {
        self.coherence.as_ref().map(|c| c.before(data))
    }

    /// This request hands out what it read of `data` since `ticket`.
    fn observed(&self, data: &InodeData, ticket: Option<Ticket>) {
        if let (Some(c), Some(t)) = (&self.coherence, ticket) {
            c.observed(data, t);
        }
    }

    /// This request changed `data` on the host (after `ticket` was read).
    fn changed(&self, data: &InodeData, ticket: Option<Ticket>) {
        if let (Some(c), Some(t)) = (&self.coherence, ticket) {
            c.changed(&self.inodes, data, t);
        }
    }

    /// The key of `name` in `dir`, before a change removes or replaces it (shared caching).
    fn key_of_name(&self, dir: BorrowedFd<'_>, name: &CStr) -> Option<SlotKey> {
        self.coherence.as_ref()?;
        SlotKey::of(dir, name).ok()
    }

    /// This request changed the inode `key` names.
    fn changed_key(&self, key: Option<SlotKey>) {
        if let (Some(c), Some(key)) = (&self.coherence, key) {
            c.changed_key(&self.inodes, &key);
        }
    }

    /// Timeouts of an entry for `data` found in `parent`: long for what the version table
    /// tracks, the cache mode's otherwise.
    fn timeouts(&self, data: &InodeData, parent: Option<&InodeData>) -> (Duration, Duration) {
        match &self.coherence {
            Some(c) => {
                let long = c.cfg.timeout;
                let entry = if parent.is_none_or(|p| p.tracked) {
                    long
                } else {
                    self.entry_timeout
                };
                let attr = if data.tracked {
                    long
                } else {
                    self.attr_timeout
                };
                (entry, attr)
            }
            None => (self.entry_timeout, self.attr_timeout),
        }
    }

    fn attr_timeout_of(&self, data: &InodeData) -> Duration {
        self.timeouts(data, None).1
    }

    pub(crate) fn inode_fd<'a>(&self, data: &'a InodeData) -> io::Result<InodeFd<'a>> {
        match &data.file {
            InodeFile::Fd(fd) => Ok(InodeFd::Borrowed(fd.as_fd())),
            InodeFile::Handle(handle) => {
                if data.is_dir() {
                    if let Some(fd) = self.inodes.cached_dir_fd(data.id) {
                        return Ok(InodeFd::Shared(fd));
                    }
                }
                let mount_fd = self.mount_fds.get(handle.mnt_id)?;
                let fd = handle.open(mount_fd.as_fd(), libc::O_PATH)?;
                if data.is_dir() {
                    return Ok(InodeFd::Shared(self.inodes.cache_dir_fd(data.id, fd)));
                }
                Ok(InodeFd::Owned(fd))
            }
            InodeFile::Lost => Err(errno(libc::EIO)),
        }
    }

    /// A cached directory descriptor outlives the directory's deletion on the host, where
    /// reopening it by handle fails with ESTALE, which makes the guest revalidate its path and
    /// find a directory put in its place. So an ENOENT under a cached descriptor whose
    /// directory is gone becomes ESTALE, and the descriptor leaves the cache.
    fn stale_parent(&self, parent: &InodeData, fd: &InodeFd<'_>, err: io::Error) -> io::Error {
        if err.raw_os_error() != Some(libc::ENOENT) || !matches!(fd, InodeFd::Shared(_)) {
            return err;
        }
        match statx(fd.as_fd(), EMPTY_CSTR) {
            Ok(sx) if sx.st.st_nlink == 0 => {
                self.inodes.uncache_dir_fd(parent.id);
                errno(libc::ESTALE)
            }
            _ => err,
        }
    }

    /// Opens the inode itself for I/O with `flags`.
    pub(crate) fn open_inode(&self, data: &InodeData, flags: libc::c_int) -> io::Result<File> {
        let flags = flags & !(libc::O_NOFOLLOW | libc::O_CREAT | libc::O_EXCL);
        let fd = match &data.file {
            InodeFile::Fd(fd) => openat(
                self.proc_self_fd.as_fd(),
                &fd_name(fd.as_raw_fd()),
                flags,
                0,
            )?,
            InodeFile::Handle(handle) => {
                let mount_fd = self.mount_fds.get(handle.mnt_id)?;
                handle.open(mount_fd.as_fd(), flags)?
            }
            InodeFile::Lost => return Err(errno(libc::EIO)),
        };
        Ok(File::from(fd))
    }

    /// Whether the guest's locks are taken on the host (`--posix-lock`, `--flock`): lock
    /// requests may then wait in berth.
    pub fn holds_host_locks(&self) -> bool {
        self.cfg.holds_host_locks()
    }

    /// Whether the share is exported read-only.
    pub fn is_read_only(&self) -> bool {
        self.cfg.readonly
    }

    /// A descriptor of `inode`'s data for a DAX window mapping, and whether it is open for
    /// writing. With `handle` (an open file of the guest's) it is that file's description;
    /// without (a Linux guest sends none) the inode is opened read-write for a writable
    /// mapping and read-only otherwise, as the daemon, which the guest kernel's own permission
    /// checks precede.
    pub fn open_for_mapping(
        &self,
        inode: u64,
        handle: Option<u64>,
        writable: bool,
    ) -> io::Result<(File, bool)> {
        if let Some(handle) = handle {
            let data = self.handle(inode, handle)?;
            // SAFETY: F_GETFL only reads the flags of a descriptor the handle owns.
            let flags = unsafe { libc::fcntl(data.file.as_raw_fd(), libc::F_GETFL) };
            if flags < 0 {
                return Err(io::Error::last_os_error());
            }
            let access = flags & libc::O_ACCMODE;
            if access == libc::O_WRONLY {
                // A mapping is always readable: mmap refuses write-only descriptors.
                return Err(errno(libc::EACCES));
            }
            return Ok((data.file.try_clone()?, access == libc::O_RDWR));
        }
        if writable {
            self.check_writable()?;
        }
        let data = self.inodes.get(inode)?;
        if data.file_type != libc::S_IFREG {
            return Err(errno(libc::EINVAL));
        }
        let access = if writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        let file = self.open_inode(&data, access | libc::O_CLOEXEC)?;
        Ok((file, writable))
    }

    fn handle(&self, inode: u64, handle: u64) -> io::Result<Arc<HandleData>> {
        let data = self.handles.get(inode, handle)?;
        if data.locks_lost.load(Ordering::Relaxed) {
            return Err(errno(libc::EIO));
        }
        Ok(data)
    }

    /// The open file `handle` of `inode`, if it is open.
    pub(crate) fn open_handle(&self, inode: u64, handle: u64) -> Option<Arc<HandleData>> {
        self.handle(inode, handle).ok()
    }

    /// Why an open with `flags` on the host descriptor `file` must not be handed to the
    /// kernel as a FUSE passthrough open (which bypasses berth for its reads and writes), if
    /// it must not: what berth does on those paths that the kernel would not.
    pub(crate) fn passthrough_refusal(&self, flags: u32, file: &File) -> Option<&'static str> {
        let flags = flags as libc::c_int;
        if flags & libc::O_DIRECT != 0 && !self.cfg.allow_direct_io {
            // berth drops O_DIRECT on the host; the kernel would open the backing file with it.
            return Some("O_DIRECT without --allow-direct-io");
        }
        if self.coherence.is_some() {
            return Some("shared caching must see every write");
        }
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            return None;
        }
        if self.remapped_capability.is_some() {
            return Some("the xattr map renames security.capability, which writes must drop");
        }
        let st = match fstat_of(file) {
            Ok(st) => st,
            Err(_) => return Some("cannot stat the file"),
        };
        let setgid_exec = libc::S_ISGID | libc::S_IXGRP;
        if st.st_mode & libc::S_ISUID != 0 || st.st_mode & setgid_exec == setgid_exec {
            // berth's rule for clearing them (an unprivileged writer, or the client's
            // KILL_PRIV flag) stays on berth's path instead of depending on what a kernel's
            // passthrough write does with the FUSE inode's and the backing file's bits.
            return Some("writes to a setuid or setgid file must clear those bits");
        }
        None
    }

    pub(crate) fn insert_handle(&self, inode: u64, file: File) -> io::Result<u64> {
        let data = HandleData {
            inode,
            file,
            dir_cursor: Mutex::new(()),
            locks_lost: AtomicBool::new(false),
        };
        self.handles.insert(data, self.cfg.max_handles)
    }

    fn remove_handle(&self, inode: u64, handle: u64) -> io::Result<()> {
        self.handles.remove(inode, handle)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.cfg.readonly {
            Err(errno(libc::EROFS))
        } else {
            Ok(())
        }
    }

    fn entry_for(&self, data: &InodeData, st: stat64, parent: &InodeData) -> Entry {
        let submount = self.announce_submounts.load(Ordering::Relaxed)
            && data.is_dir()
            && data.key.mnt_id != parent.key.mnt_id;
        let (entry_timeout, attr_timeout) = self.timeouts(data, Some(parent));
        Entry {
            inode: data.id,
            generation: 0,
            attr: st,
            attr_flags: if submount { FUSE_ATTR_SUBMOUNT } else { 0 } | self.dax_flag(data, &st),
            attr_timeout,
            entry_timeout,
        }
    }

    /// FUSE_ATTR_DAX when the guest decides DAX per file and `--dax-policy` picks this one
    /// (a regular file; of the policy's size, or carrying its extended attribute).
    fn dax_flag(&self, data: &InodeData, st: &stat64) -> u32 {
        if !self.inode_dax.load(Ordering::Relaxed) || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return 0;
        }
        let chosen = match self.cfg.dax_policy {
            DaxPolicy::Never => false,
            DaxPolicy::Always => true,
            DaxPolicy::MinSize(min) => u64::try_from(st.st_size).is_ok_and(|size| size >= min),
            DaxPolicy::Xattr => self.marked_for_dax(data),
        };
        if chosen {
            FUSE_ATTR_DAX
        } else {
            0
        }
    }

    /// Attribute flags of the inode `inode` for a GETATTR or SETATTR reply with `st`.
    pub(crate) fn attr_flags_of(&self, inode: u64, st: &stat64) -> u32 {
        if !self.inode_dax.load(Ordering::Relaxed) {
            return 0;
        }
        match self.inodes.get(inode) {
            Ok(data) => self.dax_flag(&data, st),
            Err(_) => 0,
        }
    }

    /// Whether the host file carries [`DAX_XATTR`] with the value `1`; any failure to read
    /// it (no attribute, no xattr support on the host filesystem) means no.
    fn marked_for_dax(&self, data: &InodeData) -> bool {
        let Ok(fd) = self.inode_fd(data) else {
            return false;
        };
        let Ok(path) = self.proc_relative(fd.as_fd().as_raw_fd()) else {
            return false;
        };
        // Room for a longer value than `1`, so "10" or "1\n" read as what they are, not "1".
        let mut value = [0u8; 4];
        // SAFETY: `value` is writable for its length; result checked.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                DAX_XATTR.as_ptr(),
                value.as_mut_ptr() as *mut libc::c_void,
                value.len(),
            )
        };
        n == 1 && value[0] == b'1'
    }

    fn do_lookup(&self, parent: u64, name: &CStr) -> io::Result<Entry> {
        let parent_data = self.inodes.get(parent)?;
        let bytes = name.to_bytes();
        if bytes == b"." || (bytes == b".." && parent == ROOT_ID) {
            // `..` of the share root is the root itself: never a way out.
            let fd = self.inode_fd(&parent_data)?;
            let ticket = self.before(&parent_data);
            let sx = statx(fd.as_fd(), EMPTY_CSTR)?;
            let data = self.inodes.take_ref_by_id(parent)?;
            self.observed(&data, ticket);
            return Ok(self.entry_for(&data, sx.st, &parent_data));
        }
        validate_name(name)?;
        if !parent_data.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let parent_fd = self.inode_fd(&parent_data)?;
        let ticket = self.before(&parent_data);
        let result = self
            .lookup_at(&parent_data, parent_fd.as_fd(), name)
            .map_err(|e| self.stale_parent(&parent_data, &parent_fd, e));
        match (&self.coherence, result) {
            (Some(c), Ok(entry)) => {
                c.named(&parent_data, bytes);
                self.observed(&parent_data, ticket);
                Ok(entry)
            }
            // A missing name in a tracked directory is cached as missing (a negative entry)
            // until the directory's version moves.
            (Some(c), Err(e)) if e.raw_os_error() == Some(libc::ENOENT) && parent_data.tracked => {
                c.named(&parent_data, bytes);
                self.observed(&parent_data, ticket);
                // SAFETY: stat64 is plain old data; all-zeroes is valid.
                let attr: stat64 = unsafe { std::mem::zeroed() };
                Ok(Entry {
                    inode: 0,
                    generation: 0,
                    attr,
                    attr_flags: 0,
                    attr_timeout: Duration::ZERO,
                    entry_timeout: c.cfg.timeout,
                })
            }
            (_, result) => result,
        }
    }

    /// Looks `name` up in the directory `parent`, open as `parent_fd`.
    fn lookup_at(
        &self,
        parent: &InodeData,
        parent_fd: BorrowedFd<'_>,
        name: &CStr,
    ) -> io::Result<Entry> {
        let fd = openat(parent_fd, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        self.insert_looked_up(fd, parent)
    }

    /// Registers the inode `fd` (an `O_PATH` descriptor) refers to, taking one reference.
    ///
    /// The file handle is taken before the table is searched: an inode held by handle is only
    /// ever matched by its handle, whose generation number tells a reused inode number apart.
    fn insert_looked_up(&self, fd: OwnedFd, parent: &InodeData) -> io::Result<Entry> {
        // With shared caching the slot's version is read before the attributes.
        let ticket = match &self.coherence {
            Some(c) => Some(c.claim(&SlotKey::of(fd.as_fd(), EMPTY_CSTR)?)),
            None => None,
        };
        let sx = statx(fd.as_fd(), EMPTY_CSTR)?;
        let key = InodeKey {
            ino: sx.st.st_ino,
            dev: sx.st.st_dev,
            mnt_id: sx.mnt_id,
        };
        let file_type = sx.st.st_mode & libc::S_IFMT;
        let handle = match self.file_handles {
            InodeFileHandles::Never => None,
            mode => match FileHandle::from_fd(fd.as_fd()) {
                Ok(handle) => Some(handle),
                Err(e) if mode == InodeFileHandles::Mandatory => return Err(e),
                Err(_) => None,
            },
        };
        let mut fd = Some(fd);
        let data = self.inodes.get_or_insert(key, handle.as_ref(), || {
            let file = match &handle {
                None => InodeFile::Fd(fd.take().ok_or_else(|| errno(libc::EIO))?),
                Some(handle) => {
                    let Some(path_fd) = fd.as_ref() else {
                        return Err(errno(libc::EIO));
                    };
                    match self.ensure_mount_fd(handle.mnt_id, path_fd, file_type, parent) {
                        Ok(()) => InodeFile::Handle(handle.clone()),
                        Err(e) if self.file_handles == InodeFileHandles::Mandatory => {
                            return Err(e)
                        }
                        Err(_) => InodeFile::Fd(fd.take().ok_or_else(|| errno(libc::EIO))?),
                    }
                }
            };
            let mut data = InodeData::new(key, file, file_type);
            self.attach_slot(&mut data, ticket, key.dev);
            Ok(data)
        })?;
        if let Some(c) = &self.coherence {
            c.register(&data);
        }
        self.observed(&data, ticket);
        // A directory held by handle keeps the descriptor just opened: its next child lookup
        // needs it.
        if let (Some(fd), InodeFile::Handle(_), true) = (fd, &data.file, data.is_dir()) {
            if self.inodes.cached_dir_fd(data.id).is_none() {
                self.inodes.cache_dir_fd(data.id, fd);
            }
        }
        Ok(self.entry_for(&data, sx.st, parent))
    }

    /// Finds a descriptor on mount `mnt_id` for reopening handles: the inode itself when it
    /// is a directory, else its parent when that is on the same mount.
    fn ensure_mount_fd(
        &self,
        mnt_id: u64,
        fd: &OwnedFd,
        file_type: u32,
        parent: &InodeData,
    ) -> io::Result<()> {
        self.mount_fds.ensure(mnt_id, || {
            let dir_flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK;
            if file_type == libc::S_IFDIR {
                openat(
                    self.proc_self_fd.as_fd(),
                    &fd_name(fd.as_raw_fd()),
                    dir_flags,
                    0,
                )
            } else if parent.key.mnt_id == mnt_id {
                Ok(self.open_inode(parent, dir_flags)?.into())
            } else {
                // A file bind-mounted on its own: no directory of that mount to hold.
                Err(errno(libc::EOPNOTSUPP))
            }
        })
    }

    /// Whether an `O_TRUNC` open must clear setuid/setgid, as the host kernel would for the
    /// caller: the client says so with FUSE_OPEN_KILL_SUIDGID under killpriv_v2; otherwise
    /// (berth itself keeps CAP_FSETID) any caller but root loses them.
    fn truncation_kills_priv(&self, ctx: &Context, fuse_flags: u32) -> bool {
        self.modification_kills_priv(ctx, fuse_flags & FUSE_OPEN_KILL_SUIDGID != 0)
    }

    /// The same rule for WRITE (FUSE_WRITE_KILL_SUIDGID) and truncating SETATTR
    /// (FATTR_KILL_SUIDGID): without killpriv_v2 the daemon cannot rely on the client (a
    /// direct-I/O write clears nothing in the guest), so an unprivileged caller loses them.
    fn modification_kills_priv(&self, ctx: &Context, client_says_so: bool) -> bool {
        if self.killpriv_v2.load(Ordering::Relaxed) {
            client_says_so
        } else {
            ctx.uid != 0
        }
    }

    fn sanitize_open_flags(&self, flags: u32) -> libc::c_int {
        let mut flags = flags as libc::c_int;
        flags &= !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY);
        if !self.cfg.allow_direct_io {
            flags &= !libc::O_DIRECT;
        }
        if !self.cfg.preserve_noatime {
            flags &= !libc::O_NOATIME;
        }
        if self.writeback.load(Ordering::Relaxed) {
            // The guest's page cache may read back pages of a write-only file and does its own
            // appending.
            if flags & libc::O_ACCMODE == libc::O_WRONLY {
                flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR;
            }
            flags &= !libc::O_APPEND;
        }
        flags
    }

    /// Open flags for OPEN and OPENDIR, as virtiofsd 1.14 sets them: `never` bypasses the
    /// guest page cache for files, `metadata` too but keeps directory listings, `always` keeps
    /// everything, `auto` leaves the defaults (close-to-open consistency).
    /// Open flags for `data`: with shared caching, a tracked inode's data and listings stay
    /// cached across opens (the notifier drops them when its version moves).
    fn open_options_for(&self, data: &InodeData) -> OpenOptions {
        match (self.coherence.is_some() && data.tracked, data.is_dir()) {
            (true, true) => OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE,
            (true, false) => OpenOptions::KEEP_CACHE,
            (false, is_dir) => self.open_options(is_dir),
        }
    }

    fn open_options(&self, is_dir: bool) -> OpenOptions {
        match (self.cfg.cache, is_dir) {
            (CachePolicy::Never, false) | (CachePolicy::Metadata, false) => OpenOptions::DIRECT_IO,
            (CachePolicy::Metadata, true) | (CachePolicy::Always, true) => {
                OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE
            }
            (CachePolicy::Always, false) => OpenOptions::KEEP_CACHE,
            (CachePolicy::Never, true) | (CachePolicy::Auto, _) => OpenOptions::empty(),
        }
    }

    /// Runs `f` as the caller, with the caller's umask (new files get their owner and mode).
    fn as_caller<T>(
        &self,
        ctx: &Context,
        umask: u32,
        f: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let _creds = CredentialsGuard::set(ctx.uid, ctx.gid, self.switch_credentials)?;
        let _umask = UmaskGuard::set(umask)?;
        f()
    }

    fn stat_inode(&self, data: &InodeData) -> io::Result<stat64> {
        let fd = self.inode_fd(data)?;
        Ok(statx(fd.as_fd(), EMPTY_CSTR)?.st)
    }

    /// A path naming `fd` for calls that only take paths (the xattr family): this thread's
    /// working directory is moved to /proc/self/fd, so the fd's number is that path.
    fn proc_relative(&self, fd: RawFd) -> io::Result<CString> {
        own_fs_struct()?;
        // SAFETY: fchdir on our /proc/self/fd descriptor; only this thread's cwd changes.
        check_ret(unsafe { libc::fchdir(self.proc_self_fd.as_raw_fd()) })?;
        Ok(fd_name(fd))
    }

    fn do_readdir(
        &self,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        plus: bool,
        add_entry: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
    ) -> io::Result<()> {
        if size == 0 {
            return Ok(());
        }
        let data = self.handle(inode, handle)?;
        let _cursor = data.dir_cursor.lock().map_err(|_| errno(libc::EIO))?;
        // The listing (cached with CACHE_DIR) is as old as the version read before it.
        let dir_node = self
            .coherence
            .as_ref()
            .and_then(|_| self.inodes.get(inode).ok());
        let ticket = dir_node.as_ref().and_then(|n| self.before(n));
        // Recorded before the entries are added: a READDIRPLUS entry's extension carries the
        // directory's version as its parent version.
        if let Some(node) = &dir_node {
            self.observed(node, ticket);
        }
        self.read_entries(inode, &data, size, offset, plus, add_entry)
    }

    fn read_entries(
        &self,
        inode: u64,
        data: &HandleData,
        size: u32,
        offset: u64,
        plus: bool,
        add_entry: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
    ) -> io::Result<()> {
        let fd = data.file.as_raw_fd();
        // SAFETY: lseek on a descriptor we own; the result is checked.
        let ret = unsafe { libc::lseek64(fd, offset as i64, libc::SEEK_SET) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // Entries not sent are read again next time: size the host read to roughly what fits
        // (a READDIRPLUS entry is about five times a getdents record).
        let host_bytes = if plus {
            size as usize / 4
        } else {
            size as usize
        };
        let mut buf = vec![0u8; host_bytes.clamp(1024, 1 << 16)];
        let parent = if plus {
            Some(self.inodes.get(inode)?)
        } else {
            None
        };
        let mut sent = 0usize;
        loop {
            // SAFETY: `buf` is writable for its full length; the result is checked.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    fd,
                    buf.as_mut_ptr(),
                    buf.len() as libc::c_uint,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Ok(());
            }
            let mut pos = 0usize;
            while pos < n as usize {
                let Some(raw) = RawDirent::parse(&buf[pos..n as usize]) else {
                    return Err(errno(libc::EIO));
                };
                pos += raw.reclen;
                let dirent = DirEntry {
                    ino: raw.ino,
                    offset: raw.next_offset,
                    type_: raw.d_type as u32,
                    name: raw.name,
                };
                let is_dot = raw.name == b"." || raw.name == b"..";
                let entry = if !plus {
                    None
                } else if is_dot {
                    // The client does not look these up; node id 0 tells it so.
                    // SAFETY: stat64 is plain old data; all-zeroes is valid.
                    let mut attr: stat64 = unsafe { std::mem::zeroed() };
                    attr.st_ino = raw.ino;
                    attr.st_mode = libc::S_IFDIR;
                    Some(Entry {
                        inode: 0,
                        generation: 0,
                        attr,
                        attr_flags: 0,
                        attr_timeout: Duration::ZERO,
                        entry_timeout: Duration::ZERO,
                    })
                } else {
                    let Ok(name) = CStr::from_bytes_with_nul(raw.name_with_nul) else {
                        continue;
                    };
                    let Some(parent) = parent.as_deref() else {
                        return Err(errno(libc::EIO));
                    };
                    // The open directory is the parent: no reopen per entry.
                    match self.lookup_at(parent, data.file.as_fd(), name) {
                        Ok(e) => {
                            if let Some(c) = &self.coherence {
                                c.named(parent, raw.name);
                            }
                            Some(e)
                        }
                        // Removed since getdents saw it: skip it.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                        // Never drop an entry silently: end the reply here, or fail it.
                        Err(e) if sent == 0 => return Err(e),
                        Err(_) => return Ok(()),
                    }
                };
                let looked_up = entry.as_ref().map(|e| e.inode).unwrap_or(0);
                let written = add_entry(dirent, entry).inspect_err(|_| {
                    if looked_up != 0 {
                        self.forget_inode(looked_up, 1);
                    }
                })?;
                if written == 0 {
                    // The reply is full: this entry was not sent, so its lookup never happened.
                    if looked_up != 0 {
                        self.forget_inode(looked_up, 1);
                    }
                    return Ok(());
                }
                sent += 1;
            }
        }
    }

    /// The descriptor that carries `owner`'s POSIX locks on `inode`.
    ///
    /// POSIX locks belong to a process (the FUSE lock owner) and go away when it closes any
    /// descriptor of the file; OFD locks belong to an open file description. One description
    /// per (inode, owner), closed on that owner's FLUSH, gives POSIX semantics on the host.
    fn owner_lock_file(&self, inode: u64, handle: u64, owner: u64) -> io::Result<Arc<File>> {
        let data = self.handle(inode, handle)?;
        let mut locks = self.lock_files.lock().map_err(|_| errno(libc::EIO))?;
        if let Some(file) = locks.get(&(inode, owner)) {
            return Ok(file.clone());
        }
        let name = fd_name(data.file.as_raw_fd());
        // Write locks need a writable description, read locks a readable one.
        let fd = openat(
            self.proc_self_fd.as_fd(),
            &name,
            libc::O_RDWR | libc::O_NONBLOCK,
            0,
        )
        .or_else(|_| {
            // SAFETY: F_GETFL only reads the descriptor's flags.
            let flags = unsafe { libc::fcntl(data.file.as_raw_fd(), libc::F_GETFL) };
            let access = if flags < 0 {
                libc::O_RDONLY
            } else {
                flags & libc::O_ACCMODE
            };
            openat(
                self.proc_self_fd.as_fd(),
                &name,
                access | libc::O_NONBLOCK,
                0,
            )
        })?;
        let file = Arc::new(File::from(fd));
        locks.insert((inode, owner), file.clone());
        Ok(file)
    }

    /// Drops every POSIX lock `owner` holds on `inode` (close(2) semantics).
    fn release_owner_locks(&self, inode: u64, owner: u64) {
        if let Ok(mut locks) = self.lock_files.lock() {
            locks.remove(&(inode, owner));
        }
        self.lock_restore.forget_owner(inode, owner);
    }

    /// Before answering a lock request on `inode`: waits while locks a live migration
    /// brought are still being taken again on it, and fails with EIO if `owner`'s were lost.
    fn settle_migrated_locks(&self, inode: u64, owner: Option<u64>) -> io::Result<()> {
        self.lock_restore.wait_settled(inode);
        match owner {
            Some(owner) if self.lock_restore.owner_lost(inode, owner) => Err(errno(libc::EIO)),
            _ => Ok(()),
        }
    }

    /// Answers COPY_FILE_RANGE.
    pub(crate) fn copy_file_range(
        &self,
        _ctx: &Context,
        inode_in: u64,
        args: &CopyFileRangeIn,
    ) -> io::Result<u32> {
        self.check_writable()?;
        let src = self.handle(inode_in, args.fh_in)?;
        let dst = self.handle(args.nodeid_out, args.fh_out)?;
        let mut off_in = args.offset_in as i64;
        let mut off_out = args.offset_out as i64;
        let len = args.len.min(u32::MAX as u64) as usize;
        // SAFETY: both descriptors are open; the offsets are valid out-pointers.
        let copied = unsafe {
            libc::copy_file_range(
                src.file.as_raw_fd(),
                &mut off_in,
                dst.file.as_raw_fd(),
                &mut off_out,
                len,
                args.flags as libc::c_uint,
            )
        };
        if copied < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Ok(node) = self.inodes.get(args.nodeid_out) {
            self.changed(&node, self.before(&node));
        }
        Ok(copied as u32)
    }

    /// Answers SYNCFS: flushes the filesystem holding `inode`.
    pub(crate) fn syncfs(&self, inode: u64) -> io::Result<()> {
        let data = self.inodes.get(inode)?;
        let flags = if data.is_dir() {
            libc::O_RDONLY | libc::O_DIRECTORY
        } else {
            libc::O_RDONLY | libc::O_NONBLOCK
        };
        let file = self.open_inode(&data, flags)?;
        // SAFETY: syncfs on an open descriptor; the result is checked.
        check_ret(unsafe { libc::syncfs(file.as_raw_fd()) })?;
        Ok(())
    }

    /// Answers SETLKW: waits for the lock; a wait that is still blocked when the request's
    /// queue stops is parked (see [`crate::lock_wait`]), and one whose request the kernel
    /// interrupts ends with EINTR.
    /// `resumed`: the request was parked and is taken up again now.
    pub(crate) fn setlk_wait_parkable(&self, request: WaitingLock, resumed: bool) -> WaitOutcome {
        let lock = FileLock {
            start: request.start,
            end: request.end,
            lock_type: request.lock_type,
            pid: request.pid,
        };
        let (inode, fh, owner, flags) =
            (request.nodeid, request.fh, request.owner, request.lk_flags);
        self.lock_waits.wait(
            request,
            resumed,
            || self.do_setlk(inode, fh, owner, lock, flags, false),
            || self.do_setlk(inode, fh, owner, lock, flags, true),
        )
    }

    /// Answers TMPFILE: an unnamed file in `parent`, open for I/O, labelled with `secctx`.
    pub(crate) fn tmpfile(
        &self,
        ctx: &Context,
        parent: u64,
        args: &CreateIn,
        secctx: Option<&SecContext>,
    ) -> io::Result<(Entry, u64, u32)> {
        self.check_writable()?;
        let secctx = self.host_security_context(secctx)?;
        let secctx = secctx.as_deref();
        let parent_data = self.inodes.get(parent)?;
        let flags = self.sanitize_open_flags(args.flags) & !libc::O_DIRECTORY;
        // Reopened before switching to the caller: open_by_handle_at needs
        // CAP_DAC_READ_SEARCH, which a non-root fsuid does not carry.
        let parent_fd = self.inode_fd(&parent_data)?;
        let file = self
            .as_caller(ctx, args.umask, || {
                openat(
                    parent_fd.as_fd(),
                    c".",
                    flags | libc::O_TMPFILE,
                    args.mode & 0o7777,
                )
            })
            .map_err(|e| self.stale_parent(&parent_data, &parent_fd, e))?;
        if let Some(secctx) = secctx {
            // Unnamed: if labelling fails, closing the descriptor removes the file.
            set_xattr_on_fd(file.as_fd(), secctx)?;
        }
        let path_fd = openat(
            self.proc_self_fd.as_fd(),
            &fd_name(file.as_raw_fd()),
            libc::O_PATH,
            0,
        )?;
        // An unlinked file cannot be reopened by handle: hold it by descriptor.
        let sx = statx(path_fd.as_fd(), EMPTY_CSTR)?;
        let key = InodeKey {
            ino: sx.st.st_ino,
            dev: sx.st.st_dev,
            mnt_id: sx.mnt_id,
        };
        let data = self.inodes.get_or_insert(key, None, || {
            Ok(InodeData::new(key, InodeFile::Fd(path_fd), libc::S_IFREG))
        })?;
        let entry = self.entry_for(&data, sx.st, &parent_data);
        let fh = match self.insert_handle(data.id, File::from(file)) {
            Ok(fh) => fh,
            Err(e) => {
                self.forget_inode(entry.inode, 1);
                return Err(e);
            }
        };
        Ok((entry, fh, self.create_options().bits()))
    }

    /// Whether new nodes come with a security context to store (FUSE_SECURITY_CTX).
    pub(crate) fn security_ctx_enabled(&self) -> bool {
        self.security_ctx.load(Ordering::Relaxed)
    }

    /// Whether SETXATTR requests carry the extended header (FUSE_SETXATTR_EXT).
    pub(crate) fn setxattr_ext_enabled(&self) -> bool {
        self.setxattr_ext.load(Ordering::Relaxed)
    }

    /// Negotiates FUSE_INIT: `capable` is every flag the client offered (both words), the
    /// result what is enabled. fuse-backend-rs 0.14 does not know some flags berth needs
    /// (SETXATTR_EXT, SECURITY_CTX, DIRECT_IO_ALLOW_MMAP), so this works on raw bits.
    pub(crate) fn negotiate(&self, capable: u64) -> io::Result<u64> {
        // Not ATOMIC_O_TRUNC: with it the client kernel sends O_TRUNC in OPEN before it checks
        // that no process is executing the file, so open(O_RDONLY | O_TRUNC) of a running
        // program would cut it (and kill the program) where a local filesystem fails with
        // ETXTBSY. Without it the kernel checks, then truncates with SETATTR.
        let mut want = (FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::BIG_WRITES
            | FsOptions::AUTO_INVAL_DATA
            | FsOptions::HAS_IOCTL_DIR
            | FsOptions::MAX_PAGES
            | FsOptions::ASYNC_DIO)
            .bits();
        if self.cfg.readdirplus {
            want |= (FsOptions::DO_READDIRPLUS | FsOptions::READDIRPLUS_AUTO).bits();
        }
        if self.cfg.writeback && !self.cfg.readonly {
            want |= FsOptions::WRITEBACK_CACHE.bits();
        }
        if self.cfg.announce_submounts {
            want |= FsOptions::SUBMOUNTS.bits();
        }
        if self.cfg.posix_lock {
            want |= FsOptions::POSIX_LOCKS.bits();
        }
        if self.cfg.flock {
            want |= FsOptions::FLOCK_LOCKS.bits();
        }
        if self.cfg.killpriv_v2 {
            want |= FsOptions::HANDLE_KILLPRIV_V2.bits();
        }
        if self.cfg.cache == CachePolicy::Always {
            want |= FsOptions::CACHE_SYMLINKS.bits();
        }
        if self.cfg.posix_acl.wanted() {
            // The guest must send unmasked modes (so a default ACL, not the umask, decides the
            // new file's mode) and the setgid-clearing flag with ACL writes.
            let acl = init_flags::POSIX_ACL | init_flags::DONT_MASK | init_flags::SETXATTR_EXT;
            if capable & acl == acl {
                want |= acl;
            } else if self.cfg.posix_acl == Negotiation::Always {
                tracing::error!(
                    "The guest cannot use POSIX ACLs: --posix-acl needs the FUSE flags \
                     POSIX_ACL, DONT_MASK and SETXATTR_EXT, and the guest offered {}. Refusing \
                     FUSE_INIT (use --posix-acl=auto to carry on without ACLs).",
                    init_flags::describe(capable & acl)
                );
                return Err(errno(libc::EPROTO));
            } else {
                tracing::warn!(
                    "The guest does not support POSIX ACLs (it offered {} of POSIX_ACL, \
                     DONT_MASK and SETXATTR_EXT); serving without them.",
                    init_flags::describe(capable & acl)
                );
            }
        }
        if self.cfg.security_label.wanted() {
            if capable & init_flags::SECURITY_CTX != 0 {
                want |= init_flags::SECURITY_CTX;
            } else if self.cfg.security_label == Negotiation::Always {
                tracing::error!(
                    "The guest kernel does not offer FUSE_SECURITY_CTX, which --security-label \
                     needs. Refusing FUSE_INIT (use --security-label=auto to carry on without \
                     security labels)."
                );
                return Err(errno(libc::EPROTO));
            } else {
                tracing::warn!(
                    "The guest kernel does not offer FUSE_SECURITY_CTX; new files get no \
                     security label from the guest."
                );
            }
        }
        if self.cfg.allow_mmap {
            want |= init_flags::DIRECT_IO_ALLOW_MMAP;
        }
        if self.cfg.dax_policy != DaxPolicy::Never {
            // A guest mounted with `dax=inode` offers it and then maps exactly the files
            // whose attributes carry FUSE_ATTR_DAX.
            want |= FsOptions::PERFILE_DAX.bits();
        }
        // Flags above bit 31 only count when the reply says the second word is there.
        if want >> 32 != 0 {
            want |= FsOptions::INIT_EXT.bits();
        }
        let enabled = capable & want;
        let on = |flag: u64| enabled & flag == flag;
        self.writeback
            .store(on(FsOptions::WRITEBACK_CACHE.bits()), Ordering::Relaxed);
        self.announce_submounts
            .store(on(FsOptions::SUBMOUNTS.bits()), Ordering::Relaxed);
        self.killpriv_v2
            .store(on(FsOptions::HANDLE_KILLPRIV_V2.bits()), Ordering::Relaxed);
        self.posix_acl.store(
            on(init_flags::POSIX_ACL | init_flags::DONT_MASK | init_flags::SETXATTR_EXT),
            Ordering::Relaxed,
        );
        self.setxattr_ext
            .store(on(init_flags::SETXATTR_EXT), Ordering::Relaxed);
        self.security_ctx
            .store(on(init_flags::SECURITY_CTX), Ordering::Relaxed);
        self.inode_dax
            .store(on(FsOptions::PERFILE_DAX.bits()), Ordering::Relaxed);
        Ok(enabled)
    }

    /// Open flags for CREATE and TMPFILE (always a regular file).
    fn create_options(&self) -> OpenOptions {
        match self.cfg.cache {
            CachePolicy::Never | CachePolicy::Metadata => OpenOptions::DIRECT_IO,
            CachePolicy::Always => OpenOptions::KEEP_CACHE,
            CachePolicy::Auto => OpenOptions::empty(),
        }
    }

    /// Stores `secctx` on the node `name` this request just created in `parent_fd` (through
    /// `open_file` when the node is open already); if that fails the node is removed again,
    /// so that no unlabelled node is left behind (as virtiofsd does).
    fn label_new_node(
        &self,
        parent_fd: BorrowedFd<'_>,
        name: &CStr,
        open_file: Option<BorrowedFd<'_>>,
        secctx: &SecContext,
        is_dir: bool,
    ) -> io::Result<()> {
        let result = match open_file {
            Some(fd) => set_xattr_on_fd(fd, secctx),
            // Devices and fifos must not be opened, symlinks cannot be: go through /proc.
            None => openat(parent_fd, name, libc::O_PATH | libc::O_NOFOLLOW, 0).and_then(|node| {
                let path = self.proc_relative(node.as_raw_fd())?;
                // SAFETY: path, name and value are valid for the lengths given; result checked.
                check_ret(unsafe {
                    libc::setxattr(
                        path.as_ptr(),
                        secctx.name.as_ptr(),
                        secctx.value.as_ptr() as *const libc::c_void,
                        secctx.value.len(),
                        0,
                    )
                })
                .map(drop)
            }),
        };
        if let Err(e) = result {
            let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
            // SAFETY: `name` is NUL-terminated; removing what this request created.
            unsafe { libc::unlinkat(parent_fd.as_raw_fd(), name.as_ptr(), flags) };
            return Err(e);
        }
        Ok(())
    }

    /// EOPNOTSUPP for the ACL attributes unless POSIX ACLs were negotiated (as virtiofsd): a
    /// guest that does not enforce ACLs must not plant ones the host would enforce.
    fn check_acl_name(&self, name: &CStr) -> io::Result<()> {
        let name = name.to_bytes();
        if !self.posix_acl.load(Ordering::Relaxed)
            && (name == POSIX_ACL_ACCESS || name == POSIX_ACL_DEFAULT)
        {
            return Err(errno(libc::EOPNOTSUPP));
        }
        Ok(())
    }

    /// The host name for an xattr name from the guest: through the xattr map, unchanged
    /// without one. A `bad` rule refuses it with EPERM (ENODATA for GETXATTR, as virtiofsd),
    /// an `unsupported` one with ENOTSUP. virtiofsd aborts on a name no rule matches; berth
    /// refuses it as a `bad` rule would.
    fn host_xattr_name<'a>(&self, name: &'a CStr, op: XattrOp) -> io::Result<Cow<'a, CStr>> {
        let Some(map) = &self.cfg.xattrmap else {
            return Ok(Cow::Borrowed(name));
        };
        let denied = || {
            errno(match op {
                XattrOp::Get => libc::ENODATA,
                XattrOp::Change => libc::EPERM,
            })
        };
        match map.map_client(name) {
            ClientName::Host(host) => Ok(host),
            ClientName::Denied => Err(denied()),
            ClientName::Unsupported => Err(errno(libc::ENOTSUP)),
            ClientName::Unmatched => {
                self.report_unmatched_name(name.to_bytes(), "sent by the guest", "refused");
                Err(denied())
            }
        }
    }

    /// The name the guest sees for an xattr listed on the host, `None` when it is hidden.
    fn guest_xattr_name<'a>(&self, name: &'a [u8]) -> Option<&'a [u8]> {
        let Some(map) = &self.cfg.xattrmap else {
            return Some(name);
        };
        match map.map_server(name) {
            ServerName::Guest(guest) => Some(guest),
            ServerName::Hidden => None,
            ServerName::Unmatched => {
                self.report_unmatched_name(name, "listed on the host", "hidden");
                None
            }
        }
    }

    /// Warns about the first name no xattr map rule matches; later ones are not logged, so a
    /// guest cannot flood the log.
    fn report_unmatched_name(&self, name: &[u8], origin: &str, outcome: &str) {
        if !self.reported_unmatched_name.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "no --xattrmap rule matches the xattr name {:?} {origin}: it is {outcome} \
                 (further unmatched names are not reported)",
                String::from_utf8_lossy(name)
            );
        }
    }

    /// The security context to store on a new node, its name mapped as for SETXATTR; checked
    /// before the node is created, so a refused label creates nothing.
    fn host_security_context<'a>(
        &self,
        secctx: Option<&'a SecContext>,
    ) -> io::Result<Option<Cow<'a, SecContext>>> {
        let Some(secctx) = secctx else {
            return Ok(None);
        };
        Ok(Some(
            match self.host_xattr_name(&secctx.name, XattrOp::Change)? {
                Cow::Borrowed(_) => Cow::Borrowed(secctx),
                Cow::Owned(name) => Cow::Owned(SecContext {
                    name,
                    value: secctx.value.clone(),
                }),
            },
        ))
    }

    /// Drops the renamed `security.capability` from the file `fd` is open on (through
    /// /proc/self/fd for an `O_PATH` descriptor), as the host kernel drops the real one on
    /// write, truncation and chown. Nothing to do without a renaming map.
    fn drop_remapped_capability(&self, fd: RawFd, o_path: bool) -> io::Result<()> {
        let Some(name) = &self.remapped_capability else {
            return Ok(());
        };
        let ret = if o_path {
            let path = self.proc_relative(fd)?;
            // SAFETY: both strings are NUL-terminated; result checked.
            unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }
        } else {
            // SAFETY: `name` is NUL-terminated, `fd` an open descriptor; result checked.
            unsafe { libc::fremovexattr(fd, name.as_ptr()) }
        };
        match check_ret(ret) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::ENOTSUP)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Answers SETXATTR; `setxattr_flags` is the extended header's word (SETXATTR_EXT).
    pub(crate) fn do_setxattr(
        &self,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
        setxattr_flags: u32,
    ) -> io::Result<()> {
        if !self.cfg.xattr {
            return Err(errno(libc::ENOSYS));
        }
        self.check_writable()?;
        self.check_acl_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(errno(libc::E2BIG));
        }
        let host_name = self.host_xattr_name(name, XattrOp::Change)?;
        let data = self.inodes.get(inode)?;
        let fd = self.inode_fd(&data)?;
        let path = self.proc_relative(fd.as_fd().as_raw_fd())?;
        if self.posix_acl.load(Ordering::Relaxed)
            && setxattr_flags & SETXATTR_ACL_KILL_SGID != 0
            && name.to_bytes() == POSIX_ACL_ACCESS
        {
            // The guest kernel found the caller outside the file's group and without
            // CAP_FSETID; berth writes the ACL as root, so the host would keep setgid.
            let mode = self.stat_inode(&data)?.st_mode;
            if mode & libc::S_ISGID != 0 {
                // SAFETY: fchmodat through /proc on our descriptor; result checked.
                check_ret(unsafe {
                    libc::fchmodat(
                        self.proc_self_fd.as_raw_fd(),
                        fd_name(fd.as_fd().as_raw_fd()).as_ptr(),
                        mode & 0o7777 & !libc::S_ISGID,
                        0,
                    )
                })?;
            }
        }
        let ticket = self.before(&data);
        // SAFETY: path and name are NUL-terminated, value is a valid slice; result checked.
        check_ret(unsafe {
            libc::setxattr(
                path.as_ptr(),
                host_name.as_ptr(),
                value.as_ptr() as *const libc::c_void,
                value.len(),
                flags as libc::c_int,
            )
        })?;
        self.changed(&data, ticket);
        Ok(())
    }

    /// Answers CREATE, storing `secctx` on the new file.
    pub(crate) fn do_create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: &CreateIn,
        secctx: Option<&SecContext>,
    ) -> io::Result<(Entry, u64, OpenOptions)> {
        self.check_writable()?;
        let name = cstr_arg(name)?;
        let secctx = self.host_security_context(secctx)?;
        let secctx = secctx.as_deref();
        let parent_data = self.inodes.get(parent)?;
        let parent_fd = self.inode_fd(&parent_data)?;
        let parent_ticket = self.before(&parent_data);
        let flags = self.sanitize_open_flags(args.flags);
        // Keep the guest's O_EXCL: it is how create-if-absent races are decided.
        let guest_excl = args.flags as libc::c_int & libc::O_EXCL;
        let open_as_caller = |extra: libc::c_int| {
            self.as_caller(ctx, args.umask, || {
                openat(
                    parent_fd.as_fd(),
                    name,
                    flags | extra | libc::O_NOFOLLOW,
                    args.mode & 0o7777,
                )
            })
            .map_err(|e| self.stale_parent(&parent_data, &parent_fd, e))
        };
        let fd = match secctx {
            None => open_as_caller(libc::O_CREAT | guest_excl)?,
            // The label goes on a file this request creates, never on one already there.
            Some(secctx) => match open_as_caller(libc::O_CREAT | libc::O_EXCL) {
                Ok(fd) => {
                    self.label_new_node(parent_fd.as_fd(), name, Some(fd.as_fd()), secctx, false)?;
                    fd
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && guest_excl == 0 => {
                    open_as_caller(0)?
                }
                Err(e) => return Err(e),
            },
        };
        if args.flags as libc::c_int & libc::O_TRUNC != 0 {
            if self.truncation_kills_priv(ctx, args.fuse_flags) {
                kill_suid_sgid(&File::from(fd.try_clone()?))?;
            }
            self.drop_remapped_capability(fd.as_raw_fd(), false)?;
            self.changed_key(self.key_of_name(fd.as_fd(), EMPTY_CSTR));
        }
        self.changed(&parent_data, parent_ticket);
        let path_fd = openat(
            self.proc_self_fd.as_fd(),
            &fd_name(fd.as_raw_fd()),
            libc::O_PATH,
            0,
        )?;
        let entry = self.insert_looked_up(path_fd, &parent_data)?;
        if let Some(c) = &self.coherence {
            c.named(&parent_data, name.to_bytes());
        }
        let fh = match self.insert_handle(entry.inode, File::from(fd)) {
            Ok(fh) => fh,
            Err(e) => {
                self.forget_inode(entry.inode, 1);
                return Err(e);
            }
        };
        let options = match self.inodes.get(entry.inode) {
            Ok(data) if self.coherence.is_some() && data.tracked => OpenOptions::KEEP_CACHE,
            _ => self.create_options(),
        };
        Ok((entry, fh, options))
    }

    /// Answers MKDIR, storing `secctx` on the new directory.
    pub(crate) fn do_mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        secctx: Option<&SecContext>,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let name = cstr_arg(name)?;
        let secctx = self.host_security_context(secctx)?;
        let secctx = secctx.as_deref();
        let parent_data = self.inodes.get(parent)?;
        let parent_fd = self.inode_fd(&parent_data)?;
        let ticket = self.before(&parent_data);
        self.as_caller(ctx, umask, || {
            // SAFETY: `name` is NUL-terminated; result checked.
            check_ret(unsafe { libc::mkdirat(parent_fd.as_fd().as_raw_fd(), name.as_ptr(), mode) })
        })
        .map_err(|e| self.stale_parent(&parent_data, &parent_fd, e))?;
        self.changed(&parent_data, ticket);
        if let Some(secctx) = secctx {
            self.label_new_node(parent_fd.as_fd(), name, None, secctx, true)?;
        }
        self.do_lookup(parent, name)
    }

    /// Answers MKNOD, storing `secctx` on the new node.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn do_mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        secctx: Option<&SecContext>,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let name = cstr_arg(name)?;
        let secctx = self.host_security_context(secctx)?;
        let secctx = secctx.as_deref();
        let kind = mode & libc::S_IFMT;
        if (kind == libc::S_IFCHR || kind == libc::S_IFBLK) && !self.cfg.allow_device_nodes {
            return Err(errno(libc::EPERM));
        }
        let parent_data = self.inodes.get(parent)?;
        let parent_fd = self.inode_fd(&parent_data)?;
        let ticket = self.before(&parent_data);
        self.as_caller(ctx, umask, || {
            // SAFETY: `name` is NUL-terminated; result checked.
            check_ret(unsafe {
                libc::mknodat(
                    parent_fd.as_fd().as_raw_fd(),
                    name.as_ptr(),
                    mode,
                    rdev as libc::dev_t,
                )
            })
        })
        .map_err(|e| self.stale_parent(&parent_data, &parent_fd, e))?;
        self.changed(&parent_data, ticket);
        if let Some(secctx) = secctx {
            self.label_new_node(parent_fd.as_fd(), name, None, secctx, false)?;
        }
        self.do_lookup(parent, name)
    }

    /// Answers SYMLINK, storing `secctx` on the new link.
    pub(crate) fn do_symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
        secctx: Option<&SecContext>,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let name = cstr_arg(name)?;
        let secctx = self.host_security_context(secctx)?;
        let secctx = secctx.as_deref();
        let parent_data = self.inodes.get(parent)?;
        let parent_fd = self.inode_fd(&parent_data)?;
        let ticket = self.before(&parent_data);
        self.as_caller(ctx, 0, || {
            // SAFETY: both strings are NUL-terminated; result checked.
            check_ret(unsafe {
                libc::symlinkat(
                    linkname.as_ptr(),
                    parent_fd.as_fd().as_raw_fd(),
                    name.as_ptr(),
                )
            })
        })
        .map_err(|e| self.stale_parent(&parent_data, &parent_fd, e))?;
        self.changed(&parent_data, ticket);
        if let Some(secctx) = secctx {
            self.label_new_node(parent_fd.as_fd(), name, None, secctx, false)?;
        }
        self.do_lookup(parent, name)
    }

    fn do_setlk(
        &self,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
        wait: bool,
    ) -> io::Result<()> {
        if flags & FUSE_LK_FLOCK != 0 {
            if !self.cfg.flock {
                return Err(errno(libc::ENOSYS));
            }
            self.settle_migrated_locks(inode, None)?;
            let data = self.handle(inode, handle)?;
            let mut op = match lock.lock_type as libc::c_int {
                libc::F_RDLCK => libc::LOCK_SH,
                libc::F_WRLCK => libc::LOCK_EX,
                libc::F_UNLCK => libc::LOCK_UN,
                _ => return Err(errno(libc::EINVAL)),
            };
            if !wait {
                op |= libc::LOCK_NB;
            }
            // SAFETY: flock on an open descriptor; the result is checked.
            check_ret(unsafe { libc::flock(data.file.as_raw_fd(), op) })?;
            return Ok(());
        }
        if !self.cfg.posix_lock {
            return Err(errno(libc::ENOSYS));
        }
        self.settle_migrated_locks(inode, Some(owner))?;
        let mut fl = to_flock(&lock)?;
        let cmd = if wait {
            libc::F_OFD_SETLKW
        } else {
            libc::F_OFD_SETLK
        };
        // SAFETY: fcntl with a valid flock struct; the result is checked.
        let file = self.owner_lock_file(inode, handle, owner)?;
        check_ret(unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) })?;
        Ok(())
    }
}

/// Sets this thread's umask for the life of the guard.
struct UmaskGuard {
    old: libc::mode_t,
}

/// Gives this thread its own cwd and umask (once), so per-request changes stay private.
fn own_fs_struct() -> io::Result<()> {
    OWN_FS_STRUCT.with(|own| {
        if !own.get() {
            // SAFETY: unshare(CLONE_FS) only detaches this thread's cwd/root/umask.
            check_ret(unsafe { libc::unshare(libc::CLONE_FS) })?;
            own.set(true);
        }
        Ok(())
    })
}

impl UmaskGuard {
    fn set(umask: u32) -> io::Result<Self> {
        own_fs_struct()?;
        // SAFETY: umask only affects this thread's (now private) fs struct.
        let old = unsafe { libc::umask(umask & 0o777) };
        Ok(UmaskGuard { old })
    }
}

impl Drop for UmaskGuard {
    fn drop(&mut self) {
        // SAFETY: restores the previous umask of this thread.
        unsafe { libc::umask(self.old) };
    }
}

/// One `linux_dirent64` record.
struct RawDirent<'a> {
    ino: u64,
    next_offset: u64,
    reclen: usize,
    d_type: u8,
    name: &'a [u8],
    name_with_nul: &'a [u8],
}

impl<'a> RawDirent<'a> {
    const HEADER: usize = 19;

    fn parse(buf: &'a [u8]) -> Option<Self> {
        if buf.len() < Self::HEADER {
            return None;
        }
        let ino = u64::from_ne_bytes(buf[0..8].try_into().ok()?);
        let next_offset = u64::from_ne_bytes(buf[8..16].try_into().ok()?);
        let reclen = u16::from_ne_bytes(buf[16..18].try_into().ok()?) as usize;
        let d_type = buf[18];
        if reclen < Self::HEADER || reclen > buf.len() {
            return None;
        }
        let raw_name = &buf[Self::HEADER..reclen];
        let len = raw_name.iter().position(|&b| b == 0)?;
        Some(RawDirent {
            ino,
            next_offset,
            reclen,
            d_type,
            name: &raw_name[..len],
            name_with_nul: &raw_name[..=len],
        })
    }
}

fn to_flock(lock: &FileLock) -> io::Result<libc::flock> {
    // SAFETY: flock is plain old data; all-zeroes is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match lock.lock_type as libc::c_int {
        libc::F_RDLCK => libc::F_RDLCK as libc::c_short,
        libc::F_WRLCK => libc::F_WRLCK as libc::c_short,
        libc::F_UNLCK => libc::F_UNLCK as libc::c_short,
        _ => return Err(errno(libc::EINVAL)),
    };
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    if lock.start > OFFSET_MAX || lock.end < lock.start {
        return Err(errno(libc::EINVAL));
    }
    fl.l_start = lock.start as i64;
    fl.l_len = if lock.end >= OFFSET_MAX {
        0
    } else {
        (lock.end - lock.start + 1) as i64
    };
    // OFD locks require l_pid == 0.
    fl.l_pid = 0;
    Ok(fl)
}

fn probe_file_handles(root_fd: &OwnedFd, proc_self_fd: &OwnedFd) -> io::Result<OwnedFd> {
    let handle = FileHandle::from_fd(root_fd.as_fd())?;
    let mount_fd = openat(
        proc_self_fd.as_fd(),
        &fd_name(root_fd.as_raw_fd()),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )?;
    // Opening needs CAP_DAC_READ_SEARCH: check we can, not just that we can encode.
    handle.open(mount_fd.as_fd(), libc::O_PATH)?;
    Ok(mount_fd)
}

/// Whether `file` was opened with O_DIRECT.
fn is_direct(file: &File) -> bool {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

/// A zeroed buffer of `len` bytes whose start satisfies O_DIRECT's memory alignment.
struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_IO_MEMORY_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_IO_MEMORY_ALIGN);
        AlignedBuffer {
            storage,
            start,
            len,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// An O_DIRECT read the transport's buffer alignment made the host refuse (EINVAL), done once
/// more through an aligned buffer. If the guest's offset or length is what the host objects
/// to, this fails with the host's EINVAL too, which is what the guest gets, as on the host.
fn read_direct_aligned(
    file: &File,
    w: &mut dyn ZeroCopyWriter,
    size: usize,
    offset: u64,
) -> io::Result<usize> {
    let mut buffer = AlignedBuffer::new(size.min(MAX_IO_SIZE));
    let buf = buffer.as_mut_slice();
    let n = std::os::unix::fs::FileExt::read_at(file, buf, offset)?;
    let mut sent = 0;
    while sent < n {
        let written = w.write(&buf[sent..n])?;
        if written == 0 {
            break;
        }
        sent += written;
    }
    Ok(sent)
}

/// The write counterpart of [`read_direct_aligned`]: the request data is copied into an
/// aligned buffer and written with O_DIRECT still in force.
fn write_direct_aligned(
    file: &File,
    r: &mut dyn ZeroCopyReader,
    size: usize,
    offset: u64,
) -> io::Result<usize> {
    let mut buffer = AlignedBuffer::new(size.min(MAX_IO_SIZE));
    let buf = buffer.as_mut_slice();
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    std::os::unix::fs::FileExt::write_at(file, &buf[..filled], offset)
}

/// `fsetxattr` of a security context on an open (or O_PATH-free) descriptor.
fn set_xattr_on_fd(fd: BorrowedFd<'_>, secctx: &SecContext) -> io::Result<()> {
    // SAFETY: name and value are valid for the lengths given; result checked.
    check_ret(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            secctx.name.as_ptr(),
            secctx.value.as_ptr() as *const libc::c_void,
            secctx.value.len(),
            0,
        )
    })
    .map(drop)
}

/// Clears setuid, and setgid where group execute is set, as the kernel does when an
/// unprivileged caller writes or truncates a file.
fn kill_suid_sgid(file: &File) -> io::Result<()> {
    let mode = fstat(file.as_raw_fd())?.st_mode;
    let mut kill = libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        kill |= libc::S_ISGID;
    }
    if mode & kill != 0 {
        // SAFETY: fchmod on an open descriptor; result checked.
        check_ret(unsafe { libc::fchmod(file.as_raw_fd(), mode & 0o7777 & !kill) })?;
    }
    Ok(())
}

fn cstr_arg(name: &CStr) -> io::Result<&CStr> {
    validate_name(name)?;
    Ok(name)
}

impl FileSystem for PassthroughFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // FsServer answers INIT itself with `negotiate` (it needs flags FsOptions lacks).
        self.negotiate(capable.bits())
            .map(FsOptions::from_bits_truncate)
    }

    fn destroy(&self) {
        self.reset();
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.do_lookup(parent, name)
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        if inode != ROOT_ID {
            self.forget_inode(inode, count);
        }
    }

    fn batch_forget(&self, _ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            if inode != ROOT_ID {
                self.forget_inode(inode, count);
            }
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let data = self.inodes.get(inode)?;
        let ticket = self.before(&data);
        let st = match handle.and_then(|h| self.handle(inode, h).ok()) {
            Some(h) => fstat(h.file.as_raw_fd())?,
            None => self.stat_inode(&data)?,
        };
        self.observed(&data, ticket);
        Ok((st, self.attr_timeout_of(&data)))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.check_writable()?;
        let data = self.inodes.get(inode)?;
        let open_handle = handle.and_then(|h| self.handle(inode, h).ok());
        let path_fd = self.inode_fd(&data)?;
        let proc_name = fd_name(path_fd.as_fd().as_raw_fd());
        // Whatever part of the change got done is bumped, also when a later part fails.
        let ticket = self.before(&data);
        let outcome = (|| -> io::Result<()> {
            if valid.contains(SetattrValid::MODE) {
                // SAFETY: the calls only read their arguments; results are checked.
                let ret = match &open_handle {
                    Some(h) => unsafe { libc::fchmod(h.file.as_raw_fd(), attr.st_mode) },
                    None => unsafe {
                        libc::fchmodat(
                            self.proc_self_fd.as_raw_fd(),
                            proc_name.as_ptr(),
                            attr.st_mode,
                            0,
                        )
                    },
                };
                check_ret(ret)?;
            }

            if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
                let uid = if valid.contains(SetattrValid::UID) {
                    attr.st_uid
                } else {
                    u32::MAX
                };
                let gid = if valid.contains(SetattrValid::GID) {
                    attr.st_gid
                } else {
                    u32::MAX
                };
                // The kernel drops file capabilities on chown of anything but a directory; only
                // regular files carry them.
                if data.file_type == libc::S_IFREG {
                    self.drop_remapped_capability(path_fd.as_fd().as_raw_fd(), true)?;
                }
                // SAFETY: fchownat with AT_EMPTY_PATH acts on the descriptor; result checked.
                check_ret(unsafe {
                    libc::fchownat(
                        path_fd.as_fd().as_raw_fd(),
                        EMPTY_CSTR.as_ptr(),
                        uid,
                        gid,
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            }

            if valid.contains(SetattrValid::SIZE) {
                if data.file_type != libc::S_IFREG {
                    return Err(errno(if data.is_dir() {
                        libc::EISDIR
                    } else {
                        libc::EINVAL
                    }));
                }
                let size = attr.st_size;
                let ret = match &open_handle {
                    // SAFETY: ftruncate on an open descriptor; result checked.
                    Some(h) => unsafe { libc::ftruncate64(h.file.as_raw_fd(), size) },
                    None => {
                        let file = self.open_inode(&data, libc::O_WRONLY | libc::O_NONBLOCK)?;
                        // SAFETY: as above.
                        unsafe { libc::ftruncate64(file.as_raw_fd(), size) }
                    }
                };
                check_ret(ret)?;
                self.drop_remapped_capability(path_fd.as_fd().as_raw_fd(), true)?;
                if !valid.contains(SetattrValid::KILL_SUIDGID)
                    && self.modification_kills_priv(ctx, false)
                {
                    let file = match &open_handle {
                        Some(h) => h.file.try_clone()?,
                        None => self.open_inode(&data, libc::O_RDONLY | libc::O_NONBLOCK)?,
                    };
                    kill_suid_sgid(&file)?;
                }
            }

            if valid.contains(SetattrValid::KILL_SUIDGID) {
                let st = self.stat_inode(&data)?;
                let cleared = st.st_mode & !(libc::S_ISUID | libc::S_ISGID);
                if cleared != st.st_mode && data.file_type == libc::S_IFREG {
                    // SAFETY: fchmodat through /proc on our descriptor; result checked.
                    check_ret(unsafe {
                        libc::fchmodat(
                            self.proc_self_fd.as_raw_fd(),
                            proc_name.as_ptr(),
                            cleared & 0o7777,
                            0,
                        )
                    })?;
                }
            }

            if valid.intersects(
                SetattrValid::ATIME
                    | SetattrValid::MTIME
                    | SetattrValid::ATIME_NOW
                    | SetattrValid::MTIME_NOW,
            ) {
                let omit = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                };
                let now = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                };
                let mut times = [omit, omit];
                if valid.contains(SetattrValid::ATIME_NOW) {
                    times[0] = now;
                } else if valid.contains(SetattrValid::ATIME) {
                    times[0] = libc::timespec {
                        tv_sec: attr.st_atime,
                        tv_nsec: attr.st_atime_nsec,
                    };
                }
                if valid.contains(SetattrValid::MTIME_NOW) {
                    times[1] = now;
                } else if valid.contains(SetattrValid::MTIME) {
                    times[1] = libc::timespec {
                        tv_sec: attr.st_mtime,
                        tv_nsec: attr.st_mtime_nsec,
                    };
                }
                let ret = match &open_handle {
                    // SAFETY: futimens with a two-element array; result checked.
                    Some(h) => unsafe { libc::futimens(h.file.as_raw_fd(), times.as_ptr()) },
                    // SAFETY: utimensat with AT_EMPTY_PATH acts on the descriptor itself (a symlink
                    // stays unfollowed); result checked.
                    None => unsafe {
                        libc::utimensat(
                            path_fd.as_fd().as_raw_fd(),
                            EMPTY_CSTR.as_ptr(),
                            times.as_ptr(),
                            libc::AT_EMPTY_PATH,
                        )
                    },
                };
                check_ret(ret)?;
            }
            Ok(())
        })();
        self.changed(&data, ticket);
        outcome?;
        Ok((self.stat_inode(&data)?, self.attr_timeout_of(&data)))
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        let data = self.inodes.get(inode)?;
        if data.file_type != libc::S_IFLNK {
            return Err(errno(libc::EINVAL));
        }
        let fd = self.inode_fd(&data)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: `buf` is writable for its length; result checked.
        let n = unsafe {
            libc::readlinkat(
                fd.as_fd().as_raw_fd(),
                EMPTY_CSTR.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_char,
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.do_symlink(ctx, linkname, parent, name, None)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.do_mknod(ctx, parent, name, mode, rdev, umask, None)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.do_mkdir(ctx, parent, name, mode, umask, None)
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        let name = cstr_arg(name)?;
        let parent_data = self.inodes.get(parent)?;
        let parent_fd = self.inode_fd(&parent_data)?;
        let ticket = self.before(&parent_data);
        // The unlinked inode's link count changes too (it may have other names).
        let child = self.key_of_name(parent_fd.as_fd(), name);
        // SAFETY: `name` is NUL-terminated; result checked.
        check_ret(unsafe { libc::unlinkat(parent_fd.as_fd().as_raw_fd(), name.as_ptr(), 0) })
            .map_err(|e| self.stale_parent(&parent_data, &parent_fd, e))?;
        self.changed(&parent_data, ticket);
        self.changed_key(child);
        Ok(())
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        let name = cstr_arg(name)?;
        let parent_data = self.inodes.get(parent)?;
        let parent_fd = self.inode_fd(&parent_data)?;
        let ticket = self.before(&parent_data);
        let child = self.key_of_name(parent_fd.as_fd(), name);
        // SAFETY: `name` is NUL-terminated; result checked.
        check_ret(unsafe {
            libc::unlinkat(
                parent_fd.as_fd().as_raw_fd(),
                name.as_ptr(),
                libc::AT_REMOVEDIR,
            )
        })
        .map_err(|e| self.stale_parent(&parent_data, &parent_fd, e))?;
        self.changed(&parent_data, ticket);
        self.changed_key(child);
        Ok(())
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        let oldname = cstr_arg(oldname)?;
        let newname = cstr_arg(newname)?;
        let old_data = self.inodes.get(olddir)?;
        let new_data = self.inodes.get(newdir)?;
        let old_fd = self.inode_fd(&old_data)?;
        let new_fd = self.inode_fd(&new_data)?;
        let old_ticket = self.before(&old_data);
        let new_ticket = self.before(&new_data);
        // The moved inode's ctime changes, a replaced one loses a link.
        let moved = self.key_of_name(old_fd.as_fd(), oldname);
        let replaced = self.key_of_name(new_fd.as_fd(), newname);
        // A whiteout is a device node: create it as the caller.
        self.as_caller(ctx, 0, || {
            // SAFETY: both names are NUL-terminated; result checked.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_renameat2,
                    old_fd.as_fd().as_raw_fd(),
                    oldname.as_ptr(),
                    new_fd.as_fd().as_raw_fd(),
                    newname.as_ptr(),
                    flags,
                )
            };
            check_ret(ret as libc::c_int)
        })
        .map_err(|e| self.stale_parent(&old_data, &old_fd, e))
        .map_err(|e| self.stale_parent(&new_data, &new_fd, e))?;
        self.changed(&old_data, old_ticket);
        if newdir != olddir {
            self.changed(&new_data, new_ticket);
        }
        self.changed_key(moved);
        self.changed_key(replaced);
        Ok(())
    }

    fn link(
        &self,
        _ctx: &Context,
        inode: u64,
        newparent: u64,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let newname = cstr_arg(newname)?;
        let data = self.inodes.get(inode)?;
        if data.is_dir() {
            return Err(errno(libc::EPERM));
        }
        let parent_data = self.inodes.get(newparent)?;
        let fd = self.inode_fd(&data)?;
        let parent_fd = self.inode_fd(&parent_data)?;
        let proc_name = fd_name(fd.as_fd().as_raw_fd());
        let ticket = self.before(&data);
        let parent_ticket = self.before(&parent_data);
        // SAFETY: names are NUL-terminated; AT_SYMLINK_FOLLOW resolves the /proc magic link to
        // our inode (not beyond it); result checked.
        check_ret(unsafe {
            libc::linkat(
                self.proc_self_fd.as_raw_fd(),
                proc_name.as_ptr(),
                parent_fd.as_fd().as_raw_fd(),
                newname.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })
        .map_err(|e| self.stale_parent(&parent_data, &parent_fd, e))?;
        self.changed(&data, ticket);
        self.changed(&parent_data, parent_ticket);
        self.do_lookup(newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let iflags = flags as libc::c_int;
        if self.cfg.readonly
            && (iflags & libc::O_ACCMODE != libc::O_RDONLY || iflags & libc::O_TRUNC != 0)
        {
            return Err(errno(libc::EROFS));
        }
        let data = self.inodes.get(inode)?;
        match data.file_type {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(errno(libc::EISDIR)),
            libc::S_IFLNK => return Err(errno(libc::ELOOP)),
            // Device nodes and fifos are opened by the client kernel itself, never here.
            _ => return Err(errno(libc::ENXIO)),
        }
        let ticket = self.before(&data);
        let file = self.open_inode(&data, self.sanitize_open_flags(flags))?;
        if iflags & libc::O_TRUNC != 0 {
            self.changed(&data, ticket);
            if self.truncation_kills_priv(ctx, fuse_flags) {
                kill_suid_sgid(&file)?;
            }
            self.drop_remapped_capability(file.as_raw_fd(), false)?;
        }
        let fh = self.insert_handle(inode, file)?;
        Ok((Some(fh), self.open_options_for(&data), None))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let (entry, fh, options) = self.do_create(ctx, parent, name, &args, None)?;
        Ok((entry, Some(fh), options, None))
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let data = self.handle(inode, handle)?;
        // Data read into the client's page cache is as old as the version read before it.
        let node = self
            .coherence
            .as_ref()
            .and_then(|_| self.inodes.get(inode).ok());
        let ticket = node.as_ref().and_then(|n| self.before(n));
        let mut file = HostFile::new(data.file.as_fd());
        let read = match w.write_from(&mut file, size as usize, offset) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && is_direct(&data.file) => {
                read_direct_aligned(&data.file, w, size as usize, offset)
            }
            other => other,
        };
        if let Some(node) = &node {
            self.observed(node, ticket);
        }
        read
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.check_writable()?;
        let data = self.handle(inode, handle)?;
        if self.modification_kills_priv(ctx, fuse_flags & FUSE_WRITE_KILL_PRIV != 0) {
            kill_suid_sgid(&data.file)?;
        }
        self.drop_remapped_capability(data.file.as_raw_fd(), false)?;
        let node = self
            .coherence
            .as_ref()
            .and_then(|_| self.inodes.get(inode).ok());
        let ticket = node.as_ref().and_then(|n| self.before(n));
        let mut file = HostFile::new(data.file.as_fd());
        let written = match r.read_to(&mut file, size as usize, offset) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && is_direct(&data.file) => {
                write_direct_aligned(&data.file, r, size as usize, offset)
            }
            other => other,
        };
        if let Some(node) = &node {
            self.changed(node, ticket);
        }
        written
    }

    fn flush(&self, _ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        // Data is written through. A close drops the closer's POSIX locks, and the client
        // sends FLUSH (not RELEASE) synchronously with close(2): drop that owner's locks now.
        let data = self.handles.get(inode, handle)?;
        self.release_owner_locks(inode, lock_owner);
        if data.locks_lost.load(Ordering::Relaxed) {
            // Its flock lock was lost in a migration: close(2) reports it.
            return Err(errno(libc::EIO));
        }
        Ok(())
    }

    fn fsync(&self, _ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        let data = self.handle(inode, handle)?;
        let fd = data.file.as_raw_fd();
        // SAFETY: fsync/fdatasync on an open descriptor; result checked.
        check_ret(unsafe {
            if datasync {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        })?;
        Ok(())
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        let data = self.handle(inode, handle)?;
        let node = self
            .coherence
            .as_ref()
            .and_then(|_| self.inodes.get(inode).ok());
        let ticket = node.as_ref().and_then(|n| self.before(n));
        // SAFETY: fallocate on an open descriptor; result checked.
        check_ret(unsafe {
            libc::fallocate64(
                data.file.as_raw_fd(),
                mode as libc::c_int,
                offset as i64,
                length as i64,
            )
        })?;
        if let Some(node) = &node {
            self.changed(node, ticket);
        }
        Ok(())
    }

    fn release(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        if let Some(owner) = lock_owner {
            self.release_owner_locks(inode, owner);
        }
        // Closing the descriptor drops its flock locks too.
        self.remove_handle(inode, handle)
    }

    fn statfs(&self, _ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let data = self.inodes.get(inode)?;
        let fd = self.inode_fd(&data)?;
        let mut st = MaybeUninit::<statvfs64>::zeroed();
        // SAFETY: `st` is a properly sized out-buffer; fstatvfs works on O_PATH descriptors.
        check_ret(unsafe { libc::fstatvfs64(fd.as_fd().as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstatvfs64 succeeded and filled the buffer.
        Ok(unsafe { st.assume_init() })
    }

    fn setxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.do_setxattr(inode, name, value, flags, 0)
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        if !self.cfg.xattr {
            return Err(errno(libc::ENOSYS));
        }
        self.check_acl_name(name)?;
        let host_name = self.host_xattr_name(name, XattrOp::Get)?;
        let data = self.inodes.get(inode)?;
        let fd = self.inode_fd(&data)?;
        let path = self.proc_relative(fd.as_fd().as_raw_fd())?;
        // As getxattr(2) does with a larger buffer: no value is longer than XATTR_SIZE_MAX, and
        // the host answers ERANGE or E2BIG exactly as it would to a local caller.
        let size = (size as usize).min(XATTR_SIZE_MAX);
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` is writable for `size` bytes (a null pointer with size 0 asks for the
        // length); result checked.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                host_name.as_ptr(),
                if size == 0 {
                    std::ptr::null_mut()
                } else {
                    buf.as_mut_ptr() as *mut libc::c_void
                },
                size,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            Ok(GetxattrReply::Count(n as u32))
        } else {
            buf.truncate(n as usize);
            Ok(GetxattrReply::Value(buf))
        }
    }

    fn listxattr(&self, _ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        if !self.cfg.xattr {
            return Err(errno(libc::ENOSYS));
        }
        let data = self.inodes.get(inode)?;
        let fd = self.inode_fd(&data)?;
        let path = self.proc_relative(fd.as_fd().as_raw_fd())?;
        // As listxattr(2) does with a larger buffer, the size is capped at XATTR_LIST_MAX (the
        // host answers E2BIG for longer lists). When ACL names are hidden or names are mapped,
        // the whole list is read so that sizes are compared (and the size probe answered)
        // with the list the guest gets.
        let hide_acls = !self.posix_acl.load(Ordering::Relaxed);
        let rewrite = hide_acls || self.cfg.xattrmap.is_some();
        let read_size = if rewrite {
            XATTR_LIST_MAX
        } else {
            (size as usize).min(XATTR_LIST_MAX)
        };
        let mut buf = vec![0u8; read_size];
        // SAFETY: `buf` is writable for its length; result checked.
        let n = unsafe {
            libc::listxattr(
                path.as_ptr(),
                if read_size == 0 {
                    std::ptr::null_mut()
                } else {
                    buf.as_mut_ptr() as *mut libc::c_char
                },
                read_size,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if read_size == 0 {
            return Ok(ListxattrReply::Count(n as u32));
        }
        buf.truncate(n as usize);
        if rewrite {
            // Mapping only strips prefixes or hides names: the list never grows.
            let mut shown = Vec::with_capacity(buf.len());
            for host in buf.split(|&b| b == 0).filter(|n| !n.is_empty()) {
                let Some(guest) = self.guest_xattr_name(host) else {
                    continue;
                };
                // ACL names are hidden by what the guest would see (as virtiofsd).
                if hide_acls && (guest == POSIX_ACL_ACCESS || guest == POSIX_ACL_DEFAULT) {
                    continue;
                }
                shown.extend_from_slice(guest);
                shown.push(0);
            }
            buf = shown;
        }
        if size == 0 {
            Ok(ListxattrReply::Count(buf.len() as u32))
        } else if buf.len() > size as usize {
            Err(errno(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(buf))
        }
    }

    fn removexattr(&self, _ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        if !self.cfg.xattr {
            return Err(errno(libc::ENOSYS));
        }
        self.check_writable()?;
        self.check_acl_name(name)?;
        let host_name = self.host_xattr_name(name, XattrOp::Change)?;
        let data = self.inodes.get(inode)?;
        let fd = self.inode_fd(&data)?;
        let path = self.proc_relative(fd.as_fd().as_raw_fd())?;
        let ticket = self.before(&data);
        // SAFETY: both strings are NUL-terminated; result checked.
        check_ret(unsafe { libc::removexattr(path.as_ptr(), host_name.as_ptr()) })?;
        self.changed(&data, ticket);
        Ok(())
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let data = self.inodes.get(inode)?;
        if !data.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let file = self.open_inode(&data, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let fh = self.insert_handle(inode, file)?;
        Ok((Some(fh), self.open_options_for(&data)))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.do_readdir(inode, handle, size, offset, false, &mut |d, _| add_entry(d))
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.do_readdir(inode, handle, size, offset, true, &mut |d, e| match e {
            Some(e) => add_entry(d, e),
            None => Err(errno(libc::EIO)),
        })
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.fsync(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, _ctx: &Context, inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.remove_handle(inode, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        let data = self.inodes.get(inode)?;
        let st = self.stat_inode(&data)?;
        let mask = mask as libc::c_int;
        if mask == libc::F_OK {
            return Ok(());
        }
        if mask & libc::W_OK != 0 && self.cfg.readonly {
            return Err(errno(libc::EROFS));
        }
        let mode = st.st_mode;
        if ctx.uid == 0 {
            // Root may read and write anything; execute needs some execute bit (or a dir).
            if mask & libc::X_OK != 0 && data.file_type != libc::S_IFDIR && mode & 0o111 == 0 {
                return Err(errno(libc::EACCES));
            }
            return Ok(());
        }
        let bits = if st.st_uid == ctx.uid {
            (mode >> 6) & 0o7
        } else if st.st_gid == ctx.gid {
            (mode >> 3) & 0o7
        } else {
            mode & 0o7
        };
        let need = (if mask & libc::R_OK != 0 { 4 } else { 0 })
            | (if mask & libc::W_OK != 0 { 2 } else { 0 })
            | (if mask & libc::X_OK != 0 { 1 } else { 0 });
        if bits & need == need {
            Ok(())
        } else {
            Err(errno(libc::EACCES))
        }
    }

    fn lseek(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let data = self.handle(inode, handle)?;
        let whence = whence as libc::c_int;
        if ![
            libc::SEEK_SET,
            libc::SEEK_CUR,
            libc::SEEK_END,
            libc::SEEK_DATA,
            libc::SEEK_HOLE,
        ]
        .contains(&whence)
        {
            return Err(errno(libc::EINVAL));
        }
        // SAFETY: lseek on an open descriptor; result checked. I/O uses pread/pwrite, so
        // moving this descriptor's position affects nothing else.
        let ret = unsafe { libc::lseek64(data.file.as_raw_fd(), offset as i64, whence) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as u64)
    }

    fn getlk(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        if !self.cfg.posix_lock || flags & FUSE_LK_FLOCK != 0 {
            return Err(errno(libc::ENOSYS));
        }
        self.settle_migrated_locks(inode, Some(owner))?;
        let file = self.owner_lock_file(inode, handle, owner)?;
        let mut fl = to_flock(&lock)?;
        // SAFETY: fcntl with a valid flock struct; result checked.
        check_ret(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) })?;
        let start = fl.l_start.max(0) as u64;
        Ok(FileLock {
            start,
            end: if fl.l_len == 0 {
                OFFSET_MAX
            } else {
                start + fl.l_len as u64 - 1
            },
            lock_type: fl.l_type as u32,
            pid: if fl.l_pid > 0 { fl.l_pid as u32 } else { 0 },
        })
    }

    fn setlk(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.do_setlk(inode, handle, owner, lock, flags, false)
    }

    fn setlkw(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.do_setlk(inode, handle, owner, lock, flags, true)
    }
}

/// `fstat` of an open descriptor.
fn fstat_of(file: &File) -> io::Result<libc::stat64> {
    let mut st = MaybeUninit::<libc::stat64>::zeroed();
    // SAFETY: `st` is a properly sized out-buffer for one stat64; the descriptor is open.
    check_ret(unsafe { libc::fstat64(file.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat64 succeeded and filled the buffer.
    Ok(unsafe { st.assume_init() })
}
