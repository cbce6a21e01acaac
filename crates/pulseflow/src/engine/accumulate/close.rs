//! End of input: every resident key is flushed (or discarded), then the spill log is read once,
//! block by block in order, flushing each spilled key the index still points at; keys whose
//! record cannot be read back fail under the error policy.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering::Relaxed;

use super::emit::Action;
use super::worker::Slice;
use super::{AccStage, Resident};
use crate::accumulate::table::Shards;
use crate::accumulate::{Accumulator, RecordRef, SpillError, block_records};
use crate::ack::Outcome;
use crate::engine::downstream::Downstream;
use crate::error::StageError;
use crate::metrics::{DropReason, Tally};

impl<A: Accumulator> AccStage<A> {
    /// End of input: flushes (or discards) every key, in chunks of a batch.
    pub(super) async fn close(&mut self, next: &mut dyn Downstream<A::Out>) {
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
                self.settle_held(&r.acc.key, Outcome::Failed);
            } else {
                self.flush_entry(r, Action::PartialFlush, &mut out, &mut tally);
            }
            if out.len() >= chunk {
                self.ship(&mut out, &mut tally, next).await;
            }
            if slice.due() {
                slice.give_way().await;
            }
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
                    self.settle_held(&acc.key, Outcome::Failed);
                    continue;
                }
                self.figures.reloads.fetch_add(1, Relaxed);
                self.ops.reloaded.increment(1);
                let r = Resident { acc, times: None };
                self.flush_entry(r, Action::PartialFlush, &mut out, &mut tally);
                if out.len() >= chunk {
                    self.ship(&mut out, &mut tally, next).await;
                }
                if slice.due() {
                    slice.give_way().await;
                }
            }
        }
        self.buf = block;
        // What is left could not be read back.
        let left = std::mem::replace(&mut self.spilled, Shards::new());
        for (key, sp) in left.into_entries() {
            if self.failures.failed {
                tally.count_drop(DropReason::StageFailed, sp.items);
                self.settle_held(&key, Outcome::Failed);
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
            self.lost(&key, sp.items, sp.last_seq, None, error, &mut tally);
            if slice.due() {
                slice.give_way().await;
            }
        }
        self.ship(&mut out, &mut tally, next).await;
        self.reservation.resize(0);
        self.publish();
        self.store = None;
    }
}
