//! End-to-end behaviour of the engine: ordering, parallelism, fusion, error policies, panics,
//! init failures, branch/merge, drops, stop/abort and live inspection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pulseflow::engine::Supervision;
use pulseflow::metrics::StageStatus;
use pulseflow::prelude::*;

/// Options for tests on Tokio's paused clock: a supervised task that gets isolated would move
/// to the isolation runtime, whose clock is not paused.
fn paused() -> ExecutionOptions {
    ExecutionOptions::default().with_supervision(Supervision::Off)
}

async fn run(p: PipelineBuilder) -> PipelineResult {
    let pipeline = p.build().expect("valid pipeline");
    let result = ExecutionEngine::new()
        .run(pipeline, ExecutionOptions::default().with_batch_size(64))
        .await;
    assert!(result.accounting.reconciles(), "{:?}", result.accounting);
    assert!(
        result.unbalanced_stages().is_empty(),
        "{:?}",
        result.unbalanced_stages()
    );
    result
}

/// How many stages run fused into their upstream's task or workers.
fn fused(pipeline: &Pipeline) -> usize {
    pipeline
        .graph()
        .fusion_plan(&Default::default())
        .fused_count()
}

#[tokio::test]
async fn linear_pipeline_keeps_order_and_counts() {
    let mut p = PipelineBuilder::new("linear");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u64..1000))
        .map("double", |x| x * 2)
        .filter("div4", |x| x % 4 == 0)
        .sink("out", sink);
    let r = run(p).await;
    assert!(r.success, "{:?}", r.error);
    let items = got.items();
    assert_eq!(
        items,
        (0..1000u64)
            .map(|x| x * 2)
            .filter(|x| x % 4 == 0)
            .collect::<Vec<_>>()
    );
    let seqs: Vec<u64> = got.take().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..1000u64).step_by(2).collect::<Vec<_>>());
    assert_eq!(r.processed, 1000);
    assert_eq!(r.accounting.filtered, 500);
    assert_eq!(r.accounting.delivered, 500);
    let filter = r.stage("div4").expect("stage");
    assert_eq!(
        (
            filter.counts.received,
            filter.counts.emitted,
            filter.counts.filtered
        ),
        (1000, 500, 500)
    );
    assert_eq!(filter.status, StageStatus::Completed);
}

#[tokio::test]
async fn consecutive_stateless_transforms_are_fused() {
    let mut p = PipelineBuilder::new("fused");
    p.source("src", sources::iter(0u32..100))
        .map("a", |x| x + 1)
        .map("b", |x| x * 3)
        .filter("c", |x| x % 2 == 0)
        .sink("out", sink_fn(|_x: u32| {}));
    let pipeline = p.build().expect("valid");
    let graph = pipeline.graph().clone();
    let plan = graph.fusion_plan(&Default::default());
    assert_eq!(plan.fused_count(), 2, "b and c run in a's task");
    let dot = graph.to_dot();
    assert!(dot.contains("fused task"));
    for stage in ["\"a\"", "\"b\"", "\"c\""] {
        assert!(dot.contains(stage), "export shows every stage: {dot}");
    }
    let r = ExecutionEngine::new()
        .run(pipeline, ExecutionOptions::default())
        .await;
    assert!(r.success);
    // Fused stages have no buffer of their own; the head of the chain has one.
    assert!(r.stage("a").and_then(|s| s.input.as_ref()).is_some());
    assert!(r.stage("b").and_then(|s| s.input.as_ref()).is_none());
    assert!(r.stage("c").and_then(|s| s.input.as_ref()).is_none());
    assert_eq!(r.stage("c").map(|s| s.counts.received), Some(100));
}

#[tokio::test]
async fn different_error_policies_break_fusion() {
    let mut p = PipelineBuilder::new("boundary");
    p.source("src", sources::iter(0u32..10))
        .map("a", |x| x + 1)
        .map("b", |x| x * 3)
        .error_policy(ErrorPolicy::Ignore)
        .sink("out", sink_fn(|_x: u32| {}));
    let pipeline = p.build().expect("valid");
    assert_eq!(fused(&pipeline), 0);
}

