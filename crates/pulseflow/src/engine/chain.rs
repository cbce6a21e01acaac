//! Operator chaining: stateless stages fused behind the workers of a parallel stage.
//!
//! When a stateless transform runs on the same workers as the parallel stage before it (see
//! [`fusion_plan`](crate::graph::PipelineGraph::fusion_plan)), each worker of the upstream
//! pool runs its own instance of it on the batch it has just processed: the batch stays in
//! that worker's cache and no channel or task sits between the two. The fused stage offers a
//! [`Replica`], which builds one instance of the rest of the chain per worker.
//!
//! A worker takes its batch through the chain in chunks of a few dozen items, so what they
//! allocate on the way is freed and reused while still in cache; the end of each worker's
//! chain, a [`Gather`], collects the chunks' outputs and sends them on as one batch when the
//! worker is done with its input batch. An ordered chain restores input order there: a
//! worker sends only once the output of every earlier batch has been sent (a [`Turnstile`]
//! shared by the workers), and waits, if at all, only then.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::Notify;

use super::downstream::{Downstream, EdgeOut, Entry};
use crate::envelope::Batch;
use crate::flow::channel::EdgeSender;

/// Builds one instance of a fused chain for one worker of the pool it runs behind, ending in
/// a [`Gather`] of that worker's [`Lane`]; without a lane (a single instance, run by a task of
/// its own) the chain sends each batch on as it comes.
pub(crate) type Replica<T> = Arc<dyn Fn(Option<&Lane>) -> Box<dyn Downstream<T>> + Send + Sync>;

/// Index of the items a stage emits when it closes: they come after every batch.
const CLOSING: u64 = u64::MAX;

/// Whose turn it is to send, among the workers of one ordered pool.
pub(crate) struct Turnstile {
    turns: parking_lot::Mutex<Turns>,
    changed: Notify,
}

struct Turns {
    /// Index of the next batch whose output may be sent.
    next: u64,
    /// Workers still taking input.
    working: usize,
}

impl Turnstile {
    /// A turnstile for `workers` workers, starting at batch 0.
    pub fn new(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            turns: parking_lot::Mutex::new(Turns {
                next: 0,
                working: workers,
            }),
            changed: Notify::new(),
        })
    }

    fn is_due(&self, index: u64) -> bool {
        let turns = self.turns.lock();
        if index == CLOSING {
            turns.working == 0
        } else {
            turns.next == index
        }
    }

    /// Waits until output of batch `index` may be sent.
    async fn wait(&self, index: u64) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_due(index) {
                return;
            }
            changed.await;
        }
    }

    fn update(&self, f: impl FnOnce(&mut Turns)) {
        f(&mut self.turns.lock());
        self.changed.notify_waiters();
    }
}

/// Sends what a worker's chain gathered.
type Flush = Box<dyn FnMut() -> BoxFuture<'static, ()> + Send>;

/// One worker of a pool with a chain behind it: its place in the pool's [`Turnstile`] when
/// the output keeps input order, and how to send what its chain gathered.
#[derive(Clone)]
pub(crate) struct Lane {
    stile: Option<Arc<Turnstile>>,
    flush: Arc<parking_lot::Mutex<Option<Flush>>>,
}

impl Lane {
    /// A worker whose output goes on in input order, in turn with the others of `stile`.
    pub fn ordered(stile: Arc<Turnstile>) -> Self {
        Self::new(Some(stile))
    }

    /// A worker whose output goes on as soon as it has it.
    pub fn unordered() -> Self {
        Self::new(None)
    }

    fn new(stile: Option<Arc<Turnstile>>) -> Self {
        Self {
            stile,
            flush: Arc::default(),
        }
    }

    /// The worker is done with batch `index`: once its turn has come, what its chain
    /// gathered is sent on and the next batch's turn begins (whether or not the batch had
    /// output).
    pub async fn end(&self, index: u64) {
        if let Some(stile) = &self.stile {
            stile.wait(index).await;
        }
        self.send_gathered().await;
        if let Some(stile) = &self.stile {
            stile.update(|t| t.next = index + 1);
        }
    }

    /// The worker takes no more input; what its chain emits while closing waits until every
    /// worker got here.
    pub fn closing(&self) {
        if let Some(stile) = &self.stile {
            stile.update(|t| t.working = t.working.saturating_sub(1));
        }
    }

    async fn send_gathered(&self) {
        let send = self.flush.lock().as_mut().map(|flush| flush());
        if let Some(send) = send {
            send.await;
        }
    }
}

/// The end of a worker's chain: gathers what the chain emits for one input batch, which the
/// worker's [`Lane`] sends on when the batch is done.
struct Gather<T> {
    gathered: Arc<parking_lot::Mutex<Batch<T>>>,
    lane: Lane,
}

impl<T: Send + 'static> Gather<T> {
    fn new(tx: EdgeSender<T>, lane: &Lane) -> Self {
        let gathered = Arc::new(parking_lot::Mutex::new(Batch::default()));
        let flush: Flush = {
            let gathered = gathered.clone();
            Box::new(move || {
                let batch = std::mem::take(&mut *gathered.lock());
                let tx = tx.clone();
                Box::pin(async move {
                    if !batch.is_empty() {
                        tx.send(batch).await;
                    }
                })
            })
        };
        *lane.flush.lock() = Some(flush);
        Self {
            gathered,
            lane: lane.clone(),
        }
    }
}

