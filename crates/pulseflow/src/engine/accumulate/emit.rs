//! What leaves the stage: outputs of completed keys and of keys flushed before completion
//! (emitted partially or discarded, by policy), with their shared headers, shipped downstream
//! in batches.

use std::panic::{AssertUnwindSafe, catch_unwind};

use super::{AccStage, Resident};
use crate::accumulate::{Accumulator, AccumulatorState};
use crate::ack::{Ack, Outcome};
use crate::engine::downstream::Downstream;
use crate::envelope::{AttrValue, Batch, Cost, Envelope, Timestamp};
use crate::error::{ItemFailure, StageError};
use crate::metrics::{DropReason, Tally};

/// Why a key left the table.
#[derive(Debug, Clone, Copy)]
pub(super) enum Action {
    Completed,
    PartialFlush,
    TtlFlush,
}

/// What an emitted output says about its key.
pub(super) struct Meta {
    pub(super) items: u64,
    bytes: u64,
    last_seq: u64,
    last_ts: Timestamp,
    pub(super) score: f64,
    spilled: bool,
}

impl Meta {
    pub(super) fn of<K, S>(a: &AccumulatorState<K, S>) -> Self {
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

/// The headers of emitted envelopes, built once per score and spilled flag and shared by
/// the outputs that carry the same (an output's headers cost no allocation of their own; the
/// envelope copies them if someone sets another header).
#[derive(Default)]
pub(super) struct Headers {
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
            env.set_attr("acc.completeness", AttrValue::Float(score));
            env.set_header("acc.spilled", if spilled { "true" } else { "false" });
            *slot = Some((bits, env));
        }
        slot.as_ref().map(|(_, env)| env)
    }
}

impl<A: Accumulator> AccStage<A> {
    /// A key flushed before completion: emitted partially when the policy allows, otherwise
    /// discarded.
    pub(super) fn flush_entry(
        &mut self,
        r: Resident<A::Key, A::State>,
        action: Action,
        out: &mut Vec<Envelope<A::Out>>,
        tally: &mut Tally,
    ) {
        let meta = Meta::of(&r.acc);
        let acks = self.held_acks(&r.acc.key);
        if !self.policy.partial_flush {
            tally.count_drop(DropReason::Discarded, meta.items);
            settle(acks, Outcome::Dropped);
            return;
        }
        match catch_unwind(AssertUnwindSafe(|| self.acc.flush(r.acc))) {
            Ok(Some(o)) => self.emit(o, meta, action, acks, out, tally),
            Ok(None) => {
                tally.count_drop(DropReason::Discarded, meta.items);
                settle(acks, Outcome::Dropped);
            }
            Err(panic) => {
                let error = StageError::from_panic(&*panic);
                settle(acks, self.failures.outcome());
                self.fail(ItemFailure::consumed(meta.last_seq, error), tally);
                tally.absorbed += meta.items.saturating_sub(1);
            }
        }
    }

    pub(super) fn emit(
        &mut self,
        output: A::Out,
        meta: Meta,
        action: Action,
        acks: Vec<Ack>,
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
        // The output carries the acks of the items it folded: they resolve when it leaves.
        env.extend_acks(acks);
        out.push(env);
        tally.absorbed += meta.items.saturating_sub(1);
        match action {
            Action::Completed => self.ops.completed.increment(1),
            Action::PartialFlush => self.ops.partial_flush.increment(1),
            Action::TtlFlush => self.ops.ttl_flush.increment(1),
        }
    }

    pub(super) async fn ship(
        &mut self,
        out: &mut Vec<Envelope<A::Out>>,
        tally: &mut Tally,
        next: &mut dyn Downstream<A::Out>,
    ) {
        tally.emitted = out.len() as u64;
        self.failures.stats.add(tally, None);
        *tally = Tally::default();
        if !out.is_empty() {
            let taps = &self.failures.stats.taps;
            taps.offer(|| crate::engine::TapBatch::of_items(out));
            next.push(Batch::from_items(std::mem::take(out))).await;
        }
    }
}

/// Records one outcome for every item `acks` stand for.
fn settle(acks: Vec<Ack>, outcome: Outcome) {
    for ack in acks {
        ack.record(outcome, 1);
    }
}
