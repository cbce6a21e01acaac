//! End-to-end acknowledgements: an item's ack resolves once everything derived from it is
//! handled, and reports how (delivered, dropped, dead-lettered, failed).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pulseflow::accumulate::{Accumulator, AccumulatorPolicy, AccumulatorState, CompletenessResult};
use pulseflow::ack::{Ack, AckOutcome, AckReport};
use pulseflow::engine::Supervision;
use pulseflow::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Reports of resolved acks, by the item they were attached to.
type Reports = Arc<Mutex<Vec<(u32, AckReport)>>>;

/// A source of `items`, each with its own ack whose report lands in `reports`.
struct Acked {
    items: std::vec::IntoIter<u32>,
    reports: Reports,
}

impl Acked {
    fn new(items: impl IntoIterator<Item = u32>) -> (Self, Reports) {
        let reports = Reports::default();
        let items: Vec<u32> = items.into_iter().collect();
        (
            Self {
                items: items.into_iter(),
                reports: reports.clone(),
            },
            reports,
        )
    }
}

impl Source for Acked {
    type Item = u32;

    async fn produce(&mut self, out: &mut SourceOutput<u32>) -> Result<SourceStatus, StageError> {
        while !out.is_full() {
            let Some(n) = self.items.next() else {
                return Ok(SourceStatus::Done);
            };
            let reports = self.reports.clone();
            out.push_acked(n, Ack::on_resolved(move |r| reports.lock().push((n, r))));
        }
        Ok(SourceStatus::More)
    }
}

fn options() -> ExecutionOptions {
    ExecutionOptions::default()
        .with_supervision(Supervision::Off)
        .with_batch_size(16)
}

async fn run(p: PipelineBuilder) -> PipelineResult {
    let result = ExecutionEngine::new()
        .run(p.build().expect("valid"), options())
        .await;
    assert!(result.accounting.reconciles(), "{:?}", result.accounting);
    result
}

/// The reports in item order.
fn sorted(reports: &Reports) -> Vec<(u32, AckReport)> {
    let mut r = reports.lock().clone();
    r.sort_by_key(|(n, _)| *n);
    r
}

fn outcomes(reports: &Reports) -> Vec<(u32, AckOutcome)> {
    sorted(reports)
        .into_iter()
        .map(|(n, r)| (n, r.outcome()))
        .collect()
}

#[tokio::test]
async fn delivered_filtered_and_fanned_out_items_resolve_delivered() {
    let (src, reports) = Acked::new(0..40);
    let mut p = PipelineBuilder::new("fan");
    let kept = p.source("src", src).filter("odd", |n: &u32| n % 2 == 1);
    let mut b = kept.branch(
        "copies",
        Routes::new()
            .route("a", |_: &u32| true)
            .route("b", |n: &u32| n % 3 == 0),
    );
    let (a, b2) = (b.take("a").expect("a"), b.take("b").expect("b"));
    a.sink("sa", sink_fn(|_n: u32| {}));
    b2.sink("sb", sink_fn(|_n: u32| {}));
    let result = run(p).await;
    assert!(result.success);
    let reports = sorted(&reports);
    assert_eq!(reports.len(), 40, "every ack resolved once");
    for (n, r) in reports {
        assert_eq!(r.outcome(), AckOutcome::Delivered, "item {n}");
        let copies = match (n % 2, n % 3) {
            (0, _) => 0, // filtered
            (_, 0) => 2, // both branches
            _ => 1,
        };
        assert_eq!(r.delivered, copies, "item {n}");
    }
}

