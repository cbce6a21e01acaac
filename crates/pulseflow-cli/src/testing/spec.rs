//! The `[[tests]]` tables of a config: what each test feeds in and what it expects, read and
//! checked with the rest of the file (so `pulseflow validate` reports their problems too).
//!
//! ```toml
//! [[tests]]
//! name = "large orders are converted"
//! until = "40s"                 # inputs stay open until then (simulated time)
//!
//! [[tests.inputs]]
//! into = "orders"               # a source or a transform
//! at = "0s"                     # when these arrive (simulated time)
//! items = [{ id = 1, cents = 60000 }]   # or `lines`, text a line-reading source decodes
//!
//! [[tests.outputs]]
//! from = "euros"                # a component, `component.output`, or a sink (what it got)
//! items = [{ id = 1, euros = 600 }]     # or `lines`, JSON text
//! ordered = false
//!
//! [[tests.dead_letters]]
//! stage = "orders.decode"
//! error = "invalid JSON"        # text the error contains
//! count = 1
//!
//! [tests.counts]
//! filtered = 1                  # the whole pipeline, or { stage = n, ... }
//! dropped = 0
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use toml::Spanned;
use toml::de::DeValue;

use crate::components::Kind;
use crate::config::policies::parse_duration;
use crate::config::{Config, Problems, Role, de, quoted};

/// One `[[tests]]` table, checked.
#[derive(Debug, Clone)]
pub struct TestSpec {
    /// Its `name`.
    pub name: String,
    /// How long, in simulated time, the inputs stay open (`None`: until the last input).
    pub until: Option<Duration>,
    /// What is fed in.
    pub inputs: Vec<InputSpec>,
    /// Outputs expected at components.
    pub outputs: Vec<OutputSpec>,
    /// Every dead letter the run must produce (none when empty).
    pub dead_letters: Vec<DeadLetterSpec>,
    /// Counts expected, by counter name (`filtered`, `dropped`, ...).
    pub counts: BTreeMap<&'static str, Count>,
}

/// Items fed into a component.
#[derive(Debug, Clone)]
pub struct InputSpec {
    /// The component fed.
    pub into: String,
    /// When they arrive, in simulated time from the start.
    pub at: Duration,
    /// The items.
    pub data: InputData,
}

/// What an input holds.
#[derive(Debug, Clone)]
pub enum InputData {
    /// Values, as items.
    Items(Vec<Value>),
    /// Lines of text, read as the source reads its input (a CSV source's first line names the
    /// fields).
    Lines(Vec<String>),
}

/// Items expected at an output.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    /// `component` or `component.output`; a sink: what it received.
    pub from: String,
    /// The items expected.
    pub items: Vec<Value>,
    /// Whether order matters.
    pub ordered: bool,
}

/// Dead letters expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterSpec {
    /// The stage the items failed in.
    pub stage: String,
    /// Text their error contains.
    pub error: String,
    /// How many.
    pub count: u64,
}

/// A count expected: over the whole pipeline, or by stage.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Count {
    /// The pipeline's total.
    Total(u64),
    /// By stage id.
    ByStage(BTreeMap<String, u64>),
}

