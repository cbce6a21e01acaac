//! Sinks: `stdout` and `file` write one JSON value per line, `http` POSTs batches of them,
//! `nats` publishes to JetStream, `blackhole` only counts.

pub mod blackhole;
pub mod file;
pub mod http;
pub mod nats;
pub mod ndjson;
pub mod stdout;
pub mod writer;
