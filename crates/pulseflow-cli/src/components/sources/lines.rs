//! Sources that read lines: files (a path or glob, one after the other) and stdin. Lines are
//! read with a length limit; an over-long line is not kept whole but handed on marked, so the
//! decoding stage dead-letters it with its file and line number.

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;

use pulseflow::ack::Ack;
use pulseflow::envelope::Cost;
use pulseflow::prelude::*;

use super::Format;
use super::checkpoint::{Checkpoints, Position};
use super::reader::ChunkReader;

/// Bytes of raw text kept from an over-long line, for its dead letter.
const KEPT_OF_LONG_LINE: usize = 256;

/// One line of input, not yet decoded.
#[derive(Debug, Clone)]
pub struct RawLine {
    /// The file it came from (`-` for stdin).
    pub origin: &'static str,
    /// Its line number, from 1.
    pub line: u64,
    /// The text (the start of it, for an over-long line).
    pub text: String,
    /// Why it cannot be decoded, found while reading.
    pub problem: Option<String>,
    /// CSV: the field names from the file's first line.
    pub headers: Option<Arc<Vec<String>>>,
}

/// The name of an input as shared text. Names are kept for the whole process (one copy per
/// distinct name): lines carry a plain reference, where a reference-counted name would be
/// counted up by the reading thread and down by the decoding one for every line.
fn origin_name(name: String) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock();
    if let Some(known) = names.get(name.as_str()) {
        return known;
    }
    let name: &'static str = Box::leak(name.into_boxed_str());
    names.insert(name);
    name
}

/// A line as cut from the input: its bytes (without the `\n`; only the start of an over-long
/// line) and how many bytes of input it took.
#[derive(Debug, PartialEq, Eq)]
struct Line<'a> {
    bytes: &'a [u8],
    too_long: bool,
    consumed: u64,
}

/// Cuts the chunks of an input into lines. A line that ends in a later chunk is kept here
/// until it does (at most `max` bytes of it, or [`KEPT_OF_LONG_LINE`] once it is longer).
#[derive(Debug)]
struct Splitter {
    max: usize,
    carry: Vec<u8>,
    /// Bytes of the carried line so far.
    carried: u64,
    too_long: bool,
}

