//! Clocks: CPU timers for threads and the process, a cheap per-poll clock, and the clock of
//! another thread for sampling.
//!
//! Reading a thread's CPU clock costs several hundred nanoseconds on common virtual machines,
//! so Tokio-Pulse never reads it per poll. Polls are timed with [`PollClock`] (the TSC when
//! it is reliable, else the monotonic clock), and CPU time per task is *sampled*: a background
//! thread reads each worker's CPU clock ([`ThreadCpuClock`]) every few milliseconds and charges
//! the delta to the task that worker is polling.
//!
//! Every [`CpuTimer`] reports its own cost and resolution, measured when it is created
//! ([`Calibration`]), never assumed.
//!
//! ```
//! use tokio_pulse::clock::{create_timer, CpuTimer};
//!
//! let timer = create_timer();
//! let before = timer.thread_cpu_time_ns();
//! let mut x = 0u64;
//! for i in 0..200_000u64 {
//!     x = std::hint::black_box(x.wrapping_add(i));
//! }
//! let after = timer.thread_cpu_time_ns();
//! assert!(after >= before);
//! // Measured at start-up, not a constant.
//! assert!(timer.measurement_overhead_ns() > 0);
//! assert!(timer.resolution_ns() > 0);
//! ```

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// High-precision CPU time measurement (seed 003).
pub trait CpuTimer: Send + Sync {
    /// CPU time consumed by the calling thread, in nanoseconds.
    fn thread_cpu_time_ns(&self) -> u64;

    /// CPU time consumed by the whole process, in nanoseconds.
    fn process_cpu_time_ns(&self) -> u64;

    /// Cost of one reading of [`thread_cpu_time_ns`](Self::thread_cpu_time_ns), measured.
    fn measurement_overhead_ns(&self) -> u64;

    /// Smallest step observed between two readings, measured.
    fn resolution_ns(&self) -> u64;
}

/// The measured cost and resolution of a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calibration {
    /// Nanoseconds one reading costs (the fastest of several rounds of back-to-back reads).
    pub overhead_ns: u64,
    /// Smallest non-zero difference seen between consecutive readings, in nanoseconds.
    pub resolution_ns: u64,
}

impl Calibration {
    /// Measures a clock given as a function returning nanoseconds.
    ///
    /// The overhead is timed against [`Instant`] over rounds of back-to-back reads; the
    /// resolution is the smallest non-zero step between consecutive reads. It takes well under
    /// a millisecond for clocks that cost under a microsecond.
    pub fn measure(read: impl Fn() -> u64) -> Self {
        const ROUNDS: usize = 7;
        const READS: u32 = 200;
        let mut best = u64::MAX;
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..READS {
                std::hint::black_box(read());
            }
            let per_read = start.elapsed().as_nanos() as u64 / u64::from(READS);
            best = best.min(per_read);
        }
        let mut resolution = u64::MAX;
        let mut last = read();
        for _ in 0..2_000 {
            let now = read();
            if now > last {
                resolution = resolution.min(now - last);
            }
            last = now;
        }
        if resolution == u64::MAX {
            // The clock never moved within 2 000 reads: its step is coarser than that span.
            let start = Instant::now();
            let first = read();
            let mut now = first;
            while now == first && start.elapsed() < Duration::from_millis(50) {
                now = read();
            }
            resolution = now.saturating_sub(first).max(1);
        }
        Self {
            overhead_ns: best.max(1),
            resolution_ns: resolution.max(1),
        }
    }
}

/// Builds the best [`CpuTimer`] for this platform, calibrated once per process.
pub fn create_timer() -> Box<dyn CpuTimer> {
    #[cfg(target_os = "linux")]
    {
        Box::new(LinuxCpuTimer::new())
    }
    #[cfg(not(target_os = "linux"))]
    {
        Box::new(FallbackCpuTimer::new())
    }
}

#[cfg(unix)]
fn read_clock(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime does not retain the pointer.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// Linux CPU timer on `clock_gettime` (`CLOCK_THREAD_CPUTIME_ID`, `CLOCK_PROCESS_CPUTIME_ID`).
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Copy)]
pub struct LinuxCpuTimer {
    calibration: Calibration,
}

