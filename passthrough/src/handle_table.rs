//! The open file and directory handles the client refers to by number, in shards.
//!
//! Every READ and WRITE looks its handle up, from every request queue at once. One lock over
//! one map would make all queue threads write the same cache line twice per request (taking
//! and releasing the read lock); with the map split by handle number, threads serving
//! different files, or different opens of one file, touch different locks.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

const SHARDS: usize = 64;

type Shard<T> = RwLock<HashMap<u64, Arc<T>>>;

/// Handles, each tied to the inode it was opened on.
pub(crate) struct HandleTable<T> {
    shards: Box<[Shard<T>]>,
    next: AtomicU64,
    len: AtomicUsize,
}

/// What each handle must say about itself: the inode it belongs to.
pub(crate) trait OwnedBy {
    fn inode(&self) -> u64;
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl<T: OwnedBy> HandleTable<T> {
    pub(crate) fn new() -> Self {
        HandleTable {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            // 0 is never a valid handle: the kernel sends it for "no handle".
            next: AtomicU64::new(1),
            len: AtomicUsize::new(0),
        }
    }

    fn shard(&self, handle: u64) -> &Shard<T> {
        &self.shards[(handle % SHARDS as u64) as usize]
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Adds `data` under a new number, unless `limit` handles are open already (EMFILE).
    pub(crate) fn insert(&self, data: T, limit: usize) -> io::Result<u64> {
        // Reserve the slot first, so that racing inserts cannot overshoot the limit.
        if self.len.fetch_add(1, Ordering::Relaxed) >= limit {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(errno(libc::EMFILE));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        match self.shard(id).write() {
            Ok(mut shard) => {
                shard.insert(id, Arc::new(data));
                Ok(id)
            }
            Err(_) => {
                self.len.fetch_sub(1, Ordering::Relaxed);
                Err(errno(libc::EIO))
            }
        }
    }

    /// The handle `handle` of `inode`; EBADF when it does not exist or belongs to another inode.
    pub(crate) fn get(&self, inode: u64, handle: u64) -> io::Result<Arc<T>> {
        let shard = self.shard(handle).read().map_err(|_| errno(libc::EIO))?;
        match shard.get(&handle) {
            Some(data) if data.inode() == inode => Ok(data.clone()),
            _ => Err(errno(libc::EBADF)),
        }
    }

    /// Drops the handle `handle` of `inode` (requests still using it keep their reference).
    pub(crate) fn remove(&self, inode: u64, handle: u64) -> io::Result<()> {
        let mut shard = self.shard(handle).write().map_err(|_| errno(libc::EIO))?;
        match shard.get(&handle) {
            Some(data) if data.inode() == inode => {
                shard.remove(&handle);
                self.len.fetch_sub(1, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(errno(libc::EBADF)),
        }
    }

    /// Every handle with its number (the migration source's snapshot).
    pub(crate) fn snapshot(&self) -> Vec<(u64, Arc<T>)> {
        let mut all = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            if let Ok(shard) = shard.read() {
                all.extend(shard.iter().map(|(id, data)| (*id, data.clone())));
            }
        }
        all.sort_by_key(|(id, _)| *id);
        all
    }

    /// The number the next new handle gets.
    pub(crate) fn next_id(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// Inserts a handle rebuilt from migrated state under its own number, and makes sure
    /// new handles get numbers above it and at least `next`. Fails with EEXIST when the
    /// number is taken.
    pub(crate) fn restore(&self, id: u64, data: T, next: u64) -> io::Result<()> {
        if id == 0 {
            return Err(errno(libc::EINVAL));
        }
        let mut shard = self.shard(id).write().map_err(|_| errno(libc::EIO))?;
        if shard.contains_key(&id) {
            return Err(errno(libc::EEXIST));
        }
        shard.insert(id, Arc::new(data));
        self.len.fetch_add(1, Ordering::Relaxed);
        self.next
            .fetch_max(next.max(id.saturating_add(1)), Ordering::AcqRel);
        Ok(())
    }

    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            if let Ok(mut shard) = shard.write() {
                self.len.fetch_sub(shard.len(), Ordering::Relaxed);
                shard.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Open(u64);
    impl OwnedBy for Open {
        fn inode(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn handles_belong_to_their_inode_and_are_counted() {
        let table = HandleTable::new();
        let a = table.insert(Open(10), 100).unwrap();
        let b = table.insert(Open(11), 100).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(table.len(), 2);
        assert_eq!(table.get(10, a).unwrap().0, 10);
        assert_eq!(
            table.get(11, a).unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
        assert_eq!(
            table.remove(11, a).unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
        table.remove(10, a).unwrap();
        assert_eq!(
            table.get(10, a).unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
        assert_eq!(table.len(), 1);
        table.clear();
        assert_eq!(table.len(), 0);
        assert!(table.get(11, b).is_err());
    }

    #[test]
    fn the_limit_holds_under_concurrent_inserts() {
        let table = Arc::new(HandleTable::new());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let table = table.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| table.insert(Open(t), 5000).is_ok())
                        .count()
                })
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 5000);
        assert_eq!(table.len(), 5000);
        assert_eq!(
            table.insert(Open(0), 5000).unwrap_err().raw_os_error(),
            Some(libc::EMFILE)
        );
    }
}
