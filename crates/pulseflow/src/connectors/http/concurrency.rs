//! [`AdaptiveConcurrency`]: how many requests may be in flight, adapted to the server
//! (additive increase, multiplicative decrease).
//!
//! - When the limit was reached during a round trip (the smoothed latency of successful
//!   requests) and the requests of that round trip succeeded no slower than twice it, the
//!   limit grows by one.
//! - A request the server refused for load (`429`, `503`, another `5xx`, a timeout, a
//!   dropped connection), or one that took more than twice the smoothed round-trip time (and
//!   more than four smoothed deviations above it, so jitter is not taken for load), halves
//!   the limit; at most once per round trip, so one burst of errors counts once.
//!
//! The limit stays between 1 and the configured maximum; with equal bounds it is fixed.
//!
//! ```
//! use std::time::Duration;
//! use pulseflow::connectors::http::concurrency::AdaptiveConcurrency;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let limiter = AdaptiveConcurrency::new(4, 16);
//! let ms = Duration::from_millis(10);
//! for _ in 0..16 {
//!     // Every place used, every request answered in one round trip.
//!     let permits: Vec<_> = futures::future::join_all((0..limiter.limit()).map(|_| limiter.acquire())).await;
//!     tokio::time::advance(ms).await;
//!     for p in permits {
//!         p.success(ms);
//!     }
//! }
//! assert_eq!(limiter.limit(), 16); // grew while the server kept up
//! limiter.acquire().await.overloaded(ms);
//! assert_eq!(limiter.limit(), 8); // halved on a refusal
//! # }
//! ```

use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A latency above this many smoothed round trips is a sign of load...
const SLOW_FACTOR: u32 = 2;
/// ...when it is also this many smoothed deviations above the round trip (so the jitter of
/// a busy machine on sub-millisecond round trips is not taken for load).
const SLOW_DEVIATIONS: u32 = 4;
/// Successful requests measured before latency counts as a sign of load.
const WARM_UP: u32 = 5;
/// Weight of a new sample in the smoothed round-trip time.
const SMOOTHING: f64 = 0.2;

/// A concurrency limit that follows the server's latency and refusals. See the
/// [module docs](self).
#[derive(Debug)]
pub struct AdaptiveConcurrency {
    max: usize,
    state: Mutex<State>,
    room: Notify,
}

#[derive(Debug)]
struct State {
    limit: usize,
    in_flight: usize,
    /// Smoothed latency of successful requests.
    rtt: Option<Duration>,
    /// Smoothed absolute deviation of their latencies from `rtt`.
    deviation: Duration,
    /// Successful requests measured (up to [`WARM_UP`]).
    measured: u32,
    /// Whether the limit was reached since the window started.
    used: bool,
    window_start: Instant,
    last_decrease: Option<Instant>,
}

impl AdaptiveConcurrency {
    /// Starts at `initial` (at least 1), never above `max`.
    pub fn new(initial: usize, max: usize) -> Self {
        let max = max.max(1);
        Self {
            max,
            state: Mutex::new(State {
                limit: initial.clamp(1, max),
                in_flight: 0,
                rtt: None,
                deviation: Duration::ZERO,
                measured: 0,
                used: false,
                window_start: Instant::now(),
                last_decrease: None,
            }),
            room: Notify::new(),
        }
    }

    /// A fixed limit of `n`.
    pub fn fixed(n: usize) -> Self {
        Self::new(n, n)
    }

    /// The limit now.
    pub fn limit(&self) -> usize {
        self.state.lock().limit
    }

