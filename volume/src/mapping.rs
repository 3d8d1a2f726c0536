//! The block map of a manifest version, in memory: which pack block every mapped volume
//! block lives in, the packs in use with their chunk tables, and how many live blocks
//! each pack still has (a pack with none left is released, for garbage collection).

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Result, VolumeError};
use crate::extent_map::ExtentMap;
use crate::format::{Manifest, ManifestKind, PackInfo, PackLoc};

/// A manifest version, applied.
#[derive(Debug, Clone, Default)]
pub struct BlockMap {
    pub map: ExtentMap<PackLoc>,
    pub packs: HashMap<u64, Arc<PackInfo>>,
    /// Live blocks per pack (packs with none are dropped).
    pub live: HashMap<u64, u64>,
    /// Header of the last manifest applied.
    pub version: u64,
    pub next_pack_id: u64,
    pub session: [u8; 16],
    pub wal_epoch: u32,
    pub wal_seq: u64,
    pub lease_generation: u64,
    /// Stored bytes of the packs that fell out of use since this map was made: what
    /// garbage collection can now delete from the bucket.
    pub released_bytes: u64,
}

impl BlockMap {
    /// Applies a full manifest (replacing everything) or a delta over `self.version`.
    pub fn apply(&mut self, object: &str, manifest: &Manifest) -> Result<()> {
        let bad = |problem: String| VolumeError::Corrupt {
            object: object.to_string(),
            problem,
        };
        match manifest.kind {
            ManifestKind::Full => {
                // The packs of the old map a full version drops are released too.
                let kept: std::collections::HashSet<u64> =
                    manifest.packs.iter().map(|p| p.id).collect();
                let released = self.released_bytes
                    + self
                        .packs
                        .values()
                        .filter(|p| !kept.contains(&p.id))
                        .map(|p| p.stored_size())
                        .sum::<u64>();
                *self = BlockMap {
                    released_bytes: released,
                    ..BlockMap::default()
                };
            }
            ManifestKind::Delta => {
                if manifest.base_version != self.version {
                    return Err(bad(format!(
                        "it is a delta over version {}, not over {}",
                        manifest.base_version, self.version
                    )));
                }
            }
        }
        for pack in &manifest.packs {
            self.packs.insert(pack.id, Arc::new(pack.clone()));
        }
        for &(start, len, loc) in &manifest.extents {
            if let Some(loc) = loc {
                let pack = self.packs.get(&loc.pack).ok_or_else(|| {
                    bad(format!("an extent uses pack {} it does not list", loc.pack))
                })?;
                if loc
                    .block
                    .checked_add(len)
                    .is_none_or(|end| end > pack.raw_blocks)
                {
                    return Err(bad(format!(
                        "an extent reaches past the end of pack {}",
                        loc.pack
                    )));
                }
            }
            self.set(start, len, loc);
        }
        self.version = manifest.version;
        self.next_pack_id = manifest.next_pack_id;
        self.session = manifest.session;
        self.wal_epoch = manifest.wal_epoch;
        self.wal_seq = manifest.wal_seq;
        self.lease_generation = manifest.lease_generation;
        self.drop_dead_packs();
        Ok(())
    }

    /// Maps `[start, start + len)` to `loc` (`None`: zeros), keeping the live counts.
    pub fn set(&mut self, start: u64, len: u64, loc: Option<PackLoc>) {
        for piece in self.map.pieces(start, len) {
            if let Some(old) = piece.value {
                if let Some(count) = self.live.get_mut(&old.pack) {
                    *count = count.saturating_sub(piece.len);
                }
            }
        }
        match loc {
            Some(loc) => {
                self.map.insert(start, len, loc);
                *self.live.entry(loc.pack).or_default() += len;
            }
            None => self.map.remove(start, len),
        }
    }

    /// Forgets packs no block uses any more.
    pub fn drop_dead_packs(&mut self) -> Vec<u64> {
        let dead: Vec<u64> = self
            .packs
            .keys()
            .copied()
            .filter(|id| self.live.get(id).copied().unwrap_or(0) == 0)
            .collect();
        for id in &dead {
            if let Some(pack) = self.packs.remove(id) {
                self.released_bytes += pack.stored_size();
            }
            self.live.remove(id);
        }
        dead
    }

    /// The full manifest of this state.
    pub fn to_full(&self, template: &Manifest) -> Manifest {
        let mut packs: Vec<PackInfo> = self.packs.values().map(|p| (**p).clone()).collect();
        packs.sort_by_key(|p| p.id);
        Manifest {
            kind: ManifestKind::Full,
            base_version: 0,
            packs,
            extents: self.map.iter().map(|(s, l, v)| (s, l, Some(v))).collect(),
            ..template.clone()
        }
    }

    /// Blocks mapped to packs.
    pub fn mapped_blocks(&self) -> u64 {
        self.live.values().sum()
    }

    /// Raw blocks of the packs in use (mapped or not).
    pub fn pack_blocks(&self) -> u64 {
        self.packs.values().map(|p| p.raw_blocks).sum()
    }
}
