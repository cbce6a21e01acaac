//! From a checked [`Config`] to an engine pipeline.
//!
//! First the components alone form an untyped graph that the engine validates
//! (`PipelineGraph::validate`): unknown inputs, cycles, unconnected outputs, unknown policy
//! names, zero capacities, conflicting parallelism. Each problem is shown at the component
//! it is about. Then the typed pipeline is built in topological order; a component may add
//! helper stages, named after it:
//!
//! - a `file` or `stdin` source `x` reads lines in stage `x` and decodes them in `x.decode`
//!   (where its policies apply and malformed lines are dead-lettered);
//! - a `generate` source `x` counts in `x` and builds items in `x.build`;
//! - an output read by several components fans out through `x.fanout` (copies);
//! - a component with several inputs merges them in `x.merge`;
//! - a `stdout` or `file` sink `x` turns items into JSON lines in `x.encode`;
//! - an `accumulate` transform `x` evaluates its jq expressions in `x.eval` (where its
//!   policies apply and failing items are dead-lettered) and accumulates in `x`.
//!
//! A `filter`, `map` or `x.encode` without a `parallelism` of its own whose only input ends in
//! a parallel stage (a file source's `x.decode` runs on one worker per core by default) runs
//! on the same workers, in order: the engine then chains it behind each worker, so an item is
//! decoded, filtered, mapped and encoded while it is in that worker's cache.
//!
//! A JSON-lines source may decode its items to the top-level fields read downstream
//! ([`projection`]).
//!
//! Each component adds its own stages ([`crate::components`]), given a [`BuildContext`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use jaq_json::Val;
use pulseflow::policy::ParallelismHint;
use pulseflow::{BuildError, Pipeline, PipelineBuilder, Routes, Stream};

pub mod context;
pub mod graph;
pub mod projection;

pub use context::BuildContext;
pub use graph::{validate_components, validation_problems};
pub use projection::projected_stages;

use crate::components::Kind;
use crate::components::sources::checkpoint::Checkpoints;
use crate::config::{Component, Config, ParallelismSetting, Problem, Problems};

/// Who reads each output: (component, port) -> readers in config order.
pub(crate) type Readers = BTreeMap<(String, String), Vec<String>>;

/// What the running pipeline shares with the command: bytes read by file sources, and their
/// checkpoints (written a last time when the run ends).
#[derive(Clone, Default)]
pub struct Progress {
    /// Bytes read so far by file sources.
    pub bytes: Arc<AtomicU64>,
    /// Total size of the files file sources will read.
    pub total: u64,
    /// The checkpoints of file sources (with a `data_dir`).
    pub checkpoints: Vec<Arc<Checkpoints>>,
    /// What resolves once the acks of `nats` sources are sent, awaited after the run.
    pub acks_flushed: Vec<pulseflow::connectors::nats::source::AcksFlushed>,
}

fn parallelism(config: &Config, c: &Component) -> Option<ParallelismHint> {
    match &c.policies.parallelism {
        Some(ParallelismSetting::Inline(h)) => Some(*h),
        Some(ParallelismSetting::Named(n, _)) => config.parallelism.get(n).copied(),
        None => None,
    }
}

/// Who reads each output.
fn readers(config: &Config) -> Readers {
    let mut map = Readers::new();
    for c in &config.components {
        for i in &c.inputs {
            map.entry((
                i.component.clone(),
                i.port.clone().unwrap_or_else(|| "out".into()),
            ))
            .or_default()
            .push(c.name.clone());
        }
    }
    map
}