#[tokio::test]
async fn error_policies_report_dead_lettered_dropped_and_failed() {
    for (policy, expected) in [
        (ErrorPolicy::DeadLetter, AckOutcome::DeadLettered),
        (ErrorPolicy::Ignore, AckOutcome::Dropped),
        (
            ErrorPolicy::retry(2, Duration::from_millis(1)),
            AckOutcome::DeadLettered,
        ),
        (ErrorPolicy::Fail, AckOutcome::Failed),
    ] {
        let (src, reports) = Acked::new(0..10);
        let mut p = PipelineBuilder::new("errors");
        p.source("src", src)
            .try_map(
                "check",
                |n: &u32| if *n == 4 { Err("four") } else { Ok(*n) },
            )
            .error_policy(policy)
            .sink("out", sink_fn(|_n: u32| {}));
        let result = run(p).await;
        let got = outcomes(&reports);
        assert!(got.contains(&(4, expected)), "{policy:?}: {got:?}");
        if policy != ErrorPolicy::Fail {
            assert!(result.success);
            assert_eq!(got.len(), 10);
            assert!(
                got.iter()
                    .all(|(n, o)| *n == 4 || *o == AckOutcome::Delivered),
                "{policy:?}: {got:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_full_buffer_that_drops_reports_dropped() {
    let (src, reports) = Acked::new(0..200);
    let mut p = PipelineBuilder::new("drops");
    p.source("src", src)
        // Batches of 16 into a buffer of 4: what does not fit is dropped.
        .sink("out", sink_fn(|_n: u32| {}))
        .buffer(BufferPolicy::new(4, DropPolicy::DropNewest));
    let result = run(p).await;
    let dropped = result.accounting.dropped;
    assert!(dropped > 0, "the buffer overflowed");
    let got = sorted(&reports);
    assert_eq!(got.len(), 200);
    let reported: u64 = got.iter().map(|(_, r)| r.dropped).sum();
    assert_eq!(reported, dropped);
    let delivered: u64 = got.iter().map(|(_, r)| r.delivered).sum();
    assert_eq!(delivered, result.accounting.delivered);
}

/// Counts a key's items; complete at `needed`.
struct CountTo {
    needed: u64,
}

#[derive(Serialize, Deserialize)]
struct Count(u64);

impl Accumulator for CountTo {
    type In = u32;
    type Out = (u32, u64);
    type Key = u32;
    type State = Count;

    fn key(&self, item: &Envelope<u32>) -> u32 {
        item.payload % 10
    }

    fn create(&mut self, _key: &u32) -> Count {
        Count(0)
    }

    fn update(&mut self, state: &mut Count, _item: Envelope<u32>) {
        state.0 += 1;
    }

    fn check(&mut self, a: &mut AccumulatorState<u32, Count>) -> CompletenessResult<(u32, u64)> {
        if a.state.0 >= self.needed {
            CompletenessResult::Complete((a.key, a.state.0))
        } else {
            CompletenessResult::Incomplete
        }
    }

    fn flush(&mut self, a: AccumulatorState<u32, Count>) -> Option<(u32, u64)> {
        Some((a.key, a.state.0))
    }
}

#[tokio::test(start_paused = true)]
async fn an_accumulator_holds_acks_until_its_output_is_delivered() {
    struct Fed(mpsc::UnboundedReceiver<(u32, Ack)>);
    impl Source for Fed {
        type Item = u32;
        async fn produce(
            &mut self,
            out: &mut SourceOutput<u32>,
        ) -> Result<SourceStatus, StageError> {
            while !out.is_full() {
                match self.0.recv().await {
                    Some((n, ack)) => out.push_acked(n, ack),
                    None => return Ok(SourceStatus::Done),
                }
            }
            Ok(SourceStatus::More)
        }
    }
    let (feed, feed_rx) = mpsc::unbounded_channel();
    let mut p = PipelineBuilder::new("held");
    p.source("src", Fed(feed_rx))
        .accumulate("count", CountTo { needed: 2 }, AccumulatorPolicy::default())
        .sink("out", sink_fn(move |_o: (u32, u64)| {}));
    let engine = ExecutionEngine::new();
    let pipeline = p.build().expect("valid");
    let run = tokio::spawn(async move { engine.run(pipeline, options()).await });
    let (first, mut first_receipt) = Ack::new();
    feed.send((1, first)).expect("open");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        futures::FutureExt::now_or_never(&mut first_receipt).is_none(),
        "the key is not complete: its item's ack waits"
    );
    let (second, second_receipt) = Ack::new();
    feed.send((11, second)).expect("open");
    let first = first_receipt.await;
    let second = second_receipt.await;
    assert_eq!(first.outcome(), AckOutcome::Delivered);
    assert_eq!(
        (first.delivered, second.delivered),
        (1, 1),
        "the output carried both"
    );
    // A key left incomplete at the end, without partial flush: its items are dropped.
    let (third, third_receipt) = Ack::new();
    feed.send((3, third)).expect("open");
    drop(feed);
    let result = run.await.expect("run");
    assert!(result.success);
    let third = third_receipt.await;
    assert_eq!(third.outcome(), AckOutcome::Dropped);
}

/// A sink whose flush fails: what it wrote since its last flush was never delivered.
struct FailingFlush;

impl Sink for FailingFlush {
    type Item = u32;

    async fn write(&mut self, _item: Envelope<u32>) -> Result<(), ItemFailure<u32>> {
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), StageError> {
        Err(StageError::msg("disk full"))
    }
}

#[tokio::test]
async fn a_failed_flush_reports_failed_and_counts_nothing_delivered() {
    let (src, reports) = Acked::new(0..5);
    let mut p = PipelineBuilder::new("flush");
    p.source("src", src).sink("out", FailingFlush);
    let result = run(p).await;
    assert!(!result.success);
    assert_eq!(result.accounting.delivered, 0);
    let got = outcomes(&reports);
    assert_eq!(got.len(), 5);
    assert!(got.iter().all(|(_, o)| *o == AckOutcome::Failed), "{got:?}");
}

/// A sink that never finishes a write: whatever reaches it stays in flight.
struct Stuck;

impl Sink for Stuck {
    type Item = u32;

    async fn write(&mut self, _item: Envelope<u32>) -> Result<(), ItemFailure<u32>> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn an_aborted_run_reports_the_items_it_held_as_failed() {
    let (src, reports) = Acked::new(0..50);
    let mut p = PipelineBuilder::new("abort");
    p.source("src", src).sink("stuck", Stuck);
    let engine = ExecutionEngine::new();
    let pipeline = p.build().expect("valid");
    let runner = engine.clone();
    let run = tokio::spawn(async move { runner.run(pipeline, options()).await });
    // Every item is in the run (in the sink's write or queued before it) when it is aborted.
    while engine.inspect("src").is_none_or(|s| s.counts.emitted < 50) {
        tokio::task::yield_now().await;
    }
    engine.stop(Duration::ZERO).await;
    let result = run.await.expect("run");
    assert!(!result.success);
    assert_eq!(result.accounting.delivered, 0);
    let got = sorted(&reports);
    assert_eq!(got.len(), 50, "every item reported: {got:?}");
    assert!(
        got.iter().all(|(_, r)| r.outcome() == AckOutcome::Failed),
        "{got:?}"
    );
}
