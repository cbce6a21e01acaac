//! Taps on the items leaving a stage of a running pipeline.

use std::sync::Arc;

use parking_lot::Mutex;
use pulseflow::engine::{Supervision, Tap, TapBatch, TapHandle};
use pulseflow::prelude::*;

/// A pipeline fed by a channel: `numbers` -> `double` -> `out`.
fn pipeline() -> (Pipeline, tokio::sync::mpsc::Sender<u32>) {
    let (tx, rx) = tokio::sync::mpsc::channel::<u32>(16);
    let items = Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|x| (x, rx))
    }));
    let mut p = PipelineBuilder::new("tapped");
    p.source("numbers", sources::stream(items))
        .map("double", |x: u32| x * 2)
        .sink("out", sinks::sink_fn(|_: u32| {}));
    (p.build().expect("valid"), tx)
}

fn collecting() -> (Tap, Arc<Mutex<Vec<u32>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let tap: Tap = Arc::new(move |batch: &TapBatch<'_>| {
        // Another type than the stage's output is not offered.
        assert!(batch.items::<String>().is_none());
        if let Some(items) = batch.items::<u32>() {
            kept.lock().extend(items.iter().map(|e| e.payload));
        }
    });
    (tap, seen)
}

/// Starts [`pipeline`] (batches of 4): the engine, the source's feed, the run.
fn start() -> (
    ExecutionEngine,
    tokio::sync::mpsc::Sender<u32>,
    tokio::task::JoinHandle<PipelineResult>,
) {
    let engine = ExecutionEngine::new();
    let (pipeline, tx) = pipeline();
    let options = ExecutionOptions::default()
        .with_batch_size(4)
        .with_supervision(Supervision::Off);
    let running = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.run(pipeline, options).await })
    };
    (engine, tx, running)
}

/// Attaches `tap` to `stage` once the run has started.
async fn attach(engine: &ExecutionEngine, stage: &str, tap: &Tap) -> TapHandle {
    loop {
        if let Some(h) = engine.tap(stage, tap.clone()) {
            return h;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_tap_sees_what_leaves_its_stage_until_it_is_dropped() {
    let (engine, tx, running) = start();
    let (tap, seen) = collecting();
    let handle = attach(&engine, "double", &tap).await;
    assert!(engine.tap("nowhere", tap.clone()).is_none());
    for x in 0..4 {
        tx.send(x).await.expect("send");
    }
    while seen.lock().len() < 4 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    drop(handle);
    for x in 4..8 {
        tx.send(x).await.expect("send");
    }
    drop(tx);
    let result = running.await.expect("run");
    assert!(result.success, "{:?}", result.error);
    assert_eq!(result.accounting.delivered, 8);
    assert_eq!(*seen.lock(), [0, 2, 4, 6]);
}

#[tokio::test(start_paused = true)]
async fn the_end_of_the_run_detaches_its_taps() {
    let (engine, tx, running) = start();
    let (tap, _) = collecting();
    let handle = attach(&engine, "out", &tap).await;
    drop(tx);
    running.await.expect("run");
    // Only this test's copy of the tap is left.
    assert_eq!(Arc::strong_count(&tap), 1);
    drop(handle);
}

/// Passes items on and, when closed, emits their sum.
struct Total(u32);

impl Transform for Total {
    type In = u32;
    type Out = u32;

    fn process(
        &mut self,
        item: Envelope<u32>,
        out: &mut Vec<Envelope<u32>>,
    ) -> Result<(), ItemFailure<u32>> {
        self.0 += item.payload;
        out.push(item);
        Ok(())
    }

    async fn close(&mut self, out: &mut Vec<Envelope<u32>>) -> Result<(), StageError> {
        out.push(Envelope::new(self.0));
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_tap_sees_what_a_transform_emits_when_closed() {
    let (tx, rx) = tokio::sync::mpsc::channel::<u32>(16);
    let items = Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|x| (x, rx))
    }));
    let mut p = PipelineBuilder::new("closing");
    p.source("numbers", sources::stream(items))
        .transform("total", Total(0))
        .sink("out", sinks::sink_fn(|_: u32| {}));
    let pipeline = p.build().expect("valid");
    let engine = ExecutionEngine::new();
    let running = {
        let engine = engine.clone();
        let options = ExecutionOptions::default().with_supervision(Supervision::Off);
        tokio::spawn(async move { engine.run(pipeline, options).await })
    };
    let (tap, seen) = collecting();
    let _handle = attach(&engine, "total", &tap).await;
    for x in 1..=4 {
        tx.send(x).await.expect("send");
    }
    drop(tx);
    let result = running.await.expect("run");
    assert!(result.success, "{:?}", result.error);
    assert_eq!(*seen.lock(), [1, 2, 3, 4, 10]);
}
