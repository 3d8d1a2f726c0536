//! The table of inodes the client has looked up, keyed both ways.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

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
}

impl InodeData {
    pub fn new(key: InodeKey, file: InodeFile, file_type: u32) -> Self {
        InodeData {
            id: 0,
            key,
            file,
            file_type,
            refcount: AtomicU64::new(1),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.file_type == libc::S_IFDIR
    }
}

#[derive(Default)]
struct Maps {
    by_id: HashMap<u64, Arc<InodeData>>,
    by_key: HashMap<InodeKey, u64>,
}

/// All inodes the client holds, with their lookup counts.
pub struct InodeStore {
    maps: RwLock<Maps>,
    next_id: AtomicU64,
    /// Most inodes held at once: a client that looks up without ever forgetting gets ENFILE
    /// instead of growing the daemon without bound.
    limit: usize,
}

impl InodeStore {
    /// A store whose first inode (the root) gets id `root_id`.
    pub fn new(root_id: u64, limit: usize) -> Self {
        InodeStore {
            maps: RwLock::new(Maps::default()),
            next_id: AtomicU64::new(root_id),
            limit: limit.max(1),
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

    /// Takes one more reference on the inode `key` if it is known, else inserts the inode
    /// `make` builds (with one reference).
    pub fn get_or_insert(
        &self,
        key: InodeKey,
        make: impl FnOnce() -> io::Result<InodeData>,
    ) -> io::Result<Arc<InodeData>> {
        if let Some(found) = self.take_ref(&key)? {
            return Ok(found);
        }
        let mut data = make()?;
        let mut maps = self.maps.write().map_err(|_| errno(libc::EIO))?;
        // Another thread may have inserted it while `make` ran.
        if let Some(id) = maps.by_key.get(&key) {
            if let Some(found) = maps.by_id.get(id) {
                found.refcount.fetch_add(1, Ordering::AcqRel);
                return Ok(found.clone());
            }
        }
        if maps.by_id.len() >= self.limit {
            return Err(errno(libc::ENFILE));
        }
        data.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let data = Arc::new(data);
        maps.by_key.insert(key, data.id);
        maps.by_id.insert(data.id, data.clone());
        Ok(data)
    }

    fn take_ref(&self, key: &InodeKey) -> io::Result<Option<Arc<InodeData>>> {
        let maps = self.maps.read().map_err(|_| errno(libc::EIO))?;
        // Counts only drop to zero under the write lock, together with removal, so any inode
        // visible here is alive.
        Ok(maps
            .by_key
            .get(key)
            .and_then(|id| maps.by_id.get(id))
            .map(|found| {
                found.refcount.fetch_add(1, Ordering::AcqRel);
                found.clone()
            }))
    }

    /// Drops `count` references; the inode is released when none remain.
    pub fn forget(&self, id: u64, count: u64) {
        let Ok(mut maps) = self.maps.write() else {
            return;
        };
        let Some(data) = maps.by_id.get(&id) else {
            return;
        };
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
            let key = data.key;
            maps.by_id.remove(&id);
            if maps.by_key.get(&key) == Some(&id) {
                maps.by_key.remove(&key);
            }
        }
    }

    /// Drops every inode but `keep`.
    pub fn clear_except(&self, keep: u64) {
        if let Ok(mut maps) = self.maps.write() {
            maps.by_id.retain(|id, _| *id == keep);
            maps.by_key.retain(|_, id| *id == keep);
        }
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
        let a = store.get_or_insert(key(5), || make(5)).unwrap();
        let b = store
            .get_or_insert(key(5), || panic!("must reuse"))
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
    fn lookups_past_the_limit_fail_with_enfile() {
        let store = InodeStore::new(1, 3);
        for ino in 0..3 {
            store.get_or_insert(key(ino), || make(ino)).unwrap();
        }
        let err = store.get_or_insert(key(99), || make(99)).err().unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::ENFILE));
        // Known inodes can still be looked up again.
        assert!(store.get_or_insert(key(1), || make(1)).is_ok());
    }

    #[test]
    fn forgetting_more_than_was_looked_up_does_not_underflow() {
        let store = InodeStore::new(1, 10);
        let a = store.get_or_insert(key(7), || make(7)).unwrap();
        store.forget(a.id, u64::MAX);
        assert_eq!(store.len(), 0);
        store.forget(a.id, 1);
    }
}
