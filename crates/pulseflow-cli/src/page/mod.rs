//! The pipeline as a picture: [`svg`] draws the graph of stages (laid out by [`layout`]), as
//! `pulseflow graph --format svg` prints it, and [`html`] makes the live page `--admin` serves
//! on `/`: that picture and a script that refreshes it every second from `/stages`, colouring
//! each stage by how busy or backpressured it was and showing its figures. The page is one
//! self-contained document: it loads nothing else.

pub mod layout;
pub mod svg;

use pulseflow::PipelineGraph;

const TEMPLATE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("live.js");

/// The live page of pipeline `name` whose graph is `graph`.
pub fn html(name: &str, graph: &PipelineGraph) -> String {
    TEMPLATE
        .replace("{{TITLE}}", &svg::escape(name))
        .replace("{{SCRIPT}}", SCRIPT)
        .replace("{{SVG}}", &svg::render(graph))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulseflow::prelude::*;

    #[test]
    fn the_page_holds_the_picture_and_the_script_and_loads_nothing() {
        let mut p = PipelineBuilder::new("page");
        p.source("numbers", sources::iter(0u32..1))
            .sink("out", sinks::sink_fn(|_: u32| {}));
        let pipeline = p.build().expect("valid");
        let page = html("a <pipeline>", pipeline.graph());
        assert!(page.contains("<title>pulseflow: a &lt;pipeline&gt;</title>"));
        assert!(page.contains("data-stage=\"numbers\"") && page.contains("fetch(\"/stages\""));
        assert!(!page.contains("{{"), "a placeholder is left");
        for external in ["src=", "href=", "@import", "http://", "https://"] {
            let outside_svg_namespace = page.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
            assert!(!outside_svg_namespace.contains(external), "{external}");
        }
    }
}
