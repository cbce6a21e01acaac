//! A thread of its own that writes the `stdout` and `file` sinks' text, in order.
//!
//! Tokio's files hand every write to its blocking threads and wake the writing task when it is
//! done: two thread hops per batch, and the sink's task waits for the disk in between. With
//! the CPU-bound stages of a pipeline keeping both workers busy, those hops made runs of the
//! same file swing between about 600 and 30 000 context switches (and up to twice the time).
//! Here the sink queues a batch's text and wakes the thread only when it sleeps; a busy
//! thread takes everything queued meanwhile when it is done with the last. So nothing waits in the buffer while the thread is idle, and the thread
//! wakes once per stretch of work, not once per batch. Past [`LIMIT`] bytes waiting the sink
//! waits for room, which is its backpressure.
//!
//! Each buffer sent gets a ticket; [`Writer::written`] waits until the thread has written it
//! (to the OS, and with `sync` also to the disk): a sink counts its items delivered only
//! then.

use std::io::Write;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use pulseflow::prelude::StageError;
use tokio::sync::{Notify, oneshot};

/// Bytes waiting for the thread at most, before the sink waits.
const LIMIT: usize = 4 << 20;

#[derive(Default)]
struct State {
    /// Buffers to write, in order, and their bytes.
    queue: Vec<Vec<u8>>,
    queued: usize,
    /// Written buffers, for the sink to fill again.
    spare: Vec<Vec<u8>>,
    /// The thread is writing (so it will look at `buf` again without being woken).
    writing: bool,
    closed: bool,
    /// The first write error, which ends the thread.
    failed: Option<String>,
    /// Buffers sent, and buffers written (in order): a buffer's ticket is its number.
    sent: u64,
    written: u64,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the thread.
    work: Condvar,
    /// Tells a waiting sink there is room.
    room: Notify,
    /// Tells a sink waiting for its ticket that buffers were written (or the thread failed).
    progress: Notify,
}

impl Shared {
    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }
}

/// The sink's side; [`Writer::close`] waits for everything to be written.
pub struct Writer {
    shared: Arc<Shared>,
    done: Option<oneshot::Receiver<()>>,
    /// What it writes to, for messages.
    name: String,
}

impl Writer {
    /// Starts the thread writing to `out` (`name` says what it is, in errors). With `sync`,
    /// the thread makes every stretch of writes durable (`fsync` of that file) before it
    /// counts them written.
    pub fn start(
        mut out: Box<dyn Write + Send>,
        name: String,
        sync: Option<std::fs::File>,
    ) -> Result<Self, StageError> {
        let shared = Arc::new(Shared::default());
        let (done_tx, done) = oneshot::channel();
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name("pulseflow-writer".into())
            .spawn(move || {
                batch_priority();
                let result = write_loop(&theirs, &mut *out, sync).and_then(|()| out.flush());
                if let Err(e) = result {
                    theirs.lock().failed = Some(e.to_string());
                }
                // A sink waiting for room, or for its ticket, must not wait forever.
                theirs.room.notify_one();
                theirs.progress.notify_waiters();
                let _ = done_tx.send(());
            })
            .map_err(|e| StageError::msg(format!("cannot start the writer of {name}: {e}")))?;
        Ok(Self {
            shared,
            done: Some(done),
            name,
        })
    }

    fn error(&self, why: Option<String>) -> StageError {
        StageError::msg(format!(
            "write to {} failed: {}",
            self.name,
            why.as_deref().unwrap_or("the writer stopped")
        ))
    }

    /// Queues `text` for the thread to write, waiting while [`LIMIT`] bytes are waiting; gives
    /// back an empty buffer to fill next (a written one when there is one) and the ticket of
    /// `text` (see [`Writer::written`]). The lock is held only to move buffers, never to copy
    /// bytes.
    pub async fn send(&mut self, text: Vec<u8>) -> Result<(Vec<u8>, u64), StageError> {
        loop {
            let room = self.shared.room.notified();
            {
                let mut state = self.shared.lock();
                if let Some(why) = &state.failed {
                    let why = why.clone();
                    drop(state);
                    return Err(self.error(Some(why)));
                }
                if state.queued < LIMIT {
                    state.queued += text.len();
                    state.queue.push(text);
                    state.sent += 1;
                    if !state.writing {
                        self.shared.work.notify_one();
                    }
                    let ticket = state.sent;
                    return Ok((state.spare.pop().unwrap_or_default(), ticket));
                }
            }
            room.await;
        }
    }

    /// Waits until the buffer with this ticket is written; an error when the thread failed
    /// before.
    pub async fn written(&self, ticket: u64) -> Result<(), StageError> {
        loop {
            let progress = self.shared.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            {
                let state = self.shared.lock();
                if state.written >= ticket {
                    return Ok(());
                }
                if let Some(why) = &state.failed {
                    let why = why.clone();
                    drop(state);
                    return Err(self.error(Some(why)));
                }
            }
            progress.await;
        }
    }

