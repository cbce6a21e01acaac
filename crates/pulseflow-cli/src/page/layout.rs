//! Where each stage of a pipeline graph goes in the picture: stages in columns by their
//! distance from the sources (left to right, as items flow), ordered within a column by the
//! rows of the stages that feed them, so that edges cross little.

use pulseflow::PipelineGraph;

/// Width of a stage's box.
pub const BOX_WIDTH: f64 = 210.0;
/// Height of a stage's box.
pub const BOX_HEIGHT: f64 = 74.0;
const GAP_X: f64 = 70.0;
const GAP_Y: f64 = 24.0;
const MARGIN: f64 = 16.0;

/// A stage's box: the top-left corner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Place {
    /// Left.
    pub x: f64,
    /// Top.
    pub y: f64,
}

/// The places of a graph's stages (in node order) and the picture's size.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// One per node, in `graph.nodes` order.
    pub places: Vec<Place>,
    /// Width of the picture.
    pub width: f64,
    /// Height of the picture.
    pub height: f64,
}

/// Each node's column: 0 for stages nothing feeds, else one past the furthest of its inputs.
fn columns(graph: &PipelineGraph, inputs: &[Vec<usize>]) -> Vec<usize> {
    let mut column: Vec<Option<usize>> = vec![None; graph.nodes.len()];
    // The graph is acyclic (validated): each pass settles at least one more node.
    for _ in 0..=graph.nodes.len() {
        let mut settled = true;
        for i in 0..graph.nodes.len() {
            if column[i].is_some() {
                continue;
            }
            let from: Option<Vec<usize>> = inputs[i].iter().map(|&p| column[p]).collect();
            match from {
                Some(cols) => column[i] = Some(cols.iter().map(|c| c + 1).max().unwrap_or(0)),
                None => settled = false,
            }
        }
        if settled {
            break;
        }
    }
    column.into_iter().map(Option::unwrap_or_default).collect()
}

/// Lays `graph` out.
pub fn layout(graph: &PipelineGraph) -> Layout {
    let n = graph.nodes.len();
    let mut inputs: Vec<Vec<usize>> = vec![Vec::new(); n];
    for e in &graph.edges {
        if let (Some(from), Some(to)) = (
            graph.nodes.iter().position(|s| s.id == e.from),
            graph.nodes.iter().position(|s| s.id == e.to),
        ) {
            inputs[to].push(from);
        }
    }
    let column = columns(graph, &inputs);
    let columns_used = column.iter().max().map_or(0, |c| c + 1);
    let mut row = vec![0.0f64; n];
    let mut tallest = 0;
    for c in 0..columns_used {
        let mut members: Vec<usize> = (0..n).filter(|&i| column[i] == c).collect();
        // By the mean row of the stages feeding each (node order for sources and ties).
        let key = |i: usize| {
            let from = &inputs[i];
            if from.is_empty() {
                i as f64
            } else {
                from.iter().map(|&p| row[p]).sum::<f64>() / from.len() as f64
            }
        };
        members.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
        for (r, &i) in members.iter().enumerate() {
            row[i] = r as f64;
        }
        tallest = tallest.max(members.len());
    }
    let places = (0..n)
        .map(|i| Place {
            x: MARGIN + column[i] as f64 * (BOX_WIDTH + GAP_X),
            y: MARGIN + row[i] * (BOX_HEIGHT + GAP_Y),
        })
        .collect();
    Layout {
        places,
        width: extent(columns_used, BOX_WIDTH, GAP_X),
        height: extent(tallest, BOX_HEIGHT, GAP_Y),
    }
}

/// Length taken by `count` boxes of `size` with `gap` between them, and the margins.
fn extent(count: usize, size: f64, gap: f64) -> f64 {
    2.0 * MARGIN + count as f64 * size + count.saturating_sub(1) as f64 * gap
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulseflow::prelude::*;

    #[test]
    fn stages_go_in_columns_by_distance_from_the_sources() {
        let mut p = PipelineBuilder::new("shape");
        let evens = p
            .source("a", sources::iter(0u32..1))
            .filter("even", |x| x % 2 == 0);
        let other = p.source("b", sources::iter(0u32..1));
        evens
            .merge("both", vec![other])
            .sink("out", sinks::sink_fn(|_: u32| {}));
        let pipeline = p.build().expect("valid");
        let graph = pipeline.graph();
        let l = layout(graph);
        let place = |id: &str| l.places[graph.nodes.iter().position(|n| n.id == id).expect(id)];
        assert_eq!(place("a").x, place("b").x);
        assert!(place("even").x > place("a").x);
        // `both` is fed by `even` (column 1) and `b` (column 0): it comes after both.
        assert!(place("both").x > place("even").x);
        assert!(place("out").x > place("both").x);
        assert_ne!(place("a").y, place("b").y);
        assert!(l.width >= place("out").x + BOX_WIDTH);
        assert!(l.height >= place("b").y.max(place("a").y) + BOX_HEIGHT);
    }
}
