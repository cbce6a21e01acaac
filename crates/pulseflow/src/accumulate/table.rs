//! The state table of one accumulator worker.
//!
//! - [`Shards`]: a hash map split into 64 shards (foldhash, seeded per map). Growing a shard
//!   rehashes a 64th of the keys, so no single insertion stalls the worker for long (one rehash
//!   of a million-key map takes milliseconds, long enough for the supervisor to count a
//!   blocking poll).
//! - [`ClockTable`]: resident values in a slab, a sharded index from key to slot, and CLOCK
//!   (second chance) eviction: touching a key sets its slot's reference bit, the eviction hand
//!   sweeps the slab clearing bits and takes the first slot whose bit is clear. A touch costs
//!   no relinking (the exact-LRU list cost about four cache misses per update), and the victim
//!   is a key not used since the hand last passed, which is what spilling needs.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// Shards of a [`Shards`] map (a power of two).
const SHARDS: usize = 64;

/// A hash map in 64 independently growing shards.
pub(crate) struct Shards<K, V> {
    route: foldhash::fast::RandomState,
    shards: Box<[HashMap<K, V, foldhash::fast::RandomState>]>,
    len: usize,
}

impl<K: Hash + Eq, V> Shards<K, V> {
    pub fn new() -> Self {
        Self {
            route: foldhash::fast::RandomState::default(),
            shards: (0..SHARDS)
                .map(|_| HashMap::with_hasher(foldhash::fast::RandomState::default()))
                .collect(),
            len: 0,
        }
    }

    #[inline]
    fn shard(&self, key: &K) -> usize {
        (self.route.hash_one(key) >> 58) as usize & (SHARDS - 1)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.shards[self.shard(key)].get(key)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let s = self.shard(key);
        self.shards[s].get_mut(key)
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let s = self.shard(&key);
        let old = self.shards[s].insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let s = self.shard(key);
        let old = self.shards[s].remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The shards, emptied from the map (each can be dropped on its own).
    fn into_shards(self) -> Vec<HashMap<K, V, foldhash::fast::RandomState>> {
        self.shards.into_vec()
    }

    /// Every entry, shard by shard.
    pub fn into_entries(self) -> impl Iterator<Item = (K, V)> {
        self.shards
            .into_vec()
            .into_iter()
            .flat_map(|s| s.into_iter())
    }
}

struct Slot<V> {
    value: Option<V>,
    /// Used since the eviction hand last passed.
    referenced: bool,
}

/// Slots per chunk of the slab (a power of two).
const CHUNK_BITS: usize = 12;
const CHUNK: usize = 1 << CHUNK_BITS;

/// Resident values by key, with CLOCK eviction.
///
/// The slab is a list of fixed chunks of [`CHUNK`] slots: growing it allocates one chunk and
/// never moves the values already in (a single vector of a million ~100-byte slots copies
/// tens of MiB and faults in fresh pages when it doubles, a poll of many milliseconds), and
/// draining it frees one chunk at a time.
pub(crate) struct ClockTable<K, V> {
    index: Shards<K, u32>,
    chunks: Vec<Vec<Slot<V>>>,
    /// Slots in the slab, occupied or free.
    slots: usize,
    free: Vec<u32>,
    hand: usize,
}

impl<K: Hash + Eq + Clone, V> ClockTable<K, V> {
    pub fn new() -> Self {
        Self {
            index: Shards::new(),
            chunks: Vec::new(),
            slots: 0,
            free: Vec::new(),
            hand: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    #[inline]
    fn slot_mut(&mut self, slot: u32) -> Option<&mut Slot<V>> {
        let i = slot as usize;
        self.chunks
            .get_mut(i >> CHUNK_BITS)?
            .get_mut(i & (CHUNK - 1))
    }

    /// The key's slot, marked used.
    #[inline]
    pub fn touch(&mut self, key: &K) -> Option<u32> {
        let slot = *self.index.get(key)?;
        if let Some(s) = self.slot_mut(slot) {
            s.referenced = true;
        }
        Some(slot)
    }

    /// Inserts a key that is not in the table, marked used.
    pub fn insert(&mut self, key: K, value: V) -> u32 {
        let fresh = Slot {
            value: Some(value),
            referenced: true,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                if let Some(old) = self.slot_mut(s) {
                    *old = fresh;
                }
                s
            }
            None => {
                match self.chunks.last_mut() {
                    Some(chunk) if chunk.len() < CHUNK => chunk.push(fresh),
                    _ => {
                        let mut chunk = Vec::with_capacity(CHUNK);
                        chunk.push(fresh);
                        self.chunks.push(chunk);
                    }
                }
                self.slots += 1;
                (self.slots - 1) as u32
            }
        };
        self.index.insert(key, slot);
        slot
    }

    /// The key's value, without marking it used.
    pub fn peek_mut(&mut self, key: &K) -> Option<&mut V> {
        let slot = *self.index.get(key)?;
        self.get_mut(slot)
    }

    #[inline]
    pub fn get_mut(&mut self, slot: u32) -> Option<&mut V> {
        self.slot_mut(slot)?.value.as_mut()
    }

    /// Removes a key.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.index.remove(key)?;
        let value = self.slot_mut(slot)?.value.take();
        self.free.push(slot);
        value
    }

