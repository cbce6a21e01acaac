//! The untyped [`PipelineGraph`]: nodes with their kind and policies, edges with their buffer
//! and ordering, and metadata. The typed builder derives it; it is what gets validated,
//! inspected and exported as DOT or Mermaid text.
//!
//! ```
//! use pulseflow::prelude::*;
//!
//! let mut p = PipelineBuilder::new("demo");
//! p.source("numbers", sources::iter(0u32..10))
//!     .map("double", |x| x * 2)
//!     .filter("small", |x| *x < 10)
//!     .sink("print", sink_fn(|_x: u32| {}));
//! let pipeline = p.build().expect("valid");
//! let dot = pipeline.graph().to_dot();
//! assert!(dot.contains("\"double\" -> \"small\""));
//! assert!(pipeline.graph().to_mermaid().starts_with("flowchart LR"));
//! ```

mod export;
mod validate;

use std::collections::BTreeMap;

use crate::policy::{
    BackpressureStrategy, BufferPolicy, ChannelOrdering, CircuitBreakerPolicy, ErrorPolicy,
    ParallelismHint, PolicyRef,
};
use crate::stage::StageKind;

/// One stage of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct StageNode {
    /// Unique id.
    pub id: String,
    /// Kind of stage.
    pub kind: StageKind,
    /// How many workers run it.
    pub parallelism: ParallelismHint,
    /// Its input buffer; `None` for the default.
    pub buffer: Option<PolicyRef<BufferPolicy>>,
    /// Its backpressure strategy, if any.
    pub backpressure: Option<PolicyRef<BackpressureStrategy>>,
    /// What happens to items that fail in it.
    pub error_policy: PolicyRef<ErrorPolicy>,
    /// Its circuit breaker, if any.
    pub circuit_breaker: Option<PolicyRef<CircuitBreakerPolicy>>,
    /// Order of its outputs when it runs in parallel.
    pub ordering: ChannelOrdering,
    /// Names of its outputs (one, `out`, for most stages; a branch has one per route).
    pub outputs: Vec<String>,
    /// Whether it keeps no state between items (it may be fused with its neighbours).
    pub stateless: bool,
    /// Whether the engine can make one instance per worker.
    pub replicable: bool,
}

impl StageNode {
    /// A node with default policies and one output named `out` (none for sinks).
    pub fn new(id: impl Into<String>, kind: StageKind) -> Self {
        Self {
            id: id.into(),
            kind,
            parallelism: ParallelismHint::Sequential,
            buffer: None,
            backpressure: None,
            error_policy: PolicyRef::Inline(ErrorPolicy::default()),
            circuit_breaker: None,
            ordering: ChannelOrdering::Unordered,
            outputs: if kind == StageKind::Sink {
                Vec::new()
            } else {
                vec!["out".to_owned()]
            },
            stateless: false,
            replicable: false,
        }
    }
}

/// How an edge buffers and orders.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelDescriptor {
    /// Capacity in items.
    pub buffer_size: usize,
    /// Order of delivery.
    pub ordering: ChannelOrdering,
}

/// A connection from one stage's output to another stage's input.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    /// Producing stage id.
    pub from: String,
    /// Name of the producer's output.
    pub port: String,
    /// Consuming stage id.
    pub to: String,
    /// Buffering and ordering.
    pub channel: ChannelDescriptor,
}

/// Stages, edges and metadata of a pipeline.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PipelineGraph {
    /// The stages, in the order they were added.
    pub nodes: Vec<StageNode>,
    /// The connections.
    pub edges: Vec<Edge>,
    /// Free-form key/value metadata (the builder sets `pipeline`).
    pub metadata: BTreeMap<String, String>,
}

impl PipelineGraph {
    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&StageNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Index of the node with this id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// Edges leaving `id`.
    pub fn edges_from<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Edge> + 'a {
        self.edges.iter().filter(move |e| e.from == id)
    }

    /// Edges entering `id`.
    pub fn edges_to<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Edge> + 'a {
        self.edges.iter().filter(move |e| e.to == id)
    }
}

pub use validate::FusionPlan;
