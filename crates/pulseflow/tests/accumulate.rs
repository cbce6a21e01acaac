//! Keyed accumulation end to end: completion, TTL and latency deadlines on the paused clock,
//! end-of-input flush, discards, conservation, spill round trips and corrupt spill files.

use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;
use pulseflow::accumulate::{
    Accumulator, AccumulatorPolicy, AccumulatorState, CompletenessResult, TemplateResult,
    TemplateVar, TemplateVars,
};
use pulseflow::engine::Supervision;
use pulseflow::memory::MemoryBudget;
use pulseflow::metrics::StageRuntimeState;
use pulseflow::prelude::*;

/// Count and sum per key; complete at `complete_at` items. With `scribble`, `check`
/// overwrites the key (the stage puts it back when the key is not done; a complete output
/// takes it as it is).
#[derive(Clone)]
struct CountSum {
    complete_at: u64,
    scribble: bool,
}

impl CountSum {
    fn at(complete_at: u64) -> Self {
        Self {
            complete_at,
            scribble: false,
        }
    }
}

impl Accumulator for CountSum {
    type In = (u32, u64);
    type Out = (u32, u64, u64);
    type Key = u32;
    type State = (u64, u64);

    fn key(&self, item: &Envelope<(u32, u64)>) -> u32 {
        item.payload.0
    }

    fn create(&mut self, _key: &u32) -> (u64, u64) {
        (0, 0)
    }

    fn update(&mut self, state: &mut (u64, u64), item: Envelope<(u32, u64)>) {
        state.0 += 1;
        state.1 += item.payload.1;
    }

    fn check(
        &mut self,
        e: &mut AccumulatorState<u32, (u64, u64)>,
    ) -> CompletenessResult<Self::Out> {
        e.score = e.items as f64 / self.complete_at as f64;
        if self.scribble {
            e.key = u32::MAX - e.key;
        }
        if e.items >= self.complete_at {
            CompletenessResult::Complete((e.key, e.state.0, e.state.1))
        } else {
            CompletenessResult::Incomplete
        }
    }

    fn flush(&mut self, e: AccumulatorState<u32, (u64, u64)>) -> Option<Self::Out> {
        Some((e.key, e.state.0, e.state.1))
    }
}

fn paused() -> ExecutionOptions {
    ExecutionOptions::default().with_supervision(Supervision::Off)
}

fn checked(result: &PipelineResult) {
    assert!(result.accounting.reconciles(), "{:?}", result.accounting);
    assert!(
        result.unbalanced_stages().is_empty(),
        "{:?}",
        result.unbalanced_stages()
    );
}

fn stage<'a>(result: &'a PipelineResult, id: &str) -> &'a StageRuntimeState {
    result.stage(id).expect("stage exists")
}

/// Items, then a pause of `gap` on Tokio's clock, then more items.
fn with_gap<T: Send + 'static>(
    first: Vec<T>,
    gap: Duration,
    then: Vec<T>,
) -> impl futures::Stream<Item = T> + Unpin + Send + 'static {
    let pause = futures::stream::once(tokio::time::sleep(gap)).filter_map(|()| async { None });
    Box::pin(
        futures::stream::iter(first)
            .chain(pause)
            .chain(futures::stream::iter(then)),
    )
}

#[tokio::test(start_paused = true)]
async fn ttl_expiry_emits_partial_with_missing_vars() {
    let mut p = PipelineBuilder::new("ttl");
    let (sink, got) = sinks::collect::<TemplateResult>();
    let first = vec![
        TemplateVar::new("u1", "name", "Ada"),
        TemplateVar::new("u2", "name", "Bob"),
    ];
    let then = vec![
        TemplateVar::new("u2", "email", "bob@example.org"),
        TemplateVar::new("u3", "name", "Cy"),
        TemplateVar::new("u3", "email", "cy@example.org"),
    ];
    p.source(
        "in",
        sources::stream(with_gap(first, Duration::from_secs(60), then)),
    )
    .accumulate(
        "vars",
        TemplateVars::new(["name", "email"]),
        AccumulatorPolicy::default()
            .with_completeness_ttl(Duration::from_secs(10))
            .with_partial_flush(true),
    )
    .sink("out", sink);
    let result = ExecutionEngine::new()
        .run(p.build().expect("valid"), paused())
        .await;
    assert!(result.success, "{:?}", result.error);
    checked(&result);
    let mut out = got.take();
    assert_eq!(out.len(), 4);
    // u1 and u2 expired during the pause (same deadline: either order), before later items.
    out[..2].sort_by(|a, b| a.payload.subject.cmp(&b.payload.subject));
    let subjects: Vec<&str> = out.iter().map(|e| e.payload.subject.as_str()).collect();
    assert_eq!(subjects, vec!["u1", "u2", "u3", "u2"]);
    for e in &out[..2] {
        assert_eq!(e.payload.missing, vec!["email".to_owned()]);
        assert_eq!(e.header("acc.completeness"), Some("0.500"));
        assert_eq!(pulseflow::accumulate::completeness(e), Some(0.5));
        assert_eq!(e.header("acc.spilled"), Some("false"));
    }
    assert!(out[2].payload.is_complete());
    assert_eq!(out[2].header("acc.completeness"), Some("1.000"));
    // u2's email came after its TTL flush: a new key, flushed at the end of input.
    assert_eq!(out[3].payload.missing, vec!["name".to_owned()]);
    assert_eq!(stage(&result, "vars").counts.absorbed, 1);
}

