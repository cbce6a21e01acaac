//! Closures adapted into [`Transform`]s. They are stateless: cloned per worker and fusable.

use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::{BatchCounts, Transform};
use crate::envelope::Envelope;
use crate::error::{BoxError, ItemFailure, StageError};

/// `map`: one output per input.
pub struct Map<F, I, O> {
    f: F,
    _types: PhantomData<fn(I) -> O>,
}

/// `filter`: keeps the items the predicate accepts.
pub struct Filter<F, T> {
    f: F,
    _types: PhantomData<fn(T)>,
}

/// `flat_map`: any number of outputs per input; each carries the input's metadata.
pub struct FlatMap<F, I, O> {
    f: F,
    _types: PhantomData<fn(I) -> O>,
}

/// `try_map`: one output per input, or an error handled by the stage's error policy.
/// The closure borrows the input, so a failed item can be retried or dead-lettered whole.
pub struct TryMap<F, I, O> {
    f: F,
    _types: PhantomData<fn(I) -> O>,
}

macro_rules! clone_impl {
    ($name:ident < $($p:ident),* >) => {
        impl<$($p),*> Clone for $name<$($p),*> where F: Clone {
            fn clone(&self) -> Self {
                Self { f: self.f.clone(), _types: PhantomData }
            }
        }
        impl<$($p),*> $name<$($p),*> {
            /// Adapts the closure.
            pub fn new(f: F) -> Self {
                Self { f, _types: PhantomData }
            }
        }
    };
}
clone_impl!(Map<F, I, O>);
clone_impl!(Filter<F, T>);
clone_impl!(FlatMap<F, I, O>);
clone_impl!(TryMap<F, I, O>);

impl<F, I, O> Transform for Map<F, I, O>
where
    F: FnMut(I) -> O + Send + 'static,
    I: Send + 'static,
    O: Send + 'static,
{
    type In = I;
    type Out = O;

    #[inline]
    fn process(
        &mut self,
        item: Envelope<I>,
        out: &mut Vec<Envelope<O>>,
    ) -> Result<(), ItemFailure<I>> {
        out.push(item.map(&mut self.f));
        Ok(())
    }

    fn process_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<I>>,
        out: &mut Vec<Envelope<O>>,
        failed: &mut Vec<ItemFailure<I>>,
        counts: &mut BatchCounts,
    ) {
        if let Some(first) = items.as_slice().first() {
            counts.current_seq = first.seq;
        }
        let f = &mut self.f;
        if out.is_empty() && super::in_place::same_layout::<I, O>() {
            // The batch's own buffer takes the outputs (`collect` gives the iterator's buffer
            // back as it is, nothing moved).
            let batch: Vec<Envelope<I>> = std::mem::take(items).collect();
            match super::in_place::map_in_place(batch, f, failed) {
                Ok(mapped) => *out = mapped,
                Err(batch) => *items = batch.into_iter(),
            }
            if items.len() == 0 {
                return;
            }
        }
        out.reserve(items.len());
        // A panic fails the item in progress alone (its payload went into the closure: its
        // sequence number identifies it); the batch goes on after it.
        loop {
            let mut seq = counts.current_seq;
            let run = catch_unwind(AssertUnwindSafe(|| {
                out.extend(items.by_ref().map(|item| {
                    seq = item.seq;
                    item.map(&mut *f)
                }));
            }));
            match run {
                Ok(()) => break,
                Err(panic) => {
                    failed.push(ItemFailure::consumed(seq, StageError::from_panic(&*panic)))
                }
            }
        }
    }

    fn at_most_one_output(&self) -> bool {
        true
    }

    fn is_stateless(&self) -> bool {
        true
    }
}

impl<F, T> Transform for Filter<F, T>
where
    F: FnMut(&T) -> bool + Send + 'static,
    T: Send + 'static,
{
    type In = T;
    type Out = T;

    #[inline]
    fn process(
        &mut self,
        item: Envelope<T>,
        out: &mut Vec<Envelope<T>>,
    ) -> Result<(), ItemFailure<T>> {
        if (self.f)(&item.payload) {
            out.push(item);
        }
        Ok(())
    }

    fn process_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<T>>,
        out: &mut Vec<Envelope<T>>,
        failed: &mut Vec<ItemFailure<T>>,
        counts: &mut BatchCounts,
    ) {
        if let Some(first) = items.as_slice().first() {
            counts.current_seq = first.seq;
        }
        let f = &mut self.f;
        // In place: `retain` moves each kept item forward once. A panic in the predicate
        // leaves the items kept so far followed by the one in progress and those not tested
        // yet: the one in progress fails alone, payload and all, and the batch goes on after it.
        let mut batch: Vec<Envelope<T>> = std::mem::take(items).collect();
        loop {
            let (mut kept, mut seq) = (0, counts.current_seq);
            let run = catch_unwind(AssertUnwindSafe(|| {
                batch.retain(|item| {
                    seq = item.seq;
                    let keep = f(&item.payload);
                    kept += usize::from(keep);
                    keep
                })
            }));
            let rest = match run {
                Ok(()) => None,
                Err(panic) => {
                    let error = StageError::from_panic(&*panic);
                    let mut rest = batch.split_off(kept.min(batch.len()));
                    if rest.first().is_some_and(|item| item.seq == seq) {
                        let failing = rest.remove(0);
                        failed.push(ItemFailure::new(failing, error));
                    } else {
                        failed.push(ItemFailure::consumed(seq, error));
                    }
                    Some(rest)
                }
            };
            if out.is_empty() {
                *out = std::mem::take(&mut batch);
            } else {
                out.append(&mut batch);
            }
            match rest {
                Some(rest) => batch = rest,
                None => break,
            }
        }
    }

    fn at_most_one_output(&self) -> bool {
        true
    }

    fn is_stateless(&self) -> bool {
        true
    }
}

impl<F, I, O, It> Transform for FlatMap<F, I, O>
where
    F: FnMut(I) -> It + Send + 'static,
    It: IntoIterator<Item = O>,
    I: Send + 'static,
    O: Send + 'static,
{
    type In = I;
    type Out = O;

    fn process(
        &mut self,
        item: Envelope<I>,
        out: &mut Vec<Envelope<O>>,
    ) -> Result<(), ItemFailure<I>> {
        let (payload, meta) = item.into_parts();
        for o in (self.f)(payload) {
            out.push(meta.derive(o));
        }
        Ok(())
    }

    fn is_stateless(&self) -> bool {
        true
    }
}

impl<F, I, O, E> Transform for TryMap<F, I, O>
where
    F: FnMut(&I) -> Result<O, E> + Send + 'static,
    E: Into<BoxError>,
    I: Send + 'static,
    O: Send + 'static,
{
    type In = I;
    type Out = O;

    fn process(
        &mut self,
        item: Envelope<I>,
        out: &mut Vec<Envelope<O>>,
    ) -> Result<(), ItemFailure<I>> {
        match (self.f)(&item.payload) {
            Ok(o) => {
                out.push(item.map(|_| o));
                Ok(())
            }
            Err(e) => Err(ItemFailure::new(item, StageError::from_error(e))),
        }
    }

    fn at_most_one_output(&self) -> bool {
        true
    }

    fn is_stateless(&self) -> bool {
        true
    }
}
