//! What the `stdout` and `file` sinks share: items written as one JSON value per line.
//!
//! Items reach `stdout` and `file` as text: each sink has an [`Encode`] stage in front of it
//! (`x.encode`), which turns an item into its JSON line on the workers of the stage before it
//! when those are parallel (see [`encoded`]), where the item was just built and is
//! still in cache. The sink copies a batch's lines into one buffer and hands it to a writer
//! thread at once.

use std::path::PathBuf;

use jaq_json::Val;
use pulseflow::builder::SinkHandle;
use pulseflow::prelude::*;
use pulseflow::stage::WriteProgress;

use super::writer::Writer;
use crate::build::BuildContext;

/// Adds sink `x` writing `sink`'s lines after `input`, with the stage `x.encode` that makes
/// them: on the same workers as the stage before it when those are several (the engine then
/// chains it behind each of them, see [`BuildContext::chain`]).
pub fn encoded(cx: &mut BuildContext<'_>, input: Stream<Val>, sink: NdjsonSink) -> SinkHandle {
    let s = input.transform_with(cx.stage("encode"), || Encode);
    let s = match cx.input_workers {
        Some(h) => s.parallelism(h).ordered(),
        None => s,
    };
    s.sink(cx.name().to_owned(), sink)
}

/// Room made for a batch's text up front.
const BUFFER: usize = 64 << 10;

/// Writes items as JSON lines to a file or stdout.
pub struct NdjsonSink {
    target: Target,
    out: Option<Writer>,
    buf: Vec<u8>,
}

enum Target {
    Stdout,
    File { path: PathBuf, append: bool },
}

impl NdjsonSink {
    /// Writes to standard output.
    pub fn stdout() -> Self {
        Self {
            target: Target::Stdout,
            out: None,
            buf: Vec::with_capacity(BUFFER),
        }
    }

    /// Writes to `path` (truncated unless `append`).
    pub fn file(path: PathBuf, append: bool) -> Self {
        Self {
            target: Target::File { path, append },
            out: None,
            buf: Vec::with_capacity(BUFFER),
        }
    }

    fn append(&mut self, line: &Line) {
        self.buf.extend_from_slice(&line.0);
    }
}

/// One item as a line of JSON text, newline included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line(pub Vec<u8>);

/// Turns items into their JSON lines for a `stdout` or `file` sink.
#[derive(Clone, Copy)]
pub struct Encode;

impl Transform for Encode {
    type In = Val;
    type Out = Line;

    fn process(
        &mut self,
        item: Envelope<Val>,
        out: &mut Vec<Envelope<Line>>,
    ) -> Result<(), ItemFailure<Val>> {
        let mut text = Vec::with_capacity(64);
        crate::json::write_line(&mut text, &item.payload);
        out.push(item.map(|_| Line(text)));
        Ok(())
    }

    fn is_stateless(&self) -> bool {
        true
    }
}

impl Sink for NdjsonSink {
    type Item = Line;

    async fn init(&mut self, _ctx: &StageContext) -> Result<(), StageError> {
        let (out, name): (Box<dyn std::io::Write + Send>, String) = match &self.target {
            Target::Stdout => (Box::new(std::io::stdout()), "standard output".into()),
            Target::File { path, append } => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    tokio::fs::create_dir_all(dir).await.map_err(|e| {
                        StageError::msg(format!("cannot create {}: {e}", dir.display()))
                    })?;
                }
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(*append)
                    .truncate(!*append)
                    .open(path)
                    .await
                    .map_err(|e| StageError::msg(format!("cannot open {}: {e}", path.display())))?;
                (Box::new(file.into_std().await), path.display().to_string())
            }
        };
        self.out = Some(Writer::start(out, name)?);
        Ok(())
    }

    async fn write(&mut self, item: Envelope<Line>) -> Result<(), ItemFailure<Line>> {
        self.append(&item.payload);
        Ok(())
    }

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<Line>>,
        _failed: &mut Vec<ItemFailure<Line>>,
        progress: &mut WriteProgress,
    ) {
        for item in items {
            progress.current_seq = item.seq;
            self.append(&item.payload);
            progress.delivered += 1;
        }
    }

    async fn flush(&mut self) -> Result<(), StageError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(out) = self.out.as_mut() else {
            return Err(StageError::msg("sink not initialised"));
        };
        let full = std::mem::take(&mut self.buf);
        self.buf = out.send(full).await?;
        if self.buf.capacity() == 0 {
            self.buf.reserve(BUFFER);
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), StageError> {
        self.flush().await?;
        match self.out.as_mut() {
            Some(out) => out.close().await,
            None => Ok(()),
        }
    }
}
