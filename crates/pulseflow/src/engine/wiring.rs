//! Materialization: turning each node of a built pipeline into handlers, edges and tasks.
//!
//! Nodes are wired from the last to the first, so that when a node is wired every consumer
//! has already said how it wants to be reached: fused into the producer's task, or through
//! an edge of its own.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use super::downstream::Entry;
use super::failure::Failures;
use super::run::RunShared;
use crate::error::PipelineError;
use crate::flow::channel::{self, EdgeReceiver};
use crate::metrics::{EdgeStats, StageStats};
use crate::policy::{BufferPolicy, ErrorPolicy, ParallelismHint};
use crate::stage::StageContext;

/// A node's policies after resolving names against the registry.
pub(crate) struct Resolved {
    pub buffer: BufferPolicy,
    pub error_policy: ErrorPolicy,
    pub parallelism: ParallelismHint,
    pub ordered: bool,
    pub fused: bool,
    /// Breaker and backpressure controller, applied in front of the stage's handlers.
    pub flow: super::guard::FlowGuard,
}

/// What a node's factory can see and do while it is wired.
pub(crate) struct Wiring<'a> {
    pub resolved: &'a Resolved,
    pub run: &'a Arc<RunShared>,
    pub ctx: StageContext,
    pub stats: Arc<StageStats>,
    /// The pipeline's memory budget (accumulators reserve their state from it).
    pub memory: crate::memory::MemoryBudget,
    /// Extra typed data the builder attached (a partition key).
    pub extra: Option<Box<dyn Any + Send>>,
    pub index: usize,
    pub(crate) entries: &'a mut HashMap<(usize, usize), Box<dyn Any + Send>>,
    /// For each output port: the consumer and which of its inputs.
    pub(crate) consumers: &'a [(usize, usize)],
}

impl Wiring<'_> {
    /// How to reach the consumer of output `port`.
    pub fn output<T: Send + 'static>(&mut self, port: usize) -> Result<Entry<T>, PipelineError> {
        let missing = || PipelineError::Task {
            stage: self.stats.id.to_string(),
            reason: format!("output {port} has no wired consumer"),
        };
        let key = *self.consumers.get(port).ok_or_else(missing)?;
        let entry = self.entries.remove(&key).ok_or_else(missing)?;
        entry
            .downcast::<Entry<T>>()
            .map(|e| *e)
            .map_err(|_| PipelineError::Task {
                stage: self.stats.id.to_string(),
                reason: format!("output {port} wired to a consumer of another type"),
            })
    }

    /// Says how producers reach input `input` of this node.
    pub fn offer<T: Send + 'static>(&mut self, input: usize, entry: Entry<T>) {
        self.entries.insert((self.index, input), Box::new(entry));
    }

    /// Creates this node's input buffer, shared by `inputs` producers.
    pub fn input_edge<T: Send + 'static>(&mut self, inputs: usize) -> EdgeReceiver<T> {
        let edge_stats = Arc::new(EdgeStats::default());
        *self.stats.input.lock() = Some(edge_stats.clone());
        let (tx, rx) = channel::gated_edge(
            self.resolved.buffer,
            edge_stats,
            self.resolved.flow.edge_gate(),
        );
        for input in 0..inputs {
            self.offer(input, Entry::Edge(tx.clone()));
        }
        rx
    }

    /// `inner` behind the stage's circuit breaker and backpressure controller, if any.
    pub fn guard<T: Send + 'static>(
        &self,
        inner: Box<dyn super::downstream::Downstream<T>>,
    ) -> Box<dyn super::downstream::Downstream<T>> {
        self.resolved.flow.wrap(&self.stats, inner)
    }

    /// The node's error policy, ready to act.
    pub fn failures(&self) -> Failures {
        Failures::new(
            self.resolved.error_policy,
            self.stats.clone(),
            self.run.clone(),
        )
    }
}
