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

use std::fmt::Debug;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

/// Bytes buffered before they are appended to the file.
const WRITE_BUFFER: usize = 256 << 10;
/// A block is sealed once its records reach this many bytes: large enough that a header and
/// a checksum per block cost nothing and LZ4 finds repeats, small enough that reading one
/// record at random reads and checks only a few KiB.
const BLOCK: usize = 4 << 10;
/// Blocks smaller than this are stored raw: LZ4 cannot win on them.
const MIN_COMPRESS: usize = 256;
/// Block header size.
const HEADER: usize = 12;
/// Largest record accepted (a corrupt length field must not make us allocate gigabytes).
const MAX_RECORD: usize = 256 << 20;
/// Largest raw block (a record above [`BLOCK`] gets a block of its own).
const MAX_BLOCK: usize = MAX_RECORD + BLOCK + 8;
/// Under [`Compression::Auto`], every this many blocks one is compressed to refresh the
/// estimate of what compression costs and saves; while compression does not pay, the
/// interval doubles after each probe, up to [`PROBE_MAX`] blocks (4 MiB). The decision itself
/// is taken at every block from the latest estimates, so a disk turning slow flips it at
/// once (write time is measured at every write).
const PROBE_EVERY: u32 = 32;
const PROBE_MAX: u32 = 1024;

/// Whether the spill store compresses its blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// Compress a block when that is expected to save more write time than it costs: the
    /// store keeps running estimates of LZ4's time and savings per byte and of the file's
    /// write time per byte (LZ4's from a probe block now and then, less often while it does
    /// not pay; the write time from every write). On a page cache or a fast disk LZ4 does not
    /// pay; on a slow disk (or one the kernel throttles) it does. Blocks before the first
    /// write (the first 256 KiB or more) are stored raw, but for the probes.
    #[default]
    Auto,
    /// Compress every block (kept raw only when LZ4 does not make it smaller).
    Always,
    /// Never compress.
    Never,
}

/// Running estimates behind [`Compression::Auto`], in nanoseconds per byte.
#[derive(Debug, Clone, Copy, Default)]
struct CostModel {
    write_ns: Option<f64>,
    lz4_ns: Option<f64>,
    /// Fraction of the bytes LZ4 saves.
    saved: f64,
    since_probe: u32,
    /// Blocks between probes (0 until the first probe: [`PROBE_EVERY`]).
    interval: u32,
}

impl CostModel {
    fn blend(old: Option<f64>, new: f64) -> f64 {
        old.map_or(new, |o| 0.75 * o + 0.25 * new)
    }

    /// Whether to compress the next block: a probe every so many blocks (and the first
    /// block), otherwise what the estimates say.
    fn should_compress(&mut self) -> bool {
        self.since_probe += 1;
        if self.lz4_ns.is_none() || self.since_probe >= self.interval.max(PROBE_EVERY) {
            self.since_probe = 0;
            return true;
        }
        self.pays()
    }

    /// Whether compressing saves more write time than it costs, by the latest estimates.
    /// Until the first write has measured the write time, blocks go raw (except the probes).
    fn pays(&self) -> bool {
        match (self.write_ns, self.lz4_ns) {
            (Some(w), Some(c)) => c < w * self.saved,
            _ => false,
        }
    }

    /// After a probe: probes come less often while compression does not pay (or cannot be
    /// judged yet: before the first write is timed, blocks go raw whatever LZ4 costs, and the
    /// first timed write is weighed against the latest probe at once).
    fn probed(&mut self) {
        self.interval = if self.pays() {
            PROBE_EVERY
        } else {
            (self.interval.max(PROBE_EVERY / 2) * 2).min(PROBE_MAX)
        };
    }
}

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

/// Default size of a segment file: once the current segment holds this many bytes, the log
/// goes on in a new file.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Default compaction threshold: a full segment is compacted once fewer than this fraction
/// of its records are live.
pub const DEFAULT_COMPACT_BELOW: f64 = 0.25;

/// One file of the log: a run of consecutive blocks.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: File,
    /// Number of its first block.
    first: u32,
    /// Offset in the file and stored size (header included) of each sealed block.
    blocks: Vec<(u64, u32)>,
    /// Records appended to it, and those of them not released yet.
    records: u64,
    live: u64,
    /// Stored bytes of its sealed blocks.
    bytes: u64,
    /// Not to be compacted (a block of it could not be read back).
    kept: bool,
}

