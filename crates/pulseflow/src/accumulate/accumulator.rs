//! The [`Accumulator`] trait and what it works on: [`AccumulatorState`] (one key's state and
//! its bookkeeping) and [`CompletenessResult`] (what a completeness check decides).

use std::fmt::Debug;
use std::hash::Hash;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::codec::{Full, SliceWriter, put_varint, zigzag};
use super::spill::SpillError;
use crate::envelope::{Envelope, Timestamp};
use crate::error::StageError;
use crate::stage::StageContext;

/// One key's state with the figures the stage keeps about it.
///
/// The stage fills in everything but `state` (the accumulator's) and `score` (which
/// [`Accumulator::check`] may set to report progress).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccumulatorState<K, S> {
    /// The key.
    pub key: K,
    /// The accumulator's state for the key.
    pub state: S,
    /// Items folded in so far.
    pub items: u64,
    /// Sum of the byte costs of the items folded in.
    pub bytes: u64,
    /// Timestamp of the first item.
    pub first_ts: Timestamp,
    /// Timestamp of the latest item.
    pub last_ts: Timestamp,
    /// Sequence number of the latest item (the emitted envelope carries it).
    pub last_seq: u64,
    /// Completeness in `[0, 1]`, as last reported by the accumulator.
    pub score: f64,
    /// Whether the state was ever written to disk.
    pub spilled: bool,
}

/// What a completeness check decided.
#[derive(Debug, Clone, PartialEq)]
pub enum CompletenessResult<O> {
    /// Keep accumulating.
    Incomplete,
    /// Done: emit this output and clear the key.
    Complete(O),
    /// The key expired by the accumulator's own rule: emit what there is (if anything and if
    /// the policy allows partial flushes) and clear the key.
    Expired(Option<O>),
}

/// Keyed accumulation: the stage extracts a key from each item, folds the item into the key's
/// state and asks whether the key is complete.
///
/// The stage owns the state table; the accumulator only says how to build, update, check and
/// flush one state, and how to encode it for spilling (by default with `postcard`).
///
/// A panic in any of these methods is caught and becomes an error of the item being processed,
/// handled by the stage's [`ErrorPolicy`](crate::policy::ErrorPolicy) (not retried: under
/// `Retry` it is dead-lettered at once). In `key` or `create` the item is still whole and is
/// dead-lettered with its payload. In `update` or `check` the key's state may be half-updated:
/// it is dropped, the item fails and the key's earlier items are absorbed into that failure.
/// In `flush`, `encode` or `decode` the key's state fails as one item (its latest sequence
/// number), the others absorbed. Under `Fail` the run ends with the stage's id.
pub trait Accumulator: Send + 'static {
    /// Input payload.
    type In: Send + 'static;
    /// Output payload.
    type Out: Send + 'static;
    /// The key items are grouped by.
    ///
    /// Keys and states are `Serialize` and `DeserializeOwned` whether or not the stage
    /// spills: spilling is decided at run time, by the policy's `spill` and the run's memory
    /// budget, not by the type, and a bound that depended on it would need a second trait
    /// (and a second stage type) for the same accumulator. For types that never spill, the
    /// derives cost nothing at run time (`#[derive(Serialize, Deserialize)]`).
    type Key: Clone + Eq + Hash + Debug + Send + Serialize + DeserializeOwned + 'static;
    /// The state kept per key (see [`Key`](Accumulator::Key) for why it is serializable).
    type State: Send + Serialize + DeserializeOwned + 'static;

    /// Called once per instance before any item; an error fails the run.
    fn init(&mut self, _ctx: &StageContext) -> Result<(), StageError> {
        Ok(())
    }

    /// The key of an item. It should depend on the item alone: the stage takes keys a few
    /// items ahead of the item it folds in (to start loading their entries early).
    fn key(&self, item: &Envelope<Self::In>) -> Self::Key;

    /// The state of a key seen for the first time (the seed's "absent state").
    fn create(&mut self, key: &Self::Key) -> Self::State;

    /// Folds one item into its key's state.
    fn update(&mut self, state: &mut Self::State, item: Envelope<Self::In>);

    /// Whether the key is complete, after each update. May set `entry.score`. On `Complete`
    /// (or `Expired`) the state is dropped afterwards, so the output may take parts of it out,
    /// the key included. On `Incomplete` a changed `entry.key` is put back.
    fn check(
        &mut self,
        entry: &mut AccumulatorState<Self::Key, Self::State>,
    ) -> CompletenessResult<Self::Out>;

    /// Emits what a key holds when it is flushed before completion (deadline, size limit,
    /// end of input); `None` when there is nothing worth emitting.
    fn flush(&mut self, entry: AccumulatorState<Self::Key, Self::State>) -> Option<Self::Out>;

    /// Bytes a state holds in memory, reserved from the pipeline's memory budget. The default
    /// is the state's inline size; states owning heap data should add it.
    fn state_size(&self, _state: &Self::State) -> usize {
        std::mem::size_of::<Self::State>()
    }

    /// Encodes an entry for spilling, appending to `out` (the spill store's block buffer:
    /// write straight into it, no intermediate buffer). The default writes the entry's
    /// `postcard` encoding in place: key and state through serde with a serializer of
    /// postcard's format that writes each byte where it belongs, the stage's own fields
    /// directly (several times faster than `postcard::to_extend` on the whole struct).
    fn encode(
        &self,
        entry: &AccumulatorState<Self::Key, Self::State>,
        out: &mut Vec<u8>,
    ) -> Result<(), SpillError> {
        encode_entry(entry, out)
    }

    /// Decodes an entry written by [`Accumulator::encode`].
    fn decode(&self, bytes: &[u8]) -> Result<AccumulatorState<Self::Key, Self::State>, String> {
        postcard::from_bytes(bytes).map_err(|e| e.to_string())
    }
}

