//! Worker threads as the supervisor sees them: each thread that polls a supervised task gets
//! a slot where it publishes which task it is polling, for the CPU sampler.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::clock::ThreadCpuClock;
use crate::tier::WorkerStats;

/// One worker thread's slot.
#[derive(Debug)]
pub(crate) struct WorkerSlot {
    /// Id of the task being polled on this thread, 0 when none.
    pub(crate) current: AtomicU64,
    pub(crate) stats: WorkerStats,
    pub(crate) clock: Option<ThreadCpuClock>,
    /// CPU time of the thread at the previous sample.
    pub(crate) last_cpu_ns: AtomicU64,
    /// Poll-clock reading when that sample was taken (0 before the first sample).
    pub(crate) last_sample_raw: AtomicU64,
    pub(crate) alive: AtomicBool,
    pub(crate) name: String,
}

impl WorkerSlot {
    fn for_current_thread() -> Self {
        let clock = ThreadCpuClock::current();
        Self {
            current: AtomicU64::new(0),
            stats: WorkerStats::default(),
            last_cpu_ns: AtomicU64::new(clock.and_then(|c| c.read_ns()).unwrap_or(0)),
            last_sample_raw: AtomicU64::new(0),
            clock,
            alive: AtomicBool::new(true),
            name: std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_owned(),
        }
    }

    /// Publishes the task being polled; cleared again when the guard drops (also on panic).
    #[inline(always)]
    pub(crate) fn enter(&self, task: u64) -> PollingGuard<'_> {
        self.current.store(task, Ordering::Relaxed);
        PollingGuard { slot: self }
    }
}

/// Clears the slot's current task.
pub(crate) struct PollingGuard<'a> {
    slot: &'a WorkerSlot,
}

impl Drop for PollingGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.slot.current.store(0, Ordering::Relaxed);
    }
}

/// All slots of one supervisor.
#[derive(Debug, Default)]
pub(crate) struct WorkerRegistry {
    slots: Mutex<Vec<Arc<WorkerSlot>>>,
}

impl WorkerRegistry {
    pub(crate) fn snapshot(&self) -> Vec<Arc<WorkerSlot>> {
        let mut slots = self.slots.lock();
        slots.retain(|s| s.alive.load(Ordering::Relaxed));
        slots.clone()
    }

    fn add(&self, slot: Arc<WorkerSlot>) {
        self.slots.lock().push(slot);
    }
}

static NEXT_THREAD_KEY: AtomicU64 = AtomicU64::new(1);

/// The slots this thread holds, one per supervisor; marks them dead when the thread exits.
#[derive(Default)]
struct ThreadSlots(Vec<(u64, Arc<WorkerSlot>)>);

impl Drop for ThreadSlots {
    fn drop(&mut self) {
        for (_, slot) in &self.0 {
            slot.alive.store(false, Ordering::Relaxed);
        }
    }
}

thread_local! {
    static THREAD_KEY: Cell<u64> = const { Cell::new(0) };
    static SLOTS: RefCell<ThreadSlots> = RefCell::new(ThreadSlots::default());
}

/// A unique, never reused key of the calling thread (cheap: one thread-local read).
#[inline(always)]
pub(crate) fn thread_key() -> u64 {
    THREAD_KEY.with(|k| {
        let key = k.get();
        if key != 0 {
            key
        } else {
            let key = NEXT_THREAD_KEY.fetch_add(1, Ordering::Relaxed);
            k.set(key);
            key
        }
    })
}

/// The calling thread's slot for supervisor `supervisor`, registering it on first use.
#[cold]
pub(crate) fn slot_for_current_thread(
    supervisor: u64,
    registry: &WorkerRegistry,
) -> Arc<WorkerSlot> {
    SLOTS
        .try_with(|slots| {
            let mut slots = slots.borrow_mut();
            if let Some((_, slot)) = slots.0.iter().find(|(id, _)| *id == supervisor) {
                return Arc::clone(slot);
            }
            let slot = Arc::new(WorkerSlot::for_current_thread());
            slots.0.push((supervisor, Arc::clone(&slot)));
            registry.add(Arc::clone(&slot));
            slot
        })
        // The thread is being torn down: an unregistered slot still works, unsampled.
        .unwrap_or_else(|_| Arc::new(WorkerSlot::for_current_thread()))
}
