//! The segment files of the log: each holds a run of consecutive blocks, the log goes on in a
//! new one once the current one is full, and a block is found through the segment holding it.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{SpillError, SpillStore, io};

/// Default size of a segment file: once the current segment holds this many bytes, the log
/// goes on in a new file.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// One file of the log: a run of consecutive blocks.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// Number of its first block.
    pub(super) first: u32,
    /// Offset in the file and stored size (header included) of each sealed block.
    pub(super) blocks: Vec<(u64, u32)>,
    /// Records appended to it, and those of them not released yet.
    pub(super) records: u64,
    pub(super) live: u64,
    /// Stored bytes of its sealed blocks.
    pub(super) bytes: u64,
    /// Not to be compacted (a block of it could not be read back).
    pub(super) kept: bool,
}

impl Segment {
    pub(super) fn create(dir: &Path, first: u32) -> Result<Self, SpillError> {
        let file = tempfile::Builder::new()
            .prefix("segment-")
            .suffix(".log")
            .tempfile_in(dir)
            .map_err(io(dir))?;
        // The file lives as long as the segment (writes go to its end, reads are positioned).
        let (file, path) = file.keep().map_err(|e| SpillError::Io {
            path: dir.to_owned(),
            source: e.error,
        })?;
        Ok(Self {
            path,
            file,
            first,
            blocks: Vec::new(),
            records: 0,
            live: 0,
            bytes: 0,
            kept: false,
        })
    }

    /// Its sealed blocks' numbers.
    #[inline]
    pub(super) fn block_range(&self) -> Range<u32> {
        self.first..self.first + self.blocks.len() as u32
    }

    /// Offset and stored size of `block`, when the segment holds it.
    #[inline]
    pub(super) fn block(&self, block: u32) -> Option<(u64, u32)> {
        let i = block.checked_sub(self.first)?;
        self.blocks.get(i as usize).copied()
    }

    /// Whether so few of its records are live that copying them out is worth it.
    #[inline]
    pub(super) fn due(&self, below: f64) -> bool {
        !self.kept && (self.live as f64) < self.records as f64 * below
    }
}

impl SpillStore {
    /// The index in `sealed` of the segment holding `block`, or `None` when that is the
    /// current segment (or none).
    #[inline]
    pub(super) fn sealed_index(&self, block: u32) -> Option<usize> {
        if block >= self.current.first {
            return None;
        }
        self.sealed
            .partition_point(|s| s.first <= block)
            .checked_sub(1)
    }

    /// The segment holding `block` (sealed or not yet).
    #[inline]
    pub(super) fn segment(&self, block: u32) -> Option<&Segment> {
        match self.sealed_index(block) {
            Some(i) => self.sealed.get(i).filter(|s| s.block(block).is_some()),
            None => (block >= self.current.first).then_some(&self.current),
        }
    }

    /// The current segment is full: everything goes to its file, and the log goes on in a
    /// new one (whose writer thread starts at its first write).
    #[cold]
    #[inline(never)]
    pub(super) fn roll(&mut self) -> Result<(), SpillError> {
        self.sync()?;
        self.write_here()?;
        self.writer = None;
        let next = Segment::create(self.dir.path(), self.next_block)?;
        let full = std::mem::replace(&mut self.current, next);
        self.sealed.push(full);
        self.flushed = 0;
        self.written = 0;
        self.stats.segments += 1;
        self.recheck = true;
        Ok(())
    }
}
