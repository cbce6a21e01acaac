//! Metric names and handles. Everything goes through the `metrics` facade; install a recorder
//! before creating the [`Supervisor`](super::Supervisor) so its cached handles reach it.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `tokio_pulse_task_tier` | gauge | `task` | tier of a named task (0 Monitor … 3 Isolate), set when it changes tier and back to 0 when it ends |
//! | `tokio_pulse_tasks` | gauge | `tier` | live supervised tasks in each tier |
//! | `tokio_pulse_violations_total` | counter | `tier` | polls over budget, by the tier after the poll |
//! | `tokio_pulse_tier_transitions_total` | counter | `from`, `to` | tier changes |
//! | `tokio_pulse_migrations_total` | counter | `direction` (`isolate`, `return`) | moves between runtimes |
//! | `tokio_pulse_polls_total` | counter | | supervised polls |
//! | `tokio_pulse_poll_duration_seconds` | histogram | | every poll over budget, and one in 64 of the others |
//! | `tokio_pulse_isolation_cpu_seconds` | gauge | | CPU time used by the isolation runtime's threads |
//! | `tokio_pulse_isolation_cpu_percent` | gauge | | their share of the machine since the previous sample |
//!
//! Only tasks spawned with [`Supervisor::spawn_named`](super::Supervisor::spawn_named) get a
//! `tokio_pulse_task_tier` series: a label per anonymous task would grow without bound in a
//! program that spawns many; those are counted in `tokio_pulse_tasks` by tier. A metrics
//! recorder keeps a series once it has seen its label, so the names that get one are bounded
//! too: the first [`MAX_TASK_GAUGES`] distinct names (a task that reuses a name, like the
//! stages of a pipeline run again, reuses its series); tasks named after that are counted by
//! tier only.

use std::collections::HashSet;
use std::sync::OnceLock;

use metrics::{Counter, Histogram};
use parking_lot::Mutex;

use crate::tier::{Tier, Transition};

use super::task::TaskShared;

/// Gauge: tier of a task.
pub const TASK_TIER: &str = "tokio_pulse_task_tier";
/// Gauge: live tasks per tier.
pub const TASKS: &str = "tokio_pulse_tasks";
/// Counter: violations.
pub const VIOLATIONS: &str = "tokio_pulse_violations_total";
/// Counter: tier transitions.
pub const TRANSITIONS: &str = "tokio_pulse_tier_transitions_total";
/// Counter: migrations.
pub const MIGRATIONS: &str = "tokio_pulse_migrations_total";
/// Counter: supervised polls.
pub const POLLS: &str = "tokio_pulse_polls_total";
/// Histogram: poll duration in seconds.
pub const POLL_DURATION: &str = "tokio_pulse_poll_duration_seconds";
/// Gauge: CPU seconds of the isolation runtime.
pub const ISOLATION_CPU_SECONDS: &str = "tokio_pulse_isolation_cpu_seconds";
/// Gauge: CPU percent of the isolation runtime.
pub const ISOLATION_CPU_PERCENT: &str = "tokio_pulse_isolation_cpu_percent";

/// Handles resolved once.
#[derive(Debug)]
pub(crate) struct Handles {
    pub(crate) poll_duration: Histogram,
    pub(crate) polls: Counter,
    violations: [Counter; 4],
}

impl Handles {
    pub(crate) fn new() -> Self {
        Self {
            poll_duration: metrics::histogram!(POLL_DURATION),
            polls: metrics::counter!(POLLS),
            violations: Tier::ALL.map(|t| metrics::counter!(VIOLATIONS, "tier" => t.as_str())),
        }
    }

    pub(crate) fn violation(&self, tier: Tier) {
        self.violations[tier as usize].increment(1);
    }
}

/// How many distinct task names get a `tokio_pulse_task_tier` series of their own.
pub const MAX_TASK_GAUGES: usize = 512;

/// The task names that have a gauge, at most `max`.
struct Names {
    max: usize,
    names: Mutex<HashSet<String>>,
}

impl Names {
    fn new(max: usize) -> Self {
        Self {
            max,
            names: Mutex::new(HashSet::new()),
        }
    }

    /// Whether `name` has (or may now get) a gauge.
    fn admit(&self, name: &str) -> bool {
        let mut names = self.names.lock();
        if names.contains(name) {
            return true;
        }
        if names.len() >= self.max {
            return false;
        }
        names.insert(name.to_owned());
        true
    }
}

fn task_gauges() -> &'static Names {
    static NAMES: OnceLock<Names> = OnceLock::new();
    NAMES.get_or_init(|| Names::new(MAX_TASK_GAUGES))
}

pub(crate) fn transition(task: &TaskShared, change: Transition) {
    metrics::counter!(TRANSITIONS, "from" => change.from.as_str(), "to" => change.to.as_str())
        .increment(1);
    if task.named && task_gauges().admit(&task.label) {
        metrics::gauge!(TASK_TIER, "task" => task.label.clone()).set(f64::from(change.to as u8));
    }
}

/// A named task that ended above Monitor leaves its gauge at 0, not at its last tier.
pub(crate) fn task_gone(task: &TaskShared, tier: Tier) {
    if task.named && tier != Tier::Monitor && task_gauges().admit(&task.label) {
        metrics::gauge!(TASK_TIER, "task" => task.label.clone()).set(0.0);
    }
}

pub(crate) fn migration(direction: &'static str) {
    metrics::counter!(MIGRATIONS, "direction" => direction).increment(1);
}

pub(crate) fn tier_counts(counts: [u64; 4]) {
    for (tier, count) in Tier::ALL.iter().zip(counts) {
        metrics::gauge!(TASKS, "tier" => tier.as_str()).set(count as f64);
    }
}

pub(crate) fn isolation_cpu(total_ns: u64, percent: f32) {
    metrics::gauge!(ISOLATION_CPU_SECONDS).set(total_ns as f64 / 1e9);
    metrics::gauge!(ISOLATION_CPU_PERCENT).set(f64::from(percent));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_with_a_gauge_are_bounded_and_reused() {
        let names = Names::new(3);
        assert!(names.admit("a") && names.admit("b") && names.admit("c"));
        assert!(!names.admit("d"), "a fourth name gets no series");
        assert!(names.admit("a"), "a known name keeps its series");
        assert_eq!(names.names.lock().len(), 3);
    }
}
