//! A serde serializer that writes `postcard`'s wire format straight into a byte slice: the
//! spill path's fast way to encode keys and states.
//!
//! `postcard`'s own serializer builds every varint in a small buffer and hands it to its
//! output ("flavor") as a slice; appending those to a `Vec` costs a capacity check per byte
//! (or a `memcpy` call that stalls on the bytes just stored). [`SliceWriter`] writes each byte
//! once, where it belongs, in room the caller made. The format is `postcard` 1.x's, byte for
//! byte (tested against `postcard::to_allocvec`), so records are read back with
//! `postcard::from_bytes`. When the room is too small, or serde reports an error, the writer
//! returns [`Full`] and the caller falls back to `postcard` itself (which also gives the real
//! error message).
//!
//! The wire format: `u8`/`i8`/`bool` one byte; other integers LEB128 varints (signed ones
//! zigzagged first); floats little-endian; strings and byte strings a varint length and the
//! bytes; `None` 0, `Some(v)` 1 and `v`; enum variants a varint index and the content;
//! sequences and maps a varint length and the elements; unit, structs and tuples nothing but
//! their fields.

use serde::Serialize;
use serde::ser;

/// The writer ran out of room, or serde reported an error: fall back to `postcard`.
#[derive(Debug)]
pub(crate) struct Full;

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no room left for the encoding")
    }
}

impl std::error::Error for Full {}

impl ser::Error for Full {
    fn custom<T: std::fmt::Display>(_msg: T) -> Self {
        Full
    }
}

/// Writes `postcard`'s encoding into a slice, from its start.
pub(crate) struct SliceWriter<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> SliceWriter<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, at: 0 }
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> usize {
        self.at
    }

    /// The room not written yet.
    pub(crate) fn into_rest(self) -> &'a mut [u8] {
        let at = self.at;
        self.buf.get_mut(at..).unwrap_or_default()
    }

    #[inline(always)]
    pub(crate) fn byte(&mut self, b: u8) -> Result<(), Full> {
        *self.buf.get_mut(self.at).ok_or(Full)? = b;
        self.at += 1;
        Ok(())
    }

    /// `n` as a LEB128 varint.
    #[inline(always)]
    pub(crate) fn varint(&mut self, n: u64) -> Result<(), Full> {
        match put_varint(self.buf, self.at, n) {
            Some(end) => {
                self.at = end;
                Ok(())
            }
            None => self.varint_near_end(n),
        }
    }

    /// [`SliceWriter::varint`] with fewer than ten bytes of room left.
    #[cold]
    fn varint_near_end(&mut self, n: u64) -> Result<(), Full> {
        self.varint128(u128::from(n))
    }

    /// Any number as a LEB128 varint, byte by byte.
    #[inline]
    fn varint128(&mut self, mut n: u128) -> Result<(), Full> {
        while n >= 0x80 {
            self.byte((n as u8) | 0x80)?;
            n >>= 7;
        }
        self.byte(n as u8)
    }

    #[inline(always)]
    pub(crate) fn bytes(&mut self, b: &[u8]) -> Result<(), Full> {
        let end = self.at.checked_add(b.len()).ok_or(Full)?;
        self.buf
            .get_mut(self.at..end)
            .ok_or(Full)?
            .copy_from_slice(b);
        self.at = end;
        Ok(())
    }

    #[inline(always)]
    fn len_prefixed(&mut self, b: &[u8]) -> Result<(), Full> {
        self.varint(b.len() as u64)?;
        self.bytes(b)
    }
}

