//! [`CreditBased`]: never more items in flight than credits.
//!
//! Each admitted item takes a credit; [`on_processed`](BackpressureController::on_processed)
//! gives it back. A sender that finds no credit waits as a suspended task (with a timeout) and is
//! woken once at least `replenish_threshold` credits are available again, so senders resume in
//! chunks rather than one item at a time.
//!
//! ```
//! use std::time::Duration;
//! use pulseflow::flow::{BackpressureController, CreditBased, Load};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let credits = CreditBased::new(2, 1).expect("valid");
//! let probe = || Load::default();
//! let a = credits.acquire(5, 0, &probe, Duration::from_secs(1)).await.expect("credit");
//! assert_eq!((a.admitted, a.deferred), (2, 3));
//! // No credit left: waiting times out unless something is processed.
//! assert!(credits.acquire(1, 0, &probe, Duration::from_millis(10)).await.is_err());
//! credits.on_processed(2, 0);
//! assert_eq!(credits.available(), 2);
//! # }
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
struct Credits {
    available: usize,
    in_flight: usize,
    peak_in_flight: usize,
    requested: u64,
    granted: u64,
    attempts: u64,
    waits: u64,
}

/// Credit-based flow control: one credit per item in flight.
#[derive(Debug)]
pub struct CreditBased {
    initial: usize,
    threshold: usize,
    state: Mutex<Credits>,
    replenished: Notify,
}

impl CreditBased {
    /// `initial` credits (at least 1); waiting senders are woken when `replenish_threshold`
    /// credits are available (0 means 1; it may not exceed `initial`).
    pub fn new(initial: usize, replenish_threshold: usize) -> Result<Self, FlowConfigError> {
        nonzero("credit", "initial credits", initial as u64)?;
        if replenish_threshold > initial {
            return Err(FlowConfigError::Inconsistent {
                strategy: "credit",
                what: format!(
                    "replenish threshold {replenish_threshold} exceeds the {initial} credits"
                ),
            });
        }
        Ok(Self {
            initial,
            threshold: replenish_threshold.max(1),
            state: Mutex::new(Credits {
                available: initial,
                ..Credits::default()
            }),
            replenished: Notify::new(),
        })
    }

    /// Credits available now.
    pub fn available(&self) -> usize {
        self.state.lock().available
    }

    /// Items admitted and not yet processed.
    pub fn in_flight(&self) -> usize {
        self.state.lock().in_flight
    }

    /// Total credits.
    pub fn credits(&self) -> usize {
        self.initial
    }
}

