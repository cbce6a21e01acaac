//! `backpressure`: a fast source into a sink slowed to a fixed rate, once per backpressure
//! strategy. For each: the peak of items in flight against the strategy's bound, the peak RSS,
//! the achieved rate of the rate-shaped run against its configured rate, and the cost per item
//! of the controller (the same pipeline with a fast sink, with and without the controller).

use std::time::{Duration, Instant};

use pulseflow::engine::Supervision;
use pulseflow::policy::{BackpressureStrategy, DropPolicy};
use pulseflow::prelude::*;
use serde_json::json;

use crate::CommonOpts;
use crate::report::{Report, median, peak_rss_kib, per_sec, reset_peak_rss};

const BATCH: usize = 256;

/// A sink that takes `rate` items per second (paced by deadlines, not per-item sleeps).
struct PacedSink {
    rate: f64,
    next: Option<tokio::time::Instant>,
}

impl Sink for PacedSink {
    type Item = u64;

    async fn write(&mut self, _item: Envelope<u64>) -> Result<(), ItemFailure<u64>> {
        Ok(())
    }

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<u64>>,
        _failed: &mut Vec<ItemFailure<u64>>,
        progress: &mut pulseflow::stage::WriteProgress,
    ) {
        let n = items.len();
        for item in items {
            progress.current_seq = item.seq;
            std::hint::black_box(item.payload);
            progress.delivered += 1;
        }
        let now = tokio::time::Instant::now();
        let next = self.next.unwrap_or(now) + Duration::from_secs_f64(n as f64 / self.rate);
        self.next = Some(next);
        tokio::time::sleep_until(next).await;
    }
}

struct Case {
    name: &'static str,
    strategy: Option<BackpressureStrategy>,
    /// The in-flight bound the strategy promises, if it promises one.
    bound: Option<f64>,
}

fn cases(window: usize) -> Vec<Case> {
    vec![
        Case {
            name: "none",
            strategy: None,
            bound: None,
        },
        Case {
            name: "bounded",
            strategy: Some(BackpressureStrategy::Bounded {
                capacity: window,
                drop_policy: DropPolicy::Block,
            }),
            bound: Some(window as f64),
        },
        Case {
            name: "credit",
            strategy: Some(BackpressureStrategy::CreditBased {
                initial: window,
                replenish_threshold: window / 2,
            }),
            bound: Some(window as f64),
        },
        Case {
            name: "adaptive",
            strategy: Some(BackpressureStrategy::Adaptive {
                min_batch: 64,
                max_batch: window,
            }),
            bound: None,
        },
        Case {
            name: "pull",
            strategy: Some(BackpressureStrategy::ReactivePull { window }),
            bound: Some(window as f64),
        },
    ]
}

struct Outcome {
    elapsed: Duration,
    peak_in_flight: f64,
    delivered: u64,
}

async fn run_case(
    n: u64,
    strategy: Option<BackpressureStrategy>,
    sink_rate: Option<f64>,
) -> Result<Outcome, String> {
    let mut p = PipelineBuilder::new("backpressure");
    let stream = p.source("src", sources::iter(0..n));
    let sink = match sink_rate {
        Some(rate) => stream.sink("sink", PacedSink { rate, next: None }),
        None => stream.sink(
            "sink",
            sink_fn(|x: u64| {
                std::hint::black_box(x);
            }),
        ),
    };
    if let Some(s) = strategy {
        sink.backpressure(s);
    }
    let pipeline = p.build().map_err(|e| e.to_string())?;
    let options = ExecutionOptions::default().with_batch_size(BATCH);
    let started = Instant::now();
    let result = ExecutionEngine::new().run(pipeline, options).await;
    let elapsed = started.elapsed();
    if !result.success || !result.accounting.reconciles() {
        return Err(format!("run failed: {:?}", result.error));
    }
    let sink = result.stage("sink").ok_or("no sink state")?;
    // In flight at the sink: what its buffer held plus what its controller had admitted.
    let edge_peak = sink.input.as_ref().map_or(0, |e| e.peak_depth) as f64;
    let controller_peak = [
        "backpressure.peak_in_flight",
        "backpressure.peak_outstanding",
    ]
    .iter()
    .filter_map(|k| sink.metrics.get(*k).copied())
    .fold(0.0, f64::max);
    Ok(Outcome {
        elapsed,
        peak_in_flight: edge_peak.max(controller_peak),
        delivered: result.accounting.delivered,
    })
}

