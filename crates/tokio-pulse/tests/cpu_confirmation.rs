//! On the real clocks: a poll that is long only because its thread was off the CPU (preempted,
//! or here blocked in `sleep`) may raise a task to Warn, never further; a poll that burns CPU
//! escalates as far as its CPU time says. The assertions are on tiers, not on timings.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_pulse::clock::ThreadCpuClock;
use tokio_pulse::{Supervisor, SupervisorConfig, Tier, TierConfig};

/// Wakes itself `polls` times, each poll doing `work`, then completes.
struct Repeat<F> {
    polls: usize,
    work: F,
}

impl<F: FnMut() + Unpin> Future for Repeat<F> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.polls == 0 {
            return Poll::Ready(());
        }
        self.polls -= 1;
        (self.work)();
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Burns `ms` milliseconds of this thread's CPU time (however long that takes in wall time).
fn burn_cpu(ms: u64) {
    let Some(clock) = ThreadCpuClock::current() else {
        std::thread::sleep(Duration::from_millis(ms));
        return;
    };
    let start = clock.read_ns().unwrap_or(0);
    while clock.read_ns().unwrap_or(u64::MAX) < start + ms * 1_000_000 {
        std::hint::spin_loop();
    }
}

/// Scores decay slowly here, so a busy machine spacing the polls out changes no decision.
fn supervisor() -> Supervisor {
    Supervisor::new(SupervisorConfig {
        isolation_threads: 1,
        tiers: TierConfig {
            decay: Duration::from_secs(60),
            ..TierConfig::default()
        },
        ..SupervisorConfig::default()
    })
    .expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_long_off_the_cpu_stop_at_warn() {
    if ThreadCpuClock::current().is_none() {
        // Without thread CPU clocks, wall-clock time is all there is.
        return;
    }
    let sup = supervisor();
    let mut handle = sup.spawn(Repeat {
        polls: 8,
        work: || std::thread::sleep(Duration::from_millis(4)),
    });
    (&mut handle).await.expect("completes");
    let stats = handle.stats();
    // The first long poll counts as a violation unless the CPU sampler happened to read the
    // thread's clock during it (then it is known to be idle time); either way, no further.
    assert!(stats.violations <= 1, "{stats:?}");
    assert!(stats.tier <= Tier::Warn, "tier {:?}", stats.tier);
    assert_eq!(stats.migrations, 0);
    assert!(sup.isolation_context().is_none(), "nobody was isolated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_long_on_the_cpu_escalate_to_isolate() {
    let sup = supervisor();
    let mut handle = sup.spawn(Repeat {
        polls: 6,
        work: || burn_cpu(4),
    });
    (&mut handle).await.expect("completes");
    let stats = handle.stats();
    assert!(
        stats.migrations >= 1,
        "moved to the isolation runtime: {stats:?}"
    );
    assert!(stats.violations >= 3, "{stats:?}");
}