/// Writes `n` as a LEB128 varint at `at` in `buf` and returns where it ends. `None` when `buf`
/// has too little room for the fast path (a varint of 2 or 3 bytes needs 4 bytes of room, a
/// longer one 10): the caller falls back to writing byte by byte. Plain values in and out (no
/// writer behind a pointer), so a caller's position stays in a register.
///
/// Up to three bytes (numbers below 2^21: counts, keys, sequence numbers of most runs), the
/// bytes are computed at once and stored with one write, one branch per length instead of a
/// loop with a branch per byte; bytes past the varint's end within that write are scratch
/// (overwritten with the number's high bits or zeros).
#[inline(always)]
pub(crate) fn put_varint(buf: &mut [u8], at: usize, n: u64) -> Option<usize> {
    if n < 1 << 7 {
        *buf.get_mut(at)? = n as u8;
        return Some(at + 1);
    }
    if n < 1 << 21 {
        let n = n as u32;
        let dst = buf.get_mut(at..)?.first_chunk_mut::<4>()?;
        if n < 1 << 14 {
            *dst = ((n & 0x7f) | 0x80 | ((n >> 7) << 8)).to_le_bytes();
            return Some(at + 2);
        }
        *dst =
            ((n & 0x7f) | 0x80 | (((n >> 7) & 0x7f) | 0x80) << 8 | ((n >> 14) << 16)).to_le_bytes();
        return Some(at + 3);
    }
    put_varint_long(buf, at, n)
}

/// [`put_varint`] for numbers of 2^21 and more (4 to 10 bytes; timestamps, large sums):
/// every byte computed at once for numbers below 2^56 (8-byte write), else a loop.
#[inline(never)]
fn put_varint_long(buf: &mut [u8], at: usize, n: u64) -> Option<usize> {
    let dst = buf.get_mut(at..)?.first_chunk_mut::<10>()?;
    if n < 1 << 56 {
        // 28-bit halves to 32-bit lanes, 14-bit quarters to 16-bit lanes, 7-bit groups to bytes.
        let x = (n & 0x0fff_ffff) | ((n & 0x00ff_ffff_f000_0000) << 4);
        let x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x0fff_c000_0fff_c000) << 2);
        let x = (x & 0x007f_007f_007f_007f) | ((x & 0x3f80_3f80_3f80_3f80) << 1);
        let len = 8 - (x.leading_zeros() / 8) as usize;
        let more = 0x0080_8080_8080_8080u64 >> (8 * (8 - len));
        *dst.first_chunk_mut::<8>()? = (x | more).to_le_bytes();
        return Some(at + len);
    }
    let mut n = n;
    let mut i = 0;
    while n >= 0x80 && i < 9 {
        dst[i] = (n as u8) | 0x80;
        n >>= 7;
        i += 1;
    }
    dst[i] = n as u8;
    Some(at + i + 1)
}

/// Zigzag encoding of a signed integer (postcard's, so small magnitudes stay short).
#[inline(always)]
pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

