//! Deliveries a sink confirms after [`Sink::write_batch`](super::Sink::write_batch) returned.
//!
//! A sink whose peer acknowledges writes later (a broker's publish acknowledgement, say) need
//! not wait for each one before taking the next batch. The engine offers it a
//! [`Confirmations`] handle once, before `init` ([`Sink::confirm_later`](super::Sink::confirm_later)).
//! The sink hands each item it sent to [`Confirmations::defer`] and resolves the
//! [`Unconfirmed`] it gets back when the peer answers:
//!
//! - [`Unconfirmed::delivered`]: the item counts as delivered now, and its acknowledgements
//!   learn so (an acknowledging source acknowledges its message only then);
//! - [`Unconfirmed::failed`]: the item goes to the stage's error policy at once, as a failed
//!   `write` would: dead-lettered, dropped, failing the stage, or retried (written again
//!   through the sink with its next batch, or at the end of input, after the policy's backoff).
//!
//! Until then the item is in flight: counted as received, not yet as delivered. The engine
//! waits for every deferred item to be resolved before it calls the sink's `close`, so the
//! conservation law holds at the end of every run. Resolve them from a task of the sink's own
//! (not from `flush` or `close`). An [`Unconfirmed`] dropped without being resolved counts as
//! failed.
//!
//! ```
//! use pulseflow::prelude::*;
//! use pulseflow::stage::{Confirmations, Unconfirmed, WriteProgress};
//! use tokio::sync::mpsc;
//!
//! /// Hands each item to a peer task, which confirms it later.
//! struct Later {
//!     confirmations: Option<Confirmations<u64>>,
//!     peer: mpsc::UnboundedSender<Unconfirmed<u64>>,
//! }
//!
//! impl Sink for Later {
//!     type Item = u64;
//!
//!     fn confirm_later(&mut self, confirmations: Confirmations<u64>) {
//!         self.confirmations = Some(confirmations);
//!     }
//!
//!     async fn write(&mut self, _item: Envelope<u64>) -> Result<(), ItemFailure<u64>> {
//!         Ok(())
//!     }
//!
//!     async fn write_batch(
//!         &mut self,
//!         items: &mut std::vec::IntoIter<Envelope<u64>>,
//!         _failed: &mut Vec<ItemFailure<u64>>,
//!         progress: &mut WriteProgress,
//!     ) {
//!         let Some(confirmations) = &self.confirmations else { return };
//!         for item in items {
//!             progress.current_seq = item.seq;
//!             let _ = self.peer.send(confirmations.defer(item, progress));
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (peer, mut sent) = mpsc::unbounded_channel::<Unconfirmed<u64>>();
//! // The peer: confirms every item but 3.
//! tokio::spawn(async move {
//!     let mut n = 0;
//!     while let Some(unconfirmed) = sent.recv().await {
//!         n += 1;
//!         if n == 3 {
//!             unconfirmed.failed(StageError::msg("not stored"));
//!         } else {
//!             unconfirmed.delivered();
//!         }
//!     }
//! });
//! let mut p = PipelineBuilder::new("later");
//! p.source("numbers", sources::iter(1..=5u64))
//!     .sink("later", Later { confirmations: None, peer });
//! let result = ExecutionEngine::new()
//!     .run(p.build().unwrap(), ExecutionOptions::default())
//!     .await;
//! let sink = &result.stages["later"];
//! assert_eq!((sink.counts.delivered, sink.counts.dead_lettered), (4, 1));
//! assert!(result.accounting.reconciles());
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::WriteProgress;
use crate::ack::Outcome;
use crate::engine::failure::{Failures, Next};
use crate::envelope::Envelope;
use crate::error::{ItemFailure, StageError};
use crate::metrics::{DropReason, StageStats, Tally};

/// What the engine's sink stage learns of a deferred item.
pub(crate) enum Settled<T> {
    /// It left the pipeline (delivered, or as the error policy said), already counted.
    Done,
    /// The error policy retries it: write it again, not before `at`, as its `attempt`th write.
    Retry(Envelope<T>, Instant, u32),
}

/// What a stage's [`Confirmations`] and [`Unconfirmed`] items share with the engine.
pub(crate) struct Shared<T> {
    settled: mpsc::UnboundedSender<Settled<T>>,
    stats: Arc<StageStats>,
    /// The stage's error policy, applied to failed confirmations where they happen.
    failures: Mutex<Failures>,
    /// Which write of its item the engine is making (1 unless it is retrying one).
    attempt: AtomicU32,
}

