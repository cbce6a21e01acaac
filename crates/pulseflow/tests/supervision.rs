//! Stages under Tokio-Pulse: a stage whose polls run long climbs the tiers, processes its
//! batches in small chunks at Yield, and `inspect`/the result show each stage's tier. The
//! supervisor runs on a manual poll clock, which the hog advances as if it burned CPU, so the
//! decisions are deterministic.

use std::time::Duration;

use pulseflow::engine::{Supervision, Tier};
use pulseflow::prelude::*;
use tokio_pulse::clock::PollClock;
use tokio_pulse::{Supervisor, SupervisorConfig, TierConfig};

fn supervisor(isolation: bool) -> (Supervisor, tokio_pulse::clock::ManualClock) {
    let (clock, mock) = PollClock::manual();
    let config = SupervisorConfig {
        tiers: TierConfig {
            isolation_enabled: isolation,
            ..TierConfig::default()
        },
        ..SupervisorConfig::default()
    };
    let supervisor = Supervisor::with_clock(config, clock).expect("supervisor");
    (supervisor, mock)
}

/// Runs `p` under `supervisor` in batches of 256 and checks that it succeeded and reconciles.
async fn run_in_batches_of_256(p: PipelineBuilder, supervisor: Supervisor) -> PipelineResult {
    let options = ExecutionOptions::default()
        .with_batch_size(256)
        .with_supervision(Supervision::With(supervisor));
    let r = ExecutionEngine::new()
        .run(p.build().expect("valid"), options)
        .await;
    assert!(r.success, "{:?}", r.error);
    assert!(r.accounting.reconciles());
    r
}

#[tokio::test]
async fn a_hogging_stage_yields_in_chunks_while_the_others_stay_monitored() {
    let (supervisor, mock) = supervisor(false);
    let mut p = PipelineBuilder::new("hog");
    let pieces = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let items = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    p.source("src", sources::iter(0u64..5120))
        .map("hog", move |x| {
            // Each item "costs" 2 ms of poll time on the supervisor's clock.
            mock.increment(Duration::from_millis(2));
            x
        })
        .sink(
            "out",
            HogSink {
                // The sink's own work is free: only the hog hogs.
                mock: None,
                flushes: Default::default(),
                items: items.clone(),
                pieces: pieces.clone(),
            },
        );
    let r = run_in_batches_of_256(p, supervisor).await;
    assert_eq!(items.load(std::sync::atomic::Ordering::Relaxed), 5120);
    let hog = r.stage("hog").expect("stage");
    assert_eq!(hog.tier, Some(Tier::Yield));
    // Twenty source batches of 256 (or fewer, if the edge hands several over at once): once
    // the hog is at Yield it works through them 64 items at a time and hands each chunk on, so
    // the sink is handed more pieces than there were batches. How soon it gets there varies
    // from run to run (the CPU sampler runs on real time), so the bound is only what chunking
    // alone explains. Its batch times are still one per batch.
    let pieces = pieces.load(std::sync::atomic::Ordering::Relaxed);
    assert!(pieces > 20, "{pieces} pieces");
    assert!(hog.metrics["batches"] <= 20.0, "{:?}", hog.metrics);
    assert_eq!(r.stage("out").and_then(|s| s.tier), Some(Tier::Monitor));
    assert_eq!(r.stage("src").and_then(|s| s.tier), Some(Tier::Monitor));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hogging_stage_is_isolated_and_still_delivers_everything() {
    let (supervisor, mock) = supervisor(true);
    let mut p = PipelineBuilder::new("isolated");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u64..20_000))
        .map("hog", move |x| {
            mock.increment(Duration::from_millis(2));
            x * 2
        })
        .sink("out", sink);
    let engine = ExecutionEngine::new();
    let options = ExecutionOptions::default().with_supervision(Supervision::With(supervisor));
    let r = engine.run(p.build().expect("valid"), options).await;
    assert!(r.success, "{:?}", r.error);
    assert!(r.accounting.reconciles());
    assert_eq!(got.len(), 20_000);
    // (The manual clock is shared: polls of other stages running at the same time as the hog
    // see its jumps too, so only the hog's tier is asserted here.)
    assert_eq!(r.stage("hog").and_then(|s| s.tier), Some(Tier::Isolate));
    let mut items = got.items();
    items.sort_unstable();
    assert_eq!(items, (0..20_000u64).map(|x| x * 2).collect::<Vec<_>>());
}

#[tokio::test]
async fn supervision_can_be_turned_off() {
    let mut p = PipelineBuilder::new("plain");
    p.source("src", sources::iter(0u8..10))
        .sink("out", sink_fn(|_x: u8| {}));
    let options = ExecutionOptions::default().with_supervision(Supervision::Off);
    let r = ExecutionEngine::new()
        .run(p.build().expect("valid"), options)
        .await;
    assert!(r.success);
    assert_eq!(r.stage("out").map(|s| s.tier), Some(None));
}

