//! The `accumulate` transform, in two stages:
//!
//! - [`Evaluate`] (stage `NAME.eval`, stateless, may run in parallel) runs the key and the
//!   aggregates' jq expressions on each item and checks the values' types; an item whose
//!   expressions fail goes to the stage's error policy (dead letters) like in `map`.
//! - [`Aggregator`] (stage `NAME`, the engine's keyed accumulation) folds the values into
//!   each key's state and emits one object per key: `key`, each aggregate under its name,
//!   `complete` and `completeness`.
//!
//! Null values are skipped by every aggregate but `count`. A jq `complete_when` that fails
//! on an aggregate object counts as "not complete yet".

use std::cmp::Ordering;

use jaq_json::Val;
use pulseflow::accumulate::{
    Accumulator, AccumulatorState, CompletenessResult, SpillError, VarSet,
};
use pulseflow::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use super::config::{AggKind, CompleteWhen, SharedSpec};
use crate::jq::{JqRunError, from_val, to_val};

/// One item reduced to what the accumulator needs: its key (as JSON text) and, per
/// aggregate, the values to fold in.
#[derive(Debug, Clone)]
pub struct Keyed {
    /// The key's JSON text.
    pub key: String,
    /// Per aggregate (in the spec's order), the non-null values of its expression.
    pub values: Vec<Vec<Value>>,
    /// The required fields the item has (non-null), for `complete_when.required`.
    pub fields: Vec<String>,
}

/// Evaluates the key and aggregate expressions of each item.
#[derive(Clone)]
pub struct Evaluate {
    /// The component's settings, shared by its workers.
    pub spec: SharedSpec,
    /// Whether an item's size (for `max_bytes`) is that of its JSON text rather than of the
    /// line it was read from: set when a `generate` source feeds the component.
    pub json_sizes: bool,
    /// Where an item's JSON text is written to measure it (reused).
    pub scratch: Vec<u8>,
}

/// Why an item could not be reduced.
#[derive(Debug, thiserror::Error)]
enum EvalError {
    #[error(transparent)]
    Jq(#[from] JqRunError),
    #[error("the key expression yielded no value")]
    NoKey,
    #[error("aggregate `{name}`: `{func}` needs {need}, got {got}")]
    Type {
        name: String,
        func: &'static str,
        need: &'static str,
        got: Value,
    },
}

impl Evaluate {
    fn reduce(&self, input: &Val) -> Result<Keyed, EvalError> {
        let spec = &self.spec;
        let mut key = None;
        spec.key.program.run(input, |v| {
            if key.is_none() {
                key = Some(from_val(v));
            }
        })?;
        let key = key.ok_or(EvalError::NoKey)?;
        let mut values = Vec::with_capacity(spec.aggregates.len());
        for agg in &spec.aggregates {
            let mut vs = Vec::new();
            match (&agg.expr, agg.kind) {
                (_, AggKind::Count) => {}
                (None, _) => vs.push(from_val(input.clone())),
                (Some(jq), _) => jq.program.run(input, |v| vs.push(from_val(v)))?,
            }
            vs.retain(|v| !v.is_null());
            let need = match agg.kind {
                AggKind::Sum | AggKind::Avg => {
                    Some(("a number", Value::is_number as fn(&Value) -> bool))
                }
                AggKind::Merge => Some(("an object", Value::is_object as fn(&Value) -> bool)),
                _ => None,
            };
            if let Some((need, ok)) = need {
                if let Some(bad) = vs.iter().find(|v| !ok(v)) {
                    return Err(EvalError::Type {
                        name: agg.name.clone(),
                        func: kind_name(agg.kind),
                        need,
                        got: bad.clone(),
                    });
                }
            }
            values.push(vs);
        }
        let fields = match (&spec.complete_when, input) {
            (CompleteWhen::Required(req), Val::Obj(o)) => req
                .names()
                .iter()
                .filter(|n| {
                    o.iter().any(|(k, v)| {
                        matches!(k, Val::TStr(k) | Val::BStr(k) if k[..] == *n.as_bytes())
                            && !matches!(v, Val::Null)
                    })
                })
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        Ok(Keyed {
            key: key.to_string(),
            values,
            fields,
        })
    }
}

fn kind_name(kind: AggKind) -> &'static str {
    match kind {
        AggKind::Count => "count",
        AggKind::Sum => "sum",
        AggKind::Min => "min",
        AggKind::Max => "max",
        AggKind::Avg => "avg",
        AggKind::First => "first",
        AggKind::Last => "last",
        AggKind::Collect => "collect",
        AggKind::Distinct => "distinct",
        AggKind::Merge => "merge",
    }
}

impl Transform for Evaluate {
    type In = Val;
    type Out = Keyed;