#[tokio::test(start_paused = true)]
async fn ttl_without_partial_flush_discards_and_counts() {
    let mut p = PipelineBuilder::new("ttl-discard");
    let (sink, got) = sinks::collect();
    let first: Vec<(u32, u64)> = vec![(1, 1), (1, 2), (2, 5)];
    let then: Vec<(u32, u64)> = vec![(3, 1), (3, 1), (3, 1)];
    p.source(
        "in",
        sources::stream(with_gap(first, Duration::from_secs(5), then)),
    )
    .accumulate(
        "sum",
        CountSum::at(3),
        AccumulatorPolicy::default().with_completeness_ttl(Duration::from_secs(1)),
    )
    .sink("out", sink);
    let result = ExecutionEngine::new()
        .run(p.build().expect("valid"), paused())
        .await;
    assert!(result.success, "{:?}", result.error);
    checked(&result);
    assert_eq!(got.items(), vec![(3, 3, 3)]);
    let s = stage(&result, "sum");
    assert_eq!(s.counts.dropped.get("discarded_by_policy"), Some(&3));
    assert_eq!(s.counts.absorbed, 2);
}

#[tokio::test(start_paused = true)]
async fn max_latency_flushes_a_busy_key() {
    // Key 1 gets an item every second; its TTL never runs out but its latency does.
    let items = futures::stream::iter(0..10u64).then(|i| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        (1u32, i)
    });
    let mut p = PipelineBuilder::new("latency");
    let (sink, got) = sinks::collect();
    p.source("in", sources::stream(Box::pin(items)))
        .accumulate(
            "sum",
            CountSum::at(100),
            AccumulatorPolicy::default()
                .with_completeness_ttl(Duration::from_secs(3))
                .with_max_latency(Duration::from_millis(4500))
                .with_partial_flush(true),
        )
        .sink("out", sink);
    let result = ExecutionEngine::new()
        .run(p.build().expect("valid"), paused().with_batch_size(1))
        .await;
    assert!(result.success, "{:?}", result.error);
    checked(&result);
    let out = got.items();
    assert!(out.len() >= 2, "{out:?}");
    assert!(out.iter().all(|(_, n, _)| *n <= 5), "{out:?}");
    assert_eq!(out.iter().map(|(_, n, _)| n).sum::<u64>(), 10);
}

#[tokio::test(start_paused = true)]
async fn a_key_kept_closed_drops_its_later_items_until_its_closed_ttl_is_over() {
    // Key 1 completes at two items; one more comes at once (dropped: the key is closed), then
    // two after the closed TTL (a new key, complete again).
    let items = with_gap(
        vec![(1u32, 1u64), (1, 2), (1, 4)],
        Duration::from_secs(20),
        vec![(1, 8), (1, 16)],
    );
    let mut p = PipelineBuilder::new("closed");
    let (sink, got) = sinks::collect();
    p.source("in", sources::stream(items))
        .accumulate(
            "sum",
            CountSum::at(2),
            AccumulatorPolicy::default().with_closed_ttl(Duration::from_secs(10)),
        )
        .sink("out", sink);
    let result = ExecutionEngine::new()
        .run(p.build().expect("valid"), paused().with_batch_size(1))
        .await;
    assert!(result.success, "{:?}", result.error);
    checked(&result);
    assert_eq!(got.items(), vec![(1, 2, 3), (1, 2, 24)]);
    let s = stage(&result, "sum");
    assert_eq!(s.counts.dropped.get("discarded_by_policy"), Some(&1));
}

