//! A batch folded in: keys are taken (and their index entries prefetched) a few items ahead,
//! each item is folded into its key's state, admitting the key (new or reloaded) when it is
//! not resident, and the key is emitted or flushed as soon as it is done.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};

use tokio::time::Instant;

use super::emit::{Action, Meta};
use super::worker::Slice;
use super::{AccStage, Resident, Times};
use crate::accumulate::{Accumulator, AccumulatorState, CompletenessResult};
use crate::ack::Outcome;
use crate::engine::downstream::Downstream;
use crate::envelope::{Batch, Envelope};
use crate::error::{ItemFailure, StageError};
use crate::metrics::{DropReason, Tally};

/// How many items ahead of the one being folded in the stage takes keys and prefetches their
/// index entries (see `ClockTable::prefetch`): far enough that a miss to memory is over when
/// the item comes, near enough that the line is still in cache. 8 to 64 measured the same;
/// groups of 16 taken at once, then folded in, were 5-15 % slower; prefetching the slots too,
/// 8 items ahead, did not help.
const PREFETCH_AHEAD: usize = 16;

impl<A: Accumulator> AccStage<A> {
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
        self.settle_held(key, self.failures.outcome());
        self.fail(ItemFailure::consumed(seq, error), tally);
        tally.absorbed += items.saturating_sub(1);
    }

    /// The key of an item (a panic in the accumulator's `key` as an error).
    fn key_of(&self, item: &Envelope<A::In>) -> Result<A::Key, StageError> {
        catch_unwind(AssertUnwindSafe(|| self.acc.key(item)))
            .map_err(|panic| StageError::from_panic(&*panic))
    }

    /// Folds the batch's next item into its key's state (`key`: the item's key, from
    /// [`Self::key_of`]) and emits the key if it is done. The common case (a resident key that
    /// stays) runs here; admitting a key, a panic in user code and a key that leaves are out
    /// of line, so the per-item path stays small.
    ///
    /// The item stays in the batch's buffer until `update` takes it: read there by reference
    /// and moved once, straight into user code. Moved out first and then into `update`, it
    /// was copied through the stack, and reading the copy back stalled on store-to-load
    /// forwarding (a tenth of the stage's samples).
    #[inline]
    fn ingest(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<A::In>>,
        key: A::Key,
        now: Instant,
        out: &mut Vec<Envelope<A::Out>>,
        tally: &mut Tally,
    ) {
        let Some(item) = items.as_slice().first() else {
            return;
        };
        let (slot, r) = match self.table.touch_mut(&key) {
            Some(found) => found,
            None => {
                let slot = match self.enter(item, &key, now, tally) {
                    Ok(slot) => slot,
                    Err(error) => return self.refused(items, error, tally),
                };
                let Some(r) = self.table.get_mut(slot) else {
                    items.next();
                    return;
                };
                (slot, r)
            }
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
        // Items without acks (the common case) skip this in one test.
        let acks = match item.acks() {
            Some(_) => items.as_mut_slice().first_mut().and_then(take_acks),
            None => None,
        };
        let user = &mut self.acc;
        let mut taken = false;
        let run = catch_unwind(AssertUnwindSafe(|| {
            let before = user.state_size(&a.state) as u64;
            if let Some(item) = items.next() {
                taken = true;
                user.update(&mut a.state, item);
            }
            let after = user.state_size(&a.state) as u64;
            (after, before, user.check(a))
        }));
        let (after, before, verdict) = match run {
            Ok(done) => done,
            Err(panic) => {
                if !taken {
                    // `state_size` panicked before `update` took the item: it fails with
                    // the key all the same.
                    items.next();
                }
                return self.panicked(&key, slot, seq, acks, panic, tally);
            }
        };
        self.resident_bytes = (self.resident_bytes + after).saturating_sub(before);
        let over = self.policy.max_items.is_some_and(|m| a.items >= m)
            || self.policy.max_bytes.is_some_and(|m| a.bytes >= m);
        let stays = matches!(verdict, CompletenessResult::Incomplete) && !over;
        if stays && acks.is_none() {
            // The key stays: the table finds the state by the key it holds.
            if a.key != key {
                a.key = key;
            }
            return;
        }
        if let Some(acks) = acks {
            self.hold(&key, &acks);
        }
        if stays {
            if let Some(r) = self.table.get_mut(slot) {
                if r.acc.key != key {
                    r.acc.key = key;
                }
            }
            return;
        }
        self.leave(key, slot, verdict, now, out, tally);
    }

    /// The batch's next item was not admitted: it fails with the accumulator's error, or
    /// (`None`) it was dropped already.
    #[cold]
    #[inline(never)]
    fn refused(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<A::In>>,
        error: Option<StageError>,
        tally: &mut Tally,
    ) {
        if let (Some(item), Some(error)) = (items.next(), error) {
            self.fail(ItemFailure::new(item, error), tally);
        }
    }

    /// A key not resident: dropped if it is closed, otherwise admitted (reloaded or new).
    /// Its slot; `Err(None)` when the item was dropped here, the error of the accumulator's
    /// `create` when it panicked.
    #[inline(never)]
    fn enter(
        &mut self,
        item: &Envelope<A::In>,
        key: &A::Key,
        now: Instant,
        tally: &mut Tally,
    ) -> Result<u32, Option<StageError>> {
        // A key that completed left the table: a closed one is never resident.
        if self.policy.closed_ttl.is_some() && self.is_closed(key, now) {
            crate::ack::record_all([item], Outcome::Dropped);
            tally.count_drop(DropReason::Discarded, 1);
            return Err(None);
        }
        self.admit(key.clone(), now, tally).map_err(Some)
    }

    /// User code panicked on an item: its acks learn the failure and the key is poisoned.
    #[cold]
    #[inline(never)]
    fn panicked(
        &mut self,
        key: &A::Key,
        slot: u32,
        seq: u64,
        acks: Option<Vec<crate::ack::Ack>>,
        panic: Box<dyn std::any::Any + Send>,
        tally: &mut Tally,
    ) {
        let outcome = self.failures.outcome();
        acks.iter().flatten().for_each(|a| a.record(outcome, 1));
        self.poisoned(key, slot, seq, StageError::from_panic(&*panic), tally);
    }

    /// A key that is done after an update (complete, expired, or over the policy's limits)
    /// leaves the table, with an output or discarded.
    #[inline(never)]
    fn leave(
        &mut self,
        key: A::Key,
        slot: u32,
        verdict: CompletenessResult<A::Out>,
        now: Instant,
        out: &mut Vec<Envelope<A::Out>>,
        tally: &mut Tally,
    ) {
        match verdict {
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
                if let Some(ttl) = self.policy.closed_ttl {
                    self.closed.insert(key.clone(), now + ttl);
                }
                let acks = self.held_acks(&key);
                self.emit(output, meta, Action::Completed, acks, out, tally);
            }
            CompletenessResult::Expired(output) => {
                let Some(r) = self.take_slot(&key, slot) else {
                    return;
                };
                let meta = Meta::of(&r.acc);
                match output {
                    Some(o) if self.policy.partial_flush => {
                        let acks = self.held_acks(&key);
                        self.emit(o, meta, Action::PartialFlush, acks, out, tally)
                    }
                    _ => {
                        tally.count_drop(DropReason::Discarded, meta.items);
                        self.settle_held(&key, Outcome::Dropped);
                    }
                }
            }
        }
    }

    /// Whether `key` completed less than `closed_ttl` ago (forgetting it once that is over).
    /// Out of line: the fold loop stays as small as without the option.
    #[inline(never)]
    fn is_closed(&mut self, key: &A::Key, now: Instant) -> bool {
        match self.closed.get(key) {
            Some(until) if now < *until => true,
            Some(_) => {
                self.closed.remove(key);
                false
            }
            None => false,
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
                        self.lost(&key, items, last_seq, timer, e, tally);
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

    pub(super) async fn on_batch(
        &mut self,
        batch: Batch<A::In>,
        next: &mut dyn Downstream<A::Out>,
    ) {
        let started = std::time::Instant::now();
        let n = batch.len() as u64;
        let mut tally = Tally {
            received: n,
            ..Tally::default()
        };
        if self.failures.failed {
            crate::ack::record_all(batch.items(), Outcome::Failed);
            tally.count_drop(DropReason::StageFailed, n);
            self.failures.stats.add(&tally, None);
            return;
        }
        let now = Instant::now();
        let mut out = Vec::new();
        let mut slice = Slice::new();
        let mut items = batch.into_items().into_iter();
        // Keys are taken, and their index entries prefetched, PREFETCH_AHEAD items early
        // (the items stay in the batch until `update` takes each: only the keys wait, in a
        // ring where the key of item `i` sits at `i % PREFETCH_AHEAD`; a key whose extraction
        // panicked is `None` there and its error waits in `failed`, so the ring holds bare
        // keys: moving a `Result<Key, StageError>` in and out of it cost a stalled load per
        // item).
        let mut keys: [Option<A::Key>; PREFETCH_AHEAD] = std::array::from_fn(|_| None);
        let mut failed = VecDeque::new();
        let take_key = |stage: &Self, item: &Envelope<A::In>, failed: &mut VecDeque<_>| {
            let key = stage.key_of(item);
            match key {
                Ok(key) => {
                    stage.table.prefetch(&key);
                    Some(key)
                }
                Err(error) => {
                    failed.push_back(error);
                    None
                }
            }
        };
        for (place, item) in keys.iter_mut().zip(items.as_slice()) {
            *place = take_key(self, item, &mut failed);
        }
        let mut at = 0;
        while let Some(item) = items.as_slice().first() {
            let place = &mut keys[at % PREFETCH_AHEAD];
            at += 1;
            let key = match place.take() {
                Some(key) => Ok(key),
                None => failed.pop_front().map_or_else(|| self.key_of(item), Err),
            };
            if let Some(ahead) = items.as_slice().get(PREFETCH_AHEAD) {
                *place = take_key(self, ahead, &mut failed);
            }
            match key {
                Ok(key) => self.ingest(&mut items, key, now, &mut out, &mut tally),
                Err(error) => self.refused(&mut items, Some(error), &mut tally),
            }
            if slice.due() {
                slice.give_way().await;
            }
        }
        if self.closed.len() > 1024 && self.closed.len() > 2 * self.table.len() {
            // Keys closed long ago and never seen again: forgotten.
            self.closed.retain(|_, until| now < *until);
        }
        self.relieve(&mut tally).await;
        self.compact(&mut tally).await;
        self.publish();
        tally.emitted = out.len() as u64;
        self.failures.stats.add(&tally, Some(started.elapsed()));
        if !out.is_empty() {
            let taps = &self.failures.stats.taps;
            taps.offer(|| crate::engine::TapBatch::of_items(&out));
            next.push(Batch::from_items(out)).await;
        }
    }
}

/// The acks of an item that has some, taken out (kept with its key until the key's output
/// leaves).
#[cold]
#[inline(never)]
fn take_acks<T>(item: &mut Envelope<T>) -> Option<Vec<crate::ack::Ack>> {
    Some(item.take_acks())
}
