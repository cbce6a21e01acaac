//! [`CircuitBreaker`]: closed, open since a time, or half-open with one probe, per
//! [`CircuitBreakerPolicy`].
//!
//! - **Closed**: calls go through. Outcomes are kept in a sliding window of `policy.window`. The
//!   breaker opens when the window holds at least `minimum_throughput` outcomes and its error
//!   rate is above `error_threshold`, or at once when a call takes longer than
//!   `latency_threshold` (a zero threshold disables that rule).
//! - **Open { since }**: calls are refused; [`acquire`](CircuitBreaker::acquire) waits (a
//!   suspended task, on Tokio's clock) so a guarded stage takes no input and pressure goes
//!   upstream. After `cooldown` exactly one call goes through as a probe.
//! - **HalfOpen**: the probe is in flight and other calls are refused. A successful probe (in
//!   time) closes the breaker with a fresh window; a failed or slow one opens it again.
//!
//! Every transition is counted with a label naming it (`closed->open`, `open->half_open`,
//! `half_open->closed`, `half_open->open`), in [`BreakerSnapshot::transitions`] and as the
//! counter `pulseflow_circuit_transitions_total{circuit, transition}` of the [`metrics`]
//! facade; the gauge `pulseflow_circuit_state{circuit}` is 0 closed, 0.5 half-open, 1 open.
//!
//! ```
//! use std::time::Duration;
//! use pulseflow::flow::CircuitBreaker;
//! use pulseflow::policy::CircuitBreakerPolicy;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let breaker = CircuitBreaker::new("db", CircuitBreakerPolicy {
//!     error_threshold: 0.5,
//!     latency_threshold: Duration::from_secs(1),
//!     window: Duration::from_secs(10),
//!     minimum_throughput: 2,
//!     cooldown: Duration::from_secs(5),
//! });
//! for _ in 0..2 {
//!     breaker.try_acquire().expect("closed").failure(Duration::from_millis(5));
//! }
//! assert!(breaker.try_acquire().is_err()); // open
//! tokio::time::advance(Duration::from_secs(5)).await;
//! let probe = breaker.try_acquire().expect("the probe");
//! assert!(breaker.try_acquire().is_err()); // only one probe
//! probe.success(Duration::from_millis(5));
//! assert_eq!(breaker.snapshot().transitions["half_open->closed"], 1);
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::policy::CircuitBreakerPolicy;

/// Buckets the sliding window is divided into.
const BUCKETS: u32 = 20;

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cooldown after `since` has passed.
    Open {
        /// When the breaker opened.
        since: Instant,
    },
    /// One probe is in flight (or may go) to decide between closing and reopening.
    HalfOpen,
}

impl CircuitState {
    /// `"closed"`, `"open"` or `"half_open"`.
    pub fn label(&self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open { .. } => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    fn gauge(&self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 0.5,
            CircuitState::Open { .. } => 1.0,
        }
    }
}

/// A change of state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transition {
    /// Too many errors, or a call too slow.
    ClosedToOpen,
    /// The cooldown passed; a probe goes through.
    OpenToHalfOpen,
    /// The probe succeeded.
    HalfOpenToClosed,
    /// The probe failed or was too slow.
    HalfOpenToOpen,
}

impl Transition {
    /// All transitions, in counter order.
    pub const ALL: [Transition; 4] = [
        Transition::ClosedToOpen,
        Transition::OpenToHalfOpen,
        Transition::HalfOpenToClosed,
        Transition::HalfOpenToOpen,
    ];

    /// The label naming it: `closed->open`, `open->half_open`, `half_open->closed`,
    /// `half_open->open`.
    pub fn label(self) -> &'static str {
        match self {
            Transition::ClosedToOpen => "closed->open",
            Transition::OpenToHalfOpen => "open->half_open",
            Transition::HalfOpenToClosed => "half_open->closed",
            Transition::HalfOpenToOpen => "half_open->open",
        }
    }
}

