//! The [`BackpressureController`] abstraction and the [`controller_for`] factory.
//!
//! A controller stands in front of a buffer (an edge, a stage's input, a connector) and is asked,
//! once per batch, how many of the batch's items may enter. Its answer is an [`Admission`] that
//! accounts for every item: admitted now, dropped by a named policy (already counted), or
//! deferred (still held by the caller, who may wait with
//! [`acquire`](BackpressureController::acquire) and ask again). Nothing vanishes.
//!
//! ```
//! use pulseflow::flow::{controller_for, Load};
//! use pulseflow::policy::BackpressureStrategy;
//!
//! let ctl = controller_for(&BackpressureStrategy::CreditBased { initial: 4, replenish_threshold: 1 })
//!     .expect("valid strategy");
//! let first = ctl.try_admit(3, 300, Load::default());
//! assert_eq!(first.admitted, 3);
//! let second = ctl.try_admit(3, 300, Load::default());
//! assert_eq!((second.admitted, second.deferred), (1, 2)); // only one credit left
//! ctl.on_processed(4, 400);
//! assert_eq!(ctl.metrics()["available_credits"], 4.0);
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::policy::BackpressureStrategy;

use super::adaptive::AdaptiveBatch;
use super::bounded::BoundedBuffer;
use super::credit::CreditBased;
use super::pull::ReactivePull;
use super::rate::RateShaping;

/// What the buffer behind a controller holds now, as the caller sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Items queued in the buffer.
    pub queue_depth: usize,
    /// Bytes held by the buffer (or by the stage behind it).
    pub pending_bytes: u64,
}

impl Load {
    /// A load of `queue_depth` items and no bytes.
    pub fn items(queue_depth: usize) -> Self {
        Self {
            queue_depth,
            pending_bytes: 0,
        }
    }
}

/// A controller's answer for one batch: every item of the batch is in exactly one of
/// `admitted`, `dropped` or `deferred`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use = "an admission says which items may enter; ignoring it loses or floods items"]
pub struct Admission {
    /// Items that may enter now: the first ones of the batch, except under `DropOldest` where
    /// they are the last ones. Already accounted as accepted.
    pub admitted: usize,
    /// Items of the batch refused for good by a drop policy: the last ones under `DropNewest`,
    /// the first (oldest) ones under `DropOldest`. Already counted as dropped by the
    /// controller; the caller counts them in its own drop accounting too.
    pub dropped: usize,
    /// Oldest queued items the caller must evict to make room for the admitted ones; already
    /// counted as dropped by the controller.
    pub evict: usize,
    /// Items that may not enter now but may later: the caller keeps them and asks again.
    pub deferred: usize,
}

impl Admission {
    /// Every one of `items` admitted.
    pub fn all(items: usize) -> Self {
        Self {
            admitted: items,
            ..Self::default()
        }
    }

    /// The first `admitted` of `items` admitted, the rest deferred.
    pub fn partial(items: usize, admitted: usize) -> Self {
        let admitted = admitted.min(items);
        Self {
            admitted,
            deferred: items - admitted,
            ..Self::default()
        }
    }

    /// Items the admission is about.
    pub fn items(&self) -> usize {
        self.admitted + self.dropped + self.deferred
    }

    /// Whether the caller can make progress (something admitted or dropped, or nothing asked).
    pub fn progressed(&self) -> bool {
        self.deferred == 0 || self.admitted > 0 || self.dropped > 0
    }
}

/// Waiting for admission took longer than its timeout. Nothing was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no admission for {items} items within {timeout:?} ({strategy})")]
pub struct AcquireTimeout {
    /// The controller's strategy name.
    pub strategy: &'static str,
    /// Items asked for.
    pub items: usize,
    /// The timeout that passed.
    pub timeout: Duration,
}

/// A strategy whose settings cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowConfigError {
    /// A capacity, window, credit count, rate, burst or batch bound of zero.
    #[error("{strategy}: {what} must be at least 1")]
    Zero {
        /// The strategy.
        strategy: &'static str,
        /// Which setting.
        what: &'static str,
    },
    /// Bounds in the wrong order.
    #[error("{strategy}: {what}")]
    Inconsistent {
        /// The strategy.
        strategy: &'static str,
        /// What is wrong.
        what: String,
    },
}