impl<T: Send + 'static> Downstream<T> for Gather<T> {
    fn start(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }

    fn push(&mut self, batch: Batch<T>) -> BoxFuture<'_, ()> {
        self.gathered.lock().append(batch);
        Box::pin(async {})
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Output emitted while closing comes after every batch of every worker.
            if let Some(stile) = &self.lane.stile {
                stile.wait(CLOSING).await;
            }
            self.lane.send_gathered().await;
            // The sender goes with the flush: the consumer sees the end once every lane is
            // finished.
            *self.lane.flush.lock() = None;
        })
    }
}

impl<T: Send + 'static> Entry<T> {
    /// How each worker of a pool reaches this consumer, if it can be reached from several
    /// workers at once: an edge (each worker's lane sends into it) or a chain
    /// (each worker runs its own instance). `None` for a single fused instance.
    pub fn replicate(self) -> Option<Replica<T>> {
        match self {
            Entry::Edge(tx) => Some(Arc::new(move |lane: Option<&Lane>| match lane {
                Some(lane) => Box::new(Gather::new(tx.clone(), lane)) as Box<dyn Downstream<T>>,
                None => Box::new(EdgeOut {
                    tx: Some(tx.clone()),
                }),
            })),
            Entry::Chain(replica) => Some(replica),
            Entry::Fused(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use crate::flow::channel::EdgeReceiver;
    use crate::metrics::EdgeStats;
    use crate::policy::BufferPolicy;

    fn edge() -> (EdgeSender<u32>, EdgeReceiver<u32>) {
        crate::flow::channel::edge(BufferPolicy::DEFAULT, Arc::new(EdgeStats::default()))
    }

    fn one(x: u32) -> Batch<u32> {
        Batch::from_items(vec![Envelope::new(x)])
    }

    async fn received(rx: EdgeReceiver<u32>) -> Vec<Vec<u32>> {
        let mut got = Vec::new();
        while let Some((_, batch)) = rx.recv().await {
            got.push(batch.into_iter().map(|e| e.payload).collect());
        }
        got
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_later_batch_is_sent_after_every_earlier_one_in_one_piece() {
        let (tx, rx) = edge();
        let stile = Turnstile::new(2);
        let (a, b) = (Lane::ordered(stile.clone()), Lane::ordered(stile));
        let mut out_a = Gather::new(tx.clone(), &a);
        let mut out_b = Gather::new(tx, &b);
        // Worker b is done with batch 1 first, pushed in two chunks: it waits for batch 0.
        out_b.push(one(10)).await;
        out_b.push(one(11)).await;
        let later = tokio::spawn(async move {
            b.end(1).await;
            b.closing();
            out_b.finish().await;
        });
        tokio::task::yield_now().await;
        assert_eq!(rx.depth(), 0, "batch 1 was sent before batch 0");
        assert!(!later.is_finished());
        out_a.push(one(0)).await;
        a.end(0).await;
        a.closing();
        out_a.finish().await;
        later.await.expect("task");
        assert_eq!(received(rx).await, vec![vec![0], vec![10, 11]]);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_batch_without_output_still_passes_its_turn_on() {
        let (tx, rx) = edge();
        let lane = Lane::ordered(Turnstile::new(1));
        let mut out = Gather::new(tx, &lane);
        for i in 0..3 {
            lane.end(i).await;
        }
        out.push(one(3)).await;
        lane.end(3).await;
        lane.closing();
        out.finish().await;
        assert_eq!(received(rx).await, vec![vec![3]]);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn closing_output_waits_for_every_worker_to_leave() {
        let (tx, rx) = edge();
        let stile = Turnstile::new(2);
        let (a, b) = (Lane::ordered(stile.clone()), Lane::ordered(stile));
        let mut out_a = Gather::new(tx.clone(), &a);
        let mut out_b = Gather::new(tx, &b);
        a.closing();
        out_a.push(one(99)).await;
        let closing = tokio::spawn(async move { out_a.finish().await });
        tokio::task::yield_now().await;
        assert!(!closing.is_finished(), "b is still working");
        out_b.push(one(0)).await;
        b.end(0).await;
        b.closing();
        out_b.finish().await;
        closing.await.expect("task");
        assert_eq!(received(rx).await, vec![vec![0], vec![99]]);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn an_unordered_lane_sends_as_soon_as_its_batch_is_done() {
        let (tx, rx) = edge();
        let (a, b) = (Lane::unordered(), Lane::unordered());
        let mut out_a = Gather::new(tx.clone(), &a);
        let mut out_b = Gather::new(tx, &b);
        out_b.push(one(1)).await;
        b.end(1).await;
        out_a.push(one(0)).await;
        a.end(0).await;
        for (lane, out) in [(a, &mut out_a), (b, &mut out_b)] {
            lane.closing();
            out.finish().await;
        }
        assert_eq!(received(rx).await, vec![vec![1], vec![0]]);
    }
}
