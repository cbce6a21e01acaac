//! The supervisor on a manual clock: a poll is "long" only when the test's future advances the
//! clock inside it, so tier decisions and migrations are deterministic.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};
use tokio_pulse::clock::{ManualClock, PollClock};
use tokio_pulse::{Supervisor, SupervisorConfig, Tier};

fn supervisor() -> (Supervisor, ManualClock) {
    let (clock, mock) = PollClock::manual();
    let config = SupervisorConfig {
        isolation_threads: 1,
        ..SupervisorConfig::default()
    };
    let supervisor = Supervisor::with_clock(config, clock).expect("valid config");
    (supervisor, mock)
}

fn on_isolation_thread() -> bool {
    std::thread::current().name() == Some("pulse-isolated")
}

/// A future driven by a closure called on each poll with the poll count.
struct Steps<F>(usize, F);

impl<T, F: FnMut(usize, &mut Context<'_>) -> Poll<T> + Unpin> Future for Steps<F> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let n = self.0;
        self.0 += 1;
        (self.1)(n, cx)
    }
}

/// First poll is long (advances the clock by 50 ms against the 1 ms budget) and yields;
/// the following polls run `then`.
fn hog_then<T>(
    mock: ManualClock,
    mut then: impl FnMut(usize, &mut Context<'_>) -> Poll<T> + Unpin,
) -> Steps<impl FnMut(usize, &mut Context<'_>) -> Poll<T> + Unpin> {
    Steps(0, move |n, cx: &mut Context<'_>| {
        if n == 0 {
            mock.increment(Duration::from_millis(50));
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            then(n, cx)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_output_and_monitor_tier() {
    let (sup, _mock) = supervisor();
    let handle = sup.spawn(async {
        tokio::task::yield_now().await;
        21 * 2
    });
    let id = handle.id();
    assert_eq!(handle.await.expect("completes"), 42);
    assert!(id > 0);
    assert_eq!(sup.tasks_per_tier(), [0, 0, 0, 0]);
    assert!(sup.isolation_context().is_none(), "no isolation needed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_future_delivers_its_output() {
    let (sup, mock) = supervisor();
    let mut handle = sup.spawn(hog_then(mock, |_, _| Poll::Ready(on_isolation_thread())));
    // The task may already have run and moved on the other worker: read stats only after.
    let ran_isolated = (&mut handle)
        .await
        .expect("output reaches the original handle");
    assert_eq!(
        handle.stats().migrations,
        1,
        "moved once, finished isolated"
    );
    assert!(ran_isolated, "second poll ran on the isolation runtime");
    let ctx = sup.isolation_context().expect("isolation runtime started");
    assert!(!ctx.threads().is_empty() || ctx.mode() == tokio_pulse::isolation::IsolationMode::None);
    assert_eq!(sup.tasks_per_tier(), [0, 0, 0, 0]);
    assert_eq!(sup.tier_manager().escalations(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_future_panic_reaches_the_handle() {
    let (sup, mock) = supervisor();
    let handle = sup.spawn(hog_then(mock, |_, _| -> Poll<()> {
        assert!(on_isolation_thread());
        // Unwind without the panic hook: with RUST_BACKTRACE set, the hook would symbolise a
        // backtrace on an idle-priority thread, which takes seconds on a busy machine.
        std::panic::resume_unwind(Box::new("boom on the isolation runtime"))
    }));
    let err = handle.await.expect_err("the panic is reported");
    assert!(err.is_panic());
    let payload = err.into_panic();
    assert_eq!(
        payload.downcast_ref::<&str>().copied(),
        Some("boom on the isolation runtime")
    );
}

struct DropSignal(Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_future_is_cancelled_by_abort() {
    let (sup, mock) = supervisor();
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let (isolated_tx, isolated_rx) = oneshot::channel();
    let mut isolated_tx = Some(isolated_tx);
    let guard = DropSignal(Some(dropped_tx));
    let handle = sup.spawn(hog_then(mock, move |_, _| -> Poll<()> {
        let _keep = &guard;
        if on_isolation_thread()
            && let Some(tx) = isolated_tx.take()
        {
            let _ = tx.send(());
        }
        Poll::Pending // forever, never woken
    }));
    isolated_rx
        .await
        .expect("the future reached the isolation runtime");
    assert!(handle.stats().isolated);
    assert_eq!(handle.tier(), Tier::Isolate);
    handle.abort();
    let err = handle.await.expect_err("aborted");
    assert!(err.is_cancelled());
    tokio::time::timeout(Duration::from_secs(10), dropped_rx)
        .await
        .expect("the isolated future is dropped")
        .expect("signal sent by drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_task_that_behaves_comes_back() {
    let (sup, mock) = supervisor();
    let notify = Arc::new(Notify::new());
    let threads = Arc::new(Mutex::new(Vec::new()));
    let (isolated_tx, isolated_rx) = oneshot::channel();
    let mut isolated_tx = Some(isolated_tx);
    let n2 = Arc::clone(&notify);
    let t2 = Arc::clone(&threads);
    let handle = sup.spawn(async move {
        let mock2 = mock.clone();
        // Long first poll -> Isolate.
        hog_then(mock2, |_, _| Poll::Ready(())).await;
        t2.lock().push(on_isolation_thread());
        if let Some(tx) = isolated_tx.take() {
            let _ = tx.send(mock);
        }
        // Wait on the test: a short poll after a long calm period brings the task back.
        n2.notified().await;
        t2.lock().push(on_isolation_thread());
        tokio::task::yield_now().await;
        t2.lock().push(on_isolation_thread());
        "done"
    });
    let mock = isolated_rx.await.expect("isolated");
    assert_eq!(handle.tier(), Tier::Isolate);
    // Let the poll that sent the signal end, so the jump below falls between two polls.
    while sup.is_polling(handle.id()) {
        tokio::task::yield_now().await;
    }
    // Ten calm seconds on the task's clock: the score decays and the cooldown passes.
    mock.increment(Duration::from_secs(10));
    notify.notify_one();
    assert_eq!(handle.await_ref().await, "done");
    let seen = threads.lock().clone();
    assert_eq!(seen.first(), Some(&true), "ran isolated first: {seen:?}");
    assert_eq!(seen.last(), Some(&false), "came back: {seen:?}");
    assert_eq!(sup.tier_manager().demotions(), 1);
}

trait AwaitRef<T> {
    fn await_ref(self) -> Pin<Box<dyn Future<Output = T> + Send>>;
}

impl<T: Send + 'static> AwaitRef<T> for tokio_pulse::JoinHandle<T> {
    fn await_ref(self) -> Pin<Box<dyn Future<Output = T> + Send>> {
        Box::pin(async move {
            let stats = self.stats();
            let out = self.await.expect("task completes");
            assert!(stats.migrations >= 1);
            out
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_and_yield_tiers_stay_local() {
    let (sup, mock) = supervisor();
    let polls = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&polls);
    let m = mock.clone();
    // 1.5 ms over a 1 ms budget: one point -> Warn.
    let warn = sup.spawn(Steps(0, move |n, cx: &mut Context<'_>| {
        p.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            m.increment(Duration::from_micros(1500));
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready((on_isolation_thread(), n))
        }
    }));
    let stats_handle = warn.stats();
    assert!(!stats_handle.isolated);
    let (isolated, _) = warn.await.expect("done");
    assert!(!isolated);

    // 5 ms: five points -> Yield; the task gives way once, then goes on locally.
    let m = mock.clone();
    let yielder = sup.spawn(Steps(0, move |n, cx: &mut Context<'_>| {
        if n < 3 {
            if n == 0 {
                m.increment(Duration::from_millis(5));
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready(on_isolation_thread())
        }
    }));
    let id = yielder.id();
    assert!(!yielder.await.expect("done"));
    assert!(id > 0);
    assert_eq!(sup.tier_manager().escalations(), 2);
    assert!(sup.isolation_context().is_none(), "nobody was isolated");
    let stats = sup.worker_stats();
    let total_violations: u64 = stats.iter().map(|w| w.stats.violations).sum();
    let total_polls: u64 = stats.iter().map(|w| w.stats.polls).sum();
    assert_eq!(total_violations, 2);
    assert!(total_polls >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_and_abort_of_local_tasks() {
    let (sup, _mock) = supervisor();
    let handle = sup.spawn(async { std::panic::panic_any(7u32) });
    let err = handle.await.expect_err("panicked");
    assert_eq!(err.into_panic().downcast_ref::<u32>(), Some(&7));
    let handle = sup.spawn(std::future::pending::<()>());
    handle.abort();
    assert!(handle.await.expect_err("aborted").is_cancelled());
    assert_eq!(sup.tasks_per_tier(), [0, 0, 0, 0]);
}

#[test]
fn isolation_cgroup_removed_when_supervisor_goes() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (sup, _mock) = supervisor();
    sup.start_isolation().expect("isolation runtime starts");
    let ctx = sup.isolation_context().expect("context");
    let dir = ctx.cgroup_path();
    runtime.block_on(async {
        sup.spawn(async { 1 }).await.expect("runs");
    });
    drop(sup);
    drop(runtime);
    if let Some(dir) = dir {
        // The sampler thread may hold the last reference for a few microseconds.
        for _ in 0..500 {
            if !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!dir.exists(), "cgroup {} removed", dir.display());
    }
}
