//! The spill store: a checksummed append-only segment log of compressed blocks of records.
//!
//! Records (encoded states) are packed into blocks of about 4 KiB, each record as a LEB128
//! length and its bytes. A block is stored as `stored_len: u32 | raw_len: u32 | crc32c: u32 |
//! payload`, little-endian: the payload is the block compressed with LZ4 when that makes it
//! smaller and is worth its time ([`Compression`]), the raw block otherwise (`stored_len ==
//! raw_len`), and the checksum covers `raw_len` and the payload. One header and one checksum per block instead of per record
//! (records are often ~20 bytes), and LZ4 gets enough input to find repeats. Sealed blocks are
//! buffered and written in large appends by a thread of the store's own, which also fills in
//! the checksums, while the caller fills the next buffer: the caller (the stage's worker)
//! neither waits for `write` calls nor computes checksums ([`SpillStore::flush`] seals the
//! open block and returns once everything is in the file). A read decompresses the record's
//! block once and keeps it: reloads in spill order (the end-of-input flush) cost one block
//! read per block, not per record.
//!
//! The log is a sequence of segment files ("segment-...", [`DEFAULT_SEGMENT_BYTES`] = 64 MiB
//! each by default, [`SpillStore::set_segment_bytes`]); block numbers run on across them, so a
//! [`RecordRef`] names its segment too. Space is reclaimed while the log is in use: the caller
//! [`releases`](SpillStore::release) a record once nothing will read it again (the stage:
//! when its key is reloaded), and each segment counts its live records. A full segment with
//! no live record left is deleted; one with fewer than [`DEFAULT_COMPACT_BELOW`] (25 %,
//! [`SpillStore::set_compact_below`]) is due for compaction ([`SpillStore::next_compaction`]):
//! the caller, which holds the index, appends the records it still points at again, moves
//! its index to the copies and [`retires`](SpillStore::retire) the segment, whose file is
//! deleted. The stage compacts at most one segment per batch, yielding as in a spill round.
//! [`SpillStats`] counts segments, bytes on disk, bytes reclaimed and compactions.
//!
//! Why a segment log and not an embedded key-value store: spilled state is written once per
//! eviction and read at most once per reload, never updated in place, and the stage already
//! keeps the index of spilled keys in memory. An append is a `memcpy` into a buffer; a B-tree
//! or LSM store adds its own index, write-ahead log and compaction for nothing (measured by
//! `pulseflow-bench spill-store`, see BENCHMARKS.md, "accumulate").
//!
//! ```
//! use pulseflow::accumulate::SpillStore;
//!
//! let mut store = SpillStore::open(None).expect("temp dir");
//! let at = store.append(&[7u8; 1000]).expect("append");
//! store.flush().expect("flush");
//! let mut out = Vec::new();
//! store.read(at, &"key-1", &mut out).expect("intact");
//! assert_eq!(out, vec![7u8; 1000]);
//! let stats = store.stats();
//! assert_eq!(stats.records, 1);
//! assert!(stats.compression_ratio() > 10.0);
//! ```
//!
//! The code follows the log's seams: `record` (record and block format, checksums),
//! `compression` (whether a block is compressed), `append` (the open block, sealed when
//! full), `writer` (the writer thread), `segment` (the segment files), `read` (reading back)
//! and `compaction` (reclaiming space).

mod append;
mod compaction;
mod compression;
mod read;
mod record;
mod segment;
mod writer;

pub use compaction::DEFAULT_COMPACT_BELOW;
pub use compression::Compression;
pub use record::block_records;
pub use segment::DEFAULT_SEGMENT_BYTES;

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use compression::CostModel;
use record::BLOCK;
use segment::Segment;
use writer::{WRITE_BUFFER, Writer};

/// An error of the spill store.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// Reading or writing the spill file failed.
    #[error("spill file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A record failed its checksum or could not be decoded.
    #[error("corrupt spill record for key {key} in {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The key whose state the record holds.
        key: String,
        /// The spill file.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A state could not be encoded.
    #[error("cannot encode accumulator state: {0}")]
    Encode(String),
}

/// Where a record is: its block and its position in the block (8 bytes, so the index of
/// spilled keys stays small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    block: u32,
    pos: u32,
}

impl RecordRef {
    pub(crate) fn new(block: u32, pos: u32) -> Self {
        Self { block, pos }
    }

    /// Number of the record's block in the log.
    pub fn block(&self) -> u32 {
        self.block
    }

    /// Position of the record in its (uncompressed) block.
    pub fn position(&self) -> u32 {
        self.pos
    }

    /// An order of records that follows the log (for reading many back).
    pub fn order(&self) -> u64 {
        (u64::from(self.block) << 32) | u64::from(self.pos)
    }
}

/// Figures of a spill store.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpillStats {
    /// Records written (copies made by compaction included).
    pub records: u64,
    /// Records read back.
    pub reads: u64,
    /// Bytes before compression.
    pub raw_bytes: u64,
    /// Bytes written (headers included).
    pub stored_bytes: u64,
    /// Blocks written.
    pub blocks: u64,
    /// Records not yet released ([`SpillStore::release`]) and not in a retired segment.
    pub live_records: u64,
    /// Segment files of the log now.
    pub segments: u64,
    /// Bytes in the log's segment files now (`stored_bytes - reclaimed_bytes`; sealed blocks
    /// still in the write buffer included).
    pub disk_bytes: u64,
    /// Bytes of the segment files deleted while the log was open.
    pub reclaimed_bytes: u64,
    /// Segments retired: compacted (their live records copied to the end of the log), or
    /// deleted with no live record left.
    pub compactions: u64,
}