#[cfg(target_os = "linux")]
impl LinuxCpuTimer {
    /// Returns the timer; the first call in a process measures its overhead and resolution.
    pub fn new() -> Self {
        static CAL: OnceLock<Calibration> = OnceLock::new();
        let calibration = *CAL.get_or_init(|| {
            Calibration::measure(|| read_clock(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0))
        });
        Self { calibration }
    }

    /// The measured calibration of the thread CPU clock.
    pub fn calibration(&self) -> Calibration {
        self.calibration
    }
}

#[cfg(target_os = "linux")]
impl Default for LinuxCpuTimer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "linux")]
impl CpuTimer for LinuxCpuTimer {
    fn thread_cpu_time_ns(&self) -> u64 {
        read_clock(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0)
    }

    fn process_cpu_time_ns(&self) -> u64 {
        read_clock(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or(0)
    }

    fn measurement_overhead_ns(&self) -> u64 {
        self.calibration.overhead_ns
    }

    fn resolution_ns(&self) -> u64 {
        self.calibration.resolution_ns
    }
}

/// Timer for platforms without a thread CPU clock: wall-clock time since creation, an upper
/// bound of the CPU time actually used.
#[derive(Debug, Clone, Copy)]
pub struct FallbackCpuTimer {
    start: Instant,
    calibration: Calibration,
}

impl FallbackCpuTimer {
    /// Starts the timer and measures the cost of reading it.
    pub fn new() -> Self {
        let start = Instant::now();
        let calibration = Calibration::measure(|| start.elapsed().as_nanos() as u64);
        Self { start, calibration }
    }
}

impl Default for FallbackCpuTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuTimer for FallbackCpuTimer {
    fn thread_cpu_time_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn process_cpu_time_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn measurement_overhead_ns(&self) -> u64 {
        self.calibration.overhead_ns
    }

    fn resolution_ns(&self) -> u64 {
        self.calibration.resolution_ns
    }
}

/// The CPU clock of one thread, readable from any thread while that thread lives.
///
/// Captured on the thread itself ([`ThreadCpuClock::current`]); reading it after the thread
/// exited returns `None` rather than a wrong value.
///
/// ```
/// use tokio_pulse::clock::ThreadCpuClock;
///
/// let (tx, rx) = std::sync::mpsc::channel();
/// let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
/// let worker = std::thread::spawn(move || {
///     tx.send(ThreadCpuClock::current()).ok();
///     stop_rx.recv().ok();
/// });
/// if let Ok(Some(clock)) = rx.recv() {
///     // Read from this thread while the worker waits.
///     assert!(clock.read_ns().is_some());
/// }
/// stop_tx.send(()).ok();
/// worker.join().ok();
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadCpuClock {
    #[cfg(target_os = "linux")]
    clock: libc::clockid_t,
}

impl ThreadCpuClock {
    /// The CPU clock of the calling thread, if the platform exposes one.
    pub fn current() -> Option<Self> {
        #[cfg(target_os = "linux")]
        {
            let mut clock: libc::clockid_t = 0;
            // SAFETY: pthread_self() is the calling thread, valid for the call; `clock` is a
            // valid out pointer.
            let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
            (rc == 0).then_some(Self { clock })
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }

    /// CPU time the thread has used, in nanoseconds; `None` once the thread has exited.
    pub fn read_ns(&self) -> Option<u64> {
        #[cfg(target_os = "linux")]
        {
            read_clock(self.clock)
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }
}

/// The kernel id (TID) of the calling thread, on Linux.
#[cfg(target_os = "linux")]
pub fn current_tid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    i32::try_from(tid).unwrap_or(0)
}

/// A cheap monotonic clock for timing polls: the TSC when the CPU's is invariant, else the
/// OS monotonic clock (decided by `quanta`), or a manual clock for tests.
///
/// Readings are raw ticks; convert with [`PollClock::nanos_between`] or precompute thresholds
/// with [`PollClock::ticks_for`], so the hot path compares integers only.
///
/// ```
/// use std::time::Duration;
/// use tokio_pulse::clock::PollClock;
///
/// let (clock, mock) = PollClock::manual();
/// let start = clock.raw();
/// mock.increment(Duration::from_micros(250));
/// assert_eq!(clock.nanos_between(start, clock.raw()), 250_000);
/// assert_eq!(clock.ticks_for(Duration::from_millis(1)), 1_000_000);
/// ```
#[derive(Debug, Clone)]
pub struct PollClock {
    clock: quanta::Clock,
    /// `quanta` reads the TSC itself: read it inline, without a call and a match.
    tsc: bool,
    /// Nanoseconds in 2^20 ticks.
    ns_per_mega_tick: u64,
    /// Whether it only moves when told to ([`PollClock::manual`]).
    manual: bool,
}

/// Controls a manual [`PollClock`].
pub type ManualClock = Arc<quanta::Mock>;

impl PollClock {
    /// The fastest reliable clock of this machine (calibrated once per process).
    pub fn new() -> Self {
        static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
        Self::from_quanta(CLOCK.get_or_init(quanta::Clock::new).clone(), false)
    }

