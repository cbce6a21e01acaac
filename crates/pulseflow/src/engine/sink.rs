//! Runs a [`Sink`]: writes each item, one `catch_unwind` per batch, failures to the error
//! policy, a flush after each batch. Items the sink [defers](crate::stage::Confirmations) are
//! settled as their confirmations come: between batches, and all of them before `close`.

use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::downstream::Downstream;
use super::failure::{Failures, Next};
use crate::ack::{AckTally, Outcome};
use crate::envelope::{Batch, Envelope};
use crate::error::{ItemFailure, StageError};
use crate::metrics::{DropReason, StageStatus, Tally};
use crate::stage::{ConfirmShared, Confirmations, Settled, Sink, StageContext, WriteProgress};

pub(crate) struct SinkHandler<S: Sink> {
    sink: S,
    ctx: StageContext,
    failures: Failures,
    /// Items written since the last flush, delivered once it succeeds.
    unflushed: u64,
    /// Their acks.
    unflushed_acks: AckTally,
    /// Processing time of the batch handled in pieces so far.
    busy: std::time::Duration,
    /// How deferred items ended.
    settled: mpsc::UnboundedReceiver<Settled<S::Item>>,
    /// Deferred items not settled yet.
    outstanding: u64,
    /// What the sink's [`Confirmations`] share with this stage.
    confirm: Arc<ConfirmShared<S::Item>>,
    /// Where emptied batch buffers go.
    buffers: Arc<super::recycle::Pool<S::Item>>,
}

impl<S: Sink> SinkHandler<S> {
    pub fn new(mut sink: S, ctx: StageContext, failures: Failures) -> Self {
        failures.run.gate.register();
        let (tx, settled) = mpsc::unbounded_channel();
        let confirm = ConfirmShared::new(
            tx,
            Failures::new(
                failures.policy,
                failures.stats.clone(),
                failures.run.clone(),
            ),
        );
        sink.confirm_later(Confirmations::new(confirm.clone()));
        Self {
            buffers: failures.run.buffers.pool(),
            sink,
            ctx,
            failures,
            unflushed: 0,
            unflushed_acks: AckTally::default(),
            busy: std::time::Duration::ZERO,
            settled,
            outstanding: 0,
            confirm,
        }
    }

    /// Writes `items`; failures go to `failed`. Returns how many were delivered and the acks
    /// of the items (each failed item's removed: its acks record its own outcome), to be
    /// recorded as delivered once the sink's flush succeeded.
    async fn write_all(
        &mut self,
        items: Vec<Envelope<S::Item>>,
        failed: &mut Vec<ItemFailure<S::Item>>,
    ) -> (u64, AckTally) {
        let mut acks = AckTally::default();
        if self.failures.run.acks.seen() {
            for item in &items {
                if let Some(a) = item.acks() {
                    acks.add(a);
                }
            }
        }
        let mut items = items.into_iter();
        let mut progress = WriteProgress::default();
        let failed_before = failed.len();
        loop {
            let sink = &mut self.sink;
            let run =
                std::panic::AssertUnwindSafe(sink.write_batch(&mut items, failed, &mut progress))
                    .catch_unwind()
                    .await;
            match run {
                Ok(()) => break,
                Err(panic) => failed.push(ItemFailure::consumed(
                    progress.current_seq,
                    StageError::from_panic(&*panic),
                )),
            }
        }
        self.outstanding += progress.deferred;
        self.buffers.reclaim(items);
        if !acks.is_empty() {
            // Deferred items' acks learn their outcome when the sink confirms them.
            acks.remove_in_order(&progress.deferred_acks);
            for f in &failed[failed_before..] {
                match f.item.as_ref().and_then(Envelope::acks) {
                    Some(item_acks) => acks.remove(item_acks),
                    // An item lost in a panic: which ack was its is not known any more, so
                    // every ack of the batch learns of a dead letter (the source may offer
                    // its items again: at least once).
                    None => acks.mark_all(self.failures.outcome()),
                }
            }
        }
        (progress.delivered, acks)
    }

    /// Applies the error policy to `failure`, the item's `attempt`th write failing: retries
    /// write it again (a retry the sink defers comes back through its confirmation, with its
    /// attempt). Returns what the retries delivered, and their acks.
    async fn settle_failure(
        &mut self,
        failure: ItemFailure<S::Item>,
        attempt: u32,
        tally: &mut Tally,
    ) -> (u64, AckTally) {
        let mut delivered = 0;
        let mut acks = AckTally::default();
        let mut delays = self
            .failures
            .delays()
            .skip(attempt.saturating_sub(1) as usize);
        let mut next = self.failures.settle(failure, attempt, &mut delays, tally);
        while let Next::Retry(item, wait, attempt) = next {
            tokio::time::sleep(wait).await;
            let (n, more, failed) = self.write_again(item, attempt).await;
            delivered += n;
            acks.append(more);
            next = match failed {
                Some(f) => self.failures.settle(f, attempt, &mut delays, tally),
                None => Next::Done,
            };
        }
        (delivered, acks)
    }

    /// Writes `item` again, as its `attempt`th write: what it delivered, its acks, and its
    /// failure if it failed (a deferred retry comes back through its confirmation).
    async fn write_again(
        &mut self,
        item: Envelope<S::Item>,
        attempt: u32,
    ) -> (u64, AckTally, Option<ItemFailure<S::Item>>) {
        let mut failed = Vec::new();
        self.confirm.set_attempt(attempt);
        let (n, acks) = self.write_all(vec![item], &mut failed).await;
        self.confirm.set_attempt(1);
        (n, acks, failed.pop())
    }

