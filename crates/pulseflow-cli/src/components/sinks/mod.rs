//! Sinks: `stdout` and `file` write one JSON value per line, `blackhole` only counts.

pub mod blackhole;
pub mod file;
pub mod ndjson;
pub mod stdout;
pub mod writer;
