//! Shared caching through the version table: which inodes have a slot, the bumps berth's own
//! changes make, and — for a `berth fuse` mount — what its kernel has cached at which version,
//! so that the mount's notifier can tell the kernel exactly what to drop.
//!
//! The rules that keep a client's cache from ever being silently stale:
//! 1. A request that hands out something about an inode (attributes, an entry, directory
//!    contents, data) reads the inode's version *before* reading the host, and, once the reply
//!    is written to the kernel, lowers the inode's `known` version to it ([`Coherence::reply_sent`]).
//!    A reply racing with a notification therefore leaves `known` behind the table, and the
//!    notifier invalidates after it: `reply_sent` finds the table ahead of what the reply
//!    handed out and queues the slot for the notifier's next round
//!    ([`Coherence::take_rechecks`]), since the notifier may have handled that move already
//!    (it skips inodes whose first reply is not written yet).
//! 2. A change made through this mount bumps the versions it affects after the host call
//!    returned and before the reply; when nothing else moved the slot meanwhile, `known`
//!    follows (the kernel updates its own cache from the reply), so the mount does not
//!    invalidate what it just learnt.
//! 3. The notifier compares `known` with the table for the slots that moved and invalidates
//!    the kernel's copy when they differ; a directory's move also expires every name the
//!    kernel looked up in it.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_versions::{Changes, Slot, SlotKey, VersionTable};

use crate::inode_store::{InodeData, InodeStore};

/// `known` of an inode whose first reply is not written yet: the notifier leaves it alone.
pub(crate) const NOT_DELIVERED: u64 = u64::MAX;

/// How shared caching is set up for one filesystem instance.
#[derive(Clone)]
pub struct SharedCache {
    /// The shared directory's table.
    pub table: Arc<VersionTable>,
    /// Devices whose host changes a watcher reports: inodes elsewhere are not cached long.
    pub watched_devices: Vec<u64>,
    /// Entry and attribute timeout of inodes with a slot.
    pub timeout: Duration,
    /// Keep track of what the client cached, for a notifier (a `berth fuse` mount; a guest
    /// compares versions itself).
    pub track_client: bool,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("table", &self.table.path())
            .field("watched_devices", &self.watched_devices)
            .field("timeout", &self.timeout)
            .field("track_client", &self.track_client)
            .finish()
    }
}

/// What the notifier asks the kernel to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// The inode's attributes and cached data (FUSE_NOTIFY_INVAL_INODE).
    Inode(u64),
    /// A name in a directory (FUSE_NOTIFY_INVAL_ENTRY, expire only).
    Entry { parent: u64, name: Box<[u8]> },
}

thread_local! {
    /// (node id, version) pairs this thread's current request has handed out.
    static PENDING: RefCell<Vec<(u64, u64)>> = const { RefCell::new(Vec::new()) };
    /// What this thread's current request handed out of each tracked inode, in order: for the
    /// reply extension a virtio-fs guest negotiated ([`ReplyVersion`]).
    static REPLY_VERSIONS: RefCell<Vec<(u64, ReplyVersion)>> = const { RefCell::new(Vec::new()) };
}

/// The slot, generation and version a reply hands out for one inode: the version was read
/// before the host was (or, after a change this request made, is the version the change left
/// when nothing else moved it meanwhile), and the generation with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyVersion {
    /// The inode's slot.
    pub slot: Slot,
    /// The table generation when the version was read.
    pub generation: u64,
    /// The version the reply's contents are at least as new as.
    pub version: u64,
}

/// Forgets what the last request on this thread handed out (a new request starts).
pub(crate) fn begin_reply() {
    REPLY_VERSIONS.with(|r| r.borrow_mut().clear());
}

/// The last version the current request on this thread handed out for node `id`, if the inode
/// is tracked.
pub(crate) fn reply_version(id: u64) -> Option<ReplyVersion> {
    REPLY_VERSIONS.with(|r| {
        r.borrow()
            .iter()
            .rev()
            .find(|(node, _)| *node == id)
            .map(|(_, v)| *v)
    })
}

fn record_reply_version(id: u64, slot: Slot, generation: u64, version: u64) {
    REPLY_VERSIONS.with(|r| {
        r.borrow_mut().push((
            id,
            ReplyVersion {
                slot,
                generation,
                version,
            },
        ))
    });
}

