//! State shared by every task of one run: stop and abort signals, the init gate, the first
//! fatal error, dead letters and task tracking.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio_pulse::Supervisor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dead_letter::DeadLetters;
use crate::error::PipelineError;
use crate::metrics::StageStats;

/// Holds sources back until every stage has initialised, so a failed `init` stops the run
/// before any item flows.
#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    changed: Notify,
}

#[derive(Default)]
struct GateState {
    registered: usize,
    arrived: usize,
    sealed: bool,
    failed: bool,
}

impl Gate {
    /// Announces one more stage instance that will initialise.
    pub fn register(&self) {
        self.state.lock().registered += 1;
    }

    /// Reports one instance's init outcome.
    pub fn arrive(&self, ok: bool) {
        {
            let mut st = self.state.lock();
            st.arrived += 1;
            st.failed |= !ok;
        }
        self.changed.notify_waiters();
    }

    /// No more registrations will come.
    pub fn seal(&self) {
        self.state.lock().sealed = true;
        self.changed.notify_waiters();
    }

    /// Waits until every registered instance arrived; `false` if any init failed.
    pub async fn wait(&self) -> bool {
        let changed = self.changed.notified();
        tokio::pin!(changed);
        loop {
            changed.as_mut().enable();
            {
                let st = self.state.lock();
                if st.failed {
                    return false;
                }
                if st.sealed && st.arrived >= st.registered {
                    return true;
                }
            }
            changed.as_mut().await;
            changed.set(self.changed.notified());
        }
    }
}

pub(crate) struct RunShared {
    pub pipeline_id: Arc<str>,
    /// Graceful stop: sources stop producing, the rest drains.
    pub stop: CancellationToken,
    pub gate: Gate,
    pub stages: Vec<Arc<StageStats>>,
    /// For each stage, the stages it feeds.
    pub consumers: Vec<Vec<usize>>,
    pub dead_letters: DeadLetters,
    pub batch_size: usize,
    /// How long a source may hold a partial batch.
    pub batch_timeout: std::time::Duration,
    failure: Mutex<Option<PipelineError>>,
    tracker: TaskTracker,
    aborts: Mutex<Vec<AbortHandle>>,
    /// Whether items carry acks, and whether the run was aborted (they then report failure).
    pub acks: Arc<crate::ack::RunAcks>,
    pub aborted: AtomicBool,
    /// Supervises every task of the run, when supervision is on.
    supervisor: Option<Supervisor>,
    /// Samples of the stages' time totals, for their shares of busy, backpressured and idle.
    pub load: Mutex<crate::metrics::LoadWindow>,
    /// Emptied batch buffers, for the next batches.
    pub buffers: super::recycle::Buffers,
}

impl RunShared {
    pub fn new(
        pipeline_id: Arc<str>,
        stages: Vec<Arc<StageStats>>,
        consumers: Vec<Vec<usize>>,
        dead_letters: DeadLetters,
        (batch_size, batch_timeout): (usize, std::time::Duration),
        stop: CancellationToken,
        supervisor: Option<Supervisor>,
    ) -> Self {
        let load = crate::metrics::LoadWindow::new(stages.len(), std::time::Instant::now());
        Self {
            load: Mutex::new(load),
            buffers: super::recycle::Buffers::new(batch_size),
            pipeline_id,
            stop,
            gate: Gate::default(),
            stages,
            consumers,
            dead_letters,
            batch_size,
            batch_timeout,
            failure: Mutex::new(None),
            tracker: TaskTracker::new(),
            aborts: Mutex::new(Vec::new()),
            acks: Arc::default(),
            aborted: AtomicBool::new(false),
            supervisor,
        }
    }

    /// Records the run's error (the first one wins) and starts a graceful stop.
    pub fn fail(&self, error: PipelineError) {
        {
            let mut slot = self.failure.lock();
            if slot.is_none() {
                *slot = Some(error);
            }
        }
        self.stop.cancel();
    }

    pub fn take_failure(&self) -> Option<PipelineError> {
        self.failure.lock().take()
    }

    /// Spawns a task working for stage `stage`: supervised by Tokio-Pulse when supervision is
    /// on (the task's tier and CPU time then show in the stage's state), tracked either way.
    pub fn spawn<F>(&self, stage: usize, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let future = self.tracker.track_future(future);
        match (&self.supervisor, self.stages.get(stage)) {
            (Some(supervisor), Some(stats)) => {
                stats.supervise(supervisor.spawn_named(&stats.id, future));
            }
            _ => {
                let handle = tokio::spawn(future);
                let mut aborts = self.aborts.lock();
                aborts.retain(|h| !h.is_finished());
                aborts.push(handle.abort_handle());
            }
        }
    }

    pub fn close_tracker(&self) {
        self.tracker.close();
    }

    pub async fn wait_tasks(&self) {
        self.tracker.wait().await;
    }

    pub fn abort_all(&self) {
        self.aborted.store(true, Relaxed);
        self.acks.abort();
        self.stop.cancel();
        for h in self.aborts.lock().iter() {
            h.abort();
        }
        for stats in &self.stages {
            stats.abort_tasks();
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Relaxed)
    }
}
