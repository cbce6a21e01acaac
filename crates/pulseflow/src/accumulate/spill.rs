//! The spill store: a checksummed append-only segment log of compressed records.
//!
//! Each record is `stored_len: u32 | raw_len: u32 | crc32c: u32 | payload`, little-endian.
//! The payload is the raw bytes compressed with LZ4 when that makes them smaller, the raw bytes
//! otherwise (`stored_len == raw_len`). The checksum covers `raw_len` and the payload. Records
//! are buffered and written in large appends; a read of a record still in the buffer costs no
//! I/O. The directory is temporary (removed when the store is dropped) unless one is given.
//!
//! Why a segment log and not an embedded key-value store: spilled state is written once per
//! eviction and read at most once per reload, never updated in place, and the stage already
//! keeps the index of spilled keys in memory. An append is a `memcpy` into a buffer; a B-tree
//! or LSM store adds its own index, write-ahead log and compaction for nothing (see
//! BENCHMARKS.md, "accumulate").
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
use std::path::{Path, PathBuf};

/// Bytes buffered before they are appended to the file.
const WRITE_BUFFER: usize = 256 << 10;
/// Records smaller than this are stored raw: LZ4 cannot win on them and costs a hash table
/// reset per call.
const MIN_COMPRESS: usize = 256;
/// Record header size.
const HEADER: usize = 12;
/// Largest record accepted (a corrupt length field must not make us allocate gigabytes).
const MAX_RECORD: usize = 256 << 20;

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

/// Where a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    offset: u64,
    len: u32,
}

impl RecordRef {
    /// Offset of the record in the log.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Stored size of the record, header included.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the record is empty (never: a record has a header).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Figures of a spill store.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpillStats {
    /// Records written.
    pub records: u64,
    /// Records read back.
    pub reads: u64,
    /// Bytes before compression.
    pub raw_bytes: u64,
    /// Bytes written (headers included).
    pub stored_bytes: u64,
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

/// An append-only log of checksummed, compressed records.
pub struct SpillStore {
    dir: Dir,
    path: PathBuf,
    file: File,
    /// Bytes already in the file.
    flushed: u64,
    buffer: Vec<u8>,
    scratch: Vec<u8>,
    stats: SpillStats,
}

impl Debug for SpillStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillStore")
            .field("path", &self.path)
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
        let file = tempfile::Builder::new()
            .prefix("segment-")
            .suffix(".log")
            .tempfile_in(dir.path())
            .map_err(io(dir.path()))?;
        // The log lives as long as the store (writes go to its end, reads are positioned);
        // a temporary directory goes with the store.
        let (file, path) = file.keep().map_err(|e| SpillError::Io {
            path: dir.path().to_owned(),
            source: e.error,
        })?;
        Ok(Self {
            dir,
            path,
            file,
            flushed: 0,
            buffer: Vec::with_capacity(WRITE_BUFFER),
            scratch: Vec::new(),
            stats: SpillStats::default(),
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory holding the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The figures so far.
    pub fn stats(&self) -> SpillStats {
        self.stats
    }

    /// Appends a record (compressed when that helps) and says where it is.
    pub fn append(&mut self, raw: &[u8]) -> Result<RecordRef, SpillError> {
        if raw.len() > MAX_RECORD {
            return Err(SpillError::Encode(format!(
                "state of {} bytes exceeds the {MAX_RECORD}-byte record limit",
                raw.len()
            )));
        }
        let payload = if raw.len() < MIN_COMPRESS {
            raw
        } else {
            self.scratch
                .resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
            match lz4_flex::block::compress_into(raw, &mut self.scratch) {
                Ok(n) if n < raw.len() => &self.scratch[..n],
                _ => raw,
            }
        };
        let raw_len = (raw.len() as u32).to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&raw_len), payload);
        let offset = self.flushed + self.buffer.len() as u64;
        self.buffer
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buffer.extend_from_slice(&raw_len);
        self.buffer.extend_from_slice(&crc.to_le_bytes());
        self.buffer.extend_from_slice(payload);
        let len = (HEADER + payload.len()) as u32;
        self.stats.records += 1;
        self.stats.raw_bytes += raw.len() as u64;
        self.stats.stored_bytes += u64::from(len);
        if self.buffer.len() >= WRITE_BUFFER {
            self.flush()?;
        }
        Ok(RecordRef { offset, len })
    }

    /// Writes buffered records to the file.
    pub fn flush(&mut self) -> Result<(), SpillError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.buffer).map_err(io(&self.path))?;
        self.flushed += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Reads a record back into `out` (replacing its contents), checking its checksum. `key`
    /// names the record in errors.
    pub fn read(
        &mut self,
        at: RecordRef,
        key: &dyn Debug,
        out: &mut Vec<u8>,
    ) -> Result<(), SpillError> {
        let corrupt = |reason: String| SpillError::Corrupt {
            key: format!("{key:?}"),
            path: self.path.clone(),
            offset: at.offset,
            reason,
        };
        let len = at.len as usize;
        if len < HEADER {
            return Err(corrupt(format!("record length {len} below header size")));
        }
        let mut record = std::mem::take(&mut self.scratch);
        record.resize(len, 0);
        if at.offset >= self.flushed {
            let start = (at.offset - self.flushed) as usize;
            match self.buffer.get(start..start + len) {
                Some(bytes) => record.copy_from_slice(bytes),
                None => return Err(corrupt("record beyond the end of the log".into())),
            }
        } else {
            read_at(&self.file, &mut record, at.offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    corrupt("record truncated".into())
                } else {
                    SpillError::Io {
                        path: self.path.clone(),
                        source: e,
                    }
                }
            })?;
        }
        let word =
            |i: usize| u32::from_le_bytes([record[i], record[i + 1], record[i + 2], record[i + 3]]);
        let (stored, raw_len, crc) = (word(0) as usize, word(4) as usize, word(8));
        let result = if stored + HEADER != len {
            Err(corrupt(format!(
                "stored length {stored} does not match the index ({})",
                len - HEADER
            )))
        } else if crc32c::crc32c_append(crc32c::crc32c(&record[4..8]), &record[HEADER..]) != crc {
            Err(corrupt("checksum mismatch".into()))
        } else if raw_len > MAX_RECORD || stored > raw_len {
            Err(corrupt(format!("implausible raw length {raw_len}")))
        } else if stored == raw_len {
            out.clear();
            out.extend_from_slice(&record[HEADER..]);
            Ok(())
        } else {
            out.clear();
            out.resize(raw_len, 0);
            match lz4_flex::block::decompress_into(&record[HEADER..], out) {
                Ok(n) if n == raw_len => Ok(()),
                Ok(n) => Err(corrupt(format!(
                    "decompressed {n} bytes, expected {raw_len}"
                ))),
                Err(e) => Err(corrupt(format!("lz4: {e}"))),
            }
        };
        self.scratch = record;
        if result.is_ok() {
            self.stats.reads += 1;
        }
        result
    }
}

impl Drop for SpillStore {
    fn drop(&mut self) {
        if matches!(self.dir, Dir::Kept(_)) {
            // Only the log goes; a directory given by the user stays.
            let _ = std::fs::remove_file(&self.path);
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
        let text = err.to_string();
        assert!(text.contains("\"user-7\""), "{text}");
        assert!(text.contains("segment-"), "{text}");
        assert!(text.contains("checksum"), "{text}");
    }
}
