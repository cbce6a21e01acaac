//! The [`Supervisor`]: spawns tasks whose every poll is timed, and acts on their tier.
//!
//! * **Monitor**: timing only (two TSC reads and a few stores per poll).
//! * **Warn**: each long poll emits a `tracing` warning and counts in the metrics.
//! * **Yield**: after a long poll the task gives way once (wakes itself and returns `Pending`)
//!   so its worker serves its queue, timers and I/O.
//! * **Isolate**: the task's boxed future moves to the *isolation runtime*, a separate Tokio
//!   runtime whose threads are restrained by the OS ([`crate::isolation`]). Output, panics and
//!   cancellation still go through the original [`JoinHandle`]. When the task behaves again it
//!   comes back.
//!
//! CPU time per task is sampled: a background thread reads each worker thread's CPU clock
//! every [`SupervisorConfig::sample_interval`] and charges the delta to the task that worker
//! is polling at that moment.
//!
//! A poll is timed with the cheap clock, which also counts time the thread spent preempted.
//! Such a wall-clock violation can raise a task to Warn and no further
//! ([`TierManager::on_unconfirmed_poll`](crate::tier::TierManager::on_unconfirmed_poll)).
//! The poll that follows a long one (over a quarter of the budget in wall-clock time) is also
//! timed with the thread's CPU clock (two reads of a few hundred nanoseconds, next to a poll
//! that is likely long again), and Yield and Isolate follow CPU time. So a busy task on a
//! machine crowded by other processes is not sent to the idle-priority isolation runtime for
//! being preempted, and a task with tiny polls that was preempted once pays for one CPU-timed
//! poll, while a task that burns its worker gets there on its second long poll (on its first
//! when the sampler read the thread's clock during it, as it does for any poll much longer
//! than the sample interval).
//!
//! ```
//! use tokio_pulse::{Supervisor, SupervisorConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = tokio::runtime::Builder::new_multi_thread()
//!     .worker_threads(2)
//!     .enable_all()
//!     .build()?;
//! let supervisor = Supervisor::new(SupervisorConfig::default())?;
//! let answer = runtime.block_on(async {
//!     let handle = supervisor.spawn(async { 6 * 7 });
//!     handle.await
//! })?;
//! assert_eq!(answer, 42);
//! # Ok(())
//! # }
//! ```

mod runtime;
mod sampler;
mod task;
pub mod telemetry;
mod worker;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::clock::PollClock;
use crate::isolation::{
    CpuUsage, IsolationCapabilities, IsolationContext, IsolationError, OsAbstractionFactory,
    PriorityLevel,
};
use crate::tier::{
    Tier, TierConfig, TierConfigError, TierManager, Transition, WorkerStatsSnapshot,
};

pub use task::{JoinHandle, TaskStats};

use runtime::IsolationRuntime;
use task::{Anchor, TaskShared, Watch};
use worker::WorkerRegistry;

/// Configuration of a [`Supervisor`].
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisorConfig {
    /// Tiers: poll budget, thresholds, hysteresis, cooldown.
    pub tiers: TierConfig,
    /// Worker threads of the isolation runtime (default: the number of CPUs).
    pub isolation_threads: usize,
    /// CPU limit of the isolation runtime, in percent of the machine (default 75).
    pub isolation_cpu_percent: f32,
    /// Priority of the isolation runtime's threads (default Idle).
    pub isolation_priority: PriorityLevel,
    /// How often worker CPU clocks are sampled (default 5 ms).
    pub sample_interval: Duration,
    /// Remove created cgroups and end the process on SIGINT/SIGTERM (default false: only
    /// for programs that do not handle those signals themselves).
    pub cleanup_on_signal: bool,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            tiers: TierConfig::default(),
            isolation_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            isolation_cpu_percent: 75.0,
            isolation_priority: PriorityLevel::Idle,
            sample_interval: Duration::from_millis(5),
            cleanup_on_signal: false,
        }
    }
}

