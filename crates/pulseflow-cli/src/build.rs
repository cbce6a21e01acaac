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
//! **Projection.** When the items of a JSON-lines source only ever meet `filter`, `route` and
//! `map` components whose jq expressions read some top-level fields (and never the item as a
//! whole), up to the `map`s that build new values from them, the source decodes each object
//! to those fields alone ([`projection`]): the others are checked as JSON but not built.
//! Results are the same, since those expressions cannot see the rest; an item dead-lettered
//! by one of those components holds the fields read, and its record says `"projected":
//! true`. `project = false` on the source turns this off.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use jaq_json::Val;
use pulseflow::graph::{ChannelDescriptor, Edge, PipelineGraph, StageNode};
use pulseflow::policy::{ChannelOrdering, ParallelismHint};
use pulseflow::stage::StageKind;
use pulseflow::{BuildError, Pipeline, PipelineBuilder, Routes, Stream, ValidationError};

use crate::components::accumulate::{Aggregator, Evaluate};
use crate::components::decode::Decode;
use crate::components::generate::Generate;
use crate::components::lines::{Input, LineSource};
use crate::components::sinks::{Blackhole, Encode, Line, NdjsonSink};
use crate::components::transforms::{Build, JqTransform, Mode};
use crate::config::{Component, Config, Format, Kind, ParallelismSetting, Problem, Problems, Role};

/// Shared figures the running pipeline updates (bytes read by file sources).
#[derive(Clone, Default)]
pub struct Progress {
    /// Bytes read so far by file sources.
    pub bytes: Arc<AtomicU64>,
    /// Total size of the files file sources will read.
    pub total: u64,
}

fn stage_kind(c: &Component) -> StageKind {
    match (&c.kind, c.role) {
        (Kind::Route { .. }, _) => StageKind::Branch,
        (Kind::Accumulate(_), _) => StageKind::Accumulator,
        (_, Role::Source) => StageKind::Source,
        (_, Role::Transform) => StageKind::Transform,
        (_, Role::Sink) => StageKind::Sink,
    }
}

fn parallelism(config: &Config, c: &Component) -> Option<ParallelismHint> {
    match &c.policies.parallelism {
        Some(ParallelismSetting::Inline(h)) => Some(*h),
        Some(ParallelismSetting::Named(n, _)) => config.parallelism.get(n).copied(),
        None => None,
    }
}

/// Who reads each output: (component, port) -> readers in config order.
fn readers(config: &Config) -> BTreeMap<(String, String), Vec<String>> {
    let mut map: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
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

/// What a source may decode its items to (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    /// The top-level fields read downstream, in order of first use.
    pub fields: Vec<Bytes>,
    /// The components that see the reduced items (filters, routes and maps).
    pub stages: Vec<String>,
}

/// The projection of `source`'s items, when it is a JSON-lines source that allows it and
/// every component its items reach reads only some of their top-level fields.
pub fn projection(config: &Config, source: &Component) -> Option<Projection> {
    match &source.kind {
        Kind::FileSource {
            format: Format::Ndjson,
            project: true,
            ..
        }
        | Kind::Stdin {
            format: Format::Ndjson,
            project: true,
            ..
        } => {}
        _ => return None,
    }
    let readers = readers(config);
    let mut fields: Vec<Bytes> = Vec::new();
    let mut stages: Vec<String> = Vec::new();
    let mut add = |read: Vec<Val>| {
        for k in read {
            let Val::TStr(b) = k else { return false };
            if !fields.iter().any(|f| f[..] == b[..]) {
                fields.push(Bytes::copy_from_slice(&b));
            }
        }
        true
    };
    // Outputs whose items are the source's items, unchanged.
    let mut todo = vec![(source.name.clone(), "out".to_owned())];
    while let Some(output) = todo.pop() {
        for name in readers.get(&output).into_iter().flatten() {
            let c = config.component(name)?;
            let read_only = match &c.kind {
                Kind::Filter { condition } => {
                    todo.push((name.clone(), "out".into()));
                    condition.program.fields().is_some_and(&mut add)
                }
                // A map's outputs are new values, built from the fields it reads.
                Kind::Map { jq } => jq.program.fields().is_some_and(&mut add),
                Kind::Route { routes } => {
                    todo.extend(routes.iter().map(|(r, _)| (name.clone(), r.clone())));
                    todo.push((name.clone(), "_unmatched".into()));
                    routes
                        .iter()
                        .all(|(_, jq)| jq.program.fields().is_some_and(&mut add))
                }
                _ => false,
            };
            if !read_only {
                return None;
            }
            if !stages.contains(name) {
                stages.push(name.clone());
            }
        }
    }
    Some(Projection { fields, stages })
}

