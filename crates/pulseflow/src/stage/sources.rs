//! Ready-made sources.
//!
//! ```
//! use pulseflow::stage::sources;
//! let numbers = sources::iter(0u64..1000);
//! # let _ = numbers;
//! ```

use futures::{Stream, StreamExt};

use super::{Source, SourceOutput, SourceStatus};
use crate::error::StageError;

/// A source over an iterator, e.g. a range or a `Vec`.
pub struct IterSource<I> {
    /// `None` once exhausted. Taken out while a batch is filled: a local iterator keeps its
    /// state in registers, where one behind a reference is written back after every item.
    iter: Option<I>,
}

/// Makes a source from anything iterable.
pub fn iter<I>(items: I) -> IterSource<I::IntoIter>
where
    I: IntoIterator,
    I::IntoIter: Send + 'static,
    I::Item: Send + 'static,
{
    IterSource {
        iter: Some(items.into_iter()),
    }
}

impl<I> Source for IterSource<I>
where
    I: Iterator + Send + 'static,
    I::Item: Send + 'static,
{
    type Item = I::Item;

    async fn produce(
        &mut self,
        out: &mut SourceOutput<I::Item>,
    ) -> Result<SourceStatus, StageError> {
        let Some(mut iter) = self.iter.take() else {
            return Ok(SourceStatus::Done);
        };
        out.extend_from(&mut iter);
        if out.is_full() {
            self.iter = Some(iter);
            Ok(SourceStatus::More)
        } else {
            Ok(SourceStatus::Done)
        }
    }
}

/// A source over an async [`Stream`]. It waits for the first item of each batch and then takes
/// what is ready without waiting, so a slow stream does not hold items back.
pub struct StreamSource<S> {
    stream: S,
}

/// Makes a source from a [`Stream`].
pub fn stream<S>(stream: S) -> StreamSource<S>
where
    S: Stream + Unpin + Send + 'static,
    S::Item: Send + 'static,
{
    StreamSource { stream }
}

impl<S> Source for StreamSource<S>
where
    S: Stream + Unpin + Send + 'static,
    S::Item: Send + 'static,
{
    type Item = S::Item;

    async fn produce(
        &mut self,
        out: &mut SourceOutput<S::Item>,
    ) -> Result<SourceStatus, StageError> {
        match self.stream.next().await {
            Some(item) => out.push(item),
            None => return Ok(SourceStatus::Done),
        }
        while !out.is_full() {
            match futures::FutureExt::now_or_never(self.stream.next()) {
                Some(Some(item)) => out.push(item),
                Some(None) => return Ok(SourceStatus::Done),
                None => break,
            }
        }
        Ok(SourceStatus::More)
    }
}
