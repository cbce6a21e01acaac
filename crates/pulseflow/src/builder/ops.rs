//! The stage-adding methods of [`Stream`].

use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hash};
use std::marker::PhantomData;
use std::sync::Arc;

use parking_lot::Mutex;
use tracing::Instrument;

use super::{SinkHandle, Stream, add_node};
use crate::engine::{
    AsyncMapHandler, BranchHandler, Entry, MakeWorker, MergeHandler, Pool, PoolOrder, Predicate,
    Replica, SinkHandler, TransformHandler, Wiring, pump,
};
use crate::error::{BoxError, PipelineError};
use crate::graph::StageNode;
use crate::plan::NodeFactory;
use crate::stage::{Filter, FlatMap, Map, Sink, StageKind, Transform, TryMap};

/// Named routes of a branch, each with its predicate; optionally an output for items no route
/// accepts.
pub struct Routes<T> {
    routes: Vec<(String, Predicate<T>)>,
    unmatched: Option<String>,
}

impl<T> Default for Routes<T> {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            unmatched: None,
        }
    }
}

impl<T> Routes<T> {
    /// No routes yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an output receiving every item `predicate` accepts.
    pub fn route(
        mut self,
        name: impl Into<String>,
        predicate: impl Fn(&T) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.routes.push((name.into(), Arc::new(predicate)));
        self
    }

    /// Adds an output receiving the items no route accepts (otherwise they are filtered).
    pub fn unmatched(mut self, name: impl Into<String>) -> Self {
        self.unmatched = Some(name.into());
        self
    }
}

/// The outputs of a branch, taken by name.
pub struct Branches<T> {
    outputs: Vec<(String, Option<Stream<T>>)>,
}

impl<T> Branches<T> {
    /// The output named `name`, once.
    pub fn take(&mut self, name: &str) -> Option<Stream<T>> {
        self.outputs
            .iter_mut()
            .find(|(n, _)| n == name)
            .and_then(|(_, s)| s.take())
    }

    /// The outputs not taken yet, in declaration order.
    pub fn into_streams(self) -> Vec<Stream<T>> {
        self.outputs.into_iter().filter_map(|(_, s)| s).collect()
    }
}

/// One instance per stage, or a factory making one per worker.
enum Instances<X> {
    One(X),
    Many(Arc<dyn Fn() -> X + Send + Sync>),
}

fn key_hash<K: Hash>(key: &K) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(key)
}

fn wire_transform<X: Transform>(
    w: &mut Wiring<'_>,
    instances: Instances<X>,
) -> Result<(), PipelineError> {
    let out = w.output::<X::Out>(0)?;
    let one = |instances: Instances<X>| match instances {
        Instances::One(x) => x,
        Instances::Many(make) => make(),
    };
    if w.resolved.fused && w.resolved.parallelism.is_sequential() {
        let handler = TransformHandler::new(
            one(instances),
            w.ctx.clone(),
            w.failures(),
            out.into_downstream(),
        );
        w.offer(0, Entry::Fused(Box::new(handler)));
        return Ok(());
    }
    if w.resolved.fused {
        // Chained behind the workers of the parallel stage before it: one instance each.
        let unreplicable = |what: &str| PipelineError::Task {
            stage: w.stats.id.to_string(),
            reason: format!("a stage chained behind parallel workers needs {what}"),
        };
        let Instances::Many(make) = instances else {
            return Err(unreplicable("a factory"));
        };
        let next = out
            .replicate()
            .ok_or_else(|| unreplicable("a consumer reachable from every worker"))?;
        let (ctx, policy, stats, run) = (
            w.ctx.clone(),
            w.resolved.error_policy,
            w.stats.clone(),
            w.run.clone(),
        );
        let chain: Replica<X::In> = Arc::new(move |turn| {
            let failures = crate::engine::Failures::new(policy, stats.clone(), run.clone());
            Box::new(TransformHandler::new(
                make(),
                ctx.clone(),
                failures,
                next(turn),
            ))
        });
        w.offer(0, Entry::Chain(chain));
        return Ok(());
    }
    let rx = w.input_edge::<X::In>(1);
    let sequential = w.resolved.parallelism.is_sequential();
    let partition = w.extra.take().and_then(|e| {
        e.downcast::<Arc<dyn Fn(&X::In) -> u64 + Send + Sync>>()
            .ok()
    });
    let span = w.ctx.span.clone();
    match instances {
        Instances::One(x) if sequential => {
            let handler =
                TransformHandler::new(x, w.ctx.clone(), w.failures(), out.into_downstream());
            w.run.spawn(
                w.index,
                pump(rx, w.guard(Box::new(handler))).instrument(span),
            );
        }
        Instances::One(_) => {
            return Err(PipelineError::Task {
                stage: w.stats.id.to_string(),
                reason: "a parallel transform needs a factory".into(),
            });
        }
        Instances::Many(make) => {
            let ctx = w.ctx.clone();
            let policy = w.resolved.error_policy;
            let stats = w.stats.clone();
            let run = w.run.clone();
            let flow = w.resolved.flow.clone();
            let worker: MakeWorker<X::In, X::Out> = Arc::new(move |next| {
                let failures = crate::engine::Failures::new(policy, stats.clone(), run.clone());
                flow.wrap(
                    &stats,
                    Box::new(TransformHandler::new(make(), ctx.clone(), failures, next)),
                )
            });
            let order = match partition {
                Some(key) => PoolOrder::Partitioned(*key),
                None if w.resolved.ordered => PoolOrder::Ordered,
                None => PoolOrder::Unordered,
            };
            Pool {
                make: worker,
                parallelism: w.resolved.parallelism,
                order,
                buffer: w.resolved.buffer,
                run: w.run.clone(),
                stage: w.index,
            }
            .spawn(rx, out);
        }
    }
    Ok(())
}

