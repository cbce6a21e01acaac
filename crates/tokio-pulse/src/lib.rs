//! Tokio-Pulse: CPU supervision for Tokio tasks.
//!
//! Tokio-Pulse times every poll of the tasks it supervises and moves misbehaving tasks through
//! tiers, Monitor → Warn → Yield → Isolate, with hysteresis and cooldown, and back down when
//! they behave. Isolated tasks run on a separate runtime whose threads the OS restrains
//! (a cgroup CPU quota, nice values, `SCHED_IDLE`), so a CPU hog cannot starve the latency of
//! everything else, and is not starved itself.
//!
//! | module | concern |
//! |---|---|
//! | [`clock`] | CPU timers (calibrated), the cheap per-poll clock, another thread's CPU clock |
//! | [`budget`] | the compact per-task record of violations |
//! | [`tier`] | tiers, their configuration and the pure decisions of the [`tier::TierManager`] |
//! | [`isolation`] | the OS layer: CPU limits and priorities for a group of threads |
//! | [`supervise`] | the [`Supervisor`]: spawning, timing, yielding, migrating, metrics |
//!
//! Nothing in this crate prints; it reports through `tracing` and the `metrics` facade.
pub mod budget;
pub mod clock;
pub mod isolation;
pub mod supervise;
pub mod tier;

pub use supervise::{
    JoinHandle, Supervisor, SupervisorConfig, SupervisorError, TaskStats, WorkerInfo,
};
pub use tier::{Tier, TierConfig};
