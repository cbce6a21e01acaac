//! The accumulator stage: one task per worker owns a state table (keys are partitioned by hash
//! across workers, so a key is always on one worker, in order). The task waits on its input
//! and on its deadline queue at once, so deadlines fire even when no input arrives; nothing
//! scans all keys.
//!
//! Counting: an emitted output that folded `k` inputs counts `k - 1` of them as absorbed; a
//! key discarded by policy counts all its inputs as dropped (`discarded_by_policy`). Inputs
//! still held in state are in flight until their key is emitted, discarded or flushed at the
//! end of input.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::Instrument;

use super::FlowGuard;
use super::downstream::{Downstream, EdgeOut};
use super::failure::Failures;
use super::wiring::Wiring;
use super::workers::{BUSY_SLICE, Pacer};
use crate::accumulate::table::{ClockTable, Keyed, Shards};
use crate::accumulate::{
    Accumulator, AccumulatorPolicy, AccumulatorState, CompletenessResult, RecordRef, SpillError,
    SpillStore, block_records,
};
use crate::envelope::{Batch, Cost, Envelope, Timestamp};
use crate::error::{ItemFailure, PipelineError, StageError};
use crate::flow::channel::{self, EdgeReceiver, EdgeSender};
use crate::memory::{MemoryBudget, Reservation};
use crate::metrics::{DropReason, EdgeStats, ExtraMetrics, StageStatus, Tally};
use crate::policy::{BufferPolicy, DropPolicy};
use crate::stage::StageContext;

/// One accumulator instance for a sequential stage, or a factory making one per worker.
pub(crate) enum AccInstances<A> {
    One(A),
    Many(Arc<dyn Fn() -> A + Send + Sync>),
}

/// Live figures of one worker, read by `inspect`.
#[derive(Debug, Default)]
pub(crate) struct AccFigures {
    resident_keys: AtomicU64,
    resident_bytes: AtomicU64,
    spilled_keys: AtomicU64,
    spills: AtomicU64,
    reloads: AtomicU64,
    spill_records: AtomicU64,
    spill_raw_bytes: AtomicU64,
    spill_stored_bytes: AtomicU64,
    spill_segments: AtomicU64,
    spill_disk_bytes: AtomicU64,
    spill_reclaimed_bytes: AtomicU64,
    spill_compactions: AtomicU64,
}

/// Resident bytes and keys on disk over all workers of the stage, for accumulator-aware
/// backpressure.
fn pressure(all: &[Arc<AccFigures>]) -> (u64, u64) {
    all.iter().fold((0, 0), |(bytes, keys), f| {
        (
            bytes + f.resident_bytes.load(Relaxed),
            keys + f.spilled_keys.load(Relaxed),
        )
    })
}

fn figures_metrics(all: &[Arc<AccFigures>]) -> Vec<(String, f64)> {
    let sum = |f: fn(&AccFigures) -> &AtomicU64| -> f64 {
        all.iter().map(|a| f(a).load(Relaxed)).sum::<u64>() as f64
    };
    let raw = sum(|f| &f.spill_raw_bytes);
    let stored = sum(|f| &f.spill_stored_bytes);
    vec![
        (
            "accumulator.resident_keys".into(),
            sum(|f| &f.resident_keys),
        ),
        (
            "accumulator.resident_bytes".into(),
            sum(|f| &f.resident_bytes),
        ),
        ("accumulator.spilled_keys".into(), sum(|f| &f.spilled_keys)),
        ("spill.spills".into(), sum(|f| &f.spills)),
        ("spill.reloads".into(), sum(|f| &f.reloads)),
        ("spill.records".into(), sum(|f| &f.spill_records)),
        ("spill.raw_bytes".into(), raw),
        ("spill.stored_bytes".into(), stored),
        ("spill.segments".into(), sum(|f| &f.spill_segments)),
        ("spill.disk_bytes".into(), sum(|f| &f.spill_disk_bytes)),
        (
            "spill.reclaimed_bytes".into(),
            sum(|f| &f.spill_reclaimed_bytes),
        ),
        ("spill.compactions".into(), sum(|f| &f.spill_compactions)),
        (
            "spill.compression_ratio".into(),
            if stored > 0.0 { raw / stored } else { 1.0 },
        ),
    ]
}

