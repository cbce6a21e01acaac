//! Backpressure strategies and the circuit breaker in running pipelines, on Tokio's paused
//! clock (unsupervised: see `Supervision`).

use std::time::Duration;

use pulseflow::engine::Supervision;
use pulseflow::policy::{BackpressureStrategy, CircuitBreakerPolicy};
use pulseflow::prelude::*;

fn options(batch: usize) -> ExecutionOptions {
    ExecutionOptions::default()
        .with_batch_size(batch)
        .with_supervision(Supervision::Off)
}

#[tokio::test(start_paused = true)]
async fn rate_shaping_paces_a_stage_to_its_rate() {
    let mut p = PipelineBuilder::new("shaped");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u32..3000))
        .sink("out", sink)
        .backpressure(BackpressureStrategy::RateShaping {
            rate: 1000,
            burst: 100,
        });
    let started = tokio::time::Instant::now();
    let r = ExecutionEngine::new()
        .run(p.build().expect("valid"), options(50))
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(r.success, "{:?}", r.error);
    assert_eq!(got.len(), 3000);
    // 100 items of burst, then 2900 at 1000/s.
    assert!(
        (2.9 * 0.98..=2.9 * 1.02).contains(&elapsed),
        "took {elapsed} s"
    );
    let out = r.stage("out").expect("stage");
    assert_eq!(
        out.metrics.get("backpressure.rate_per_second"),
        Some(&1000.0)
    );
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_holds_input_back_and_loses_nothing() {
    let mut p = PipelineBuilder::new("breaker");
    // The first 30 items fail (a downstream outage), the rest succeed.
    let sink =
        sinks::try_sink_fn(|e: &Envelope<u32>| if e.payload < 30 { Err("down") } else { Ok(()) });
    p.source("src", sources::iter(0u32..100))
        .sink("out", sink)
        .circuit_breaker(CircuitBreakerPolicy {
            error_threshold: 0.5,
            latency_threshold: Duration::from_secs(60),
            window: Duration::from_secs(30),
            minimum_throughput: 5,
            cooldown: Duration::from_secs(1),
        });
    let started = tokio::time::Instant::now();
    let r = ExecutionEngine::new()
        .run(p.build().expect("valid"), options(1))
        .await;
    assert!(r.success, "{:?}", r.error);
    assert!(r.accounting.reconciles());
    assert_eq!(r.accounting.delivered, 70);
    assert_eq!(r.accounting.dead_lettered, 30);
    let m = &r.stage("out").expect("stage").metrics;
    assert!(m["breaker.closed->open"] >= 1.0, "{m:?}");
    assert!(m["breaker.open->half_open"] >= 1.0, "{m:?}");
    assert!(m["breaker.half_open->closed"] >= 1.0, "{m:?}");
    // While open the stage took nothing: the 25 failures after the breaker opened went one
    // probe per cooldown.
    assert!(
        started.elapsed() >= Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn credits_bound_what_a_parallel_stage_holds() {
    let mut p = PipelineBuilder::new("credits");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u64..5000))
        .map("work", |x| x + 1)
        .parallelism(ParallelismHint::Fixed(3))
        .backpressure(BackpressureStrategy::CreditBased {
            initial: 64,
            replenish_threshold: 32,
        })
        .sink("out", sink);
    let r = ExecutionEngine::new()
        .run(p.build().expect("valid"), options(100))
        .await;
    assert!(r.success, "{:?}", r.error);
    assert_eq!(got.len(), 5000);
    let m = &r.stage("work").expect("stage").metrics;
    assert_eq!(m.get("backpressure.in_flight"), Some(&0.0), "{m:?}");
    assert_eq!(
        m.get("backpressure.available_credits"),
        Some(&64.0),
        "{m:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_bounded_strategy_is_the_stages_buffer() {
    struct Slow;
    impl Sink for Slow {
        type Item = u32;
        async fn write(&mut self, _item: Envelope<u32>) -> Result<(), ItemFailure<u32>> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        }
    }
    let mut p = PipelineBuilder::new("bounded");
    p.source("src", sources::iter(0u32..2000))
        .sink("slow", Slow)
        .backpressure(BackpressureStrategy::Bounded {
            capacity: 100,
            drop_policy: DropPolicy::DropNewest,
        });
    let r = ExecutionEngine::new()
        .run(p.build().expect("valid"), options(50))
        .await;
    assert!(r.success);
    assert!(r.accounting.reconciles());
    let input = r
        .stage("slow")
        .and_then(|s| s.input.clone())
        .expect("buffer");
    assert_eq!(input.capacity, 100);
    assert!(input.dropped.get("drop_newest").copied().unwrap_or(0) > 0);
    assert_eq!(r.accounting.delivered + input.dropped_total(), 2000);
    let m = &r.stage("slow").expect("stage").metrics;
    assert_eq!(m["buffer.dropped_count"], input.dropped_total() as f64);
    assert_eq!(m["buffer.peak_utilization"], 1.0);
}

