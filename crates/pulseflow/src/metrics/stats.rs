use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;

use crate::stage::StageKind;

/// Why items were dropped. Every drop has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Evicted from a full `DropOldest` buffer.
    DropOldest,
    /// Refused by a full `DropNewest` buffer.
    DropNewest,
    /// Failed in a stage whose error policy is `Ignore`.
    Ignored,
    /// Arrived at (or failed in) a stage that had already failed under policy `Fail`.
    StageFailed,
    /// The receiving side was gone (its stage ended early or the run was aborted).
    Closed,
    /// State discarded by a stage's policy (an accumulator key incomplete at the end of input
    /// or past its TTL, without partial flush).
    Discarded,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 6;

    /// All reasons, in counter order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::DropOldest,
        DropReason::DropNewest,
        DropReason::Ignored,
        DropReason::StageFailed,
        DropReason::Closed,
        DropReason::Discarded,
    ];

    /// The label used in metrics and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::DropOldest => "drop_oldest",
            DropReason::DropNewest => "drop_newest",
            DropReason::Ignored => "error_ignored",
            DropReason::StageFailed => "stage_failed",
            DropReason::Closed => "closed",
            DropReason::Discarded => "discarded_by_policy",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Lifecycle of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StageStatus {
    /// Wired, not started.
    Created = 0,
    /// Running `init`.
    Initializing = 1,
    /// Processing input.
    Running = 2,
    /// Input ended; closing.
    Closing = 3,
    /// Finished normally.
    Completed = 4,
    /// Failed (init error, or an item failed under policy `Fail`).
    Failed = 5,
    /// Stopped by an abort.
    Aborted = 6,
}

impl StageStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => StageStatus::Initializing,
            2 => StageStatus::Running,
            3 => StageStatus::Closing,
            4 => StageStatus::Completed,
            5 => StageStatus::Failed,
            6 => StageStatus::Aborted,
            _ => StageStatus::Created,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Created => "created",
            StageStatus::Initializing => "initializing",
            StageStatus::Running => "running",
            StageStatus::Closing => "closing",
            StageStatus::Completed => "completed",
            StageStatus::Failed => "failed",
            StageStatus::Aborted => "aborted",
        }
    }
}

/// Counts of one batch, added to a stage's counters at once.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub received: u64,
    pub ingested: u64,
    pub created: u64,
    pub emitted: u64,
    pub delivered: u64,
    pub filtered: u64,
    pub dead_lettered: u64,
    /// Items folded into an output together with others (an accumulator emits one output for
    /// many inputs: all but one of them are absorbed).
    pub absorbed: u64,
    pub errors: u64,
    pub retries: u64,
    pub dropped: [u64; DropReason::COUNT],
}

impl Tally {
    /// Records what one input item turned into, from the number of outputs it produced.
    #[inline]
    pub fn outputs(&mut self, produced: usize) {
        match produced {
            0 => self.filtered += 1,
            1 => {}
            n => self.created += n as u64 - 1,
        }
    }

    pub fn count_drop(&mut self, reason: DropReason, n: u64) {
        self.dropped[reason.index()] += n;
    }
}

/// Counters of one edge (a stage's input buffer).
#[derive(Debug, Default)]
pub(crate) struct EdgeStats {
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub dropped: [AtomicU64; DropReason::COUNT],
    pub depth: AtomicU64,
    pub peak_depth: AtomicU64,
    pub capacity: AtomicU64,
    /// Time senders spent waiting for room (nanoseconds, all senders).
    pub blocked_nanos: AtomicU64,
}

