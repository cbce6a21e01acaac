//! [`AdaptiveBatch`]: a batch size that follows measured latency and queue depth.
//!
//! The batching stage reports each batch's processing time with
//! [`record_latency`](BackpressureController::record_latency) and asks for the size of its next
//! batch with [`observe`](AdaptiveBatch::observe) (or through
//! [`try_admit`](BackpressureController::try_admit), which admits everything and passes the
//! queue depth on). At most once per adjustment interval (measured on Tokio's clock) the size
//! changes:
//!
//! - it grows by half while the average latency is under the target and the queue is deep
//!   (holds at least a full batch);
//! - it halves when the average latency passes the target or the queue drains (holds less
//!   than half a batch);
//! - it always stays within `[min_batch, max_batch]`.
//!
//! ```
//! use std::time::Duration;
//! use pulseflow::flow::{AdaptiveBatch, AdaptiveConfig, BackpressureController};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let cfg = AdaptiveConfig { target_latency: Duration::from_millis(50), ..AdaptiveConfig::new(10, 100) };
//! let batch = AdaptiveBatch::with_config(cfg).expect("valid");
//! assert_eq!(batch.current(), 55);
//! batch.record_latency(Duration::from_millis(10));
//! tokio::time::advance(cfg.interval).await;
//! assert_eq!(batch.observe(1000), 82); // fast and a deep queue: grow
//! # }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::controller::{
    AcquireTimeout, Admission, BackpressureController, FlowConfigError, Load, LoadProbe, nonzero,
};

/// Settings of an [`AdaptiveBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveConfig {
    /// Smallest batch (at least 1).
    pub min_batch: usize,
    /// Largest batch (at least `min_batch`).
    pub max_batch: usize,
    /// Latency the batch size aims to stay under.
    pub target_latency: Duration,
    /// Least time between two adjustments.
    pub interval: Duration,
}

