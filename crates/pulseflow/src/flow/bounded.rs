//! [`BoundedBuffer`]: a capacity in items and a [`DropPolicy`] for what does not fit.
//!
//! `Block` admits what fits and defers the rest (the sender waits); `DropNewest` admits what fits
//! and refuses the rest; `DropOldest` admits the whole batch and tells the caller how many of
//! the oldest queued items to evict. Every refused or evicted item is counted in
//! `dropped_count`: nothing is dropped silently.
//!
//! ```
//! use pulseflow::flow::{BackpressureController, BoundedBuffer, Load};
//! use pulseflow::policy::DropPolicy;
//!
//! let ctl = BoundedBuffer::new(10, DropPolicy::DropOldest).expect("valid");
//! let a = ctl.try_admit(4, 0, Load::items(8));
//! assert_eq!((a.admitted, a.evict), (4, 2)); // evict the 2 oldest to make room
//! assert_eq!(ctl.metrics()["dropped_count"], 2.0);
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;

use crate::policy::DropPolicy;

use super::controller::{
    AcquireTimeout, Admission, BackpressureController, FlowConfigError, Load, LoadProbe, nonzero,
    wait_on,
};

/// A bounded buffer's admission control. The decision uses the caller's
/// [`Load::queue_depth`]; the controller keeps its own count of admitted, unprocessed items for
/// its utilisation figure.
#[derive(Debug)]
pub struct BoundedBuffer {
    capacity: usize,
    policy: DropPolicy,
    admitted: AtomicU64,
    processed: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    room: Notify,
}

impl BoundedBuffer {
    /// A buffer of `capacity` items (at least 1) with the given drop policy.
    pub fn new(capacity: usize, policy: DropPolicy) -> Result<Self, FlowConfigError> {
        nonzero("bounded", "capacity", capacity as u64)?;
        Ok(Self {
            capacity,
            policy,
            admitted: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            room: Notify::new(),
        })
    }

    /// Capacity in items.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The drop policy.
    pub fn drop_policy(&self) -> DropPolicy {
        self.policy
    }

    /// Items dropped so far (evicted plus refused).
    pub fn dropped_count(&self) -> u64 {
        self.evicted.load(Relaxed) + self.refused.load(Relaxed)
    }

    /// Admitted items not yet processed nor evicted.
    pub fn held(&self) -> u64 {
        self.admitted
            .load(Relaxed)
            .saturating_sub(self.processed.load(Relaxed) + self.evicted.load(Relaxed))
    }

    fn decide(&self, items: usize, depth: usize) -> Admission {
        let cap = self.capacity;
        let room = cap - depth.min(cap);
        match self.policy {
            DropPolicy::Block => Admission::partial(items, room),
            DropPolicy::DropNewest => {
                let admitted = items.min(room);
                Admission {
                    admitted,
                    dropped: items - admitted,
                    ..Admission::default()
                }
            }
            DropPolicy::DropOldest => {
                // The newest `cap` items win: first evict queued ones, then the batch's own
                // oldest items if the batch alone is larger than the buffer.
                let excess = (depth + items).saturating_sub(cap);
                let evict = excess.min(depth);
                let dropped = excess - evict;
                Admission {
                    admitted: items - dropped,
                    dropped,
                    evict,
                    deferred: 0,
                }
            }
        }
    }
}