#[test]
fn impossible_strategies_are_rejected_at_build() {
    let mut p = PipelineBuilder::new("bad");
    p.source("src", sources::iter(0u8..1))
        .sink("out", sink_fn(|_x: u8| {}))
        .backpressure(BackpressureStrategy::ReactivePull { window: 0 });
    let err = p.build().expect_err("invalid");
    assert!(err.to_string().contains("stage `out`"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn reactive_pull_lets_in_only_what_downstream_requested() {
    struct Slow;
    impl Sink for Slow {
        type Item = u32;
        async fn write(&mut self, _item: Envelope<u32>) -> Result<(), ItemFailure<u32>> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        }
    }
    let engine = ExecutionEngine::new();
    let mut p = PipelineBuilder::new("pull");
    p.source("src", sources::iter(0u32..3000))
        .sink("slow", Slow)
        .backpressure(BackpressureStrategy::ReactivePull { window: 200 });
    let pipeline = p.build().expect("valid");
    let runner = engine.clone();
    let handle = tokio::spawn(async move { runner.run(pipeline, options(50)).await });
    let mut peak_queued = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(37)).await;
        if let (Some(src), Some(s)) = (engine.inspect("src"), engine.inspect("slow")) {
            assert!(
                s.metrics["backpressure.outstanding_requests"] <= 200.0,
                "{:?}",
                s.metrics
            );
            peak_queued = peak_queued.max(s.input_queue_depth);
            // The source produced only what the sink asked for.
            let produced = src.counts.ingested;
            let delivered = s.counts.delivered;
            assert!(
                produced <= delivered + 200,
                "{produced} produced, {delivered} delivered"
            );
        }
    }
    let r = handle.await.expect("run");
    assert!(r.success, "{:?}", r.error);
    assert_eq!(r.accounting.delivered, 3000);
    // The source was held back by demand: the buffer (8192 by default) never held more than
    // the window.
    assert!(peak_queued <= 200, "{peak_queued}");
    let input = r
        .stage("slow")
        .and_then(|s| s.input.clone())
        .expect("buffer");
    assert!(input.peak_depth <= 200, "{}", input.peak_depth);
}

#[tokio::test(start_paused = true)]
async fn adaptive_batches_settle_near_the_latency_target() {
    /// Costs 1 ms per item, once per batch.
    struct PerItemCost;
    impl Sink for PerItemCost {
        type Item = u32;
        async fn write(&mut self, _item: Envelope<u32>) -> Result<(), ItemFailure<u32>> {
            Ok(())
        }
        async fn write_batch(
            &mut self,
            items: &mut std::vec::IntoIter<Envelope<u32>>,
            _failed: &mut Vec<ItemFailure<u32>>,
            progress: &mut pulseflow::stage::WriteProgress,
        ) {
            let n = items.len();
            for item in items {
                progress.current_seq = item.seq;
                progress.delivered += 1;
            }
            tokio::time::sleep(Duration::from_millis(n as u64)).await;
        }
    }
    let engine = ExecutionEngine::new();
    let mut p = PipelineBuilder::new("adaptive");
    p.source("src", sources::iter(0u32..90_000))
        .sink("costly", PerItemCost)
        .backpressure(BackpressureStrategy::Adaptive {
            min_batch: 16,
            max_batch: 1024,
        });
    let pipeline = p.build().expect("valid");
    let runner = engine.clone();
    let handle = tokio::spawn(async move { runner.run(pipeline, options(1024)).await });
    let size = |engine: &ExecutionEngine| {
        engine
            .inspect("costly")
            .and_then(|s| s.metrics.get("backpressure.current_batch_size").copied())
            .unwrap_or(0.0)
    };
    // Starts at (16 + 1024) / 2 = 520 items: 520 ms a chunk, far over the 100 ms target.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(size(&engine), 520.0);
    // Adjusted every 5 s, it halves until under the target, then hovers around it.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let settled = size(&engine);
    assert!((40.0..=160.0).contains(&settled), "batch size {settled}");
    let r = handle.await.expect("run");
    assert!(r.success, "{:?}", r.error);
    assert_eq!(r.accounting.delivered, 90_000);
}
