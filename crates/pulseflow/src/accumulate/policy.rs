//! [`AccumulatorPolicy`]: when a key is flushed, and whether its state may go to disk.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::policy::ParallelismHint;

/// Limits and deadlines of an accumulator stage. Everything is off by default.
///
/// - `max_items` / `max_bytes`: a key reaching either is flushed (partial flush) at once.
/// - `max_latency`: a key is flushed this long after its first item, whatever happens.
/// - `completeness_ttl`: a key that received nothing for this long expires (TTL flush).
/// - `partial_flush`: a key flushed before it is complete emits what it has (with its
///   completeness score); without it, the key's items are dropped as `discarded_by_policy`.
/// - `closed_ttl`: a key that completed stays closed this long: its later items are dropped
///   as `discarded_by_policy` (one output per key, as for a template filled once), instead of
///   starting the key again.
/// - `spill_allowed`: over the memory budget, the coldest keys go to disk (in `spill_dir`,
///   a temporary directory removed at the end by default), in segment files of
///   `spill_segment_bytes`; a full segment is compacted once fewer than
///   `spill_compact_below` of its records are live.
///
/// ```
/// use std::time::Duration;
/// use pulseflow::accumulate::AccumulatorPolicy;
///
/// let policy = AccumulatorPolicy::default()
///     .with_max_items(100)
///     .with_completeness_ttl(Duration::from_secs(30))
///     .with_partial_flush(true)
///     .with_spill(true);
/// assert_eq!(policy.max_items, Some(100));
/// assert!(policy.has_deadlines());
///
/// // One output per key: a key that completed ignores its later items for an hour.
/// let once = AccumulatorPolicy::default().with_closed_ttl(Duration::from_secs(3600));
/// assert_eq!(once.closed_ttl, Some(Duration::from_secs(3600)));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccumulatorPolicy {
    /// Items per key before it is flushed.
    pub max_items: Option<u64>,
    /// Input bytes per key before it is flushed.
    pub max_bytes: Option<u64>,
    /// Longest time from a key's first item to its flush.
    pub max_latency: Option<Duration>,
    /// Longest time a key may stay without receiving an item.
    pub completeness_ttl: Option<Duration>,
    /// Emit incomplete keys when they are flushed early instead of discarding them.
    pub partial_flush: bool,
    /// How long a completed key stays closed (its later items dropped).
    pub closed_ttl: Option<Duration>,
    /// Spill cold keys to disk when the memory budget is exceeded.
    pub spill_allowed: bool,
    /// Where spill files go; a temporary directory (removed at the end) when `None`.
    pub spill_dir: Option<PathBuf>,
    /// Size of a spill segment file (default
    /// [`DEFAULT_SEGMENT_BYTES`](crate::accumulate::DEFAULT_SEGMENT_BYTES), 64 MiB).
    pub spill_segment_bytes: Option<u64>,
    /// Fraction of live records below which a full spill segment is compacted (default
    /// [`DEFAULT_COMPACT_BELOW`](crate::accumulate::DEFAULT_COMPACT_BELOW), 0.25).
    pub spill_compact_below: Option<f64>,
}

impl AccumulatorPolicy {
    /// Sets `max_items`.
    pub fn with_max_items(mut self, n: u64) -> Self {
        self.max_items = Some(n);
        self
    }

    /// Sets `max_bytes`.
    pub fn with_max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = Some(n);
        self
    }

    /// Sets `max_latency`.
    pub fn with_max_latency(mut self, d: Duration) -> Self {
        self.max_latency = Some(d);
        self
    }

    /// Sets `completeness_ttl`.
    pub fn with_completeness_ttl(mut self, d: Duration) -> Self {
        self.completeness_ttl = Some(d);
        self
    }

    /// Sets `closed_ttl`: a key that completed drops its later items for `d`, then starts
    /// again.
    pub fn with_closed_ttl(mut self, d: Duration) -> Self {
        self.closed_ttl = Some(d);
        self
    }

    /// Sets `partial_flush`.
    pub fn with_partial_flush(mut self, on: bool) -> Self {
        self.partial_flush = on;
        self
    }

    /// Sets `spill_allowed`.
    pub fn with_spill(mut self, on: bool) -> Self {
        self.spill_allowed = on;
        self
    }

    /// Spills into `dir` (kept after the run) instead of a temporary directory.
    pub fn with_spill_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spill_dir = Some(dir.into());
        self
    }

    /// Sets the spill log's segment size and compaction threshold (`spill_segment_bytes`,
    /// `spill_compact_below`).
    pub fn with_spill_segments(mut self, segment_bytes: u64, compact_below: f64) -> Self {
        self.spill_segment_bytes = Some(segment_bytes);
        self.spill_compact_below = Some(compact_below);
        self
    }

    /// Whether keys have deadlines (latency or TTL).
    pub fn has_deadlines(&self) -> bool {
        self.max_latency.is_some() || self.completeness_ttl.is_some()
    }
}

/// How an accumulator stage is described (seed `AccumulationDescriptor`): its policy, its
/// parallelism and optional weights of named parts of the completeness score.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccumulationDescriptor {
    /// The policy.
    pub policy: AccumulatorPolicy,
    /// Workers; keys are partitioned by hash so a key stays on one worker.
    pub parallelism: ParallelismHint,
    /// Weights of named parts of the completeness score (for example required variables).
    pub progress_weights: BTreeMap<String, f64>,
}
