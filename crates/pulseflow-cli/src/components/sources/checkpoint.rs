//! Checkpoints of a `file` source: for each file, the offset below which every line is
//! handled (delivered, filtered, dropped by a policy or dead-lettered), so that a rerun with
//! the same `data_dir` resumes there.
//!
//! The source attaches one acknowledgement to the lines of each batch it reads; a batch is
//! handled when its ack resolves. The handled offset of a file is its
//! [`Watermark`](pulseflow::ack::Watermark): the start of its oldest batch still in the
//! pipeline (or where reading got to when none is); a batch that failed (its stage failed,
//! the run was aborted) holds it back for good, so that a rerun reads that batch again. The
//! file is identified by its path and a checksum of its first bytes, so a rotated or replaced
//! file starts from its beginning.
//!
//! The checkpoint (`DATA_DIR/NAME.checkpoint.json`) is written atomically (a temporary file,
//! synced, then renamed over the old one) every `checkpoint_interval` while the offsets moved,
//! and once more when the run ends. After a crash, the lines read again are those handled
//! since the last write, plus those that were in the pipeline: at-least-once delivery.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use pulseflow::ack::{Ack, Watermark};
use serde::{Deserialize, Serialize};

/// Bytes at the start of a file its checksum covers.
const FINGERPRINT_BYTES: u64 = 1024;

/// Version of the file's format.
const VERSION: u32 = 1;

/// A place in a file: a byte offset and the number of lines before it (ordered by offset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// Bytes before it.
    pub offset: u64,
    /// Lines before it.
    pub line: u64,
}

/// What identifies a file's contents: a checksum of its first bytes (up to
/// [`FINGERPRINT_BYTES`]) and how many there were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// CRC-32C of the bytes.
    pub crc32c: u32,
    /// How many bytes (fewer than [`FINGERPRINT_BYTES`] for a short file).
    pub bytes: u64,
}

impl Fingerprint {
    /// The fingerprint of `path`'s first bytes, or of its first `bytes` (to compare with a
    /// fingerprint taken when the file was shorter).
    pub fn of(path: &Path, bytes: Option<u64>) -> std::io::Result<Self> {
        let mut start = Vec::new();
        std::fs::File::open(path)?
            .take(bytes.unwrap_or(FINGERPRINT_BYTES))
            .read_to_end(&mut start)?;
        Ok(Self {
            crc32c: crc32c::crc32c(&start),
            bytes: start.len() as u64,
        })
    }
}

/// One file as the checkpoint file records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    path: String,
    fingerprint: Fingerprint,
    handled: Position,
}

/// The checkpoint file.
#[derive(Debug, Serialize, Deserialize)]
struct SavedFile {
    version: u32,
    source: String,
    files: Vec<Saved>,
}

/// A file of the source, as this run knows it.
#[derive(Default)]
struct File {
    /// Its fingerprint, once opened.
    fingerprint: Option<Fingerprint>,
    /// Where the previous run left it (when the fingerprint matches).
    resume: Option<(Fingerprint, Position)>,
    /// How far it is handled, once opened.
    marks: Option<Watermark<Position>>,
}

/// The checkpoints of one `file` source.
pub struct Checkpoints {
    /// The checkpoint file.
    path: PathBuf,
    /// The source's name.
    source: String,
    /// Its files, in reading order, as the checkpoint names them (absolute paths).
    keys: Vec<String>,
    files: Mutex<Vec<File>>,
    /// Serialises writes (periodic and final).
    writing: Mutex<()>,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Why a checkpoint file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// It could not be read or written.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a checkpoint this version wrote.
    #[error("checkpoint {path} is corrupt: {reason} (move it away to start from the beginning)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Checkpoints {
    /// The checkpoint file of source `source` in `data_dir`.
    pub fn file_of(data_dir: &Path, source: &str) -> PathBuf {
        data_dir.join(format!("{source}.checkpoint.json"))
    }