    /// A clock that only moves when told to, for deterministic tests.
    pub fn manual() -> (Self, ManualClock) {
        let (clock, mock) = quanta::Clock::mock();
        (Self::from_quanta(clock, true), mock)
    }

    /// Whether this is a [`manual`](Self::manual) clock. In the simulated time of a manual
    /// clock nothing is preempted, so the supervisor takes its time for CPU time too.
    pub fn is_manual(&self) -> bool {
        self.manual
    }

    fn from_quanta(clock: quanta::Clock, manual: bool) -> Self {
        let ns_per_mega_tick = clock.delta_as_nanos(1, 1 + (1 << 20)).max(1);
        let tsc = quanta_uses_tsc(&clock);
        Self {
            clock,
            tsc,
            ns_per_mega_tick,
            manual,
        }
    }

    /// Raw ticks; only differences are meaningful.
    #[inline(always)]
    pub fn raw(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        if self.tsc {
            return read_tsc();
        }
        self.clock.raw()
    }

    /// Nanoseconds between two raw readings (0 if `end` is not after `start`).
    #[inline]
    pub fn nanos_between(&self, start: u64, end: u64) -> u64 {
        self.clock.delta_as_nanos(start, end)
    }

    /// Number of ticks in `duration` (rounded up), for comparisons against raw differences.
    pub fn ticks_for(&self, duration: Duration) -> u64 {
        let ns = duration.as_nanos().min(u128::from(u64::MAX >> 21)) as u64;
        (u128::from(ns) << 20).div_ceil(u128::from(self.ns_per_mega_tick)) as u64
    }

    /// Measured cost of one [`raw`](Self::raw) reading.
    pub fn calibration(&self) -> Calibration {
        let origin = self.raw();
        Calibration::measure(|| self.nanos_between(origin, self.raw()))
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn read_tsc() -> u64 {
    // SAFETY: RDTSC exists on every x86_64 CPU and has no memory effects.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
}

/// Whether `clock` reads the TSC: a reading of it falls between two TSC readings.
fn quanta_uses_tsc(clock: &quanta::Clock) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (0..3).all(|_| {
            let before = read_tsc();
            let value = clock.raw();
            let after = read_tsc();
            before <= value && value <= after
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = clock;
        false
    }
}

impl Default for PollClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_is_not_the_tsc() {
        let (clock, mock) = PollClock::manual();
        assert!(!clock.tsc);
        mock.increment(Duration::from_nanos(5));
        assert_eq!(clock.raw(), 5);
    }

    #[test]
    fn real_clock_moves_forward_and_converts() {
        let clock = PollClock::new();
        let a = clock.raw();
        std::thread::sleep(Duration::from_millis(2));
        let b = clock.raw();
        assert!(clock.nanos_between(a, b) >= 1_000_000);
        let ticks = clock.ticks_for(Duration::from_millis(1));
        assert!(ticks > 0);
        assert!(clock.calibration().overhead_ns >= 1);
    }
}
