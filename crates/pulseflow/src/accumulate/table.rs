//! The state table of one accumulator worker.
//!
//! - [`Shards`]: a hash map split into 64 shards (foldhash, seeded per map). Growing a shard
//!   rehashes a 64th of the keys, so no single insertion stalls the worker for long (one rehash
//!   of a million-key map takes milliseconds, long enough for the supervisor to count a
//!   blocking poll).
//! - [`ClockTable`]: resident values in a slab, an index from key to slot, and CLOCK (second
//!   chance) eviction: touching a key sets its slot's reference bit, the eviction hand sweeps
//!   the slab clearing bits and takes the first slot whose bit is clear. A touch costs no
//!   relinking (the exact-LRU list cost about four cache misses per update), and the victim
//!   is a key not used since the hand last passed, which is what spilling needs.
//! - [`Index`]: the key -> slot index of a [`ClockTable`]: 64 shards of open-addressing
//!   tables (linear probing) of 8-byte entries, each the low 32 bits of the key's hash and
//!   the slot. The key is hashed once; a lookup reads one entry (usually one cache line) and
//!   then the slot, where the key is compared; the key is not stored twice. Growing a shard
//!   re-places its entries from their stored hash bits, without touching keys or slots.

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

    /// Every entry, shard by shard.
    pub fn into_entries(self) -> impl Iterator<Item = (K, V)> {
        self.shards
            .into_vec()
            .into_iter()
            .flat_map(|s| s.into_iter())
    }
}

/// A value that knows its key (a [`ClockTable`] keeps keys only inside its values).
pub(crate) trait Keyed<K> {
    fn key(&self) -> &K;
}

/// Asks the CPU to bring the cache line holding `value` closer, without waiting for it (a
/// hint: no value is read, nothing blocks). A plain load in its place stalls the core once
/// its reorder buffer fills, about one item's work of the stage, so only one or two misses
/// would overlap.
#[inline(always)]
fn prefetch_read<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch is a hint with no architectural effect; it cannot fault, and
        // the pointer comes from a live reference anyway. `sse` is part of the x86_64
        // baseline, which `_mm_prefetch`'s `target_feature` asks for.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(value).cast()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// An empty index entry (no slot has this number: the slab stays below `u32::MAX` slots).
const EMPTY: u64 = u64::MAX;
/// Entries of an index shard when it gets its first key (a power of two).
const INDEX_MIN: usize = 16;

/// One shard of an [`Index`]: open addressing with linear probing, at most 3/4 full, entries
/// `(hash as u32) << 32 | slot`, backward-shift deletion (no tombstones).
#[derive(Default)]
struct IndexShard {
    entries: Vec<u64>,
    len: usize,
}

impl IndexShard {
    #[inline]
    fn mask(&self) -> usize {
        self.entries.len().wrapping_sub(1)
    }

    /// Where probing for hash bits `tag` starts.
    #[inline]
    fn home(&self, tag: u32) -> usize {
        tag as usize & self.mask()
    }

    /// Where the entry for `tag` whose slot satisfies `is` is, and its slot.
    #[inline]
    fn find(&self, tag: u32, mut is: impl FnMut(u32) -> bool) -> Option<(usize, u32)> {
        if self.entries.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut at = self.home(tag);
        loop {
            let e = *self.entries.get(at)?;
            if e == EMPTY {
                return None;
            }
            if (e >> 32) as u32 == tag && is(e as u32) {
                return Some((at, e as u32));
            }
            at = (at + 1) & mask;
        }
    }

    /// Puts an entry in the first empty place from its home (there is room).
    #[inline]
    fn place(&mut self, entry: u64) {
        let mask = self.mask();
        let mut at = self.home((entry >> 32) as u32);
        while let Some(e) = self.entries.get_mut(at) {
            if *e == EMPTY {
                *e = entry;
                return;
            }
            at = (at + 1) & mask;
        }
    }

    fn insert(&mut self, tag: u32, slot: u32) {
        if self.len + 1 > self.entries.len() - self.entries.len() / 4 {
            // Doubles (a 64th of the keys moves, from their stored hash bits: no key is
            // hashed or read again).
            let size = (self.entries.len() * 2).max(INDEX_MIN);
            let old = std::mem::replace(&mut self.entries, vec![EMPTY; size]);
            for e in old.into_iter().filter(|&e| e != EMPTY) {
                self.place(e);
            }
        }
        self.place((u64::from(tag) << 32) | u64::from(slot));
        self.len += 1;
    }

