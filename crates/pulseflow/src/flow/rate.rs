//! [`RateShaping`]: a token bucket of `rate` items per second and bursts of at most `burst`.
//!
//! Built on the [`leaky_bucket`] crate, which paces waiters in order on Tokio's clock (so tests
//! run on the paused clock). The bucket starts full and holds at most `burst` tokens; it is
//! refilled every whole millisecond interval, the pair (tokens per refill, interval) chosen so
//! that the long-run rate is exact or within 1 % of `rate` without a refill larger than
//! `burst`. A rate that cannot be shaped that way (for example above 1000 × `burst` per second)
//! is a configuration error.
//!
//! ```
//! use std::time::Duration;
//! use pulseflow::flow::{BackpressureController, Load, RateShaping};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let rate = RateShaping::new(100, 10).expect("valid"); // 100 items/s, bursts of 10
//! let start = tokio::time::Instant::now();
//! let probe = || Load::default();
//! let mut sent = 0;
//! while sent < 110 {
//!     let a = rate.acquire(10, 0, &probe, Duration::from_secs(1)).await.expect("paced");
//!     sent += a.admitted;
//! }
//! // 10 at once from the full bucket, then 100 more at 100/s.
//! assert_eq!(start.elapsed(), Duration::from_secs(1));
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures::future::BoxFuture;
use leaky_bucket::RateLimiter;

use super::controller::{
    AcquireTimeout, Admission, BackpressureController, FlowConfigError, Load, LoadProbe, nonzero,
};

/// Largest relative error of the refill pacing accepted for a (rate, burst) pair.
const MAX_PACING_ERROR: f64 = 0.01;

/// Token-bucket rate shaping.
#[derive(Debug)]
pub struct RateShaping {
    rate: u32,
    burst: u32,
    limiter: RateLimiter,
    requested: AtomicU64,
    granted: AtomicU64,
}

impl RateShaping {
    /// `rate` items per second (at least 1) with bursts of at most `burst` (at least 1).
    pub fn new(rate: u32, burst: u32) -> Result<Self, FlowConfigError> {
        nonzero("rate", "rate", u64::from(rate))?;
        nonzero("rate", "burst", u64::from(burst))?;
        let (refill, interval_ms) = pacing(rate, burst)?;
        let burst_tokens = burst as usize;
        let limiter = RateLimiter::builder()
            .initial(burst_tokens)
            .max(burst_tokens)
            .refill(refill)
            .interval(Duration::from_millis(interval_ms))
            .fair(true)
            .build();
        Ok(Self {
            rate,
            burst,
            limiter,
            requested: AtomicU64::new(0),
            granted: AtomicU64::new(0),
        })
    }

    /// Items per second.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Largest burst.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Tokens added per refill and the refill interval.
    pub fn refill(&self) -> (usize, Duration) {
        (self.limiter.refill(), self.limiter.interval())
    }

    fn granted(&self, items: usize, admitted: usize) -> Admission {
        self.requested.fetch_add(items as u64, Relaxed);
        self.granted.fetch_add(admitted as u64, Relaxed);
        Admission::partial(items, admitted)
    }
}

