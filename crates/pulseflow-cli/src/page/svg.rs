//! The pipeline graph as an SVG picture: a box per stage (its name, kind and workers, and two
//! lines the live page fills with its figures), an arrow per edge labelled, at its end, with the
//! output it leaves when that is not `out`. Each box is a `<g class="stage" data-stage="ID">`.

use std::fmt::Write;

use pulseflow::PipelineGraph;
use pulseflow::policy::ParallelismHint;

use super::layout::{BOX_HEIGHT, BOX_WIDTH, layout};

/// Text made safe inside XML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Shapes and type of the picture, inside it so that it stands alone.
const STYLE: &str = "\
.stage rect { fill: #e8eef7; stroke: #44546a; stroke-width: 1.2; rx: 6; }\
.stage.bottleneck rect { stroke: #b00020; stroke-width: 3.5; }\
.stage text { font: 12px sans-serif; fill: #1b1f24; }\
.stage text.name { font-weight: bold; font-size: 13px; }\
.stage text.kind { fill: #4a5563; }\
.edge { fill: none; stroke: #6b7785; stroke-width: 1.4; }\
.port { font: 11px sans-serif; fill: #4a5563; }";

/// How many workers run a stage, when more than one.
fn workers(hint: ParallelismHint) -> String {
    match hint {
        ParallelismHint::Fixed(n) if n > 1 => format!(" · {n} workers"),
        ParallelismHint::DynamicCpuBound => " · a worker per core".into(),
        ParallelismHint::DynamicIoBound { min, max, .. } => format!(" · {min}-{max} workers"),
        _ => String::new(),
    }
}

/// The picture of `graph`.
pub fn render(graph: &PipelineGraph) -> String {
    let l = layout(graph);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="pipeline" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}">"#,
        w = l.width,
        h = l.height
    );
    let _ = writeln!(out, "<style>{STYLE}</style>");
    out.push_str(
        r##"<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#6b7785"/></marker></defs>"##,
    );
    out.push('\n');
    let index = |id: &str| graph.nodes.iter().position(|n| n.id == id);
    for e in &graph.edges {
        let (Some(a), Some(b)) = (index(&e.from), index(&e.to)) else {
            continue;
        };
        let (from, to) = (l.places[a], l.places[b]);
        let (x1, y1) = (from.x + BOX_WIDTH, from.y + BOX_HEIGHT / 2.0);
        let (x2, y2) = (to.x, to.y + BOX_HEIGHT / 2.0);
        let bend = (x2 - x1).abs() / 2.0;
        let _ = writeln!(
            out,
            r#"<path class="edge" d="M{x1:.1},{y1:.1} C{:.1},{y1:.1} {:.1},{y2:.1} {x2:.1},{y2:.1}" marker-end="url(#arrow)"/>"#,
            x1 + bend,
            x2 - bend
        );
        if e.port != "out" {
            let _ = writeln!(
                out,
                r#"<text class="port" text-anchor="end" x="{:.1}" y="{:.1}">{}</text>"#,
                x2 - 10.0,
                y2 - 6.0,
                escape(&e.port)
            );
        }
    }
    for (node, place) in graph.nodes.iter().zip(&l.places) {
        let id = escape(&node.id);
        let workers = workers(node.parallelism);
        let (x, y) = (place.x, place.y);
        let _ = writeln!(
            out,
            r#"<g class="stage" data-stage="{id}"><title>{id}</title><rect x="{x:.1}" y="{y:.1}" width="{BOX_WIDTH}" height="{BOX_HEIGHT}"/><text class="name" x="{tx:.1}" y="{:.1}">{id}</text><text class="kind" x="{tx:.1}" y="{:.1}">{}{}</text><text class="rate" x="{tx:.1}" y="{:.1}"></text><text class="queue" x="{tx:.1}" y="{:.1}"></text></g>"#,
            y + 18.0,
            y + 34.0,
            node.kind.as_str(),
            escape(&workers),
            y + 50.0,
            y + 66.0,
            tx = x + 8.0,
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulseflow::prelude::*;

    #[test]
    fn every_stage_has_a_box_and_every_edge_an_arrow() {
        let mut p = PipelineBuilder::new("svg");
        p.source("a<b", sources::iter(0u32..1))
            .map("double", |x| x * 2)
            .sink("out", sinks::sink_fn(|_: u32| {}));
        let pipeline = p.build().expect("valid");
        let svg = render(pipeline.graph());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        for id in ["a&lt;b", "double", "out"] {
            assert!(svg.contains(&format!("data-stage=\"{id}\"")), "{id}: {svg}");
        }
        assert_eq!(svg.matches("class=\"edge\"").count(), 2);
        assert!(!svg.contains("a<b"), "escaped: {svg}");
    }
}
