//! Connectors to systems outside the process, each behind a cargo feature of its own.
//!
//! - [`nats`] (feature `nats`): a NATS JetStream source and sink, acknowledged end to end,
//!   and the partition assignment that lets several processes share a stream.

#[cfg(feature = "nats")]
pub mod nats;