/// `x -> x + 1` with uneven work, so parallel workers finish out of order.
fn uneven(x: u64) -> u64 {
    if x % 7 == 0 {
        std::thread::sleep(Duration::from_micros(50));
    }
    x + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stateless_stages_on_the_same_ordered_workers_are_chained_and_keep_order() {
    let mut p = PipelineBuilder::new("chained");
    let (sink, got) = sinks::collect();
    let on_four = |s: Stream<u64>| s.parallelism(ParallelismHint::Fixed(4)).ordered();
    let work = on_four(
        p.source("src", sources::iter(0u64..5000))
            .map("work", uneven),
    );
    let even = on_four(work.filter("even", |x| x % 2 == 0));
    on_four(even.map("half", |x| x / 2)).sink("out", sink);
    let pipeline = p.build().expect("valid");
    let plan = pipeline.graph().fusion_plan(&Default::default());
    assert_eq!(
        plan.fused_count(),
        2,
        "even and half run behind work's workers"
    );
    let r = ExecutionEngine::new()
        .run(pipeline, ExecutionOptions::default().with_batch_size(500))
        .await;
    assert!(r.success, "{:?}", r.error);
    assert!(r.accounting.reconciles(), "{:?}", r.accounting);
    let expected: Vec<u64> = (1..=5000u64)
        .filter(|x| x % 2 == 0)
        .map(|x| x / 2)
        .collect();
    assert_eq!(got.items(), expected);
    // Chained stages have no buffer of their own, count their own items and complete.
    for (id, received, emitted) in [
        ("work", 5000, 5000),
        ("even", 5000, 2500),
        ("half", 2500, 2500),
    ] {
        let stage = r.stage(id).expect("stage");
        assert_eq!(
            (stage.counts.received, stage.counts.emitted),
            (received, emitted),
            "{id}"
        );
        assert_eq!(stage.status, StageStatus::Completed, "{id}");
        assert_eq!(stage.input.is_some(), id == "work", "{id}");
        // A worker takes each batch through the chain in pieces; each stage still records one
        // batch time per batch.
        assert_eq!(stage.metrics.get("batches"), Some(&10.0), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stateless_stages_on_the_same_unordered_workers_are_chained() {
    let mut p = PipelineBuilder::new("chained-unordered");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u64..3000))
        .map("work", uneven)
        .parallelism(ParallelismHint::Fixed(3))
        .filter("odd", |x| x % 2 == 1)
        .parallelism(ParallelismHint::Fixed(3))
        .sink("out", sink);
    let pipeline = p.build().expect("valid");
    assert_eq!(fused(&pipeline), 1);
    let r = ExecutionEngine::new()
        .run(pipeline, ExecutionOptions::default().with_batch_size(300))
        .await;
    assert!(r.success, "{:?}", r.error);
    assert!(r.accounting.reconciles(), "{:?}", r.accounting);
    let mut items = got.items();
    items.sort_unstable();
    assert_eq!(
        items,
        (1..=3000u64).filter(|x| x % 2 == 1).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn other_worker_counts_or_orderings_are_not_chained() {
    let mut p = PipelineBuilder::new("not-chained");
    p.source("src", sources::iter(0u64..10))
        .map("a", |x| x + 1)
        .parallelism(ParallelismHint::Fixed(2))
        .ordered()
        .map("b", |x| x + 1)
        .parallelism(ParallelismHint::Fixed(3))
        .ordered()
        .map("c", |x| x + 1)
        .parallelism(ParallelismHint::Fixed(3))
        .map("d", |x| x + 1)
        .sink("out", sink_fn(|_x: u64| {}));
    let pipeline = p.build().expect("valid");
    let plan = pipeline.graph().fusion_plan(&Default::default());
    assert_eq!(
        plan.fused_count(),
        0,
        "2 vs 3 workers, ordered vs not, parallel vs sequential"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_ordered_restores_input_order() {
    let mut p = PipelineBuilder::new("ordered");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u64..5000))
        .map("work", |x| {
            // Uneven work so workers finish out of order.
            if x % 7 == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
            x + 1
        })
        .parallelism(ParallelismHint::Fixed(4))
        .ordered()
        .sink("out", sink);
    let r = run(p).await;
    assert!(r.success);
    assert_eq!(got.items(), (1..=5000u64).collect::<Vec<_>>());
    let work = r.stage("work").expect("stage");
    assert_eq!(work.counts.received, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_unordered_delivers_everything() {
    let mut p = PipelineBuilder::new("unordered");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u64..5000))
        .map("work", |x| x * 2)
        .parallelism(ParallelismHint::Fixed(3))
        .sink("out", sink);
    let r = run(p).await;
    assert!(r.success);
    let mut items = got.items();
    items.sort_unstable();
    assert_eq!(items, (0..5000u64).map(|x| x * 2).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_ordering_keeps_each_key_in_order() {
    let mut p = PipelineBuilder::new("partitioned");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter((0u64..4000).map(|i| (i % 13, i))))
        .map("work", |(k, i)| (k, i))
        .parallelism(ParallelismHint::Fixed(4))
        .partition_by("key", |(k, _): &(u64, u64)| *k)
        .sink("out", sink);
    let r = run(p).await;
    assert!(r.success);
    let items = got.items();
    assert_eq!(items.len(), 4000);
    for key in 0..13 {
        let per_key: Vec<u64> = items
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, i)| *i)
            .collect();
        assert!(
            per_key.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order"
        );
    }
}

#[tokio::test]
async fn dead_letters_keep_item_error_stage_and_attempts() {
    let mut p = PipelineBuilder::new("dlq");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(vec!["1", "two", "3", "x"]))
        .try_map("parse", |s: &&str| s.parse::<u32>())
        .sink("out", sink);
    let r = run(p).await;
    assert!(r.success);
    assert_eq!(got.items(), vec![1, 3]);
    assert_eq!(r.accounting.dead_lettered, 2);
    assert_eq!(r.dead_letters.len(), 2);
    let first = &r.dead_letters[0];
    assert_eq!(first.stage, "parse");
    assert_eq!(first.seq, 1);
    assert_eq!(first.attempts, 1);
    assert_eq!(first.payload::<&str>(), Some(&"two"));
    assert!(first.error.contains("invalid digit"), "{}", first.error);
    assert_eq!(r.stage("parse").map(|s| s.errors), Some(2));
}

#[tokio::test(start_paused = true)]
async fn retry_recovers_transient_failures_with_backoff() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = attempts.clone();
    let mut p = PipelineBuilder::new("retry");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u32..5))
        .try_map("flaky", move |x: &u32| {
            // Item 2 fails twice, then succeeds; item 4 always fails.
            let n = seen.fetch_add(1, Ordering::SeqCst);
            match *x {
                2 if n < 4 => Err("transient"),
                4 => Err("permanent"),
                _ => Ok(*x),
            }
        })
        .error_policy(ErrorPolicy::retry(3, Duration::from_millis(100)))
        .sink("out", sink);
    let started = tokio::time::Instant::now();
    let r = ExecutionEngine::new()
        .run(p.build().expect("valid"), paused())
        .await;
    assert!(r.accounting.reconciles());
    assert!(r.success);
    let mut items = got.items();
    items.sort_unstable();
    assert_eq!(items, vec![0, 1, 2, 3]);
    assert_eq!(r.dead_letters.len(), 1);
    assert_eq!(r.dead_letters[0].attempts, 4, "first try and three retries");
    assert_eq!(r.dead_letters[0].error, "permanent");
    let stage = r.stage("flaky").expect("stage");
    assert!(stage.counts.retries >= 4);
    // Backoff really waited (on the paused clock): at least 100ms for the first retry.
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn fail_policy_ends_the_run_with_stage_and_item() {
    let mut p = PipelineBuilder::new("fail");
    p.source("src", sources::iter(0u32..10_000))
        .try_map(
            "check",
            |x: &u32| if *x == 77 { Err("bad value") } else { Ok(*x) },
        )
        .error_policy(ErrorPolicy::Fail)
        .sink("out", sink_fn(|_x: u32| {}));
    let r = run(p).await;
    assert!(!r.success);
    let err = r.error.as_ref().expect("error").to_string();
    assert!(
        err.contains("stage `check` failed on item 77: bad value"),
        "{err}"
    );
    assert_eq!(
        r.stage("check").map(|s| s.status),
        Some(StageStatus::Failed)
    );
    assert!(r.processed < 10_000 || r.accounting.dropped > 0);
}

