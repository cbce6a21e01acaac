pub mod accumulate;
pub mod backpressure;
pub mod isolation;
pub mod linear;
pub mod pulse_overhead;
