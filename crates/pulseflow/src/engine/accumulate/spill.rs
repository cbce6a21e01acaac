//! The stage's side of spilling: over the memory budget, cold keys are encoded into the spill
//! store and indexed; a spilled key is read back when its next item (or deadline) comes; the
//! oldest segment due for compaction is copied out, one per batch.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering::Relaxed;

use tokio::time::Instant;
use tokio_util::time::delay_queue;

use super::worker::Slice;
use super::{AccStage, Resident, Spilled, Times};
use crate::accumulate::{Accumulator, RecordRef, SpillError, SpillStore, block_records};
use crate::error::{ItemFailure, StageError};
use crate::metrics::Tally;

impl<A: Accumulator> AccStage<A> {
    /// Reads a spilled key back.
    pub(super) fn reload(
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
    pub(super) fn lost(
        &mut self,
        key: &A::Key,
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
        self.settle_held(key, self.failures.outcome());
        self.fail(
            ItemFailure::consumed(seq, StageError::from_error(error)),
            tally,
        );
        tally.absorbed += items.saturating_sub(1);
    }

    /// Updates the reservation (once per batch) and, over the budget, spills cold keys (the
    /// CLOCK hand's victims) in one round, written with one append.
    pub(super) async fn relieve(&mut self, tally: &mut Tally) {
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
                    self.lost(&r.acc.key, r.acc.items, r.acc.last_seq, timer, e, tally);
                    break;
                }
            }
            if slice.due() {
                slice.give_way().await;
            }
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
    pub(super) async fn compact(&mut self, tally: &mut Tally) {
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
                if slice.due() {
                    slice.give_way().await;
                }
            }
        }
        Ok(true)
    }
}
