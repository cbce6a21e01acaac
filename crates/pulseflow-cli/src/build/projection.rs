//! **Projection.** When the items of a JSON-lines source only ever meet `filter`, `route`
//! and `map` components whose jq expressions read some top-level fields (and never the item as
//! a whole), up to the `map`s that build new values from them, the source decodes each object
//! to those fields alone: the others are checked as JSON but not built. Results are the
//! same, since those expressions cannot see the rest; an item dead-lettered by one of those
//! components holds the fields read, and its record says `"projected": true`. `project =
//! false` on the source turns this off.

use bytes::Bytes;
use jaq_json::Val;

use super::readers;
use crate::components::{Kind, Reads};
use crate::config::{Component, Config};

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
        Kind::Source(s) if s.projectable() => {}
        _ => return None,
    }
    let readers = readers(config);
    let mut fields: Vec<Bytes> = Vec::new();
    let mut stages: Vec<String> = Vec::new();
    let mut add = |read: Vec<Val>| {
        for k in read {
            let Val::TStr(b) = k else { return false };
            if !fields.iter().any(|f| f[..] == b[..]) {
                // The key as the jq stage holds it: interned, so the objects decoded with it
                // and the stage share its bytes.
                fields.push(*b);
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
                Kind::Transform(t) => match t.reads() {
                    Reads::Through { programs, forwards } => {
                        if forwards {
                            todo.extend(c.output_names().into_iter().map(|o| (name.clone(), o)));
                        }
                        programs.iter().all(|p| p.fields().is_some_and(&mut add))
                    }
                    Reads::Whole => false,
                },
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
