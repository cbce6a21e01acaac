//! The [`Accumulator`] trait and what it works on: [`AccumulatorState`] (one key's state and
//! its bookkeeping) and [`CompletenessResult`] (what a completeness check decides).

use std::fmt::Debug;
use std::hash::Hash;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

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
    type Key: Clone + Eq + Hash + Debug + Send + Serialize + DeserializeOwned + 'static;
    /// The state kept per key.
    type State: Send + Serialize + DeserializeOwned + 'static;

    /// Called once per instance before any item; an error fails the run.
    fn init(&mut self, _ctx: &StageContext) -> Result<(), StageError> {
        Ok(())
    }

    /// The key of an item.
    fn key(&self, item: &Envelope<Self::In>) -> Self::Key;

    /// The state of a key seen for the first time (the seed's "absent state").
    fn create(&mut self, key: &Self::Key) -> Self::State;

    /// Folds one item into its key's state.
    fn update(&mut self, state: &mut Self::State, item: Envelope<Self::In>);

    /// Whether the key is complete, after each update. May set `entry.score`. On `Complete`
    /// the state is dropped afterwards, so the output may take parts of it out.
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

    /// Encodes an entry for spilling, appending to `out`.
    fn encode(
        &self,
        entry: &AccumulatorState<Self::Key, Self::State>,
        out: &mut Vec<u8>,
    ) -> Result<(), SpillError> {
        // Small states (the common case) go through a stack buffer: postcard writes a slice
        // much faster than it extends a vector byte by byte.
        let mut small = [0u8; 256];
        match postcard::to_slice(entry, &mut small) {
            Ok(bytes) => {
                out.extend_from_slice(bytes);
                Ok(())
            }
            Err(postcard::Error::SerializeBufferFull) => {
                let bytes = postcard::to_extend(entry, std::mem::take(out))
                    .map_err(|e| SpillError::Encode(e.to_string()))?;
                *out = bytes;
                Ok(())
            }
            Err(e) => Err(SpillError::Encode(e.to_string())),
        }
    }

    /// Decodes an entry written by [`Accumulator::encode`].
    fn decode(&self, bytes: &[u8]) -> Result<AccumulatorState<Self::Key, Self::State>, String> {
        postcard::from_bytes(bytes).map_err(|e| e.to_string())
    }
}
