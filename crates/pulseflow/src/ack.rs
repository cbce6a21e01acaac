//! End-to-end acknowledgements: a source learns when everything derived from an item it
//! produced has been handled, and how.
//!
//! A source attaches an [`Ack`] to an item ([`SourceOutput::push_acked`]); the ack travels in
//! the item's envelope and in every envelope derived from it (a `map`'s output, a `flat_map`'s
//! outputs, the copies of a fan-out, the output of an accumulator that absorbed it). It
//! resolves once the last of them is gone, with an [`AckReport`] saying what became of them:
//! delivered by a sink (written, and flushed when the sink flushes), filtered, dropped by a
//! policy, dead-lettered, or lost because the run failed or was aborted before handling them.
//! Several items may share one ack (a source that checkpoints per batch attaches one ack to a
//! batch's items): it resolves after the last of them.
//!
//! Items without an ack pay nothing: the engine looks for acks only where an item leaves the
//! pipeline (sinks, drops, dead letters, accumulators), and an envelope without headers,
//! attributes or acks has no extras to look into.
//!
//! ```
//! use pulseflow::ack::{Ack, AckOutcome};
//! use pulseflow::prelude::*;
//!
//! /// Produces one item, acknowledged.
//! struct One(Option<Ack>);
//!
//! impl Source for One {
//!     type Item = u64;
//!
//!     async fn produce(&mut self, out: &mut SourceOutput<u64>) -> Result<SourceStatus, StageError> {
//!         if let Some(ack) = self.0.take() {
//!             out.push_acked(7, ack);
//!         }
//!         Ok(SourceStatus::Done)
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().expect("runtime").block_on(async {
//! let (ack, receipt) = Ack::new();
//! let mut p = PipelineBuilder::new("acked");
//! p.source("in", One(Some(ack)))
//!     .map("double", |n: u64| n * 2)
//!     .sink("out", sink_fn(|_n: u64| {}));
//! let pipeline = p.build().expect("valid");
//! let result = ExecutionEngine::new().run(pipeline, ExecutionOptions::default()).await;
//! assert!(result.success);
//! let report = receipt.await;
//! assert_eq!(report.outcome(), AckOutcome::Delivered);
//! assert_eq!(report.delivered, 1);
//! # });
//! ```
//!
//! [`SourceOutput::push_acked`]: crate::stage::SourceOutput::push_acked

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// What became of the items an acknowledgement covers, counted over every item derived from
/// them that left the pipeline in that way. Items filtered out are in no count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckReport {
    /// Delivered by a sink.
    pub delivered: u64,
    /// Dropped by a policy: a full buffer's `DropOldest`/`DropNewest`, an `Ignore` error
    /// policy, a key an accumulator discarded.
    pub dropped: u64,
    /// Sent to the dead-letter sink.
    pub dead_lettered: u64,
    /// Not handled: its stage failed, a sink's write or flush failed, or the run was aborted
    /// before the item was handled.
    pub failed: u64,
    /// The run was aborted while an item was still in the pipeline.
    pub abandoned: bool,
}

/// The overall outcome of an acknowledgement: the worst of its items'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AckOutcome {
    /// Every item was delivered or filtered.
    Delivered,
    /// Some were dropped by a policy; none was dead-lettered or lost.
    Dropped,
    /// Some were dead-lettered; none was lost.
    DeadLettered,
    /// Some were not handled (failure or abort): a source that can should offer them again.
    Failed,
}

impl AckReport {
    /// The worst outcome among the items.
    pub fn outcome(&self) -> AckOutcome {
        if self.failed > 0 || self.abandoned {
            AckOutcome::Failed
        } else if self.dead_lettered > 0 {
            AckOutcome::DeadLettered
        } else if self.dropped > 0 {
            AckOutcome::Dropped
        } else {
            AckOutcome::Delivered
        }
    }
}

/// How an item left the pipeline, as the engine records it on the item's acks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Delivered,
    Dropped,
    DeadLettered,
    Failed,
}

/// An acknowledgement: cheap to clone (one shared counter block); resolves when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Ack {
    state: Arc<State>,
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ack")
            .field("report", &self.state.report())
            .finish()
    }
}

impl PartialEq for Ack {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }
}

/// What a run knows of acks: whether any item carried one (the engine looks for acks only
/// then), and whether it was aborted (acks of items still in the pipeline are then lost).
#[derive(Debug, Default)]
pub(crate) struct RunAcks {
    seen: AtomicBool,
    aborted: AtomicBool,
}

