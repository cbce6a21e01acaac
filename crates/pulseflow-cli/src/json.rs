//! Items travel as jq values (`jaq_json::Val`) from the decoding stage to the sinks, so jq
//! stages run on them without conversion. This module reads them from JSON text and writes
//! them back as JSON.
//!
//! Reading goes through serde_json's parser (straight into jq values, no intermediate
//! `serde_json::Value`): the same text is accepted or refused, with the same error messages,
//! and numbers are read as serde_json reads them. Writing prints what serde_json would print
//! for the value converted to a `serde_json::Value` ([`crate::jq::from_val`]): object keys
//! sorted, numbers in serde_json's form (`17.0`, `1e20`), non-finite numbers as `null`,
//! invalid UTF-8 replaced. Only the conversion is skipped: the usual values are laid out
//! directly, each string and number written by serde_json's serializer.
//!
//! Objects are the costly part of a jq value (a shared map, a hash table, a key per entry),
//! so their maps are reused on the thread that drops them: the stages that drop an object
//! right after reading it hand it to [`recycle`], and an object built later on that thread
//! with the same keys in the same order (a projected line, a direct jq object construction)
//! takes its map over, values emptied ([`pooled`]), without allocating, hashing or freeing
//! a key.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::OnceLock;

use bytes::Bytes;
use jaq_json::{Map, Num, Val};
use parking_lot::Mutex;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// Parses one JSON text into a jq value.
pub fn parse(text: &str) -> Result<Val, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = ValSeed { depth: 0 }.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Parses one JSON text into a jq value keeping, when it is an object, only the entries whose
/// keys are in `fields`: the others are checked as JSON and skipped without being built (see
/// [`crate::build`]'s projection). Any other text parses as with [`parse`].
pub fn parse_projected(text: &str, fields: &[Bytes]) -> Result<Val, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Projected { fields }.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// A top-level object reduced to some of its keys; everything else as [`ValSeed`] reads it.
#[derive(Clone, Copy)]
struct Projected<'f> {
    fields: &'f [Bytes],
}

/// An object key: `Some(i)` when it is `fields[i]`.
#[derive(Clone, Copy)]
struct WantedKey<'f> {
    fields: &'f [Bytes],
}

impl<'de> DeserializeSeed<'de> for WantedKey<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for WantedKey<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, s: &str) -> Result<Option<usize>, E> {
        let s = s.as_bytes();
        // Keys are short: most differ in length or first byte, without a call to `memcmp`.
        Ok(self
            .fields
            .iter()
            .position(|f| f.len() == s.len() && f.first() == s.first() && f[..] == *s))
    }
}