/// Probes the current [`Load`] again after each wake-up of a waiting
/// [`acquire`](BackpressureController::acquire).
pub type LoadProbe<'a> = &'a (dyn Fn() -> Load + Send + Sync);

/// Decides how much of each batch may enter a buffer, accounts what was admitted and processed,
/// and reports its figures by name.
///
/// Object-safe: the engine holds controllers as `Arc<dyn BackpressureController>`. Per batch, the
/// sending task calls [`try_admit`](Self::try_admit) (never waits) or
/// [`acquire`](Self::acquire) (waits asynchronously, with a timeout, where the strategy needs
/// waiting); the receiving side calls [`on_processed`](Self::on_processed) once the items have
/// left. Waiting never blocks a thread.
pub trait BackpressureController: Send + Sync + fmt::Debug {
    /// The strategy's short name (`"bounded"`, `"credit"`, `"rate"`, `"adaptive"`, `"pull"`,
    /// `"accumulator_aware"`), for labels.
    fn strategy(&self) -> &'static str;

    /// Decides, without waiting, how many of `items` (totalling `bytes`) may enter given the
    /// buffer's `load`, and accounts the admitted ones as accepted and the dropped ones as
    /// dropped.
    fn try_admit(&self, items: usize, bytes: u64, load: Load) -> Admission;

    /// Like [`try_admit`](Self::try_admit), but when nothing can be admitted now waits (as a
    /// suspended task) until something can, for at most `timeout`. `load` is probed again after
    /// each wake-up. The returned admission may still defer part of the batch.
    fn acquire<'a>(
        &'a self,
        items: usize,
        bytes: u64,
        load: LoadProbe<'a>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Admission, AcquireTimeout>>;

    /// `items` admitted earlier (totalling `bytes`) have been processed and left the buffer.
    fn on_processed(&self, items: usize, bytes: u64);

    /// The load behind the controller changed outside [`on_processed`](Self::on_processed)
    /// (a queue drained, an accumulator flushed): waiting senders look again. Controllers whose
    /// decision does not depend on the load ignore it.
    fn load_changed(&self) {}

    /// Records how long the last batch took to process (used by adaptive batching; others
    /// ignore it).
    fn record_latency(&self, _latency: Duration) {}

    /// The batch size the controller wants now, if it adapts batch sizes.
    fn batch_size(&self) -> Option<usize> {
        None
    }

    /// Downstream demand: asks for `n` more items (reactive pull). Returns how many were
    /// granted as outstanding demand; a refused part is not counted. Controllers that are not
    /// demand-driven return 0.
    fn request(&self, _n: usize) -> usize {
        0
    }

    /// Waits until downstream has asked for items and returns how many it asked for that were
    /// not sent yet (reactive pull), so a source produces only that many. Controllers that are
    /// not demand-driven return `usize::MAX` at once.
    fn demand(&self) -> BoxFuture<'_, usize> {
        Box::pin(std::future::ready(usize::MAX))
    }

    /// The controller's figures by name (`dropped_count`, `available_credits`, ...).
    fn metrics(&self) -> BTreeMap<&'static str, f64>;
}

