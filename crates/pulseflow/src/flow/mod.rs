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