impl RunAcks {
    /// Whether an item of the run ever carried an ack.
    #[inline]
    pub fn seen(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }

    /// The run was aborted.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
    }

    /// Whether the run was aborted.
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }
}

struct State {
    delivered: AtomicU64,
    dropped: AtomicU64,
    dead_lettered: AtomicU64,
    failed: AtomicU64,
    /// The run the ack entered (set when its item is pushed by a source).
    run: OnceLock<Arc<RunAcks>>,
    notify: Mutex<Option<Notify>>,
}

enum Notify {
    Receipt(oneshot::Sender<AckReport>),
    Callback(Box<dyn FnOnce(AckReport) + Send>),
}

impl State {
    fn new(notify: Notify) -> Self {
        Self {
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            run: OnceLock::new(),
            notify: Mutex::new(Some(notify)),
        }
    }

    fn report(&self) -> AckReport {
        AckReport {
            delivered: self.delivered.load(Ordering::Acquire),
            dropped: self.dropped.load(Ordering::Acquire),
            dead_lettered: self.dead_lettered.load(Ordering::Acquire),
            failed: self.failed.load(Ordering::Acquire),
            abandoned: self.run.get().is_some_and(|run| run.is_aborted()),
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        let report = self.report();
        match self.notify.get_mut().take() {
            Some(Notify::Receipt(tx)) => {
                let _ = tx.send(report);
            }
            Some(Notify::Callback(f)) => f(report),
            None => {}
        }
    }
}

impl Ack {
    /// An acknowledgement and the receipt that resolves with its report.
    pub fn new() -> (Ack, AckReceipt) {
        let (tx, rx) = oneshot::channel();
        let ack = Ack {
            state: Arc::new(State::new(Notify::Receipt(tx))),
        };
        (ack, AckReceipt { rx })
    }

    /// An acknowledgement that calls `f` with its report when it resolves (on the thread that
    /// drops the last item: `f` should be quick and must not block).
    pub fn on_resolved(f: impl FnOnce(AckReport) + Send + 'static) -> Ack {
        Ack {
            state: Arc::new(State::new(Notify::Callback(Box::new(f)))),
        }
    }

    /// The report so far (the counts may still grow until the ack resolves).
    pub fn report(&self) -> AckReport {
        self.state.report()
    }

    /// Records `n` items that left the pipeline this way.
    pub(crate) fn record(&self, outcome: Outcome, n: u64) {
        let counter = match outcome {
            Outcome::Delivered => &self.state.delivered,
            Outcome::Dropped => &self.state.dropped,
            Outcome::DeadLettered => &self.state.dead_lettered,
            Outcome::Failed => &self.state.failed,
        };
        counter.fetch_add(n, Ordering::AcqRel);
    }

    /// Ties the ack to the run its item entered, so that an abort marks it abandoned.
    pub(crate) fn bind(&self, run: &Arc<RunAcks>) {
        run.seen.store(true, Ordering::Relaxed);
        let _ = self.state.run.set(run.clone());
    }
}

/// Resolves with an [`AckReport`] once every item derived from the acknowledged ones is
/// handled. Resolves with a default report (nothing delivered, nothing failed) if the ack was
/// dropped before any item carried it.
pub struct AckReceipt {
    rx: oneshot::Receiver<AckReport>,
}

impl Future for AckReceipt {
    type Output = AckReport;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AckReport> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_default())
    }
}

/// The acks of a batch's items, collected where they leave the pipeline: one entry per run of
/// consecutive items sharing an ack, with how many items.
#[derive(Default)]
pub(crate) struct AckTally {
    entries: Vec<(Ack, u64)>,
}

impl AckTally {
    /// Adds one item's acks.
    pub fn add(&mut self, acks: &[Ack]) {
        for ack in acks {
            match self.entries.last_mut() {
                Some((last, n)) if last == ack => *n += 1,
                _ => self.entries.push((ack.clone(), 1)),
            }
        }
    }

    /// Whether no item had an ack.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Takes one item's acks back out (the item left another way).
    pub fn remove(&mut self, acks: &[Ack]) {
        for ack in acks {
            if let Some(i) = self.entries.iter().rposition(|(a, _)| a == ack) {
                self.entries[i].1 -= 1;
                if self.entries[i].1 == 0 {
                    self.entries.remove(i);
                }
            }
        }
    }

