//! [`PipelineResult`]: what a run did.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::dead_letter::DeadLetter;
use super::run::RunShared;
use crate::error::PipelineError;
use crate::metrics::{Accounting, StageRuntimeState, StageStatus};

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
        let mut stages = BTreeMap::new();
        for (i, stats) in run.stages.iter().enumerate() {
            if aborted && stats.status() != StageStatus::Completed {
                stats.set_status(StageStatus::Aborted);
            }
            stages.insert(stats.id.to_string(), snapshot(run, i));
        }
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
