//! Getting sealed blocks into the file: a thread of the store's own appends full buffers while
//! the caller fills the next one; [`SpillStore::flush`] waits for it and writes the rest.

use std::fs::File;
use std::io::Write;
use std::sync::mpsc;
use std::time::Instant;

use super::compression::CostModel;
use super::record::{BLOCK, checksum_blocks};
use super::{SpillError, SpillStore, io};

/// Bytes buffered before they are appended to the file.
pub(super) const WRITE_BUFFER: usize = 256 << 10;

/// Buffers handed to the writer thread and not yet given back, at most (the caller fills
/// another meanwhile): with a backlog the thread goes from one write to the next without
/// sleeping, and the caller seldom waits for it (with one in flight, each hand-over waited
/// for the thread to wake up: the store alone took 15.7 ns per record instead of 10.5, best
/// of 12 runs each on the 2-core machine). At most 4 x 264 KiB of buffers per store.
const IN_FLIGHT: usize = 3;

fn per_byte(started: Instant, bytes: usize) -> f64 {
    started.elapsed().as_nanos() as f64 / bytes.max(1) as f64
}

/// A buffer the writer thread gives back: emptied, with how many bytes it held and the write's
/// time per byte or error.
struct Written {
    buffer: Vec<u8>,
    len: usize,
    result: std::io::Result<f64>,
}

/// The thread appending full buffers to the log, so that the `write` calls (page-cache copies,
/// or a slow disk) overlap with encoding the next records instead of stalling the caller (the
/// stage's worker). Buffers go in order over a channel and come back the same way; after a
/// failed write it writes nothing more (later blocks would land at wrong offsets).
pub(super) struct Writer {
    to_write: Option<mpsc::Sender<Vec<u8>>>,
    written: mpsc::Receiver<Written>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight: usize,
}

