//! Runs a branch: each item goes to every output whose predicate accepts it (copies for all
//! but the last), or to the `unmatched` output, or is filtered when there is none.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;

use super::downstream::Downstream;
use super::failure::{Failures, Next};
use crate::envelope::{Batch, Envelope};
use crate::error::{ItemFailure, StageError};
use crate::metrics::{DropReason, StageStatus, Tally};

/// A route's predicate.
pub(crate) type Predicate<T> = Arc<dyn Fn(&T) -> bool + Send + Sync>;

pub(crate) struct BranchHandler<T> {
    pub predicates: Vec<Predicate<T>>,
    /// Outputs: one per predicate, then `unmatched` if present.
    pub outs: Vec<Box<dyn Downstream<T>>>,
    pub failures: Failures,
}

impl<T: Clone + Send + 'static> BranchHandler<T> {
    /// Routes the items into `parts`, resuming after a panicking predicate.
    fn route_all(
        &self,
        items: impl Iterator<Item = Envelope<T>>,
        parts: &mut [Vec<Envelope<T>>],
        failed: &mut Vec<ItemFailure<T>>,
        tally: &mut Tally,
    ) {
        let mut items = items;
        let mut slot: Option<Envelope<T>> = None;
        let mut hits: Vec<usize> = Vec::with_capacity(self.predicates.len());
        loop {
            let run = catch_unwind(AssertUnwindSafe(|| {
                for item in items.by_ref() {
                    let item = slot.insert(item);
                    hits.clear();
                    hits.extend(
                        self.predicates
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p(&item.payload))
                            .map(|(i, _)| i),
                    );
                    let Some(item) = slot.take() else { continue };
                    if hits.is_empty() && parts.len() > self.predicates.len() {
                        hits.push(self.predicates.len());
                    }
                    tally.outputs(hits.len());
                    if let Some((&last, rest)) = hits.split_last() {
                        for &i in rest {
                            parts[i].push(item.clone());
                        }
                        parts[last].push(item);
                    }
                }
            }));
            match run {
                Ok(()) => return,
                Err(panic) => {
                    let error = StageError::from_panic(&*panic);
                    failed.push(match slot.take() {
                        Some(item) => ItemFailure::new(item, error),
                        None => ItemFailure::consumed(0, error),
                    });
                }
            }
        }
    }

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
        let mut parts: Vec<Vec<Envelope<T>>> = (0..self.outs.len()).map(|_| Vec::new()).collect();
        let mut failed = Vec::new();
        self.route_all(batch.into_iter(), &mut parts, &mut failed, &mut tally);
        for failure in failed {
            let mut delays = self.failures.delays();
            let mut next = self.failures.settle(failure, 1, &mut delays, &mut tally);
            while let Next::Retry(item, wait, attempt) = next {
                tokio::time::sleep(wait).await;
                let mut again = Vec::new();
                self.route_all(std::iter::once(item), &mut parts, &mut again, &mut tally);
                next = match again.pop() {
                    Some(f) => self.failures.settle(f, attempt, &mut delays, &mut tally),
                    None => Next::Done,
                };
            }
        }
        tally.emitted = parts.iter().map(|p| p.len() as u64).sum();
        self.failures.stats.add(&tally, Some(started.elapsed()));
        for part in &parts {
            self.failures
                .stats
                .taps
                .offer(|| super::TapBatch::of_items(part));
        }
        for (out, part) in self.outs.iter_mut().zip(parts) {
            if !part.is_empty() {
                out.push(Batch::from_items(part)).await;
            }
        }
    }
}

impl<T: Clone + Send + 'static> Downstream<T> for BranchHandler<T> {
    fn start(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            self.failures.stats.worker_started();
            self.failures.stats.set_status(StageStatus::Running);
            let mut ok = true;
            for out in &mut self.outs {
                ok &= out.start().await;
            }
            ok
        })
    }

    fn push(&mut self, batch: Batch<T>) -> BoxFuture<'_, ()> {
        Box::pin(self.handle(batch))
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for out in &mut self.outs {
                out.finish().await;
            }
            self.failures.stats.worker_stopped();
            self.failures.stats.set_status(StageStatus::Completed);
        })
    }
}

/// Counts what passes through a merge.
pub(crate) struct MergeHandler<T> {
    pub next: Box<dyn Downstream<T>>,
    pub stats: Arc<crate::metrics::StageStats>,
}

impl<T: Send + 'static> Downstream<T> for MergeHandler<T> {
    fn start(&mut self) -> BoxFuture<'_, bool> {
        self.stats.worker_started();
        self.stats.set_status(StageStatus::Running);
        self.next.start()
    }

    fn push(&mut self, batch: Batch<T>) -> BoxFuture<'_, ()> {
        let n = batch.len() as u64;
        self.stats.add(
            &Tally {
                received: n,
                emitted: n,
                ..Tally::default()
            },
            None,
        );
        self.next.push(batch)
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.next.finish().await;
            self.stats.worker_stopped();
            self.stats.set_status(StageStatus::Completed);
        })
    }
}
