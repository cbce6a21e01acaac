//! [`ReactivePull`]: demand flows upstream as `request(n)`, Reactive Streams style.
//!
//! Downstream asks for items with [`request`](BackpressureController::request); upstream may
//! send only what was requested ([`try_admit`](BackpressureController::try_admit) admits at most
//! the open demand, [`acquire`](BackpressureController::acquire) waits for demand). An item is
//! *outstanding* from the moment it is requested until it is processed, and never more than
//! `window` items are outstanding: a request that would pass the window is granted only in part,
//! and the refused part is not counted as outstanding.
//!
//! ```
//! use pulseflow::flow::{BackpressureController, Load, ReactivePull};
//!
//! let pull = ReactivePull::new(8).expect("valid");
//! assert_eq!(pull.request(5), 5);
//! assert_eq!(pull.request(5), 3); // the window holds 8; 2 refused, not outstanding
//! let a = pull.try_admit(10, 0, Load::default());
//! assert_eq!((a.admitted, a.deferred), (8, 2)); // only what was requested
//! pull.on_processed(8, 0);
//! assert_eq!(pull.outstanding(), 0);
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::controller::{
    AcquireTimeout, Admission, BackpressureController, FlowConfigError, Load, LoadProbe, nonzero,
    wait_on,
};

#[derive(Debug, Default)]
struct Demand {
    /// Requested, not yet sent.
    open: usize,
    /// Sent, not yet processed.
    in_flight: usize,
    /// Most items outstanding at once.
    peak_outstanding: usize,
    requested: u64,
    refused: u64,
    delivered: u64,
}

/// Demand-driven flow control with a window.
#[derive(Debug)]
pub struct ReactivePull {
    window: usize,
    demand: Mutex<Demand>,
    requested: Notify,
}

impl ReactivePull {
    /// A window of `window` outstanding items (at least 1). No demand at start.
    pub fn new(window: usize) -> Result<Self, FlowConfigError> {
        nonzero("pull", "window", window as u64)?;
        Ok(Self {
            window,
            demand: Mutex::new(Demand::default()),
            requested: Notify::new(),
        })
    }

    /// The window.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Items requested and not yet processed (open demand plus in flight).
    pub fn outstanding(&self) -> usize {
        let d = self.demand.lock();
        d.open + d.in_flight
    }

    /// Requested items upstream may still send.
    pub fn open_demand(&self) -> usize {
        self.demand.lock().open
    }

    /// Requests whatever the window has room for, once outstanding items fall to half the
    /// window or below (the usual Reactive Streams refill). Returns what was requested.
    pub fn replenish(&self) -> usize {
        let room = {
            let d = self.demand.lock();
            let outstanding = d.open + d.in_flight;
            if outstanding * 2 > self.window {
                return 0;
            }
            self.window - outstanding
        };
        self.request(room)
    }
}

