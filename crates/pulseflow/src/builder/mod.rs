//! The typed builder. Each stage returns a [`Stream<T>`] of its output type and the next stage
//! consumes it, so connecting stages of different types does not compile. A stream is consumed
//! by value: one consumer per output (use [`Stream::branch`] to fan out, [`Stream::merge`] to
//! fan in). Settings on a stream (`parallelism`, `buffer`, `error_policy`, ...) configure the
//! stage that produced it.
//!
//! `build()` derives the untyped [`PipelineGraph`], validates it and returns every problem at
//! once.
//!
//! ```
//! use std::time::Duration;
//! use pulseflow::prelude::*;
//!
//! let mut p = PipelineBuilder::new("orders");
//! let parsed = p
//!     .source("lines", sources::iter(vec!["1", "2", "x", "4"]))
//!     .try_map("parse", |s: &&str| s.parse::<u64>())
//!     .error_policy(ErrorPolicy::DeadLetter);
//! let mut routes = parsed.branch(
//!     "size",
//!     Routes::new().route("small", |n: &u64| *n < 3).route("large", |n: &u64| *n >= 3),
//! );
//! let small = routes.take("small").expect("declared");
//! let large = routes.take("large").expect("declared");
//! small.merge("all", [large]).sink("out", sink_fn(|_n: u64| {}));
//! let pipeline = p.build().expect("valid");
//! assert_eq!(pipeline.graph().nodes.len(), 5);
//! ```
//!
//! Invalid graphs list every problem:
//!
//! ```
//! use pulseflow::prelude::*;
//!
//! let mut p = PipelineBuilder::new("broken");
//! let a = p.source("src", sources::iter(0..3u8)).map("m", |x| x + 1);
//! drop(a); // output of `m` never consumed
//! p.source("src", sources::iter(0..3u8)).sink("s", sink_fn(|_x: u8| {}));
//! let err = p.build().expect_err("invalid");
//! let text = err.to_string();
//! assert!(text.contains("duplicate stage id `src`"));
//! assert!(text.contains("output `out` of stage `m` is not connected"));
//! ```

mod accumulate;
mod ops;

pub use crate::plan::Pipeline;
pub use ops::{Branches, Routes};

use std::any::Any;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::rc::Rc;

use crate::error::BuildError;
use crate::graph::{ChannelDescriptor, Edge, PipelineGraph, StageNode};
use crate::plan::NodeFactory;
use crate::policy::{
    BackpressureStrategy, BufferPolicy, ChannelOrdering, CircuitBreakerPolicy, ErrorPolicy,
    ParallelismHint, PolicyRef, PolicyRegistry,
};
use crate::stage::{Source, StageKind};

struct NodeRecord {
    node: StageNode,
    factory: NodeFactory,
    extra: Option<Box<dyn Any + Send>>,
}

struct EdgeRecord {
    from: usize,
    port: usize,
    to: usize,
    input: usize,
}

struct Inner {
    id: String,
    nodes: Vec<NodeRecord>,
    edges: Vec<EdgeRecord>,
    registry: PolicyRegistry,
    metadata: BTreeMap<String, String>,
}

/// Builds a pipeline stage by stage.
///
/// The builder and its [`Stream`]s share one graph through `Rc`, so they are not `Send`:
/// build the pipeline on one thread (inside an `async` block, before an `.await` that could
/// move the task to another thread), then hand the [`Pipeline`], which is `Send`, to
/// [`ExecutionEngine::run`](crate::ExecutionEngine::run).
pub struct PipelineBuilder {
    inner: Rc<RefCell<Inner>>,
}

/// The typed output of a stage, to be consumed by exactly one next stage.
#[must_use = "a stream must be consumed by a stage (or the build reports an unused output)"]
pub struct Stream<T> {
    inner: Rc<RefCell<Inner>>,
    node: usize,
    port: usize,
    _type: PhantomData<fn() -> T>,
}

/// A sink in the builder, for setting its policies.
pub struct SinkHandle {
    inner: Rc<RefCell<Inner>>,
    node: usize,
}

