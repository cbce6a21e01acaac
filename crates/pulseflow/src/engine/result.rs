//! [`PipelineResult`]: what a run did.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::dead_letter::DeadLetter;
use super::run::RunShared;
use crate::error::PipelineError;
use crate::metrics::{Accounting, StageRuntimeState, StageStatus, Totals};

/// The outcome of a run.
#[derive(Debug)]
pub struct PipelineResult {
    /// No failure, no abort, and every item accounted for.
    pub success: bool,
    /// Why it did not succeed.
    pub error: Option<PipelineError>,
    /// Items that entered the pipeline from its sources.
    pub processed: u64,
    /// Errors raised by all stages (including those retried successfully).
    pub errors: u64,
    /// Wall-clock duration.
    pub duration: Duration,
    /// Final state of every stage, by id.
    pub stages: BTreeMap<String, StageRuntimeState>,
    /// Pipeline-wide totals.
    pub accounting: Accounting,
    /// Dead letters kept (when no dead-letter sink was configured).
    pub dead_letters: Vec<DeadLetter>,
    /// Dead letters beyond the kept ones, counted only.
    pub dead_letters_not_kept: u64,
}

pub(crate) fn snapshot(run: &RunShared, index: usize) -> StageRuntimeState {
    let outputs = run.consumers[index]
        .iter()
        .filter_map(|&c| {
            let stats = &run.stages[c];
            let input = stats.input.lock().clone();
            input.map(|e| e.snapshot(&stats.id))
        })
        .collect();
    run.stages[index].snapshot(outputs)
}

/// Every stage's state, with its shares of time and the bottleneck marked.
pub(crate) fn snapshot_all(run: &RunShared) -> Vec<StageRuntimeState> {
    let totals = load_totals(run);
    let workers: Vec<u64> = run.stages.iter().map(|s| s.workers()).collect();
    let (loads, bottleneck) = run
        .load
        .lock()
        .observe(std::time::Instant::now(), &totals, &workers);
    (0..run.stages.len())
        .map(|i| {
            let mut state = snapshot(run, i);
            state.load = loads.get(i).copied();
            if let Some(load) = &state.load {
                run.stages[i].publish_load(load);
            }
            state.bottleneck = bottleneck == Some(i);
            state
        })
        .collect()
}

/// Each stage's running time totals. A stage is backpressured while it waits on the stages it
/// feeds: on the full input buffer of one with a buffer of its own, and for one fused to it
/// (run in its task, on its output), while that one works or waits in turn.
fn load_totals(run: &RunShared) -> Vec<Totals> {
    /// Time stage `i`'s producers waited on it.
    fn waited_on(run: &RunShared, i: usize, memo: &mut [Option<(u64, u64)>]) -> u64 {
        let stats = &run.stages[i];
        match stats.input.lock().as_ref() {
            Some(edge) => edge
                .blocked_nanos
                .load(std::sync::atomic::Ordering::Relaxed),
            None => stats.busy_nanos() + totals(run, i, memo).1,
        }
    }
    /// Stage `i`'s (busy, backpressured).
    fn totals(run: &RunShared, i: usize, memo: &mut [Option<(u64, u64)>]) -> (u64, u64) {
        if let Some(known) = memo[i] {
            return known;
        }
        let backpressured = run.consumers[i]
            .iter()
            .map(|&c| waited_on(run, c, memo))
            .sum();
        let t = (run.stages[i].busy_nanos(), backpressured);
        memo[i] = Some(t);
        t
    }
    let mut memo = vec![None; run.stages.len()];
    let mut fed = vec![false; run.stages.len()];
    for &c in run.consumers.iter().flatten() {
        fed[c] = true;
    }
    (0..run.stages.len())
        .map(|i| {
            let (busy, backpressured) = totals(run, i, &mut memo);
            Totals {
                busy,
                backpressured,
                // Nothing waits on a source.
                input_blocked: if fed[i] {
                    waited_on(run, i, &mut memo)
                } else {
                    0
                },
            }
        })
        .collect()
}

impl PipelineResult {
    pub(crate) fn refused(error: PipelineError) -> Self {
        Self {
            success: false,
            error: Some(error),
            processed: 0,
            errors: 0,
            duration: Duration::ZERO,
            stages: BTreeMap::new(),
            accounting: Accounting::default(),
            dead_letters: Vec::new(),
            dead_letters_not_kept: 0,
        }
    }

    pub(crate) fn collect(run: &Arc<RunShared>, duration: Duration) -> Self {
        let aborted = run.is_aborted();
        for stats in &run.stages {
            if aborted && stats.status() != StageStatus::Completed {
                stats.set_status(StageStatus::Aborted);
            }
        }
        let stages: BTreeMap<String, StageRuntimeState> = snapshot_all(run)
            .into_iter()
            .map(|s| (s.stage_id.clone(), s))
            .collect();
        let accounting = Accounting::from_states(stages.values());
        let mut error = run.take_failure();
        if aborted {
            error = Some(PipelineError::Aborted {
                in_flight: accounting.unaccounted(),
            });
        } else if error.is_none() && !accounting.reconciles() {
            error = Some(PipelineError::Task {
                stage: run.pipeline_id.to_string(),
                reason: format!(
                    "{} items in, {} accounted for",
                    accounting.items_in(),
                    accounting.items_accounted()
                ),
            });
        }
        let (dead_letters, dead_letters_not_kept) = run.dead_letters.take();
        Self {
            success: error.is_none(),
            error,
            processed: accounting.ingested,
            errors: stages.values().map(|s| s.errors).sum(),
            duration,
            stages,
            accounting,
            dead_letters,
            dead_letters_not_kept,
        }
    }

    /// The final state of one stage.
    pub fn stage(&self, id: &str) -> Option<&StageRuntimeState> {
        self.stages.get(id)
    }

    /// Stages whose own counts do not balance (empty when every stage accounts for its items).
    pub fn unbalanced_stages(&self) -> Vec<&str> {
        self.stages
            .values()
            .filter(|s| {
                !s.counts.balances()
                    || s.input
                        .as_ref()
                        .is_some_and(|e| e.sent != e.delivered + e.dropped_total() + e.depth)
            })
            .map(|s| s.stage_id.as_str())
            .collect()
    }
}
