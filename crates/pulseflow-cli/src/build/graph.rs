//! The components as the engine's untyped graph, validated before anything is built, and the
//! engine's validation errors shown at the components they are about.

use pulseflow::ValidationError;
use pulseflow::graph::{ChannelDescriptor, Edge, PipelineGraph, StageNode};
use pulseflow::policy::ChannelOrdering;
use pulseflow::stage::StageKind;

use super::{parallelism, readers};
use crate::components::Port;
use crate::config::{Component, Config, Problem, Problems, Role};

/// The components as an untyped graph, for the engine's validation.
pub fn component_graph(config: &Config) -> PipelineGraph {
    let readers = readers(config);
    let mut graph = PipelineGraph::default();
    for c in &config.components {
        let kind = c.kind.stage_kind();
        let mut node = StageNode::new(c.name.clone(), kind);
        let ports = c.kind.outputs();
        if ports != [Port::out()] && !ports.is_empty() {
            node.outputs = ports
                .into_iter()
                .filter(|p| !p.optional || readers.contains_key(&(c.name.clone(), p.name.clone())))
                .map(|p| p.name)
                .collect();
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
        if let Some(h) = parallelism(config, c).filter(|_| c.role() != Role::Source) {
            node.parallelism = h;
            node.replicable = !matches!(kind, StageKind::Branch | StageKind::Sink);
            node.stateless = kind != StageKind::Accumulator;
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
                    .filter(|c| c.role() != Role::Sink)
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
