//! The plan handed from construction to execution. The builder produces a [`Pipeline`]: the
//! validated graph plus one [`NodeFactory`] per node (and what the engine needs to connect
//! them); the engine consumes it. Neither side knows the other's internals: the builder and
//! the engine both depend on this module, not on each other.

use std::any::Any;
use std::collections::HashMap;

use crate::error::PipelineError;
use crate::graph::PipelineGraph;
use crate::policy::PolicyRegistry;

/// Wires one node; built by the typed builder, called once per run.
pub(crate) type NodeFactory =
    Box<dyn FnOnce(&mut crate::engine::Wiring<'_>) -> Result<(), PipelineError> + Send>;

/// A built, validated pipeline, ready for [`ExecutionEngine::run`](crate::ExecutionEngine::run).
pub struct Pipeline {
    pub(crate) id: String,
    pub(crate) graph: PipelineGraph,
    pub(crate) factories: Vec<NodeFactory>,
    /// For each node, for each output port: (consumer, input index).
    pub(crate) consumers: Vec<Vec<(usize, usize)>>,
    pub(crate) extras: HashMap<usize, Box<dyn Any + Send>>,
    pub(crate) registry: PolicyRegistry,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("id", &self.id)
            .field("graph", &self.graph)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// The pipeline's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The untyped graph: validated, exportable as DOT or Mermaid.
    pub fn graph(&self) -> &PipelineGraph {
        &self.graph
    }
}