/// How many items ahead of the one being folded in the stage takes keys and prefetches their
/// index entries (see `ClockTable::prefetch`): far enough that a miss to memory is over when
/// the item comes, near enough that the line is still in cache. 8 to 64 measured the same;
/// groups of 16 taken at once, then folded in, were 5-15 % slower; prefetching the slots too,
/// 8 items ahead, did not help.
const PREFETCH_AHEAD: usize = 16;

/// Why a key left the table.
#[derive(Debug, Clone, Copy)]
enum Action {
    Completed,
    PartialFlush,
    TtlFlush,
}

/// Handles of `accumulator_operations{stage, action}`.
struct Ops {
    completed: metrics::Counter,
    partial_flush: metrics::Counter,
    ttl_flush: metrics::Counter,
    spilled: metrics::Counter,
    reloaded: metrics::Counter,
}

impl Ops {
    fn new(stage: &str) -> Self {
        let c = |action: &'static str| metrics::counter!("accumulator_operations", "stage" => stage.to_owned(), "action" => action);
        Self {
            completed: c("completed"),
            partial_flush: c("partial_flush"),
            ttl_flush: c("ttl_flush"),
            spilled: c("spilled"),
            reloaded: c("reloaded"),
        }
    }
}

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

/// Gives way to the runtime once a stretch of work has run for a [`BUSY_SLICE`], so no poll
/// of the worker runs long (a long poll counts against the task under supervision).
struct Slice {
    since: std::time::Instant,
    steps: u32,
}

impl Slice {
    fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            steps: 0,
        }
    }

    /// Called after each unit of work; reads the clock every 64 units.
    async fn step(&mut self) {
        self.steps = self.steps.wrapping_add(1);
        if self.steps % 64 == 0 && self.since.elapsed() >= BUSY_SLICE {
            tokio::task::yield_now().await;
            self.since = std::time::Instant::now();
        }
    }
}

/// What an emitted output says about its key.
struct Meta {
    items: u64,
    bytes: u64,
    last_seq: u64,
    last_ts: Timestamp,
    score: f64,
    spilled: bool,
}

impl Meta {
    fn of<K, S>(a: &AccumulatorState<K, S>) -> Self {
        Self {
            items: a.items,
            bytes: a.bytes,
            last_seq: a.last_seq,
            last_ts: a.last_ts,
            score: a.score,
            spilled: a.spilled,
        }
    }
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
}

/// The headers of emitted envelopes, built once per score and spilled flag and shared by
/// the outputs that carry the same (an output's headers cost no allocation of their own; the
/// envelope copies them if someone sets another header).
#[derive(Default)]
struct Headers {
    /// The latest headers built, for a key never spilled and for a spilled one: the score's
    /// bits and an envelope carrying them.
    last: [Option<(u64, Envelope<()>)>; 2],
}

impl Headers {
    fn get(&mut self, score: f64, spilled: bool) -> Option<&Envelope<()>> {
        let slot = &mut self.last[usize::from(spilled)];
        let bits = score.to_bits();
        if slot.as_ref().is_none_or(|(b, _)| *b != bits) {
            let mut env = Envelope::new(());
            env.set_header("acc.completeness", format!("{score:.3}"));
            env.set_header("acc.spilled", if spilled { "true" } else { "false" });
            *slot = Some((bits, env));
        }
        slot.as_ref().map(|(_, env)| env)
    }
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

    /// User code panicked while folding item `seq` into `key`: the key's state may be
    /// half-updated, so it is dropped; the item fails under the error policy and the key's
    /// earlier items are absorbed into that failure.
    fn poisoned(
        &mut self,
        key: &A::Key,
        slot: u32,
        seq: u64,
        error: StageError,
        tally: &mut Tally,
    ) {
        let items = self.take_slot(key, slot).map_or(1, |r| r.acc.items);
        self.fail(ItemFailure::consumed(seq, error), tally);
        tally.absorbed += items.saturating_sub(1);
    }

    /// When a key's deadline is, and what flushing it then is called.
    fn due(&self, born: Instant, touched: Instant) -> Option<(Instant, Action)> {
        let ttl = self.policy.completeness_ttl.map(|t| touched + t);
        let latency = self.policy.max_latency.map(|l| born + l);
        match (ttl, latency) {
            (Some(t), Some(l)) if l < t => Some((l, Action::PartialFlush)),
            (Some(t), _) => Some((t, Action::TtlFlush)),
            (None, Some(l)) => Some((l, Action::PartialFlush)),
            (None, None) => None,
        }
    }