    fn process(
        &mut self,
        item: Envelope<Val>,
        out: &mut Vec<Envelope<Keyed>>,
    ) -> Result<(), ItemFailure<Val>> {
        match self.reduce(&item.payload) {
            Ok(keyed) => {
                let mut keyed = item.derive(keyed);
                if self.json_sizes {
                    // Not read from a line (a `generate` source): its size for `max_bytes` is
                    // that of its JSON text, newline included.
                    self.scratch.clear();
                    crate::json::write_line(&mut self.scratch, &item.payload);
                    keyed.cost.bytes = u32::try_from(self.scratch.len()).unwrap_or(u32::MAX);
                }
                out.push(keyed);
                Ok(())
            }
            Err(e) => Err(ItemFailure::new(item, StageError::from_error(e))),
        }
    }

    fn is_stateless(&self) -> bool {
        true
    }
}

/// One aggregate's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AggState {
    /// `count`: the key's item count is kept by the engine.
    Count,
    /// Running sum (an integer while every addend is one).
    Sum(Value),
    /// Sum and number of values.
    Avg(f64, u64),
    /// Smallest, largest, first or latest value so far.
    One(Option<Value>),
    /// Values in order (`collect`, `distinct`).
    List(Vec<Value>),
    /// Merged object fields.
    Merge(Map<String, Value>),
}

/// A key's state: every aggregate's, and the required fields seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccState {
    /// Per aggregate, in the spec's order.
    pub aggs: Vec<AggState>,
    /// Required fields seen (for `complete_when.required`).
    pub seen: VarSet,
}

/// The engine accumulator of an `accumulate` component.
#[derive(Clone)]
pub struct Aggregator {
    /// The component's settings, shared by its workers.
    pub spec: SharedSpec,
}

/// jq's order of types: null, false, true, numbers, strings, arrays, objects.
fn rank(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Bool(false) => 1,
        Value::Bool(true) => 2,
        Value::Number(_) => 3,
        Value::String(_) => 4,
        Value::Array(_) => 5,
        Value::Object(_) => 6,
    }
}

fn compare(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x.cmp(&y),
            _ => {
                let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
                x.partial_cmp(&y).unwrap_or(Ordering::Equal)
            }
        },
        (Value::String(x), Value::String(y)) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
}

fn add(sum: &Value, v: &Value) -> Value {
    let (Value::Number(a), Value::Number(b)) = (sum, v) else {
        return sum.clone();
    };
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        if let Some(s) = x.checked_add(y) {
            return Value::from(s);
        }
    }
    let s = a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0);
    Number::from_f64(s).map_or(Value::Null, Value::Number)
}

impl AggState {
    fn new(kind: AggKind) -> Self {
        match kind {
            AggKind::Count => Self::Count,
            AggKind::Sum => Self::Sum(Value::from(0)),
            AggKind::Avg => Self::Avg(0.0, 0),
            AggKind::Min | AggKind::Max | AggKind::First | AggKind::Last => Self::One(None),
            AggKind::Collect | AggKind::Distinct => Self::List(Vec::new()),
            AggKind::Merge => Self::Merge(Map::new()),
        }
    }

    fn fold(&mut self, kind: AggKind, values: Vec<Value>) {
        for v in values {
            match (&mut *self, kind) {
                (Self::Sum(s), _) => *s = add(s, &v),
                (Self::Avg(s, n), _) => {
                    *s += v.as_f64().unwrap_or(0.0);
                    *n += 1;
                }
                (Self::One(cur), AggKind::Min) => {
                    if cur
                        .as_ref()
                        .is_none_or(|c| compare(&v, c) == Ordering::Less)
                    {
                        *cur = Some(v);
                    }
                }
                (Self::One(cur), AggKind::Max) => {
                    if cur
                        .as_ref()
                        .is_none_or(|c| compare(&v, c) == Ordering::Greater)
                    {
                        *cur = Some(v);
                    }
                }
                (Self::One(cur), AggKind::First) => {
                    if cur.is_none() {
                        *cur = Some(v);
                    }
                }
                (Self::One(cur), _) => *cur = Some(v),
                (Self::List(list), AggKind::Distinct) => {
                    if !list.contains(&v) {
                        list.push(v);
                    }
                }
                (Self::List(list), _) => list.push(v),
                (Self::Merge(fields), _) => {
                    if let Value::Object(o) = v {
                        fields.extend(o);
                    }
                }
                (Self::Count, _) => {}
            }
        }
    }

