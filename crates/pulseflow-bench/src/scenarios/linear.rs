//! `linear`: source of u64 -> map -> filter (keeps half) -> summing sink, through the public
//! builder API, against baselines doing the same work in the same process: a chain of tokio
//! mpsc channels sending one item per message, the same chain sending `Vec<u64>` batches of
//! 1024, a single task running the loop, and the batched chain carrying pulseflow's
//! `Envelope<u64>` (the same bytes per item as pulseflow moves, without its accounting).
//! A last contender carries column batches (payloads contiguous, metadata per batch plus a
//! survivor bitmap): the ceiling of a columnar data model, reported against the bare chain.
//! Outside Tokio, the same pipeline written with timely dataflow as its users write it
//! (`to_stream` -> `map` -> `filter` -> a summing `inspect_batch`), with one worker and with
//! as many workers as pulseflow's runtime has.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pulseflow::engine::Supervision;
use pulseflow::prelude::*;
use pulseflow::stage::WriteProgress;
use serde_json::json;
use tokio::sync::mpsc;

use crate::CommonOpts;
use crate::report::{Report, median, per_sec};

const BATCH: usize = 1024;
const CHANNEL_MESSAGES: usize = 1024;

#[inline]
fn work(x: u64) -> u64 {
    x.wrapping_mul(3)
}

#[inline]
fn keep(x: &u64) -> bool {
    x % 2 == 0
}

/// Sums what it receives and publishes the total when closed.
struct SumSink {
    sum: u64,
    out: Arc<AtomicU64>,
}

impl Sink for SumSink {
    type Item = u64;

    async fn write(&mut self, item: Envelope<u64>) -> Result<(), ItemFailure<u64>> {
        self.sum = self.sum.wrapping_add(item.payload);
        Ok(())
    }

    /// The whole batch in one loop, as a fast sink is written: each item is still counted as
    /// delivered and named as the one in progress.
    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<u64>>,
        _failed: &mut Vec<ItemFailure<u64>>,
        progress: &mut WriteProgress,
    ) {
        for item in items {
            progress.current_seq = item.seq;
            self.sum = self.sum.wrapping_add(item.payload);
            progress.delivered += 1;
        }
    }

    async fn close(&mut self) -> Result<(), StageError> {
        self.out.store(self.sum, Ordering::Relaxed);
        Ok(())
    }
}

async fn pulseflow_run(n: u64, opts: &CommonOpts) -> Result<(Duration, u64), String> {
    let total = Arc::new(AtomicU64::new(0));
    let mut p = PipelineBuilder::new("linear");
    p.source("numbers", sources::iter(0..n))
        .map("triple", work)
        .filter("even", keep)
        .sink(
            "sum",
            SumSink {
                sum: 0,
                out: total.clone(),
            },
        );
    let pipeline = p.build().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let result = ExecutionEngine::new()
        .run(
            pipeline,
            ExecutionOptions::default()
                .with_batch_size(opts.batch.unwrap_or(BATCH))
                .with_supervision(if opts.unsupervised {
                    Supervision::Off
                } else {
                    Supervision::Default
                }),
        )
        .await;
    let elapsed = started.elapsed();
    if !result.success || !result.accounting.reconciles() {
        return Err(format!("pulseflow run failed: {:?}", result.error));
    }
    Ok((elapsed, total.load(Ordering::Relaxed)))
}

async fn mpsc_per_item(n: u64) -> (Duration, u64) {
    let started = Instant::now();
    let (tx1, mut rx1) = mpsc::channel::<u64>(CHANNEL_MESSAGES);
    let (tx2, mut rx2) = mpsc::channel::<u64>(CHANNEL_MESSAGES);
    let (tx3, mut rx3) = mpsc::channel::<u64>(CHANNEL_MESSAGES);
    let source = tokio::spawn(async move {
        for x in 0..n {
            if tx1.send(x).await.is_err() {
                return;
            }
        }
    });
    let map = tokio::spawn(async move {
        while let Some(x) = rx1.recv().await {
            if tx2.send(work(x)).await.is_err() {
                return;
            }
        }
    });
    let filter = tokio::spawn(async move {
        while let Some(x) = rx2.recv().await {
            if keep(&x) && tx3.send(x).await.is_err() {
                return;
            }
        }
    });
    let sink = tokio::spawn(async move {
        let mut sum = 0u64;
        while let Some(x) = rx3.recv().await {
            sum = sum.wrapping_add(x);
        }
        sum
    });
    let _ = tokio::join!(source, map, filter);
    let sum = sink.await.unwrap_or_default();
    (started.elapsed(), sum)
}

