//! Error types: what user code returns ([`StageError`]), why a graph is invalid
//! ([`ValidationError`], [`BuildError`]) and why a run failed ([`PipelineError`]).

use std::fmt;

use crate::envelope::Envelope;

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error raised by a stage's own code.
///
/// ```
/// use pulseflow::StageError;
/// let err = StageError::msg("bad record");
/// assert_eq!(err.to_string(), "bad record");
/// let io = std::io::Error::new(std::io::ErrorKind::Other, "disk gone");
/// assert_eq!(StageError::from_error(io).to_string(), "disk gone");
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl StageError {
    /// An error with a message only.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// Wraps another error, keeping its message.
    pub fn from_error(error: impl Into<BoxError>) -> Self {
        let source = error.into();
        Self {
            message: source.to_string(),
            source: Some(source),
        }
    }

    /// Turns a caught panic payload into an error.
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Self {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        Self::msg(format!("panicked: {text}"))
    }
}

/// An item that failed in a stage, handed to the stage's error policy.
///
/// `item` is `None` when the stage's code consumed the item before failing (for example a
/// panic inside a by-value closure): it can then be dead-lettered only by sequence number.
#[derive(Debug)]
pub struct ItemFailure<T> {
    /// The item, when it still exists.
    pub item: Option<Envelope<T>>,
    /// The item's sequence number.
    pub seq: u64,
    /// What went wrong.
    pub error: StageError,
}

impl<T> ItemFailure<T> {
    /// A failure that gives the item back for retry or dead-lettering.
    pub fn new(item: Envelope<T>, error: StageError) -> Self {
        Self {
            seq: item.seq,
            item: Some(item),
            error,
        }
    }

    /// A failure whose item no longer exists.
    pub fn consumed(seq: u64, error: StageError) -> Self {
        Self {
            item: None,
            seq,
            error,
        }
    }
}

/// One problem found when validating a pipeline graph.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// Two stages share an id.
    #[error("duplicate stage id `{0}`")]
    DuplicateStageId(String),
    /// An edge names a stage that does not exist.
    #[error("edge {from} -> {to} refers to unknown stage `{missing}`")]
    DanglingEdge {
        /// Edge start.
        from: String,
        /// Edge end.
        to: String,
        /// The id that does not exist.
        missing: String,
    },
    /// Stages form a cycle.
    #[error("cycle through stages {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// An output nobody consumes.
    #[error("output `{port}` of stage `{stage}` is not connected to any stage")]
    UnusedOutput {
        /// The stage.
        stage: String,
        /// The output's name.
        port: String,
    },
    /// A stage that needs input but has none.
    #[error("stage `{0}` has no input")]
    MissingInput(String),
    /// A capacity, window or worker count of zero.
    #[error("stage `{stage}`: {what} must be at least 1")]
    ZeroCapacity {
        /// The stage.
        stage: String,
        /// Which setting.
        what: String,
    },
    /// A parallelism that contradicts the stage's ordering or kind.
    #[error("stage `{stage}`: parallelism {parallelism} conflicts with {with}: {reason}")]
    ParallelismConflict {
        /// The stage.
        stage: String,
        /// The parallelism hint.
        parallelism: String,
        /// What it conflicts with.
        with: String,
        /// Why.
        reason: String,
    },
    /// A policy whose settings cannot work.
    #[error("stage `{stage}`: {reason}")]
    InvalidPolicy {
        /// The stage.
        stage: String,
        /// What is wrong.
        reason: String,
    },
    /// A policy name that the registry does not know.
    #[error("stage `{stage}` refers to unknown {kind} policy `{name}`")]
    UnknownPolicy {
        /// The stage.
        stage: String,
        /// Policy kind (error, backpressure, circuit breaker, buffer).
        kind: &'static str,
        /// The unknown name.
        name: String,
    },
}

impl ValidationError {
    /// The stage the problem is about.
    pub fn stage(&self) -> Option<&str> {
        match self {
            ValidationError::DuplicateStageId(s) | ValidationError::MissingInput(s) => Some(s),
            ValidationError::DanglingEdge { missing, .. } => Some(missing),
            ValidationError::Cycle(stages) => stages.first().map(String::as_str),
            ValidationError::UnusedOutput { stage, .. }
            | ValidationError::ZeroCapacity { stage, .. }
            | ValidationError::InvalidPolicy { stage, .. }
            | ValidationError::ParallelismConflict { stage, .. }
            | ValidationError::UnknownPolicy { stage, .. } => Some(stage),
        }
    }
}

/// Every problem found when building a pipeline, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct BuildError {
    /// The problems, in graph order.
    pub errors: Vec<ValidationError>,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        let s = if n == 1 { "" } else { "s" };
        write!(f, "invalid pipeline ({n} problem{s})")?;
        for e in &self.errors {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

/// Why a run did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A stage's `init` failed; the run did not start processing.
    #[error("stage `{stage}` failed to initialise: {source}")]
    Init {
        /// The stage.
        stage: String,
        /// Its error.
        source: StageError,
    },
    /// An item failed in a stage whose error policy is `Fail`.
    #[error("stage `{stage}` failed on item {seq}: {source}")]
    Item {
        /// The stage.
        stage: String,
        /// The failed item's sequence number.
        seq: u64,
        /// Its error.
        source: StageError,
    },
    /// A source or sink failed outside any item, or a stage failed to close.
    #[error("stage `{stage}` failed: {source}")]
    Stage {
        /// The stage.
        stage: String,
        /// Its error.
        source: StageError,
    },
    /// The engine itself failed in a stage's task (a bug, reported rather than hidden).
    #[error("stage `{stage}` task ended abnormally: {reason}")]
    Task {
        /// The stage.
        stage: String,
        /// What happened.
        reason: String,
    },
    /// The run was aborted, or a graceful stop missed its deadline and was aborted.
    #[error("run aborted with {in_flight} items in flight")]
    Aborted {
        /// Items that had entered and were not accounted for when the run was aborted.
        in_flight: u64,
    },
    /// The engine is already running a pipeline.
    #[error("this engine is already running a pipeline")]
    AlreadyRunning,
}
