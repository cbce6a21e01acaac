//! Live figures of each worker (resident and spilled keys, spill store figures), summed over
//! the stage's workers for `inspect` and for accumulator-aware backpressure, and the handles
//! of the `accumulator_operations` counter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::AccStage;
use crate::accumulate::Accumulator;

/// Live figures of one worker, read by `inspect`.
#[derive(Debug, Default)]
pub(crate) struct AccFigures {
    resident_keys: AtomicU64,
    resident_bytes: AtomicU64,
    spilled_keys: AtomicU64,
    pub(super) spills: AtomicU64,
    pub(super) reloads: AtomicU64,
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
pub(super) fn pressure(all: &[Arc<AccFigures>]) -> (u64, u64) {
    all.iter().fold((0, 0), |(bytes, keys), f| {
        (
            bytes + f.resident_bytes.load(Relaxed),
            keys + f.spilled_keys.load(Relaxed),
        )
    })
}

pub(super) fn figures_metrics(all: &[Arc<AccFigures>]) -> Vec<(String, f64)> {
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

/// Handles of `accumulator_operations{stage, action}`.
pub(super) struct Ops {
    pub(super) completed: metrics::Counter,
    pub(super) partial_flush: metrics::Counter,
    pub(super) ttl_flush: metrics::Counter,
    pub(super) spilled: metrics::Counter,
    pub(super) reloaded: metrics::Counter,
}

impl Ops {
    pub(super) fn new(stage: &str) -> Self {
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

impl<A: Accumulator> AccStage<A> {
    pub(super) fn publish(&self) {
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
}
