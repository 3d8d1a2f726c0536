//! The busy ranges of the window: non-overlapping `[start, start + len)` ranges keyed by start.
//!
//! A `BTreeMap` keyed by the start offset is enough for an interval set whose members never
//! overlap: the ranges meeting `[start, end)` are the last one starting before `start` (if it
//! reaches past `start`) and those starting inside, found with one `range` walk, so insert,
//! lookup, split and remove all cost O(log n) plus the ranges touched.

use std::collections::BTreeMap;

/// One busy range and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range<T> {
    pub start: u64,
    pub len: u64,
    pub value: T,
}

impl<T> Range<T> {
    /// One past the last byte (callers only build ranges whose end fits in a u64).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// Non-overlapping ranges keyed by their start.
#[derive(Debug)]
pub struct RangeTable<T> {
    ranges: BTreeMap<u64, (u64, T)>,
}

impl<T> Default for RangeTable<T> {
    fn default() -> Self {
        RangeTable {
            ranges: BTreeMap::new(),
        }
    }
}

impl<T> RangeTable<T> {
    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether no range is busy.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The range holding `offset`, if any.
    pub fn find(&self, offset: u64) -> Option<Range<&T>> {
        let (&start, (len, value)) = self.ranges.range(..=offset).next_back()?;
        (offset - start < *len).then_some(Range {
            start,
            len: *len,
            value,
        })
    }

    /// Starts of the ranges that meet `[start, end)`, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<u64> {
        let mut starts: Vec<u64> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(&s, (len, _))| s.saturating_add(*len) > start)
            .map(|(&s, _)| s)
            .collect();
        starts.reverse();
        starts
    }

    /// Adds a range; the caller has made room (no range meets it). Returns false, leaving the
    /// table as it was, if one does.
    pub fn insert(&mut self, range: Range<T>) -> bool {
        if range.len == 0 || !self.overlapping(range.start, range.end()).is_empty() {
            return false;
        }
        self.ranges.insert(range.start, (range.len, range.value));
        true
    }

    /// Takes out the range starting at `start`.
    pub fn remove(&mut self, start: u64) -> Option<Range<T>> {
        self.ranges
            .remove(&start)
            .map(|(len, value)| Range { start, len, value })
    }

    /// Takes out every range.
    pub fn drain(&mut self) -> Vec<Range<T>> {
        std::mem::take(&mut self.ranges)
            .into_iter()
            .map(|(start, (len, value))| Range { start, len, value })
            .collect()
    }

    /// Every range, in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<&T>> {
        self.ranges.iter().map(|(&start, (len, value))| Range {
            start,
            len: *len,
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ranges: &[(u64, u64)]) -> RangeTable<u32> {
        let mut t = RangeTable::default();
        for (i, &(start, len)) in ranges.iter().enumerate() {
            assert!(t.insert(Range {
                start,
                len,
                value: i as u32
            }));
        }
        t
    }

    #[test]
    fn overlapping_finds_ranges_meeting_the_span() {
        let t = table(&[(0, 10), (10, 5), (20, 10), (40, 1)]);
        assert_eq!(t.overlapping(0, 1), vec![0]);
        assert_eq!(t.overlapping(9, 11), vec![0, 10]);
        assert_eq!(t.overlapping(15, 20), Vec::<u64>::new());
        assert_eq!(t.overlapping(15, 21), vec![20]);
        assert_eq!(t.overlapping(25, 100), vec![20, 40]);
        assert_eq!(t.overlapping(41, u64::MAX), Vec::<u64>::new());
    }

    #[test]
    fn insert_refuses_overlaps_and_empty_ranges() {
        let mut t = table(&[(10, 10)]);
        for (start, len) in [(5, 6), (19, 1), (0, 100), (12, 2)] {
            assert!(!t.insert(Range {
                start,
                len,
                value: 9
            }));
        }
        assert!(!t.insert(Range {
            start: 30,
            len: 0,
            value: 9
        }));
        assert!(t.insert(Range {
            start: 20,
            len: 1,
            value: 9
        }));
        assert!(t.insert(Range {
            start: 0,
            len: 10,
            value: 8
        }));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn find_and_remove() {
        let mut t = table(&[(0, 10), (20, 10)]);
        assert_eq!(t.find(9).map(|r| (r.start, *r.value)), Some((0, 0)));
        assert!(t.find(10).is_none());
        assert_eq!(t.find(29).map(|r| r.start), Some(20));
        assert!(t.find(30).is_none());
        assert_eq!(t.remove(20).map(|r| r.len), Some(10));
        assert!(t.remove(20).is_none());
        assert!(t.find(25).is_none());
        assert_eq!(t.drain().len(), 1);
        assert!(t.is_empty());
    }
}