    /// The key of an item (a panic in the accumulator's `key` as an error).
    fn key_of(&self, item: &Envelope<A::In>) -> Result<A::Key, StageError> {
        catch_unwind(AssertUnwindSafe(|| self.acc.key(item)))
            .map_err(|panic| StageError::from_panic(&*panic))
    }

    /// Folds one item into its key's state (`key`: the item's key, from [`Self::key_of`]) and
    /// emits the key if it is done.
    fn ingest(
        &mut self,
        item: Envelope<A::In>,
        key: Result<A::Key, StageError>,
        now: Instant,
        out: &mut Vec<Envelope<A::Out>>,
        tally: &mut Tally,
    ) {
        let key = match key {
            Ok(key) => key,
            Err(error) => {
                self.fail(ItemFailure::new(item, error), tally);
                return;
            }
        };
        let slot = match self.table.touch(&key) {
            Some(slot) => slot,
            None => match self.admit(key.clone(), now, tally) {
                Ok(slot) => slot,
                Err(error) => {
                    self.fail(ItemFailure::new(item, error), tally);
                    return;
                }
            },
        };
        let Some(r) = self.table.get_mut(slot) else {
            return;
        };
        let a = &mut r.acc;
        if a.items == 0 {
            a.first_ts = item.timestamp;
        }
        a.items += 1;
        a.bytes += u64::from(item.cost.bytes);
        a.last_ts = item.timestamp;
        a.last_seq = item.seq;
        if let Some(t) = &mut r.times {
            t.touched = now;
        }
        let seq = item.seq;
        let user = &mut self.acc;
        let run = catch_unwind(AssertUnwindSafe(|| {
            let before = user.state_size(&a.state) as u64;
            user.update(&mut a.state, item);
            let after = user.state_size(&a.state) as u64;
            (after, before, user.check(a))
        }));
        let verdict = match run {
            Ok((after, before, verdict)) => {
                self.resident_bytes = (self.resident_bytes + after).saturating_sub(before);
                verdict
            }
            Err(panic) => {
                self.poisoned(&key, slot, seq, StageError::from_panic(&*panic), tally);
                return;
            }
        };
        let Some(a) = self.table.get_mut(slot).map(|r| &mut r.acc) else {
            return;
        };
        let over = self.policy.max_items.is_some_and(|m| a.items >= m)
            || self.policy.max_bytes.is_some_and(|m| a.bytes >= m);
        match verdict {
            CompletenessResult::Incomplete if !over => {
                // The key stays: the table finds the state by the key it holds.
                if a.key != key {
                    a.key = key;
                }
            }
            CompletenessResult::Incomplete => {
                if let Some(r) = self.take_slot(&key, slot) {
                    self.flush_entry(r, Action::PartialFlush, out, tally);
                }
            }
            CompletenessResult::Complete(output) => {
                let Some(r) = self.take_slot(&key, slot) else {
                    return;
                };
                let mut meta = Meta::of(&r.acc);
                meta.score = 1.0;
                self.emit(output, meta, Action::Completed, out, tally);
            }
            CompletenessResult::Expired(output) => {
                let Some(r) = self.take_slot(&key, slot) else {
                    return;
                };
                let meta = Meta::of(&r.acc);
                match output {
                    Some(o) if self.policy.partial_flush => {
                        self.emit(o, meta, Action::PartialFlush, out, tally)
                    }
                    _ => tally.count_drop(DropReason::Discarded, meta.items),
                }
            }
        }
    }