/// Builds the controller for a strategy, after checking its settings.
///
/// ```
/// use pulseflow::flow::controller_for;
/// use pulseflow::policy::{BackpressureStrategy, DropPolicy};
///
/// let ctl = controller_for(&BackpressureStrategy::Bounded {
///     capacity: 100,
///     drop_policy: DropPolicy::DropNewest,
/// })
/// .expect("valid");
/// assert_eq!(ctl.strategy(), "bounded");
/// assert!(controller_for(&BackpressureStrategy::ReactivePull { window: 0 }).is_err());
/// ```
pub fn controller_for(
    strategy: &BackpressureStrategy,
) -> Result<Box<dyn BackpressureController>, FlowConfigError> {
    Ok(match *strategy {
        BackpressureStrategy::Bounded {
            capacity,
            drop_policy,
        } => Box::new(BoundedBuffer::new(capacity, drop_policy)?),
        BackpressureStrategy::CreditBased {
            initial,
            replenish_threshold,
        } => Box::new(CreditBased::new(initial, replenish_threshold)?),
        BackpressureStrategy::RateShaping { rate, burst } => {
            Box::new(RateShaping::new(rate, burst)?)
        }
        BackpressureStrategy::Adaptive {
            min_batch,
            max_batch,
        } => Box::new(AdaptiveBatch::new(min_batch, max_batch)?),
        BackpressureStrategy::ReactivePull { window } => Box::new(ReactivePull::new(window)?),
    })
}

pub(crate) fn nonzero(
    strategy: &'static str,
    what: &'static str,
    value: u64,
) -> Result<(), FlowConfigError> {
    if value == 0 {
        Err(FlowConfigError::Zero { strategy, what })
    } else {
        Ok(())
    }
}

/// Waits on `notify` until `attempt` makes progress or `timeout` passes. The notification is
/// registered before each attempt, so a wake-up between attempt and wait is not missed.
pub(crate) async fn wait_on(
    notify: &Notify,
    strategy: &'static str,
    items: usize,
    timeout: Duration,
    mut attempt: impl FnMut() -> Admission,
) -> Result<Admission, AcquireTimeout> {
    let deadline = Instant::now() + timeout;
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let admission = attempt();
        if admission.progressed() {
            return Ok(admission);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(AcquireTimeout {
                strategy,
                items,
                timeout,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DropPolicy;

    #[test]
    fn factory_builds_every_strategy() {
        let cases = [
            (
                BackpressureStrategy::Bounded {
                    capacity: 4,
                    drop_policy: DropPolicy::Block,
                },
                "bounded",
            ),
            (
                BackpressureStrategy::CreditBased {
                    initial: 4,
                    replenish_threshold: 2,
                },
                "credit",
            ),
            (
                BackpressureStrategy::Adaptive {
                    min_batch: 1,
                    max_batch: 64,
                },
                "adaptive",
            ),
            (BackpressureStrategy::ReactivePull { window: 8 }, "pull"),
        ];
        for (strategy, name) in cases {
            let ctl = controller_for(&strategy).expect("valid strategy");
            assert_eq!(ctl.strategy(), name);
            assert!(!ctl.metrics().is_empty());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn factory_builds_rate_shaping() {
        let ctl = controller_for(&BackpressureStrategy::RateShaping {
            rate: 100,
            burst: 10,
        })
        .expect("valid strategy");
        assert_eq!(ctl.strategy(), "rate");
    }

    #[test]
    fn factory_rejects_zero_settings() {
        let bad = [
            BackpressureStrategy::Bounded {
                capacity: 0,
                drop_policy: DropPolicy::Block,
            },
            BackpressureStrategy::CreditBased {
                initial: 0,
                replenish_threshold: 0,
            },
            BackpressureStrategy::RateShaping { rate: 0, burst: 1 },
            BackpressureStrategy::Adaptive {
                min_batch: 8,
                max_batch: 4,
            },
            BackpressureStrategy::ReactivePull { window: 0 },
        ];
        for strategy in bad {
            assert!(controller_for(&strategy).is_err(), "{strategy:?}");
        }
    }

    #[test]
    fn admission_accounts_for_every_item() {
        let a = Admission::partial(10, 4);
        assert_eq!((a.admitted, a.deferred, a.items()), (4, 6, 10));
        assert!(a.progressed());
        assert!(!Admission::partial(3, 0).progressed());
        assert!(Admission::all(0).progressed());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_on_times_out_on_the_paused_clock() {
        let notify = Notify::new();
        let start = Instant::now();
        let err = wait_on(&notify, "test", 3, Duration::from_secs(2), || {
            Admission::partial(3, 0)
        })
        .await
        .expect_err("nothing ever admitted");
        assert_eq!(err.items, 3);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
