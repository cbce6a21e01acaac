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
