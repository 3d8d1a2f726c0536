//! A small, bounded cache of `O_PATH` descriptors for directories held by file handle.
//!
//! Nearly every namespace request (LOOKUP, CREATE, MKDIR, UNLINK, RENAME, READDIRPLUS) needs a
//! descriptor of its parent directory, and a directory held by file handle would otherwise be
//! reopened with `open_by_handle_at` for each one. Keeping the descriptors of the directories
//! in use saves that syscall and its path walk, while the number of descriptors stays a
//! constant, whatever the number of looked-up inodes. Only directories are cached: a
//! descriptor pins its inode, and pinning a deleted regular file would keep its blocks
//! allocated on the host; a deleted directory is empty.
//!
//! Entries are keyed by FUSE node id, which is never reused, and dropped when the inode is
//! forgotten. A request still running when its directory is forgotten may cache the
//! descriptor again; that entry only ages out, and cannot be found under another inode.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;

/// Descriptors cached at most by default (in all shards together).
pub const DEFAULT_CAPACITY: usize = 256;

struct Entry {
    id: u64,
    fd: Arc<OwnedFd>,
    last_used: u64,
}

#[derive(Default)]
struct Shard {
    entries: Vec<Entry>,
    clock: u64,
}

/// Node id → descriptor, least recently used entries evicted first (per shard).
pub struct FdCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

impl FdCache {
    /// A cache of at most `capacity` descriptors (rounded up to a multiple of the shard
    /// count); 0 disables it.
    pub fn new(capacity: usize) -> Self {
        FdCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS),
        }
    }

    fn shard(&self, id: u64) -> &Mutex<Shard> {
        // Node ids are handed out in sequence, so the low bits spread them evenly.
        &self.shards[(id % SHARDS as u64) as usize]
    }

    /// The descriptor cached for `id`, if any.
    pub fn get(&self, id: u64) -> Option<Arc<OwnedFd>> {
        let mut shard = self.shard(id).lock().ok()?;
        shard.clock += 1;
        let now = shard.clock;
        let entry = shard.entries.iter_mut().find(|e| e.id == id)?;
        entry.last_used = now;
        Some(entry.fd.clone())
    }

    /// Caches `fd` for `id` (replacing any descriptor cached for it) and returns it shared.
    pub fn insert(&self, id: u64, fd: OwnedFd) -> Arc<OwnedFd> {
        let fd = Arc::new(fd);
        if self.per_shard == 0 {
            return fd;
        }
        let Ok(mut shard) = self.shard(id).lock() else {
            return fd;
        };
        shard.clock += 1;
        let now = shard.clock;
        let entry = Entry {
            id,
            fd: fd.clone(),
            last_used: now,
        };
        if let Some(slot) = shard.entries.iter_mut().find(|e| e.id == id) {
            *slot = entry;
        } else if shard.entries.len() < self.per_shard {
            shard.entries.push(entry);
        } else if let Some(oldest) = shard.entries.iter_mut().min_by_key(|e| e.last_used) {
            // The evicted descriptor closes once no request still uses it.
            *oldest = entry;
        }
        fd
    }

    /// Forgets the descriptor cached for `id`.
    pub fn remove(&self, id: u64) {
        let removed = match self.shard(id).lock() {
            Ok(mut shard) => shard
                .entries
                .iter()
                .position(|e| e.id == id)
                .map(|at| shard.entries.swap_remove(at)),
            Err(_) => None,
        };
        // Closed outside the lock.
        drop(removed);
    }

    /// Forgets every descriptor but the one cached for `keep`.
    pub fn retain_only(&self, keep: u64) {
        for shard in &self.shards {
            let dropped: Vec<Entry> = match shard.lock() {
                Ok(mut shard) => {
                    let (kept, dropped) = shard.entries.drain(..).partition(|e| e.id == keep);
                    shard.entries = kept;
                    dropped
                }
                Err(_) => Vec::new(),
            };
            drop(dropped);
        }
    }

    /// Descriptors cached now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.entries.len()).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn some_fd() -> OwnedFd {
        File::open("/").expect("open /").into()
    }

    #[test]
    fn a_cached_descriptor_is_returned_until_removed() {
        let cache = FdCache::new(DEFAULT_CAPACITY);
        let fd = cache.insert(7, some_fd());
        let got = cache.get(7).expect("cached");
        assert!(Arc::ptr_eq(&fd, &got));
        assert!(cache.get(8).is_none());
        cache.remove(7);
        assert!(cache.get(7).is_none());
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        let cache = FdCache::new(32);
        for id in 0..1000 {
            cache.insert(id, some_fd());
        }
        assert_eq!(cache.len(), 32);
        // The most recent insertions survive; the oldest were evicted.
        assert!(cache.get(999).is_some());
        assert!(cache.get(0).is_none());
    }

    #[test]
    fn recently_used_entries_outlive_idle_ones() {
        // One shard's worth: ids 0, 16, 32 land in shard 0 with room for two.
        let cache = FdCache::new(2 * SHARDS);
        cache.insert(0, some_fd());
        cache.insert(16, some_fd());
        assert!(cache.get(0).is_some());
        cache.insert(32, some_fd());
        assert!(cache.get(0).is_some(), "the entry used last must stay");
        assert!(cache.get(16).is_none(), "the idle entry is evicted");
        assert!(cache.get(32).is_some());
    }

    #[test]
    fn capacity_zero_caches_nothing() {
        let cache = FdCache::new(0);
        let _fd = cache.insert(1, some_fd());
        assert!(cache.get(1).is_none());
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn retain_only_keeps_one_entry() {
        let cache = FdCache::new(DEFAULT_CAPACITY);
        for id in 1..=20 {
            cache.insert(id, some_fd());
        }
        cache.retain_only(1);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(1).is_some());
    }
}
