//! Sources that read lines: files (a path or glob, one after the other) and stdin. Lines are
//! read with a length limit; an over-long line is not kept whole but handed on marked, so the
//! decoding stage dead-letters it with its file and line number.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pulseflow::envelope::Cost;
use pulseflow::prelude::*;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use crate::config::Format;

/// Bytes of raw text kept from an over-long line, for its dead letter.
const KEPT_OF_LONG_LINE: usize = 256;

/// One line of input, not yet decoded.
#[derive(Debug, Clone)]
pub struct RawLine {
    /// The file it came from (`-` for stdin).
    pub origin: Arc<str>,
    /// Its line number, from 1.
    pub line: u64,
    /// The text (the start of it, for an over-long line).
    pub text: String,
    /// Why it cannot be decoded, found while reading.
    pub problem: Option<String>,
    /// CSV: the field names from the file's first line.
    pub headers: Option<Arc<Vec<String>>>,
}

/// Where lines come from.
pub enum Input {
    /// A file.
    Path(PathBuf),
    /// Standard input.
    Stdin,
}

/// Reads lines from its inputs in turn.
pub struct LineSource {
    inputs: VecDeque<Input>,
    pattern: Option<String>,
    current: Option<(Box<dyn AsyncBufRead + Unpin + Send>, Arc<str>)>,
    format: Format,
    max_line_bytes: usize,
    line: u64,
    headers: Option<Arc<Vec<String>>>,
    buf: Vec<u8>,
    progress: Arc<AtomicU64>,
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
        Self {
            inputs: inputs.into(),
            pattern,
            current: None,
            format,
            max_line_bytes: max_line_bytes.max(1),
            line: 0,
            headers: None,
            buf: Vec::new(),
            progress,
        }
    }

    async fn open_next(&mut self) -> Result<bool, StageError> {
        let Some(input) = self.inputs.pop_front() else {
            return Ok(false);
        };
        let (reader, origin): (Box<dyn AsyncBufRead + Unpin + Send>, Arc<str>) = match input {
            Input::Path(p) => {
                let file = tokio::fs::File::open(&p)
                    .await
                    .map_err(|e| StageError::msg(format!("cannot open {}: {e}", p.display())))?;
                (
                    Box::new(BufReader::with_capacity(256 << 10, file)),
                    Arc::from(p.display().to_string()),
                )
            }
            Input::Stdin => (
                Box::new(BufReader::with_capacity(256 << 10, tokio::io::stdin())),
                Arc::from("-"),
            ),
        };
        self.current = Some((reader, origin));
        self.line = 0;
        self.headers = None;
        Ok(true)
    }

    /// Reads the next line into `self.buf`; returns (found, too long, bytes consumed).
    async fn read_line(&mut self) -> Result<Option<(bool, u64)>, StageError> {
        let max = self.max_line_bytes;
        let Some((reader, origin)) = self.current.as_mut() else {
            return Ok(None);
        };
        self.buf.clear();
        let mut too_long = false;
        let mut consumed = 0u64;
        loop {
            let available = reader
                .fill_buf()
                .await
                .map_err(|e| StageError::msg(format!("cannot read {origin}: {e}")))?;
            if available.is_empty() {
                return Ok((consumed > 0).then_some((too_long, consumed)));
            }
            let (chunk, used, done) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            let room = max.saturating_sub(self.buf.len());
            if chunk.len() > room {
                too_long = true;
                let keep = KEPT_OF_LONG_LINE
                    .saturating_sub(self.buf.len())
                    .min(chunk.len());
                if self.buf.len() < KEPT_OF_LONG_LINE {
                    self.buf.extend_from_slice(&chunk[..keep]);
                }
            } else if !too_long {
                self.buf.extend_from_slice(chunk);
            }
            reader.consume(used);
            consumed += used as u64;
            if done {
                return Ok(Some((too_long, consumed)));
            }
        }
    }
}

impl Source for LineSource {
    type Item = RawLine;

    async fn init(&mut self, _ctx: &StageContext) -> Result<(), StageError> {
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
        let mut bytes = 0u64;
        let status = loop {
            if out.is_full() {
                break SourceStatus::More;
            }
            if self.current.is_none() && !self.open_next().await? {
                break SourceStatus::Done;
            }
            match self.read_line().await? {
                None => {
                    self.current = None;
                    // Give what we have before opening the next file.
                    if !out.is_empty() {
                        break SourceStatus::More;
                    }
                }
                Some((too_long, consumed)) => {
                    bytes += consumed;
                    self.line += 1;
                    if self.buf.last() == Some(&b'\r') {
                        self.buf.pop();
                    }
                    let origin = self
                        .current
                        .as_ref()
                        .map(|(_, o)| o.clone())
                        .unwrap_or_else(|| Arc::from("-"));
                    let (text, mut problem) = match String::from_utf8(std::mem::take(&mut self.buf))
                    {
                        Ok(t) => (t, None),
                        Err(e) => (
                            String::from_utf8_lossy(e.as_bytes()).into_owned(),
                            Some("invalid UTF-8".to_owned()),
                        ),
                    };
                    if too_long {
                        problem = Some(format!("line longer than {} bytes", self.max_line_bytes));
                    }
                    if self.format != Format::Lines && problem.is_none() && text.trim().is_empty() {
                        continue;
                    }
                    if self.format == Format::Csv && self.headers.is_none() && problem.is_none() {
                        match crate::components::csv::split(&text) {
                            Ok(h) => {
                                self.headers = Some(Arc::new(h));
                                continue;
                            }
                            Err(e) => problem = Some(format!("invalid CSV header: {e}")),
                        }
                    }
                    let cost = Cost {
                        bytes: consumed.min(u32::MAX as u64) as u32,
                        ..Cost::default()
                    };
                    out.push_with_cost(
                        RawLine {
                            origin,
                            line: self.line,
                            text,
                            problem,
                            headers: self.headers.clone(),
                        },
                        cost,
                    );
                }
            }
        };
        self.progress.fetch_add(bytes, Ordering::Relaxed);
        Ok(status)
    }
}
