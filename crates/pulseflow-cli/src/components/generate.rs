//! The `generate` source: indexes 0, 1, 2, ... (up to `count`, at most `rate` per second).

use std::time::Duration;

use pulseflow::prelude::*;
use tokio::time::Instant;

/// Produces item indexes.
pub struct Generate {
    next: u64,
    count: Option<u64>,
    rate: Option<f64>,
    started: Option<Instant>,
}

impl Generate {
    /// Indexes up to `count` (without end when `None`), `rate` per second at most.
    pub fn new(count: Option<u64>, rate: Option<f64>) -> Self {
        Self {
            next: 0,
            count,
            rate,
            started: None,
        }
    }
}

impl Source for Generate {
    type Item = u64;

    async fn produce(&mut self, out: &mut SourceOutput<u64>) -> Result<SourceStatus, StageError> {
        let end = self.count.unwrap_or(u64::MAX);
        let mut room = out.remaining() as u64;
        if let Some(rate) = self.rate {
            let started = *self.started.get_or_insert_with(Instant::now);
            loop {
                let allowed = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
                let due = allowed.saturating_sub(self.next);
                if due > 0 {
                    room = room.min(due);
                    break;
                }
                let at = started + Duration::from_secs_f64(self.next as f64 / rate);
                tokio::time::sleep_until(at).await;
            }
        }
        let upto = end.min(self.next.saturating_add(room));
        let mut range = self.next..upto;
        out.extend_from(&mut range);
        self.next = upto;
        Ok(if self.next >= end {
            SourceStatus::Done
        } else {
            SourceStatus::More
        })
    }
}
