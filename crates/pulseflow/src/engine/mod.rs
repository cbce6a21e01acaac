//! The [`ExecutionEngine`]: runs a built [`Pipeline`] on Tokio, answers
//! [`inspect`](ExecutionEngine::inspect) while it runs, and stops it gracefully
//! ([`stop`](ExecutionEngine::stop)) or at once ([`abort`](ExecutionEngine::abort)).
//!
//! ```
//! use pulseflow::prelude::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut p = PipelineBuilder::new("evens");
//! let (sink, collected) = sinks::collect();
//! p.source("numbers", sources::iter(0u64..100))
//!     .filter("even", |x| x % 2 == 0)
//!     .sink("keep", sink);
//! let result = ExecutionEngine::new()
//!     .run(p.build().expect("valid"), ExecutionOptions::default())
//!     .await;
//! assert!(result.success);
//! assert_eq!(collected.len(), 50);
//! assert_eq!(result.accounting.filtered, 50);
//! assert!(result.accounting.reconciles());
//! # }
//! ```

pub(crate) mod accumulate;
mod async_map;
mod branch;
mod chain;
mod dead_letter;
mod downstream;
pub(crate) mod failure;
mod guard;
mod options;
mod recycle;
mod result;
mod run;
mod sink;
mod source;
mod tap;
mod transform;
mod wiring;
mod workers;

pub use dead_letter::{DeadLetter, DeadLetterSink};
pub use options::{DEFAULT_BATCH_TIMEOUT, ExecutionOptions, Supervision};
pub use result::PipelineResult;
pub(crate) use tap::TapSlot;
pub use tap::{Tap, TapBatch, TapHandle};
pub use tokio_pulse::Tier;

pub(crate) use async_map::AsyncMapHandler;
pub(crate) use branch::{BranchHandler, MergeHandler, Predicate};
pub(crate) use chain::Replica;
pub(crate) use downstream::Entry;
pub(crate) use failure::Failures;
pub(crate) use guard::FlowGuard;
pub(crate) use sink::SinkHandler;
pub(crate) use source::run_source;
pub(crate) use transform::TransformHandler;
pub(crate) use wiring::{Resolved, Wiring};
pub(crate) use workers::{MakeWorker, Pool, PoolOrder, pump};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::error::PipelineError;
use crate::metrics::{StageRuntimeState, StageStats};
use crate::plan::Pipeline;
use crate::policy::{BackpressureStrategy, BufferPolicy, ChannelOrdering};
use crate::stage::StageContext;
use dead_letter::DeadLetters;
use run::RunShared;

/// Items per chunk when a stage in the Yield tier splits its batches.
pub(crate) const YIELD_CHUNK: usize = 64;

/// Whether a stage should process a batch of `len` items in chunks, yielding between them:
/// in the Yield tier only. An isolated stage runs on threads the OS restrains, where its long
/// polls harm no one; chunking them there would make a hog look reformed, so that it would be
/// demoted back to the shared workers and escalated again, over and over.
pub(crate) fn yielding(stats: &StageStats, len: usize) -> bool {
    len > YIELD_CHUNK && stats.tier() == Some(Tier::Yield)
}

/// A batch in pieces of at most `size` items, front first, each with whether it is the last
/// (a batch that fits, even an empty one, is its own single last piece). Each item is moved
/// once: taking piece after piece off the front of the batch would move the rest of it every
/// time.
pub(crate) fn pieces<T>(
    batch: crate::envelope::Batch<T>,
    size: usize,
) -> impl Iterator<Item = (crate::envelope::Batch<T>, bool)> {
    let size = size.max(1);
    let (mut whole, mut items) = if batch.len() <= size {
        (Some(batch), Vec::new().into_iter())
    } else {
        (None, batch.into_items().into_iter())
    };
    std::iter::from_fn(move || {
        if let Some(batch) = whole.take() {
            return Some((batch, true));
        }
        if items.len() == 0 {
            return None;
        }
        let piece: Vec<_> = items.by_ref().take(size).collect();
        Some((crate::envelope::Batch::from_items(piece), items.len() == 0))
    })
}

/// Runs pipelines. Clones share the engine, so one task can `run` while another `inspect`s,
/// `stop`s or `abort`s.
#[derive(Clone, Default)]
pub struct ExecutionEngine {
    control: Arc<Control>,
}

#[derive(Default)]
struct Control {
    current: Mutex<Option<Arc<RunShared>>>,
    last: Mutex<Option<Arc<RunShared>>>,
    deadline: Mutex<Option<tokio::time::Instant>>,
    changed: Notify,
    finished: Mutex<Option<watch::Receiver<bool>>>,
}

