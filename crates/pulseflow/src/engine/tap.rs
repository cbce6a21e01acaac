//! Taps: a look at the items leaving a stage of a running pipeline
//! ([`ExecutionEngine::tap`](super::ExecutionEngine::tap)).
//!
//! A stage offers each batch it emits to the taps attached to it. Without taps that is one
//! relaxed atomic load per batch; with taps, each is called with the batch, in the stage's
//! task, and must return quickly: it may look at the items, copy what it wants and hand that
//! on without waiting (dropping what does not fit), never hold the stage up.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::envelope::{Batch, Envelope};

/// A batch offered to a tap; [`items`](TapBatch::items) gives its items as the stage's output
/// type.
pub struct TapBatch<'a> {
    batch: &'a dyn Any,
}

impl<'a> TapBatch<'a> {
    /// The items of a batch as a stage offers them (public so that taps can be tested).
    #[allow(clippy::ptr_arg)] // The `Vec` is what a tap downcasts to.
    pub fn of_items<T: Send + 'static>(items: &'a Vec<Envelope<T>>) -> Self {
        Self { batch: items }
    }

    pub(crate) fn of_batch<T: Send + 'static>(batch: &'a Batch<T>) -> Self {
        Self { batch }
    }

    /// The items, when the stage emits `T`s.
    pub fn items<T: 'static>(&self) -> Option<&'a [Envelope<T>]> {
        if let Some(v) = self.batch.downcast_ref::<Vec<Envelope<T>>>() {
            return Some(v);
        }
        self.batch.downcast_ref::<Batch<T>>().map(Batch::items)
    }
}

/// What a tap does with each batch: look, copy, hand on without waiting.
pub type Tap = Arc<dyn Fn(&TapBatch<'_>) + Send + Sync>;

/// The taps attached to one stage.
#[derive(Default)]
pub(crate) struct TapSlot {
    active: AtomicBool,
    next_id: AtomicU64,
    taps: Mutex<Vec<(u64, Tap)>>,
}

impl std::fmt::Debug for TapSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapSlot")
            .field("active", &self.active.load(Relaxed))
            .finish()
    }
}

impl TapSlot {
    /// Offers the items `make` wraps to the taps, if there are any.
    #[inline]
    pub fn offer<'a>(&self, make: impl FnOnce() -> TapBatch<'a>) {
        if self.active.load(Relaxed) {
            self.offer_slow(&make());
        }
    }

    #[cold]
    fn offer_slow(&self, batch: &TapBatch<'_>) {
        let taps: Vec<Tap> = self.taps.lock().iter().map(|(_, t)| t.clone()).collect();
        for tap in taps {
            tap(batch);
        }
    }

    /// Detaches every tap (the run is over).
    pub fn detach_all(&self) {
        self.taps.lock().clear();
        self.active.store(false, Relaxed);
    }

    fn attach(self: &Arc<Self>, tap: Tap) -> TapHandle {
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut taps = self.taps.lock();
        taps.push((id, tap));
        self.active.store(true, Relaxed);
        TapHandle {
            slot: self.clone(),
            id,
        }
    }
}

/// A tap attached to a stage; dropping it detaches the tap.
pub struct TapHandle {
    slot: Arc<TapSlot>,
    id: u64,
}

impl Drop for TapHandle {
    fn drop(&mut self) {
        let mut taps = self.slot.taps.lock();
        taps.retain(|(id, _)| *id != self.id);
        self.slot.active.store(!taps.is_empty(), Relaxed);
    }
}

/// Attaches `tap` to `slot`.
pub(crate) fn attach(slot: &Arc<TapSlot>, tap: Tap) -> TapHandle {
    slot.attach(tap)
}
