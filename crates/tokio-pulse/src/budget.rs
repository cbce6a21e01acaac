//! The per-task budget: a compact record of how a task has behaved.
//!
//! A poll that runs longer than the poll budget is a *violation*. Each violation adds to the
//! task's score as many points as whole budgets the poll used (capped), so one 20 ms poll
//! against a 1 ms budget weighs as much as twenty 1 ms overruns. The score decays by one
//! point per [`TierConfig::decay`](crate::tier::TierConfig::decay) of time, and the
//! [`TierManager`](crate::tier::TierManager) maps it to a [`Tier`].
//!
//! All times are nanoseconds on the caller's clock, so the record is deterministic under a
//! fake clock.
//!
//! ```
//! use tokio_pulse::budget::TaskBudget;
//! use tokio_pulse::tier::Tier;
//!
//! let budget = TaskBudget::new(0);
//! assert_eq!(budget.tier(), Tier::Monitor);
//! assert_eq!(budget.score(), 0);
//! assert!(std::mem::size_of::<TaskBudget>() <= 40);
//! ```

use crate::tier::Tier;

/// How one task has behaved: its tier, its decaying violation score and when things changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskBudget {
    pub(crate) score: u32,
    pub(crate) tier: Tier,
    pub(crate) violations: u32,
    /// When the score was last brought up to date (decay is applied lazily from here).
    pub(crate) score_at_ns: u64,
    pub(crate) last_violation_ns: u64,
    pub(crate) last_change_ns: u64,
}

impl TaskBudget {
    /// A fresh record at time `now_ns`: tier Monitor, score 0.
    pub fn new(now_ns: u64) -> Self {
        Self {
            score: 0,
            tier: Tier::Monitor,
            violations: 0,
            score_at_ns: now_ns,
            last_violation_ns: now_ns,
            last_change_ns: now_ns,
        }
    }

    /// The task's tier.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The violation score as of the last update (decay is applied when the manager looks).
    pub fn score(&self) -> u32 {
        self.score
    }

    /// Violations counted so far (saturating).
    pub fn violations(&self) -> u32 {
        self.violations
    }

    /// When the last violation happened.
    pub fn last_violation_ns(&self) -> u64 {
        self.last_violation_ns
    }

    /// When the tier last changed.
    pub fn last_change_ns(&self) -> u64 {
        self.last_change_ns
    }

    /// Forgives one point per `decay_ns` elapsed since the score was last updated.
    pub(crate) fn decay(&mut self, now_ns: u64, decay_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.score_at_ns);
        let points = elapsed / decay_ns.max(1);
        if points == 0 {
            return;
        }
        if points >= u64::from(self.score) {
            self.score = 0;
            self.score_at_ns = now_ns;
        } else {
            self.score -= points as u32;
            self.score_at_ns += points * decay_ns.max(1);
        }
    }
}
