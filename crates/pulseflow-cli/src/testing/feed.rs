//! The components a test puts in place of a config's own: a source that hands out the test's
//! inputs at their simulated times, and a sink that keeps what reaches it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use jaq_json::Val;
use parking_lot::Mutex;
use pulseflow::builder::SinkHandle;
use pulseflow::prelude::*;
use pulseflow::stage::WriteProgress;
use tokio::time::Instant;

use crate::build::BuildContext;
use crate::components::sources::LineSettings;
use crate::components::sources::lines::RawLine;
use crate::components::{SinkComponent, SourceComponent};

/// Where test inputs come from in [`RawLine`]s.
const ORIGIN: &str = "test input";

/// Items handed out at a simulated time.
struct Timed<T> {
    at: Duration,
    items: std::vec::IntoIter<T>,
}

/// A source of batches of items, each at its time from the start, that then stays open until
/// `until` (when set).
pub struct Feed<T> {
    batches: VecDeque<Timed<T>>,
    until: Option<Duration>,
    start: Option<Instant>,
}

impl<T> Feed<T> {
    /// Batches of `(time, items)`, in time order, open until `until`.
    pub fn new(mut batches: Vec<(Duration, Vec<T>)>, until: Option<Duration>) -> Self {
        batches.sort_by_key(|(at, _)| *at);
        Self {
            batches: batches
                .into_iter()
                .map(|(at, items)| Timed {
                    at,
                    items: items.into_iter(),
                })
                .collect(),
            until,
            start: None,
        }
    }
}

impl<T: Send + 'static> Source for Feed<T> {
    type Item = T;

    async fn produce(&mut self, out: &mut SourceOutput<T>) -> Result<SourceStatus, StageError> {
        let start = *self.start.get_or_insert_with(Instant::now);
        while let Some(front) = self.batches.front_mut() {
            let due = start + front.at;
            if Instant::now() < due {
                if !out.is_empty() {
                    return Ok(SourceStatus::More);
                }
                tokio::time::sleep_until(due).await;
            }
            out.extend_from(&mut front.items);
            if front.items.len() > 0 {
                return Ok(SourceStatus::More);
            }
            self.batches.pop_front();
        }
        if let Some(until) = self.until {
            if !out.is_empty() {
                return Ok(SourceStatus::More);
            }
            tokio::time::sleep_until(start + until).await;
        }
        Ok(SourceStatus::Done)
    }
}

/// What a test source hands out.
pub enum Fed {
    /// Values, leaving the source as its items.
    Items(Vec<(Duration, Vec<Val>)>),
    /// Lines, decoded as the replaced source decodes them.
    Lines(LineSettings, Vec<(Duration, Vec<RawLine>)>),
}

/// A source in place of a config's source (or feeding a transform).
pub struct TestSource {
    /// What it hands out.
    pub fed: Mutex<Option<Fed>>,
    /// How long it stays open.
    pub until: Option<Duration>,
}

impl TestSource {
    /// Lines of one input as [`RawLine`]s: numbered from 1; with CSV the first line names the
    /// fields of the others.
    pub fn lines(settings: &LineSettings, lines: &[String]) -> Vec<RawLine> {
        let csv = settings.format == crate::components::sources::Format::Csv;
        let headers = csv
            .then(|| lines.first())
            .flatten()
            .and_then(|h| crate::components::sources::csv::split(h).ok())
            .map(Arc::new);
        lines
            .iter()
            .enumerate()
            .skip(usize::from(csv))
            .map(|(i, text)| RawLine {
                origin: ORIGIN,
                line: i as u64 + 1,
                text: text.clone(),
                problem: (text.len() > settings.max_line_bytes)
                    .then(|| format!("line longer than {} bytes", settings.max_line_bytes)),
                headers: headers.clone(),
            })
            .collect()
    }
}

impl SourceComponent for TestSource {
    fn build(&self, cx: &mut BuildContext<'_>) -> Stream<Val> {
        match self.fed.lock().take() {
            Some(Fed::Lines(settings, batches)) => {
                settings.build(cx, Feed::new(batches, self.until), None)
            }
            Some(Fed::Items(batches)) => cx
                .builder
                .source(cx.name().to_owned(), Feed::new(batches, self.until)),
            None => cx.builder.source(
                cx.name().to_owned(),
                Feed::<Val>::new(Vec::new(), self.until),
            ),
        }
    }
}

/// Items kept by a [`Capture`], in arrival order.
pub type Captured = Arc<Mutex<Vec<Val>>>;

/// A sink that keeps what it receives.
pub struct CaptureSink(pub Captured);

impl SinkComponent for CaptureSink {
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> SinkHandle {
        input.sink(cx.name().to_owned(), Capture(self.0.clone()))
    }
}

/// Keeps every item.
struct Capture(Captured);

impl Sink for Capture {
    type Item = Val;

    async fn write(&mut self, item: Envelope<Val>) -> Result<(), ItemFailure<Val>> {
        self.0.lock().push(item.payload);
        Ok(())
    }

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<Val>>,
        _failed: &mut Vec<ItemFailure<Val>>,
        progress: &mut WriteProgress,
    ) {
        let mut kept = self.0.lock();
        for item in items {
            progress.current_seq = item.seq;
            kept.push(item.payload);
            progress.delivered += 1;
        }
    }
}
