//! The template-variable accumulator of the seed: items carry a subject id and one named
//! variable; per subject it collects the variables and completes once every required one is
//! present. A subject flushed early (TTL, end of input) reports which are missing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Accumulator, AccumulatorState, CompletenessResult, RequiredVars, VarSet};
use crate::envelope::Envelope;

/// One variable of one subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateVar {
    /// The subject (a user, an order, a document).
    pub subject: String,
    /// The variable's name.
    pub name: String,
    /// Its value.
    pub value: String,
}

impl TemplateVar {
    /// A variable of `subject`.
    pub fn new(
        subject: impl Into<String>,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        Self {
            subject: subject.into(),
            name: name.into(),
            value: value.into(),
        }
    }
}

/// The variables collected for a subject so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VarsState {
    seen: VarSet,
    values: BTreeMap<String, String>,
}

/// What the accumulator emits per subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateResult {
    /// The subject.
    pub subject: String,
    /// Every variable received (required or not); the latest value wins.
    pub values: BTreeMap<String, String>,
    /// Required variables that never arrived (empty when complete).
    pub missing: Vec<String>,
}

impl TemplateResult {
    /// Whether every required variable arrived.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Collects [`TemplateVar`]s per subject until the required ones are all present.
///
/// ```
/// use pulseflow::accumulate::{AccumulatorPolicy, TemplateVar, TemplateVars};
/// use pulseflow::prelude::*;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let mut p = PipelineBuilder::new("vars");
/// let (sink, got) = sinks::collect();
/// p.source("in", sources::iter(vec![
///     TemplateVar::new("u1", "name", "Ada"),
///     TemplateVar::new("u2", "name", "Bob"),
///     TemplateVar::new("u1", "email", "ada@example.org"),
/// ]))
/// .accumulate(
///     "collect",
///     TemplateVars::new(["name", "email"]),
///     AccumulatorPolicy::default().with_partial_flush(true),
/// )
/// .sink("out", sink);
/// let result = ExecutionEngine::new()
///     .run(p.build().expect("valid"), ExecutionOptions::default())
///     .await;
/// assert!(result.accounting.reconciles());
/// let out = got.items();
/// assert_eq!(out[0].subject, "u1");
/// assert!(out[0].is_complete());
/// assert_eq!(out[1].missing, vec!["email".to_owned()]); // flushed at end of input
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TemplateVars {
    required: RequiredVars,
}

impl TemplateVars {
    /// Completes a subject once all of `required` arrived.
    pub fn new<I, S>(required: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            required: RequiredVars::new(required),
        }
    }

    fn result(&self, entry: &mut AccumulatorState<String, VarsState>) -> TemplateResult {
        TemplateResult {
            subject: std::mem::take(&mut entry.key),
            missing: self
                .required
                .missing(&entry.state.seen)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            values: std::mem::take(&mut entry.state.values),
        }
    }
}

impl Accumulator for TemplateVars {
    type In = TemplateVar;
    type Out = TemplateResult;
    type Key = String;
    type State = VarsState;

    fn key(&self, item: &Envelope<TemplateVar>) -> String {
        item.payload.subject.clone()
    }

    fn create(&mut self, _key: &String) -> VarsState {
        VarsState::default()
    }

    fn update(&mut self, state: &mut VarsState, item: Envelope<TemplateVar>) {
        let TemplateVar { name, value, .. } = item.payload;
        self.required.mark(&mut state.seen, &name);
        state.values.insert(name, value);
    }

    fn check(
        &mut self,
        entry: &mut AccumulatorState<String, VarsState>,
    ) -> CompletenessResult<TemplateResult> {
        let progress = self.required.progress(&entry.state.seen);
        entry.score = progress.score;
        if progress.complete {
            CompletenessResult::Complete(self.result(entry))
        } else {
            CompletenessResult::Incomplete
        }
    }

    fn flush(&mut self, mut entry: AccumulatorState<String, VarsState>) -> Option<TemplateResult> {
        Some(self.result(&mut entry))
    }

    fn state_size(&self, state: &VarsState) -> usize {
        std::mem::size_of::<VarsState>()
            + state.seen.heap_size()
            + state
                .values
                .iter()
                .map(|(k, v)| k.len() + v.len() + 48)
                .sum::<usize>()
    }
}