#[tokio::test]
async fn ignore_policy_counts_and_drops() {
    let mut p = PipelineBuilder::new("ignore");
    p.source("src", sources::iter(0u32..100))
        .try_map(
            "odd-fails",
            |x: &u32| if x % 2 == 1 { Err("odd") } else { Ok(*x) },
        )
        .error_policy(ErrorPolicy::Ignore)
        .sink("out", sink_fn(|_x: u32| {}));
    let r = run(p).await;
    assert!(r.success);
    let s = r.stage("odd-fails").expect("stage");
    assert_eq!(s.counts.dropped.get("error_ignored"), Some(&50));
    assert_eq!(r.accounting.delivered, 50);
}

#[tokio::test]
async fn a_panic_in_try_map_fails_only_that_item() {
    let mut p = PipelineBuilder::new("panics");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u32..20))
        .try_map("boom", |x: &u32| {
            if *x == 5 || *x == 6 {
                panic!("cannot handle {x}");
            }
            Ok::<_, std::io::Error>(*x)
        })
        .sink("out", sink);
    let r = run(p).await;
    assert!(r.success);
    assert_eq!(got.len(), 18);
    assert_eq!(r.dead_letters.len(), 2);
    assert!(
        r.dead_letters[0]
            .error
            .contains("panicked: cannot handle 5")
    );
    assert_eq!(r.dead_letters[0].seq, 5);
    assert_eq!(r.dead_letters[1].seq, 6);
}

