//! A map from block ranges to values that describe where the blocks live, kept as
//! non-overlapping extents: a later insert replaces what it covers, splitting the extents
//! at its edges. Values advance with the block they describe (an offset in a file or a
//! pack moves along with the block number), so an extent can be cut anywhere.

use std::collections::BTreeMap;

/// A value that can describe the block `blocks` further on.
pub trait Advance: Copy + PartialEq {
    /// The value for the block `blocks` after the one `self` describes.
    fn advance(&self, blocks: u64) -> Self;
}

/// One piece of a lookup: `len` blocks from `start`, described by `value` (`None`: not
/// in the map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece<V> {
    pub start: u64,
    pub len: u64,
    pub value: Option<V>,
}

/// Non-overlapping extents, keyed by their first block.
#[derive(Debug, Clone)]
pub struct ExtentMap<V: Advance> {
    extents: BTreeMap<u64, (u64, V)>,
}

impl<V: Advance> Default for ExtentMap<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Advance> ExtentMap<V> {
    pub fn new() -> Self {
        Self {
            extents: BTreeMap::new(),
        }
    }

    /// Number of extents.
    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Cuts the extent containing `at` (if it starts before `at`) in two at `at`.
    fn split_at(&mut self, at: u64) {
        let Some((&start, &(len, value))) = self.extents.range(..at).next_back() else {
            return;
        };
        if start + len <= at {
            return;
        }
        let head = at - start;
        self.extents.insert(start, (head, value));
        self.extents.insert(at, (len - head, value.advance(head)));
    }

    /// Removes everything in `[start, start + len)`.
    pub fn remove(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        self.split_at(start);
        self.split_at(end);
        let inside: Vec<u64> = self.extents.range(start..end).map(|(&k, _)| k).collect();
        for key in inside {
            self.extents.remove(&key);
        }
    }

    /// Maps `[start, start + len)` to `value` (and the blocks after it), replacing what
    /// was there; merges with neighbours that continue it.
    pub fn insert(&mut self, start: u64, len: u64, value: V) {
        if len == 0 {
            return;
        }
        self.remove(start, len);
        let (mut start, mut len, mut value) = (start, len, value);
        if let Some((&prev, &(prev_len, prev_value))) = self.extents.range(..start).next_back() {
            if prev + prev_len == start && prev_value.advance(prev_len) == value {
                self.extents.remove(&prev);
                start = prev;
                len += prev_len;
                value = prev_value;
            }
        }
        let end = start + len;
        if let Some(&(next_len, next_value)) = self.extents.get(&end) {
            if value.advance(len) == next_value {
                self.extents.remove(&end);
                len += next_len;
            }
        }
        self.extents.insert(start, (len, value));
    }

    /// The value of block `block`.
    pub fn get(&self, block: u64) -> Option<V> {
        let (&start, &(len, value)) = self.extents.range(..=block).next_back()?;
        (block < start + len).then(|| value.advance(block - start))
    }

    /// `[start, start + len)` cut into pieces: the extents that cover it (clipped) and
    /// the gaps between them, in order.
    pub fn pieces(&self, start: u64, len: u64) -> Vec<Piece<V>> {
        let mut out = Vec::new();
        self.for_each_piece(start, len, |piece| out.push(piece));
        out
    }

    /// As [`Self::pieces`], without collecting.
    pub fn for_each_piece(&self, start: u64, len: u64, mut f: impl FnMut(Piece<V>)) {
        let end = start.saturating_add(len);
        let mut at = start;
        // The extent that starts before `start` may cover its beginning.
        let first = self
            .extents
            .range(..start)
            .next_back()
            .filter(|(&s, &(l, _))| s + l > start)
            .map(|(&s, &(l, v))| (s, l, v));
        let rest = self
            .extents
            .range(start..end)
            .map(|(&s, &(l, v))| (s, l, v));
        for (s, l, v) in first.into_iter().chain(rest) {
            if s > at {
                f(Piece {
                    start: at,
                    len: s - at,
                    value: None,
                });
                at = s;
            }
            let piece_end = (s + l).min(end);
            if piece_end > at {
                f(Piece {
                    start: at,
                    len: piece_end - at,
                    value: Some(v.advance(at - s)),
                });
                at = piece_end;
            }
        }
        if at < end {
            f(Piece {
                start: at,
                len: end - at,
                value: None,
            });
        }
    }

