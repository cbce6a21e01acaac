//! `map` over a batch inside the buffer that holds it.
//!
//! When `Envelope<I>` and `Envelope<O>` have the same size and alignment (a `u64 -> u64` map,
//! any map between types of one size), each output is written into the slot its input was
//! read from, or into an earlier one left by an input whose closure panicked: the batch needs
//! no second buffer, and the map touches each cache line once instead of reading one buffer
//! and filling another (on `linear`, the map stage is the bottleneck of the pipeline).
//!
//! The standard library collects a vector's own iterator in place too, but a panic during
//! such a collect drops every item of the batch; here a panic fails the item in progress
//! alone and the batch goes on after it, as everywhere else in the engine.

use std::marker::PhantomData;
use std::mem::{ManuallyDrop, align_of, size_of};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;

use crate::envelope::Envelope;
use crate::error::{ItemFailure, StageError};

/// Whether envelopes of `I` and of `O` can share a buffer slot for slot.
pub(crate) const fn same_layout<I, O>() -> bool {
    size_of::<Envelope<I>>() == size_of::<Envelope<O>>()
        && align_of::<Envelope<I>>() == align_of::<Envelope<O>>()
}

/// A buffer part way through an in-place map: outputs in slots `0..written`, inputs still to
/// map in `read..len`, nothing live in between. Dropping it drops both and frees the buffer.
struct InPlace<I, O> {
    buf: *mut Envelope<I>,
    cap: usize,
    len: usize,
    read: usize,
    written: usize,
    _out: PhantomData<Envelope<O>>,
}

impl<I, O> Drop for InPlace<I, O> {
    fn drop(&mut self) {
        // SAFETY: by the struct's invariant, slots `0..written` hold initialised outputs and
        // slots `read..len` initialised inputs, each dropped once here; `buf` and `cap` come
        // from a `Vec<Envelope<I>>` whose ownership this struct took, so rebuilding it with
        // length 0 frees the allocation without touching any slot again.
        unsafe {
            ptr::drop_in_place(ptr::slice_from_raw_parts_mut(
                self.buf.cast::<Envelope<O>>(),
                self.written,
            ));
            ptr::drop_in_place(ptr::slice_from_raw_parts_mut(
                self.buf.add(self.read),
                self.len - self.read,
            ));
            drop(Vec::from_raw_parts(self.buf, 0, self.cap));
        }
    }
}

/// Maps every envelope of `items` with `f` in `items`' own buffer, keeping each envelope's
/// metadata. A panic in `f` fails that item alone (pushed to `failed` by sequence number; its
/// payload went into the closure) and the rest of the batch is mapped after it.
///
/// Only for types of the same layout: `None` (with `items` untouched) otherwise.
pub(crate) fn map_in_place<I, O>(
    items: Vec<Envelope<I>>,
    f: &mut impl FnMut(I) -> O,
    failed: &mut Vec<ItemFailure<I>>,
) -> Result<Vec<Envelope<O>>, Vec<Envelope<I>>> {
    if !same_layout::<I, O>() {
        return Err(items);
    }
    let mut items = ManuallyDrop::new(items);
    let mut state = InPlace::<I, O> {
        buf: items.as_mut_ptr(),
        cap: items.capacity(),
        len: items.len(),
        read: 0,
        written: 0,
        _out: PhantomData,
    };
    loop {
        let mut seq = 0;
        let run = catch_unwind(AssertUnwindSafe(|| {
            while state.read < state.len {
                // SAFETY: `read < len`, and slot `read` holds an input not moved out yet;
                // advancing `read` first hands it to this loop (if `f` panics, the closure's
                // unwinding drops it, and the invariant still holds).
                let item = unsafe { ptr::read(state.buf.add(state.read)) };
                state.read += 1;
                seq = item.seq;
                let out = item.map(&mut *f);
                // SAFETY: `written < read`, so slot `written` lies in the part whose inputs
                // were moved out and holds nothing live; an `Envelope<O>` has the size and
                // alignment of an `Envelope<I>` (checked above), so it fits the slot exactly.
                unsafe { ptr::write(state.buf.add(state.written).cast::<Envelope<O>>(), out) };
                state.written += 1;
            }
        }));
        match run {
            Ok(()) => break,
            Err(panic) => failed.push(ItemFailure::consumed(seq, StageError::from_panic(&*panic))),
        }
    }
    let state = ManuallyDrop::new(state);
    // SAFETY: every input was moved out (`read == len`) and slots `0..written` hold the
    // outputs; the allocation was made for `cap` envelopes of `I`, which have the size and
    // alignment of envelopes of `O`, so it is a valid allocation of `cap` envelopes of `O`.
    // `state` is not dropped, so the vector is the allocation's only owner.
    Ok(unsafe { Vec::from_raw_parts(state.buf.cast::<Envelope<O>>(), state.written, state.cap) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: u64) -> Vec<Envelope<u64>> {
        (0..n).map(|i| Envelope::new(i).with_seq(i)).collect()
    }

    #[test]
    fn maps_in_the_same_buffer_keeping_metadata() {
        let items = batch(100);
        let ptr = items.as_ptr() as usize;
        let mut failed = Vec::new();
        let out = map_in_place(items, &mut |x: u64| x as i64 * -2, &mut failed)
            .unwrap_or_else(|_| panic!("same layout"));
        assert!(failed.is_empty());
        assert_eq!(out.as_ptr() as usize, ptr);
        assert_eq!(out.len(), 100);
        assert!(
            out.iter()
                .enumerate()
                .all(|(i, e)| e.seq == i as u64 && e.payload == -2 * i as i64)
        );
    }

    #[test]
    fn a_panic_fails_that_item_alone() {
        let items: Vec<Envelope<String>> = (0..10u64)
            .map(|i| Envelope::new(i.to_string()).with_seq(i))
            .collect();
        let mut failed = Vec::new();
        let out = map_in_place(
            items,
            &mut |s: String| {
                assert!(s != "3" && s != "7", "no {s}");
                format!("<{s}>")
            },
            &mut failed,
        )
        .unwrap_or_else(|_| panic!("same layout"));
        let seqs: Vec<u64> = out.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2, 4, 5, 6, 8, 9]);
        assert_eq!(out[3].payload, "<4>");
        let failed: Vec<u64> = failed.iter().map(|f| f.seq).collect();
        assert_eq!(failed, vec![3, 7]);
    }

    #[test]
    fn other_layouts_are_given_back() {
        let items = batch(3);
        let mut failed = Vec::new();
        let back = map_in_place(items, &mut |x: u64| vec![x], &mut failed);
        assert!(matches!(back, Err(items) if items.len() == 3));
    }
}