    /// Takes out the acks of items that left another way, given in the order the items were
    /// added (a subsequence of them): one pass over both.
    pub fn remove_in_order(&mut self, acks: &[Ack]) {
        if acks.is_empty() {
            return;
        }
        let mut at = 0;
        for ack in acks {
            while at < self.entries.len() && self.entries[at].0 != *ack {
                at += 1;
            }
            match self.entries.get_mut(at) {
                Some((_, n)) => *n -= 1,
                None => break,
            }
            if self.entries[at].1 == 0 {
                // Kept with a zero count until the end of the pass, so `at` stays valid.
                at += 1;
            }
        }
        self.entries.retain(|(_, n)| *n > 0);
    }

    /// Records one item with this outcome on every ack collected (keeping them).
    pub fn mark_all(&self, outcome: Outcome) {
        for (ack, _) in &self.entries {
            ack.record(outcome, 1);
        }
    }

    /// Adds another tally's items.
    pub fn append(&mut self, other: AckTally) {
        for (ack, n) in other.entries {
            match self.entries.last_mut() {
                Some((last, m)) if *last == ack => *m += n,
                _ => self.entries.push((ack, n)),
            }
        }
    }

    /// The acks collected, without their counts (for an output that carries them on).
    pub fn into_acks(self) -> Vec<Ack> {
        self.entries.into_iter().map(|(a, _)| a).collect()
    }

    /// Records every item collected as leaving the pipeline this way, and lets the acks go.
    pub fn settle(self, outcome: Outcome) {
        for (ack, n) in self.entries {
            ack.record(outcome, n);
        }
    }
}

/// Records `outcome` on every ack of `items`.
pub(crate) fn record_all<'a, T: 'a>(
    items: impl IntoIterator<Item = &'a crate::envelope::Envelope<T>>,
    outcome: Outcome,
) {
    let mut tally = AckTally::default();
    for item in items {
        if let Some(acks) = item.acks() {
            tally.add(acks);
        }
    }
    tally.settle(outcome);
}

/// How far a source's input is handled, from acks that resolve out of order: the position
/// below which everything is handled, for a source that checkpoints (a file offset, a
/// sequence number) and resumes there after a restart.
///
/// The source [`track`](Watermark::track)s each batch it reads from its start position (the
/// returned ack goes on the batch's items) and tells how far reading got with
/// [`advance`](Watermark::advance). [`handled`](Watermark::handled) is the start of the oldest
/// batch still in the pipeline, or how far reading got when none is. A batch whose ack reports
/// [`AckOutcome::Failed`] holds it back for good: a restart reads that batch again.
///
/// ```
/// use pulseflow::ack::Watermark;
///
/// let offsets = Watermark::new(0u64);
/// let first = offsets.track(0); // lines at bytes 0..100
/// let second = offsets.track(100); // lines at bytes 100..250
/// offsets.advance(250);
/// drop(second); // the second batch is handled first
/// assert_eq!(offsets.handled(), 0);
/// drop(first);
/// assert_eq!(offsets.handled(), 250);
/// ```
pub struct Watermark<P> {
    state: Arc<Mutex<Marks<P>>>,
}

impl<P> Clone for Watermark<P> {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
        }
    }
}

impl<P: std::fmt::Debug> std::fmt::Debug for Watermark<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.state.lock();
        f.debug_struct("Watermark")
            .field("read", &m.read)
            .field("pending", &m.pending.len())
            .field("failed", &m.failed)
            .finish()
    }
}

struct Marks<P> {
    /// Batches not handled yet, by start (with how many started there).
    pending: BTreeMap<P, usize>,
    /// How far reading got.
    read: P,
    /// The start of the earliest batch that failed.
    failed: Option<P>,
    /// Whether `handled` may have changed since the last [`Watermark::take_moved`].
    moved: bool,
}

