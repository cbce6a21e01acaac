//! The accumulator methods of [`Stream`].

use std::sync::Arc;

use super::Stream;
use crate::accumulate::{Accumulator, AccumulatorPolicy};
use crate::engine::accumulate::{AccInstances, wire_accumulator};
use crate::graph::StageNode;
use crate::stage::StageKind;

impl<T: Send + 'static> Stream<T> {
    /// Groups items by key and emits one output per completed (or flushed) key; see
    /// [`accumulate`](crate::accumulate). One instance: sequential only.
    pub fn accumulate<A>(
        self,
        id: impl Into<String>,
        accumulator: A,
        policy: AccumulatorPolicy,
    ) -> Stream<A::Out>
    where
        A: Accumulator<In = T>,
    {
        self.add_accumulator(id, AccInstances::One(accumulator), policy, false)
    }

    /// Like [`accumulate`](Stream::accumulate), with one accumulator per worker made by
    /// `make`: with [`parallelism`](Stream::parallelism), keys are partitioned by hash so each
    /// key stays on one worker, in order.
    pub fn accumulate_with<A, M>(
        self,
        id: impl Into<String>,
        make: M,
        policy: AccumulatorPolicy,
    ) -> Stream<A::Out>
    where
        A: Accumulator<In = T>,
        M: Fn() -> A + Send + Sync + 'static,
    {
        self.add_accumulator(id, AccInstances::Many(Arc::new(make)), policy, true)
    }

    fn add_accumulator<A>(
        self,
        id: impl Into<String>,
        instances: AccInstances<A>,
        policy: AccumulatorPolicy,
        replicable: bool,
    ) -> Stream<A::Out>
    where
        A: Accumulator<In = T>,
    {
        let mut node = StageNode::new(id, StageKind::Accumulator);
        node.stateless = false;
        node.replicable = replicable;
        self.then(
            node,
            Box::new(move |w| wire_accumulator(w, instances, policy)),
        )
    }
}