impl EdgeStats {
    pub fn count_drop(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped[reason.index()].fetch_add(n, Relaxed);
        }
    }

    /// Adds time a sender waited for room.
    pub fn add_blocked(&self, waited: Duration) {
        self.blocked_nanos
            .fetch_add(waited.as_nanos() as u64, Relaxed);
    }

    pub fn set_depth(&self, depth: u64) {
        self.depth.store(depth, Relaxed);
        self.peak_depth.fetch_max(depth, Relaxed);
    }

    #[cfg(test)]
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|d| d.load(Relaxed)).sum()
    }

    pub fn snapshot(&self, to: &str) -> EdgeSnapshot {
        EdgeSnapshot {
            to: to.to_owned(),
            sent: self.sent.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            dropped: collect_drops(&self.dropped),
            depth: self.depth.load(Relaxed),
            peak_depth: self.peak_depth.load(Relaxed),
            capacity: self.capacity.load(Relaxed),
        }
    }
}

fn collect_drops(counters: &[AtomicU64; DropReason::COUNT]) -> BTreeMap<&'static str, u64> {
    DropReason::ALL
        .iter()
        .filter_map(|r| {
            let n = counters[r.index()].load(Relaxed);
            (n > 0).then_some((r.as_str(), n))
        })
        .collect()
}

/// The counters of one stage, shared by its workers and read by `inspect`.
#[derive(Debug)]
pub(crate) struct StageStats {
    pub id: Arc<str>,
    pub kind: StageKind,
    status: AtomicU8,
    received: AtomicU64,
    ingested: AtomicU64,
    created: AtomicU64,
    emitted: AtomicU64,
    delivered: AtomicU64,
    filtered: AtomicU64,
    dead_lettered: AtomicU64,
    absorbed: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
    dropped: [AtomicU64; DropReason::COUNT],
    batches: AtomicU64,
    busy_nanos: AtomicU64,
    workers: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// The stage's input buffer, when it has one (fused and source stages do not).
    pub input: Mutex<Option<Arc<EdgeStats>>>,
    /// The stage's supervised tasks, and the CPU time of those already pruned.
    tasks: Mutex<Vec<tokio_pulse::JoinHandle<()>>>,
    pruned_cpu_nanos: AtomicU64,
    /// The stage's backpressure controller and circuit breaker, for their figures.
    #[allow(clippy::type_complexity)]
    flow: Mutex<(
        Option<Arc<dyn crate::flow::BackpressureController>>,
        Option<Arc<crate::flow::CircuitBreaker>>,
    )>,
    metrics: StageMetricHandles,
    /// Figures a stage kind publishes on its own (an accumulator's table and spill figures).
    extra_metrics: Mutex<Option<ExtraMetrics>>,
    /// Taps attached to the items the stage emits.
    pub taps: Arc<crate::engine::TapSlot>,
}

/// A source of further named figures for a stage's state.
#[derive(Clone)]
pub(crate) struct ExtraMetrics(pub Arc<dyn Fn() -> Vec<(String, f64)> + Send + Sync>);

impl std::fmt::Debug for ExtraMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraMetrics")
    }
}

#[derive(Debug)]
struct StageMetricHandles {
    items_in: metrics::Counter,
    items_out: metrics::Counter,
    filtered: metrics::Counter,
    errors: metrics::Counter,
    dead_lettered: metrics::Counter,
    dropped: [metrics::Counter; DropReason::COUNT],
    batch_seconds: metrics::Histogram,
    queue_depth: metrics::Gauge,
    /// Shares of time: busy, backpressured, idle.
    load: [metrics::Gauge; 3],
}

impl StageMetricHandles {
    fn noop() -> Self {
        Self {
            items_in: metrics::Counter::noop(),
            items_out: metrics::Counter::noop(),
            filtered: metrics::Counter::noop(),
            errors: metrics::Counter::noop(),
            dead_lettered: metrics::Counter::noop(),
            dropped: DropReason::ALL.map(|_| metrics::Counter::noop()),
            batch_seconds: metrics::Histogram::noop(),
            queue_depth: metrics::Gauge::noop(),
            load: [(); 3].map(|_| metrics::Gauge::noop()),
        }
    }

