//! Wiring an accumulator stage: one worker fed by the stage's input edge, or several, each on
//! its own lane behind the key-hash partitioner, all sharing their figures for `inspect` and
//! for backpressure.

use std::sync::Arc;

use tracing::Instrument;

use super::AccStage;
use super::figures::{AccFigures, figures_metrics};
use super::worker::{partition, run_worker};
use crate::accumulate::{Accumulator, AccumulatorPolicy};
use crate::engine::downstream::EdgeOut;
use crate::engine::wiring::Wiring;
use crate::error::PipelineError;
use crate::flow::channel;
use crate::metrics::{EdgeStats, ExtraMetrics};
use crate::policy::{BufferPolicy, DropPolicy};

/// One accumulator instance for a sequential stage, or a factory making one per worker.
pub(crate) enum AccInstances<A> {
    One(A),
    Many(Arc<dyn Fn() -> A + Send + Sync>),
}

/// Wires an accumulator stage: one worker, or several fed by key hash.
pub(crate) fn wire_accumulator<A: Accumulator>(
    w: &mut Wiring<'_>,
    instances: AccInstances<A>,
    policy: AccumulatorPolicy,
) -> Result<(), PipelineError> {
    let out = w.output::<A::Out>(0)?;
    let rx = w.input_edge::<A::In>(1);
    let workers = w.resolved.parallelism.initial_workers().max(1);
    let span = w.ctx.span.clone();
    let mut all = Vec::new();
    let flow = w.resolved.flow.clone();
    // Every worker's figures, known once all are made: read by each for the pressure sum.
    let shared = Arc::new(std::sync::OnceLock::new());
    let mut stage = |acc: A, w: &Wiring<'_>| {
        let figures = Arc::new(AccFigures::default());
        all.push(figures.clone());
        AccStage::new(
            acc,
            policy.clone(),
            w.failures(),
            w.ctx.clone(),
            w.memory.clone(),
            figures,
        )
    };
    match instances {
        AccInstances::One(acc) if workers == 1 => {
            let s = stage(acc, w);
            w.run.spawn(
                w.index,
                run_worker(rx, s, out.into_downstream(), flow.clone(), shared.clone())
                    .instrument(span),
            );
        }
        AccInstances::One(_) => {
            return Err(PipelineError::Task {
                stage: w.stats.id.to_string(),
                reason: "a parallel accumulator needs a factory (accumulate_with)".into(),
            });
        }
        AccInstances::Many(make) if workers == 1 => {
            let s = stage(make(), w);
            w.run.spawn(
                w.index,
                run_worker(rx, s, out.into_downstream(), flow.clone(), shared.clone())
                    .instrument(span),
            );
        }
        AccInstances::Many(make) => {
            let tx = out.into_sender(w.run, w.index);
            let lane_buffer = BufferPolicy::new(
                (w.resolved.buffer.capacity / workers).max(1),
                DropPolicy::Block,
            );
            let mut lanes = Vec::with_capacity(workers);
            for _ in 0..workers {
                let (lane_tx, lane_rx) = channel::edge(lane_buffer, Arc::new(EdgeStats::default()));
                lanes.push(lane_tx);
                let s = stage(make(), w);
                let next = Box::new(EdgeOut {
                    tx: Some(tx.clone()),
                });
                w.run.spawn(
                    w.index,
                    run_worker(lane_rx, s, next, flow.clone(), shared.clone())
                        .instrument(span.clone()),
                );
            }
            w.run.spawn(
                w.index,
                partition(rx, lanes, make(), w.failures()).instrument(span),
            );
        }
    }
    let _ = shared.set(all.clone());
    w.stats
        .set_extra_metrics(ExtraMetrics(Arc::new(move || figures_metrics(&all))));
    Ok(())
}