impl<T: Send + 'static> Stream<T> {
    pub(super) fn partition_by_input<K, F>(self, name: impl Into<String>, key: F) -> Self
    where
        K: Hash,
        F: Fn(&T) -> K + Send + Sync + 'static,
    {
        let name = name.into();
        let hasher: Arc<dyn Fn(&T) -> u64 + Send + Sync> = Arc::new(move |t| key_hash(&key(t)));
        {
            let mut inner = self.inner.borrow_mut();
            let record = &mut inner.nodes[self.node];
            record.node.ordering = crate::policy::ChannelOrdering::PartitionOrdered { key: name };
            record.extra = Some(Box::new(hasher));
        }
        self
    }

    fn add_transform<X>(self, id: impl Into<String>, instances: Instances<X>) -> Stream<X::Out>
    where
        X: Transform<In = T>,
    {
        let mut node = StageNode::new(id, StageKind::Transform);
        node.stateless = match &instances {
            Instances::One(x) => x.is_stateless(),
            Instances::Many(make) => make().is_stateless(),
        };
        node.replicable = matches!(instances, Instances::Many(_));
        self.then(node, Box::new(move |w| wire_transform(w, instances)))
    }

    fn add_closure<X>(
        self,
        id: impl Into<String>,
        make: impl Fn() -> X + Send + Sync + 'static,
    ) -> Stream<X::Out>
    where
        X: Transform<In = T>,
    {
        self.add_transform(id, Instances::Many(Arc::new(make)))
    }

    /// One output per item.
    pub fn map<U, F>(self, id: impl Into<String>, f: F) -> Stream<U>
    where
        U: Send + 'static,
        F: FnMut(T) -> U + Clone + Send + 'static,
    {
        let f = Mutex::new(f);
        self.add_closure(id, move || Map::new(f.lock().clone()))
    }

    /// Keeps the items the predicate accepts; the others are counted as filtered.
    pub fn filter<F>(self, id: impl Into<String>, f: F) -> Stream<T>
    where
        F: FnMut(&T) -> bool + Clone + Send + 'static,
    {
        let f = Mutex::new(f);
        self.add_closure(id, move || Filter::new(f.lock().clone()))
    }

    /// Any number of outputs per item, each carrying the item's metadata.
    pub fn flat_map<U, I, F>(self, id: impl Into<String>, f: F) -> Stream<U>
    where
        U: Send + 'static,
        I: IntoIterator<Item = U>,
        F: FnMut(T) -> I + Clone + Send + 'static,
    {
        let f = Mutex::new(f);
        self.add_closure(id, move || FlatMap::new(f.lock().clone()))
    }

    /// One output per item, or an error handled by the stage's error policy (the item is
    /// kept for retries and dead letters).
    pub fn try_map<U, E, F>(self, id: impl Into<String>, f: F) -> Stream<U>
    where
        U: Send + 'static,
        E: Into<BoxError>,
        F: FnMut(&T) -> Result<U, E> + Clone + Send + 'static,
    {
        let f = Mutex::new(f);
        self.add_closure(id, move || TryMap::new(f.lock().clone()))
    }

    /// A transform of your own, as one instance (sequential only).
    pub fn transform<X>(self, id: impl Into<String>, transform: X) -> Stream<X::Out>
    where
        X: Transform<In = T>,
    {
        self.add_transform(id, Instances::One(transform))
    }

    /// A transform of your own, one instance per worker made by `make` (any parallelism).
    pub fn transform_with<X, M>(self, id: impl Into<String>, make: M) -> Stream<X::Out>
    where
        X: Transform<In = T>,
        M: Fn() -> X + Send + Sync + 'static,
    {
        self.add_closure(id, make)
    }

    /// An async function per item, at most `concurrency` running at once, outputs in input
    /// order. A failed item goes to the stage's error policy.
    pub fn map_async<U, E, Fut, F>(
        self,
        id: impl Into<String>,
        concurrency: usize,
        f: F,
    ) -> Stream<U>
    where
        T: Clone,
        U: Send + 'static,
        E: Into<BoxError> + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
        F: Fn(T) -> Fut + Send + Sync + 'static,
    {
        self.add_async(id, concurrency, true, f)
    }

    /// Like [`map_async`](Stream::map_async), with outputs in completion order.
    pub fn map_async_unordered<U, E, Fut, F>(
        self,
        id: impl Into<String>,
        concurrency: usize,
        f: F,
    ) -> Stream<U>
    where
        T: Clone,
        U: Send + 'static,
        E: Into<BoxError> + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
        F: Fn(T) -> Fut + Send + Sync + 'static,
    {
        self.add_async(id, concurrency, false, f)
    }

    fn add_async<U, E, Fut, F>(
        self,
        id: impl Into<String>,
        concurrency: usize,
        ordered: bool,
        f: F,
    ) -> Stream<U>
    where
        T: Clone,
        U: Send + 'static,
        E: Into<BoxError> + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
        F: Fn(T) -> Fut + Send + Sync + 'static,
    {
        let node = StageNode::new(id, StageKind::Transform);
        let factory: NodeFactory = Box::new(move |w| {
            let out = w.output::<U>(0)?.into_downstream();
            let rx = w.input_edge::<T>(1);
            let handler = AsyncMapHandler {
                f: Arc::new(f),
                concurrency,
                ordered,
                failures: w.failures(),
                next: out,
                _types: PhantomData,
            };
            w.run.spawn(
                w.index,
                pump(rx, w.guard(Box::new(handler))).instrument(w.ctx.span.clone()),
            );
            Ok(())
        });
        self.then(node, factory)
    }

    /// Routes each item to every route whose predicate accepts it (a copy per extra route).
    pub fn branch(self, id: impl Into<String>, routes: Routes<T>) -> Branches<T>
    where
        T: Clone,
    {
        let Routes { routes, unmatched } = routes;
        let mut node = StageNode::new(id, StageKind::Branch);
        node.outputs = routes
            .iter()
            .map(|(n, _)| n.clone())
            .chain(unmatched)
            .collect();
        let names = node.outputs.clone();
        let predicates: Vec<Predicate<T>> = routes.into_iter().map(|(_, p)| p).collect();
        let factory: NodeFactory = Box::new(move |w| {
            let mut outs = Vec::with_capacity(names.len());
            for port in 0..names.len() {
                outs.push(w.output::<T>(port)?.into_downstream());
            }
            let rx = w.input_edge::<T>(1);
            let handler = BranchHandler {
                predicates,
                outs,
                failures: w.failures(),
            };
            w.run.spawn(
                w.index,
                pump(rx, w.guard(Box::new(handler))).instrument(w.ctx.span.clone()),
            );
            Ok(())
        });
        let index = add_node(&self.inner, node, factory, &[(self.node, self.port)]);
        let outputs = (0..self.inner.borrow().nodes[index].node.outputs.len())
            .map(|port| {
                let name = self.inner.borrow().nodes[index].node.outputs[port].clone();
                (name, Some(Stream::new(self.inner.clone(), index, port)))
            })
            .collect();
        Branches { outputs }
    }

    /// Joins this stream with `others` (same item type) into one.
    pub fn merge(
        self,
        id: impl Into<String>,
        others: impl IntoIterator<Item = Stream<T>>,
    ) -> Stream<T> {
        let mut inputs = vec![(self.node, self.port)];
        inputs.extend(others.into_iter().map(|s| (s.node, s.port)));
        let count = inputs.len();
        let node = StageNode::new(id, StageKind::Merge);
        let factory: NodeFactory = Box::new(move |w| {
            let next = w.output::<T>(0)?.into_downstream();
            let rx = w.input_edge::<T>(count);
            let handler = MergeHandler {
                next,
                stats: w.stats.clone(),
            };
            w.run.spawn(
                w.index,
                pump(rx, w.guard(Box::new(handler))).instrument(w.ctx.span.clone()),
            );
            Ok(())
        });
        let index = add_node(&self.inner, node, factory, &inputs);
        Stream::new(self.inner, index, 0)
    }

    /// Ends the stream in a sink.
    pub fn sink<S>(self, id: impl Into<String>, sink: S) -> SinkHandle
    where
        S: Sink<Item = T>,
    {
        let node = StageNode::new(id, StageKind::Sink);
        let factory: NodeFactory = Box::new(move |w| {
            let rx = w.input_edge::<T>(1);
            let handler = SinkHandler::new(sink, w.ctx.clone(), w.failures());
            w.run.spawn(
                w.index,
                pump(rx, w.guard(Box::new(handler))).instrument(w.ctx.span.clone()),
            );
            Ok(())
        });
        let index = add_node(&self.inner, node, factory, &[(self.node, self.port)]);
        SinkHandle {
            inner: self.inner,
            node: index,
        }
    }
}
