//! A supervised task: the timed poll, the Yield action, migration to and from the isolation
//! runtime, and the join handle.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::budget::TaskBudget;
use crate::tier::{Tier, Transition};

use super::worker::{WorkerSlot, slot_for_current_thread, thread_key};
use super::{Core, Shared, telemetry};

/// What other threads can see of a task.
#[derive(Debug)]
pub(crate) struct TaskShared {
    pub(crate) id: u64,
    pub(crate) label: String,
    /// Whether the label is a name given by the caller (only those get a per-task gauge).
    pub(crate) named: bool,
    pub(crate) tier: AtomicU8,
    pub(crate) cpu_ns: AtomicU64,
    pub(crate) polls: AtomicU64,
    pub(crate) violations: AtomicU64,
    pub(crate) migrations: AtomicU64,
    pub(crate) isolated: AtomicBool,
}

impl TaskShared {
    pub(crate) fn new(id: u64, name: Option<&str>) -> Self {
        Self {
            id,
            label: name.map_or_else(|| id.to_string(), str::to_owned),
            named: name.is_some(),
            tier: AtomicU8::new(Tier::Monitor as u8),
            cpu_ns: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            migrations: AtomicU64::new(0),
            isolated: AtomicBool::new(false),
        }
    }

    fn stats(&self) -> TaskStats {
        TaskStats {
            id: self.id,
            tier: Tier::from_u8(self.tier.load(Ordering::Relaxed)),
            polls: self.polls.load(Ordering::Relaxed),
            violations: self.violations.load(Ordering::Relaxed),
            cpu_time: Duration::from_nanos(self.cpu_ns.load(Ordering::Relaxed)),
            migrations: self.migrations.load(Ordering::Relaxed),
            isolated: self.isolated.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of what the supervisor knows about one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskStats {
    /// The supervisor's id of the task.
    pub id: u64,
    /// Its tier.
    pub tier: Tier,
    /// Polls so far (published every 64 polls, when the task changes worker, and at its end).
    pub polls: u64,
    /// Polls over budget.
    pub violations: u64,
    /// CPU time charged to it by sampling.
    pub cpu_time: Duration,
    /// Moves between the runtimes.
    pub migrations: u64,
    /// Whether it is on the isolation runtime now.
    pub isolated: bool,
}

/// What a timed poll asks of the side that polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Continue,
    Yield,
    Isolate,
    Return,
}

/// Poll counts are published, and a poll duration sampled, once in `PUBLISH_MASK + 1` polls.
const PUBLISH_MASK: u64 = 63;

/// The watcher that travels with a task's future between runtimes.
pub(crate) struct Watch {
    core: Arc<Core>,
    task: Arc<TaskShared>,
    /// `task.id`, kept here so the hot path does not reach into the shared part.
    id: u64,
    budget: TaskBudget,
    /// Raw clock reading at which to review the tier (u64::MAX at Monitor).
    review_at: u64,
    key: u64,
    slot: Option<Arc<WorkerSlot>>,
    polls: u64,
    published_polls: u64,
    isolated: bool,
    /// Whether the next poll is also timed with the thread's CPU clock (after a long one).
    cpu_timed: bool,
}

impl Watch {
    pub(crate) fn new(core: Arc<Core>, task: Arc<TaskShared>) -> Self {
        let budget = TaskBudget::new(core.now_ns());
        Self {
            id: task.id,
            core,
            task,
            budget,
            review_at: u64::MAX,
            key: 0,
            slot: None,
            polls: 0,
            published_polls: 0,
            isolated: false,
            cpu_timed: false,
        }
    }

    #[cold]
    fn switch_slot(&mut self, key: u64) {
        // Polls counted so far ran on the previous worker.
        self.flush_polls();
        let slot = slot_for_current_thread(self.core.id, &self.core.workers);
        if self.polls == 0 {
            slot.stats.add_task();
        }
        self.slot = Some(slot);
        self.key = key;
    }

    /// Polls `fut` once, timed, and decides what the task must do next.
    #[inline(always)]
    fn poll<F: Future + ?Sized>(
        &mut self,
        fut: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> (Poll<F::Output>, Action) {
        let key = thread_key();
        if key != self.key || self.slot.is_none() {
            self.switch_slot(key);
        }
        let Some(slot) = self.slot.as_deref() else {
            return (fut.poll(cx), Action::Continue);
        };
        let core = &*self.core;
        let guard = slot.enter(self.id);
        let cpu_start = if self.cpu_timed {
            self.cpu_timed = false;
            thread_cpu_ns(slot)
        } else {
            None
        };
        let start = core.clock.raw();
        let result = fut.poll(cx);
        let end = core.clock.raw();
        drop(guard);
        self.polls += 1;
        // One comparison for the common case: a poll shorter than a quarter of the budget, and
        // no review due.
        let action = if end.wrapping_sub(start) > core.suspect_ticks || end >= self.review_at {
            self.long_poll(start, end, cpu_start)
        } else {
            Action::Continue
        };
        if self.polls & PUBLISH_MASK == 0 {
            self.publish(start, end);
        }
        (result, action)
    }

    /// A poll over a quarter of the budget, or a review due: the next poll is CPU-timed, and
    /// one over the budget (or the review) goes through the tier manager.
    #[cold]
    #[inline(never)]
    fn long_poll(&mut self, start: u64, end: u64, cpu_start: Option<u64>) -> Action {
        let elapsed = end.wrapping_sub(start);
        self.cpu_timed = elapsed > self.core.suspect_ticks;
        if elapsed > self.core.budget_ticks || end >= self.review_at {
            self.slow_path(start, end, cpu_start)
        } else {
            Action::Continue
        }
    }

    #[cold]
    fn publish(&mut self, start: u64, end: u64) {
        self.core
            .metrics
            .poll_duration
            .record(self.core.clock.nanos_between(start, end) as f64 / 1e9);
        self.flush_polls();
    }

    /// Adds the polls since the last flush to the task, the current worker and the metric.
    fn flush_polls(&mut self) {
        let delta = self.polls - self.published_polls;
        self.published_polls = self.polls;
        self.task.polls.fetch_add(delta, Ordering::Relaxed);
        if let Some(slot) = &self.slot {
            slot.stats.add_polls(delta);
        }
        self.core.metrics.polls.increment(delta);
    }

    #[cold]
    #[inline(never)]
    fn slow_path(&mut self, start: u64, end: u64, cpu_start: Option<u64>) -> Action {
        let core = Arc::clone(&self.core);
        let wall_ns = core.clock.nanos_between(start, end);
        let (poll_ns, confirmed) = if core.tiers.is_violation(wall_ns) {
            self.measure(start, end, wall_ns, cpu_start)
        } else {
            (wall_ns, true)
        };
        let now = core.ns_at(end);
        let mut changes: Option<Transition> = None;
        if core.tiers.is_violation(poll_ns) {
            if let Some(slot) = &self.slot {
                slot.stats.add_violation();
            }
            changes = if confirmed {
                core.tiers.on_poll(&mut self.budget, poll_ns, now)
            } else {
                core.tiers
                    .on_unconfirmed_poll(&mut self.budget, poll_ns, now)
            };
            let tier = self.budget.tier();
            self.task.violations.fetch_add(1, Ordering::Relaxed);
            core.metrics.violation(tier);
            core.metrics.poll_duration.record(poll_ns as f64 / 1e9);
            if tier == Tier::Warn || changes.is_some() {
                tracing::warn!(
                    task = %self.task.label,
                    poll_us = poll_ns / 1_000,
                    budget_us = core.tiers.config().poll_budget.as_micros() as u64,
                    cpu_measured = confirmed,
                    tier = %tier,
                    "tokio-pulse: poll over budget"
                );
            }
            self.review_at = if tier == Tier::Monitor {
                u64::MAX
            } else {
                end.saturating_add(core.ticks_for_ns(duration_ns(core.tiers.config().cooldown)))
            };
        } else if end >= self.review_at {
            let review = core.tiers.review(&mut self.budget, now);
            changes = review.change;
            self.review_at = if review.next_review_ns == u64::MAX {
                u64::MAX
            } else {
                end.saturating_add(core.ticks_for_ns(review.next_review_ns.saturating_sub(now)))
            };
        }
        if let Some(change) = changes {
            self.task.tier.store(change.to as u8, Ordering::Relaxed);
            core.count_tier(change);
            telemetry::transition(&self.task, change);
            if change.to < change.from {
                tracing::info!(task = %self.task.label, from = %change.from, to = %change.to, "tokio-pulse: task behaves, tier lowered");
            }
        }
        let tier = self.budget.tier();
        match (self.isolated, tier) {
            (false, Tier::Isolate) => Action::Isolate,
            (false, Tier::Yield) if core.tiers.is_violation(poll_ns) => Action::Yield,
            (true, t) if t < Tier::Isolate => Action::Return,
            _ => Action::Continue,
        }
    }

    /// The length of a poll that took `wall_ns` of wall-clock time, and whether it is known
    /// in CPU time (`true`) or only in wall-clock time, which counts time the thread spent
    /// preempted (`false`). CPU time is known when the poll was CPU-timed (it followed a long
    /// poll), when the CPU sampler read the thread's clock during the poll (the CPU share of
    /// the window from that sample to the end of the poll is applied), on a manual clock (no
    /// preemption in simulated time), and trivially where threads have no CPU clock at all.
    /// Reads the thread's CPU clock, so only on the slow path.
    fn measure(&self, start: u64, end: u64, wall_ns: u64, cpu_start: Option<u64>) -> (u64, bool) {
        let slot = match self.slot.as_deref() {
            Some(slot) if slot.clock.is_some() && !self.core.clock.is_manual() => slot,
            _ => return (wall_ns, true),
        };
        let Some(cpu_now) = thread_cpu_ns(slot) else {
            return (wall_ns, false);
        };
        if let Some(before) = cpu_start {
            return (cpu_now.saturating_sub(before).min(wall_ns), true);
        }
        // Acquire pairs with the sampler's Release: `cpu_then` is this sample's reading or a
        // later one, never an earlier one (which would overstate the share).
        let sample_raw = slot.last_sample_raw.load(Ordering::Acquire);
        let cpu_then = slot.last_cpu_ns.load(Ordering::Relaxed);
        let window = self.core.clock.nanos_between(sample_raw, end);
        if sample_raw <= start || sample_raw >= end || cpu_now < cpu_then || window == 0 {
            return (wall_ns, false);
        }
        let share = ((cpu_now - cpu_then) as f64 / window as f64).min(1.0);
        ((wall_ns as f64 * share) as u64, true)
    }

    fn finish(&mut self) {
        self.flush_polls();
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Whether finished, cancelled or panicked: the task leaves its tier.
        self.core.task_gone(&self.task, self.budget.tier());
    }
}

/// The calling thread's CPU time, through its slot's clock (a syscall: off the common path).
#[cold]
#[inline(never)]
fn thread_cpu_ns(slot: &WorkerSlot) -> Option<u64> {
    slot.clock.and_then(|c| c.read_ns())
}

fn duration_ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// What comes back from the isolation runtime.
enum Back<F: Future> {
    Done(F::Output),
    Returned(Pin<Box<F>>, Box<Watch>),
}

/// The part that runs on the isolation runtime.
struct IsolatedRun<F> {
    fut: Option<Pin<Box<F>>>,
    watch: Option<Box<Watch>>,
}

impl<F: Future> Future for IsolatedRun<F> {
    type Output = Back<F>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Back<F>> {
        let this = self.get_mut();
        let (Some(fut), Some(watch)) = (this.fut.as_mut(), this.watch.as_mut()) else {
            return Poll::Pending;
        };
        let (result, action) = watch.poll(fut.as_mut(), cx);
        match result {
            Poll::Ready(out) => {
                watch.finish();
                Poll::Ready(Back::Done(out))
            }
            Poll::Pending if action == Action::Return => {
                match (this.fut.take(), this.watch.take()) {
                    (Some(fut), Some(mut watch)) => {
                        watch.isolated = false;
                        watch.task.isolated.store(false, Ordering::Relaxed);
                        watch.task.migrations.fetch_add(1, Ordering::Relaxed);
                        telemetry::migration("return");
                        // It was pending on something that will wake this task; make sure the
                        // anchor polls it once itself so the waker is the anchor's.
                        Poll::Ready(Back::Returned(fut, watch))
                    }
                    _ => Poll::Pending,
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

enum Stage<F: Future> {
    Local {
        fut: Pin<Box<F>>,
        watch: Box<Watch>,
        yield_next: bool,
    },
    Away(tokio::task::JoinHandle<Back<F>>),
    Done,
}

/// The task spawned on the caller's runtime. It owns the join handle's side of the task
/// wherever the future runs.
pub(crate) struct Anchor<F: Future> {
    stage: Stage<F>,
    shared: Arc<Shared>,
}

impl<F> Anchor<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    pub(crate) fn new(fut: Pin<Box<F>>, watch: Watch, shared: Arc<Shared>) -> Self {
        Self {
            stage: Stage::Local {
                fut,
                watch: Box::new(watch),
                yield_next: false,
            },
            shared,
        }
    }

    fn migrate(&mut self) {
        let Stage::Local { .. } = &self.stage else {
            return;
        };
        let Some(runtime) = self.shared.isolation_runtime() else {
            return;
        };
        let Stage::Local { fut, mut watch, .. } = std::mem::replace(&mut self.stage, Stage::Done)
        else {
            return;
        };
        watch.isolated = true;
        watch.flush_polls();
        watch.slot = None;
        watch.key = 0;
        watch.task.isolated.store(true, Ordering::Relaxed);
        watch.task.migrations.fetch_add(1, Ordering::Relaxed);
        telemetry::migration("isolate");
        let run = IsolatedRun {
            fut: Some(fut),
            watch: Some(watch),
        };
        match runtime.spawn(run) {
            Some(handle) => self.stage = Stage::Away(handle),
            None => {
                // Cannot happen while the runtime lives; the future is lost with the spawn.
                tracing::error!("tokio-pulse: isolation runtime unavailable during migration");
            }
        }
    }
}

impl<F> Future for Anchor<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.stage {
                Stage::Local {
                    fut,
                    watch,
                    yield_next,
                } => {
                    if *yield_next {
                        *yield_next = false;
                        // Give way once: tokio reschedules a yielding task behind the
                        // worker's queue and after its timers and I/O.
                        let mut y = std::pin::pin!(tokio::task::yield_now());
                        if y.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    let (result, action) = watch.poll(fut.as_mut(), cx);
                    if let Poll::Ready(out) = result {
                        watch.finish();
                        this.stage = Stage::Done;
                        return Poll::Ready(out);
                    }
                    match action {
                        Action::Yield => {
                            *yield_next = true;
                            return Poll::Pending;
                        }
                        Action::Isolate => {
                            this.migrate();
                            if matches!(this.stage, Stage::Local { .. }) {
                                return Poll::Pending;
                            }
                        }
                        Action::Continue | Action::Return => return Poll::Pending,
                    }
                }
                Stage::Away(handle) => match Pin::new(handle).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(Back::Done(out))) => {
                        this.stage = Stage::Done;
                        return Poll::Ready(out);
                    }
                    Poll::Ready(Ok(Back::Returned(fut, watch))) => {
                        this.stage = Stage::Local {
                            fut,
                            watch,
                            yield_next: false,
                        };
                    }
                    Poll::Ready(Err(err)) => {
                        this.stage = Stage::Done;
                        if err.is_panic() {
                            // The original panic, payload and all, reaches the join handle.
                            std::panic::resume_unwind(err.into_panic());
                        }
                        // The isolation runtime lives as long as this anchor holds `shared`,
                        // so only an abort of the isolated task gets here.
                        std::panic::resume_unwind(Box::new(
                            "tokio-pulse: isolated task was cancelled by its runtime",
                        ));
                    }
                },
                Stage::Done => return Poll::Pending,
            }
        }
    }
}

impl<F: Future> Drop for Anchor<F> {
    fn drop(&mut self) {
        // Cancellation of the handle reaches the future wherever it runs.
        if let Stage::Away(handle) = &self.stage {
            handle.abort();
        }
    }
}

/// An owned permission to await a supervised task, like [`tokio::task::JoinHandle`].
///
/// Awaiting it gives the task's output, or a [`tokio::task::JoinError`] when the task
/// panicked (with the original payload, also when it panicked on the isolation runtime) or
/// was aborted. Dropping it detaches the task.
#[derive(Debug)]
pub struct JoinHandle<T> {
    pub(crate) inner: tokio::task::JoinHandle<T>,
    pub(crate) task: Arc<TaskShared>,
}

impl<T> JoinHandle<T> {
    /// Cancels the task wherever it runs; its future is dropped.
    pub fn abort(&self) {
        self.inner.abort();
    }

    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// The supervisor's id of the task.
    pub fn id(&self) -> u64 {
        self.task.id
    }

    /// The task's tier now.
    pub fn tier(&self) -> Tier {
        Tier::from_u8(self.task.tier.load(Ordering::Relaxed))
    }

    /// What the supervisor knows about the task now.
    pub fn stats(&self) -> TaskStats {
        self.task.stats()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}
