//! What a component is given to add its stages: the pipeline builder, its own name and
//! policies, the workers of its input, and what the build knows of the rest of the config.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use pulseflow::builder::SinkHandle;
use pulseflow::policy::ParallelismHint;
use pulseflow::{PipelineBuilder, Stream};

use super::{Progress, Readers, projection};
use crate::components::sources::checkpoint::Checkpoints;
use crate::config::{Component, Config, Problems};

/// `$s` (a stream or a sink) with the policies `$p` set (those not set keep the engine's
/// defaults): the same methods on both.
macro_rules! policies {
    ($s:expr, $p:expr) => {{
        let p = &$p;
        let mut s = $s;
        if let Some(b) = &p.buffer {
            s = s.buffer(b.clone());
        }
        if let Some(b) = &p.backpressure {
            s = s.backpressure(b.clone());
        }
        if let Some(e) = &p.error_policy {
            s = s.error_policy(e.clone());
        }
        if let Some(b) = &p.circuit_breaker {
            s = s.circuit_breaker(b.clone());
        }
        s
    }};
}

/// What [`crate::components`] build with.
pub struct BuildContext<'a> {
    /// The pipeline being built (sources add their first stage to it).
    pub builder: &'a mut PipelineBuilder,
    /// The component's own `parallelism`, resolved.
    pub hint: Option<ParallelismHint>,
    /// The workers of the component's only input, when it ends in a stage on several workers
    /// in order (see [`BuildContext::chain`]).
    pub input_workers: Option<ParallelismHint>,
    pub(super) config: &'a Config,
    pub(super) component: &'a Component,
    pub(super) readers: &'a Readers,
    pub(super) progress: &'a mut Progress,
    pub(super) problems: &'a mut Problems,
    pub(super) chained: &'a mut HashMap<(String, String), ParallelismHint>,
}

impl BuildContext<'_> {
    /// The component's name: the id of its main stage.
    pub fn name(&self) -> &str {
        &self.component.name
    }

    /// The id of one of its helper stages: `NAME.suffix`.
    pub fn stage(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.component.name)
    }

    /// Whether some component reads its output `port`.
    pub fn is_read(&self, port: &str) -> bool {
        self.readers
            .contains_key(&(self.component.name.clone(), port.to_owned()))
    }

    /// Records that the component's output ends in a stage on these workers, in order, when
    /// they are several. A `filter` or `map` reading only that output, without a
    /// `parallelism` of its own, runs on the same workers: its jq expression is stateless, so
    /// the engine chains it behind each of them (no channel between the stages, the item still
    /// in the worker's cache) and input order is restored once, after the chain.
    pub fn chain(&mut self, workers: Option<ParallelismHint>) {
        if let Some(h) = workers.filter(|h| !h.is_sequential()) {
            self.chained
                .insert((self.component.name.clone(), "out".into()), h);
        }
    }

    /// Sets the component's policies on the stage that produced `s`, and `workers` (in order
    /// when several).
    pub fn with_policies<T: Send + 'static>(
        &self,
        s: Stream<T>,
        workers: Option<ParallelismHint>,
    ) -> Stream<T> {
        let mut s = policies!(s, self.component.policies);
        if let Some(h) = workers {
            s = s.parallelism(h);
            if !h.is_sequential() {
                s = s.ordered();
            }
        }
        s
    }

    /// The top-level fields a source may decode its items to (see [`projection`]).
    pub fn projected_fields(&self) -> Option<Arc<[Bytes]>> {
        projection::projection(self.config, self.component).map(|p| p.fields.into())
    }

    /// Whether a source whose items carry no input size (`generate`) feeds the component,
    /// directly or through other components.
    pub fn fed_by_unsized_source(&self) -> bool {
        let config = self.config;
        let mut todo: Vec<&str> = self
            .component
            .inputs
            .iter()
            .map(|i| i.component.as_str())
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        while let Some(name) = todo.pop() {
            if !seen.insert(name) {
                continue;
            }
            if let Some(up) = config.component(name) {
                if let crate::components::Kind::Source(s) = &up.kind {
                    if !s.sized_items() {
                        return true;
                    }
                }
                todo.extend(up.inputs.iter().map(|i| i.component.as_str()));
            }
        }
        false
    }

    /// The config being built.
    pub fn config(&self) -> &Config {
        self.config
    }

    /// Reports a problem found while building, at the component.
    pub fn problem(&mut self, message: impl Into<String>, help: Option<String>) {
        self.problems
            .add(message, Some(self.component.span.clone()), "here", help);
    }

    /// Keeps checkpoints that the run writes a last time when it ends.
    pub fn keep_checkpoints(&mut self, checkpoints: Arc<Checkpoints>) {
        self.progress.checkpoints.push(checkpoints);
    }

    /// Keeps what resolves once a `nats` source's acks are sent: the run awaits it at its end.
    pub fn keep_acks_flushed(&mut self, flushed: pulseflow::connectors::nats::source::AcksFlushed) {
        self.progress.acks_flushed.push(flushed);
    }

    /// The counter of bytes read that file sources update.
    pub fn progress_bytes(&self) -> Arc<AtomicU64> {
        self.progress.bytes.clone()
    }

    /// Sets the component's policies on its sink.
    pub(super) fn sink_policies(&self, s: SinkHandle) {
        let _ = policies!(s, self.component.policies);
    }
}
