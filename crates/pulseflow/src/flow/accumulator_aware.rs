//! [`AccumulatorAware`]: accumulator state and spills count as queue depth.
//!
//! A stage that accumulates (windows, joins, aggregations) holds data that is not in any queue.
//! This wrapper adds it to the queue depth that the wrapped controller sees:
//!
//! `effective depth = queue depth + pending accumulator bytes / bytes_per_item
//!                    + active spills × spill_penalty`
//!
//! so a bounded buffer in front of a stage whose accumulator grows fills up sooner, and upstream
//! slows down before memory runs out.
//!
//! ```
//! use pulseflow::flow::{AccumulatorAware, BackpressureController, BoundedBuffer, Load};
//! use pulseflow::policy::DropPolicy;
//!
//! let inner = BoundedBuffer::new(100, DropPolicy::Block).expect("valid");
//! let ctl = AccumulatorAware::new(Box::new(inner));
//! assert_eq!(ctl.try_admit(10, 0, Load::items(50)).admitted, 10);
//! ctl.update(40 * 1024, 5); // 40 KiB pending = 40 items, 5 spills = 10 items
//! let a = ctl.try_admit(10, 0, Load::items(50));
//! assert_eq!((a.admitted, a.deferred), (0, 10)); // 50 + 40 + 10 = 100: full
//! assert_eq!(ctl.metrics()["effective_pressure"], 50.0);
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures::future::BoxFuture;

use super::controller::{AcquireTimeout, Admission, BackpressureController, Load, LoadProbe};

/// Wraps a controller; accumulator bytes and active spills add to the depth it sees.
#[derive(Debug)]
pub struct AccumulatorAware {
    inner: Box<dyn BackpressureController>,
    bytes_per_item: u64,
    spill_penalty: f64,
    pending_bytes: AtomicU64,
    active_spills: AtomicU64,
}

impl AccumulatorAware {
    /// Wraps `inner` with the defaults: 1024 bytes per item of depth, 2 items per active spill.
    pub fn new(inner: Box<dyn BackpressureController>) -> Self {
        Self::with_weights(inner, 1024, 2.0)
    }

    /// Wraps `inner`, counting `bytes_per_item` accumulator bytes (at least 1) as one queued
    /// item and each active spill as `spill_penalty` items (negative values count as 0).
    pub fn with_weights(
        inner: Box<dyn BackpressureController>,
        bytes_per_item: u64,
        spill_penalty: f64,
    ) -> Self {
        Self {
            inner,
            bytes_per_item: bytes_per_item.max(1),
            spill_penalty: spill_penalty.max(0.0),
            pending_bytes: AtomicU64::new(0),
            active_spills: AtomicU64::new(0),
        }
    }

    /// Reports the accumulator's pending bytes and the spills in progress now. When the
    /// pressure falls, waiting senders look again.
    pub fn update(&self, pending_bytes: u64, active_spills: u64) {
        let before = self.extra_depth();
        self.pending_bytes.store(pending_bytes, Relaxed);
        self.active_spills.store(active_spills, Relaxed);
        if self.extra_depth() < before {
            self.inner.load_changed();
        }
    }

    /// The wrapped controller.
    pub fn inner(&self) -> &dyn BackpressureController {
        &*self.inner
    }

    /// Items of depth the accumulator and its spills add.
    pub fn effective_pressure(&self) -> f64 {
        self.pending_bytes.load(Relaxed) as f64 / self.bytes_per_item as f64
            + self.active_spills.load(Relaxed) as f64 * self.spill_penalty
    }

    fn extra_depth(&self) -> usize {
        let bytes = self.pending_bytes.load(Relaxed) / self.bytes_per_item;
        let spills = self.active_spills.load(Relaxed) as f64 * self.spill_penalty;
        usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(spills.ceil() as usize)
    }

    /// The load the wrapped controller sees. While the stage's own queue is empty the
    /// accumulator is waiting for input: holding input back then could not relieve it (its keys
    /// complete only with more input), so it sees its queue as it is and the pipeline cannot
    /// deadlock on its own pressure.
    fn effective(&self, load: Load) -> Load {
        if load.queue_depth == 0 {
            return load;
        }
        Load {
            queue_depth: load.queue_depth.saturating_add(self.extra_depth()),
            pending_bytes: load
                .pending_bytes
                .saturating_add(self.pending_bytes.load(Relaxed)),
        }
    }
}

