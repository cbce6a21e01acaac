//! # pulseflow
//!
//! An async dataflow pipeline engine on Tokio. Items travel in [`Envelope`]s, grouped in
//! [`Batch`]es, from sources through transforms, branches and merges to sinks. Every stage has
//! a bounded input buffer with a drop policy, an error policy (retry, dead-letter, fail,
//! ignore) and live counters; at the end of every run the counts reconcile:
//! `ingested + created = delivered + filtered + dropped + dead_lettered + absorbed`, where
//! `created` counts items a stage made besides its inputs (branch copies, `flat_map` outputs)
//! and `absorbed` the inputs an accumulator folded into an output with others (see
//! [`metrics`]). Sources may attach acknowledgements that resolve once everything derived
//! from an item is handled ([`ack`]).
//!
//! ```
//! use pulseflow::prelude::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut p = PipelineBuilder::new("quickstart");
//! let total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
//! let sum = total.clone();
//! p.source("numbers", sources::iter(1..=1000u64))
//!     .map("square", |x| x * x)
//!     .filter("even", |x| x % 2 == 0)
//!     .sink("sum", sink_fn(move |x: u64| {
//!         sum.fetch_add(x, std::sync::atomic::Ordering::Relaxed);
//!     }));
//! let result = ExecutionEngine::new()
//!     .run(p.build().expect("valid pipeline"), ExecutionOptions::default())
//!     .await;
//! assert!(result.success, "{:?}", result.error);
//! assert_eq!(result.accounting.delivered, 500);
//! assert!(result.accounting.reconciles());
//! # }
//! ```
//!
//! Modules, one concern each: [`envelope`] (data model), [`stage`] (traits and adapters),
//! [`builder`] (typed construction), [`graph`] (untyped graph, validation, export),
//! [`policy`] (buffer, backpressure, error, circuit-breaker policies and their registry),
//! [`flow`] (bounded edges), [`engine`] (execution), [`metrics`] (counters and the
//! conservation law), [`memory`] (memory budget).

pub mod accumulate;
pub mod ack;
pub mod builder;
pub mod connectors;
pub mod engine;
pub mod envelope;
pub mod error;
pub mod flow;
pub mod graph;
pub mod memory;
pub mod metrics;
mod plan;
pub mod policy;
pub mod stage;

pub use builder::{Branches, Pipeline, PipelineBuilder, Routes, Stream};
pub use engine::{DeadLetter, ExecutionEngine, ExecutionOptions, PipelineResult};
pub use envelope::{Batch, Envelope};
pub use error::{BuildError, ItemFailure, PipelineError, StageError, ValidationError};
pub use graph::PipelineGraph;
/// The token of [`ExecutionOptions::cancellation`]: cancelling it stops a run gracefully.
pub use tokio_util::sync::CancellationToken;

/// The names most pipelines need.
pub mod prelude {
    pub use crate::builder::{Branches, Pipeline, PipelineBuilder, Routes, Stream};
    pub use crate::engine::{ExecutionEngine, ExecutionOptions, PipelineResult};
    pub use crate::envelope::{Batch, Envelope};
    pub use crate::error::{ItemFailure, PipelineError, StageError};
    pub use crate::policy::{
        BufferPolicy, ChannelOrdering, DropPolicy, ErrorPolicy, ParallelismHint, PolicyRef,
    };
    pub use crate::stage::sinks::{self, sink_fn};
    pub use crate::stage::sources;
    pub use crate::stage::{Sink, Source, SourceOutput, SourceStatus, StageContext, Transform};
}
