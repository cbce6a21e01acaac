//! Operator chaining: stateless stages fused behind the workers of a parallel stage.
//!
//! When a stateless transform runs on the same workers as the parallel stage before it (see
//! [`fusion_plan`](crate::graph::PipelineGraph::fusion_plan)), each worker of the upstream
//! pool runs its own instance of it on the batch it has just processed: the batch stays in
//! that worker's cache and no channel or task sits between the two. The fused stage offers a
//! [`Replica`], which builds one instance of the rest of the chain per worker.
//!
//! An ordered chain restores input order once, at its end: every worker's chain ends in an
//! [`InTurn`], which sends a worker's output on only when the output of every earlier batch
//! has been sent (a [`Turnstile`] shared by the workers). Output that is not yet due is kept
//! until it is, so a worker never waits in the middle of a batch (a stage at Tokio-Pulse's
//! Yield tier pushes a batch in small chunks); it waits, if at all, once it is done with the
//! batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use futures::future::BoxFuture;
use tokio::sync::Notify;

use super::downstream::{Downstream, EdgeOut, Entry};
use crate::envelope::Batch;
use crate::flow::channel::EdgeSender;

/// Builds one instance of a fused chain for one worker of the pool it runs behind; the
/// worker's turn is given when the chain's output must keep input order.
pub(crate) type Replica<T> = Arc<dyn Fn(Option<&LaneTurn>) -> Box<dyn Downstream<T>> + Send + Sync>;

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

/// Sends what a worker's chain kept back (see [`InTurn`]).
type Flush = Box<dyn FnMut() -> BoxFuture<'static, ()> + Send>;

/// One worker's place in a [`Turnstile`]: the index of the batch it is working on, and how
/// to send what its chain kept back.
#[derive(Clone)]
pub(crate) struct LaneTurn {
    stile: Arc<Turnstile>,
    index: Arc<AtomicU64>,
    flush: Arc<parking_lot::Mutex<Option<Flush>>>,
}

impl LaneTurn {
    pub fn new(stile: Arc<Turnstile>) -> Self {
        Self {
            stile,
            index: Arc::new(AtomicU64::new(0)),
            flush: Arc::default(),
        }
    }

    /// The worker starts on batch `index`.
    pub fn begin(&self, index: u64) {
        self.index.store(index, Relaxed);
    }

    /// The worker is done with batch `index`: once its turn has come, what its chain kept
    /// back is sent and the next batch's turn begins (whether or not the batch had output).
    pub async fn end(&self, index: u64) {
        self.stile.wait(index).await;
        self.send_kept().await;
        self.stile.update(|t| t.next = index + 1);
    }

    /// The worker takes no more input; what its chain emits while closing waits until every
    /// worker got here.
    pub fn closing(&self) {
        self.index.store(CLOSING, Relaxed);
        self.stile
            .update(|t| t.working = t.working.saturating_sub(1));
    }

    fn is_due(&self) -> bool {
        self.stile.is_due(self.index.load(Relaxed))
    }

    async fn send_kept(&self) {
        let send = self.flush.lock().as_mut().map(|flush| flush());
        if let Some(send) = send {
            send.await;
        }
    }
}

/// The end of an ordered chain: sends into the edge when the worker's batch is due, and
/// keeps the output back until then.
struct InTurn<T> {
    tx: Option<EdgeSender<T>>,
    kept: Arc<parking_lot::Mutex<Batch<T>>>,
    turn: LaneTurn,
}

impl<T: Send + 'static> InTurn<T> {
    fn new(tx: EdgeSender<T>, turn: &LaneTurn) -> Self {
        let kept = Arc::new(parking_lot::Mutex::new(Batch::default()));
        let flush: Flush = {
            let (kept, tx) = (kept.clone(), tx.clone());
            Box::new(move || {
                let batch = std::mem::take(&mut *kept.lock());
                let tx = tx.clone();
                Box::pin(async move {
                    if !batch.is_empty() {
                        tx.send(batch).await;
                    }
                })
            })
        };
        *turn.flush.lock() = Some(flush);
        Self {
            tx: Some(tx),
            kept,
            turn: turn.clone(),
        }
    }

    fn keep(&self, batch: Batch<T>) {
        let mut kept = self.kept.lock();
        if kept.is_empty() {
            *kept = batch;
        } else {
            for item in batch {
                kept.push(item);
            }
        }
    }
}

