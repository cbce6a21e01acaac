//! What a pipeline is made of: [`Source`]s produce items, [`Transform`]s turn items into
//! other items, [`Sink`]s consume them. Each has `init`, its processing and `close`.
//!
//! Most stages are closures adapted by the builder (`map`, `filter`, `flat_map`, `try_map`,
//! `map_async`, [`sink_fn`], [`iter`](sources::iter)); implement a trait for a stage with state
//! or resources.
//!
//! ```
//! use pulseflow::prelude::*;
//!
//! /// Numbers each item with a running count: state, so a `Transform` of its own.
//! struct Count(u64);
//!
//! impl Transform for Count {
//!     type In = String;
//!     type Out = (u64, String);
//!     fn process(
//!         &mut self,
//!         item: Envelope<String>,
//!         out: &mut Vec<Envelope<(u64, String)>>,
//!     ) -> Result<(), ItemFailure<String>> {
//!         self.0 += 1;
//!         let n = self.0;
//!         out.push(item.map(|s| (n, s)));
//!         Ok(())
//!     }
//! }
//! # let mut c = Count(0);
//! # let mut out = Vec::new();
//! # c.process(Envelope::new("a".to_string()), &mut out).unwrap();
//! # assert_eq!(out[0].payload.0, 1);
//! ```

mod closures;
mod confirm;
mod context;
mod in_place;
pub mod sinks;
pub mod sources;

pub use closures::{Filter, FlatMap, Map, TryMap};
pub use confirm::{Confirmations, Unconfirmed};
pub(crate) use confirm::{Settled, Shared as ConfirmShared};
pub use context::StageContext;
pub use sinks::sink_fn;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::ack::{Ack, RunAcks};
use crate::envelope::{Cost, Envelope, Timestamp};
use crate::error::{ItemFailure, StageError};

/// The six kinds of stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageKind {
    /// Produces items.
    Source,
    /// Turns items into zero or more items.
    Transform,
    /// Keeps state per key and emits when complete.
    Accumulator,
    /// Routes each item to one or more named outputs.
    Branch,
    /// Joins several inputs of one type.
    Merge,
    /// Consumes items.
    Sink,
}

impl StageKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Source => "source",
            StageKind::Transform => "transform",
            StageKind::Accumulator => "accumulator",
            StageKind::Branch => "branch",
            StageKind::Merge => "merge",
            StageKind::Sink => "sink",
        }
    }
}

/// What the items of a batch turned into, recorded by
/// [`Transform::process_batch`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchCounts {
    /// Sequence number of the item being processed.
    pub current_seq: u64,
    /// Length of the output before the item being processed (its outputs are discarded if it
    /// panics).
    pub output_mark: usize,
    /// Items that produced no output.
    pub filtered: u64,
    /// Outputs beyond one per item.
    pub created: u64,
}

impl BatchCounts {
    /// Records that one item produced `outputs` outputs.
    #[inline]
    pub fn record(&mut self, outputs: usize) {
        match outputs {
            0 => self.filtered += 1,
            1 => {}
            n => self.created += n as u64 - 1,
        }
    }
}

/// How far a sink got through a batch, kept by [`Sink::write_batch`].
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WriteProgress {
    /// Sequence number of the item being written.
    pub current_seq: u64,
    /// Items delivered so far.
    pub delivered: u64,
    /// Items handed to [`Confirmations::defer`].
    pub(crate) deferred: u64,
    /// Their acks, in order.
    pub(crate) deferred_acks: Vec<Ack>,
}

/// Whether a source has more to give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceStatus {
    /// Call `produce` again.
    More,
    /// Exhausted: the items pushed in this call are the last.
    Done,
}

/// Where a source puts what it produced; the engine numbers and timestamps each item.
pub struct SourceOutput<T> {
    items: Vec<Envelope<T>>,
    limit: usize,
    next_seq: u64,
    now: Timestamp,
    /// How many items were pushed, readable by the engine while `produce` is pending (it
    /// starts the batch timeout at the first item).
    filled: Arc<AtomicUsize>,
    /// The run's abort flag, which acks of pushed items are tied to.
    run: Option<Arc<RunAcks>>,
    /// The latest ack pushed, and extras carrying it that the next items with the same ack
    /// share.
    acked: Option<(Ack, Envelope<()>)>,
}

impl<T> SourceOutput<T> {
    /// A call filling `items` (an empty buffer) with at most `limit` items.
    pub(crate) fn new(
        items: Vec<Envelope<T>>,
        limit: usize,
        next_seq: u64,
        now: Timestamp,
        filled: Arc<AtomicUsize>,
        run: Option<Arc<RunAcks>>,
    ) -> Self {
        filled.store(0, Ordering::Relaxed);
        Self {
            items,
            limit,
            next_seq,
            now,
            filled,
            run,
            acked: None,
        }
    }