    /// Removes the parts of `[start, start + len)` whose value `drop` selects.
    pub fn remove_where(&mut self, start: u64, len: u64, mut drop: impl FnMut(&V) -> bool) {
        let doomed: Vec<(u64, u64)> = self
            .pieces(start, len)
            .into_iter()
            .filter(|p| p.value.as_ref().is_some_and(&mut drop))
            .map(|p| (p.start, p.len))
            .collect();
        for (s, l) in doomed {
            self.remove(s, l);
        }
    }

    /// Every extent: (first block, length, value).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, V)> + '_ {
        self.extents.iter().map(|(&s, &(l, v))| (s, l, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Loc(u64, u8);

    impl Advance for Loc {
        fn advance(&self, blocks: u64) -> Self {
            Loc(self.0 + blocks, self.1)
        }
    }

    fn rng(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Random inserts and removals against a plain array of per-block values.
    #[test]
    fn random_operations_match_a_block_array() {
        const BLOCKS: u64 = 300;
        let mut model: Vec<Option<Loc>> = vec![None; BLOCKS as usize];
        let mut map: ExtentMap<Loc> = ExtentMap::new();
        let mut state = 0x1234_5678_9abc_def1u64;
        for step in 0..20_000 {
            let start = rng(&mut state) % BLOCKS;
            let len = 1 + rng(&mut state) % (BLOCKS - start).min(40);
            match rng(&mut state) % 5 {
                0 => {
                    map.remove(start, len);
                    for b in start..start + len {
                        model[b as usize] = None;
                    }
                }
                1 => {
                    let tag = (rng(&mut state) % 3) as u8;
                    map.remove_where(start, len, |v: &Loc| v.1 == tag);
                    for b in start..start + len {
                        if model[b as usize].is_some_and(|v| v.1 == tag) {
                            model[b as usize] = None;
                        }
                    }
                }
                _ => {
                    // Often continue a neighbour, so that merging is exercised.
                    let base = if rng(&mut state).is_multiple_of(2) {
                        start * 7
                    } else {
                        rng(&mut state) % 10_000
                    };
                    let value = Loc(base, (rng(&mut state) % 3) as u8);
                    map.insert(start, len, value);
                    for b in start..start + len {
                        model[b as usize] = Some(value.advance(b - start));
                    }
                }
            }
            if step % 97 == 0 {
                for b in 0..BLOCKS {
                    assert_eq!(map.get(b), model[b as usize], "block {b} at step {step}");
                }
                let qs = rng(&mut state) % BLOCKS;
                let ql = 1 + rng(&mut state) % (BLOCKS - qs);
                let pieces = map.pieces(qs, ql);
                let mut at = qs;
                for p in &pieces {
                    assert_eq!(p.start, at);
                    for i in 0..p.len {
                        assert_eq!(p.value.map(|v| v.advance(i)), model[(at + i) as usize]);
                    }
                    at += p.len;
                }
                assert_eq!(at, qs + ql);
                // Extents never overlap and neighbours that continue each other merged.
                let all: Vec<_> = map.iter().collect();
                for pair in all.windows(2) {
                    let ((s0, l0, v0), (s1, _, v1)) = (pair[0], pair[1]);
                    assert!(s0 + l0 <= s1);
                    assert!(
                        !(s0 + l0 == s1 && v0.advance(l0) == v1),
                        "unmerged {pair:?}"
                    );
                }
            }
        }
    }
}
