//! Validation of a [`PipelineGraph`]: every problem at once, each naming its stage.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::PipelineGraph;
use crate::error::ValidationError;
use crate::policy::{ChannelOrdering, ParallelismHint, PolicyRegistry};
use crate::stage::StageKind;

impl PipelineGraph {
    /// Checks the graph and returns every problem found: duplicate ids, dangling edges,
    /// cycles, unconnected outputs and inputs, zero capacities, parallelism that contradicts
    /// an ordering or a stage kind, and policy names the registry does not know.
    pub fn validate(&self, registry: &PolicyRegistry) -> Vec<ValidationError> {
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        let mut duplicated = BTreeSet::new();
        for node in &self.nodes {
            if !seen.insert(node.id.as_str()) {
                errors.push(ValidationError::DuplicateStageId(node.id.clone()));
                duplicated.insert(node.id.as_str());
            }
        }
        for edge in &self.edges {
            for end in [&edge.from, &edge.to] {
                if !seen.contains(end.as_str()) {
                    errors.push(ValidationError::DanglingEdge {
                        from: edge.from.clone(),
                        to: edge.to.clone(),
                        missing: end.clone(),
                    });
                }
            }
        }
        for node in &self.nodes {
            self.check_connections(node, &mut errors);
            check_capacities(node, registry, &mut errors);
            check_parallelism(node, &mut errors);
            check_policy_names(node, registry, &mut errors);
        }
        if let Some(cycle) = self.find_cycle(&duplicated) {
            errors.push(ValidationError::Cycle(cycle));
        }
        errors
    }

    fn check_connections(&self, node: &super::StageNode, errors: &mut Vec<ValidationError>) {
        for port in &node.outputs {
            if !self
                .edges
                .iter()
                .any(|e| e.from == node.id && &e.port == port)
            {
                errors.push(ValidationError::UnusedOutput {
                    stage: node.id.clone(),
                    port: port.clone(),
                });
            }
        }
        let has_input = self.edges.iter().any(|e| e.to == node.id);
        if node.kind != StageKind::Source && !has_input {
            errors.push(ValidationError::MissingInput(node.id.clone()));
        }
    }

    /// Stages on a cycle, if there is one (Kahn's algorithm: what cannot be ordered). An edge
    /// from a `duplicated` id to itself joins two stages that share the id, not a stage to
    /// itself: it is left out (the duplicate is the problem reported), where it would look like
    /// a loop.
    fn find_cycle(&self, duplicated: &BTreeSet<&str>) -> Option<Vec<String>> {
        let mut indegree: BTreeMap<&str, usize> =
            self.nodes.iter().map(|n| (n.id.as_str(), 0)).collect();
        let edges: Vec<&super::Edge> = self
            .edges
            .iter()
            .filter(|e| !(e.from == e.to && duplicated.contains(e.from.as_str())))
            .collect();
        for e in &edges {
            if let Some(d) = indegree.get_mut(e.to.as_str()) {
                *d += 1;
            }
        }
        let mut ready: VecDeque<&str> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(id, _)| *id)
            .collect();
        while let Some(id) = ready.pop_front() {
            for e in edges.iter().filter(|e| e.from == id) {
                if let Some(d) = indegree.get_mut(e.to.as_str()) {
                    *d -= 1;
                    if *d == 0 {
                        ready.push_back(e.to.as_str());
                    }
                }
            }
        }
        // What cannot be ordered is on a cycle or downstream of one: peel off, repeatedly, the
        // stuck stages that feed no other stuck stage, leaving the cycles themselves.
        let mut stuck: BTreeSet<&str> = indegree
            .iter()
            .filter(|(_, d)| **d > 0)
            .map(|(id, _)| *id)
            .collect();
        loop {
            let leaves: Vec<&str> = stuck
                .iter()
                .copied()
                .filter(|id| {
                    !edges
                        .iter()
                        .any(|e| e.from == *id && stuck.contains(e.to.as_str()))
                })
                .collect();
            if leaves.is_empty() {
                break;
            }
            for id in leaves {
                stuck.remove(id);
            }
        }
        let cycle: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| stuck.contains(n.id.as_str()))
            .map(|n| n.id.clone())
            .collect();
        (!cycle.is_empty()).then_some(cycle)
    }

    /// Decides which stages run fused into the task of the stage before them, with no channel
    /// between them: a stateless transform whose only input is a stateless transform with the
    /// same error policy and one output, with no buffer, backpressure or circuit breaker of its
    /// own, and either
    ///
    /// - both sequential and unordered: the stage runs in its upstream's task; or
    /// - both on the same fixed number of workers (or one per core) with the same ordering,
    ///   `Unordered` or `Ordered`: each worker of the upstream runs its own instance of the
    ///   stage on the batches it processed (operator chaining), and the order of an `Ordered`
    ///   pair is restored once, after the last stage of the chain.
    pub fn fusion_plan(&self, registry: &PolicyRegistry) -> FusionPlan {
        let fused = self
            .nodes
            .iter()
            .map(|node| {
                let mut inputs = self.edges_to(&node.id);
                let (Some(edge), None) = (inputs.next(), inputs.next()) else {
                    return false;
                };
                let Some(up) = self.node(&edge.from) else {
                    return false;
                };
                let stateless =
                    |n: &super::StageNode| n.kind == StageKind::Transform && n.stateless;
                let sequential = |n: &super::StageNode| {
                    n.parallelism.is_sequential() && n.ordering == ChannelOrdering::Unordered
                };
                let chained = |n: &super::StageNode| {
                    n.replicable
                        && !n.parallelism.is_sequential()
                        && !matches!(n.parallelism, ParallelismHint::DynamicIoBound { .. })
                        && matches!(
                            n.ordering,
                            ChannelOrdering::Unordered | ChannelOrdering::Ordered
                        )
                };
                let same_workers = (sequential(node) && sequential(up))
                    || (chained(node)
                        && chained(up)
                        && node.parallelism == up.parallelism
                        && node.ordering == up.ordering);
                let policy =
                    |n: &super::StageNode| n.error_policy.resolve(|k| registry.error_policy(k));
                stateless(node)
                    && stateless(up)
                    && same_workers
                    && up.outputs.len() == 1
                    && node.buffer.is_none()
                    && node.backpressure.is_none()
                    && node.circuit_breaker.is_none()
                    && policy(node) == policy(up)
            })
            .collect();
        FusionPlan { fused }
    }
}