/// Chooses (tokens per refill, interval in ms) for `rate`/s with refills of at most `burst`:
/// exact when possible, else within [`MAX_PACING_ERROR`].
fn pacing(rate: u32, burst: u32) -> Result<(usize, u64), FlowConfigError> {
    let (rate, burst) = (u64::from(rate), u64::from(burst));
    let g = gcd(rate, 1000);
    let (exact_refill, exact_interval) = (rate / g, 1000 / g);
    if exact_refill <= burst {
        return Ok((exact_refill as usize, exact_interval));
    }
    // No exact pair with a refill within the burst: the smallest refill whose rounded interval
    // is within 0.1 % of the rate, else the closest one.
    let mut best: Option<(u64, u64, f64)> = None;
    for refill in 1..=burst.min(exact_refill).min(100_000) {
        let interval = ((1000 * refill + rate / 2) / rate).max(1);
        let achieved = refill as f64 * 1000.0 / interval as f64;
        let error = (achieved - rate as f64).abs() / rate as f64;
        if best.is_none_or(|(_, _, e)| error < e) {
            best = Some((refill, interval, error));
        }
        if error <= 0.001 {
            break;
        }
    }
    match best {
        Some((refill, interval, error)) if error <= MAX_PACING_ERROR => {
            Ok((refill as usize, interval))
        }
        _ => Err(FlowConfigError::Inconsistent {
            strategy: "rate",
            what: format!(
                "a rate of {rate}/s needs bursts of at least {} (refills are at most every \
                 millisecond); burst is {burst}",
                rate.div_ceil(1000)
            ),
        }),
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl BackpressureController for RateShaping {
    fn strategy(&self) -> &'static str {
        "rate"
    }

    /// Admits as many items as there are tokens now (at most `burst`); defers the rest.
    fn try_admit(&self, items: usize, _bytes: u64, _load: Load) -> Admission {
        let want = items.min(self.burst as usize);
        if want == 0 {
            return self.granted(items, 0);
        }
        if self.limiter.try_acquire(want) {
            return self.granted(items, want);
        }
        // The failed attempt refilled the bucket: take what is there.
        let some = self.limiter.balance().min(want);
        if some > 0 && self.limiter.try_acquire(some) {
            return self.granted(items, some);
        }
        self.granted(items, 0)
    }

    /// Waits (in order with other waiters) for tokens for up to `burst` of the items.
    fn acquire<'a>(
        &'a self,
        items: usize,
        _bytes: u64,
        _load: LoadProbe<'a>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Admission, AcquireTimeout>> {
        Box::pin(async move {
            let want = items.min(self.burst as usize);
            match tokio::time::timeout(timeout, self.limiter.acquire(want)).await {
                Ok(()) => Ok(self.granted(items, want)),
                Err(_) => Err(AcquireTimeout {
                    strategy: "rate",
                    items,
                    timeout,
                }),
            }
        })
    }

    fn on_processed(&self, _items: usize, _bytes: u64) {}

    fn metrics(&self) -> BTreeMap<&'static str, f64> {
        let tokens = self.limiter.balance() as f64;
        BTreeMap::from([
            ("available_tokens", tokens),
            ("max_burst", f64::from(self.burst)),
            ("rate_per_second", f64::from(self.rate)),
            ("fill_ratio", tokens / f64::from(self.burst)),
            ("total_requested", self.requested.load(Relaxed) as f64),
            ("total_granted", self.granted.load(Relaxed) as f64),
        ])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;
    use tokio::time::Instant;

    use super::*;

    #[test]
    fn pacing_is_exact_when_the_burst_allows() {
        assert_eq!(pacing(1000, 1).expect("ok"), (1, 1));
        assert_eq!(pacing(250, 10).expect("ok"), (1, 4));
        assert_eq!(pacing(10_000, 10).expect("ok"), (10, 1));
        assert_eq!(pacing(7, 7).expect("ok"), (7, 1000));
    }

    #[test]
    fn pacing_approximates_within_one_percent() {
        for (rate, burst) in [(7, 1), (10_007, 100), (333, 3), (1_999, 2)] {
            let (refill, ms) = pacing(rate, burst).expect("representable");
            assert!(refill as u32 <= burst);
            let achieved = refill as f64 * 1000.0 / ms as f64;
            let err = (achieved - f64::from(rate)).abs() / f64::from(rate);
            assert!(
                err <= MAX_PACING_ERROR,
                "{rate}/{burst}: {achieved} ({err})"
            );
        }
    }

    #[test]
    fn unshapeable_rates_are_rejected() {
        assert!(pacing(1500, 1).is_err());
        assert!(pacing(600, 2).is_err()); // 0.6 per ms: 1/2 and 2/3 are both too far
        assert!(RateShaping::new(0, 1).is_err());
        assert!(RateShaping::new(1, 0).is_err());
    }

    /// Runs `tasks` senders for `secs` simulated seconds and returns (time, items) admissions.
    async fn run(rate: u32, burst: u32, tasks: usize, secs: u64) -> Vec<(Duration, usize)> {
        let shaper = Arc::new(RateShaping::new(rate, burst).expect("valid"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let end = start + Duration::from_secs(secs);
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (shaper, log) = (shaper.clone(), log.clone());
            handles.push(tokio::spawn(async move {
                let probe = Load::default;
                let mut i = 0usize;
                while Instant::now() < end {
                    let want = 1 + (t * 7 + i * 13) % 40;
                    i += 1;
                    let a = shaper
                        .acquire(want, 0, &probe, Duration::from_secs(60))
                        .await
                        .expect("paced");
                    let at = Instant::now();
                    if at < end {
                        log.lock().push((at - start, a.admitted));
                    }
                }
            }));
        }
        for h in handles {
            h.await.expect("task");
        }
        let mut log = std::mem::take(&mut *log.lock());
        log.sort();
        log
    }

    fn count(log: &[(Duration, usize)], from: Duration, len: Duration) -> usize {
        log.iter()
            .filter(|(t, _)| *t >= from && *t < from + len)
            .map(|(_, n)| n)
            .sum()
    }

    fn check(rate: u32, burst: u32, log: &[(Duration, usize)], secs: u64) {
        // Long-run rate, after the initial full bucket: within 2 %.
        let steady = count(log, Duration::from_secs(1), Duration::from_secs(secs - 1));
        let expected = f64::from(rate) * (secs - 1) as f64;
        let err = (steady as f64 - expected).abs() / expected;
        assert!(err <= 0.02, "rate {rate}: {steady} vs {expected} ({err})");
        // No burst above `burst`: at most `burst` items in any window of one refill interval,
        // and at most burst + rate * w in any window w.
        let (refill, interval) = RateShaping::new(rate, burst).expect("valid").refill();
        assert!(refill <= burst as usize);
        for &(t, _) in log {
            let n = count(log, t, interval);
            assert!(
                n <= burst as usize,
                "{n} items within {interval:?} at {t:?}"
            );
            let w = Duration::from_millis(100);
            let bound = f64::from(burst) + f64::from(rate) * w.as_secs_f64();
            assert!(count(log, t, w) as f64 <= bound, "window {w:?} at {t:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rate_holds_over_ten_simulated_seconds() {
        let log = run(1000, 50, 3, 10).await;
        check(1000, 50, &log, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn approximated_pacing_holds_too() {
        let log = run(333, 3, 2, 10).await;
        check(333, 3, &log, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn try_admit_takes_what_the_bucket_holds() {
        let shaper = RateShaping::new(100, 10).expect("valid");
        let a = shaper.try_admit(25, 0, Load::default());
        assert_eq!((a.admitted, a.deferred), (10, 15));
        assert_eq!(shaper.try_admit(1, 0, Load::default()).admitted, 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let a = shaper.try_admit(25, 0, Load::default());
        assert_eq!(a.admitted, 5);
        let m = shaper.metrics();
        assert_eq!(m["available_tokens"], 0.0);
        assert_eq!(m["fill_ratio"], 0.0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(shaper.try_admit(0, 0, Load::default()).admitted, 0);
        let _ = shaper.try_admit(1, 0, Load::default());
        assert_eq!(shaper.metrics()["fill_ratio"], 0.9);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_times_out() {
        let shaper = RateShaping::new(1, 1).expect("valid");
        let probe = Load::default;
        let _ = shaper.try_admit(1, 0, Load::default());
        let err = shaper
            .acquire(1, 0, &probe, Duration::from_millis(200))
            .await
            .expect_err("next token in a second");
        assert_eq!(err.strategy, "rate");
    }
}
