//! A thread of its own that reads a line source's input in large chunks.
//!
//! Tokio's files and stdin hand every read to its blocking threads and wake the reading task
//! when it is done; with the CPU-bound stages keeping both workers busy, those hops (and the
//! writer's, see [`crate::components::sinks::writer`]) made runs of the same file swing widely in context switches
//! and time. Here the thread reads ahead a few [`CHUNK`]s into a bounded queue, so the source
//! mostly finds its next chunk waiting.

use std::io::Read;

use tokio::sync::mpsc;

/// Bytes read at a time.
pub const CHUNK: usize = 1 << 20;

/// Chunks read ahead at most.
const AHEAD: usize = 2;

/// The receiving side, read like a buffered reader: [`ChunkReader::fill_buf`] then
/// [`ChunkReader::consume`].
pub struct ChunkReader {
    rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    /// Chunks read, handed back to the thread to fill again: a new chunk would be zeroed, and
    /// its pages faulted in, every time.
    spare: std::sync::mpsc::Sender<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl ChunkReader {
    /// Starts the thread reading `input` to its end (or to its first error).
    pub fn start(mut input: Box<dyn Read + Send>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(AHEAD);
        let (spare, spares) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::Builder::new()
            .name("pulseflow-reader".into())
            .spawn(move || {
                loop {
                    let mut chunk = match spares.try_recv() {
                        Ok(mut used) => {
                            // Only whole chunks come back: nothing is zeroed here.
                            used.resize(CHUNK, 0);
                            used
                        }
                        Err(_) => vec![0; CHUNK],
                    };
                    let read = read_some(&mut *input, &mut chunk).map(|n| {
                        chunk.truncate(n);
                        // A short read (a pipe) should not hold a whole chunk of memory.
                        if n < CHUNK / 4 {
                            chunk.shrink_to_fit();
                        }
                        chunk
                    });
                    let end = matches!(&read, Ok(c) if c.is_empty()) || read.is_err();
                    // The source is gone (stopped, or the run ended): stop reading.
                    if tx.blocking_send(read).is_err() || end {
                        return;
                    }
                }
            })?;
        Ok(Self {
            rx,
            spare,
            chunk: Vec::new(),
            pos: 0,
            eof: false,
        })
    }

    /// The bytes read and not consumed yet, waiting for more when there are none; empty at the
    /// end of the input.
    pub async fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.pos == self.chunk.len() && !self.eof {
            match self.rx.recv().await {
                Some(Ok(chunk)) => {
                    self.eof = chunk.is_empty();
                    let used = std::mem::replace(&mut self.chunk, chunk);
                    if used.len() == CHUNK {
                        // The thread may have ended: the chunk is then dropped here.
                        let _ = self.spare.send(used);
                    }
                    self.pos = 0;
                }
                Some(Err(e)) => {
                    self.eof = true;
                    return Err(e);
                }
                None => self.eof = true,
            }
        }
        Ok(&self.chunk[self.pos..])
    }

    /// Marks `n` bytes of [`ChunkReader::fill_buf`]'s as used.
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.chunk.len());
    }
}

/// One read into `buf` (a file fills it; a pipe or terminal gives what it has, so lines that
/// trickle in are not held back); 0 only at the end of the input.
fn read_some(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match input.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gives its bytes a few at a time, as a pipe does.
    struct Trickle(std::io::Cursor<Vec<u8>>);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(7);
            self.0.read(&mut buf[..n])
        }
    }

    #[tokio::test]
    async fn reads_every_byte_in_order() {
        let data: Vec<u8> = (0..3 * CHUNK + 123).map(|i| (i % 251) as u8).collect();
        for input in [
            Box::new(std::io::Cursor::new(data.clone())) as Box<dyn Read + Send>,
            Box::new(Trickle(std::io::Cursor::new(data[..5000].to_vec()))),
        ] {
            let mut reader = ChunkReader::start(input).expect("start");
            let mut got = Vec::new();
            loop {
                let buf = reader.fill_buf().await.expect("read");
                if buf.is_empty() {
                    break;
                }
                // Consume in odd steps.
                let n = buf.len().min(1000);
                got.extend_from_slice(&buf[..n]);
                reader.consume(n);
            }
            assert!(data.starts_with(&got) && (got.len() == data.len() || got.len() == 5000));
        }
    }

    struct Failing;

    impl Read for Failing {
        fn read(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("bad sector"))
        }
    }

    #[tokio::test]
    async fn a_read_error_reaches_the_reader() {
        let mut reader = ChunkReader::start(Box::new(Failing)).expect("start");
        let err = reader.fill_buf().await.expect_err("fails");
        assert_eq!(err.to_string(), "bad sector");
        assert!(reader.fill_buf().await.expect("then the end").is_empty());
    }
}
