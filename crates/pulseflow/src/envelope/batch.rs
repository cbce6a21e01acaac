//! [`Batch`]: what an edge carries.

use super::{Envelope, Timestamp};

/// Envelopes travelling together, with their time window and totals.
///
/// Edges move batches, not single envelopes: one channel operation per batch instead of per
/// item is the largest cost a pipeline can avoid. The window and byte total are derived from
/// the items when asked for, so the hot path never pays for them.
///
/// ```
/// use pulseflow::envelope::{Batch, Envelope};
///
/// let mut batch = Batch::with_capacity(2);
/// batch.push(Envelope::new(1u32).with_timestamp(10));
/// batch.push(Envelope::new(2u32).with_timestamp(12));
/// assert_eq!(batch.total_items(), 2);
/// assert_eq!(batch.total_bytes(), 8);
/// assert_eq!((batch.window_start(), batch.window_end()), (10, 12));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Batch<T> {
    items: Vec<Envelope<T>>,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Self { items: Vec::new() }
    }
}

impl<T> Batch<T> {
    /// An empty batch with room for `capacity` items.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            items: Vec::with_capacity(capacity),
        }
    }

    /// A batch of these envelopes.
    #[inline]
    pub fn from_items(items: Vec<Envelope<T>>) -> Self {
        Self { items }
    }

    /// Appends one envelope.
    #[inline]
    pub fn push(&mut self, item: Envelope<T>) {
        self.items.push(item);
    }

    /// Number of envelopes.
    #[inline]
    pub fn total_items(&self) -> usize {
        self.items.len()
    }

    /// Same as [`Batch::total_items`].
    #[inline]
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch holds no envelope.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sum of the items' byte costs.
    pub fn total_bytes(&self) -> u64 {
        self.items.iter().map(|e| u64::from(e.cost.bytes)).sum()
    }

    /// Earliest item timestamp (0 for an empty batch).
    pub fn window_start(&self) -> Timestamp {
        self.items.iter().map(|e| e.timestamp).min().unwrap_or(0)
    }

    /// Latest item timestamp (0 for an empty batch).
    pub fn window_end(&self) -> Timestamp {
        self.items.iter().map(|e| e.timestamp).max().unwrap_or(0)
    }

    /// The envelopes.
    pub fn items(&self) -> &[Envelope<T>] {
        &self.items
    }

    /// Takes the envelopes out.
    #[inline]
    pub fn into_items(self) -> Vec<Envelope<T>> {
        self.items
    }

    /// Moves the envelopes of `other` to the end of this batch (without copying them when this
    /// batch is empty).
    pub fn append(&mut self, other: Batch<T>) {
        if self.items.is_empty() {
            self.items = other.items;
        } else {
            self.items.extend(other.items);
        }
    }

    /// Removes up to `n` envelopes from the front and returns them as a batch.
    pub fn split_front(&mut self, n: usize) -> Batch<T> {
        let n = n.min(self.items.len());
        let rest = self.items.split_off(n);
        Batch::from_items(std::mem::replace(&mut self.items, rest))
    }

    /// Removes envelopes from position `n` on and returns them as a batch.
    pub fn split_off(&mut self, n: usize) -> Batch<T> {
        let n = n.min(self.items.len());
        Batch::from_items(self.items.split_off(n))
    }
}

impl<T> From<Vec<Envelope<T>>> for Batch<T> {
    fn from(items: Vec<Envelope<T>>) -> Self {
        Self::from_items(items)
    }
}

impl<T> IntoIterator for Batch<T> {
    type Item = Envelope<T>;
    type IntoIter = std::vec::IntoIter<Envelope<T>>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: u64) -> Batch<u64> {
        Batch::from_items(
            (0..n)
                .map(|i| Envelope::new(i).with_timestamp(i as i64))
                .collect(),
        )
    }

    #[test]
    fn splits_keep_totals_consistent() {
        let mut b = batch(10);
        let front = b.split_front(3);
        assert_eq!(front.len(), 3);
        assert_eq!(front.total_bytes(), 24);
        assert_eq!((front.window_start(), front.window_end()), (0, 2));
        assert_eq!(b.len(), 7);
        assert_eq!(b.total_bytes(), 56);
        assert_eq!(b.window_start(), 3);
        let tail = b.split_off(5);
        assert_eq!(tail.len(), 2);
        assert_eq!(b.len(), 5);
        assert_eq!(b.window_end(), 7);
        let mut joined = Batch::default();
        joined.append(b);
        joined.append(tail);
        let seqs: Vec<i64> = joined.items().iter().map(|e| e.timestamp).collect();
        assert_eq!(seqs, (3..10).collect::<Vec<_>>());
    }
}
