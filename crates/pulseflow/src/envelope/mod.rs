//! The unit of data: [`Envelope`] wraps one payload with its metadata, [`Batch`] carries many
//! envelopes across an edge at once.
//!
//! An envelope with no headers, attributes or trace context allocates nothing beyond its
//! payload: the optional parts live behind one lazily allocated, shared pointer (copied on
//! write, so cloning or deriving an envelope does not copy its headers, and a stage can give
//! many outputs the same headers without allocating them for each).
//!
//! ```
//! use pulseflow::envelope::{Envelope, TraceContext};
//!
//! let mut env = Envelope::new(42u64).with_seq(7);
//! assert!(env.headers().is_none());
//! env.set_header("tenant", "acme");
//! env.set_trace(TraceContext::new([1; 16], [2; 8], 1));
//! let doubled = env.map(|x| x * 2);
//! assert_eq!(doubled.payload, 84);
//! assert_eq!(doubled.seq, 7);
//! assert_eq!(doubled.header("tenant"), Some("acme"));
//! ```

mod batch;
mod trace;

pub use batch::Batch;
pub use trace::TraceContext;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::ack::Ack;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Timestamp = i64;

/// The current wall-clock time as a [`Timestamp`].
///
/// The engine reads it once per batch, never per item.
pub fn now_millis() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Timestamp)
        .unwrap_or(0)
}

/// What an item costs to hold and to process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    /// Approximate size in bytes, used by batch accounting and memory budgets.
    pub bytes: u32,
    /// Relative CPU weight; `0.0` when unknown.
    pub cpu_hint: f32,
}

/// A value attached to an envelope under a name.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
}

/// The rarely used parts of an envelope, allocated only when one of them is set.
#[derive(Debug, Clone, Default, PartialEq)]
struct Extras {
    trace: Option<TraceContext>,
    headers: BTreeMap<String, String>,
    attrs: BTreeMap<String, AttrValue>,
    /// The acknowledgements of the source items this one derives from.
    acks: Vec<Ack>,
}

/// One payload travelling through a pipeline, with its sequence number, timestamp and cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<T> {
    /// The data itself.
    pub payload: T,
    /// Position in the source's output; kept by transforms, so it identifies an item in errors.
    pub seq: u64,
    /// When the item entered the pipeline, in milliseconds since the Unix epoch.
    pub timestamp: Timestamp,
    /// Size and CPU weight.
    pub cost: Cost,
    extras: ExtrasCell,
}

/// Where an envelope keeps its [`Extras`]: nothing for most items.
///
/// Dropping it is out of line and takes the `Arc` by value: `Arc`'s own drop takes the
/// address of the field, and an envelope whose field has an address is kept in memory, so
/// every item moved out of a batch was copied to the stack and read back field by field (a
/// 16-byte store read back as two 8-byte loads stalls store-to-load forwarding).
#[derive(Debug, Clone, Default, PartialEq)]
struct ExtrasCell(Option<Arc<Extras>>);

impl Drop for ExtrasCell {
    #[inline]
    fn drop(&mut self) {
        if let Some(extras) = self.0.take() {
            release(extras);
        }
    }
}

/// Drops a reference to an envelope's extras (out of line: see [`ExtrasCell`]).
#[cold]
#[inline(never)]
fn release(extras: Arc<Extras>) {
    drop(extras);
}

impl<T> Envelope<T> {
    /// Wraps a payload with sequence number 0, timestamp 0 and the payload's in-memory size as
    /// its cost.
    pub fn new(payload: T) -> Self {
        Self {
            payload,
            seq: 0,
            timestamp: 0,
            cost: Cost {
                bytes: std::mem::size_of::<T>() as u32,
                cpu_hint: 0.0,
            },
            extras: ExtrasCell(None),
        }
    }

    /// Sets the sequence number.
    pub fn with_seq(mut self, seq: u64) -> Self {
        self.seq = seq;
        self
    }

    /// Sets the timestamp.
    pub fn with_timestamp(mut self, timestamp: Timestamp) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// Sets the cost.
    pub fn with_cost(mut self, cost: Cost) -> Self {
        self.cost = cost;
        self
    }

    /// Replaces the payload, keeping sequence number, timestamp, cost, headers, attributes and
    /// trace context.
    #[inline]
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Envelope<U> {
        Envelope {
            payload: f(self.payload),
            seq: self.seq,
            timestamp: self.timestamp,
            cost: self.cost,
            extras: self.extras,
        }
    }

    /// Builds an envelope for `payload` that carries this envelope's metadata (a copy of it).
    pub fn derive<U>(&self, payload: U) -> Envelope<U> {
        Envelope {
            payload,
            seq: self.seq,
            timestamp: self.timestamp,
            cost: self.cost,
            extras: self.extras.clone(),
        }
    }

    /// Splits the envelope into its payload and an envelope of `()` holding the metadata.
    pub fn into_parts(self) -> (T, Envelope<()>) {
        let meta = Envelope {
            payload: (),
            seq: self.seq,
            timestamp: self.timestamp,
            cost: self.cost,
            extras: self.extras,
        };
        (self.payload, meta)
    }

    fn extras_mut(&mut self) -> &mut Extras {
        Arc::make_mut(self.extras.0.get_or_insert_with(Arc::default))
    }