/// Runs the scenario.
pub fn run(opts: &CommonOpts) -> Result<Report, Box<dyn std::error::Error>> {
    let quick = opts.quick;
    let window = 1024;
    let sink_rate = 400_000.0;
    let slow_items: u64 = if quick { 200_000 } else { 800_000 };
    let fast_items: u64 = if quick { 2_000_000 } else { 10_000_000 };
    let rounds = if quick { 3 } else { 5 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.workers.unwrap_or_else(pulseflow::policy::cores))
        .enable_all()
        .build()?;
    let _ = Supervision::Default;

    let mut report = Report::new(
        format!(
            "backpressure: {slow_items} items into a sink paced at {} items/s; overhead on {fast_items} items, median of {rounds}",
            per_sec(sink_rate)
        ),
        &[
            "strategy",
            "peak in flight",
            "bound",
            "peak/bound",
            "peak RSS MiB",
            "items/s (slow sink)",
            "overhead ns/item",
        ],
    );
    let mut max_ratio: f64 = 0.0;
    let mut worst_overhead: f64 = 0.0;
    let mut details = Vec::new();
    let mut baseline_fast = Duration::ZERO;
    for case in cases(window) {
        reset_peak_rss();
        let slow = rt.block_on(run_case(slow_items, case.strategy, Some(sink_rate)))?;
        let rss_mib = peak_rss_kib() as f64 / 1024.0;
        let mut fast = Vec::new();
        for _ in 0..rounds {
            fast.push(
                rt.block_on(run_case(fast_items, case.strategy, None))?
                    .elapsed,
            );
        }
        let fast = median(fast);
        if case.strategy.is_none() {
            baseline_fast = fast;
        }
        let overhead = (fast.as_secs_f64() - baseline_fast.as_secs_f64()) * 1e9 / fast_items as f64;
        worst_overhead = worst_overhead.max(overhead);
        let ratio = case.bound.map(|b| slow.peak_in_flight / b);
        if let Some(r) = ratio {
            max_ratio = max_ratio.max(r);
        }
        let rate = slow.delivered as f64 / slow.elapsed.as_secs_f64();
        report.row(vec![
            case.name.to_owned(),
            format!("{:.0}", slow.peak_in_flight),
            case.bound.map_or("-".into(), |b| format!("{b:.0}")),
            ratio.map_or("-".into(), |r| format!("{r:.2}")),
            format!("{rss_mib:.1}"),
            per_sec(rate),
            format!("{overhead:.1}"),
        ]);
        details.push(json!({
            "strategy": case.name,
            "peak_in_flight": slow.peak_in_flight,
            "bound": case.bound,
            "peak_rss_mib": (rss_mib * 10.0).round() / 10.0,
            "slow_sink_items_per_sec": rate.round(),
            "overhead_ns_per_item": (overhead * 10.0).round() / 10.0,
        }));
    }

    // Rate shaping: a fast sink behind a token bucket.
    let rate = 100_000u32;
    let burst = 256u32;
    let shaped_items: u64 = if quick { 100_000 } else { 300_000 };
    let shaped = rt.block_on(run_case(
        shaped_items,
        Some(BackpressureStrategy::RateShaping { rate, burst }),
        None,
    ))?;
    let achieved = (shaped_items - u64::from(burst)) as f64 / shaped.elapsed.as_secs_f64();
    let rate_error = (achieved - f64::from(rate)).abs() / f64::from(rate);
    let mut fast = Vec::new();
    for _ in 0..rounds {
        let s = BackpressureStrategy::RateShaping {
            rate: 1_000_000_000,
            burst: 1_000_000,
        };
        fast.push(rt.block_on(run_case(fast_items, Some(s), None))?.elapsed);
    }
    let rate_overhead =
        (median(fast).as_secs_f64() - baseline_fast.as_secs_f64()) * 1e9 / fast_items as f64;
    worst_overhead = worst_overhead.max(rate_overhead);
    report.row(vec![
        "rate".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        format!(
            "{} (configured {})",
            per_sec(achieved),
            per_sec(f64::from(rate))
        ),
        format!("{rate_overhead:.1}"),
    ]);
    report.note(format!(
        "rate shaping: {shaped_items} items at {} items/s with bursts of {burst}: achieved {}, error {:.2} %",
        per_sec(f64::from(rate)),
        per_sec(achieved),
        rate_error * 100.0
    ));
    report.note(format!(
        "in flight = the sink's buffer peak, or its controller's admitted-and-unprocessed peak (credit, pull); overhead = median fast-sink time against `none` ({:.1} ns/item), per item; negative = within noise",
        baseline_fast.as_secs_f64() * 1e9 / fast_items as f64
    ));
    report.summary(json!({
        "scenario": "backpressure",
        "max_inflight_over_bound": (max_ratio * 1000.0).round() / 1000.0,
        "rate_error": (rate_error * 10000.0).round() / 10000.0,
        "worst_overhead_ns_per_item": (worst_overhead * 10.0).round() / 10.0,
        "strategies": details,
        "cores": pulseflow::policy::cores(),
    }));
    Ok(report)
}