/// A chain of tokio mpsc channels carrying `Vec<T>` batches of [`BATCH`]: a source building
/// each batch with `make`, a task applying `work` in place, one keeping what `keep` accepts
/// (`retain`), and a sink summing `value`.
///
/// The three functions are generic parameters, not function pointers, so each contender is
/// compiled (and vectorised) for its own item type, as a hand-written chain would be.
async fn mpsc_batched_chain<T, M, V, W>(n: u64, make: M, value: V, value_mut: W) -> (Duration, u64)
where
    T: Send + 'static,
    M: Fn(std::ops::Range<u64>) -> Vec<T> + Send + 'static,
    V: Fn(&T) -> u64 + Copy + Send + 'static,
    W: Fn(&mut T) -> &mut u64 + Send + 'static,
{
    let started = Instant::now();
    let cap = (CHANNEL_MESSAGES / BATCH * 8).max(8);
    let (tx1, mut rx1) = mpsc::channel::<Vec<T>>(cap);
    let (tx2, mut rx2) = mpsc::channel::<Vec<T>>(cap);
    let (tx3, mut rx3) = mpsc::channel::<Vec<T>>(cap);
    let source = tokio::spawn(async move {
        let mut x = 0;
        while x < n {
            let end = (x + BATCH as u64).min(n);
            if tx1.send(make(x..end)).await.is_err() {
                return;
            }
            x = end;
        }
    });
    let map = tokio::spawn(async move {
        while let Some(mut v) = rx1.recv().await {
            for item in &mut v {
                let x = value_mut(item);
                *x = work(*x);
            }
            if tx2.send(v).await.is_err() {
                return;
            }
        }
    });
    let filter = tokio::spawn(async move {
        while let Some(mut v) = rx2.recv().await {
            v.retain(|item| keep(&value(item)));
            if tx3.send(v).await.is_err() {
                return;
            }
        }
    });
    let sink = tokio::spawn(async move {
        let mut sum = 0u64;
        while let Some(v) = rx3.recv().await {
            for item in &v {
                sum = sum.wrapping_add(value(item));
            }
        }
        sum
    });
    let _ = tokio::join!(source, map, filter);
    let sum = sink.await.unwrap_or_default();
    (started.elapsed(), sum)
}

/// The batched chain carrying bare `u64`s.
async fn mpsc_batched(n: u64) -> (Duration, u64) {
    mpsc_batched_chain(n, |r| r.collect(), |x: &u64| *x, |x: &mut u64| x).await
}

/// The batched chain again, carrying pulseflow's own `Envelope<u64>` (sequence number,
/// timestamp, cost) instead of bare `u64`s: the same bytes per item as pulseflow moves, with
/// none of its accounting, policies or supervision.
async fn mpsc_batched_envelopes(n: u64) -> (Duration, u64) {
    mpsc_batched_chain(
        n,
        |r| {
            let now = pulseflow::envelope::now_millis();
            r.map(|v| Envelope::new(v).with_seq(v).with_timestamp(now))
                .collect()
        },
        |e: &Envelope<u64>| e.payload,
        |e: &mut Envelope<u64>| &mut e.payload,
    )
    .await
}

async fn single_task(n: u64) -> (Duration, u64) {
    let started = Instant::now();
    let sum = tokio::spawn(async move {
        let mut sum = 0u64;
        for x in 0..n {
            let y = work(std::hint::black_box(x));
            if keep(&y) {
                sum = sum.wrapping_add(y);
            }
        }
        sum
    })
    .await
    .unwrap_or_default();
    (started.elapsed(), sum)
}