/// Validates the component graph with the engine, then builds the pipeline.
pub fn build(config: &Config) -> Result<(Pipeline, Progress), Vec<Problem>> {
    let mut problems = Problems::new(&config.file, config.text.clone());
    crate::config::check_references(config, &mut problems);
    let errors = validate_components(config);
    if !errors.is_empty() || !problems.is_empty() {
        let mut all = problems.into_vec();
        all.extend(validation_problems(config, &errors));
        return Err(all);
    }
    let mut progress = Progress {
        checkpoints: Vec::new(),
        acks_flushed: Vec::new(),
        bytes: Arc::new(AtomicU64::new(0)),
        total: config
            .components
            .iter()
            .map(|c| match &c.kind {
                Kind::Source(s) => s.input_bytes(),
                _ => 0,
            })
            .sum(),
    };
    let mut problems = Problems::new(&config.file, config.text.clone());
    let mut p = PipelineBuilder::new(config.name.clone());
    p.policies(config.registry.clone());
    p.metadata("config", config.file.clone());
    let readers = readers(config);
    let mut pending: HashMap<(String, String), Vec<Stream<Val>>> = HashMap::new();
    // Outputs that end in a parallel ordered stage, with its workers (see
    // `BuildContext::chain`).
    let mut chained: HashMap<(String, String), ParallelismHint> = HashMap::new();
    for c in topological(config) {
        let mut inputs: Vec<Stream<Val>> = Vec::new();
        let mut input_workers = None;
        for i in &c.inputs {
            let key = (
                i.component.clone(),
                i.port.clone().unwrap_or_else(|| "out".into()),
            );
            if let Some(s) = pending.get_mut(&key).and_then(Vec::pop) {
                inputs.push(s);
                input_workers = chained.get(&key).copied();
            }
        }
        if inputs.len() != 1 {
            input_workers = None;
        }
        let input = if inputs.len() > 1 {
            let first = inputs.remove(0);
            Some(first.merge(format!("{}.merge", c.name), inputs))
        } else {
            inputs.pop()
        };
        let mut cx = BuildContext {
            builder: &mut p,
            hint: parallelism(config, c),
            input_workers,
            config,
            component: c,
            readers: &readers,
            progress: &mut progress,
            problems: &mut problems,
            chained: &mut chained,
        };
        let outputs = match (&c.kind, input) {
            (Kind::Source(s), _) => vec![("out".to_owned(), s.build(&mut cx))],
            (Kind::Transform(t), Some(input)) => t.build(&mut cx, input),
            (Kind::Sink(s), Some(input)) => {
                let sink = s.build(&mut cx, input);
                cx.sink_policies(sink);
                Vec::new()
            }
            (_, None) => Vec::new(),
        };
        for (port, stream) in outputs {
            let key = (c.name.clone(), port.clone());
            let n = readers.get(&key).map_or(0, Vec::len);
            if n > 1 {
                chained.remove(&key);
                pending.insert(key, fan_out(stream, &c.name, &port, n));
            } else {
                pending.insert(key, vec![stream]);
            }
        }
    }
    drop(pending);
    if !problems.is_empty() {
        return Err(problems.into_vec());
    }
    match p.build() {
        Ok(pipeline) => Ok((pipeline, progress)),
        Err(BuildError { errors }) => Err(validation_problems(config, &errors)),
    }
}

/// `n` copies of `stream` (output `port` of `component`) through a fan-out stage, in the
/// order its readers take them.
fn fan_out(stream: Stream<Val>, component: &str, port: &str, n: usize) -> Vec<Stream<Val>> {
    let id = if port == "out" {
        format!("{component}.fanout")
    } else {
        format!("{component}.{port}.fanout")
    };
    let names: Vec<String> = (0..n).map(|i| format!("copy{i}")).collect();
    let mut r = Routes::new();
    for name in &names {
        r = r.route(name.clone(), |_: &Val| true);
    }
    let mut copies = stream.branch(id, r);
    names
        .iter()
        .filter_map(|name| copies.take(name))
        .rev()
        .collect()
}

/// Components in an order where each comes after its inputs (the graph is validated, so
/// acyclic).
fn topological(config: &Config) -> Vec<&Component> {
    let mut done: Vec<&str> = Vec::new();
    let mut order = Vec::new();
    while order.len() < config.components.len() {
        let before = order.len();
        for c in &config.components {
            if done.contains(&c.name.as_str()) {
                continue;
            }
            if c.inputs
                .iter()
                .all(|i| done.contains(&i.component.as_str()))
            {
                done.push(&c.name);
                order.push(c);
            }
        }
        if order.len() == before {
            break;
        }
    }
    order
}
