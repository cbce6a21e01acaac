//! Sinks: `stdout` and `file` write one JSON value per line, `blackhole` only counts, `nats`
//! publishes to JetStream.

pub mod blackhole;
pub mod file;
pub mod nats;
pub mod ndjson;
pub mod stdout;
pub mod writer;