#[tokio::test]
async fn end_of_input_flush_and_limits() {
    let mut p = PipelineBuilder::new("eoi");
    let (sink, got) = sinks::collect();
    // Keys 0..10, 7 items each; complete at 5 but max_items 4 flushes first.
    p.source(
        "in",
        sources::iter((0..70u64).map(|i| ((i % 10) as u32, i))),
    )
    .accumulate(
        "sum",
        CountSum::at(5),
        AccumulatorPolicy::default()
            .with_max_items(4)
            .with_partial_flush(true),
    )
    .sink("out", sink);
    let result = ExecutionEngine::new()
        .run(p.build().expect("valid"), ExecutionOptions::default())
        .await;
    assert!(result.success, "{:?}", result.error);
    checked(&result);
    let mut out = got.items();
    out.sort();
    assert_eq!(out.len(), 20);
    let counts: Vec<u64> = out.iter().map(|(_, n, _)| *n).collect();
    assert_eq!(counts.iter().filter(|n| **n == 4).count(), 10);
    assert_eq!(counts.iter().filter(|n| **n == 3).count(), 10);
    assert_eq!(
        out.iter().map(|(_, _, s)| s).sum::<u64>(),
        (0..70u64).sum::<u64>()
    );
    assert_eq!(result.accounting.absorbed, 50);
}

#[tokio::test]
async fn keys_changed_by_check_do_not_lose_state() {
    let items = || sources::iter((0..300u64).map(|i| ((i * 7 % 40) as u32, i)));
    let policy = AccumulatorPolicy::default().with_partial_flush(true);
    let run = |p: PipelineBuilder| async move {
        let result = ExecutionEngine::new()
            .run(p.build().expect("valid"), ExecutionOptions::default())
            .await;
        assert!(result.success, "{:?}", result.error);
        checked(&result);
    };
    let mut plain = PipelineBuilder::new("plain");
    let (sink, plain_out) = sinks::collect();
    plain
        .source("in", items())
        .accumulate("sum", CountSum::at(3), policy.clone())
        .sink("out", sink);
    run(plain).await;
    let mut scribbled = PipelineBuilder::new("scribbled");
    let (sink, scribbled_out) = sinks::collect();
    scribbled
        .source("in", items())
        .accumulate(
            "sum",
            CountSum {
                scribble: true,
                ..CountSum::at(3)
            },
            policy,
        )
        .sink("out", sink);
    run(scribbled).await;
    let mut expected = plain_out.items();
    let mut got = scribbled_out.items();
    // Complete outputs took the scribbled key; the end-of-input flush sees the real one.
    for out in [&mut expected, &mut got] {
        for o in out.iter_mut() {
            o.0 = o.0.min(u32::MAX - o.0);
        }
        out.sort();
    }
    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected);
}

#[tokio::test]
async fn end_of_input_without_partial_flush_discards() {
    let mut p = PipelineBuilder::new("eoi-discard");
    let (sink, got) = sinks::collect();
    p.source("in", sources::iter((0..10u64).map(|i| ((i % 4) as u32, i))))
        .accumulate("sum", CountSum::at(3), AccumulatorPolicy::default())
        .sink("out", sink);
    let result = ExecutionEngine::new()
        .run(p.build().expect("valid"), ExecutionOptions::default())
        .await;
    checked(&result);
    // Keys 0 and 1 have 3 items (complete); keys 2 and 3 have 2 (discarded).
    assert_eq!(got.len(), 2);
    let s = stage(&result, "sum");
    assert_eq!(s.counts.dropped.get("discarded_by_policy"), Some(&4));
}

#[tokio::test]
async fn parallel_workers_keep_each_key_on_one_worker() {
    let mut p = PipelineBuilder::new("par");
    let (sink, got) = sinks::collect();
    p.source(
        "in",
        sources::iter((0..10_000u64).map(|i| ((i % 100) as u32, i))),
    )
    .accumulate_with("sum", || CountSum::at(100), AccumulatorPolicy::default())
    .parallelism(ParallelismHint::Fixed(3))
    .sink("out", sink);
    let result = ExecutionEngine::new()
        .run(p.build().expect("valid"), ExecutionOptions::default())
        .await;
    assert!(result.success, "{:?}", result.error);
    checked(&result);
    let out = got.items();
    assert_eq!(out.len(), 100);
    assert!(out.iter().all(|(_, n, _)| *n == 100));
}

