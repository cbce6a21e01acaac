//! The state table of one accumulator worker: a hash index into a slab of entries threaded on
//! a recency list, so finding a key, marking it used and finding the coldest key are all O(1)
//! and allocation-free once the slab has grown.

use std::collections::HashMap;
use std::hash::Hash;

const NIL: u32 = u32::MAX;

struct Slot<V> {
    value: Option<V>,
    /// Towards the most recently used end.
    newer: u32,
    /// Towards the least recently used end.
    older: u32,
}

/// Values by key, in recency order.
pub(crate) struct LruTable<K, V> {
    index: HashMap<K, u32>,
    slots: Vec<Slot<V>>,
    free: Vec<u32>,
    newest: u32,
    oldest: u32,
}

impl<K: Hash + Eq + Clone, V> LruTable<K, V> {
    pub fn new() -> Self {
        Self {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            newest: NIL,
            oldest: NIL,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// The key's slot, marked most recently used.
    pub fn touch(&mut self, key: &K) -> Option<u32> {
        let slot = *self.index.get(key)?;
        if slot != self.newest {
            self.unlink(slot);
            self.link_newest(slot);
        }
        Some(slot)
    }

    /// Inserts a key that is not in the table, as most recently used.
    pub fn insert(&mut self, key: K, value: V) -> u32 {
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize].value = Some(value);
                s
            }
            None => {
                self.slots.push(Slot {
                    value: Some(value),
                    newer: NIL,
                    older: NIL,
                });
                (self.slots.len() - 1) as u32
            }
        };
        self.link_newest(slot);
        self.index.insert(key, slot);
        slot
    }

    /// The key's value, without marking it used.
    pub fn peek_mut(&mut self, key: &K) -> Option<&mut V> {
        let slot = *self.index.get(key)?;
        self.get_mut(slot)
    }

    pub fn get_mut(&mut self, slot: u32) -> Option<&mut V> {
        self.slots.get_mut(slot as usize)?.value.as_mut()
    }

    /// Removes a key.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.index.remove(key)?;
        self.unlink(slot);
        self.free.push(slot);
        self.slots[slot as usize].value.take()
    }

    /// The least recently used key's value.
    #[cfg(test)]
    pub fn oldest(&self) -> Option<&V> {
        self.slots.get(self.oldest as usize)?.value.as_ref()
    }

    /// Removes the least recently used entry; `key_of` finds its key in the value.
    pub fn pop_oldest(&mut self, key_of: impl Fn(&V) -> &K) -> Option<V> {
        let slot = self.oldest;
        let key = key_of(self.slots.get(slot as usize)?.value.as_ref()?).clone();
        self.remove(&key)
    }

    /// Every value, least recently used first, emptying the table.
    pub fn drain_oldest_first(&mut self) -> Vec<V> {
        let mut out = Vec::with_capacity(self.len());
        let mut at = self.oldest;
        while at != NIL {
            let slot = &mut self.slots[at as usize];
            at = slot.newer;
            if let Some(v) = slot.value.take() {
                out.push(v);
            }
        }
        self.index.clear();
        self.slots.clear();
        self.free.clear();
        self.newest = NIL;
        self.oldest = NIL;
        out
    }

    fn unlink(&mut self, slot: u32) {
        let (newer, older) = {
            let s = &self.slots[slot as usize];
            (s.newer, s.older)
        };
        match newer {
            NIL => self.newest = older,
            n => self.slots[n as usize].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o as usize].newer = newer,
        }
    }

    fn link_newest(&mut self, slot: u32) {
        let previous = self.newest;
        {
            let s = &mut self.slots[slot as usize];
            s.newer = NIL;
            s.older = previous;
        }
        match previous {
            NIL => self.oldest = slot,
            p => self.slots[p as usize].newer = slot,
        }
        self.newest = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recency_order() {
        let mut t = LruTable::new();
        for k in 0..5u32 {
            t.insert(k, k * 10);
        }
        t.touch(&0);
        t.touch(&2);
        assert_eq!(t.oldest(), Some(&10));
        assert_eq!(t.remove(&1), Some(10));
        assert_eq!(t.oldest(), Some(&30));
        t.insert(7, 70);
        assert_eq!(t.drain_oldest_first(), vec![30, 40, 0, 20, 70]);
        assert_eq!(t.len(), 0);
    }
}