/// Every component that sees reduced items, for the dead-letter records.
pub fn projected_stages(config: &Config) -> Vec<String> {
    config
        .components
        .iter()
        .filter_map(|c| projection(config, c))
        .flat_map(|p| p.stages)
        .collect()
}

/// The components as an untyped graph, for the engine's validation.
pub fn component_graph(config: &Config) -> PipelineGraph {
    let readers = readers(config);
    let mut graph = PipelineGraph::default();
    for c in &config.components {
        let mut node = StageNode::new(c.name.clone(), stage_kind(c));
        if let Kind::Route { routes } = &c.kind {
            node.outputs = routes.iter().map(|(r, _)| r.clone()).collect();
            if readers.contains_key(&(c.name.clone(), "_unmatched".into())) {
                node.outputs.push("_unmatched".into());
            }
        }
        let p = &c.policies;
        node.buffer = p.buffer.clone();
        node.backpressure = p.backpressure.clone();
        if let Some(e) = &p.error_policy {
            node.error_policy = e.clone();
        }
        node.circuit_breaker = p.circuit_breaker.clone();
        // A source's parallelism is its helper stage's (`x.decode`, `x.build`): the reading
        // or counting itself runs on one worker.
        if let Some(h) = parallelism(config, c).filter(|_| c.role != Role::Source) {
            node.parallelism = h;
            node.replicable = !matches!(c.kind, Kind::Route { .. }) && c.role != Role::Sink;
            node.stateless = !matches!(c.kind, Kind::Accumulate(_));
        }
        graph.nodes.push(node);
        for i in &c.inputs {
            graph.edges.push(Edge {
                from: i.component.clone(),
                port: i.port.clone().unwrap_or_else(|| "out".into()),
                to: c.name.clone(),
                channel: ChannelDescriptor {
                    buffer_size: pulseflow::policy::BufferPolicy::DEFAULT.capacity,
                    ordering: ChannelOrdering::Unordered,
                },
            });
        }
    }
    graph
}

/// The engine's validation of the component graph. An edge from an unknown component also
/// leaves its target with an input that never becomes ready, which the engine's cycle search
/// would report as a cycle; cycles are therefore searched without such edges.
pub fn validate_components(config: &Config) -> Vec<ValidationError> {
    let graph = component_graph(config);
    let mut errors: Vec<ValidationError> = graph
        .validate(&config.registry)
        .into_iter()
        .filter(|e| !matches!(e, ValidationError::Cycle(_)))
        .collect();
    let mut known = graph.clone();
    known
        .edges
        .retain(|e| config.component(&e.from).is_some() && config.component(&e.to).is_some());
    errors.extend(
        known
            .validate(&config.registry)
            .into_iter()
            .filter(|e| matches!(e, ValidationError::Cycle(_))),
    );
    errors
}

/// Maps an engine stage id back to the component that made it.
fn component_of<'a>(config: &'a Config, stage: &str) -> Option<&'a Component> {
    config.component(stage).or_else(|| {
        stage
            .split_once('.')
            .and_then(|(head, _)| config.component(head))
    })
}

