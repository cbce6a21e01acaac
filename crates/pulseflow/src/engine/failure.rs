//! Applies a stage's [`ErrorPolicy`] to failed items: retry with exponential backoff and
//! jitter, dead-letter, fail the run, or ignore. Every outcome is counted.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use super::dead_letter::DeadLetter;
use super::run::RunShared;
use crate::ack::Outcome;
use crate::envelope::Envelope;
use crate::error::{ItemFailure, PipelineError, StageError};
use crate::metrics::{DropReason, StageStats, Tally};
use crate::policy::ErrorPolicy;

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The error policy of one stage, with what it needs to act.
pub(crate) struct Failures {
    pub policy: ErrorPolicy,
    pub stats: Arc<StageStats>,
    pub run: Arc<RunShared>,
    /// Set once an item failed under `Fail`: later input is dropped as `stage_failed`.
    pub failed: bool,
}

/// What to do with a failure after counting it.
pub(crate) enum Next<T> {
    /// Wait, then try the item again (attempt number given).
    Retry(Envelope<T>, Duration, u32),
    /// Settled: dead-lettered, dropped or failed.
    Done,
}

impl Failures {
    pub fn new(policy: ErrorPolicy, stats: Arc<StageStats>, run: Arc<RunShared>) -> Self {
        Self {
            policy,
            stats,
            run,
            failed: false,
        }
    }

    /// The waits before each retry: exponential from `backoff`, with jitter.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        let (max, backoff) = match self.policy {
            ErrorPolicy::Retry {
                max_retries,
                backoff,
            } => (max_retries as usize, backoff),
            _ => (0, Duration::ZERO),
        };
        ExponentialBuilder::default()
            .with_min_delay(backoff)
            .with_max_delay(MAX_BACKOFF.max(backoff))
            .with_max_times(max)
            .with_jitter()
            .build()
            .take(max)
    }

    /// How the policy settles an item for good (after its retries): what its acks record.
    pub fn outcome(&self) -> Outcome {
        match self.policy {
            ErrorPolicy::Retry { .. } | ErrorPolicy::DeadLetter => Outcome::DeadLettered,
            ErrorPolicy::Ignore => Outcome::Dropped,
            ErrorPolicy::Fail => Outcome::Failed,
        }
    }

    /// The failure of an item that no longer exists, whose metadata (`meta`) is still here:
    /// its acks record how the policy settles it.
    pub fn consumed<T, M>(&self, meta: &Envelope<M>, error: StageError) -> ItemFailure<T> {
        if let Some(acks) = meta.acks() {
            acks.iter().for_each(|a| a.record(self.outcome(), 1));
        }
        ItemFailure::consumed(meta.seq, error)
    }

    /// Counts a failed attempt that is retried (by a stage that retries on its own, such as
    /// `map_async` inside its concurrency window).
    pub fn retried(&self, seq: u64, error: &StageError, tally: &mut Tally) {
        tally.errors += 1;
        tally.retries += 1;
        self.stats.record_error(format!("item {seq}: {error}"));
    }

    /// Counts one failure and decides its fate. `attempts` is how many tries were made;
    /// `delays` yields the next wait while retries remain. A settled item's acks record the
    /// outcome (an item that no longer exists has its acks recorded by the caller, with
    /// [`Failures::outcome`]).
    pub fn settle<T: Send + 'static>(
        &mut self,
        failure: ItemFailure<T>,
        attempts: u32,
        delays: &mut impl Iterator<Item = Duration>,
        tally: &mut Tally,
    ) -> Next<T> {
        tally.errors += 1;
        let ItemFailure { item, seq, error } = failure;

        self.stats.record_error(format!("item {seq}: {error}"));
        tracing::debug!(stage = %self.stats.id, seq, attempts, %error, "item failed");
        match self.policy {
            ErrorPolicy::Retry { .. } => match (item, delays.next()) {
                (Some(item), Some(wait)) => {
                    tally.retries += 1;
                    Next::Retry(item, wait, attempts + 1)
                }
                (item, _) => {
                    record(&item, Outcome::DeadLettered);
                    self.dead_letter(item, seq, error, attempts, tally);
                    Next::Done
                }
            },
            ErrorPolicy::DeadLetter => {
                record(&item, Outcome::DeadLettered);
                self.dead_letter(item, seq, error, attempts, tally);
                Next::Done
            }
            ErrorPolicy::Ignore => {
                record(&item, Outcome::Dropped);
                tally.count_drop(DropReason::Ignored, 1);
                Next::Done
            }
            ErrorPolicy::Fail => {
                record(&item, Outcome::Failed);
                tally.count_drop(DropReason::StageFailed, 1);
                self.failed = true;
                self.stats.set_status(crate::metrics::StageStatus::Failed);
                self.run.fail(PipelineError::Item {
                    stage: self.stats.id.to_string(),
                    seq,
                    source: error,
                });
                Next::Done
            }
        }
    }

    fn dead_letter<T: Send + 'static>(
        &self,
        item: Option<Envelope<T>>,
        seq: u64,
        error: StageError,
        attempts: u32,
        tally: &mut Tally,
    ) {
        tally.dead_lettered += 1;
        self.run.dead_letters.send(DeadLetter {
            stage: self.stats.id.to_string(),
            seq,
            error: error.to_string(),
            attempts,
            payload: item.map(|e| Box::new(e.payload) as Box<dyn std::any::Any + Send>),
        });
    }

    /// Runs a stage instance's `init` inside its span: counts the worker, reports a failure
    /// as the run's error (which holds the sources back), and tells the init gate.
    pub async fn initialise(
        &mut self,
        init: impl std::future::Future<Output = Result<(), StageError>>,
        span: &tracing::Span,
    ) -> bool {
        use tracing::Instrument;
        let stats = self.stats.clone();
        stats.worker_started();
        stats.set_status(crate::metrics::StageStatus::Initializing);
        let ok = match init.instrument(span.clone()).await {
            Ok(()) => true,
            Err(source) => {
                stats.record_error(source.to_string());
                stats.set_status(crate::metrics::StageStatus::Failed);
                self.failed = true;
                self.run.fail(PipelineError::Init {
                    stage: stats.id.to_string(),
                    source,
                });
                false
            }
        };
        self.run.gate.arrive(ok);
        stats.set_status(crate::metrics::StageStatus::Running);
        ok
    }

    /// Reports a stage-level error (not tied to an item): under `Fail`, `Retry` or
    /// `DeadLetter` it ends the run; under `Ignore` it is only counted.
    pub fn stage_error(&mut self, error: StageError, tally: &mut Tally) {
        tally.errors += 1;
        self.stats.record_error(error.to_string());
        if self.policy != ErrorPolicy::Ignore {
            self.failed = true;
            self.stats.set_status(crate::metrics::StageStatus::Failed);
            self.run.fail(PipelineError::Stage {
                stage: self.stats.id.to_string(),
                source: error,
            });
        }
    }
}

/// Records how an item left the pipeline on its acks.
fn record<T>(item: &Option<Envelope<T>>, outcome: Outcome) {
    if let Some(acks) = item.as_ref().and_then(Envelope::acks) {
        acks.iter().for_each(|a| a.record(outcome, 1));
    }
}
