//! Flow control: the bounded edges that carry batches between stages.
//!
//! An edge's capacity counts items, not batches. When it is full, its
//! [`DropPolicy`](crate::policy::DropPolicy) decides: `Block` makes the sender wait,
//! `DropOldest` evicts queued items, `DropNewest` refuses new ones. Every drop is counted on the
//! edge with its reason, so the run's accounting still reconciles.

pub(crate) mod channel;
