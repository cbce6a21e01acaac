//! Flow control: the bounded edges that carry batches between stages, the backpressure
//! controllers that decide how much may enter, and the circuit breaker.
//!
//! An edge's capacity counts items, not batches. When it is full, its
//! [`DropPolicy`](crate::policy::DropPolicy) decides: `Block` makes the sender wait,
//! `DropOldest` evicts queued items, `DropNewest` refuses new ones. Every drop is counted on the
//! edge with its reason, so the run's accounting still reconciles.
//!
//! A [`BackpressureController`] (built from a
//! [`BackpressureStrategy`](crate::policy::BackpressureStrategy) by [`controller_for`]) is asked
//! once per batch how many items may enter; its [`Admission`] accounts for every item (admitted,
//! dropped by policy and counted, or deferred). Strategies, one per module:
//! [`BoundedBuffer`] (drops counted), [`CreditBased`] (never more in flight than credits),
//! [`RateShaping`] (token bucket), [`AdaptiveBatch`] (batch size follows latency and depth),
//! [`ReactivePull`] (`request(n)` demand within a window) and [`AccumulatorAware`] (accumulator
//! bytes and spills count as depth). Waiting is always asynchronous, with a timeout, on Tokio's
//! clock.
//!
//! A [`CircuitBreaker`] (per [`CircuitBreakerPolicy`](crate::policy::CircuitBreakerPolicy))
//! guards a stage: closed, open since a time, or half-open with a single probe; every
//! transition is counted under its label.
//!
//! # In a pipeline
//!
//! Set on a stage with the builder (or on its `StageNode`, or by name from a
//! [`PolicyRegistry`](crate::policy::PolicyRegistry)). `Bounded` is the stage's buffer itself;
//! `CreditBased` and `ReactivePull` admit at the senders of the stage's buffer (a source then
//! produces only what the stage asked for); `RateShaping` and `Adaptive` act in front of the
//! stage's handler, as does the breaker: while it is open the stage takes no input, its buffer
//! fills and the pressure goes upstream. Each stage's controller and breaker figures appear in
//! `inspect` under `backpressure.*` and `breaker.*`.
//!
//! ```
//! use std::time::Duration;
//! use pulseflow::policy::{BackpressureStrategy, CircuitBreakerPolicy, PolicyRegistry};
//! use pulseflow::prelude::*;
//!
//! let mut policies = PolicyRegistry::default();
//! policies.add_backpressure("gentle", BackpressureStrategy::RateShaping { rate: 500, burst: 50 });
//! let mut p = PipelineBuilder::new("guarded");
//! p.policies(policies);
//! p.source("events", sources::iter(0u32..10))
//!     .map("enrich", |x| x + 1)
//!     .backpressure(BackpressureStrategy::CreditBased { initial: 256, replenish_threshold: 128 })
//!     .map("score", |x| x * 2)
//!     .backpressure(PolicyRef::Named("gentle".into()))
//!     .sink("store", sink_fn(|_x: u32| {}))
//!     .circuit_breaker(CircuitBreakerPolicy {
//!         error_threshold: 0.5,
//!         latency_threshold: Duration::from_secs(2),
//!         window: Duration::from_secs(30),
//!         minimum_throughput: 20,
//!         cooldown: Duration::from_secs(5),
//!     });
//! assert!(p.build().is_ok());
//! ```

pub mod accumulator_aware;
pub mod adaptive;
pub mod bounded;
pub mod breaker;
pub(crate) mod channel;
pub mod controller;
pub mod credit;
pub mod pull;
pub mod rate;

pub use accumulator_aware::AccumulatorAware;
pub use adaptive::{AdaptiveBatch, AdaptiveConfig};
pub use bounded::BoundedBuffer;
pub use breaker::{
    BreakerOpen, BreakerSnapshot, CallPermit, CircuitBreaker, CircuitState, Transition,
};
pub use controller::{
    AcquireTimeout, Admission, BackpressureController, FlowConfigError, Load, LoadProbe,
    controller_for,
};
pub use credit::CreditBased;
pub use pull::ReactivePull;
pub use rate::RateShaping;