    fn new(pipeline: &str, stage: &str) -> Self {
        let labels = [
            ("pipeline", pipeline.to_owned()),
            ("stage", stage.to_owned()),
        ];
        let drop_counter = |reason: DropReason| {
            metrics::counter!(
                "pulseflow_items_dropped_total",
                &[
                    ("pipeline", pipeline.to_owned()),
                    ("stage", stage.to_owned()),
                    ("reason", reason.as_str().to_owned()),
                ]
            )
        };
        Self {
            items_in: metrics::counter!("pulseflow_items_in_total", &labels),
            items_out: metrics::counter!("pulseflow_items_out_total", &labels),
            filtered: metrics::counter!("pulseflow_items_filtered_total", &labels),
            errors: metrics::counter!("pulseflow_errors_total", &labels),
            dead_lettered: metrics::counter!("pulseflow_items_dead_lettered_total", &labels),
            dropped: DropReason::ALL.map(drop_counter),
            batch_seconds: metrics::histogram!("pulseflow_batch_duration_seconds", &labels),
            queue_depth: metrics::gauge!("pulseflow_queue_depth", &labels),
            load: ["busy", "backpressured", "idle"].map(|state| {
                metrics::gauge!(
                    "pulseflow_stage_time_ratio",
                    &[
                        ("pipeline", pipeline.to_owned()),
                        ("stage", stage.to_owned()),
                        ("state", state.to_owned()),
                    ]
                )
            }),
        }
    }
}

impl StageStats {
    pub fn new(pipeline: &str, id: Arc<str>, kind: StageKind, publish: bool) -> Self {
        Self {
            metrics: if publish {
                StageMetricHandles::new(pipeline, &id)
            } else {
                StageMetricHandles::noop()
            },
            id,
            kind,
            status: AtomicU8::new(StageStatus::Created as u8),
            received: AtomicU64::new(0),
            ingested: AtomicU64::new(0),
            created: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            absorbed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dropped: Default::default(),
            batches: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
            workers: AtomicU64::new(0),
            last_error: Mutex::new(None),
            input: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            pruned_cpu_nanos: AtomicU64::new(0),
            flow: Mutex::new((None, None)),
            extra_metrics: Mutex::new(None),
            taps: Arc::default(),
        }
    }

    /// Keeps a supervised task of this stage (for its tier, CPU time and abort).
    pub fn supervise(&self, task: tokio_pulse::JoinHandle<()>) {
        let mut tasks = self.tasks.lock();
        tasks.retain(|t| {
            if t.is_finished() {
                let cpu = t.stats().cpu_time.as_nanos() as u64;
                self.pruned_cpu_nanos.fetch_add(cpu, Relaxed);
                false
            } else {
                true
            }
        });
        tasks.push(task);
    }

    /// The highest Tokio-Pulse tier among the stage's running tasks (`None` when the stage
    /// is not supervised or none of its tasks runs).
    pub fn tier(&self) -> Option<tokio_pulse::Tier> {
        self.tasks
            .lock()
            .iter()
            .filter(|t| !t.is_finished())
            .map(tokio_pulse::JoinHandle::tier)
            .max()
    }

    /// The highest tier any of the stage's tasks is in, finished or not.
    fn tier_reached(&self) -> Option<tokio_pulse::Tier> {
        self.tasks.lock().iter().map(|t| t.stats().tier).max()
    }

    /// CPU time charged to the stage's tasks by sampling.
    pub fn cpu_time(&self) -> Duration {
        let live: u64 = self
            .tasks
            .lock()
            .iter()
            .map(|t| t.stats().cpu_time.as_nanos() as u64)
            .sum();
        Duration::from_nanos(live + self.pruned_cpu_nanos.load(Relaxed))
    }

    pub fn abort_tasks(&self) {
        for t in self.tasks.lock().iter() {
            t.abort();
        }
    }

    pub fn status(&self) -> StageStatus {
        StageStatus::from_u8(self.status.load(Relaxed))
    }