/// A call refused because the breaker is open or its probe is in flight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit `{circuit}` is {state}{}", retry_after.map(|d| format!("; a probe may go in {d:?}")).unwrap_or_default())]
pub struct BreakerOpen {
    /// The breaker's name.
    pub circuit: String,
    /// `"open"` or `"half_open"`.
    pub state: &'static str,
    /// When open: time until a probe may go. When half-open: `None` (waiting for the probe).
    pub retry_after: Option<Duration>,
}

/// Figures of a breaker at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSnapshot {
    /// The breaker's name.
    pub circuit: String,
    /// Its state.
    pub state: CircuitState,
    /// Transitions so far, by label (all four labels present).
    pub transitions: BTreeMap<&'static str, u64>,
    /// Outcomes in the sliding window.
    pub window_calls: u64,
    /// Failed outcomes in the sliding window.
    pub window_failures: u64,
}

impl BreakerSnapshot {
    /// Failures over calls in the window (0 when empty).
    pub fn error_rate(&self) -> f64 {
        if self.window_calls == 0 {
            0.0
        } else {
            self.window_failures as f64 / self.window_calls as f64
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: Instant,
    calls: u64,
    failures: u64,
}

/// Outcomes over the last `len`, in buckets of `len / BUCKETS`.
#[derive(Debug)]
struct Window {
    len: Duration,
    width: Duration,
    buckets: VecDeque<Bucket>,
}

impl Window {
    fn new(len: Duration) -> Self {
        Self {
            len,
            width: (len / BUCKETS).max(Duration::from_millis(1)),
            buckets: VecDeque::new(),
        }
    }

    fn prune(&mut self, now: Instant) {
        while let Some(b) = self.buckets.front() {
            if now.duration_since(b.start) >= self.len {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    fn record(&mut self, now: Instant, ok: bool) {
        self.prune(now);
        let fresh = match self.buckets.back() {
            Some(b) => now.duration_since(b.start) >= self.width,
            None => true,
        };
        if fresh {
            self.buckets.push_back(Bucket {
                start: now,
                calls: 0,
                failures: 0,
            });
        }
        if let Some(b) = self.buckets.back_mut() {
            b.calls += 1;
            b.failures += u64::from(!ok);
        }
    }

    fn totals(&mut self, now: Instant) -> (u64, u64) {
        self.prune(now);
        self.buckets
            .iter()
            .fold((0, 0), |(c, f), b| (c + b.calls, f + b.failures))
    }
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    probe_in_flight: bool,
    window: Window,
}

#[derive(Debug)]
struct Handles {
    transitions: [metrics::Counter; 4],
    state: metrics::Gauge,
}

/// A circuit breaker. Share it as `Arc<CircuitBreaker>`; one lock per call (not per item).
#[derive(Debug)]
pub struct CircuitBreaker {
    name: Arc<str>,
    policy: CircuitBreakerPolicy,
    inner: Mutex<Inner>,
    transitions: [AtomicU64; 4],
    handles: Handles,
    probe_done: Notify,
}

impl CircuitBreaker {
    /// A closed breaker named `name` (the `circuit` label of its metrics).
    pub fn new(name: impl Into<Arc<str>>, policy: CircuitBreakerPolicy) -> Self {
        let name = name.into();
        let handles = Handles {
            transitions: Transition::ALL.map(|t| {
                metrics::counter!(
                    "pulseflow_circuit_transitions_total",
                    "circuit" => name.to_string(),
                    "transition" => t.label()
                )
            }),
            state: metrics::gauge!("pulseflow_circuit_state", "circuit" => name.to_string()),
        };
        handles.state.set(0.0);
        Self {
            name,
            policy,
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                probe_in_flight: false,
                window: Window::new(policy.window),
            }),
            transitions: Default::default(),
            handles,
            probe_done: Notify::new(),
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The policy.
    pub fn policy(&self) -> &CircuitBreakerPolicy {
        &self.policy
    }

    /// The state now (an open breaker whose cooldown passed stays `Open` until a call asks).
    pub fn state(&self) -> CircuitState {
        self.inner.lock().state
    }

    /// Lets a call through if the breaker allows it now: always when closed; as the single
    /// probe when open and the cooldown has passed (the breaker turns half-open); never while
    /// the probe is in flight.
    pub fn try_acquire(&self) -> Result<CallPermit<'_>, BreakerOpen> {
        let now = Instant::now();
        let mut st = self.inner.lock();
        match st.state {
            CircuitState::Closed => Ok(CallPermit::new(self, false)),
            CircuitState::Open { since } => {
                let ready = since + self.policy.cooldown;
                if now >= ready {
                    self.transition(&mut st, Transition::OpenToHalfOpen);
                    st.probe_in_flight = true;
                    Ok(CallPermit::new(self, true))
                } else {
                    Err(self.refusal("open", Some(ready - now)))
                }
            }
            CircuitState::HalfOpen if !st.probe_in_flight => {
                st.probe_in_flight = true;
                Ok(CallPermit::new(self, true))
            }
            CircuitState::HalfOpen => Err(self.refusal("half_open", None)),
        }
    }

    /// Waits (as a suspended task) until a call may go through, then lets it through. While
    /// the breaker is open the caller takes no input: pressure goes upstream, nothing is lost.
    pub async fn acquire(&self) -> CallPermit<'_> {
        loop {
            let probe_done = self.probe_done.notified();
            tokio::pin!(probe_done);
            probe_done.as_mut().enable();
            match self.try_acquire() {
                Ok(permit) => return permit,
                Err(BreakerOpen {
                    retry_after: Some(wait),
                    ..
                }) => tokio::time::sleep(wait).await,
                Err(_) => probe_done.await,
            }
        }
    }

    /// The breaker's figures now.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let mut st = self.inner.lock();
        let (calls, failures) = st.window.totals(now);
        BreakerSnapshot {
            circuit: self.name.to_string(),
            state: st.state,
            transitions: self.transition_counts(),
            window_calls: calls,
            window_failures: failures,
        }
    }

    /// Figures by name, like a controller's: `state` (0 closed, 0.5 half-open, 1 open),
    /// `error_rate`, `window_calls`, and one entry per transition label.
    pub fn metrics(&self) -> BTreeMap<&'static str, f64> {
        let snap = self.snapshot();
        let mut m: BTreeMap<&'static str, f64> = snap
            .transitions
            .iter()
            .map(|(k, v)| (*k, *v as f64))
            .collect();
        m.insert("state", snap.state.gauge());
        m.insert("error_rate", snap.error_rate());
        m.insert("window_calls", snap.window_calls as f64);
        m
    }

    fn transition_counts(&self) -> BTreeMap<&'static str, u64> {
        Transition::ALL
            .iter()
            .map(|t| (t.label(), self.transitions[*t as usize].load(Relaxed)))
            .collect()
    }