/// Which stages run inside the task of their upstream stage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FusionPlan {
    fused: Vec<bool>,
}

impl FusionPlan {
    /// Whether the node at `index` runs in its upstream's task, with no channel between them.
    pub fn is_fused(&self, index: usize) -> bool {
        self.fused.get(index).copied().unwrap_or(false)
    }

    /// Number of stages fused into their upstream.
    pub fn fused_count(&self) -> usize {
        self.fused.iter().filter(|f| **f).count()
    }
}

fn zero(stage: &str, what: &str) -> ValidationError {
    ValidationError::ZeroCapacity {
        stage: stage.to_owned(),
        what: what.to_owned(),
    }
}

fn check_capacities(
    node: &super::StageNode,
    registry: &PolicyRegistry,
    errors: &mut Vec<ValidationError>,
) {
    let id = &node.id;
    if let Some(b) = node
        .buffer
        .as_ref()
        .and_then(|b| b.resolve(|k| registry.buffer(k)))
    {
        if b.capacity == 0 {
            errors.push(zero(id, "buffer capacity"));
        }
    }
    if let Some(bp) = node
        .backpressure
        .as_ref()
        .and_then(|b| b.resolve(|k| registry.backpressure(k)))
    {
        if let Err(e) = crate::flow::controller_for(&bp) {
            errors.push(ValidationError::InvalidPolicy {
                stage: id.clone(),
                reason: e.to_string(),
            });
        }
    }
    match node.parallelism {
        ParallelismHint::Fixed(0) => errors.push(zero(id, "worker count")),
        ParallelismHint::DynamicIoBound { min, max } if max == 0 || min > max => {
            errors.push(zero(id, "io-bound worker bounds (min <= max)"))
        }
        _ => {}
    }
}

fn check_parallelism(node: &super::StageNode, errors: &mut Vec<ValidationError>) {
    let conflict = |with: &str, reason: &str| ValidationError::ParallelismConflict {
        stage: node.id.clone(),
        parallelism: node.parallelism.label(),
        with: with.to_owned(),
        reason: reason.to_owned(),
    };
    let parallel = !node.parallelism.is_sequential();
    match node.kind {
        StageKind::Source | StageKind::Sink | StageKind::Branch | StageKind::Merge if parallel => {
            errors.push(conflict(
                &format!("a {} stage", node.kind.as_str()),
                "this kind of stage runs on one worker",
            ));
        }
        StageKind::Transform if parallel && !node.replicable => errors.push(conflict(
            "a transform given as a single instance",
            "give a factory (`transform_with`) so each worker gets its own instance",
        )),
        _ => {}
    }
    if let ChannelOrdering::PartitionOrdered { .. } = node.ordering {
        if matches!(node.parallelism, ParallelismHint::DynamicIoBound { .. }) {
            errors.push(conflict(
                &node.ordering.label(),
                "keys are pinned to workers, so the worker count cannot change while running",
            ));
        }
    }
    if node.ordering != ChannelOrdering::Unordered && node.kind != StageKind::Transform {
        errors.push(conflict(
            &node.ordering.label(),
            "only parallel transforms reorder their output",
        ));
    }
}

