//! The CPU sampler: a background thread that reads each worker's CPU clock every few
//! milliseconds and charges the delta to the task the worker is polling at that moment.
//!
//! A task is charged for a whole interval whenever it is caught running, so short tasks are
//! charged statistically: over many samples the totals converge on the real shares.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Shared, telemetry};

/// Gauges (tier counts, isolation CPU) are published this often.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn start(shared: Weak<Shared>, interval: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("pulse-sampler".into())
        .spawn(move || run(shared, interval))
        .map(|_| ())
}

fn run(shared: Weak<Shared>, interval: Duration) {
    let mut last_publish = Instant::now();
    loop {
        std::thread::sleep(interval);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        sample(&shared);
        if last_publish.elapsed() >= PUBLISH_EVERY {
            last_publish = Instant::now();
            telemetry::tier_counts(shared.core.tier_counts());
            if let Some(Some(rt)) = shared.isolation.get()
                && let Some(usage) = rt.cpu_usage()
            {
                telemetry::isolation_cpu(usage.total_ns, usage.percent);
            }
        }
    }
}

fn sample(shared: &Shared) {
    let core = &shared.core;
    for slot in core.workers.snapshot() {
        let raw = core.clock.raw();
        let Some(now) = slot.clock.and_then(|c| c.read_ns()) else {
            continue;
        };
        let before = slot.last_cpu_ns.swap(now, Ordering::Relaxed);
        // Published after the CPU reading: whoever sees this `raw` sees that reading or a later
        // one, so a CPU share computed from the pair can only be underestimated.
        slot.last_sample_raw.store(raw, Ordering::Release);
        let task = slot.current.load(Ordering::Relaxed);
        if task == 0 || now <= before {
            continue;
        }
        if let Some(task) = core.tasks.lock().get(&task) {
            task.cpu_ns.fetch_add(now - before, Ordering::Relaxed);
        }
    }
}