    /// Takes in how deferred items ended: all of them, waiting, when `wait_all`, else those
    /// already settled. Delivered and policy-settled items were counted where they were
    /// confirmed; retries are written again here (what they deliver is flushed at once).
    async fn settle_deferred(&mut self, wait_all: bool) {
        if self.outstanding == 0 {
            return;
        }
        let mut tally = Tally::default();
        let mut delivered = 0;
        let mut acks = AckTally::default();
        while self.outstanding > 0 {
            let next = if wait_all {
                self.settled.recv().await
            } else {
                self.settled.try_recv().ok()
            };
            let Some(settled) = next else { break };
            self.outstanding -= 1;
            let Settled::Retry(item, at, attempt) = settled else {
                continue;
            };
            if self.failures.failed || self.confirm.stage_failed() {
                // The stage failed meanwhile: the retry is dropped with it.
                crate::ack::record_all([&item], Outcome::Failed);
                tally.count_drop(DropReason::StageFailed, 1);
                continue;
            }
            tokio::time::sleep_until(at).await;
            let (n, more, failed) = self.write_again(item, attempt).await;
            delivered += n;
            acks.append(more);
            if let Some(failure) = failed {
                let (n, more) = self.settle_failure(failure, attempt, &mut tally).await;
                delivered += n;
                acks.append(more);
            }
        }
        if self.confirm.stage_failed() {
            self.failures.failed = true;
        }
        if delivered > 0 || !acks.is_empty() {
            match self.sink.flush().await {
                Ok(()) => {
                    tally.delivered += delivered;
                    acks.settle(Outcome::Delivered);
                }
                Err(e) => {
                    tally.count_drop(DropReason::StageFailed, delivered);
                    acks.settle(Outcome::Failed);
                    self.failures.stage_error(e, &mut tally);
                }
            }
        }
        self.failures.stats.add(&tally, None);
    }

    /// Writes a batch (at Yield, in chunks with a `yield_now` between them), then flushes.
    async fn handle(&mut self, batch: Batch<S::Item>, last: bool) {
        self.settle_deferred(false).await;
        if super::yielding(&self.failures.stats, batch.len()) {
            let mut pacer = super::workers::Pacer::new();
            for (chunk, end) in super::pieces(batch, super::YIELD_CHUNK) {
                self.handle_chunk(chunk, last && end).await;
                pacer.after_batch().await;
            }
        } else {
            self.handle_chunk(batch, last).await;
        }
    }

    /// Writes the items of `batch`, then flushes the sink when `flush` (the batch's last
    /// chunk): one flush per batch, however it was split.
    async fn handle_chunk(&mut self, batch: Batch<S::Item>, flush: bool) {
        let started = Instant::now();
        let n = batch.len() as u64;
        let mut tally = Tally {
            received: n,
            ..Tally::default()
        };
        if self.failures.failed {
            crate::ack::record_all(batch.items(), crate::ack::Outcome::Failed);
            tally.count_drop(DropReason::StageFailed, n);
            self.failures.stats.add(&tally, None);
            return;
        }
        // A sink's tap sees what it is given to write.
        self.failures
            .stats
            .taps
            .offer(|| super::TapBatch::of_batch(&batch));
        let mut failed = Vec::new();
        let (mut delivered, mut acks) = self.write_all(batch.into_items(), &mut failed).await;
        for failure in failed {
            let (n, more) = self.settle_failure(failure, 1, &mut tally).await;
            delivered += n;
            acks.append(more);
        }
        // Delivered once flushed: a sink that buffers may still fail to write them.
        self.unflushed += delivered;
        self.unflushed_acks.append(acks);
        if flush {
            match self.sink.flush().await {
                Ok(()) => {
                    tally.delivered += std::mem::take(&mut self.unflushed);
                    std::mem::take(&mut self.unflushed_acks).settle(Outcome::Delivered);
                }
                Err(e) => {
                    // What the failed flush held is lost: counted as dropped with the stage's
                    // failure, its acks told so.
                    tally.count_drop(DropReason::StageFailed, std::mem::take(&mut self.unflushed));
                    std::mem::take(&mut self.unflushed_acks).settle(Outcome::Failed);
                    self.failures.stage_error(e, &mut tally);
                }
            }
        }
        self.busy += started.elapsed();
        self.failures.stats.add(&tally, None);
        if flush {
            let busy = std::mem::take(&mut self.busy);
            self.failures.stats.add_batch_time(busy);
        }
    }
}

impl<S: Sink> Downstream<S::Item> for SinkHandler<S> {
    fn start(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(
            self.failures
                .initialise(self.sink.init(&self.ctx), &self.ctx.span),
        )
    }

    fn push(&mut self, batch: Batch<S::Item>) -> BoxFuture<'_, ()> {
        let span = tracing::trace_span!(parent: &self.ctx.span, "batch", items = batch.len());
        Box::pin(self.handle(batch, true).instrument(span))
    }

    fn push_piece(&mut self, piece: Batch<S::Item>, last: bool) -> BoxFuture<'_, ()> {
        let span = tracing::trace_span!(parent: &self.ctx.span, "batch", items = piece.len());
        Box::pin(self.handle(piece, last).instrument(span))
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let stats = self.failures.stats.clone();
            stats.set_status(StageStatus::Closing);
            self.settle_deferred(true).await;
            if !self.failures.failed {
                if let Err(e) = self.sink.close().await {
                    let mut tally = Tally::default();
                    self.failures.stage_error(e, &mut tally);
                    stats.add(&tally, None);
                }
            }
            stats.worker_stopped();
            stats.set_status(StageStatus::Completed);
        })
    }
}
