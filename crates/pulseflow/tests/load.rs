//! Busy, backpressured and idle shares of stages, and the bottleneck, in running pipelines.
//! The slow stage blocks its thread for each item, so the shares measure real work; the
//! assertions compare stages with each other, never with a duration.

use std::time::Duration;

use pulseflow::engine::Supervision;
use pulseflow::metrics::Load;
use pulseflow::prelude::*;

fn options() -> ExecutionOptions {
    ExecutionOptions::default()
        .with_batch_size(16)
        .with_supervision(Supervision::Off)
}

fn slow(x: u32) -> u32 {
    std::thread::sleep(Duration::from_micros(200));
    x
}

fn load(r: &PipelineResult, stage: &str) -> Load {
    r.stage(stage)
        .and_then(|s| s.load)
        .unwrap_or_else(|| panic!("no load for {stage}: {:?}", r.stage(stage)))
}

fn bottlenecks(r: &PipelineResult) -> Vec<&str> {
    r.stages
        .values()
        .filter(|s| s.bottleneck)
        .map(|s| s.stage_id.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_is_the_bottleneck_and_its_producer_backpressured() {
    let mut p = PipelineBuilder::new("slow-sink");
    p.source("src", sources::iter(0u32..1500))
        .map("fast", |x| x + 1)
        .sink(
            "out",
            sinks::sink_fn(|x: u32| {
                slow(x);
            }),
        )
        .buffer(BufferPolicy::new(32, DropPolicy::Block));
    let r = ExecutionEngine::new()
        .run(p.build().expect("valid"), options())
        .await;
    assert!(r.success, "{:?}", r.error);
    assert!(r.accounting.reconciles());
    let (fast, out) = (load(&r, "fast"), load(&r, "out"));
    assert!(out.busy > fast.busy, "{out:?} {fast:?}");
    assert!(fast.backpressured > fast.busy, "{fast:?}");
    assert_eq!(bottlenecks(&r), ["out"]);
    for s in r.stages.values() {
        let l = s.load.expect("load");
        assert!(
            (l.busy + l.backpressured + l.idle - 1.0).abs() < 1e-9,
            "{l:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_keeps_the_shares_of_each_of_its_stages() {
    let mut p = PipelineBuilder::new("chain");
    let (sink, got) = sinks::collect();
    // `slow` and `after` are fused into `cheap`'s task: no buffer between them.
    p.source("src", sources::iter(0u32..1500))
        .map("cheap", |x| x + 1)
        .map("slow", slow)
        .map("after", |x| x * 2)
        .sink("out", sink);
    let r = ExecutionEngine::new()
        .run(p.build().expect("valid"), options())
        .await;
    assert!(r.success, "{:?}", r.error);
    assert_eq!(got.len(), 1500);
    for fused in ["slow", "after"] {
        assert!(
            r.stage(fused).expect("stage").input.is_none(),
            "{fused} is fused"
        );
    }
    let (cheap, slow, after) = (load(&r, "cheap"), load(&r, "slow"), load(&r, "after"));
    assert!(
        slow.busy > cheap.busy && slow.busy > after.busy,
        "{cheap:?} {slow:?} {after:?}"
    );
    // `cheap` waits on `slow` working on its output.
    assert!(cheap.backpressured > cheap.busy, "{cheap:?}");
    assert_eq!(bottlenecks(&r), ["slow"]);
}
