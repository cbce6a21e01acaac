//! Deadlines: a key's `max_latency` (since its first item) and TTL (since its latest) are one
//! entry in the worker's deadline queue; when it fires the key is flushed if it is due, resident
//! or on disk, or its entry is set again.

use futures::FutureExt;
use tokio::time::Instant;

use super::AccStage;
use super::emit::Action;
use crate::accumulate::Accumulator;
use crate::engine::downstream::Downstream;
use crate::envelope::{Batch, Envelope};
use crate::metrics::Tally;

impl<A: Accumulator> AccStage<A> {
    /// When a key's deadline is, and what flushing it then is called.
    pub(super) fn due(&self, born: Instant, touched: Instant) -> Option<(Instant, Action)> {
        let ttl = self.policy.completeness_ttl.map(|t| touched + t);
        let latency = self.policy.max_latency.map(|l| born + l);
        match (ttl, latency) {
            (Some(t), Some(l)) if l < t => Some((l, Action::PartialFlush)),
            (Some(t), _) => Some((t, Action::TtlFlush)),
            (None, Some(l)) => Some((l, Action::PartialFlush)),
            (None, None) => None,
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
                            Err(e) => self.lost(&key, items, seq, None, e, tally),
                        }
                    }
                }
                None => {}
            }
        }
    }

    pub(super) async fn on_timer(&mut self, first: A::Key, next: &mut dyn Downstream<A::Out>) {
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
            let taps = &self.failures.stats.taps;
            taps.offer(|| crate::engine::TapBatch::of_items(&out));
            next.push(Batch::from_items(out)).await;
        }
    }
}
