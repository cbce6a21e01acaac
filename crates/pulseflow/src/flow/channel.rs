//! A multi-producer, multi-consumer queue of batches, bounded in items.
//!
//! One lock per batch (not per item) guards the queue; waiting is done on [`Notify`], so a
//! full edge suspends the sending task and never blocks a thread.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::ack::Outcome;
use crate::envelope::Batch;
use crate::flow::BackpressureController;
use crate::metrics::{DropReason, EdgeStats};
use crate::policy::{BufferPolicy, DropPolicy};

/// How long one wait for a gate's admission lasts before it starts again.
const GATE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

struct State<T> {
    queue: VecDeque<Batch<T>>,
    items: usize,
    senders: usize,
    receivers: usize,
    popped: u64,
    /// Tasks waiting for a batch / for room: wake-ups are sent only when someone waits.
    rx_waiting: usize,
    tx_waiting: usize,
}

/// Counts a waiting task for as long as it waits, also when its future is dropped.
struct Waiting<'a, T> {
    shared: &'a Shared<T>,
    receiver: bool,
}

impl<T> Drop for Waiting<'_, T> {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock();
        if self.receiver {
            st.rx_waiting -= 1;
        } else {
            st.tx_waiting -= 1;
        }
    }
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Admission asked of every sender before it sends (credit or pull strategies).
    gate: Option<Arc<dyn BackpressureController>>,
    readable: Notify,
    writable: Notify,
    capacity: usize,
    policy: DropPolicy,
    stats: Arc<EdgeStats>,
}

/// Creates an edge with the given buffer policy; `stats` receives its counters.
pub(crate) fn edge<T>(
    policy: BufferPolicy,
    stats: Arc<EdgeStats>,
) -> (EdgeSender<T>, EdgeReceiver<T>) {
    gated_edge(policy, stats, None)
}

/// An edge whose senders must be admitted by `gate` before each send: nothing enters the
/// edge without credit or downstream demand.
pub(crate) fn gated_edge<T>(
    policy: BufferPolicy,
    stats: Arc<EdgeStats>,
    gate: Option<Arc<dyn BackpressureController>>,
) -> (EdgeSender<T>, EdgeReceiver<T>) {
    let capacity = policy.capacity.max(1);
    stats.capacity.store(capacity as u64, Relaxed);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            items: 0,
            senders: 1,
            receivers: 1,
            popped: 0,
            rx_waiting: 0,
            tx_waiting: 0,
        }),
        readable: Notify::new(),
        writable: Notify::new(),
        gate,
        capacity,
        policy: policy.drop_policy,
        stats,
    });
    (
        EdgeSender {
            shared: shared.clone(),
        },
        EdgeReceiver { shared },
    )
}