impl BackpressureController for CreditBased {
    fn strategy(&self) -> &'static str {
        "credit"
    }

    /// Admits as many items as there are credits; defers the rest.
    fn try_admit(&self, items: usize, _bytes: u64, _load: Load) -> Admission {
        let mut st = self.state.lock();
        let granted = items.min(st.available);
        st.available -= granted;
        st.in_flight += granted;
        st.peak_in_flight = st.peak_in_flight.max(st.in_flight);
        st.requested += items as u64;
        st.granted += granted as u64;
        st.attempts += 1;
        if granted < items {
            st.waits += 1;
        }
        Admission::partial(items, granted)
    }

    fn acquire<'a>(
        &'a self,
        items: usize,
        bytes: u64,
        load: LoadProbe<'a>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Admission, AcquireTimeout>> {
        Box::pin(wait_on(
            &self.replenished,
            "credit",
            items,
            timeout,
            move || self.try_admit(items, bytes, load()),
        ))
    }

    /// Returns one credit per processed item (never more than are in flight).
    fn on_processed(&self, items: usize, _bytes: u64) {
        let wake = {
            let mut st = self.state.lock();
            let back = items.min(st.in_flight);
            st.in_flight -= back;
            st.available += back;
            back > 0 && st.available >= self.threshold
        };
        if wake {
            self.replenished.notify_waiters();
        }
    }

    fn metrics(&self) -> BTreeMap<&'static str, f64> {
        let st = self.state.lock();
        let wait_ratio = if st.attempts == 0 {
            0.0
        } else {
            st.waits as f64 / st.attempts as f64
        };
        BTreeMap::from([
            ("available_credits", st.available as f64),
            ("in_flight", st.in_flight as f64),
            ("peak_in_flight", st.peak_in_flight as f64),
            ("credits", self.initial as f64),
            ("total_requested", st.requested as f64),
            ("total_granted", st.granted as f64),
            ("wait_ratio", wait_ratio),
        ])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use super::*;

    #[test]
    fn threshold_above_credits_is_rejected() {
        assert!(CreditBased::new(4, 5).is_err());
        assert!(CreditBased::new(4, 0).is_ok());
    }

    #[test]
    fn credits_come_back_only_for_items_in_flight() {
        let c = CreditBased::new(3, 1).expect("valid");
        let _ = c.try_admit(2, 0, Load::default());
        c.on_processed(10, 0);
        assert_eq!(c.available(), 3);
        let m = c.metrics();
        assert_eq!(m["total_requested"], 2.0);
        assert_eq!(m["total_granted"], 2.0);
        assert_eq!(m["wait_ratio"], 0.0);
        let _ = c.try_admit(5, 0, Load::default());
        assert_eq!(c.metrics()["wait_ratio"], 0.5);
    }

    /// Several tasks compete for credits; an instrumented counter of items actually in flight
    /// (admitted and not processed) never exceeds the credits.
    async fn never_more_in_flight_than_credits(tasks: usize, rounds: usize, paused: bool) {
        let credits = 5;
        let c = Arc::new(CreditBased::new(credits, 2).expect("valid"));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (c, in_flight, peak) = (c.clone(), in_flight.clone(), peak.clone());
            handles.push(tokio::spawn(async move {
                let probe = Load::default;
                let mut done = 0;
                while done < rounds {
                    let want = 1 + (t + done) % 3;
                    let a = c
                        .acquire(want, 0, &probe, Duration::from_secs(60))
                        .await
                        .expect("credits come back");
                    let now = in_flight.fetch_add(a.admitted, SeqCst) + a.admitted;
                    peak.fetch_max(now, SeqCst);
                    assert!(now <= credits, "{now} in flight with {credits} credits");
                    if paused {
                        tokio::time::sleep(Duration::from_millis(1 + t as u64)).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                    in_flight.fetch_sub(a.admitted, SeqCst);
                    c.on_processed(a.admitted, 0);
                    done += 1;
                }
            }));
        }
        for h in handles {
            h.await.expect("task");
        }
        assert!(peak.load(SeqCst) <= credits);
        assert!(peak.load(SeqCst) > 1, "tasks did overlap");
        assert_eq!(c.available(), credits);
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_bounded_on_paused_clock() {
        never_more_in_flight_than_credits(8, 50, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_flight_bounded_across_threads() {
        never_more_in_flight_than_credits(6, 200, false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_at_the_replenish_threshold() {
        let c = Arc::new(CreditBased::new(4, 3).expect("valid"));
        let _ = c.try_admit(4, 0, Load::default());
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move {
                let probe = Load::default;
                c.acquire(4, 0, &probe, Duration::from_secs(5)).await
            })
        };
        tokio::task::yield_now().await;
        c.on_processed(2, 0); // 2 available < threshold 3: no wake-up
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        c.on_processed(1, 0); // 3 available: wake
        let a = waiter.await.expect("task").expect("woken");
        assert_eq!((a.admitted, a.deferred), (3, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_times_out_on_the_paused_clock() {
        let c = CreditBased::new(1, 1).expect("valid");
        let _ = c.try_admit(1, 0, Load::default());
        let start = tokio::time::Instant::now();
        let probe = Load::default;
        let err = c
            .acquire(1, 0, &probe, Duration::from_secs(3))
            .await
            .expect_err("no credit");
        assert_eq!(err.timeout, Duration::from_secs(3));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }
}
