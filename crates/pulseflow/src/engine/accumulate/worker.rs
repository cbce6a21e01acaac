//! The tasks of an accumulator stage: each worker waits on its input and its deadline queue at
//! once and ends with the end-of-input flush; with several workers, a partitioner splits each
//! batch by key hash. Long stretches of work give way to the runtime ([`Slice`]).

use std::hash::BuildHasher;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use super::AccStage;
use super::figures::{AccFigures, pressure};
use crate::accumulate::Accumulator;
use crate::engine::FlowGuard;
use crate::engine::downstream::Downstream;
use crate::engine::failure::Failures;
use crate::engine::workers::{BUSY_SLICE, Pacer};
use crate::envelope::Batch;
use crate::error::{ItemFailure, StageError};
use crate::flow::channel::{EdgeReceiver, EdgeSender};
use crate::metrics::{StageStatus, Tally};

/// Gives way to the runtime once a stretch of work has run for a [`BUSY_SLICE`], so no poll
/// of the worker runs long (a long poll counts against the task under supervision).
pub(super) struct Slice {
    since: std::time::Instant,
    steps: u32,
}

impl Slice {
    pub(super) fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            steps: 0,
        }
    }

    /// Counts a unit of work (called after each): whether the slice is over (the clock is
    /// read every 64 units). Loops test this inline and await [`Slice::give_way`] only when
    /// it says so: awaiting an async step after each item polled a future each time (about
    /// 35 instructions an item, a tenth of the stage's per-item work).
    #[inline]
    pub(super) fn due(&mut self) -> bool {
        self.steps = self.steps.wrapping_add(1);
        self.steps % 64 == 0 && self.since.elapsed() >= BUSY_SLICE
    }

    /// Gives way to the runtime and starts a new slice.
    pub(super) async fn give_way(&mut self) {
        crate::engine::workers::give_way().await;
        self.since = std::time::Instant::now();
    }
}

enum Event<K, T> {
    Timer(K),
    Input(Option<Batch<T>>),
}

/// One worker's task: input and deadlines, then the end-of-input flush.
pub(super) async fn run_worker<A: Accumulator>(
    rx: EdgeReceiver<A::In>,
    mut stage: AccStage<A>,
    mut next: Box<dyn Downstream<A::Out>>,
    flow: FlowGuard,
    all: Arc<std::sync::OnceLock<Vec<Arc<AccFigures>>>>,
) {
    let init = catch_unwind(AssertUnwindSafe(|| stage.acc.init(&stage.ctx)))
        .unwrap_or_else(|panic| Err(StageError::from_panic(&*panic)));
    let span = stage.ctx.span.clone();
    let ok = stage
        .failures
        .initialise(std::future::ready(init), &span)
        .await;
    let downstream_ok = next.start().await;
    if !(ok && downstream_ok) {
        stage.failures.failed = true;
    }
    let mut pacer = Pacer::new();
    loop {
        let timers_armed = !stage.timers.is_empty();
        let event = tokio::select! {
            biased;
            Some(expired) = std::future::poll_fn(|cx| stage.timers.poll_expired(cx)), if timers_armed => {
                Event::Timer(expired.into_inner())
            }
            batch = rx.recv() => Event::Input(batch.map(|(_, b)| b)),
        };
        match event {
            Event::Timer(key) => stage.on_timer(key, &mut *next).await,
            Event::Input(Some(batch)) => {
                let (n, bytes) = (batch.len(), batch.total_bytes());
                stage.on_batch(batch, &mut *next).await;
                flow.processed(n, bytes);
            }
            Event::Input(None) => break,
        }
        if let (Some(aware), Some(all)) = (&flow.accumulator, all.get()) {
            let (pending, spilled) = pressure(all);
            aware.update(pending, spilled);
        }
        pacer.after_batch().await;
    }
    let stats = stage.failures.stats.clone();
    stats.set_status(StageStatus::Closing);
    stage.close(&mut *next).await;
    next.finish().await;
    stats.worker_stopped();
    if stats.workers() == 0 {
        stats.set_status(StageStatus::Completed);
    }
}

/// Splits each batch by key hash so a key always goes to the same worker. An item whose key
/// extraction panics fails here, under the stage's error policy.
pub(super) async fn partition<A: Accumulator>(
    rx: EdgeReceiver<A::In>,
    lanes: Vec<EdgeSender<A::In>>,
    keys: A,
    mut failures: Failures,
) {
    let n = lanes.len() as u64;
    let hasher = foldhash::fast::FixedState::default();
    while let Some((_, batch)) = rx.recv().await {
        let mut split: Vec<Batch<A::In>> = (0..n).map(|_| Batch::default()).collect();
        let mut tally = Tally::default();
        for item in batch {
            match catch_unwind(AssertUnwindSafe(|| keys.key(&item))) {
                Ok(key) => split[(hasher.hash_one(key) % n) as usize].push(item),
                Err(panic) => {
                    tally.received += 1;
                    let failure = ItemFailure::new(item, StageError::from_panic(&*panic));
                    let _ = failures.settle(failure, 1, &mut std::iter::empty(), &mut tally);
                }
            }
        }
        if tally.received > 0 {
            failures.stats.add(&tally, None);
        }
        for (lane, part) in lanes.iter().zip(split) {
            if !part.is_empty() {
                lane.send(part).await;
            }
        }
    }
}