    pub fn set_status(&self, status: StageStatus) {
        // A failed or aborted stage stays so.
        let _ = self.status.fetch_update(Relaxed, Relaxed, |cur| {
            let cur = StageStatus::from_u8(cur);
            match cur {
                StageStatus::Failed | StageStatus::Aborted => None,
                _ => Some(status as u8),
            }
        });
    }

    pub fn record_error(&self, message: String) {
        *self.last_error.lock() = Some(message);
    }

    /// Errors raised so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Relaxed)
    }

    /// Items waiting in the stage's input buffer.
    pub fn input_depth(&self) -> u64 {
        self.input
            .lock()
            .as_ref()
            .map_or(0, |e| e.depth.load(Relaxed))
    }

    /// Attaches the stage's flow control, whose figures then show in its state.
    pub fn set_flow_control(
        &self,
        controller: Option<Arc<dyn crate::flow::BackpressureController>>,
        breaker: Option<Arc<crate::flow::CircuitBreaker>>,
    ) {
        *self.flow.lock() = (controller, breaker);
    }

    /// Adds figures of the stage's own to its state.
    pub fn set_extra_metrics(&self, figures: ExtraMetrics) {
        *self.extra_metrics.lock() = Some(figures);
    }

    pub fn worker_started(&self) {
        self.workers.fetch_add(1, Relaxed);
    }

    pub fn worker_stopped(&self) {
        self.workers.fetch_sub(1, Relaxed);
    }

    pub fn workers(&self) -> u64 {
        self.workers.load(Relaxed)
    }

    /// Adds one batch's counts; `busy` is the time spent processing it.
    pub fn add(&self, t: &Tally, busy: Option<Duration>) {
        let m = &self.metrics;
        macro_rules! bump {
            ($field:ident, $value:expr) => {
                if $value > 0 {
                    self.$field.fetch_add($value, Relaxed);
                }
            };
        }
        bump!(received, t.received);
        bump!(ingested, t.ingested);
        bump!(created, t.created);
        bump!(emitted, t.emitted);
        bump!(delivered, t.delivered);
        bump!(filtered, t.filtered);
        bump!(dead_lettered, t.dead_lettered);
        bump!(absorbed, t.absorbed);
        bump!(errors, t.errors);
        bump!(retries, t.retries);
        for (i, n) in t.dropped.iter().enumerate() {
            if *n > 0 {
                self.dropped[i].fetch_add(*n, Relaxed);
                m.dropped[i].increment(*n);
            }
        }
        m.items_in.increment(t.received + t.ingested);
        m.items_out.increment(t.emitted + t.delivered);
        if t.filtered > 0 {
            m.filtered.increment(t.filtered);
        }
        if t.errors > 0 {
            m.errors.increment(t.errors);
        }
        if t.dead_lettered > 0 {
            m.dead_lettered.increment(t.dead_lettered);
        }
        if let Some(busy) = busy {
            self.add_batch_time(busy);
        }
        if let Some(input) = self.input.lock().as_ref() {
            m.queue_depth.set(input.depth.load(Relaxed) as f64);
        }
    }

    /// Processing time so far, all workers (nanoseconds).
    pub fn busy_nanos(&self) -> u64 {
        self.busy_nanos.load(Relaxed)
    }

    /// Publishes the stage's shares of time.
    pub fn publish_load(&self, load: &super::Load) {
        let [busy, backpressured, idle] = &self.metrics.load;
        busy.set(load.busy);
        backpressured.set(load.backpressured);
        idle.set(load.idle);
    }

    /// Records one batch's processing time (for a batch handled in pieces, their sum).
    pub fn add_batch_time(&self, busy: Duration) {
        self.batches.fetch_add(1, Relaxed);
        self.busy_nanos.fetch_add(busy.as_nanos() as u64, Relaxed);
        self.metrics.batch_seconds.record(busy.as_secs_f64());
    }

    pub fn snapshot(&self, outputs: Vec<EdgeSnapshot>) -> StageRuntimeState {
        let input = self.input.lock().clone();
        let input_depth = input.as_ref().map_or(0, |e| e.depth.load(Relaxed));
        let output_depth = outputs.iter().map(|e| e.depth).sum();
        let batches = self.batches.load(Relaxed);
        let busy = self.busy_nanos.load(Relaxed);
        let mut metrics = BTreeMap::new();
        metrics.insert("batches".to_owned(), batches as f64);
        metrics.insert(
            "avg_batch_micros".to_owned(),
            if batches > 0 {
                busy as f64 / batches as f64 / 1000.0
            } else {
                0.0
            },
        );
        metrics.insert("workers".to_owned(), self.workers() as f64);
        if let Some(edge) = &input {
            // The stage's buffer: a `Bounded` strategy's figures.
            let capacity = edge.capacity.load(Relaxed).max(1) as f64;
            let dropped: u64 = edge.dropped.iter().map(|d| d.load(Relaxed)).sum();
            metrics.insert("buffer.dropped_count".to_owned(), dropped as f64);
            metrics.insert(
                "buffer.utilization".to_owned(),
                input_depth as f64 / capacity,
            );
            metrics.insert(
                "buffer.peak_utilization".to_owned(),
                edge.peak_depth.load(Relaxed) as f64 / capacity,
            );
        }
        let (controller, breaker) = self.flow.lock().clone();
        if let Some(c) = controller {
            for (name, value) in c.metrics() {
                metrics.insert(format!("backpressure.{name}"), value);
            }
        }
        if let Some(b) = breaker {
            for (name, value) in b.metrics() {
                metrics.insert(format!("breaker.{name}"), value);
            }
        }
        if let Some(extra) = self.extra_metrics.lock().clone() {
            metrics.extend((extra.0)());
        }
        StageRuntimeState {
            stage_id: self.id.to_string(),
            kind: self.kind,
            status: self.status(),
            input_queue_depth: input_depth,
            output_queue_depth: output_depth,
            processed: self.received.load(Relaxed) + self.ingested.load(Relaxed),
            errors: self.errors.load(Relaxed),
            last_error: self.last_error.lock().clone(),
            counts: StageMetrics {
                received: self.received.load(Relaxed),
                ingested: self.ingested.load(Relaxed),
                created: self.created.load(Relaxed),
                emitted: self.emitted.load(Relaxed),
                delivered: self.delivered.load(Relaxed),
                filtered: self.filtered.load(Relaxed),
                dead_lettered: self.dead_lettered.load(Relaxed),
                absorbed: self.absorbed.load(Relaxed),
                retries: self.retries.load(Relaxed),
                dropped: collect_drops(&self.dropped),
            },
            input: input.map(|e| e.snapshot(&self.id)),
            outputs,
            metrics,
            tier: self.tier().or_else(|| self.tier_reached()),
            cpu_time: self.cpu_time(),
            load: None,
            bottleneck: false,
        }
    }
}

