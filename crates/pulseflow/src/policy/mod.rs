//! Policies a stage or edge is configured with: buffering, backpressure, error handling,
//! circuit breaking, parallelism and ordering, and the [`PolicyRegistry`] that names them.
//!
//! ```
//! use std::time::Duration;
//! use pulseflow::policy::{ErrorPolicy, PolicyRegistry};
//!
//! let mut registry = PolicyRegistry::default();
//! registry.add_error_policy("flaky-io", ErrorPolicy::retry(3, Duration::from_millis(10)));
//! assert!(registry.error_policy("flaky-io").is_some());
//! assert!(registry.error_policy("missing").is_none());
//! ```

mod registry;

pub use registry::{PolicyRef, PolicyRegistry};

use std::time::Duration;

/// What a full buffer does with one more item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DropPolicy {
    /// The sender waits until there is room: nothing is dropped.
    #[default]
    Block,
    /// The oldest queued items are evicted to make room; each eviction is counted.
    DropOldest,
    /// The new items that do not fit are refused; each refusal is counted.
    DropNewest,
}

impl DropPolicy {
    /// The reason label used in drop counters (`"drop_oldest"`, `"drop_newest"`).
    pub fn reason(self) -> &'static str {
        match self {
            DropPolicy::Block => "block",
            DropPolicy::DropOldest => "drop_oldest",
            DropPolicy::DropNewest => "drop_newest",
        }
    }
}

/// The input buffer of a stage: its capacity in items and what happens when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BufferPolicy {
    /// Capacity in items (not batches). Must be at least 1.
    pub capacity: usize,
    /// Behaviour when full.
    pub drop_policy: DropPolicy,
}

impl BufferPolicy {
    /// The default input buffer: 8192 items, blocking.
    pub const DEFAULT: BufferPolicy = BufferPolicy {
        capacity: 8192,
        drop_policy: DropPolicy::Block,
    };

    /// A buffer of `capacity` items with the given drop policy.
    pub fn new(capacity: usize, drop_policy: DropPolicy) -> Self {
        Self {
            capacity,
            drop_policy,
        }
    }
}

impl Default for BufferPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How a stage limits what flows into it (seed 000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackpressureStrategy {
    /// A bounded buffer with a drop policy.
    Bounded {
        /// Capacity in items.
        capacity: usize,
        /// Behaviour when full.
        drop_policy: DropPolicy,
    },
    /// Credits: never more items in flight than credits.
    CreditBased {
        /// Credits available at start.
        initial: usize,
        /// Credits returned before waiting senders are woken.
        replenish_threshold: usize,
    },
    /// Token bucket: `rate` items per second with bursts of at most `burst`.
    RateShaping {
        /// Items per second.
        rate: u32,
        /// Largest burst.
        burst: u32,
    },
    /// Batch size adapted to measured latency and queue depth, within bounds.
    Adaptive {
        /// Smallest batch.
        min_batch: usize,
        /// Largest batch.
        max_batch: usize,
    },
    /// Demand-driven: upstream produces only what downstream requested.
    ReactivePull {
        /// Most items outstanding at once.
        window: usize,
    },
}

/// What a stage does with an item whose processing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ErrorPolicy {
    /// Try again up to `max_retries` times, waiting `backoff`, then twice as long and so on,
    /// with jitter. An item that still fails is dead-lettered.
    Retry {
        /// Retries after the first attempt.
        max_retries: u32,
        /// The first wait.
        backoff: Duration,
    },
    /// Send the item with its error, stage id and attempt count to the dead-letter sink.
    #[default]
    DeadLetter,
    /// End the run with this error, after draining what can be drained.
    Fail,
    /// Count the error and drop the item.
    Ignore,
}

impl ErrorPolicy {
    /// `Retry` with `max_retries` retries starting at `backoff`.
    pub fn retry(max_retries: u32, backoff: Duration) -> Self {
        ErrorPolicy::Retry {
            max_retries,
            backoff,
        }
    }

    /// A short name for labels and graph exports.
    pub fn label(&self) -> String {
        match self {
            ErrorPolicy::Retry { max_retries, .. } => format!("retry({max_retries})"),
            ErrorPolicy::DeadLetter => "dead_letter".into(),
            ErrorPolicy::Fail => "fail".into(),
            ErrorPolicy::Ignore => "ignore".into(),
        }
    }
}

/// When a circuit breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitBreakerPolicy {
    /// Error rate (0..1) over the window above which the breaker opens.
    pub error_threshold: f64,
    /// A single call slower than this opens the breaker.
    pub latency_threshold: Duration,
    /// Length of the sliding window of outcomes.
    pub window: Duration,
    /// Outcomes needed in the window before the error rate counts.
    pub minimum_throughput: u32,
    /// How long the breaker stays open before letting a probe through.
    pub cooldown: Duration,
}

/// How many workers run a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ParallelismHint {
    /// One worker, in order.
    #[default]
    Sequential,
    /// Exactly `n` workers.
    Fixed(usize),
    /// One worker per core.
    DynamicCpuBound,
    /// Workers added while the input queue is deep and removed when idle, within bounds.
    DynamicIoBound {
        /// Fewest workers.
        min: usize,
        /// Most workers.
        max: usize,
    },
}

impl ParallelismHint {
    /// `DynamicIoBound` between 1 and 4 workers per core.
    pub fn io_bound() -> Self {
        ParallelismHint::DynamicIoBound {
            min: 1,
            max: 4 * cores(),
        }
    }

    /// Workers started with the stage.
    pub fn initial_workers(&self) -> usize {
        match *self {
            ParallelismHint::Sequential => 1,
            ParallelismHint::Fixed(n) => n,
            ParallelismHint::DynamicCpuBound => cores(),
            ParallelismHint::DynamicIoBound { min, .. } => min.max(1),
        }
    }

    /// The largest number of workers the stage may run.
    pub fn max_workers(&self) -> usize {
        match *self {
            ParallelismHint::DynamicIoBound { max, .. } => max,
            other => other.initial_workers(),
        }
    }

    /// Whether the stage runs on exactly one worker.
    pub fn is_sequential(&self) -> bool {
        self.max_workers() <= 1
    }

    /// A short name for graph exports.
    pub fn label(&self) -> String {
        match self {
            ParallelismHint::Sequential => "sequential".into(),
            ParallelismHint::Fixed(n) => format!("fixed({n})"),
            ParallelismHint::DynamicCpuBound => "cpu_bound".into(),
            ParallelismHint::DynamicIoBound { min, max } => format!("io_bound({min}..{max})"),
        }
    }
}

/// Cores available to this process (at least 1).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The order in which a parallel stage's outputs reach the next stage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum ChannelOrdering {
    /// Whatever order the workers finish in.
    #[default]
    Unordered,
    /// The input order, restored after the parallel workers.
    Ordered,
    /// Items with the same key go to the same worker, so each key keeps its order.
    PartitionOrdered {
        /// Name of the key extractor, for display.
        key: String,
    },
}

impl ChannelOrdering {
    /// A short name for graph exports.
    pub fn label(&self) -> String {
        match self {
            ChannelOrdering::Unordered => "unordered".into(),
            ChannelOrdering::Ordered => "ordered".into(),
            ChannelOrdering::PartitionOrdered { key } => format!("partitioned({key})"),
        }
    }
}
