//! Live sources: a partial batch leaves the source at most `batch_timeout` after its first
//! item, an idle source is not polled in a loop, and a ready source still fills whole batches.
//! All on Tokio's paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pulseflow::engine::Supervision;
use pulseflow::prelude::*;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A source like a line reader: it takes what its channel holds and waits for more until the
/// batch is full (or the channel closes). It counts its `produce` calls.
struct Live {
    rx: mpsc::UnboundedReceiver<u64>,
    calls: Arc<AtomicUsize>,
}

impl Source for Live {
    type Item = u64;

    async fn produce(&mut self, out: &mut SourceOutput<u64>) -> Result<SourceStatus, StageError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        while !out.is_full() {
            // Cancel-safe: `recv` loses nothing when its future is dropped.
            match self.rx.recv().await {
                Some(n) => out.push(n),
                None => return Ok(SourceStatus::Done),
            }
        }
        Ok(SourceStatus::More)
    }
}

/// A running pipeline `Live` -> recording sink.
type Running = (
    // Feeds the source.
    mpsc::UnboundedSender<u64>,
    // Each item the sink got, with when (paused-clock time since `start`).
    mpsc::UnboundedReceiver<(u64, Duration)>,
    // The source's `produce` calls.
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<PipelineResult>,
);

/// Starts a pipeline `Live` -> sink recording when each item arrived, on the current runtime.
fn start(timeout: Duration, start: Instant) -> Running {
    let (tx, rx) = mpsc::unbounded_channel();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut p = PipelineBuilder::new("live");
    p.source(
        "live",
        Live {
            rx,
            calls: calls.clone(),
        },
    )
    .sink(
        "seen",
        sink_fn(move |n: u64| {
            let _ = seen_tx.send((n, start.elapsed()));
        }),
    );
    let pipeline = p.build().expect("valid");
    let options = ExecutionOptions::default()
        .with_supervision(Supervision::Off)
        .with_batch_size(1024)
        .with_batch_timeout(timeout);
    let engine = ExecutionEngine::new();
    let run = tokio::spawn(async move { engine.run(pipeline, options).await });
    (tx, seen_rx, calls, run)
}

#[tokio::test(start_paused = true)]
async fn a_partial_batch_leaves_within_the_timeout_while_the_input_stays_open() {
    let t0 = Instant::now();
    let (tx, mut seen, _calls, run) = start(Duration::from_millis(10), t0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    tx.send(1).expect("source alive");
    // (Paused clock: without the timeout the item would wait for a full batch for ever, and
    // this `timeout` would fail the test at once.)
    let (item, at) = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .expect("delivered while the input is open")
        .expect("sink alive");
    assert_eq!(item, 1);
    assert!(
        at >= Duration::from_secs(1) && at <= Duration::from_millis(1010),
        "arrived at {at:?}"
    );
    // Items that trickle in come out one timeout after the first of their batch.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tx.send(2).expect("source alive");
    tokio::time::sleep(Duration::from_millis(4)).await;
    tx.send(3).expect("source alive");
    let (_, second) = seen.recv().await.expect("item 2");
    let (_, third) = seen.recv().await.expect("item 3");
    assert_eq!(second, third, "2 and 3 leave in one batch");
    let since = second - at;
    assert!(
        since >= Duration::from_millis(1010) && since <= Duration::from_millis(1020),
        "the batch left {since:?} after the first"
    );
    drop(tx);
    let result = run.await.expect("run");
    assert!(result.success);
    assert_eq!(result.accounting.delivered, 3);
}

#[tokio::test(start_paused = true)]
async fn an_idle_source_is_not_polled_in_a_loop() {
    let (tx, _seen, calls, run) = start(Duration::from_millis(10), Instant::now());
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        calls.load(Ordering::Relaxed),
        1,
        "one call, waiting for its first item"
    );
    drop(tx);
    assert!(run.await.expect("run").success);
}

#[tokio::test(start_paused = true)]
async fn ready_input_still_fills_whole_batches() {
    let (tx, mut seen, calls, run) = start(Duration::from_millis(10), Instant::now());
    for n in 0..3000 {
        tx.send(n).expect("source alive");
    }
    drop(tx);
    let mut times = Vec::new();
    while let Some((_, at)) = seen.recv().await {
        times.push(at);
    }
    assert_eq!(times.len(), 3000);
    // Everything was ready: no batch waited for the timeout, and there were three calls (two
    // full batches and the rest, cut by the end of input).
    assert!(
        times.iter().all(|t| *t < Duration::from_millis(10)),
        "{:?}",
        times.last()
    );
    assert_eq!(calls.load(Ordering::Relaxed), 3);
    assert!(run.await.expect("run").success);
}
