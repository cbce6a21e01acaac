pub mod accumulate;
pub mod backpressure;
pub mod checkpoint;
pub mod isolation;
pub mod linear;
pub mod ndjson;
pub mod pulse_overhead;
pub mod spill_store;
