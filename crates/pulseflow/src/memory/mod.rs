//! The pipeline's memory budget: stages reserve the bytes they hold (accumulator state, for
//! example) and release them when done; crossing the budget is the signal to spill or to push
//! back. Statistics are real counts, not estimates.
//!
//! ```
//! use pulseflow::memory::MemoryBudget;
//!
//! let budget = MemoryBudget::new(1024);
//! let mut r = budget.try_reserve(600).expect("fits");
//! assert!(budget.try_reserve(600).is_err());
//! r.resize(100);
//! assert_eq!(budget.stats().in_use, 100);
//! drop(r);
//! assert_eq!(budget.stats().in_use, 0);
//! assert_eq!(budget.stats().peak, 600);
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A shared byte budget. Cloning shares it.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: Option<u64>,
    in_use: AtomicU64,
    peak: AtomicU64,
    total_reserved: AtomicU64,
}

/// The budget would be exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("memory budget exceeded: {requested} bytes requested, {available} of {limit} available")]
pub struct BudgetExceeded {
    /// Bytes asked for.
    pub requested: u64,
    /// Bytes still free.
    pub available: u64,
    /// The budget.
    pub limit: u64,
}

/// Figures of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// The budget in bytes, `None` when unlimited.
    pub limit: Option<u64>,
    /// Bytes reserved now.
    pub in_use: u64,
    /// Most bytes ever reserved at once.
    pub peak: u64,
    /// Bytes reserved over the budget's lifetime.
    pub total_reserved: u64,
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self::unlimited()
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self::with_limit(Some(limit))
    }

    /// A budget that never refuses (but still counts).
    pub fn unlimited() -> Self {
        Self::with_limit(None)
    }

    fn with_limit(limit: Option<u64>) -> Self {
        Self {
            inner: Arc::new(Inner {
                limit,
                in_use: AtomicU64::new(0),
                peak: AtomicU64::new(0),
                total_reserved: AtomicU64::new(0),
            }),
        }
    }

    /// Reserves `bytes` if they fit.
    pub fn try_reserve(&self, bytes: u64) -> Result<Reservation, BudgetExceeded> {
        if !self.grow(bytes, true) {
            let in_use = self.inner.in_use.load(Relaxed);
            let limit = self.inner.limit.unwrap_or(u64::MAX);
            return Err(BudgetExceeded {
                requested: bytes,
                available: limit.saturating_sub(in_use),
                limit,
            });
        }
        Ok(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// Reserves `bytes` even past the budget (the caller then spills or waits).
    pub fn reserve(&self, bytes: u64) -> Reservation {
        self.grow(bytes, false);
        Reservation {
            budget: self.clone(),
            bytes,
        }
    }

    /// Whether more is reserved than the budget allows.
    pub fn is_over(&self) -> bool {
        self.inner
            .limit
            .is_some_and(|l| self.inner.in_use.load(Relaxed) > l)
    }

    /// The current figures.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            limit: self.inner.limit,
            in_use: self.inner.in_use.load(Relaxed),
            peak: self.inner.peak.load(Relaxed),
            total_reserved: self.inner.total_reserved.load(Relaxed),
        }
    }

    fn grow(&self, bytes: u64, checked: bool) -> bool {
        let limit = self.inner.limit.filter(|_| checked).unwrap_or(u64::MAX);
        let updated = self.inner.in_use.fetch_update(Relaxed, Relaxed, |cur| {
            let next = cur.checked_add(bytes)?;
            (next <= limit).then_some(next)
        });
        match updated {
            Ok(prev) => {
                self.inner.peak.fetch_max(prev + bytes, Relaxed);
                self.inner.total_reserved.fetch_add(bytes, Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    fn shrink(&self, bytes: u64) {
        self.inner.in_use.fetch_sub(bytes, Relaxed);
    }
}

/// Bytes held from a [`MemoryBudget`]; released on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: MemoryBudget,
    bytes: u64,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Changes the bytes held (growing may pass the budget; check [`MemoryBudget::is_over`]).
    pub fn resize(&mut self, bytes: u64) {
        if bytes > self.bytes {
            self.budget.grow(bytes - self.bytes, false);
        } else {
            self.budget.shrink(self.bytes - bytes);
        }
        self.bytes = bytes;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.shrink(self.bytes);
    }
}