/// A version read before a request touched the host.
#[derive(Clone, Copy)]
pub(crate) struct Ticket(Option<(Slot, u64)>, u64);

impl Ticket {
    pub(crate) fn slot(&self) -> Option<Slot> {
        self.0.map(|(slot, _)| slot)
    }
}

pub(crate) struct Coherence {
    pub(crate) cfg: SharedCache,
    /// Node ids per slot (a slot can be shared by colliding keys).
    by_slot: Mutex<HashMap<u32, Vec<u64>>>,
    /// Names the client looked up per directory node id (they may be cached dentries).
    names: Mutex<HashMap<u64, HashSet<Box<[u8]>>>>,
    /// Invalidations sent (for tests and metrics).
    pub(crate) sent: AtomicU64,
    /// Slots whose reply was written after the table had moved past what it handed out.
    rechecks: Mutex<Vec<Slot>>,
}

impl Coherence {
    pub(crate) fn new(cfg: SharedCache) -> Coherence {
        Coherence {
            cfg,
            by_slot: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            sent: AtomicU64::new(0),
            rechecks: Mutex::new(Vec::new()),
        }
    }

    /// The slot of a newly looked-up inode and its version, read before its attributes.
    pub(crate) fn claim(&self, key: &SlotKey) -> Ticket {
        let table = &self.cfg.table;
        // The generation first: a slot reassigned by a new generation is then never paired
        // with the new generation and the old inode's version.
        let generation = table.generation();
        Ticket(
            table.slot_for(key).map(|slot| (slot, table.version(slot))),
            generation,
        )
    }

    /// Whether an inode on `dev` with `ticket` may be cached long.
    pub(crate) fn tracked(&self, ticket: Ticket, dev: u64) -> bool {
        ticket.0.is_some() && self.cfg.watched_devices.contains(&dev)
    }

    /// Registers `data`'s slot (idempotent), so moves of that slot find the node.
    pub(crate) fn register(&self, data: &InodeData) {
        if !self.cfg.track_client {
            return;
        }
        let Some(slot) = data.slot else {
            return;
        };
        if let Ok(mut map) = self.by_slot.lock() {
            let ids = map.entry(slot.0).or_default();
            if !ids.contains(&data.id) {
                ids.push(data.id);
            }
        }
    }

    /// The node was forgotten by the client.
    pub(crate) fn released(&self, data: &InodeData) {
        if !self.cfg.track_client {
            return;
        }
        if let Some(slot) = data.slot {
            if let Ok(mut map) = self.by_slot.lock() {
                if let Some(ids) = map.get_mut(&slot.0) {
                    ids.retain(|&id| id != data.id);
                    if ids.is_empty() {
                        map.remove(&slot.0);
                    }
                }
            }
        }
        if let Ok(mut names) = self.names.lock() {
            names.remove(&data.id);
        }
    }

    /// Reads `data`'s version before the host is read or changed.
    pub(crate) fn before(&self, data: &InodeData) -> Ticket {
        let generation = self.cfg.table.generation();
        Ticket(
            data.slot.map(|slot| (slot, self.cfg.table.version(slot))),
            generation,
        )
    }

    /// The request hands out what it read of `data` after `ticket`.
    pub(crate) fn observed(&self, data: &InodeData, ticket: Ticket) {
        let Some((slot, version)) = ticket.0 else {
            return;
        };
        if self.cfg.track_client {
            PENDING.with(|p| p.borrow_mut().push((data.id, version)));
        }
        if data.tracked {
            record_reply_version(data.id, slot, ticket.1, version);
        }
    }

    /// The client looked `name` up in `parent` (its dentry may now be cached).
    pub(crate) fn named(&self, parent: &InodeData, name: &[u8]) {
        if !self.cfg.track_client || parent.slot.is_none() {
            return;
        }
        if let Ok(mut names) = self.names.lock() {
            let set = names.entry(parent.id).or_default();
            if !set.contains(name) {
                set.insert(name.into());
            }
        }
    }

    /// This request changed `data` (the host call returned): bumps its version.
    pub(crate) fn changed(&self, inodes: &InodeStore, data: &InodeData, ticket: Ticket) {
        let Some(slot) = data.slot else {
            return;
        };
        let old = self.bump_own(inodes, slot);
        // The reply reflects the change; anything that slipped in before it may not be.
        let reflected = match ticket.0 {
            Some((_, before)) if before == old => old.wrapping_add(1),
            Some((_, before)) => before,
            None => old,
        };
        if self.cfg.track_client {
            PENDING.with(|p| p.borrow_mut().push((data.id, reflected)));
        }
        if data.tracked {
            record_reply_version(data.id, slot, ticket.1, reflected);
        }
    }

