//! The `accumulate` transform's settings: the key, the aggregates by name, when a key is
//! complete and the limits of the engine's [`AccumulatorPolicy`].

use std::collections::BTreeMap;
use std::sync::Arc;

use pulseflow::accumulate::{AccumulatorPolicy, RequiredVars};
use serde::Deserialize;
use toml::Spanned;

use crate::config::policies::parse_duration;
use crate::config::{Jq, Problems, ReadContext, quoted};

/// Output fields an aggregate cannot be named after.
const RESERVED: &[&str] = &["key", "complete", "completeness"];

/// What an aggregate computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    /// Items of the key.
    Count,
    /// Sum of numbers.
    Sum,
    /// Smallest value (jq order).
    Min,
    /// Largest value (jq order).
    Max,
    /// Mean of numbers.
    Avg,
    /// First non-null value.
    First,
    /// Latest non-null value.
    Last,
    /// Every non-null value, in order.
    Collect,
    /// Every distinct non-null value, in order of first appearance.
    Distinct,
    /// Fields of objects merged, later values replacing earlier ones.
    Merge,
}

/// Every aggregate function with whether it takes an expression: `Some(true)` required,
/// `Some(false)` optional (`merge` defaults to the whole item), `None` none.
const FUNCTIONS: &[(&str, AggKind, Option<bool>)] = &[
    ("count", AggKind::Count, None),
    ("sum", AggKind::Sum, Some(true)),
    ("min", AggKind::Min, Some(true)),
    ("max", AggKind::Max, Some(true)),
    ("avg", AggKind::Avg, Some(true)),
    ("first", AggKind::First, Some(true)),
    ("last", AggKind::Last, Some(true)),
    ("collect", AggKind::Collect, Some(true)),
    ("distinct", AggKind::Distinct, Some(true)),
    ("merge", AggKind::Merge, Some(false)),
];

/// One named aggregate.
#[derive(Clone)]
pub struct Aggregate {
    /// Its field in the output.
    pub name: String,
    /// What it computes.
    pub kind: AggKind,
    /// The values it folds, from each item (every output of the expression).
    pub expr: Option<Jq>,
}

/// When a key is complete.
#[derive(Clone)]
pub enum CompleteWhen {
    /// Never: keys are emitted when flushed (limits, deadlines, end of input).
    Never,
    /// At this many items.
    Count(u64),
    /// When every one of these top-level fields has been seen with a non-null value.
    Required(RequiredVars),
    /// When this jq condition over the output object (`key` and the aggregates) is truthy.
    Jq(Jq),
}

/// A checked `accumulate` transform.
#[derive(Clone)]
pub struct AccumulateSpec {
    /// The key expression (its first output).
    pub key: Jq,
    /// The aggregates, in name order.
    pub aggregates: Vec<Aggregate>,
    /// When a key is complete.
    pub complete_when: CompleteWhen,
    /// The engine's limits and deadlines.
    pub policy: AccumulatorPolicy,
}

/// The settings table of an `accumulate` transform.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    key: Spanned<String>,
    #[serde(default)]
    aggregates: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    complete_when: Option<Spanned<toml::Value>>,
    #[serde(default)]
    max_items: Option<Spanned<u64>>,
    #[serde(default)]
    max_bytes: Option<Spanned<u64>>,
    #[serde(default)]
    max_latency: Option<Spanned<String>>,
    #[serde(default)]
    ttl: Option<Spanned<String>>,
    #[serde(default)]
    closed_ttl: Option<Spanned<String>>,
    #[serde(default)]
    partial_flush: bool,
    #[serde(default)]
    spill: bool,
}

const COMPLETE_WHEN_HELP: &str = "write `complete_when = { count = N }`, `complete_when = { required = [\"field\", ...] }` or a jq condition over the output, e.g. `complete_when = '.total > 100'`";