/// Shows the engine's validation errors at the components they are about.
pub fn validation_problems(config: &Config, errors: &[ValidationError]) -> Vec<Problem> {
    let mut problems = Problems::new(&config.file, config.text.clone());
    for e in errors {
        let (span, label, help) = match e {
            ValidationError::DanglingEdge { to, missing, .. } => {
                let span = config.component(to).and_then(|c| {
                    c.inputs
                        .iter()
                        .find(|i| &i.component == missing)
                        .map(|i| i.span.clone())
                });
                let names: Vec<String> = config
                    .components
                    .iter()
                    .filter(|c| c.role != Role::Sink)
                    .map(|c| format!("`{}`", c.name))
                    .collect();
                (
                    span,
                    "unknown component".to_owned(),
                    Some(format!("known components: {}", names.join(", "))),
                )
            }
            ValidationError::UnusedOutput { stage, port } => (
                component_of(config, stage).map(|c| c.span.clone()),
                "output not read".to_owned(),
                Some(format!(
                    "add a component with `inputs = [\"{}\"]`, or remove it",
                    if port == "out" {
                        stage.clone()
                    } else {
                        format!("{stage}.{port}")
                    }
                )),
            ),
            ValidationError::Cycle(stages) => (
                stages
                    .first()
                    .and_then(|s| component_of(config, s))
                    .map(|c| c.span.clone()),
                "on a cycle".to_owned(),
                None,
            ),
            other => (
                other
                    .stage()
                    .and_then(|s| component_of(config, s))
                    .map(|c| c.span.clone()),
                "here".to_owned(),
                None,
            ),
        };
        problems.add(e.to_string(), span, label, help);
    }
    problems.into_vec()
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
    let progress = Progress {
        bytes: Arc::new(AtomicU64::new(0)),
        total: config
            .components
            .iter()
            .filter_map(|c| match &c.kind {
                Kind::FileSource { paths, .. } => Some(
                    paths
                        .iter()
                        .filter_map(|p| std::fs::metadata(p).ok())
                        .map(|m| m.len())
                        .sum::<u64>(),
                ),
                _ => None,
            })
            .sum(),
    };
    let mut p = PipelineBuilder::new(config.name.clone());
    p.policies(config.registry.clone());
    p.metadata("config", config.file.clone());
    let readers = readers(config);
    let order = topological(config);
    let mut pending: HashMap<(String, String), Vec<Stream<Val>>> = HashMap::new();
    // Outputs that end in a parallel ordered stage, with its workers (see `chained`).
    let mut workers: HashMap<(String, String), ParallelismHint> = HashMap::new();
    for c in order {
        let mut inputs: Vec<Stream<Val>> = Vec::new();
        let mut input_workers = None;
        for i in &c.inputs {
            let key = (
                i.component.clone(),
                i.port.clone().unwrap_or_else(|| "out".into()),
            );
            if let Some(s) = pending.get_mut(&key).and_then(Vec::pop) {
                inputs.push(s);
                input_workers = workers.get(&key).copied();
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
        let hint = parallelism(config, c);
        let mut outputs: Vec<(String, Stream<Val>)> = Vec::new();
        match (&c.kind, input) {
            (
                Kind::FileSource {
                    pattern,
                    paths,
                    format,
                    max_line_bytes,
                    ..
                },
                _,
            ) => {
                let src = LineSource::new(
                    paths.iter().cloned().map(Input::Path).collect(),
                    Some(pattern.clone()),
                    *format,
                    *max_line_bytes,
                    progress.bytes.clone(),
                );
                let s = p
                    .source(c.name.clone(), src)
                    .transform_with(format!("{}.decode", c.name), decoder(config, c, *format));
                let hint = hint.or_else(default_decode_parallelism);
                chained(&mut workers, c, hint);
                outputs.push(("out".into(), with_policies(s, c, hint)));
            }
            (
                Kind::Stdin {
                    format,
                    max_line_bytes,
                    ..
                },
                _,
            ) => {
                let src = LineSource::new(
                    vec![Input::Stdin],
                    None,
                    *format,
                    *max_line_bytes,
                    Arc::new(AtomicU64::new(0)),
                );
                let s = p
                    .source(c.name.clone(), src)
                    .transform_with(format!("{}.decode", c.name), decoder(config, c, *format));
                chained(&mut workers, c, hint);
                outputs.push(("out".into(), with_policies(s, c, hint)));
            }
            (Kind::Generate { count, rate, jq }, _) => {
                let program = jq.as_ref().map(|j| j.program.clone());
                let s = p
                    .source(c.name.clone(), Generate::new(*count, *rate))
                    .transform_with(format!("{}.build", c.name), move || Build {
                        program: program.clone(),
                    });
                outputs.push(("out".into(), with_policies(s, c, hint)));
            }
            (Kind::Filter { condition: jq }, Some(input)) | (Kind::Map { jq }, Some(input)) => {
                let mode = if matches!(c.kind, Kind::Filter { .. }) {
                    Mode::Filter
                } else {
                    Mode::Map
                };
                let program = jq.program.clone();
                let s = input.transform_with(c.name.clone(), move || JqTransform {
                    program: program.clone(),
                    mode,
                });
                let hint = hint.or(input_workers);
                chained(&mut workers, c, hint);
                outputs.push(("out".into(), with_policies(s, c, hint)));
            }
            (Kind::Route { routes }, Some(input)) => {
                let mut r = Routes::new();
                for (name, jq) in routes {
                    let program = jq.program.clone();
                    // A jq error counts as "does not match": the item goes on to the other
                    // routes or to `_unmatched`.
                    r = r.route(name.clone(), move |v: &Val| {
                        program.test(v).unwrap_or(false)
                    });
                }
                let unmatched = readers.contains_key(&(c.name.clone(), "_unmatched".into()));
                if unmatched {
                    r = r.unmatched("_unmatched");
                }
                let mut branches = input.branch(c.name.clone(), r);
                let taken = routes
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .chain(unmatched.then_some("_unmatched"))
                    .filter_map(|name| Some((name.to_owned(), branches.take(name)?)));
                // The route's policies are its branch stage's: set through any of its outputs
                // (all of them stand for that stage).
                for (i, (name, s)) in taken.enumerate() {
                    let s = if i == 0 { with_policies(s, c, None) } else { s };
                    outputs.push((name, s));
                }
            }
            (Kind::Accumulate(spec), Some(input)) => {
                let eval = spec.clone();
                let json_sizes = spec.policy.max_bytes.is_some() && fed_by_generate(config, c);
                let s = input.transform_with(format!("{}.eval", c.name), move || Evaluate {
                    spec: eval.clone(),
                    json_sizes,
                    scratch: Vec::new(),
                });
                let s = with_policies(s, c, hint);
                let acc = spec.clone();
                let mut s = s.accumulate_with(
                    c.name.clone(),
                    move || Aggregator { spec: acc.clone() },
                    spec.policy.clone(),
                );
                if let Some(h) = hint {
                    s = s.parallelism(h);
                }
                outputs.push(("out".into(), s));
            }
            (Kind::StdoutSink, Some(input)) => {
                let lines = encoded(input, c, input_workers);
                sink_policies(lines.sink(c.name.clone(), NdjsonSink::stdout()), c);
            }
            (Kind::FileSink { path, append }, Some(input)) => {
                let lines = encoded(input, c, input_workers);
                sink_policies(
                    lines.sink(c.name.clone(), NdjsonSink::file(path.clone(), *append)),
                    c,
                );
            }
            (Kind::Blackhole, Some(input)) => {
                sink_policies(input.sink(c.name.clone(), Blackhole), c);
            }
            (_, None) => {}
        }
        for (port, stream) in outputs {
            let key = (c.name.clone(), port.clone());
            let n = readers.get(&key).map_or(0, Vec::len);
            if n > 1 {
                workers.remove(&key);
                let id = if port == "out" {
                    format!("{}.fanout", c.name)
                } else {
                    format!("{}.{port}.fanout", c.name)
                };
                let names: Vec<String> = (0..n).map(|i| format!("copy{i}")).collect();
                let mut r = Routes::new();
                for name in &names {
                    r = r.route(name.clone(), |_: &Val| true);
                }
                let mut copies = stream.branch(id, r);
                let list: Vec<Stream<Val>> = names
                    .iter()
                    .filter_map(|name| copies.take(name))
                    .rev()
                    .collect();
                pending.insert(key, list);
            } else {
                pending.insert(key, vec![stream]);
            }
        }
    }
    drop(pending);
    match p.build() {
        Ok(pipeline) => Ok((pipeline, progress)),
        Err(BuildError { errors }) => Err(validation_problems(config, &errors)),
    }
}

/// Records that component `c`'s output ends in a stage on these workers, in order, when they
/// are several. A `filter` or `map` reading only that output, without a `parallelism` of its
/// own, runs on the same workers: its jq expression is stateless, so the engine chains it
/// behind each of them (no channel between the stages, the item still in the worker's cache)
/// and input order is restored once, after the chain.
fn chained(
    workers: &mut HashMap<(String, String), ParallelismHint>,
    c: &Component,
    hint: Option<ParallelismHint>,
) {
    if let Some(h) = hint.filter(|h| !h.is_sequential()) {
        workers.insert((c.name.clone(), "out".into()), h);
    }
}

/// The items of `input` as JSON lines, encoded in `x.encode` for sink `x`: on the same workers
/// as the stage before it when those are several (chained behind them, see [`chained`]).
fn encoded(input: Stream<Val>, sink: &Component, workers: Option<ParallelismHint>) -> Stream<Line> {
    let s = input.transform_with(format!("{}.encode", sink.name), || Encode);
    match workers {
        Some(h) => s.parallelism(h).ordered(),
        None => s,
    }
}

/// Makes the decoding stage of a line source (`Decode` for each worker).
fn decoder(config: &Config, source: &Component, format: Format) -> impl Fn() -> Decode + use<> {
    let fields: Option<Arc<[Bytes]>> = projection(config, source).map(|p| p.fields.into());
    move || Decode {
        format,
        fields: fields.clone(),
    }
}

fn with_policies<T: Send + 'static>(
    s: Stream<T>,
    c: &Component,
    hint: Option<ParallelismHint>,
) -> Stream<T> {
    let p = &c.policies;
    let mut s = s;
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
    if let Some(h) = hint {
        s = s.parallelism(h);
        if !h.is_sequential() {
            s = s.ordered();
        }
    }
    s
}

/// Whether a `generate` source feeds `c`, directly or through other components (its items
/// were not read from lines, so they have no input size of their own).
fn fed_by_generate(config: &Config, c: &Component) -> bool {
    let mut todo: Vec<&str> = c.inputs.iter().map(|i| i.component.as_str()).collect();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(name) = todo.pop() {
        if !seen.insert(name) {
            continue;
        }
        if let Some(up) = config.component(name) {
            if matches!(up.kind, Kind::Generate { .. }) {
                return true;
            }
            todo.extend(up.inputs.iter().map(|i| i.component.as_str()));
        }
    }
    false
}

/// Decoding a file's lines (and the stages fused into it) is CPU-bound and stateless: without
/// a `parallelism` policy, a file source decodes on one worker per core, in order, when the
/// machine has more than one.
fn default_decode_parallelism() -> Option<ParallelismHint> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores > 1).then_some(ParallelismHint::Fixed(cores))
}