/// A `postcard` output appending to a vector.
struct Extend<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Extend<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        // Mostly varints postcard just wrote byte by byte into a small buffer: copied byte
        // by byte too (a `memcpy` call reading them wide stalls on store forwarding).
        if data.len() <= 16 {
            for &b in data {
                self.0.push(b);
            }
        } else {
            self.0.extend_from_slice(data);
        }
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    #[inline]
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Bytes the stage's own fields take at most: five varints, an `f64` and a `bool`.
const HEAD_MAX: usize = 5 * 10 + 8 + 1;

/// Room made for a record on the first try: most small states fit; a larger one is retried
/// with more room (each try starts over), up to [`ROOM_MAX`], then goes through `postcard`.
const ROOM_FIRST: usize = 64;
const ROOM_MAX: usize = 64 << 10;

/// The `postcard` encoding of an entry, appended to `out`: the same bytes as
/// `postcard::to_extend(entry, ..)` (a struct is its fields in order).
///
/// Fast path: room is made at the end of `out` and key, state (through serde, with
/// [`SliceWriter`], a serializer of postcard's format) and the stage's own fields are written
/// into it in place, then `out` is cut to length. When the room is too small it is retried
/// with more; when serde reports an error, `postcard` itself encodes the record (and names
/// the error).
#[inline(always)]
pub(crate) fn encode_entry<K: Serialize, S: Serialize>(
    e: &AccumulatorState<K, S>,
    out: &mut Vec<u8>,
) -> Result<(), SpillError> {
    let start = out.len();
    // A constant-size room: a few vector stores, no `memset` call; as an array, so that the
    // writer's bounds checks compare with a constant.
    out.extend_from_slice(&[0; ROOM_FIRST]);
    let room = out
        .get_mut(start..)
        .and_then(|room| room.first_chunk_mut::<ROOM_FIRST>());
    if let Some(Ok(n)) = room.map(|room| write_entry(e, room)) {
        out.truncate(start + n);
        return Ok(());
    }
    encode_entry_large(e, out, start)
}

/// [`encode_entry`] for a record larger than the first room (kept out of line: a retry loop
/// around the fast path makes the compiler precompute every byte of every varint up front).
#[cold]
#[inline(never)]
fn encode_entry_large<K: Serialize, S: Serialize>(
    e: &AccumulatorState<K, S>,
    out: &mut Vec<u8>,
    start: usize,
) -> Result<(), SpillError> {
    let mut room = ROOM_FIRST * 8;
    while room <= ROOM_MAX {
        out.resize(start + room, 0);
        if let Some(Ok(n)) = out.get_mut(start..).map(|buf| write_entry(e, buf)) {
            out.truncate(start + n);
            return Ok(());
        }
        room *= 8;
    }
    out.truncate(start);
    encode_entry_postcard(e, out)
}