impl PipelineBuilder {
    /// A builder for the pipeline `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            inner: Rc::new(RefCell::new(Inner {
                id: id.into(),
                nodes: Vec::new(),
                edges: Vec::new(),
                registry: PolicyRegistry::default(),
                metadata: BTreeMap::new(),
            })),
        }
    }

    /// Named policies that stages may refer to with [`PolicyRef::Named`].
    pub fn policies(&mut self, registry: PolicyRegistry) -> &mut Self {
        self.inner.borrow_mut().registry = registry;
        self
    }

    /// Adds a metadata entry to the graph.
    pub fn metadata(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.inner
            .borrow_mut()
            .metadata
            .insert(key.into(), value.into());
        self
    }

    /// Adds a source.
    pub fn source<S: Source>(&mut self, id: impl Into<String>, source: S) -> Stream<S::Item> {
        let factory: NodeFactory = Box::new(move |w| {
            let out = w.output::<S::Item>(0)?.into_downstream();
            let ctx = w.ctx.clone();
            let failures = w.failures();
            let span = ctx.span.clone();
            w.run.spawn(
                w.index,
                tracing::Instrument::instrument(
                    crate::engine::run_source(source, ctx, failures, out),
                    span,
                ),
            );
            Ok(())
        });
        let mut node = StageNode::new(id, StageKind::Source);
        node.error_policy = PolicyRef::Inline(ErrorPolicy::Fail);
        let index = add_node(&self.inner, node, factory, &[]);
        Stream::new(self.inner.clone(), index, 0)
    }

    /// Derives the graph, validates it and returns the pipeline, or every problem found.
    pub fn build(self) -> Result<Pipeline, BuildError> {
        let mut inner = self.inner.borrow_mut();
        let Inner {
            id,
            nodes,
            edges,
            registry,
            metadata,
        } = &mut *inner;
        let mut graph = PipelineGraph {
            nodes: nodes.iter().map(|n| n.node.clone()).collect(),
            edges: Vec::with_capacity(edges.len()),
            metadata: metadata.clone(),
        };
        graph.metadata.insert("pipeline".into(), id.clone());
        let mut consumers: Vec<Vec<(usize, usize)>> = nodes
            .iter()
            .map(|n| vec![(usize::MAX, 0); n.node.outputs.len()])
            .collect();
        for e in edges.iter() {
            let to = &nodes[e.to].node;
            let from = &nodes[e.from].node;
            let buffer = to
                .buffer
                .as_ref()
                .and_then(|b| b.resolve(|k| registry.buffer(k)))
                .unwrap_or_default();
            graph.edges.push(Edge {
                from: from.id.clone(),
                port: from.outputs.get(e.port).cloned().unwrap_or_default(),
                to: to.id.clone(),
                channel: ChannelDescriptor {
                    buffer_size: buffer.capacity,
                    ordering: from.ordering.clone(),
                },
            });
            if let Some(slot) = consumers[e.from].get_mut(e.port) {
                *slot = (e.to, e.input);
            }
        }
        let errors = graph.validate(registry);
        if !errors.is_empty() {
            return Err(BuildError { errors });
        }
        let mut factories = Vec::with_capacity(nodes.len());
        let mut extras = HashMap::new();
        for (i, n) in nodes.drain(..).enumerate() {
            factories.push(n.factory);
            if let Some(extra) = n.extra {
                extras.insert(i, extra);
            }
        }
        Ok(Pipeline {
            id: id.clone(),
            graph,
            factories,
            consumers,
            extras,
            registry: registry.clone(),
        })
    }
}

/// Adds a node fed by `inputs` (producer node, port) and returns its index.
fn add_node(
    inner: &Rc<RefCell<Inner>>,
    node: StageNode,
    factory: NodeFactory,
    inputs: &[(usize, usize)],
) -> usize {
    let mut inner = inner.borrow_mut();
    let index = inner.nodes.len();
    inner.nodes.push(NodeRecord {
        node,
        factory,
        extra: None,
    });
    for (input, &(from, port)) in inputs.iter().enumerate() {
        inner.edges.push(EdgeRecord {
            from,
            port,
            to: index,
            input,
        });
    }
    index
}

/// The policy setters shared by [`Stream`] (for the stage that produced it) and
/// [`SinkHandle`].
macro_rules! policy_setters {
    () => {
        /// The stage's input buffer (capacity in items, drop policy), inline or by name.
        ///
        /// On a [`Stream`] this is the buffer in front of the stage that produced it:
        /// `.map("m", f).buffer(b)` sets `m`'s input buffer, not one after `m`.
        pub fn buffer(self, policy: impl Into<PolicyRef<BufferPolicy>>) -> Self {
            let policy = policy.into();
            self.configure(|n| n.buffer = Some(policy))
        }

        /// The stage's error policy, inline or by name.
        pub fn error_policy(self, policy: impl Into<PolicyRef<ErrorPolicy>>) -> Self {
            let policy = policy.into();
            self.configure(|n| n.error_policy = policy)
        }

        /// The stage's backpressure strategy, inline or by name.
        pub fn backpressure(self, strategy: impl Into<PolicyRef<BackpressureStrategy>>) -> Self {
            let strategy = strategy.into();
            self.configure(|n| n.backpressure = Some(strategy))
        }

        /// The stage's circuit breaker, inline or by name.
        pub fn circuit_breaker(self, policy: impl Into<PolicyRef<CircuitBreakerPolicy>>) -> Self {
            let policy = policy.into();
            self.configure(|n| n.circuit_breaker = Some(policy))
        }
    };
}

impl<T: Send + 'static> Stream<T> {
    fn new(inner: Rc<RefCell<Inner>>, node: usize, port: usize) -> Self {
        Self {
            inner,
            node,
            port,
            _type: PhantomData,
        }
    }

    fn configure(self, f: impl FnOnce(&mut StageNode)) -> Self {
        f(&mut self.inner.borrow_mut().nodes[self.node].node);
        self
    }

    /// Adds a stage fed by this stream.
    fn then<U: Send + 'static>(self, node: StageNode, factory: NodeFactory) -> Stream<U> {
        let index = add_node(&self.inner, node, factory, &[(self.node, self.port)]);
        Stream::new(self.inner, index, 0)
    }

    /// How many workers run the stage that produced this stream.
    pub fn parallelism(self, hint: ParallelismHint) -> Self {
        self.configure(|n| n.parallelism = hint)
    }

    /// Restores input order after this stage's parallel workers.
    pub fn ordered(self) -> Self {
        self.configure(|n| n.ordering = ChannelOrdering::Ordered)
    }

    /// Sends items with the same key to the same worker of this stage, so each key keeps its
    /// order. `name` describes the key in graph exports.
    pub fn partition_by<K, F>(self, name: impl Into<String>, key: F) -> Self
    where
        K: std::hash::Hash,
        F: Fn(&T) -> K + Send + Sync + 'static,
    {
        self.partition_by_input(name, key)
    }

    policy_setters!();

    /// The id of the stage that produced this stream.
    pub fn stage_id(&self) -> String {
        self.inner.borrow().nodes[self.node].node.id.clone()
    }
}

impl SinkHandle {
    fn configure(self, f: impl FnOnce(&mut StageNode)) -> Self {
        f(&mut self.inner.borrow_mut().nodes[self.node].node);
        self
    }

    policy_setters!();
}
