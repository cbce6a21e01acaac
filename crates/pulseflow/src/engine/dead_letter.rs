//! Dead letters: items that failed under policy `DeadLetter` (or exhausted their retries),
//! with the error, the stage and the number of attempts.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

/// One dead-lettered item.
pub struct DeadLetter {
    /// The stage it failed in.
    pub stage: String,
    /// The item's sequence number.
    pub seq: u64,
    /// The error text.
    pub error: String,
    /// Attempts made (1 without retries).
    pub attempts: u32,
    /// The payload, when the stage still had it; downcast to the stage's input type.
    pub payload: Option<Box<dyn Any + Send>>,
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("stage", &self.stage)
            .field("seq", &self.seq)
            .field("error", &self.error)
            .field("attempts", &self.attempts)
            .field("has_payload", &self.payload.is_some())
            .finish()
    }
}

impl DeadLetter {
    /// The payload as `T`, if it is one.
    pub fn payload<T: 'static>(&self) -> Option<&T> {
        self.payload.as_ref().and_then(|p| p.downcast_ref::<T>())
    }
}

/// Where dead letters go when the result should not hold them.
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Receives one dead letter.
    fn accept(&self, letter: DeadLetter);
}

impl<F> DeadLetterSink for F
where
    F: Fn(DeadLetter) + Send + Sync + 'static,
{
    fn accept(&self, letter: DeadLetter) {
        self(letter)
    }
}

/// Collects dead letters for the result, or forwards them to a sink.
pub(crate) struct DeadLetters {
    sink: Option<Arc<dyn DeadLetterSink>>,
    kept: Mutex<Vec<DeadLetter>>,
    keep: usize,
    overflow: Mutex<u64>,
}

impl DeadLetters {
    pub fn new(sink: Option<Arc<dyn DeadLetterSink>>, keep: usize) -> Self {
        Self {
            sink,
            kept: Mutex::new(Vec::new()),
            keep,
            overflow: Mutex::new(0),
        }
    }

    pub fn send(&self, letter: DeadLetter) {
        match &self.sink {
            Some(sink) => sink.accept(letter),
            None => {
                let mut kept = self.kept.lock();
                if kept.len() < self.keep {
                    kept.push(letter);
                } else {
                    *self.overflow.lock() += 1;
                }
            }
        }
    }

    pub fn take(&self) -> (Vec<DeadLetter>, u64) {
        (
            std::mem::take(&mut *self.kept.lock()),
            std::mem::take(&mut *self.overflow.lock()),
        )
    }
}