#[tokio::test]
async fn sink_panics_and_errors_follow_the_policy() {
    let mut p = PipelineBuilder::new("sink-errors");
    p.source("src", sources::iter(0u32..10))
        .sink(
            "picky",
            sinks::try_sink_fn(|e: &Envelope<u32>| match e.payload {
                3 => panic!("three"),
                4 => Err("four"),
                _ => Ok(()),
            }),
        )
        .error_policy(ErrorPolicy::Ignore);
    let r = run(p).await;
    assert!(r.success);
    let s = r.stage("picky").expect("stage");
    assert_eq!(s.counts.delivered, 8);
    assert_eq!(s.counts.dropped.get("error_ignored"), Some(&2));
}

struct FailingInit;

impl Sink for FailingInit {
    type Item = u32;
    async fn init(&mut self, _ctx: &StageContext) -> Result<(), StageError> {
        Err(StageError::msg("database unreachable"))
    }
    async fn write(&mut self, _item: Envelope<u32>) -> Result<(), ItemFailure<u32>> {
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_init_stops_the_run_before_any_item_flows() {
    let mut p = PipelineBuilder::new("init");
    p.source("src", sources::iter(0u32..10))
        .map("m", |x| x)
        .sink("db", FailingInit);
    let r = run(p).await;
    assert!(!r.success);
    let err = r.error.as_ref().expect("error").to_string();
    assert_eq!(err, "stage `db` failed to initialise: database unreachable");
    assert_eq!(r.processed, 0);
    assert_eq!(r.stage("db").map(|s| s.status), Some(StageStatus::Failed));
}

#[tokio::test]
async fn branch_copies_to_every_matching_route_and_merge_joins() {
    let mut p = PipelineBuilder::new("branch");
    let (sink, got) = sinks::collect();
    let mut routes = p.source("src", sources::iter(0u32..30)).branch(
        "route",
        Routes::new()
            .route("by2", |x: &u32| x % 2 == 0)
            .route("by3", |x: &u32| x % 3 == 0)
            .unmatched("rest"),
    );
    let by2 = routes.take("by2").expect("route").map("tag2", |x| (2, x));
    let by3 = routes.take("by3").expect("route").map("tag3", |x| (3, x));
    let rest = routes.take("rest").expect("route").map("tag0", |x| (0, x));
    by2.merge("join", [by3, rest]).sink("out", sink);
    let r = run(p).await;
    assert!(r.success);
    let items = got.items();
    // 15 multiples of 2, 10 of 3, 10 neither.
    assert_eq!(items.iter().filter(|(t, _)| *t == 2).count(), 15);
    assert_eq!(items.iter().filter(|(t, _)| *t == 3).count(), 10);
    assert_eq!(items.iter().filter(|(t, _)| *t == 0).count(), 10);
    // 5 multiples of 6 were copied.
    assert_eq!(r.stage("route").map(|s| s.counts.created), Some(5));
    assert_eq!(r.accounting.delivered, 35);
}

#[tokio::test]
async fn branch_without_unmatched_filters() {
    let mut p = PipelineBuilder::new("branch-filter");
    let mut routes = p
        .source("src", sources::iter(0u32..10))
        .branch("route", Routes::new().route("small", |x: &u32| *x < 3));
    routes
        .take("small")
        .expect("route")
        .sink("out", sink_fn(|_x: u32| {}));
    let r = run(p).await;
    assert_eq!(r.accounting.filtered, 7);
    assert_eq!(r.accounting.delivered, 3);
}

#[tokio::test]
async fn map_async_bounds_concurrency_and_keeps_order() {
    let live = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (l, pk) = (live.clone(), peak.clone());
    let mut p = PipelineBuilder::new("async");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u64..200))
        .map_async("lookup", 8, move |x: u64| {
            let (l, pk) = (l.clone(), pk.clone());
            async move {
                let now = l.fetch_add(1, Ordering::SeqCst) + 1;
                pk.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(200 - x)).await;
                l.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(x * 10)
            }
        })
        .sink("out", sink);
    let r = run(p).await;
    assert!(r.success);
    assert_eq!(got.items(), (0..200u64).map(|x| x * 10).collect::<Vec<_>>());
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 8 && peak > 1, "peak concurrency {peak}");
}