fn sink_policies(s: pulseflow::builder::SinkHandle, c: &Component) {
    let p = &c.policies;
    let mut s = s;
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
    let _ = s;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        let parsed = crate::config::parse("test.toml", Arc::new(text.to_owned()), ".".as_ref());
        match parsed {
            Ok(c) => c,
            Err(problems) => panic!("config refused: {}", problems.len()),
        }
    }

    /// The projection of source `lines`, as field names.
    fn fields(text: &str) -> Option<(Vec<String>, Vec<String>)> {
        let config = config(text);
        let source = config.component("lines").expect("source");
        projection(&config, source).map(|p| {
            let names = p
                .fields
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect();
            (names, p.stages)
        })
    }

    const SOURCE: &str = "[sources.lines]\ntype = \"stdin\"\n";

    #[test]
    fn filters_and_maps_reading_fields_project_their_source() {
        let text = format!(
            "{SOURCE}\
             [transforms.keep]\ntype = \"filter\"\ninputs = [\"lines\"]\ncondition = \".ok and true\"\n\
             [transforms.keep2]\ntype = \"filter\"\ninputs = [\"keep\"]\ncondition = \".n.m > 1\"\n\
             [transforms.shape]\ntype = \"map\"\ninputs = [\"keep2\"]\njq = \"{{id, v: (.n.x * 2)}}\"\n\
             [sinks.out]\ntype = \"stdout\"\ninputs = [\"shape\"]\n"
        );
        // `.ok and true` is not one the direct evaluator handles: nothing is projected.
        assert_eq!(fields(&text), None);
        let text = text.replace(".ok and true", ".ok");
        assert_eq!(
            fields(&text),
            Some((
                vec!["ok".into(), "n".into(), "id".into()],
                vec!["keep".into(), "keep2".into(), "shape".into()]
            ))
        );
        let off = text.replace("type = \"stdin\"\n", "type = \"stdin\"\nproject = false\n");
        assert_eq!(fields(&off), None);
    }

    #[test]
    fn items_reaching_a_sink_or_read_whole_are_not_projected() {
        let filter_to_sink = format!(
            "{SOURCE}\
             [transforms.keep]\ntype = \"filter\"\ninputs = [\"lines\"]\ncondition = \".ok\"\n\
             [sinks.out]\ntype = \"stdout\"\ninputs = [\"keep\"]\n"
        );
        assert_eq!(fields(&filter_to_sink), None);
        let whole = format!(
            "{SOURCE}\
             [transforms.shape]\ntype = \"map\"\ninputs = [\"lines\"]\njq = \"{{all: .}}\"\n\
             [sinks.out]\ntype = \"stdout\"\ninputs = [\"shape\"]\n"
        );
        assert_eq!(fields(&whole), None);
        // One reader of a fanned-out output takes the items whole.
        let fanout = format!(
            "{SOURCE}\
             [transforms.shape]\ntype = \"map\"\ninputs = [\"lines\"]\njq = \".a\"\n\
             [sinks.out]\ntype = \"stdout\"\ninputs = [\"shape\"]\n\
             [sinks.raw]\ntype = \"blackhole\"\ninputs = [\"lines\"]\n"
        );
        assert_eq!(fields(&fanout), None);
        let csv = format!(
            "{SOURCE}format = \"csv\"\n\
             [transforms.shape]\ntype = \"map\"\ninputs = [\"lines\"]\njq = \".a\"\n\
             [sinks.out]\ntype = \"stdout\"\ninputs = [\"shape\"]\n"
        );
        assert_eq!(fields(&csv), None);
    }

    #[test]
    fn routes_project_through_every_output() {
        let text = format!(
            "{SOURCE}\
             [transforms.split]\ntype = \"route\"\ninputs = [\"lines\"]\n\
             routes.big = \".size > 10\"\nroutes.small = \".size < 3\"\n\
             [transforms.big]\ntype = \"map\"\ninputs = [\"split.big\"]\njq = \"{{id}}\"\n\
             [transforms.small]\ntype = \"map\"\ninputs = [\"split.small\"]\njq = \".name\"\n\
             [transforms.rest]\ntype = \"map\"\ninputs = [\"split._unmatched\"]\njq = \"{{id, kind: \\\"other\\\"}}\"\n\
             [sinks.out]\ntype = \"stdout\"\ninputs = [\"big\", \"small\", \"rest\"]\n"
        );
        let (names, stages) = fields(&text).expect("projected");
        let mut names = names;
        names.sort();
        assert_eq!(names, ["id", "name", "size"]);
        assert!(stages.contains(&"split".to_owned()) && stages.contains(&"rest".to_owned()));
        // The unmatched items going straight to a sink need all their fields.
        let text = text.replace(
            "inputs = [\"big\", \"small\", \"rest\"]",
            "inputs = [\"big\", \"small\", \"split._unmatched\"]",
        );
        let text = text.replace("[transforms.rest]", "[transforms.unused_rest]");
        assert_eq!(fields(&text), None);
    }
}