impl SpillStats {
    /// Raw bytes over stored bytes (1.0 when nothing was written).
    pub fn compression_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            1.0
        } else {
            self.raw_bytes as f64 / self.stored_bytes as f64
        }
    }
}

enum Dir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Temp(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }
}

/// An append-only log of checksummed, compressed blocks of records, in segment files.
pub struct SpillStore {
    dir: Dir,
    /// The segment being written (the newest).
    current: Segment,
    /// Older segments, complete in their files, oldest first.
    sealed: Vec<Segment>,
    /// A new segment starts once the current one holds this many bytes.
    segment_bytes: u64,
    /// Compaction threshold (fraction of live records).
    compact_below: f64,
    /// Whether a sealed segment may have become due for compaction since the last look.
    recheck: bool,
    /// Number of the open block (blocks sealed so far).
    next_block: u32,
    /// Offset in the current segment of the buffer's first byte: bytes handed to the writer
    /// so far.
    flushed: u64,
    /// Bytes the writer has put in the current segment (`<= flushed`).
    written: u64,
    /// The thread writing full buffers while the next one fills (started at the first write
    /// to a segment; `None` with `inline_writes` when it could not be started).
    writer: Option<Writer>,
    inline_writes: bool,
    /// Buffers the writer gave back, for the next swaps.
    spare: Vec<Vec<u8>>,
    /// Sealed blocks not yet in the file, then the open block (header space and records),
    /// from `open_start` on.
    buffer: Vec<u8>,
    open_start: usize,
    compression: Compression,
    costs: CostModel,
    /// The block last read, decompressed and checked.
    cached: Option<u32>,
    cache: Vec<u8>,
    scratch: Vec<u8>,
    stats: SpillStats,
}

impl Debug for SpillStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillStore")
            .field("path", &self.current.path)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpillError + '_ {
    move |source| SpillError::Io {
        path: path.to_owned(),
        source,
    }
}

fn too_many_blocks() -> SpillError {
    SpillError::Encode("spill log has too many blocks".into())
}

impl SpillStore {
    /// Opens a new log in `dir` (created if missing, kept afterwards), or in a temporary
    /// directory removed when the store is dropped.
    pub fn open(dir: Option<&Path>) -> Result<Self, SpillError> {
        let dir = match dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(io(d))?;
                Dir::Kept(d.to_owned())
            }
            None => Dir::Temp(
                tempfile::Builder::new()
                    .prefix("pulseflow-spill-")
                    .tempdir()
                    .map_err(io(&std::env::temp_dir()))?,
            ),
        };
        let current = Segment::create(dir.path(), 0)?;
        Ok(Self {
            dir,
            current,
            sealed: Vec::new(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            compact_below: DEFAULT_COMPACT_BELOW,
            recheck: false,
            next_block: 0,
            flushed: 0,
            written: 0,
            writer: None,
            inline_writes: false,
            spare: Vec::new(),
            buffer: Vec::with_capacity(WRITE_BUFFER + 2 * BLOCK),
            open_start: 0,
            compression: Compression::Auto,
            costs: CostModel::default(),
            cached: None,
            cache: Vec::new(),
            scratch: Vec::new(),
            stats: SpillStats {
                segments: 1,
                ..SpillStats::default()
            },
        })
    }

    /// The segment file being written (the newest).
    pub fn path(&self) -> &Path {
        &self.current.path
    }

    /// The segment file holding `at` (for error messages; the newest when none does).
    pub fn path_of(&self, at: RecordRef) -> &Path {
        &self.segment(at.block).unwrap_or(&self.current).path
    }

    /// The directory holding the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The figures so far.
    pub fn stats(&self) -> SpillStats {
        self.stats
    }

    /// Sets whether blocks are compressed (default [`Compression::Auto`]).
    pub fn set_compression(&mut self, compression: Compression) {
        self.compression = compression;
    }

    /// Sets the size at which the log goes on in a new segment file (default
    /// [`DEFAULT_SEGMENT_BYTES`]; a segment holds at least one block whatever the size).
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes.max(1);
    }

    /// Sets the fraction of live records below which a full segment is due for compaction
    /// (default [`DEFAULT_COMPACT_BELOW`]; 0 never compacts, but fully dead segments are
    /// still deleted).
    pub fn set_compact_below(&mut self, fraction: f64) {
        self.compact_below = fraction.clamp(0.0, 1.0);
    }

    /// Offset in its segment file of the block holding `at` (for error messages).
    pub fn offset_of(&self, at: RecordRef) -> u64 {
        match self.segment(at.block).and_then(|s| s.block(at.block)) {
            Some((offset, _)) => offset,
            None => self.flushed + self.open_start as u64,
        }
    }
}

impl Drop for SpillStore {
    fn drop(&mut self) {
        // The writer finishes what it was given before the file goes.
        drop(self.writer.take());
        if matches!(self.dir, Dir::Kept(_)) {
            // Only the log goes; a directory given by the user stays.
            for segment in self.sealed.iter().chain([&self.current]) {
                let _ = std::fs::remove_file(&segment.path);
            }
        }
    }
}
