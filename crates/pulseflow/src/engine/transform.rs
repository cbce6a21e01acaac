//! Runs a [`Transform`] on batches: per-item processing inside one `catch_unwind` per batch,
//! failures handed to the error policy, counts added once per batch.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use tracing::Instrument;

use super::downstream::Downstream;
use super::failure::{Failures, Next};
use super::recycle::Pool;
use super::tap::TapBatch;
use crate::ack::AckTally;
use crate::envelope::{Batch, Envelope};
use crate::error::{ItemFailure, StageError};
use crate::metrics::{DropReason, StageStats, StageStatus, Tally};
use crate::stage::{BatchCounts, StageContext, Transform};

pub(crate) struct TransformHandler<X: Transform> {
    stage: X,
    ctx: StageContext,
    failures: Failures,
    next: Box<dyn Downstream<X::Out>>,
    /// Processing time of the batch handled in pieces so far.
    busy: std::time::Duration,
    /// Where emptied buffers of input items go.
    inputs: Arc<Pool<X::In>>,
}

impl<X: Transform> TransformHandler<X> {
    pub fn new(
        stage: X,
        ctx: StageContext,
        failures: Failures,
        next: Box<dyn Downstream<X::Out>>,
    ) -> Self {
        failures.run.gate.register();
        Self {
            inputs: failures.run.buffers.pool(),
            stage,
            ctx,
            failures,
            next,
            busy: std::time::Duration::ZERO,
        }
    }

    fn stats(&self) -> &Arc<StageStats> {
        &self.failures.stats
    }

    /// Runs the stage over the items, resuming after any item whose processing panicked,
    /// and counts what they turned into.
    fn process_all(
        &mut self,
        items: Vec<Envelope<X::In>>,
        out: &mut Vec<Envelope<X::Out>>,
        failed: &mut Vec<ItemFailure<X::In>>,
        tally: &mut Tally,
    ) {
        let consumed = items.len();
        let out_before = out.len();
        let failed_before = failed.len();
        // An item lost in a panic takes its acks with it: when items carry acks, the batch's
        // are kept aside to learn of it.
        let mut acks = AckTally::default();
        if self.failures.run.acks.seen() {
            for item in &items {
                if let Some(a) = item.acks() {
                    acks.add(a);
                }
            }
        }
        let mut items = items.into_iter();
        let mut counts = BatchCounts::default();
        loop {
            let stage = &mut self.stage;
            let remaining = items.len();
            let (out_mark, failed_mark) = (out.len(), failed.len());
            let run = catch_unwind(AssertUnwindSafe(|| {
                stage.process_batch(&mut items, out, failed, &mut counts)
            }));
            let Err(panic) = run else {
                // What the stage left of the batch: its buffer, for the next one.
                self.inputs.reclaim(items);
                break;
            };
            let error = StageError::from_panic(&*panic);
            // Which items were lost is not known: every ack of the batch learns of the
            // failure (the source may offer its items again: at least once).
            acks.mark_all(self.failures.outcome());
            acks = AckTally::default();
            if self.stage.at_most_one_output() {
                // A batch fast path may have consumed several items before the panic: every
                // one of them that produced no output is an error of this batch.
                let consumed = remaining - items.len();
                let settled = (out.len() - out_mark) + (failed.len() - failed_mark);
                let lost = consumed.saturating_sub(settled).max(1);
                for _ in 0..lost {
                    failed.push(ItemFailure::consumed(
                        counts.current_seq,
                        StageError::msg(error.to_string()),
                    ));
                }
            } else {
                // One item at a time: only the item in progress failed; drop what it pushed.
                out.truncate(counts.output_mark.max(out_mark));
                failed.push(ItemFailure::consumed(counts.current_seq, error));
            }
        }
        // An item that failed without being given back (its closure took it) carries its
        // acks away: the batch's acks learn of the failure.
        if !acks.is_empty() && failed[failed_before..].iter().any(|f| f.item.is_none()) {
            acks.mark_all(self.failures.outcome());
        }
        if self.stage.at_most_one_output() {
            let produced = out.len() - out_before;
            let failures = failed.len() - failed_before;
            tally.filtered += (consumed - failures - produced) as u64;
        } else {
            tally.filtered += counts.filtered;
            tally.created += counts.created;
        }
    }