/// The sending side; clone it for several producers.
pub(crate) struct EdgeSender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving side; clone it for several consumers (parallel workers).
pub(crate) struct EdgeReceiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for EdgeSender<T> {
    fn clone(&self) -> Self {
        self.shared.state.lock().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Clone for EdgeReceiver<T> {
    fn clone(&self) -> Self {
        self.shared.state.lock().receivers += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for EdgeSender<T> {
    fn drop(&mut self) {
        let last = {
            let mut st = self.shared.state.lock();
            st.senders -= 1;
            st.senders == 0
        };
        if last {
            self.shared.readable.notify_waiters();
        }
    }
}

impl<T> Drop for EdgeReceiver<T> {
    fn drop(&mut self) {
        let discarded = {
            let mut st = self.shared.state.lock();
            st.receivers -= 1;
            if st.receivers > 0 {
                return;
            }
            let n = st.items;
            for batch in st.queue.drain(..) {
                crate::ack::record_all(batch.items(), Outcome::Failed);
            }
            st.items = 0;
            n
        };
        self.shared
            .stats
            .count_drop(DropReason::Closed, discarded as u64);
        self.shared.stats.set_depth(0);
        self.shared.writable.notify_waiters();
    }
}

impl<T> EdgeSender<T> {
    /// Sends a batch, waiting for room under `Block`, dropping (counted) under the other
    /// policies. Items sent after the receivers are gone are dropped as `closed`.
    pub async fn send(&self, mut batch: Batch<T>) {
        if batch.is_empty() {
            return;
        }
        let shared = &*self.shared;
        shared.stats.sent.fetch_add(batch.len() as u64, Relaxed);
        if let Some(gate) = &shared.gate {
            // Send only what the gate admits, waiting (suspended) for the rest.
            let stats = shared.stats.clone();
            let depth = move || crate::flow::Load::items(stats.depth.load(Relaxed) as usize);
            while !batch.is_empty() {
                let waiting = std::time::Instant::now();
                let acquired = gate
                    .acquire(batch.len(), batch.total_bytes(), &depth, GATE_WAIT)
                    .await;
                shared.stats.add_blocked(waiting.elapsed());
                let admitted = match acquired {
                    Ok(a) => a.admitted.min(batch.len()),
                    Err(_) => continue,
                };
                if admitted == 0 {
                    continue;
                }
                let rest = batch.split_off(admitted);
                self.send_sized(batch).await;
                batch = rest;
            }
            return;
        }
        self.send_sized(batch).await;
    }

    async fn send_sized(&self, mut batch: Batch<T>) {
        let shared = &*self.shared;
        while !batch.is_empty() {
            // A batch larger than the whole buffer goes in pieces of at most `capacity`.
            let rest = if batch.len() > shared.capacity {
                Some(batch.split_off(shared.capacity))
            } else {
                None
            };
            self.send_fitting(batch).await;
            match rest {
                Some(rest) => batch = rest,
                None => break,
            }
        }
    }

    async fn send_fitting(&self, mut batch: Batch<T>) {
        let shared = &*self.shared;
        let n = batch.len();
        let writable = shared.writable.notified();
        tokio::pin!(writable);
        // Set once the buffer is found full: the wait is the stage's backpressure.
        let mut blocked = BlockedTime {
            since: None,
            stats: &shared.stats,
        };
        loop {
            writable.as_mut().enable();
            {
                let mut st = shared.state.lock();
                if st.receivers == 0 {
                    drop(st);
                    crate::ack::record_all(batch.items(), Outcome::Failed);
                    shared.stats.count_drop(DropReason::Closed, n as u64);
                    return;
                }
                let room = shared.capacity - st.items.min(shared.capacity);
                match shared.policy {
                    DropPolicy::Block if n > room => {
                        st.tx_waiting += 1;
                        blocked.start();
                    }
                    DropPolicy::Block => {
                        self.push(&mut st, batch);
                        return;
                    }
                    DropPolicy::DropNewest => {
                        if n > room {
                            let refused = batch.split_off(room);
                            crate::ack::record_all(refused.items(), Outcome::Dropped);
                            shared
                                .stats
                                .count_drop(DropReason::DropNewest, refused.len() as u64);
                        }
                        if !batch.is_empty() {
                            self.push(&mut st, batch);
                        }
                        return;
                    }
                    DropPolicy::DropOldest => {
                        let mut excess = (st.items + n).saturating_sub(shared.capacity);
                        let mut evicted = 0;
                        while excess > 0 {
                            let Some(front) = st.queue.front_mut() else {
                                break;
                            };
                            if front.len() <= excess {
                                let gone = front.len();
                                if let Some(b) = st.queue.pop_front() {
                                    crate::ack::record_all(b.items(), Outcome::Dropped);
                                }
                                st.items -= gone;
                                excess -= gone;
                                evicted += gone;
                            } else {
                                let gone = front.split_front(excess);
                                crate::ack::record_all(gone.items(), Outcome::Dropped);
                                st.items -= excess;
                                evicted += excess;
                                excess = 0;
                            }
                        }
                        shared
                            .stats
                            .count_drop(DropReason::DropOldest, evicted as u64);
                        self.push(&mut st, batch);
                        return;
                    }
                }
            }
            let waiting = Waiting {
                shared,
                receiver: false,
            };
            writable.as_mut().await;
            drop(waiting);
            writable.set(shared.writable.notified());
        }
    }

    fn push(&self, st: &mut State<T>, batch: Batch<T>) {
        st.items += batch.len();
        st.queue.push_back(batch);
        self.shared.stats.set_depth(st.items as u64);
        if st.rx_waiting > 0 {
            self.shared.readable.notify_waiters();
        }
    }

    /// How many items the receiving stage asked for (reactive pull), waiting until it asked
    /// for some; `usize::MAX` when the edge is not demand-driven.
    pub async fn demand(&self) -> usize {
        match &self.shared.gate {
            Some(gate) => gate.demand().await,
            None => usize::MAX,
        }
    }

    /// Whether every receiver is gone.
    #[cfg(test)]
    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().receivers == 0
    }
}

impl<T> EdgeReceiver<T> {
    /// The next batch and its position in the edge's output order, or `None` once every
    /// sender is gone and the queue is empty.
    pub async fn recv(&self) -> Option<(u64, Batch<T>)> {
        let shared = &*self.shared;
        let readable = shared.readable.notified();
        tokio::pin!(readable);
        loop {
            readable.as_mut().enable();
            {
                let mut st = shared.state.lock();
                if let Some(batch) = st.queue.pop_front() {
                    st.items -= batch.len();
                    let index = st.popped;
                    st.popped += 1;
                    shared.stats.set_depth(st.items as u64);
                    // A sender waiting for room is woken once the buffer is at most half full:
                    // it then sends several batches per wake-up instead of one (a wake-up
                    // across threads costs more than a batch takes to process).
                    let wake = st.tx_waiting > 0 && st.items <= shared.capacity / 2;
                    drop(st);
                    shared
                        .stats
                        .delivered
                        .fetch_add(batch.len() as u64, Relaxed);
                    if wake {
                        shared.writable.notify_waiters();
                    }
                    return Some((index, batch));
                }
                if st.senders == 0 {
                    return None;
                }
                st.rx_waiting += 1;
            }
            let waiting = Waiting {
                shared,
                receiver: true,
            };
            readable.as_mut().await;
            drop(waiting);
            readable.set(shared.readable.notified());
        }
    }

    /// Items queued now.
    pub fn depth(&self) -> usize {
        self.shared.state.lock().items
    }

    /// Senders still alive.
    pub fn sender_count(&self) -> usize {
        self.shared.state.lock().senders
    }

    /// The buffer's capacity in items.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

/// Adds the time a send waited for room, if it did, to its edge's figures when the send ends
/// (however it ends).
struct BlockedTime<'a> {
    since: Option<std::time::Instant>,
    stats: &'a EdgeStats,
}

impl BlockedTime<'_> {
    /// The buffer is full: the wait starts now, unless it already had.
    fn start(&mut self) {
        self.since.get_or_insert_with(std::time::Instant::now);
    }
}

impl Drop for BlockedTime<'_> {
    fn drop(&mut self) {
        if let Some(since) = self.since.take() {
            self.stats.add_blocked(since.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;

    fn batch(range: std::ops::Range<u64>) -> Batch<u64> {
        Batch::from_items(range.map(|i| Envelope::new(i).with_seq(i)).collect())
    }

    fn seqs(b: &Batch<u64>) -> Vec<u64> {
        b.items().iter().map(|e| e.seq).collect()
    }

    fn pair(cap: usize, p: DropPolicy) -> (EdgeSender<u64>, EdgeReceiver<u64>, Arc<EdgeStats>) {
        let stats = Arc::new(EdgeStats::default());
        let (tx, rx) = edge(BufferPolicy::new(cap, p), stats.clone());
        (tx, rx, stats)
    }

    #[tokio::test]
    async fn drop_newest_refuses_what_does_not_fit() {
        let (tx, rx, stats) = pair(5, DropPolicy::DropNewest);
        tx.send(batch(0..3)).await;
        tx.send(batch(3..7)).await;
        drop(tx);
        let (_, a) = rx.recv().await.expect("first");
        let (_, b) = rx.recv().await.expect("second");
        assert_eq!(seqs(&a), vec![0, 1, 2]);
        assert_eq!(seqs(&b), vec![3, 4]);
        assert!(rx.recv().await.is_none());
        assert_eq!(
            stats.dropped[DropReason::DropNewest as usize].load(Relaxed),
            2
        );
        assert_eq!(stats.sent.load(Relaxed), 7);
        assert_eq!(stats.delivered.load(Relaxed), 5);
    }

    #[tokio::test]
    async fn drop_oldest_evicts_from_the_front() {
        let (tx, rx, stats) = pair(5, DropPolicy::DropOldest);
        tx.send(batch(0..3)).await;
        tx.send(batch(3..7)).await;
        drop(tx);
        let mut got = Vec::new();
        while let Some((_, b)) = rx.recv().await {
            got.extend(seqs(&b));
        }
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
        assert_eq!(
            stats.dropped[DropReason::DropOldest as usize].load(Relaxed),
            2
        );
    }

    #[tokio::test]
    async fn only_a_send_that_waits_for_room_counts_as_blocked() {
        let (tx, rx, stats) = pair(4, DropPolicy::Block);
        tx.send(batch(0..4)).await;
        assert_eq!(stats.blocked_nanos.load(Relaxed), 0, "there was room");
        let waiting = tokio::spawn(async move { tx.send(batch(4..6)).await });
        while rx.shared.state.lock().tx_waiting == 0 {
            tokio::task::yield_now().await;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        rx.recv().await.expect("first");
        waiting.await.expect("task");
        assert!(stats.blocked_nanos.load(Relaxed) > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn block_waits_for_room_and_loses_nothing() {
        let (tx, rx, stats) = pair(4, DropPolicy::Block);
        let producer = tokio::spawn(async move {
            for i in 0..10 {
                tx.send(batch(i * 3..i * 3 + 3)).await;
            }
        });
        let mut got = Vec::new();
        let mut indexes = Vec::new();
        while let Some((i, b)) = rx.recv().await {
            assert!(b.len() <= 4);
            assert!(stats.peak_depth.load(Relaxed) <= 4);
            indexes.push(i);
            got.extend(seqs(&b));
            tokio::task::yield_now().await;
        }
        producer.await.expect("producer");
        assert_eq!(got, (0..30).collect::<Vec<_>>());
        assert_eq!(indexes, (0..indexes.len() as u64).collect::<Vec<_>>());
        assert_eq!(stats.dropped_total(), 0);
    }

    #[tokio::test]
    async fn oversized_batches_are_split_to_capacity() {
        let (tx, rx, _) = pair(4, DropPolicy::Block);
        let producer = tokio::spawn(async move { tx.send(batch(0..10)).await });
        let mut sizes = Vec::new();
        while let Some((_, b)) = rx.recv().await {
            sizes.push(b.len());
        }
        producer.await.expect("producer");
        assert_eq!(sizes, vec![4, 4, 2]);
    }

    #[tokio::test]
    async fn items_sent_to_a_closed_edge_are_counted() {
        let (tx, rx, stats) = pair(8, DropPolicy::Block);
        tx.send(batch(0..3)).await;
        drop(rx);
        tx.send(batch(3..5)).await;
        assert!(tx.is_closed());
        assert_eq!(stats.dropped[DropReason::Closed as usize].load(Relaxed), 5);
    }
}