    /// Removes the entry at `at`, moving later entries of its probe run back so every entry
    /// stays reachable from its home.
    fn remove_at(&mut self, mut at: usize) {
        let mask = self.mask();
        let mut next = at;
        loop {
            next = (next + 1) & mask;
            let Some(&e) = self.entries.get(next) else {
                break;
            };
            if e == EMPTY {
                break;
            }
            let home = self.home((e >> 32) as u32);
            // The entry stays when its home lies cyclically in (at, next].
            let stays = if at <= next {
                at < home && home <= next
            } else {
                at < home || home <= next
            };
            if !stays {
                self.entries[at] = e;
                at = next;
            }
        }
        if let Some(e) = self.entries.get_mut(at) {
            *e = EMPTY;
        }
        self.len -= 1;
    }
}

/// The key -> slot index of a [`ClockTable`], in 64 shards (each grows on its own, so no
/// insertion re-places more than a 64th of the keys).
struct Index {
    hasher: foldhash::fast::RandomState,
    shards: Box<[IndexShard]>,
    len: usize,
}

impl Index {
    fn new() -> Self {
        Self {
            hasher: foldhash::fast::RandomState::default(),
            shards: (0..SHARDS).map(|_| IndexShard::default()).collect(),
            len: 0,
        }
    }

    /// The shard of a hash: its top bits (the low 32 are the entry's tag and place it).
    #[inline]
    fn split(hash: u64) -> (usize, u32) {
        ((hash >> 58) as usize & (SHARDS - 1), hash as u32)
    }

