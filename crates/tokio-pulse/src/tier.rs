//! Tiers and the [`TierManager`] that moves tasks between them.
//!
//! | tier | what happens to the task |
//! |---|---|
//! | [`Tier::Monitor`] | polls are timed, nothing else |
//! | [`Tier::Warn`] | a `tracing` warning and a metric on each violation |
//! | [`Tier::Yield`] | after a long poll the task gives way once, so its worker serves its queue |
//! | [`Tier::Isolate`] | the task runs on the isolation runtime, whose threads the OS limits |
//!
//! Escalation is immediate: a violation raises the score (see [`crate::budget`]) and the task
//! goes to the highest tier whose threshold the score reaches; a violation measured only in
//! wall-clock time ([`TierManager::on_unconfirmed_poll`]) goes no higher than Warn. Demotion is slow, one tier at a
//! time, and needs all of: no violation for [`TierConfig::cooldown`], no tier change for as
//! long, and the decayed score below the tier's threshold by the hysteresis margin. A task that
//! oscillates around a threshold therefore does not flap.
//!
//! Decisions are pure functions of the record, the poll duration and `now`, so they can be
//! tested with any clock:
//!
//! ```
//! use std::time::Duration;
//! use tokio_pulse::budget::TaskBudget;
//! use tokio_pulse::tier::{Tier, TierConfig, TierManager};
//!
//! let manager = TierManager::new(TierConfig::default()).expect("valid config");
//! let mut task = TaskBudget::new(0);
//! // A 20 ms poll against the default 1 ms budget goes straight to Isolate.
//! let change = manager.on_poll(&mut task, 20_000_000, 20_000_000);
//! assert_eq!(change.map(|c| c.to), Some(Tier::Isolate));
//! // Long after, with no violation, the task is reviewed and steps down one tier.
//! let review = manager.review(&mut task, 60_000_000_000);
//! assert_eq!(review.change.map(|c| c.to), Some(Tier::Yield));
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::budget::TaskBudget;

/// How closely a task is watched and how hard it is restrained.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Tier {
    /// Timed only.
    #[default]
    Monitor = 0,
    /// Violations are reported.
    Warn = 1,
    /// The task yields after long polls.
    Yield = 2,
    /// The task runs on the isolation runtime.
    Isolate = 3,
}

impl Tier {
    /// All tiers, lowest first.
    pub const ALL: [Tier; 4] = [Tier::Monitor, Tier::Warn, Tier::Yield, Tier::Isolate];