impl BackpressureController for AccumulatorAware {
    fn strategy(&self) -> &'static str {
        "accumulator_aware"
    }

    fn try_admit(&self, items: usize, bytes: u64, load: Load) -> Admission {
        self.inner.try_admit(items, bytes, self.effective(load))
    }

    fn acquire<'a>(
        &'a self,
        items: usize,
        bytes: u64,
        load: LoadProbe<'a>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Admission, AcquireTimeout>> {
        Box::pin(async move {
            let probe = move || self.effective(load());
            self.inner.acquire(items, bytes, &probe, timeout).await
        })
    }

    fn on_processed(&self, items: usize, bytes: u64) {
        self.inner.on_processed(items, bytes);
    }

    fn load_changed(&self) {
        self.inner.load_changed();
    }

    fn record_latency(&self, latency: Duration) {
        self.inner.record_latency(latency);
    }

    fn batch_size(&self) -> Option<usize> {
        self.inner.batch_size()
    }

    fn request(&self, n: usize) -> usize {
        self.inner.request(n)
    }

    fn metrics(&self) -> BTreeMap<&'static str, f64> {
        let mut m = self.inner.metrics();
        m.insert(
            "pending_accumulator_bytes",
            self.pending_bytes.load(Relaxed) as f64,
        );
        m.insert(
            "active_spill_count",
            self.active_spills.load(Relaxed) as f64,
        );
        m.insert("effective_pressure", self.effective_pressure());
        m
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::flow::{BoundedBuffer, CreditBased};
    use crate::policy::DropPolicy;

    fn bounded(cap: usize, p: DropPolicy) -> AccumulatorAware {
        AccumulatorAware::with_weights(
            Box::new(BoundedBuffer::new(cap, p).expect("valid")),
            100,
            3.0,
        )
    }

    #[test]
    fn accumulator_bytes_and_spills_fill_the_buffer() {
        let c = bounded(20, DropPolicy::DropNewest);
        c.update(1_000, 2); // 10 + 6 items, on top of 1 queued
        let a = c.try_admit(10, 0, Load::items(1));
        assert_eq!((a.admitted, a.dropped), (3, 7));
        let m = c.metrics();
        assert_eq!(m["pending_accumulator_bytes"], 1_000.0);
        assert_eq!(m["active_spill_count"], 2.0);
        assert_eq!(m["effective_pressure"], 16.0);
        assert_eq!(m["dropped_count"], 7.0); // the wrapped controller's figures are kept
    }

    #[test]
    fn an_empty_queue_is_never_held_back() {
        // The accumulator waits for input to complete its keys: refusing input would deadlock.
        let c = bounded(10, DropPolicy::Block);
        c.update(1_000_000, 5);
        assert_eq!(c.try_admit(4, 0, Load::items(0)).admitted, 4);
        assert_eq!(c.try_admit(4, 0, Load::items(1)).admitted, 0);
    }

    #[test]
    fn no_accumulator_no_change() {
        let c = bounded(20, DropPolicy::Block);
        assert_eq!(c.try_admit(10, 0, Load::items(10)).admitted, 10);
        assert_eq!(c.metrics()["effective_pressure"], 0.0);
    }

    #[test]
    fn other_controllers_pass_through() {
        let c = AccumulatorAware::new(Box::new(CreditBased::new(2, 1).expect("valid")));
        c.update(1 << 20, 1);
        assert_eq!(c.try_admit(3, 0, Load::default()).admitted, 2);
        c.on_processed(2, 0);
        assert_eq!(c.metrics()["available_credits"], 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_sees_the_accumulator_drain() {
        let c = Arc::new(bounded(10, DropPolicy::Block));
        c.update(900, 0); // 9 items, and 1 queued: full
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move {
                let probe = || Load::items(1);
                c.acquire(5, 0, &probe, Duration::from_secs(10)).await
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        c.update(400, 0); // the accumulator flushed: the waiter looks again
        let a = waiter.await.expect("task").expect("room");
        assert_eq!(a.admitted, 5);
    }
}