impl BackpressureController for BoundedBuffer {
    fn strategy(&self) -> &'static str {
        "bounded"
    }

    /// Decides on `load.queue_depth`. For `DropNewest` the dropped items are the last ones of
    /// the batch; for `DropOldest` they are the first ones (the batch alone overflows the
    /// buffer), and `evict` names queued items to evict first.
    fn try_admit(&self, items: usize, _bytes: u64, load: Load) -> Admission {
        let a = self.decide(items, load.queue_depth);
        self.admitted.fetch_add(a.admitted as u64, Relaxed);
        if a.evict > 0 {
            self.evicted.fetch_add(a.evict as u64, Relaxed);
        }
        if a.dropped > 0 {
            self.refused.fetch_add(a.dropped as u64, Relaxed);
        }
        a
    }

    fn acquire<'a>(
        &'a self,
        items: usize,
        bytes: u64,
        load: LoadProbe<'a>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Admission, AcquireTimeout>> {
        Box::pin(wait_on(&self.room, "bounded", items, timeout, move || {
            self.try_admit(items, bytes, load())
        }))
    }

    fn on_processed(&self, items: usize, _bytes: u64) {
        self.processed.fetch_add(items as u64, Relaxed);
        self.room.notify_waiters();
    }

    fn load_changed(&self) {
        self.room.notify_waiters();
    }

    fn metrics(&self) -> BTreeMap<&'static str, f64> {
        let held = self.held() as f64;
        BTreeMap::from([
            ("current_count", held),
            ("capacity", self.capacity as f64),
            ("utilization", held / self.capacity as f64),
            ("dropped_count", self.dropped_count() as f64),
            ("evicted_count", self.evicted.load(Relaxed) as f64),
            ("refused_count", self.refused.load(Relaxed) as f64),
        ])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn ctl(cap: usize, p: DropPolicy) -> BoundedBuffer {
        BoundedBuffer::new(cap, p).expect("valid")
    }

    #[test]
    fn block_admits_what_fits_and_defers_the_rest() {
        let c = ctl(5, DropPolicy::Block);
        let a = c.try_admit(4, 0, Load::items(3));
        assert_eq!((a.admitted, a.deferred, a.dropped), (2, 2, 0));
        let a = c.try_admit(4, 0, Load::items(5));
        assert_eq!((a.admitted, a.deferred), (0, 4));
        assert_eq!(c.dropped_count(), 0);
    }

    #[test]
    fn drop_newest_refuses_and_counts() {
        let c = ctl(5, DropPolicy::DropNewest);
        let a = c.try_admit(4, 0, Load::items(3));
        assert_eq!((a.admitted, a.dropped, a.evict), (2, 2, 0));
        let a = c.try_admit(3, 0, Load::items(9));
        assert_eq!((a.admitted, a.dropped), (0, 3));
        assert_eq!(c.metrics()["dropped_count"], 5.0);
    }

    #[test]
    fn drop_oldest_evicts_and_counts() {
        let c = ctl(5, DropPolicy::DropOldest);
        let a = c.try_admit(4, 0, Load::items(3));
        assert_eq!((a.admitted, a.evict, a.dropped), (4, 2, 0));
        // A batch larger than the buffer: everything queued goes, then its own oldest items.
        let a = c.try_admit(8, 0, Load::items(5));
        assert_eq!((a.admitted, a.evict, a.dropped), (5, 5, 3));
        assert_eq!(c.metrics()["dropped_count"], 10.0);
        assert_eq!(c.metrics()["evicted_count"], 7.0);
    }

    #[test]
    fn every_item_is_accounted_for() {
        for p in [
            DropPolicy::Block,
            DropPolicy::DropNewest,
            DropPolicy::DropOldest,
        ] {
            let c = ctl(7, p);
            for depth in 0..10 {
                for items in 0..12 {
                    let a = c.try_admit(items, 0, Load::items(depth));
                    assert_eq!(a.items(), items, "{p:?} depth {depth} items {items}");
                    let after = depth - a.evict + a.admitted;
                    assert!(
                        after <= 7 || (after <= depth && a.admitted == 0),
                        "{p:?} {a:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn utilisation_follows_admitted_and_processed() {
        let c = ctl(10, DropPolicy::Block);
        let _ = c.try_admit(5, 0, Load::items(0));
        assert_eq!(c.metrics()["utilization"], 0.5);
        c.on_processed(5, 0);
        assert_eq!(c.metrics()["utilization"], 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn block_waits_until_processing_makes_room() {
        let c = Arc::new(ctl(4, DropPolicy::Block));
        let depth = Arc::new(AtomicUsize::new(4));
        let waiter = {
            let (c, depth) = (c.clone(), depth.clone());
            tokio::spawn(async move {
                let probe = move || Load::items(depth.load(Relaxed));
                c.acquire(2, 0, &probe, Duration::from_secs(10)).await
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        depth.store(1, Relaxed);
        c.on_processed(3, 0);
        let a = waiter
            .await
            .expect("task")
            .expect("admitted before timeout");
        assert_eq!(a.admitted, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn block_wait_times_out() {
        let c = ctl(1, DropPolicy::Block);
        let probe = || Load::items(1);
        let err = c
            .acquire(1, 0, &probe, Duration::from_millis(500))
            .await
            .expect_err("never room");
        assert_eq!(err.strategy, "bounded");
    }
}