    /// Brings a key into the table: reloaded from disk, or new. Fails only when the
    /// accumulator's `create` panics.
    fn admit(&mut self, key: A::Key, now: Instant, tally: &mut Tally) -> Result<u32, StageError> {
        let resident = match self.spilled.remove(&key) {
            Some(sp) => {
                let times = self.spill_times.remove(&key);
                let (items, last_seq) = (sp.items, sp.last_seq);
                let timer = times.as_ref().and_then(|t| t.timer);
                match self.reload(&key, sp, times, now) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        self.lost(items, last_seq, timer, e, tally);
                        None
                    }
                }
            }
            None => None,
        };
        let resident = match resident {
            Some(r) => r,
            None => {
                let state = catch_unwind(AssertUnwindSafe(|| self.acc.create(&key)))
                    .map_err(|panic| StageError::from_panic(&*panic))?;
                self.fresh(key, state, now)
            }
        };
        self.resident_bytes += self.mem_of(&resident);
        Ok(self.table.insert(resident))
    }

    /// A new key's entry, with its deadline armed.
    fn fresh(&mut self, key: A::Key, state: A::State, now: Instant) -> Resident<A::Key, A::State> {
        let times = self.policy.has_deadlines().then(|| {
            let timer = self
                .due(now, now)
                .map(|(at, _)| self.timers.insert_at(key.clone(), at));
            Box::new(Times {
                born: now,
                touched: now,
                timer,
            })
        });
        Resident {
            acc: AccumulatorState {
                key: key.clone(),
                state,
                items: 0,
                bytes: 0,
                first_ts: 0,
                last_ts: 0,
                last_seq: 0,
                score: 0.0,
                spilled: false,
            },
            times,
        }
    }

    /// Reads a spilled key back.
    fn reload(
        &mut self,
        key: &A::Key,
        sp: Spilled,
        times: Option<Box<Times>>,
        now: Instant,
    ) -> Result<Resident<A::Key, A::State>, SpillError> {
        let Some(store) = self.store.as_mut() else {
            return Err(SpillError::Encode(
                "spilled key without a spill store".into(),
            ));
        };
        // Whatever the read gives, nothing reads this record again.
        let read = store.read(sp.at, key, &mut self.buf);
        store.release(sp.at);
        read?;
        let corrupt = |reason: String| SpillError::Corrupt {
            key: format!("{key:?}"),
            path: store.path_of(sp.at).to_owned(),
            offset: store.offset_of(sp.at),
            reason,
        };
        let acc = catch_unwind(AssertUnwindSafe(|| self.acc.decode(&self.buf)))
            .unwrap_or_else(|panic| Err(StageError::from_panic(&*panic).to_string()))
            .map_err(&corrupt)?;
        if acc.key != *key {
            return Err(corrupt(format!("record holds key {:?}", acc.key)));
        }
        self.figures.reloads.fetch_add(1, Relaxed);
        self.ops.reloaded.increment(1);
        let times = times.or_else(|| {
            self.policy.has_deadlines().then(|| {
                Box::new(Times {
                    born: now,
                    touched: now,
                    timer: None,
                })
            })
        });
        Ok(Resident { acc, times })
    }

    /// A spilled state could not be read back: one failure for the stage's error policy,
    /// the state's other items absorbed into it.
    fn lost(
        &mut self,
        items: u64,
        seq: u64,
        timer: Option<delay_queue::Key>,
        error: SpillError,
        tally: &mut Tally,
    ) {
        if let Some(t) = timer {
            self.timers.remove(&t);
        }
        tracing::warn!(stage = %self.ctx.stage_id, %error, "spilled state lost");
        self.fail(
            ItemFailure::consumed(seq, StageError::from_error(error)),
            tally,
        );
        tally.absorbed += items.saturating_sub(1);
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

    /// A key flushed before completion: emitted partially when the policy allows, otherwise
    /// discarded.
    fn flush_entry(
        &mut self,
        r: Resident<A::Key, A::State>,
        action: Action,
        out: &mut Vec<Envelope<A::Out>>,
        tally: &mut Tally,
    ) {
        let meta = Meta::of(&r.acc);
        if !self.policy.partial_flush {
            tally.count_drop(DropReason::Discarded, meta.items);
            return;
        }
        match catch_unwind(AssertUnwindSafe(|| self.acc.flush(r.acc))) {
            Ok(Some(o)) => self.emit(o, meta, action, out, tally),
            Ok(None) => tally.count_drop(DropReason::Discarded, meta.items),
            Err(panic) => {
                let error = StageError::from_panic(&*panic);
                self.fail(ItemFailure::consumed(meta.last_seq, error), tally);
                tally.absorbed += meta.items.saturating_sub(1);
            }
        }
    }

    fn emit(
        &mut self,
        output: A::Out,
        meta: Meta,
        action: Action,
        out: &mut Vec<Envelope<A::Out>>,
        tally: &mut Tally,
    ) {
        let mut env = Envelope::new(output)
            .with_seq(meta.last_seq)
            .with_timestamp(meta.last_ts)
            .with_cost(Cost {
                bytes: u32::try_from(meta.bytes).unwrap_or(u32::MAX),
                cpu_hint: 0.0,
            });
        if let Some(headers) = self.headers.get(meta.score, meta.spilled) {
            env.share_extras(headers);
        }
        out.push(env);
        tally.absorbed += meta.items.saturating_sub(1);
        match action {
            Action::Completed => self.ops.completed.increment(1),
            Action::PartialFlush => self.ops.partial_flush.increment(1),
            Action::TtlFlush => self.ops.ttl_flush.increment(1),
        }
    }

    /// A deadline fired for `key`: flush it if it is due, or set its next deadline.
    fn expire(
        &mut self,
        key: A::Key,
        now: Instant,
        out: &mut Vec<Envelope<A::Out>>,
        tally: &mut Tally,
    ) {
        if let Some(r) = self.table.peek_mut(&key) {
            let Some(times) = r.times.as_mut() else {
                return;
            };
            times.timer = None;
            let (born, touched) = (times.born, times.touched);
            match self.due(born, touched) {
                Some((at, _)) if at > now => {
                    let t = self.timers.insert_at(key.clone(), at);
                    if let Some(times) = self.table.peek_mut(&key).and_then(|r| r.times.as_mut()) {
                        times.timer = Some(t);
                    }
                }
                Some((_, action)) => {
                    if let Some(r) = self.take(&key) {
                        self.flush_entry(r, action, out, tally);
                    }
                }
                None => {}
            }
        } else if let Some(times) = self.spill_times.get_mut(&key) {
            times.timer = None;
            let (born, touched) = (times.born, times.touched);
            match self.due(born, touched) {
                Some((at, _)) if at > now => {
                    let t = self.timers.insert_at(key.clone(), at);
                    if let Some(times) = self.spill_times.get_mut(&key) {
                        times.timer = Some(t);
                    }
                }
                Some((_, action)) => {
                    let times = self.spill_times.remove(&key);
                    if let Some(sp) = self.spilled.remove(&key) {
                        let (items, seq) = (sp.items, sp.last_seq);
                        match self.reload(&key, sp, times, now) {
                            Ok(r) => self.flush_entry(r, action, out, tally),
                            Err(e) => self.lost(items, seq, None, e, tally),
                        }
                    }
                }
                None => {}
            }
        }
    }

    /// Updates the reservation (once per batch) and, over the budget, spills cold keys (the
    /// CLOCK hand's victims) in one round, written with one append.
    async fn relieve(&mut self, tally: &mut Tally) {
        self.reservation.resize(self.resident_bytes);
        if !self.policy.spill_allowed || !self.budget.is_over() || self.table.len() == 0 {
            return;
        }
        let stats = self.budget.stats();
        let Some(limit) = stats.limit else { return };
        // Free what is over, plus an eighth of the budget so spills come in rounds.
        let excess = stats.in_use.saturating_sub(limit) + limit / 8;
        let goal = self.resident_bytes.saturating_sub(excess);
        if self.store.is_none() {
            match SpillStore::open(self.policy.spill_dir.as_deref()) {
                Ok(mut s) => {
                    if let Some(bytes) = self.policy.spill_segment_bytes {
                        s.set_segment_bytes(bytes);
                    }
                    if let Some(fraction) = self.policy.spill_compact_below {
                        s.set_compact_below(fraction);
                    }
                    self.store = Some(s);
                }
                Err(e) => {
                    self.policy.spill_allowed = false;
                    self.failures.stage_error(StageError::from_error(e), tally);
                    return;
                }
            }
        }
        let mut spilled = 0u64;
        let mut slice = Slice::new();
        while self.resident_bytes > goal {
            let Some(mut r) = self.table.evict() else {
                break;
            };
            self.resident_bytes = self.resident_bytes.saturating_sub(self.mem_of(&r));
            r.acc.spilled = true;
            let written = match self.store.as_mut() {
                Some(store) => {
                    // Encoded straight into the store's open block.
                    let (acc, entry) = (&self.acc, &r.acc);
                    store.append_with(|buf| {
                        catch_unwind(AssertUnwindSafe(|| acc.encode(entry, buf))).unwrap_or_else(
                            |panic| {
                                Err(SpillError::Encode(
                                    StageError::from_panic(&*panic).to_string(),
                                ))
                            },
                        )
                    })
                }
                None => Err(SpillError::Encode("no spill store".into())),
            };
            match written {
                Ok(at) => {
                    spilled += 1;
                    if let Some(times) = r.times.take() {
                        self.spill_times.insert(r.acc.key.clone(), times);
                    }
                    self.spilled.insert(
                        r.acc.key,
                        Spilled {
                            at,
                            items: r.acc.items,
                            last_seq: r.acc.last_seq,
                        },
                    );
                }
                Err(e) => {
                    let timer = r.times.and_then(|t| t.timer);
                    self.lost(r.acc.items, r.acc.last_seq, timer, e, tally);
                    break;
                }
            }
            slice.step().await;
        }
        if let Some(Err(e)) = self.store.as_mut().map(SpillStore::flush) {
            self.failures.stage_error(StageError::from_error(e), tally);
        }
        self.ops.spilled.increment(spilled);
        self.figures.spills.fetch_add(spilled, Relaxed);
        self.reservation.resize(self.resident_bytes);
    }

    /// Compacts the oldest spill segment due for it (few live records left), one per call:
    /// the records the index still points at are appended again, the index moves to the
    /// copies and the segment file is deleted. Yields like a spill round. A segment with a
    /// block that cannot be read or a record that cannot be decoded is left as it is (the
    /// keys it holds fail when they are reloaded, as they would have without compaction).
    async fn compact(&mut self, tally: &mut Tally) {
        let due = match self.store.as_mut().map(SpillStore::next_compaction) {
            Some(Ok(Some(blocks))) => blocks,
            Some(Err(e)) => {
                self.failures.stage_error(StageError::from_error(e), tally);
                return;
            }
            _ => return,
        };
        let mut block = std::mem::take(&mut self.buf);
        let copied = self.copy_live(due.clone(), &mut block).await;
        self.buf = block;
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let done = copied.and_then(|intact| {
            store.flush()?;
            if intact {
                store.retire(due.start)
            } else {
                store.keep(due.start);
                Ok(())
            }
        });
        if let Err(e) = done {
            self.failures.stage_error(StageError::from_error(e), tally);
        }
    }

    /// Appends again the records of `blocks` that the index still points at and moves the
    /// index to the copies. `Ok(false)` when a block could not be read or a record decoded.
    async fn copy_live(
        &mut self,
        blocks: Range<u32>,
        block: &mut Vec<u8>,
    ) -> Result<bool, SpillError> {
        let mut slice = Slice::new();
        for b in blocks {
            let Some(store) = self.store.as_mut() else {
                return Ok(false);
            };
            if store.read_block(b, block).is_err() {
                return Ok(false);
            }
            for (pos, bytes) in block_records(block) {
                let Ok(Ok(acc)) = catch_unwind(AssertUnwindSafe(|| self.acc.decode(bytes))) else {
                    return Ok(false);
                };
                let at = RecordRef::new(b, pos);
                let live = self.spilled.get_mut(&acc.key).filter(|sp| { sp.at } == at);
                if let (Some(sp), Some(store)) = (live, self.store.as_mut()) {
                    sp.at = store.append(bytes)?;
                }
                slice.step().await;
            }
        }
        Ok(true)
    }

    fn publish(&self) {
        let f = &self.figures;
        f.resident_keys.store(self.table.len() as u64, Relaxed);
        f.resident_bytes.store(self.resident_bytes, Relaxed);
        f.spilled_keys.store(self.spilled.len() as u64, Relaxed);
        if let Some(store) = &self.store {
            let s = store.stats();
            f.spill_records.store(s.records, Relaxed);
            f.spill_raw_bytes.store(s.raw_bytes, Relaxed);
            f.spill_stored_bytes.store(s.stored_bytes, Relaxed);
            f.spill_segments.store(s.segments, Relaxed);
            f.spill_disk_bytes.store(s.disk_bytes, Relaxed);
            f.spill_reclaimed_bytes.store(s.reclaimed_bytes, Relaxed);
            f.spill_compactions.store(s.compactions, Relaxed);
        }
    }

    async fn on_batch(&mut self, batch: Batch<A::In>, next: &mut dyn Downstream<A::Out>) {
        let started = std::time::Instant::now();
        let n = batch.len() as u64;
        let mut tally = Tally {
            received: n,
            ..Tally::default()
        };
        if self.failures.failed {
            tally.count_drop(DropReason::StageFailed, n);
            self.failures.stats.add(&tally, None);
            return;
        }
        let now = Instant::now();
        let mut out = Vec::new();
        let mut slice = Slice::new();
        let mut items = batch.into_items().into_iter();
        // Keys are taken, and their index entries prefetched, PREFETCH_AHEAD items early
        // (the items stay in the batch: only the keys wait in the ring).
        let mut keys = std::collections::VecDeque::with_capacity(PREFETCH_AHEAD);
        let take_key = |stage: &Self, item: &Envelope<A::In>| {
            let key = stage.key_of(item);
            if let Ok(k) = &key {
                stage.table.prefetch(k);
            }
            key
        };
        for item in items.as_slice().iter().take(PREFETCH_AHEAD) {
            keys.push_back(take_key(self, item));
        }
        while let Some(item) = items.next() {
            if let Some(ahead) = items.as_slice().get(PREFETCH_AHEAD - 1) {
                keys.push_back(take_key(self, ahead));
            }
            let key = match keys.pop_front() {
                Some(key) => key,
                None => self.key_of(&item),
            };
            self.ingest(item, key, now, &mut out, &mut tally);
            slice.step().await;
        }
        self.relieve(&mut tally).await;
        self.compact(&mut tally).await;
        self.publish();
        tally.emitted = out.len() as u64;
        self.failures.stats.add(&tally, Some(started.elapsed()));
        if !out.is_empty() {
            next.push(Batch::from_items(out)).await;
        }
    }

    async fn on_timer(&mut self, first: A::Key, next: &mut dyn Downstream<A::Out>) {
        let now = Instant::now();
        let mut tally = Tally::default();
        let mut out = Vec::new();
        let mut key = Some(first);
        while let Some(k) = key.take() {
            if !self.failures.failed {
                self.expire(k, now, &mut out, &mut tally);
            }
            key = std::future::poll_fn(|cx| self.timers.poll_expired(cx))
                .now_or_never()
                .flatten()
                .map(|e| e.into_inner());
        }
        self.relieve(&mut tally).await;
        self.compact(&mut tally).await;
        self.publish();
        tally.emitted = out.len() as u64;
        self.failures.stats.add(&tally, None);
        if !out.is_empty() {
            next.push(Batch::from_items(out)).await;
        }
    }

    /// End of input: flushes (or discards) every key, in chunks of a batch.
    async fn close(&mut self, next: &mut dyn Downstream<A::Out>) {
        let chunk = self.failures.run.batch_size.max(1);
        let mut tally = Tally::default();
        let mut out = Vec::new();
        let mut slice = Slice::new();
        let residents = self.table.drain();
        self.resident_bytes = 0;
        self.timers.clear();
        self.spill_times = Shards::new();
        for r in residents {
            if self.failures.failed {
                tally.count_drop(DropReason::StageFailed, r.acc.items);
            } else {
                self.flush_entry(r, Action::PartialFlush, &mut out, &mut tally);
            }
            if out.len() >= chunk {
                self.ship(&mut out, &mut tally, next).await;
            }
            slice.step().await;
        }
        // Spilled keys: the log is read once, block by block in order, and a record is
        // flushed when the index still points at it (older copies of keys reloaded and spilled
        // again are skipped). Nothing is gathered or sorted: memory only shrinks, with the
        // index, as keys go.
        let mut unreadable: BTreeMap<u32, String> = BTreeMap::new();
        let blocks = match self.store.as_mut().map(|s| (s.flush(), s.block_ranges())) {
            Some((Ok(()), blocks)) => blocks,
            Some((Err(e), _)) => {
                self.failures
                    .stage_error(StageError::from_error(e), &mut tally);
                Vec::new()
            }
            None => Vec::new(),
        };
        let mut block = std::mem::take(&mut self.buf);
        for b in blocks.into_iter().flatten() {
            if self.spilled.is_empty() {
                break;
            }
            let Some(store) = self.store.as_mut() else {
                break;
            };
            if let Err(e) = store.read_block(b, &mut block) {
                let reason = match e {
                    SpillError::Corrupt { reason, .. } => reason,
                    other => other.to_string(),
                };
                unreadable.insert(b, reason);
                continue;
            }
            for (pos, bytes) in block_records(&block) {
                let Ok(Ok(acc)) = catch_unwind(AssertUnwindSafe(|| self.acc.decode(bytes))) else {
                    // Its key is unknown here: reported below if the index points at it.
                    continue;
                };
                if self.spilled.get(&acc.key).map(|sp| sp.at) != Some(RecordRef::new(b, pos)) {
                    continue;
                }
                let Some(sp) = self.spilled.remove(&acc.key) else {
                    continue;
                };
                if self.failures.failed {
                    tally.count_drop(DropReason::StageFailed, sp.items);
                    continue;
                }
                self.figures.reloads.fetch_add(1, Relaxed);
                self.ops.reloaded.increment(1);
                let r = Resident { acc, times: None };
                self.flush_entry(r, Action::PartialFlush, &mut out, &mut tally);
                if out.len() >= chunk {
                    self.ship(&mut out, &mut tally, next).await;
                }
                slice.step().await;
            }
        }
        self.buf = block;
        // What is left could not be read back.
        let left = std::mem::replace(&mut self.spilled, Shards::new());
        for (key, sp) in left.into_entries() {
            if self.failures.failed {
                tally.count_drop(DropReason::StageFailed, sp.items);
                continue;
            }
            let reason = unreadable
                .get(&sp.at.block())
                .cloned()
                .unwrap_or_else(|| "no readable record where the index points".into());
            let error = SpillError::Corrupt {
                key: format!("{key:?}"),
                path: self
                    .store
                    .as_ref()
                    .map(|s| s.path_of(sp.at).to_owned())
                    .unwrap_or_default(),
                offset: self.store.as_ref().map_or(0, |s| s.offset_of(sp.at)),
                reason,
            };
            self.lost(sp.items, sp.last_seq, None, error, &mut tally);
            slice.step().await;
        }
        self.ship(&mut out, &mut tally, next).await;
        self.reservation.resize(0);
        self.publish();
        self.store = None;
    }

    async fn ship(
        &mut self,
        out: &mut Vec<Envelope<A::Out>>,
        tally: &mut Tally,
        next: &mut dyn Downstream<A::Out>,
    ) {
        tally.emitted = out.len() as u64;
        self.failures.stats.add(tally, None);
        *tally = Tally::default();
        if !out.is_empty() {
            next.push(Batch::from_items(std::mem::take(out))).await;
        }
    }
}