/// Outputs of [`run_sum`], sorted: key, items, sum, completeness header.
type Sums = Vec<(u32, u64, u64, String)>;

fn run_sum(items: Vec<(u32, u64)>, budget: MemoryBudget) -> (Sums, PipelineResult) {
    let policy = AccumulatorPolicy::default()
        .with_partial_flush(true)
        .with_spill(true);
    run_sum_with(futures::stream::iter(items), budget, policy)
}

/// [`run_sum`] of a stream, under `policy`.
fn run_sum_with(
    items: impl futures::Stream<Item = (u32, u64)> + Send + 'static,
    budget: MemoryBudget,
    policy: AccumulatorPolicy,
) -> (Sums, PipelineResult) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut p = PipelineBuilder::new("spill");
        let (sink, got) = sinks::collect();
        p.source("in", sources::stream(Box::pin(items)))
            .accumulate("sum", CountSum::at(4), policy)
            .sink("out", sink);
        let options = ExecutionOptions::default()
            .with_supervision(Supervision::Off)
            .with_batch_size(7)
            .with_memory_budget(budget);
        let result = ExecutionEngine::new()
            .run(p.build().expect("valid"), options)
            .await;
        let mut out: Vec<(u32, u64, u64, String)> = got
            .take()
            .into_iter()
            .map(|e| {
                let score = e.header("acc.completeness").unwrap_or("").to_owned();
                (e.payload.0, e.payload.1, e.payload.2, score)
            })
            .collect();
        out.sort();
        (out, result)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn spill_round_trips_exactly(items in prop::collection::vec((0u32..60, 0u64..1000), 1..400)) {
        let (unlimited, r1) = run_sum(items.clone(), MemoryBudget::unlimited());
        let (tiny, r2) = run_sum(items.clone(), MemoryBudget::new(256));
        // Segments of a block or two compacted below half live: compactions all along.
        let policy = AccumulatorPolicy::default()
            .with_partial_flush(true)
            .with_spill(true)
            .with_spill_segments(512, 0.5);
        let stream = futures::stream::iter(items);
        let (compacted, r3) = run_sum_with(stream, MemoryBudget::new(256), policy);
        prop_assert!(r1.success && r2.success && r3.success);
        prop_assert!(r1.accounting.reconciles() && r2.accounting.reconciles());
        prop_assert!(r3.accounting.reconciles());
        prop_assert!(r2.unbalanced_stages().is_empty() && r3.unbalanced_stages().is_empty());
        prop_assert_eq!(&unlimited, &tiny);
        prop_assert_eq!(unlimited, compacted);
    }
}

#[test]
fn tiny_budget_really_spills_and_reports_it() {
    let items: Vec<(u32, u64)> = (0..2000u64).map(|i| ((i % 500) as u32, i)).collect();
    let (out, result) = run_sum(items, MemoryBudget::new(1024));
    assert_eq!(out.len(), 500);
    let s = stage(&result, "sum");
    assert!(s.metrics["spill.spills"] > 0.0, "{:?}", s.metrics);
    assert!(s.metrics["spill.reloads"] > 0.0, "{:?}", s.metrics);
    assert!(s.metrics["spill.records"] > 0.0);
    assert!(s.metrics["spill.compression_ratio"] > 0.0);
}

/// Bytes in the files of `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("spill dir")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum()
}

/// Runs `items` under a tiny budget with 16 KiB spill segments compacted below
/// `compact_below` live records, sampling the spill files' size every 500 items: the
/// outputs, the result and the largest size seen.
fn run_compacting(items: Vec<(u32, u64)>, compact_below: f64) -> (Sums, PipelineResult, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (spill_dir, seen) = (dir.path().to_owned(), peak.clone());
    let probed =
        futures::stream::iter(items.into_iter().enumerate()).filter_map(move |(i, item)| {
            if i % 500 == 0 {
                seen.fetch_max(dir_bytes(&spill_dir), std::sync::atomic::Ordering::Relaxed);
            }
            async move { Some(item) }
        });
    let policy = AccumulatorPolicy::default()
        .with_partial_flush(true)
        .with_spill(true)
        .with_spill_dir(dir.path())
        .with_spill_segments(16 << 10, compact_below);
    let (out, result) = run_sum_with(probed, MemoryBudget::new(1024), policy);
    assert!(result.success, "{:?}", result.error);
    checked(&result);
    assert_eq!(dir_bytes(dir.path()), 0, "segments deleted at the end");
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed) as f64;
    (out, result, peak)
}