    /// Removes a value the eviction hand picks: the first occupied slot at or after the hand
    /// that was not used since the hand last passed (bits of used slots are cleared on the
    /// way). `key_of` finds a value's key.
    pub fn evict(&mut self, key_of: impl Fn(&V) -> &K) -> Option<V> {
        if self.index.is_empty() || self.slots == 0 {
            return None;
        }
        // Two full turns always find a victim: the first clears every bit.
        for _ in 0..2 * self.slots {
            if self.hand >= self.slots {
                self.hand = 0;
            }
            let at = self.hand;
            self.hand += 1;
            let Some(slot) = self.slot_mut(at as u32) else {
                continue;
            };
            match &slot.value {
                None => {}
                Some(_) if slot.referenced => slot.referenced = false,
                Some(v) => {
                    let key = key_of(v).clone();
                    let value = slot.value.take();
                    self.index.remove(&key);
                    self.free.push(at as u32);
                    return value;
                }
            }
        }
        None
    }

    /// Every value, starting at the eviction hand's chunk (roughly least recently used
    /// first), emptying the table. Lazy, so a caller can pause between values; each chunk is
    /// freed once its values are taken, and one shard of the old index with it (freeing a
    /// large table at once is a long stretch of kernel time in one poll).
    pub fn drain(&mut self) -> impl Iterator<Item = V> + use<K, V> {
        let chunks = std::mem::take(&mut self.chunks);
        let n = chunks.len();
        let start = (self.hand >> CHUNK_BITS).min(n);
        let mut old_index = std::mem::replace(&mut self.index, Shards::new()).into_shards();
        self.free = Vec::new();
        self.slots = 0;
        self.hand = 0;
        let mut chunks: Vec<Option<Vec<Slot<V>>>> = chunks.into_iter().map(Some).collect();
        (start..n)
            .chain(0..start)
            .flat_map(move |i| {
                drop(old_index.pop());
                chunks[i].take().unwrap_or_default()
            })
            .filter_map(|slot| slot.value)
    }

    /// Bytes of bookkeeping per resident key (index entry and slot header), approximately.
    pub fn overhead_per_key() -> usize {
        // Index bucket at 7/8 load plus its control byte, slot flag and padding, free list.
        (std::mem::size_of::<(K, u32)>() + 1) * 8 / 7 + 8 + 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_chance_eviction() {
        let mut t = ClockTable::new();
        for k in 0..5u32 {
            t.insert(k, (k, k * 10));
        }
        fn key(v: &(u32, u32)) -> &u32 {
            &v.0
        }
        // All were just inserted (referenced): the first sweep clears bits, then 0 goes.
        assert_eq!(t.evict(key), Some((0, 0)));
        // 1 is used again: it survives the hand, 2 goes next.
        t.touch(&1);
        assert_eq!(t.evict(key), Some((2, 20)));
        assert_eq!(t.len(), 3);
        assert!(t.touch(&2).is_none());
        assert_eq!(t.remove(&3), Some((3, 30)));
        t.insert(7, (7, 70));
        let mut rest: Vec<_> = t.drain().map(|v| v.1).collect();
        rest.sort();
        assert_eq!(rest, vec![10, 40, 70]);
        assert_eq!(t.len(), 0);
        assert_eq!(t.evict(key), None);
    }

    #[test]
    fn shards_count_and_drain() {
        let mut m = Shards::new();
        for k in 0..1000u32 {
            assert_eq!(m.insert(k, k + 1), None);
        }
        assert_eq!(m.insert(5, 0), Some(6));
        assert_eq!(m.len(), 1000);
        assert_eq!(m.remove(&5), Some(0));
        assert_eq!(m.get(&7), Some(&8));
        let mut all: Vec<_> = m.into_entries().collect();
        all.sort();
        assert_eq!(all.len(), 999);
        assert_eq!(all[5], (6, 7));
    }

    #[test]
    fn slab_spans_chunks() {
        let mut t = ClockTable::new();
        let n = 3 * CHUNK as u32 + 5;
        for k in 0..n {
            t.insert(k, k);
        }
        assert_eq!(t.get_mut(n - 1).copied(), Some(n - 1));
        let mut evicted = Vec::new();
        while t.len() > (n / 2) as usize {
            evicted.push(t.evict(|v| v).expect("a victim"));
        }
        // Freed slots are reused before the slab grows.
        t.insert(n, n);
        assert_eq!(t.slots, n as usize);
        let mut all: Vec<u32> = t.drain().chain(evicted).collect();
        all.sort();
        assert_eq!(all, (0..=n).collect::<Vec<_>>());
        assert_eq!(t.len(), 0);
    }
}