    /// The most items this call may push in all.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Changes how many items this call may push in all (the engine fills a batch in steps).
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// How many more items this call may push (the engine's batch size).
    #[inline]
    pub fn remaining(&self) -> usize {
        self.limit.saturating_sub(self.items.len())
    }

    /// Whether the batch is full.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.items.len() >= self.limit
    }

    /// Number of items pushed so far.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds one payload; its cost is its in-memory size.
    #[inline]
    pub fn push(&mut self, payload: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.items.push(
            Envelope::new(payload)
                .with_seq(seq)
                .with_timestamp(self.now),
        );
        self.filled.store(self.items.len(), Ordering::Relaxed);
    }

    /// Adds payloads from `iter` until the batch is full or the iterator ends; returns how
    /// many were added. Faster than calling [`push`](SourceOutput::push) in a loop.
    #[inline]
    pub fn extend_from<I: Iterator<Item = T>>(&mut self, iter: &mut I) -> usize {
        let room = self.remaining();
        let before = self.items.len();
        self.items.reserve(room);
        // A plain loop over locals: through `extend` and `map`, the sequence number and the
        // count taken lived behind the adapters' references and went to memory and back for
        // every item.
        let mut seq = self.next_seq;
        let now = self.now;
        for _ in 0..room {
            let Some(payload) = iter.next() else {
                break;
            };
            self.items
                .push(Envelope::new(payload).with_seq(seq).with_timestamp(now));
            seq += 1;
        }
        self.next_seq = seq;
        self.filled.store(self.items.len(), Ordering::Relaxed);
        self.items.len() - before
    }

    /// Adds one payload with a known cost (for example the length of the line it came from).
    pub fn push_with_cost(&mut self, payload: T, cost: Cost) {
        self.push(payload);
        if let Some(last) = self.items.last_mut() {
            last.cost = cost;
        }
    }

    /// Adds a prepared envelope (with headers or trace context). The engine assigns its
    /// sequence number; a zero timestamp becomes the batch's.
    pub fn push_envelope(&mut self, mut envelope: Envelope<T>) {
        envelope.seq = self.next_seq;
        self.next_seq += 1;
        if envelope.timestamp == 0 {
            envelope.timestamp = self.now;
        }
        if let (Some(acks), Some(run)) = (envelope.acks(), &self.run) {
            acks.iter().for_each(|a| a.bind(run));
        }
        self.items.push(envelope);
        self.filled.store(self.items.len(), Ordering::Relaxed);
    }

    /// Adds one payload carrying an acknowledgement (see [`crate::ack`]): the ack resolves
    /// once the item and everything derived from it are handled. Several items may share one
    /// ack (clone it).
    pub fn push_acked(&mut self, payload: T, ack: Ack) {
        let cost = Cost {
            bytes: std::mem::size_of::<T>() as u32,
            cpu_hint: 0.0,
        };
        self.push_acked_with_cost(payload, cost, ack);
    }

    /// [`push_acked`](SourceOutput::push_acked) with a known cost. Consecutive items sharing
    /// an ack share one allocation for it.
    pub fn push_acked_with_cost(&mut self, payload: T, cost: Cost, ack: Ack) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut env = Envelope::new(payload)
            .with_seq(seq)
            .with_timestamp(self.now)
            .with_cost(cost);
        match &self.acked {
            Some((last, template)) if *last == ack => env.share_extras(template),
            _ => {
                if let Some(run) = &self.run {
                    ack.bind(run);
                }
                let template = Envelope::new(()).with_ack(ack.clone());
                env.share_extras(&template);
                self.acked = Some((ack, template));
            }
        }
        self.items.push(env);
        self.filled.store(self.items.len(), Ordering::Relaxed);
    }

    pub(crate) fn finish(self) -> (Vec<Envelope<T>>, u64) {
        (self.items, self.next_seq)
    }
}

/// A stage that produces items.
pub trait Source: Send + 'static {
    /// What it produces.
    type Item: Send + 'static;

    /// Prepares resources; an error stops the run before any item flows.
    fn init(&mut self, _ctx: &StageContext) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// Pushes up to `out.remaining()` items into `out`, waiting if none is available yet.
    /// Returns [`SourceStatus::Done`] once exhausted.
    ///
    /// **Cancellation.** The engine sends a partial batch at most
    /// [`batch_timeout`](crate::ExecutionOptions::batch_timeout) after its first item: when
    /// `produce` is still waiting for more input then, its future is dropped at that await
    /// point and the items already pushed go on. A source must therefore keep its state
    /// consistent at every await (as Tokio's cancel-safe operations do: receiving from a
    /// channel, reading into a buffer the source owns), and never hold an item in a local
    /// variable across an await.
    fn produce(
        &mut self,
        out: &mut SourceOutput<Self::Item>,
    ) -> impl Future<Output = Result<SourceStatus, StageError>> + Send;

    /// Releases resources after the last item.
    fn close(&mut self) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }
}

