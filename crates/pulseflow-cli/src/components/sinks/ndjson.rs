//! What the `stdout` and `file` sinks share: items written as one JSON value per line.
//!
//! Items reach `stdout` and `file` as text: each sink has an [`Encode`] stage in front of it
//! (`x.encode`), which turns an item into its JSON line on the workers of the stage before it
//! when those are parallel (see [`encoded`]), where the item was just built and is
//! still in cache. The sink copies a batch's lines into one buffer and hands it to a writer
//! thread at once, then waits until the thread has written it: only then are the batch's items
//! delivered. A failed write fails every item of the buffer, under the sink's error policy (a
//! retry opens the file again, appending).

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
    /// The items whose lines are in `buf`, until they are written.
    pending: Vec<Envelope<Line>>,
}

enum Target {
    Stdout,
    File {
        path: PathBuf,
        append: bool,
        /// Make every write durable (`fsync`) before its items count as delivered.
        fsync: bool,
    },
}

impl NdjsonSink {
    fn new(target: Target) -> Self {
        Self {
            target,
            out: None,
            buf: Vec::with_capacity(BUFFER),
            pending: Vec::new(),
        }
    }

    /// Writes to standard output.
    pub fn stdout() -> Self {
        Self::new(Target::Stdout)
    }

    /// Writes to `path` (truncated unless `append`; with `fsync`, every write is made durable
    /// before its items count as delivered).
    pub fn file(path: PathBuf, append: bool, fsync: bool) -> Self {
        Self::new(Target::File {
            path,
            append,
            fsync,
        })
    }

    /// Starts the writer; `reopen` (after a failed write) appends to a file whatever the
    /// settings say, so that what was written before stays.
    async fn open(&self, reopen: bool) -> Result<Writer, StageError> {
        let (out, name, sync): (Box<dyn std::io::Write + Send>, String, _) = match &self.target {
            Target::Stdout => (Box::new(std::io::stdout()), "standard output".into(), None),
            Target::File {
                path,
                append,
                fsync,
            } => {
                let append = *append || reopen;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    tokio::fs::create_dir_all(dir).await.map_err(|e| {
                        StageError::msg(format!("cannot create {}: {e}", dir.display()))
                    })?;
                }
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(append)
                    .truncate(!append)
                    .open(path)
                    .await
                    .map_err(|e| StageError::msg(format!("cannot open {}: {e}", path.display())))?
                    .into_std()
                    .await;
                let sync = match fsync {
                    true => Some(file.try_clone().map_err(|e| {
                        StageError::msg(format!("cannot open {}: {e}", path.display()))
                    })?),
                    false => None,
                };
                (Box::new(file), path.display().to_string(), sync)
            }
        };
        Writer::start(out, name, sync)
    }

    /// Writes the lines of the pending items and waits until they are written: `Ok` with how
    /// many, or the error (the pending items are still there).
    async fn write_pending(&mut self) -> Result<u64, StageError> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        if self.out.is_none() {
            self.out = Some(self.open(true).await?);
        }
        let Some(out) = self.out.as_mut() else {
            return Err(StageError::msg("sink not initialised"));
        };
        let full = std::mem::take(&mut self.buf);
        let written = match out.send(full).await {
            Ok((spare, ticket)) => {
                self.buf = spare;
                out.written(ticket).await
            }
            Err(e) => Err(e),
        };
        if self.buf.capacity() == 0 {
            self.buf.reserve(BUFFER);
        }
        match written {
            Ok(()) => {
                let n = self.pending.len() as u64;
                self.pending.clear();
                Ok(n)
            }
            Err(e) => {
                // The thread stopped at its first error: the next write starts another.
                self.out = None;
                self.buf.clear();
                Err(e)
            }
        }
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
        out.push(item.map(|value| {
            // Its map may serve the next object built on this worker.
            crate::json::recycle(value);
            Line(text)
        }));
        Ok(())
    }

    fn is_stateless(&self) -> bool {
        true
    }
}

impl Sink for NdjsonSink {
    type Item = Line;

    async fn init(&mut self, _ctx: &StageContext) -> Result<(), StageError> {
        self.out = Some(self.open(false).await?);
        Ok(())
    }

    async fn write(&mut self, item: Envelope<Line>) -> Result<(), ItemFailure<Line>> {
        self.buf.extend_from_slice(&item.payload.0);
        self.pending.push(item);
        match self.write_pending().await {
            Ok(_) => Ok(()),
            Err(e) => match self.pending.pop() {
                Some(item) => Err(ItemFailure::new(item, e)),
                None => Ok(()),
            },
        }
    }

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<Line>>,
        failed: &mut Vec<ItemFailure<Line>>,
        progress: &mut WriteProgress,
    ) {
        for item in items {
            progress.current_seq = item.seq;
            self.buf.extend_from_slice(&item.payload.0);
            self.pending.push(item);
        }
        match self.write_pending().await {
            Ok(n) => progress.delivered += n,
            Err(e) => {
                let why = e.to_string();
                failed.extend(
                    self.pending
                        .drain(..)
                        .map(|item| ItemFailure::new(item, StageError::msg(why.clone()))),
                );
            }
        }
    }

    async fn close(&mut self) -> Result<(), StageError> {
        match self.out.as_mut() {
            Some(out) => out.close().await,
            None => Ok(()),
        }
    }
}