impl ser::Serializer for &mut SliceWriter<'_> {
    type Ok = ();
    type Error = Full;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }

    #[inline]
    fn serialize_bool(self, v: bool) -> Result<(), Full> {
        self.byte(u8::from(v))
    }
    #[inline]
    fn serialize_i8(self, v: i8) -> Result<(), Full> {
        self.byte(v as u8)
    }
    #[inline]
    fn serialize_i16(self, v: i16) -> Result<(), Full> {
        self.varint(u64::from(((v << 1) ^ (v >> 15)) as u16))
    }
    #[inline]
    fn serialize_i32(self, v: i32) -> Result<(), Full> {
        self.varint(u64::from(((v << 1) ^ (v >> 31)) as u32))
    }
    #[inline]
    fn serialize_i64(self, v: i64) -> Result<(), Full> {
        self.varint(zigzag(v))
    }
    #[inline]
    fn serialize_i128(self, v: i128) -> Result<(), Full> {
        self.varint128(((v << 1) ^ (v >> 127)) as u128)
    }
    #[inline]
    fn serialize_u8(self, v: u8) -> Result<(), Full> {
        self.byte(v)
    }
    #[inline]
    fn serialize_u16(self, v: u16) -> Result<(), Full> {
        self.varint(u64::from(v))
    }
    #[inline]
    fn serialize_u32(self, v: u32) -> Result<(), Full> {
        self.varint(u64::from(v))
    }
    #[inline]
    fn serialize_u64(self, v: u64) -> Result<(), Full> {
        self.varint(v)
    }
    #[inline]
    fn serialize_u128(self, v: u128) -> Result<(), Full> {
        self.varint128(v)
    }
    #[inline]
    fn serialize_f32(self, v: f32) -> Result<(), Full> {
        self.bytes(&v.to_bits().to_le_bytes())
    }
    #[inline]
    fn serialize_f64(self, v: f64) -> Result<(), Full> {
        self.bytes(&v.to_bits().to_le_bytes())
    }
    fn serialize_char(self, v: char) -> Result<(), Full> {
        let mut buf = [0u8; 4];
        self.len_prefixed(v.encode_utf8(&mut buf).as_bytes())
    }
    fn serialize_str(self, v: &str) -> Result<(), Full> {
        self.len_prefixed(v.as_bytes())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Full> {
        self.len_prefixed(v)
    }
    fn serialize_none(self) -> Result<(), Full> {
        self.byte(0)
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), Full> {
        self.byte(1)?;
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Full> {
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Full> {
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        variant_index: u32,
        _variant: &'static str,
    ) -> Result<(), Full> {
        self.varint(u64::from(variant_index))
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Full> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        variant_index: u32,
        _variant: &'static str,
        value: &T,
    ) -> Result<(), Full> {
        self.varint(u64::from(variant_index))?;
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self, Full> {
        // An unknown length is an error in postcard too: the fallback reports it.
        self.varint(len.ok_or(Full)? as u64)?;
        Ok(self)
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self, Full> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self, Full> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self, Full> {
        tagged(self, index)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self, Full> {
        self.varint(len.ok_or(Full)? as u64)?;
        Ok(self)
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self, Full> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Full> {
        tagged(self, index)
    }
    // `collect_str`: serde's default (format into a `String`, then `serialize_str`) writes
    // the same bytes as postcard's two-pass version.
}

/// A variant with content: its index, then the content.
#[inline]
fn tagged<'w, 'a>(w: &'w mut SliceWriter<'a>, index: u32) -> Result<&'w mut SliceWriter<'a>, Full> {
    w.varint(u64::from(index))?;
    Ok(w)
}

/// One impl body for every compound: each element is serialized in turn, nothing at the end.
macro_rules! compound {
    ($($trait:ident :: $method:ident $(($key:ident))?),* $(,)?) => {$(
        impl ser::$trait for &mut SliceWriter<'_> {
            type Ok = ();
            type Error = Full;
            #[inline(always)]
            fn $method<T: ?Sized + Serialize>(&mut self, $($key: &'static str,)? value: &T) -> Result<(), Full> {
                $(let _ = $key;)?
                value.serialize(&mut **self)
            }
            #[inline]
            fn end(self) -> Result<(), Full> {
                Ok(())
            }
        }
    )*};
}

compound!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
    SerializeStruct::serialize_field(key),
    SerializeStructVariant::serialize_field(key),
);

impl ser::SerializeMap for &mut SliceWriter<'_> {
    type Ok = ();
    type Error = Full;
    #[inline(always)]
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<(), Full> {
        key.serialize(&mut **self)
    }
    #[inline(always)]
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Full> {
        value.serialize(&mut **self)
    }
    #[inline]
    fn end(self) -> Result<(), Full> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Unit,
        New(i16),
        Tuple(u8, char),
        Named { w: f32, h: Option<i128> },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Wrapper(u16);

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Unit;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct All {
        flag: bool,
        small: (i8, u8),
        ints: (i32, i64, u32, u64, u128),
        float: f64,
        text: String,
        #[serde(with = "serde_bytes_like")]
        raw: Vec<u8>,
        list: Vec<Shape>,
        map: BTreeMap<String, Option<Wrapper>>,
        unit: (),
        unit_struct: Unit,
    }

    /// Byte strings through `serialize_bytes`, without a dependency on `serde_bytes`.
    mod serde_bytes_like {
        pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            serde::Deserialize::deserialize(d)
        }
    }

    fn same_as_postcard<T: Serialize>(v: &T) -> Vec<u8> {
        let expected = postcard::to_allocvec(v).expect("postcard");
        let mut buf = vec![0u8; expected.len()];
        let mut w = SliceWriter::new(&mut buf);
        v.serialize(&mut w).expect("room for the exact size");
        assert_eq!(w.len(), expected.len());
        assert_eq!(buf, expected);
        // One byte less is not enough.
        if !expected.is_empty() {
            let mut short = vec![0u8; expected.len() - 1];
            assert!(v.serialize(&mut SliceWriter::new(&mut short)).is_err());
        }
        expected
    }

    #[test]
    fn writes_postcard_bytes() {
        let all = All {
            flag: true,
            small: (-3, 250),
            ints: (i32::MIN, -300, u32::MAX, 1 << 63, u128::MAX),
            float: -0.125,
            text: "héllo".into(),
            raw: vec![0, 1, 255],
            list: vec![
                Shape::Unit,
                Shape::New(-129),
                Shape::Tuple(7, 'ß'),
                Shape::Named {
                    w: 1.5,
                    h: Some(i128::MIN),
                },
                Shape::Named { w: 0.0, h: None },
            ],
            map: [("a".to_owned(), Some(Wrapper(300))), ("b".to_owned(), None)]
                .into_iter()
                .collect(),
            unit: (),
            unit_struct: Unit,
        };
        let bytes = same_as_postcard(&all);
        let back: All = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, all);
        for n in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            same_as_postcard(&n);
            same_as_postcard(&(n as i64));
            same_as_postcard(&(n as i16));
        }
        same_as_postcard(&'x');
        same_as_postcard(&(7u32, (3u64, 1u64 << 40)));
    }

    /// LEB128 the plain way, for comparison.
    fn reference(mut n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out
    }

    #[test]
    fn varints_of_every_length_and_room() {
        let mut values = vec![0u64, u64::MAX];
        for bits in 1..64 {
            let p = 1u64 << bits;
            values.extend([p - 1, p, p + 1, p | (p >> 1) | 0x55]);
        }
        for n in values {
            let expected = reference(n);
            // After a few bytes already written, with every amount of room left.
            for room in 0..=16 {
                let mut buf = vec![0xAAu8; 3 + room];
                match put_varint(&mut buf, 3, n) {
                    Some(end) => {
                        assert_eq!(&buf[3..end], &expected[..], "{n} with room {room}");
                        assert_eq!(&buf[..3], &[0xAA; 3], "bytes before untouched");
                    }
                    None => assert!(room < 10, "{n}: no fast path with room {room}"),
                }
                // The writer falls back to byte by byte: right whenever the varint fits.
                let mut buf = vec![0u8; room];
                let mut w = SliceWriter::new(&mut buf);
                match w.varint(n) {
                    Ok(()) => {
                        assert_eq!(w.len(), expected.len());
                        assert_eq!(&buf[..expected.len()], &expected[..]);
                    }
                    Err(Full) => assert!(room < expected.len(), "{n} fits in {room}"),
                }
            }
        }
    }

    #[test]
    fn unknown_length_falls_back() {
        struct Unsized;
        impl Serialize for Unsized {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                let mut seq = s.serialize_seq(None)?;
                seq.serialize_element(&1u8)?;
                seq.end()
            }
        }
        let mut buf = [0u8; 16];
        assert!(Unsized.serialize(&mut SliceWriter::new(&mut buf)).is_err());
        assert!(postcard::to_allocvec(&Unsized).is_err());
    }
}