    /// The most the limit may reach.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.state.lock().in_flight
    }

    /// Waits until a request may start.
    pub async fn acquire(&self) -> ConcurrencyPermit<'_> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut st = self.state.lock();
                if st.in_flight < st.limit {
                    st.in_flight += 1;
                    if st.in_flight == st.limit {
                        st.used = true;
                    }
                    return ConcurrencyPermit { owner: self };
                }
            }
            room.await;
        }
    }

    fn release(&self, outcome: Option<(bool, Duration)>) {
        let now = Instant::now();
        let mut st = self.state.lock();
        st.in_flight -= 1;
        let before = st.limit;
        if let Some((ok, latency)) = outcome {
            let slow = st.measured >= WARM_UP
                && st.rtt.is_some_and(|rtt| {
                    latency > rtt * SLOW_FACTOR && latency > rtt + st.deviation * SLOW_DEVIATIONS
                });
            if ok && !slow {
                let rtt = match st.rtt {
                    None => latency,
                    Some(rtt) => {
                        let off = latency.abs_diff(rtt);
                        st.deviation =
                            st.deviation.mul_f64(1.0 - SMOOTHING) + off.mul_f64(SMOOTHING);
                        rtt.mul_f64(1.0 - SMOOTHING) + latency.mul_f64(SMOOTHING)
                    }
                };
                st.rtt = Some(rtt);
                st.measured = (st.measured + 1).min(WARM_UP);
                if now.duration_since(st.window_start) >= rtt {
                    if st.used {
                        st.limit = (st.limit + 1).min(self.max);
                    }
                    st.used = st.in_flight >= st.limit;
                    st.window_start = now;
                }
            } else {
                let recent = match (st.last_decrease, st.rtt) {
                    (Some(at), Some(rtt)) => now.duration_since(at) < rtt,
                    _ => false,
                };
                if !recent {
                    st.limit = (st.limit / 2).max(1);
                    st.last_decrease = Some(now);
                    st.used = false;
                    st.window_start = now;
                }
            }
        }
        let grew = st.limit > before;
        drop(st);
        if grew {
            self.room.notify_waiters();
        } else {
            self.room.notify_one();
        }
    }
}

/// A request allowed to start; report how it went with [`success`](Self::success) or
/// [`overloaded`](Self::overloaded). Dropped without a report, it only frees its place.
#[derive(Debug)]
#[must_use = "report how the request went"]
pub struct ConcurrencyPermit<'a> {
    owner: &'a AdaptiveConcurrency,
}

impl ConcurrencyPermit<'_> {
    /// The server answered in `latency` without a sign of load.
    pub fn success(self, latency: Duration) {
        self.finish(Some((true, latency)));
    }

    /// The server refused for load, failed, or timed out.
    pub fn overloaded(self, latency: Duration) {
        self.finish(Some((false, latency)));
    }

    fn finish(self, outcome: Option<(bool, Duration)>) {
        let owner = self.owner;
        std::mem::forget(self);
        owner.release(outcome);
    }
}

impl Drop for ConcurrencyPermit<'_> {
    fn drop(&mut self) {
        self.owner.release(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Every place taken, answered after `latency`.
    async fn round(l: &AdaptiveConcurrency, ok: bool, latency: Duration) {
        let permits: Vec<_> = futures::future::join_all((0..l.limit()).map(|_| l.acquire())).await;
        tokio::time::advance(latency).await;
        for p in permits {
            if ok {
                p.success(latency);
            } else {
                p.overloaded(latency);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_by_one_per_round_trip_while_every_place_is_used() {
        let l = AdaptiveConcurrency::new(1, 10);
        for _ in 0..5 {
            round(&l, true, 10 * MS).await;
        }
        assert_eq!(l.limit(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_limit_does_not_grow() {
        let l = AdaptiveConcurrency::new(4, 10);
        for _ in 0..20 {
            let p = l.acquire().await;
            tokio::time::advance(10 * MS).await;
            p.success(10 * MS);
        }
        assert_eq!(l.limit(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_halve_once_per_round_trip_then_it_recovers() {
        let l = AdaptiveConcurrency::new(16, 16);
        round(&l, true, 10 * MS).await;
        round(&l, false, MS).await;
        assert_eq!(l.limit(), 8, "one burst of errors halves once");
        round(&l, false, 10 * MS).await;
        assert_eq!(l.limit(), 4);
        for _ in 0..12 {
            round(&l, true, 10 * MS).await;
        }
        assert_eq!(l.limit(), 16, "back to the maximum once errors stop");
    }

    #[tokio::test(start_paused = true)]
    async fn a_latency_jump_counts_as_load() {
        let l = AdaptiveConcurrency::new(8, 8);
        round(&l, true, 10 * MS).await;
        l.acquire().await.success(50 * MS);
        assert_eq!(l.limit(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_is_not_load() {
        let l = AdaptiveConcurrency::new(8, 8);
        for i in 0..40 {
            let latency = if i % 2 == 0 { 4 * MS } else { 16 * MS };
            l.acquire().await.success(latency);
        }
        l.acquire().await.success(22 * MS);
        assert_eq!(l.limit(), 8, "within the usual spread");
        l.acquire().await.success(80 * MS);
        assert_eq!(l.limit(), 4, "far outside it");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_a_place_under_the_limit() {
        let l = std::sync::Arc::new(AdaptiveConcurrency::fixed(1));
        let first = l.acquire().await;
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move {
                let p = l.acquire().await;
                p.success(MS);
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert_eq!(l.in_flight(), 1);
        drop(first);
        waiter.await.expect("second request ran");
        assert_eq!(l.limit(), 1);
    }
}
