//! Batch buffers handed back by the stages that emptied them, for sources and transforms to
//! fill again.
//!
//! A batch's items travel in one `Vec` from the source to the sink (`filter` compacts it in
//! place, a fused chain passes it along), so without recycling each batch costs an
//! allocation in one task and a free in another, and the allocator's trimming of what was
//! freed turns into page faults at the next allocation. Buffers are pooled per item type: a
//! stage that empties a buffer of envelopes of `T` gives it to the run's pool for `T`, and
//! whoever needs one takes it from there. A pool holds a few buffers at most, and only once
//! someone has taken from it, so a type nobody asks for costs one relaxed load per batch.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::ThreadId;

use parking_lot::Mutex;

use crate::envelope::Envelope;

/// Spare buffers kept per item type.
const SPARE: usize = 16;

/// The pools of one run, one per item type.
#[derive(Default)]
pub(crate) struct Buffers {
    pools: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
    /// Capacities worth keeping: from half a batch to a few batches.
    capacities: (usize, usize),
}

impl Buffers {
    /// Pools keeping buffers of up to a few times `batch_size` items.
    pub fn new(batch_size: usize) -> Self {
        Self {
            pools: Mutex::default(),
            capacities: (
                (batch_size / 2).max(1),
                batch_size.saturating_mul(4).max(64),
            ),
        }
    }

    /// The pool of buffers of envelopes of `T`.
    pub fn pool<T: Send + 'static>(&self) -> Arc<Pool<T>> {
        let mut pools = self.pools.lock();
        let pool = pools
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(Pool::<T>::new(self.capacities)));
        // Keyed by the type's id, every entry is a pool of that type; were it not, a pool of
        // its own would only go without sharing.
        pool.clone()
            .downcast::<Pool<T>>()
            .unwrap_or_else(|_| Arc::new(Pool::new(self.capacities)))
    }
}

/// Spare buffers of envelopes of `T`.
pub(crate) struct Pool<T> {
    /// Most recently given last, each with the thread that gave it.
    spare: Mutex<Vec<(ThreadId, Vec<Envelope<T>>)>>,
    /// Whether anyone took a buffer yet: until then, buffers given are not kept.
    wanted: AtomicBool,
    capacities: (usize, usize),
}

impl<T> Pool<T> {
    fn new(capacities: (usize, usize)) -> Self {
        Self {
            spare: Mutex::new(Vec::new()),
            wanted: AtomicBool::new(false),
            capacities,
        }
    }

    /// An empty buffer with room for at least `capacity` items: a spare one if there is one.
    pub fn take(&self, capacity: usize) -> Vec<Envelope<T>> {
        if !self.wanted.load(Relaxed) {
            self.wanted.store(true, Relaxed);
        }
        // Preferably one given on this thread: its cache lines may still be in this core's
        // cache, where writing them costs no transfer from another core.
        let here = std::thread::current().id();
        let spare = {
            let mut spare = self.spare.lock();
            match spare.iter().rposition(|(by, _)| *by == here) {
                Some(at) => Some(spare.remove(at).1),
                None => spare.pop().map(|(_, buf)| buf),
            }
        };
        match spare {
            Some(mut buf) => {
                buf.reserve(capacity);
                buf
            }
            None => Vec::with_capacity(capacity),
        }
    }

    /// A spare buffer, if there is one (never allocates).
    #[cfg(test)]
    pub fn take_spare(&self) -> Option<Vec<Envelope<T>>> {
        if !self.wanted.load(Relaxed) {
            self.wanted.store(true, Relaxed);
        }
        self.spare.lock().pop().map(|(_, buf)| buf)
    }

    /// Gives back a buffer (its items, if any, are dropped); kept if someone takes buffers
    /// from this pool and its capacity is about a batch's.
    pub fn give(&self, mut buf: Vec<Envelope<T>>) {
        let (min, max) = self.capacities;
        if !self.wanted.load(Relaxed) || !(min..=max).contains(&buf.capacity()) {
            return;
        }
        buf.clear();
        let by = std::thread::current().id();
        let mut spare = self.spare.lock();
        if spare.len() < SPARE {
            spare.push((by, buf));
        }
    }

    /// Gives back the buffer of a consumed batch's iterator (any items it still holds are
    /// dropped, as dropping the iterator would).
    pub fn reclaim(&self, items: std::vec::IntoIter<Envelope<T>>) {
        if self.wanted.load(Relaxed) {
            self.give(into_buffer(items));
        }
    }
}

/// The buffer of a vector's iterator, emptied. Collecting a `Vec`'s own iterator (through
/// adapters that keep or drop items) reuses its allocation, so this moves nothing and
/// allocates nothing; should it not, the buffer returned merely has no capacity and is not
/// kept.
fn into_buffer<T>(items: std::vec::IntoIter<T>) -> Vec<T> {
    items.filter(|_| false).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_empty() {
        let buffers = Buffers::new(8);
        let pool = buffers.pool::<u32>();
        // Nobody took from the pool yet: what is given is not kept.
        pool.give(Vec::with_capacity(8));
        assert!(pool.take_spare().is_none());
        let mut buf = pool.take(8);
        buf.extend((0..8).map(Envelope::new));
        let ptr = buf.as_ptr();
        let mut items = buf.into_iter();
        assert_eq!(items.next().map(|e| e.payload), Some(0));
        pool.reclaim(items);
        let again = buffers.pool::<u32>().take(8);
        assert!(again.is_empty());
        assert!(again.capacity() >= 8);
        assert_eq!(again.as_ptr(), ptr, "the same allocation came back");
    }

    #[test]
    fn pools_are_per_type_and_bounded() {
        let buffers = Buffers::new(4);
        let a = buffers.pool::<u8>();
        let b = buffers.pool::<u16>();
        assert!(a.take_spare().is_none());
        for _ in 0..SPARE + 4 {
            a.give(Vec::with_capacity(4));
        }
        // Too large or too small to keep.
        a.give(Vec::with_capacity(1024));
        a.give(Vec::with_capacity(1));
        assert!(b.take_spare().is_none());
        let mut kept = 0;
        while let Some(buf) = a.take_spare() {
            assert!(buf.capacity() <= 16);
            kept += 1;
        }
        assert_eq!(kept, SPARE);
    }
}
