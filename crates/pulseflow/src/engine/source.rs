//! Runs a [`Source`]: produces batches until exhausted or told to stop.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;
use tracing::Instrument;

use super::downstream::Downstream;
use super::failure::Failures;
use crate::envelope::{Batch, now_millis};
use crate::error::StageError;
use crate::metrics::{StageStatus, Tally};
use crate::policy::ErrorPolicy;
use crate::stage::{Source, SourceOutput, SourceStatus, StageContext};

pub(crate) async fn run_source<S: Source>(
    mut source: S,
    ctx: StageContext,
    mut failures: Failures,
    mut out: Box<dyn Downstream<S::Item>>,
) {
    let stats = failures.stats.clone();
    let run = failures.run.clone();
    let ok = failures.initialise(source.init(&ctx), &ctx.span).await;
    let started = out.start().await;
    if ok && started && run.gate.wait().await {
        stats.set_status(StageStatus::Running);
        produce(
            &mut source,
            &mut failures,
            out.as_mut(),
            (run.batch_size, run.batch_timeout),
        )
        .instrument(ctx.span.clone())
        .await;
        stats.set_status(StageStatus::Closing);
        if let Err(e) = source.close().await {
            let mut tally = Tally::default();
            failures.stage_error(e, &mut tally);
            stats.add(&tally, None);
        }
    }
    out.finish().await;
    stats.worker_stopped();
    stats.set_status(StageStatus::Completed);
}

async fn produce<S: Source>(
    source: &mut S,
    failures: &mut Failures,
    out: &mut dyn Downstream<S::Item>,
    (batch_size, batch_timeout): (usize, Duration),
) {
    let stats = failures.stats.clone();
    let stop = failures.run.stop.clone();
    let filled = Arc::new(AtomicUsize::new(0));
    let mut seq = 0u64;
    let mut delays = failures.delays();
    // A source whose downstream keeps up never waits on its edge: it gives way after each
    // busy slice, as a stage's worker does, or its poll would run on for as long as the
    // source has items (and supervision would rightly take it for a hog).
    let mut pacer = super::workers::Pacer::new();
    let buffers = failures.run.buffers.pool::<S::Item>();
    loop {
        if stop.is_cancelled() {
            return;
        }
        // Under reactive pull, produce only what downstream asked for.
        let demand = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            demand = out.demand() => demand,
        };
        let limit = batch_size.min(demand);
        // A source that Tokio-Pulse moved to Yield fills its batch in small steps and gives
        // way between them (after each busy slice); downstream still gets whole batches
        // (small ones would multiply every later stage's per-batch work).
        let yielding = super::yielding(&stats, limit);
        let mut buf = SourceOutput::new(
            buffers.take(limit),
            limit,
            seq,
            now_millis(),
            filled.clone(),
            Some(failures.run.acks.clone()),
        );
        // The source is busy while `produce` runs, not while it waits for input (or for its
        // rate): only the time spent in its polls counts.
        let mut busy = Duration::ZERO;
        let status = {
            let produce = PartialAfter::new(
                produce_in_steps(source, &mut buf, yielding),
                &filled,
                batch_timeout,
            );
            tokio::pin!(produce);
            let timed = std::future::poll_fn(|cx| {
                let polled = Instant::now();
                let r = produce.as_mut().poll(cx);
                busy += polled.elapsed();
                r
            });
            tokio::select! {
                biased;
                _ = stop.cancelled() => None,
                r = timed => Some(r),
            }
        };
        let (items, next_seq) = buf.finish();
        seq = next_seq;
        let mut tally = Tally {
            ingested: items.len() as u64,
            emitted: items.len() as u64,
            ..Tally::default()
        };
        let status = match status {
            Some(Err(error)) => {
                if let (ErrorPolicy::Retry { .. }, Some(wait)) = (failures.policy, delays.next()) {
                    tally.errors += 1;
                    tally.retries += 1;
                    stats.record_error(error.to_string());
                    tokio::time::sleep(wait).await;
                    Some(SourceStatus::More)
                } else {
                    failures.stage_error(error, &mut tally);
                    (failures.policy == ErrorPolicy::Ignore).then_some(SourceStatus::More)
                }
            }
            Some(Ok(s)) => {
                delays = failures.delays();
                Some(s)
            }
            None => None,
        };
        stats.add(&tally, Some(busy));
        stats.taps.offer(|| super::TapBatch::of_items(&items));
        if items.is_empty() {
            buffers.give(items);
        } else {
            out.push(Batch::from_items(items)).await;
        }
        if yielding {
            super::workers::give_way().await;
        } else {
            pacer.after_batch().await;
        }
        if status != Some(SourceStatus::More) {
            return;
        }
    }
}

/// Lets `source` fill `buf`: in one call, or (`in_steps`) [`super::YIELD_CHUNK`] items per
/// call, giving way between calls once it has worked for a [`super::workers::BUSY_SLICE`]. Stops early when a call leaves its step short (the
/// source has nothing more ready now), is done, or fails.
async fn produce_in_steps<S: Source>(
    source: &mut S,
    buf: &mut SourceOutput<S::Item>,
    in_steps: bool,
) -> Result<SourceStatus, StageError> {
    if !in_steps {
        return source.produce(buf).await;
    }
    let total = buf.limit();
    let mut pacer = super::workers::Pacer::new();
    loop {
        let step_end = (buf.len() + super::YIELD_CHUNK).min(total);
        buf.set_limit(step_end);
        let status = source.produce(buf).await?;
        if status == SourceStatus::Done || buf.len() < step_end || step_end == total {
            buf.set_limit(total);
            return Ok(status);
        }
        pacer.after_batch().await;
    }
}

/// Runs a `produce` future to its end, or until `timeout` after the batch got its first item
/// (then the batch is sent as it is, and the source carries on in the next call): a live
/// source whose input trickles in does not hold items back waiting for a full batch. Nothing
/// is armed while the batch is empty, so an idle source costs nothing.
struct PartialAfter<'a, F> {
    produce: Pin<Box<F>>,
    filled: &'a AtomicUsize,
    timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<'a, F> PartialAfter<'a, F> {
    fn new(produce: F, filled: &'a AtomicUsize, timeout: Duration) -> Self {
        Self {
            produce: Box::pin(produce),
            filled,
            timeout,
            deadline: None,
        }
    }
}

impl<F: Future<Output = Result<SourceStatus, StageError>>> Future for PartialAfter<'_, F> {
    type Output = Result<SourceStatus, StageError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(r) = self.produce.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if self.deadline.is_none() && self.filled.load(Ordering::Relaxed) > 0 {
            // The first item was pushed during this poll: the batch's clock starts now.
            self.deadline = Some(Box::pin(tokio::time::sleep(self.timeout)));
        }
        match self.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Ok(SourceStatus::More)),
            _ => Poll::Pending,
        }
    }
}