    /// The index's shards, emptied from it (each can be dropped on its own).
    fn into_shards(self) -> Vec<IndexShard> {
        self.shards.into_vec()
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
/// draining it frees one chunk at a time. Slots are taken in order (freed ones first), so the
/// slab keeps keys roughly in the order they were first seen.
pub(crate) struct ClockTable<K, V> {
    index: Index,
    chunks: Vec<Vec<Slot<V>>>,
    /// Slots in the slab, occupied or free.
    slots: usize,
    free: Vec<u32>,
    hand: usize,
    _key: std::marker::PhantomData<fn(&K)>,
}

/// The slot `slot` of a slab.
#[inline]
fn slot_of<V>(chunks: &[Vec<Slot<V>>], slot: u32) -> Option<&Slot<V>> {
    let i = slot as usize;
    chunks.get(i >> CHUNK_BITS)?.get(i & (CHUNK - 1))
}

impl<K: Hash + Eq, V: Keyed<K>> ClockTable<K, V> {
    pub fn new() -> Self {
        Self {
            index: Index::new(),
            chunks: Vec::new(),
            slots: 0,
            free: Vec::new(),
            hand: 0,
            _key: std::marker::PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len
    }

    #[inline]
    fn slot_mut(&mut self, slot: u32) -> Option<&mut Slot<V>> {
        let i = slot as usize;
        self.chunks
            .get_mut(i >> CHUNK_BITS)?
            .get_mut(i & (CHUNK - 1))
    }

    /// The key's shard, where its entry is in it, and its slot.
    #[inline]
    fn locate(&self, key: &K) -> Option<(usize, usize, u32)> {
        let (s, tag) = Index::split(self.index.hasher.hash_one(key));
        let chunks = &self.chunks;
        let (at, slot) = self.index.shards.get(s)?.find(tag, |slot| {
            slot_of(chunks, slot)
                .and_then(|sl| sl.value.as_ref())
                .is_some_and(|v| v.key() == key)
        })?;
        Some((s, at, slot))
    }

    /// Prefetches the index entry where `key`'s probe starts, so that a lookup of `key` a few
    /// items later finds it in cache. The stage calls it for the key of the item 16 items ahead of
    /// the one it folds in, so the loads overlap with its work: once the keys outgrow the
    /// cache, lookups miss, and the stage's per-item work is too long for the core to reach
    /// the next item's lookup while one is waiting (10 M updates over 1 M keys: 1.4-2.8 s
    /// without, 0.73-0.81 s with).
    #[inline]
    pub fn prefetch(&self, key: &K) {
        let (s, tag) = Index::split(self.index.hasher.hash_one(key));
        if let Some(shard) = self.index.shards.get(s) {
            if let Some(e) = shard.entries.get(shard.home(tag)) {
                prefetch_read(e);
            }
        }
    }

    /// The key's slot, marked used.
    #[cfg(test)]
    #[inline]
    pub fn touch(&mut self, key: &K) -> Option<u32> {
        let (_, _, slot) = self.locate(key)?;
        if let Some(s) = self.slot_mut(slot) {
            s.referenced = true;
        }
        Some(slot)
    }

    /// The key's slot and value, marked used: [`Self::touch`] and [`Self::get_mut`] in one
    /// lookup of the slab (the per-item path).
    #[inline]
    pub fn touch_mut(&mut self, key: &K) -> Option<(u32, &mut V)> {
        let (_, _, slot) = self.locate(key)?;
        let s = self.slot_mut(slot)?;
        s.referenced = true;
        Some((slot, s.value.as_mut()?))
    }

    /// Inserts a value whose key is not in the table, marked used.
    pub fn insert(&mut self, value: V) -> u32 {
        let (s, tag) = Index::split(self.index.hasher.hash_one(value.key()));
        let fresh = Slot {
            value: Some(value),
            referenced: true,
        };
        let slot = match self.free.pop() {
            Some(at) => {
                if let Some(old) = self.slot_mut(at) {
                    *old = fresh;
                }
                at
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
        if let Some(shard) = self.index.shards.get_mut(s) {
            shard.insert(tag, slot);
            self.index.len += 1;
        }
        slot
    }

    /// The key's value, without marking it used.
    pub fn peek_mut(&mut self, key: &K) -> Option<&mut V> {
        let (_, _, slot) = self.locate(key)?;
        self.get_mut(slot)
    }

    #[inline]
    pub fn get_mut(&mut self, slot: u32) -> Option<&mut V> {
        self.slot_mut(slot)?.value.as_mut()
    }

    /// Removes the index entry at `at` of shard `s`.
    fn unindex(&mut self, s: usize, at: usize) {
        if let Some(shard) = self.index.shards.get_mut(s) {
            shard.remove_at(at);
            self.index.len -= 1;
        }
    }

    /// Removes a key.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (s, at, slot) = self.locate(key)?;
        self.unindex(s, at);
        let value = self.slot_mut(slot)?.value.take();
        self.free.push(slot);
        value
    }

    /// Removes the value at `slot`, found in the index by the hash of `key` (the key it was
    /// inserted under) and the slot number, without reading the key in the slot (user code
    /// may have taken it out).
    pub fn remove_slot(&mut self, key: &K, slot: u32) -> Option<V> {
        let hash = self.index.hasher.hash_one(key);
        let value = self.slot_mut(slot)?.value.take()?;
        self.unindex_slot(hash, slot);
        self.free.push(slot);
        Some(value)
    }

    /// Removes the index entry of `slot`, looked for from `hash` first and, should the key
    /// have changed since it was hashed, in every shard.
    fn unindex_slot(&mut self, hash: u64, slot: u32) {
        let (s, tag) = Index::split(hash);
        let found = self
            .index
            .shards
            .get(s)
            .and_then(|sh| sh.find(tag, |other| other == slot))
            .map(|(at, _)| (s, at))
            .or_else(|| {
                self.index.shards.iter().enumerate().find_map(|(s, sh)| {
                    let at = sh
                        .entries
                        .iter()
                        .position(|&e| e != EMPTY && e as u32 == slot)?;
                    Some((s, at))
                })
            });
        if let Some((s, at)) = found {
            self.unindex(s, at);
        }
    }

    /// Removes a value the eviction hand picks: the first occupied slot at or after the hand
    /// that was not used since the hand last passed (bits of used slots are cleared on the
    /// way).
    pub fn evict(&mut self) -> Option<V> {
        if self.index.len == 0 || self.slots == 0 {
            return None;
        }
        // Two full turns always find a victim: the first clears every bit.
        for _ in 0..2 * self.slots {
            if self.hand >= self.slots {
                self.hand = 0;
            }
            let at = self.hand as u32;
            self.hand += 1;
            let Some(slot) = self.slot_mut(at) else {
                continue;
            };
            match slot.value {
                None => continue,
                Some(_) if slot.referenced => {
                    slot.referenced = false;
                    continue;
                }
                Some(_) => {}
            }
            let value = self.slot_mut(at)?.value.take()?;
            self.unindex_slot(self.index.hasher.hash_one(value.key()), at);
            self.free.push(at);
            return Some(value);
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
        let mut old_index = std::mem::replace(&mut self.index, Index::new()).into_shards();
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
        // An 8-byte index entry at a shard's load averaged over its sizes (3/4 at most,
        // halved by each doubling: 1 / load averages 4 / (3 ln 2) = 1.92), the slot's flag
        // and padding, the free list.
        8 * 192 / 100 + 8 + 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Keyed<u32> for (u32, u32) {
        fn key(&self) -> &u32 {
            &self.0
        }
    }

    impl Keyed<u32> for u32 {
        fn key(&self) -> &u32 {
            self
        }
    }

    #[test]
    fn second_chance_eviction() {
        let mut t = ClockTable::new();
        for k in 0..5u32 {
            t.insert((k, k * 10));
        }
        // All were just inserted (referenced): the first sweep clears bits, then 0 goes.
        assert_eq!(t.evict(), Some((0, 0)));
        // 1 is used again: it survives the hand, 2 goes next.
        t.touch(&1);
        assert_eq!(t.evict(), Some((2, 20)));
        assert_eq!(t.len(), 3);
        assert!(t.touch(&2).is_none());
        assert_eq!(t.remove(&3), Some((3, 30)));
        t.insert((7, 70));
        let mut rest: Vec<_> = t.drain().map(|v| v.1).collect();
        rest.sort();
        assert_eq!(rest, vec![10, 40, 70]);
        assert_eq!(t.len(), 0);
        assert_eq!(t.evict(), None);
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
            t.insert(k);
        }
        assert_eq!(t.get_mut(n - 1).copied(), Some(n - 1));
        let mut evicted = Vec::new();
        while t.len() > (n / 2) as usize {
            evicted.push(t.evict().expect("a victim"));
        }
        // Freed slots are reused before the slab grows.
        t.insert(n);
        assert_eq!(t.slots, n as usize);
        let mut all: Vec<u32> = t.drain().chain(evicted).collect();
        all.sort();
        assert_eq!(all, (0..=n).collect::<Vec<_>>());
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn index_agrees_with_a_map_through_inserts_and_removals() {
        // Keys hashing into few shards and long probe runs: removals must keep every later
        // entry of a run reachable (backward shift), across growth.
        let mut t: ClockTable<u32, u32> = ClockTable::new();
        let mut model = std::collections::HashSet::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = (x % 5_000) as u32;
            if model.contains(&k) {
                if step % 3 == 0 {
                    assert_eq!(t.remove(&k), Some(k));
                    model.remove(&k);
                } else {
                    let slot = t.touch(&k).expect("present");
                    assert_eq!(t.get_mut(slot).copied(), Some(k));
                }
            } else {
                assert!(t.touch(&k).is_none());
                t.insert(k);
                model.insert(k);
            }
            if step % 1000 == 0 {
                // Evict a few: the index forgets them too.
                for _ in 0..5 {
                    if let Some(v) = t.evict() {
                        assert!(model.remove(&v));
                    }
                }
            }
            assert_eq!(t.len(), model.len());
        }
        for k in 0..5_000u32 {
            assert_eq!(t.touch(&k).is_some(), model.contains(&k), "key {k}");
        }
        let per_shard: usize = t.index.shards.iter().map(|s| s.len).sum();
        assert_eq!(per_shard, model.len());
    }

    #[test]
    fn touch_mut_finds_the_value_and_spares_it_from_eviction() {
        let mut t: ClockTable<u32, u32> = ClockTable::new();
        for k in 0..4u32 {
            t.insert(k);
        }
        // The hand clears every bit on its first turn and takes key 0.
        assert_eq!(t.evict(), Some(0));
        let (slot, v) = t.touch_mut(&2).expect("resident");
        assert_eq!(*v, 2);
        assert_eq!(t.get_mut(slot).copied(), Some(2));
        assert!(t.touch_mut(&0).is_none());
        // Keys 1 and 3 were not used since the hand passed; 2 was.
        assert_eq!(t.evict(), Some(1));
        assert_eq!(t.evict(), Some(3));
        assert_eq!(t.evict(), Some(2));
        assert!(t.touch_mut(&2).is_none());
    }
}