impl<'de> DeserializeSeed<'de> for Projected<'_> {
    type Value = Val;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Val, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Projected<'_> {
    type Value = Val;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Val, E> {
        TOP.visit_bool(b)
    }

    fn visit_i64<E: serde::de::Error>(self, i: i64) -> Result<Val, E> {
        TOP.visit_i64(i)
    }

    fn visit_u64<E: serde::de::Error>(self, u: u64) -> Result<Val, E> {
        TOP.visit_u64(u)
    }

    fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<Val, E> {
        TOP.visit_f64(f)
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Val, E> {
        TOP.visit_str(s)
    }

    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Val, E> {
        TOP.visit_string(s)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Val, E> {
        TOP.visit_unit()
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Val, E> {
        TOP.visit_none()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Val, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Val, A::Error> {
        TOP.visit_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Val, A::Error> {
        let inner = ValSeed { depth: 1 };
        let mut kept = Kept::default();
        let key = WantedKey {
            fields: self.fields,
        };
        loop {
            match entries.next_key_seed(key)? {
                None => break,
                Some(Some(i)) => {
                    let v = entries.next_value_seed(inner)?;
                    kept.push(self.fields, i, v);
                }
                Some(None) => {
                    entries.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(kept.into_val(self.fields))
    }
}

/// Wanted entries of a projected object at most held before its map is built.
const KEPT_MAX: usize = 8;

/// The wanted entries of a projected object as read (the index of their key in the fields,
/// their value), turned into its map at the end: by copying the map of an earlier object that
/// had the same keys in the same order (its hash table included, so no key is hashed) when
/// there is one, by inserting them otherwise.
#[derive(Default)]
struct Kept {
    entries: [Option<(usize, Val)>; KEPT_MAX],
    len: usize,
    /// The map, once more entries came than are held.
    map: Option<Map>,
}

thread_local! {
    /// The keys of the last projected object whose map was built by inserting, with `null`
    /// values: the objects of a file mostly have the same keys in the same order.
    static SHAPE: RefCell<Map> = RefCell::new(Map::default());
}

/// The key `fields[i]`, interned.
fn field_key(fields: &[Bytes], i: usize) -> Val {
    let bytes = fields.get(i).map_or(&[][..], |f| &f[..]);
    Val::utf8_str(match interned(bytes) {
        Some(k) => Bytes::from_static(k),
        None => Bytes::copy_from_slice(bytes),
    })
}

impl Kept {
    fn push(&mut self, fields: &[Bytes], i: usize, v: Val) {
        if let Some(map) = &mut self.map {
            map.insert(field_key(fields, i), v);
        } else if let Some(free) = self.entries.get_mut(self.len) {
            *free = Some((i, v));
            self.len += 1;
        } else {
            let mut map = self.insert_all(fields);
            map.insert(field_key(fields, i), v);
            self.map = Some(map);
        }
    }

    /// The held entries, inserted in order (the later of two equal keys wins).
    fn insert_all(&mut self, fields: &[Bytes]) -> Map {
        let mut map = Map::with_capacity_and_hasher(fields.len(), Default::default());
        for (i, v) in self.entries.iter_mut().filter_map(Option::take) {
            map.insert(field_key(fields, i), v);
        }
        map
    }

    /// Whether `map` has the keys of the held entries, in their order.
    fn same_keys(&self, map: &Map, fields: &[Bytes]) -> bool {
        let held = &self.entries[..self.len];
        map.len() == held.len()
            && map.keys().zip(held).all(|(k, e)| match (k, e) {
                (Val::TStr(k), Some((i, _))) => fields.get(*i).is_some_and(|f| {
                    // The fields are interned keys (see `build::projection`), as are the
                    // keys of maps built here.
                    (f.as_ptr() == k.as_ptr() && f.len() == k.len()) || f[..] == k[..]
                }),
                _ => false,
            })
    }

    /// Gives `map` (whose keys are those of the held entries, in order) their values.
    fn fill(&mut self, map: &mut Map) {
        // Distinct keys in the order of `map`: entry `n` is at index `n`.
        for (n, (_, v)) in self.entries.iter_mut().filter_map(Option::take).enumerate() {
            if let Some((_, slot)) = map.get_index_mut(n) {
                *slot = v;
            }
        }
    }

    fn into_val(mut self, fields: &[Bytes]) -> Val {
        if let Some(map) = self.map.take() {
            return Val::obj(map);
        }
        // A map given back by `recycle`, when it has these keys (the objects of a file mostly
        // have the same keys in the same order).
        if let Some(mut pooled) = pooled(|m| self.same_keys(m, fields)) {
            if let Some(map) = jaq_json::Rc::get_mut(&mut pooled) {
                self.fill(map);
                return Val::Obj(pooled);
            }
        }
        let copied = SHAPE.with(|shape| {
            let shape = shape.try_borrow().ok()?;
            self.same_keys(&shape, fields).then(|| shape.clone())
        });
        if let Some(mut map) = copied {
            self.fill(&mut map);
            return Val::obj(map);
        }
        let map = self.insert_all(fields);
        SHAPE.with(|shape| {
            if let Ok(mut shape) = shape.try_borrow_mut() {
                shape.clone_from(&map);
                shape.values_mut().for_each(|v| *v = Val::Null);
            }
        });
        Val::obj(map)
    }
}

/// Shapes (key sequences) of maps kept for reuse per thread, at most.
const SHELVES: usize = 4;

/// Maps of one shape kept for reuse per thread, at most.
const SHELF_MAX: usize = 64;

/// Maps of one shape kept for reuse.
struct Shelf {
    /// The keys, values `null`.
    shape: Map,
    /// Maps nothing else holds.
    maps: Vec<jaq_json::Rc<Map>>,
}

thread_local! {
    /// Maps of objects that were dropped, their values emptied, by shape (see [`recycle`]);
    /// the shape seen last is at the end.
    static POOL: RefCell<Vec<Shelf>> = const { RefCell::new(Vec::new()) };
}

/// Whether two maps have the same keys in the same order.
fn same_shape(a: &Map, b: &Map) -> bool {
    a.len() == b.len() && a.keys().zip(b.keys()).all(|(x, y)| same_key(x, y))
}

/// Drops `value`. When it is an object that nothing else holds, with at most as many entries
/// as a projected object is built from on the stack, its map (its allocation, keys and hash
/// table) is kept on this thread, values emptied, for the next object built here with the
/// same keys in the same order ([`pooled`]): nothing is then allocated, hashed or freed for
/// its keys. For the stages that drop objects right after reading them: a `map` evaluated
/// directly, a `filter` refusing an item, the encoding in front of a sink.
pub fn recycle(value: Val) {
    let Val::Obj(mut o) = value else { return };
    let Some(map) = jaq_json::Rc::get_mut(&mut o) else {
        return;
    };
    if map.is_empty() || map.len() > KEPT_MAX {
        return;
    }
    map.values_mut().for_each(|v| *v = Val::Null);
    POOL.with(|pool| {
        let Ok(mut pool) = pool.try_borrow_mut() else {
            return;
        };
        match pool.iter_mut().rev().find(|s| same_shape(&s.shape, &o)) {
            Some(shelf) => {
                if shelf.maps.len() < SHELF_MAX {
                    shelf.maps.push(o);
                }
            }
            None => {
                // A new shape takes the place of the one that came first.
                if pool.len() >= SHELVES {
                    pool.remove(0);
                }
                let shape = (*o).clone();
                pool.push(Shelf {
                    shape,
                    maps: vec![o],
                });
            }
        }
    });
}

/// A map given back by [`recycle`] on this thread, that nothing else holds (values all
/// `null`), for which `fits` holds, when one of the shapes kept has it.
pub fn pooled(fits: impl Fn(&Map) -> bool) -> Option<jaq_json::Rc<Map>> {
    POOL.with(|pool| {
        let mut pool = pool.try_borrow_mut().ok()?;
        let shelf = pool.iter_mut().rev().find(|s| fits(&s.shape))?;
        shelf.maps.pop()
    })
}

/// Whether two object keys are the same: the same interned text, or equal values.
fn same_key(a: &Val, b: &Val) -> bool {
    match (a, b) {
        (Val::TStr(x), Val::TStr(y)) => {
            (x.as_ptr() == y.as_ptr() && x.len() == y.len()) || x[..] == y[..]
        }
        _ => a == b,
    }
}

/// How a top-level value is read.
const TOP: ValSeed = ValSeed { depth: 0 };

/// Object keys up to this many bytes are interned.
const INTERN_MAX_KEY: usize = 64;

/// Bytes of interned keys at most, for the whole process: keys are leaked once and shared by
/// every object that has them, so a file of ever-new keys costs at most this much.
const INTERN_BUDGET: usize = 1 << 20;

type KeySet = HashSet<&'static [u8], foldhash::fast::RandomState>;

/// Every interned key, and their total size.
static INTERNED: OnceLock<Mutex<(KeySet, usize)>> = OnceLock::new();

thread_local! {
    /// This thread's view of [`INTERNED`] (only keys found there), and whether the budget
    /// was found spent (then keys missing here are copied without asking).
    static LOCAL_KEYS: RefCell<(KeySet, bool)> = RefCell::new(Default::default());
}

/// The key `s` of a parsed object as shared, never freed bytes when it is short and the
/// budget allows: most files repeat a few keys on every line, and a key that is interned
/// costs no allocation (and no free) per object, and compares by address first.
pub fn intern(s: &str) -> Bytes {
    match interned(s.as_bytes()) {
        Some(k) => Bytes::from_static(k),
        None => Bytes::copy_from_slice(s.as_bytes()),
    }
}

/// The interned copy of `s`, `None` when it is too long or the budget is spent.
fn interned(s: &[u8]) -> Option<&'static [u8]> {
    if s.len() > INTERN_MAX_KEY {
        return None;
    }
    LOCAL_KEYS.with(|local| {
        let Ok(mut local) = local.try_borrow_mut() else {
            return None;
        };
        if let Some(k) = local.0.get(s) {
            return Some(*k);
        }
        if local.1 {
            return None;
        }
        let mut global = INTERNED.get_or_init(Default::default).lock();
        let k = match global.0.get(s) {
            Some(k) => *k,
            None => {
                if global.1 + s.len() > INTERN_BUDGET {
                    local.1 = true;
                    return None;
                }
                let k: &'static [u8] = Box::leak(s.to_vec().into_boxed_slice());
                global.0.insert(k);
                global.1 += k.len();
                k
            }
        };
        drop(global);
        local.0.insert(k);
        Some(k)
    })
}

/// Objects nested this deep, and keys this far into an object, have a slot in [`RECENT`].
const RECENT_DEPTH: usize = 4;
const RECENT_POSITIONS: usize = 16;

thread_local! {
    /// The interned key last read at each (depth, position) of an object: lines of a file
    /// mostly repeat their keys in the same order, and comparing with the key read there last
    /// time is cheaper than hashing it.
    static RECENT: [Cell<&'static [u8]>; RECENT_DEPTH * RECENT_POSITIONS] =
        const { [const { Cell::new(&[]) }; RECENT_DEPTH * RECENT_POSITIONS] };
}

/// [`intern`], first trying the key last read at the same place in an object (`slot`).
fn intern_at(slot: Option<usize>, s: &str) -> Bytes {
    let Some(slot) = slot else {
        return intern(s);
    };
    let recent = RECENT.with(|r| r.get(slot).map(Cell::get));
    if let Some(k) = recent.filter(|k| *k == s.as_bytes() && !k.is_empty()) {
        return Bytes::from_static(k);
    }
    match interned(s.as_bytes()) {
        Some(k) => {
            RECENT.with(|r| {
                if let Some(c) = r.get(slot) {
                    c.set(k);
                }
            });
            Bytes::from_static(k)
        }
        None => Bytes::copy_from_slice(s.as_bytes()),
    }
}

/// Reads an object key (always a string in JSON), interned; `slot` is its place for
/// [`RECENT`].
#[derive(Clone, Copy)]
struct KeySeed {
    slot: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Val;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Val, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Val;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_str<E>(self, s: &str) -> Result<Val, E> {
        Ok(Val::utf8_str(intern_at(self.slot, s)))
    }

    fn visit_string<E>(self, s: String) -> Result<Val, E> {
        Ok(Val::utf8_str(intern_at(self.slot, &s)))
    }
}

/// Builds jq values as `jaq_json`'s own `Deserialize` does, with objects allocated for a
/// few keys up front (most have several; growing from empty rehashes at 3 and 7).
#[derive(Clone, Copy)]
struct ValSeed {
    /// How many objects and arrays enclose the value.
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ValSeed {
    type Value = Val;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Val, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValSeed {
    type Value = Val;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Val, E> {
        Ok(Val::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Val, E> {
        Ok(Val::Num(Num::from_integral(i)))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Val, E> {
        Ok(Val::Num(Num::from_integral(u)))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Val, E> {
        Ok(Val::Num(Num::Float(f)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Val, E> {
        Ok(Val::utf8_str(Bytes::copy_from_slice(s.as_bytes())))
    }

    fn visit_string<E>(self, s: String) -> Result<Val, E> {
        Ok(Val::utf8_str(s.into_bytes()))
    }

    fn visit_unit<E>(self) -> Result<Val, E> {
        Ok(Val::Null)
    }

    fn visit_none<E>(self) -> Result<Val, E> {
        Ok(Val::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Val, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Val, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(4));
        let inner = ValSeed {
            depth: self.depth + 1,
        };
        while let Some(v) = seq.next_element_seed(inner)? {
            items.push(v);
        }
        Ok(Val::Arr(items.into()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Val, A::Error> {
        let mut map =
            Map::with_capacity_and_hasher(entries.size_hint().unwrap_or(8), Default::default());
        let inner = ValSeed {
            depth: self.depth + 1,
        };
        let mut position = 0;
        loop {
            let slot = (self.depth < RECENT_DEPTH && position < RECENT_POSITIONS)
                .then_some(self.depth * RECENT_POSITIONS + position);
            position += 1;
            let Some(k) = entries.next_key_seed(KeySeed { slot })? else {
                break;
            };
            let v = entries.next_value_seed(inner)?;
            map.insert(k, v);
        }
        Ok(Val::obj(map))
    }
}

/// Appends `value` as one line of compact JSON to `buf`: the text of [`Json`].
pub fn write_line(buf: &mut Vec<u8>, value: &Val) {
    write_value(buf, value);
    buf.push(b'\n');
}

/// Appends `value` as compact JSON, as [`Json`] writes it. The usual values are laid out here
/// (objects of at most [`SMALL`] text keys, arrays, text, integers, floats), each string and
/// number written by serde_json's serializer; the rest goes through [`Json`].
fn write_value(buf: &mut Vec<u8>, value: &Val) {
    // Writing into a `Vec` cannot fail, and `Json` raises no errors of its own.
    match value {
        Val::Null => buf.extend_from_slice(b"null"),
        Val::Bool(true) => buf.extend_from_slice(b"true"),
        Val::Bool(false) => buf.extend_from_slice(b"false"),
        Val::Num(Num::Int(i)) => {
            let _ = serde_json::Serializer::new(&mut *buf).serialize_i64(*i as i64);
        }
        Val::Num(Num::Float(f)) => {
            let _ = serde_json::Serializer::new(&mut *buf).serialize_f64(*f);
        }
        Val::TStr(b) => match std::str::from_utf8(b) {
            Ok(t) => write_str(buf, t),
            Err(_) => write_json(buf, value),
        },
        Val::Arr(a) => {
            buf.push(b'[');
            for (n, v) in a.iter().enumerate() {
                if n > 0 {
                    buf.push(b',');
                }
                write_value(buf, v);
            }
            buf.push(b']');
        }
        Val::Obj(o) if o.len() <= SMALL => {
            // Keys sorted by their bytes, as in `Json`; distinct valid UTF-8 keys (all text)
            // are sorted on the stack.
            let mut order = [("", &NULL); SMALL];
            for ((k, v), slot) in o.iter().zip(order.iter_mut()) {
                match k {
                    Val::TStr(b) => match std::str::from_utf8(b) {
                        Ok(t) => *slot = (t, v),
                        Err(_) => return write_json(buf, value),
                    },
                    _ => return write_json(buf, value),
                }
            }
            let order = &mut order[..o.len()];
            order.sort_unstable_by(|a, b| a.0.cmp(b.0));
            buf.push(b'{');
            for (n, (k, v)) in order.iter().enumerate() {
                if n > 0 {
                    buf.push(b',');
                }
                write_str(buf, k);
                buf.push(b':');
                write_value(buf, v);
            }
            buf.push(b'}');
        }
        _ => write_json(buf, value),
    }
}

static NULL: Val = Val::Null;

/// Appends `text` as a JSON string, escaped by serde_json.
fn write_str(buf: &mut Vec<u8>, text: &str) {
    let _ = serde_json::Serializer::new(&mut *buf).serialize_str(text);
}

/// Appends `value` through [`Json`].
fn write_json(buf: &mut Vec<u8>, value: &Val) {
    let _ = serde_json::to_writer(&mut *buf, &Json(value));
}

/// Objects with at most this many keys are sorted without allocating.
const SMALL: usize = 16;

/// A jq value serialised as serde_json would serialise its `serde_json::Value` form.
pub struct Json<'a>(pub &'a Val);

/// `bytes` as text, invalid UTF-8 replaced (borrowed when valid: the check is cheaper than
/// `from_utf8_lossy`'s).
fn text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// An object key as `from_val` turns it into a string.
fn key_text(key: &Val) -> Cow<'_, str> {
    match key {
        Val::TStr(b) | Val::BStr(b) => text(b),
        other => Cow::Owned(other.to_string()),
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Val::Null => s.serialize_unit(),
            Val::Bool(b) => s.serialize_bool(*b),
            Val::Num(Num::Int(i)) => s.serialize_i64(*i as i64),
            // serde_json writes non-finite floats as `null`, like `Number::from_f64` did.
            Val::Num(Num::Float(f)) => s.serialize_f64(*f),
            Val::Num(n) => crate::jq::num_to_json(n).serialize(s),
            Val::TStr(b) | Val::BStr(b) => s.serialize_str(&text(b)),
            Val::Arr(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a.iter() {
                    seq.serialize_element(&Json(v))?;
                }
                seq.end()
            }
            Val::Obj(o) => {
                // `serde_json::Map` is a `BTreeMap`: keys sorted by their bytes, the later of
                // two equal keys wins. Objects whose keys are all valid UTF-8 text (and so
                // distinct) are sorted on the stack, their text checked once.
                if o.len() <= SMALL {
                    let mut order = [("", 0usize); SMALL];
                    let mut all_text = true;
                    for ((k, _), slot) in o.iter().zip(order.iter_mut()) {
                        match k {
                            Val::TStr(b) => match std::str::from_utf8(b) {
                                Ok(t) => slot.0 = t,
                                Err(_) => all_text = false,
                            },
                            _ => all_text = false,
                        }
                    }
                    if all_text {
                        let order = &mut order[..o.len()];
                        for (i, slot) in order.iter_mut().enumerate() {
                            slot.1 = i;
                        }
                        // The order of `str`s is their bytes' order.
                        order.sort_unstable_by(|a, b| a.0.cmp(b.0));
                        let mut map = s.serialize_map(Some(o.len()))?;
                        for (k, i) in order.iter() {
                            if let Some((_, v)) = o.get_index(*i) {
                                map.serialize_entry(k, &Json(v))?;
                            }
                        }
                        return map.end();
                    }
                }
                let mut entries: Vec<(Cow<'_, str>, &Val)> =
                    o.iter().map(|(k, v)| (key_text(k), v)).collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                let kept = entries.len() - entries.windows(2).filter(|w| w[0].0 == w[1].0).count();
                let mut map = s.serialize_map(Some(kept))?;
                for (i, (k, v)) in entries.iter().enumerate() {
                    if entries.get(i + 1).is_some_and(|next| next.0 == *k) {
                        continue;
                    }
                    map.serialize_entry(k, &Json(v))?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jq::{from_val, to_val};

    /// What the sinks wrote before items were jq values: parse to `serde_json::Value`, print.
    fn via_value(text: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(text).expect("json");
        serde_json::to_string(&v).expect("print")
    }

    fn direct(text: &str) -> String {
        let mut buf = Vec::new();
        write_line(&mut buf, &parse(text).expect("json"));
        buf.pop();
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn prints_what_serde_json_printed() {
        for text in [
            r#"{"b":1,"a":[1.0,2.5,-0.0,1e20,12345678901234567890],"c":{"z":null,"y":true}}"#,
            r#"{"s":"tab\t quote\" back\\ nl\n \u0001 del\u007f é ☃","e":"","n":-7}"#,
            r#"[3.14159,1E-7,100000000000000000000000,-9223372036854775808,18446744073709551615]"#,
            r#"{"dup":1,"dup":2,"a":0}"#,
            r#""just a string""#,
            r#"{"é":1,"z":2,"Z":3,"a":{"ß":[],"s":{}},"":4}"#,
            "17.0",
            "null",
        ] {
            assert_eq!(direct(text), via_value(text), "{text}");
        }
        // More keys than are sorted on the stack, some repeated.
        let many: Vec<String> = (0..40)
            .rev()
            .map(|i| format!("\"k{}\":{i}", i % 30))
            .collect();
        let text = format!("{{{}}}", many.join(","));
        assert_eq!(direct(&text), via_value(&text));
    }

    #[test]
    fn reads_what_jaq_json_reads() {
        for text in [
            r#"{"b":1,"a":[1.0,2.5,{"x":[]}],"c":{"z":null,"y":true},"u":18446744073709551615}"#,
            r#"{"s":"esc \" \u00e9 \n","n":-9223372036854775808,"f":-0.0,"e":1e-7}"#,
            "[]",
            "{}",
        ] {
            let theirs: Val = serde_json::from_str(text).expect("json");
            assert_eq!(parse(text).expect("json"), theirs, "{text}");
        }
    }

    #[test]
    fn keys_read_at_remembered_places_are_the_keys_of_the_text() {
        let long = "k".repeat(100);
        let lines = [
            r#"{"a":1,"b":{"a":2,"c":[{"a":3}]},"":0}"#.to_owned(),
            r#"{"b":1,"a":{"c":2,"a":[{"b":3}]},"x":0}"#.to_owned(),
            r#"{"a\u00e9":1,"b":2,"a":3}"#.to_owned(),
            format!(r#"{{"{long}":1,"a":2}}"#),
            r#"{"a":1,"b":{"a":2,"c":[{"a":3}]},"":0}"#.to_owned(),
        ];
        for _ in 0..2 {
            for text in &lines {
                let theirs: Val = serde_json::from_str(text).expect("json");
                assert_eq!(parse(text).expect("json"), theirs, "{text}");
            }
        }
    }

    #[test]
    fn projection_keeps_the_wanted_top_level_fields_only() {
        let fields = [Bytes::from_static(b"a"), Bytes::from_static(b"user")];
        let cases = [
            // Unwanted fields are skipped whatever they hold; nested objects stay whole.
            (
                r#"{"x":[1,{"a":2}],"a":{"b":1,"c":[true]},"n":"skip \" me","us\u0065r":"u"}"#,
                r#"{"a":{"b":1,"c":[true]},"user":"u"}"#,
            ),
            // The later of two equal keys wins, as in a full parse.
            (r#"{"a":1,"z":0,"a":2}"#, r#"{"a":2}"#),
            (r#"{"z":1}"#, "{}"),
            // Anything but an object is read whole.
            (r#"[{"z":1},2]"#, r#"[{"z":1},2]"#),
            (r#""text""#, r#""text""#),
            ("17", "17"),
        ];
        for _ in 0..2 {
            for (text, want) in cases {
                let want: Val = serde_json::from_str(want).expect("json");
                assert_eq!(parse_projected(text, &fields).expect(text), want, "{text}");
            }
        }
    }

    /// `text` parsed whole, then reduced to the top-level `fields` (the later of two equal
    /// keys wins, as in a full parse).
    fn reduced(text: &str, fields: &[Bytes]) -> Val {
        match parse(text).expect(text) {
            Val::Obj(o) => Val::obj(
                o.iter()
                    .filter(
                        |(k, _)| matches!(k, Val::TStr(b) if fields.iter().any(|f| f[..] == b[..])),
                    )
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            other => other,
        }
    }

    #[test]
    fn projected_objects_of_changing_shapes_hold_their_own_entries() {
        let fields: Vec<Bytes> = ["id", "user", "amount", "ok", "n", "s", "a", "b", "c", "d"]
            .iter()
            .map(|f| Bytes::copy_from_slice(f.as_bytes()))
            .collect();
        let lines = [
            r#"{"id":1,"user":"u\"1\\","amount":1e3,"ok":true,"note":"x"}"#,
            r#"{"id":2,"user":"\u00e9\ud83d\ude00 é ☃","amount":-0,"ok":false,"note":"y"}"#,
            r#"{"id":18446744073709551615,"user":null,"amount":-9223372036854775808,"ok":1}"#,
            r#"{"id":123456789012345678901234567890,"amount":1.5e-7,"ok":true}"#,
            r#"{"ok":true,"id":3,"user":"reordered","amount":2}"#,
            r#"{"id":4,"user":"dup","amount":1,"ok":true,"id":5}"#,
            r#"{"id":{"nested":[1,{"id":2}],"user":"inner"},"ok":[],"user":{}}"#,
            r#"{"tags":[1,2],"note":"nothing wanted"}"#,
            r#"{}"#,
            r#"{"id":6,"user":"u6","amount":6,"ok":true,"n":1,"s":"s","a":1,"b":2,"c":3,"d":4}"#,
            r#"{"d":4,"c":3,"b":2,"a":1,"s":"s","n":1,"ok":true,"amount":6,"user":"u6","id":6,"a":9}"#,
            r#"{"id":7,"user":"u7","amount":7,"ok":true,"note":"back to the first shape"}"#,
            r#"[{"id":1}]"#,
            r#""id""#,
            "-0.0",
            "null",
        ];
        // Twice, so that each shape also follows itself and every other one.
        for round in 0..2 {
            for text in lines {
                let got = parse_projected(text, &fields).expect(text);
                assert_eq!(got, reduced(text, &fields), "round {round}: {text}");
                let (mut ours, mut full) = (Vec::new(), Vec::new());
                write_line(&mut ours, &got);
                write_line(&mut full, &reduced(text, &fields));
                assert_eq!(ours, full, "{text}");
            }
        }
        // The same keys in the same order as the last object, but other fields wanted.
        let other = [Bytes::from_static(b"id"), Bytes::from_static(b"ok")];
        let text = r#"{"id":1,"ok":true,"user":"u"}"#;
        let _ = parse_projected(r#"{"id":0,"ok":false}"#, &fields).expect("json");
        assert_eq!(
            parse_projected(text, &other).expect(text),
            reduced(text, &other)
        );
        let shifted = [Bytes::from_static(b"ok"), Bytes::from_static(b"id")];
        assert_eq!(
            parse_projected(text, &shifted).expect(text),
            reduced(text, &shifted)
        );
    }

    #[test]
    fn recycled_maps_serve_objects_of_their_shape_only() {
        let fields: Vec<Bytes> = ["id", "user", "ok"].iter().map(|f| intern(f)).collect();
        let lines = [
            r#"{"id":1,"user":"a","ok":true}"#,
            r#"{"id":2,"user":"b","ok":false,"x":0}"#,
            r#"{"user":"c","id":3,"ok":true}"#,
            r#"{"id":4,"ok":true}"#,
            r#"{"id":5,"user":{"id":6,"user":"nested","ok":null},"ok":true}"#,
            r#"{"id":7,"id":8,"user":"dup","ok":true}"#,
            r#"{"ok":1,"user":"d","id":9}"#,
        ];
        let mut kept = Vec::new();
        for round in 0..3 {
            for (n, text) in lines.iter().enumerate() {
                let got = parse_projected(text, &fields).expect(text);
                assert_eq!(got, reduced(text, &fields), "round {round}: {text}");
                // Some are dropped for reuse, some kept (shared: not reused), some dropped.
                match n % 3 {
                    0 => recycle(got),
                    1 => {
                        kept.push((got.clone(), reduced(text, &fields)));
                        recycle(got);
                    }
                    _ => drop(got),
                }
            }
            // Objects built by jq and maps of other shapes are given back too.
            recycle(parse(r#"{"a":1,"b":[1,2],"c":{"d":null}}"#).expect("json"));
            recycle(parse(r#"{"ok":true,"user":"x","id":1,"more":2}"#).expect("json"));
        }
        // What other holders kept is untouched.
        for (held, want) in kept {
            assert_eq!(held, want);
        }
        // A pooled map has `null` values only.
        recycle(parse_projected(lines[0], &fields).expect("json"));
        let any = pooled(|m| m.len() == 3).expect("a map of three keys");
        assert!(any.values().all(|v| *v == Val::Null), "{any:?}");
    }

    #[test]
    fn projection_refuses_what_a_full_parse_refuses() {
        let fields = [Bytes::from_static(b"a")];
        for text in [
            r#"{"a":1,"z":[1,}"#,
            r#"{"z":tru,"a":1}"#,
            r#"{"z":"\q","a":1}"#,
            r#"{"a":1} x"#,
            r#"{"a":1,"z":}"#,
        ] {
            let ours = parse_projected(text, &fields).err().map(|e| e.to_string());
            let full = parse(text).err().map(|e| e.to_string());
            assert!(ours.is_some(), "{text} accepted");
            assert_eq!(ours, full, "{text}");
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        for text in [
            "NaN",
            "{1:2}",
            "[1,]",
            "b\"x\"",
            "1 # comment",
            "{\"a\":1} x",
        ] {
            let ours = parse(text).err().map(|e| e.to_string());
            let theirs = serde_json::from_str::<serde_json::Value>(text)
                .err()
                .map(|e| e.to_string());
            assert!(ours.is_some(), "{text} accepted");
            assert_eq!(ours, theirs, "{text}");
        }
    }

    #[test]
    fn lines_are_the_text_of_json() {
        let bad = || Val::utf8_str(b"a\xffb".to_vec());
        let mut values: Vec<Val> = [
            r#"{"b":1,"a":[1.0,2.5,-0.0,1e20,12345678901234567890,-9223372036854775808],"c":{"z":null,"y":true}}"#,
            r#"{"s":"tab\t quote\" back\\ nl\n \u0001 del\u007f é ☃","e":"","n":-7}"#,
            r#"[[],{},[{}],"x",null,false,3.0e-7,1E+300]"#,
        ]
        .iter()
        .map(|t| parse(t).expect("json"))
        .collect();
        values.push(bad());
        values.push(Val::byte_str(b"bytes".to_vec()));
        values.push(Val::obj(
            [(bad(), Val::Null), (Val::utf8_str(b"k".to_vec()), bad())]
                .into_iter()
                .collect(),
        ));
        values.push(Val::obj(
            [(Val::Num(Num::from_integral(1)), Val::Bool(true))]
                .into_iter()
                .collect(),
        ));
        values.push(Val::Arr(vec![bad(), Val::Num(Num::Float(f64::NAN))].into()));
        let many: Vec<String> = (0..40).map(|i| format!("\"k{}\":{i}", 39 - i)).collect();
        values.push(parse(&format!("{{{}}}", many.join(","))).expect("json"));
        for v in values {
            let mut ours = Vec::new();
            write_line(&mut ours, &v);
            let theirs = serde_json::to_string(&Json(&v)).expect("print") + "\n";
            assert_eq!(String::from_utf8_lossy(&ours), theirs, "{v:?}");
        }
    }

    #[test]
    fn values_built_by_jq_print_as_their_json_form() {
        let program = crate::jq::JqProgram::compile(
            r#"{z: 1.5, a: (.x * 2), m: (.x / 3), big: 100000000000000000000, inf: infinite, k: {"b": 1, "a": [nan]}}"#,
            false,
        )
        .expect("compiles");
        let mut outs = Vec::new();
        program
            .run(&to_val(&serde_json::json!({"x": 4})), |v| outs.push(v))
            .expect("runs");
        let [out] = outs.as_slice() else {
            panic!("one output expected: {outs:?}")
        };
        let mut buf = Vec::new();
        write_line(&mut buf, out);
        let expected = serde_json::to_string(&from_val(out.clone())).expect("print") + "\n";
        assert_eq!(String::from_utf8(buf).expect("utf-8"), expected);
    }
}