impl<T: Send + 'static> Downstream<T> for InTurn<T> {
    fn start(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }

    fn push(&mut self, batch: Batch<T>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if !self.turn.is_due() {
                self.keep(batch);
                return;
            }
            self.turn.send_kept().await;
            if let Some(tx) = &self.tx {
                tx.send(batch).await;
            }
        })
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Output emitted while closing comes after every batch of every worker.
            self.turn.stile.wait(CLOSING).await;
            self.turn.send_kept().await;
            *self.turn.flush.lock() = None;
            self.tx = None;
        })
    }

    fn demand(&mut self) -> BoxFuture<'_, usize> {
        Box::pin(async move {
            match &self.tx {
                Some(tx) => tx.demand().await,
                None => usize::MAX,
            }
        })
    }
}

impl<T: Send + 'static> Entry<T> {
    /// How each worker of a pool reaches this consumer, if it can be reached from several
    /// workers at once: an edge (each worker sends into it, in turn when ordered) or a chain
    /// (each worker runs its own instance). `None` for a single fused instance.
    pub fn replicate(self) -> Option<Replica<T>> {
        match self {
            Entry::Edge(tx) => Some(Arc::new(move |turn: Option<&LaneTurn>| match turn {
                Some(turn) => Box::new(InTurn::new(tx.clone(), turn)) as Box<dyn Downstream<T>>,
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

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_later_batch_waits_for_every_earlier_one() {
        let stile = Turnstile::new(2);
        let (a, b) = (LaneTurn::new(stile.clone()), LaneTurn::new(stile.clone()));
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        a.begin(0);
        b.begin(1);
        let later = {
            let (b, order) = (b.clone(), order.clone());
            tokio::spawn(async move {
                stile_wait(&b).await;
                order.lock().push(1);
                b.end(1).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(order.lock().is_empty(), "batch 1 went before batch 0");
        stile_wait(&a).await;
        order.lock().push(0);
        a.end(0).await;
        later.await.expect("task");
        assert_eq!(*order.lock(), vec![0, 1]);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn closing_output_waits_for_every_worker_to_leave() {
        let stile = Turnstile::new(2);
        let (a, b) = (LaneTurn::new(stile.clone()), LaneTurn::new(stile.clone()));
        a.closing();
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { stile_wait(&a).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        b.closing();
        waiting.await.expect("task");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_batch_without_output_still_passes_its_turn_on() {
        let stile = Turnstile::new(1);
        let a = LaneTurn::new(stile.clone());
        for i in 0..3 {
            a.begin(i);
            a.end(i).await;
        }
        a.begin(3);
        stile_wait(&a).await;
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn output_not_yet_due_is_kept_and_sent_in_turn() {
        use crate::envelope::Envelope;
        use crate::metrics::EdgeStats;
        use crate::policy::BufferPolicy;

        let (tx, rx) =
            crate::flow::channel::edge(BufferPolicy::DEFAULT, Arc::new(EdgeStats::default()));
        let stile = Turnstile::new(2);
        let (a, b) = (LaneTurn::new(stile.clone()), LaneTurn::new(stile.clone()));
        let mut out_a = InTurn::new(tx.clone(), &a);
        let mut out_b = InTurn::new(tx, &b);
        let one = |x: u32| Batch::from_items(vec![Envelope::new(x)]);
        a.begin(0);
        b.begin(1);
        // Worker b is done with batch 1 first, in two chunks: nothing may go before batch 0.
        out_b.push(one(10)).await;
        out_b.push(one(11)).await;
        assert_eq!(rx.depth(), 0, "batch 1 was sent before batch 0");
        out_a.push(one(0)).await;
        a.end(0).await;
        b.end(1).await;
        a.closing();
        b.closing();
        out_a.finish().await;
        out_b.finish().await;
        let mut got = Vec::new();
        while let Some((_, batch)) = rx.recv().await {
            got.extend(batch.into_iter().map(|e| e.payload));
        }
        assert_eq!(got, vec![0, 10, 11]);
    }

    async fn stile_wait(turn: &LaneTurn) {
        turn.stile.wait(turn.index.load(Relaxed)).await;
    }
}
