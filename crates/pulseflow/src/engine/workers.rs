//! Worker pools of a stage with a buffer of its own: one worker, a fixed number, one per core,
//! or a pool that grows with the queue and shrinks when idle; outputs unordered, put back in
//! input order, or partitioned by key so each key stays on one worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use super::chain::{Lane as ChainLane, Replica, Turnstile};
use super::downstream::{Capture, Downstream, EdgeOut, Entry};
use super::run::RunShared;
use crate::envelope::Batch;
use crate::flow::channel::{self, EdgeReceiver, EdgeSender};
use crate::metrics::EdgeStats;
use crate::policy::{BufferPolicy, ParallelismHint};

/// How long a busy task works through its queue before it gives way to the other tasks of
/// its worker thread (a busy stage never waits on its input, so it would not otherwise).
pub(crate) const BUSY_SLICE: Duration = Duration::from_micros(50);

/// Yields once a task has worked for a [`BUSY_SLICE`] without giving way.
pub(crate) struct Pacer {
    since: std::time::Instant,
}

impl Pacer {
    pub fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
        }
    }

    /// Called after each batch.
    pub async fn after_batch(&mut self) {
        if self.since.elapsed() >= BUSY_SLICE {
            give_way().await;
            self.since = std::time::Instant::now();
        }
    }
}

/// Gives way to the other tasks of this worker thread, in a way another worker may take this
/// task over: on a multi-thread runtime the task wakes itself and returns `Pending` once, so
/// the runtime queues it where idle workers steal from and wakes one of them.
///
/// `tokio::task::yield_now` defers the wake-up until the worker has nothing else to run, and
/// a deferred task cannot be stolen: a busy stage giving way like that stays on its thread,
/// and the stages of a pipeline end up taking turns on one core while the other is idle. On a
/// current-thread runtime there is no other worker, and `yield_now` is the better way: it
/// lets the runtime poll its timers and I/O before the task runs again.
pub(crate) async fn give_way() {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let stealable = Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread);
    if stealable {
        SelfWake { yielded: false }.await
    } else {
        tokio::task::yield_now().await
    }
}

/// Pending once, waking its task during that poll.
struct SelfWake {
    yielded: bool,
}

impl std::future::Future for SelfWake {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.yielded {
            return std::task::Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// Items a chained worker takes through its whole chain at a time: what they allocate on the
/// way is reused, still in cache, by the next chunk.
const CHAIN_CHUNK: usize = 64;

/// How often an io-bound pool looks at its queue.
pub(crate) const SCALE_INTERVAL: Duration = Duration::from_millis(50);
/// How long an io-bound worker waits for input before it retires.
pub(crate) const IDLE_RETIRE: Duration = Duration::from_secs(1);

/// Feeds every batch of `rx` to `d`, then finishes it.
pub(crate) async fn pump<T: Send + 'static>(rx: EdgeReceiver<T>, mut d: Box<dyn Downstream<T>>) {
    d.start().await;
    let mut pacer = Pacer::new();
    while let Some((_, batch)) = rx.recv().await {
        d.push(batch).await;
        pacer.after_batch().await;
    }
    d.finish().await;
}

/// Builds one worker's handler chain ending in `next`.
pub(crate) type MakeWorker<I, O> =
    Arc<dyn Fn(Box<dyn Downstream<O>>) -> Box<dyn Downstream<I>> + Send + Sync>;

/// Output order of a pool.
pub(crate) enum PoolOrder<I> {
    Unordered,
    Ordered,
    Partitioned(Arc<dyn Fn(&I) -> u64 + Send + Sync>),
}

pub(crate) struct Pool<I, O> {
    pub make: MakeWorker<I, O>,
    pub parallelism: ParallelismHint,
    pub order: PoolOrder<I>,
    pub buffer: BufferPolicy,
    pub run: Arc<RunShared>,
    /// Index of the stage the pool works for.
    pub stage: usize,
}

impl<I: Send + 'static, O: Send + 'static> Pool<I, O> {
    /// Spawns the workers reading `rx` and writing to `out`. A chain offered by `out` runs
    /// behind each worker (see [`chain`](super::chain)), unless the pool is elastic or
    /// partitioned: then it gets a task of its own.
    pub fn spawn(self, rx: EdgeReceiver<I>, out: Entry<O>) {
        let chainable = !matches!(self.order, PoolOrder::Partitioned(_))
            && !matches!(self.parallelism, ParallelismHint::DynamicIoBound { .. });
        match out {
            Entry::Chain(replica) if chainable => self.spawn_chained(rx, replica),
            out => {
                let tx = out.into_sender(&self.run, self.stage);
                self.spawn_to(rx, tx)
            }
        }
    }