impl Writer {
    fn start(file: &File) -> std::io::Result<Self> {
        let mut file = file.try_clone()?;
        let (to_write, todo) = mpsc::channel::<Vec<u8>>();
        let (done, written) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pulseflow-spill".into())
            .spawn(move || {
                let mut failed = false;
                for mut buffer in todo {
                    checksum_blocks(&mut buffer);
                    let len = buffer.len();
                    let started = Instant::now();
                    let result = if failed {
                        Err(std::io::Error::other("an earlier spill write failed"))
                    } else {
                        file.write_all(&buffer).map(|()| per_byte(started, len))
                    };
                    failed |= result.is_err();
                    buffer.clear();
                    let back = Written {
                        buffer,
                        len,
                        result,
                    };
                    if done.send(back).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            to_write: Some(to_write),
            written,
            thread: Some(thread),
            in_flight: 0,
        })
    }

    /// Hands a buffer over; `false` when the thread has stopped.
    fn send(&mut self, buffer: Vec<u8>) -> bool {
        let sent = self
            .to_write
            .as_ref()
            .is_some_and(|t| t.send(buffer).is_ok());
        self.in_flight += usize::from(sent);
        sent
    }

    /// The oldest buffer in flight, once written (waiting for it with `wait`); `None` when
    /// none is in flight, none is written yet (without `wait`) or the thread has stopped.
    fn receive(&mut self, wait: bool) -> Option<Written> {
        if self.in_flight == 0 {
            return None;
        }
        let back = if wait {
            self.written.recv().ok()?
        } else {
            self.written.try_recv().ok()?
        };
        self.in_flight -= 1;
        Some(back)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once it has written what it was given.
        drop(self.to_write.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl SpillStore {
    /// Hands the sealed blocks to the writer thread (the open block must be empty) and goes on
    /// with an empty buffer; waits only while the previous buffer is still being written.
    /// Without a writer thread, writes them itself.
    pub(super) fn write_out(&mut self) -> Result<(), SpillError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if self.writer.is_none() && !self.inline_writes {
            match Writer::start(&self.current.file) {
                Ok(w) => self.writer = Some(w),
                Err(e) => {
                    tracing::debug!("spill writer thread not started, writing inline: {e}");
                    self.inline_writes = true;
                }
            }
        }
        if self.writer.is_none() {
            return self.write_here();
        }
        self.collect_ready()?;
        while self
            .writer
            .as_ref()
            .is_some_and(|w| w.in_flight >= IN_FLIGHT)
        {
            self.collect()?;
        }
        let next = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(WRITE_BUFFER + 2 * BLOCK));
        let full = std::mem::replace(&mut self.buffer, next);
        self.flushed += full.len() as u64;
        self.open_start = 0;
        if self.writer.as_mut().is_some_and(|w| w.send(full)) {
            Ok(())
        } else {
            Err(self.writer_stopped())
        }
    }

    fn writer_stopped(&self) -> SpillError {
        SpillError::Io {
            path: self.current.path.clone(),
            source: std::io::Error::other("the spill writer thread has stopped"),
        }
    }

    /// Waits for the writer to give back the oldest buffer in flight: counts its bytes as
    /// written and its write time in the cost model, or returns its write error.
    fn collect(&mut self) -> Result<(), SpillError> {
        let Some(back) = self.writer.as_mut().and_then(|w| w.receive(true)) else {
            return Err(self.writer_stopped());
        };
        self.written_back(back)
    }

    /// Takes back the buffers the writer has finished with, without waiting (so the cost
    /// model learns the write time early, and the next swap finds a spare buffer).
    fn collect_ready(&mut self) -> Result<(), SpillError> {
        while let Some(back) = self.writer.as_mut().and_then(|w| w.receive(false)) {
            self.written_back(back)?;
        }
        Ok(())
    }

    fn written_back(&mut self, back: Written) -> Result<(), SpillError> {
        let ns = back.result.map_err(io(&self.current.path))?;
        self.written += back.len as u64;
        self.costs.write_ns = Some(CostModel::blend(self.costs.write_ns, ns));
        self.spare.push(back.buffer);
        Ok(())
    }

    /// Waits until everything handed to the writer is in the file.
    pub(super) fn sync(&mut self) -> Result<(), SpillError> {
        while self.writer.as_ref().is_some_and(|w| w.in_flight > 0) {
            self.collect()?;
        }
        Ok(())
    }

    /// Writes the sealed blocks on this thread (the open block must be empty, and nothing in
    /// flight).
    pub(super) fn write_here(&mut self) -> Result<(), SpillError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        checksum_blocks(&mut self.buffer);
        let started = Instant::now();
        self.current
            .file
            .write_all(&self.buffer)
            .map_err(io(&self.current.path))?;
        self.costs.write_ns = Some(CostModel::blend(
            self.costs.write_ns,
            per_byte(started, self.buffer.len()),
        ));
        self.flushed += self.buffer.len() as u64;
        self.written = self.flushed;
        self.buffer.clear();
        self.open_start = 0;
        Ok(())
    }

    /// Seals the open block and writes everything buffered to the file; when it returns, the
    /// file holds every record appended so far. Waits for the buffers in flight, then writes
    /// what is left on this thread: handing it over only to wait for it would add the writer
    /// thread's wake-up to every flush (the stage flushes after each spill round, often of
    /// less than a write buffer).
    pub fn flush(&mut self) -> Result<(), SpillError> {
        self.seal()?;
        self.sync()?;
        self.write_here()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accumulate::spill::block_records;

    #[test]
    fn blocks_being_written_read_back() {
        // Several write buffers' worth: the writer thread holds some while they are read.
        let mut store = SpillStore::open(None).expect("open");
        let record = |i: u32| format!("record-{i}-{}", "x".repeat((i % 40) as usize));
        let refs: Vec<_> = (0..60_000u32)
            .map(|i| store.append(record(i).as_bytes()).expect("append"))
            .collect();
        assert!(store.flushed > 2 * WRITE_BUFFER as u64, "{}", store.flushed);
        let mut out = Vec::new();
        // Oldest first (written or in flight), then the newest (in the buffer), then back.
        for i in [0u32, 1, 30_000, 59_999, 45_000, 2] {
            store.read(refs[i as usize], &i, &mut out).expect("read");
            assert_eq!(out, record(i).as_bytes());
        }
        store.flush().expect("flush");
        let on_disk = std::fs::metadata(store.path()).expect("log").len();
        assert_eq!(on_disk, store.stats().stored_bytes);
        // Every block in the file carries its checksum: all read back and check.
        let mut block = Vec::new();
        let mut seen = 0;
        for b in 0..store.stats().blocks as u32 {
            store.read_block(b, &mut block).expect("checked block");
            seen += block_records(&block).count();
        }
        assert_eq!(seen, 60_000);
    }
}