impl Segment {
    fn create(dir: &Path, first: u32) -> Result<Self, SpillError> {
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
    fn block_range(&self) -> Range<u32> {
        self.first..self.first + self.blocks.len() as u32
    }

    /// Offset and stored size of `block`, when the segment holds it.
    fn block(&self, block: u32) -> Option<(u64, u32)> {
        let i = block.checked_sub(self.first)?;
        self.blocks.get(i as usize).copied()
    }

    /// Whether so few of its records are live that copying them out is worth it.
    fn due(&self, below: f64) -> bool {
        !self.kept && (self.live as f64) < self.records as f64 * below
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

/// Buffers handed to the writer thread and not yet given back, at most (the caller fills
/// another meanwhile): with a backlog the thread goes from one write to the next without
/// sleeping, and the caller seldom waits for it (with one in flight, each hand-over waited
/// for the thread to wake up: the store alone took 15.7 ns per record instead of 10.5, best
/// of 12 runs each on the 2-core machine). At most 4 x 264 KiB of buffers per store.
const IN_FLIGHT: usize = 3;

fn per_byte(started: Instant, bytes: usize) -> f64 {
    started.elapsed().as_nanos() as f64 / bytes.max(1) as f64
}

/// A buffer the writer thread gives back: emptied, with how many bytes it held and the write's
/// time per byte or error.
struct Written {
    buffer: Vec<u8>,
    len: usize,
    result: std::io::Result<f64>,
}

/// The thread appending full buffers to the log, so that the `write` calls (page-cache copies,
/// or a slow disk) overlap with encoding the next records instead of stalling the caller (the
/// stage's worker). Buffers go in order over a channel and come back the same way; after a
/// failed write it writes nothing more (later blocks would land at wrong offsets).
struct Writer {
    to_write: Option<mpsc::Sender<Vec<u8>>>,
    written: mpsc::Receiver<Written>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight: usize,
}

impl Writer {
    fn start(file: &File) -> std::io::Result<Self> {
        let mut file = file.try_clone()?;
        let (to_write, todo) = mpsc::channel::<Vec<u8>>();
        let (done, written) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pulseflow-spill".into())
            .spawn(move || {
                let mut failed = false;
                for mut buffer in todo {
                    checksum_blocks(&mut buffer);
                    let len = buffer.len();
                    let started = Instant::now();
                    let result = if failed {
                        Err(std::io::Error::other("an earlier spill write failed"))
                    } else {
                        file.write_all(&buffer).map(|()| per_byte(started, len))
                    };
                    failed |= result.is_err();
                    buffer.clear();
                    let back = Written {
                        buffer,
                        len,
                        result,
                    };
                    if done.send(back).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            to_write: Some(to_write),
            written,
            thread: Some(thread),
            in_flight: 0,
        })
    }

    /// Hands a buffer over; `false` when the thread has stopped.
    fn send(&mut self, buffer: Vec<u8>) -> bool {
        let sent = self
            .to_write
            .as_ref()
            .is_some_and(|t| t.send(buffer).is_ok());
        self.in_flight += usize::from(sent);
        sent
    }

    /// The oldest buffer in flight, once written (waiting for it with `wait`); `None` when
    /// none is in flight, none is written yet (without `wait`) or the thread has stopped.
    fn receive(&mut self, wait: bool) -> Option<Written> {
        if self.in_flight == 0 {
            return None;
        }
        let back = if wait {
            self.written.recv().ok()?
        } else {
            self.written.try_recv().ok()?
        };
        self.in_flight -= 1;
        Some(back)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once it has written what it was given.
        drop(self.to_write.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Fills in the checksum of each block of `buffer` (sealed blocks back to back, each a header
/// and its payload): CRC32C of the raw length and the payload. Stops at a header that does
/// not fit.
fn checksum_blocks(buffer: &mut [u8]) {
    let mut at = 0;
    while let Some(header) = buffer.get(at..at + HEADER) {
        let stored = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let end = at + HEADER + stored;
        let Some(payload) = buffer.get(at + HEADER..end) else {
            return;
        };
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header[4..8]), payload);
        buffer[at + 8..at + HEADER].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// Records up to this size are copied by [`append_small`].
const SMALL_RECORD: usize = 64;

/// Appends a record of at most [`SMALL_RECORD`] bytes (so its length takes one byte) and its
/// length without a `memcpy` call (a library call costs more than copying ~20 bytes): room of
/// a constant size is made, the record copied with at most two overlapping copies of a constant
/// size, the room cut to length.
#[inline(always)]
fn append_small(buffer: &mut Vec<u8>, raw: &[u8]) {
    let len = raw.len();
    let start = buffer.len();
    buffer.extend_from_slice(&[0; 1 + SMALL_RECORD]);
    if let Some(room) = buffer
        .get_mut(start..)
        .and_then(|room| room.first_chunk_mut::<{ 1 + SMALL_RECORD }>())
    {
        room[0] = len as u8;
        let room = &mut room[1..];
        match len {
            32..=SMALL_RECORD => copy_ends::<32>(room, raw),
            16..32 => copy_ends::<16>(room, raw),
            8..16 => copy_ends::<8>(room, raw),
            _ => {
                for (to, &b) in room.iter_mut().zip(raw) {
                    *to = b;
                }
            }
        }
    }
    buffer.truncate(start + 1 + len);
}

/// Copies `raw` (`N..=2N` bytes long) to the start of `room` as its first and last `N` bytes.
#[inline(always)]
fn copy_ends<const N: usize>(room: &mut [u8], raw: &[u8]) {
    let len = raw.len();
    if let (Some(first), Some(last)) = (raw.first_chunk::<N>(), raw.last_chunk::<N>()) {
        if let Some(to) = room.first_chunk_mut::<N>() {
            *to = *first;
        }
        if let Some(to) = room
            .get_mut(len - N..)
            .and_then(|r| r.first_chunk_mut::<N>())
        {
            *to = *last;
        }
    }
}

/// Appends `n` as LEB128.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads a LEB128 number at `at`: the number and the bytes it took.
fn get_varint(bytes: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut n = 0u64;
    for (i, b) in bytes.get(at..)?.iter().take(10).enumerate() {
        n |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
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

    /// The index in `sealed` of the segment holding `block`, or `None` when that is the
    /// current segment (or none).
    fn sealed_index(&self, block: u32) -> Option<usize> {
        if block >= self.current.first {
            return None;
        }
        self.sealed
            .partition_point(|s| s.first <= block)
            .checked_sub(1)
    }

    /// The segment holding `block` (sealed or not yet).
    fn segment(&self, block: u32) -> Option<&Segment> {
        match self.sealed_index(block) {
            Some(i) => self.sealed.get(i).filter(|s| s.block(block).is_some()),
            None => (block >= self.current.first).then_some(&self.current),
        }
    }

    /// Offset in its segment file of the block holding `at` (for error messages).
    pub fn offset_of(&self, at: RecordRef) -> u64 {
        match self.segment(at.block).and_then(|s| s.block(at.block)) {
            Some((offset, _)) => offset,
            None => self.flushed + self.open_start as u64,
        }
    }

    /// Appends a record written by `encode` straight into the open block (no intermediate
    /// buffer): `encode` appends the record's bytes to the vector it is given. On an error the
    /// partial record is removed.
    #[inline]
    pub fn append_with(
        &mut self,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), SpillError>,
    ) -> Result<RecordRef, SpillError> {
        let block = self.next_block;
        let mark = self.buffer.len();
        if mark == self.open_start {
            self.buffer.extend_from_slice(&[0; HEADER]);
        }
        let start = self.buffer.len();
        // One byte for the length: enough for records under 128 bytes (the common case),
        // widened otherwise.
        self.buffer.push(0);
        if let Err(e) = encode(&mut self.buffer) {
            self.buffer.truncate(mark);
            return Err(e);
        }
        let len = self.buffer.len() - start - 1;
        match self.buffer.get_mut(start) {
            Some(prefix) if len < 0x80 => *prefix = len as u8,
            _ => self.widen_length(mark, start, len)?,
        }
        self.count_record(len);
        let data = self.open_start + HEADER;
        let at = RecordRef {
            block,
            pos: (start - data) as u32,
        };
        if self.buffer.len() - data >= BLOCK {
            self.seal()?;
        }
        Ok(at)
    }

    /// A record of 128 bytes or more written by [`SpillStore::append_with`] behind a
    /// one-byte length: moved up to make room for its full length (or removed when too large).
    #[cold]
    #[inline(never)]
    fn widen_length(&mut self, mark: usize, start: usize, len: usize) -> Result<(), SpillError> {
        if len > MAX_RECORD {
            self.buffer.truncate(mark);
            return Err(SpillError::Encode(format!(
                "state of {len} bytes exceeds the {MAX_RECORD}-byte record limit"
            )));
        }
        let mut prefix = Vec::with_capacity(10);
        put_varint(&mut prefix, len as u64);
        let extra = prefix.len() - 1;
        self.buffer.resize(self.buffer.len() + extra, 0);
        self.buffer
            .copy_within(start + 1..start + 1 + len, start + prefix.len());
        self.buffer[start..start + prefix.len()].copy_from_slice(&prefix);
        Ok(())
    }

    /// Appends a record to the open block and says where it is.
    #[inline]
    pub fn append(&mut self, raw: &[u8]) -> Result<RecordRef, SpillError> {
        if raw.len() > MAX_RECORD {
            return Err(SpillError::Encode(format!(
                "state of {} bytes exceeds the {MAX_RECORD}-byte record limit",
                raw.len()
            )));
        }
        let block = self.next_block;
        if self.buffer.len() == self.open_start {
            // A new block: room for its header.
            self.buffer.extend_from_slice(&[0; HEADER]);
        }
        let data = self.open_start + HEADER;
        let at = RecordRef {
            block,
            pos: (self.buffer.len() - data) as u32,
        };
        if raw.len() <= SMALL_RECORD {
            append_small(&mut self.buffer, raw);
        } else {
            put_varint(&mut self.buffer, raw.len() as u64);
            self.buffer.extend_from_slice(raw);
        }
        self.count_record(raw.len());
        if self.buffer.len() - data >= BLOCK {
            self.seal()?;
        }
        Ok(at)
    }

    /// Counts a record appended to the open block (live, in the current segment).
    #[inline(always)]
    fn count_record(&mut self, len: usize) {
        self.stats.records += 1;
        self.stats.live_records += 1;
        self.stats.raw_bytes += len as u64;
        self.current.records += 1;
        self.current.live += 1;
    }

    /// Closes the open block: compresses it in place when that is worth it, fills in its
    /// header.
    #[inline(never)]
    fn seal(&mut self) -> Result<(), SpillError> {
        if self.buffer.len() == self.open_start {
            return Ok(());
        }
        let data = self.open_start + HEADER;
        let raw_len = self.buffer.len() - data;
        let compress = raw_len >= MIN_COMPRESS
            && match self.compression {
                Compression::Always => true,
                Compression::Never => false,
                Compression::Auto => self.costs.should_compress(),
            };
        if compress {
            let raw = &self.buffer[data..];
            self.scratch
                .resize(lz4_flex::block::get_maximum_output_size(raw_len), 0);
            let started = Instant::now();
            let packed = lz4_flex::block::compress_into(raw, &mut self.scratch);
            let took = started.elapsed().as_nanos() as f64 / raw_len as f64;
            self.costs.lz4_ns = Some(CostModel::blend(self.costs.lz4_ns, took));
            if let Ok(n) = packed {
                let saved = 1.0 - (n as f64 / raw_len as f64).min(1.0);
                self.costs.saved = 0.75 * self.costs.saved + 0.25 * saved;
                if self.compression == Compression::Auto {
                    self.costs.probed();
                }
                if n < raw_len {
                    self.buffer.truncate(data);
                    self.buffer.extend_from_slice(&self.scratch[..n]);
                }
            }
        }
        let stored = self.buffer.len() - data;
        // The checksum is filled in by whoever writes the buffer out ([`checksum_blocks`]):
        // off this thread when the writer thread runs.
        let header = &mut self.buffer[self.open_start..data];
        header[0..4].copy_from_slice(&(stored as u32).to_le_bytes());
        header[4..8].copy_from_slice(&(raw_len as u32).to_le_bytes());
        let len = (HEADER + stored) as u32;
        self.next_block = self.next_block.checked_add(1).ok_or_else(too_many_blocks)?;
        self.current
            .blocks
            .push((self.flushed + self.open_start as u64, len));
        self.current.bytes += u64::from(len);
        self.open_start = self.buffer.len();
        self.stats.blocks += 1;
        self.stats.stored_bytes += u64::from(len);
        self.stats.disk_bytes += u64::from(len);
        if self.flushed + self.buffer.len() as u64 >= self.segment_bytes {
            self.roll()?;
        } else if self.buffer.len() >= WRITE_BUFFER {
            self.write_out()?;
        }
        Ok(())
    }

    /// The current segment is full: everything goes to its file, and the log goes on in a
    /// new one (whose writer thread starts at its first write).
    #[cold]
    #[inline(never)]
    fn roll(&mut self) -> Result<(), SpillError> {
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

    /// Hands the sealed blocks to the writer thread (the open block must be empty) and goes on
    /// with an empty buffer; waits only while the previous buffer is still being written.
    /// Without a writer thread, writes them itself.
    fn write_out(&mut self) -> Result<(), SpillError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if self.writer.is_none() && !self.inline_writes {
            match Writer::start(&self.current.file) {
                Ok(w) => self.writer = Some(w),
                Err(e) => {
                    tracing::debug!("spill writer thread not started, writing inline: {e}");
                    self.inline_writes = true;
                }
            }
        }
        if self.writer.is_none() {
            return self.write_here();
        }
        self.collect_ready()?;
        while self
            .writer
            .as_ref()
            .is_some_and(|w| w.in_flight >= IN_FLIGHT)
        {
            self.collect()?;
        }
        let next = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(WRITE_BUFFER + 2 * BLOCK));
        let full = std::mem::replace(&mut self.buffer, next);
        self.flushed += full.len() as u64;
        self.open_start = 0;
        if self.writer.as_mut().is_some_and(|w| w.send(full)) {
            Ok(())
        } else {
            Err(self.writer_stopped())
        }
    }

    fn writer_stopped(&self) -> SpillError {
        SpillError::Io {
            path: self.current.path.clone(),
            source: std::io::Error::other("the spill writer thread has stopped"),
        }
    }

    /// Waits for the writer to give back the oldest buffer in flight: counts its bytes as
    /// written and its write time in the cost model, or returns its write error.
    fn collect(&mut self) -> Result<(), SpillError> {
        let Some(back) = self.writer.as_mut().and_then(|w| w.receive(true)) else {
            return Err(self.writer_stopped());
        };
        self.written_back(back)
    }

    /// Takes back the buffers the writer has finished with, without waiting (so the cost
    /// model learns the write time early, and the next swap finds a spare buffer).
    fn collect_ready(&mut self) -> Result<(), SpillError> {
        while let Some(back) = self.writer.as_mut().and_then(|w| w.receive(false)) {
            self.written_back(back)?;
        }
        Ok(())
    }

    fn written_back(&mut self, back: Written) -> Result<(), SpillError> {
        let ns = back.result.map_err(io(&self.current.path))?;
        self.written += back.len as u64;
        self.costs.write_ns = Some(CostModel::blend(self.costs.write_ns, ns));
        self.spare.push(back.buffer);
        Ok(())
    }

    /// Waits until everything handed to the writer is in the file.
    fn sync(&mut self) -> Result<(), SpillError> {
        while self.writer.as_ref().is_some_and(|w| w.in_flight > 0) {
            self.collect()?;
        }
        Ok(())
    }

    /// Writes the sealed blocks on this thread (the open block must be empty, and nothing in
    /// flight).
    fn write_here(&mut self) -> Result<(), SpillError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        checksum_blocks(&mut self.buffer);
        let started = Instant::now();
        self.current
            .file
            .write_all(&self.buffer)
            .map_err(io(&self.current.path))?;
        self.costs.write_ns = Some(CostModel::blend(
            self.costs.write_ns,
            per_byte(started, self.buffer.len()),
        ));
        self.flushed += self.buffer.len() as u64;
        self.written = self.flushed;
        self.buffer.clear();
        self.open_start = 0;
        Ok(())
    }

    /// Seals the open block and writes everything buffered to the file; when it returns, the
    /// file holds every record appended so far. Waits for the buffers in flight, then writes
    /// what is left on this thread: handing it over only to wait for it would add the writer
    /// thread's wake-up to every flush (the stage flushes after each spill round, often of
    /// less than a write buffer).
    pub fn flush(&mut self) -> Result<(), SpillError> {
        self.seal()?;
        self.sync()?;
        self.write_here()
    }

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

    /// Reads a record back into `out` (replacing its contents), checking its block's checksum.
    /// `key` names the record in errors.
    pub fn read(
        &mut self,
        at: RecordRef,
        key: &dyn Debug,
        out: &mut Vec<u8>,
    ) -> Result<(), SpillError> {
        let offset = self.offset_of(at);
        let corrupt = |path: &Path, reason: String| SpillError::Corrupt {
            key: format!("{key:?}"),
            path: path.to_owned(),
            offset,
            reason,
        };
        let block: &[u8] = if at.block == self.next_block {
            self.buffer
                .get(self.open_start + HEADER..)
                .unwrap_or_default()
        } else {
            if self.cached != Some(at.block) {
                self.cached = None;
                self.load_block(at.block).map_err(|e| match e {
                    Err(reason) => corrupt(self.path_of(at), reason),
                    Ok(io) => io,
                })?;
                self.cached = Some(at.block);
            }
            &self.cache
        };
        let pos = at.pos as usize;
        let (len, n) = get_varint(block, pos).ok_or_else(|| {
            corrupt(
                self.path_of(at),
                format!("no record at position {pos} of its block"),
            )
        })?;
        let start = pos + n;
        let bytes = usize::try_from(len)
            .ok()
            .and_then(|len| block.get(start..start.checked_add(len)?))
            .ok_or_else(|| {
                corrupt(
                    self.path_of(at),
                    format!("record of {len} bytes beyond its block"),
                )
            })?;
        out.clear();
        out.extend_from_slice(bytes);
        self.stats.reads += 1;
        Ok(())
    }

    /// Reads a sealed block (checked and decompressed) into `out`, replacing its contents:
    /// records back to back, each a LEB128 length and its bytes (walk them with
    /// [`block_records`]). For reading the whole log in order.
    pub fn read_block(&mut self, block: u32, out: &mut Vec<u8>) -> Result<(), SpillError> {
        if self.cached != Some(block) {
            self.cached = None;
            let at = RecordRef { block, pos: 0 };
            let offset = self.offset_of(at);
            self.load_block(block).map_err(|e| match e {
                Err(reason) => SpillError::Corrupt {
                    key: format!("(block {block})"),
                    path: self.path_of(at).to_owned(),
                    offset,
                    reason,
                },
                Ok(io) => io,
            })?;
            self.cached = Some(block);
        }
        out.clear();
        out.extend_from_slice(&self.cache);
        Ok(())
    }

    /// Reads, checks and decompresses a sealed block into the cache. `Err(Err(reason))` is a
    /// corrupt block, `Err(Ok(error))` an I/O error.
    fn load_block(&mut self, block: u32) -> Result<(), Result<SpillError, String>> {
        let Some((offset, len)) = self.segment(block).and_then(|s| s.block(block)) else {
            return Err(Err(format!("no block {block} in the log")));
        };
        // Only the current segment has blocks not yet in its file.
        let current = block >= self.current.first;
        let len = len as usize;
        if len < HEADER {
            return Err(Err(format!("block length {len} below header size")));
        }
        let mut record = std::mem::take(&mut self.scratch);
        record.resize(len, 0);
        if current && offset < self.flushed && offset + len as u64 > self.written {
            // The block is still being written.
            self.sync().map_err(Ok)?;
        }
        // A block still in the buffer has no checksum yet (and never left memory).
        let in_memory = current && offset >= self.flushed;
        let fetched = if in_memory {
            let start = (offset - self.flushed) as usize;
            match self.buffer.get(start..start + len) {
                Some(bytes) => {
                    record.copy_from_slice(bytes);
                    Ok(())
                }
                None => Err(Err("block beyond the end of the log".into())),
            }
        } else {
            let segment = self.segment(block).unwrap_or(&self.current);
            read_at(&segment.file, &mut record, offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Err("block truncated".into())
                } else {
                    Ok(SpillError::Io {
                        path: segment.path.clone(),
                        source: e,
                    })
                }
            })
        };
        let result = fetched.and_then(|()| {
            let word = |i: usize| {
                u32::from_le_bytes([record[i], record[i + 1], record[i + 2], record[i + 3]])
            };
            let (stored, raw_len, crc) = (word(0) as usize, word(4) as usize, word(8));
            if stored + HEADER != len {
                Err(Err(format!(
                    "stored length {stored} does not match the index ({})",
                    len - HEADER
                )))
            } else if !in_memory
                && crc32c::crc32c_append(crc32c::crc32c(&record[4..8]), &record[HEADER..]) != crc
            {
                Err(Err("checksum mismatch".into()))
            } else if raw_len > MAX_BLOCK || stored > raw_len {
                Err(Err(format!("implausible raw length {raw_len}")))
            } else if stored == raw_len {
                self.cache.clear();
                self.cache.extend_from_slice(&record[HEADER..]);
                Ok(())
            } else {
                self.cache.clear();
                self.cache.resize(raw_len, 0);
                match lz4_flex::block::decompress_into(&record[HEADER..], &mut self.cache) {
                    Ok(n) if n == raw_len => Ok(()),
                    Ok(n) => Err(Err(format!("decompressed {n} bytes, expected {raw_len}"))),
                    Err(e) => Err(Err(format!("lz4: {e}"))),
                }
            }
        });
        self.scratch = record;
        result
    }
}

/// The records of a block read by [`SpillStore::read_block`]: each record's position in the
/// block and its bytes. Stops at the first malformed length.
pub fn block_records(block: &[u8]) -> impl Iterator<Item = (u32, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let (len, n) = get_varint(block, at)?;
        let start = at + n;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        let bytes = block.get(start..end)?;
        let pos = u32::try_from(at).ok()?;
        at = end;
        Some((pos, bytes))
    })
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

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_from_buffer_and_file() {
        let mut store = SpillStore::open(None).expect("open");
        let a = store.append(b"tiny").expect("append");
        let b = store.append(&[1u8; 5000]).expect("append");
        let mut out = Vec::new();
        store.read(a, &1, &mut out).expect("buffered");
        assert_eq!(out, b"tiny");
        store.flush().expect("flush");
        store.read(b, &2, &mut out).expect("from file");
        assert_eq!(out, vec![1u8; 5000]);
        let dir = store.dir().to_owned();
        assert!(dir.exists());
        drop(store);
        assert!(!dir.exists(), "temporary spill directory removed on close");
    }

    #[test]
    fn corruption_names_key_and_file() {
        let mut store = SpillStore::open(None).expect("open");
        let at = store.append(&[9u8; 300]).expect("append");
        store.flush().expect("flush");
        let mut bytes = std::fs::read(store.path()).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(store.path(), &bytes).expect("write");
        let err = store
            .read(at, &"user-7", &mut Vec::new())
            .expect_err("corrupt");
        assert!(matches!(err, SpillError::Corrupt { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("\"user-7\""), "{text}");
        assert!(text.contains("segment-"), "{text}");
        assert!(text.contains("checksum"), "{text}");
    }

    #[test]
    fn many_small_records_share_blocks() {
        for mode in [Compression::Always, Compression::Never, Compression::Auto] {
            small_records(mode);
        }
    }

    fn small_records(mode: Compression) {
        let mut store = SpillStore::open(None).expect("open");
        store.set_compression(mode);
        let refs: Vec<_> = (0..10_000u32)
            .map(|i| {
                let rec = format!("state-{i}");
                store.append(rec.as_bytes()).expect("append")
            })
            .collect();
        store.flush().expect("flush");
        let stats = store.stats();
        assert!(stats.blocks * 100 < stats.records, "{stats:?}");
        match mode {
            Compression::Always => assert!(stats.compression_ratio() > 1.5, "{stats:?}"),
            Compression::Never => assert!(stats.compression_ratio() < 1.0, "{stats:?}"),
            Compression::Auto => {}
        }
        let mut out = Vec::new();
        for i in [9_999u32, 0, 5_000, 5_001, 1] {
            store.read(refs[i as usize], &i, &mut out).expect("read");
            assert_eq!(out, format!("state-{i}").as_bytes());
        }
        let big = vec![3u8; 100_000];
        let at = store.append(&big).expect("append big");
        store
            .read(at, &"big", &mut out)
            .expect("from the open block");
        assert_eq!(out, big);
        store.flush().expect("flush");
        store.read(at, &"big", &mut out).expect("from the file");
        assert_eq!(out, big);
    }

    #[test]
    fn records_encoded_in_place() {
        let mut store = SpillStore::open(None).expect("open");
        let mut refs = Vec::new();
        for len in [0usize, 5, 127, 128, 300, 20_000, 3] {
            let at = store
                .append_with(|buf| {
                    buf.extend((0..len).map(|i| (i % 251) as u8));
                    Ok(())
                })
                .expect("append");
            refs.push((at, len));
        }
        let failed = store.append_with(|buf| {
            buf.extend_from_slice(&[1; 50]);
            Err(SpillError::Encode("no".into()))
        });
        assert!(failed.is_err());
        let last = store
            .append_with(|buf| {
                buf.extend_from_slice(b"after");
                Ok(())
            })
            .expect("append");
        let mut out = Vec::new();
        for (i, &(at, len)) in refs.iter().enumerate() {
            store.read(at, &i, &mut out).expect("read");
            assert_eq!(out, (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        }
        store.flush().expect("flush");
        store.read(last, &"last", &mut out).expect("read");
        assert_eq!(out, b"after");
        for (i, &(at, len)) in refs.iter().enumerate() {
            store.read(at, &i, &mut out).expect("read");
            assert_eq!(out.len(), len);
        }
        assert_eq!(store.stats().records, 8);
    }

    #[test]
    fn blocks_read_in_order() {
        let mut store = SpillStore::open(None).expect("open");
        let refs: Vec<_> = (0..2000u32)
            .map(|i| store.append(format!("r{i}").as_bytes()).expect("append"))
            .collect();
        store.flush().expect("flush");
        let mut seen = Vec::new();
        let mut block = Vec::new();
        for b in 0..store.stats().blocks as u32 {
            store.read_block(b, &mut block).expect("block");
            for (pos, bytes) in block_records(&block) {
                seen.push((RecordRef::new(b, pos), bytes.to_vec()));
            }
        }
        assert_eq!(seen.len(), 2000);
        for (i, (at, bytes)) in seen.iter().enumerate() {
            assert_eq!(*at, refs[i]);
            assert_eq!(bytes, format!("r{i}").as_bytes());
        }
    }

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

    #[test]
    fn corrupt_record_in_an_older_segment_names_its_file() {
        let mut store = SpillStore::open(None).expect("open");
        store.set_segment_bytes(8 << 10);
        let first = store.append(&[5u8; 300]).expect("append");
        for i in 0..1_000u32 {
            store
                .append(format!("filler-{i}").as_bytes())
                .expect("append");
        }
        store.flush().expect("flush");
        let old = store.path_of(first).to_owned();
        assert_ne!(old, store.path());
        let mut bytes = std::fs::read(&old).expect("read");
        bytes[HEADER + 10] ^= 0xff;
        std::fs::write(&old, &bytes).expect("write");
        let err = store
            .read(first, &"user-1", &mut Vec::new())
            .expect_err("corrupt");
        let text = err.to_string();
        assert!(text.contains(&*old.to_string_lossy()), "{text}");
        assert!(text.contains("\"user-1\""), "{text}");
    }

    #[test]
    fn auto_probes_back_off_while_compression_does_not_pay() {
        // Writes at 0.3 ns/byte, LZ4 at 4 ns/byte saving half: compression does not pay.
        let mut m = CostModel::default();
        let mut probes = 0;
        for block in 0..10_000 {
            if m.should_compress() {
                probes += 1;
                m.lz4_ns = Some(4.0);
                m.saved = 0.5;
                m.probed();
            }
            if block == 64 {
                m.write_ns = Some(0.3);
            }
        }
        // 32 blocks apart at first, then 64, 128, ... 1024: a few dozen, not 10 000 / 32.
        assert!((10..=40).contains(&probes), "{probes} probes");
        // The disk turns slow (20 ns/byte): the very next block is compressed.
        m.write_ns = Some(20.0);
        assert!(m.should_compress());
        m.probed();
        assert_eq!(m.interval, PROBE_EVERY);
    }

    #[test]
    fn records_of_every_small_length() {
        let mut store = SpillStore::open(None).expect("open");
        let record = |len: usize| (0..len).map(|i| (i * 7 + len) as u8).collect::<Vec<u8>>();
        let refs: Vec<_> = (0..=200)
            .map(|len| (len, store.append(&record(len)).expect("append")))
            .collect();
        let mut out = Vec::new();
        for &(len, at) in &refs {
            store.read(at, &len, &mut out).expect("from the buffer");
            assert_eq!(out, record(len), "length {len}");
        }
        store.flush().expect("flush");
        for &(len, at) in &refs {
            store.read(at, &len, &mut out).expect("from the file");
            assert_eq!(out, record(len), "length {len}");
        }
    }

    #[test]
    fn blocks_being_written_read_back() {
        // Several write buffers' worth: the writer thread holds some while they are read.
        let mut store = SpillStore::open(None).expect("open");
        let record = |i: u32| format!("record-{i}-{}", "x".repeat((i % 40) as usize));
        let refs: Vec<_> = (0..60_000u32)
            .map(|i| store.append(record(i).as_bytes()).expect("append"))
            .collect();
        assert!(store.flushed > 2 * WRITE_BUFFER as u64, "{}", store.flushed);
        let mut out = Vec::new();
        // Oldest first (written or in flight), then the newest (in the buffer), then back.
        for i in [0u32, 1, 30_000, 59_999, 45_000, 2] {
            store.read(refs[i as usize], &i, &mut out).expect("read");
            assert_eq!(out, record(i).as_bytes());
        }
        store.flush().expect("flush");
        let on_disk = std::fs::metadata(store.path()).expect("log").len();
        assert_eq!(on_disk, store.stats().stored_bytes);
        // Every block in the file carries its checksum: all read back and check.
        let mut block = Vec::new();
        let mut seen = 0;
        for b in 0..store.stats().blocks as u32 {
            store.read_block(b, &mut block).expect("checked block");
            seen += block_records(&block).count();
        }
        assert_eq!(seen, 60_000);
    }

    #[test]
    fn checksums_filled_in_for_each_block() {
        let mut buffer = Vec::new();
        let mut expected = Vec::new();
        for payload in [&b"abc"[..], &[7u8; 300][..], &[][..]] {
            let raw = (payload.len() as u32 + 1).to_le_bytes();
            buffer.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buffer.extend_from_slice(&raw);
            buffer.extend_from_slice(&[0; 4]);
            buffer.extend_from_slice(payload);
            expected.push(crc32c::crc32c_append(crc32c::crc32c(&raw), payload));
        }
        // A truncated header at the end is left alone.
        buffer.extend_from_slice(&[1, 2, 3]);
        checksum_blocks(&mut buffer);
        let mut at = 0;
        for crc in expected {
            let stored = u32::from_le_bytes(buffer[at..at + 4].try_into().expect("4 bytes"));
            let got = u32::from_le_bytes(buffer[at + 8..at + 12].try_into().expect("4 bytes"));
            assert_eq!(got, crc);
            at += HEADER + stored as usize;
        }
        assert_eq!(&buffer[at..], &[1, 2, 3]);
    }

    #[test]
    fn varint_round_trip() {
        for n in [0u64, 1, 127, 128, 300, 1 << 20, u64::from(u32::MAX)] {
            let mut v = vec![9];
            put_varint(&mut v, n);
            assert_eq!(get_varint(&v, 1), Some((n, v.len() - 1)));
        }
        assert_eq!(get_varint(&[0x80, 0x80], 0), None);
    }
}