    /// The tier's name in lower case, as used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Monitor => "monitor",
            Tier::Warn => "warn",
            Tier::Yield => "yield",
            Tier::Isolate => "isolate",
        }
    }

    /// The tier stored as `value` by `tier as u8`; out-of-range values saturate to Isolate.
    pub fn from_u8(value: u8) -> Tier {
        match value {
            0 => Tier::Monitor,
            1 => Tier::Warn,
            2 => Tier::Yield,
            _ => Tier::Isolate,
        }
    }

    fn below(self) -> Tier {
        Tier::from_u8((self as u8).saturating_sub(1))
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Configuration of the tiers.
#[derive(Debug, Clone, PartialEq)]
pub struct TierConfig {
    /// A poll longer than this is a violation.
    pub poll_budget: Duration,
    /// Score at which a task enters Warn.
    pub warn_at: u32,
    /// Score at which a task enters Yield.
    pub yield_at: u32,
    /// Score at which a task enters Isolate.
    pub isolate_at: u32,
    /// Most points a single poll can add.
    pub max_poll_score: u32,
    /// Most points a task can hold (bounds how long a reformed task waits to come back).
    pub max_score: u32,
    /// Hysteresis, in percent of a tier's threshold: a task leaves the tier only once its
    /// score is at most `threshold * (100 - hysteresis_percent) / 100`.
    pub hysteresis_percent: u8,
    /// One score point is forgiven per `decay` of time.
    pub decay: Duration,
    /// Minimum time without violation, and since the last tier change, before a demotion.
    pub cooldown: Duration,
    /// Whether the Isolate tier may be entered; when false, Yield is the highest tier.
    pub isolation_enabled: bool,
}

impl Default for TierConfig {
    fn default() -> Self {
        Self {
            poll_budget: Duration::from_millis(1),
            warn_at: 1,
            yield_at: 3,
            isolate_at: 8,
            max_poll_score: 16,
            max_score: 32,
            hysteresis_percent: 50,
            decay: Duration::from_millis(50),
            cooldown: Duration::from_millis(500),
            isolation_enabled: true,
        }
    }
}

/// A [`TierConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TierConfigError {
    /// The poll budget is zero.
    #[error("poll_budget must be greater than zero")]
    ZeroBudget,
    /// The decay interval is zero.
    #[error("decay must be greater than zero")]
    ZeroDecay,
    /// Thresholds are not `0 < warn_at <= yield_at <= isolate_at <= max_score`.
    #[error(
        "thresholds must satisfy 0 < warn_at ({warn}) <= yield_at ({yield_at}) <= isolate_at ({isolate}) <= max_score ({max})"
    )]
    Thresholds {
        /// `warn_at`.
        warn: u32,
        /// `yield_at`.
        yield_at: u32,
        /// `isolate_at`.
        isolate: u32,
        /// `max_score`.
        max: u32,
    },
    /// `hysteresis_percent` is above 100.
    #[error("hysteresis_percent must be at most 100, got {0}")]
    Hysteresis(u8),
    /// `max_poll_score` is zero.
    #[error("max_poll_score must be greater than zero")]
    ZeroPollScore,
}

impl TierConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), TierConfigError> {
        if self.poll_budget.is_zero() {
            return Err(TierConfigError::ZeroBudget);
        }
        if self.decay.is_zero() {
            return Err(TierConfigError::ZeroDecay);
        }
        if self.max_poll_score == 0 {
            return Err(TierConfigError::ZeroPollScore);
        }
        if !(0 < self.warn_at
            && self.warn_at <= self.yield_at
            && self.yield_at <= self.isolate_at
            && self.isolate_at <= self.max_score)
        {
            return Err(TierConfigError::Thresholds {
                warn: self.warn_at,
                yield_at: self.yield_at,
                isolate: self.isolate_at,
                max: self.max_score,
            });
        }
        if self.hysteresis_percent > 100 {
            return Err(TierConfigError::Hysteresis(self.hysteresis_percent));
        }
        Ok(())
    }

    /// The same configuration with the Isolate tier disabled (for when the OS cannot limit a
    /// thread's CPU at all).
    pub fn with_priority_only_mode(mut self) -> Self {
        self.isolation_enabled = false;
        self
    }

    fn threshold(&self, tier: Tier) -> u32 {
        match tier {
            Tier::Monitor => 0,
            Tier::Warn => self.warn_at,
            Tier::Yield => self.yield_at,
            Tier::Isolate => self.isolate_at,
        }
    }

    fn tier_for(&self, score: u32) -> Tier {
        let tier = if score >= self.isolate_at {
            Tier::Isolate
        } else if score >= self.yield_at {
            Tier::Yield
        } else if score >= self.warn_at {
            Tier::Warn
        } else {
            Tier::Monitor
        };
        if tier == Tier::Isolate && !self.isolation_enabled {
            Tier::Yield
        } else {
            tier
        }
    }
}

/// A change of tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The tier before.
    pub from: Tier,
    /// The tier after.
    pub to: Tier,
}

/// The outcome of [`TierManager::review`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Review {
    /// The demotion made, if any.
    pub change: Option<Transition>,
    /// When the task should be reviewed next (`u64::MAX` when it is at Monitor).
    pub next_review_ns: u64,
}

