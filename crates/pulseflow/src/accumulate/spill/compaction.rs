//! Reclaiming space while the log is in use: a record is released once nothing will read it
//! again, segments without a live record are deleted, and those with few are handed to the
//! caller to copy out and then retired.

use std::ops::Range;

use super::segment::Segment;
use super::{RecordRef, SpillError, SpillStore, io};

/// Default compaction threshold: a full segment is compacted once fewer than this fraction
/// of its records are live.
pub const DEFAULT_COMPACT_BELOW: f64 = 0.25;

impl SpillStore {
    /// Marks a record dead: its key was reloaded, flushed or dropped, nothing will read it
    /// again. Its segment's live count drops; a full segment with few live records left
    /// becomes due for compaction ([`SpillStore::next_compaction`]).
    pub fn release(&mut self, at: RecordRef) {
        let segment = match self.sealed_index(at.block) {
            Some(i) => self.sealed.get_mut(i),
            None => (at.block >= self.current.first).then_some(&mut self.current),
        };
        if let Some(s) = segment.filter(|s| s.live > 0) {
            s.live -= 1;
            self.stats.live_records -= 1;
            self.recheck |= at.block < self.current.first;
        }
    }

    /// The blocks of the oldest full segment due for compaction (fewer live records than
    /// the threshold), after deleting the segments without any live record. The caller
    /// compacts it: reads its blocks ([`SpillStore::read_block`]), appends the records its
    /// index still points at again (their new [`RecordRef`]s replace the old ones), then
    /// [`retires`](SpillStore::retire) it.
    pub fn next_compaction(&mut self) -> Result<Option<Range<u32>>, SpillError> {
        if !self.recheck {
            return Ok(None);
        }
        while let Some(dead) = self.sealed.iter().find(|s| s.live == 0 && !s.kept) {
            self.retire(dead.first)?;
        }
        let below = self.compact_below;
        let due = self.sealed.iter().find(|s| s.due(below));
        self.recheck = due.is_some();
        Ok(due.map(Segment::block_range))
    }

    /// Deletes the full segment whose first block is `first` (its live records, if any, must
    /// have been copied out: reading them fails from now on).
    pub fn retire(&mut self, first: u32) -> Result<(), SpillError> {
        let Some(i) = self.sealed.iter().position(|s| s.first == first) else {
            return Ok(());
        };
        let segment = self.sealed.remove(i);
        if self
            .cached
            .is_some_and(|b| segment.block_range().contains(&b))
        {
            self.cached = None;
        }
        let Segment {
            path,
            file,
            live,
            bytes,
            ..
        } = segment;
        self.stats.live_records -= live;
        self.stats.segments -= 1;
        self.stats.disk_bytes -= bytes;
        self.stats.reclaimed_bytes += bytes;
        self.stats.compactions += 1;
        drop(file);
        std::fs::remove_file(&path).map_err(io(&path))
    }

    /// Leaves the full segment whose first block is `first` as it is from now on (a block of
    /// it could not be read back, so it cannot be compacted).
    pub fn keep(&mut self, first: u32) {
        if let Some(s) = self.sealed.iter_mut().find(|s| s.first == first) {
            s.kept = true;
        }
    }

    /// The numbers of the sealed blocks still in the log, oldest first, by segment (for
    /// reading the whole log in order with [`SpillStore::read_block`]; [`SpillStore::flush`]
    /// first to seal the open block).
    pub fn block_ranges(&self) -> Vec<Range<u32>> {
        self.sealed
            .iter()
            .chain([&self.current])
            .map(Segment::block_range)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accumulate::spill::block_records;

    /// Files in the store's directory and their total size.
    fn files(store: &SpillStore) -> (u64, u64) {
        std::fs::read_dir(store.dir())
            .expect("dir")
            .map(|e| e.expect("entry").metadata().expect("meta").len())
            .fold((0, 0), |(n, bytes), len| (n + 1, bytes + len))
    }

    #[test]
    fn compaction_reclaims_space_and_keeps_live_records() {
        let mut store = SpillStore::open(None).expect("open");
        store.set_segment_bytes(16 << 10);
        let record = |i: u32| format!("record-{i}-{}", "y".repeat((i % 30) as usize));
        let mut at: Vec<Option<RecordRef>> = (0..20_000u32)
            .map(|i| Some(store.append(record(i).as_bytes()).expect("append")))
            .collect();
        store.flush().expect("flush");
        let before = store.stats();
        assert!(before.segments > 20, "{before:?}");
        assert_eq!(files(&store), (before.segments, before.disk_bytes));
        // The first quarter dies entirely (its segments are deleted as they are), then all
        // but every tenth record.
        for (i, slot) in at.iter_mut().enumerate() {
            if i < 5_000 || i % 10 != 0 {
                store.release(slot.take().expect("live"));
            }
        }
        assert_eq!(store.stats().live_records, 1_500);
        // Compact as the stage does: copy what the index points at, then retire.
        let mut index: std::collections::HashMap<u64, usize> = at
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((a.as_ref()?.order(), i)))
            .collect();
        let mut block = Vec::new();
        while let Some(blocks) = store.next_compaction().expect("compaction") {
            for b in blocks.clone() {
                store.read_block(b, &mut block).expect("block");
                for (pos, bytes) in block_records(&block) {
                    if let Some(i) = index.remove(&RecordRef::new(b, pos).order()) {
                        let copy = store.append(bytes).expect("copy");
                        index.insert(copy.order(), i);
                        at[i] = Some(copy);
                    }
                }
            }
            store.flush().expect("flush");
            store.retire(blocks.start).expect("retire");
        }
        let after = store.stats();
        assert!(after.compactions > 20, "{after:?}");
        assert_eq!(after.live_records, 1_500);
        assert!(after.segments * 5 < before.segments, "{after:?}");
        assert!(after.disk_bytes * 5 < before.disk_bytes, "{after:?}");
        assert_eq!(after.reclaimed_bytes, after.stored_bytes - after.disk_bytes);
        assert_eq!(files(&store), (after.segments, after.disk_bytes));
        let mut out = Vec::new();
        for (i, a) in at.iter().enumerate() {
            if let Some(a) = a {
                store.read(*a, &i, &mut out).expect("live record");
                assert_eq!(out, record(i as u32).as_bytes(), "record {i}");
            }
        }
        // The whole log, read in order, holds the live records (and their dead neighbours).
        let mut seen = 0;
        for b in store.block_ranges().into_iter().flatten() {
            store.read_block(b, &mut block).expect("block");
            seen += block_records(&block)
                .filter(|&(pos, _)| index.contains_key(&RecordRef::new(b, pos).order()))
                .count();
        }
        assert_eq!(seen, 1_500);
    }
}