impl Splitter {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            carry: Vec::new(),
            carried: 0,
            too_long: false,
        }
    }

    /// Hands `emit` each line that ends in `chunk`, in order, while it returns `true`, and
    /// keeps the start of a line that does not end there; returns how many bytes of `chunk`
    /// were used.
    fn split(&mut self, chunk: &[u8], mut emit: impl FnMut(Line<'_>) -> bool) -> usize {
        let mut used = 0;
        loop {
            let rest = &chunk[used..];
            let Some(end) = memchr::memchr(b'\n', rest) else {
                self.hold(rest);
                return chunk.len();
            };
            let segment = &rest[..end];
            used += end + 1;
            let more = if self.carried == 0 {
                let too_long = segment.len() > self.max;
                let bytes = if too_long {
                    &segment[..KEPT_OF_LONG_LINE.min(segment.len())]
                } else {
                    segment
                };
                emit(Line {
                    bytes,
                    too_long,
                    consumed: end as u64 + 1,
                })
            } else {
                self.hold(segment);
                let more = emit(Line {
                    bytes: &self.carry,
                    too_long: self.too_long,
                    consumed: self.carried + 1,
                });
                self.reset();
                more
            };
            if !more {
                return used;
            }
        }
    }

    /// The last line of an input that does not end with `\n`.
    fn finish(&mut self, emit: impl FnOnce(Line<'_>)) {
        if self.carried > 0 {
            emit(Line {
                bytes: &self.carry,
                too_long: self.too_long,
                consumed: self.carried,
            });
        }
        self.reset();
    }

    fn hold(&mut self, part: &[u8]) {
        self.carried += part.len() as u64;
        if self.too_long {
            return;
        }
        if self.carry.len() + part.len() > self.max {
            self.too_long = true;
            let keep = KEPT_OF_LONG_LINE
                .saturating_sub(self.carry.len())
                .min(part.len());
            self.carry.extend_from_slice(&part[..keep]);
            self.carry.truncate(KEPT_OF_LONG_LINE);
        } else {
            self.carry.extend_from_slice(part);
        }
    }

    fn reset(&mut self) {
        self.carry.clear();
        self.carried = 0;
        self.too_long = false;
    }
}

/// Where lines come from.
pub enum Input {
    /// A file.
    Path(PathBuf),
    /// Standard input.
    Stdin,
}

/// What turns the lines of the current input into items.
struct Lines {
    origin: &'static str,
    format: Format,
    max_line_bytes: usize,
    line: u64,
    /// Bytes of the current input before the next line.
    offset: u64,
    headers: Option<Arc<Vec<String>>>,
    /// With checkpoints: the current file's, and the batch its lines go into.
    acked: Option<Acked>,
}

/// The checkpoints of the file being read, and the ack of the current `produce` call's lines.
struct Acked {
    checkpoints: Arc<Checkpoints>,
    /// The file's index among the source's files.
    index: usize,
    ack: Option<Ack>,
}

impl Lines {
    /// Pushes `line` as an item, unless it is blank (JSON, CSV) or a CSV header.
    fn push(&mut self, line: Line<'_>, out: &mut SourceOutput<RawLine>) {
        let start = self.position();
        self.line += 1;
        self.offset += line.consumed;
        let mut bytes = line.bytes;
        if !line.too_long {
            if let [head @ .., b'\r'] = bytes {
                bytes = head;
            }
        }
        let (text, mut problem) = match std::str::from_utf8(bytes) {
            Ok(t) => (t.to_owned(), None),
            Err(_) => (
                String::from_utf8_lossy(bytes).into_owned(),
                Some("invalid UTF-8".to_owned()),
            ),
        };
        if line.too_long {
            problem = Some(format!("line longer than {} bytes", self.max_line_bytes));
        }
        if self.format != Format::Lines && problem.is_none() && text.trim().is_empty() {
            return;
        }
        if self.format == Format::Csv && self.headers.is_none() && problem.is_none() {
            match super::csv::split(&text) {
                Ok(h) => {
                    self.headers = Some(Arc::new(h));
                    return;
                }
                Err(e) => problem = Some(format!("invalid CSV header: {e}")),
            }
        }
        let cost = Cost {
            bytes: line.consumed.min(u32::MAX as u64) as u32,
            ..Cost::default()
        };
        let raw = RawLine {
            origin: self.origin,
            line: self.line,
            text,
            problem,
            headers: self.headers.clone(),
        };
        match &mut self.acked {
            None => out.push_with_cost(raw, cost),
            Some(a) => {
                let ack = a
                    .ack
                    .get_or_insert_with(|| a.checkpoints.track(a.index, start));
                out.push_acked_with_cost(raw, cost, ack.clone());
            }
        }
    }

    /// Where the next line starts.
    fn position(&self) -> Position {
        Position {
            offset: self.offset,
            line: self.line,
        }
    }

    /// Tells the checkpoints how far the current file is read (every line before is pushed,
    /// and so tracked, or needed no item).
    fn advance(&self) {
        if let Some(a) = &self.acked {
            a.checkpoints.advance(a.index, self.position());
        }
    }
}

/// Reads lines from its inputs in turn.
pub struct LineSource {
    inputs: VecDeque<Input>,
    pattern: Option<String>,
    reader: Option<ChunkReader>,
    splitter: Splitter,
    lines: Lines,
    progress: Arc<AtomicU64>,
    /// Checkpoints of the files, written every so often.
    checkpoints: Option<(Arc<Checkpoints>, Duration)>,
    /// Files opened so far.
    opened: usize,
}

impl LineSource {
    /// Lines of `inputs` (`pattern` names them in errors when there are none).
    pub fn new(
        inputs: Vec<Input>,
        pattern: Option<String>,
        format: Format,
        max_line_bytes: usize,
        progress: Arc<AtomicU64>,
    ) -> Self {
        let max_line_bytes = max_line_bytes.max(1);
        Self {
            inputs: inputs.into(),
            pattern,
            reader: None,
            splitter: Splitter::new(max_line_bytes),
            lines: Lines {
                origin: "-",
                format,
                max_line_bytes,
                line: 0,
                offset: 0,
                headers: None,
                acked: None,
            },
            progress,
            checkpoints: None,
            opened: 0,
        }
    }

    /// Resumes each file where `checkpoints` say the previous run left it, and keeps them
    /// (written every `interval` while they move).
    pub fn with_checkpoints(mut self, checkpoints: Arc<Checkpoints>, interval: Duration) -> Self {
        self.checkpoints = Some((checkpoints, interval));
        self
    }

    async fn open_next(&mut self) -> Result<bool, StageError> {
        // The input leaves the queue once open: this runs inside `produce`, whose future the
        // engine may drop at an await (batch timeout).
        let Some(input) = self.inputs.front() else {
            return Ok(false);
        };
        let mut start = Position::default();
        let mut headers = None;
        let (input, origin): (Box<dyn std::io::Read + Send>, String) = match input {
            Input::Path(p) => {
                let cannot = |e: std::io::Error| {
                    StageError::msg(format!("cannot open {}: {e}", p.display()))
                };
                let mut file = tokio::fs::File::open(p)
                    .await
                    .map_err(cannot)?
                    .into_std()
                    .await;
                if let Some((checkpoints, _)) = &self.checkpoints {
                    start = checkpoints.open(self.opened, p).map_err(cannot)?;
                    if start.offset > 0 {
                        // Resuming a CSV file: its field names are on its first line.
                        if self.lines.format == Format::Csv {
                            headers = csv_headers(p).map_err(cannot)?;
                        }
                        file.seek(SeekFrom::Start(start.offset)).map_err(cannot)?;
                        self.progress.fetch_add(start.offset, Ordering::Relaxed);
                    }
                }
                (Box::new(file), p.display().to_string())
            }
            Input::Stdin => (Box::new(std::io::stdin()), "-".to_owned()),
        };
        self.inputs.pop_front();
        let index = self.opened;
        self.opened += 1;
        let reader = ChunkReader::start(input)
            .map_err(|e| StageError::msg(format!("cannot start reading {origin}: {e}")))?;
        self.reader = Some(reader);
        self.lines.origin = origin_name(origin);
        self.lines.line = start.line;
        self.lines.offset = start.offset;
        self.lines.headers = headers;
        self.lines.acked = self.checkpoints.as_ref().map(|(c, _)| Acked {
            checkpoints: c.clone(),
            index,
            ack: None,
        });
        Ok(true)
    }
}

/// The field names on the first line of the CSV file at `path` (`None` when it has no line).
fn csv_headers(path: &Path) -> std::io::Result<Option<Arc<Vec<String>>>> {
    let mut first = String::new();
    std::io::BufReader::new(std::fs::File::open(path)?).read_line(&mut first)?;
    let first = first.trim_end_matches(['\n', '\r']);
    if first.is_empty() {
        return Ok(None);
    }
    super::csv::split(first)
        .map(|h| Some(Arc::new(h)))
        .map_err(|e| std::io::Error::other(format!("invalid CSV header: {e}")))
}

impl Source for LineSource {
    type Item = RawLine;

    async fn init(&mut self, _ctx: &StageContext) -> Result<(), StageError> {
        if let Some((checkpoints, interval)) = &self.checkpoints {
            checkpoints.keep_written(*interval);
        }
        if self.inputs.is_empty() {
            if let Some(p) = &self.pattern {
                return Err(StageError::msg(format!("no file matches `{p}`")));
            }
        }
        Ok(())
    }

    async fn produce(
        &mut self,
        out: &mut SourceOutput<RawLine>,
    ) -> Result<SourceStatus, StageError> {
        // Cancel-safe at each await (see `Source::produce`): every line split off is pushed
        // and its bytes counted before the next await.
        // Each call's lines form a batch of their own (one ack), for the checkpoints.
        if let Some(a) = &mut self.lines.acked {
            a.ack = None;
        }
        let status = loop {
            if out.is_full() {
                break SourceStatus::More;
            }
            if self.reader.is_none() && !self.open_next().await? {
                break SourceStatus::Done;
            }
            let Some(reader) = self.reader.as_mut() else {
                continue;
            };
            let available = reader
                .fill_buf()
                .await
                .map_err(|e| StageError::msg(format!("cannot read {}: {e}", self.lines.origin)))?;
            if available.is_empty() {
                self.splitter.finish(|line| self.lines.push(line, out));
                self.lines.advance();
                self.reader = None;
                // Give what we have before opening the next file.
                if !out.is_empty() {
                    break SourceStatus::More;
                }
                continue;
            }
            let used = self.splitter.split(available, |line| {
                self.lines.push(line, out);
                !out.is_full()
            });
            reader.consume(used);
            self.lines.advance();
            self.progress.fetch_add(used as u64, Ordering::Relaxed);
        };
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of `chunks` as (text, too long, consumed), taking at most `per_call` lines
    /// per call of `split` (as a full batch would).
    fn cut(max: usize, chunks: &[&[u8]], per_call: usize) -> Vec<(String, bool, u64)> {
        let mut splitter = Splitter::new(max);
        let mut lines = Vec::new();
        let mut record = |line: Line<'_>| {
            lines.push((
                String::from_utf8_lossy(line.bytes).into_owned(),
                line.too_long,
                line.consumed,
            ))
        };
        for chunk in chunks {
            let mut used = 0;
            while used < chunk.len() {
                let mut taken = 0;
                used += splitter.split(&chunk[used..], |line| {
                    record(line);
                    taken += 1;
                    taken < per_call
                });
            }
        }
        splitter.finish(&mut record);
        lines
    }

    #[test]
    fn lines_are_cut_at_newlines_across_chunks() {
        let want = vec![
            ("ab".to_owned(), false, 3),
            ("cdef".to_owned(), false, 5),
            (String::new(), false, 1),
            ("gh".to_owned(), false, 2),
        ];
        for per_call in [1, 2, 100] {
            assert_eq!(cut(10, &[b"ab\ncdef\n\ngh"], per_call), want);
            assert_eq!(cut(10, &[b"a", b"b\ncd", b"ef\n", b"\ngh"], per_call), want);
            assert_eq!(
                cut(10, &[b"ab\nc", b"d", b"e", b"f\n\n", b"gh"], per_call),
                want
            );
        }
        assert_eq!(cut(10, &[b"x\n"], 1), vec![("x".to_owned(), false, 2)]);
        assert_eq!(cut(10, &[], 1), Vec::new());
    }

    #[test]
    fn over_long_lines_keep_their_start_and_are_marked() {
        let long = "y".repeat(1000);
        let text = format!("short\n{long}\nnext\n");
        let start = "y".repeat(KEPT_OF_LONG_LINE);
        let want = vec![
            ("short".to_owned(), false, 6),
            (start, true, 1001),
            ("next".to_owned(), false, 5),
        ];
        assert_eq!(cut(500, &[text.as_bytes()], 100), want);
        let pieces: Vec<&[u8]> = text.as_bytes().chunks(7).collect();
        assert_eq!(cut(500, &pieces, 100), want);
        // Exactly at the limit is not too long.
        assert_eq!(cut(4, &[b"four\n"], 1), vec![("four".to_owned(), false, 5)]);
        assert_eq!(
            cut(4, &[b"fo", b"ur\n"], 1),
            vec![("four".to_owned(), false, 5)]
        );
        assert!(cut(4, &[b"fo", b"urs\n"], 1)[0].1);
    }
}
