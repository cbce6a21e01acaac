//! Runs `map_async`: an async function per item, at most `concurrency` at once, outputs in
//! input order or in completion order. Under a retry policy an item's retries (and their
//! backoff) run inside its place in the concurrency window: a failing item does not hold up
//! the others.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, stream};

use super::downstream::Downstream;
use super::failure::Failures;
use crate::envelope::{Batch, Envelope};
use crate::error::{BoxError, ItemFailure, StageError};
use crate::metrics::{DropReason, StageStatus, Tally};
use crate::policy::ErrorPolicy;

pub(crate) struct AsyncMapHandler<T, U, F> {
    pub f: Arc<F>,
    pub concurrency: usize,
    pub ordered: bool,
    pub failures: Failures,
    pub next: Box<dyn Downstream<U>>,
    pub _types: PhantomData<fn(T)>,
}

/// What became of an item: its metadata, the item itself (when kept for dead-lettering), the
/// last attempt's result, and the errors of the attempts that were retried.
type Outcome<T, U> = (
    Envelope<()>,
    Option<Envelope<T>>,
    Result<U, StageError>,
    Vec<StageError>,
);

/// Calls `f` on the item, again after each wait of `delays` while it fails (the item kept:
/// `keep`).
async fn call<T, U, F, Fut, E>(
    f: Arc<F>,
    item: Envelope<T>,
    keep: bool,
    mut delays: impl Iterator<Item = Duration>,
) -> Outcome<T, U>
where
    T: Clone + Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    let mut retried = Vec::new();
    let mut item = item;
    loop {
        let original = keep.then(|| item.clone());
        let (payload, meta) = item.into_parts();
        let f = f.clone();
        // (Matched at once: the raw result, whose error need not be `Send`, is gone before the
        // next await.)
        let result = match std::panic::AssertUnwindSafe(async move { f(payload).await })
            .catch_unwind()
            .await
        {
            Ok(Ok(u)) => Ok(u),
            Ok(Err(e)) => Err(StageError::from_error(e)),
            Err(panic) => Err(StageError::from_panic(&*panic)),
        };
        match (result, original) {
            (Err(error), Some(again)) => match delays.next() {
                Some(wait) => {
                    retried.push(error);
                    tokio::time::sleep(wait).await;
                    item = again;
                }
                None => return (meta, Some(again), Err(error), retried),
            },
            (result, original) => return (meta, original, result, retried),
        }
    }
}

impl<T, U, F, Fut, E> AsyncMapHandler<T, U, F>
where
    T: Clone + Send + 'static,
    U: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    async fn handle(&mut self, batch: Batch<T>) {
        let started = Instant::now();
        let n = batch.len();
        let mut tally = Tally {
            received: n as u64,
            ..Tally::default()
        };
        if self.failures.failed {
            crate::ack::record_all(batch.items(), crate::ack::Outcome::Failed);
            tally.count_drop(DropReason::StageFailed, n as u64);
            self.failures.stats.add(&tally, None);
            return;
        }
        let keep = matches!(
            self.failures.policy,
            ErrorPolicy::Retry { .. } | ErrorPolicy::DeadLetter
        );
        let calls = batch
            .into_iter()
            .map(|item| call(self.f.clone(), item, keep, self.failures.delays()));
        let limit = self.concurrency.max(1);
        let outcomes: Vec<Outcome<T, U>> = if self.ordered {
            stream::iter(calls).buffered(limit).collect().await
        } else {
            stream::iter(calls).buffer_unordered(limit).collect().await
        };
        let mut out = Vec::with_capacity(n);
        for (meta, original, result, retried) in outcomes {
            let attempts = 1 + retried.len() as u32;
            for error in retried {
                self.failures.retried(meta.seq, &error, &mut tally);
            }
            let failure = match result {
                Ok(u) => {
                    out.push(meta.map(|()| u));
                    tally.outputs(1);
                    continue;
                }
                Err(error) => match original {
                    Some(item) => ItemFailure::new(item, error),
                    None => self.failures.consumed(&meta, error),
                },
            };
            // Out of retries (they ran in the call): settled for good.
            let _ = self
                .failures
                .settle(failure, attempts, &mut std::iter::empty(), &mut tally);
        }
        tally.emitted = out.len() as u64;
        self.failures.stats.add(&tally, Some(started.elapsed()));
        self.failures
            .stats
            .taps
            .offer(|| super::TapBatch::of_items(&out));
        self.next.push(Batch::from_items(out)).await;
    }
}

impl<T, U, F, Fut, E> Downstream<T> for AsyncMapHandler<T, U, F>
where
    T: Clone + Send + 'static,
    U: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    fn start(&mut self) -> BoxFuture<'_, bool> {
        self.failures.stats.worker_started();
        self.failures.stats.set_status(StageStatus::Running);
        self.next.start()
    }

    fn push(&mut self, batch: Batch<T>) -> BoxFuture<'_, ()> {
        Box::pin(self.handle(batch))
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.next.finish().await;
            self.failures.stats.worker_stopped();
            if self.failures.stats.workers() == 0 {
                self.failures.stats.set_status(StageStatus::Completed);
            }
        })
    }
}