impl ExecutionEngine {
    /// A new engine.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs the pipeline to its end and reports what happened. Never panics on a stage's
    /// behalf: failures, panics in user code and aborts end up in the result.
    pub async fn run(&self, pipeline: Pipeline, options: ExecutionOptions) -> PipelineResult {
        let started = Instant::now();
        let Pipeline {
            id,
            graph,
            factories,
            consumers,
            extras,
            mut registry,
        } = pipeline;
        registry.extend(&options.policies);
        let plan = graph.fusion_plan(&registry);
        let pipeline_id: Arc<str> = Arc::from(id.as_str());
        let stats: Vec<Arc<StageStats>> = graph
            .nodes
            .iter()
            .map(|n| {
                Arc::new(StageStats::new(
                    &id,
                    Arc::from(n.id.as_str()),
                    n.kind,
                    options.metrics,
                ))
            })
            .collect();
        let feeds: Vec<Vec<usize>> = consumers
            .iter()
            .map(|ports| ports.iter().map(|(c, _)| *c).collect())
            .collect();
        let run = Arc::new(RunShared::new(
            pipeline_id.clone(),
            stats.clone(),
            feeds,
            DeadLetters::new(options.dead_letter_sink.clone(), options.dead_letter_keep),
            (options.batch_size.max(1), options.batch_timeout),
            options.cancellation.child_token(),
            options.supervision.supervisor(),
        ));
        let (done_tx, done_rx) = watch::channel(false);
        {
            let mut current = self.control.current.lock();
            if current.is_some() {
                return PipelineResult::refused(PipelineError::AlreadyRunning);
            }
            *current = Some(run.clone());
            *self.control.finished.lock() = Some(done_rx);
            *self.control.deadline.lock() = None;
        }

        let mut entries = HashMap::new();
        let mut extras = extras;
        for (index, factory) in factories.into_iter().enumerate().rev() {
            let node = &graph.nodes[index];
            let backpressure = node
                .backpressure
                .as_ref()
                .and_then(|b| b.resolve(|k| registry.backpressure(k)));
            let mut buffer = node
                .buffer
                .as_ref()
                .and_then(|b| b.resolve(|k| registry.buffer(k)))
                .unwrap_or_default();
            let mut flow = FlowGuard::default();
            match backpressure {
                // A bounded strategy is the stage's buffer itself.
                Some(BackpressureStrategy::Bounded {
                    capacity,
                    drop_policy,
                }) if node.kind != crate::stage::StageKind::Accumulator => {
                    buffer = BufferPolicy::new(capacity, drop_policy)
                }
                Some(strategy) => match crate::flow::controller_for(&strategy) {
                    // An accumulator's pending state and spills count as queue depth.
                    Ok(c) if node.kind == crate::stage::StageKind::Accumulator => {
                        let aware = Arc::new(crate::flow::AccumulatorAware::new(c));
                        flow.controller = Some(aware.clone());
                        flow.accumulator = Some(aware);
                    }
                    Ok(c) => flow.controller = Some(Arc::from(c)),
                    Err(e) => run.fail(PipelineError::Stage {
                        stage: node.id.clone(),
                        source: crate::error::StageError::from_error(e),
                    }),
                },
                None => {}
            }
            flow.breaker = node
                .circuit_breaker
                .as_ref()
                .and_then(|b| b.resolve(|k| registry.circuit_breaker(k)))
                .map(|policy| Arc::new(crate::flow::CircuitBreaker::new(node.id.as_str(), policy)));
            stats[index].set_flow_control(flow.controller.clone(), flow.breaker.clone());
            let resolved = Resolved {
                flow,
                buffer,
                error_policy: node
                    .error_policy
                    .resolve(|k| registry.error_policy(k))
                    .unwrap_or_default(),
                parallelism: node.parallelism,
                ordered: node.ordering == ChannelOrdering::Ordered,
                fused: plan.is_fused(index),
            };
            let span = tracing::info_span!("stage", pipeline = %pipeline_id, stage = %node.id);
            let mut wiring = Wiring {
                resolved: &resolved,
                run: &run,
                ctx: StageContext {
                    pipeline_id: pipeline_id.clone(),
                    stage_id: stats[index].id.clone(),
                    config: options
                        .stage_config
                        .get(&node.id)
                        .cloned()
                        .map(Arc::new)
                        .unwrap_or_else(|| Arc::new(serde_json::Value::Null)),
                    span: span.clone(),
                },
                stats: stats[index].clone(),
                memory: options.memory.clone(),
                extra: extras.remove(&index),
                index,
                entries: &mut entries,
                consumers: &consumers[index],
            };
            let wired = {
                let _enter = span.enter();
                factory(&mut wiring)
            };
            if let Err(e) = wired {
                run.fail(e);
            }
        }
        drop(entries);
        run.gate.seal();
        run.close_tracker();

        self.wait(&run)
            .instrument(tracing::info_span!("pipeline", id = %pipeline_id))
            .await;

        // Taps see nothing more: dropping them lets their readers see the end.
        for stats in &run.stages {
            stats.taps.detach_all();
        }
        let result = PipelineResult::collect(&run, started.elapsed());
        *self.control.last.lock() = Some(run);
        *self.control.current.lock() = None;
        let _ = done_tx.send(true);
        result
    }