/// A long run under a tiny budget with small spill segments: every key is spilled and
/// reloaded several times, so the log writes far more than is ever live, and keys written
/// all along the run stay on disk to the end (no segment ever dies by itself). Compaction
/// keeps the files small while the run goes on, and the outputs are those of an unlimited
/// budget.
#[test]
fn spill_log_compacts_while_the_run_goes_on() {
    // 12 000 keys with 4 items each (complete at 4), each key's items 300 items apart; every
    // 100 items, a key with one item, flushed at the end of input.
    let window = 300u64;
    let items: Vec<(u32, u64)> = (0..48_000u64)
        .flat_map(|i| {
            let key = (i % window) + window * (i / (window * 4));
            let sleeper = (i % 100 == 0).then_some((1_000_000 + (i / 100) as u32, i));
            std::iter::once((key as u32, i)).chain(sleeper)
        })
        .collect();
    let (tiny, result, peak) = run_compacting(items.clone(), 0.25);
    let (unlimited, _) = run_sum(items.clone(), MemoryBudget::unlimited());
    assert_eq!(tiny.len(), 12_000 + 480);
    assert_eq!(tiny, unlimited);
    let m = &stage(&result, "sum").metrics;
    let stored = m["spill.stored_bytes"];
    assert!(m["spill.reloads"] > 36_000.0, "{m:?}");
    assert!(m["spill.compactions"] > 10.0, "{m:?}");
    assert!(m["spill.reclaimed_bytes"] > stored / 2.0, "{m:?}");
    assert!(peak > 0.0, "the spill files were sampled while in use");
    assert!(
        peak < stored / 4.0,
        "peak {peak} of {stored} bytes ever spilled"
    );
    assert!(m["spill.disk_bytes"] < stored / 4.0, "{m:?}");
    // Without compaction (only segments with no live record left are deleted), the files
    // grow with the input.
    let (_, uncompacted, peak_uncompacted) = run_compacting(items, 0.0);
    let m = &stage(&uncompacted, "sum").metrics;
    assert!(
        peak_uncompacted > 4.0 * peak,
        "{peak_uncompacted} vs {peak}"
    );
    assert!(m["spill.disk_bytes"] > stored / 2.0, "{m:?}");
}