    async fn settle(
        &mut self,
        failed: Vec<ItemFailure<X::In>>,
        out: &mut Vec<Envelope<X::Out>>,
        tally: &mut Tally,
    ) {
        for failure in failed {
            let mut delays = self.failures.delays();
            let mut next = self.failures.settle(failure, 1, &mut delays, tally);
            while let Next::Retry(item, wait, attempt) = next {
                tokio::time::sleep(wait).await;
                let mut again = Vec::new();
                self.process_all(vec![item], out, &mut again, tally);
                next = match again.pop() {
                    Some(failure) => self.failures.settle(failure, attempt, &mut delays, tally),
                    None => Next::Done,
                };
            }
        }
    }

    /// Processes a batch (or a piece of one, `last` saying whether it is the last); a stage
    /// that Tokio-Pulse moved to Yield does it in small chunks and gives way between them.
    async fn handle(&mut self, batch: Batch<X::In>, last: bool) {
        if super::yielding(self.stats(), batch.len()) {
            let mut pacer = super::workers::Pacer::new();
            for (chunk, end) in super::pieces(batch, super::YIELD_CHUNK) {
                self.handle_chunk(chunk, last && end).await;
                pacer.after_batch().await;
            }
        } else {
            self.handle_chunk(batch, last).await;
        }
    }

    /// Processes a chunk; its time counts towards its batch's, recorded with the last chunk.
    async fn handle_chunk(&mut self, batch: Batch<X::In>, last: bool) {
        let started = Instant::now();
        let n = batch.len();
        let mut tally = Tally {
            received: n as u64,
            ..Tally::default()
        };
        if self.failures.failed {
            crate::ack::record_all(batch.items(), crate::ack::Outcome::Failed);
            tally.count_drop(DropReason::StageFailed, n as u64);
            self.stats().add(&tally, None);
            self.next.push_piece(Batch::default(), last).await;
            return;
        }
        // Sized by the stage: `map` and `filter` hand their input's buffer on.
        let mut out = Vec::new();
        let mut failed = Vec::new();
        self.process_all(batch.into_items(), &mut out, &mut failed, &mut tally);
        if !failed.is_empty() {
            self.settle(failed, &mut out, &mut tally).await;
        }
        tally.emitted = out.len() as u64;
        self.stats().taps.offer(|| TapBatch::of_items(&out));
        self.busy += started.elapsed();
        self.stats().add(&tally, None);
        if last {
            let busy = std::mem::take(&mut self.busy);
            self.stats().add_batch_time(busy);
        }
        self.next.push_piece(Batch::from_items(out), last).await;
    }
}

impl<X: Transform> Downstream<X::In> for TransformHandler<X> {
    fn start(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let ok = self
                .failures
                .initialise(self.stage.init(&self.ctx), &self.ctx.span)
                .await;
            let downstream_ok = self.next.start().await;
            ok && downstream_ok
        })
    }

    fn push(&mut self, batch: Batch<X::In>) -> BoxFuture<'_, ()> {
        let span = tracing::trace_span!(parent: &self.ctx.span, "batch", items = batch.len());
        Box::pin(self.handle(batch, true).instrument(span))
    }

    fn push_piece(&mut self, piece: Batch<X::In>, last: bool) -> BoxFuture<'_, ()> {
        let span = tracing::trace_span!(parent: &self.ctx.span, "batch", items = piece.len());
        Box::pin(self.handle(piece, last).instrument(span))
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let stats = self.stats().clone();
            stats.set_status(StageStatus::Closing);
            let mut out = Vec::new();
            let mut tally = Tally::default();
            if !self.failures.failed {
                if let Err(e) = self.stage.close(&mut out).await {
                    self.failures.stage_error(e, &mut tally);
                }
            }
            // Items pushed by `close` are new: created here, emitted below.
            tally.created = out.len() as u64;
            tally.emitted = out.len() as u64;
            stats.add(&tally, None);
            if !out.is_empty() {
                stats.taps.offer(|| TapBatch::of_items(&out));
                self.next.push(Batch::from_items(out)).await;
            }
            self.next.finish().await;
            stats.worker_stopped();
            if stats.workers() == 0 {
                stats.set_status(StageStatus::Completed);
            }
        })
    }
}