    fn value(&self, items: u64) -> Value {
        match self {
            Self::Count => Value::from(items),
            Self::Sum(s) => s.clone(),
            Self::Avg(_, 0) => Value::Null,
            Self::Avg(s, n) => Number::from_f64(s / *n as f64).map_or(Value::Null, Value::Number),
            Self::One(v) => v.clone().unwrap_or(Value::Null),
            Self::List(l) => Value::Array(l.clone()),
            Self::Merge(m) => Value::Object(m.clone()),
        }
    }

    /// Rough heap bytes held, for the memory budget.
    fn heap(&self) -> usize {
        match self {
            Self::List(l) => l.len() * 64,
            Self::Merge(m) => m.len() * 96,
            _ => 0,
        }
    }
}

impl Aggregator {
    /// The output object without `complete` and `completeness`.
    fn object(&self, entry: &AccumulatorState<String, AccState>) -> Map<String, Value> {
        let mut o = Map::new();
        let key =
            serde_json::from_str(&entry.key).unwrap_or_else(|_| Value::String(entry.key.clone()));
        o.insert("key".into(), key);
        for (agg, state) in self.spec.aggregates.iter().zip(&entry.state.aggs) {
            o.insert(agg.name.clone(), state.value(entry.items));
        }
        o
    }

    fn output(&self, entry: &AccumulatorState<String, AccState>, complete: bool) -> Value {
        let mut o = self.object(entry);
        let score = if complete {
            1.0
        } else {
            entry.score.clamp(0.0, 1.0)
        };
        o.insert("complete".into(), Value::Bool(complete));
        o.insert(
            "completeness".into(),
            Number::from_f64(score).map_or(Value::Null, Value::Number),
        );
        Value::Object(o)
    }
}

impl Accumulator for Aggregator {
    type In = Keyed;
    type Out = Val;
    type Key = String;
    type State = AccState;

    fn key(&self, item: &Envelope<Keyed>) -> String {
        item.payload.key.clone()
    }

    fn create(&mut self, _key: &String) -> AccState {
        AccState {
            aggs: self
                .spec
                .aggregates
                .iter()
                .map(|a| AggState::new(a.kind))
                .collect(),
            seen: VarSet::default(),
        }
    }

    fn update(&mut self, state: &mut AccState, item: Envelope<Keyed>) {
        let Keyed { values, fields, .. } = item.payload;
        for ((agg, s), vs) in self.spec.aggregates.iter().zip(&mut state.aggs).zip(values) {
            s.fold(agg.kind, vs);
        }
        if let CompleteWhen::Required(req) = &self.spec.complete_when {
            for f in &fields {
                req.mark(&mut state.seen, f);
            }
        }
    }

    fn check(&mut self, entry: &mut AccumulatorState<String, AccState>) -> CompletenessResult<Val> {
        let complete = match &self.spec.complete_when {
            CompleteWhen::Never => false,
            CompleteWhen::Count(n) => {
                entry.score = (entry.items as f64 / *n as f64).min(1.0);
                entry.items >= *n
            }
            CompleteWhen::Required(req) => {
                let p = req.progress(&entry.state.seen);
                entry.score = p.score;
                p.complete
            }
            CompleteWhen::Jq(jq) => {
                let o = Value::Object(self.object(entry));
                jq.program.test(&to_val(&o)).unwrap_or(false)
            }
        };
        if complete {
            CompletenessResult::Complete(to_val(&self.output(entry, true)))
        } else {
            CompletenessResult::Incomplete
        }
    }

    fn flush(&mut self, entry: AccumulatorState<String, AccState>) -> Option<Val> {
        Some(to_val(&self.output(&entry, false)))
    }

    fn state_size(&self, state: &AccState) -> usize {
        std::mem::size_of::<AccState>()
            + state
                .aggs
                .iter()
                .map(|a| std::mem::size_of::<AggState>() + a.heap())
                .sum::<usize>()
    }

    // JSON values need a self-describing format: spilled states are written as JSON.
    fn encode(
        &self,
        entry: &AccumulatorState<String, AccState>,
        out: &mut Vec<u8>,
    ) -> Result<(), SpillError> {
        serde_json::to_writer(out, entry).map_err(|e| SpillError::Encode(e.to_string()))
    }

    fn decode(&self, bytes: &[u8]) -> Result<AccumulatorState<String, AccState>, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}