/// The pipeline in timely dataflow, on `workers` worker threads: each worker streams its
/// share of `0..n` through `map` and `filter` into an `inspect_batch` that sums what it sees;
/// the workers' sums are added up once they are done. Returns the wall time including
/// starting and joining the worker threads (timely's own `execute`).
fn timely_run(n: u64, workers: usize) -> Result<(Duration, u64), String> {
    use std::cell::Cell;
    use std::rc::Rc;
    use timely::dataflow::operators::{Filter, Inspect, Map, ToStream};

    let config = if workers <= 1 {
        timely::Config::thread()
    } else {
        timely::Config::process(workers)
    };
    let started = Instant::now();
    let guards = timely::execute(config, move |worker| {
        let (index, peers) = (worker.index() as u64, worker.peers() as u64);
        let share = (n * index / peers)..(n * (index + 1) / peers);
        let sum = Rc::new(Cell::new(0u64));
        let total = sum.clone();
        worker.dataflow::<u64, _, _>(|scope| {
            share
                .to_stream(scope)
                .map(work)
                .filter(keep)
                .inspect_batch(move |_, xs| {
                    total.set(xs.iter().fold(total.get(), |s, x| s.wrapping_add(*x)));
                });
        });
        while worker.step() {}
        sum.get()
    })?;
    let mut sum = 0u64;
    for worker in guards.join() {
        sum = sum.wrapping_add(worker?);
    }
    Ok((started.elapsed(), sum))
}