impl BackpressureController for ReactivePull {
    fn strategy(&self) -> &'static str {
        "pull"
    }

    /// Admits at most the open demand; defers the rest.
    fn try_admit(&self, items: usize, _bytes: u64, _load: Load) -> Admission {
        let mut d = self.demand.lock();
        let sent = items.min(d.open);
        d.open -= sent;
        d.in_flight += sent;
        d.delivered += sent as u64;
        Admission::partial(items, sent)
    }

    /// Waits for downstream demand.
    fn acquire<'a>(
        &'a self,
        items: usize,
        bytes: u64,
        load: LoadProbe<'a>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Admission, AcquireTimeout>> {
        Box::pin(wait_on(
            &self.requested,
            "pull",
            items,
            timeout,
            move || self.try_admit(items, bytes, load()),
        ))
    }

    /// Processed items stop being outstanding. (Downstream requests more itself, or with
    /// [`replenish`](ReactivePull::replenish).)
    fn on_processed(&self, items: usize, _bytes: u64) {
        let mut d = self.demand.lock();
        d.in_flight -= items.min(d.in_flight);
    }

    /// Waits for open demand and returns it.
    fn demand(&self) -> BoxFuture<'_, usize> {
        Box::pin(async move {
            loop {
                let requested = self.requested.notified();
                tokio::pin!(requested);
                requested.as_mut().enable();
                let open = self.demand.lock().open;
                if open > 0 {
                    return open;
                }
                requested.await;
            }
        })
    }

    /// Grants as much of `n` as the window has room for; only the granted part is outstanding.
    fn request(&self, n: usize) -> usize {
        let granted = {
            let mut d = self.demand.lock();
            let room = self.window - (d.open + d.in_flight).min(self.window);
            let granted = n.min(room);
            d.open += granted;
            d.peak_outstanding = d.peak_outstanding.max(d.open + d.in_flight);
            d.requested += granted as u64;
            d.refused += (n - granted) as u64;
            granted
        };
        if granted > 0 {
            self.requested.notify_waiters();
        }
        granted
    }

    fn metrics(&self) -> BTreeMap<&'static str, f64> {
        let d = self.demand.lock();
        let outstanding = (d.open + d.in_flight) as f64;
        BTreeMap::from([
            ("outstanding_requests", outstanding),
            ("peak_outstanding", d.peak_outstanding as f64),
            ("open_demand", d.open as f64),
            ("in_flight", d.in_flight as f64),
            ("window_size", self.window as f64),
            ("window_utilization", outstanding / self.window as f64),
            ("total_requested", d.requested as f64),
            ("total_refused", d.refused as f64),
            ("total_delivered", d.delivered as f64),
        ])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use super::*;

    #[test]
    fn refused_requests_are_not_outstanding() {
        let p = ReactivePull::new(4).expect("valid");
        assert_eq!(p.request(3), 3);
        assert_eq!(p.request(3), 1);
        assert_eq!(p.request(3), 0);
        assert_eq!(p.outstanding(), 4);
        let m = p.metrics();
        assert_eq!(m["outstanding_requests"], 4.0);
        assert_eq!(m["total_refused"], 5.0);
        // Processing frees the window; the refused requests did not eat into it.
        let _ = p.try_admit(4, 0, Load::default());
        p.on_processed(4, 0);
        assert_eq!(p.outstanding(), 0);
        assert_eq!(p.request(4), 4);
    }

    #[test]
    fn nothing_is_sent_without_demand() {
        let p = ReactivePull::new(4).expect("valid");
        let a = p.try_admit(3, 0, Load::default());
        assert_eq!((a.admitted, a.deferred), (0, 3));
        assert_eq!(p.outstanding(), 0);
    }

    #[test]
    fn replenish_waits_for_half_the_window() {
        let p = ReactivePull::new(10).expect("valid");
        assert_eq!(p.replenish(), 10);
        let _ = p.try_admit(10, 0, Load::default());
        p.on_processed(4, 0);
        assert_eq!(p.replenish(), 0); // 6 outstanding > 5
        p.on_processed(1, 0);
        assert_eq!(p.replenish(), 5);
        assert_eq!(p.outstanding(), 10);
    }

    /// A source task produces only what the consumer task requested; the instrumented count of
    /// items requested-and-not-processed never passes the window.
    #[tokio::test(start_paused = true)]
    async fn source_follows_demand_within_the_window() {
        let window = 6;
        let p = Arc::new(ReactivePull::new(window).expect("valid"));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let total = 200;
        let source = {
            let (p, in_flight) = (p.clone(), in_flight.clone());
            tokio::spawn(async move {
                let probe = Load::default;
                let mut sent = 0;
                while sent < total {
                    let a = p
                        .acquire(7.min(total - sent), 0, &probe, Duration::from_secs(5))
                        .await
                        .expect("demand arrives");
                    let now = in_flight.fetch_add(a.admitted, SeqCst) + a.admitted;
                    assert!(now <= window, "{now} in flight, window {window}");
                    sent += a.admitted;
                }
                sent
            })
        };
        let mut processed = 0;
        while processed < total {
            // Over-asking: the refused part must not count.
            p.request(window * 2);
            tokio::time::sleep(Duration::from_millis(10)).await;
            let n = in_flight.swap(0, SeqCst);
            p.on_processed(n, 0);
            processed += n;
            assert!(p.outstanding() <= window);
        }
        assert_eq!(source.await.expect("task"), total);
        assert_eq!(processed, total);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_demand_times_out() {
        let p = ReactivePull::new(2).expect("valid");
        let probe = Load::default;
        let err = p
            .acquire(1, 0, &probe, Duration::from_secs(1))
            .await
            .expect_err("no demand");
        assert_eq!(err.strategy, "pull");
    }
}