/// Key, state and the stage's fields, in the struct's order, into `buf`; the bytes written.
///
/// The stage's fields are written with plain positions, not through the writer: the writer
/// is lent to serde's code (which the compiler may keep out of line, so the writer lives in
/// memory and every byte would wait for its position to be stored and loaded again).
#[inline(always)]
fn write_entry<K: Serialize, S: Serialize>(
    e: &AccumulatorState<K, S>,
    buf: &mut [u8],
) -> Result<usize, Full> {
    let mut w = SliceWriter::new(buf);
    e.key.serialize(&mut w)?;
    e.state.serialize(&mut w)?;
    let start = w.len();
    let end = write_head(e, w.into_rest()).ok_or(Full)?;
    Ok(start + end)
}

/// The stage's own fields of an entry (postcard: five varints, an `f64`, a `bool`) at the
/// start of `buf`; where they end, or `None` without room.
#[inline(always)]
fn write_head<K, S>(e: &AccumulatorState<K, S>, buf: &mut [u8]) -> Option<usize> {
    let mut at = put_varint(buf, 0, e.items)?;
    at = put_varint(buf, at, e.bytes)?;
    at = put_varint(buf, at, zigzag(e.first_ts))?;
    at = put_varint(buf, at, zigzag(e.last_ts))?;
    at = put_varint(buf, at, e.last_seq)?;
    let tail = buf.get_mut(at..at + 9)?;
    tail[..8].copy_from_slice(&e.score.to_bits().to_le_bytes());
    tail[8] = u8::from(e.spilled);
    Some(at + 9)
}

/// The slow path of [`encode_entry`]: key and state through `postcard`, the stage's fields
/// by hand into room made at the end of `out`.
fn encode_entry_postcard<K: Serialize, S: Serialize>(
    e: &AccumulatorState<K, S>,
    out: &mut Vec<u8>,
) -> Result<(), SpillError> {
    postcard::serialize_with_flavor(&(&e.key, &e.state), Extend(out))
        .map_err(|err| SpillError::Encode(err.to_string()))?;
    let start = out.len();
    out.resize(start + HEAD_MAX, 0);
    let end = out
        .get_mut(start..)
        .and_then(|head| write_head(e, head))
        .ok_or_else(|| SpillError::Encode("encode buffer".into()))?;
    out.truncate(start + end);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_encoding_is_postcard() {
        let entries = [
            AccumulatorState {
                key: 7u32,
                state: (3u64, 1u64 << 40),
                items: 3,
                bytes: (1 << 55) + 300,
                first_ts: -5,
                last_ts: i64::MAX,
                last_seq: u64::MAX,
                score: 0.25,
                spilled: true,
            },
            AccumulatorState {
                key: 0,
                state: (0, 0),
                items: 0,
                bytes: 0,
                first_ts: i64::MIN,
                last_ts: 0,
                last_seq: (1 << 56) + 3,
                score: -1.5,
                spilled: false,
            },
        ];
        for e in entries {
            check(e);
        }
        // A state larger than all the room the fast path tries: encoded by postcard.
        check(large(1u8, vec![u64::MAX; 7000]));
        // A state larger than the room made up front.
        check(large("k".repeat(300), vec![7u64 << 30; 100]));
    }

    fn large<K, S>(key: K, state: S) -> AccumulatorState<K, S> {
        AccumulatorState {
            key,
            state,
            items: 1,
            bytes: 2,
            first_ts: 3,
            last_ts: 4,
            last_seq: 5,
            score: 1.0,
            spilled: false,
        }
    }

    fn check<K, S>(e: AccumulatorState<K, S>)
    where
        K: Serialize + DeserializeOwned + PartialEq + Debug,
        S: Serialize + DeserializeOwned + PartialEq + Debug,
    {
        let expected = postcard::to_allocvec(&e).expect("postcard");
        for slow in [false, true] {
            let mut out = vec![42];
            if slow {
                encode_entry_postcard(&e, &mut out).expect("encode");
            } else {
                encode_entry(&e, &mut out).expect("encode");
            }
            assert_eq!(out[1..], expected[..], "slow path: {slow}");
            let back: AccumulatorState<K, S> = postcard::from_bytes(&out[1..]).expect("decode");
            assert_eq!(back, e);
        }
    }
}
