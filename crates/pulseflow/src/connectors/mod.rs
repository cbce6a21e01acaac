//! Connectors to systems outside the process, each behind a cargo feature of its own.
//!
//! - [`http`] (feature `http`): an HTTP source that receives JSON items by POST and pushes
//!   back on its clients when the pipeline is full, and an HTTP sink that batches items into
//!   requests, retries within a budget and adapts its concurrency to the server.
//! - [`nats`] (feature `nats`): a NATS JetStream source and sink, acknowledged end to end,
//!   and the partition assignment that lets several processes share a stream.

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "nats")]
pub mod nats;