/// Burns `ms` milliseconds of this thread's CPU time.
fn burn_cpu(ms: u64) {
    let Some(clock) = tokio_pulse::clock::ThreadCpuClock::current() else {
        std::thread::sleep(Duration::from_millis(ms));
        return;
    };
    let start = clock.read_ns().unwrap_or(0);
    while clock.read_ns().unwrap_or(u64::MAX) < start + ms * 1_000_000 {
        std::hint::spin_loop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_isolation_a_cpu_hog_stops_at_yield_on_the_real_clocks() {
    let mut p = PipelineBuilder::new("no-isolation");
    let (sink, got) = sinks::collect();
    p.source("src", sources::iter(0u64..48))
        .map("hog", |x| {
            burn_cpu(3);
            x
        })
        .sink("out", sink);
    let options = ExecutionOptions::default()
        .with_batch_size(16)
        .with_supervision(Supervision::NoIsolation);
    let r = ExecutionEngine::new()
        .run(p.build().expect("valid"), options)
        .await;
    assert!(r.success, "{:?}", r.error);
    assert!(r.accounting.reconciles());
    assert_eq!(got.len(), 48);
    // Polls of 3 ms of CPU (and more): confirmed violations, so the hog climbs (to Yield on a
    // quiet machine; a busy one spaces the polls out and scores decay), never to Isolate.
    let tier = r.stage("hog").and_then(|s| s.tier);
    assert!(matches!(tier, Some(Tier::Warn | Tier::Yield)), "{tier:?}");
}

/// A source that "costs" 2 ms of the supervisor's clock per item.
struct HogSource {
    next: u64,
    end: u64,
    mock: tokio_pulse::clock::ManualClock,
}

impl Source for HogSource {
    type Item = u64;

    async fn produce(&mut self, out: &mut SourceOutput<u64>) -> Result<SourceStatus, StageError> {
        while !out.is_full() && self.next < self.end {
            self.mock.increment(Duration::from_millis(2));
            out.push(self.next);
            self.next += 1;
        }
        Ok(if self.next < self.end {
            SourceStatus::More
        } else {
            SourceStatus::Done
        })
    }
}

/// A sink that "costs" 2 ms per item (with a clock) and counts its flushes and the pieces
/// it is handed.
struct HogSink {
    mock: Option<tokio_pulse::clock::ManualClock>,
    flushes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    items: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pieces: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Sink for HogSink {
    type Item = u64;

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<u64>>,
        _failed: &mut Vec<ItemFailure<u64>>,
        progress: &mut pulseflow::stage::WriteProgress,
    ) {
        self.pieces
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for item in items {
            progress.current_seq = item.seq;
            let _ = self.write(item).await;
            progress.delivered += 1;
        }
    }

    async fn write(&mut self, _item: Envelope<u64>) -> Result<(), ItemFailure<u64>> {
        if let Some(mock) = &self.mock {
            mock.increment(Duration::from_millis(2));
        }
        self.items
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), StageError> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::test]
async fn a_source_at_yield_still_sends_whole_batches_and_a_sink_flushes_once_per_batch() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let (supervisor, mock) = supervisor(false);
    let flushes = Arc::new(AtomicU64::new(0));
    let items = Arc::new(AtomicU64::new(0));
    let pieces = Arc::new(AtomicU64::new(0));
    let mut p = PipelineBuilder::new("hogs");
    p.source(
        "src",
        HogSource {
            next: 0,
            end: 20_480,
            mock: mock.clone(),
        },
    )
    .sink(
        "out",
        HogSink {
            mock: Some(mock),
            flushes: flushes.clone(),
            items: items.clone(),
            pieces: pieces.clone(),
        },
    );
    let r = run_in_batches_of_256(p, supervisor).await;
    assert_eq!(items.load(Ordering::Relaxed), 20_480);
    // Both hogs reach Yield (the sink writes in chunks, below). Where each ends depends on how
    // much of the shared clock the other's polls used up between its last polls, which the
    // real-time busy slices decide: Yield, or Warn after one step of demotion.
    let hogging = |tier: Option<Tier>| matches!(tier, Some(Tier::Yield | Tier::Warn));
    let src = r.stage("src").and_then(|s| s.tier);
    assert!(hogging(src), "{src:?}");
    let out = r.stage("out").expect("stage");
    assert!(hogging(out.tier), "{:?}", out.tier);
    // Eighty batches of 256 items, whatever the tiers: the source filled each batch in steps
    // of 64, and the sink wrote each in chunks of 64 but flushed it once and counts it as one
    // batch.
    assert_eq!(flushes.load(Ordering::Relaxed), 80);
    assert_eq!(out.metrics["batches"], 80.0, "{:?}", out.metrics);
    assert!(pieces.load(Ordering::Relaxed) >= 160, "written in chunks");
}