/// Runs the scenario.
pub fn run(opts: &CommonOpts) -> Result<Report, Box<dyn std::error::Error>> {
    let n: u64 = if opts.quick { 2_000_000 } else { 10_000_000 };
    let rounds = 5;
    let workers: usize = std::env::var("PF_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(pulseflow::policy::cores())
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    let expected: u64 = (0..n).map(work).filter(keep).fold(0u64, u64::wrapping_add);
    let mut times: [Vec<Duration>; 8] = Default::default();
    if opts.profile {
        let took = rt.block_on(async {
            let mut took = Vec::new();
            for _ in 0..rounds {
                let (t, s) = pulseflow_run(n, opts).await?;
                check(s, expected, "pulseflow")?;
                took.push(t);
            }
            Ok::<_, String>(median(took))
        })?;
        let mut report = Report::new("linear (pulseflow only)", &["items/s"]);
        report.row(vec![per_sec(n as f64 / took.as_secs_f64())]);
        return Ok(report);
    }
    rt.block_on(async {
        for _ in 0..rounds {
            let (t, s) = pulseflow_run(n, opts).await?;
            check(s, expected, "pulseflow")?;
            times[0].push(t);
            let (t, s) = mpsc_per_item(n).await;
            check(s, expected, "mpsc per item")?;
            times[1].push(t);
            let (t, s) = mpsc_batched(n).await;
            check(s, expected, "mpsc batched")?;
            times[2].push(t);
            let (t, s) = single_task(n).await;
            check(s, expected, "single task")?;
            times[3].push(t);
            let (t, s) = mpsc_batched_envelopes(n).await;
            check(s, expected, "mpsc batched envelopes")?;
            times[4].push(t);
            let (t, s) = mpsc_batched_columns(n).await;
            check(s, expected, "mpsc batched columns")?;
            times[5].push(t);
            // timely runs on threads of its own; the Tokio workers are idle meanwhile.
            for (slot, threads) in [(6, 1), (7, workers)] {
                let (t, s) = timely_run(n, threads)?;
                check(s, expected, &format!("timely, {threads} workers"))?;
                times[slot].push(t);
            }
        }
        Ok::<(), String>(())
    })?;
    let rates: Vec<f64> = times
        .into_iter()
        .map(|t| n as f64 / median(t).as_secs_f64())
        .collect();
    let timely_many = format!("timely dataflow, {workers} workers");
    let names = [
        "pulseflow (builder, envelopes, batches)",
        "tokio mpsc, one item per message",
        "tokio mpsc, Vec batches of 1024",
        "single task loop",
        "tokio mpsc, Vec<Envelope<u64>> batches of 1024",
        "tokio mpsc, column batches of 1024 (best case)",
        "timely dataflow, 1 worker",
        timely_many.as_str(),
    ];
    let mut report = Report::new(
        format!(
            "linear: {n} items, source -> map -> filter(1/2) -> sum, median of {rounds} rounds"
        ),
        &["contender", "items/s", "pulseflow ÷ this"],
    );
    for (name, rate) in names.iter().zip(&rates) {
        report.row(vec![
            (*name).to_owned(),
            per_sec(*rate),
            format!("{:.2}", rates[0] / rate),
        ]);
    }
    report.note(format!(
        "runtime: tokio multi-thread, {workers} workers; ratios are pulseflow's items/s over each contender's"
    ));
    let best_timely = rates[6].max(rates[7]);
    report.summary(json!({
        "scenario": "linear",
        "items": n,
        "rounds": rounds,
        "items_per_sec": rates[0].round(),
        "vs_mpsc_per_item": round2(rates[0] / rates[1]),
        "vs_mpsc_batched": round2(rates[0] / rates[2]),
        "vs_single_task": round2(rates[0] / rates[3]),
        "vs_mpsc_batched_envelopes": round2(rates[0] / rates[4]),
        "vs_mpsc_batched_columns": round2(rates[0] / rates[5]),
        "columns_vs_mpsc_batched": round2(rates[5] / rates[2]),
        "vs_timely": round2(rates[0] / best_timely),
        "timely_1_worker_items_per_sec": rates[6].round(),
        "timely_workers_items_per_sec": rates[7].round(),
        "timely_workers": workers,
        "cores": pulseflow::policy::cores(),
    }));
    Ok(report)
}

fn check(got: u64, expected: u64, who: &str) -> Result<(), String> {
    if got == expected {
        Ok(())
    } else {
        Err(format!("{who} computed {got}, expected {expected}"))
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A batch laid out in columns, the most favourable layout that still carries every item's
/// metadata: payloads contiguous, sequence numbers as the batch's first one plus a bitmap of
/// the survivors of a filter, one timestamp and one cost for the whole batch.
struct ColumnBatch {
    payloads: Vec<u64>,
    first_seq: u64,
    survivors: Option<Vec<u64>>,
    timestamp: i64,
    cost: u32,
}

/// The batched chain carrying [`ColumnBatch`]es: an upper bound for a columnar data model.
/// `map` is the same in-place loop as the bare chain's; `filter` compacts the payloads and
/// records the survivors in a bitmap; the sink sums the payload column and reads the
/// metadata once per batch (no per-item envelope is ever built), so this is the best case.
async fn mpsc_batched_columns(n: u64) -> (Duration, u64) {
    let started = Instant::now();
    let cap = (CHANNEL_MESSAGES / BATCH * 8).max(8);
    let (tx1, mut rx1) = mpsc::channel::<ColumnBatch>(cap);
    let (tx2, mut rx2) = mpsc::channel::<ColumnBatch>(cap);
    let (tx3, mut rx3) = mpsc::channel::<ColumnBatch>(cap);
    let source = tokio::spawn(async move {
        let mut x = 0;
        while x < n {
            let end = (x + BATCH as u64).min(n);
            let batch = ColumnBatch {
                payloads: (x..end).collect(),
                first_seq: x,
                survivors: None,
                timestamp: pulseflow::envelope::now_millis(),
                cost: 8,
            };
            if tx1.send(batch).await.is_err() {
                return;
            }
            x = end;
        }
    });
    let map = tokio::spawn(async move {
        while let Some(mut batch) = rx1.recv().await {
            for x in &mut batch.payloads {
                *x = work(*x);
            }
            if tx2.send(batch).await.is_err() {
                return;
            }
        }
    });
    let filter = tokio::spawn(async move {
        while let Some(mut batch) = rx2.recv().await {
            let len = batch.payloads.len();
            let mut bits = vec![0u64; len.div_ceil(64)];
            let payloads = &mut batch.payloads;
            let mut kept = 0;
            for i in 0..len {
                let x = payloads[i];
                let k = keep(&x);
                payloads[kept] = x;
                kept += usize::from(k);
                bits[i / 64] |= u64::from(k) << (i % 64);
            }
            payloads.truncate(kept);
            batch.survivors = Some(bits);
            if tx3.send(batch).await.is_err() {
                return;
            }
        }
    });
    let sink = tokio::spawn(async move {
        let mut sum = 0u64;
        let mut metadata = 0u64;
        while let Some(batch) = rx3.recv().await {
            let survivors = batch.survivors.as_ref().map_or(0, Vec::len) as u64;
            metadata = metadata
                .wrapping_add(batch.first_seq + survivors + u64::from(batch.cost))
                .wrapping_add(batch.timestamp as u64);
            for x in &batch.payloads {
                sum = sum.wrapping_add(*x);
            }
        }
        std::hint::black_box(metadata);
        sum
    });
    let _ = tokio::join!(source, map, filter);
    let sum = sink.await.unwrap_or_default();
    (started.elapsed(), sum)
}