impl<P: Copy + Ord + Send + 'static> Watermark<P> {
    /// A watermark at `start` (where reading begins: 0, or where a previous run left off).
    pub fn new(start: P) -> Self {
        Self {
            state: Arc::new(Mutex::new(Marks {
                pending: BTreeMap::new(),
                read: start,
                failed: None,
                moved: false,
            })),
        }
    }

    /// A batch starting at `start` is read: the ack to put on its items.
    pub fn track(&self, start: P) -> Ack {
        {
            let mut m = self.state.lock();
            *m.pending.entry(start).or_default() += 1;
            if start > m.read {
                m.read = start;
            }
        }
        let state = Arc::downgrade(&self.state);
        Ack::on_resolved(move |report| {
            let Some(state) = state.upgrade() else { return };
            let mut m = state.lock();
            if let Some(n) = m.pending.get_mut(&start) {
                *n -= 1;
                if *n == 0 {
                    m.pending.remove(&start);
                }
            }
            if report.outcome() == AckOutcome::Failed && m.failed.is_none_or(|f| start < f) {
                m.failed = Some(start);
            }
            m.moved = true;
        })
    }

    /// Reading got to `to` (everything before it belongs to a tracked batch, or needed none).
    pub fn advance(&self, to: P) {
        let mut m = self.state.lock();
        if to > m.read {
            m.read = to;
            m.moved = true;
        }
    }

    /// The position below which everything is handled.
    pub fn handled(&self) -> P {
        let m = self.state.lock();
        let oldest = m.pending.keys().next().copied();
        match (oldest, m.failed) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => m.read,
        }
    }

    /// Whether [`handled`](Watermark::handled) may have moved since the last call (for a
    /// source that persists it only when it moved).
    pub fn take_moved(&self) -> bool {
        std::mem::take(&mut self.state.lock().moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;

    #[tokio::test]
    async fn resolves_when_the_last_carrier_is_gone_with_the_worst_outcome() {
        let (ack, receipt) = Ack::new();
        let a = Envelope::new(1u8).with_ack(ack.clone());
        let b = a.derive(2u8);
        let c = a.derive(3u8);
        drop(ack);
        b.acks()
            .into_iter()
            .flatten()
            .for_each(|a| a.record(Outcome::Delivered, 1));
        drop(b);
        c.acks()
            .into_iter()
            .flatten()
            .for_each(|a| a.record(Outcome::DeadLettered, 1));
        drop(c);
        let mut receipt = receipt;
        assert!(
            futures::FutureExt::now_or_never(&mut receipt).is_none(),
            "`a` still carries it"
        );
        drop(a);
        let report = receipt.await;
        assert_eq!(report.delivered, 1);
        assert_eq!(report.dead_lettered, 1);
        assert_eq!(report.outcome(), AckOutcome::DeadLettered);
    }

    #[test]
    fn an_abort_of_the_run_marks_it_failed() {
        let run = Arc::new(RunAcks::default());
        let seen = Arc::new(Mutex::new(None));
        let into = seen.clone();
        let ack = Ack::on_resolved(move |r| *into.lock() = Some(r));
        ack.bind(&run);
        assert!(run.seen());
        let item = Envelope::new(()).with_ack(ack);
        run.abort();
        drop(item);
        let report = seen.lock().take().expect("resolved");
        assert!(report.abandoned);
        assert_eq!(report.outcome(), AckOutcome::Failed);
    }

    #[test]
    fn a_watermark_holds_at_the_oldest_pending_batch_and_for_good_at_a_failed_one() {
        let marks = Watermark::new(10u64);
        assert_eq!(marks.handled(), 10);
        let a = marks.track(10);
        let b = marks.track(20);
        let c = marks.track(30);
        marks.advance(40);
        drop(b);
        assert_eq!(marks.handled(), 10);
        drop(a);
        assert_eq!(marks.handled(), 30);
        assert!(marks.take_moved());
        assert!(!marks.take_moved());
        // `c`'s items were lost: the watermark stays before them, whatever comes after.
        let run = Arc::new(RunAcks::default());
        c.bind(&run);
        run.abort();
        drop(c);
        let d = marks.track(40);
        marks.advance(50);
        drop(d);
        assert_eq!(marks.handled(), 30);
    }

    #[test]
    fn the_tally_counts_runs_of_items_sharing_an_ack() {
        let seen = Arc::new(Mutex::new(None));
        let into = seen.clone();
        let shared = Ack::on_resolved(move |r| *into.lock() = Some(r));
        let items: Vec<Envelope<u8>> = (0..5)
            .map(|i| Envelope::new(i).with_ack(shared.clone()))
            .chain(std::iter::once(Envelope::new(9)))
            .collect();
        drop(shared);
        record_all(&items, Outcome::Dropped);
        drop(items);
        let report = seen.lock().take().expect("resolved");
        assert_eq!(report.dropped, 5);
        assert_eq!(report.outcome(), AckOutcome::Dropped);
    }
}