#[tokio::test]
async fn drop_newest_on_a_slow_sink_counts_every_drop() {
    let mut p = PipelineBuilder::new("drops");
    let sink = sink_fn(|_x: u64| std::thread::sleep(Duration::from_micros(20)));
    p.source("src", sources::iter(0u64..20_000))
        .map("m", |x| x)
        .sink("slow", sink)
        .buffer(BufferPolicy::new(100, DropPolicy::DropNewest));
    let r = run(p).await;
    assert!(r.success);
    let slow = r.stage("slow").expect("stage");
    let dropped = slow.input.as_ref().map(|e| e.dropped_total()).unwrap_or(0);
    assert_eq!(r.accounting.delivered + dropped, 20_000);
    assert!(slow.input.as_ref().is_some_and(|e| e.peak_depth <= 100));
}

#[tokio::test(start_paused = true)]
async fn stop_drains_an_endless_source() {
    let engine = ExecutionEngine::new();
    let mut p = PipelineBuilder::new("endless");
    let endless = futures::stream::unfold(0u64, |i| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Some((i, i + 1))
    });
    p.source("ticks", sources::stream(Box::pin(endless)))
        .map("m", |x| x + 1)
        .sink("out", sink_fn(|_x: u64| {}));
    let pipeline = p.build().expect("valid");
    let runner = engine.clone();
    let handle = tokio::spawn(async move { runner.run(pipeline, paused()).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let live = engine.inspect("m").expect("running stage");
    assert_eq!(live.status, StageStatus::Running);
    assert!(live.counts.received > 0);
    engine.stop(Duration::from_secs(5)).await;
    let r = handle.await.expect("run task");
    assert!(r.success, "{:?}", r.error);
    assert!(r.accounting.reconciles());
    assert!(r.processed > 100);
    assert_eq!(r.accounting.delivered, r.processed);
}

#[tokio::test(start_paused = true)]
async fn abort_reports_items_in_flight() {
    let engine = ExecutionEngine::new();
    let mut p = PipelineBuilder::new("stuck");
    struct Stuck;
    impl Sink for Stuck {
        type Item = u64;
        async fn write(&mut self, _item: Envelope<u64>) -> Result<(), ItemFailure<u64>> {
            std::future::pending::<()>().await;
            Ok(())
        }
    }
    p.source("src", sources::iter(0u64..100))
        .sink("stuck", Stuck);
    let pipeline = p.build().expect("valid");
    let runner = engine.clone();
    let handle = tokio::spawn(async move { runner.run(pipeline, paused()).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    // A graceful stop cannot finish: the deadline turns it into an abort.
    engine.stop(Duration::from_millis(100)).await;
    let r = handle.await.expect("run task");
    assert!(!r.success);
    match r.error {
        Some(PipelineError::Aborted { in_flight }) => assert_eq!(in_flight, 100),
        other => panic!("expected abort, got {other:?}"),
    }
    assert_eq!(
        r.stage("stuck").map(|s| s.status),
        Some(StageStatus::Aborted)
    );
}

#[test]
fn invalid_graphs_list_every_problem() {
    let mut p = PipelineBuilder::new("bad");
    struct Stateful;
    impl Transform for Stateful {
        type In = u8;
        type Out = u8;
        fn process(
            &mut self,
            item: Envelope<u8>,
            out: &mut Vec<Envelope<u8>>,
        ) -> Result<(), ItemFailure<u8>> {
            out.push(item);
            Ok(())
        }
    }
    p.source("s", sources::iter(0u8..1))
        .transform("t", Stateful)
        .parallelism(ParallelismHint::Fixed(2))
        .map("u", |x| x)
        .error_policy(PolicyRef::Named("nope".into()))
        .sink("k", sink_fn(|_x: u8| {}))
        .buffer(BufferPolicy::new(0, DropPolicy::Block));
    let err = p.build().expect_err("invalid");
    let text = err.to_string();
    assert!(text.starts_with("invalid pipeline (3 problems)"), "{text}");
    assert!(
        text.contains("stage `t`: parallelism fixed(2) conflicts"),
        "{text}"
    );
    assert!(
        text.contains("stage `u` refers to unknown error policy `nope`"),
        "{text}"
    );
    assert!(
        text.contains("stage `k`: buffer capacity must be at least 1"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn io_bound_pool_grows_with_its_queue_and_shrinks_when_idle() {
    struct SlowSink;
    impl Sink for SlowSink {
        type Item = u64;
        async fn write(&mut self, _item: Envelope<u64>) -> Result<(), ItemFailure<u64>> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        }
    }
    // 3000 items at once, then a trickle: one item every 5 s.
    let source = futures::stream::unfold(0u64, |i| async move {
        if i >= 3005 {
            return None;
        }
        if i >= 3000 {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Some((i, i + 1))
    });
    let engine = ExecutionEngine::new();
    let mut p = PipelineBuilder::new("elastic");
    p.source("src", sources::stream(Box::pin(source)))
        .map("io", |x| x)
        .parallelism(ParallelismHint::DynamicIoBound { min: 1, max: 4 })
        .buffer(BufferPolicy::new(256, DropPolicy::Block))
        .sink("slow", SlowSink)
        .buffer(BufferPolicy::new(64, DropPolicy::Block));
    let pipeline = p.build().expect("valid");
    let runner = engine.clone();
    let handle =
        tokio::spawn(async move { runner.run(pipeline, paused().with_batch_size(32)).await });
    let workers = |engine: &ExecutionEngine| {
        engine
            .inspect("io")
            .and_then(|s| s.metrics.get("workers").copied())
            .unwrap_or(0.0)
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        workers(&engine),
        4.0,
        "deep queue: the pool grew to its maximum"
    );
    // The burst drains in about 3 s of sink time; then the trickle leaves workers idle.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        workers(&engine),
        1.0,
        "idle workers retired down to the minimum"
    );
    let r = handle.await.expect("run");
    assert!(r.success, "{:?}", r.error);
    assert_eq!(r.accounting.delivered, 3005);
}

#[test]
fn stages_publish_counters_through_the_metrics_facade() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut p = PipelineBuilder::new("observed");
        p.source("src", sources::iter(0u32..100))
            .filter("even", |x| x % 2 == 0)
            .sink("out", sink_fn(|_x: u32| {}));
        let r = runtime.block_on(
            ExecutionEngine::new().run(p.build().expect("valid"), ExecutionOptions::default()),
        );
        assert!(r.success);
    });
    // A snapshot drains what it reads: take it once.
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str, stage: &str| {
        snapshot
            .iter()
            .find(|(key, _, _, _)| {
                key.key().name() == name
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "stage" && l.value() == stage)
            })
            .map(|(_, _, _, value)| value)
    };
    let count = |name: &str, stage: &str| match counter(name, stage) {
        Some(DebugValue::Counter(n)) => Some(*n),
        _ => None,
    };
    assert_eq!(count("pulseflow_items_in_total", "even"), Some(100));
    assert_eq!(count("pulseflow_items_out_total", "even"), Some(50));
    assert_eq!(count("pulseflow_items_filtered_total", "even"), Some(50));
    assert_eq!(count("pulseflow_items_out_total", "out"), Some(50));
    assert!(matches!(
        counter("pulseflow_batch_duration_seconds", "even"),
        Some(DebugValue::Histogram(h)) if !h.is_empty()
    ));
}

#[tokio::test(start_paused = true)]
async fn map_async_retries_run_inside_the_concurrency_window() {
    use std::collections::HashSet;
    use std::sync::Mutex;
    let failed_once = Arc::new(Mutex::new(HashSet::new()));
    let mut p = PipelineBuilder::new("retries");
    let (sink, got) = sinks::collect();
    let seen = failed_once.clone();
    p.source("src", sources::iter(0u64..320))
        .map_async("call", 32, move |n: u64| {
            let first = seen.lock().map(|mut s| s.insert(n)).unwrap_or(false);
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if first { Err("busy") } else { Ok(n) }
            }
        })
        .error_policy(ErrorPolicy::retry(3, Duration::from_millis(10)))
        .sink("out", sink);
    let pipeline = p.build().expect("valid");
    let started = tokio::time::Instant::now();
    let r = ExecutionEngine::new().run(pipeline, paused()).await;
    let took = started.elapsed();
    assert!(r.success, "{:?}", r.error);
    assert_eq!(got.len(), 320);
    let call = r.stage("call").expect("stage");
    assert_eq!((call.errors, call.counts.retries), (320, 320));
    // Ten rounds of 32 calls, each 5 ms, a backoff of at most 20 ms and 5 ms again: about
    // 0.3 s of the paused clock. Retries one after the other in the stage's task would take
    // at least 320 x 15 ms = 4.8 s.
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[tokio::test]
async fn a_panic_in_map_or_filter_fails_that_item_alone() {
    for in_filter in [false, true] {
        let mut p = PipelineBuilder::new("panics");
        let (sink, got) = sinks::collect();
        let src = p.source("src", sources::iter(0u64..3000));
        let stage = if in_filter {
            src.filter("step", |n: &u64| {
                assert!(*n != 1500, "boom at {n}");
                true
            })
        } else {
            src.map("step", |n: u64| {
                assert!(n != 1500, "boom at {n}");
                n
            })
        };
        stage
            .error_policy(ErrorPolicy::DeadLetter)
            .sink("out", sink);
        let r = run(p).await;
        assert!(r.success, "{:?}", r.error);
        assert_eq!(got.len(), 2999, "in_filter {in_filter}");
        assert_eq!(r.dead_letters.len(), 1, "in_filter {in_filter}");
        let letter = &r.dead_letters[0];
        assert_eq!(letter.seq, 1500, "in_filter {in_filter}");
        assert!(letter.error.contains("boom at 1500"), "{}", letter.error);
        // A filter's closure borrows the item: it is dead-lettered whole. A map's takes it.
        assert_eq!(
            letter.payload::<u64>().copied(),
            in_filter.then_some(1500),
            "in_filter {in_filter}"
        );
    }
}