enum Event<K, T> {
    Timer(K),
    Input(Option<Batch<T>>),
}

/// One worker's task: input and deadlines, then the end-of-input flush.
async fn run_worker<A: Accumulator>(
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
async fn partition<A: Accumulator>(
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

/// Wires an accumulator stage: one worker, or several fed by key hash.
pub(crate) fn wire_accumulator<A: Accumulator>(
    w: &mut Wiring<'_>,
    instances: AccInstances<A>,
    policy: AccumulatorPolicy,
) -> Result<(), PipelineError> {
    let out = w.output::<A::Out>(0)?;
    let rx = w.input_edge::<A::In>(1);
    let workers = w.resolved.parallelism.initial_workers().max(1);
    let span = w.ctx.span.clone();
    let mut all = Vec::new();
    let flow = w.resolved.flow.clone();
    // Every worker's figures, known once all are made: read by each for the pressure sum.
    let shared = Arc::new(std::sync::OnceLock::new());
    let mut stage = |acc: A, w: &Wiring<'_>| {
        let figures = Arc::new(AccFigures::default());
        all.push(figures.clone());
        AccStage::new(
            acc,
            policy.clone(),
            w.failures(),
            w.ctx.clone(),
            w.memory.clone(),
            figures,
        )
    };
    match instances {
        AccInstances::One(acc) if workers == 1 => {
            let s = stage(acc, w);
            w.run.spawn(
                w.index,
                run_worker(rx, s, out.into_downstream(), flow.clone(), shared.clone())
                    .instrument(span),
            );
        }
        AccInstances::One(_) => {
            return Err(PipelineError::Task {
                stage: w.stats.id.to_string(),
                reason: "a parallel accumulator needs a factory (accumulate_with)".into(),
            });
        }
        AccInstances::Many(make) if workers == 1 => {
            let s = stage(make(), w);
            w.run.spawn(
                w.index,
                run_worker(rx, s, out.into_downstream(), flow.clone(), shared.clone())
                    .instrument(span),
            );
        }
        AccInstances::Many(make) => {
            let tx = out.into_sender(w.run, w.index);
            let lane_buffer = BufferPolicy::new(
                (w.resolved.buffer.capacity / workers).max(1),
                DropPolicy::Block,
            );
            let mut lanes = Vec::with_capacity(workers);
            for _ in 0..workers {
                let (lane_tx, lane_rx) = channel::edge(lane_buffer, Arc::new(EdgeStats::default()));
                lanes.push(lane_tx);
                let s = stage(make(), w);
                let next = Box::new(EdgeOut {
                    tx: Some(tx.clone()),
                });
                w.run.spawn(
                    w.index,
                    run_worker(lane_rx, s, next, flow.clone(), shared.clone())
                        .instrument(span.clone()),
                );
            }
            w.run.spawn(
                w.index,
                partition(rx, lanes, make(), w.failures()).instrument(span),
            );
        }
    }
    let _ = shared.set(all.clone());
    w.stats
        .set_extra_metrics(ExtraMetrics(Arc::new(move || figures_metrics(&all))));
    Ok(())
}
