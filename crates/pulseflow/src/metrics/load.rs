//! How each stage spent the last few seconds: busy (processing items), backpressured (waiting
//! for room in a full buffer downstream) or idle (waiting for input), as shares of its time,
//! and which stage is the bottleneck.
//!
//! Nothing is measured per item: stages already time each batch they process (busy), and an
//! edge times only the sends that find it full (the slow path). A stage fused into a chain
//! keeps its own busy time (the time of the stages after it in the chain is theirs); it is
//! backpressured while the stages after it work on its output or wait in turn, as it would be
//! on a full buffer between them. So a slow stage in a chain shows as busy, and the stages
//! before it as backpressured. The shares are computed from those running totals when the
//! state is inspected, against totals sampled about once a second and kept for [`WINDOW`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How far back the shares look (at least; until the run is that old, since its start).
pub const WINDOW: Duration = Duration::from_secs(5);
/// How often a sample of the totals is kept.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Share of the window its producers must spend waiting on a stage (on its full input, or on
/// its work when it is fused to them) for the stage to be a bottleneck candidate.
pub const BACKPRESSURE_MARK: f64 = 0.1;

/// Shares of a stage's time (of all its workers' time), summing to 1.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// Processing items.
    pub busy: f64,
    /// Waiting for room in a full buffer downstream.
    pub backpressured: f64,
    /// Neither: waiting for input.
    pub idle: f64,
}

/// Running totals of one stage, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Time spent processing, all workers.
    pub busy: u64,
    /// Time spent waiting on full buffers downstream, all workers.
    pub backpressured: u64,
    /// Time producers spent waiting on this stage: on its full input buffer, or (fused to
    /// them) on its work and its own waits.
    pub input_blocked: u64,
}

/// Samples of every stage's totals over the last [`WINDOW`].
#[derive(Debug)]
pub(crate) struct LoadWindow {
    samples: VecDeque<(Instant, Vec<Totals>)>,
}

impl LoadWindow {
    /// A window for `stages` stages, starting at `now` with nothing counted.
    pub fn new(stages: usize, now: Instant) -> Self {
        Self {
            samples: VecDeque::from([(now, vec![Totals::default(); stages])]),
        }
    }

    /// The shares of each stage, from `totals` at `now` and the stages' `workers`, and the
    /// bottleneck: the busiest stage whose producers spent at least [`BACKPRESSURE_MARK`] of
    /// the window waiting on it. Keeps `totals` as a sample when the last is a
    /// second old.
    pub fn observe(
        &mut self,
        now: Instant,
        totals: &[Totals],
        workers: &[u64],
    ) -> (Vec<Load>, Option<usize>) {
        while self.samples.len() > 1 && self.samples[1].0 + WINDOW <= now {
            self.samples.pop_front();
        }
        let (loads, bottleneck) = match self.samples.front() {
            Some((at, base)) if now > *at => {
                let span = now.duration_since(*at).as_nanos() as f64;
                shares(base, totals, workers, span)
            }
            _ => (Vec::new(), None),
        };
        if self
            .samples
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= SAMPLE_EVERY)
        {
            self.samples.push_back((now, totals.to_vec()));
        }
        (loads, bottleneck)
    }
}

/// Shares over `span` nanoseconds, from the totals `base` at its start to `now`.
fn shares(
    base: &[Totals],
    now: &[Totals],
    workers: &[u64],
    span: f64,
) -> (Vec<Load>, Option<usize>) {
    let mut bottleneck: Option<(usize, f64)> = None;
    let loads = now
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let b = base.get(i).copied().unwrap_or_default();
            let capacity = span * workers.get(i).copied().unwrap_or(1).max(1) as f64;
            let share = |now: u64, then: u64| now.saturating_sub(then) as f64 / capacity;
            let busy = share(t.busy, b.busy).min(1.0);
            let backpressured = share(t.backpressured, b.backpressured).min(1.0 - busy);
            let blocked = t.input_blocked.saturating_sub(b.input_blocked) as f64 / span;
            if blocked >= BACKPRESSURE_MARK && bottleneck.is_none_or(|(_, most)| busy > most) {
                bottleneck = Some((i, busy));
            }
            Load {
                busy,
                backpressured,
                idle: (1.0 - busy - backpressured).max(0.0),
            }
        })
        .collect();
    (loads, bottleneck.map(|(i, _)| i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(busy: u64, backpressured: u64, input_blocked: u64) -> Totals {
        Totals {
            busy,
            backpressured,
            input_blocked,
        }
    }

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn shares_are_of_the_time_since_the_oldest_sample_and_all_workers() {
        let start = Instant::now();
        let mut w = LoadWindow::new(2, start);
        let now = start + Duration::from_secs(2);
        // Stage 0: one worker, busy 0.5 s, waiting 1 s. Stage 1: two workers, busy 2 s.
        let (loads, _) = w.observe(
            now,
            &[totals(SECOND / 2, SECOND, 0), totals(2 * SECOND, 0, 0)],
            &[1, 2],
        );
        assert_eq!(
            loads[0],
            Load {
                busy: 0.25,
                backpressured: 0.5,
                idle: 0.25
            }
        );
        assert_eq!(
            loads[1],
            Load {
                busy: 0.5,
                backpressured: 0.0,
                idle: 0.5
            }
        );
    }

    #[test]
    fn the_busiest_stage_whose_input_is_full_is_the_bottleneck() {
        let start = Instant::now();
        let mut w = LoadWindow::new(3, start);
        let now = start + Duration::from_secs(1);
        // Stage 0 is the busiest but nobody waits on it; stage 2 makes its producer wait.
        let t = [
            totals(SECOND, 0, 0),
            totals(SECOND / 10, 0, SECOND / 2),
            totals(SECOND * 9 / 10, 0, SECOND / 2),
        ];
        assert_eq!(w.observe(now, &t, &[1, 1, 1]).1, Some(2));
        // Producers waiting less than the mark: no bottleneck.
        let mut w = LoadWindow::new(1, start);
        assert_eq!(
            w.observe(now, &[totals(SECOND, 0, SECOND / 20)], &[1]).1,
            None
        );
    }

    #[test]
    fn the_window_slides_once_the_run_is_older_than_it() {
        let start = Instant::now();
        let mut w = LoadWindow::new(1, start);
        let at = |s: u64| start + Duration::from_secs(s);
        // Fully busy for the first 10 s, sampled every second.
        for s in 1..=10 {
            w.observe(at(s), &[totals(s * SECOND, 0, 0)], &[1]);
        }
        // Then idle for 6 s: the shares no longer see the busy time.
        let (loads, _) = w.observe(at(16), &[totals(10 * SECOND, 0, 0)], &[1]);
        assert_eq!(loads[0].busy, 0.0);
        assert_eq!(loads[0].idle, 1.0);
        // Half of the last few seconds busy.
        let mut w = LoadWindow::new(1, start);
        for s in 1..=10 {
            w.observe(at(s), &[totals(s * SECOND, 0, 0)], &[1]);
        }
        // Busy 3 s of the 5 s since the sample at 7 s.
        let (loads, _) = w.observe(at(12), &[totals(10 * SECOND, 0, 0)], &[1]);
        assert!((loads[0].busy - 0.6).abs() < 1e-9, "{loads:?}");
    }

    #[test]
    fn nothing_is_told_before_time_passes() {
        let start = Instant::now();
        let mut w = LoadWindow::new(1, start);
        assert_eq!(
            w.observe(start, &[totals(0, 0, 0)], &[1]),
            (Vec::new(), None)
        );
    }
}