    /// Waits until everything sent is written and flushed.
    pub async fn close(&mut self) -> Result<(), StageError> {
        self.shared.lock().closed = true;
        self.shared.work.notify_one();
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        let failed = self.shared.lock().failed.clone();
        match failed {
            Some(why) => Err(self.error(Some(why))),
            None => Ok(()),
        }
    }
}

impl Drop for Writer {
    /// A writer dropped without [`Writer::close`] (a run aborted) still lets its thread write
    /// what was queued and end, rather than wait for more forever.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_one();
    }
}

/// Marks the calling thread as batch work (Linux `SCHED_BATCH`: same share of the CPU, but its
/// wake-ups do not preempt a running thread). Woken for every batch written, the writer
/// otherwise preempted the workers running the pipeline's CPU-bound stages, whose output it
/// is waiting for anyway. Failing leaves the thread as it was.
fn batch_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid `sched_param` for the call's duration; pid 0 is this
        // thread, and SCHED_BATCH needs no privilege.
        unsafe {
            libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
        }
    }
}

/// The thread: writes what is queued until the writer is closed and everything is written.
fn write_loop(
    shared: &Shared,
    out: &mut dyn Write,
    sync: Option<std::fs::File>,
) -> std::io::Result<()> {
    let mut taken: Vec<Vec<u8>> = Vec::new();
    let mut state = shared.lock();
    loop {
        while state.queue.is_empty() && !state.closed {
            state.writing = false;
            shared.work.wait(&mut state);
        }
        if state.queue.is_empty() {
            return Ok(());
        }
        state.writing = true;
        std::mem::swap(&mut taken, &mut state.queue);
        state.queued = 0;
        drop(state);
        shared.room.notify_one();
        for buf in &taken {
            out.write_all(buf)?;
        }
        out.flush()?;
        if let Some(file) = &sync {
            file.sync_data()?;
        }
        state = shared.lock();
        state.written += taken.len() as u64;
        shared.progress.notify_waiters();
        for mut buf in taken.drain(..) {
            buf.clear();
            if state.spare.len() < 4 {
                state.spare.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_everything_in_order_before_close_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.txt");
        let file = std::fs::File::create(&path).expect("create");
        let mut w = Writer::start(Box::new(file), "out.txt".into(), None).expect("start");
        let mut expected = Vec::new();
        for i in 0..100u32 {
            let line = format!("line {i}\n").into_bytes();
            expected.extend_from_slice(&line);
            w.send(line).await.expect("send");
        }
        w.close().await.expect("close");
        assert_eq!(std::fs::read(&path).expect("read"), expected);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_writer_thread_runs_as_batch_work() {
        let policy = std::thread::spawn(|| {
            batch_priority();
            // SAFETY: reads this thread's policy; no pointers.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .expect("thread");
        assert_eq!(policy, libc::SCHED_BATCH);
    }

    #[tokio::test]
    async fn a_dropped_writer_still_writes_what_was_queued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.txt");
        let file = std::fs::File::create(&path).expect("create");
        let done = {
            let mut w = Writer::start(Box::new(file), "out.txt".into(), None).expect("start");
            w.send(b"kept\n".to_vec()).await.expect("send");
            w.done.take().expect("done signal")
            // The writer is dropped here without `close`: its thread must end on its own.
        };
        // A guard against hanging, not a timing assertion: the thread ends at once.
        tokio::time::timeout(std::time::Duration::from_secs(30), done)
            .await
            .expect("the thread ended")
            .expect("the thread signalled");
        assert_eq!(std::fs::read(&path).expect("read"), b"kept\n");
    }

    /// Refuses every write.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_ticket_is_written_once_its_buffer_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.txt");
        let file = std::fs::File::create(&path).expect("create");
        let sync = file.try_clone().expect("clone");
        let mut w = Writer::start(Box::new(file), "out.txt".into(), Some(sync)).expect("start");
        let (_, first) = w.send(b"one\n".to_vec()).await.expect("send");
        let (_, second) = w.send(b"two\n".to_vec()).await.expect("send");
        assert_eq!((first, second), (1, 2));
        w.written(second).await.expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), b"one\ntwo\n");
        w.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_failed_write_fails_its_ticket() {
        let mut w = Writer::start(Box::new(Broken), "broken.txt".into(), None).expect("start");
        let (_, ticket) = w.send(b"x\n".to_vec()).await.expect("queued");
        let err = w.written(ticket).await.expect_err("not written");
        assert!(err.to_string().contains("disk on fire"), "{err}");
    }

    #[tokio::test]
    async fn a_write_error_is_reported_with_the_target() {
        let mut w = Writer::start(Box::new(Broken), "broken.txt".into(), None).expect("start");
        // The first buffer is accepted (queued); the error shows at close at the latest.
        let _ = w.send(b"x\n".to_vec()).await;
        let err = w.close().await.expect_err("fails");
        assert!(err.to_string().contains("broken.txt"), "{err}");
        assert!(err.to_string().contains("disk on fire"), "{err}");
    }
}