impl<T> Shared<T> {
    pub(crate) fn new(settled: mpsc::UnboundedSender<Settled<T>>, failures: Failures) -> Arc<Self> {
        Arc::new(Self {
            settled,
            stats: failures.stats.clone(),
            failures: Mutex::new(failures),
            attempt: AtomicU32::new(1),
        })
    }

    /// Sets which write of an item the engine makes next.
    pub(crate) fn set_attempt(&self, attempt: u32) {
        self.attempt.store(attempt, Ordering::Relaxed);
    }

    /// Whether a failed confirmation failed the stage (under `Fail`).
    pub(crate) fn stage_failed(&self) -> bool {
        self.failures.lock().failed
    }
}

/// A sink's handle for deferring items (see the [module docs](self)).
pub struct Confirmations<T> {
    shared: Arc<Shared<T>>,
}

impl<T> std::fmt::Debug for Confirmations<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confirmations")
            .field("stage", &self.shared.stats.id)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Confirmations<T> {
    pub(crate) fn new(shared: Arc<Shared<T>>) -> Self {
        Self { shared }
    }

    /// Takes `item` as sent but not yet confirmed: in flight until the returned
    /// [`Unconfirmed`] is resolved. Call it from `write_batch`, with its `progress`.
    pub fn defer(&self, item: Envelope<T>, progress: &mut WriteProgress) -> Unconfirmed<T> {
        if let Some(acks) = item.acks() {
            progress.deferred_acks.extend_from_slice(acks);
        }
        progress.deferred += 1;
        Unconfirmed {
            item: Some(item),
            attempt: self.shared.attempt.load(Ordering::Relaxed),
            shared: self.shared.clone(),
        }
    }
}

/// An item a sink sent and has yet to confirm (see the [module docs](self)).
#[must_use = "an unconfirmed item must be resolved with `delivered` or `failed`"]
pub struct Unconfirmed<T: Send + 'static> {
    item: Option<Envelope<T>>,
    attempt: u32,
    shared: Arc<Shared<T>>,
}

impl<T: Send + 'static> std::fmt::Debug for Unconfirmed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unconfirmed")
            .field("seq", &self.item.as_ref().map(|i| i.seq))
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Unconfirmed<T> {
    /// The peer has the item: it counts as delivered.
    pub fn delivered(mut self) {
        let Some(item) = self.item.take() else {
            return;
        };
        if let Some(acks) = item.acks() {
            acks.iter().for_each(|a| a.record(Outcome::Delivered, 1));
        }
        drop(item);
        let tally = Tally {
            delivered: 1,
            ..Tally::default()
        };
        self.shared.stats.add(&tally, None);
        let _ = self.shared.settled.send(Settled::Done);
    }

    /// The peer did not take the item: the stage's error policy decides, at once (a retry is
    /// written again by the engine, with the sink's next batch or at the end of input).
    pub fn failed(mut self, error: StageError) {
        self.fail(error);
    }

    fn fail(&mut self, error: StageError) {
        let Some(item) = self.item.take() else {
            return;
        };
        let shared = &self.shared;
        let mut tally = Tally::default();
        let next = {
            let mut failures = shared.failures.lock();
            let mut delays = failures
                .delays()
                .skip(self.attempt.saturating_sub(1) as usize);
            failures.settle(
                ItemFailure::new(item, error),
                self.attempt,
                &mut delays,
                &mut tally,
            )
        };
        let settled = match next {
            Next::Retry(item, wait, attempt) => {
                Settled::Retry(item, Instant::now() + wait, attempt)
            }
            Next::Done => Settled::Done,
        };
        shared.stats.add(&tally, None);
        if let Err(mpsc::error::SendError(Settled::Retry(item, ..))) = shared.settled.send(settled)
        {
            // The stage is gone (its run was dropped): nobody writes the retry any more.
            crate::ack::record_all([&item], Outcome::Failed);
            let mut tally = Tally::default();
            tally.count_drop(DropReason::StageFailed, 1);
            shared.stats.add(&tally, None);
        }
    }
}

impl<T: Send + 'static> Drop for Unconfirmed<T> {
    fn drop(&mut self) {
        self.fail(StageError::msg(
            "the sink dropped the item before confirming its delivery",
        ));
    }
}
