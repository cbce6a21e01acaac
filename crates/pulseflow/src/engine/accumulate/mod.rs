//! The accumulator stage: one task per worker owns a state table (keys are partitioned by hash
//! across workers, so a key is always on one worker, in order). The task waits on its input
//! and on its deadline queue at once, so deadlines fire even when no input arrives; nothing
//! scans all keys.
//!
//! Counting: an emitted output that folded `k` inputs counts `k - 1` of them as absorbed; a
//! key discarded by policy counts all its inputs as dropped (`discarded_by_policy`). Inputs
//! still held in state are in flight until their key is emitted, discarded or flushed at the
//! end of input.
//!
//! The files follow the stage's seams: `ingest` (a batch folded in, key by key), `emit`
//! (outputs and flushes), `deadlines` (timers), `spill` (spilling, reloading, compacting),
//! `close` (the end-of-input flush), `figures` (live figures and metrics), `worker` (the
//! worker task and the key-hash partitioner) and `wiring` (from the builder to tasks).

mod close;
mod deadlines;
mod emit;
mod figures;
mod ingest;
mod spill;
mod wiring;
mod worker;

pub(crate) use wiring::{AccInstances, wire_accumulator};

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};

use super::failure::Failures;
use crate::accumulate::table::{ClockTable, Keyed, Shards};
use crate::accumulate::{Accumulator, AccumulatorPolicy, AccumulatorState, RecordRef, SpillStore};
use crate::ack::{Ack, AckTally, Outcome};
use crate::error::ItemFailure;
use crate::memory::{MemoryBudget, Reservation};
use crate::metrics::Tally;
use crate::stage::StageContext;
use emit::Headers;
use figures::{AccFigures, Ops};

/// A key held in memory: the state and, only when the policy has deadlines, a box of them
/// (kept out of the slot so a resident key without deadlines costs a few cache lines less).
/// Its reserved bytes are not stored: they are the table overhead plus `state_size`.
struct Resident<K, S> {
    acc: AccumulatorState<K, S>,
    times: Option<Box<Times>>,
}

impl<K, S> Keyed<K> for Resident<K, S> {
    #[inline]
    fn key(&self) -> &K {
        &self.acc.key
    }
}

/// A key on disk: 24 bytes besides the key (its deadlines are kept apart, and only when the
/// policy has deadlines). Aligned to 4 so a `u32` key and its entry take 28 bytes in the
/// index, not 32 (fields are only ever copied out, never borrowed).
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct Spilled {
    at: RecordRef,
    items: u64,
    last_seq: u64,
}

/// The deadlines of a key (resident or on disk).
struct Times {
    /// When its first item arrived (deadline of `max_latency`).
    born: Instant,
    /// When its latest item arrived (deadline of the TTL).
    touched: Instant,
    /// Its entry in the deadline queue.
    timer: Option<delay_queue::Key>,
}

/// One worker of an accumulator stage.
pub(crate) struct AccStage<A: Accumulator> {
    acc: A,
    policy: AccumulatorPolicy,
    table: ClockTable<A::Key, Resident<A::Key, A::State>>,
    spilled: Shards<A::Key, Spilled>,
    /// Deadlines of spilled keys (empty when the policy has none).
    spill_times: Shards<A::Key, Box<Times>>,
    store: Option<SpillStore>,
    timers: DelayQueue<A::Key>,
    budget: MemoryBudget,
    reservation: Reservation,
    resident_bytes: u64,
    overhead: u64,
    failures: Failures,
    ctx: StageContext,
    figures: Arc<AccFigures>,
    ops: Ops,
    buf: Vec<u8>,
    headers: Headers,
    /// The acks of the items each key absorbed, until its output leaves (or the key is
    /// discarded). Empty when items carry no acks.
    held: HashMap<A::Key, AckTally>,
    /// Keys that completed, closed until the instant given (policy `closed_ttl`).
    closed: HashMap<A::Key, Instant>,
}

impl<A: Accumulator> AccStage<A> {
    fn new(
        acc: A,
        policy: AccumulatorPolicy,
        failures: Failures,
        ctx: StageContext,
        budget: MemoryBudget,
        figures: Arc<AccFigures>,
    ) -> Self {
        failures.run.gate.register();
        Self {
            ops: Ops::new(&ctx.stage_id),
            acc,
            policy,
            table: ClockTable::new(),
            spilled: Shards::new(),
            spill_times: Shards::new(),
            store: None,
            timers: DelayQueue::new(),
            reservation: budget.reserve(0),
            budget,
            resident_bytes: 0,
            // The table's own bookkeeping per key: slot, index entry.
            overhead: (std::mem::size_of::<Resident<A::Key, A::State>>()
                + ClockTable::<A::Key, Resident<A::Key, A::State>>::overhead_per_key())
                as u64,
            failures,
            ctx,
            figures,
            buf: Vec::new(),
            headers: Headers::default(),
            held: HashMap::new(),
            closed: HashMap::new(),
        }
    }

    /// Bytes reserved for a resident key.
    #[inline]
    fn mem_of(&self, r: &Resident<A::Key, A::State>) -> u64 {
        // A panicking `state_size` was already reported by the update that ran it; here the
        // state's inline size stands in.
        let size = catch_unwind(AssertUnwindSafe(|| self.acc.state_size(&r.acc.state)))
            .unwrap_or(std::mem::size_of::<A::State>());
        self.overhead + size as u64
    }

    /// Settles a failed item under the stage's error policy. Accumulator code is not retried
    /// (a panic in it is not transient): under `Retry` the item is dead-lettered at once.
    fn fail(&mut self, failure: ItemFailure<A::In>, tally: &mut Tally) {
        let _ = self
            .failures
            .settle(failure, 1, &mut std::iter::empty(), tally);
    }

    /// Keeps the acks of an item `key` absorbed.
    fn hold(&mut self, key: &A::Key, acks: &[Ack]) {
        if !acks.is_empty() {
            self.held.entry(key.clone()).or_default().add(acks);
        }
    }

    /// The acks `key`'s items brought, for its output.
    fn held_acks(&mut self, key: &A::Key) -> Vec<Ack> {
        if self.held.is_empty() {
            return Vec::new();
        }
        self.held
            .remove(key)
            .map(AckTally::into_acks)
            .unwrap_or_default()
    }

    /// `key` left without an output: its items' acks learn how.
    fn settle_held(&mut self, key: &A::Key, outcome: Outcome) {
        if self.held.is_empty() {
            return;
        }
        if let Some(t) = self.held.remove(key) {
            t.settle(outcome);
        }
    }

    /// Removes a resident key, with its reservation and deadline.
    fn take(&mut self, key: &A::Key) -> Option<Resident<A::Key, A::State>> {
        let r = self.table.remove(key)?;
        Some(self.release(r))
    }

    /// [`AccStage::take`] for the key found at `slot` (after user code ran on its state,
    /// which may have taken the key out of it: the table finds the slot's entry by `key`'s
    /// hash and the slot, not by comparing keys).
    fn take_slot(&mut self, key: &A::Key, slot: u32) -> Option<Resident<A::Key, A::State>> {
        let r = self.table.remove_slot(key, slot)?;
        Some(self.release(r))
    }

    /// A key's reservation and deadline, given back as it leaves the table.
    fn release(&mut self, mut r: Resident<A::Key, A::State>) -> Resident<A::Key, A::State> {
        self.resident_bytes = self.resident_bytes.saturating_sub(self.mem_of(&r));
        if let Some(t) = r.times.as_mut().and_then(|t| t.timer.take()) {
            self.timers.remove(&t);
        }
        r
    }
}