/// The counters of one stage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageMetrics {
    /// Items received from upstream.
    pub received: u64,
    /// Items a source produced.
    pub ingested: u64,
    /// Items the stage created beyond one output per input.
    pub created: u64,
    /// Items passed downstream.
    pub emitted: u64,
    /// Items a sink accepted.
    pub delivered: u64,
    /// Items that produced no output.
    pub filtered: u64,
    /// Items sent to the dead-letter sink.
    pub dead_lettered: u64,
    /// Items folded into an output together with others (accumulators).
    pub absorbed: u64,
    /// Retry attempts made.
    pub retries: u64,
    /// Items dropped inside the stage, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
}

impl StageMetrics {
    /// Items dropped inside the stage, all reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// Whether `received + ingested + created = emitted + delivered + filtered + dropped +
    /// dead_lettered + absorbed` holds for this stage.
    pub fn balances(&self) -> bool {
        self.received + self.ingested + self.created
            == self.emitted
                + self.delivered
                + self.filtered
                + self.dropped_total()
                + self.dead_lettered
                + self.absorbed
    }
}

/// Counters of an edge, as seen by `inspect` and in the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSnapshot {
    /// The receiving stage.
    pub to: String,
    /// Items sent into the edge.
    pub sent: u64,
    /// Items taken out by the receiver.
    pub delivered: u64,
    /// Items dropped on the edge, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
    /// Items queued now.
    pub depth: u64,
    /// Most items ever queued.
    pub peak_depth: u64,
    /// Capacity in items.
    pub capacity: u64,
}

