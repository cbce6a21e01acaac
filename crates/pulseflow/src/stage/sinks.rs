//! Ready-made sinks.
//!
//! ```
//! use pulseflow::stage::sinks;
//! let (sink, collected) = sinks::collect::<u64>();
//! # let _ = sink;
//! assert!(collected.items().is_empty());
//! ```

use std::marker::PhantomData;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Sink, WriteProgress};
use crate::envelope::Envelope;
use crate::error::{BoxError, ItemFailure, StageError};

/// A sink that calls a closure for each payload.
pub struct FnSink<F, T> {
    f: F,
    _types: PhantomData<fn(T)>,
}

/// Makes a sink from a closure over payloads.
pub fn sink_fn<T, F>(f: F) -> FnSink<F, T>
where
    F: FnMut(T) + Send + 'static,
    T: Send + 'static,
{
    FnSink {
        f,
        _types: PhantomData,
    }
}

impl<F, T> Sink for FnSink<F, T>
where
    F: FnMut(T) + Send + 'static,
    T: Send + 'static,
{
    type Item = T;

    async fn write(&mut self, item: Envelope<T>) -> Result<(), ItemFailure<T>> {
        (self.f)(item.payload);
        Ok(())
    }

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<T>>,
        _failed: &mut Vec<ItemFailure<T>>,
        progress: &mut WriteProgress,
    ) {
        for item in items {
            progress.current_seq = item.seq;
            (self.f)(item.payload);
            progress.delivered += 1;
        }
    }
}

/// A sink that calls a fallible closure with each envelope; a failure goes to the stage's error
/// policy with the item intact.
pub struct TryFnSink<F, T> {
    f: F,
    _types: PhantomData<fn(T)>,
}

/// Makes a sink from a fallible closure over envelopes.
pub fn try_sink_fn<T, F, E>(f: F) -> TryFnSink<F, T>
where
    F: FnMut(&Envelope<T>) -> Result<(), E> + Send + 'static,
    E: Into<BoxError>,
    T: Send + 'static,
{
    TryFnSink {
        f,
        _types: PhantomData,
    }
}

impl<F, T, E> Sink for TryFnSink<F, T>
where
    F: FnMut(&Envelope<T>) -> Result<(), E> + Send + 'static,
    E: Into<BoxError>,
    T: Send + 'static,
{
    type Item = T;

    async fn write(&mut self, item: Envelope<T>) -> Result<(), ItemFailure<T>> {
        (self.f)(&item).map_err(|e| ItemFailure::new(item, StageError::from_error(e)))
    }
}

/// A sink that keeps every envelope it receives, readable through [`Collected`].
pub struct CollectSink<T> {
    items: Arc<Mutex<Vec<Envelope<T>>>>,
}

/// The envelopes a [`CollectSink`] received.
#[derive(Clone)]
pub struct Collected<T> {
    items: Arc<Mutex<Vec<Envelope<T>>>>,
}

/// A sink collecting into memory, and the handle to read what it collected.
pub fn collect<T: Send + 'static>() -> (CollectSink<T>, Collected<T>) {
    let items = Arc::new(Mutex::new(Vec::new()));
    (
        CollectSink {
            items: items.clone(),
        },
        Collected { items },
    )
}

impl<T: Clone> Collected<T> {
    /// The payloads received so far, in arrival order.
    pub fn items(&self) -> Vec<T> {
        self.items
            .lock()
            .iter()
            .map(|e| e.payload.clone())
            .collect()
    }
}

impl<T> Collected<T> {
    /// The envelopes received so far, taken out of the sink.
    pub fn take(&self) -> Vec<Envelope<T>> {
        std::mem::take(&mut *self.items.lock())
    }

    /// How many envelopes were received.
    pub fn len(&self) -> usize {
        self.items.lock().len()
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.items.lock().is_empty()
    }
}

impl<T: Send + 'static> Sink for CollectSink<T> {
    type Item = T;

    async fn write(&mut self, item: Envelope<T>) -> Result<(), ItemFailure<T>> {
        self.items.lock().push(item);
        Ok(())
    }
}

/// A sink that hands each payload to a bounded channel, and the [`Output`] that receives
/// them: the pipeline's output as a `futures::Stream` (or with [`Output::recv`]) for code
/// that consumes it as it comes. A full channel holds the sink back, and so the pipeline
/// (backpressure); an item is delivered once it is in the channel. When the receiver is
/// dropped, the items that still come fail (and go to the sink's error policy).
///
/// ```
/// use futures::StreamExt;
/// use pulseflow::prelude::*;
///
/// # tokio::runtime::Runtime::new().expect("runtime").block_on(async {
/// let (sink, mut output) = sinks::channel::<u64>(16);
/// let mut p = PipelineBuilder::new("queue");
/// p.source("numbers", sources::iter(1..=100u64))
///     .map("double", |n| n * 2)
///     .sink("out", sink);
/// let pipeline = p.build().expect("valid");
/// let run = tokio::spawn(async move {
///     ExecutionEngine::new().run(pipeline, ExecutionOptions::default()).await
/// });
/// let mut total = 0;
/// while let Some(n) = output.next().await {
///     total += n;
/// }
/// assert_eq!(total, 10_100);
/// assert!(run.await.expect("run").success);
/// # });
/// ```
pub fn channel<T: Send + 'static>(capacity: usize) -> (ChannelSink<T>, Output<T>) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
    (ChannelSink { tx }, Output { rx })
}

/// The sink of [`channel`].
pub struct ChannelSink<T> {
    tx: tokio::sync::mpsc::Sender<T>,
}

/// The receiving end of [`channel`]: a `futures::Stream` of the payloads, ending when the
/// run is over.
pub struct Output<T> {
    rx: tokio::sync::mpsc::Receiver<T>,
}

impl<T> Output<T> {
    /// The next payload; `None` once the sink has closed (the run ended).
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }
}

impl<T> futures::Stream for Output<T> {
    type Item = T;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.rx.poll_recv(cx)
    }
}

impl<T: Send + 'static> Sink for ChannelSink<T> {
    type Item = T;

    async fn write(&mut self, item: Envelope<T>) -> Result<(), ItemFailure<T>> {
        let (payload, meta) = item.into_parts();
        match self.tx.send(payload).await {
            Ok(()) => Ok(()),
            Err(tokio::sync::mpsc::error::SendError(payload)) => Err(ItemFailure::new(
                meta.map(|()| payload),
                StageError::msg("the receiver of the output is gone"),
            )),
        }
    }
}