/// A stream element that yields nothing: it gives the stage time to work through what came
/// before (200 ms), waits if need be until the spill files in `dir` hold data (at most a few
/// seconds more), then overwrites every one of them with garbage.
fn corrupt_spill_files(dir: std::path::PathBuf) -> impl futures::Stream<Item = (u32, u64)> {
    futures::stream::once(async move {
        let files = |dir: &std::path::Path| -> Vec<(std::path::PathBuf, u64)> {
            std::fs::read_dir(dir)
                .expect("spill dir")
                .map(|e| {
                    let path = e.expect("entry").path();
                    let len = std::fs::metadata(&path).expect("meta").len();
                    (path, len)
                })
                .collect()
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..500 {
            if files(&dir).iter().any(|(_, len)| *len > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let on_disk = files(&dir);
        assert!(
            on_disk.iter().any(|(_, len)| *len > 0),
            "nothing was spilled"
        );
        for (path, len) in on_disk {
            std::fs::write(&path, vec![0xAB; len as usize]).expect("overwrite");
        }
    })
    .filter_map(|()| async { None })
}

/// Runs `items` into a count-and-sum accumulator that spills to `spill_dir` under `budget`
/// bytes, dead-lettering errors; returns the result and the collected outputs.
async fn run_spilling(
    name: &str,
    items: impl futures::Stream<Item = (u32, u64)> + Send + 'static,
    spill_dir: &std::path::Path,
    budget: u64,
) -> (PipelineResult, Vec<(u32, u64, u64)>) {
    let mut p = PipelineBuilder::new(name);
    let (sink, got) = sinks::collect();
    p.source("in", sources::stream(Box::pin(items)))
        .accumulate(
            "sum",
            CountSum::at(2),
            AccumulatorPolicy::default()
                .with_partial_flush(true)
                .with_spill(true)
                .with_spill_dir(spill_dir),
        )
        .error_policy(ErrorPolicy::DeadLetter)
        .sink("out", sink);
    let options = ExecutionOptions::default()
        .with_batch_size(10)
        .with_memory_budget(MemoryBudget::new(budget));
    let result = ExecutionEngine::new()
        .run(p.build().expect("valid"), options)
        .await;
    assert!(result.success, "{:?}", result.error);
    checked(&result);
    (result, got.items())
}

#[tokio::test]
async fn corrupt_spill_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first: Vec<(u32, u64)> = (0..50u32).map(|k| (k, 1)).collect();
    let then: Vec<(u32, u64)> = (0..50u32).map(|k| (k, 2)).collect();
    // Between the two halves, once spill files hold data, overwrite them with garbage.
    let items = futures::stream::iter(first)
        .chain(corrupt_spill_files(dir.path().to_owned()))
        .chain(futures::stream::iter(then));
    let (result, got) = run_spilling("corrupt", items, dir.path(), 512).await;
    assert!(!result.dead_letters.is_empty());
    let text = &result.dead_letters[0].error;
    assert!(text.contains("corrupt spill record for key"), "{text}");
    assert!(text.contains("segment-"), "{text}");
    // Keys whose state was lost start again from the second item and are flushed at the end.
    assert_eq!(got.len(), 50);
}

/// Keys spilled under a tiny budget still expire on their TTL: their deadlines are kept apart
/// from the compact index of spilled keys, fire from the deadline queue, and the flushed
/// outputs say they were on disk.
#[tokio::test(start_paused = true)]
async fn spilled_keys_expire_on_their_ttl() {
    let first: Vec<(u32, u64)> = (0..40u32).map(|k| (k, u64::from(k))).collect();
    let then: Vec<(u32, u64)> = vec![(1000, 7)];
    let mut p = PipelineBuilder::new("ttl-spill");
    let (sink, got) = sinks::collect();
    p.source(
        "in",
        sources::stream(with_gap(first, Duration::from_secs(60), then)),
    )
    .accumulate(
        "sum",
        CountSum::at(4),
        AccumulatorPolicy::default()
            .with_completeness_ttl(Duration::from_secs(10))
            .with_partial_flush(true)
            .with_spill(true),
    )
    .sink("out", sink);
    let options = paused()
        .with_batch_size(5)
        .with_memory_budget(MemoryBudget::new(1024));
    let result = ExecutionEngine::new()
        .run(p.build().expect("valid"), options)
        .await;
    assert!(result.success, "{:?}", result.error);
    checked(&result);
    let s = stage(&result, "sum");
    assert!(s.metrics["spill.spills"] > 0.0, "{:?}", s.metrics);
    let out = got.take();
    assert_eq!(out.len(), 41);
    // The 40 first keys expired during the pause, before the late key (flushed at the end).
    let (expired, late) = out.split_at(40);
    let mut keys: Vec<u32> = expired.iter().map(|e| e.payload.0).collect();
    keys.sort_unstable();
    assert_eq!(keys, (0..40).collect::<Vec<_>>());
    assert!(expired.iter().all(|e| e.payload.1 == 1));
    assert!(
        expired
            .iter()
            .any(|e| e.header("acc.spilled") == Some("true")),
        "some expired keys were on disk"
    );
    assert_eq!(late[0].payload, (1000, 1, 7));
    assert_eq!(late[0].header("acc.spilled"), Some("false"));
}

#[tokio::test]
async fn spill_file_corrupted_before_the_final_flush_loses_only_spilled_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items: Vec<(u32, u64)> = (0..60u32).map(|k| (k, 1)).collect();
    // After the last item (and its spill round), overwrite the spill files; then the input
    // ends and the final flush reads the log.
    let stream = futures::stream::iter(items).chain(corrupt_spill_files(dir.path().to_owned()));
    let (result, got) = run_spilling("corrupt-at-close", stream, dir.path(), 1024).await;
    let spills = stage(&result, "sum").metrics["spill.spills"] as usize;
    assert!(spills > 0);
    // Every spilled key is lost (one dead letter each), every resident key is emitted.
    assert_eq!(result.dead_letters.len(), spills);
    assert_eq!(got.len() + spills, 60);
    let text = &result.dead_letters[0].error;
    assert!(text.starts_with("corrupt spill record for key"), "{text}");
    assert!(text.contains("segment-"), "{text}");
    assert_eq!(text.matches("corrupt").count(), 1, "{text}");
}
