//! The push side of a stage: where its output batches go. A chain of fused stages is a chain
//! of [`Downstream`]s called in one task; a stage with a buffer of its own is reached through
//! an [`EdgeOut`].

use std::sync::Arc;

use futures::future::BoxFuture;

use super::run::RunShared;
use crate::envelope::Batch;
use crate::flow::channel::{self, EdgeSender};
use crate::metrics::EdgeStats;
use crate::policy::BufferPolicy;

/// Receives a stage's output batches, in the producing task.
pub(crate) trait Downstream<T>: Send {
    /// Initialises what runs in this task (fused stages); `false` if an init failed (already
    /// reported to the run).
    fn start(&mut self) -> BoxFuture<'_, bool>;
    /// Takes one batch (possibly empty).
    fn push(&mut self, batch: Batch<T>) -> BoxFuture<'_, ()>;
    /// Takes one piece of a batch (`last`: the batch's last piece). A stage handed a batch in
    /// pieces (a chain's worker, a stage at Yield) records one batch time for all of them.
    fn push_piece(&mut self, piece: Batch<T>, _last: bool) -> BoxFuture<'_, ()> {
        self.push(piece)
    }
    /// End of input: close what runs in this task and release the edges.
    fn finish(&mut self) -> BoxFuture<'_, ()>;

    /// How many items downstream asked for (reactive pull), waiting until it asked for some;
    /// `usize::MAX` when it does not pull.
    fn demand(&mut self) -> BoxFuture<'_, usize> {
        Box::pin(std::future::ready(usize::MAX))
    }
}

/// How a producer reaches one of its consumers.
pub(crate) enum Entry<T> {
    /// The consumer runs inside the producer's task.
    Fused(Box<dyn Downstream<T>>),
    /// The consumer has its own buffer.
    Edge(EdgeSender<T>),
    /// The consumer runs behind each worker of a parallel producer, one instance per worker
    /// (see [`chain`](super::chain)).
    Chain(super::chain::Replica<T>),
}

impl<T: Send + 'static> Entry<T> {
    /// A downstream usable by exactly one task.
    pub fn into_downstream(self) -> Box<dyn Downstream<T>> {
        match self {
            Entry::Fused(d) => d,
            Entry::Edge(tx) => Box::new(EdgeOut { tx: Some(tx) }),
            Entry::Chain(replica) => replica(None),
        }
    }

    /// A sender that several tasks can share. A fused consumer gets a buffer and a task of its
    /// own in front of it.
    pub fn into_sender(self, run: &Arc<RunShared>, stage: usize) -> EdgeSender<T> {
        match self {
            Entry::Edge(tx) => tx,
            Entry::Fused(_) | Entry::Chain(_) => {
                let d = self.into_downstream();
                let (tx, rx) = channel::edge(BufferPolicy::DEFAULT, Arc::new(EdgeStats::default()));
                run.spawn(stage, super::pump(rx, d));
                tx
            }
        }
    }
}

/// Sends into an edge; `finish` releases the sender so the consumer sees the end.
pub(crate) struct EdgeOut<T> {
    pub tx: Option<EdgeSender<T>>,
}

impl<T: Send + 'static> Downstream<T> for EdgeOut<T> {
    fn start(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }

    fn push(&mut self, batch: Batch<T>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(tx) = &self.tx {
                tx.send(batch).await;
            }
        })
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        self.tx = None;
        Box::pin(async {})
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

/// Keeps the last pushed batch, for workers whose output is put back in order.
pub(crate) struct Capture<T> {
    pub slot: Arc<parking_lot::Mutex<Option<Batch<T>>>>,
}

impl<T: Send + 'static> Downstream<T> for Capture<T> {
    fn start(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }

    fn push(&mut self, batch: Batch<T>) -> BoxFuture<'_, ()> {
        self.slot.lock().get_or_insert_default().append(batch);
        Box::pin(async {})
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