/// A worker thread as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The thread's name.
    pub name: String,
    /// Its counters.
    pub stats: WorkerStatsSnapshot,
    /// The supervised task it is polling now, if any.
    pub current_task: Option<u64>,
}

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The tier configuration is invalid.
    #[error("invalid tier configuration: {0}")]
    Config(#[from] TierConfigError),
    /// A bad value elsewhere in the configuration.
    #[error("invalid supervisor configuration: {0}")]
    InvalidConfig(String),
    /// The isolation layer failed.
    #[error("isolation: {0}")]
    Isolation(#[from] IsolationError),
    /// A runtime or thread could not be started.
    #[error("could not start the isolation runtime or sampler: {0}")]
    Runtime(#[source] std::io::Error),
}

static NEXT_SUPERVISOR: AtomicU64 = AtomicU64::new(1);

/// What every supervised poll needs; shared by tasks wherever they run.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) id: u64,
    pub(crate) clock: PollClock,
    origin: u64,
    pub(crate) budget_ticks: u64,
    /// A poll longer than this (a quarter of the budget) gets the next one CPU-timed.
    pub(crate) suspect_ticks: u64,
    pub(crate) tiers: TierManager,
    pub(crate) workers: WorkerRegistry,
    pub(crate) tasks: parking_lot::Mutex<std::collections::HashMap<u64, Arc<TaskShared>>>,
    pub(crate) metrics: telemetry::Handles,
    tier_counts: [AtomicU64; 4],
    next_task: AtomicU64,
}

impl Core {
    pub(crate) fn now_ns(&self) -> u64 {
        self.ns_at(self.clock.raw())
    }

    pub(crate) fn ns_at(&self, raw: u64) -> u64 {
        self.clock.nanos_between(self.origin, raw)
    }

    pub(crate) fn ticks_for_ns(&self, ns: u64) -> u64 {
        self.clock.ticks_for(Duration::from_nanos(ns))
    }

    pub(crate) fn count_tier(&self, change: Transition) {
        self.tier_counts[change.from as usize].fetch_sub(1, Ordering::Relaxed);
        self.tier_counts[change.to as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn task_gone(&self, task: &TaskShared, tier: Tier) {
        self.tier_counts[tier as usize].fetch_sub(1, Ordering::Relaxed);
        self.tasks.lock().remove(&task.id);
        telemetry::task_gone(task, tier);
    }

    fn tier_counts(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.tier_counts[i].load(Ordering::Relaxed))
    }
}

/// The supervisor's state, owned by its handles and by tasks' anchors.
#[derive(Debug)]
pub(crate) struct Shared {
    core: Arc<Core>,
    config: SupervisorConfig,
    isolation: OnceLock<Option<IsolationRuntime>>,
}

impl Shared {
    /// The isolation runtime, started on first use; `None` if it cannot start.
    pub(crate) fn isolation_runtime(&self) -> Option<&IsolationRuntime> {
        self.isolation
            .get_or_init(|| match IsolationRuntime::start(&self.config) {
                Ok(rt) => Some(rt),
                Err(e) => {
                    tracing::error!(error = %e, "tokio-pulse: isolation runtime unavailable, tasks stay at Yield");
                    None
                }
            })
            .as_ref()
    }
}

/// Supervises tasks: times their polls and moves them through the tiers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

impl Supervisor {
    /// A supervisor timing polls with the machine's fastest reliable clock.
    pub fn new(config: SupervisorConfig) -> Result<Self, SupervisorError> {
        Self::with_clock(config, PollClock::new())
    }

    /// A supervisor on a given clock (a manual one makes decisions deterministic in tests).
    pub fn with_clock(config: SupervisorConfig, clock: PollClock) -> Result<Self, SupervisorError> {
        let tiers = TierManager::new(config.tiers.clone())?;
        if !(config.isolation_cpu_percent > 0.0 && config.isolation_cpu_percent <= 100.0) {
            return Err(SupervisorError::InvalidConfig(format!(
                "isolation_cpu_percent must be in (0, 100], got {}",
                config.isolation_cpu_percent
            )));
        }
        if config.sample_interval.is_zero() {
            return Err(SupervisorError::InvalidConfig(
                "sample_interval must be greater than zero".into(),
            ));
        }
        if config.cleanup_on_signal {
            crate::isolation::cleanup::install_signal_cleanup()?;
        }
        let origin = clock.raw();
        let budget_ticks = clock.ticks_for(config.tiers.poll_budget);
        let core = Arc::new(Core {
            id: NEXT_SUPERVISOR.fetch_add(1, Ordering::Relaxed),
            clock,
            origin,
            budget_ticks,
            suspect_ticks: budget_ticks / 4,
            tiers,
            workers: WorkerRegistry::default(),
            tasks: parking_lot::Mutex::new(std::collections::HashMap::new()),
            metrics: telemetry::Handles::new(),
            tier_counts: Default::default(),
            next_task: AtomicU64::new(1),
        });
        let shared = Arc::new(Shared {
            core,
            config,
            isolation: OnceLock::new(),
        });
        sampler::start(Arc::downgrade(&shared), shared.config.sample_interval)
            .map_err(SupervisorError::Runtime)?;
        Ok(Self { shared })
    }

    /// Spawns `future` on the current Tokio runtime, supervised.
    ///
    /// # Panics
    ///
    /// Like [`tokio::spawn`], when called outside a Tokio runtime.
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn_inner(None, future, &tokio::runtime::Handle::current())
    }

    /// Spawns a named task (the name labels its metrics and log events).
    ///
    /// # Panics
    ///
    /// Like [`tokio::spawn`], when called outside a Tokio runtime.
    pub fn spawn_named<F>(&self, name: &str, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn_inner(Some(name), future, &tokio::runtime::Handle::current())
    }

    /// Spawns `future` on the runtime of `handle`, supervised.
    pub fn spawn_on<F>(&self, future: F, handle: &tokio::runtime::Handle) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn_inner(None, future, handle)
    }

    fn spawn_inner<F>(
        &self,
        name: Option<&str>,
        future: F,
        handle: &tokio::runtime::Handle,
    ) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let core = &self.shared.core;
        let id = core.next_task.fetch_add(1, Ordering::Relaxed);
        let task = Arc::new(TaskShared::new(id, name));
        core.tasks.lock().insert(id, Arc::clone(&task));
        core.tier_counts[Tier::Monitor as usize].fetch_add(1, Ordering::Relaxed);
        let watch = Watch::new(Arc::clone(core), Arc::clone(&task));
        let anchor = Anchor::new(Box::pin(future), watch, Arc::clone(&self.shared));
        JoinHandle {
            inner: handle.spawn(anchor),
            task,
        }
    }

    /// The tier manager (configuration and transition counts).
    pub fn tier_manager(&self) -> &TierManager {
        &self.shared.core.tiers
    }

    /// Live supervised tasks per tier, indexed by `Tier as usize`.
    pub fn tasks_per_tier(&self) -> [u64; 4] {
        self.shared.core.tier_counts()
    }

    /// Each live worker thread that has polled a supervised task: its name, counters and
    /// the task it is polling right now.
    pub fn worker_stats(&self) -> Vec<WorkerInfo> {
        self.shared
            .core
            .workers
            .snapshot()
            .iter()
            .map(|w| WorkerInfo {
                name: w.name.clone(),
                stats: w.stats.snapshot(),
                current_task: Some(w.current.load(Ordering::Relaxed)).filter(|t| *t != 0),
            })
            .collect()
    }

    /// Whether task `id` is being polled right now on some worker.
    pub fn is_polling(&self, id: u64) -> bool {
        self.shared
            .core
            .workers
            .snapshot()
            .iter()
            .any(|w| w.current.load(Ordering::Relaxed) == id)
    }

    /// Starts the isolation runtime now instead of at the first isolated task.
    pub fn start_isolation(&self) -> Result<(), SupervisorError> {
        match self.shared.isolation_runtime() {
            Some(_) => Ok(()),
            None => Err(SupervisorError::Isolation(IsolationError::NotSupported)),
        }
    }

    /// The capabilities of the isolation layer (of the running isolation runtime if any).
    pub fn isolation_capabilities(&self) -> IsolationCapabilities {
        match self.shared.isolation.get() {
            Some(Some(rt)) => rt.capabilities(),
            _ => OsAbstractionFactory::create_isolation().capabilities(),
        }
    }

    /// The isolation runtime's context, once it runs.
    pub fn isolation_context(&self) -> Option<IsolationContext> {
        match self.shared.isolation.get() {
            Some(Some(rt)) => Some(rt.context().clone()),
            _ => None,
        }
    }

    /// CPU used by the isolation runtime's threads, once it runs.
    pub fn isolation_cpu_usage(&self) -> Option<CpuUsage> {
        match self.shared.isolation.get() {
            Some(Some(rt)) => rt.cpu_usage(),
            _ => None,
        }
    }
}