fn check_policy_names(
    node: &super::StageNode,
    registry: &PolicyRegistry,
    errors: &mut Vec<ValidationError>,
) {
    use crate::policy::PolicyRef::Named;
    let unknown = |kind: &'static str, name: &str| ValidationError::UnknownPolicy {
        stage: node.id.clone(),
        kind,
        name: name.to_owned(),
    };
    if let Named(name) = &node.error_policy {
        if registry.error_policy(name).is_none() {
            errors.push(unknown("error", name));
        }
    }
    if let Some(Named(name)) = &node.buffer {
        if registry.buffer(name).is_none() {
            errors.push(unknown("buffer", name));
        }
    }
    if let Some(Named(name)) = &node.backpressure {
        if registry.backpressure(name).is_none() {
            errors.push(unknown("backpressure", name));
        }
    }
    if let Some(Named(name)) = &node.circuit_breaker {
        if registry.circuit_breaker(name).is_none() {
            errors.push(unknown("circuit breaker", name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ChannelDescriptor, Edge, StageNode};
    use super::*;
    use crate::policy::{BufferPolicy, DropPolicy, PolicyRef};

    fn edge(from: &str, to: &str) -> Edge {
        Edge {
            from: from.into(),
            port: "out".into(),
            to: to.into(),
            channel: ChannelDescriptor {
                buffer_size: 16,
                ordering: ChannelOrdering::Unordered,
            },
        }
    }

    #[test]
    fn two_stages_sharing_an_id_are_a_duplicate_not_a_cycle() {
        let graph = PipelineGraph {
            nodes: vec![
                StageNode::new("dup", StageKind::Source),
                StageNode::new("dup", StageKind::Sink),
            ],
            edges: vec![edge("dup", "dup")],
            metadata: Default::default(),
        };
        let errors = graph.validate(&PolicyRegistry::default());
        assert_eq!(
            errors,
            vec![ValidationError::DuplicateStageId("dup".into())],
            "{errors:?}"
        );
        let one = crate::error::BuildError { errors }.to_string();
        assert!(one.starts_with("invalid pipeline (1 problem)\n"), "{one}");
    }

    #[test]
    fn reports_every_problem_with_stage_ids() {
        let mut a = StageNode::new("a", StageKind::Transform);
        a.parallelism = ParallelismHint::Fixed(0);
        let mut b = StageNode::new("b", StageKind::Transform);
        b.buffer = Some(PolicyRef::Inline(BufferPolicy::new(0, DropPolicy::Block)));
        b.error_policy = PolicyRef::Named("nope".into());
        let dup = StageNode::new("b", StageKind::Sink);
        let orphan = StageNode::new("orphan", StageKind::Transform);
        let graph = PipelineGraph {
            nodes: vec![a, b, dup, orphan],
            edges: vec![edge("a", "b"), edge("b", "a"), edge("b", "ghost")],
            metadata: Default::default(),
        };
        let errors = graph.validate(&PolicyRegistry::default());
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(has("duplicate stage id `b`"), "{text:?}");
        assert!(has("unknown stage `ghost`"), "{text:?}");
        assert!(has("cycle through stages a -> b"), "{text:?}");
        assert!(
            has("stage `a`: worker count must be at least 1"),
            "{text:?}"
        );
        assert!(
            has("stage `b`: buffer capacity must be at least 1"),
            "{text:?}"
        );
        assert!(has("unknown error policy `nope`"), "{text:?}");
        assert!(has("output `out` of stage `orphan`"), "{text:?}");
        assert!(has("stage `orphan` has no input"), "{text:?}");
    }

    #[test]
    fn a_cycle_is_reported_without_what_hangs_below_it() {
        let nodes = ["src", "a", "b", "out"]
            .iter()
            .map(|id| {
                let kind = match *id {
                    "src" => StageKind::Source,
                    "out" => StageKind::Sink,
                    _ => StageKind::Transform,
                };
                StageNode::new(*id, kind)
            })
            .collect();
        let graph = PipelineGraph {
            nodes,
            edges: vec![
                edge("src", "a"),
                edge("a", "b"),
                edge("b", "a"),
                edge("b", "out"),
            ],
            metadata: Default::default(),
        };
        let cycle = graph.find_cycle(&BTreeSet::new()).expect("a cycle");
        assert_eq!(cycle, vec!["a".to_owned(), "b".to_owned()]);
    }

    #[test]
    fn partition_ordering_needs_a_fixed_worker_count() {
        let mut t = StageNode::new("t", StageKind::Transform);
        t.replicable = true;
        t.parallelism = ParallelismHint::DynamicIoBound { min: 1, max: 4 };
        t.ordering = ChannelOrdering::PartitionOrdered { key: "user".into() };
        let mut errors = Vec::new();
        check_parallelism(&t, &mut errors);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("keys are pinned"));
    }
}
