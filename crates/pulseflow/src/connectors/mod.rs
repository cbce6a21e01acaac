//! Connectors to systems outside the process, each behind a cargo feature of its own.
//!
//! - [`http`] (feature `http`): an HTTP source that receives JSON items by POST and pushes
//!   back on its clients when the pipeline is full, and an HTTP sink that batches items into
//!   requests, retries within a budget and adapts its concurrency to the server.

#[cfg(feature = "http")]
pub mod http;
