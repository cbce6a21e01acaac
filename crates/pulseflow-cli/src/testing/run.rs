//! Runs one test: the config's pipeline with its sources fed the test's inputs only, its sinks
//! keeping what they receive, a sink at each output the test reads, on a runtime whose clock
//! is simulated (it jumps ahead whenever every stage waits, so a `ttl` of an hour takes no
//! time).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jaq_json::Val;
use parking_lot::Mutex;
use pulseflow::prelude::*;
use serde_json::Value;

use super::feed::{CaptureSink, Captured, Fed, TestSource};
use super::spec::{InputData, TestSpec};
use crate::components::Kind;
use crate::config::component::InputRef;
use crate::config::{Component, Config, Problem};

/// What a test's run did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Items received at each output a test reads (and at each sink), in arrival order.
    pub outputs: BTreeMap<String, Vec<Value>>,
    /// Dead letters: (stage, error).
    pub dead_letters: Vec<(String, String)>,
    /// Per stage: `filtered`, `dropped`, `dead_lettered`, `delivered`.
    pub stage_counts: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// The pipeline's failure, if it failed.
    pub error: Option<String>,
}

impl Outcome {
    /// The pipeline's total of a counter.
    pub fn total(&self, counter: &str) -> u64 {
        self.stage_counts
            .values()
            .filter_map(|c| c.get(counter))
            .sum()
    }
}

/// Why a test could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Its pipeline could not be built.
    #[error("the test's pipeline cannot be built: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Build(Vec<Problem>),
    /// No runtime.
    #[error("cannot start a runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// The stage that keeps what output `from` (`component` or `component.port`) emits.
fn capture_name(from: &str) -> String {
    format!("{from}.test_output")
}

/// The stage that feeds a transform `into`.
fn feeder_name(into: &str) -> String {
    format!("{into}.test_input")
}

/// `config` rewired for `test`; returns it and where each output's items are kept.
fn rewire(config: &Config, test: &TestSpec) -> (Config, BTreeMap<String, Captured>) {
    let mut c = config.clone();
    c.dead_letter = None;
    c.data_dir = None;
    c.tests = Vec::new();
    let mut captured = BTreeMap::new();
    // Inputs by component, in time order.
    let mut items: BTreeMap<&str, Vec<(Duration, Vec<Val>)>> = BTreeMap::new();
    let mut lines: BTreeMap<&str, Vec<(Duration, Vec<String>)>> = BTreeMap::new();
    for i in &test.inputs {
        match &i.data {
            InputData::Items(v) => items
                .entry(&i.into)
                .or_default()
                .push((i.at, v.iter().map(crate::jq::to_val).collect())),
            InputData::Lines(l) => lines.entry(&i.into).or_default().push((i.at, l.clone())),
        }
    }
    let mut feeders = Vec::new();
    for component in &mut c.components {
        let name = component.name.as_str();
        let fed = match &component.kind {
            Kind::Source(s) => match (s.line_settings(), lines.remove(name)) {
                (Some(settings), Some(batches)) => {
                    let batches = batches
                        .iter()
                        .map(|(at, l)| (*at, TestSource::lines(&settings, l)))
                        .collect();
                    Some(Fed::Lines(settings, batches))
                }
                _ => Some(Fed::Items(items.remove(name).unwrap_or_default())),
            },
            Kind::Transform(_) => {
                if let Some(batches) = items.remove(name) {
                    feeders.push((feeder_name(name), batches));
                    component.inputs.push(InputRef {
                        span: component.span.clone(),
                        component: feeder_name(name),
                        port: None,
                    });
                }
                None
            }
            Kind::Sink(_) => {
                let kept: Captured = Arc::new(Mutex::new(Vec::new()));
                captured.insert(component.name.clone(), kept.clone());
                component.kind = Kind::Sink(Arc::new(CaptureSink(kept)));
                None
            }
        };
        if let Some(fed) = fed {
            component.kind = Kind::Source(Arc::new(TestSource {
                fed: Mutex::new(Some(fed)),
                until: test.until,
            }));
        }
    }
    let template = c.components.first().cloned();
    let Some(template) = template else {
        return (c, captured);
    };
    let added = |name: String, kind: Kind, inputs: Vec<InputRef>| Component {
        name,
        span: template.span.clone(),
        ty: "test",
        kind,
        inputs,
        policies: Default::default(),
    };
    for (name, batches) in feeders {
        let source = TestSource {
            fed: Mutex::new(Some(Fed::Items(batches))),
            until: test.until,
        };
        c.components
            .push(added(name, Kind::Source(Arc::new(source)), Vec::new()));
    }
    for o in &test.outputs {
        if captured.contains_key(&o.from) {
            continue;
        }
        let (component, port) = match o.from.split_once('.') {
            Some((n, p)) => (n.to_owned(), Some(p.to_owned())),
            None => (o.from.clone(), None),
        };
        let kept: Captured = Arc::new(Mutex::new(Vec::new()));
        captured.insert(o.from.clone(), kept.clone());
        let input = InputRef {
            span: template.span.clone(),
            component,
            port,
        };
        c.components.push(added(
            capture_name(&o.from),
            Kind::Sink(Arc::new(CaptureSink(kept))),
            vec![input],
        ));
    }
    (c, captured)
}

/// Runs `test` of `config`.
pub fn run(config: &Config, test: &TestSpec) -> Result<Outcome, RunError> {
    let (rewired, captured) = rewire(config, test);
    let (pipeline, _) = crate::build::build(&rewired).map_err(RunError::Build)?;
    let options = crate::execution_options(&rewired, crate::SupervisionMode::Off);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    let result = runtime.block_on(ExecutionEngine::new().run(pipeline, options));
    let mut outcome = Outcome {
        error: result.error.as_ref().map(ToString::to_string),
        ..Outcome::default()
    };
    for (from, kept) in captured {
        let items = std::mem::take(&mut *kept.lock());
        outcome
            .outputs
            .insert(from, items.into_iter().map(crate::jq::from_val).collect());
    }
    outcome.dead_letters = result
        .dead_letters
        .iter()
        .map(|d| (d.stage.clone(), d.error.clone()))
        .collect();
    for (id, s) in &result.stages {
        if id.ends_with(".test_output") {
            // Not the config's: what it delivers is the test's copy.
            continue;
        }
        let c = &s.counts;
        let edge_drops = s.input.as_ref().map_or(0, |e| e.dropped_total());
        outcome.stage_counts.insert(
            id.clone(),
            BTreeMap::from([
                ("filtered", c.filtered),
                ("dropped", c.dropped_total() + edge_drops),
                ("dead_lettered", c.dead_lettered),
                ("delivered", c.delivered),
            ]),
        );
    }
    if outcome.error.is_none() && !result.accounting.reconciles() {
        outcome.error = Some(format!("counts do not reconcile: {:?}", result.accounting));
    }
    Ok(outcome)
}