    async fn wait(&self, run: &Arc<RunShared>) {
        let tasks = run.wait_tasks();
        tokio::pin!(tasks);
        loop {
            let changed = self.control.changed.notified();
            let deadline = *self.control.deadline.lock();
            tokio::select! {
                _ = &mut tasks => return,
                _ = changed => {}
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    run.abort_all();
                    *self.control.deadline.lock() = None;
                }
            }
        }
    }

    /// The live state of a stage of the running pipeline (or of the last run, once it ended).
    pub fn inspect(&self, stage_id: &str) -> Option<StageRuntimeState> {
        let run = self
            .control
            .current
            .lock()
            .clone()
            .or_else(|| self.control.last.lock().clone())?;
        let index = run.stages.iter().position(|s| &*s.id == stage_id)?;
        result::snapshot_all(&run).into_iter().nth(index)
    }

    /// Attaches `tap` to the items leaving stage `stage_id` of the running pipeline (see
    /// [`Tap`]); `None` when no pipeline runs or it has no such stage. The tap stays attached
    /// until the handle is dropped or the run ends.
    pub fn tap(&self, stage_id: &str, tap: Tap) -> Option<TapHandle> {
        let run = self.control.current.lock().clone()?;
        let stats = run.stages.iter().find(|s| &*s.id == stage_id)?;
        Some(tap::attach(&stats.taps, tap))
    }

    /// The live state of every stage, in graph order.
    pub fn inspect_all(&self) -> Vec<StageRuntimeState> {
        let run = self
            .control
            .current
            .lock()
            .clone()
            .or_else(|| self.control.last.lock().clone());
        run.map(|run| result::snapshot_all(&run))
            .unwrap_or_default()
    }

    /// Whether a pipeline is running.
    pub fn is_running(&self) -> bool {
        self.control.current.lock().is_some()
    }

    /// Stops gracefully: sources stop producing, items in flight finish, stages close. If the
    /// run has not ended within `deadline`, it is aborted. Returns once the run has ended.
    ///
    /// Draining goes through every buffer (up to 8,192 items per stage by default, see
    /// [`BufferPolicy`]): the deadline must cover processing
    /// what they hold, or the rest is aborted (counted, and its acknowledgements report
    /// failure).
    pub async fn stop(&self, deadline: Duration) {
        let Some(run) = self.control.current.lock().clone() else {
            return;
        };
        let finished = self.control.finished.lock().clone();
        run.stop.cancel();
        *self.control.deadline.lock() = Some(tokio::time::Instant::now() + deadline);
        self.control.changed.notify_waiters();
        if let Some(mut finished) = finished {
            let _ = finished.wait_for(|done| *done).await;
        }
    }

    /// Aborts at once: every task is cancelled; items in flight are reported as unaccounted.
    pub fn abort(&self) {
        if let Some(run) = self.control.current.lock().clone() {
            run.abort_all();
            self.control.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::envelope::{Batch, Envelope};

    #[test]
    fn pieces_hold_every_item_once_in_order_and_mark_the_last() {
        for (n, size, want) in [
            (10u64, 3, vec![3, 3, 3, 1]),
            (9, 3, vec![3, 3, 3]),
            (2, 5, vec![2]),
            (0, 4, vec![0]),
            (3, 0, vec![1, 1, 1]),
        ] {
            let batch = Batch::from_items((0..n).map(Envelope::new).collect());
            let (mut sizes, mut lasts, mut seen) = (Vec::new(), Vec::new(), Vec::new());
            for (piece, last) in super::pieces(batch, size) {
                sizes.push(piece.len());
                lasts.push(last);
                seen.extend(piece.into_items().into_iter().map(|e| e.payload));
            }
            assert_eq!(sizes, want, "{n} by {size}");
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
            // Exactly one last piece, at the end (an empty batch is its own last piece).
            let mut expected = vec![false; want.len()];
            if let Some(l) = expected.last_mut() {
                *l = true;
            }
            assert_eq!(lasts, expected, "{n} by {size}");
        }
    }
}
