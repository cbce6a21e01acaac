//! `pulse-overhead`: what supervising a task costs per poll.
//!
//! One future wakes itself and returns `Pending` many times, with trivial polls, on a
//! current-thread runtime. It runs four ways in interleaved rounds: bare, under the Tokio-Pulse
//! supervisor, instrumented with `tokio-metrics`' `TaskMonitor`, and wrapped so it reads the
//! thread CPU clock before and after each poll (the naive design). The cost each adds per poll
//! is its median time per poll minus the bare median.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use serde_json::json;
use tokio_pulse::clock::{Calibration, CpuTimer, PollClock, create_timer};
use tokio_pulse::{Supervisor, SupervisorConfig};

use crate::CommonOpts;
use crate::report::Report;

/// Wakes itself and returns `Pending` `n` times, then completes.
struct YieldMany(u64);

impl Future for YieldMany {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            return Poll::Ready(());
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The naive design: the thread CPU clock read before and after every poll.
struct CpuClockPerPoll<F> {
    inner: Pin<Box<F>>,
    timer: Box<dyn CpuTimer>,
    cpu_ns: u64,
}

impl<F: Future> Future for CpuClockPerPoll<F> {
    type Output = u64;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        let this = &mut *self;
        let start = this.timer.thread_cpu_time_ns();
        let result = this.inner.as_mut().poll(cx);
        let end = this.timer.thread_cpu_time_ns();
        this.cpu_ns += end.saturating_sub(start);
        match result {
            Poll::Ready(_) => Poll::Ready(this.cpu_ns),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Bare,
    Supervised,
    TaskMonitor,
    CpuClock,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Bare,
        Variant::Supervised,
        Variant::TaskMonitor,
        Variant::CpuClock,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Bare => "bare",
            Variant::Supervised => "tokio-pulse supervised",
            Variant::TaskMonitor => "tokio-metrics TaskMonitor",
            Variant::CpuClock => "thread CPU clock per poll",
        }
    }
}

/// Runs `polls` polls of one task the way `variant` says; returns nanoseconds per poll.
fn measure(
    rt: &tokio::runtime::Runtime,
    variant: Variant,
    polls: u64,
    supervisor: &Supervisor,
    monitor: &tokio_metrics::TaskMonitor,
) -> Result<f64, Box<dyn std::error::Error>> {
    let n = polls.saturating_sub(1);
    let elapsed = rt.block_on(async {
        let start = Instant::now();
        match variant {
            Variant::Bare => tokio::spawn(YieldMany(n)).await?,
            Variant::Supervised => supervisor.spawn(YieldMany(n)).await?,
            Variant::TaskMonitor => tokio::spawn(monitor.instrument(YieldMany(n))).await?,
            Variant::CpuClock => {
                let cpu = tokio::spawn(CpuClockPerPoll {
                    inner: Box::pin(YieldMany(n)),
                    timer: create_timer(),
                    cpu_ns: 0,
                })
                .await?;
                std::hint::black_box(cpu);
            }
        }
        Ok::<_, tokio::task::JoinError>(start.elapsed())
    })?;
    Ok(elapsed.as_nanos() as f64 / polls as f64)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Runs the scenario.
pub fn run(opts: &CommonOpts) -> Result<Report, Box<dyn std::error::Error>> {
    let (polls, rounds) = if opts.quick {
        (400_000u64, 5usize)
    } else {
        (3_000_000u64, 9usize)
    };
    // The naive wrapper costs over a microsecond a poll: fewer polls give the same precision.
    let naive_polls = (polls / 10).max(10_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let supervisor = Supervisor::new(SupervisorConfig::default())?;
    let monitor = tokio_metrics::TaskMonitor::new();

    // Warm up every variant once.
    for v in Variant::ALL {
        measure(&rt, v, 20_000, &supervisor, &monitor)?;
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); Variant::ALL.len()];
    for _ in 0..rounds {
        for (i, v) in Variant::ALL.iter().enumerate() {
            let n = if *v == Variant::CpuClock {
                naive_polls
            } else {
                polls
            };
            samples[i].push(measure(&rt, *v, n, &supervisor, &monitor)?);
        }
    }
    let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    let bare = medians[0];
    let added: Vec<f64> = medians.iter().map(|m| m - bare).collect();
    let ours = added[1];
    let vs_task_monitor = ours / added[2].max(1.0);
    let vs_thread_cpu_clock = ours / added[3].max(1.0);

    let poll_clock = PollClock::new().calibration();
    let cpu_timer = create_timer();
    let origin = Instant::now();
    let instant = Calibration::measure(|| origin.elapsed().as_nanos() as u64);

    let mut report = Report::new(
        format!("pulse-overhead: {polls} trivial polls of one task, median of {rounds} rounds"),
        &["variant", "ns/poll", "added ns/poll"],
    );
    for (i, v) in Variant::ALL.iter().enumerate() {
        report.row(vec![
            v.name().to_owned(),
            format!("{:.1}", medians[i]),
            format!("{:.1}", added[i]),
        ]);
    }
    report.note(format!(
        "clock costs measured now: poll clock (TSC/monotonic) {} ns, Instant::now {} ns, thread CPU clock {} ns (resolution {} ns)",
        poll_clock.overhead_ns,
        instant.overhead_ns,
        cpu_timer.measurement_overhead_ns(),
        cpu_timer.resolution_ns()
    ));
    report.note(format!(
        "targets: added_ns_per_poll <= 25 ({:.1}), vs_task_monitor <= 1.0 ({:.2}), vs_thread_cpu_clock <= 0.1 ({:.3})",
        ours, vs_task_monitor, vs_thread_cpu_clock
    ));
    report.summary(json!({
        "scenario": "pulse-overhead",
        "polls": polls,
        "rounds": rounds,
        "bare_ns_per_poll": round2(bare),
        "supervised_ns_per_poll": round2(medians[1]),
        "task_monitor_ns_per_poll": round2(medians[2]),
        "thread_cpu_clock_ns_per_poll": round2(medians[3]),
        "added_ns_per_poll": round2(ours),
        "task_monitor_added_ns_per_poll": round2(added[2]),
        "thread_cpu_clock_added_ns_per_poll": round2(added[3]),
        "vs_task_monitor": round3(vs_task_monitor),
        "vs_thread_cpu_clock": round3(vs_thread_cpu_clock),
        "poll_clock_overhead_ns": poll_clock.overhead_ns,
        "thread_cpu_clock_overhead_ns": cpu_timer.measurement_overhead_ns(),
    }));
    Ok(report)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