/// A stage that turns each item into zero or more items.
///
/// `process` is synchronous and called per item inside a batch loop; for asynchronous work use
/// the builder's `map_async`, which runs futures with bounded concurrency.
pub trait Transform: Send + 'static {
    /// What it takes.
    type In: Send + 'static;
    /// What it gives.
    type Out: Send + 'static;

    /// Prepares resources; an error stops the run before any item flows.
    fn init(&mut self, _ctx: &StageContext) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// Processes one item, pushing its outputs into `out`. Pushing nothing filters the item.
    /// An error hands the item (when it still exists) to the stage's error policy; outputs
    /// pushed before the error are discarded.
    fn process(
        &mut self,
        item: Envelope<Self::In>,
        out: &mut Vec<Envelope<Self::Out>>,
    ) -> Result<(), ItemFailure<Self::In>>;

    /// Processes the remaining items of a batch; the default calls
    /// [`process`](Transform::process) for each and records what each produced in `counts`.
    ///
    /// Override it only to speed up a hot transform. An override must push failures to
    /// `failed` and either record outputs per item in `counts` (consuming `items` one at a
    /// time, with `current_seq` and `output_mark` set before each, so a panic fails only the
    /// item in progress and the batch resumes after it) or declare
    /// [`at_most_one_output`](Transform::at_most_one_output), in which case a panic fails
    /// every item the call consumed without an output (the closure adapters `map` and
    /// `filter` declare it, and catch a panic themselves: only the item in progress fails).
    fn process_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<Self::In>>,
        out: &mut Vec<Envelope<Self::Out>>,
        failed: &mut Vec<ItemFailure<Self::In>>,
        counts: &mut BatchCounts,
    ) {
        out.reserve(items.len());
        for item in items {
            counts.current_seq = item.seq;
            let mark = out.len();
            counts.output_mark = mark;
            match self.process(item, out) {
                Ok(()) => counts.record(out.len() - mark),
                Err(failure) => {
                    out.truncate(mark);
                    failed.push(failure);
                }
            }
        }
    }

    /// Whether every item yields at most one output (like `map`, `filter`), so the engine
    /// can count a batch from its lengths instead of per item.
    fn at_most_one_output(&self) -> bool {
        false
    }

    /// Called once after the last input; may push final items.
    fn close(
        &mut self,
        _out: &mut Vec<Envelope<Self::Out>>,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// Whether the transform keeps no state between items. Stateless transforms may be fused
    /// with their neighbours into one task. Closure adapters are stateless.
    fn is_stateless(&self) -> bool {
        false
    }
}

/// A stage that consumes items.
pub trait Sink: Send + 'static {
    /// What it consumes.
    type Item: Send + 'static;

    /// Prepares resources; an error stops the run before any item flows.
    fn init(&mut self, _ctx: &StageContext) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// Offered once, before `init`: a sink whose writes are confirmed after `write_batch`
    /// returns keeps the handle and [defers](Confirmations::defer) such items (see
    /// [`Confirmations`]). The default ignores it.
    fn confirm_later(&mut self, _confirmations: Confirmations<Self::Item>) {}

    /// Consumes one item. An error hands the item back to the stage's error policy.
    fn write(
        &mut self,
        item: Envelope<Self::Item>,
    ) -> impl Future<Output = Result<(), ItemFailure<Self::Item>>> + Send;

    /// Writes the remaining items of a batch; the default calls [`write`](Sink::write) for
    /// each. An override must consume `items` one at a time, set `progress.current_seq` to the
    /// item in progress and count each delivered item in `progress.delivered` as it goes (so
    /// a panic fails only the item in progress), and push failures to `failed`.
    fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<Self::Item>>,
        failed: &mut Vec<ItemFailure<Self::Item>>,
        progress: &mut WriteProgress,
    ) -> impl Future<Output = ()> + Send {
        async move {
            for item in items {
                progress.current_seq = item.seq;
                match self.write(item).await {
                    Ok(()) => progress.delivered += 1,
                    Err(failure) => failed.push(failure),
                }
            }
        }
    }

    /// Called after each batch.
    fn flush(&mut self) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// Called once after the last item.
    fn close(&mut self) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }
}
