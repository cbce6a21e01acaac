//! Accumulator-aware backpressure in running pipelines: an accumulator stage with a strategy
//! counts its pending state as queue depth, returns its credits, and never deadlocks on its own
//! pressure.

use std::time::Duration;

use pulseflow::accumulate::{Accumulator, AccumulatorPolicy, AccumulatorState, CompletenessResult};
use pulseflow::engine::Supervision;
use pulseflow::policy::BackpressureStrategy;
use pulseflow::prelude::*;

/// Collects the values of a key; complete at 50 of them. Its state grows with every item.
#[derive(Clone)]
struct Collect;

impl Accumulator for Collect {
    type In = (u32, u64);
    type Out = (u32, usize);
    type Key = u32;
    type State = Vec<u64>;

    fn key(&self, item: &Envelope<(u32, u64)>) -> u32 {
        item.payload.0
    }

    fn create(&mut self, _key: &u32) -> Vec<u64> {
        Vec::new()
    }

    fn update(&mut self, state: &mut Vec<u64>, item: Envelope<(u32, u64)>) {
        state.push(item.payload.1);
    }

    fn check(&mut self, e: &mut AccumulatorState<u32, Vec<u64>>) -> CompletenessResult<Self::Out> {
        if e.state.len() >= 50 {
            CompletenessResult::Complete((e.key, e.state.len()))
        } else {
            CompletenessResult::Incomplete
        }
    }

    fn flush(&mut self, e: AccumulatorState<u32, Vec<u64>>) -> Option<Self::Out> {
        Some((e.key, e.state.len()))
    }
}

async fn run_with(strategy: BackpressureStrategy) -> (PipelineResult, f64) {
    let engine = ExecutionEngine::new();
    let mut p = PipelineBuilder::new("pressure");
    let (sink, got) = sinks::collect();
    // 2000 keys, 50 values each, interleaved: every key stays pending until the end.
    let items = (0..100_000u64).map(|i| ((i % 2000) as u32, i));
    p.source("src", sources::iter(items))
        .accumulate(
            "acc",
            Collect,
            AccumulatorPolicy::default().with_partial_flush(true),
        )
        .backpressure(strategy)
        .sink("out", sink);
    let pipeline = p.build().expect("valid");
    let runner = engine.clone();
    let options = ExecutionOptions::default()
        .with_batch_size(100)
        .with_supervision(Supervision::Off);
    let handle = tokio::spawn(async move { runner.run(pipeline, options).await });
    let mut peak_pressure: f64 = 0.0;
    while !handle.is_finished() {
        tokio::time::sleep(Duration::from_micros(200)).await;
        if let Some(s) = engine.inspect("acc") {
            let p = s
                .metrics
                .get("backpressure.effective_pressure")
                .copied()
                .unwrap_or(0.0);
            peak_pressure = peak_pressure.max(p);
        }
    }
    let r = handle.await.expect("run");
    assert_eq!(got.len(), 2000, "one output per key");
    (r, peak_pressure)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_state_is_pressure_and_nothing_deadlocks() {
    let (r, peak) = run_with(BackpressureStrategy::Bounded {
        capacity: 512,
        drop_policy: DropPolicy::Block,
    })
    .await;
    assert!(r.success, "{:?}", r.error);
    assert!(r.accounting.reconciles(), "{:?}", r.accounting);
    assert!(r.unbalanced_stages().is_empty());
    assert!(
        peak > 0.0,
        "the accumulator's pending bytes were seen as depth"
    );
    let m = &r.stage("acc").expect("stage").metrics;
    assert!(
        m.contains_key("backpressure.pending_accumulator_bytes"),
        "{m:?}"
    );
    assert!(m.contains_key("backpressure.active_spill_count"), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accumulator_returns_its_credits() {
    let (r, _) = run_with(BackpressureStrategy::CreditBased {
        initial: 300,
        replenish_threshold: 100,
    })
    .await;
    assert!(r.success, "{:?}", r.error);
    assert!(r.accounting.reconciles());
    let m = &r.stage("acc").expect("stage").metrics;
    assert_eq!(m.get("backpressure.in_flight"), Some(&0.0), "{m:?}");
}
