//! [`ExecutionOptions`]: how one run is carried out.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_pulse::{Supervisor, SupervisorConfig};
use tokio_util::sync::CancellationToken;

use super::dead_letter::DeadLetterSink;
use crate::memory::MemoryBudget;
use crate::policy::PolicyRegistry;

/// The default [`ExecutionOptions::batch_timeout`].
pub const DEFAULT_BATCH_TIMEOUT: Duration = Duration::from_millis(10);

/// Options of one run.
///
/// ```
/// use pulseflow::prelude::*;
/// use pulseflow::memory::MemoryBudget;
///
/// let options = ExecutionOptions::default()
///     .with_batch_size(512)
///     .with_batch_timeout(std::time::Duration::from_millis(5))
///     .with_memory_budget(MemoryBudget::new(64 << 20));
/// assert_eq!(options.batch_size, 512);
/// ```
#[derive(Clone)]
pub struct ExecutionOptions {
    /// Cancelling this token stops the run gracefully, like [`ExecutionEngine::stop`]
    /// (without a deadline).
    ///
    /// [`ExecutionEngine::stop`]: super::ExecutionEngine::stop
    pub cancellation: CancellationToken,
    /// Whether stages publish through the `metrics` facade (counters are kept either way).
    pub metrics: bool,
    /// The memory budget stages reserve from.
    pub memory: MemoryBudget,
    /// Named policies, added to (and overriding) the builder's.
    pub policies: PolicyRegistry,
    /// Items per batch produced by sources.
    pub batch_size: usize,
    /// How long a source may hold a partial batch: it sends what it has at most this long
    /// after the batch's first item, so items of a live stream that trickle in (a `tail -f`,
    /// a socket) do not wait for a full batch. A source whose input is ready fills whole
    /// batches regardless. Default 10 ms.
    pub batch_timeout: Duration,
    /// Where dead letters go; by default they are kept in the result.
    pub dead_letter_sink: Option<Arc<dyn DeadLetterSink>>,
    /// How many dead letters the result keeps (the rest are counted).
    pub dead_letter_keep: usize,
    /// Whether stage tasks run under the Tokio-Pulse supervisor (on by default).
    pub supervision: Supervision,
    /// Configuration handed to stages in their [`StageContext`](crate::stage::StageContext),
    /// by stage id.
    pub stage_config: HashMap<String, serde_json::Value>,
}

impl Default for ExecutionOptions {
    fn default() -> Self {
        Self {
            cancellation: CancellationToken::new(),
            metrics: true,
            memory: MemoryBudget::unlimited(),
            policies: PolicyRegistry::default(),
            batch_size: 1024,
            batch_timeout: DEFAULT_BATCH_TIMEOUT,
            dead_letter_sink: None,
            dead_letter_keep: 10_000,
            supervision: Supervision::Default,
            stage_config: HashMap::new(),
        }
    }
}

impl ExecutionOptions {
    /// Sets the batch size of sources.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets how long a source may hold a partial batch (see
    /// [`batch_timeout`](ExecutionOptions::batch_timeout)).
    pub fn with_batch_timeout(mut self, timeout: Duration) -> Self {
        self.batch_timeout = timeout;
        self
    }

    /// Sets the memory budget.
    pub fn with_memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.memory = budget;
        self
    }

    /// Sets the cancellation token.
    pub fn with_cancellation(mut self, token: CancellationToken) -> Self {
        self.cancellation = token;
        self
    }

    /// Sends dead letters to `sink` instead of keeping them in the result.
    pub fn with_dead_letter_sink(mut self, sink: impl DeadLetterSink) -> Self {
        self.dead_letter_sink = Some(Arc::new(sink));
        self
    }

    /// Adds named policies.
    pub fn with_policies(mut self, policies: PolicyRegistry) -> Self {
        self.policies = policies;
        self
    }

    /// Sets how stage tasks are supervised.
    pub fn with_supervision(mut self, supervision: Supervision) -> Self {
        self.supervision = supervision;
        self
    }

    /// Gives a stage its configuration.
    pub fn with_stage_config(
        mut self,
        stage: impl Into<String>,
        config: serde_json::Value,
    ) -> Self {
        self.stage_config.insert(stage.into(), config);
        self
    }
}

/// How the tasks of a run are supervised by Tokio-Pulse.
///
/// Supervised, every poll of a stage's task is timed. A stage whose polls keep running long
/// climbs the tiers: at Warn it is reported, at Yield the engine processes its batches in small
/// chunks and yields between them, at Isolate its task moves to the isolation runtime, whose
/// threads the OS restrains, so the other stages keep their latency. `inspect` shows each
/// stage's tier and CPU time.
///
/// Tests on Tokio's paused clock should use [`Supervision::Off`]: an isolated task runs on the
/// isolation runtime, whose clock is not the test's paused one.
///
/// ```
/// use pulseflow::engine::Supervision;
/// use pulseflow::prelude::*;
///
/// let unsupervised = ExecutionOptions::default().with_supervision(Supervision::Off);
/// # let _ = unsupervised;
/// ```
#[derive(Clone, Default)]
pub enum Supervision {
    /// One supervisor shared by the process, with the default configuration.
    #[default]
    Default,
    /// One supervisor shared by the process whose tiers stop at Yield: stages are timed,
    /// reported and made to yield, but never moved to the isolation runtime, whose threads
    /// run at idle priority. For batch jobs that should get their fair share of a machine
    /// shared with other processes (the `pulseflow` command's default).
    NoIsolation,
    /// This supervisor.
    With(Supervisor),
    /// No supervision.
    Off,
}

impl Supervision {
    pub(crate) fn supervisor(&self) -> Option<Supervisor> {
        static SHARED: OnceLock<Option<Supervisor>> = OnceLock::new();
        static SHARED_NO_ISOLATION: OnceLock<Option<Supervisor>> = OnceLock::new();
        match self {
            Supervision::Default => SHARED
                .get_or_init(|| shared_supervisor(SupervisorConfig::default()))
                .clone(),
            Supervision::NoIsolation => SHARED_NO_ISOLATION
                .get_or_init(|| {
                    let defaults = SupervisorConfig::default();
                    shared_supervisor(SupervisorConfig {
                        tiers: defaults.tiers.clone().with_priority_only_mode(),
                        ..defaults
                    })
                })
                .clone(),
            Supervision::With(s) => Some(s.clone()),
            Supervision::Off => None,
        }
    }
}

fn shared_supervisor(config: SupervisorConfig) -> Option<Supervisor> {
    match Supervisor::new(config) {
        Ok(s) => Some(s),
        Err(error) => {
            tracing::warn!(%error, "Tokio-Pulse supervision unavailable; stages run unsupervised");
            None
        }
    }
}