impl AdaptiveConfig {
    /// Bounds with the default target (100 ms) and interval (5 s).
    pub fn new(min_batch: usize, max_batch: usize) -> Self {
        Self {
            min_batch,
            max_batch,
            target_latency: Duration::from_millis(100),
            interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
struct Inner {
    current: usize,
    /// Latencies recorded since the last adjustment.
    sum: Duration,
    samples: u32,
    /// Average of the samples that drove the last adjustment (or of the current ones).
    last_average: Option<Duration>,
    last_adjustment: Instant,
    adjustments: u64,
}

/// Adaptive batch sizing.
#[derive(Debug)]
pub struct AdaptiveBatch {
    cfg: AdaptiveConfig,
    inner: Mutex<Inner>,
}

impl AdaptiveBatch {
    /// Bounds `[min_batch, max_batch]` with the default target latency and interval.
    pub fn new(min_batch: usize, max_batch: usize) -> Result<Self, FlowConfigError> {
        Self::with_config(AdaptiveConfig::new(min_batch, max_batch))
    }

    /// From full settings. The size starts halfway between the bounds.
    pub fn with_config(cfg: AdaptiveConfig) -> Result<Self, FlowConfigError> {
        nonzero("adaptive", "min batch", cfg.min_batch as u64)?;
        if cfg.max_batch < cfg.min_batch {
            return Err(FlowConfigError::Inconsistent {
                strategy: "adaptive",
                what: format!(
                    "max batch {} is below min batch {}",
                    cfg.max_batch, cfg.min_batch
                ),
            });
        }
        if cfg.target_latency.is_zero() {
            return Err(FlowConfigError::Zero {
                strategy: "adaptive",
                what: "target latency",
            });
        }
        Ok(Self {
            cfg,
            inner: Mutex::new(Inner {
                current: cfg.min_batch + (cfg.max_batch - cfg.min_batch) / 2,
                sum: Duration::ZERO,
                samples: 0,
                last_average: None,
                last_adjustment: Instant::now(),
                adjustments: 0,
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &AdaptiveConfig {
        &self.cfg
    }

    /// The batch size now.
    pub fn current(&self) -> usize {
        self.inner.lock().current
    }

    /// Average latency of the samples since the last adjustment, or of the ones that drove it.
    pub fn average_latency(&self) -> Option<Duration> {
        let st = self.inner.lock();
        average(&st).or(st.last_average)
    }

    /// Sees the queue depth, adjusts the size if an interval has passed since the last
    /// adjustment, and returns the batch size to use next.
    pub fn observe(&self, queue_depth: usize) -> usize {
        let now = Instant::now();
        let mut st = self.inner.lock();
        if now.duration_since(st.last_adjustment) < self.cfg.interval {
            return st.current;
        }
        st.last_adjustment = now;
        let avg = average(&st);
        let cur = st.current;
        let deep = queue_depth >= cur;
        let drained = queue_depth < cur / 2;
        let fast = avg.is_some_and(|a| a < self.cfg.target_latency);
        let slow = avg.is_some_and(|a| a > self.cfg.target_latency);
        let next = if slow || drained {
            (cur / 2).max(self.cfg.min_batch)
        } else if fast && deep {
            (cur + (cur / 2).max(1)).min(self.cfg.max_batch)
        } else {
            cur
        };
        if next != cur {
            st.adjustments += 1;
        }
        st.current = next;
        if avg.is_some() {
            st.last_average = avg;
        }
        st.sum = Duration::ZERO;
        st.samples = 0;
        next
    }
}

fn average(st: &Inner) -> Option<Duration> {
    (st.samples > 0).then(|| st.sum / st.samples)
}

impl BackpressureController for AdaptiveBatch {
    fn strategy(&self) -> &'static str {
        "adaptive"
    }

    /// Admits every item (adaptive batching shapes batches, it does not refuse input) and
    /// passes the queue depth to [`observe`](AdaptiveBatch::observe).
    fn try_admit(&self, items: usize, _bytes: u64, load: Load) -> Admission {
        self.observe(load.queue_depth);
        Admission::all(items)
    }

    fn acquire<'a>(
        &'a self,
        items: usize,
        bytes: u64,
        load: LoadProbe<'a>,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Admission, AcquireTimeout>> {
        let admission = self.try_admit(items, bytes, load());
        Box::pin(std::future::ready(Ok(admission)))
    }

    fn on_processed(&self, _items: usize, _bytes: u64) {}

    fn record_latency(&self, latency: Duration) {
        let mut st = self.inner.lock();
        st.sum = st.sum.saturating_add(latency);
        st.samples = st.samples.saturating_add(1);
    }

    fn batch_size(&self) -> Option<usize> {
        Some(self.current())
    }

    fn metrics(&self) -> BTreeMap<&'static str, f64> {
        let st = self.inner.lock();
        let avg = average(&st).or(st.last_average).unwrap_or(Duration::ZERO);
        BTreeMap::from([
            ("current_batch_size", st.current as f64),
            ("average_latency_ms", avg.as_secs_f64() * 1e3),
            (
                "target_latency_ms",
                self.cfg.target_latency.as_secs_f64() * 1e3,
            ),
            ("min_batch", self.cfg.min_batch as f64),
            ("max_batch", self.cfg.max_batch as f64),
            ("adjustments", st.adjustments as f64),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn batcher(min: usize, max: usize) -> AdaptiveBatch {
        AdaptiveBatch::with_config(AdaptiveConfig {
            target_latency: 100 * MS,
            interval: Duration::from_secs(1),
            ..AdaptiveConfig::new(min, max)
        })
        .expect("valid")
    }

    async fn step(b: &AdaptiveBatch, latency: Duration, depth: usize) -> usize {
        b.record_latency(latency);
        tokio::time::advance(b.config().interval).await;
        b.observe(depth)
    }

    #[test]
    fn bounds_are_checked() {
        assert!(AdaptiveBatch::new(0, 4).is_err());
        assert!(AdaptiveBatch::new(8, 4).is_err());
        assert!(AdaptiveBatch::new(4, 4).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn grows_under_load_while_fast_up_to_max() {
        let b = batcher(10, 100);
        let mut sizes = vec![b.current()];
        for _ in 0..6 {
            sizes.push(step(&b, 20 * MS, 10_000).await);
        }
        assert_eq!(sizes, vec![55, 82, 100, 100, 100, 100, 100]);
        assert_eq!(b.metrics()["average_latency_ms"], 20.0);
    }

    #[tokio::test(start_paused = true)]
    async fn shrinks_when_latency_passes_target_down_to_min() {
        let b = batcher(10, 100);
        let mut sizes = Vec::new();
        for _ in 0..4 {
            sizes.push(step(&b, 150 * MS, 10_000).await);
        }
        assert_eq!(sizes, vec![27, 13, 10, 10]);
    }

    #[tokio::test(start_paused = true)]
    async fn shrinks_when_the_queue_drains_and_holds_in_between() {
        let b = batcher(1, 64);
        assert_eq!(b.current(), 32);
        assert_eq!(step(&b, 10 * MS, 3).await, 16); // drained
        assert_eq!(step(&b, 10 * MS, 10).await, 16); // fast but not deep: hold
        assert_eq!(step(&b, 10 * MS, 16).await, 24); // fast and deep: grow
    }

    #[tokio::test(start_paused = true)]
    async fn adjusts_at_most_once_per_interval() {
        let b = batcher(10, 100);
        b.record_latency(10 * MS);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(b.observe(10_000), 55);
        tokio::time::advance(MS).await;
        assert_eq!(b.observe(10_000), 82);
        assert_eq!(b.observe(10_000), 82);
    }

    #[tokio::test(start_paused = true)]
    async fn runs_through_the_trait() {
        let b: Box<dyn BackpressureController> = Box::new(batcher(2, 8));
        b.record_latency(5 * MS);
        tokio::time::advance(Duration::from_secs(1)).await;
        let a = b.try_admit(50, 0, Load::items(100));
        assert_eq!(a.admitted, 50);
        assert_eq!(b.batch_size(), Some(7));
        assert_eq!(b.metrics()["current_batch_size"], 7.0);
    }
}