/// Decides tiers from poll durations. Holds the configuration and counts transitions.
#[derive(Debug)]
pub struct TierManager {
    config: TierConfig,
    budget_ns: u64,
    decay_ns: u64,
    cooldown_ns: u64,
    escalations: AtomicU64,
    demotions: AtomicU64,
}

impl TierManager {
    /// A manager for `config`.
    pub fn new(config: TierConfig) -> Result<Self, TierConfigError> {
        config.validate()?;
        Ok(Self {
            budget_ns: duration_ns(config.poll_budget),
            decay_ns: duration_ns(config.decay),
            cooldown_ns: duration_ns(config.cooldown),
            config,
            escalations: AtomicU64::new(0),
            demotions: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TierConfig {
        &self.config
    }

    /// Tier changes upward so far.
    pub fn escalations(&self) -> u64 {
        self.escalations.load(Ordering::Relaxed)
    }

    /// Tier changes downward so far.
    pub fn demotions(&self) -> u64 {
        self.demotions.load(Ordering::Relaxed)
    }

    /// Whether a poll of `poll_ns` is a violation.
    #[inline]
    pub fn is_violation(&self, poll_ns: u64) -> bool {
        poll_ns > self.budget_ns
    }

    /// Records a poll of `poll_ns` that ended at `now_ns`; returns the escalation it caused.
    ///
    /// Polls within budget change nothing here (demotion is [`review`](Self::review)'s job).
    pub fn on_poll(&self, task: &mut TaskBudget, poll_ns: u64, now_ns: u64) -> Option<Transition> {
        self.record(task, poll_ns, now_ns, Tier::Isolate)
    }

    /// Records a violation known only by wall-clock time: the thread may have been preempted
    /// during the poll, so it raises the task to [`Tier::Warn`] at most (its score stays below
    /// the Yield threshold), and a task already above Warn only has it counted, without
    /// delaying its demotion. The supervisor measures the CPU time of the poll after a long
    /// one, so a task that really hogs its worker goes further on its next long poll, while
    /// one that was only preempted calms down again.
    ///
    /// ```
    /// use tokio_pulse::budget::TaskBudget;
    /// use tokio_pulse::tier::{Tier, TierConfig, TierManager};
    ///
    /// let manager = TierManager::new(TierConfig::default()).expect("valid config");
    /// let mut task = TaskBudget::new(0);
    /// let change = manager.on_unconfirmed_poll(&mut task, 20_000_000, 20_000_000);
    /// assert_eq!(change.map(|c| c.to), Some(Tier::Warn));
    /// // The next long poll, measured in CPU time, escalates as usual.
    /// let change = manager.on_poll(&mut task, 20_000_000, 40_000_000);
    /// assert_eq!(change.map(|c| c.to), Some(Tier::Isolate));
    /// ```
    pub fn on_unconfirmed_poll(
        &self,
        task: &mut TaskBudget,
        poll_ns: u64,
        now_ns: u64,
    ) -> Option<Transition> {
        self.record(task, poll_ns, now_ns, Tier::Warn)
    }

    fn record(
        &self,
        task: &mut TaskBudget,
        poll_ns: u64,
        now_ns: u64,
        ceiling: Tier,
    ) -> Option<Transition> {
        if !self.is_violation(poll_ns) {
            return None;
        }
        if task.tier > ceiling {
            task.violations = task.violations.saturating_add(1);
            return None;
        }
        task.decay(now_ns, self.decay_ns);
        let points = (poll_ns / self.budget_ns).clamp(1, u64::from(self.config.max_poll_score));
        let before = task.score;
        task.score = (before.saturating_add(points as u32)).min(self.config.max_score);
        let mut target = self.config.tier_for(task.score);
        if ceiling < Tier::Isolate {
            // Stay below the next tier's threshold (never lowering a score already above it),
            // and never go past the ceiling by this poll.
            let next = self.config.threshold(Tier::from_u8(ceiling as u8 + 1));
            let cap = next
                .saturating_sub(1)
                .max(self.config.threshold(ceiling))
                .max(before);
            task.score = task.score.min(cap);
            target = self.config.tier_for(task.score).min(ceiling.max(task.tier));
        }
        task.violations = task.violations.saturating_add(1);
        task.last_violation_ns = now_ns;
        if target > task.tier {
            let change = Transition {
                from: task.tier,
                to: target,
            };
            task.tier = target;
            task.last_change_ns = now_ns;
            self.escalations.fetch_add(1, Ordering::Relaxed);
            Some(change)
        } else {
            None
        }
    }

    /// Looks at a task that has not violated recently and demotes it one tier if it has
    /// behaved for long enough.
    pub fn review(&self, task: &mut TaskBudget, now_ns: u64) -> Review {
        if task.tier == Tier::Monitor {
            return Review {
                change: None,
                next_review_ns: u64::MAX,
            };
        }
        task.decay(now_ns, self.decay_ns);
        let calm_since = task.last_violation_ns.max(task.last_change_ns);
        let calm_until = calm_since.saturating_add(self.cooldown_ns);
        let threshold = self.config.threshold(task.tier);
        let leave_at = u64::from(threshold) * u64::from(100 - self.config.hysteresis_percent) / 100;
        let leave_at = leave_at.min(u64::from(threshold.saturating_sub(1))) as u32;
        if now_ns < calm_until {
            return Review {
                change: None,
                next_review_ns: calm_until,
            };
        }
        if task.score > leave_at {
            let wait = u64::from(task.score - leave_at).saturating_mul(self.decay_ns);
            return Review {
                change: None,
                next_review_ns: now_ns.saturating_add(wait),
            };
        }
        let change = Transition {
            from: task.tier,
            to: task.tier.below(),
        };
        task.tier = change.to;
        task.last_change_ns = now_ns;
        self.demotions.fetch_add(1, Ordering::Relaxed);
        let next_review_ns = if task.tier == Tier::Monitor {
            u64::MAX
        } else {
            now_ns.saturating_add(self.cooldown_ns)
        };
        Review {
            change: Some(change),
            next_review_ns,
        }
    }
}

fn duration_ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// Counters of one worker thread: written by that thread only, read by anyone.
#[derive(Debug, Default)]
pub struct WorkerStats {
    polls: AtomicU64,
    violations: AtomicU64,
    tasks: AtomicU64,
}

impl WorkerStats {
    /// Adds `n` polls (single writer: a load and a store, no atomic read-modify-write).
    #[inline]
    pub(crate) fn add_polls(&self, n: u64) {
        let v = self.polls.load(Ordering::Relaxed);
        self.polls.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    /// Counts one violation.
    pub(crate) fn add_violation(&self) {
        self.violations.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one task that started on this worker.
    pub(crate) fn add_task(&self) {
        self.tasks.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> WorkerStatsSnapshot {
        WorkerStatsSnapshot {
            polls: self.polls.load(Ordering::Relaxed),
            violations: self.violations.load(Ordering::Relaxed),
            tasks: self.tasks.load(Ordering::Relaxed),
        }
    }
}

/// What one worker thread has done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerStatsSnapshot {
    /// Supervised polls run on the worker.
    pub polls: u64,
    /// Polls over budget.
    pub violations: u64,
    /// Supervised tasks first polled on the worker.
    pub tasks: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn manager() -> TierManager {
        TierManager::new(TierConfig::default()).expect("default config is valid")
    }

    #[test]
    fn polls_within_budget_change_nothing() {
        let m = manager();
        let mut t = TaskBudget::new(0);
        for i in 0..100 {
            assert_eq!(m.on_poll(&mut t, MS, i * MS), None);
        }
        assert_eq!(t.tier(), Tier::Monitor);
        assert_eq!(t.score(), 0);
    }

    #[test]
    fn escalates_through_tiers_by_score() {
        let m = manager();
        let mut t = TaskBudget::new(0);
        // 1.5 ms: one point -> Warn.
        let c = m.on_poll(&mut t, 3 * MS / 2, 10 * MS);
        assert_eq!(
            c,
            Some(Transition {
                from: Tier::Monitor,
                to: Tier::Warn
            })
        );
        // 2 ms: two points -> 3 -> Yield.
        let c = m.on_poll(&mut t, 2 * MS, 11 * MS);
        assert_eq!(c.map(|c| c.to), Some(Tier::Yield));
        // 5 ms: five points -> 8 -> Isolate.
        let c = m.on_poll(&mut t, 5 * MS, 12 * MS);
        assert_eq!(c.map(|c| c.to), Some(Tier::Isolate));
        assert_eq!(t.violations(), 3);
        assert_eq!(m.escalations(), 3);
    }

    #[test]
    fn unconfirmed_violations_stop_at_warn() {
        let m = manager();
        let mut t = TaskBudget::new(0);
        let c = m.on_unconfirmed_poll(&mut t, 500 * MS, 500 * MS);
        assert_eq!(c.map(|c| c.to), Some(Tier::Warn));
        assert_eq!(t.score(), TierConfig::default().yield_at - 1);
        // More of them, back to back, still leave the task at Warn.
        for i in 1..10 {
            assert_eq!(
                m.on_unconfirmed_poll(&mut t, 500 * MS, (500 + i) * MS),
                None
            );
        }
        assert_eq!(t.tier(), Tier::Warn);
        assert_eq!(t.violations(), 10);
        // One confirmed 2 ms poll is enough for Yield from there.
        let c = m.on_poll(&mut t, 2 * MS, 520 * MS);
        assert_eq!(c.map(|c| c.to), Some(Tier::Yield));
        // At Yield, an unconfirmed poll is counted and changes nothing else: it neither
        // escalates nor delays the demotion.
        let score = t.score();
        assert_eq!(m.on_unconfirmed_poll(&mut t, 50 * MS, 521 * MS), None);
        assert_eq!(t.score(), score);
        assert_eq!(t.last_violation_ns(), 520 * MS);
        assert_eq!(t.violations(), 12);
        assert_eq!(t.tier(), Tier::Yield);
    }

    #[test]
    fn unconfirmed_ceiling_holds_when_warn_and_yield_share_a_threshold() {
        let m = TierManager::new(TierConfig {
            warn_at: 3,
            yield_at: 3,
            ..TierConfig::default()
        })
        .expect("valid");
        let mut t = TaskBudget::new(0);
        let c = m.on_unconfirmed_poll(&mut t, 100 * MS, 100 * MS);
        assert_eq!(c.map(|c| c.to), Some(Tier::Warn));
    }

    #[test]
    fn severe_poll_jumps_and_score_is_capped() {
        let m = manager();
        let mut t = TaskBudget::new(0);
        let c = m.on_poll(&mut t, 500 * MS, 500 * MS);
        assert_eq!(
            c,
            Some(Transition {
                from: Tier::Monitor,
                to: Tier::Isolate
            })
        );
        assert_eq!(t.score(), 16);
        m.on_poll(&mut t, 500 * MS, 501 * MS);
        m.on_poll(&mut t, 500 * MS, 502 * MS);
        assert_eq!(t.score(), 32, "capped at max_score");
    }

    #[test]
    fn isolation_disabled_stops_at_yield() {
        let m = TierManager::new(TierConfig::default().with_priority_only_mode())
            .expect("valid config");
        let mut t = TaskBudget::new(0);
        assert_eq!(
            m.on_poll(&mut t, 100 * MS, 100 * MS).map(|c| c.to),
            Some(Tier::Yield)
        );
    }

    #[test]
    fn demotion_needs_cooldown_and_hysteresis() {
        let m = manager();
        let mut t = TaskBudget::new(0);
        // Score 16 at t=20ms: Isolate.
        m.on_poll(&mut t, 20 * MS, 20 * MS);
        assert_eq!(t.tier(), Tier::Isolate);
        // Before the cooldown (500 ms) nothing happens, and the next review is at its end.
        let r = m.review(&mut t, 300 * MS);
        assert_eq!(r.change, None);
        assert_eq!(r.next_review_ns, 520 * MS);
        // At 520 ms the score has decayed by 10 points (one per 50 ms) to 6; Isolate's
        // threshold is 8 and hysteresis 50 % means it must fall to 4: not yet.
        let r = m.review(&mut t, 520 * MS);
        assert_eq!(r.change, None);
        assert_eq!(t.score(), 6);
        assert_eq!(r.next_review_ns, 620 * MS);
        // At 620 ms the score is 4: down to Yield (one tier only).
        let r = m.review(&mut t, 620 * MS);
        assert_eq!(r.change.map(|c| c.to), Some(Tier::Yield));
        assert_eq!(r.next_review_ns, 1120 * MS);
        // Another cooldown must pass since that change before the next step.
        assert_eq!(m.review(&mut t, 700 * MS).change, None);
        let r = m.review(&mut t, 1120 * MS);
        assert_eq!(r.change.map(|c| c.to), Some(Tier::Warn));
        let r = m.review(&mut t, 1620 * MS);
        assert_eq!(r.change.map(|c| c.to), Some(Tier::Monitor));
        assert_eq!(r.next_review_ns, u64::MAX);
        assert_eq!(m.demotions(), 3);
    }

    #[test]
    fn hysteresis_prevents_flapping() {
        let m = manager();
        let mut t = TaskBudget::new(0);
        // Reach Yield with score 3.
        m.on_poll(&mut t, 3 * MS, 3 * MS);
        assert_eq!(t.tier(), Tier::Yield);
        // The task keeps overrunning a little every 400 ms. Its score decays to almost
        // nothing in between, but a violation within every cooldown keeps it in Yield: it
        // never drops out and re-enters.
        let mut now = 3 * MS;
        for _ in 0..10 {
            now += 400 * MS;
            assert_eq!(m.review(&mut t, now).change, None);
            m.on_poll(&mut t, 3 * MS / 2, now);
            assert_eq!(t.tier(), Tier::Yield);
        }
        assert_eq!(m.demotions(), 0);
        assert_eq!(m.escalations(), 1);
    }

    #[test]
    fn re_escalation_after_demotion_is_immediate() {
        let m = manager();
        let mut t = TaskBudget::new(0);
        m.on_poll(&mut t, 3 * MS, 0);
        assert_eq!(t.tier(), Tier::Yield);
        let r = m.review(&mut t, 10_000 * MS);
        assert_eq!(r.change.map(|c| c.to), Some(Tier::Warn));
        // A single heavy poll sends it back up without waiting.
        assert_eq!(
            m.on_poll(&mut t, 9 * MS, 10_001 * MS).map(|c| c.to),
            Some(Tier::Isolate)
        );
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = TierConfig {
            poll_budget: Duration::ZERO,
            ..TierConfig::default()
        };
        assert_eq!(bad.validate(), Err(TierConfigError::ZeroBudget));
        let bad = TierConfig {
            warn_at: 5,
            yield_at: 2,
            ..TierConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(TierConfigError::Thresholds { .. })
        ));
        let bad = TierConfig {
            hysteresis_percent: 101,
            ..TierConfig::default()
        };
        assert_eq!(bad.validate(), Err(TierConfigError::Hysteresis(101)));
    }

    #[test]
    fn worker_stats_count() {
        let w = WorkerStats::default();
        w.add_polls(3);
        w.add_violation();
        w.add_task();
        assert_eq!(
            w.snapshot(),
            WorkerStatsSnapshot {
                polls: 3,
                violations: 1,
                tasks: 1
            }
        );
    }
}
