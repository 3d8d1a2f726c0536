//! The table of inodes the client has looked up, keyed both ways.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::fd_cache::{FdCache, DEFAULT_CAPACITY};
use crate::file_handle::FileHandle;
use crate::util::errno;

/// What makes a host inode unique: a hard-linked file seen through two names is one inode,
/// the same (dev, ino) reached through two mounts of one filesystem are two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub ino: u64,
    pub dev: u64,
    pub mnt_id: u64,
}

/// How berth holds on to a host inode.
pub enum InodeFile {
    /// An `O_PATH` descriptor.
    Fd(OwnedFd),
    /// A file handle, reopened on demand.
    Handle(FileHandle),
    /// Migrated from another daemon that could not describe it, or not found again here
    /// (`--migration-on-error guest-error`): every use fails with EIO.
    Lost,
}

/// One looked-up inode.
pub struct InodeData {
    /// The FUSE node id.
    pub id: u64,
    pub key: InodeKey,
    pub file: InodeFile,
    /// `st_mode & S_IFMT` at lookup time (an inode never changes type).
    pub file_type: u32,
    /// Lookups not yet forgotten by the client.
    refcount: AtomicU64,
    /// The inode's slot in the version table (shared caching only).
    pub slot: Option<berth_versions::Slot>,
    /// It has a slot and host changes to it are watched: the client may cache it long.
    pub tracked: bool,
    /// The version the client's cache of it reflects (`berth fuse` with shared caching).
    pub known: AtomicU64,
}

impl InodeData {
    pub fn new(key: InodeKey, file: InodeFile, file_type: u32) -> Self {
        InodeData {
            id: 0,
            key,
            file,
            file_type,
            refcount: AtomicU64::new(1),
            slot: None,
            tracked: false,
            known: AtomicU64::new(crate::coherence::NOT_DELIVERED),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.file_type == libc::S_IFDIR
    }

    /// Lookups the client has not forgotten yet.
    pub fn lookups(&self) -> u64 {
        self.refcount.load(Ordering::Acquire)
    }

    /// Sets the lookup count (an inode rebuilt from migrated state).
    pub fn set_lookups(&self, count: u64) {
        self.refcount.store(count, Ordering::Release);
    }
}

/// Lookup tables. An inode held by descriptor pins its host inode, so its (dev, ino, mount)
/// key stays its own until it is released; one held only by file handle does not, and once
/// the host file is deleted the number may come back as another file. Handle-held inodes are
/// therefore found by their handle bytes (which carry a generation number), never by key.
#[derive(Default)]
struct Maps {
    by_id: HashMap<u64, Arc<InodeData>>,
    /// Inodes held by descriptor.
    by_key: HashMap<InodeKey, u64>,
    /// Inodes held by file handle.
    by_handle: HashMap<FileHandle, u64>,
}

impl Maps {
    /// The inode `key`/`handle` name, if the client holds it.
    fn find(&self, key: &InodeKey, handle: Option<&FileHandle>) -> Option<&Arc<InodeData>> {
        handle
            .and_then(|h| self.by_handle.get(h))
            .or_else(|| self.by_key.get(key))
            .and_then(|id| self.by_id.get(id))
    }

    fn insert(&mut self, data: Arc<InodeData>) {
        match &data.file {
            InodeFile::Fd(_) => self.by_key.insert(data.key, data.id),
            InodeFile::Handle(handle) => self.by_handle.insert(handle.clone(), data.id),
            // Never found by a lookup: a new lookup of the same name gets a new node.
            InodeFile::Lost => None,
        };
        self.by_id.insert(data.id, data);
    }

