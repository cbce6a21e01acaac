//! DOT and Mermaid text of a [`PipelineGraph`]. Fused stages are drawn inside a box labelled
//! "fused task", each still as its own node.

use std::fmt::Write;

use super::{PipelineGraph, StageNode};
use crate::graph::FusionPlan;
use crate::policy::PolicyRegistry;

impl PipelineGraph {
    /// Graphviz DOT text.
    pub fn to_dot(&self) -> String {
        let groups = self.fused_groups();
        let mut out = String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box];\n");
        for (gi, group) in groups.iter().enumerate() {
            if group.len() > 1 {
                let _ = writeln!(
                    out,
                    "  subgraph cluster_fused_{gi} {{\n    label=\"fused task\";\n    style=dashed;"
                );
                for &i in group {
                    let _ = writeln!(out, "    {}", dot_node(&self.nodes[i]));
                }
                out.push_str("  }\n");
            } else {
                for &i in group {
                    let _ = writeln!(out, "  {}", dot_node(&self.nodes[i]));
                }
            }
        }
        for e in &self.edges {
            let _ = writeln!(
                out,
                "  {} -> {} [label=\"{}\"];",
                quote(&e.from),
                quote(&e.to),
                escape(&edge_label(e))
            );
        }
        out.push_str("}\n");
        out
    }

    /// Mermaid `flowchart` text.
    pub fn to_mermaid(&self) -> String {
        let groups = self.fused_groups();
        let mut out = String::from("flowchart LR\n");
        let node = |i: usize| {
            let n = &self.nodes[i];
            format!(
                "n{i}[\"{}<br/>{}{}\"]",
                mermaid_text(&n.id),
                n.kind.as_str(),
                extra_label(n)
                    .map(|l| format!("<br/>{}", mermaid_text(&l)))
                    .unwrap_or_default()
            )
        };
        for (gi, group) in groups.iter().enumerate() {
            if group.len() > 1 {
                let _ = writeln!(out, "  subgraph fused_{gi}[\"fused task\"]");
                for &i in group {
                    let _ = writeln!(out, "    {}", node(i));
                }
                out.push_str("  end\n");
            } else {
                for &i in group {
                    let _ = writeln!(out, "  {}", node(i));
                }
            }
        }
        for e in &self.edges {
            if let (Some(a), Some(b)) = (self.index_of(&e.from), self.index_of(&e.to)) {
                let _ = writeln!(out, "  n{a} -->|\"{}\"| n{b}", mermaid_text(&edge_label(e)));
            }
        }
        out
    }

    /// Nodes grouped by the task they run in (fused chains together), in graph order.
    fn fused_groups(&self) -> Vec<Vec<usize>> {
        let plan: FusionPlan = self.fusion_plan(&PolicyRegistry::default());
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of = vec![usize::MAX; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            let upstream = plan
                .is_fused(i)
                .then(|| self.edges_to(&n.id).next())
                .flatten()
                .and_then(|e| self.index_of(&e.from))
                .map(|u| group_of[u])
                .filter(|g| *g != usize::MAX);
            match upstream {
                Some(g) => {
                    groups[g].push(i);
                    group_of[i] = g;
                }
                None => {
                    group_of[i] = groups.len();
                    groups.push(vec![i]);
                }
            }
        }
        groups
    }
}

fn extra_label(n: &StageNode) -> Option<String> {
    let mut parts = Vec::new();
    if !n.parallelism.is_sequential() {
        parts.push(n.parallelism.label());
    }
    if let crate::policy::PolicyRef::Inline(p) = &n.error_policy {
        if *p != crate::policy::ErrorPolicy::default() {
            parts.push(p.label());
        }
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn dot_node(n: &StageNode) -> String {
    let mut label = format!("{}\\n{}", escape(&n.id), n.kind.as_str());
    if let Some(extra) = extra_label(n) {
        label.push_str("\\n");
        label.push_str(&escape(&extra));
    }
    format!("{} [label=\"{label}\"];", quote(&n.id))
}

fn edge_label(e: &super::Edge) -> String {
    let mut label = String::new();
    if e.port != "out" {
        label.push_str(&e.port);
        label.push(' ');
    }
    let _ = write!(label, "{}", e.channel.buffer_size);
    if e.channel.ordering != crate::policy::ChannelOrdering::Unordered {
        let _ = write!(label, " {}", e.channel.ordering.label());
    }
    label
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn quote(s: &str) -> String {
    format!("\"{}\"", escape(s))
}

fn mermaid_text(s: &str) -> String {
    s.replace('"', "#quot;")
}