/// The counters `[tests.counts]` may name.
pub const COUNTERS: [&str; 4] = ["filtered", "dropped", "dead_lettered", "delivered"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestTable {
    name: String,
    #[serde(default)]
    until: Option<Spanned<String>>,
    #[serde(default)]
    inputs: Vec<InputTable>,
    #[serde(default)]
    outputs: Vec<OutputTable>,
    #[serde(default)]
    dead_letters: Vec<DeadLetterTable>,
    #[serde(default)]
    counts: Option<CountsTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputTable {
    into: Spanned<String>,
    #[serde(default)]
    at: Option<Spanned<String>>,
    #[serde(default)]
    items: Option<Vec<Value>>,
    #[serde(default)]
    lines: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputTable {
    from: Spanned<String>,
    #[serde(default)]
    items: Option<Vec<Value>>,
    #[serde(default)]
    lines: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    ordered: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterTable {
    stage: String,
    #[serde(default)]
    error: String,
    #[serde(default = "one")]
    count: u64,
}

fn one() -> u64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CountsTable {
    #[serde(default)]
    filtered: Option<Count>,
    #[serde(default)]
    dropped: Option<Count>,
    #[serde(default)]
    dead_lettered: Option<Count>,
    #[serde(default)]
    delivered: Option<Count>,
}

fn keys<T: DeserializeOwned>() -> &'static [&'static str] {
    serde_aux::serde_introspection::serde_introspect::<T>()
}

/// Reports the keys of table `value` that `T` does not have; `false` when there were some.
fn known_keys<T: DeserializeOwned>(
    value: &Spanned<DeValue<'_>>,
    what: &str,
    problems: &mut Problems,
) -> bool {
    let Some(table) = value.get_ref().as_table() else {
        problems.add(
            format!("`{what}` must be a table"),
            Some(value.span()),
            format!("found {}", value.get_ref().type_str()),
            None,
        );
        return false;
    };
    let valid = keys::<T>();
    let mut ok = true;
    for (k, _) in table.iter() {
        if !valid.contains(&&**k.get_ref()) {
            problems.add(
                format!("unknown key `{}` in `{what}`", k.get_ref()),
                Some(k.span()),
                "unknown key",
                Some(format!("valid keys: {}", quoted(valid))),
            );
            ok = false;
        }
    }
    ok
}

/// Checks the keys of each table in the array `key` of `table`.
fn known_keys_of_each<T: DeserializeOwned>(
    table: &Spanned<DeValue<'_>>,
    key: &str,
    problems: &mut Problems,
) -> bool {
    let Some(value) = table.get_ref().as_table().and_then(|t| t.get(key)) else {
        return true;
    };
    let what = format!("tests.{key}");
    match value.get_ref() {
        DeValue::Array(items) => {
            let unknown = items
                .iter()
                .filter(|item| !known_keys::<T>(item, &what, problems))
                .count();
            unknown == 0
        }
        _ => true,
    }
}

fn duration(text: &Spanned<String>, what: &str, problems: &mut Problems) -> Option<Duration> {
    let d = parse_duration(text.get_ref());
    if d.is_none() {
        problems.add(
            format!("`{what}` `{}` is not a duration", text.get_ref()),
            Some(text.span()),
            "here",
            Some("write a number with a unit: `us`, `ms`, `s`, `m` or `h`, e.g. `30s`".into()),
        );
    }
    d
}

/// Reads the top-level `tests` array (its component references are checked later, by
/// [`check_references`]).
pub fn read(value: &Spanned<DeValue<'_>>, problems: &mut Problems) -> Vec<(TestSpec, Refs)> {
    let DeValue::Array(tables) = value.get_ref() else {
        problems.add(
            "`tests` must be an array of tables",
            Some(value.span()),
            format!("found {}", value.get_ref().type_str()),
            Some("write `[[tests]]` tables".into()),
        );
        return Vec::new();
    };
    let mut tests = Vec::new();
    for table in tables {
        let mut ok = known_keys::<TestTable>(table, "tests", problems);
        ok &= known_keys_of_each::<InputTable>(table, "inputs", problems);
        ok &= known_keys_of_each::<OutputTable>(table, "outputs", problems);
        ok &= known_keys_of_each::<DeadLetterTable>(table, "dead_letters", problems);
        if let Some(counts) = table.get_ref().as_table().and_then(|t| t.get("counts")) {
            ok &= known_keys::<CountsTable>(counts, "tests.counts", problems);
        }
        if !ok {
            continue;
        }
        match de::<TestTable>(table.clone()) {
            Ok(t) => {
                if let Some(test) = check(t, table.span(), problems) {
                    tests.push(test);
                }
            }
            Err(e) => problems.add_toml(&e, table.span(), "tests"),
        }
    }
    let mut names: Vec<&str> = tests.iter().map(|(t, _)| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        problems.add(
            format!("two tests are named `{}`", w[0]),
            Some(value.span()),
            "here",
            Some("give each test a name of its own".into()),
        );
    }
    tests
}

/// Where a test names components, for [`check_references`].
#[derive(Debug, Clone)]
pub struct Refs {
    span: Range<usize>,
    into: Vec<(Range<usize>, bool)>,
    from: Vec<Range<usize>>,
}

fn check(t: TestTable, span: Range<usize>, problems: &mut Problems) -> Option<(TestSpec, Refs)> {
    let before = problems.len();
    let until = t
        .until
        .as_ref()
        .and_then(|u| duration(u, "until", problems));
    let mut refs = Refs {
        span,
        into: Vec::new(),
        from: Vec::new(),
    };
    let mut inputs = Vec::new();
    for i in t.inputs {
        let at = match &i.at {
            Some(at) => duration(at, "at", problems).unwrap_or_default(),
            None => Duration::ZERO,
        };
        let data = match (i.items, i.lines) {
            (Some(items), None) => InputData::Items(items),
            (None, Some(lines)) => InputData::Lines(lines),
            _ => {
                problems.add(
                    "an input needs either `items` or `lines`",
                    Some(i.into.span()),
                    "this input",
                    Some("`items` are values; `lines` are text the source decodes".into()),
                );
                continue;
            }
        };
        refs.into
            .push((i.into.span(), matches!(data, InputData::Lines(_))));
        inputs.push(InputSpec {
            into: i.into.into_inner(),
            at,
            data,
        });
    }
    let mut outputs = Vec::new();
    for o in t.outputs {
        let items = match (o.items, o.lines) {
            (Some(items), None) => items,
            (None, Some(lines)) => lines
                .iter()
                .filter_map(|l| match serde_json::from_str(l.get_ref()) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        problems.add(format!("not JSON: {e}"), Some(l.span()), "here", None);
                        None
                    }
                })
                .collect(),
            _ => {
                problems.add(
                    "an output needs either `items` or `lines`",
                    Some(o.from.span()),
                    "this output",
                    Some("`items = []` expects nothing".into()),
                );
                continue;
            }
        };
        refs.from.push(o.from.span());
        outputs.push(OutputSpec {
            from: o.from.into_inner(),
            items,
            ordered: o.ordered,
        });
    }
    let dead_letters = t
        .dead_letters
        .into_iter()
        .map(|d| DeadLetterSpec {
            stage: d.stage,
            error: d.error,
            count: d.count,
        })
        .collect();
    let mut counts = BTreeMap::new();
    if let Some(c) = t.counts {
        for (name, count) in
            COUNTERS
                .iter()
                .zip([c.filtered, c.dropped, c.dead_lettered, c.delivered])
        {
            if let Some(count) = count {
                counts.insert(*name, count);
            }
        }
    }
    (problems.len() == before).then_some((
        TestSpec {
            name: t.name,
            until,
            inputs,
            outputs,
            dead_letters,
            counts,
        },
        refs,
    ))
}

/// Checks that the components the tests feed and read exist and can be fed or read that way.
pub fn check_references(config: &Config, tests: &[(TestSpec, Refs)], problems: &mut Problems) {
    for (test, refs) in tests {
        for (input, (span, lines)) in test.inputs.iter().zip(&refs.into) {
            let why = match config.component(&input.into).map(|c| &c.kind) {
                None => Some(format!("no component is named `{}`", input.into)),
                Some(Kind::Sink(_)) => {
                    Some(format!("`{}` is a sink: feed what it reads", input.into))
                }
                Some(Kind::Source(s)) if *lines && s.line_settings().is_none() => Some(format!(
                    "`{}` does not read lines: give it `items`",
                    input.into
                )),
                Some(Kind::Transform(_)) if *lines => Some(format!(
                    "`{}` is a transform: give it `items` (only sources read `lines`)",
                    input.into
                )),
                Some(_) => None,
            };
            if let Some(why) = why {
                problems.add(why, Some(span.clone()), "here", None);
            }
        }
        for (output, span) in test.outputs.iter().zip(&refs.from) {
            let (name, port) = match output.from.split_once('.') {
                Some((n, p)) => (n, Some(p)),
                None => (output.from.as_str(), None),
            };
            let why = match config.component(name) {
                None => Some(format!("no component is named `{name}`")),
                Some(c) => match (c.role(), port) {
                    (Role::Sink, Some(_)) => Some(format!("`{name}` is a sink: it has no outputs")),
                    (_, Some(p)) if !c.output_names().iter().any(|o| o == p) => Some(format!(
                        "`{name}` has no output `{p}` (its outputs: {})",
                        quoted(
                            &c.output_names()
                                .iter()
                                .map(String::as_str)
                                .collect::<Vec<_>>()
                        )
                    )),
                    _ => None,
                },
            };
            if let Some(why) = why {
                problems.add(why, Some(span.clone()), "here", None);
            }
        }
        if test.inputs.is_empty() && test.until.is_none() {
            problems.add(
                format!("test `{}` feeds nothing", test.name),
                Some(refs.span.clone()),
                "this test",
                Some("add `[[tests.inputs]]` tables".into()),
            );
        }
    }
}
