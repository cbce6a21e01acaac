//! What the supervisor publishes through the `metrics` facade, read back with a debugging
//! recorder on a current-thread runtime and a manual poll clock.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tokio_pulse::clock::{ManualClock, PollClock};
use tokio_pulse::supervise::telemetry::{TASK_TIER, TRANSITIONS};
use tokio_pulse::{Supervisor, SupervisorConfig};

/// One poll that takes 1.5 ms of the manual clock (over the 1 ms budget: Warn), then done.
struct SlowOnce(ManualClock, bool);

impl Future for SlowOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.1 {
            return Poll::Ready(());
        }
        self.1 = true;
        self.0.increment(Duration::from_micros(1500));
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[test]
fn only_named_tasks_get_a_tier_gauge_reset_when_they_end() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (clock, mock) = PollClock::manual();
            let sup = Supervisor::with_clock(SupervisorConfig::default(), clock).expect("valid");
            sup.spawn(SlowOnce(mock.clone(), false))
                .await
                .expect("anonymous task");
            sup.spawn_named("hot-stage", SlowOnce(mock, false))
                .await
                .expect("named task");
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let tier_series: Vec<_> = snapshot
        .iter()
        .filter(|(key, ..)| key.key().name() == TASK_TIER)
        .collect();
    assert_eq!(tier_series.len(), 1, "one series, for the named task only");
    let (key, _, _, value) = tier_series[0];
    let labels: Vec<_> = key
        .key()
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    assert_eq!(labels, vec![("task".to_owned(), "hot-stage".to_owned())]);
    assert_eq!(
        *value,
        DebugValue::Gauge(0.0.into()),
        "reset when the task ended"
    );
    let warned: u64 = snapshot
        .iter()
        .filter(|(key, ..)| key.key().name() == TRANSITIONS)
        .filter_map(|(_, _, _, v)| match v {
            DebugValue::Counter(n) => Some(*n),
            _ => None,
        })
        .sum();
    assert_eq!(warned, 2, "both tasks were escalated to Warn");
}