    /// Loads the checkpoints of source `source` reading `paths`, from `data_dir` (none yet:
    /// every file from its start). A checkpoint that cannot be read is an error, never a
    /// silent restart from zero.
    pub fn load(data_dir: &Path, source: &str, paths: &[PathBuf]) -> Result<Self, CheckpointError> {
        let path = Self::file_of(data_dir, source);
        let saved = match std::fs::read(&path) {
            Ok(bytes) => {
                let saved: SavedFile =
                    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if saved.version != VERSION {
                    return Err(CheckpointError::Corrupt {
                        path,
                        reason: format!("version {} (expected {VERSION})", saved.version),
                    });
                }
                saved.files
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(CheckpointError::Io { path, source }),
        };
        // Absolute paths, so that the same file is found whatever the working directory.
        let keys: Vec<String> = paths
            .iter()
            .map(|p| {
                std::fs::canonicalize(p)
                    .unwrap_or_else(|_| p.clone())
                    .display()
                    .to_string()
            })
            .collect();
        let files = keys
            .iter()
            .map(|key| File {
                resume: saved
                    .iter()
                    .find(|s| &s.path == key)
                    .map(|s| (s.fingerprint, s.handled)),
                ..File::default()
            })
            .collect();
        Ok(Self {
            path,
            source: source.to_owned(),
            keys,
            files: Mutex::new(files),
            writing: Mutex::new(()),
        })
    }

    /// Checks that `data_dir` can hold checkpoints (creating it if needed).
    pub fn check_dir(data_dir: &Path) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: data_dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let probe = data_dir.join(".pulseflow-write-test");
        std::fs::write(&probe, b"").map_err(io)?;
        std::fs::remove_file(&probe).map_err(io)
    }

    /// Where to start reading file `index` (at `path`): where the previous run left it when
    /// the file is the same one (its first bytes unchanged), else at its start.
    pub fn open(&self, index: usize, path: &Path) -> std::io::Result<Position> {
        let now = Fingerprint::of(path, None)?;
        let mut files = self.files.lock();
        let Some(file) = files.get_mut(index) else {
            return Ok(Position::default());
        };
        let start = match file.resume {
            Some((then, at)) if then.bytes <= now.bytes => {
                let same = then == now || Fingerprint::of(path, Some(then.bytes))? == then;
                if same { at } else { Position::default() }
            }
            _ => Position::default(),
        };
        if start == Position::default() {
            file.resume = None;
        }
        file.fingerprint = Some(now);
        file.marks = Some(Watermark::new(start));
        Ok(start)
    }

    /// The ack for a batch of file `index` starting at `start`.
    pub fn track(&self, index: usize, start: Position) -> Ack {
        let files = self.files.lock();
        match files.get(index).and_then(|f| f.marks.as_ref()) {
            Some(marks) => marks.track(start),
            // Not opened through `open`: nothing to record.
            None => Ack::on_resolved(|_| {}),
        }
    }

    /// Reading file `index` got to `to`.
    pub fn advance(&self, index: usize, to: Position) {
        if let Some(marks) = self.files.lock().get(index).and_then(|f| f.marks.as_ref()) {
            marks.advance(to);
        }
    }

    /// Whether a file's handled offset may have moved since the last call.
    fn take_moved(&self) -> bool {
        let files = self.files.lock();
        let mut moved = false;
        // Every file's flag is taken (no short cut).
        for marks in files.iter().filter_map(|f| f.marks.as_ref()) {
            moved |= marks.take_moved();
        }
        moved
    }

    /// What the checkpoint file would say now.
    fn snapshot(&self) -> SavedFile {
        let files = self.files.lock();
        let saved = files
            .iter()
            .zip(&self.keys)
            .filter_map(|(f, key)| {
                let (fingerprint, handled) = match (f.fingerprint, &f.marks) {
                    (Some(fp), Some(marks)) => (fp, marks.handled()),
                    // Not opened in this run: what the previous run said still holds.
                    _ => f.resume?,
                };
                Some(Saved {
                    path: key.clone(),
                    fingerprint,
                    handled,
                })
            })
            .collect();
        SavedFile {
            version: VERSION,
            source: self.source.clone(),
            files: saved,
        }
    }

    /// Writes the checkpoint file atomically (temporary file, synced, renamed).
    pub fn write(&self) -> Result<(), CheckpointError> {
        let _one_at_a_time = self.writing.lock();
        let snapshot = self.snapshot();
        let io = |source| CheckpointError::Io {
            path: self.path.clone(),
            source,
        };
        let text =
            serde_json::to_vec_pretty(&snapshot).map_err(|e| io(std::io::Error::other(e)))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        tmp.write_all(&text).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        Ok(())
    }

