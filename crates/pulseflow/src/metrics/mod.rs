//! Per-stage and per-edge counters, the live [`StageRuntimeState`] returned by `inspect`, and
//! the pipeline-wide [`Accounting`] that proves nothing was lost.
//!
//! Counters are plain atomics updated once per batch, never per item. The same figures are
//! published through the [`metrics`] facade (names prefixed `pulseflow_`, labelled with
//! `pipeline` and `stage`), so any recorder (Prometheus, StatsD, ...) sees them.
//!
//! # The conservation law
//!
//! Every item that enters a stage, or that a stage creates (a `flat_map` yielding three items
//! from one creates two, a branch copying one item to two outputs creates one), leaves it
//! exactly once: emitted, filtered, dropped by a named reason, or dead-lettered. Every item sent
//! on an edge is delivered or dropped there. Summed over the pipeline:
//!
//! `ingested + created = delivered + filtered + dropped + dead_lettered + absorbed`
//!
//! where `ingested` counts what sources produced, `delivered` what sinks accepted, and
//! `absorbed` the inputs an accumulator folded into an output together with others (k inputs
//! emitted as one output: k - 1 absorbed).
//! [`Accounting::reconciles`] checks it at the end of every run.

mod load;
mod stats;

pub use load::{BACKPRESSURE_MARK, Load, WINDOW as LOAD_WINDOW};
pub(crate) use load::{LoadWindow, Totals};

pub use stats::{
    Accounting, DropReason, EdgeSnapshot, StageMetrics, StageRuntimeState, StageStatus,
};
pub(crate) use stats::{EdgeStats, ExtraMetrics, StageStats, Tally};