    /// This request changed the inode `key` names (one the client may not hold): bumps it.
    pub(crate) fn changed_key(&self, inodes: &InodeStore, key: &SlotKey) {
        if let Some(slot) = self.cfg.table.find_slot(key) {
            self.bump_own(inodes, slot);
        }
    }

    fn bump_own(&self, inodes: &InodeStore, slot: Slot) -> u64 {
        let old = self.cfg.table.bump(slot);
        if self.cfg.track_client {
            // Nodes that were current stay current: this mount's kernel learns of the change
            // from the reply (and a reply that turns out stale lowers `known` again).
            let ids = self
                .by_slot
                .lock()
                .ok()
                .and_then(|m| m.get(&slot.0).cloned())
                .unwrap_or_default();
            for id in ids {
                if let Ok(data) = inodes.get(id) {
                    let _ = data.known.compare_exchange(
                        old,
                        old.wrapping_add(1),
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
            }
        }
        old
    }

    /// The reply to this thread's request is written: lowers `known` to what it handed out.
    pub(crate) fn reply_sent(&self, inodes: &InodeStore) {
        if !self.cfg.track_client {
            return;
        }
        let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
        for (id, version) in pending {
            if let Ok(data) = inodes.get(id) {
                let previous = data.known.fetch_min(version, Ordering::SeqCst);
                let Some(slot) = data.slot else {
                    continue;
                };
                // The table moved on before this reply reached the kernel: the notifier may
                // have handled that move already (skipping an inode not delivered yet, or
                // comparing against the `known` this reply just lowered), and nothing would
                // wake it again.
                if self.cfg.table.version(slot) != previous.min(version) {
                    if let Ok(mut rechecks) = self.rechecks.lock() {
                        rechecks.push(slot);
                    }
                }
            }
        }
    }

    /// Slots the notifier must compare on its next round even if the table reports no
    /// change of them (see `reply_sent`).
    pub(crate) fn take_rechecks(&self) -> Vec<Slot> {
        self.rechecks
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    /// What the client must drop after `changes`; `known` moves to the table's versions.
    pub(crate) fn stale(&self, changes: Changes, inodes: &InodeStore) -> Vec<Invalidation> {
        let rechecks = self.take_rechecks();
        let changes = match changes {
            _ if rechecks.is_empty() => changes,
            Changes::None => Changes::Slots(rechecks),
            Changes::Slots(mut slots) => {
                slots.extend(rechecks);
                Changes::Slots(slots)
            }
            Changes::Everything => Changes::Everything,
        };
        let (ids, everything) = match changes {
            Changes::None => return Vec::new(),
            Changes::Slots(slots) => {
                let Ok(map) = self.by_slot.lock() else {
                    return Vec::new();
                };
                let mut ids: Vec<u64> = slots
                    .iter()
                    .filter_map(|s| map.get(&s.0))
                    .flatten()
                    .copied()
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                (ids, false)
            }
            Changes::Everything => {
                let Ok(map) = self.by_slot.lock() else {
                    return Vec::new();
                };
                (map.values().flatten().copied().collect(), true)
            }
        };
        let mut out = Vec::new();
        for id in ids {
            let Ok(data) = inodes.get(id) else {
                continue;
            };
            let Some(slot) = data.slot else {
                continue;
            };
            let known = data.known.load(Ordering::SeqCst);
            if known == NOT_DELIVERED {
                continue;
            }
            let current = self.cfg.table.version(slot);
            if current == known && !everything {
                continue;
            }
            out.push(Invalidation::Inode(id));
            if data.is_dir() {
                let names = self
                    .names
                    .lock()
                    .ok()
                    .and_then(|mut n| n.remove(&id))
                    .unwrap_or_default();
                out.extend(
                    names
                        .into_iter()
                        .map(|name| Invalidation::Entry { parent: id, name }),
                );
            }
            let _ = data
                .known
                .compare_exchange(known, current, Ordering::SeqCst, Ordering::SeqCst);
        }
        self.sent.fetch_add(out.len() as u64, Ordering::Relaxed);
        out
    }
}