    fn refusal(&self, state: &'static str, retry_after: Option<Duration>) -> BreakerOpen {
        BreakerOpen {
            circuit: self.name.to_string(),
            state,
            retry_after,
        }
    }

    fn transition(&self, st: &mut Inner, t: Transition) {
        st.state = match t {
            Transition::ClosedToOpen | Transition::HalfOpenToOpen => CircuitState::Open {
                since: Instant::now(),
            },
            Transition::OpenToHalfOpen => CircuitState::HalfOpen,
            Transition::HalfOpenToClosed => {
                st.window = Window::new(self.policy.window);
                CircuitState::Closed
            }
        };
        self.transitions[t as usize].fetch_add(1, Relaxed);
        self.handles.transitions[t as usize].increment(1);
        self.handles.state.set(st.state.gauge());
        tracing::debug!(circuit = %self.name, transition = t.label(), "circuit breaker");
    }

    fn too_slow(&self, latency: Duration) -> bool {
        !self.policy.latency_threshold.is_zero() && latency > self.policy.latency_threshold
    }

    fn record(&self, probe: bool, ok: bool, latency: Duration) {
        let now = Instant::now();
        let slow = self.too_slow(latency);
        let mut st = self.inner.lock();
        st.window.record(now, ok);
        if probe {
            st.probe_in_flight = false;
            if st.state == CircuitState::HalfOpen {
                let t = if ok && !slow {
                    Transition::HalfOpenToClosed
                } else {
                    Transition::HalfOpenToOpen
                };
                self.transition(&mut st, t);
            }
            drop(st);
            self.probe_done.notify_waiters();
            return;
        }
        if st.state != CircuitState::Closed {
            // A call let through before the breaker opened: counted, decides nothing.
            return;
        }
        let open = slow || {
            let (calls, failures) = st.window.totals(now);
            !ok && calls >= u64::from(self.policy.minimum_throughput)
                && failures as f64 / calls as f64 > self.policy.error_threshold
        };
        if open {
            self.transition(&mut st, Transition::ClosedToOpen);
        }
    }

