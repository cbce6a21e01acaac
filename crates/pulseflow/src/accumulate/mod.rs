//! Keyed accumulation: group items by key, fold each into its key's state, emit when the key
//! is complete, when a deadline or a size limit is reached (partial flush), or at the end of
//! the input.
//!
//! - [`Accumulator`]: what to accumulate (key, state, completeness, flush, spill encoding).
//! - [`AccumulatorPolicy`]: limits (items, bytes), deadlines (max latency since the first item,
//!   TTL since the latest), partial flush, spill.
//! - Completeness evaluators usable from any accumulator: [`RequiredVars`] (bitset over
//!   variable names), [`CountThreshold`], [`SizeThreshold`], [`Hybrid`].
//! - [`SpillStore`]: where cold keys go when the state passes the pipeline's
//!   [`MemoryBudget`](crate::memory::MemoryBudget).
//! - [`TemplateVars`]: the seed's template-variable accumulator.
//!
//! Emitted envelopes carry the key's completeness score (`1.0` when complete) as a number,
//! read with [`completeness`], and as the header `acc.completeness` (`"1.000"`), and the
//! header `acc.spilled` (whether the key's state was ever on disk). A key that completed and
//! then receives more items starts again, as a new key. Each stage counts
//! `accumulator_operations{stage, action}` with actions `completed`, `partial_flush`,
//! `ttl_flush`, `spilled` and `reloaded`, and shows its table and spill figures in
//! [`inspect`](crate::ExecutionEngine::inspect) (`accumulator.*`, `spill.*`).
//!
//! A count-and-sum per key, complete at three items, the rest flushed at the end of input:
//!
//! ```
//! use pulseflow::accumulate::{Accumulator, AccumulatorPolicy, AccumulatorState, CompletenessResult};
//! use pulseflow::prelude::*;
//!
//! struct Sum3;
//!
//! impl Accumulator for Sum3 {
//!     type In = (u32, u64);
//!     type Out = (u32, u64, u64);
//!     type Key = u32;
//!     type State = u64;
//!
//!     fn key(&self, item: &Envelope<(u32, u64)>) -> u32 {
//!         item.payload.0
//!     }
//!     fn create(&mut self, _key: &u32) -> u64 {
//!         0
//!     }
//!     fn update(&mut self, sum: &mut u64, item: Envelope<(u32, u64)>) {
//!         *sum += item.payload.1;
//!     }
//!     fn check(&mut self, e: &mut AccumulatorState<u32, u64>) -> CompletenessResult<(u32, u64, u64)> {
//!         e.score = e.items as f64 / 3.0;
//!         if e.items == 3 {
//!             CompletenessResult::Complete((e.key, e.items, e.state))
//!         } else {
//!             CompletenessResult::Incomplete
//!         }
//!     }
//!     fn flush(&mut self, e: AccumulatorState<u32, u64>) -> Option<(u32, u64, u64)> {
//!         Some((e.key, e.items, e.state))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut p = PipelineBuilder::new("sums");
//! let (sink, got) = sinks::collect();
//! p.source("in", sources::iter((0..8u64).map(|i| ((i % 2) as u32, i))))
//!     .accumulate("sum3", Sum3, AccumulatorPolicy::default().with_partial_flush(true))
//!     .sink("out", sink);
//! let result = ExecutionEngine::new()
//!     .run(p.build().expect("valid"), ExecutionOptions::default())
//!     .await;
//! assert!(result.accounting.reconciles());
//! let out = got.take();
//! assert_eq!(out[0].payload, (0, 3, 0 + 2 + 4));
//! assert_eq!(out[0].header("acc.completeness"), Some("1.000"));
//! assert_eq!(pulseflow::accumulate::completeness(&out[0]), Some(1.0));
//! assert_eq!(out.len(), 4); // two complete, two flushed at the end
//! assert_eq!(result.accounting.absorbed, 8 - 4);
//! # }
//! ```

mod accumulator;
mod codec;
mod completeness;
mod policy;
mod spill;
pub(crate) mod table;
mod template_vars;

pub use accumulator::{Accumulator, AccumulatorState, CompletenessResult};

/// The completeness score an accumulator's output carries: `1.0` for a complete key, the
/// key's score (between 0 and 1) for one flushed before it completed; `None` for an item that
/// did not come out of an accumulator.
pub fn completeness<T>(output: &crate::Envelope<T>) -> Option<f64> {
    match output.attr("acc.completeness") {
        Some(crate::envelope::AttrValue::Float(score)) => Some(*score),
        _ => None,
    }
}
pub use completeness::{
    CompletenessEvaluator, CountThreshold, Hybrid, Observed, Progress, RequiredVars, SizeThreshold,
    VarSet,
};
pub use policy::{AccumulationDescriptor, AccumulatorPolicy};
pub use spill::{
    Compression, DEFAULT_COMPACT_BELOW, DEFAULT_SEGMENT_BYTES, RecordRef, SpillError, SpillStats,
    SpillStore, block_records,
};
pub use template_vars::{TemplateResult, TemplateVar, TemplateVars, VarsState};