    fn remove(&mut self, id: u64) {
        let Some(data) = self.by_id.remove(&id) else {
            return;
        };
        match &data.file {
            InodeFile::Fd(_) => {
                if self.by_key.get(&data.key) == Some(&id) {
                    self.by_key.remove(&data.key);
                }
            }
            InodeFile::Handle(handle) => {
                if self.by_handle.get(handle) == Some(&id) {
                    self.by_handle.remove(handle);
                }
            }
            InodeFile::Lost => {}
        }
    }
}

/// All inodes the client holds, with their lookup counts.
pub struct InodeStore {
    maps: RwLock<Maps>,
    next_id: AtomicU64,
    /// Most inodes held at once: a client that looks up without ever forgetting gets ENFILE
    /// instead of growing the daemon without bound.
    limit: usize,
    /// Descriptors of handle-held directories in use (see [`FdCache`]).
    dir_fds: FdCache,
}

impl InodeStore {
    /// A store whose first inode (the root) gets id `root_id`.
    pub fn new(root_id: u64, limit: usize) -> Self {
        InodeStore {
            maps: RwLock::new(Maps::default()),
            next_id: AtomicU64::new(root_id),
            limit: limit.max(1),
            dir_fds: FdCache::new(DEFAULT_CAPACITY),
        }
    }

