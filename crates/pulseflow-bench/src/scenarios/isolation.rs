//! `isolation`: does isolating CPU hogs keep the latency of light tasks, without starving the
//! hogs?
//!
//! A multi-thread runtime with as many workers as cores runs 100 light tasks that sleep 1 ms
//! at a time and record how late each wake-up is. Three runs: no hogs; one CPU hog per core
//! (20 ms of computation per poll) unsupervised; the same hogs under the Tokio-Pulse
//! supervisor, which isolates them on its isolation runtime. Hog work is counted in units of
//! computation, not time, so a starved hog shows as less work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_pulse::clock::create_timer;
use tokio_pulse::{Supervisor, SupervisorConfig};

use crate::CommonOpts;
use crate::report::Report;

const LIGHT_TASKS: usize = 100;
const HOG_POLL: Duration = Duration::from_millis(20);

/// One unit of hog work: a fixed amount of integer arithmetic.
fn work(iterations: u64, seed: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..iterations {
        x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
    }
    x
}

/// Iterations of [`work`] that take `target` of this thread's CPU time.
fn calibrate(target: Duration) -> u64 {
    let timer = create_timer();
    let mut iterations = 100_000u64;
    loop {
        let start = timer.thread_cpu_time_ns();
        std::hint::black_box(work(iterations, 7));
        let spent = timer.thread_cpu_time_ns().saturating_sub(start);
        if spent >= 5_000_000 {
            let per_ns = iterations as f64 / spent as f64;
            return (per_ns * target.as_nanos() as f64) as u64;
        }
        iterations *= 2;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Baseline,
    Unsupervised,
    Supervised,
}

struct RunResult {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    samples: usize,
    hog_units: u64,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1_000.0
}

fn run_once(
    mode: Mode,
    cores: usize,
    duration: Duration,
    iterations: u64,
    supervisor: Option<&Supervisor>,
) -> Result<RunResult, Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let hog_units = Arc::new(AtomicU64::new(0));
    let result = rt.block_on(async {
        let mut light = Vec::with_capacity(LIGHT_TASKS);
        for _ in 0..LIGHT_TASKS {
            let stop = Arc::clone(&stop);
            let task = async move {
                let mut lateness = Vec::with_capacity(4096);
                while !stop.load(Ordering::Relaxed) {
                    let deadline = tokio::time::Instant::now() + Duration::from_millis(1);
                    tokio::time::sleep_until(deadline).await;
                    let late = tokio::time::Instant::now().saturating_duration_since(deadline);
                    lateness.push(late.as_nanos() as u64);
                }
                lateness
            };
            light.push(match supervisor {
                Some(s) if mode == Mode::Supervised => Light::Supervised(s.spawn(task)),
                _ => Light::Plain(tokio::spawn(task)),
            });
        }
        let mut hogs = Vec::new();
        if mode != Mode::Baseline {
            for h in 0..cores {
                let stop = Arc::clone(&stop);
                let units = Arc::clone(&hog_units);
                let hog = async move {
                    let mut seed = h as u64;
                    while !stop.load(Ordering::Relaxed) {
                        seed = work(iterations, seed);
                        units.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                    seed
                };
                hogs.push(match supervisor {
                    Some(s) if mode == Mode::Supervised => Light::Supervised(s.spawn(hog)),
                    _ => Light::Plain(tokio::spawn(hog)),
                });
            }
        }
        tokio::time::sleep(duration).await;
        let units_at_stop = hog_units.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in light {
            all.extend(task.join().await?);
        }
        for hog in hogs {
            std::hint::black_box(hog.join().await?);
        }
        Ok::<_, Box<dyn std::error::Error>>((all, units_at_stop))
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let (mut lateness, units) = result?;
    lateness.sort_unstable();
    Ok(RunResult {
        p50_us: percentile(&lateness, 0.50),
        p99_us: percentile(&lateness, 0.99),
        max_us: lateness.last().map_or(0.0, |m| *m as f64 / 1_000.0),
        samples: lateness.len(),
        hog_units: units,
    })
}

/// A task spawned plainly or under the supervisor.
enum Light<T> {
    Plain(tokio::task::JoinHandle<T>),
    Supervised(tokio_pulse::JoinHandle<T>),
}

impl<T> Light<T> {
    async fn join(self) -> Result<T, tokio::task::JoinError> {
        match self {
            Light::Plain(h) => h.await,
            Light::Supervised(h) => h.await,
        }
    }
}

/// Runs the scenario.
pub fn run(opts: &CommonOpts) -> Result<Report, Box<dyn std::error::Error>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let duration = if opts.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    };
    let iterations = calibrate(HOG_POLL);
    let supervisor = Supervisor::new(SupervisorConfig {
        cleanup_on_signal: true,
        ..SupervisorConfig::default()
    })?;
    let caps = supervisor.isolation_capabilities();

    let started = Instant::now();
    let baseline = run_once(Mode::Baseline, cores, duration, iterations, None)?;
    let unsupervised = run_once(Mode::Unsupervised, cores, duration, iterations, None)?;
    let supervised = run_once(
        Mode::Supervised,
        cores,
        duration,
        iterations,
        Some(&supervisor),
    )?;
    let mode = supervisor
        .isolation_context()
        .map_or_else(|| "not started".to_owned(), |c| format!("{:?}", c.mode()));
    let isolation_cpu = supervisor.isolation_cpu_usage();

    let supervised_over_baseline = supervised.p99_us / baseline.p99_us.max(1.0);
    let unsupervised_over_supervised = unsupervised.p99_us / supervised.p99_us.max(1.0);
    let hog_progress = supervised.hog_units as f64 / (unsupervised.hog_units.max(1)) as f64;

    let mut report = Report::new(
        format!(
            "isolation: {LIGHT_TASKS} light tasks waking every 1 ms, {cores} workers, {} s per run, hogs of 20 ms per poll",
            duration.as_secs()
        ),
        &[
            "run",
            "samples",
            "p50 late us",
            "p99 late us",
            "max late us",
            "hog units",
        ],
    );
    for (name, r) in [
        ("no hogs", &baseline),
        ("hogs unsupervised", &unsupervised),
        ("hogs supervised", &supervised),
    ] {
        report.row(vec![
            name.to_owned(),
            r.samples.to_string(),
            format!("{:.0}", r.p50_us),
            format!("{:.0}", r.p99_us),
            format!("{:.0}", r.max_us),
            r.hog_units.to_string(),
        ]);
    }
    report.note(format!(
        "isolation: mode {mode}, cgroup {:?}, capabilities {caps:?}",
        caps.cgroup_version
    ));
    if let Some(usage) = isolation_cpu {
        report.note(format!(
            "isolation runtime CPU: {:.2} s total",
            usage.total_ns as f64 / 1e9
        ));
    }
    report.note(format!(
        "targets: supervised_over_baseline <= 2.0 ({supervised_over_baseline:.2}), unsupervised_over_supervised >= 10 ({unsupervised_over_supervised:.1}), hog_progress_supervised >= 0.5 ({hog_progress:.2}); total {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    report.summary(json!({
        "scenario": "isolation",
        "cores": cores,
        "run_seconds": duration.as_secs(),
        "p99_baseline_us": round1(baseline.p99_us),
        "p99_unsupervised_us": round1(unsupervised.p99_us),
        "p99_supervised_us": round1(supervised.p99_us),
        "supervised_over_baseline": round3(supervised_over_baseline),
        "unsupervised_over_supervised": round3(unsupervised_over_supervised),
        "hog_progress_supervised": round3(hog_progress),
        "isolation_mode": mode,
        "cgroup_version": format!("{:?}", caps.cgroup_version),
        "cpu_limiting": caps.cpu_limiting,
        "priority_control": caps.priority_control,
        "container": caps.container_aware,
        "requires_privileges": caps.requires_privileges,
    }));
    Ok(report)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
