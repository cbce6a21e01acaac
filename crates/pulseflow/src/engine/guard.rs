//! A stage's flow-control guard: its circuit breaker and backpressure controller, applied to
//! every batch before the stage's own handler sees it.
//!
//! The guard sits on the receiving side: while the breaker is open or the controller admits
//! nothing, the stage takes no input, its buffer fills and the pressure goes upstream; nothing
//! is dropped. (A `Bounded` strategy is the stage's buffer itself and needs no guard.)

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures::future::BoxFuture;

use super::downstream::Downstream;
use crate::envelope::Batch;
use crate::flow::{AccumulatorAware, BackpressureController, CircuitBreaker, Load};
use crate::metrics::StageStats;

/// How long one wait for admission lasts before it is counted and started again.
const ADMISSION_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Guard<T> {
    pub controller: Option<Arc<dyn BackpressureController>>,
    /// Whether the controller admits at the senders (credit, pull): the guard then only
    /// returns what was processed (and asks for more, for pull).
    pub at_senders: bool,
    pub breaker: Option<Arc<CircuitBreaker>>,
    pub stats: Arc<StageStats>,
    pub inner: Box<dyn Downstream<T>>,
}

impl<T: Send + 'static> Guard<T> {
    /// Processes one admitted part under the breaker, reporting its outcome and latency.
    async fn run(&mut self, part: Batch<T>) -> Duration {
        let permit = match &self.breaker {
            Some(breaker) => Some(breaker.acquire().await),
            None => None,
        };
        let errors_before = self.stats.errors();
        let started = Instant::now();
        self.inner.push(part).await;
        let latency = started.elapsed();
        if let Some(permit) = permit {
            permit.record(self.stats.errors() == errors_before, latency);
        }
        latency
    }

    async fn handle(&mut self, batch: Batch<T>) {
        let Some(controller) = self.controller.clone() else {
            self.run(batch).await;
            return;
        };
        if self.at_senders {
            let (n, bytes) = (batch.len(), batch.total_bytes());
            let latency = self.run(batch).await;
            controller.record_latency(latency);
            controller.on_processed(n, bytes);
            // Reactive pull: processed items make room; ask for as much again.
            controller.request(n);
            return;
        }
        let stats = self.stats.clone();
        let probe = move || Load::items(stats.input_depth() as usize);
        let mut rest = batch;
        while !rest.is_empty() {
            // An adaptive controller sets the size of what the stage processes at once.
            if let Some(size) = controller.batch_size() {
                if size > 0 && rest.len() > size {
                    let tail = rest.split_off(size);
                    self.admit_and_run(&controller, &probe, rest).await;
                    rest = tail;
                    continue;
                }
            }
            self.admit_and_run(&controller, &probe, rest).await;
            break;
        }
    }

    /// Waits until the controller admits items of `batch`, processes them, and repeats until
    /// the whole batch went through.
    async fn admit_and_run(
        &mut self,
        controller: &Arc<dyn BackpressureController>,
        probe: &(dyn Fn() -> Load + Send + Sync),
        batch: Batch<T>,
    ) {
        let mut rest = batch;
        while !rest.is_empty() {
            let bytes = rest.total_bytes();
            let admission = match controller
                .acquire(rest.len(), bytes, probe, ADMISSION_TIMEOUT)
                .await
            {
                Ok(admission) => admission,
                Err(timeout) => {
                    tracing::debug!(stage = %self.stats.id, %timeout, "still waiting for admission");
                    continue;
                }
            };
            let admitted = admission.admitted.min(rest.len());
            if admitted == 0 {
                continue;
            }
            let tail = rest.split_off(admitted);
            let part_bytes = rest.total_bytes();
            let latency = self.run(rest).await;
            controller.record_latency(latency);
            controller.on_processed(admitted, part_bytes);
            rest = tail;
        }
    }
}

impl<T: Send + 'static> Downstream<T> for Guard<T> {
    fn start(&mut self) -> BoxFuture<'_, bool> {
        if let Some(c) = &self.controller {
            // Reactive pull: the first demand, as much as the window holds.
            c.request(usize::MAX);
        }
        self.inner.start()
    }

    fn push(&mut self, batch: Batch<T>) -> BoxFuture<'_, ()> {
        Box::pin(self.handle(batch))
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        self.inner.finish()
    }
}

/// The flow control of one stage, ready to wrap each of its handlers.
#[derive(Clone, Default)]
pub(crate) struct FlowGuard {
    pub controller: Option<Arc<dyn BackpressureController>>,
    pub breaker: Option<Arc<CircuitBreaker>>,
    /// For an accumulator stage with a strategy: the same controller, fed with the stage's
    /// pending bytes and spills.
    pub accumulator: Option<Arc<AccumulatorAware>>,
}

impl FlowGuard {
    /// Whether the controller admits items at the senders of the stage's edge (credit and
    /// pull strategies bound what is in flight, the edge included) rather than in front of
    /// the handler.
    pub fn at_senders(&self) -> bool {
        self.accumulator.is_some()
            || self
                .controller
                .as_ref()
                .is_some_and(|c| matches!(c.strategy(), "credit" | "pull"))
    }

    /// After a stage admitted at its senders processed `items`: return credit, ask for more
    /// (pull).
    pub fn processed(&self, items: usize, bytes: u64) {
        if let Some(c) = &self.controller {
            if self.at_senders() {
                c.on_processed(items, bytes);
                c.request(items);
            }
        }
    }

    /// The gate for the stage's input edge, when admission happens at the senders.
    pub fn edge_gate(&self) -> Option<Arc<dyn BackpressureController>> {
        if self.at_senders() {
            self.controller.clone()
        } else {
            None
        }
    }

    /// `inner` behind the stage's breaker and controller (or `inner` itself when it has none).
    pub fn wrap<T: Send + 'static>(
        &self,
        stats: &Arc<StageStats>,
        inner: Box<dyn Downstream<T>>,
    ) -> Box<dyn Downstream<T>> {
        if self.controller.is_none() && self.breaker.is_none() {
            return inner;
        }
        Box::new(Guard {
            at_senders: self.at_senders(),
            controller: self.controller.clone(),
            breaker: self.breaker.clone(),
            stats: stats.clone(),
            inner,
        })
    }
}