    /// Gives this envelope the headers, attributes and trace context of `other` (replacing
    /// its own), shared: no allocation, whatever they hold. Setting one afterwards copies
    /// them first.
    pub(crate) fn share_extras<U>(&mut self, other: &Envelope<U>) {
        self.extras.clone_from(&other.extras);
    }

    /// The trace context, if the item is traced.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.extras.0.as_ref().and_then(|e| e.trace.as_ref())
    }

    /// Attaches a W3C trace context.
    pub fn set_trace(&mut self, trace: TraceContext) {
        self.extras_mut().trace = Some(trace);
    }

    /// All headers, or `None` when the envelope has none allocated.
    pub fn headers(&self) -> Option<&BTreeMap<String, String>> {
        self.extras
            .0
            .as_ref()
            .map(|e| &e.headers)
            .filter(|h| !h.is_empty())
    }

    /// One header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.extras
            .0
            .as_ref()
            .and_then(|e| e.headers.get(name))
            .map(String::as_str)
    }

    /// Sets a header, allocating the extras on first use.
    pub fn set_header(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.extras_mut().headers.insert(name.into(), value.into());
    }

    /// One attribute's value.
    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.extras.0.as_ref().and_then(|e| e.attrs.get(name))
    }

    /// Sets an attribute, allocating the extras on first use.
    pub fn set_attr(&mut self, name: impl Into<String>, value: AttrValue) {
        self.extras_mut().attrs.insert(name.into(), value);
    }

    /// Attaches an acknowledgement (see [`crate::ack`]): it resolves once this item and every
    /// item derived from it are handled.
    pub fn with_ack(mut self, ack: Ack) -> Self {
        self.add_ack(ack);
        self
    }

    /// Attaches an acknowledgement, besides those it has.
    pub fn add_ack(&mut self, ack: Ack) {
        self.extras_mut().acks.push(ack);
    }

    /// The acknowledgements the item carries, if any.
    #[inline]
    pub fn acks(&self) -> Option<&[Ack]> {
        self.extras
            .0
            .as_ref()
            .map(|e| e.acks.as_slice())
            .filter(|a| !a.is_empty())
    }

    /// Takes the item's acknowledgements out (an accumulator keeps them with the key's state
    /// until its output leaves).
    pub(crate) fn take_acks(&mut self) -> Vec<Ack> {
        if self.acks().is_none() {
            return Vec::new();
        }
        std::mem::take(&mut self.extras_mut().acks)
    }

    /// Gives the item these acknowledgements, besides those it has.
    pub(crate) fn extend_acks(&mut self, acks: Vec<Ack>) {
        if !acks.is_empty() {
            self.extras_mut().acks.extend(acks);
        }
    }

    /// Whether headers, attributes or a trace context were ever allocated.
    pub fn has_extras(&self) -> bool {
        self.extras.0.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_envelope_is_payload_plus_fixed_metadata() {
        // seq + timestamp + cost + one pointer: no hidden maps or strings.
        assert_eq!(std::mem::size_of::<Envelope<u64>>(), 8 + 8 + 8 + 8 + 8);
        let env = Envelope::new(1u64);
        assert!(!env.has_extras());
        assert!(env.headers().is_none());
        assert!(env.trace().is_none());
    }

    #[test]
    fn extras_survive_map_and_derive() {
        let mut env = Envelope::new("a").with_seq(3).with_timestamp(99);
        env.set_attr("n", AttrValue::Int(5));
        env.set_header("k", "v");
        let derived = env.derive(1u8);
        let mapped = env.map(str::len);
        for e in [&mapped.derive(()), &derived.derive(())] {
            assert_eq!(e.seq, 3);
            assert_eq!(e.timestamp, 99);
            assert_eq!(e.header("k"), Some("v"));
            assert_eq!(e.attr("n"), Some(&AttrValue::Int(5)));
        }
    }

    #[test]
    fn shared_extras_are_copied_on_write() {
        let mut template = Envelope::new(());
        template.set_header("k", "v");
        let mut a = Envelope::new(1u8);
        let mut b = Envelope::new(2u8);
        a.share_extras(&template);
        b.share_extras(&template);
        b.set_header("k", "w");
        assert_eq!(a.header("k"), Some("v"));
        assert_eq!(b.header("k"), Some("w"));
        assert_eq!(template.header("k"), Some("v"));
        a.share_extras(&Envelope::new(()));
        assert!(!a.has_extras());
    }

    #[test]
    fn dropping_envelopes_releases_their_shared_extras() {
        let mut template = Envelope::new(());
        template.set_header("k", "v");
        let shared = |e: &Envelope<()>| e.extras.0.as_ref().map_or(0, Arc::strong_count);
        let copies: Vec<Envelope<u64>> = (0..3).map(|i| template.derive(i)).collect();
        assert_eq!(shared(&template), 4);
        let mapped: Vec<Envelope<u64>> = copies.into_iter().map(|e| e.map(|x| x + 1)).collect();
        assert_eq!(
            shared(&template),
            4,
            "moving an envelope moves its reference"
        );
        drop(mapped);
        assert_eq!(shared(&template), 1);
        let (_, meta) = template.derive(7u8).into_parts();
        assert_eq!(shared(&template), 2);
        drop(meta);
        assert_eq!(shared(&template), 1);
        assert_eq!(template.header("k"), Some("v"));
    }
}