impl Settings {
    /// Checks the settings; `None` when there were problems (added to `problems`).
    pub fn check_spec(
        self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<AccumulateSpec> {
        let cfg = self;
        let ctx = cx.table.as_str();
        let body_span = cx.span.clone();
        let before = problems.len();
        let key = cx.jq(&cfg.key, &format!("{ctx}.key"), problems);
        let mut aggregates = Vec::new();
        for (name, spec) in &cfg.aggregates {
            let n = name.get_ref();
            if RESERVED.contains(&n.as_str()) || n.is_empty() {
                problems.add(
                    format!("`{n}` cannot name an aggregate"),
                    Some(name.span()),
                    "reserved",
                    Some(format!(
                        "the output already has the fields {}",
                        quoted(RESERVED)
                    )),
                );
                continue;
            }
            if let Some(a) = aggregate(n, spec, cx, problems) {
                aggregates.push(a);
            }
        }
        let complete_when = match &cfg.complete_when {
            None => Some(CompleteWhen::Never),
            Some(v) => complete_when(v, cx, problems),
        };
        let mut policy = AccumulatorPolicy::default()
            .with_partial_flush(cfg.partial_flush)
            .with_spill(cfg.spill);
        for (what, n) in [("max_items", &cfg.max_items), ("max_bytes", &cfg.max_bytes)] {
            match n {
                Some(n) if *n.get_ref() == 0 => problems.add(
                    format!("`{what}` must be at least 1"),
                    Some(n.span()),
                    "zero",
                    None,
                ),
                Some(n) if what == "max_items" => policy = policy.with_max_items(*n.get_ref()),
                Some(n) => policy = policy.with_max_bytes(*n.get_ref()),
                None => {}
            }
        }
        for (what, d) in [
            ("max_latency", &cfg.max_latency),
            ("ttl", &cfg.ttl),
            ("closed_ttl", &cfg.closed_ttl),
        ] {
            let Some(d) = d else { continue };
            match parse_duration(d.get_ref()).filter(|d| !d.is_zero()) {
                Some(t) if what == "ttl" => policy = policy.with_completeness_ttl(t),
                Some(t) if what == "closed_ttl" => policy = policy.with_closed_ttl(t),
                Some(t) => policy = policy.with_max_latency(t),
                None => problems.add(
                    format!("invalid duration `{}` for `{what}`", d.get_ref()),
                    Some(d.span()),
                    "not a positive duration",
                    Some(
                        "write a number with a unit: `us`, `ms`, `s`, `m` or `h`, e.g. `30s`"
                            .into(),
                    ),
                ),
            }
        }
        if matches!(complete_when, Some(CompleteWhen::Never)) && !cfg.partial_flush {
            problems.add(
                format!("{ctx}: without `complete_when` no key ever completes, and without `partial_flush` nothing would be emitted"),
                Some(body_span),
                "emits nothing",
                Some("set `partial_flush = true` to emit every key when it is flushed (at the latest at the end of input), or add `complete_when`".into()),
            );
        }
        if problems.len() != before {
            return None;
        }
        Some(AccumulateSpec {
            key: key?,
            aggregates,
            complete_when: complete_when?,
            policy,
        })
    }
}

fn aggregate(
    name: &str,
    spec: &Spanned<String>,
    cx: &ReadContext<'_>,
    problems: &mut Problems,
) -> Option<Aggregate> {
    let ctx = cx.table.as_str();
    let raw = spec.get_ref();
    let (func, inner) = match raw.find('(') {
        Some(open) if raw.trim_end().ends_with(')') => {
            let close = raw.trim_end().len() - 1;
            (raw[..open].trim(), Some((open + 1, &raw[open + 1..close])))
        }
        _ => (raw.trim(), None),
    };
    let valid = || {
        format!(
            "valid aggregates: `count`, {}, `merge`",
            FUNCTIONS
                .iter()
                .filter(|(_, _, e)| *e == Some(true))
                .map(|(f, _, _)| format!("`{f}(EXPR)`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let Some((_, kind, takes)) = FUNCTIONS.iter().find(|(f, _, _)| *f == func) else {
        problems.add(
            format!("{ctx}.aggregates.{name}: unknown aggregate `{raw}`"),
            Some(spec.span()),
            "unknown aggregate",
            Some(valid()),
        );
        return None;
    };
    let inner = inner.filter(|(_, e)| !e.trim().is_empty());
    match (takes, inner) {
        (None, Some(_)) => {
            problems.add(
                format!("{ctx}.aggregates.{name}: `{func}` takes no expression"),
                Some(spec.span()),
                "no expression here",
                Some(format!("write `{func}`")),
            );
            None
        }
        (Some(true), None) => {
            problems.add(
                format!("{ctx}.aggregates.{name}: `{func}` needs an expression"),
                Some(spec.span()),
                "missing expression",
                Some(format!("write `{func}(.field)`")),
            );
            None
        }
        (_, None) => Some(Aggregate {
            name: name.to_owned(),
            kind: *kind,
            expr: None,
        }),
        (_, Some((offset, code))) => {
            // `cx.jq` places error positions after the value's opening quote; shifting
            // the value's span by the offset of the expression in the text points them into
            // the parentheses.
            let s = spec.span();
            let shifted = Spanned::new((s.start + offset).min(s.end)..s.end, code.to_owned());
            let jq = cx.jq(&shifted, &format!("{ctx}.aggregates.{name}"), problems)?;
            Some(Aggregate {
                name: name.to_owned(),
                kind: *kind,
                expr: Some(jq),
            })
        }
    }
}

fn complete_when(
    value: &Spanned<toml::Value>,
    cx: &ReadContext<'_>,
    problems: &mut Problems,
) -> Option<CompleteWhen> {
    let ctx = cx.table.as_str();
    let span = value.span();
    let what = format!("{ctx}.complete_when");
    let bad = |problems: &mut Problems, message: String, label: &str| {
        problems.add(
            message,
            Some(span.clone()),
            label,
            Some(COMPLETE_WHEN_HELP.into()),
        );
        None
    };
    match value.get_ref() {
        toml::Value::String(code) => cx
            .jq(&Spanned::new(span.clone(), code.clone()), &what, problems)
            .map(CompleteWhen::Jq),
        toml::Value::Table(t) if t.len() == 1 => match t.iter().next() {
            Some((k, toml::Value::Integer(n))) if k == "count" && *n > 0 => {
                Some(CompleteWhen::Count(u64::try_from(*n).unwrap_or(u64::MAX)))
            }
            Some((k, toml::Value::Array(names))) if k == "required" && !names.is_empty() => {
                let names: Option<Vec<&str>> = names.iter().map(toml::Value::as_str).collect();
                match names {
                    Some(names) => Some(CompleteWhen::Required(RequiredVars::new(names))),
                    None => bad(
                        problems,
                        format!("{what}: `required` must list field names (strings)"),
                        "not a list of strings",
                    ),
                }
            }
            Some((k, _)) if k == "count" => bad(
                problems,
                format!("{what}: `count` must be a positive integer"),
                "not a positive integer",
            ),
            Some((k, _)) if k == "required" => bad(
                problems,
                format!("{what}: `required` must be a non-empty list of field names"),
                "not a list of field names",
            ),
            _ => bad(
                problems,
                format!("{what}: unknown condition"),
                "unknown condition",
            ),
        },
        _ => bad(
            problems,
            format!(
                "{what}: expected `{{ count = N }}`, `{{ required = [...] }}` or a jq condition"
            ),
            "invalid condition",
        ),
    }
}

/// Shared by the stages built from one `accumulate` component.
pub type SharedSpec = Arc<AccumulateSpec>;