    /// Each worker runs its own instance of the chain behind it, which sends on what it
    /// gathered once the worker is done with a batch (in turn, when ordered).
    fn spawn_chained(self, rx: EdgeReceiver<I>, chain: Replica<O>) {
        let workers = self.parallelism.initial_workers().max(1);
        let stile = matches!(self.order, PoolOrder::Ordered).then(|| Turnstile::new(workers));
        self.spawn_scalable(workers, rx, move |make| {
            let lane = match &stile {
                Some(stile) => ChainLane::ordered(stile.clone()),
                None => ChainLane::unordered(),
            };
            Lane::Chained(make(chain(Some(&lane))), lane)
        });
    }

    fn spawn_to(self, rx: EdgeReceiver<I>, out: EdgeSender<O>) {
        let workers = self.parallelism.initial_workers().max(1);
        match (&self.order, self.parallelism) {
            (PoolOrder::Partitioned(key), _) => {
                let mut lanes = Vec::with_capacity(workers);
                let lane_buffer = BufferPolicy::new(
                    (self.buffer.capacity / workers).max(1),
                    crate::policy::DropPolicy::Block,
                );
                for _ in 0..workers {
                    let (tx, lane_rx) = channel::edge(lane_buffer, Arc::new(EdgeStats::default()));
                    lanes.push(tx);
                    let worker = (self.make)(Box::new(EdgeOut {
                        tx: Some(out.clone()),
                    }));
                    self.run.spawn(self.stage, pump(lane_rx, worker));
                }
                self.run
                    .spawn(self.stage, partition(rx, lanes, key.clone()));
            }
            (PoolOrder::Ordered, _) => {
                let (tx, seq_rx) = tokio::sync::mpsc::channel(workers * 4);
                self.run.spawn(
                    self.stage,
                    sequence(seq_rx, Box::new(EdgeOut { tx: Some(out) })),
                );
                self.spawn_scalable(workers, rx, move |make| {
                    let slot = Arc::new(parking_lot::Mutex::new(None));
                    let worker = make(Box::new(Capture { slot: slot.clone() }));
                    Lane::Ordered(worker, slot, tx.clone())
                });
            }
            (PoolOrder::Unordered, _) => {
                self.spawn_scalable(workers, rx, move |make| {
                    Lane::Plain(make(Box::new(EdgeOut {
                        tx: Some(out.clone()),
                    })))
                });
            }
        }
    }