    /// The inode with FUSE id `id`; EBADF when the client names one it does not hold.
    pub fn get(&self, id: u64) -> io::Result<Arc<InodeData>> {
        let maps = self.maps.read().map_err(|_| errno(libc::EIO))?;
        maps.by_id
            .get(&id)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    /// Takes one more reference on the inode the host calls `key` (and, when it has one,
    /// `handle`) if the client holds it, else inserts the inode `make` builds (with one
    /// reference).
    ///
    /// A held inode matches by handle first; by key only if it is held by descriptor (see
    /// [`Maps`]), so a reused inode number never resolves to a node of a deleted file.
    pub fn get_or_insert(
        &self,
        key: InodeKey,
        handle: Option<&FileHandle>,
        make: impl FnOnce() -> io::Result<InodeData>,
    ) -> io::Result<Arc<InodeData>> {
        if let Some(found) = self.take_ref(&key, handle)? {
            return Ok(found);
        }
        let mut data = make()?;
        let mut maps = self.maps.write().map_err(|_| errno(libc::EIO))?;
        // Another thread may have inserted it while `make` ran.
        if let Some(found) = maps.find(&key, handle) {
            found.refcount.fetch_add(1, Ordering::AcqRel);
            return Ok(found.clone());
        }
        if maps.by_id.len() >= self.limit {
            return Err(errno(libc::ENFILE));
        }
        data.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let data = Arc::new(data);
        maps.insert(data.clone());
        Ok(data)
    }

    /// Takes one more reference on the inode with node id `id` (a lookup of "." or "..").
    pub fn take_ref_by_id(&self, id: u64) -> io::Result<Arc<InodeData>> {
        let maps = self.maps.read().map_err(|_| errno(libc::EIO))?;
        let found = maps.by_id.get(&id).ok_or_else(|| errno(libc::EBADF))?;
        found.refcount.fetch_add(1, Ordering::AcqRel);
        Ok(found.clone())
    }

    fn take_ref(
        &self,
        key: &InodeKey,
        handle: Option<&FileHandle>,
    ) -> io::Result<Option<Arc<InodeData>>> {
        let maps = self.maps.read().map_err(|_| errno(libc::EIO))?;
        // Counts only drop to zero under the write lock, together with removal, so any inode
        // visible here is alive.
        Ok(maps.find(key, handle).map(|found| {
            found.refcount.fetch_add(1, Ordering::AcqRel);
            found.clone()
        }))
    }

    /// Drops `count` references; the inode is released (and returned) when none remain.
    pub fn forget(&self, id: u64, count: u64) -> Option<Arc<InodeData>> {
        let released = self.drop_refs(id, count);
        if released.is_some() {
            self.dir_fds.remove(id);
        }
        released
    }

    /// [`forget`](Self::forget) under the table lock; the inode when it was released.
    fn drop_refs(&self, id: u64, count: u64) -> Option<Arc<InodeData>> {
        let Ok(mut maps) = self.maps.write() else {
            return None;
        };
        let data = maps.by_id.get(&id)?.clone();
        let mut current = data.refcount.load(Ordering::Acquire);
        loop {
            let next = current.saturating_sub(count);
            match data
                .refcount
                .compare_exchange(current, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        if current.saturating_sub(count) == 0 {
            maps.remove(id);
            return Some(data);
        }
        None
    }

    /// Drops every inode but `keep`.
    pub fn clear_except(&self, keep: u64) {
        if let Ok(mut maps) = self.maps.write() {
            maps.by_id.retain(|id, _| *id == keep);
            maps.by_key.retain(|_, id| *id == keep);
            maps.by_handle.retain(|_, id| *id == keep);
        }
        self.dir_fds.retain_only(keep);
    }

    /// The cached descriptor of directory `id`, held by file handle, if there is one.
    pub fn cached_dir_fd(&self, id: u64) -> Option<Arc<OwnedFd>> {
        self.dir_fds.get(id)
    }

    /// Drops the descriptor cached for directory `id`.
    pub fn uncache_dir_fd(&self, id: u64) {
        self.dir_fds.remove(id);
    }

    /// Caches `fd`, an `O_PATH` descriptor of the handle-held directory `id`.
    pub fn cache_dir_fd(&self, id: u64, fd: OwnedFd) -> Arc<OwnedFd> {
        self.dir_fds.insert(id, fd)
    }

    /// Number of directory descriptors cached (for tests).
    #[cfg(test)]
    pub fn cached_dir_fds(&self) -> usize {
        self.dir_fds.len()
    }

    /// Every inode held, in node id order (the migration source's snapshot).
    pub fn snapshot(&self) -> Vec<Arc<InodeData>> {
        let mut all: Vec<_> = self
            .maps
            .read()
            .map(|m| m.by_id.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by_key(|data| data.id);
        all
    }

    /// The id the next new inode gets.
    pub fn next_id(&self) -> u64 {
        self.next_id.load(Ordering::Acquire)
    }

    /// Inserts an inode rebuilt from migrated state under its own id (already set in `data`),
    /// replacing whatever had that id, and makes sure new inodes get ids above it and at least
    /// `next_id`.
    pub fn restore(&self, data: InodeData, next_id: u64) -> io::Result<()> {
        let mut maps = self.maps.write().map_err(|_| errno(libc::EIO))?;
        let id = data.id;
        maps.remove(id);
        maps.insert(Arc::new(data));
        self.dir_fds.remove(id);
        self.next_id
            .fetch_max(next_id.max(id.saturating_add(1)), Ordering::AcqRel);
        Ok(())
    }

    /// Number of inodes held.
    pub fn len(&self) -> usize {
        self.maps.read().map(|m| m.by_id.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ino: u64) -> InodeKey {
        InodeKey {
            ino,
            dev: 1,
            mnt_id: 1,
        }
    }

    fn make(ino: u64) -> io::Result<InodeData> {
        let fd = std::fs::File::open("/")?.into();
        Ok(InodeData::new(key(ino), InodeFile::Fd(fd), libc::S_IFDIR))
    }

    #[test]
    fn a_second_lookup_shares_the_inode_and_forget_releases_it() {
        let store = InodeStore::new(1, 10);
        let a = store.get_or_insert(key(5), None, || make(5)).unwrap();
        let b = store
            .get_or_insert(key(5), None, || panic!("must reuse"))
            .unwrap();
        assert_eq!(a.id, b.id);
        store.forget(a.id, 1);
        assert!(store.get(a.id).is_ok(), "one reference is left");
        store.forget(a.id, 1);
        assert_eq!(
            store.get(a.id).err().and_then(|e| e.raw_os_error()),
            Some(libc::EBADF)
        );
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn forgetting_a_directory_closes_its_cached_descriptor() {
        let store = InodeStore::new(1, 10);
        let dir = store.get_or_insert(key(5), None, || make(5)).unwrap();
        let other = store.get_or_insert(key(6), None, || make(6)).unwrap();
        store.cache_dir_fd(dir.id, std::fs::File::open("/").unwrap().into());
        store.cache_dir_fd(other.id, std::fs::File::open("/").unwrap().into());
        assert_eq!(store.cached_dir_fds(), 2);
        store.forget(dir.id, 1);
        assert!(store.cached_dir_fd(dir.id).is_none());
        assert_eq!(
            store.cached_dir_fds(),
            1,
            "only the forgotten inode's entry goes"
        );
        store.clear_except(1);
        assert_eq!(store.cached_dir_fds(), 0);
    }

    #[test]
    fn lookups_past_the_limit_fail_with_enfile() {
        let store = InodeStore::new(1, 3);
        for ino in 0..3 {
            store.get_or_insert(key(ino), None, || make(ino)).unwrap();
        }
        let err = store
            .get_or_insert(key(99), None, || make(99))
            .err()
            .unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::ENFILE));
        // Known inodes can still be looked up again.
        assert!(store.get_or_insert(key(1), None, || make(1)).is_ok());
    }

    fn make_handle_held(ino: u64, handle: &FileHandle) -> io::Result<InodeData> {
        Ok(InodeData::new(
            key(ino),
            InodeFile::Handle(handle.clone()),
            libc::S_IFREG,
        ))
    }

    #[test]
    fn a_reused_inode_number_with_a_new_handle_is_a_new_inode() {
        let store = InodeStore::new(1, 10);
        // Same (dev, ino, mount), different generation: the old file was deleted and its
        // number reused.
        let old_handle = FileHandle::for_test(1, &[12, 0, 0, 0, 1, 0, 0, 0]);
        let new_handle = FileHandle::for_test(1, &[12, 0, 0, 0, 2, 0, 0, 0]);
        let old = store
            .get_or_insert(key(12), Some(&old_handle), || {
                make_handle_held(12, &old_handle)
            })
            .unwrap();
        let new = store
            .get_or_insert(key(12), Some(&new_handle), || {
                make_handle_held(12, &new_handle)
            })
            .unwrap();
        assert_ne!(old.id, new.id, "a new file must get a new node id");
        // Each handle still finds its own inode.
        let again = store
            .get_or_insert(key(12), Some(&old_handle), || panic!("must reuse"))
            .unwrap();
        assert_eq!(again.id, old.id);
        // Forgetting one leaves the other reachable.
        store.forget(old.id, 2);
        let still = store
            .get_or_insert(key(12), Some(&new_handle), || panic!("must reuse"))
            .unwrap();
        assert_eq!(still.id, new.id);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_handle_held_inode_is_never_found_by_key_alone() {
        let store = InodeStore::new(1, 10);
        let handle = FileHandle::for_test(1, &[3, 0, 0, 0, 9, 0, 0, 0]);
        let held = store
            .get_or_insert(key(3), Some(&handle), || make_handle_held(3, &handle))
            .unwrap();
        // A lookup that could not produce a handle (it falls back to a descriptor) must not
        // take over a handle-held node: nothing pins that inode number.
        let by_fd = store.get_or_insert(key(3), None, || make(3)).unwrap();
        assert_ne!(held.id, by_fd.id);
        // A descriptor-held inode is found by key even when a handle is offered (an O_TMPFILE
        // file linked into the tree later can produce one).
        let other = FileHandle::for_test(1, &[3, 0, 0, 0, 10, 0, 0, 0]);
        let found = store
            .get_or_insert(key(3), Some(&other), || {
                panic!("must reuse the fd-held inode")
            })
            .unwrap();
        assert_eq!(found.id, by_fd.id);
    }

    #[test]
    fn lookups_of_dot_take_a_reference_by_id() {
        let store = InodeStore::new(1, 10);
        let a = store.get_or_insert(key(4), None, || make(4)).unwrap();
        let b = store.take_ref_by_id(a.id).unwrap();
        assert_eq!(a.id, b.id);
        store.forget(a.id, 1);
        assert!(store.get(a.id).is_ok(), "the second reference keeps it");
        store.forget(a.id, 1);
        assert!(store.get(a.id).is_err());
        assert_eq!(
            store
                .take_ref_by_id(a.id)
                .err()
                .and_then(|e| e.raw_os_error()),
            Some(libc::EBADF)
        );
    }

    #[test]
    fn forgetting_more_than_was_looked_up_does_not_underflow() {
        let store = InodeStore::new(1, 10);
        let a = store.get_or_insert(key(7), None, || make(7)).unwrap();
        store.forget(a.id, u64::MAX);
        assert_eq!(store.len(), 0);
        store.forget(a.id, 1);
    }
}