    /// Writes the checkpoint every `interval` while offsets moved, until the checkpoints are
    /// dropped (the run is over: the final write is the caller's).
    pub fn keep_written(self: &Arc<Self>, interval: Duration) {
        let me: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                if me.take_moved() {
                    let writer = me.clone();
                    let written = tokio::task::spawn_blocking(move || writer.write()).await;
                    if let Ok(Err(e)) = written {
                        eprintln!("warning: {e}");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    const AT_4: Position = Position { offset: 4, line: 2 };
    const AT_8: Position = Position { offset: 8, line: 4 };

    #[test]
    fn the_handled_offset_waits_for_the_oldest_batch_and_survives_a_reload() {
        let dir = tempfile::tempdir().expect("dir");
        let a = file(dir.path(), "a.log", "1\n2\n3\n4\n");
        let paths = vec![a.clone()];
        let cp = Checkpoints::load(dir.path(), "src", &paths).expect("load");
        assert_eq!(cp.open(0, &a).expect("open"), Position::default());
        let first = cp.track(0, Position::default());
        let second = cp.track(0, AT_4);
        cp.advance(0, AT_8);
        // The second batch is handled first: nothing moves past the first.
        drop(second);
        cp.write().expect("write");
        let again = Checkpoints::load(dir.path(), "src", &paths).expect("reload");
        assert_eq!(again.open(0, &a).expect("open"), Position::default());
        drop(first);
        cp.write().expect("write");
        let again = Checkpoints::load(dir.path(), "src", &paths).expect("reload");
        assert_eq!(again.open(0, &a).expect("open"), AT_8);
    }

    #[test]
    fn a_file_not_read_in_this_run_keeps_its_checkpoint() {
        let dir = tempfile::tempdir().expect("dir");
        let a = file(dir.path(), "a.log", "1\n2\n3\n4\n");
        let b = file(dir.path(), "b.log", "5\n");
        let cp = Checkpoints::load(dir.path(), "src", std::slice::from_ref(&a)).expect("load");
        cp.open(0, &a).expect("open");
        cp.advance(0, AT_8);
        cp.write().expect("write");
        // Now two files; the run is stopped before it gets to `a`.
        let both = vec![b.clone(), a.clone()];
        let cp = Checkpoints::load(dir.path(), "src", &both).expect("reload");
        cp.open(0, &b).expect("open");
        cp.write().expect("write");
        let again = Checkpoints::load(dir.path(), "src", &both).expect("reload");
        assert_eq!(again.open(1, &a).expect("open"), AT_8);
    }

    #[test]
    fn a_replaced_file_starts_from_its_beginning() {
        let dir = tempfile::tempdir().expect("dir");
        let a = file(dir.path(), "a.log", "old 1\nold 2\n");
        let paths = vec![a.clone()];
        let cp = Checkpoints::load(dir.path(), "src", &paths).expect("load");
        cp.open(0, &a).expect("open");
        drop(cp.track(0, Position::default()));
        cp.advance(
            0,
            Position {
                offset: 12,
                line: 2,
            },
        );
        cp.write().expect("write");
        // Appended to: the same file, resumed.
        std::fs::write(&a, "old 1\nold 2\nnew 3\n").expect("append");
        let again = Checkpoints::load(dir.path(), "src", &paths).expect("reload");
        assert_eq!(again.open(0, &a).expect("open").offset, 12);
        // Replaced (rotated): from the start.
        std::fs::write(&a, "other\n").expect("replace");
        let again = Checkpoints::load(dir.path(), "src", &paths).expect("reload");
        assert_eq!(again.open(0, &a).expect("open"), Position::default());
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(Checkpoints::file_of(dir.path(), "src"), "{ not json").expect("write");
        let err = Checkpoints::load(dir.path(), "src", &[]).expect_err("corrupt");
        let text = err.to_string();
        assert!(text.contains("src.checkpoint.json"), "{text}");
        assert!(text.contains("corrupt"), "{text}");
    }
}