    fn spawn_scalable(
        self,
        workers: usize,
        rx: EdgeReceiver<I>,
        lane: impl Fn(&MakeWorker<I, O>) -> Lane<I, O> + Send + Sync + 'static,
    ) {
        let active = Arc::new(AtomicUsize::new(0));
        let lane = Arc::new(lane);
        let (min, max) = match self.parallelism {
            ParallelismHint::DynamicIoBound { min, max } => (min.max(1), max.max(1)),
            _ => (workers, workers),
        };
        let start = |run: &Arc<RunShared>| {
            active.fetch_add(1, Relaxed);
            let retire = (min < max).then(|| (active.clone(), min));
            run.spawn(self.stage, worker(rx.clone(), lane(&self.make), retire));
        };
        for _ in 0..workers {
            start(&self.run);
        }
        if min < max {
            let run = self.run.clone();
            let stage = self.stage;
            let make = self.make.clone();
            let active = active.clone();
            self.run.spawn(self.stage, async move {
                let mut tick = tokio::time::interval(SCALE_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if rx.is_drained() || run.stop.is_cancelled() && rx.depth() == 0 {
                        return;
                    }
                    let deep = rx.depth() * 4 >= rx.capacity();
                    if deep && active.load(Relaxed) < max {
                        active.fetch_add(1, Relaxed);
                        run.spawn(
                            stage,
                            worker(rx.clone(), lane(&make), Some((active.clone(), min))),
                        );
                    }
                }
            });
        }
    }
}

enum Lane<I, O> {
    Plain(Box<dyn Downstream<I>>),
    Ordered(
        Box<dyn Downstream<I>>,
        Arc<parking_lot::Mutex<Option<Batch<O>>>>,
        tokio::sync::mpsc::Sender<(u64, Batch<O>)>,
    ),
    /// Runs a chain that gathers its output and sends it on when a batch is done.
    Chained(Box<dyn Downstream<I>>, ChainLane),
}

/// One worker: takes batches until the input ends (or, in an elastic pool, until it has been
/// idle long enough and the pool is above its minimum).
async fn worker<I: Send + 'static, O: Send + 'static>(
    rx: EdgeReceiver<I>,
    mut lane: Lane<I, O>,
    retire: Option<(Arc<AtomicUsize>, usize)>,
) {
    let d: &mut Box<dyn Downstream<I>> = match &mut lane {
        Lane::Plain(d) | Lane::Ordered(d, _, _) | Lane::Chained(d, _) => d,
    };
    d.start().await;
    let mut pacer = Pacer::new();
    loop {
        let next = match &retire {
            None => rx.recv().await,
            Some((active, min)) => match tokio::time::timeout(IDLE_RETIRE, rx.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    let left = active.fetch_update(Relaxed, Relaxed, |n| (n > *min).then(|| n - 1));
                    if left.is_ok() {
                        break;
                    }
                    continue;
                }
            },
        };
        let Some((index, batch)) = next else {
            if let Some((active, _)) = &retire {
                active.fetch_sub(1, Relaxed);
            }
            break;
        };
        pacer.after_batch().await;
        match &mut lane {
            Lane::Plain(d) => d.push(batch).await,
            Lane::Ordered(d, slot, tx) => {
                d.push(batch).await;
                let out = slot.lock().take().unwrap_or_default();
                // The sequencer only goes away on abort.
                let _ = tx.send((index, out)).await;
            }
            Lane::Chained(d, lane) => {
                for (piece, last) in super::pieces(batch, CHAIN_CHUNK) {
                    d.push_piece(piece, last).await;
                }
                lane.end(index).await;
            }
        }
    }
    match &mut lane {
        Lane::Plain(d) => d.finish().await,
        Lane::Ordered(d, slot, tx) => {
            d.finish().await;
            // Items a stage emits when it closes come after everything in order.
            let rest = slot.lock().take();
            if let Some(rest) = rest {
                let _ = tx.send((u64::MAX, rest)).await;
            }
        }
        Lane::Chained(d, lane) => {
            lane.closing();
            d.finish().await;
        }
    }
}

/// Restores input order: holds batches that arrive early until their predecessors came.
async fn sequence<O: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<(u64, Batch<O>)>,
    mut out: Box<dyn Downstream<O>>,
) {
    let mut next = 0u64;
    let mut early: BTreeMap<u64, Batch<O>> = BTreeMap::new();
    let mut tail = Vec::new();
    while let Some((index, batch)) = rx.recv().await {
        if index == u64::MAX {
            tail.push(batch);
            continue;
        }
        early.insert(index, batch);
        while let Some(batch) = early.remove(&next) {
            next += 1;
            out.push(batch).await;
        }
    }
    for batch in early.into_values().chain(tail) {
        out.push(batch).await;
    }
    out.finish().await;
}

/// Splits each batch by key hash so a key always goes to the same lane.
async fn partition<I: Send + 'static>(
    rx: EdgeReceiver<I>,
    lanes: Vec<EdgeSender<I>>,
    key: Arc<dyn Fn(&I) -> u64 + Send + Sync>,
) {
    let n = lanes.len() as u64;
    while let Some((_, batch)) = rx.recv().await {
        let mut split: Vec<Batch<I>> = (0..n).map(|_| Batch::default()).collect();
        for item in batch {
            let lane = (key(&item.payload) % n) as usize;
            split[lane].push(item);
        }
        for (lane, part) in lanes.iter().zip(split) {
            lane.send(part).await;
        }
    }
}

impl<T> EdgeReceiver<T> {
    /// Whether every sender is gone and nothing is queued.
    pub(crate) fn is_drained(&self) -> bool {
        self.depth() == 0 && self.sender_count() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn giving_way_wakes_the_task_itself_and_is_pending_once() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut way = std::pin::pin!(super::SelfWake { yielded: false });
        assert!(way.as_mut().poll(&mut cx).is_pending());
        // Woken during its own poll: the runtime queues the task again at once, where any
        // worker may take it (a deferred wake-up would leave the count at 0 here).
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert_eq!(way.as_mut().poll(&mut cx), Poll::Ready(()));
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    }
}