    fn abandon_probe(&self) {
        self.inner.lock().probe_in_flight = false;
        self.probe_done.notify_waiters();
    }
}

/// A call let through by a [`CircuitBreaker`]. Report its outcome with
/// [`success`](Self::success) or [`failure`](Self::failure); a permit dropped without an
/// outcome counts for nothing (a dropped probe lets the next call probe instead).
#[derive(Debug)]
#[must_use = "report the call's outcome with success() or failure()"]
pub struct CallPermit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl<'a> CallPermit<'a> {
    fn new(breaker: &'a CircuitBreaker, probe: bool) -> Self {
        Self {
            breaker,
            probe,
            reported: false,
        }
    }

    /// Whether this call is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The call succeeded after `latency` (a success slower than the latency threshold still
    /// opens the breaker).
    pub fn success(self, latency: Duration) {
        self.record(true, latency);
    }

    /// The call failed after `latency`.
    pub fn failure(self, latency: Duration) {
        self.record(false, latency);
    }

    /// The call's outcome.
    pub fn record(mut self, ok: bool, latency: Duration) {
        self.reported = true;
        self.breaker.record(self.probe, ok, latency);
    }
}

impl Drop for CallPermit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            self.breaker.abandon_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> CircuitBreakerPolicy {
        CircuitBreakerPolicy {
            error_threshold: 0.5,
            latency_threshold: Duration::from_secs(1),
            window: Duration::from_secs(10),
            minimum_throughput: 4,
            cooldown: Duration::from_secs(5),
        }
    }

    fn fail(b: &CircuitBreaker) {
        b.try_acquire().expect("allowed").failure(MS);
    }

    fn succeed(b: &CircuitBreaker) {
        b.try_acquire().expect("allowed").success(MS);
    }

    fn is_open(b: &CircuitBreaker) -> bool {
        matches!(b.state(), CircuitState::Open { .. })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_error_rate_only_with_minimum_throughput() {
        let b = CircuitBreaker::new("t", policy());
        for _ in 0..3 {
            fail(&b);
        }
        assert_eq!(
            b.state(),
            CircuitState::Closed,
            "3 calls < minimum throughput 4"
        );
        fail(&b);
        assert!(is_open(&b));
        let err = b.try_acquire().expect_err("open");
        assert_eq!(err.retry_after, Some(Duration::from_secs(5)));
        assert_eq!(b.snapshot().transitions["closed->open"], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn error_rate_at_or_below_threshold_keeps_it_closed() {
        let b = CircuitBreaker::new("t", policy());
        for _ in 0..10 {
            succeed(&b);
            fail(&b); // exactly 50 %: not above the threshold
        }
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(b.snapshot().error_rate(), 0.5);
    }

    #[tokio::test(start_paused = true)]
    async fn old_outcomes_leave_the_window() {
        let b = CircuitBreaker::new("t", policy());
        for _ in 0..3 {
            fail(&b);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        fail(&b);
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(b.snapshot().window_calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn one_slow_call_opens_it() {
        let b = CircuitBreaker::new("t", policy());
        b.try_acquire()
            .expect("closed")
            .success(Duration::from_millis(1001));
        assert!(is_open(&b));
    }

    #[tokio::test(start_paused = true)]
    async fn all_four_transitions_with_cooldown() {
        let b = CircuitBreaker::new("t", policy());
        for _ in 0..4 {
            fail(&b);
        }
        assert!(is_open(&b));
        // Cooldown not over: refused.
        tokio::time::advance(Duration::from_secs(5) - MS).await;
        assert_eq!(b.try_acquire().expect_err("open").retry_after, Some(MS));
        tokio::time::advance(MS).await;
        // Exactly one probe.
        let probe = b.try_acquire().expect("probe");
        assert!(probe.is_probe());
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let err = b.try_acquire().expect_err("probe in flight");
        assert_eq!((err.state, err.retry_after), ("half_open", None));
        // Probe fails: open again, cooldown restarts.
        probe.failure(MS);
        assert!(is_open(&b));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(b.try_acquire().is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        // Probe succeeds: closed, with a fresh window.
        b.try_acquire().expect("probe").success(MS);
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(b.snapshot().window_calls, 0);
        fail(&b);
        assert_eq!(b.state(), CircuitState::Closed);

        let t = b.snapshot().transitions;
        assert_eq!(t["closed->open"], 1);
        assert_eq!(t["open->half_open"], 2);
        assert_eq!(t["half_open->open"], 1);
        assert_eq!(t["half_open->closed"], 1);
        assert_eq!(b.metrics()["half_open->closed"], 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_probe_reopens() {
        let b = CircuitBreaker::new("t", policy());
        b.try_acquire()
            .expect("closed")
            .failure(Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(5)).await;
        b.try_acquire()
            .expect("probe")
            .success(Duration::from_secs(2));
        assert!(is_open(&b));
        assert_eq!(b.snapshot().transitions["half_open->open"], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_lets_another_probe_go() {
        let b = CircuitBreaker::new("t", policy());
        b.try_acquire()
            .expect("closed")
            .failure(Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(b.try_acquire().expect("probe"));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        b.try_acquire().expect("a new probe").success(MS);
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn late_outcomes_do_not_decide() {
        let b = CircuitBreaker::new("t", policy());
        let late = b.try_acquire().expect("closed");
        b.try_acquire()
            .expect("closed")
            .failure(Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = b.try_acquire().expect("probe");
        late.success(MS); // began before the breaker opened
        assert_eq!(b.state(), CircuitState::HalfOpen);
        probe.failure(MS);
        assert!(is_open(&b));
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_out_the_cooldown_and_the_probe() {
        let b = Arc::new(CircuitBreaker::new("t", policy()));
        b.try_acquire()
            .expect("closed")
            .failure(Duration::from_secs(2));
        let start = Instant::now();
        let probe = b.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(probe.is_probe());
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                let permit = b.acquire().await;
                let probe = permit.is_probe();
                permit.success(MS);
                probe
            })
        };
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiter.is_finished(), "waits while the probe is in flight");
        probe.success(MS);
        assert!(!waiter.await.expect("task"), "a normal call once closed");
    }

    #[test]
    fn transitions_reach_the_metrics_facade() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let b = CircuitBreaker::new("facade", policy());
                b.try_acquire()
                    .expect("closed")
                    .failure(Duration::from_secs(2));
                tokio::time::advance(Duration::from_secs(5)).await;
                b.try_acquire().expect("probe").success(MS);
            });
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let count = |transition: &str| {
            snapshot.iter().find_map(|(key, _, _, value)| {
                let k = key.key();
                let hit = k.name() == "pulseflow_circuit_transitions_total"
                    && k.labels()
                        .any(|l| l.key() == "circuit" && l.value() == "facade")
                    && k.labels()
                        .any(|l| l.key() == "transition" && l.value() == transition);
                match value {
                    DebugValue::Counter(n) if hit => Some(*n),
                    _ => None,
                }
            })
        };
        assert_eq!(count("closed->open"), Some(1));
        assert_eq!(count("open->half_open"), Some(1));
        assert_eq!(count("half_open->closed"), Some(1));
        assert_eq!(count("half_open->open"), Some(0));
    }
}