impl EdgeSnapshot {
    /// Items dropped on the edge, all reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}

/// The live state of a stage (seed `StageRuntimeState`).
#[derive(Debug, Clone, PartialEq)]
pub struct StageRuntimeState {
    /// The stage's id.
    pub stage_id: String,
    /// Its kind.
    pub kind: StageKind,
    /// Lifecycle state.
    pub status: StageStatus,
    /// Items waiting in its input buffer.
    pub input_queue_depth: u64,
    /// Items waiting in the buffers of the stages it feeds.
    pub output_queue_depth: u64,
    /// Items received (or produced, for a source).
    pub processed: u64,
    /// Errors raised, including those later retried successfully.
    pub errors: u64,
    /// The most recent error's text.
    pub last_error: Option<String>,
    /// All counters.
    pub counts: StageMetrics,
    /// The input edge, when the stage has a buffer of its own.
    pub input: Option<EdgeSnapshot>,
    /// The edges into the stages it feeds.
    pub outputs: Vec<EdgeSnapshot>,
    /// Further named figures (batches, average batch time, workers).
    pub metrics: BTreeMap<String, f64>,
    /// Tokio-Pulse tier of the stage's tasks (the highest; `None` when unsupervised).
    pub tier: Option<tokio_pulse::Tier>,
    /// CPU time of the stage's tasks, sampled by Tokio-Pulse (zero when unsupervised).
    pub cpu_time: Duration,
    /// How it spent the last few seconds (`None` until time has passed).
    pub load: Option<super::Load>,
    /// Whether it is the pipeline's bottleneck: the busiest stage whose full input keeps its
    /// producers waiting.
    pub bottleneck: bool,
}

/// Pipeline-wide totals of a run. See the [module docs](crate::metrics) for the law they obey.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Items produced by sources.
    pub ingested: u64,
    /// Items created by stages beyond one output per input.
    pub created: u64,
    /// Items accepted by sinks.
    pub delivered: u64,
    /// Items filtered out.
    pub filtered: u64,
    /// Items dropped by a named reason, in stages and on edges.
    pub dropped: u64,
    /// Items sent to the dead-letter sink.
    pub dead_lettered: u64,
    /// Items folded with others into one output (accumulators).
    pub absorbed: u64,
}

impl Accounting {
    /// Sums stage and edge counters.
    pub fn from_states<'a>(states: impl IntoIterator<Item = &'a StageRuntimeState>) -> Self {
        let mut a = Accounting::default();
        for s in states {
            let c = &s.counts;
            a.ingested += c.ingested;
            a.created += c.created;
            a.delivered += c.delivered;
            a.filtered += c.filtered;
            a.dropped += c.dropped_total();
            a.dead_lettered += c.dead_lettered;
            a.absorbed += c.absorbed;
            if let Some(input) = &s.input {
                a.dropped += input.dropped_total();
            }
        }
        a
    }

    /// Items in: what sources produced plus what stages created.
    pub fn items_in(&self) -> u64 {
        self.ingested + self.created
    }

    /// Items accounted for: delivered, filtered, dropped, dead-lettered or absorbed into an
    /// output with others.
    pub fn items_accounted(&self) -> u64 {
        self.delivered + self.filtered + self.dropped + self.dead_lettered + self.absorbed
    }

    /// Whether every item is accounted for exactly once.
    pub fn reconciles(&self) -> bool {
        self.items_in() == self.items_accounted()
    }

    /// Items not accounted for (in flight when a run was aborted).
    pub fn unaccounted(&self) -> u64 {
        self.items_in().saturating_sub(self.items_accounted())
    }
}
